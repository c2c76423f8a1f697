//! Placements checked against the topology the host has now: on start
//! (the engine state is rebuilt from the checkpoint's decisions, which may
//! come from another host shape) and whenever the online CPUs change at run
//! time (hotplug, SMT toggled).
//!
//! A decision stays when the engine can rebuild it on this topology
//! (`placement::rebuild`: every CPU online, a confidential VM's cores
//! whole, the same L3 grouping and NUMA nodes). Otherwise the engine places
//! the request again against the placements that stayed (vm_id order);
//! when nothing fits, the intent is kept, unplaceable, with the CPUs it is
//! missing, and is tried again on the next topology change. Pure: the
//! caller commits the checkpoint, publishes events and raises the
//! condition.

use std::collections::BTreeMap;

use crate::cpuset::CpuSet;
use crate::placement::{self, Placement, PlacementState, Reservations};
use crate::state::IntentRecord;
use crate::topology::Topology;
use crate::types::VmId;

/// A placement moved to new CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replaced {
    /// The CPUs of the decision that no longer fit.
    pub(crate) old_cpus: CpuSet,
    pub(crate) new: Placement,
    /// Why the old one no longer fit.
    pub(crate) reason: String,
}
/// An intent no placement fits on this topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unplaceable {
    /// CPUs of its last placement that the host lacks (empty when all are
    /// present but the domains they form changed).
    pub(crate) missing: CpuSet,
    /// Why the old placement no longer fits, and why no new one does.
    pub(crate) reason: String,
}

/// The outcome of checking every intent against a topology.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refit {
    /// The engine state on this topology: placements that stayed or moved.
    pub(crate) placements: PlacementState,
    pub(crate) replaced: BTreeMap<VmId, Replaced>,
    pub(crate) unplaceable: BTreeMap<VmId, Unplaceable>,
    /// Placements the engine chose again on the very same CPUs: only their
    /// topology indices (domains, cores) changed. Not a move: no event.
    /// With the reason the old placement no longer matched the topology.
    pub(crate) reindexed: BTreeMap<VmId, (Placement, String)>,
}

/// A decision that does not fit the topology as stored, and why.
struct Moving {
    request: placement::PlacementRequest,
    old_cpus: CpuSet,
    old_vcpu_cpus: Vec<CpuSet>,
    missing: CpuSet,
    why: String,
}

/// Rebuilds the engine state from every intent's decision on `topo`.
pub(crate) fn refit(
    topo: &Topology,
    res: &Reservations,
    intents: &[std::sync::Arc<IntentRecord>],
) -> Refit {
    let mut out = Refit::default();
    let mut moving: Vec<Moving> = Vec::new();
    for intent in intents {
        let (Some(request), Some(record)) = (intent.engine_request(), &intent.placement) else {
            continue;
        };
        let move_it = |missing: CpuSet, why: String| Moving {
            request: request.clone(),
            old_cpus: record.cpus.clone(),
            old_vcpu_cpus: record.vcpu_cpus.clone(),
            missing,
            why,
        };
        match placement::rebuild(topo, &out.placements, res, &request, record.decided()) {
            Ok(p) => {
                if let Err(e) = out.placements.apply(p) {
                    moving.push(move_it(CpuSet::new(), e.to_string()));
                }
            }
            Err(m) => moving.push(move_it(m.missing, m.reason)),
        }
    }
    for m in moving {
        let vm_id = m.request.vm_id.clone();
        let placed = placement::place(topo, &out.placements, res, &m.request)
            .and_then(|new| out.placements.apply(new.clone()).map(|()| new));
        match placed {
            Ok(new) if new.cpus == m.old_cpus && new.vcpu_cpus == m.old_vcpu_cpus => {
                out.reindexed.insert(vm_id, (new, m.why));
            }
            Ok(new) => {
                out.replaced.insert(
                    vm_id,
                    Replaced {
                        old_cpus: m.old_cpus,
                        new,
                        reason: m.why,
                    },
                );
            }
            Err(e) => {
                out.unplaceable.insert(
                    vm_id,
                    Unplaceable {
                        missing: m.missing,
                        reason: format!("{}; {e}", m.why),
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
