#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# CI for kmod/ (sevflush.ko). Run as root on Debian 12; idempotent.
# Installs its apt packages, then:
#   1. builds the module with W=1 against the newest Debian 6.1 and 6.12
#      headers (on this host, with sparse C=2), the newest trixie-backports
#      kernel (in a trixie chroot) and the newest sid kernel (in a sid
#      chroot, with sparse C=2), resolved by tools/kernels.sh and
#      tools/chroot.sh: any warning fails;
#   2. compiles the one-argument kvm_entry variant against 6.1 headers;
#   3. checkpatch.pl --strict --no-tree on the module sources;
#   4. user-space harness: stress plain, TSan, ASan+UBSan, broken variants;
#   5. probe cost (callgrind) within the limit;
#   6. Spin model and its failing variants.
# Prints one "ok:"/"FAIL:" line per step and exits non-zero on any failure.
# SEVPLACE_CACHE (default /var/cache/sevplace) keeps checkpatch files.
set -u

KMOD=$(cd "$(dirname "$0")" && pwd)
TOOLS=$KMOD/tools
CACHE=${SEVPLACE_CACHE:-/var/cache/sevplace}
WORK=$(mktemp -d /tmp/sevflush-ci.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export DEBIAN_FRONTEND=noninteractive

passed=0
failed=0
ok()   { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
step() { echo; echo "=== $*"; }

# --- kernels, resolved now --------------------------------------------------------
declare -A ABI
PKGS="build-essential sparse spin valgrind dwarves xz-utils perl"
while read -r name abi ver _ hdr _; do
	ABI[$name]=$abi
	case $name in 6.1|6.12) PKGS="$PKGS $hdr=$ver" ;; esac
done < <("$TOOLS/kernels.sh")
for k in 6.1 6.12 bpo sid; do
	[ -n "${ABI[$k]:-}" ] || { echo "FAIL: cannot resolve kernel $k"; exit 1; }
done
SEVPLACE_LINUX_SOURCE=linux-source-6.1

need_install() {
	local p name ver have
	for p in $PKGS; do
		name=${p%%=*}
		ver=${p#*=}
		have=$(dpkg-query -W -f='${db:Status-Abbrev}|${Version}' "$name" 2>/dev/null) || return 0
		case $have in
		ii*) ;;
		*) return 0 ;;
		esac
		if [ "$name" != "$p" ] && [ "${have#*|}" != "$ver" ]; then
			return 0
		fi
	done
	return 1
}

step "apt packages"
if need_install; then
	# shellcheck disable=SC2086
	if apt-get update -qq && apt-get install -y -qq --no-install-recommends $PKGS > "$WORK/apt.log" 2>&1; then
		ok "apt packages installed"
	else
		tail -n 20 "$WORK/apt.log"
		fail "apt install of $PKGS"
		echo "ci: $passed passed, $failed failed"
		exit 1
	fi
else
	ok "apt packages already installed"
fi

# --- checkpatch files ----------------------------------------------------------
SEVPLACE_LINUX_SOURCE_VERSION=$(apt-cache policy "$SEVPLACE_LINUX_SOURCE" | awk '/Candidate:/{print $2}')
CP_DIR=$CACHE/checkpatch-$SEVPLACE_LINUX_SOURCE_VERSION
step "checkpatch.pl from $SEVPLACE_LINUX_SOURCE $SEVPLACE_LINUX_SOURCE_VERSION"
if [ ! -s "$CP_DIR/checkpatch.pl" ] || [ ! -s "$CP_DIR/spelling.txt" ] ||
   [ ! -s "$CP_DIR/const_structs.checkpatch" ]; then
	mkdir -p "$CP_DIR"
	(
		set -e
		cd "$WORK"
		apt-get download -qq "$SEVPLACE_LINUX_SOURCE=$SEVPLACE_LINUX_SOURCE_VERSION" 2>/dev/null
		dpkg-deb --fsys-tarfile ./"$SEVPLACE_LINUX_SOURCE"_*.deb |
			tar -x ./usr/src/"$SEVPLACE_LINUX_SOURCE".tar.xz
		rm -f ./"$SEVPLACE_LINUX_SOURCE"_*.deb
		tar -xJf usr/src/"$SEVPLACE_LINUX_SOURCE".tar.xz --strip-components=2 \
			-C "$CP_DIR" \
			"$SEVPLACE_LINUX_SOURCE/scripts/checkpatch.pl" \
			"$SEVPLACE_LINUX_SOURCE/scripts/spelling.txt" \
			"$SEVPLACE_LINUX_SOURCE/scripts/const_structs.checkpatch"
		rm -rf usr
	) > "$WORK/cp.log" 2>&1
fi
if [ -s "$CP_DIR/checkpatch.pl" ]; then
	ok "checkpatch.pl cached in $CP_DIR"
