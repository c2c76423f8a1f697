//! Pinning a discovered VM's threads to a placement with the mechanism its
//! host arrangement calls for.
//!
//! - A vCPU thread that sits in its own libvirt `vcpuN` cgroup in the cpuset
//!   hierarchy: that cgroup's `cpuset.cpus` is written (ancestors first, see
//!   [`CpusetWriter::ensure_cpuset`]), then the thread's affinity is set to
//!   the same set. The affinity call corrects a thread narrowed by hand
//!   (`taskset`) inside an unchanged cpuset, which a cpuset write with the
//!   same value does not.
//! - Any other thread: `sched_setaffinity` alone.
//!
//! Emulator and I/O threads of a libvirt VM get libvirt's `emulator` cgroup
//! written the same way.

use std::sync::Arc;

use super::{set_thread_affinity, CgroupError, CgroupKind, CpusetWriter};
use crate::discovery::cgroup_path::{libvirt_vcpu_index, parse_libvirt_path};
use crate::discovery::{DiscoveredVm, Hierarchy, VcpuThread};
use crate::CpuSet;

/// How a thread was pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinMethod {
    /// libvirt's own `vcpuN`/`emulator` cgroup, plus affinity.
    LibvirtCgroup,
    /// `sched_setaffinity` only.
    Affinity,
}

/// What [`VcpuEnforcer::pin_vm`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinReport {
    /// `(vCPU index, method)` for every vCPU pinned.
    pub vcpus: Vec<(u32, PinMethod)>,
    /// vCPU indices in the placement with no thread found (not pinned).
    pub missing_vcpus: Vec<u32>,
    /// Emulator/I/O threads pinned.
    pub other_threads: usize,
}

/// The function that sets a thread's affinity; replaceable in tests that
/// run against fake trees with fake thread ids.
pub type AffinityFn = Arc<dyn Fn(u32, &CpuSet) -> Result<(), CgroupError> + Send + Sync>;

/// Pins VM threads (see the module documentation).
#[derive(Clone)]
pub struct VcpuEnforcer {
    writer: Option<CpusetWriter>,
    set_affinity: AffinityFn,
}

