//! The one way the agent pins a VM: the pure [`desired_sets`] decides what
//! each thread gets, [`apply`] is the thin I/O that writes it.
//!
//! - A vCPU thread in its own libvirt `vcpuN` cgroup (the index in the path
//!   matches the thread's) in the writer's hierarchy: that cgroup's
//!   `cpuset.cpus` is written first ([`CpusetWriter::set_cpus_within_parents`]:
//!   v1 ancestors that lack a CPU are widened top-down), then the thread's
//!   affinity is set to the same set. The affinity call corrects a thread
//!   narrowed by hand (`taskset`) inside an unchanged cpuset, which a cpuset
//!   write with the same value does not.
//! - The emulator and I/O threads of a libvirt VM: libvirt's `emulator`
//!   cgroup of the VM (in the writer's hierarchy) is written the same way,
//!   then each thread's affinity. io_uring workers (`PF_NO_SETAFFINITY`)
//!   refuse `sched_setaffinity` and are left to the cgroup.
//! - Any other thread: `sched_setaffinity` alone.
//!
//! The agent never creates cgroups or moves threads between them: a VM is
//! pinned in the cgroups its VMM or libvirt put it in.

use crate::cgroup::{CgroupError, CpusetWriter, Hierarchy, ThreadAffinity};
use crate::cpuset::CpuSet;
use crate::discovery::cgroup_path::libvirt_vcpu_index;
use crate::discovery::{CgroupLocation, DiscoveredVm};
use crate::state::PlacementRecord;

use super::events::DriftReason;

/// One thread whose allowed CPUs differ from its placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadFix {
    /// The thread.
    pub tid: u32,
    /// vCPU index, `None` for an emulator thread.
    pub vcpu: Option<u32>,
    /// The libvirt cgroup written before the affinity (the thread's
    /// `vcpuN`, or the VM's `emulator`), in the writer's hierarchy.
    pub cgroup: Option<String>,
    /// A non-vCPU thread other than the main thread: its exit is not the
    /// VM's exit.
    pub helper: bool,
    /// The CPUs the thread is allowed now.
    pub observed: CpuSet,
    /// The CPUs the placement gives it.
    pub desired: CpuSet,
    /// Why they differ.
    pub reason: DriftReason,
}

/// What [`apply`] did with one fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The thread holds its set.
    Pinned {
        /// Whether its cgroup had to be written too.
        cgroup_rewritten: bool,
    },
    /// A helper thread exited before it was pinned (the VM lives on).
    HelperGone,
}

/// CPUs for vCPU `index`: its own set, or the VM's union for a vCPU the
/// placement has no entry for (more threads than requested vCPUs).
pub(crate) fn vcpu_set(record: &PlacementRecord, index: u32) -> CpuSet {
    usize::try_from(index)
        .ok()
        .and_then(|i| record.vcpu_cpus.get(i))
        .cloned()
        .unwrap_or_else(|| {
            record
                .vcpu_cpus
                .iter()
                .fold(CpuSet::new(), |a, s| a.union(s))
        })
}

/// The path of `loc` in `hierarchy`.
fn path_in(loc: &CgroupLocation, hierarchy: Hierarchy) -> Option<&str> {
    match hierarchy {
        Hierarchy::V1Cpuset => loc.v1_cpuset.as_deref(),
        Hierarchy::Unified => loc.unified.as_deref(),
    }
}

/// libvirt's `vcpuN` cgroup of vCPU `index` in `hierarchy`, when the thread
/// sits in one whose N is `index` (a vCPU thread still in `emulator`, as
/// during libvirt's start-up, has none: writing `emulator` would narrow
/// every emulator thread).
pub(crate) fn libvirt_vcpu_cgroup(
    loc: &CgroupLocation,
    index: u32,
    hierarchy: Option<Hierarchy>,
) -> Option<String> {
    let lv = loc.libvirt.as_ref()?;
    let h = hierarchy.filter(|h| *h == lv.hierarchy)?;
    let path = path_in(loc, h)?;
    (libvirt_vcpu_index(path) == Some(index)).then(|| path.to_string())
}

/// libvirt's `emulator` cgroup of `vm` in `hierarchy`, when `vm` is a
/// libvirt domain there.
pub(crate) fn libvirt_emulator_cgroup(
    vm: &DiscoveredVm,
    hierarchy: Option<Hierarchy>,
) -> Option<String> {
    let lv = vm.cgroup.libvirt.as_ref()?;
    hierarchy
        .filter(|h| *h == lv.hierarchy)
        .map(|_| lv.emulator_path())
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
        if t.cpus_allowed != desired {
            out.push(ThreadFix {
                tid: t.tid,
                vcpu: Some(t.index),
                cgroup: libvirt_vcpu_cgroup(&t.cgroup, t.index, hierarchy),
                helper: false,
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
        let emulator_cgroup = libvirt_emulator_cgroup(vm, hierarchy);
        for t in vm.other_threads.iter().filter(|t| t.affinity_settable) {
            if &t.cpus_allowed != emu {
                out.push(ThreadFix {
                    tid: t.tid,
                    vcpu: None,
                    cgroup: emulator_cgroup.clone(),
                    helper: t.tid != vm.pid,
                    observed: t.cpus_allowed.clone(),
                    desired: emu.clone(),
                    reason: DriftReason::ThreadMoved,
                });
            }
        }
    }
    out
}

/// Applies one fix: the thread's libvirt cgroup first (a cpuset restricts
/// what affinity may hold), then the affinity.
pub fn apply(
    fix: &ThreadFix,
    writer: Option<&CpusetWriter>,
    affinity: &dyn ThreadAffinity,
) -> Result<Applied, CgroupError> {
    let mut cgroup_rewritten = false;
    if let (Some(cg), Some(w)) = (&fix.cgroup, writer) {
        match w.read_cpus(cg) {
            Ok(cur) if cur == fix.desired => {}
            Ok(_) => {
                w.set_cpus_within_parents(cg, &fix.desired)?;
                cgroup_rewritten = true;
            }
            // The thread's cgroup vanished with the thread or was never
            // ours to write: affinity still applies.
            Err(CgroupError::Missing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    match affinity.set(fix.tid, &fix.desired) {
        Ok(()) => Ok(Applied::Pinned { cgroup_rewritten }),
        Err(e) if e.is_gone() && fix.helper => Ok(Applied::HelperGone),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
