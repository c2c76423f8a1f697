#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Build chroot for a kernel whose userland is newer than Debian 12: the 7.x
# kbuild tools (objtool, modpost, resolve_btfids, genksyms) need glibc 2.38+
# and those kernels use compiler flags gcc 12 lacks. A minbase debootstrap of
# the kernel's own Debian release (trixie for trixie-backports, sid for sid)
# from Debian's registry, with make, sparse, pahole and the kernel's headers
# (which pull in its gcc and linux-kbuild). Cached under
# SEVPLACE_KMOD_CACHE (default /var/cache/sevplace-kmod)/chroot-<release>;
# a later run only installs headers of a newer kernel. Builds run through
# in-chroot.sh (which mounts /proc for objtool).
#
#   kmod/tools/chroot.sh bpo|sid      prints the chroot directory
set -euo pipefail

TOOLS=$(cd "$(dirname "$0")" && pwd)
CACHE=${SEVPLACE_KMOD_CACHE:-/var/cache/sevplace-kmod}
MIRROR=${SEVPLACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
name=${1:?usage: chroot.sh bpo|sid}
case $name in
bpo) release=trixie; extra="deb $MIRROR trixie-backports main" ;;
sid) release=sid; extra="" ;;
*) echo "chroot.sh: no build chroot for '$name' (bpo, sid)" >&2; exit 2 ;;
esac
read -r _ abi ver _ hdr _ < <("$TOOLS/kernels.sh" "$name")
root=$CACHE/chroot-$release
log=$CACHE/chroot-$release.log

if [ ! -e "$root/.debootstrapped" ]; then
	command -v debootstrap >/dev/null || {
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
			--no-install-recommends debootstrap >&2
	}
	rm -rf "$root"
	mkdir -p "$CACHE"
	echo "chroot.sh: debootstrap --variant=minbase $release into $root" >&2
	debootstrap --variant=minbase --include=make,sparse,dwarves,kmod,xz-utils,perl \
		"$release" "$root" "$MIRROR" >"$log" 2>&1 ||
		{ tail -n 20 "$log" >&2; exit 1; }
	touch "$root/.debootstrapped"
fi
if [ ! -e "$root/.done" ]; then
	{
		echo "deb $MIRROR $release main"
		[ -z "$extra" ] || echo "$extra"
	} >"$root/etc/apt/sources.list"
	# no services start inside the chroot
	printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
	chmod +x "$root/usr/sbin/policy-rc.d"
	# the host's policy on Release file dates (a registry mirror serving
	# a snapshot sets these), nothing else of its configuration
	apt-config dump | grep -E '^Acquire::Check-(Valid-Until|Date) ' \
		>"$root/etc/apt/apt.conf.d/90sevplace-host" || true
	chroot "$root" apt-get -qq update >>"$log" 2>&1
	touch "$root/.done"
fi

if [ ! -e "$root/usr/src/$hdr/Makefile" ] ||
	[ "$(chroot "$root" dpkg-query -W -f '${Version}' "$hdr" 2>/dev/null)" != "$ver" ]; then
	echo "chroot.sh: installing $hdr=$ver in $root" >&2
	{
		chroot "$root" apt-get -qq update &&
		DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq \
			--no-install-recommends "$hdr=$ver"
	} >>"$log" 2>&1 || { tail -n 20 "$log" >&2; exit 1; }
	chroot "$root" apt-get clean
fi
# Debian's headers packages lack scripts/checker-valid.sh, without which
# kbuild turns C=2 off; the stand-in reports whether this sparse can parse
# the 7.x headers (sid's can, trixie's 0.6.4 cannot)
common=$(readlink -f "$root/usr/src/$hdr/scripts")
if [ ! -e "$common/checker-valid.sh" ]; then
	install -m 0755 "$TOOLS/checker-valid.sh" "$common/checker-valid.sh"
fi
echo "$root"
