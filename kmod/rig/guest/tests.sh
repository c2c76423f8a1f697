#!/bin/sh
# In-guest tests of sevflush.ko (busybox sh). Run by /init inside the rig's
# QEMU guest; prints "RIG PASS|FAIL|SKIP <test> [reason]" lines that
# kmod/rig/run.sh turns into its report. See kmod/rig/README.md.
# shellcheck disable=SC3043  # busybox sh has `local`
# shellcheck disable=SC1091,SC2119,SC2120,SC2153  # config sourced; load takes optional args
. /rig/config

SF=/sys/kernel/sevflush
KO=/rig/sevflush.ko
BROKEN_KO=/rig/sevflush-broken.ko
BROKEN2_KO=/rig/sevflush-broken2.ko
WAIT=${WAIT:-10}         # seconds to wait for a state to appear
VMS=""                   # names of running test VMs
FAILED_STEP=""           # which check of the last test failed

now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "    $*"; }
result() { echo "RIG $*"; }

# --- kernel log ------------------------------------------------------------
BADLOG='Oops|BUG:|WARNING:|kernel BUG|general protection|Call Trace|UBSAN|KASAN|list_(add|del) corruption|refcount_t|unable to handle|kmemleak: [1-9]|sysfs: cannot create duplicate'
dmesg_clear() { dmesg -c >/dev/null 2>&1 || true; }
# prints the first bad kernel log line since the last dmesg_clear
dmesg_bad() { dmesg | grep -E "$BADLOG" | head -1; }

# --- cpulists ----------------------------------------------------------------
# "0-2,5" -> " 0 1 2 5 " (cpulists are sorted, so equal sets give equal text)
expand() {
	local out=" " part a b IFS=,
	for part in $1; do
		case $part in
		*-*) a=${part%-*}; b=${part#*-} ;;
		*) a=$part; b=$part ;;
		esac
		while [ "$a" -le "$b" ]; do out="$out$a "; a=$((a + 1)); done
	done
	echo "$out"
}
subset() { # subset A B: every CPU of A is in B (expanded forms)
	local x
	for x in $1; do
		case "$2" in *" $x "*) ;; *) return 1 ;; esac
	done
	return 0
}
# shellcheck disable=SC2086  # splitting is the point
count() { set -- $1; echo $#; }

# --- module ------------------------------------------------------------------
kvm_up() {
	local m
	while read -r m; do
		case $m in
		kvm-amd.ko|kvm_amd.ko) insmod "/rig/modules/$m" nested=1 || return 1 ;;
		*) insmod "/rig/modules/$m" || return 1 ;;
		esac
	done </rig/modules/order
	[ -c /dev/kvm ]
}
loaded() { grep -q '^sevflush ' /proc/modules; }
unload() {
	local i=0
	while loaded; do
		rmmod sevflush 2>/dev/null && break
		i=$((i + 1))
		[ $i -ge 50 ] && { say "rmmod sevflush keeps failing"; rmmod sevflush; return 1; }
		sleep 0.1
	done
	return 0
}
# load [KO] [params...]
load() {
	local ko="${1:-$KO}"
	shift 2>/dev/null || true
	unload || return 1
	insmod "$ko" "$@" || { say "insmod $ko $* failed"; return 1; }
	[ "$(cat $SF/abi_version 2>/dev/null)" = 1 ] || { say "abi_version is not 1"; return 1; }
}
set_mode() { echo "$1" >$SF/mode && [ "$(cat $SF/mode)" = "$1" ]; }
rd() { cat "$1" 2>/dev/null; }

# --- test VMs ----------------------------------------------------------------
# vm_start NAME VCPUS [PINSPEC]  (no PINSPEC: floating)
vm_start() {
	local name="$1" n="$2" pin="${3:-}" i=0
	rm -f "/run/$name.ctl" "/run/$name.ack" "/run/$name.ready"
	: >"/run/$name.ack"
	if [ -n "$pin" ]; then
		/rig/vmm -n "$n" -p "$pin" -c "/run/$name.ctl" -a "/run/$name.ack" -r "/run/$name.ready" >"/run/$name.log" 2>&1 &
	else
		/rig/vmm -n "$n" -c "/run/$name.ctl" -a "/run/$name.ack" -r "/run/$name.ready" >"/run/$name.log" 2>&1 &
	fi
	echo $! >"/run/$name.pid"
	VMS="$VMS $name"
	while [ ! -s "/run/$name.ready" ] || [ ! -p "/run/$name.ctl" ]; do
		i=$((i + 1))
		if [ $i -ge $((WAIT * 10)) ] || ! kill -0 "$(cat "/run/$name.pid")" 2>/dev/null; then
			say "vm $name did not start: $(cat "/run/$name.log")"
			return 1
		fi
		sleep 0.1
	done
}
vm_pid() { cat "/run/$1.pid"; }
# vmctl NAME COMMAND: send a command and wait for its acknowledgement
vmctl() {
	local name="$1" cmd="$2" before i=0 last
	before=$(wc -l <"/run/$name.ack")
	echo "$cmd" >"/run/$name.ctl"
	while [ "$(wc -l <"/run/$name.ack")" -le "$before" ]; do
		i=$((i + 1))
		[ $i -ge $((WAIT * 10)) ] && { say "vm $name: no ack for '$cmd'"; return 1; }
		sleep 0.1
	done
	last=$(tail -n 1 "/run/$name.ack")
	case $last in OK*) return 0 ;; esac
	say "vm $name: $last"
	return 1
}
vm_stop() {
	local name="$1" pid i=0
	pid=$(vm_pid "$name")
	if kill -0 "$pid" 2>/dev/null; then
		echo quit >"/run/$name.ctl" &
		while kill -0 "$pid" 2>/dev/null; do
			i=$((i + 1))
			[ $i -ge 30 ] && kill -9 "$pid" 2>/dev/null
			sleep 0.1
		done
	fi
	wait "$pid" 2>/dev/null || true
	local v rest=""
	for v in $VMS; do [ "$v" = "$name" ] || rest="$rest $v"; done
	VMS=$rest
}
vm_stop_all() { local v; for v in $VMS; do vm_stop "$v"; done; VMS=""; }
# vm_id NAME: the sevflush id of the VM (waits for the record)
vm_id() {
	local pid d i=0
	pid=$(vm_pid "$1")
	while :; do
		for d in "$SF"/vms/*; do
			[ -f "$d/pid" ] && [ "$(rd "$d/pid")" = "$pid" ] && { echo "${d##*/}"; return 0; }
		done
		i=$((i + 1))
		[ $i -ge $((WAIT * 10)) ] && return 1
		sleep 0.1
	done
}
# wait_set FILE EXPECTED_CPULIST: poll until the file holds exactly that set
wait_set() {
	local f="$1" want i=0
	want=$(expand "$2")
	while [ "$(expand "$(rd "$f")")" != "$want" ]; do
		i=$((i + 1))
		[ $i -ge $((WAIT * 10)) ] && return 1
		sleep 0.1
	done
}

