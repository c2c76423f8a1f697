//! Placement models the simulator compares: scheduler-like floating over
//! the whole host, kubelet's static CPU manager policy (SEV-unaware), and
//! the sevplace engine.
//!
//! Every model admits against the same capacity rule (one vCPU per usable
//! CPU, no overcommit), so "VMs that fit" compares packing, not policy
//! knobs.

use std::collections::BTreeMap;

use crate::cpuset::CpuSet;
use crate::placement::{PlacementRequest, PlacementState, Reservations};
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

/// Which placement model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PlacementModelKind {
    /// Every vCPU may run on every usable host CPU (no pinning).
    Floating,
    /// kubelet static CPU manager: exclusive CPUs from
    /// takeByTopologyNUMAPacked with uncore-cache alignment, shared VMs in
    /// the shared pool; unaware of confidential classes.
    KubeletStatic,
    /// The sevplace engine (`crate::placement`).
    Sevplace,
}

impl PlacementModelKind {
    pub(crate) const ALL: [Self; 3] = [Self::Floating, Self::KubeletStatic, Self::Sevplace];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Floating => "floating",
            Self::KubeletStatic => "kubelet-static",
            Self::Sevplace => "sevplace",
        }
    }
}

/// What the simulator asks a model to place.
#[derive(Debug, Clone)]
pub(crate) struct VmSpec {
    pub(crate) vm: VmId,
    pub(crate) vcpus: u32,
    pub(crate) class: ConfidentialClass,
    pub(crate) dedicated: bool,
}

/// Where an admitted VM's vCPUs may run.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    /// Allowed CPUs per vCPU; `None` means "the model's shared pool now"
    /// (it changes as exclusive allocations come and go).
    pub(crate) per_vcpu: Vec<Option<CpuSet>>,
    /// The VM's own CPUs, when it holds them exclusively.
    pub(crate) exclusive: Option<CpuSet>,
    /// The engine reported mixing pools in an L3 domain.
    pub(crate) shares_confidential_domain: bool,
}

/// A placement model.
pub(crate) trait PlacementModel {
    /// Places a VM, or `None` when it does not fit.
    fn admit(&mut self, vm: &VmSpec) -> Option<Admitted>;
    fn release(&mut self, vm: &VmId);
    /// The shared pool, for vCPUs whose set is `None`.
    fn shared_pool(&self) -> CpuSet;
}

/// The scheduler left alone: all usable CPUs for everyone.
#[derive(Debug, Clone)]
pub(crate) struct Floating {
    usable: CpuSet,
    vcpus: BTreeMap<VmId, u32>,
}

impl Floating {
    /// Usable: online, not reserved, not isolated (the scheduler does not
    /// balance onto isolated CPUs).
    pub(crate) fn new(topo: &Topology, res: &Reservations) -> Self {
        Self {
            usable: topo.online.difference(&res.host).difference(&topo.isolated),
            vcpus: BTreeMap::new(),
        }
    }
}

impl PlacementModel for Floating {
    fn admit(&mut self, vm: &VmSpec) -> Option<Admitted> {
        let used: u32 = self.vcpus.values().sum();
        if (used + vm.vcpus) as usize > self.usable.len() {
            return None;
        }
        self.vcpus.insert(vm.vm.clone(), vm.vcpus);
        Some(Admitted {
            per_vcpu: vec![Some(self.usable.clone()); vm.vcpus as usize],
            exclusive: None,
            shares_confidential_domain: false,
        })
    }

    fn release(&mut self, vm: &VmId) {
        self.vcpus.remove(vm);
    }

    fn shared_pool(&self) -> CpuSet {
        self.usable.clone()
    }
}

/// kubelet's static policy: dedicated VMs get exclusive CPUs chosen by
/// [`take_by_topology_numa_packed`]; shared VMs float over the shared pool
/// (usable CPUs minus every exclusive set); the container, not each vCPU,
/// is confined, so a dedicated VM's vCPUs float within its exclusive set.
#[derive(Debug, Clone)]
pub(crate) struct KubeletStatic<'t> {
    topo: &'t Topology,
    usable: CpuSet,
    exclusive: BTreeMap<VmId, CpuSet>,
    requests: BTreeMap<VmId, u32>,
}

impl<'t> KubeletStatic<'t> {
    pub(crate) fn new(topo: &'t Topology, res: &Reservations) -> Self {
        Self {
            topo,
            usable: topo.online.difference(&res.host),
            exclusive: BTreeMap::new(),
            requests: BTreeMap::new(),
        }
    }
}

