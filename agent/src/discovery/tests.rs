//! Discovery against fake procfs trees.

use super::fake_procfs::{write_process, write_thread, FakeProcess, FakeThread};
use super::*;
use crate::cgroup::Hierarchy;

const SEV_ES_QEMU: &[&str] = &[
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=sev-vm,debug-threads=on",
    "-object",
    "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x5",
    "-machine",
    "q35,confidential-guest-support=sev0",
    "-chardev",
    "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-3-sev-vm/monitor.sock",
];

#[test]
fn finds_qemu_vm_and_skips_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = FakeProcess::qemu_vm(100, 3, SEV_ES_QEMU);
    vm.cgroup =
        "0::/machine.slice/machine-qemu\\x2d3\\x2dsev\\x2dvm.scope/libvirt/emulator\n".into();
    for t in vm.threads.iter_mut() {
        if let Some(i) = qemu_vcpu_index(&t.comm) {
            t.cgroup = format!(
                "0::/machine.slice/machine-qemu\\x2d3\\x2dsev\\x2dvm.scope/libvirt/vcpu{i}\n"
            );
            t.cpus_allowed = format!("{i}");
            t.last_cpu = i;
        }
    }
    write_process(dir.path(), &vm).unwrap();
    write_process(dir.path(), &FakeProcess::plain(1, "init")).unwrap();
    write_process(dir.path(), &FakeProcess::plain(50, "sshd")).unwrap();
    // Non-pid entries are ignored.
    std::fs::create_dir_all(dir.path().join("sys")).unwrap();
    std::fs::write(dir.path().join("uptime"), "1 1\n").unwrap();

    let vms = VmScanner::new(dir.path()).scan().unwrap();
    assert_eq!(vms.len(), 1);
    let v = &vms[0];
    assert_eq!(v.pid, 100);
    assert_eq!(v.start_time, 1100);
    assert_eq!(v.comm, "qemu-system-x86");
    assert_eq!(v.cmdline.len(), SEV_ES_QEMU.len());
    assert_eq!(v.class, Some(ConfidentialClass::SevEs));
    assert_eq!(v.guest_name.as_deref(), Some("sev-vm"));
    assert_eq!(v.libvirt_domain.as_deref(), Some("sev-vm"));
    assert_eq!(v.vcpu_fds, vec![0, 1, 2]);
    let idx: Vec<(u32, u32)> = v.vcpus.iter().map(|c| (c.index, c.tid)).collect();
    assert_eq!(idx, vec![(0, 102), (1, 103), (2, 104)]);
    for c in &v.vcpus {
        assert_eq!(c.matched_by, VcpuMatch::ThreadName);
        assert_eq!(c.cpus_allowed, CpuSet::range(c.index, c.index));
        assert_eq!(c.last_cpu, Some(c.index));
        assert_eq!(
            c.cgroup
                .unified
                .as_deref()
                .and_then(cgroup_path::libvirt_vcpu_index),
            Some(c.index)
        );
    }
    // Main thread and call_rcu are "other"; the NX worker is excluded.
    let others: Vec<&str> = v.other_threads.iter().map(|t| t.comm.as_str()).collect();
    assert_eq!(others, vec!["qemu-system-x86", "call_rcu"]);
    let lv = v.cgroup.libvirt.as_ref().unwrap();
    assert_eq!(lv.layout, LibvirtLayout::ScopeWithLibvirtDir);
    assert_eq!(lv.domain_id, Some(3));
    assert!(v.unmatched_vcpus().is_empty());
}

