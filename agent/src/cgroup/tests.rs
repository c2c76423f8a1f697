//! cgroup writer logic against fake cgroupfs trees (the real v1 hierarchy is
//! exercised in `agent/tests/real_cgroup_v1.rs`).

use super::*;
use std::fs;

fn write(p: &Path, s: &str) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, s).unwrap();
}

/// A fake v2 root with libvirt's >= 7.1 layout for domain 1 "vm1" with 2 vCPUs.
fn fake_v2_libvirt(root: &Path) -> String {
    write(
        &root.join("cgroup.controllers"),
        "cpuset cpu io memory pids\n",
    );
    write(
        &root.join("cgroup.subtree_control"),
        "cpuset cpu memory pids\n",
    );
    let machine = root.join("machine.slice");
    write(
        &machine.join("cgroup.subtree_control"),
        "cpuset cpu memory pids\n",
    );
    write(&machine.join("cpuset.cpus"), "\n");
    let scope = machine.join("machine-qemu\\x2d1\\x2dvm1.scope");
    write(
        &scope.join("cgroup.subtree_control"),
        "cpuset cpu memory pids\n",
    );
    write(&scope.join("cgroup.type"), "domain\n");
    let lv = scope.join("libvirt");
    write(&lv.join("cgroup.type"), "domain threaded\n");
    write(&lv.join("cgroup.subtree_control"), "cpuset cpu\n");
    write(&lv.join("cgroup.procs"), "4242\n");
    for child in ["vcpu0", "vcpu1", "emulator"] {
        write(&lv.join(child).join("cgroup.type"), "threaded\n");
        write(&lv.join(child).join("cpuset.cpus"), "\n");
        write(&lv.join(child).join("cgroup.threads"), "");
    }
    "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt".to_string()
}

/// A fake v1 cpuset root with CPUs 0-7 and node 0.
fn fake_v1(root: &Path) {
    let cs = root.join("cpuset");
    write(&cs.join("cpuset.cpus"), "0-7\n");
    write(&cs.join("cpuset.mems"), "0\n");
    write(&cs.join("tasks"), "1\n");
}

#[test]
fn detect_hierarchies() {
    let v1 = tempfile::tempdir().unwrap();
    fake_v1(v1.path());
    // The unified mount of a hybrid host without controllers does not count.
    write(&v1.path().join("unified/cgroup.controllers"), "\n");
    let h = CgroupHost::detect(v1.path()).unwrap();
    assert_eq!(h.hierarchy, Hierarchy::V1Cpuset);
    assert_eq!(h.mount, v1.path().join("cpuset"));

    let v2 = tempfile::tempdir().unwrap();
    fake_v2_libvirt(v2.path());
    let h = CgroupHost::detect(v2.path()).unwrap();
    assert_eq!(
        (h.hierarchy, h.mount.as_path()),
        (Hierarchy::Unified, v2.path())
    );

    let hybrid = tempfile::tempdir().unwrap();
    write(
        &hybrid.path().join("unified/cgroup.controllers"),
        "cpuset memory\n",
    );
    let h = CgroupHost::detect(hybrid.path()).unwrap();
    assert_eq!(h.mount, hybrid.path().join("unified"));

    let none = tempfile::tempdir().unwrap();
    assert!(matches!(
        CgroupHost::detect(none.path()),
        Err(CgroupError::NoCpuset { .. })
    ));
}

