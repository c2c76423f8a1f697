//! The decision: a per-domain view of the host built from the placements,
//! the order in which domains are tried, and the choice of cores.

use std::cmp::Reverse;

use super::{
    CapacitySummary, ClassCapacity, FreeCpus, PlaceError, Placement, PlacementRequest,
    PlacementState, Pool, Reservations, SizeFit, COMMON_SIZES,
};
use crate::cpuset::CpuSet;
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

/// One physical core as the engine sees it.
#[derive(Debug, Clone)]
struct CoreView {
    index: usize,
    /// SMT threads (online CPUs) of the core.
    threads: u32,
    /// CPUs a floating VM may use on this core (not reserved, not isolated).
    shared_cpus: CpuSet,
    /// Floating vCPUs the core carries at most.
    shared_capacity: u32,
    /// Floating vCPUs placed on it.
    load: u32,
    /// Held by an exclusive VM.
    owned: bool,
    /// Has a reserved CPU: never given to an exclusive VM.
    reserved: bool,
}

impl CoreView {
    fn free_for_exclusive(&self) -> bool {
        !self.owned && !self.reserved && self.load == 0
    }

    fn spare(&self) -> u32 {
        if self.owned {
            0
        } else {
            self.shared_capacity.saturating_sub(self.load)
        }
    }
}

/// One L3 domain as the engine sees it.
#[derive(Debug, Clone)]
struct DomainView {
    index: usize,
    numa: u32,
    cores: Vec<CoreView>,
    confidential_vms: u32,
    general_vms: u32,
}

impl DomainView {
    fn is_empty(&self) -> bool {
        self.confidential_vms == 0 && self.general_vms == 0
    }

    /// Room for a VM, in vCPUs: threads of free cores for an exclusive VM,
    /// spare floating capacity for a shared one.
    fn room(&self, exclusive: bool) -> u32 {
        if exclusive {
            self.cores
                .iter()
                .filter(|c| c.free_for_exclusive())
                .map(|c| c.threads)
                .sum()
        } else {
            self.cores.iter().map(CoreView::spare).sum()
        }
    }

    /// Holds VMs of the pool other than `pool`.
    fn holds_other(&self, pool: Pool) -> bool {
        match pool {
            Pool::Confidential => self.general_vms > 0,
            Pool::General => self.confidential_vms > 0,
        }
    }

    fn holds_own(&self, pool: Pool) -> bool {
        match pool {
            Pool::Confidential => self.confidential_vms > 0,
            Pool::General => self.general_vms > 0,
        }
    }
}

/// The host as the engine sees it: one view per L3 domain.
#[derive(Debug, Clone)]
struct HostView<'t> {
    topo: &'t Topology,
    domains: Vec<DomainView>,
    /// `core index -> (domain, position in that domain's cores)`.
    core_at: Vec<(usize, usize)>,
}

/// A domain taken by a decision: the cores and the vCPUs put on each.
#[derive(Debug, Clone)]
struct Take {
    domain: usize,
    cores: Vec<(usize, u32)>,
}

#[derive(Debug, Clone)]
struct Choice {
    takes: Vec<Take>,
    mixes_pools: bool,
}

/// Which domains a stage may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// Domains that already hold this pool's VMs and none of the other's.
    OwnPool,
    /// `OwnPool` plus empty domains.
    OwnOrEmpty,
    /// Every domain (mixing pools; reported).
    Any,
}

/// The shape of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One L3 domain.
    Single,
    /// The fewest domains of one NUMA node.
    OneNode,
    /// The fewest domains anywhere.
    AnyNodes,
}