#[test]
fn non_qemu_vmm_by_kvm_run_syscall_and_by_thread_order() {
    let dir = tempfile::tempdir().unwrap();
    // A VMM with unnamed vCPU threads and an extra I/O thread; vCPU 1 is
    // blocked in KVM_RUN on fd 21, vCPU 0 is running.
    let mut p = FakeProcess::qemu_vm(200, 2, &["/usr/bin/some-vmm", "--cpus", "2"]);
    p.threads = vec![
        FakeThread::new(200, "some-vmm"),
        FakeThread::new(201, "vcpu-a"),
        FakeThread::new(202, "vcpu-b"),
        FakeThread::new(203, "io"),
    ];
    p.threads[2].syscall = "16 0x15 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f00\n".into();
    write_process(dir.path(), &p).unwrap();
    let v = VmScanner::new(dir.path()).inspect(200).unwrap();
    assert_eq!(v.class, None, "unknown VMM");
    assert_eq!(v.vcpus.len(), 1);
    assert_eq!(
        (v.vcpus[0].index, v.vcpus[0].tid, v.vcpus[0].matched_by),
        (1, 202, VcpuMatch::KvmRunSyscall)
    );
    assert_eq!(v.unmatched_vcpus(), vec![0]);
    assert_eq!(v.other_threads.len(), 3);

    // An io_uring worker is neither a vCPU candidate nor affinity-settable.
    let dir = tempfile::tempdir().unwrap();
    let mut q = p.clone();
    q.threads.truncate(3);
    q.threads[2].syscall = "running\n".into();
    let mut iou = FakeThread::new(204, "iou-wrk-200");
    iou.flags = 0x0040_0050;
    q.threads.push(iou);
    write_process(dir.path(), &q).unwrap();
    let v = VmScanner::new(dir.path()).inspect(200).unwrap();
    assert_eq!(v.vcpus.len(), 2, "{v:?}");
    let w = v.other_threads.iter().find(|t| t.tid == 204).unwrap();
    assert!(!w.affinity_settable);
    assert!(
        v.other_threads
            .iter()
            .find(|t| t.tid == 200)
            .unwrap()
            .affinity_settable
    );

    // Same VMM without the I/O thread and no syscall hint: tid order.
    let dir = tempfile::tempdir().unwrap();
    p.threads.truncate(3);
    p.threads[2].syscall = "running\n".into();
    write_process(dir.path(), &p).unwrap();
    let v = VmScanner::new(dir.path()).inspect(200).unwrap();
    let got: Vec<(u32, u32, VcpuMatch)> = v
        .vcpus
        .iter()
        .map(|c| (c.index, c.tid, c.matched_by))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 201, VcpuMatch::ThreadOrder),
            (1, 202, VcpuMatch::ThreadOrder)
        ]
    );
    assert_eq!(v.other_threads.len(), 1);
}

#[test]
fn garbage_and_vanished_entries_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = FakeProcess::qemu_vm(300, 2, &["qemu-system-x86_64"]);
    write_process(dir.path(), &good).unwrap();

    // A VM whose main stat is garbage: skipped with a warning.
    let bad = FakeProcess::qemu_vm(400, 1, &["qemu-system-x86_64"]);
    write_process(dir.path(), &bad).unwrap();
    std::fs::write(dir.path().join("400/task/400/stat"), "garbage").unwrap();

    // A VM whose process directory lost its task dir (exited mid-scan).
    let gone = FakeProcess::qemu_vm(500, 1, &["qemu-system-x86_64"]);
    write_process(dir.path(), &gone).unwrap();
    std::fs::remove_dir_all(dir.path().join("500/task")).unwrap();

    // A VM with one garbage vCPU thread: the thread is skipped, the VM kept.
    let mut partial = FakeProcess::qemu_vm(600, 2, &["qemu-system-x86_64"]);
    partial.threads[3].cpus_allowed = "zz".into();
    write_process(dir.path(), &partial).unwrap();

    // A pid directory with no fd dir at all.
    std::fs::create_dir_all(dir.path().join("700")).unwrap();

    let scanner = VmScanner::new(dir.path());
    let outcome = scanner.scan_with_outcome().unwrap();
    assert_eq!(outcome.processes, 5);
    assert_eq!(
        outcome.exited, 2,
        "500 lost its task dir, 700 has no fd dir"
    );
    assert_eq!(outcome.skipped.len(), 1);
    assert_eq!(outcome.skipped[0].pid, 400);
    assert!(outcome.skipped[0].error.contains("400/task/400/stat"));
    let vms = outcome.vms;
    let pids: Vec<u32> = vms.iter().map(|v| v.pid).collect();
    assert_eq!(pids, vec![300, 600]);
    assert_eq!(vms[1].vcpus.len(), 1);
    assert_eq!(vms[1].unmatched_vcpus(), vec![1]);

    assert!(matches!(
        scanner.inspect(400),
        Err(DiscoveryError::Malformed { .. })
    ));
    assert!(scanner.inspect(500).unwrap_err().is_gone());
    assert!(scanner.inspect(700).unwrap_err().is_gone());
    assert!(matches!(
        scanner.inspect(1),
        Err(DiscoveryError::VmGone { .. })
    ));
}

