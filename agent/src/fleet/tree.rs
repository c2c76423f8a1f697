//! The provider tree and allocations this host publishes to OpenStack
//! Placement, computed from the topology, the placements in force and the
//! Placement consumers of the VMs. Pure: no I/O.
//!
//! Per L3 domain `d` (provider `<host>_l3_<d>`):
//! - `CUSTOM_SEVPLACE_PCPU`: `total` = CPUs of `d`; the allocations of the
//!   consumers of exclusive VMs placed in `d` = their CPUs in `d`;
//!   `reserved` = every other CPU of `d` the agent uses (host
//!   reservations, VMs without a consumer, shared VMs). So at a quiet
//!   moment usage + reserved = CPUs of `d` in use by the agent.
//! - `CUSTOM_SEVPLACE_L3_OPEN`: `total` 1, `reserved` 1 once `d` holds a VM.
//!   A scheduler that opens an empty domain claims it with the first VM, so
//!   two schedulers cannot open one domain for both pools at once.
//! - exactly one pool trait.

use std::collections::{BTreeMap, BTreeSet};

use crate::cpuset::CpuSet;
use crate::placement::{PlacementState, Reservations};
use crate::topology::Topology;
use crate::types::VmId;

/// Resource class of the CPUs of one L3 domain.
pub(crate) const PCPU_CLASS: &str = "CUSTOM_SEVPLACE_PCPU";
/// Resource class of the token that opens an empty domain.
pub(crate) const OPEN_CLASS: &str = "CUSTOM_SEVPLACE_L3_OPEN";
/// Trait of every root provider a sevplaced reports.
pub(crate) const MANAGED_TRAIT: &str = "CUSTOM_SEVPLACE_MANAGED";
/// Pool traits of L3 providers.
pub(crate) const POOL_CONFIDENTIAL: &str = "CUSTOM_SEVPLACE_POOL_CONFIDENTIAL";
pub(crate) const POOL_GENERAL: &str = "CUSTOM_SEVPLACE_POOL_GENERAL";
pub(crate) const POOL_EMPTY: &str = "CUSTOM_SEVPLACE_POOL_EMPTY";
/// os-traits names of the SEV classes.
pub(crate) const SEV_TRAIT: &str = "HW_CPU_X86_AMD_SEV";
pub(crate) const SEV_ES_TRAIT: &str = "HW_CPU_X86_AMD_SEV_ES";
pub(crate) const SEV_SNP_TRAIT: &str = "HW_CPU_X86_AMD_SEV_SNP";
/// Flush mode traits of the root: what a reclaim of a confidential VM on
/// this host flushes.
pub(crate) const FLUSH_TARGETED: &str = "CUSTOM_SEVPLACE_FLUSH_TARGETED";
pub(crate) const FLUSH_OBSERVE: &str = "CUSTOM_SEVPLACE_FLUSH_OBSERVE";
pub(crate) const FLUSH_STOCK: &str = "CUSTOM_SEVPLACE_FLUSH_STOCK";

/// Custom traits the agent creates before use.
pub(crate) const CUSTOM_TRAITS: [&str; 7] = [
    MANAGED_TRAIT,
    POOL_CONFIDENTIAL,
    POOL_GENERAL,
    POOL_EMPTY,
    FLUSH_TARGETED,
    FLUSH_OBSERVE,
    FLUSH_STOCK,
];
/// Custom resource classes the agent creates before use.
pub(crate) const CUSTOM_CLASSES: [&str; 2] = [PCPU_CLASS, OPEN_CLASS];

/// Whether a trait is one the agent manages on a root provider (the rest of
/// a Nova compute node's traits are left alone).
pub(crate) fn is_managed_root_trait(t: &str) -> bool {
    t.starts_with("CUSTOM_SEVPLACE_") || [SEV_TRAIT, SEV_ES_TRAIT, SEV_SNP_TRAIT].contains(&t)
}

/// Which SEV classes the host's KVM offers (kvm_amd parameters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SevSupport {
    pub(crate) sev: bool,
    pub(crate) sev_es: bool,
    pub(crate) sev_snp: bool,
}

/// What the host's flushes of confidential VMs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlushMode {
    /// sevflush in `targeted` mode: only the VM's dirty CPUs are flushed.
    Targeted,
    /// sevflush loaded in `observe` mode: stock flushes, tracked.
    Observe,
    /// No usable sevflush: stock KVM flushes.
    Stock,
}

impl FlushMode {
    /// From the module's state and `mode` file.
    pub(crate) fn from_module(loaded: bool, mode: &str) -> Self {
        match (loaded, mode.trim()) {
            (true, "targeted") => Self::Targeted,
            (true, _) => Self::Observe,
            (false, _) => Self::Stock,
        }
    }

    pub(crate) fn trait_name(self) -> &'static str {
        match self {
            Self::Targeted => FLUSH_TARGETED,
            Self::Observe => FLUSH_OBSERVE,
            Self::Stock => FLUSH_STOCK,
        }
    }
}

/// A Placement consumer named in PlaceVm.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Consumer {
    /// Consumer UUID, lower case, hyphenated.
    pub(crate) uuid: String,
    pub(crate) project_id: String,
    pub(crate) user_id: String,
}

/// Names of this host's providers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProviderNames {
    pub(crate) host: String,
}

impl ProviderNames {
    pub(crate) fn numa(&self, node: u32) -> String {
        format!("{}_numa{node}", self.host)
    }

    pub(crate) fn l3(&self, index: usize) -> String {
        format!("{}_l3_{index}", self.host)
    }