# --- test harness ------------------------------------------------------------
T0=0
begin() { CUR=$1; FAILED_STEP=""; T0=$(now); dmesg_clear; say "--- $1"; }
# finish STATUS [reason]: STATUS is the test body's exit code
finish() {
	local rc="$1" reason="${2:-$FAILED_STEP}" bad t
	bad=$(dmesg_bad)
	t=$(awk "BEGIN{printf \"%.1f\", $(now) - $T0}")
	if [ -n "$bad" ]; then
		result "FAIL $CUR kernel log: $bad"
		dmesg | sed 's/^/    dmesg: /' | head -60
	elif [ "$rc" = 0 ]; then
		result "PASS $CUR (${t}s)"
	elif [ "$rc" = 77 ]; then
		result "SKIP $CUR $reason"
	else
		result "FAIL $CUR ${reason:-failed}"
	fi
}
# check DESCRIPTION COMMAND...: record the first failing check
check() {
	local what="$1"
	shift
	if "$@"; then return 0; fi
	FAILED_STEP=$what
	say "check failed: $what"
	return 1
}
eq() { [ "$1" = "$2" ] || { say "got '$1', want '$2'"; return 1; }; }
set_is() { [ "$(expand "$(rd "$1")")" = "$(expand "$2")" ] || { say "$1 = '$(rd "$1")', want '$2'"; return 1; }; }

run() { # run NAME FUNCTION: run a test with cleanup
	local rc=0
	begin "$1"
	"$2" || rc=$?
	vm_stop_all
	all_online
	finish $rc
}

# --- tests ---------------------------------------------------------------------

t_selftest() { # the rig itself: KVM works in the guest, the VMM runs
	check "kvm_amd nested=1" eq "$(rd /sys/module/kvm_amd/parameters/nested)" 1 || return 1
	check "/dev/kvm" test -c /dev/kvm || return 1
	vm_start st 2 1:2 || { FAILED_STEP="vmm start"; return 1; }
	local p t ok=0
	p=$(vm_pid st)
	for t in /proc/"$p"/task/*; do
		case "$(cat "$t/comm")" in "CPU 0/KVM"|"CPU 1/KVM") ok=$((ok + 1)) ;; esac
	done
	check "vCPU thread names" eq "$ok" 2 || return 1
	check "memslot cycle" vmctl st cycleslot || return 1
	# ground truth from the kernel itself, without sevflush: the vCPUs enter
	# the guest only on their CPUs, and a memslot deletion reaches
	# sev_guest_memory_reclaimed() (the hook the flush path relies on)
	local tr=/sys/kernel/tracing cpus
	[ -d $tr/events ] || mount -t tracefs tracefs $tr 2>/dev/null || true
	if [ -d $tr/events/kvm/kvm_entry ]; then
		echo 0 >$tr/tracing_on
		: >$tr/trace
		echo 'p:rig/reclaim sev_guest_memory_reclaimed' >>$tr/kprobe_events
		echo 1 >$tr/events/kvm/kvm_entry/enable
		echo 1 >$tr/events/rig/reclaim/enable
		echo 1 >$tr/tracing_on
		sleep 0.3
		vmctl st delslot
		vmctl st addslot
		echo 0 >$tr/tracing_on
		echo 0 >$tr/events/kvm/kvm_entry/enable
		echo 0 >$tr/events/rig/reclaim/enable
		cpus=$(grep 'kvm_entry' $tr/trace | sed -n 's/.*\[\(0*\)\([0-9][0-9]*\)\].*/\2/p' | sort -un | tr '\n' ' ')
		say "kvm_entry seen on CPUs: $cpus; reclaim hits: $(grep -c 'reclaim:' $tr/trace)"
		check "tracepoint: pinned vCPUs enter on CPUs 1 2 only" eq "$cpus" "1 2 " || return 1
		check "memslot deletion reaches sev_guest_memory_reclaimed" test "$(grep -c 'reclaim:' $tr/trace)" -ge 1 || return 1
		: >$tr/trace
		echo '-:rig/reclaim' >>$tr/kprobe_events
	else
		say "no tracefs kvm_entry event: ground-truth check skipped"
	fi
	check "float" vmctl st float || return 1
	check "stats" vmctl st stats || return 1
	say "$(tail -n 1 /run/st.ack)"
	return 0
}

