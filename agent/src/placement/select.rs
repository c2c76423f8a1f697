//! The decision: a per-domain view of the host built from the placements,
//! the order in which domains are tried, and the choice of cores.

use std::cmp::Reverse;
use std::ops::Range;

use super::occupancy::{Occupancy, PerPool};
use super::{
    CapacitySummary, ClassCapacity, FreeCpus, PlaceError, Placement, PlacementRequest,
    PlacementState, Pool, Reservations, SizeFit, COMMON_SIZES,
};
use crate::cpuset::{count_u32, CpuSet};
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

/// How a request holds CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Whole physical cores: every SMT sibling goes to the VM (confidential
    /// VMs always; plain ones with `Reservations::whole_cores_for_plain`).
    WholeCores,
    /// Single threads: whole cores while the remaining vCPUs fill one,
    /// then threads of cores other plain VMs hold part of, then of free
    /// cores (kubelet's static policy).
    Threads,
    /// Floating vCPUs of one pool over cores no exclusive VM holds.
    Floating(Pool),
}

impl Claim {
    fn of(req: &PlacementRequest, reservations: &Reservations) -> Self {
        if !req.exclusive_cores() {
            Claim::Floating(req.pool())
        } else if req.pool() == Pool::Confidential || reservations.whole_cores_for_plain {
            Claim::WholeCores
        } else {
            Claim::Threads
        }
    }
}

/// One physical core as the engine sees it.
#[derive(Debug, Clone, Copy)]
struct CoreView {
    index: usize,
    /// SMT threads (online CPUs) of the core.
    threads: u32,
    /// Threads no exclusive VM holds.
    free: u32,
    /// Of those, threads in no floating VM's set.
    open: u32,
    /// Of the free threads, those neither reserved nor isolated: the ones a
    /// floating set may contain.
    usable: u32,
    /// Floating vCPUs the core carries at most: `usable` times
    /// `shared_vcpus_per_cpu`.
    shared_capacity: u32,
    /// Floating vCPUs placed on it, by pool.
    load: PerPool,
    /// Has a reserved CPU: never given to an exclusive VM.
    reserved: bool,
}

impl CoreView {
    fn loaded(&self) -> bool {
        self.load[0] + self.load[1] > 0
    }

    /// Free for a VM that takes whole cores.
    fn whole_free(&self) -> bool {
        !self.reserved && !self.loaded() && self.threads > 0 && self.free == self.threads
    }

    /// Threads a plain dedicated VM may take: free threads in no floating
    /// set, on a core with no reserved CPU and no confidential vCPU (a
    /// confidential VM holds every thread and confidential floating sets
    /// every usable one, so such a thread is next to plain VMs only).
    fn free_threads(&self) -> u32 {
        if self.reserved || self.load[Pool::Confidential.slot()] > 0 {
            0
        } else {
            self.open
        }
    }

    /// Floating vCPUs of `pool` the core can still take, on its threads no
    /// exclusive VM holds: none on a core that carries the other pool's
    /// vCPUs, and for confidential VMs none on a core an exclusive VM holds
    /// part of. A general VM may float over the free threads of a core that
    /// plain dedicated VMs hold part of, as kubelet's shared pool does: only
    /// plain VMs ever hold part of a core (a confidential VM holds every
    /// thread, and `rebuild` refuses a restored one that does not).
    fn spare(&self, pool: Pool) -> u32 {
        if self.load[pool.other().slot()] > 0
            || (pool == Pool::Confidential && self.free < self.threads)
        {
            0
        } else {
            self.shared_capacity
                .saturating_sub(self.load[0] + self.load[1])
        }
    }
}

/// One L3 domain as the engine sees it, with its room kept as counters
/// (recounted from its cores whenever a decision changes them).
#[derive(Debug, Clone)]
struct DomainView {
    index: usize,
    numa: u32,
    /// Positions in `HostView::cores`.
    cores: Range<usize>,
    vms: PerPool,
    whole_room: u32,
    thread_room: u32,
    spare: PerPool,
}