impl PlacementModel for KubeletStatic<'_> {
    fn admit(&mut self, vm: &VmSpec) -> Option<Admitted> {
        // Node allocatable: the sum of requests stays within usable CPUs.
        let requested: u32 = self.requests.values().sum();
        if (requested + vm.vcpus) as usize > self.usable.len() {
            return None;
        }
        let (per_vcpu, exclusive) = if vm.dedicated {
            let available = self.shared_pool();
            let set = take_by_topology_numa_packed(self.topo, &available, vm.vcpus as usize)?;
            self.exclusive.insert(vm.vm.clone(), set.clone());
            (vec![Some(set.clone()); vm.vcpus as usize], Some(set))
        } else {
            (vec![None; vm.vcpus as usize], None)
        };
        self.requests.insert(vm.vm.clone(), vm.vcpus);
        Some(Admitted {
            per_vcpu,
            exclusive,
            shares_confidential_domain: false,
        })
    }

    fn release(&mut self, vm: &VmId) {
        self.exclusive.remove(vm);
        self.requests.remove(vm);
    }

    fn shared_pool(&self) -> CpuSet {
        self.exclusive
            .values()
            .fold(self.usable.clone(), |pool, set| pool.difference(set))
    }
}

/// The sevplace engine, through `PlacementState::place`.
#[derive(Debug, Clone)]
pub(crate) struct Sevplace<'t> {
    topo: &'t Topology,
    res: Reservations,
    state: PlacementState,
}

impl<'t> Sevplace<'t> {
    pub(crate) fn new(topo: &'t Topology, res: &Reservations) -> Self {
        Self {
            topo,
            res: res.clone(),
            state: PlacementState::new(),
        }
    }

    pub(crate) fn state(&self) -> &PlacementState {
        &self.state
    }
}

impl PlacementModel for Sevplace<'_> {
    fn admit(&mut self, vm: &VmSpec) -> Option<Admitted> {
        let req = PlacementRequest {
            vm_id: vm.vm.clone(),
            vcpus: vm.vcpus,
            class: vm.class,
            dedicated: vm.dedicated,
            numa_preference: None,
        };
        let p = self.state.place(self.topo, &self.res, &req).ok()?;
        Some(Admitted {
            per_vcpu: p.vcpu_cpus.iter().cloned().map(Some).collect(),
            exclusive: p.exclusive.then(|| p.cpus.clone()),
            shares_confidential_domain: p.shares_confidential_domain,
        })
    }

    fn release(&mut self, vm: &VmId) {
        self.state.release(vm);
    }

    /// Unused: every sevplace vCPU has its own allowed set.
    fn shared_pool(&self) -> CpuSet {
        CpuSet::new()
    }
}

// ---- kubelet's cpu_assignment.go, takeByTopologyNUMAPacked ----

/// The state of one allocation, as kubelet's `cpuAccumulator`.
struct Accumulator<'t> {
    topo: &'t Topology,
    available: CpuSet,
    result: CpuSet,
    needed: usize,
    /// kubelet's NUMA-vs-socket order: NUMA nodes first when there are at
    /// least as many sockets as nodes (`numaFirst`), else sockets first.
    numa_first: bool,
}

impl<'t> Accumulator<'t> {
    fn satisfied(&self) -> bool {
        self.needed == 0
    }

    fn needs_at_least(&self, n: usize) -> bool {
        self.needed >= n
    }

    fn take(&mut self, cpus: &CpuSet) {
        self.result = self.result.union(cpus);
        self.available = self.available.difference(cpus);
        self.needed = self.needed.saturating_sub(cpus.len());
    }

    fn avail_in(&self, set: &CpuSet) -> usize {
        set.intersection(&self.available).len()
    }

    /// Sorts ids by available CPUs ascending, then id (kubelet's `sort`).
    fn sort_by_avail<K: Ord + Copy>(&self, ids: &mut [K], cpus_of: impl Fn(K) -> CpuSet) {
        ids.sort_by_key(|&id| (self.avail_in(&cpus_of(id)), id));
    }

    fn node_cpus(&self, node: u32) -> CpuSet {
        self.topo
            .numa_nodes
            .iter()
            .find(|n| n.id == node)
            .map(|n| n.cpus.clone())
            .unwrap_or_default()
    }

    fn socket_cpus(&self, socket: u32) -> CpuSet {
        self.topo
            .cpus
            .iter()
            .filter(|c| c.package == socket)
            .map(|c| c.id)
            .collect()
    }

