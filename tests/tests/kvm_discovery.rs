//! Real-host tests of discovery and pinning on real KVM VMs: the
//! `kvm-guest-fixture` VMM (real `/dev/kvm`, vCPU threads running guest code)
//! and, when installed, Debian's QEMU with `-accel kvm`. Skipped with a
//! printed reason when `/dev/kvm` is absent or unusable; the cgroup part is
//! skipped when not root or no cgroup v1 cpuset hierarchy is mounted.
//!
//! Every pin goes through the daemon's enforcement path
//! (`reconcile::enforce::desired_sets` and `apply` with the real
//! `sched_setaffinity`); cgroups and thread moves only arrange the layouts
//! libvirt makes.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sevplace::cgroup::{self, CgroupError, CpusetWriter, Hierarchy, SchedAffinity};
use sevplace::discovery::{DiscoveredVm, VcpuMatch, VmExitWatch, VmScanner};
use sevplace::reconcile::enforce::{apply, desired_sets, ThreadFix};
use sevplace::state::PlacementRecord;
use sevplace::{ConfidentialClass, CpuSet};
use sevplace_tests::skip;

const FIXTURE: &str = env!("CARGO_BIN_EXE_kvm-guest-fixture");
const PROC: &str = "/proc";

/// Kills and reaps the child on drop.
struct VmProcess {
    child: Child,
    pid: u32,
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(test, "kvm", format_args!("/dev/kvm unusable: {e}"));
            false
        }
    }
}

/// Starts the fixture and waits for `ready pid=N`.
fn start_fixture(args: &[&str]) -> VmProcess {
    let mut child = Command::new(FIXTURE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn kvm-guest-fixture");
    let stdout = child.stdout.take().expect("fixture stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read fixture stdout");
    let pid: u32 = line
        .trim()
        .strip_prefix("ready pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("fixture did not become ready: {line:?}"));
    assert_eq!(pid, child.id());
    VmProcess { child, pid }
}

fn host_cpus() -> CpuSet {
    sevplace::discovery::read_thread_cpus_allowed(
        Path::new(PROC),
        std::process::id(),
        std::process::id(),
    )
    .expect("own Cpus_allowed_list")
}

/// Context switches of a thread (voluntary + nonvoluntary, from status).
fn switches(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let sum = text
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Some(sum)
}

/// The outcome of sampling last CPUs.
struct Samples {
    /// `(tid, cpu)` samples outside the thread's set.
    stray: Vec<(u32, u32)>,
    /// Threads with at least one sample taken after they ran post-pin.
    ran: Vec<u32>,
}

/// Samples each thread's last CPU `rounds` times, 10 ms apart. Stat field 39
/// of a thread asleep since before the pin still names its old CPU (the
/// kernel moves a sleeping task only when it wakes), so a sample counts only
/// once the thread's context-switch count has grown since this call, i.e.
/// it has run under the new mask.
fn sample_last_cpus(pid: u32, pins: &[(u32, CpuSet)], rounds: usize) -> Samples {
    let base: Vec<Option<u64>> = pins.iter().map(|(tid, _)| switches(pid, *tid)).collect();
    let mut out = Samples {
        stray: Vec::new(),
        ran: Vec::new(),
    };
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(10));
        for ((tid, set), b) in pins.iter().zip(&base) {
            let now = switches(pid, *tid);
            if !matches!((now, b), (Some(n), Some(b)) if n > *b) {
                continue;
            }
            let cpu = sevplace::discovery::read_thread_last_cpu(Path::new(PROC), pid, *tid)
                .expect("vCPU stat")
                .expect("last CPU");
            if !set.contains(cpu) {
                out.stray.push((*tid, cpu));
            }
            if !out.ran.contains(tid) {
                out.ran.push(*tid);
            }
        }
    }
    out
}

