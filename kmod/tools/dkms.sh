#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# sevflush-dkms installed for real on this Debian 12 host:
#   kmod/tools/dkms.sh install       build the .deb (deploy/debian/build-debs.sh
#                                    --dkms-only), install the headers of the
#                                    newest 6.1 and 6.12 and the .deb with
#                                    dpkg; dkms status must show the module
#                                    installed for both
#   kmod/tools/dkms.sh module ABI DIR
#                                    prints DIR/sevflush.ko, the module DKMS
#                                    installed for ABI (decompressed)
#   kmod/tools/dkms.sh remove        dpkg --purge; nothing may be left
# Prints "ok:"/"FAIL:" lines; exits non-zero on a failure.
set -euo pipefail

TOOLS=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$TOOLS/../.." && pwd)
OUT=${SEVPLACE_DKMS_OUT:-$REPO/target/dkms}
export DEBIAN_FRONTEND=noninteractive

ok() { echo "ok: dkms: $*"; }
fail() { echo "FAIL: dkms: $*"; exit 1; }
leftovers() {
	{
		ls -d /usr/src/sevflush-* /var/lib/dkms/sevflush 2>/dev/null || true
		find /lib/modules -path '*/updates/dkms/sevflush.ko*' 2>/dev/null || true
		dkms status -m sevflush 2>/dev/null || true
	} | sed '/^$/d'
}

case ${1:-} in
install)
	mkdir -p "$OUT"
	pkgs=()
	while read -r _ abi ver _ hdr _; do
		pkgs+=("$hdr=$ver")
		ABIS+=" $abi"
	done < <("$TOOLS/kernels.sh" 6.1 6.12)
	command -v dkms >/dev/null || pkgs+=(dkms)
	apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${pkgs[@]}" \
		>"$OUT/apt.log" 2>&1 || { tail -n 20 "$OUT/apt.log"; fail "apt-get install ${pkgs[*]}"; }
	rm -f "$OUT"/sevflush-dkms_*.deb
	"$REPO/deploy/debian/build-debs.sh" --dkms-only "$OUT" >/dev/null
	deb=$(ls "$OUT"/sevflush-dkms_*.deb)
	version=$(dpkg-deb -f "$deb" Version)
	if ! dpkg -i "$deb" >"$OUT/dpkg-install.log" 2>&1; then
		cat "$OUT/dpkg-install.log"
		fail "dpkg -i $deb"
	fi
	ok "dpkg -i ${deb##*/}"
	for abi in $ABIS; do
		st=$(dkms status -m sevflush -v "$version" -k "$abi" 2>/dev/null)
		echo "    dkms status: $st"
		[[ $st == *": installed"* ]] || { cat "$OUT/dpkg-install.log"; fail "not installed for $abi"; }
		ok "sevflush/$version installed for $abi"
	done
	;;
module)
	abi=${2:?module ABI DIR} dir=${3:?module ABI DIR}
	dkms status -m sevflush -k "$abi" 2>/dev/null | grep -q ": installed" || exit 1
	f=$(find "/lib/modules/$abi/updates/dkms" -name 'sevflush.ko*' | head -n 1)
	[ -n "$f" ] || exit 1
	mkdir -p "$dir"
	case $f in
	*.xz) xz -dc "$f" >"$dir/sevflush.ko" ;;
	*.zst) zstd -qdc "$f" >"$dir/sevflush.ko" ;;
	*) cp "$f" "$dir/sevflush.ko" ;;
	esac
	echo "$dir/sevflush.ko"
	;;
remove)
	mkdir -p "$OUT"
	dpkg --purge sevflush-dkms >"$OUT/dpkg-purge.log" 2>&1 || { cat "$OUT/dpkg-purge.log"; fail "dpkg --purge sevflush-dkms"; }
	left=$(leftovers)
	[ -z "$left" ] || fail "left behind after dpkg --purge: $(echo "$left" | tr '\n' ' ')"
	ok "dpkg --purge sevflush-dkms left nothing behind"
	;;
*)
	sed -n '4,14p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