    fn sockets(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .topo
            .cpus
            .iter()
            .filter(|c| self.available.contains(c.id))
            .map(|c| c.package)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// NUMA nodes with available CPUs, in kubelet's order.
    fn sorted_nodes(&self) -> Vec<u32> {
        let with_avail = |ids: Vec<u32>| -> Vec<u32> {
            ids.into_iter()
                .filter(|&n| self.avail_in(&self.node_cpus(n)) > 0)
                .collect()
        };
        if self.numa_first {
            let mut nodes = with_avail(self.topo.numa_nodes.iter().map(|n| n.id).collect());
            self.sort_by_avail(&mut nodes, |n| self.node_cpus(n));
            nodes
        } else {
            let mut sockets = self.sockets();
            self.sort_by_avail(&mut sockets, |s| self.socket_cpus(s));
            let mut out = Vec::new();
            for s in sockets {
                let mut nodes = with_avail(
                    self.topo
                        .numa_nodes
                        .iter()
                        .filter(|n| {
                            n.cpus
                                .iter()
                                .any(|c| self.topo.cpu(c).is_some_and(|x| x.package == s))
                        })
                        .map(|n| n.id)
                        .collect(),
                );
                self.sort_by_avail(&mut nodes, |n| self.node_cpus(n));
                out.extend(nodes);
            }
            out
        }
    }

    fn sorted_sockets(&self) -> Vec<u32> {
        let mut sockets = self.sockets();
        self.sort_by_avail(&mut sockets, |s| self.socket_cpus(s));
        sockets
    }

    /// Cores with available CPUs: node by node in kubelet's node order,
    /// within a node by available CPUs ascending, then by core id (kubelet
    /// numbers a core by its lowest CPU).
    fn sorted_cores(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for n in self.sorted_nodes() {
            let mut cores: Vec<usize> = self
                .topo
                .cores
                .iter()
                .filter(|c| c.numa == n && self.avail_in(&c.cpus) > 0)
                .map(|c| c.index)
                .collect();
            cores.sort_by_key(|&ci| {
                let c = &self.topo.cores[ci];
                (self.avail_in(&c.cpus), c.cpus.first().unwrap_or(0))
            });
            out.extend(cores);
        }
        out
    }

    fn take_full_nodes(&mut self) {
        for n in self.sorted_nodes() {
            let cpus = self.node_cpus(n);
            if cpus.is_subset(&self.available) && self.needs_at_least(cpus.len()) {
                self.take(&cpus);
            }
        }
    }

    fn take_full_sockets(&mut self) {
        for s in self.sorted_sockets() {
            let cpus = self.socket_cpus(s);
            if cpus.is_subset(&self.available) && self.needs_at_least(cpus.len()) {
                self.take(&cpus);
            }
        }
    }

    /// Uncore caches (L3 domains) with available CPUs, per sorted node,
    /// each node's sorted by available CPUs ascending.
    fn sorted_uncores(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for n in self.sorted_nodes() {
            let mut l3: Vec<usize> = self
                .topo
                .l3_domains
                .iter()
                .filter(|d| {
                    d.cpus.iter().any(|c| {
                        self.available.contains(c) && self.topo.cpu(c).is_some_and(|x| x.numa == n)
                    })
                })
                .map(|d| d.index)
                .collect();
            self.sort_by_avail(&mut l3, |d| self.topo.l3_domains[d].cpus.clone());
            out.extend(l3);
        }
        out
    }

    fn take_full_uncore(&mut self) {
        for d in self.sorted_uncores() {
            let cpus = self.topo.l3_domains[d].cpus.clone();
            if !cpus.is_subset(&self.available) || !self.needs_at_least(cpus.len()) {
                continue;
            }
            self.take(&cpus);
        }
    }

    /// kubelet's `takePartialUncore`: the first `needed / cpusPerCore` cores
    /// (by id) of the domain that have available CPUs, plus one more CPU when
    /// SMT is on and the need is odd; taken only if that is exactly the need.
    fn take_partial_uncore(&mut self, d: usize) {
        let cpus_per_core = (self.topo.online.len() / self.topo.cores.len().max(1)).max(1);
        let cores_needed = self.needed / cpus_per_core;
        let mut cores: Vec<&crate::topology::Core> = self.topo.l3_domains[d]
            .cores
            .iter()
            .map(|&ci| &self.topo.cores[ci])
            .filter(|c| self.avail_in(&c.cpus) > 0)
            .collect();
        cores.sort_by_key(|c| c.cpus.first().unwrap_or(0));
        let mut free: CpuSet = cores.iter().take(cores_needed).fold(CpuSet::new(), |s, c| {
            s.union(&c.cpus.intersection(&self.available))
        });
        if self.needed % 2 != 0 && cpus_per_core > 1 {
            let rest = self.topo.l3_domains[d]
                .cpus
                .intersection(&self.available)
                .difference(&free);
            if let Some(c) = rest.first() {
                free.insert(c);
            }
        }
        if free.len() == self.needed {
            self.take(&free);
        }
    }

    fn take_uncore_cache(&mut self) {
        let per_uncore = self.topo.online.len() / self.topo.l3_domains.len().max(1);
        for d in self.sorted_uncores() {
            if self.needs_at_least(per_uncore) {
                self.take_full_uncore();
            }
            if self.satisfied() {
                return;
            }
            self.take_partial_uncore(d);
            if self.satisfied() {
                return;
            }
        }
    }

    fn take_full_cores(&mut self) {
        for ci in self.sorted_cores() {
            let cpus = self.topo.cores[ci].cpus.clone();
            if cpus.is_subset(&self.available) && self.needs_at_least(cpus.len()) {
                self.take(&cpus);
            }
        }
    }

    fn take_remaining_cpus(&mut self) {
        for ci in self.sorted_cores() {
            let cpus = self.topo.cores[ci].cpus.intersection(&self.available);
            for c in cpus.iter() {
                self.take(&[c].into_iter().collect());
                if self.satisfied() {
                    return;
                }
            }
        }
    }
}

/// kubelet's `takeByTopologyNUMAPacked` with `PreferAlignByUncoreCache` on
/// and the packed CPU sorting strategy: whole NUMA nodes / sockets when the
/// request is that large, then whole uncore caches, then the remainder from
/// one uncore cache if one has exactly enough free cores, then whole cores,
/// then single threads filling partly used cores first. `None` when
/// `available` is too small.
pub(crate) fn take_by_topology_numa_packed(
    topo: &Topology,
    available: &CpuSet,
    num_cpus: usize,
) -> Option<CpuSet> {
    let sockets = {
        let mut v: Vec<u32> = topo.cpus.iter().map(|c| c.package).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    let mut acc = Accumulator {
        topo,
        available: available.clone(),
        result: CpuSet::new(),
        needed: num_cpus,
        numa_first: sockets >= topo.numa_nodes.len(),
    };
    if acc.satisfied() {
        return Some(acc.result);
    }
    if num_cpus > available.len() {
        return None;
    }
    if acc.numa_first {
        acc.take_full_nodes();
        if acc.satisfied() {
            return Some(acc.result);
        }
        acc.take_full_sockets();
    } else {
        acc.take_full_sockets();
        if acc.satisfied() {
            return Some(acc.result);
        }
        acc.take_full_nodes();
    }
    if acc.satisfied() {
        return Some(acc.result);
    }
    acc.take_uncore_cache();
    if acc.satisfied() {
        return Some(acc.result);
    }
    acc.take_full_cores();
    if acc.satisfied() {
        return Some(acc.result);
    }
    acc.take_remaining_cpus();
    acc.satisfied().then_some(acc.result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_packs_into_one_uncore_cache() {
        let t = Topology::synthetic(1, 8, 8, 2, 1);
        let all = t.online.clone();
        // 4 CPUs: the partial-uncore step takes two whole cores of domain 0.
        let s = take_by_topology_numa_packed(&t, &all, 4).unwrap();
        assert_eq!(s.to_string(), "0-1,64-65");
        // 16 CPUs: one whole uncore cache.
        let s = take_by_topology_numa_packed(&t, &all, 16).unwrap();
        assert_eq!(s.to_string(), "0-7,64-71");
        // After taking 4, the fullest domain with room (domain 0) gets the next 4.
        let rest = all.difference(&CpuSet::parse("0-1,64-65").unwrap());
        let s = take_by_topology_numa_packed(&t, &rest, 4).unwrap();
        assert_eq!(s.to_string(), "2-3,66-67");
        // 3 CPUs (odd): one core plus one more thread of the same domain.
        let s = take_by_topology_numa_packed(&t, &all, 3).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(t.l3_domains_of(&s), [0]);
        // 20 CPUs: one whole uncore, then 4 from the fullest other domain.
        let s = take_by_topology_numa_packed(&t, &all, 20).unwrap();
        assert_eq!(s.len(), 20);
        assert_eq!(t.l3_domains_of(&s).len(), 2);
        assert!(take_by_topology_numa_packed(&t, &all, 129).is_none());
        // The whole host: the full NUMA node.
        assert_eq!(take_by_topology_numa_packed(&t, &all, 128).unwrap(), all);
    }

    #[test]
    fn kubelet_is_sev_unaware() {
        let t = Topology::synthetic(1, 8, 8, 2, 1);
        let mut k = KubeletStatic::new(&t, &Reservations::default());
        let spec = |id: &str, class| VmSpec {
            vm: VmId::new(id).unwrap(),
            vcpus: 4,
            class,
            dedicated: true,
        };
        let a = k.admit(&spec("a", ConfidentialClass::None)).unwrap();
        let b = k.admit(&spec("b", ConfidentialClass::Sev)).unwrap();
        let (a, b) = (a.exclusive.unwrap(), b.exclusive.unwrap());
        assert_eq!(t.l3_domains_of(&a), t.l3_domains_of(&b));
        assert_eq!(k.shared_pool().len(), 120);
    }
}