impl DomainView {
    fn is_empty(&self) -> bool {
        self.vms == [0, 0]
    }

    fn recount(&mut self, cores: &[CoreView]) {
        let cores = &cores[self.cores.clone()];
        self.whole_room = cores
            .iter()
            .filter(|c| c.whole_free())
            .map(|c| c.threads)
            .sum();
        self.thread_room = cores.iter().map(CoreView::free_threads).sum();
        self.spare = [
            cores.iter().map(|c| c.spare(Pool::General)).sum(),
            cores.iter().map(|c| c.spare(Pool::Confidential)).sum(),
        ];
    }

    /// Room for a VM, in vCPUs.
    fn room(&self, claim: Claim) -> u32 {
        match claim {
            Claim::WholeCores => self.whole_room,
            Claim::Threads => self.thread_room,
            Claim::Floating(pool) => self.spare[pool.slot()],
        }
    }

    /// Holds VMs of the pool other than `pool`.
    fn holds_other(&self, pool: Pool) -> bool {
        self.vms[pool.other().slot()] > 0
    }

    fn holds_own(&self, pool: Pool) -> bool {
        self.vms[pool.slot()] > 0
    }
}

/// The host as the engine sees it: one view per L3 domain over one flat
/// list of cores, built from the topology and the state's occupancy in
/// O(cores) (no walk over the placements).
#[derive(Debug, Clone)]
struct HostView<'t> {
    topo: &'t Topology,
    /// What the placements held when the view was built (used to name the
    /// threads a new VM gets; `commit` does not update it).
    occ: &'t Occupancy,
    reservations: &'t Reservations,
    cores: Vec<CoreView>,
    domains: Vec<DomainView>,
    /// `core index -> position in cores` (`usize::MAX`: in no domain).
    core_at: Vec<usize>,
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
    /// Chosen by a one-domain stage (best fit in a single domain).
    single: bool,
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
    fn build(
        topo: &'t Topology,
        state: &'t PlacementState,
        reservations: &'t Reservations,
    ) -> Self {
        let occ = state.occupancy();
        let ratio = reservations.shared_vcpus_per_cpu;
        let mut cores = Vec::with_capacity(topo.cores.len());
        let mut core_at = vec![usize::MAX; topo.cores.len()];
        let mut domains = Vec::with_capacity(topo.l3_domains.len());
        for d in &topo.l3_domains {
            let start = cores.len();
            for &ci in &d.cores {
                let Some(core) = topo.cores.get(ci) else {
                    continue;
                };
                core_at[ci] = cores.len();
                let (mut threads, mut free, mut open, mut usable, mut reserved) =
                    (0u32, 0u32, 0u32, 0u32, false);
                for c in core.cpus.iter() {
                    threads += 1;
                    let r = reservations.host.contains(c);
                    reserved |= r;
                    if occ.held.contains(c) {
                        continue;
                    }
                    free += 1;
                    if !occ.in_floating_set(c) {
                        open += 1;
                    }
                    if !r && !topo.isolated.contains(c) {
                        usable += 1;
                    }
                }
                cores.push(CoreView {
                    index: ci,
                    threads,
                    free,
                    open,
                    usable,
                    shared_capacity: usable * ratio,
                    load: occ.load_of(ci),
                    reserved,
                });
            }
            let mut view = DomainView {
                index: d.index,
                numa: d.numa,
                cores: start..cores.len(),
                vms: occ.vms_in(d.index),
                whole_room: 0,
                thread_room: 0,
                spare: [0, 0],
            };
            view.recount(&cores);
            domains.push(view);
        }
        Self {
            topo,
            occ,
            reservations,
            cores,
            domains,
            core_at,
        }
    }

    fn claim(&self, req: &PlacementRequest) -> Claim {
        Claim::of(req, self.reservations)
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
        let claim = self.claim(req);
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
        let mut cands: Vec<Cand> = Vec::with_capacity(self.domains.len());
        for &(shape, tiers) in stages {
            for &tier in tiers {
                if tier == Tier::Any && !allow_mixing {
                    return None;
                }
                cands.clear();
                cands.extend(
                    self.domains
                        .iter()
                        .filter(|d| self.in_tier(d, pool, tier))
                        .map(|d| Cand {
                            index: d.index,
                            numa: d.numa,
                            room: d.room(claim),
                            empty: d.is_empty(),
                            tie: Self::tie_key(pool, d.index),
                        })
                        .filter(|c| c.room > 0),
                );
                if let Some(domains) = pick(&cands, req.vcpus, shape, req.numa_preference) {
                    let mixes_pools = domains.iter().any(|&d| self.domains[d].holds_other(pool));
                    let mut choice = self.take(req, claim, &domains, mixes_pools);
                    choice.single = shape == Shape::Single;
                    return Some(choice);
                }
            }
        }
        None
    }

    /// Fills `domains` in order with `req`'s vCPUs: whole-core VMs take
    /// free cores, most threads first; thread VMs take whole cores while
    /// the rest fills one, then the threads left on cores other plain VMs
    /// hold part of (fewest first), then threads of free cores; floating
    /// VMs fill cores that already carry floating vCPUs first (packing),
    /// then the rest tightest first, so a general VM takes the free threads
    /// next to plain dedicated VMs before it opens a free core.
    fn take(&self, req: &PlacementRequest, claim: Claim, domains: &[usize], mixes: bool) -> Choice {
        let mut left = req.vcpus;
        let mut takes = Vec::new();
        for &di in domains {
            if left == 0 {
                break;
            }
            let d = &self.domains[di];
            let dcores = &self.cores[d.cores.clone()];
            let mut cores = Vec::new();
            match claim {
                Claim::WholeCores => {
                    let mut free: Vec<&CoreView> =
                        dcores.iter().filter(|c| c.whole_free()).collect();
                    free.sort_by_key(|c| (Reverse(c.threads), c.index));
                    for c in free {
                        if left == 0 {
                            break;
                        }
                        let n = c.threads.min(left);
                        cores.push((c.index, n));
                        left -= n;
                    }
                }
                Claim::Threads => {
                    let mut whole: Vec<&CoreView> =
                        dcores.iter().filter(|c| c.whole_free()).collect();
                    whole.sort_by_key(|c| (Reverse(c.threads), c.index));
                    let mut rest = Vec::new();
                    for c in whole {
                        if left >= c.threads {
                            cores.push((c.index, c.threads));
                            left -= c.threads;
                        } else {
                            rest.push(c);
                        }
                    }
                    let mut partial: Vec<&CoreView> = dcores
                        .iter()
                        .filter(|c| c.free_threads() > 0 && !c.whole_free())
                        .collect();
                    partial.sort_by_key(|c| (c.free_threads(), c.index));
                    for c in partial.into_iter().chain(rest) {
                        if left == 0 {
                            break;
                        }
                        let n = c.free_threads().min(left);
                        cores.push((c.index, n));
                        left -= n;
                    }
                }
                Claim::Floating(pool) => {
                    let mut open: Vec<&CoreView> =
                        dcores.iter().filter(|c| c.spare(pool) > 0).collect();
                    open.sort_by_key(|c| (!c.loaded(), c.spare(pool), c.index));
                    for c in open {
                        if left == 0 {
                            break;
                        }
                        let n = c.spare(pool).min(left);
                        cores.push((c.index, n));
                        left -= n;
                    }
                }
            }
            takes.push(Take { domain: di, cores });
        }
        Choice {
            takes,
            mixes_pools: mixes,
            single: domains.len() == 1,
        }
    }

    /// Records a choice in the view (used by `capacity` to place one VM
    /// after another without building placements).
    fn commit(&mut self, req: &PlacementRequest, choice: &Choice) {
        let claim = self.claim(req);
        for t in &choice.takes {
            for &(ci, n) in &t.cores {
                let Some(core) = self
                    .core_at
                    .get(ci)
                    .and_then(|&pos| self.cores.get_mut(pos))
                else {
                    continue;
                };
                match claim {
                    Claim::WholeCores => {
                        core.free = 0;
                        core.open = 0;
                        core.usable = 0;
                        core.shared_capacity = 0;
                    }
                    Claim::Threads => {
                        // The threads taken are not named here (`held` is
                        // not updated): the core's usable threads shrink as
                        // if each was usable, which errs on the side of
                        // less room.
                        core.free = core.free.saturating_sub(n);
                        core.open = core.open.saturating_sub(n);
                        core.usable = core.usable.saturating_sub(n);
                        core.shared_capacity = core.usable * self.reservations.shared_vcpus_per_cpu;
                    }
                    Claim::Floating(pool) => {
                        // The set takes every usable free thread.
                        core.load[pool.slot()] += n;
                        core.open = core.open.min(core.free.saturating_sub(core.usable));
                    }
                }
            }
            let d = &mut self.domains[t.domain];
            d.vms[req.pool().slot()] += 1;
            d.recount(&self.cores);
        }
    }

    fn placement(&self, req: &PlacementRequest, choice: &Choice) -> Placement {
        let claim = self.claim(req);
        let mut cpus = CpuSet::new();
        let mut ordered: Vec<u32> = Vec::new();
        let mut cores = Vec::new();
        let mut vcpus_per_core = Vec::new();
        for t in &choice.takes {
            for &(ci, n) in &t.cores {
                cores.push(ci);
                vcpus_per_core.push(n);
                let core_cpus = &self.topo.cores[ci].cpus;
                match claim {
                    Claim::WholeCores => {
                        cpus = cpus.union(core_cpus);
                        ordered.extend(core_cpus.iter());
                    }
                    Claim::Threads => {
                        for c in core_cpus
                            .iter()
                            .filter(|&c| !self.occ.held.contains(c) && !self.occ.in_floating_set(c))
                            .take(n as usize)
                        {
                            cpus.insert(c);
                            ordered.push(c);
                        }
                    }
                    Claim::Floating(_) => {
                        for c in core_cpus.iter().filter(|&c| {
                            !self.occ.held.contains(c)
                                && !self.reservations.host.contains(c)
                                && !self.topo.isolated.contains(c)
                        }) {
                            cpus.insert(c);
                        }
                    }
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
            exclusive: claim != Claim::Floating(req.pool()),
            shares_confidential_domain: choice.mixes_pools,
            request: req.clone(),
        }
    }

    /// Free CPUs for a new dedicated VM of each pool, without mixing pools.
    fn free_cpus(&self) -> FreeCpus {
        let plain = if self.reservations.whole_cores_for_plain {
            Claim::WholeCores
        } else {
            Claim::Threads
        };
        let sum = |pool, claim| {
            self.domains
                .iter()
                .filter(|d| !d.holds_other(pool))
                .map(|d| d.room(claim))
                .sum()
        };
        FreeCpus {
            confidential: sum(Pool::Confidential, Claim::WholeCores),
            general: sum(Pool::General, plain),
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

/// How many more VMs like `req` fit, placed one after the other on a copy
/// of `view` without mixing pools. After a one-domain best-fit choice the
/// same domain stays the best fit while it still has room (its room only
/// shrank, every other domain's is unchanged), so the next VMs are taken
/// from it directly instead of re-running the whole choice.
fn count_fits(view: &HostView<'_>, req: &PlacementRequest) -> u32 {
    let claim = view.claim(req);
    let mut v = view.clone();
    let mut count = 0;
    while let Some(choice) = v.choose(req, false) {
        v.commit(req, &choice);
        count += 1;
        if choice.single {
            let d = choice.takes[0].domain;
            while v.domains[d].room(claim) >= req.vcpus {
                let next = v.take(req, claim, &[d], false);
                v.commit(req, &next);
                count += 1;
            }
        }
    }
    count
}

/// Largest placeable size: binary search (placeable sizes are downward
/// closed: any fitting set of cores also fits fewer vCPUs).
fn largest_vm(view: &HostView<'_>, class: ConfidentialClass, online: u32) -> u32 {
    let (mut lo, mut hi) = (0u32, online);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let fits_mid = probe_request(class, mid).is_some_and(|r| view.choose(&r, false).is_some());
        if fits_mid {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Room left per class, computed by placing dedicated probe VMs on a copy
/// of the host view (the same decisions `place` would make), counting only
/// placements that do not mix pools. Classes whose probes decide alike
/// (sev, sev-es and sev-snp: confidential, whole cores) are computed once.
pub fn capacity(
    topo: &Topology,
    state: &PlacementState,
    reservations: &Reservations,
) -> CapacitySummary {
    let view = HostView::build(topo, state, reservations);
    let free = view.free_cpus();
    let online = count_u32(topo.online.len());
    let mut classes: Vec<ClassCapacity> = Vec::new();
    for class in ConfidentialClass::ALL {
        let pool = Pool::of(class);
        let claim = probe_request(class, 1).map(|r| view.claim(&r));
        let same = classes
            .iter()
            .find(|c| c.pool == pool && probe_request(c.class, 1).map(|r| view.claim(&r)) == claim);
        if let Some(same) = same {
            let copy = ClassCapacity {
                class,
                ..same.clone()
            };
            classes.push(copy);
            continue;
        }
        let fits = COMMON_SIZES
            .iter()
            .map(|&vcpus| SizeFit {
                vcpus,
                count: probe_request(class, vcpus).map_or(0, |r| count_fits(&view, &r)),
            })
            .collect();
        classes.push(ClassCapacity {
            class,
            pool,
            free_cpus: match pool {
                Pool::Confidential => free.confidential,
                Pool::General => free.general,
            },
            fits,
            largest_vm: largest_vm(&view, class, online),
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

/// `capacity` without the shortcuts (every probe VM through the whole
/// choice, every class on its own): the reference the property tests
/// compare `capacity` with.
#[cfg(test)]
pub(super) fn capacity_reference(
    topo: &Topology,
    state: &PlacementState,
    reservations: &Reservations,
) -> CapacitySummary {
    let view = HostView::build(topo, state, reservations);
    let free = view.free_cpus();
    let online = count_u32(topo.online.len());
    let classes = ConfidentialClass::ALL
        .into_iter()
        .map(|class| {
            let pool = Pool::of(class);
            let fits = COMMON_SIZES
                .iter()
                .map(|&vcpus| {
                    let mut count = 0;
                    if let Some(req) = probe_request(class, vcpus) {
                        let mut v = view.clone();
                        while let Some(choice) = v.choose(&req, false) {
                            v.commit(&req, &choice);
                            count += 1;
                        }
                    }
                    SizeFit { vcpus, count }
                })
                .collect();
            ClassCapacity {
                class,
                pool,
                free_cpus: match pool {
                    Pool::Confidential => free.confidential,
                    Pool::General => free.general,
                },
                fits,
                largest_vm: largest_vm(&view, class, online),
            }
        })
        .collect();
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

/// The view `place` and `capacity` decide on, as plain numbers (room per
/// domain and claim, VMs per domain, free threads and loads per core): the
/// property tests compare the one built from the incremental occupancy with
/// one built from the placements from scratch.
#[cfg(test)]
pub(super) fn view_digest(
    topo: &Topology,
    state: &PlacementState,
    reservations: &Reservations,
) -> Vec<Vec<u32>> {
    let v = HostView::build(topo, state, reservations);
    let mut out: Vec<Vec<u32>> = v
        .domains
        .iter()
        .map(|d| {
            vec![
                d.whole_room,
                d.thread_room,
                d.spare[0],
                d.spare[1],
                d.vms[0],
                d.vms[1],
            ]
        })
        .collect();
    out.extend(v.cores.iter().map(|c| {
        vec![
            count_u32(c.index),
            c.free,
            c.open,
            c.usable,
            c.load[0],
            c.load[1],
        ]
    }));
    out
}
