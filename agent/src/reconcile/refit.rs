//! Placements checked against the topology the host has now: on start
//! (a checkpoint written on another host shape) and whenever the online
//! CPUs change at run time (hotplug, SMT toggled).
//!
//! A placement stays when every CPU it uses is online and its L3 domain,
//! core and NUMA indices still describe those CPUs. Otherwise the engine
//! places the request again against the placements that stayed (vm_id
//! order); when nothing fits, the intent is kept, unplaceable, with the CPUs
//! it is missing, and is tried again on the next topology change. Pure: the
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
pub struct Replaced {
    pub old: Placement,
    pub new: Placement,
    /// Why the old one no longer fit.
    pub reason: String,
}

/// An intent no placement fits on this topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    /// CPUs of its last placement that the host lacks (empty when all are
    /// present but the domains they form changed).
    pub missing: CpuSet,
    /// Why the old placement no longer fits, and why no new one does.
    pub reason: String,
}

/// The outcome of checking every intent against a topology.
#[derive(Debug, Clone, Default)]
pub struct Refit {
    /// The engine state on this topology: placements that stayed or moved.
    pub placements: PlacementState,
    pub replaced: BTreeMap<VmId, Replaced>,
    pub unplaceable: BTreeMap<VmId, Unplaceable>,
    /// Placements the engine chose again on the very same CPUs: only their
    /// topology indices (domains, cores) changed. Not a move: no event.
    /// With the reason the old placement no longer matched the topology.
    pub reindexed: BTreeMap<VmId, (Placement, String)>,
}

/// Why `p` does not describe `topo`, or `None` when it still does.
pub fn misfit(topo: &Topology, p: &Placement, extra: &CpuSet) -> Option<(CpuSet, String)> {
    let all = p
        .vcpu_cpus
        .iter()
        .fold(p.cpus.union(extra), |acc, s| acc.union(s));
    let missing = all.difference(&topo.online);
    if !missing.is_empty() {
        return Some((missing.clone(), format!("CPUs {missing} are not online")));
    }
    let mut domains = p.l3_domains.clone();
    domains.sort_unstable();
    domains.dedup();
    if domains != topo.l3_domains_of(&p.cpus) {
        return Some((
            CpuSet::new(),
            format!(
                "its CPUs {} now form L3 domains {:?}, not {:?}",
                p.cpus,
                topo.l3_domains_of(&p.cpus),
                domains
            ),
        ));
    }
    // Confidential VMs hold whole cores (an SMT sibling is a side channel);
    // plain dedicated VMs may hold single threads of a core they share with
    // other plain VMs, so for them the core only has to still hold their CPUs.
    let whole_cores = p.exclusive && p.pool == placement::Pool::Confidential;
    for &c in &p.cores {
        let ok = topo.cores.get(c).is_some_and(|core| {
            !core.cpus.is_disjoint(&p.cpus) && (!whole_cores || core.cpus.is_subset(&p.cpus))
        });
        if !ok {
            return Some((
                CpuSet::new(),
                format!("core {c} is no longer a core of CPUs {}", p.cpus),
            ));
        }
    }
    let mut numa: Vec<u32> = domains
        .iter()
        .filter_map(|&d| topo.l3_domains.get(d))
        .map(|d| d.numa)
        .collect();
    numa.sort_unstable();
    numa.dedup();
    let mut recorded = p.numa_nodes.clone();
    recorded.sort_unstable();
    if numa != recorded {
        return Some((
            CpuSet::new(),
            format!("its L3 domains are now on NUMA nodes {numa:?}, not {recorded:?}"),
        ));
    }
    None
}

/// Checks every intent's engine placement against `topo`.
pub fn refit(topo: &Topology, res: &Reservations, intents: &[IntentRecord]) -> Refit {
    let mut out = Refit::default();
    let mut moving: Vec<(&Placement, CpuSet, String)> = Vec::new();
    for intent in intents {
        let Some(p) = &intent.engine else { continue };
        // Only the vCPUs' CPUs decide whether a placement still fits: the
        // emulator set is derived from the pools (`place::emulator_cpus`)
        // and recomputed on the new topology by the caller.
        let extra = intent
            .placement
            .as_ref()
            .map(|r| {
                r.vcpu_cpus
                    .iter()
                    .fold(CpuSet::new(), |acc, s| acc.union(s))
            })
            .unwrap_or_default();
        match misfit(topo, p, &extra) {
            None => {
                if let Err(e) = out.placements.apply(p.clone()) {
                    moving.push((p, CpuSet::new(), e.to_string()));
                }
            }
            Some((missing, why)) => moving.push((p, missing, why)),
        }
    }
    for (old, missing, why) in moving {
        match placement::place(topo, &out.placements, res, &old.request) {
            Ok(new) => match out.placements.apply(new.clone()) {
                Ok(()) if new.cpus == old.cpus && new.vcpu_cpus == old.vcpu_cpus => {
                    out.reindexed.insert(old.vm_id.clone(), (new, why));
                }
                Ok(()) => {
                    out.replaced.insert(
                        old.vm_id.clone(),
                        Replaced {
                            old: old.clone(),
                            new,
                            reason: why,
                        },
                    );
                }
                Err(e) => {
                    out.unplaceable.insert(
                        old.vm_id.clone(),
                        Unplaceable {
                            missing,
                            reason: format!("{why}; {e}"),
                        },
                    );
                }
            },
            Err(e) => {
                out.unplaceable.insert(
                    old.vm_id.clone(),
                    Unplaceable {
                        missing,
                        reason: format!("{why}; {e}"),
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
