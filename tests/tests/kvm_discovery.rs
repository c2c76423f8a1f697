//! Real-host tests of discovery and pinning on real KVM VMs: the
//! `kvm-guest-fixture` VMM (real `/dev/kvm`, vCPU threads running guest code)
//! and, when installed, Debian's QEMU with `-accel kvm`. Skipped with a
//! printed reason when `/dev/kvm` is absent or unusable; the cgroup part is
//! skipped when not root or no cgroup v1 cpuset hierarchy is mounted.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sevplace::cgroup::{self, CpusetWriter, PinMethod, VcpuEnforcer};
use sevplace::discovery::{DiscoveredVm, Hierarchy, VcpuMatch, VmExitWatch, VmScanner};
use sevplace::{ConfidentialClass, CpuSet, VmId};
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
    cgroup::read_thread_cpus_allowed(Path::new(PROC), std::process::id(), std::process::id())
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
            let cpu = cgroup::read_thread_last_cpu(Path::new(PROC), pid, *tid)
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
    // The enforcer picks affinity: the fixture has no libvirt cgroup.
    let enforcer = VcpuEnforcer::new(CpusetWriter::detect("/sys/fs/cgroup").ok());
    let placement: Vec<(u32, CpuSet)> = pins.iter().map(|p| (p.0, p.2.clone())).collect();
    let report = enforcer
        .pin_vm(&vm, &placement, Some(&host_cpus()))
        .expect("pin the fixture VM");
    assert_eq!(
        report.vcpus,
        vec![
            (0, PinMethod::Affinity),
            (1, PinMethod::Affinity),
            (2, PinMethod::Affinity)
        ]
    );
    assert!(report.missing_vcpus.is_empty());
    assert!(report.other_threads >= 1);
    let mut checks = Vec::new();
    for (index, tid, set) in &pins {
        let allowed = cgroup::read_thread_cpus_allowed(Path::new(PROC), vm.pid, *tid).unwrap();
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
    let writer = writer.with_agent_base(&base);
    let vm_id = VmId::new("fixture").unwrap();

    let mut args = vec!["--vcpus", "2"];
    args.extend_from_slice(SEV_ES_FLAGS);
    let vm_proc = start_fixture(&args);
    let vm = VmScanner::new(PROC).inspect(vm_proc.pid).unwrap();
    assert_eq!(vm.vcpus.len(), 2);

    let cpus = host_cpus();
    // vCPUs on the highest CPUs first, in reverse, so the set differs from
    // the affinity test's.
    let list: Vec<u32> = cpus.to_vec().into_iter().rev().collect();
    let pins: Vec<(u32, u32, CpuSet)> = vm
        .vcpus
        .iter()
        .map(|v| {
            let cpu = list[v.index as usize % list.len()];
            (v.index, v.tid, [cpu].into_iter().collect())
        })
        .collect();

    let result = (|| -> Result<(), String> {
        writer
            .pin_vm_agent_layout(&vm_id, vm.pid, &cpus, &pins)
            .map_err(|e| e.to_string())?;
        for (index, tid, set) in &pins {
            let cg = writer.agent_vcpu_cgroup(&vm_id, *index);
            let cg_cpus = writer.read_cpus(&cg).map_err(|e| e.to_string())?;
            if &cg_cpus != set {
                return Err(format!("{cg}: cpuset.cpus {cg_cpus}, want {set}"));
            }
            let members = writer.read_threads(&cg).map_err(|e| e.to_string())?;
            if members != vec![*tid] {
                return Err(format!("{cg}: tasks {members:?}, want [{tid}]"));
            }
            let allowed = cgroup::read_thread_cpus_allowed(Path::new(PROC), vm.pid, *tid)
                .map_err(|e| e.to_string())?;
            if &allowed != set {
                return Err(format!(
                    "vCPU {index}: Cpus_allowed_list {allowed}, want {set}"
                ));
            }
        }
        // Discovery sees the agent cgroups on the vCPU threads.
        let seen = VmScanner::new(PROC)
            .inspect(vm.pid)
            .map_err(|e| e.to_string())?;
        for v in &seen.vcpus {
            let want = writer.agent_vcpu_cgroup(&vm_id, v.index);
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
    println!(
        "real KVM + real v1 cpuset: fixture pid {pid} vCPUs pinned in {base}/vm-fixture/vcpuN"
    );
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
    for v in &vm.vcpus {
        let err = cgroup::set_thread_affinity(v.tid, &one).unwrap_err();
        assert!(err.is_gone(), "affinity on an exited vCPU: {err:?}");
        let err = cgroup::read_thread_cpus_allowed(Path::new(PROC), vm.pid, v.tid).unwrap_err();
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
    for (_, tid, set) in &pins {
        cgroup::set_thread_affinity(*tid, set).unwrap();
        assert_eq!(
            &cgroup::read_thread_cpus_allowed(Path::new(PROC), pid, *tid).unwrap(),
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
        let e = |e: cgroup::CgroupError| e.to_string();
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

        // The enforcer writes libvirt's vcpuN cgroups.
        let enforcer = VcpuEnforcer::new(Some(writer.clone()));
        let placement: Vec<(u32, CpuSet)> = vm
            .vcpus
            .iter()
            .map(|v| {
                let cpu = list[(v.index as usize + 1) % list.len()];
                (v.index, [cpu].into_iter().collect())
            })
            .collect();
        let report = enforcer.pin_vm(&vm, &placement, Some(&cpus)).map_err(e)?;
        if report
            .vcpus
            .iter()
            .any(|(_, m)| *m != PinMethod::LibvirtCgroup)
        {
            return Err(format!("pinned by {:?}", report.vcpus));
        }
        for (index, set) in &placement {
            let cg = lv.vcpu_path(*index);
            if &writer.read_cpus(&cg).map_err(e)? != set {
                return Err(format!("{cg} not {set}"));
            }
            let v = vm.vcpus.iter().find(|v| v.index == *index).ok_or("vCPU")?;
            let allowed =
                cgroup::read_thread_cpus_allowed(Path::new(PROC), pid, v.tid).map_err(e)?;
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
                cgroup::read_thread_cpus_allowed(Path::new(PROC), pid, v0.tid).map_err(e)?;
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
            enforcer.pin_vcpu(d0, &want).map_err(e)?;
            let fixed =
                cgroup::read_thread_cpus_allowed(Path::new(PROC), pid, v0.tid).map_err(e)?;
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