    /// Whether `name` is a child provider name of this host (NUMA or L3).
    pub(crate) fn is_child(&self, name: &str) -> bool {
        name.strip_prefix(&self.host).is_some_and(|rest| {
            rest.strip_prefix("_numa")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                || rest
                    .strip_prefix("_l3_")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    }
}

/// One L3 provider as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct L3Provider {
    pub(crate) name: String,
    pub(crate) index: usize,
    pub(crate) numa: u32,
    pub(crate) total: u32,
    pub(crate) reserved: u32,
    /// `reserved` of the open token: 1 once the domain holds a VM.
    pub(crate) open_reserved: u32,
    pub(crate) pool_trait: &'static str,
}

/// A consumer's allocation as it must be: CPUs per L3 domain index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DesiredAllocation {
    pub(crate) vm_id: VmId,
    pub(crate) consumer: Consumer,
    pub(crate) per_l3: BTreeMap<usize, u32>,
}

/// The whole tree and the allocations of this host's consumers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DesiredTree {
    pub(crate) names: ProviderNames,
    pub(crate) root_traits: BTreeSet<String>,
    /// `(name, node)` of each NUMA provider, by node.
    pub(crate) numa: Vec<(String, u32)>,
    pub(crate) l3: Vec<L3Provider>,
    /// By consumer UUID.
    pub(crate) allocations: BTreeMap<String, DesiredAllocation>,
}

/// Everything about the host the tree depends on besides placements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostFacts {
    pub(crate) host_name: String,
    pub(crate) sev: SevSupport,
    pub(crate) flush: FlushMode,
}

/// The root's traits: managed, SEV classes the host supports, flush mode.
pub(crate) fn root_traits(facts: &HostFacts) -> BTreeSet<String> {
    let mut t = BTreeSet::from([
        MANAGED_TRAIT.to_string(),
        facts.flush.trait_name().to_string(),
    ]);
    for (on, name) in [
        (facts.sev.sev, SEV_TRAIT),
        (facts.sev.sev_es, SEV_ES_TRAIT),
        (facts.sev.sev_snp, SEV_SNP_TRAIT),
    ] {
        if on {
            t.insert(name.to_string());
        }
    }
    t
}

/// The root's traits after the agent's update: the traits others set (a
/// Nova compute node's) stay, the managed ones become `ours`.
pub(crate) fn merged_root_traits(
    current: &BTreeSet<String>,
    ours: &BTreeSet<String>,
) -> BTreeSet<String> {
    current
        .iter()
        .filter(|t| !is_managed_root_trait(t))
        .cloned()
        .chain(ours.iter().cloned())
        .collect()
}

fn count(set: &CpuSet) -> u32 {
    u32::try_from(set.len()).unwrap_or(u32::MAX)
}

/// Computes the tree. `consumers` maps VMs to their Placement consumers;
/// a consumer whose VM holds no placement gets no desired allocation (the
/// reporter deletes its allocation).
pub(crate) fn desired(
    facts: &HostFacts,
    topo: &Topology,
    placements: &PlacementState,
    reservations: &Reservations,
    consumers: &BTreeMap<VmId, Consumer>,
) -> DesiredTree {
    let names = ProviderNames {
        host: facts.host_name.clone(),
    };
    let confidential: BTreeSet<usize> = placements.confidential_domains().into_iter().collect();
    let mut in_use = reservations.host.clone();
    let mut opened: BTreeSet<usize> = BTreeSet::new();
    for p in placements.iter() {
        in_use = in_use.union(&p.cpus);
        opened.extend(p.l3_domains.iter().copied());
    }
    let mut allocations = BTreeMap::new();
    let mut allocated: BTreeMap<usize, u32> = BTreeMap::new();
    for p in placements.iter() {
        let Some(consumer) = consumers.get(&p.vm_id) else {
            continue;
        };
        let mut per_l3 = BTreeMap::new();
        // Floating VMs share their cores with other floating VMs: their CPUs
        // are not the VM's alone and count in `reserved`.
        if p.exclusive {
            for &d in &p.l3_domains {
                if let Some(dom) = topo.l3_domains.get(d) {
                    let n = count(&p.cpus.intersection(&dom.cpus));
                    if n > 0 {
                        per_l3.insert(d, n);
                        *allocated.entry(d).or_default() += n;
                    }
                }
            }
        }
        allocations.insert(
            consumer.uuid.clone(),
            DesiredAllocation {
                vm_id: p.vm_id.clone(),
                consumer: consumer.clone(),
                per_l3,
            },
        );
    }
    let l3 = topo
        .l3_domains
        .iter()
        .map(|d| {
            let used = count(&in_use.intersection(&d.cpus));
            let pool_trait = if confidential.contains(&d.index) {
                POOL_CONFIDENTIAL
            } else if opened.contains(&d.index) {
                POOL_GENERAL
            } else {
                POOL_EMPTY
            };
            L3Provider {
                name: names.l3(d.index),
                index: d.index,
                numa: d.numa,
                total: count(&d.cpus),
                reserved: used.saturating_sub(allocated.get(&d.index).copied().unwrap_or(0)),
                open_reserved: u32::from(opened.contains(&d.index)),
                pool_trait,
            }
        })
        .collect();
    let mut nodes: Vec<u32> = topo.l3_domains.iter().map(|d| d.numa).collect();
    nodes.sort_unstable();
    nodes.dedup();
    DesiredTree {
        numa: nodes.into_iter().map(|n| (names.numa(n), n)).collect(),
        names,
        root_traits: root_traits(facts),
        l3,
        allocations,
    }
}