impl<'t> HostView<'t> {
    fn build(topo: &'t Topology, state: &PlacementState, reservations: &Reservations) -> Self {
        let ratio = reservations.shared_vcpus_per_cpu;
        let mut core_at = vec![(0, 0); topo.cores.len()];
        let mut domains: Vec<DomainView> = topo
            .l3_domains
            .iter()
            .map(|d| {
                let cores = d
                    .cores
                    .iter()
                    .enumerate()
                    .map(|(pos, &ci)| {
                        core_at[ci] = (d.index, pos);
                        let cpus = &topo.cores[ci].cpus;
                        let shared_cpus: CpuSet = cpus
                            .iter()
                            .filter(|&c| {
                                !reservations.host.contains(c) && !topo.isolated.contains(c)
                            })
                            .collect();
                        CoreView {
                            index: ci,
                            threads: cpus.len() as u32,
                            shared_capacity: shared_cpus.len() as u32 * ratio,
                            shared_cpus,
                            load: 0,
                            owned: false,
                            reserved: !cpus.is_disjoint(&reservations.host),
                        }
                    })
                    .collect();
                DomainView {
                    index: d.index,
                    numa: d.numa,
                    cores,
                    confidential_vms: 0,
                    general_vms: 0,
                }
            })
            .collect();
        for p in state.iter() {
            for (&ci, &n) in p.cores.iter().zip(&p.vcpus_per_core) {
                let Some(&(d, pos)) = core_at.get(ci) else {
                    continue;
                };
                let core = &mut domains[d].cores[pos];
                if p.exclusive {
                    core.owned = true;
                } else {
                    core.load += n;
                }
            }
            for &d in &p.l3_domains {
                if let Some(v) = domains.get_mut(d) {
                    match p.pool {
                        Pool::Confidential => v.confidential_vms += 1,
                        Pool::General => v.general_vms += 1,
                    }
                }
            }
        }
        Self {
            topo,
            domains,
            core_at,
        }
    }

    fn in_tier(&self, d: &DomainView, pool: Pool, tier: Tier) -> bool {
        match tier {
            Tier::OwnPool => d.holds_own(pool) && !d.holds_other(pool),
            Tier::OwnOrEmpty => !d.holds_other(pool),
            Tier::Any => true,
        }
    }

    /// Tie order between domains of equal room: general VMs fill from the
    /// lowest index, confidential VMs from the highest, so the two pools
    /// meet only when the host is nearly full.
    fn tie_key(pool: Pool, index: usize) -> usize {
        match pool {
            Pool::General => index,
            Pool::Confidential => usize::MAX - index,
        }
    }

    /// Decides where `req` goes, or `None` when nothing fits.
    fn choose(&self, req: &PlacementRequest, allow_mixing: bool) -> Option<Choice> {
        let pool = req.pool();
        let exclusive = req.exclusive_cores();
        let stages: &[(Shape, &[Tier])] = match pool {
            Pool::Confidential => &[
                (Shape::Single, &[Tier::OwnPool, Tier::OwnOrEmpty]),
                (Shape::OneNode, &[Tier::OwnPool, Tier::OwnOrEmpty]),
                (Shape::AnyNodes, &[Tier::OwnPool, Tier::OwnOrEmpty]),
                (Shape::Single, &[Tier::Any]),
                (Shape::OneNode, &[Tier::Any]),
                (Shape::AnyNodes, &[Tier::Any]),
            ],
            Pool::General => &[
                (Shape::Single, &[Tier::OwnOrEmpty]),
                (Shape::OneNode, &[Tier::OwnOrEmpty]),
                (Shape::AnyNodes, &[Tier::OwnOrEmpty]),
                (Shape::Single, &[Tier::Any]),
                (Shape::OneNode, &[Tier::Any]),
                (Shape::AnyNodes, &[Tier::Any]),
            ],
        };
        for &(shape, tiers) in stages {
            for &tier in tiers {
                if tier == Tier::Any && !allow_mixing {
                    return None;
                }
                let cands: Vec<Cand> = self
                    .domains
                    .iter()
                    .filter(|d| self.in_tier(d, pool, tier))
                    .map(|d| Cand {
                        index: d.index,
                        numa: d.numa,
                        room: d.room(exclusive),
                        empty: d.is_empty(),
                        tie: Self::tie_key(pool, d.index),
                    })
                    .filter(|c| c.room > 0)
                    .collect();
                if let Some(domains) = pick(&cands, req.vcpus, shape, req.numa_preference) {
                    let mixes_pools = domains.iter().any(|&d| self.domains[d].holds_other(pool));
                    return Some(self.take(req, &domains, mixes_pools));
                }
            }
        }
        None
    }

    /// Fills `domains` in order with `req`'s vCPUs: exclusive VMs take free
    /// cores, most threads first; floating VMs fill cores that already carry
    /// floating vCPUs first (packing), then free ones.
    fn take(&self, req: &PlacementRequest, domains: &[usize], mixes_pools: bool) -> Choice {
        let exclusive = req.exclusive_cores();
        let mut left = req.vcpus;
        let mut takes = Vec::new();
        for &di in domains {
            if left == 0 {
                break;
            }
            let d = &self.domains[di];
            let mut cores = Vec::new();
            if exclusive {
                let mut free: Vec<&CoreView> =
                    d.cores.iter().filter(|c| c.free_for_exclusive()).collect();
                free.sort_by_key(|c| (Reverse(c.threads), c.index));
                for c in free {
                    if left == 0 {
                        break;
                    }
                    let n = c.threads.min(left);
                    cores.push((c.index, n));
                    left -= n;
                }
            } else {
                let mut open: Vec<&CoreView> = d.cores.iter().filter(|c| c.spare() > 0).collect();
                open.sort_by_key(|c| (c.load == 0, c.spare(), c.index));
                for c in open {
                    if left == 0 {
                        break;
                    }
                    let n = c.spare().min(left);
                    cores.push((c.index, n));
                    left -= n;
                }
            }
            takes.push(Take { domain: di, cores });
        }
        Choice { takes, mixes_pools }
    }