/// Pins `vm` to `record` the way the daemon does: the fixes
/// [`desired_sets`] decides (`known`: vCPU threads pinned before), each
/// applied by [`apply`] with the real `sched_setaffinity`, stopping at the
/// first error. Returns the fixes applied.
fn pin_like_daemon(
    vm: &DiscoveredVm,
    record: &PlacementRecord,
    known: &BTreeSet<u32>,
    writer: Option<&CpusetWriter>,
) -> Result<Vec<ThreadFix>, CgroupError> {
    let fixes = desired_sets(vm, record, known, writer.map(CpusetWriter::hierarchy));
    for fix in &fixes {
        apply(fix, writer, &SchedAffinity)?;
    }
    Ok(fixes)
}

/// The placement record of `(index, set)` vCPU pins (sorted by index).
fn record_of(pins: &[(u32, CpuSet)], emulator: Option<CpuSet>) -> PlacementRecord {
    let mut sorted = pins.to_vec();
    sorted.sort_by_key(|p| p.0);
    let vcpu_cpus: Vec<CpuSet> = sorted.into_iter().map(|p| p.1).collect();
    PlacementRecord {
        class: ConfidentialClass::None,
        cpus: vcpu_cpus.iter().fold(CpuSet::new(), |acc, s| acc.union(s)),
        vcpu_cpus,
        emulator_cpus: emulator,
        l3_groups: Vec::new(),
        numa_nodes: Vec::new(),
        shares_confidential_domain: false,
    }
}

/// vCPU `i` gets CPU `cpus[i % n]`.
fn spread(vm: &DiscoveredVm, cpus: &CpuSet) -> Vec<(u32, u32, CpuSet)> {
    let list = cpus.to_vec();
    vm.vcpus
        .iter()
        .map(|v| {
            let cpu = list[v.index as usize % list.len()];
            (v.index, v.tid, [cpu].into_iter().collect())
        })
        .collect()
}

const SEV_ES_FLAGS: &[&str] = &[
    "-name",
    "guest=fixture-es,debug-threads=on",
    "-object",
    "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x5",
    "-machine",
    "q35,confidential-guest-support=sev0",
];