#[test]
fn v2_libvirt_vcpu_cgroup() {
    let root = tempfile::tempdir().unwrap();
    let parent = fake_v2_libvirt(root.path());
    let w = CpusetWriter::detect(root.path()).unwrap();
    let vcpu1 = format!("{parent}/vcpu1");
    let log = w
        .ensure_cpuset(
            &vcpu1,
            &CpuSet::parse("2-3").unwrap(),
            None,
            CgroupKind::Threaded,
        )
        .unwrap();
    // Everything is already delegated and threaded: only the CPUs change.
    let files: Vec<String> = log
        .iter()
        .map(|c| {
            c.file
                .strip_prefix(root.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        files,
        vec![format!(
            "{}/vcpu1/cpuset.cpus",
            parent.trim_start_matches('/')
        )]
    );
    assert_eq!(w.read_cpus(&vcpu1).unwrap(), CpuSet::range(2, 3));
    // Idempotent: the same request writes nothing.
    assert!(w
        .ensure_cpuset(&vcpu1, &CpuSet::range(2, 3), None, CgroupKind::Threaded)
        .unwrap()
        .is_empty());
    w.move_thread(&vcpu1, 4245).unwrap();
    assert_eq!(w.read_threads(&vcpu1).unwrap(), vec![4245]);
}

#[test]
fn v2_pre_7_1_layout_enables_cpuset_top_down() {
    let root = tempfile::tempdir().unwrap();
    write(&root.path().join("cgroup.controllers"), "cpuset cpu\n");
    write(&root.path().join("cgroup.subtree_control"), "cpu\n");
    let scope = root
        .path()
        .join("machine.slice/machine-qemu\\x2d2\\x2dold.scope");
    write(
        &root.path().join("machine.slice/cgroup.subtree_control"),
        "\n",
    );
    write(&scope.join("cgroup.subtree_control"), "\n");
    let w = CpusetWriter::detect(root.path()).unwrap();
    let log = w
        .ensure_cpuset(
            "/machine.slice/machine-qemu\\x2d2\\x2dold.scope/vcpu0",
            &CpuSet::range(1, 1),
            None,
            CgroupKind::Threaded,
        )
        .unwrap();
    let got: Vec<(String, String)> = log
        .iter()
        .map(|c| {
            (
                c.file
                    .strip_prefix(root.path())
                    .unwrap()
                    .display()
                    .to_string(),
                c.value.clone(),
            )
        })
        .collect();
    let scope_rel = "machine.slice/machine-qemu\\x2d2\\x2dold.scope";
    assert_eq!(
        got,
        vec![
            ("cgroup.subtree_control".into(), "+cpuset".into()),
            (
                "machine.slice/cgroup.subtree_control".into(),
                "+cpuset".into()
            ),
            (format!("{scope_rel}/vcpu0/cgroup.type"), "threaded".into()),
            (
                format!("{scope_rel}/cgroup.subtree_control"),
                "+cpuset".into()
            ),
            (format!("{scope_rel}/vcpu0/cpuset.cpus"), "1".into()),
        ]
    );
}

#[test]
fn v2_domain_with_threaded_children_order() {
    let root = tempfile::tempdir().unwrap();
    write(&root.path().join("cgroup.controllers"), "cpuset\n");
    write(&root.path().join("cgroup.subtree_control"), "\n");
    let w = CpusetWriter::detect(root.path()).unwrap();
    // A VM cgroup holding the process, with one threaded child per vCPU:
    // the layout tests arrange and libvirt's v2 layout resembles.
    let vm_cg = "/sevplace/vm-vm-a";
    let mut log = w
        .ensure_cpuset(
            vm_cg,
            &CpuSet::parse("0,2-3").unwrap(),
            None,
            CgroupKind::Domain,
        )
        .unwrap();
    w.move_process(vm_cg, 900).unwrap();
    for (index, tid, cpu) in [(0, 901, 2), (1, 902, 3)] {
        let cg = format!("{vm_cg}/vcpu{index}");
        log.extend(
            w.ensure_cpuset(&cg, &CpuSet::range(cpu, cpu), None, CgroupKind::Threaded)
                .unwrap(),
        );
        w.move_thread(&cg, tid).unwrap();
    }
    let order: Vec<String> = log
        .iter()
        .map(|c| {
            format!(
                "{}={}",
                c.file.strip_prefix(root.path()).unwrap().display(),
                c.value
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            "cgroup.subtree_control=+cpuset",
            "sevplace/cgroup.subtree_control=+cpuset",
            "sevplace/vm-vm-a/cpuset.cpus=0,2-3",
            "sevplace/vm-vm-a/vcpu0/cgroup.type=threaded",
            "sevplace/vm-vm-a/cgroup.subtree_control=+cpuset",
            "sevplace/vm-vm-a/vcpu0/cpuset.cpus=2",
            "sevplace/vm-vm-a/vcpu1/cgroup.type=threaded",
            "sevplace/vm-vm-a/vcpu1/cpuset.cpus=3",
        ]
    );
    let d = root.path().join("sevplace/vm-vm-a");
    assert_eq!(fs::read_to_string(d.join("cgroup.procs")).unwrap(), "900");
    assert_eq!(
        fs::read_to_string(d.join("vcpu1/cgroup.threads")).unwrap(),
        "902"
    );
    w.remove(vm_cg).unwrap_err(); // fake dirs hold files: rmdir fails
}

#[test]
fn set_cpus_within_parents_widens_v1_ancestors_and_never_creates() {
    let root = tempfile::tempdir().unwrap();
    fake_v1(root.path());
    let w = CpusetWriter::detect(root.path()).unwrap();
    for (d, cpus) in [("a", "0-1"), ("a/b", "1")] {
        write(
            &root.path().join("cpuset").join(d).join("cpuset.cpus"),
            cpus,
        );
        write(&root.path().join("cpuset").join(d).join("cpuset.mems"), "0");
    }
    let log = w
        .set_cpus_within_parents("/a/b", &CpuSet::range(6, 6))
        .unwrap();
    let order: Vec<String> = log.iter().map(|c| c.value.clone()).collect();
    assert_eq!(order, vec!["0-1,6", "6"]);
    assert!(matches!(
        w.set_cpus_within_parents("/a/none", &CpuSet::range(1, 1)),
        Err(CgroupError::Missing { .. })
    ));
    assert!(!root.path().join("cpuset/a/none").exists());
}

#[test]
fn v1_parents_before_children_mems_before_cpus() {
    let root = tempfile::tempdir().unwrap();
    fake_v1(root.path());
    let w = CpusetWriter::detect(root.path()).unwrap();
    // Kernel-created files of new v1 cgroups are empty; a fake mkdir does not
    // create them, so pre-create the directories the way the kernel would.
    for d in ["a", "a/b"] {
        write(
            &root.path().join("cpuset").join(d).join("cpuset.cpus"),
            "\n",
        );
        write(
            &root.path().join("cpuset").join(d).join("cpuset.mems"),
            "\n",
        );
    }
    let log = w
        .ensure_cpuset("/a/b", &CpuSet::range(4, 5), None, CgroupKind::Threaded)
        .unwrap();
    let order: Vec<String> = log
        .iter()
        .map(|c| {
            format!(
                "{}={}",
                c.file.strip_prefix(root.path()).unwrap().display(),
                c.value
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            "cpuset/a/cpuset.mems=0",
            "cpuset/a/cpuset.cpus=0-7",
            "cpuset/a/b/cpuset.mems=0",
            "cpuset/a/b/cpuset.cpus=4-5",
        ]
    );
    // An ancestor narrower than the request is widened before the child.
    fs::write(root.path().join("cpuset/a/cpuset.cpus"), "0-1\n").unwrap();
    let log = w
        .ensure_cpuset("/a/b", &CpuSet::range(6, 6), None, CgroupKind::Threaded)
        .unwrap();
    let order: Vec<String> = log.iter().map(|c| c.value.clone()).collect();
    assert_eq!(order, vec!["0-1,6", "6"]);
}

#[test]
fn paths_and_errno_mapping() {
    let root = tempfile::tempdir().unwrap();
    fake_v1(root.path());
    let w = CpusetWriter::detect(root.path()).unwrap();
    assert!(matches!(
        w.dir_of("/a/../../etc"),
        Err(CgroupError::BadPath { .. })
    ));
    assert!(matches!(w.remove("/"), Err(CgroupError::BadPath { .. })));
    assert!(w
        .ensure_cpuset("/x", &CpuSet::new(), None, CgroupKind::Domain)
        .is_err());
    assert!(matches!(
        w.read_cpus("/does-not-exist"),
        Err(CgroupError::Missing { .. })
    ));
    assert!(matches!(
        w.move_thread("/does-not-exist", 1),
        Err(CgroupError::VmGone { .. })
    ));

    use nix::errno::Errno;
    let map = |errno: Errno| {
        CgroupError::from_io(
            Target::File(PathBuf::from("/f")),
            "1",
            false,
            std::io::Error::from_raw_os_error(errno as i32),
        )
    };
    assert!(matches!(map(Errno::ESRCH), CgroupError::VmGone { .. }));
    assert!(matches!(map(Errno::EACCES), CgroupError::Permission { .. }));
    assert!(matches!(map(Errno::EPERM), CgroupError::Permission { .. }));
    assert!(matches!(map(Errno::EINVAL), CgroupError::InvalidSet { .. }));
    assert!(matches!(map(Errno::EBUSY), CgroupError::Busy { .. }));
    assert!(matches!(map(Errno::ENOSPC), CgroupError::NoSpace { .. }));
    assert!(matches!(map(Errno::EIO), CgroupError::Io { .. }));
    let msg = map(Errno::ENOSPC).to_string();
    assert!(msg.starts_with("/f:"), "{msg}");
}

#[test]
fn affinity_errors_are_typed() {
    assert!(matches!(
        set_thread_affinity(1, &CpuSet::new()),
        Err(CgroupError::InvalidSet { .. })
    ));
    // A tid that cannot exist (above pid_max).
    assert!(matches!(
        set_thread_affinity(0x3fff_ffff, &CpuSet::range(0, 0)),
        Err(CgroupError::VmGone { .. })
    ));
    assert!(matches!(
        set_thread_affinity(1, &CpuSet::range(5000, 5000)),
        Err(CgroupError::InvalidSet { .. })
    ));
}