# tracking part 1 and 2; sets FAILED_STEP. $1: module to load
tracking_pinned_repin() {
	local ko="${1:-$KO}" id d
	check "insmod" load "$ko" || return 1
	check "vm start" vm_start tr 2 1:2 || return 1
	id=$(vm_id tr) || { FAILED_STEP="no vms/<id> for the VM"; return 1; }
	d=$SF/vms/$id
	check "pid" eq "$(rd "$d/pid")" "$(vm_pid tr)" || return 1
	wait_set "$d/dirty_cpus" 1-2
	check "pinned {1,2}: dirty_cpus exactly 1-2" set_is "$d/dirty_cpus" 1-2 || return 1
	check "pinned {1,2}: ran_cpus exactly 1-2" set_is "$d/ran_cpus" 1-2 || return 1
	sleep 0.5
	check "pinned {1,2}: dirty_cpus still 1-2" set_is "$d/dirty_cpus" 1-2 || return 1
	check "pinned {1,2}: ran_cpus still 1-2" set_is "$d/ran_cpus" 1-2 || return 1
	check "repin" vmctl tr "pin 3" || return 1
	wait_set "$d/ran_cpus" 1-3
	check "repinned {3}: ran_cpus grows to 1-3" set_is "$d/ran_cpus" 1-3 || return 1
	check "scrub write" sh -c "echo 1 > $d/scrub" || return 1
	wait_set "$d/dirty_cpus" 3
	check "after scrub: dirty_cpus re-marked as exactly 3" set_is "$d/dirty_cpus" 3 || return 1
	check "after scrub: ran_cpus still 1-3" set_is "$d/ran_cpus" 1-3 || return 1
	return 0
}
t_tracking_pinned() { tracking_pinned_repin "$KO"; }

t_tracking_float() {
	local id d r prev dirty ran i grown=0
	check "insmod" load || return 1
	check "vm start" vm_start fl 2 1:2 || return 1
	id=$(vm_id fl) || { FAILED_STEP="no vms/<id>"; return 1; }
	d=$SF/vms/$id
	wait_set "$d/ran_cpus" 1-2
	check "float" vmctl fl float || return 1
	prev=$(expand "$(rd "$d/ran_cpus")")
	for r in 1 2 3 4 5 6 7 8; do
		check "scrub" sh -c "echo 1 > $d/scrub" || return 1
		sleep 0.5
		dirty=$(expand "$(rd "$d/dirty_cpus")")
		ran=$(expand "$(rd "$d/ran_cpus")")
		say "round $r: dirty {$dirty} ran {$ran}"
		check "round $r: dirty not empty (running vCPUs re-mark)" test "$(count "$dirty")" -gt 0 || return 1
		check "round $r: dirty within ran" subset "$dirty" "$ran" || return 1
		check "round $r: ran never shrinks" subset "$prev" "$ran" || return 1
		[ "$(count "$ran")" -gt 2 ] && grown=1
		prev=$ran
		[ $grown = 1 ] && [ "$(count "$ran")" -ge 4 ] && [ "$r" -ge 3 ] && break
	done
	# let it float until ran holds more than the two first CPUs
	i=0
	while [ $grown = 0 ] && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
		[ "$(count "$(expand "$(rd "$d/ran_cpus")")")" -gt 2 ] && grown=1
	done
	check "floating: ran_cpus grows beyond the first placement" test $grown = 1 || return 1
	# dirty after a scrub holds only CPUs entered since: park the vCPUs on
	# CPU 0, scrub, and only CPU 0 may come back
	check "park on 0" vmctl fl "pin 0" || return 1
	check "scrub" sh -c "echo 1 > $d/scrub" || return 1
	wait_set "$d/dirty_cpus" 0
	check "parked on {0} after floating: dirty exactly 0 after scrub" set_is "$d/dirty_cpus" 0 || return 1
	check "ran_cpus kept the floating history" subset "$prev" "$(expand "$(rd "$d/ran_cpus")")" || return 1
	say "ran_cpus after floating: $(rd "$d/ran_cpus")"
	return 0
}

# counters snapshot into variables with prefix $1
snap() {
	local p="$1" d="$2"
	eval "${p}_F=\$(rd $SF/flushes_total) ${p}_FC=\$(rd $SF/flushed_cpus_total) ${p}_FULL=\$(rd $SF/full_flushes_total) ${p}_S=\$(rd $SF/scrubs_total) ${p}_SC=\$(rd $SF/scrubbed_cpus_total)"
	if [ -n "$d" ]; then
		eval "${p}_VF=\$(rd $d/flushes) ${p}_VFC=\$(rd $d/flushed_cpus)"
	fi
}
# delta A B FIELD
delta() { eval "echo \$(( \${$2_$3:-0} - \${$1_$3:-0} ))"; }