#[test]
fn fixture_vm_is_discovered_classified_and_pinned_by_affinity() {
    if !kvm_usable("fixture_vm_is_discovered_classified_and_pinned_by_affinity") {
        return;
    }
    let mut args = vec!["--vcpus", "3"];
    args.extend_from_slice(SEV_ES_FLAGS);
    let vm_proc = start_fixture(&args);
    let scanner = VmScanner::new(PROC);

    let all = scanner.scan().expect("scan /proc");
    let vm = all
        .iter()
        .find(|v| v.pid == vm_proc.pid)
        .expect("scan finds the fixture VM")
        .clone();
    assert_eq!(vm.vcpu_fds, vec![0, 1, 2]);
    let indices: Vec<u32> = vm.vcpus.iter().map(|v| v.index).collect();
    assert_eq!(indices, vec![0, 1, 2]);
    for v in &vm.vcpus {
        assert_eq!(v.comm, format!("CPU {}/KVM", v.index));
        assert_eq!(v.matched_by, VcpuMatch::ThreadName);
        assert_ne!(v.tid, vm.pid);
    }
    assert_eq!(vm.class, Some(ConfidentialClass::SevEs));
    assert_eq!(vm.guest_name.as_deref(), Some("fixture-es"));
    assert!(vm.other_threads.iter().any(|t| t.tid == vm.pid));
    assert!(
        !vm.other_threads
            .iter()
            .any(|t| t.comm.starts_with("kvm-nx-lpage")),
        "KVM's NX recovery worker is not a VM thread: {:?}",
        vm.other_threads
    );
    assert!(scanner.is_same_process(vm.pid, vm.start_time).unwrap());

    let pins = spread(&vm, &host_cpus());
    // Emulator threads go to the last CPU, a set they do not have yet (the
    // host has more than one CPU), so they are pinned too.
    let emulator: CpuSet = host_cpus().iter().last().into_iter().collect();
    let placement: Vec<(u32, CpuSet)> = pins.iter().map(|p| (p.0, p.2.clone())).collect();
    let writer = CpusetWriter::detect("/sys/fs/cgroup").ok();
    let fixes = pin_like_daemon(
        &vm,
        &record_of(&placement, Some(emulator.clone())),
        &BTreeSet::new(),
        writer.as_ref(),
    )
    .expect("pin the fixture VM");
    // Affinity only: the fixture has no libvirt cgroup.
    let vcpu_fixes: Vec<(u32, Option<String>)> = fixes
        .iter()
        .filter_map(|f| Some((f.vcpu?, f.cgroup.clone())))
        .collect();
    assert_eq!(vcpu_fixes, vec![(0, None), (1, None), (2, None)]);
    let emulator_fixes: Vec<&ThreadFix> = fixes.iter().filter(|f| f.vcpu.is_none()).collect();
    assert!(!emulator_fixes.is_empty());
    assert!(emulator_fixes.iter().all(|f| f.cgroup.is_none()));
    for f in &emulator_fixes {
        let allowed =
            sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), vm.pid, f.tid).unwrap();
        assert_eq!(
            allowed, emulator,
            "emulator thread {} Cpus_allowed_list",
            f.tid
        );
    }
    let mut checks = Vec::new();
    for (index, tid, set) in &pins {
        let allowed =
            sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), vm.pid, *tid).unwrap();
        assert_eq!(&allowed, set, "vCPU {index} Cpus_allowed_list");
        checks.push((*tid, set.clone()));
    }
    let samples = sample_last_cpus(vm.pid, &checks, 30);
    assert!(
        samples.stray.is_empty(),
        "vCPU threads ran outside their sets: {:?}",
        samples.stray
    );
    assert_eq!(
        samples.ran.len(),
        checks.len(),
        "every fixture vCPU ran while sampled"
    );

    // The pins hold on a rescan, and the vCPUs still run.
    let again = scanner.inspect(vm.pid).unwrap();
    for (v, (_, _, set)) in again.vcpus.iter().zip(&pins) {
        assert_eq!(&v.cpus_allowed, set);
    }
    println!(
        "real KVM: fixture pid {} with 3 vCPUs discovered as {:?}, pinned by affinity to {:?}",
        vm.pid,
        vm.class,
        pins.iter().map(|p| p.2.to_string()).collect::<Vec<_>>()
    );
}

