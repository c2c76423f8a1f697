#!/usr/bin/env bash
# sevplace real-kernel rig: boot the newest Debian kernels under QEMU (TCG,
# with nested SVM) and test sevflush.ko on a live KVM. See kmod/rig/README.md.
#
#   kmod/rig/run.sh [--kernels 6.1,6.12,bpo,sid] [--kmod-src DIR] [--out DIR]
#                   [--boot-timeout SECONDS] [--dkms]
# --dkms: load the module DKMS installed on this host for 6.1 and 6.12
# (kmod/tools/dkms.sh install) instead of building it.
#
# Exit status: 0 when every test passed or was skipped, 1 otherwise
# (any FAIL, a kernel oops/WARNING/BUG in a console log, a timeout, a build
# failure), 2 on bad usage.
set -euo pipefail

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RIG_DIR/../.." && pwd)
KERNELS=6.1,6.12,bpo,sid
DKMS=0
KMOD_SRC=$REPO/kmod
OUT=$REPO/target/rig
BOOT_TIMEOUT=${RIG_BOOT_TIMEOUT:-1800}
# a guest that prints nothing (console or results) for this long is stuck
STALL_TIMEOUT=${RIG_STALL_TIMEOUT:-120}
TCG_THREAD=${RIG_TCG_THREAD:-single}
CACHE=${SEVPLACE_CACHE:-/var/cache/sevplace}/rig
# compile-time switches that build the deliberately broken module (skip the
# per-CPU "already marked" cache reset in the flush IPI); the first one the
# module source knows is used
BROKEN_DEFINES="SF_BUG_NO_CACHE_RESET SEVFLUSH_BROKEN_NO_CACHE_RESET"
# a second broken build, if the module source has the switch: the per-CPU
# cache is not reset when a CPU comes back online (caught by cpu-hotplug)
BROKEN2_DEFINES="SF_BUG_NO_ONLINE_RESET"
# every test the guest must report, per kernel
TESTS="rig-selftest tracking-pinned tracking-float flush-targeted flush-switch-off flush-redirect flush-narrower-than-stock cpu-hotplug lifecycle-exit lifecycle-unknown-past bad-input load-unload agent-e2e negative-broken-cache-reset-detected negative-broken-online-reset-detected"

usage() {
	sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
	exit 2
}
while [ $# -gt 0 ]; do
	case $1 in
	--kernels) KERNELS=${2:?}; shift 2 ;;
	--kmod-src) KMOD_SRC=${2:?}; shift 2 ;;
	--out) OUT=${2:?}; shift 2 ;;
	--boot-timeout) BOOT_TIMEOUT=${2:?}; shift 2 ;;
	--dkms) DKMS=1; shift ;;
	-h|--help) usage ;;
	*) echo "run.sh: unknown argument $1" >&2; usage ;;
	esac
done
# development knob: run only these tests (space separated) in the guest
if [ -n "${RIG_ONLY_TESTS:-}" ]; then TESTS="rig-selftest $RIG_ONLY_TESTS"; fi

