//! What the placements in force hold, kept up to date by every apply and
//! release so a decision reads it instead of walking all placements.
//!
//! Topology-free on purpose: it records CPU ids, core indices and L3 domain
//! indices exactly as the placements name them, so it is valid for whatever
//! topology the placements were made on, and `Occupancy::rebuild` over the
//! placements gives the same value as the incremental updates (a property
//! test checks this after arbitrary place/release sequences).

use super::{Placement, Pool};
use crate::cpuset::CpuSet;

/// Per-pool counters, indexed by `Pool::slot`.
pub(crate) type PerPool = [u32; 2];

impl Pool {
    /// Index of the pool in a `PerPool` array.
    pub(crate) fn slot(self) -> usize {
        match self {
            Pool::General => 0,
            Pool::Confidential => 1,
        }
    }

    pub(crate) fn other(self) -> Pool {
        match self {
            Pool::General => Pool::Confidential,
            Pool::Confidential => Pool::General,
        }
    }
}

/// Derived state of a set of placements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Occupancy {
    /// CPUs held by exclusive VMs (whole cores, or single threads of plain
    /// VMs that share a core with another plain VM).
    pub(crate) held: CpuSet,
    /// Floating vCPUs per core index, by pool. No trailing all-zero entry,
    /// so equal occupancies compare equal.
    pub(crate) core_load: Vec<PerPool>,
    /// Floating sets that contain each CPU id. No trailing zero.
    pub(crate) floating_sets: Vec<u32>,
    /// VMs per L3 domain index, by pool. No trailing all-zero entry.
    pub(crate) domain_vms: Vec<PerPool>,
}

fn bump(v: &mut Vec<PerPool>, at: usize, slot: usize, n: u32, add: bool) {
    if add {
        if v.len() <= at {
            v.resize(at + 1, [0, 0]);
        }
        v[at][slot] += n;
    } else if let Some(e) = v.get_mut(at) {
        e[slot] = e[slot].saturating_sub(n);
        while v.last() == Some(&[0, 0]) {
            v.pop();
        }
    }
}

impl Occupancy {
    /// The occupancy of `placements`, computed from scratch.
    pub(crate) fn rebuild<'a>(placements: impl IntoIterator<Item = &'a Placement>) -> Self {
        let mut o = Self::default();
        for p in placements {
            o.add(p);
        }
        o
    }

    fn update(&mut self, p: &Placement, add: bool) {
        let slot = p.pool.slot();
        if p.exclusive {
            self.held = if add {
                self.held.union(&p.cpus)
            } else {
                self.held.difference(&p.cpus)
            };
        } else {
            for (&ci, &n) in p.cores.iter().zip(&p.vcpus_per_core) {
                bump(&mut self.core_load, ci, slot, n, add);
            }
            for c in p.cpus.iter() {
                let at = c as usize;
                if add {
                    if self.floating_sets.len() <= at {
                        self.floating_sets.resize(at + 1, 0);
                    }
                    self.floating_sets[at] += 1;
                } else if let Some(e) = self.floating_sets.get_mut(at) {
                    *e = e.saturating_sub(1);
                    while self.floating_sets.last() == Some(&0) {
                        self.floating_sets.pop();
                    }
                }
            }
        }
        for &d in &p.l3_domains {
            bump(&mut self.domain_vms, d, slot, 1, add);
        }
    }

    /// Records a new placement. Callers add a placement once (the
    /// state rejects overlapping exclusive sets before this).
    pub(crate) fn add(&mut self, p: &Placement) {
        self.update(p, true);
    }

    /// Forgets a placement previously added.
    pub(crate) fn remove(&mut self, p: &Placement) {
        self.update(p, false);
    }

    pub(crate) fn load_of(&self, core: usize) -> PerPool {
        self.core_load.get(core).copied().unwrap_or([0, 0])
    }

    /// Whether a floating VM's set contains CPU `cpu`.
    pub(crate) fn in_floating_set(&self, cpu: u32) -> bool {
        self.floating_sets.get(cpu as usize).is_some_and(|&n| n > 0)
    }

    pub(crate) fn vms_in(&self, domain: usize) -> PerPool {
        self.domain_vms.get(domain).copied().unwrap_or([0, 0])
    }
}