#[test]
fn fixture_vm_pinned_with_real_v1_cpuset() {
    let test = "fixture_vm_pinned_with_real_v1_cpuset";
    if !kvm_usable(test) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        skip(test, "root", "not root");
        return;
    }
    let writer = match CpusetWriter::detect("/sys/fs/cgroup") {
        Ok(w) if w.hierarchy() == Hierarchy::V1Cpuset => w,
        Ok(_) => {
            skip(
                test,
                "cgroup-v1-cpuset",
                "the cpuset controller is on cgroup v2 here",
            );
            return;
        }
        Err(e) => {
            skip(test, "cgroup-v1-cpuset", e);
            return;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let base = format!("/sevplace-test-kvm-{}-{nanos:x}", std::process::id());
    // libvirt's v1 layout without systemd, under a test-owned top cgroup.
    let machine = format!("{base}/machine/fixture.libvirt-qemu");

    let mut args = vec!["--vcpus", "2"];
    args.extend_from_slice(SEV_ES_FLAGS);
    let vm_proc = start_fixture(&args);
    let pre = VmScanner::new(PROC).inspect(vm_proc.pid).unwrap();
    assert_eq!(pre.vcpus.len(), 2);

    let cpus = host_cpus();
    // vCPUs on the highest CPUs first, in reverse, so the set differs from
    // the affinity test's.
    let list: Vec<u32> = cpus.to_vec().into_iter().rev().collect();
    let pins: Vec<(u32, u32, CpuSet)> = pre
        .vcpus
        .iter()
        .map(|v| {
            let cpu = list[v.index as usize % list.len()];
            (v.index, v.tid, [cpu].into_iter().collect())
        })
        .collect();
    let vcpu_cgroup = |index: u32| format!("{machine}/vcpu{index}");

    let result = (|| -> Result<(), String> {
        let e = |e: CgroupError| e.to_string();
        // Arrange the VM the way libvirt does: threads in emulator, vCPUs in
        // vcpuN, every cgroup on all host CPUs.
        let emulator = format!("{machine}/emulator");
        writer
            .ensure_cpuset(&emulator, &cpus, None, cgroup::CgroupKind::Threaded)
            .map_err(e)?;
        writer.move_process(&emulator, pre.pid).map_err(e)?;
        for v in &pre.vcpus {
            let cg = vcpu_cgroup(v.index);
            writer
                .ensure_cpuset(&cg, &cpus, None, cgroup::CgroupKind::Threaded)
                .map_err(e)?;
            writer.move_thread(&cg, v.tid).map_err(e)?;
        }
        let vm = VmScanner::new(PROC)
            .inspect(pre.pid)
            .map_err(|e| e.to_string())?;
        let placement: Vec<(u32, CpuSet)> = pins.iter().map(|p| (p.0, p.2.clone())).collect();
        let fixes = pin_like_daemon(
            &vm,
            &record_of(&placement, Some(cpus.clone())),
            &BTreeSet::new(),
            Some(&writer),
        )
        .map_err(e)?;
        for (index, _, _) in &pins {
            let cg = vcpu_cgroup(*index);
            if !fixes
                .iter()
                .any(|f| f.vcpu == Some(*index) && f.cgroup.as_deref() == Some(cg.as_str()))
            {
                return Err(format!("vCPU {index} not pinned through {cg}: {fixes:?}"));
            }
        }
        for (index, tid, set) in &pins {
            let cg = vcpu_cgroup(*index);
            let cg_cpus = writer.read_cpus(&cg).map_err(|e| e.to_string())?;
            if &cg_cpus != set {
                return Err(format!("{cg}: cpuset.cpus {cg_cpus}, want {set}"));
            }
            let members = writer.read_threads(&cg).map_err(|e| e.to_string())?;
            if members != vec![*tid] {
                return Err(format!("{cg}: tasks {members:?}, want [{tid}]"));
            }
            let allowed =
                sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), vm.pid, *tid)
                    .map_err(|e| e.to_string())?;
            if &allowed != set {
                return Err(format!(
                    "vCPU {index}: Cpus_allowed_list {allowed}, want {set}"
                ));
            }
        }
        // Discovery sees the libvirt cgroups on the vCPU threads.
        let seen = VmScanner::new(PROC)
            .inspect(vm.pid)
            .map_err(|e| e.to_string())?;
        for v in &seen.vcpus {
            let want = vcpu_cgroup(v.index);
            if v.cgroup.v1_cpuset.as_deref() != Some(want.as_str()) {
                return Err(format!("vCPU {} in {:?}, want {want}", v.index, v.cgroup));
            }
        }
        let checks: Vec<(u32, CpuSet)> = pins.iter().map(|p| (p.1, p.2.clone())).collect();
        let samples = sample_last_cpus(vm.pid, &checks, 30);
        if !samples.stray.is_empty() {
            return Err(format!(
                "vCPU threads ran outside their cpusets: {:?}",
                samples.stray
            ));
        }
        if samples.ran.len() != checks.len() {
            return Err(format!(
                "only {:?} of the vCPUs ran while sampled",
                samples.ran
            ));
        }
        Ok(())
    })();

    // Cleanup: the VM exits, then its now-empty cgroups are removed.
    let pid = vm_proc.pid;
    drop(vm_proc);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut removed = writer.remove(&base);
    while removed.is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        removed = writer.remove(&base);
    }
    result.unwrap();
    removed.expect("remove the test cgroups");
    println!("real KVM + real v1 cpuset: fixture pid {pid} vCPUs pinned through {machine}/vcpuN");
}

