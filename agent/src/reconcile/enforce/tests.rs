//! The enforcement path against fake procfs and cgroupfs trees, with a
//! recording affinity in place of `sched_setaffinity`.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::*;
use crate::types::ConfidentialClass;

/// A record of these pins (the engine's fields as a plain VM's).
fn pins(vcpu_cpus: Vec<CpuSet>, emulator_cpus: Option<CpuSet>) -> PlacementRecord {
    PlacementRecord {
        class: ConfidentialClass::None,
        cpus: vcpu_cpus.iter().fold(CpuSet::new(), |acc, s| acc.union(s)),
        vcpu_cpus,
        emulator_cpus,
        l3_groups: Vec::new(),
        numa_nodes: Vec::new(),
        shares_confidential_domain: false,
    }
}
use crate::cgroup::{CgroupHost, Target};
use crate::discovery::fake_procfs::{write_process, FakeProcess, FakeThread};
use crate::discovery::{qemu_vcpu_index, VmScanner};

/// Records every affinity call; fails with `VmGone` for the tids in `gone`.
#[derive(Default)]
struct RecordingAffinity {
    calls: Mutex<Vec<(u32, String)>>,
    gone: BTreeSet<u32>,
}

impl ThreadAffinity for RecordingAffinity {
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
        if self.gone.contains(&tid) {
            return Err(CgroupError::VmGone {
                target: Target::Syscall {
                    call: "sched_setaffinity",
                    tid,
                },
            });
        }
        self.calls.lock().unwrap().push((tid, cpus.to_string()));
        Ok(())
    }
}

/// Runs the daemon's enforcement of `record` on `vm`: every fix applied in
/// order, stopping at the first error.
fn enforce(
    vm: &DiscoveredVm,
    record: &PlacementRecord,
    writer: Option<&CpusetWriter>,
    affinity: &dyn ThreadAffinity,
) -> Result<Vec<(ThreadFix, Applied)>, CgroupError> {
    let fixes = desired_sets(vm, record, &BTreeSet::new(), writer.map(|w| w.hierarchy()));
    fixes
        .into_iter()
        .map(|f| apply(&f, writer, affinity).map(|a| (f, a)))
        .collect()
}

#[test]
fn libvirt_v2_vm_gets_its_vcpu_and_emulator_cgroups_written_plus_affinity() {
    let proc = tempfile::tempdir().unwrap();
    let cg = tempfile::tempdir().unwrap();
    let scope = "machine.slice/machine-qemu\\x2d5\\x2dsev.scope";
    let mut vm = FakeProcess::qemu_vm(100, 2, &["qemu-system-x86_64", "-name", "guest=sev"]);
    vm.cgroup = format!("0::/{scope}/libvirt/emulator\n");
    for t in vm.threads.iter_mut() {
        t.cgroup = match qemu_vcpu_index(&t.comm) {
            Some(i) => format!("0::/{scope}/libvirt/vcpu{i}\n"),
            None => format!("0::/{scope}/libvirt/emulator\n"),
        };
    }
    // An io_uring worker: listed, never given an affinity.
    let mut iou = FakeThread::new(150, "iou-wrk-100");
    iou.flags = 0x0040_0050;
    vm.threads.push(iou);
    write_process(proc.path(), &vm).unwrap();
    std::fs::write(cg.path().join("cgroup.controllers"), "cpuset\n").unwrap();
    for d in ["", "machine.slice", scope, &format!("{scope}/libvirt")] {
        let dir = cg.path().join(d);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "cpuset\n").unwrap();
    }
    for child in ["vcpu0", "vcpu1", "emulator"] {
        let dir = cg.path().join(scope).join("libvirt").join(child);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.type"), "threaded\n").unwrap();
        std::fs::write(dir.join("cpuset.cpus"), "\n").unwrap();
    }

    let affinity = RecordingAffinity::default();
    let writer = CpusetWriter::new(CgroupHost::detect(cg.path()).unwrap());
    let found = VmScanner::new(proc.path()).inspect(100).unwrap();
    let record = pins(
        vec![
            CpuSet::range(2, 2),
            CpuSet::range(3, 3),
            CpuSet::range(4, 4),
        ],
        Some(CpuSet::range(0, 1)),
    );
    let done = enforce(&found, &record, Some(&writer), &affinity).unwrap();
    let vcpus: Vec<(u32, bool)> = done
        .iter()
        .filter_map(|(f, _)| Some((f.vcpu?, f.cgroup.is_some())))
        .collect();
    // Both vCPUs through their libvirt cgroups; vCPU 2 has no thread.
    assert_eq!(vcpus, vec![(0, true), (1, true)]);
    assert!(!done.iter().any(|(f, _)| f.vcpu == Some(2)));
    let others = done.iter().filter(|(f, _)| f.vcpu.is_none()).count();
    assert_eq!(others, 2);
    let base = format!("/{scope}/libvirt");
    assert_eq!(
        writer.read_cpus(&format!("{base}/vcpu0")).unwrap(),
        CpuSet::range(2, 2)
    );
    assert_eq!(
        writer.read_cpus(&format!("{base}/vcpu1")).unwrap(),
        CpuSet::range(3, 3)
    );
    assert_eq!(
        writer.read_cpus(&format!("{base}/emulator")).unwrap(),
        CpuSet::range(0, 1)
    );
    assert_eq!(
        *affinity.calls.lock().unwrap(),
        vec![
            (102, "2".to_string()),
            (103, "3".to_string()),
            (100, "0-1".to_string()),
            (101, "0-1".to_string()),
        ]
    );
    // The emulator cgroup is written once; the second emulator thread
    // finds it in place.
    let rewritten: Vec<bool> = done
        .iter()
        .map(|(_, a)| {
            matches!(
                a,
                Applied::Pinned {
                    cgroup_rewritten: true
                }
            )
        })
        .collect();
    assert_eq!(rewritten, vec![true, true, true, false]);
}