#[test]
fn pid_reuse_detected_by_start_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = FakeProcess::qemu_vm(42, 1, &["qemu-system-x86_64"]);
    write_process(dir.path(), &p).unwrap();
    let s = VmScanner::new(dir.path());
    let v = s.inspect(42).unwrap();
    assert!(s.is_same_process(42, v.start_time).unwrap());
    // The pid now names another process.
    write_thread(
        dir.path(),
        42,
        v.start_time + 7,
        &FakeThread::new(42, "other"),
    )
    .unwrap();
    assert!(!s.is_same_process(42, v.start_time).unwrap());
    assert!(!s.is_same_process(43, 1).unwrap());
}

#[test]
fn missing_root_is_an_error() {
    let s = VmScanner::new("/nonexistent/sevplace/proc");
    assert!(matches!(s.scan(), Err(DiscoveryError::ProcRoot { .. })));
}

#[test]
fn libvirt_v1_partition_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = FakeProcess::qemu_vm(800, 1, &["qemu-system-x86_64", "-name", "guest=web1"]);
    vm.cgroup = "4:cpuset:/machine/qemu-2-web1.libvirt-qemu/emulator\n0::/\n".into();
    write_process(dir.path(), &vm).unwrap();
    let v = VmScanner::new(dir.path()).inspect(800).unwrap();
    assert_eq!(v.libvirt_domain.as_deref(), Some("web1"));
    let lv = v.cgroup.libvirt.clone().unwrap();
    assert_eq!(lv.hierarchy, Hierarchy::V1Cpuset);
    assert_eq!(lv.vcpu_path(0), "/machine/qemu-2-web1.libvirt-qemu/vcpu0");
}

#[test]
fn qemu_names() {
    assert_eq!(qemu_vcpu_index("CPU 0/KVM"), Some(0));
    assert_eq!(qemu_vcpu_index("CPU 127/KVM"), Some(127));
    assert_eq!(qemu_vcpu_index("CPU x/KVM"), None);
    assert_eq!(qemu_vcpu_index("CPU 1/TCG"), None);
    assert_eq!(qemu_vcpu_index("qemu-system-x86"), None);
}

mod properties {
    use super::super::cgroup_path::{parse_libvirt_path, parse_proc_cgroup, systemd_unescape};
    use super::super::procfs::{parse_stat, parse_status_cpus_allowed, parse_syscall_kvm_run_fd};
    use super::super::{classify_cmdline, fake_procfs::stat_line};
    use crate::cgroup::Hierarchy;

    use proptest::prelude::*;

    proptest! {
        /// Any comm (spaces, parentheses, slashes) round-trips through stat.
        #[test]
        fn stat_comm_round_trips(comm in "[ -~]{0,15}", start in 0u64..u64::MAX / 2, cpu in 0u32..4096) {
            let line = stat_line(42, &comm, 0x400040, start, cpu);
            let st = parse_stat(&line).unwrap();
            prop_assert_eq!(st.comm, comm);
            prop_assert_eq!(st.start_time, start);
            prop_assert_eq!(st.last_cpu, Some(cpu));
        }

        /// The parsers never panic on arbitrary text.
        #[test]
        fn parsers_do_not_panic(text in "\\PC{0,200}") {
            let _ = parse_stat(&text);
            let _ = parse_status_cpus_allowed(&text);
            let _ = parse_syscall_kvm_run_fd(&text);
            let _ = parse_proc_cgroup(&text);
            let _ = parse_libvirt_path(&text, Hierarchy::Unified);
            let _ = systemd_unescape(&text);
        }

        /// classify_cmdline never panics and always finds a sev-guest object.
        #[test]
        fn classify_never_panics(args in proptest::collection::vec("\\PC{0,40}", 0..8), policy in 0u64..0x100) {
            let _ = classify_cmdline(&args);
            let mut with_sev = args.clone();
            with_sev.insert(0, "qemu-system-x86_64".into());
            with_sev.push("-object".into());
            with_sev.push(format!("sev-guest,id=zz,policy={policy:#x}"));
            let c = classify_cmdline(&with_sev);
            // Random args may carry a -machine naming another object or an
            // earlier SEV object; without either, this object decides.
            if !args
                .iter()
                .any(|a| a.contains("machine") || a.contains("-M") || a.contains("sev"))
            {
                let want = if policy & 0x4 != 0 {
                    crate::ConfidentialClass::SevEs
                } else {
                    crate::ConfidentialClass::Sev
                };
                prop_assert_eq!(c.class, Some(want));
            }
        }
    }
}

