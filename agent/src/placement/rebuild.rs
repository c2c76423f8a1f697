//! The engine's placement of a stored decision: the request and the CPUs
//! decided, turned back into the topology indices (cores, L3 domains) the
//! engine counts with, on the topology the host has now.
//!
//! The checkpoint stores CPU ids, never indices, so a decision means the
//! same thing on any topology; whether it still fits this one is checked
//! here: every CPU online, a confidential VM's cores still whole, its CPUs
//! still grouped into the same L3 domains and on the same NUMA nodes.

use std::collections::BTreeMap;

use super::{Placement, PlacementRequest, PlacementState, Pool, Reservations};
use crate::cpuset::{count_u32, CpuSet};
use crate::topology::Topology;

/// What the checkpoint holds of one decision, in CPU ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decided<'a> {
    /// Every CPU the VM may run on.
    pub(crate) cpus: &'a CpuSet,
    /// One set per vCPU, by index.
    pub(crate) vcpu_cpus: &'a [CpuSet],
    /// The VM's CPUs grouped by the L3 domain they were in when decided,
    /// in the order the vCPUs fill them; empty when not recorded (format
    /// version 1), then the topology's grouping is taken as is.
    pub(crate) l3_groups: &'a [CpuSet],
    /// NUMA node ids of those L3 domains, ascending; empty when not
    /// recorded (a version 1 intent without its engine placement).
    pub(crate) numa_nodes: &'a [u32],
    /// The VM was placed in a domain of the other pool.
    pub(crate) shares_confidential_domain: bool,
}

/// Why a stored decision does not describe the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Misfit {
    /// CPUs of the decision that are not online (empty when all are).
    pub(crate) missing: CpuSet,
    pub(crate) reason: String,
}

fn misfit(reason: String) -> Misfit {
    Misfit {
        missing: CpuSet::new(),
        reason,
    }
}