t_flush_targeted() {
	local id d
	[ -n "$TEST_PARAM" ] || { FAILED_STEP="module has no test switch parameter (treat VMs as SEV)"; return 1; }
	check "insmod with $TEST_PARAM=1" load "$KO" "$TEST_PARAM=1" || return 1
	check "mode targeted" set_mode targeted || return 1
	check "vm start" vm_start fx 2 1:2 || return 1
	id=$(vm_id fx) || { FAILED_STEP="no vms/<id>"; return 1; }
	d=$SF/vms/$id
	wait_set "$d/dirty_cpus" 1-2
	check "dirty 1-2 before the flush" set_is "$d/dirty_cpus" 1-2 || return 1
	snap a "$d"
	check "memslot delete" vmctl fx delslot || return 1
	sleep 0.3
	snap b "$d"
	say "flushes_total +$(delta a b F) flushed_cpus_total +$(delta a b FC) full_flushes_total +$(delta a b FULL) vm flushes +$(delta a b VF) vm flushed_cpus +$(delta a b VFC)"
	check "one targeted flush (flushes_total +1)" eq "$(delta a b F)" 1 || return 1
	check "of exactly the 2 dirty CPUs (flushed_cpus_total +2)" eq "$(delta a b FC)" 2 || return 1
	check "per-VM flushes +1" eq "$(delta a b VF)" 1 || return 1
	check "per-VM flushed_cpus +2" eq "$(delta a b VFC)" 2 || return 1
	check "no full flush" eq "$(delta a b FULL)" 0 || return 1
	check "vCPUs re-mark after the flush" wait_set "$d/dirty_cpus" 1-2 || return 1
	check "memslot re-add" vmctl fx addslot || return 1
	# a second deletion, pinned elsewhere: the flush follows the dirty set
	check "repin to 3" vmctl fx "pin 3" || return 1
	check "scrub" sh -c "echo 1 > $d/scrub" || return 1
	check "dirty becomes 3" wait_set "$d/dirty_cpus" 3 || return 1
	snap a "$d"
	check "memslot delete 2" vmctl fx delslot || return 1
	sleep 0.3
	snap b "$d"
	check "second flush: flushes_total +1" eq "$(delta a b F)" 1 || return 1
	check "second flush: exactly 1 CPU" eq "$(delta a b FC)" 1 || return 1
	return 0
}

t_flush_switch_off() {
	local id d m
	for m in observe targeted; do
		check "insmod without test switch" load "$KO" || return 1
		check "mode $m" set_mode $m || return 1
		check "vm start" vm_start fo 2 1:2 || return 1
		id=$(vm_id fo) || { FAILED_STEP="no vms/<id>"; return 1; }
		d=$SF/vms/$id
		wait_set "$d/dirty_cpus" 1-2
		snap a "$d"
		check "memslot delete" vmctl fo delslot || return 1
		sleep 0.3
		snap b "$d"
		say "$m: flushes_total +$(delta a b F) full +$(delta a b FULL) vm flushes +$(delta a b VF)"
		check "$m, non-SEV VM: no targeted flush" eq "$(delta a b F)" 0 || return 1
		check "$m, non-SEV VM: no full flush counted (stock does none)" eq "$(delta a b FULL)" 0 || return 1
		check "$m, non-SEV VM: per-VM flushes unchanged" eq "$(delta a b VF)" 0 || return 1
		check "$m: dirty set untouched" set_is "$d/dirty_cpus" 1-2 || return 1
		vm_stop fo
	done
	return 0
}

# the real targeted-mode mechanism: KVM's per-VM wbinvd_on_all_cpus() call,
# run for VM <id> through the module's test_redirect_vm parameter
t_flush_redirect() {
	local id d p=/sys/module/sevflush/parameters/test_redirect_vm
	check "insmod" load || return 1
	if [ ! -e $p ]; then FAILED_STEP="module has no test_redirect_vm parameter"; return 77; fi
	check "vm start" vm_start rd 2 1:2 || return 1
	id=$(vm_id rd) || { FAILED_STEP="no vms/<id>"; return 1; }
	d=$SF/vms/$id
	check "mode targeted" set_mode targeted || return 1
	wait_set "$d/dirty_cpus" 1-2
	snap a "$d"
	check "redirect write (targeted)" sh -c "echo $id > $p" || return 1
	snap b "$d"
	say "targeted: flushes_total +$(delta a b F) flushed_cpus_total +$(delta a b FC) full +$(delta a b FULL) vm flushes +$(delta a b VF)"
	check "targeted: the stock all-CPU flush became one targeted flush" eq "$(delta a b F)" 1 || return 1
	check "targeted: of exactly the 2 dirty CPUs" eq "$(delta a b FC)" 2 || return 1
	check "targeted: per-VM flushes +1" eq "$(delta a b VF)" 1 || return 1
	check "targeted: no full flush" eq "$(delta a b FULL)" 0 || return 1
	check "mode observe" set_mode observe || return 1
	wait_set "$d/dirty_cpus" 1-2
	snap a "$d"
	check "redirect write (observe)" sh -c "echo $id > $p" || return 1
	snap b "$d"
	say "observe: flushes_total +$(delta a b F) full +$(delta a b FULL)"
	check "observe: the stock flush stays full (full_flushes_total +1)" eq "$(delta a b FULL)" 1 || return 1
	check "observe: no targeted flush" eq "$(delta a b F)" 0 || return 1
	check "observe: dirty set untouched by the stock flush" set_is "$d/dirty_cpus" 1-2 || return 1
	check "unknown id: EINVAL" sh -c "! echo 999999 2>/dev/null > $p" || return 1
	return 0
}