#[test]
fn vcpu_thread_still_in_emulator_cgroup_is_pinned_by_affinity_only() {
    let proc = tempfile::tempdir().unwrap();
    let scope = "machine.slice/machine-qemu\\x2d5\\x2dsev.scope";
    let mut vm = FakeProcess::qemu_vm(100, 1, &["qemu-system-x86_64"]);
    for t in vm.threads.iter_mut() {
        t.cgroup = format!("0::/{scope}/libvirt/emulator\n");
    }
    write_process(proc.path(), &vm).unwrap();
    let found = VmScanner::new(proc.path()).inspect(100).unwrap();
    let v = &found.vcpus[0];
    assert!(v.cgroup.libvirt.is_some());
    assert_eq!(
        libvirt_vcpu_cgroup(&v.cgroup, v.index, Some(Hierarchy::Unified)),
        None
    );
}

#[test]
fn vm_without_own_cgroup_is_pinned_by_affinity() {
    let proc = tempfile::tempdir().unwrap();
    let vm = FakeProcess::qemu_vm(300, 1, &["qemu-system-x86_64"]);
    write_process(proc.path(), &vm).unwrap();
    let found = VmScanner::new(proc.path()).inspect(300).unwrap();
    let record = pins(vec![CpuSet::range(1, 1)], None);
    let gone = RecordingAffinity {
        gone: found.vcpus.iter().map(|v| v.tid).collect(),
        ..RecordingAffinity::default()
    };
    let err = enforce(&found, &record, None, &gone).unwrap_err();
    assert!(err.is_gone());
    let ok = RecordingAffinity::default();
    let done = enforce(&found, &record, None, &ok).unwrap();
    let methods: Vec<(Option<u32>, Option<String>)> = done
        .iter()
        .map(|(f, _)| (f.vcpu, f.cgroup.clone()))
        .collect();
    assert_eq!(methods, vec![(Some(0), None)]);
}

#[test]
fn exited_helper_thread_is_not_the_vm_exiting() {
    let proc = tempfile::tempdir().unwrap();
    let vm = FakeProcess::qemu_vm(400, 1, &["qemu-system-x86_64"]);
    write_process(proc.path(), &vm).unwrap();
    let found = VmScanner::new(proc.path()).inspect(400).unwrap();
    let helper = found
        .other_threads
        .iter()
        .find(|t| t.tid != found.pid)
        .expect("a helper thread")
        .tid;
    let record = pins(vec![CpuSet::range(1, 1)], Some(CpuSet::range(0, 0)));
    let affinity = RecordingAffinity {
        gone: [helper].into_iter().collect(),
        ..RecordingAffinity::default()
    };
    let done = enforce(&found, &record, None, &affinity).unwrap();
    assert!(done
        .iter()
        .any(|(f, a)| f.tid == helper && *a == Applied::HelperGone));
    // The main thread exiting is the VM exiting.
    let main_gone = RecordingAffinity {
        gone: [found.pid].into_iter().collect(),
        ..RecordingAffinity::default()
    };
    assert!(enforce(&found, &record, None, &main_gone)
        .unwrap_err()
        .is_gone());
}