/// A writer that appends log output to a shared buffer.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn skipped_entries_are_logged_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = FakeProcess::qemu_vm(400, 1, &["qemu-system-x86_64"]);
    write_process(dir.path(), &bad).unwrap();
    std::fs::write(dir.path().join("400/task/400/stat"), "garbage").unwrap();
    let mut partial = FakeProcess::qemu_vm(600, 2, &["qemu-system-x86_64"]);
    partial.threads[3].cpus_allowed = "zz".into();
    write_process(dir.path(), &partial).unwrap();

    let buf = LogBuffer::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let vms = tracing::subscriber::with_default(subscriber, || {
        VmScanner::new(dir.path()).scan().unwrap()
    });
    assert_eq!(vms.len(), 1);
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let stat = dir.path().join("400/task/400/stat");
    let status = dir.path().join("600/task/603/status");
    assert!(log.contains(&stat.display().to_string()), "{log}");
    assert!(log.contains(&status.display().to_string()), "{log}");
    assert!(log.contains("WARN"), "{log}");
}

/// A command line or thread name is set by the process and need not be
/// UTF-8 (a Latin-1 disk image path, a renamed thread): the VM is still
/// found and classified, with the bytes that are not UTF-8 read as U+FFFD.
#[test]
fn command_line_and_thread_names_that_are_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let vm = FakeProcess::qemu_vm(100, 2, SEV_ES_QEMU);
    let pid_dir = write_process(dir.path(), &vm).unwrap();
    let mut cmdline = std::fs::read(pid_dir.join("cmdline")).unwrap();
    cmdline.extend_from_slice(b"-drive\0file=/var/lib/images/caf\xe9.qcow2\0");
    std::fs::write(pid_dir.join("cmdline"), cmdline).unwrap();
    let worker = pid_dir.join("task/101/stat");
    let stat = std::fs::read(&worker).unwrap();
    let stat = String::from_utf8(stat)
        .unwrap()
        .replacen("(call_rcu)", "(w\u{1}\u{2})", 1);
    let mut bytes = stat.into_bytes();
    let at = bytes.iter().position(|&b| b == 1).unwrap();
    bytes[at] = 0xff;
    std::fs::write(&worker, bytes).unwrap();

    let vms = VmScanner::new(dir.path()).scan().unwrap();
    assert_eq!(vms.len(), 1);
    let v = &vms[0];
    assert_eq!(v.class, Some(ConfidentialClass::SevEs));
    assert_eq!(
        v.cmdline.last().map(String::as_str),
        Some("file=/var/lib/images/caf\u{fffd}.qcow2")
    );
    assert_eq!(v.vcpus.len(), 2);
    let others: Vec<&str> = v.other_threads.iter().map(|t| t.comm.as_str()).collect();
    assert!(others.contains(&"w\u{fffd}\u{2}"), "{others:?}");
}

#[test]
fn incremental_scans_match_full_scans_and_catch_pid_reuse() {
    let dir = tempfile::tempdir().unwrap();
    write_process(dir.path(), &FakeProcess::qemu_vm(100, 2, SEV_ES_QEMU)).unwrap();
    write_process(dir.path(), &FakeProcess::plain(50, "sshd")).unwrap();
    let scanner = VmScanner::new(dir.path()).with_full_rescan_every(100);
    let full = |d: &std::path::Path| VmScanner::new(d).scan().unwrap();
    assert_eq!(scanner.scan().unwrap(), full(dir.path()));
    // A known VM: its threads are re-listed (a new affinity shows) without
    // re-reading its fds.
    let mut vm = FakeProcess::qemu_vm(100, 2, SEV_ES_QEMU);
    vm.threads[2].cpus_allowed = "3".into();
    std::fs::remove_dir_all(dir.path().join("100")).unwrap();
    write_process(dir.path(), &vm).unwrap();
    let again = scanner.scan().unwrap();
    assert_eq!(again, full(dir.path()));
    assert_eq!(again[0].vcpus[0].cpus_allowed, CpuSet::range(3, 3));
    // pid 100 reused by another VM (other start time, other command line):
    // read from scratch.
    std::fs::remove_dir_all(dir.path().join("100")).unwrap();
    let mut reused = FakeProcess::qemu_vm(100, 3, &["/usr/bin/qemu-system-x86_64"]);
    reused.start_time = 9999;
    write_process(dir.path(), &reused).unwrap();
    let after = scanner.scan().unwrap();
    assert_eq!(after, full(dir.path()));
    assert_eq!(after[0].start_time, 9999);
    assert_eq!(after[0].class, Some(ConfidentialClass::None));
    assert_eq!(after[0].vcpu_fds, vec![0, 1, 2]);
    // A process that becomes a VM after its rechecks is found by the next
    // full rescan.
    let every = VmScanner::new(dir.path()).with_full_rescan_every(6);
    write_process(dir.path(), &FakeProcess::plain(200, "qemu-system-x86")).unwrap();
    for _ in 0..4 {
        assert_eq!(every.scan().unwrap().len(), 1);
    }
    std::fs::remove_dir_all(dir.path().join("200")).unwrap();
    let mut late = FakeProcess::qemu_vm(200, 1, &["/usr/bin/qemu-system-x86_64"]);
    late.start_time = FakeProcess::plain(200, "x").start_time;
    write_process(dir.path(), &late).unwrap();
    assert_eq!(
        every.scan().unwrap().len(),
        1,
        "not re-read before the full rescan"
    );
    assert_eq!(
        every.scan().unwrap().len(),
        1,
        "not re-read before the full rescan"
    );
    assert_eq!(every.scan().unwrap().len(), 2, "found by the full rescan");
    // A VM that exits leaves the cache.
    std::fs::remove_dir_all(dir.path().join("200")).unwrap();
    assert_eq!(every.scan().unwrap().len(), 1);
}