# The difference from stock: a VM whose vCPUs floated over several CPUs and
# were then pinned to two is flushed on those two after one scrub. Stock
# KVM flushes every CPU up to 6.16 and, from 6.17, every CPU in
# have_run_cpus (never cleared: for a VM seen from its creation, ran_cpus).
kernel_masks() { # 0 when this kernel's KVM flushes with wbnoinvd_on_cpus_mask
	grep -q ' wbnoinvd_on_cpus_mask$' /proc/kallsyms
}
t_flush_narrower() {
	local id d p=/sys/module/sevflush/parameters/test_redirect_vm stock ran what
	check "insmod" load || return 1
	[ -e $p ] || { FAILED_STEP="module has no test_redirect_vm parameter"; return 1; }
	check "vm start on {0,3}" vm_start nw 2 0:3 || return 1
	id=$(vm_id nw) || { FAILED_STEP="no vms/<id>"; return 1; }
	d=$SF/vms/$id
	check "ran on 0 and 3" wait_set "$d/ran_cpus" 0,3 || return 1
	# then floating for a while, as the scheduler pleases
	check "float" vmctl nw float || return 1
	sleep 1
	check "pin to {1,2}" vmctl nw "pin 1:2" || return 1
	check "scrub" sh -c "echo 1 > $d/scrub" || return 1
	check "dirty becomes exactly 1-2" wait_set "$d/dirty_cpus" 1-2 || return 1
	ran=$(count "$(expand "$(rd "$d/ran_cpus")")")
	if kernel_masks; then stock=$ran; what="have_run_cpus ({$(rd "$d/ran_cpus")})"; else stock=$(nproc); what="every online CPU"; fi
	check "mode targeted" set_mode targeted || return 1
	snap a "$d"
	check "KVM's flush call (targeted)" sh -c "echo $id > $p" || return 1
	snap b "$d"
	say "stock would flush $stock CPUs ($what); targeted flushed $(delta a b FC)"
	check "targeted: one flush" eq "$(delta a b F)" 1 || return 1
	check "targeted: only the 2 pinned CPUs" eq "$(delta a b FC)" 2 || return 1
	check "stock flushes more: $stock CPUs" test "$stock" -ge 3 || return 1
	check "dirty re-marks exactly 1-2" wait_set "$d/dirty_cpus" 1-2 || return 1
	# a second flush without a scrub in between is still two CPUs
	snap a "$d"
	check "KVM's flush call again" sh -c "echo $id > $p" || return 1
	snap b "$d"
	check "second flush: the 2 pinned CPUs again" eq "$(delta a b FC)" 2 || return 1
	return 0
}

# CPU hotplug (after docs/kmod.md's ad-hoc test): an offlined CPU is flushed
# without an IPI and its cache reset, so when it comes back and runs the
# guest it marks itself again
has_cpu() { case "$(expand "$(rd "$1")")" in *" $2 "*) return 0 ;; esac; return 1; }
wait_has() {
	local i=0
	while ! has_cpu "$1" "$2"; do
		i=$((i + 1))
		[ $i -ge $((WAIT * 10)) ] && { say "$1 = '$(rd "$1")', want it to hold $2"; return 1; }
		sleep 0.1
	done
}
all_online() { local c; for c in /sys/devices/system/cpu/cpu[0-9]*/online; do echo 1 >"$c" 2>/dev/null; done; }
t_cpu_hotplug() {
	local id d c=/sys/devices/system/cpu/cpu2/online ko="${1:-$KO}"
	[ -w $c ] || { FAILED_STEP="CPU 2 cannot be taken offline here"; return 77; }
	check "insmod" load "$ko" || return 1
	check "vm start on CPU 2" vm_start hx 1 2 || return 1
	id=$(vm_id hx) || { FAILED_STEP="no vms/<id>"; return 1; }
	d=$SF/vms/$id
	check "dirty exactly 2" wait_set "$d/dirty_cpus" 2 || return 1
	check "offline CPU 2" sh -c "echo 0 > $c" || return 1
	check "pin to CPU 1" vmctl hx "pin 1" || return 1
	check "dirty gains 1" wait_has "$d/dirty_cpus" 1 || return 1
	check "scrub" sh -c "echo 1 > $d/scrub" || return 1
	check "after scrub with CPU 2 offline: dirty exactly 1" wait_set "$d/dirty_cpus" 1 || return 1
	check "online CPU 2" sh -c "echo 1 > $c" || return 1
	check "pin to CPU 2" vmctl hx "pin 2" || return 1
	check "CPU 2 back online marks itself again" wait_has "$d/dirty_cpus" 2 || return 1
	# (ran_cpus may hold more: offlining CPU 2 let the kernel move the vCPU
	# anywhere until it was pinned to CPU 1)
	check "ran_cpus holds 1 and 2" subset "$(expand 1-2)" "$(expand "$(rd "$d/ran_cpus")")" || return 1
	return 0
}

t_lifecycle_exit() {
	local id i=0
	check "insmod" load || return 1
	check "vm start" vm_start lx 2 1 || return 1
	id=$(vm_id lx) || { FAILED_STEP="no vms/<id>"; return 1; }
	check "vms/$id exists" test -d "$SF/vms/$id" || return 1
	vm_stop lx
	while [ -d "$SF/vms/$id" ] && [ $i -lt $((WAIT * 10)) ]; do sleep 0.1; i=$((i + 1)); done
	check "VM exit removes vms/$id" test ! -d "$SF/vms/$id" || return 1
	# ids are unique while loaded: a new VM gets a new id
	check "vm start 2" vm_start lx2 1 2 || return 1
	check "new VM, new id" test "$(vm_id lx2)" != "$id" || return 1
	return 0
}