    /// Records a choice in the view (used by `capacity` to place one VM
    /// after another without building placements).
    fn commit(&mut self, req: &PlacementRequest, choice: &Choice) {
        let exclusive = req.exclusive_cores();
        for t in &choice.takes {
            for &(ci, n) in &t.cores {
                let (d, pos) = self.core_at[ci];
                let core = &mut self.domains[d].cores[pos];
                if exclusive {
                    core.owned = true;
                } else {
                    core.load += n;
                }
            }
            let d = &mut self.domains[t.domain];
            match req.pool() {
                Pool::Confidential => d.confidential_vms += 1,
                Pool::General => d.general_vms += 1,
            }
        }
    }

    fn placement(&self, req: &PlacementRequest, choice: &Choice) -> Placement {
        let exclusive = req.exclusive_cores();
        let mut cpus = CpuSet::new();
        let mut ordered: Vec<u32> = Vec::new();
        let mut cores = Vec::new();
        let mut vcpus_per_core = Vec::new();
        for t in &choice.takes {
            for &(ci, n) in &t.cores {
                cores.push(ci);
                vcpus_per_core.push(n);
                if exclusive {
                    let set = &self.topo.cores[ci].cpus;
                    cpus = cpus.union(set);
                    ordered.extend(set.iter());
                } else {
                    let (d, pos) = self.core_at[ci];
                    cpus = cpus.union(&self.domains[d].cores[pos].shared_cpus);
                }
            }
        }
        let vcpu_cpus: Vec<CpuSet> = if req.dedicated {
            ordered
                .iter()
                .take(req.vcpus as usize)
                .map(|&c| [c].into_iter().collect())
                .collect()
        } else {
            vec![cpus.clone(); req.vcpus as usize]
        };
        let l3_domains: Vec<usize> = choice.takes.iter().map(|t| t.domain).collect();
        let mut numa_nodes: Vec<u32> = l3_domains.iter().map(|&d| self.domains[d].numa).collect();
        numa_nodes.sort_unstable();
        numa_nodes.dedup();
        Placement {
            vm_id: req.vm_id.clone(),
            cpus,
            vcpu_cpus,
            vcpus_per_domain: choice
                .takes
                .iter()
                .map(|t| t.cores.iter().map(|c| c.1).sum())
                .collect(),
            l3_domains,
            numa_nodes,
            cores,
            vcpus_per_core,
            pool: req.pool(),
            exclusive,
            shares_confidential_domain: choice.mixes_pools,
            request: req.clone(),
        }
    }

    fn free_cpus(&self) -> FreeCpus {
        let sum = |pool| {
            self.domains
                .iter()
                .filter(|d| !d.holds_other(pool))
                .map(|d| d.room(true))
                .sum()
        };
        FreeCpus {
            confidential: sum(Pool::Confidential),
            general: sum(Pool::General),
        }
    }
}

/// A candidate domain for one stage.
#[derive(Debug, Clone, Copy)]
struct Cand {
    index: usize,
    numa: u32,
    room: u32,
    empty: bool,
    tie: usize,
}

/// Subsets searched exhaustively before falling back to greedy.
const MAX_SUBSETS: u64 = 4096;