/// Between full rescans a known thread has only its affinity read once its
/// stat was read on [`THREAD_STAT_READS`] sightings: a rename shows while
/// the thread is new (QEMU names a vCPU thread after creating it), later
/// only at the full rescan; an affinity change shows on every pass; a
/// thread that appears is read in full; a vCPU found blocked in `KVM_RUN`
/// keeps its index when it runs.
#[test]
fn known_threads_have_only_their_affinity_read() {
    let dir = tempfile::tempdir().unwrap();
    let every = THREAD_STAT_READS + 3;
    let scanner = VmScanner::new(dir.path()).with_full_rescan_every(every);
    let mut p = FakeProcess::qemu_vm(300, 2, &["/usr/bin/some-vmm"]);
    p.threads = vec![
        FakeThread::new(300, "some-vmm"),
        FakeThread::new(301, "some-vmm"),
        FakeThread::new(302, "vcpu-b"),
        FakeThread::new(303, "io"),
    ];
    p.threads[2].syscall = "16 0x15 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f00\n".into();
    write_process(dir.path(), &p).unwrap();
    let first = scanner.scan().unwrap();
    assert_eq!(
        first[0]
            .vcpus
            .iter()
            .map(|v| (v.index, v.tid))
            .collect::<Vec<_>>(),
        vec![(1, 302)]
    );
    // Renamed while new: seen on the next pass.
    p.threads[1].comm = "vcpu-a".into();
    write_thread(dir.path(), 300, p.start_time, &p.threads[1]).unwrap();
    // vCPU 1 runs now: its syscall file says so, its index stays.
    p.threads[2].syscall = "running\n".into();
    write_thread(dir.path(), 300, p.start_time, &p.threads[2]).unwrap();
    let second = scanner.scan().unwrap();
    let comm = |vms: &[DiscoveredVm], tid: u32| {
        vms[0]
            .other_threads
            .iter()
            .map(|t| (t.tid, t.comm.clone()))
            .chain(vms[0].vcpus.iter().map(|v| (v.tid, v.comm.clone())))
            .find(|(t, _)| *t == tid)
            .map(|(_, c)| c)
    };
    assert_eq!(comm(&second, 301).as_deref(), Some("vcpu-a"));
    assert_eq!(
        second[0]
            .vcpus
            .iter()
            .map(|v| (v.index, v.tid, v.matched_by))
            .collect::<Vec<_>>(),
        vec![(1, 302, VcpuMatch::KvmRunSyscall)]
    );
    for _ in 2..THREAD_STAT_READS {
        scanner.scan().unwrap();
    }
    // Read on THREAD_STAT_READS sightings: a rename now waits for the full
    // rescan, an affinity change does not; a new thread is read in full.
    p.threads[1].comm = "renamed".into();
    p.threads[1].cpus_allowed = "2".into();
    write_thread(dir.path(), 300, p.start_time, &p.threads[1]).unwrap();
    let mut added = FakeThread::new(304, "late-io");
    added.cpus_allowed = "1".into();
    write_thread(dir.path(), 300, p.start_time, &added).unwrap();
    let mut passes = THREAD_STAT_READS;
    let cached = scanner.scan().unwrap();
    passes += 1;
    assert_eq!(comm(&cached, 301).as_deref(), Some("vcpu-a"));
    let allowed = |vms: &[DiscoveredVm], tid: u32| {
        vms[0]
            .other_threads
            .iter()
            .find(|t| t.tid == tid)
            .map(|t| t.cpus_allowed.clone())
    };
    assert_eq!(allowed(&cached, 301), Some(CpuSet::range(2, 2)));
    assert_eq!(comm(&cached, 304).as_deref(), Some("late-io"));
    assert_eq!(allowed(&cached, 304), Some(CpuSet::range(1, 1)));
    while passes % every != 0 {
        scanner.scan().unwrap();
        passes += 1;
    }
    let rescanned = scanner.scan().unwrap();
    assert_eq!(comm(&rescanned, 301).as_deref(), Some("renamed"));
    assert_eq!(rescanned, VmScanner::new(dir.path()).scan().unwrap());
}