T_START=$(date +%s)
log() { printf '[rig %4ss] %s\n' "$(($(date +%s) - T_START))" "$*"; }
die() { echo "run.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (installs packages with apt)"
mkdir -p "$CACHE" "$OUT"
OUT=$(cd "$OUT" && pwd)
[ "$OUT" != / ] || die "--out / is not allowed (the rig cleans \$OUT/work)"
KMOD_SRC_ABS=$(cd "$KMOD_SRC" 2>/dev/null && pwd) || KMOD_SRC_ABS=""

# ---------------------------------------------------------------- tools -----
apt_install() {
	local rc=0
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
		--no-install-recommends "$@" >"$OUT/apt.log" 2>&1 || rc=$?
	if [ $rc != 0 ]; then
		log "apt-get install failed, updating package lists and retrying"
		apt-get -o DPkg::Lock::Timeout=600 update >>"$OUT/apt.log" 2>&1 || true
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
			--no-install-recommends "$@" >>"$OUT/apt.log" 2>&1 ||
			{ tail -20 "$OUT/apt.log" >&2; die "apt-get install $* failed (log: $OUT/apt.log)"; }
	fi
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v pahole >/dev/null || need+=(dwarves)
command -v make >/dev/null && command -v gcc >/dev/null || need+=(build-essential)
command -v modinfo >/dev/null || need+=(kmod)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	apt_install "${need[@]}"
fi

# ---------------------------------------------------------------- kernels ---
# Resolved from Debian's package lists now (kmod/tools/kernels.sh): the
# newest 6.1 and 6.12 of bookworm, the newest trixie-backports and sid
# kernels that have headers.
TOOLS=$REPO/kmod/tools
declare -A ABI IMG VER HDR
for s in ${KERNELS//,/ }; do
	case $s in 6.1|6.12|bpo|sid) ;; *) die "unknown kernel '$s' (6.1, 6.12, bpo, sid)" ;; esac
	read -r _ abi ver img hdr _ < <("$TOOLS/kernels.sh" "$s") || die "cannot resolve kernel $s"
	ABI[$s]=$abi VER[$s]=$ver IMG[$s]=$img HDR[$s]=$hdr
done

# ---------------------------------------------------------------- fetch -----
# find_deb PACKAGE VERSION: sets DEB to the cached .deb of that version, or ""
find_deb() {
	local d
	DEB=""
	for d in "$CACHE/debs/${1}_"*.deb; do
		[ -f "$d" ] || continue
		if [ "$(dpkg-deb -f "$d" Version)" = "$2" ]; then DEB=$d; return 0; fi
	done
}
# fetch_deb PACKAGE VERSION: sets DEB, downloading into the cache if needed
# (through kernels.sh's own apt configuration, which knows every suite)
fetch_deb() {
	mkdir -p "$CACHE/debs"
	find_deb "$1" "$2"
	[ -z "$DEB" ] || return 0
	"$TOOLS/kernels.sh" --download "$CACHE/debs" "$1=$2" >>"$OUT/apt.log" 2>&1 ||
		die "cannot download $1=$2 (log: $OUT/apt.log)"
	find_deb "$1" "$2"
	[ -n "$DEB" ] || die "no .deb for $1=$2 after download"
}

BB_DIR=$CACHE/busybox-static
if [ ! -x "$BB_DIR/bin/busybox" ]; then
	ver=$(apt-cache policy busybox-static | awk '/Candidate:/{print $2}')
	if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then die "apt knows no busybox-static"; fi
	fetch_deb busybox-static "$ver"
	rm -rf "$BB_DIR"
	dpkg-deb -x "$DEB" "$BB_DIR"
fi
BUSYBOX=$BB_DIR/bin/busybox

declare -A CHROOT VMLINUZ MODDIR
for s in ${KERNELS//,/ }; do
	abi=${ABI[$s]} pkg=${IMG[$s]} ver=${VER[$s]} hdr=${HDR[$s]}
	if [ ! -f "$CACHE/kernels/$abi/.done" ]; then
		log "$s: fetching $pkg=$ver"
		fetch_deb "$pkg" "$ver"
		rm -rf "$CACHE/kernels/$abi"
		mkdir -p "$CACHE/kernels/$abi"
		dpkg-deb -x "$DEB" "$CACHE/kernels/$abi"
		# 7.x: the image package only depends on linux-binary-<abi>
		# (vmlinuz) and linux-modules-<abi> of the same version
		img_deb=$DEB
		for dep in $(dpkg-deb -f "$img_deb" Depends | tr ',' '\n' | awk '{print $1}'); do
			case $dep in
			"linux-binary-$abi" | "linux-modules-$abi")
				log "$s: fetching $dep=$ver"
				fetch_deb "$dep" "$ver"
				dpkg-deb -x "$DEB" "$CACHE/kernels/$abi"
				;;
			esac
		done
		touch "$CACHE/kernels/$abi/.done"
	fi
	# merged /usr (7.x packages): /usr/lib/modules, vmlinuz in /boot or /usr/lib
	VMLINUZ[$s]=$(find "$CACHE/kernels/$abi" -name "vmlinuz-$abi" -o -name vmlinuz -path "*$abi*" | head -n 1)
	MODDIR[$s]=$(find "$CACHE/kernels/$abi" -maxdepth 4 -type d -path "*/lib/modules/$abi" | head -n 1)
	[ -n "${VMLINUZ[$s]}" ] && [ -n "${MODDIR[$s]}" ] ||
		die "$s: no vmlinuz or modules for $abi in $CACHE/kernels/$abi (remove it to fetch again)"
	case $s in
	bpo|sid)
		# userland newer than Debian 12: headers live in a build chroot
		CHROOT[$s]=$("$TOOLS/chroot.sh" "$s") || die "$s: no build chroot"
		;;
	*)
		CHROOT[$s]=""
		if [ ! -e "/usr/src/linux-headers-$abi/Makefile" ] ||
			[ "$(dpkg-query -W -f '${Version}' "$hdr" 2>/dev/null)" != "$ver" ]; then
			log "$s: installing $hdr=$ver"
			apt_install "$hdr=$ver"
		fi
		;;
	esac