/// Chooses domains among `cands` for `need` vCPUs in the given shape.
fn pick(cands: &[Cand], need: u32, shape: Shape, numa_pref: Option<u32>) -> Option<Vec<usize>> {
    match shape {
        Shape::Single => {
            let best = |filter: &dyn Fn(&Cand) -> bool| {
                cands
                    .iter()
                    .filter(|c| c.room >= need && filter(c))
                    .min_by_key(|c| (c.room, c.tie))
                    .map(|c| vec![c.index])
            };
            if let Some(n) = numa_pref {
                if let Some(v) = best(&|c: &Cand| c.numa == n) {
                    return Some(v);
                }
            }
            best(&|_| true)
        }
        Shape::OneNode => {
            let mut nodes: Vec<u32> = cands.iter().map(|c| c.numa).collect();
            nodes.sort_unstable();
            nodes.dedup();
            if let Some(n) = numa_pref {
                let in_pref: Vec<Cand> = cands.iter().copied().filter(|c| c.numa == n).collect();
                if let Some((_, v)) = fewest(&in_pref, need) {
                    return Some(v);
                }
            }
            let mut best: Option<(NodeScore, Vec<usize>)> = None;
            for n in nodes {
                let in_node: Vec<Cand> = cands.iter().copied().filter(|c| c.numa == n).collect();
                if let Some((score, v)) = fewest(&in_node, need) {
                    let tie = in_node.iter().map(|c| c.tie).min().unwrap_or(0);
                    let key = (score.0, score.1, score.2, tie);
                    if best.as_ref().is_none_or(|(k, _)| key < *k) {
                        best = Some((key, v));
                    }
                }
            }
            best.map(|(_, v)| v)
        }
        Shape::AnyNodes => fewest(cands, need).map(|(_, v)| v),
    }
}

/// The fewest domains whose room covers `need`; among those, the set that
/// uses the fewest empty domains, then wastes the least room. Returns the
/// score `(count, empty domains, leftover)` and the domains, roomiest first.
fn fewest(cands: &[Cand], need: u32) -> Option<((usize, usize, u32), Vec<usize>)> {
    let mut sorted: Vec<Cand> = cands.to_vec();
    sorted.sort_by_key(|c| (Reverse(c.room), c.tie));
    let mut sum = 0u64;
    let mut k = 0usize;
    for c in &sorted {
        if sum >= u64::from(need) {
            break;
        }
        sum += u64::from(c.room);
        k += 1;
    }
    if sum < u64::from(need) || k == 0 {
        return None;
    }
    let chosen: Vec<Cand> = if binomial(sorted.len() as u64, k as u64) <= MAX_SUBSETS {
        let mut best: Best = None;
        let mut cur = Vec::with_capacity(k);
        search(&sorted, 0, k, need, &mut cur, &mut best);
        best.map(|(_, v)| v)?
    } else {
        // Greedy: the k-1 roomiest, then the tightest domain that covers
        // the rest.
        let head: Vec<Cand> = sorted[..k - 1].to_vec();
        let got: u32 = head.iter().map(|c| c.room).sum();
        let rest = need.saturating_sub(got);
        let last = sorted[k - 1..]
            .iter()
            .filter(|c| c.room >= rest)
            .min_by_key(|c| (c.room, c.tie))
            .copied()?;
        head.into_iter().chain(std::iter::once(last)).collect()
    };
    let empties = chosen.iter().filter(|c| c.empty).count();
    let leftover = chosen.iter().map(|c| c.room).sum::<u32>() - need;
    let mut ordered = chosen;
    ordered.sort_by_key(|c| (Reverse(c.room), c.tie));
    Some((
        (k, empties, leftover),
        ordered.iter().map(|c| c.index).collect(),
    ))
}

/// Best subset so far: (empty domains, leftover, sorted tie keys) and the
/// subset.
type Best = Option<((usize, u32, Vec<usize>), Vec<Cand>)>;

/// Score of a node's best set: (domains, empty domains, leftover, tie).
type NodeScore = (usize, usize, u32, usize);

/// Exhaustive search over `k`-subsets of `cands` (sorted roomiest first)
/// that cover `need`, keeping the one with the fewest empty domains, then
/// the least leftover, then the lowest tie keys.
fn search(cands: &[Cand], from: usize, k: usize, need: u32, cur: &mut Vec<Cand>, best: &mut Best) {
    if cur.len() == k {
        let sum: u32 = cur.iter().map(|c| c.room).sum();
        if sum < need {
            return;
        }
        let mut ties: Vec<usize> = cur.iter().map(|c| c.tie).collect();
        ties.sort_unstable();
        let key = (cur.iter().filter(|c| c.empty).count(), sum - need, ties);
        if best.as_ref().is_none_or(|(b, _)| key < *b) {
            *best = Some((key, cur.clone()));
        }
        return;
    }
    for i in from..cands.len() {
        if cands.len() - i < k - cur.len() {
            break;
        }
        cur.push(cands[i]);
        search(cands, i + 1, k, need, cur, best);
        cur.pop();
    }
}