#[test]
fn vm_killed_between_discovery_and_pinning_is_vm_gone() {
    let test = "vm_killed_between_discovery_and_pinning_is_vm_gone";
    if !kvm_usable(test) {
        return;
    }
    let vm_proc = start_fixture(&["--vcpus", "2"]);
    let scanner = VmScanner::new(PROC);
    let vm = scanner.inspect(vm_proc.pid).unwrap();
    assert_eq!(vm.vcpus.len(), 2);
    // No QEMU flags: an unknown VMM, class not guessed.
    assert_eq!(vm.class, None);
    let watch = VmExitWatch::open(&scanner, vm.pid, vm.start_time).unwrap();
    assert!(!watch.has_exited());
    drop(vm_proc); // SIGKILL and reap
    assert!(watch.has_exited(), "pidfd reports the exit");

    let one: CpuSet = host_cpus().first().into_iter().collect();
    // The daemon's pin of the snapshot taken before the exit: every vCPU
    // fix fails with VmGone (the VM is released, not retried).
    let record = record_of(&[(0, one.clone()), (1, one.clone())], None);
    for v in &vm.vcpus {
        let mut alone = vm.clone();
        alone.vcpus.retain(|o| o.tid == v.tid);
        alone.vcpus[0].cpus_allowed = host_cpus();
        let err = pin_like_daemon(&alone, &record, &BTreeSet::new(), None).unwrap_err();
        assert!(err.is_gone(), "affinity on an exited vCPU: {err:?}");
        let err = sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), vm.pid, v.tid)
            .unwrap_err();
        assert!(err.is_gone(), "readback of an exited vCPU: {err:?}");
    }
    let err = scanner.inspect(vm.pid).unwrap_err();
    assert!(err.is_gone(), "{err:?}");
    assert!(!scanner.is_same_process(vm.pid, vm.start_time).unwrap());

    if nix::unistd::geteuid().is_root() {
        if let Ok(w) = CpusetWriter::detect("/sys/fs/cgroup") {
            // The root cgroup exists; moving a dead tid into it is ESRCH.
            let err = w.move_thread("/", vm.vcpus[0].tid).unwrap_err();
            assert!(err.is_gone(), "move of an exited vCPU: {err:?}");
        }
    }
}

#[test]
fn unnamed_vcpu_threads_are_matched_without_qemu_names() {
    if !kvm_usable("unnamed_vcpu_threads_are_matched_without_qemu_names") {
        return;
    }
    let vm_proc = start_fixture(&["--vcpus", "3", "--thread-prefix", "vcpu-"]);
    let vm = VmScanner::new(PROC).inspect(vm_proc.pid).unwrap();
    assert_eq!(vm.vcpu_fds, vec![0, 1, 2]);
    assert_eq!(vm.vcpus.len(), 3, "{vm:?}");
    for v in &vm.vcpus {
        assert_eq!(v.comm, format!("vcpu-{}", v.index), "{v:?}");
        assert!(matches!(
            v.matched_by,
            VcpuMatch::KvmRunSyscall | VcpuMatch::ThreadOrder
        ));
    }
}

