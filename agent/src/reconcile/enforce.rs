//! Applies a placement to a VM's threads and reads back what the kernel
//! holds. The decision of what each thread gets is the pure
//! [`desired_sets`]; this module is the thin I/O around it.

use crate::cgroup::{self, CgroupError, CpusetWriter};
use crate::cpuset::CpuSet;
use crate::discovery::cgroup_path::Hierarchy;
use crate::discovery::DiscoveredVm;
use crate::state::PlacementRecord;

use super::events::DriftReason;

/// One thread whose allowed CPUs differ from its placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadFix {
    pub tid: u32,
    /// vCPU index, `None` for an emulator thread.
    pub vcpu: Option<u32>,
    /// libvirt's vcpuN cgroup of the thread, in the hierarchy the writer
    /// manages, when it has one.
    pub cgroup: Option<String>,
    pub observed: CpuSet,
    pub desired: CpuSet,
    pub reason: DriftReason,
}

/// CPUs for vCPU `index`: its own set, or the VM's union for a vCPU the
/// placement has no entry for (more threads than requested vCPUs).
pub fn vcpu_set(record: &PlacementRecord, index: u32) -> CpuSet {
    record
        .vcpu_cpus
        .get(index as usize)
        .cloned()
        .unwrap_or_else(|| {
            record
                .vcpu_cpus
                .iter()
                .fold(CpuSet::new(), |a, s| a.union(s))
        })
}

/// The threads of `vm` that are not where `record` puts them. `known_tids`
/// are the vCPU threads pinned before (a thread not among them is new).
pub fn desired_sets(
    vm: &DiscoveredVm,
    record: &PlacementRecord,
    known_tids: &std::collections::BTreeSet<u32>,
    hierarchy: Option<Hierarchy>,
) -> Vec<ThreadFix> {
    let mut out = Vec::new();
    for t in &vm.vcpus {
        let desired = vcpu_set(record, t.index);
        let cgroup = match hierarchy {
            Some(Hierarchy::V1Cpuset) => t.cgroup.v1_cpuset.clone(),
            Some(Hierarchy::Unified) => t.cgroup.unified.clone(),
            None => None,
        }
        .filter(|_| t.cgroup.libvirt.is_some());
        if t.cpus_allowed != desired {
            out.push(ThreadFix {
                tid: t.tid,
                vcpu: Some(t.index),
                cgroup,
                observed: t.cpus_allowed.clone(),
                desired,
                reason: if known_tids.contains(&t.tid) {
                    DriftReason::ThreadMoved
                } else {
                    DriftReason::NewThread
                },
            });
        }
    }
    if let Some(emu) = record.emulator_cpus.as_ref().filter(|e| !e.is_empty()) {
        for t in &vm.other_threads {
            if &t.cpus_allowed != emu {
                out.push(ThreadFix {
                    tid: t.tid,
                    vcpu: None,
                    cgroup: None,
                    observed: t.cpus_allowed.clone(),
                    desired: emu.clone(),
                    reason: DriftReason::ThreadMoved,
                });
            }
        }
    }
    out
}

/// Sets a thread's CPU affinity: `sched_setaffinity` on a host, a fake in
/// tests that run against a fake procfs (whose tids are not real threads).
pub trait ThreadAffinity: Send + Sync {
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError>;
}

/// The real `sched_setaffinity(2)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedAffinity;

impl ThreadAffinity for SchedAffinity {
    fn set(&self, tid: u32, cpus: &CpuSet) -> Result<(), CgroupError> {
        cgroup::set_thread_affinity(tid, cpus)
    }
}

/// Applies one fix: the thread's libvirt cgroup first (a cpuset restricts
/// what affinity may hold), then the affinity. Returns whether the cgroup
/// had to be rewritten.
pub fn apply(
    fix: &ThreadFix,
    writer: Option<&CpusetWriter>,
    affinity: &dyn ThreadAffinity,
) -> Result<bool, CgroupError> {
    let mut cgroup_rewritten = false;
    if let (Some(cg), Some(w)) = (&fix.cgroup, writer) {
        match w.read_cpus(cg) {
            Ok(cur) if cur == fix.desired => {}
            Ok(_) => {
                w.set_cpus(cg, &fix.desired)?;
                cgroup_rewritten = true;
            }
            // The thread's cgroup vanished with the thread or was never
            // ours to write: affinity still applies.
            Err(CgroupError::Missing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    affinity.set(fix.tid, &fix.desired)?;
    Ok(cgroup_rewritten)
}