fn binomial(n: u64, k: u64) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut r: u64 = 1;
    for i in 0..k {
        r = r.saturating_mul(n - i) / (i + 1);
        if r > MAX_SUBSETS {
            return r;
        }
    }
    r
}

fn validate(
    topo: &Topology,
    reservations: &Reservations,
    req: &PlacementRequest,
) -> Result<(), PlaceError> {
    if req.vcpus == 0 {
        return Err(PlaceError::InvalidRequest {
            field: "vcpus",
            reason: "must be at least 1".into(),
        });
    }
    let online = topo.online.len();
    if req.vcpus as usize > online {
        return Err(PlaceError::InvalidRequest {
            field: "vcpus",
            reason: format!("{} exceeds the host's {online} online CPUs", req.vcpus),
        });
    }
    if let Some(n) = req.numa_preference {
        if !topo.numa_nodes.iter().any(|node| node.id == n) {
            let known: Vec<String> = topo.numa_nodes.iter().map(|n| n.id.to_string()).collect();
            return Err(PlaceError::InvalidRequest {
                field: "numa_preference",
                reason: format!("NUMA node {n} does not exist (nodes: {})", known.join(",")),
            });
        }
    }
    if reservations.shared_vcpus_per_cpu == 0 {
        return Err(PlaceError::InvalidRequest {
            field: "shared_vcpus_per_cpu",
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// Decides where `req` goes. Does not change `state`; record the result
/// with [`PlacementState::apply`]. A VM already placed with the same request
/// gets its placement back; with a different request, `Conflict`.
pub fn place(
    topo: &Topology,
    state: &PlacementState,
    reservations: &Reservations,
    req: &PlacementRequest,
) -> Result<Placement, PlaceError> {
    if let Some(p) = state.get(&req.vm_id) {
        if p.request == *req {
            return Ok(p.clone());
        }
        return Err(PlaceError::Conflict {
            vm_id: req.vm_id.clone(),
            reason: format!(
                "already placed with {} {} vCPUs ({}); release it first",
                p.request.vcpus,
                p.request.class,
                if p.request.dedicated {
                    "dedicated"
                } else {
                    "shared"
                }
            ),
        });
    }
    validate(topo, reservations, req)?;
    let view = HostView::build(topo, state, reservations);
    match view.choose(req, true) {
        Some(choice) => Ok(view.placement(req, &choice)),
        None => Err(PlaceError::NotEnoughCapacity {
            class: req.class,
            dedicated: req.dedicated,
            requested: req.vcpus,
            free: view.free_cpus(),
        }),
    }
}

fn probe_request(class: ConfidentialClass, vcpus: u32) -> Option<PlacementRequest> {
    Some(PlacementRequest {
        vm_id: VmId::new("capacity-probe").ok()?,
        vcpus,
        class,
        dedicated: true,
        numa_preference: None,
    })
}

/// Room left per class, computed by placing dedicated probe VMs on a copy
/// of the host view (the same decisions `place` would make), counting only
/// placements that do not mix pools.
pub fn capacity(
    topo: &Topology,
    state: &PlacementState,
    reservations: &Reservations,
) -> CapacitySummary {
    let view = HostView::build(topo, state, reservations);
    let free = view.free_cpus();
    let online = topo.online.len() as u32;
    let mut classes = Vec::new();
    for class in ConfidentialClass::ALL {
        let pool = Pool::of(class);
        let mut fits = Vec::new();
        for vcpus in COMMON_SIZES {
            let mut count = 0;
            if let Some(req) = probe_request(class, vcpus) {
                let mut v = view.clone();
                while let Some(choice) = v.choose(&req, false) {
                    v.commit(&req, &choice);
                    count += 1;
                }
            }
            fits.push(SizeFit { vcpus, count });
        }
        // Largest placeable size: binary search (placeable sizes are
        // downward closed: any fitting set of cores also fits fewer vCPUs).
        let (mut lo, mut hi) = (0u32, online);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            let fits_mid =
                probe_request(class, mid).is_some_and(|r| view.choose(&r, false).is_some());
            if fits_mid {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        classes.push(ClassCapacity {
            class,
            pool,
            free_cpus: match pool {
                Pool::Confidential => free.confidential,
                Pool::General => free.general,
            },
            fits,
            largest_vm: lo,
        });
    }
    CapacitySummary {
        classes,
        confidential_domains: state.confidential_domains(),
        empty_domains: view
            .domains
            .iter()
            .filter(|d| d.is_empty())
            .map(|d| d.index)
            .collect(),
    }
}