/// The placement of `decided` for `request` on `topo`, counted against
/// `placed` (the decisions rebuilt before it), or why it no longer fits.
///
/// The floating vCPUs of a shared VM are not stored per core: they are
/// counted on the VM's cores lowest first, each up to its spare room (on
/// the threads of the VM's set) after the VMs rebuilt before, and what is
/// left on the cores up to what they carry at most, then on the last core.
/// The VM's CPU set and its total stay exactly as decided.
pub(crate) fn rebuild(
    topo: &Topology,
    placed: &PlacementState,
    reservations: &Reservations,
    request: &PlacementRequest,
    decided: Decided<'_>,
) -> Result<Placement, Misfit> {
    let all = decided
        .vcpu_cpus
        .iter()
        .fold(decided.cpus.clone(), |acc, s| acc.union(s));
    let missing = all.difference(&topo.online);
    if !missing.is_empty() {
        return Err(Misfit {
            reason: format!("CPUs {missing} are not online"),
            missing,
        });
    }
    if decided.vcpu_cpus.len() != request.vcpus as usize {
        return Err(misfit(format!(
            "{} vCPU sets stored for {} vCPUs",
            decided.vcpu_cpus.len(),
            request.vcpus
        )));
    }
    if let Some(s) = decided
        .vcpu_cpus
        .iter()
        .find(|s| s.is_empty() || !s.is_subset(decided.cpus))
    {
        return Err(misfit(format!(
            "a vCPU set {s} is empty or outside the VM's CPUs {}",
            decided.cpus
        )));
    }
    let pool = request.pool();
    let exclusive = request.exclusive_cores();
    // Cores in the order the vCPUs fill them, then any other core of the
    // set ascending.
    let mut cores: Vec<usize> = Vec::new();
    let mut per_core: BTreeMap<usize, u32> = BTreeMap::new();
    let core_of = |c: u32| topo.cpu(c).map(|cpu| cpu.core);
    if exclusive && request.dedicated {
        for set in decided.vcpu_cpus {
            for c in set.iter() {
                let Some(ci) = core_of(c) else { continue };
                if !cores.contains(&ci) {
                    cores.push(ci);
                }
                *per_core.entry(ci).or_default() += 1;
            }
        }
    }
    for c in decided.cpus.iter() {
        if let Some(ci) = core_of(c) {
            if !cores.contains(&ci) {
                cores.push(ci);
            }
        }
    }
    if exclusive && pool == Pool::Confidential {
        // Confidential VMs hold whole cores (an SMT sibling is a side
        // channel).
        if let Some(&ci) = cores
            .iter()
            .find(|&&ci| !topo.cores[ci].cpus.is_subset(decided.cpus))
        {
            return Err(misfit(format!(
                "core {ci} ({}) is no longer a whole core of CPUs {}",
                topo.cores[ci].cpus, decided.cpus
            )));
        }
    }
    let vcpus_per_core: Vec<u32> = if exclusive && request.dedicated {
        cores
            .iter()
            .map(|ci| per_core.get(ci).copied().unwrap_or(0))
            .collect()
    } else if exclusive {
        // A shared sev-snp VM floats over whole cores of its own: its vCPUs
        // count against them in order, as many as each has threads.
        let mut left = request.vcpus;
        cores
            .iter()
            .map(|&ci| {
                let n = count_u32(topo.cores[ci].cpus.len()).min(left);
                left -= n;
                n
            })
            .collect()
    } else {
        floating_counts(
            topo,
            placed,
            reservations,
            decided.cpus,
            &cores,
            request.vcpus,
        )
    };
    let mut l3_domains: Vec<usize> = Vec::new();
    let mut vcpus_per_domain: Vec<u32> = Vec::new();
    for (&ci, &n) in cores.iter().zip(&vcpus_per_core) {
        let d = topo.cores[ci].l3;
        match l3_domains.iter().position(|&x| x == d) {
            Some(pos) => vcpus_per_domain[pos] += n,
            None => {
                l3_domains.push(d);
                vcpus_per_domain.push(n);
            }
        }
    }
    if !decided.l3_groups.is_empty() {
        let mut now: Vec<CpuSet> = l3_domains
            .iter()
            .map(|&d| topo.l3_domains[d].cpus.intersection(decided.cpus))
            .collect();
        let mut then: Vec<CpuSet> = decided
            .l3_groups
            .iter()
            .map(|g| g.intersection(decided.cpus))
            .collect();
        now.sort();
        then.sort();
        if now != then {
            return Err(misfit(format!(
                "its CPUs {} now form L3 domains {:?}, not {}",
                decided.cpus,
                topo.l3_domains_of(decided.cpus),
                decided
                    .l3_groups
                    .iter()
                    .map(|g| format!("[{g}]"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        }
    }
    let mut numa_nodes: Vec<u32> = l3_domains
        .iter()
        .map(|&d| topo.l3_domains[d].numa)
        .collect();
    numa_nodes.sort_unstable();
    numa_nodes.dedup();
    let mut recorded = decided.numa_nodes.to_vec();
    recorded.sort_unstable();
    recorded.dedup();
    if !recorded.is_empty() && numa_nodes != recorded {
        return Err(misfit(format!(
            "its L3 domains are now on NUMA nodes {numa_nodes:?}, not {recorded:?}"
        )));
    }
    Ok(Placement {
        vm_id: request.vm_id.clone(),
        cpus: decided.cpus.clone(),
        vcpu_cpus: decided.vcpu_cpus.to_vec(),
        l3_domains,
        vcpus_per_domain,
        cores,
        vcpus_per_core,
        numa_nodes,
        pool,
        exclusive,
        shares_confidential_domain: decided.shares_confidential_domain,
        request: request.clone(),
    })
}

/// Floating vCPUs of a shared VM per core of `cores` (see [`rebuild`]).
fn floating_counts(
    topo: &Topology,
    placed: &PlacementState,
    reservations: &Reservations,
    set: &CpuSet,
    cores: &[usize],
    vcpus: u32,
) -> Vec<u32> {
    // A core counts only the threads of the VM's set: a general VM may float
    // over the free threads of a core that plain dedicated VMs hold part of.
    let capacity: Vec<u32> = cores
        .iter()
        .map(|&ci| {
            let usable = count_u32(
                topo.cores[ci]
                    .cpus
                    .iter()
                    .filter(|&c| {
                        set.contains(c)
                            && !reservations.host.contains(c)
                            && !topo.isolated.contains(c)
                    })
                    .count(),
            );
            usable * reservations.shared_vcpus_per_cpu
        })
        .collect();
    let mut counts = vec![0u32; cores.len()];
    let mut left = vcpus;
    for (i, &ci) in cores.iter().enumerate() {
        let load = placed.occupancy().load_of(ci);
        let used = load[0] + load[1];
        let n = capacity[i].saturating_sub(used).min(left);
        counts[i] += n;
        left -= n;
    }
    for (i, cap) in capacity.iter().enumerate() {
        let n = cap.saturating_sub(counts[i]).min(left);
        counts[i] += n;
        left -= n;
    }
    if let Some(last) = counts.last_mut() {
        *last += left;
    }
    counts
}