#[test]
fn real_qemu_is_discovered_and_pinned() {
    let test = "real_qemu_is_discovered_and_pinned";
    if !kvm_usable(test) {
        return;
    }
    let qemu = "/usr/bin/qemu-system-x86_64";
    if !Path::new(qemu).exists() {
        skip(test, "qemu", format_args!("{qemu} is not installed"));
        return;
    }
    let child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-name",
            "guest=sevplace-qemu-test,debug-threads=on",
            "-smp",
            "2",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let pid = child.id();
    let vm_proc = VmProcess { child, pid };
    let scanner = VmScanner::new(PROC);
    // QEMU creates its vCPU threads during start-up: wait until both exist.
    let deadline = Instant::now() + Duration::from_secs(20);
    let vm = loop {
        match scanner.inspect(pid) {
            Ok(vm) if vm.vcpus.len() == 2 => break vm,
            _ if Instant::now() > deadline => panic!("QEMU {pid} not discovered with 2 vCPUs"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(vm.class, Some(ConfidentialClass::None));
    assert_eq!(vm.guest_name.as_deref(), Some("sevplace-qemu-test"));
    assert_eq!(vm.vcpu_fds, vec![0, 1]);
    for v in &vm.vcpus {
        assert_eq!(v.matched_by, VcpuMatch::ThreadName);
    }
    let pins = spread(&vm, &host_cpus());
    let placement: Vec<(u32, CpuSet)> = pins.iter().map(|p| (p.0, p.2.clone())).collect();
    let fixes = pin_like_daemon(
        &vm,
        &record_of(&placement, None),
        &BTreeSet::new(),
        CpusetWriter::detect("/sys/fs/cgroup").ok().as_ref(),
    )
    .unwrap();
    assert!(fixes.iter().all(|f| f.cgroup.is_none()), "{fixes:?}");
    for (_, tid, set) in &pins {
        assert_eq!(
            &sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), pid, *tid).unwrap(),
            set
        );
    }
    let checks: Vec<(u32, CpuSet)> = pins.iter().map(|p| (p.1, p.2.clone())).collect();
    let samples = sample_last_cpus(pid, &checks, 30);
    assert!(
        samples.stray.is_empty(),
        "QEMU vCPUs ran outside their sets: {:?}",
        samples.stray
    );
    drop(vm_proc);
    // QEMU's application processor stays halted (no guest OS), so not every
    // vCPU runs; the ones that ran are the ones checked.
    println!(
        "real QEMU pid {pid}: discovered 2 vCPUs, pinned by affinity; {} of them ran while sampled",
        samples.ran.len()
    );
}

#[test]
fn real_qemu_without_thread_names_is_matched_by_kvm_run() {
    let test = "real_qemu_without_thread_names_is_matched_by_kvm_run";
    if !kvm_usable(test) {
        return;
    }
    let qemu = "/usr/bin/qemu-system-x86_64";
    if !Path::new(qemu).exists() {
        skip(test, "qemu", format_args!("{qemu} is not installed"));
        return;
    }
    // No debug-threads: every QEMU thread is named "qemu-system-x86".
    let child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-smp",
            "2",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let pid = child.id();
    let _vm_proc = VmProcess { child, pid };
    let scanner = VmScanner::new(PROC);
    // A halted vCPU waits in KVM_RUN; one executing reads "running". Scan
    // until at least one vCPU is matched.
    let deadline = Instant::now() + Duration::from_secs(20);
    let vm = loop {
        match scanner.inspect(pid) {
            Ok(vm) if vm.vcpu_fds.len() == 2 && !vm.vcpus.is_empty() => break vm,
            _ if Instant::now() > deadline => panic!("no vCPU of QEMU {pid} matched"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(vm.class, Some(ConfidentialClass::None));
    for v in &vm.vcpus {
        assert_eq!(v.matched_by, VcpuMatch::KvmRunSyscall, "{v:?}");
        assert_ne!(v.tid, pid, "the main thread is not a vCPU");
        assert_eq!(v.comm, "qemu-system-x86", "{v:?}");
    }
    // KVM's NX worker shows the KVM_RUN of the vCPU it was forked from; it
    // must never be taken for a vCPU.
    let tasks: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for tid in tasks {
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        if comm.starts_with("kvm-nx-lpage") {
            assert!(!vm.vcpus.iter().any(|v| v.tid == tid));
        }
    }
    println!(
        "real QEMU without debug-threads: matched vCPUs {:?} by KVM_RUN, unmatched {:?}",
        vm.vcpus
            .iter()
            .map(|v| (v.index, v.tid))
            .collect::<Vec<_>>(),
        vm.unmatched_vcpus()
    );
}

#[test]
fn fixture_in_libvirt_v1_layout_is_recognised_and_pinned_through_its_vcpu_cgroups() {
    let test = "fixture_in_libvirt_v1_layout_is_recognised_and_pinned_through_its_vcpu_cgroups";
    if !kvm_usable(test) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        skip(test, "root", "not root");
        return;
    }
    let writer = match CpusetWriter::detect("/sys/fs/cgroup") {
        Ok(w) if w.hierarchy() == Hierarchy::V1Cpuset => w,
        Ok(_) => {
            skip(
                test,
                "cgroup-v1-cpuset",
                "the cpuset controller is on cgroup v2 here",
            );
            return;
        }
        Err(e) => {
            skip(test, "cgroup-v1-cpuset", e);
            return;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let base = format!("/sevplace-test-lv-{}-{nanos:x}", std::process::id());
    // libvirt >= 7.1 layout, under a test-owned top cgroup.
    let libvirt_dir = format!("{base}/machine.slice/machine-qemu\\x2d7\\x2dfixture.scope/libvirt");

    let vm_proc = start_fixture(&["--vcpus", "2", "-name", "guest=fixture,debug-threads=on"]);
    let pid = vm_proc.pid;
    let cpus = host_cpus();
    let list = cpus.to_vec();

    let result = (|| -> Result<(), String> {
        let e = |e: CgroupError| e.to_string();
        // Arrange the VM the way libvirt does: threads in emulator, vCPUs in vcpuN.
        let pre = VmScanner::new(PROC)
            .inspect(pid)
            .map_err(|e| e.to_string())?;
        let emulator = format!("{libvirt_dir}/emulator");
        writer
            .ensure_cpuset(&emulator, &cpus, None, cgroup::CgroupKind::Threaded)
            .map_err(e)?;
        writer.move_process(&emulator, pid).map_err(e)?;
        for v in &pre.vcpus {
            let cg = format!("{libvirt_dir}/vcpu{}", v.index);
            writer
                .ensure_cpuset(&cg, &cpus, None, cgroup::CgroupKind::Threaded)
                .map_err(e)?;
            writer.move_thread(&cg, v.tid).map_err(e)?;
        }

        // Discovery reads the layout back from the real /proc.
        let vm = VmScanner::new(PROC)
            .inspect(pid)
            .map_err(|e| e.to_string())?;
        let lv = vm.cgroup.libvirt.clone().ok_or("no libvirt cgroup found")?;
        if lv.layout != sevplace::discovery::LibvirtLayout::ScopeWithLibvirtDir
            || lv.domain_id != Some(7)
            || lv.domain_name != "fixture"
            || lv.hierarchy != Hierarchy::V1Cpuset
        {
            return Err(format!("unexpected libvirt cgroup {lv:?}"));
        }
        if vm.libvirt_domain.as_deref() != Some("fixture") {
            return Err(format!("libvirt_domain {:?}", vm.libvirt_domain));
        }

        // The daemon's path writes libvirt's vcpuN cgroups.
        let placement: Vec<(u32, CpuSet)> = vm
            .vcpus
            .iter()
            .map(|v| {
                let cpu = list[(v.index as usize + 1) % list.len()];
                (v.index, [cpu].into_iter().collect())
            })
            .collect();
        let record = record_of(&placement, Some(cpus.clone()));
        let fixes = pin_like_daemon(&vm, &record, &BTreeSet::new(), Some(&writer)).map_err(e)?;
        let through: Vec<(u32, Option<String>)> = fixes
            .iter()
            .filter_map(|f| Some((f.vcpu?, f.cgroup.clone())))
            .collect();
        let want: Vec<(u32, Option<String>)> = placement
            .iter()
            .map(|(i, _)| (*i, Some(lv.vcpu_path(*i))))
            .collect();
        if through != want {
            return Err(format!("pinned through {through:?}, want {want:?}"));
        }
        for (index, set) in &placement {
            let cg = lv.vcpu_path(*index);
            if &writer.read_cpus(&cg).map_err(e)? != set {
                return Err(format!("{cg} not {set}"));
            }
            let v = vm.vcpus.iter().find(|v| v.index == *index).ok_or("vCPU")?;
            let allowed =
                sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), pid, v.tid)
                    .map_err(e)?;
            if &allowed != set {
                return Err(format!(
                    "vCPU {index}: Cpus_allowed_list {allowed}, want {set}"
                ));
            }
        }
        let checks: Vec<(u32, CpuSet)> = placement
            .iter()
            .filter_map(|(i, s)| Some((vm.vcpus.iter().find(|v| v.index == *i)?.tid, s.clone())))
            .collect();
        let samples = sample_last_cpus(pid, &checks, 20);
        if !samples.stray.is_empty() || samples.ran.len() != checks.len() {
            return Err(format!("stray {:?}, ran {:?}", samples.stray, samples.ran));
        }

        // Drift, as when libvirt rewrites a vCPU cgroup. Widening vCPU 0's
        // cgroup to every CPU changes only the cgroup: the kernel keeps the
        // thread's own affinity (set by the enforcer) inside the wider set,
        // so drift must be read from the cgroup too. Moving the cgroup to
        // another CPU also moves the thread (its affinity no longer fits).
        if list.len() >= 2 {
            let want = placement[0].1.clone();
            let cg0 = lv.vcpu_path(0);
            let v0 = vm.vcpus.iter().find(|v| v.index == 0).ok_or("vCPU 0")?;
            writer.set_cpus(&cg0, &cpus).map_err(e)?;
            let allowed =
                sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), pid, v0.tid)
                    .map_err(e)?;
            if allowed != want || writer.read_cpus(&cg0).map_err(e)? != cpus {
                return Err(format!(
                    "after widening: thread {allowed}, cgroup {:?}",
                    writer.read_cpus(&cg0)
                ));
            }
            let other = cpus.difference(&want);
            writer.set_cpus(&cg0, &other).map_err(e)?;
            let drifted = VmScanner::new(PROC)
                .inspect(pid)
                .map_err(|e| e.to_string())?;
            let d0 = drifted
                .vcpus
                .iter()
                .find(|v| v.index == 0)
                .ok_or("vCPU 0")?;
            if d0.cpus_allowed != other {
                return Err(format!("drift to {other} not visible: {}", d0.cpus_allowed));
            }
            let known: BTreeSet<u32> = vm.vcpus.iter().map(|v| v.tid).collect();
            let fixes = pin_like_daemon(&drifted, &record, &known, Some(&writer)).map_err(e)?;
            if !fixes
                .iter()
                .any(|f| f.tid == d0.tid && f.cgroup.as_deref() == Some(cg0.as_str()))
            {
                return Err(format!(
                    "drift of vCPU 0 not fixed through {cg0}: {fixes:?}"
                ));
            }
            let fixed = sevplace::discovery::read_thread_cpus_allowed(Path::new(PROC), pid, v0.tid)
                .map_err(e)?;
            if fixed != want || writer.read_cpus(&cg0).map_err(e)? != want {
                return Err(format!("drift not corrected: thread {fixed}"));
            }
        }
        Ok(())
    })();

    drop(vm_proc);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut removed = writer.remove(&base);
    while removed.is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        removed = writer.remove(&base);
    }
    result.unwrap();
    removed.expect("remove the test cgroups");
    println!("real KVM + real v1 cpuset in libvirt's layout: recognised, pinned through vcpuN, drift corrected");
}