t_lifecycle_unknown_past() {
	local id d
	unload || return 1
	check "vm start before insmod" vm_start up 2 1:2 || return 1
	check "insmod" load || return 1
	id=$(vm_id up) || { FAILED_STEP="VM started before insmod has no vms/<id>"; return 1; }
	d=$SF/vms/$id
	check "vms/$id/unknown_past exists" test -f "$d/unknown_past" || return 1
	check "unknown_past is 1" eq "$(rd "$d/unknown_past")" 1 || return 1
	# a VM started after insmod has a known past
	check "vm start after insmod" vm_start up2 1 3 || return 1
	check "new VM: unknown_past 0" eq "$(rd "$SF/vms/$(vm_id up2)/unknown_past")" 0 || return 1
	snap a "$d"
	check "first scrub" sh -c "echo 1 > $d/scrub" || return 1
	snap b "$d"
	say "first flush: full +$(delta a b FULL) scrubs +$(delta a b S) scrubbed_cpus +$(delta a b SC) flushes +$(delta a b F)"
	check "first flush of a VM with unknown past is full" eq "$(delta a b FULL)" 1 || return 1
	if [ -f "$d/full_flushes" ]; then
		check "per-VM full_flushes is 1" eq "$(rd "$d/full_flushes")" 1 || return 1
	fi
	check "unknown_past cleared by the full flush" eq "$(rd "$d/unknown_past")" 0 || return 1
	wait_set "$d/dirty_cpus" 1-2
	snap a "$d"
	check "second scrub" sh -c "echo 1 > $d/scrub" || return 1
	snap b "$d"
	say "second flush: full +$(delta a b FULL) scrubs +$(delta a b S) scrubbed_cpus +$(delta a b SC)"
	check "second flush is targeted (no full flush)" eq "$(delta a b FULL)" 0 || return 1
	check "second flush counted as a scrub" eq "$(delta a b S)" 1 || return 1
	check "second flush: the 2 dirty CPUs" eq "$(delta a b SC)" 2 || return 1
	if [ -f "$d/scrubs" ]; then
		check "per-VM scrubs is 1" eq "$(rd "$d/scrubs")" 1 || return 1
		check "per-VM scrubbed_cpus is 2" eq "$(rd "$d/scrubbed_cpus")" 2 || return 1
	fi
	return 0
}

state_of() { # everything a bad write must not change
	local d="$1"
	echo "mode=$(rd $SF/mode) conf=$(rd "$d/confidential") F=$(rd $SF/flushes_total) FULL=$(rd $SF/full_flushes_total) S=$(rd $SF/scrubs_total) VF=$(rd "$d/flushes")"
}
valid_values() { # the values a writable file accepts, by name (ABI v1)
	case $1 in
	mode) echo "observe targeted" ;;
	confidential) echo "unknown none sev sev-es sev-snp" ;;
	scrub) echo 1 ;;
	*) return 1 ;;
	esac
}
t_bad_input() {
	local id d before after f vals n="${FUZZ_COUNT:-800}" rc=0 seed=1 files strict
	check "insmod" load || return 1
	check "mode targeted" set_mode targeted || return 1
	check "vm start" vm_start bi 1 1 || return 1
	id=$(vm_id bi) || { FAILED_STEP="no vms/<id>"; return 1; }
	d=$SF/vms/$id
	check "confidential default unknown" eq "$(rd "$d/confidential")" unknown || return 1
	before=$(state_of "$d")
	# every writable file of the ABI (strict: exactly a listed value, with
	# or without one newline), and the module's mode parameter (lenient: a
	# parameter's set() gets a C string, so "observe\0junk" reads as
	# "observe"). The test-only parameters are not fuzzed.
	files="$(find $SF -type f -perm -200 | sort)"
	for f in $files /sys/module/sevflush/parameters/mode; do
		[ -e "$f" ] || continue
		vals=$(valid_values "${f##*/}") || { say "writable file not in ABI v1: $f"; rc=1; continue; }
		strict=""
		case $f in /sys/module/*) strict=-l ;; esac
		# shellcheck disable=SC2086
		/rig/sysfuzz $strict "$f" "$n" $seed $vals || rc=1
		seed=$((seed + 1))
	done
	[ $rc = 0 ] || { FAILED_STEP="some bad writes did not fail with EINVAL, or an unknown writable file (see log)"; return 1; }
	after=$(state_of "$d")
	say "state before: $before"
	say "state after:  $after"
	check "no state change" eq "$after" "$before" || return 1
	# valid writes still work
	check "confidential sev-es" sh -c "echo sev-es > $d/confidential" || return 1
	check "confidential reads back" eq "$(rd "$d/confidential")" sev-es || return 1
	check "mode observe" set_mode observe || return 1
	check "read-only files refuse writes" sh -c "! echo 1 2>/dev/null > $SF/flushes_total" || return 1
	return 0
}

slab_kb() { awk '/^Slab:/{print $2}' /proc/meminfo; }
kernfs_objs() { awk '$1=="kernfs_node_cache"{print $2}' /proc/slabinfo 2>/dev/null; }
settle() { # let RCU frees happen, drop caches, flush per-CPU slabs
	local c
	sleep 1
	sync
	echo 3 >/proc/sys/vm/drop_caches
	for c in /sys/kernel/slab/*/shrink; do echo 1 >"$c" 2>/dev/null; done
	sleep 1
}
no_trace_left() { ! loaded && [ ! -e $SF ] && [ ! -e /sys/module/sevflush ]; }
t_load_unload() {
	local i m s0 s1 k0 k1 leak=""
	[ -e /sys/kernel/debug/kmemleak ] && leak=1
	unload
	# warm up, then 20 cycles with no VM alive at insmod and rmmod time,
	# observe and targeted alternately; a VM is created and exits in between
	load && unload
	settle
	s0=$(slab_kb); k0=$(kernfs_objs)
	i=0
	while [ $i -lt 20 ]; do
		m=observe; [ $((i % 2)) = 1 ] && m=targeted
		check "cycle $i (no VMs): insmod" load || return 1
		check "cycle $i: mode $m" set_mode $m || return 1
		check "cycle $i: a VM comes" vm_start lu0 1 2 || return 1
		check "cycle $i: VM record" vm_id lu0 >/dev/null || return 1
		vm_stop lu0
		check "cycle $i: rmmod" unload || return 1
		check "cycle $i: rmmod leaves nothing in sysfs" no_trace_left || return 1
		i=$((i + 1))
	done
	settle
	s1=$(slab_kb); k1=$(kernfs_objs)
	say "20 cycles without VMs at load/unload: Slab ${s0} -> ${s1} kB, kernfs_node_cache ${k0} -> ${k1} objects"
	check "Slab grows less than 1 MiB over 20 cycles" test $((s1 - s0)) -lt 1024 || return 1
	# 20 cycles with VMs running (pinned and floating) across insmod and
	# rmmod, with scrubs and memslot deletions, test switch on and off
	check "vm start" vm_start lu1 2 1:2 || return 1
	check "vm start" vm_start lu2 2 || return 1
	i=0
	while [ $i -lt 20 ]; do
		m=observe; [ $((i % 2)) = 1 ] && m=targeted
		if [ -n "$TEST_PARAM" ]; then
			check "cycle $i (VMs): insmod" load "$KO" "$TEST_PARAM=$((i % 4 / 2))" || return 1
		else
			check "cycle $i (VMs): insmod" load || return 1
		fi
		check "cycle $i: mode $m" set_mode $m || return 1
		check "cycle $i: record for VM 1" vm_id lu1 >/dev/null || return 1
		check "cycle $i: record for VM 2" vm_id lu2 >/dev/null || return 1
		echo 1 >"$SF/vms/$(vm_id lu1)/scrub"
		vmctl lu1 cycleslot
		vmctl lu2 cycleslot
		check "cycle $i: rmmod with VMs running" unload || return 1
		check "cycle $i: rmmod leaves nothing in sysfs" no_trace_left || return 1
		i=$((i + 1))
	done
	check "VM 1 survives 20 module cycles" vmctl lu1 stats || return 1
	check "VM 2 survives 20 module cycles" vmctl lu2 stats || return 1
	vm_stop_all
	if [ -n "$leak" ]; then
		echo scan >/sys/kernel/debug/kmemleak
		check "kmemleak: no leaks" test -z "$(cat /sys/kernel/debug/kmemleak)" || return 1
	else
		say "kmemleak not in this kernel's config: coarse Slab check only"
	fi
	return 0
}