impl std::fmt::Debug for VcpuEnforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuEnforcer")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl VcpuEnforcer {
    /// `writer`: the host's cpuset hierarchy, `None` when there is none
    /// (affinity only).
    pub fn new(writer: Option<CpusetWriter>) -> Self {
        Self {
            writer,
            set_affinity: Arc::new(set_thread_affinity),
        }
    }

    /// Replaces the affinity call (tests on fake trees).
    pub fn with_affinity_fn(mut self, f: AffinityFn) -> Self {
        self.set_affinity = f;
        self
    }

    pub fn writer(&self) -> Option<&CpusetWriter> {
        self.writer.as_ref()
    }

    fn path_in_hierarchy<'a>(
        &self,
        loc: &'a crate::discovery::CgroupLocation,
    ) -> Option<(&'a str, Hierarchy)> {
        let w = self.writer.as_ref()?;
        let h = w.hierarchy();
        let p = match h {
            Hierarchy::V1Cpuset => loc.v1_cpuset.as_deref(),
            Hierarchy::Unified => loc.unified.as_deref(),
        }?;
        Some((p, h))
    }

    /// The libvirt `vcpuN` cgroup this vCPU thread is in, when its index
    /// matches and the path is a libvirt layout in the cpuset hierarchy.
    pub fn libvirt_vcpu_cgroup(&self, vcpu: &VcpuThread) -> Option<String> {
        let (path, h) = self.path_in_hierarchy(&vcpu.cgroup)?;
        parse_libvirt_path(path, h)?;
        (libvirt_vcpu_index(path) == Some(vcpu.index)).then(|| path.to_string())
    }

    /// Pins one vCPU thread to `cpus`.
    pub fn pin_vcpu(&self, vcpu: &VcpuThread, cpus: &CpuSet) -> Result<PinMethod, CgroupError> {
        let method = match (self.writer.as_ref(), self.libvirt_vcpu_cgroup(vcpu)) {
            (Some(w), Some(cg)) => {
                w.ensure_cpuset(&cg, cpus, None, CgroupKind::Threaded)?;
                PinMethod::LibvirtCgroup
            }
            _ => PinMethod::Affinity,
        };
        (self.set_affinity)(vcpu.tid, cpus)?;
        Ok(method)
    }

    /// Pins every vCPU of `vm` named in `vcpu_cpus` (`(index, set)`) and,
    /// when given, its other threads to `emulator_cpus`. Stops at the first
    /// error; `VmGone` means the VM exited and should be released.
    pub fn pin_vm(
        &self,
        vm: &DiscoveredVm,
        vcpu_cpus: &[(u32, CpuSet)],
        emulator_cpus: Option<&CpuSet>,
    ) -> Result<PinReport, CgroupError> {
        let mut report = PinReport {
            vcpus: Vec::new(),
            missing_vcpus: Vec::new(),
            other_threads: 0,
        };
        for (index, cpus) in vcpu_cpus {
            match vm.vcpus.iter().find(|v| v.index == *index) {
                Some(v) => report.vcpus.push((*index, self.pin_vcpu(v, cpus)?)),
                None => report.missing_vcpus.push(*index),
            }
        }
        if let Some(cpus) = emulator_cpus {
            let libvirt = vm.cgroup.libvirt.as_ref().filter(|lv| {
                self.writer
                    .as_ref()
                    .is_some_and(|w| w.hierarchy() == lv.hierarchy)
            });
            if let (Some(w), Some(lv)) = (self.writer.as_ref(), libvirt) {
                w.ensure_cpuset(&lv.emulator_path(), cpus, None, CgroupKind::Threaded)?;
            }
            // io_uring workers refuse sched_setaffinity; they follow the cgroup.
            for t in vm.other_threads.iter().filter(|t| t.affinity_settable) {
                match (self.set_affinity)(t.tid, cpus) {
                    Ok(()) => report.other_threads += 1,
                    // A helper thread that exited is not the VM exiting.
                    Err(e) if e.is_gone() && t.tid != vm.pid => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupHost;
    use crate::discovery::fake_procfs::{write_process, FakeProcess};
    use crate::discovery::{qemu_vcpu_index, VmScanner};
    use std::sync::Mutex;

    #[test]
    fn libvirt_v2_vm_gets_its_vcpu_cgroups_written_plus_affinity() {
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
        let mut iou = crate::discovery::fake_procfs::FakeThread::new(150, "iou-wrk-100");
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

        let calls: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
        let rec = Arc::clone(&calls);
        let writer = CpusetWriter::new(CgroupHost::detect(cg.path()).unwrap());
        let enforcer = VcpuEnforcer::new(Some(writer.clone())).with_affinity_fn(Arc::new(
            move |tid, cpus: &CpuSet| {
                rec.lock().unwrap().push((tid, cpus.to_string()));
                Ok(())
            },
        ));
        let found = VmScanner::new(proc.path()).inspect(100).unwrap();
        let report = enforcer
            .pin_vm(
                &found,
                &[
                    (0, CpuSet::range(2, 2)),
                    (1, CpuSet::range(3, 3)),
                    (2, CpuSet::range(4, 4)),
                ],
                Some(&CpuSet::range(0, 1)),
            )
            .unwrap();
        assert_eq!(
            report.vcpus,
            vec![(0, PinMethod::LibvirtCgroup), (1, PinMethod::LibvirtCgroup)]
        );
        assert_eq!(report.missing_vcpus, vec![2]);
        assert_eq!(report.other_threads, 2);
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
            *calls.lock().unwrap(),
            vec![
                (102, "2".to_string()),
                (103, "3".to_string()),
                (100, "0-1".to_string()),
                (101, "0-1".to_string()),
            ]
        );
    }

    #[test]
    fn vm_without_own_cgroup_is_pinned_by_affinity() {
        let proc = tempfile::tempdir().unwrap();
        let vm = FakeProcess::qemu_vm(300, 1, &["qemu-system-x86_64"]);
        write_process(proc.path(), &vm).unwrap();
        let found = VmScanner::new(proc.path()).inspect(300).unwrap();
        let gone: AffinityFn = Arc::new(|tid, _| {
            Err(CgroupError::VmGone {
                target: format!("sched_setaffinity({tid})"),
            })
        });
        let e = VcpuEnforcer::new(None).with_affinity_fn(gone);
        let err = e
            .pin_vm(&found, &[(0, CpuSet::range(1, 1))], None)
            .unwrap_err();
        assert!(err.is_gone());
        let ok = VcpuEnforcer::new(None).with_affinity_fn(Arc::new(|_, _| Ok(())));
        let r = ok
            .pin_vm(&found, &[(0, CpuSet::range(1, 1))], None)
            .unwrap();
        assert_eq!(r.vcpus, vec![(0, PinMethod::Affinity)]);
    }
}