done
log "kernels ready: $(for s in ${KERNELS//,/ }; do printf '%s=%s(%s) ' "$s" "${ABI[$s]}" "${VER[$s]}"; done)"

# ---------------------------------------------------------------- build -----
WORK=$OUT/work
rm -rf "$WORK" && mkdir -p "$WORK"
make -s -C "$RIG_DIR/vmm" O="$WORK" >"$OUT/vmm-build.log" 2>&1 ||
	{ cat "$OUT/vmm-build.log" >&2; die "test VMM does not build"; }

# build_kmod SERIES VARIANT(normal|broken|broken2) -> sets KO_PATH or KO_ERR
build_kmod() {
	local s=$1 variant=$2 abi=${ABI[$1]} dir flags=()
	KO_PATH="" KO_ERR=""
	dir=$WORK/kmod-$s-$variant
	if [ -z "$KMOD_SRC_ABS" ] || [ ! -f "$KMOD_SRC_ABS/Makefile" ]; then
		KO_ERR="no module source (no Makefile in ${KMOD_SRC})"
		return 1
	fi
	mkdir -p "$dir"
	# a clean copy: no build products, not the rig itself
	tar -C "$KMOD_SRC_ABS" --exclude=./rig --exclude='*.o' --exclude='*.ko' --exclude='*.ko.*' \
		--exclude='*.mod' --exclude='*.mod.c' --exclude='.*.cmd' --exclude=Module.symvers \
		--exclude=modules.order --exclude=.tmp_versions -cf - . | tar -C "$dir" -xf -
	if [ "$variant" != normal ]; then
		local def="" d defs=$BROKEN_DEFINES
		[ "$variant" = broken2 ] && defs=$BROKEN2_DEFINES
		for d in $defs; do
			grep -rqs "$d" "$dir" --include='*.c' --include='*.h' && { def=$d; break; }
		done
		if [ -z "$def" ]; then
			KO_ERR="module source has none of the switches $defs"
			return 1
		fi
		flags=(KCFLAGS="-D$def")
	fi
	if [ "$variant" = normal ] && [ "$DKMS" = 1 ] && [ -z "${CHROOT[$s]}" ]; then
		KO_PATH=$("$TOOLS/dkms.sh" module "$abi" "$dir") || { KO_ERR="no DKMS-built sevflush for $abi"; return 1; }
		return 0
	fi
	local root=${CHROOT[$s]} bdir=$dir
	if [ -n "$root" ]; then
		# a build chroot: the copy goes inside it
		bdir=/build/kmod-$s-$variant
		rm -rf "$root$bdir" && mkdir -p "$root/build" && cp -a "$dir" "$root$bdir"
	fi
	if ! ${root:+"$TOOLS/in-chroot.sh" "$root"} make -C "$bdir" KDIR="/usr/src/linux-headers-$abi" "${flags[@]}" \
		>"$OUT/kmod-$s-$variant.log" 2>&1; then
		KO_ERR="build failed against linux-headers-$abi (log: $OUT/kmod-$s-$variant.log: $(grep -m1 -E 'error|Error' "$OUT/kmod-$s-$variant.log" | tr -d '\r' | cut -c1-160))"
		return 1
	fi
	KO_PATH=$(find "$root$bdir" -name sevflush.ko | head -1)
	[ -n "$KO_PATH" ] || { KO_ERR="make succeeded but no sevflush.ko"; return 1; }
	local vm
	vm=$(modinfo -F vermagic "$KO_PATH" | cut -d' ' -f1)
	[ "$vm" = "$abi" ] || { KO_ERR="sevflush.ko vermagic $vm != $abi"; KO_PATH=""; return 1; }
}