t_agent() {
	local rc=0 b
	if [ "$AGENT" != 1 ]; then
		FAILED_STEP="agent not built/unsupported (no target/release/sevplaced and sevplacectl)"
		return 77
	fi
	# the binaries and their shared libraries must at least run here
	for b in sevplaced sevplacectl; do
		rc=0
		"$b" --help >"/tmp/$b.help" 2>&1 || rc=$?
		if [ $rc = 126 ] || [ $rc = 127 ]; then
			FAILED_STEP="$b does not run in the guest (exit $rc: $(head -c 200 "/tmp/$b.help"))"
			return 1
		fi
	done
	if ! grep -q -- --host-root /tmp/sevplaced.help || ! grep -q place /tmp/sevplacectl.help; then
		FAILED_STEP="agent not built/unsupported (binaries lack --host-root/place)"
		return 77
	fi
	agent_e2e
}

# The agent on the real module and real KVM: sevplaced places a floating VM,
# after a ScrubVm the module's dirty set stays within the placement,
# `sevplacectl vm` shows it, and /metrics carries the dirty-set gauge.
agent_e2e() {
	local sock=/run/sevplace/sevplaced.sock apid pid id d placed dirty i m
	# /metrics is served on loopback, which the guest brings up only here
	ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
	check "insmod" load || return 1
	check "vm start (floating)" vm_start ag 2 || return 1
	pid=$(vm_pid ag)
	id=$(vm_id ag) || { FAILED_STEP="no vms/<id> for the VM"; return 1; }
	d=$SF/vms/$id
	SEVPLACE__RECONCILE__PERIOD_MS=300 sevplaced --socket $sock \
		--metrics-addr 127.0.0.1:9478 --state-dir /tmp/sevplace-state \
		>/tmp/sevplaced.log 2>&1 &
	apid=$!
	i=0
	until [ -S $sock ] && sevplacectl --socket $sock host >/tmp/host.txt 2>&1; do
		i=$((i + 1))
		if [ $i -ge $((WAIT * 30)) ] || ! kill -0 $apid 2>/dev/null; then
			FAILED_STEP="sevplaced did not start: $(tail -n 3 /tmp/sevplaced.log | tr '\n' ' ')"
			kill $apid 2>/dev/null
			return 1
		fi
		sleep 0.1
	done
	say "$(grep -E '^(cpus|l3 domains|sevflush)' /tmp/host.txt | tr '\n' ';')"
	check "GetHost reports the module loaded" grep -q "sevflush    loaded" /tmp/host.txt || { kill $apid; return 1; }
	if ! sevplacectl --socket $sock place ag --pid "$pid" --vcpus 2 --confidential sev >/tmp/place.txt 2>&1; then
		FAILED_STEP="PlaceVm failed: $(head -c 300 /tmp/place.txt)"
		kill $apid
		return 1
	fi
	placed=$(sed -n 's/^cpus  *//p' /tmp/place.txt)
	say "placed on {$placed}; dirty before scrub {$(rd "$d/dirty_cpus")}"
	check "placement has CPUs" test -n "$placed" || { kill $apid; return 1; }
	# the vCPU threads are pinned: every vCPU's allowed list within the placement
	for t in /proc/"$pid"/task/*; do
		case "$(cat "$t/comm")" in
		"CPU "*"/KVM")
			m=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$t/status")
			check "vCPU thread $(cat "$t/comm") allowed {$m} within {$placed}" subset "$(expand "$m")" "$(expand "$placed")" || { kill $apid; return 1; }
			;;
		esac
	done
	check "ScrubVm" sh -c "sevplacectl --socket $sock scrub ag >/tmp/scrub.txt 2>&1" || { say "$(cat /tmp/scrub.txt)"; kill $apid; return 1; }
	say "$(cat /tmp/scrub.txt)"
	sleep 1
	dirty=$(rd "$d/dirty_cpus")
	say "dirty after scrub {$dirty}"
	check "dirty set not empty (running vCPUs re-mark)" test -n "$dirty" || { kill $apid; return 1; }
	check "dirty set {$dirty} within the agent's placement {$placed}" subset "$(expand "$dirty")" "$(expand "$placed")" || { kill $apid; return 1; }
	sleep 1
	check "dirty set stays within the placement" subset "$(expand "$(rd "$d/dirty_cpus")")" "$(expand "$placed")" || { kill $apid; return 1; }
	sevplacectl --socket $sock vm ag >/tmp/vm.txt 2>&1
	check "sevplacectl vm shows the dirty set" grep -q "^dirty cpus" /tmp/vm.txt || { say "$(cat /tmp/vm.txt)"; kill $apid; return 1; }
	# the reconcile loop publishes the gauge within a period
	i=0
	until wget -q -O /tmp/metrics.txt http://127.0.0.1:9478/metrics 2>/dev/null && grep -q '^sevplace_vm_dirty_cpus{vm="ag",confidential="sev"}' /tmp/metrics.txt; do
		i=$((i + 1))
		[ $i -ge $((WAIT * 10)) ] && { FAILED_STEP="/metrics lacks sevplace_vm_dirty_cpus for vm ag"; kill $apid; return 1; }
		sleep 0.1
	done
	say "$(grep -E '^sevplace_(vm_dirty_cpus|kmod_loaded)' /tmp/metrics.txt | tr '\n' ';')"
	check "module label written by the agent" eq "$(rd "$d/confidential")" sev || { kill $apid; return 1; }
	kill -TERM $apid
	i=0
	while kill -0 $apid 2>/dev/null; do
		i=$((i + 1))
		[ $i -ge 100 ] && { FAILED_STEP="sevplaced did not exit on SIGTERM"; kill -9 $apid; return 1; }
		sleep 0.1
	done
	check "socket removed on exit" test ! -e $sock || return 1
	return 0
}

t_negative() {
	local rc=0
	[ "$BROKEN_OK" = 1 ] || { FAILED_STEP="broken build unavailable: $BROKEN_ERR"; return 1; }
	tracking_pinned_repin "$BROKEN_KO" || rc=1
	vm_stop_all
	unload
	if [ $rc = 0 ]; then
		FAILED_STEP="tracking test PASSED on the broken build: it does not detect a missing cache reset"
		return 1
	fi
	case $FAILED_STEP in
	"after scrub: dirty_cpus re-marked as exactly 3")
		say "tracking failed on the broken build as expected: $FAILED_STEP"
		FAILED_STEP=""
		return 0 ;;
	esac
	FAILED_STEP="broken build failed at an unexpected step: $FAILED_STEP"
	return 1
}

t_negative_online() {
	local rc=0
	[ "$BROKEN2_OK" = 1 ] || { FAILED_STEP="second broken build unavailable: $BROKEN2_ERR"; return 77; }
	t_cpu_hotplug "$BROKEN2_KO" || rc=$?
	vm_stop_all
	all_online
	unload
	[ $rc = 77 ] && return 77
	if [ $rc = 0 ]; then
		FAILED_STEP="cpu-hotplug PASSED on the build without the online reset: it does not detect it"
		return 1
	fi
	case $FAILED_STEP in
	"CPU 2 back online marks itself again")
		say "cpu-hotplug failed on the broken build as expected: $FAILED_STEP"
		FAILED_STEP=""
		return 0 ;;
	esac
	FAILED_STEP="broken build failed at an unexpected step: $FAILED_STEP"
	return 1
}

# --- main ------------------------------------------------------------------------
MODULE_TESTS="tracking-pinned:t_tracking_pinned tracking-float:t_tracking_float flush-targeted:t_flush_targeted flush-switch-off:t_flush_switch_off flush-redirect:t_flush_redirect flush-narrower-than-stock:t_flush_narrower cpu-hotplug:t_cpu_hotplug lifecycle-exit:t_lifecycle_exit lifecycle-unknown-past:t_lifecycle_unknown_past bad-input:t_bad_input load-unload:t_load_unload"

if ! kvm_up; then
	result "FAIL rig-selftest kvm modules do not load"
	exit 0
fi
run rig-selftest t_selftest
for t in $MODULE_TESTS; do
	name=${t%%:*}
	case " ${ONLY_TESTS:-$name} " in *" $name "*) ;; *) continue ;; esac
	if [ "$KMOD_OK" != 1 ]; then
		result "FAIL $name sevflush.ko not built: $KMOD_ERR"
		continue
	fi
	run "$name" "${t#*:}"
	unload || true
done
wanted() { case " ${ONLY_TESTS:-$1} " in *" $1 "*) return 0 ;; esac; return 1; }
wanted agent-e2e && run agent-e2e t_agent
if ! wanted negative-broken-cache-reset-detected; then
	:
elif [ "$KMOD_OK" = 1 ]; then
	run negative-broken-cache-reset-detected t_negative
else
	result "FAIL negative-broken-cache-reset-detected sevflush.ko not built: $KMOD_ERR"
fi
if ! wanted negative-broken-online-reset-detected; then
	:
elif [ "$KMOD_OK" = 1 ]; then
	run negative-broken-online-reset-detected t_negative_online
else
	result "FAIL negative-broken-online-reset-detected sevflush.ko not built: $KMOD_ERR"
fi