else
	cat "$WORK/cp.log"
	fail "cannot get checkpatch.pl"
fi

# --- module builds ----------------------------------------------------------------
# build LABEL HEADERS_DIR CHROOT(or "") MAKE_ARGS...
build() {
	local label=$1 kdir=$2 root=$3 dir="$WORK/build-$1" bdir
	shift 3
	bdir=$dir
	if [ -n "$root" ]; then
		bdir=/build/ci-$label
		dir=$root$bdir
		rm -rf "$dir"
	fi
	mkdir -p "$dir"
	cp "$KMOD"/Kbuild "$KMOD"/Makefile "$KMOD"/*.c "$KMOD"/*.h "$dir"/
	if ! ${root:+"$TOOLS/in-chroot.sh" "$root"} make -C "$bdir" KDIR="$kdir" "$@" > "$dir/build.log" 2>&1; then
		cat "$dir/build.log"
		fail "build $label: make failed"
		return
	fi
	# kbuild's pahole version notice (7.3 headers) is not about this code
	if grep -E -i 'warning|error' "$dir/build.log" | grep -v -i pahole; then
		fail "build $label: $(grep -E -i 'warning|error' "$dir/build.log" | grep -v -i -c pahole) warning lines"
		return
	fi
	if [ ! -s "$dir/sevflush.ko" ]; then
		fail "build $label: no sevflush.ko"
		return
	fi
	ok "build $label ($*): 0 warnings, $(grep -o 'SEVFLUSH_KVM_ENTRY_ARGS=[0-9]' "$dir/.sevflush_main.o.cmd" | head -n 1) $(grep -o 'SEVFLUSH_KVM_FLUSHES_MASK=[0-9]' "$dir/.sevflush_main.o.cmd" | head -n 1)"
}

step "build against Debian headers (W=1; sparse C=2 where the userland's sparse parses the headers)"
build "${ABI[6.1]}" "/usr/src/linux-headers-${ABI[6.1]}" "" W=1 C=2
build "${ABI[6.12]}" "/usr/src/linux-headers-${ABI[6.12]}" "" W=1 C=2
build "${ABI[6.1]}-1arg" "/usr/src/linux-headers-${ABI[6.1]}" "" W=1 SEVFLUSH_KVM_ENTRY_ARGS=1
# trixie's sparse 0.6.4 cannot parse __typeof_unqual__ in 7.x headers: W=1 only
if root=$("$TOOLS/chroot.sh" bpo 2>"$WORK/chroot-bpo.log"); then
	build "${ABI[bpo]}" "/usr/src/linux-headers-${ABI[bpo]}" "$root" W=1
else
	cat "$WORK/chroot-bpo.log"
	fail "no trixie build chroot"
fi
if root=$("$TOOLS/chroot.sh" sid 2>"$WORK/chroot-sid.log"); then
	build "${ABI[sid]}" "/usr/src/linux-headers-${ABI[sid]}" "$root" W=1 C=2
else
	cat "$WORK/chroot-sid.log"
	fail "no sid build chroot"
fi

# --- checkpatch -----------------------------------------------------------------------
step "checkpatch --strict --no-tree"
if [ -s "$CP_DIR/checkpatch.pl" ]; then
	if perl "$CP_DIR/checkpatch.pl" --strict --no-tree --no-summary --terse \
		-f "$KMOD"/*.c "$KMOD"/*.h > "$WORK/checkpatch.log" 2>&1 &&
	   [ ! -s "$WORK/checkpatch.log" ]; then
		ok "checkpatch: 0 errors, 0 warnings, 0 checks"
	else
		cat "$WORK/checkpatch.log"
		fail "checkpatch reported problems"
	fi
fi

# --- harness ----------------------------------------------------------------------------
step "user-space harness (stress, TSan, ASan+UBSan, broken variants)"
if make -C "$KMOD/harness" OUT="$WORK/harness" check > "$WORK/harness.log" 2>&1; then
	grep -E '^(stress: reclaims|ok:|harness:)' "$WORK/harness.log"
	ok "harness"
else
	cat "$WORK/harness.log"
	fail "harness"
fi

step "probe cost (callgrind)"
if "$KMOD/harness/probe-cost.sh" > "$WORK/cost.log" 2>&1; then
	cat "$WORK/cost.log"
	ok "probe cost"
else
	cat "$WORK/cost.log"
	fail "probe cost"
fi

# --- Spin --------------------------------------------------------------------------------------
step "Spin model"
if "$KMOD/model/check.sh" > "$WORK/spin.log" 2>&1; then
	cat "$WORK/spin.log"
	ok "spin model"
else
	cat "$WORK/spin.log"
	fail "spin model"
fi

echo
echo "ci: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
