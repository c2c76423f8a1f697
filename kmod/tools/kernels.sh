#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Resolves the four kernels sevflush.ko is built and booted on from Debian's
# package lists at run time (versions move: security updates supersede and
# remove old ones):
#   6.1   newest linux-image-6.1.0-N-amd64 of bookworm(-security)
#   6.12  newest linux-image-6.12.N+deb12-amd64 of bookworm(-security)
#   bpo   newest trixie-backports kernel that has a headers package
#   sid   newest sid kernel that has a headers package
# The extra suites are read through an apt configuration of our own (its
# own sources file, lists and cache directories under the cache dir), so
# the host's apt sources are never touched.
#
#   kmod/tools/kernels.sh [--refresh] [NAME...]
# prints one line per kernel:
#   NAME ABI VERSION IMAGE_PACKAGE HEADERS_PACKAGE SUITE
#   kmod/tools/kernels.sh --download DIR PACKAGE=VERSION
# downloads one .deb into DIR with the same apt configuration.
# SEVPLACE_KMOD_CACHE (default /var/cache/sevplace-kmod) holds the apt
# state; --refresh (or lists older than 6 hours) runs apt-get update there.
set -euo pipefail

CACHE=${SEVPLACE_KMOD_CACHE:-/var/cache/sevplace-kmod}
MIRROR=${SEVPLACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${SEVPLACE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
APT=$CACHE/apt
refresh=0
names=()
download=()
if [ "${1:-}" = --download ]; then
	download=("${2:?--download DIR PACKAGE=VERSION}" "${3:?--download DIR PACKAGE=VERSION}")
	set --
fi
for a in "$@"; do
	case $a in
	--refresh) refresh=1 ;;
	6.1|6.12|bpo|sid) names+=("$a") ;;
	*) echo "kernels.sh: unknown kernel name '$a' (6.1, 6.12, bpo, sid)" >&2; exit 2 ;;
	esac
done
[ ${#names[@]} -gt 0 ] || names=(6.1 6.12 bpo sid)

mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/sources.list.d" "$APT/preferences.d"
cat >"$APT/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $SECURITY bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
SRC
APT_OPTS=(-o "Dir::Etc::sourcelist=$APT/sources.list"
	-o "Dir::Etc::sourceparts=$APT/sources.list.d"
	-o "Dir::Etc::preferencesparts=$APT/preferences.d"
	-o "Dir::State::Lists=$APT/lists"
	-o "Dir::Cache=$APT"
	-o "Dir::Cache::archives=$APT/archives"
	-o "APT::Get::List-Cleanup=0")
stamp=$APT/lists/.updated
if [ $refresh = 1 ] || [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +360)" ]; then
	apt-get "${APT_OPTS[@]}" -qq update >&2
	touch "$stamp"
fi

if [ ${#download[@]} = 2 ]; then
	cd "${download[0]}"
	apt-get "${APT_OPTS[@]}" -qq download "${download[1]}" >&2 || {
		apt-get "${APT_OPTS[@]}" -qq update >&2 && touch "$stamp"
		apt-get "${APT_OPTS[@]}" -qq download "${download[1]}" >&2
	}
	exit 0
fi

# pkgs SUITE_REGEX NAME_REGEX: "package version" of every matching binary
# package in the lists of the suites whose list file name matches
pkgs() {
	local f
	for f in "$APT"/lists/*_main_binary-amd64_Packages*; do
		[[ ${f##*/} =~ _dists_($1)_main_ ]] || continue
		/usr/lib/apt/apt-helper cat-file "$f"
	done | RE=$2 awk '
		/^Package: / { p = $2 }
		/^Version: / { if (p ~ ENVIRON["RE"]) print p, $2 }'
}

resolve() {
	local name=$1 suites image_re line img ver abi hdr
	case $name in
	6.1) suites='bookworm(-security|-updates)?'; image_re='^linux-image-6\.1\.0-[0-9]+-amd64(-unsigned)?$' ;;
	6.12) suites='bookworm(-security|-updates)?'; image_re='^linux-image-6\.12\.[0-9]+\+deb12-amd64(-unsigned)?$' ;;
	bpo) suites='trixie-backports'; image_re='^linux-image-[0-9.]+\+deb13-amd64(-unsigned)?$' ;;
	sid) suites='sid'; image_re='^linux-image-[0-9.]+\+deb1[4-9]-amd64(-unsigned)?$' ;;
	esac
	# every (image, version) whose headers package exists at that version
	line=$(
		{ pkgs "$suites" '^linux-headers-.*-amd64$' | sed 's/^/H /'; pkgs "$suites" "$image_re"; } |
		awk '$1 == "H" { h[$2 " " $3] = 1; next }
		     { abi = $1; sub(/^linux-image-/, "", abi); sub(/-unsigned$/, "", abi)
		       if (("linux-headers-" abi " " $2) in h) print $1, $2, abi }' |
		sort -V -k2,2 | tail -n 1
	)
	[ -n "$line" ] || { echo "kernels.sh: no $name kernel with headers in the package lists" >&2; return 1; }
	read -r img ver abi <<<"$line"
	# prefer the signed image package name when both exist at this version
	if [[ $img == *-unsigned ]] && pkgs "$suites" "^linux-image-${abi//+/[+]}\$" | grep -qx "linux-image-$abi $ver"; then
		img=linux-image-$abi
	fi
	hdr=linux-headers-$abi
	echo "$name $abi $ver $img $hdr ${suites%%(*}"
}

for n in "${names[@]}"; do resolve "$n"; done