/// A thread in the process's cgroup shares the process's value (one
/// allocation per VM, not one per thread); a libvirt vCPU thread in its
/// own `vcpuN` has its own. Between full rescans the known threads follow
/// exits and arrivals in any tid position, as a full scan sees them.
#[test]
fn thread_cgroups_are_shared_and_known_threads_follow_exits_and_arrivals() {
    let dir = tempfile::tempdir().unwrap();
    let machine = "/machine/qemu-2-web1.libvirt-qemu";
    let mut vm = FakeProcess::qemu_vm(800, 3, &["qemu-system-x86_64", "-name", "guest=web1"]);
    vm.cgroup = format!("4:cpuset:{machine}/emulator\n0::/\n");
    for t in &mut vm.threads {
        t.cgroup = match qemu_vcpu_index(&t.comm) {
            Some(i) => format!("4:cpuset:{machine}/vcpu{i}\n0::/\n"),
            None => vm.cgroup.clone(),
        };
    }
    write_process(dir.path(), &vm).unwrap();
    let scanner = VmScanner::new(dir.path()).with_full_rescan_every(100);
    let full = || VmScanner::new(dir.path()).scan().unwrap();
    let first = scanner.scan().unwrap();
    assert_eq!(first, full());
    let v = &first[0];
    for t in &v.vcpus {
        assert!(!Arc::ptr_eq(&t.cgroup, &v.cgroup), "vCPU {}", t.index);
        assert_eq!(
            t.cgroup.v1_cpuset.as_deref(),
            Some(format!("{machine}/vcpu{}", t.index).as_str())
        );
    }
    // The identity (and the threads it shares its cgroup with) outlives the
    // pass: the next scan hands out the same allocation.
    let second = scanner.scan().unwrap();
    assert!(Arc::ptr_eq(&first[0].cgroup, &second[0].cgroup));
    // A VM whose threads all sit in its own cgroup holds one value.
    write_process(dir.path(), &FakeProcess::qemu_vm(700, 2, SEV_ES_QEMU)).unwrap();
    let flat = VmScanner::new(dir.path()).inspect(700).unwrap();
    assert!(flat
        .vcpus
        .iter()
        .all(|t| Arc::ptr_eq(&t.cgroup, &flat.cgroup)));
    std::fs::remove_dir_all(dir.path().join("700")).unwrap();
    // vCPUs 0 and 1 (tids 802 and 803) exit; a new thread takes tid 803
    // (reused after wrap-around) and another comes after the known tids.
    std::fs::remove_dir_all(dir.path().join("800/task/803")).unwrap();
    let mut between = FakeThread::new(803, "worker");
    between.cgroup = vm.cgroup.clone();
    write_thread(dir.path(), 800, vm.start_time, &between).unwrap();
    std::fs::remove_dir_all(dir.path().join("800/task/802")).unwrap();
    let mut last = FakeThread::new(900, "late-io");
    last.cgroup = vm.cgroup.clone();
    write_thread(dir.path(), 800, vm.start_time, &last).unwrap();
    let third = scanner.scan().unwrap();
    assert_eq!(third, full());
    assert_eq!(
        third[0].vcpus.iter().map(|v| v.tid).collect::<Vec<_>>(),
        vec![804],
        "vCPU 2 alone has its named thread"
    );
    let others: Vec<u32> = third[0].other_threads.iter().map(|t| t.tid).collect();
    assert_eq!(others, vec![800, 801, 803, 900]);
}