# add_module ROOT MODDIR NAME: copy a kernel module and its dependencies
# (decompressed) into ROOT/rig/modules, appending them to the load order
declare -A MODFILE
add_module() {
	local root=$1 moddir=$2 name=${3//-/_} f base dep
	[ -n "${SEEN[$name]:-}" ] && return 0
	SEEN[$name]=1
	f=${MODFILE[$name]:-}
	[ -n "$f" ] || die "kernel module $name not found in $moddir"
	base=${f##*/}; base=${base%.xz}; base=${base%.zst}
	case $f in
	*.xz) xz -dc "$f" >"$root/rig/modules/$base" ;;
	*.zst) zstd -qdc "$f" >"$root/rig/modules/$base" ;;
	*) cp "$f" "$root/rig/modules/$base" ;;
	esac
	for dep in $(modinfo -F depends "$root/rig/modules/$base" | tr ',' ' '); do
		add_module "$root" "$moddir" "$dep"
	done
	echo "$base" >>"$root/rig/modules/order"
}

# copy_with_libs ROOT BINARY: a dynamic binary and its shared libraries
copy_with_libs() {
	local root=$1 bin=$2 lib
	install -D -m 0755 "$bin" "$root/usr/bin/$(basename "$bin")"
	for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+' || true); do
		[ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
	done
}

# build_initramfs SERIES -> $WORK/initrd-SERIES.cpio
build_initramfs() {
	local s=$1 abi=${ABI[$1]} root moddir f n
	root=$WORK/root-$s
	moddir=${MODDIR[$s]}
	rm -rf "$root"
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,rig/modules}
	cp "$BUSYBOX" "$root/bin/busybox"
	for n in $("$BUSYBOX" --list); do
		[ "$n" = busybox ] || ln -sf busybox "$root/bin/$n"
	done
	install -m 0755 "$RIG_DIR/guest/init" "$root/init"
	install -m 0644 "$RIG_DIR/guest/tests.sh" "$root/rig/tests.sh"
	install -m 0755 "$WORK/vmm" "$WORK/sysfuzz" "$root/rig/"
	MODFILE=()
	while read -r f; do
		n=${f##*/}; n=${n%%.ko*}; MODFILE[${n//-/_}]=$f
	done < <(find "$moddir/kernel" -name '*.ko*')
	declare -gA SEEN=()
	: >"$root/rig/modules/order"
	add_module "$root" "$moddir" kvm_amd
	{
		echo "KLABEL=$s"
		echo "KMOD_OK=${K_OK[$s]}"
		printf 'KMOD_ERR=%q\n' "${K_ERR[$s]}"
		echo "BROKEN_OK=${B_OK[$s]}"
		printf 'BROKEN_ERR=%q\n' "${B_ERR[$s]}"
		echo "BROKEN2_OK=${B2_OK[$s]}"
		printf 'BROKEN2_ERR=%q\n' "${B2_ERR[$s]}"
		echo "TEST_PARAM=${T_PARAM[$s]}"
		echo "AGENT=$AGENT"
		if [ -n "${RIG_ONLY_TESTS:-}" ]; then printf 'ONLY_TESTS=%q\n' "$RIG_ONLY_TESTS"; fi
	} >"$root/rig/config"
	if [ "${K_OK[$s]}" = 1 ]; then cp "$WORK/kmod-$s-normal.ko" "$root/rig/sevflush.ko"; fi
	if [ "${B_OK[$s]}" = 1 ]; then cp "$WORK/kmod-$s-broken.ko" "$root/rig/sevflush-broken.ko"; fi
	if [ "${B2_OK[$s]}" = 1 ]; then cp "$WORK/kmod-$s-broken2.ko" "$root/rig/sevflush-broken2.ko"; fi
	if [ "$AGENT" = 1 ]; then
		copy_with_libs "$root" "$BIN/sevplaced"
		copy_with_libs "$root" "$BIN/sevplacectl"
	fi
	(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$WORK/initrd-$s.cpio"
}

# the agent binaries with the host's glibc and its other shared libraries
# (copy_with_libs): the guest userland is this initramfs, whatever kernel
BIN=${SEVPLACE_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/release}
# only_tests_without TEST...: RIG_ONLY_TESTS is set and names none of them
# (the broken builds are then not needed)
only_tests_without() {
	local t
	[ -n "${RIG_ONLY_TESTS:-}" ] || return 1
	for t in "$@"; do
		case " $RIG_ONLY_TESTS " in *" $t "*) return 1 ;; esac
	done
	return 0
}
AGENT=0
[ -x "$BIN/sevplaced" ] && [ -x "$BIN/sevplacectl" ] && AGENT=1
declare -A K_OK K_ERR B_OK B_ERR B2_OK B2_ERR T_PARAM
BUILD_FAIL=()
for s in ${KERNELS//,/ }; do
	K_OK[$s]=0 K_ERR[$s]="" B_OK[$s]=0 B_ERR[$s]="" B2_OK[$s]=0 B2_ERR[$s]="" T_PARAM[$s]=""
	if build_kmod "$s" normal; then
		cp "$KO_PATH" "$WORK/kmod-$s-normal.ko"
		K_OK[$s]=1
		# the test-only switch that makes the module treat any VM as SEV
		T_PARAM[$s]=$(modinfo -F parm "$KO_PATH" | grep -iE '^[a-z_]*(test|treat|fake|force|pretend)[a-z_]*:' | grep -iE 'sev|confidential' | head -1 | cut -d: -f1 || true)
		log "$s: sevflush.ko built (test switch parameter: ${T_PARAM[$s]:-none})"
	else
		K_ERR[$s]=$KO_ERR
		BUILD_FAIL+=("FAIL $s kmod-build $KO_ERR")
		log "$s: sevflush.ko NOT built: $KO_ERR"
	fi
	if [ "${K_OK[$s]}" = 1 ] && ! only_tests_without negative-broken-cache-reset-detected negative-broken-online-reset-detected; then
		if build_kmod "$s" broken; then
			cp "$KO_PATH" "$WORK/kmod-$s-broken.ko"
			B_OK[$s]=1
		else
			B_ERR[$s]=$KO_ERR
			log "$s: broken build NOT built: $KO_ERR"
		fi
		if build_kmod "$s" broken2; then
			cp "$KO_PATH" "$WORK/kmod-$s-broken2.ko"
			B2_OK[$s]=1
		else
			B2_ERR[$s]=$KO_ERR
			log "$s: second broken build NOT built: $KO_ERR"
		fi
	fi
	build_initramfs "$s"
	log "$s: initramfs $(du -h "$WORK/initrd-$s.cpio" | cut -f1) (modules: $(tr '\n' ' ' <"$WORK/root-$s/rig/modules/order"))"
done

# ---------------------------------------------------------------- boot ------
BADLOG='Oops|BUG:|WARNING:|kernel BUG|general protection fault|Kernel panic|UBSAN|KASAN|list_(add|del) corruption|refcount_t:|Unable to handle|unable to handle|soft lockup|hung_task|rcu_sched detected stall|rcu: INFO'
REPORT=$OUT/report.txt
: >"$REPORT"
for l in "${BUILD_FAIL[@]}"; do echo "$l" >>"$REPORT"; done
FIGURES=()
qpid=""
trap 'if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; fi' EXIT
for s in ${KERNELS//,/ }; do
	abi=${ABI[$s]}
	con=$OUT/console-$s.log res=$OUT/results-$s.log
	log "$s: booting $abi under QEMU TCG (timeout ${BOOT_TIMEOUT}s, or ${STALL_TIMEOUT}s without output)"
	t0=$(date +%s.%N)
	rc=0 stalled=0
	: >"$con"
	: >"$res"
	timeout -k 10 "$BOOT_TIMEOUT" qemu-system-x86_64 \
		-accel "tcg,thread=$TCG_THREAD" -cpu EPYC,+svm,+npt -smp 4 -m 1024 \
		-display none -monitor none -no-reboot \
		-serial "file:$con" -serial "file:$res" \
		-kernel "${VMLINUZ[$s]}" -initrd "$WORK/initrd-$s.cpio" \
		-append "console=ttyS0 panic=-1 loglevel=7 mitigations=off rdinit=/init" \
		</dev/null >"$OUT/qemu-$s.log" 2>&1 &
	qpid=$!
	last="" quiet=0
	while kill -0 "$qpid" 2>/dev/null; do
		sleep 2
		cur=$(stat -c %s "$con" "$res" | tr '\n' ' ')
		if [ "$cur" = "$last" ]; then quiet=$((quiet + 2)); else quiet=0; last=$cur; fi
		if [ "$quiet" -ge "$STALL_TIMEOUT" ]; then
			stalled=1
			kill "$qpid" 2>/dev/null || true
			break
		fi
	done
	wait "$qpid" || rc=$?
	qpid=""
	t1=$(date +%s.%N)
	touch "$res"
	tr -d '\r' <"$res" >"$res.tmp" && mv "$res.tmp" "$res"
	total=$(awk "BEGIN{printf \"%.0f\", $t1 - $t0}")
	booted=$(awk '/^RIG BOOTED/{print $3; exit}' "$res")
	done_at=$(awk '/^RIG DONE/{print $3; exit}' "$res")
	if [ -n "$booted" ] && [ -n "$done_at" ]; then
		FIGURES+=("$s: wall ${total}s; guest boot ${booted}s (to init), tests $(awk "BEGIN{printf \"%.0f\", $done_at - $booted}")s (guest clock)")
	else
		FIGURES+=("$s: wall ${total}s; guest boot ${booted:-?}s, tests did not finish")
	fi
	if [ $stalled = 1 ]; then
		echo "FAIL $s guest stalled: no output for ${STALL_TIMEOUT}s, killed (console: $con, results: $res)" >>"$REPORT"
	elif [ $rc = 124 ] || [ $rc = 137 ]; then
		echo "FAIL $s boot timed out after ${BOOT_TIMEOUT}s (console: $con, results: $res)" >>"$REPORT"
	elif [ $rc != 0 ]; then
		echo "FAIL $s qemu exited with $rc ($(tail -1 "$OUT/qemu-$s.log"))" >>"$REPORT"
	fi
	[ -n "$booted" ] || echo "FAIL $s guest did not reach init (console: $con)" >>"$REPORT"
	uname_r=$(awk '/^RIG BOOTED/{print $4; exit}' "$res")
	if [ -n "$uname_r" ] && [ "$uname_r" != "$abi" ]; then
		echo "FAIL $s booted $uname_r, not $abi" >>"$REPORT"
	fi
	[ -n "$booted" ] && [ -z "$done_at" ] && echo "FAIL $s guest tests did not finish (results: $res)" >>"$REPORT"
	bad=$(tr -d '\r' <"$con" | grep -E "$BADLOG" | head -1 || true)
	[ -n "$bad" ] && echo "FAIL $s kernel-log ${bad}" >>"$REPORT"
	for t in $TESTS; do
		line=$(grep -E "^RIG (PASS|FAIL|SKIP) $t( |$)" "$res" | head -1 || true)
		if [ -z "$line" ]; then
			echo "FAIL $s $t no result (guest crashed, timed out or test not run)" >>"$REPORT"
		else
			read -r _ status rest <<<"$line"
			echo "$status $s $rest" >>"$REPORT"
		fi
	done
	log "$s: done in ${total}s"
done

echo
echo "==== sevflush rig report (logs: $OUT) ===="
cat "$REPORT"
if grep -qh 'NOTE:' "$OUT"/results-*.log 2>/dev/null; then
	echo "---- notes (not failures)"
	for s in ${KERNELS//,/ }; do
		grep -h 'NOTE:' "$OUT/results-$s.log" 2>/dev/null | sed "s/^ *NOTE: */$s: /" || true
	done
fi
echo "---- kernels booted"
for s in ${KERNELS//,/ }; do
	if [ -n "${CHROOT[$s]}" ]; then how="built in ${CHROOT[$s]}"
	elif [ "$DKMS" = 1 ]; then how="built by DKMS"
	else how="built on this host"; fi
	echo "$s: ${ABI[$s]} (${IMG[$s]} ${VER[$s]}), module $how"
done
echo "---- figures"
printf '%s\n' "${FIGURES[@]}"
echo "total rig time: $(($(date +%s) - T_START))s"
if grep -q '^FAIL' "$REPORT"; then
	echo "RESULT: FAIL ($(grep -c '^FAIL' "$REPORT") failures)"
	exit 1
fi
echo "RESULT: PASS"
