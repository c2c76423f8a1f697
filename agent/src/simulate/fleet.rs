//! Fleet simulator: replays one trace over a fleet of hosts, each running
//! a per-host placement model of `baselines`, behind a fleet-level choice
//! of host, and counts what every reclaim flushes under the sevplace flush
//! policy (the dirty set).
//!
//! Models (`docs/placement.md`, "Fleet simulator"):
//! - **nova-like**: the first host (in fleet order) with enough free CPUs;
//!   on the host the vCPUs float over every usable CPU (`Floating`), with
//!   no L3 awareness.
//! - **kubelet-static**: the first host whose kubelet static CPU manager
//!   (`KubeletStatic`, uncore-aligned) admits the VM.
//! - **sevplace**: the stages of the reference scheduler
//!   (`crate::fleet::scheduler`: pool, empty, spread-k, best fit = fewest
//!   CPUs left free on the chosen domains) over each host's L3 capacity as
//!   the reporter publishes it, then the real engine (`Sevplace`) on the
//!   host; when the engine refuses, the next candidate.
//!
//! Per-host replay (vCPU residency, migrations, reclaims) is `super::Run`;
//! this file holds the fleet description, the per-domain room, the
//! candidate choice and the fleet counters.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use super::baselines::{Admitted, Floating, KubeletStatic, PlacementModel, Sevplace, VmSpec};
use super::{
    expand, render_table, topology_from_arg, Column, FlushPolicy, Run, SimError, Stat, Step, Trace,
    VmInfo,
};
use crate::cpuset::CpuSet;
use crate::fleet::scheduler::{Stage, MAX_SPREAD};
use crate::placement::{PlacementState, Pool, Reservations};
use crate::topology::Topology;

/// Topologies a bare host count cycles over.
pub(crate) const FLEET_TOPOLOGIES: [&str; 4] = [
    "genoa-2x96-nps1",
    "milan-64c",
    "genoa-2x96-nps4",
    "rome-64c",
];

/// Most hosts one `--fleet` describes.
pub(crate) const MAX_FLEET_HOSTS: usize = 100_000;

/// Why a `--fleet` argument is not a fleet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetSpecError {
    /// No hosts.
    #[error("--fleet is empty: give a host count (1000) or TOPOLOGY:COUNT entries (genoa-2x96-nps1:600,milan-64c:400)")]
    Empty,
    /// An entry without a host count.
    #[error("--fleet entry {entry:?}: expected TOPOLOGY:COUNT (a topology name or host root, a colon, a host count)")]
    NoCount {
        /// The entry.
        entry: String,
    },
    /// An entry whose host count is not a whole number from 1.
    #[error("--fleet entry {entry:?}: {count:?} is not a host count (a whole number from 1)")]
    BadCount {
        /// The entry.
        entry: String,
        /// Its count.
        count: String,
    },
    /// A topology listed twice.
    #[error("--fleet: topology {topology} is listed twice")]
    Duplicate {
        /// The topology.
        topology: String,
    },
    /// More hosts than the simulator takes.
    #[error("--fleet: {hosts} hosts; the simulator takes at most {max}")]
    TooMany {
        /// The hosts asked for.
        hosts: usize,
        /// The most it takes.
        max: usize,
    },
}

/// A fleet: its topologies (names or host roots, as given) and, per host
/// in fleet order, the index of its topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleetSpec {
    pub(crate) topologies: Vec<String>,
    pub(crate) hosts: Vec<usize>,
}

impl FleetSpec {
    /// Hosts per topology, in the order of `topologies`.
    pub(crate) fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.topologies.len()];
        for &t in &self.hosts {
            c[t] += 1;
        }
        c
    }
}

fn host_count(entry: &str, count: &str) -> Result<usize, FleetSpecError> {
    match count.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(FleetSpecError::BadCount {
            entry: entry.to_string(),
            count: count.to_string(),
        }),
    }
}

/// Parses `--fleet`: either a host count `N` (host `i` gets
/// `FLEET_TOPOLOGIES[i % 4]`), or comma-separated `TOPOLOGY:COUNT`
/// entries, hosts numbered entry by entry (`a:2,b:1` is a, a, b).
/// TOPOLOGY is a named topology or a host root; the count follows the last
/// colon, so a root may contain colons.
pub(crate) fn parse_fleet_spec(arg: &str) -> Result<FleetSpec, FleetSpecError> {
    let arg = arg.trim();
    if arg.is_empty() {
        return Err(FleetSpecError::Empty);
    }
    let check = |hosts: usize| {
        if hosts > MAX_FLEET_HOSTS {
            Err(FleetSpecError::TooMany {
                hosts,
                max: MAX_FLEET_HOSTS,
            })
        } else {
            Ok(())
        }
    };
    if !arg.contains(':') {
        // A bare word that is no number is an entry missing its count.
        if !arg
            .trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            return Err(FleetSpecError::NoCount {
                entry: arg.to_string(),
            });
        }
        let n = host_count(arg, arg)?;
        check(n)?;
        return Ok(FleetSpec {
            topologies: FLEET_TOPOLOGIES.iter().map(|s| s.to_string()).collect(),
            hosts: (0..n).map(|i| i % FLEET_TOPOLOGIES.len()).collect(),
        });
    }
    let mut spec = FleetSpec {
        topologies: Vec::new(),
        hosts: Vec::new(),
    };
    for entry in arg.split(',') {
        let entry = entry.trim();
        let (topology, count) = entry
            .rsplit_once(':')
            .filter(|(t, _)| !t.trim().is_empty())
            .ok_or_else(|| FleetSpecError::NoCount {
                entry: entry.to_string(),
            })?;
        let topology = topology.trim().to_string();
        let n = host_count(entry, count)?;
        if spec.topologies.contains(&topology) {
            return Err(FleetSpecError::Duplicate { topology });
        }
        check(spec.hosts.len().saturating_add(n))?;
        let index = spec.topologies.len();
        spec.topologies.push(topology);
        spec.hosts.extend(std::iter::repeat_n(index, n));
    }
    Ok(spec)
}

// ---- the fleet's view of one host: L3 room as the reporter publishes it ----

/// One L3 domain as Placement sees it (`crate::fleet::tree::desired`):
/// free = its CPUs minus the CPUs the agent uses there; the pool trait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DomainRoom {
    pub(crate) domain: usize,
    pub(crate) numa: u32,
    pub(crate) free: u32,
    /// `None`: empty (no VM).
    pub(crate) pool: Option<Pool>,
}

/// The L3 room of a host whose engine holds `state`, by the reporter's
/// rule: a domain holding a confidential VM is confidential, one holding
/// any other VM general, else empty.
pub(crate) fn domain_rooms(
    topo: &Topology,
    state: &PlacementState,
    res: &Reservations,
) -> Vec<DomainRoom> {
    let confidential: BTreeSet<usize> = state.confidential_domains().into_iter().collect();
    let mut in_use = res.host.clone();
    let mut opened: BTreeSet<usize> = BTreeSet::new();
    for p in state.iter() {
        in_use = in_use.union(&p.cpus);
        opened.extend(p.l3_domains.iter().copied());
    }
    topo.l3_domains
        .iter()
        .map(|d| {
            let used = d.cpus.intersection(&in_use).len();
            DomainRoom {
                domain: d.index,
                numa: d.numa,
                free: u32::try_from(d.cpus.len().saturating_sub(used)).unwrap_or(0),
                pool: if confidential.contains(&d.index) {
                    Some(Pool::Confidential)
                } else if opened.contains(&d.index) {
                    Some(Pool::General)
                } else {
                    None
                },
            }
        })
        .collect()
}

/// The best spread-k candidate of one host: `k` distinct domains under one
/// NUMA node, each in `pool` or empty, holding the amounts of
/// [`crate::fleet::scheduler::split`]; best = fewest CPUs left free on
/// them. Returns the CPUs left free, or `None` when no NUMA node has such
/// `k` domains.
pub(crate) fn best_spread(rooms: &[DomainRoom], pool: Pool, n: u32, k: u32) -> Option<u32> {
    if k < 2 || n < k {
        return None;
    }
    let (low, big_needed) = (n / k, (n % k) as usize);
    let mut nodes: Vec<u32> = rooms.iter().map(|r| r.numa).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut best: Option<u32> = None;
    for node in nodes {
        let mut frees: Vec<u32> = rooms
            .iter()
            .filter(|r| r.numa == node && r.pool.is_none_or(|p| p == pool) && r.free >= low)
            .map(|r| r.free)
            .collect();
        frees.sort_unstable();
        // Domains with exactly `low` free can take only the smaller
        // amounts: at most k - big_needed of them; the rest come from the
        // smallest domains with room for the larger amount.
        let exact: Vec<u32> = frees.iter().copied().filter(|&f| f == low).collect();
        let roomy: Vec<u32> = frees.iter().copied().filter(|&f| f > low).collect();
        let take_exact = if big_needed == 0 {
            exact.len().min(k as usize)
        } else {
            exact.len().min(k as usize - big_needed)
        };
        let rest = k as usize - take_exact;
        if roomy.len() < rest {
            continue;
        }
        let total: u32 =
            exact[..take_exact].iter().sum::<u32>() + roomy[..rest].iter().sum::<u32>();
        let leftover = total - n;
        best = Some(best.map_or(leftover, |b| b.min(leftover)));
    }
    best
}

/// The fewest L3 domains whose CPUs can hold `vcpus`, taking the largest
/// domains first (`sizes_desc` sorted descending): ceil(vcpus / CPUs per
/// domain) on a fleet of one domain size. `None` when the fleet is too
/// small.
pub(crate) fn lower_bound_domains(sizes_desc: &[u32], vcpus: u64) -> Option<u64> {
    let mut held = 0u64;
    for (i, &s) in sizes_desc.iter().enumerate() {
        if held >= vcpus {
            return Some(i as u64);
        }
        held += u64::from(s);
    }
    (held >= vcpus).then_some(sizes_desc.len() as u64)
}

/// CPUs given twice among one host's admitted VMs: CPUs in more than one
/// exclusive set, plus CPUs of an exclusive set inside a pinned or
/// floating set of another VM.
pub(crate) fn cpus_given_twice<'a>(admitted: impl IntoIterator<Item = &'a Admitted>) -> usize {
    let mut held = CpuSet::new();
    let mut twice = CpuSet::new();
    let mut others: Vec<CpuSet> = Vec::new();
    for a in admitted {
        if let Some(e) = &a.exclusive {
            twice = twice.union(&held.intersection(e));
            held = held.union(e);
        } else {
            let set = a
                .per_vcpu
                .iter()
                .flatten()
                .fold(CpuSet::new(), |s, c| s.union(c));
            others.push(set);
        }
    }
    for o in &others {
        twice = twice.union(&o.intersection(&held));
    }
    twice.len()
}

/// Index of domains per pool trait, ordered (free, host, domain) so the
/// best fit for `n` vCPUs is the first entry at or above (n, 0, 0).
#[derive(Debug, Default)]
struct RoomIndex {
    /// By slot: 0 general, 1 confidential, 2 empty.
    sets: [BTreeSet<(u32, usize, usize)>; 3],
    per_host: Vec<Vec<DomainRoom>>,
}

fn slot_of(pool: Option<Pool>) -> usize {
    match pool {
        Some(Pool::General) => 0,
        Some(Pool::Confidential) => 1,
        None => 2,
    }
}

impl RoomIndex {
    fn set_host(&mut self, host: usize, rooms: Vec<DomainRoom>) {
        if self.per_host.len() <= host {
            self.per_host.resize(host + 1, Vec::new());
        }
        for r in &self.per_host[host] {
            self.sets[slot_of(r.pool)].remove(&(r.free, host, r.domain));
        }
        for r in &rooms {
            self.sets[slot_of(r.pool)].insert((r.free, host, r.domain));
        }
        self.per_host[host] = rooms;
    }

    /// Hosts of the single-domain candidates of one pool slot, best fit
    /// first, each host once.
    fn single(&self, slot: usize, n: u32) -> Vec<usize> {
        let mut seen = BTreeSet::new();
        self.sets[slot]
            .range((n, 0, 0)..)
            .filter(|e| seen.insert(e.1))
            .map(|e| e.1)
            .collect()
    }

    /// Whether some host other than `except` has a domain of `slot` with
    /// room for `n`.
    fn room_elsewhere(&self, slot: usize, n: u32, except: usize) -> bool {
        self.sets[slot].range((n, 0, 0)..).any(|e| e.1 != except)
    }
}

// ---- the run ----

/// Which fleet model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FleetModelKind {
    /// First host with enough free CPUs; vCPUs float over the host.
    NovaLike,
    /// First host whose kubelet static CPU manager admits the VM.
    KubeletStatic,
    /// The reference scheduler's stages, then the sevplace engine.
    Sevplace,
}

impl FleetModelKind {
    pub(crate) const ALL: [Self; 3] = [Self::NovaLike, Self::KubeletStatic, Self::Sevplace];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NovaLike => "nova-like",
            Self::KubeletStatic => "kubelet-static",
            Self::Sevplace => "sevplace",
        }
    }
}

/// Confidential domains in use against the lower bound, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Packing {
    /// Arrivals replayed so far.
    pub(crate) arrivals: usize,
    pub(crate) confidential_vcpus: u64,
    /// L3 domains where a confidential VM may run.
    pub(crate) domains_in_use: u64,
    /// The fewest domains that hold `confidential_vcpus`.
    pub(crate) lower_bound: u64,
}

impl Packing {
    /// In use over the lower bound (1.0 with nothing confidential).
    pub(crate) fn ratio(&self) -> f64 {
        if self.lower_bound == 0 {
            1.0
        } else {
            self.domains_in_use as f64 / self.lower_bound as f64
        }
    }
}

/// Samples of [`Packing`] during one model's run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PackingSummary {
    /// At the first rejection (the fleet full for the first time).
    pub(crate) at_first_rejection: Option<Packing>,
    /// At the end of the trace.
    pub(crate) at_end: Packing,
    /// Mean and maximum of in use / lower bound over the samples taken
    /// before the first rejection (every 1/200 of the arrivals).
    pub(crate) mean_ratio_before_first_rejection: f64,
    pub(crate) max_ratio_before_first_rejection: f64,
    pub(crate) samples_before_first_rejection: usize,
}

/// Invariants counted during one model's run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetChecks {
    /// CPUs given twice on one host, summed over samples and hosts.
    pub(crate) cpus_given_twice: u64,
    /// Plain VMs placed in a confidential domain while another host had a
    /// general or empty domain with room for them.
    pub(crate) plain_in_confidential_while_room: u64,
    /// Reclaims whose flushed set missed a CPU of the limit.
    pub(crate) reclaims_below_limit: u64,
}

/// Which stage of the reference scheduler placed the sevplace model's VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StageCounts {
    pub(crate) pool: u32,
    pub(crate) empty: u32,
    pub(crate) spread: u32,
    /// Candidates whose host engine refused (the next one was tried).
    pub(crate) host_refusals: u32,
}

/// Results of one fleet model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetModelResult {
    pub(crate) model: FleetModelKind,
    pub(crate) vms_before_first_rejection: u32,
    pub(crate) admitted: u32,
    pub(crate) rejected: u32,
    /// Reclaims that flushed (sev and sev-es VMs), under the sevplace
    /// flush policy.
    pub(crate) reclaims: u64,
    pub(crate) l3_domains_disturbed: Stat,
    /// vCPUs of plain VMs resident in a disturbed domain, per reclaim.
    pub(crate) non_confidential_vcpus_hit: Stat,
    pub(crate) confidential_domains: PackingSummary,
    /// Placements the engine reported as mixing pools in a domain.
    pub(crate) mixed_pool_placements: u32,
    pub(crate) stages: StageCounts,
    pub(crate) checks: FleetChecks,
    /// Wall time of this model's replay.
    pub(crate) run_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetTopologyCount {
    pub(crate) topology: String,
    pub(crate) hosts: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetSummary {
    /// The `--fleet` argument.
    pub(crate) spec: String,
    pub(crate) hosts: usize,
    pub(crate) cpus: usize,
    pub(crate) l3_domains: usize,
    pub(crate) topologies: Vec<FleetTopologyCount>,
}

/// The whole fleet result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetReport {
    pub(crate) trace: String,
    pub(crate) fleet: FleetSummary,
    pub(crate) arrivals: usize,
    pub(crate) reclaim_events: u64,
    pub(crate) migration_events: u64,
    pub(crate) models: Vec<FleetModelResult>,
}

impl FleetReport {
    /// A table for humans; columns as in `docs/benchmarks.md`.
    pub(crate) fn to_table(&self) -> String {
        let f = &self.fleet;
        let title = format!(
            "trace {} on fleet {} ({} hosts, {} CPUs, {} L3 domains): {} arrivals, {} reclaim events, {} migrations; flush policy sevplace",
            self.trace, f.spec, f.hosts, f.cpus, f.l3_domains, self.arrivals, self.reclaim_events, self.migration_events
        );
        let columns = [
            Column::left("MODEL", 15),
            Column::right("FIT", 6),
            Column::right("REJECTED", 8),
            Column::right("RECLAIMS", 8),
            Column::right("L3 mean/p99", 11),
            Column::right("NONCONF mean/p99", 16),
            Column::right("CONF-L3 FULL/BOUND", 19),
            Column::right("xBOUND mean/max", 15),
            Column::right("MIXED", 5),
            Column::right("TWICE", 6),
            Column::right("TIME s", 8),
        ];
        let rows = self.models.iter().map(|m| {
            let full = m.confidential_domains.at_first_rejection.map_or_else(
                || "-".to_string(),
                |p| format!("{}/{}", p.domains_in_use, p.lower_bound),
            );
            vec![
                m.model.as_str().to_string(),
                m.vms_before_first_rejection.to_string(),
                m.rejected.to_string(),
                m.reclaims.to_string(),
                format!(
                    "{:.2}/{}",
                    m.l3_domains_disturbed.mean, m.l3_domains_disturbed.p99
                ),
                format!(
                    "{:.1}/{}",
                    m.non_confidential_vcpus_hit.mean, m.non_confidential_vcpus_hit.p99
                ),
                full,
                format!(
                    "{:.3}/{:.3}",
                    m.confidential_domains.mean_ratio_before_first_rejection,
                    m.confidential_domains.max_ratio_before_first_rejection
                ),
                m.mixed_pool_placements.to_string(),
                m.checks.cpus_given_twice.to_string(),
                format!("{:.2}", m.run_seconds),
            ]
        });
        render_table(&title, &columns, rows)
    }
}

/// The per-host model of a fleet model.
enum HostModel<'t> {
    Floating(Floating),
    Kubelet(KubeletStatic<'t>),
    Sevplace(Sevplace<'t>),
}

impl HostModel<'_> {
    fn as_dyn(&mut self) -> &mut dyn PlacementModel {
        match self {
            Self::Floating(m) => m,
            Self::Kubelet(m) => m,
            Self::Sevplace(m) => m,
        }
    }

    fn as_ref(&self) -> &dyn PlacementModel {
        match self {
            Self::Floating(m) => m,
            Self::Kubelet(m) => m,
            Self::Sevplace(m) => m,
        }
    }
}

struct Host<'t> {
    topo: &'t Topology,
    model: HostModel<'t>,
    run: Run<'t>,
    usable: u32,
    committed: u32,
}

/// One model over the fleet.
struct FleetRun<'t> {
    kind: FleetModelKind,
    hosts: Vec<Host<'t>>,
    vms: &'t [VmInfo],
    res: Reservations,
    /// Host of each running VM.
    host_of: Vec<Option<usize>>,
    index: RoomIndex,
    domain_sizes_desc: &'t [u32],
    admitted: u32,
    rejected: u32,
    before_first_rejection: u32,
    mixed: u32,
    stages: StageCounts,
    checks: FleetChecks,
    packing: PackingSummary,
    ratios: Vec<f64>,
}

impl<'t> FleetRun<'t> {
    fn new(
        kind: FleetModelKind,
        topos: &[&'t Topology],
        vms: &'t [VmInfo],
        seed: u64,
        domain_sizes_desc: &'t [u32],
    ) -> Self {
        let res = Reservations::default();
        let hosts: Vec<Host<'t>> = topos
            .iter()
            .enumerate()
            .map(|(i, &topo)| {
                let model = match kind {
                    FleetModelKind::NovaLike => HostModel::Floating(Floating::new(topo, &res)),
                    FleetModelKind::KubeletStatic => {
                        HostModel::Kubelet(KubeletStatic::new(topo, &res))
                    }
                    FleetModelKind::Sevplace => HostModel::Sevplace(Sevplace::new(topo, &res)),
                };
                // CPUs the fleet counts as free for the first-fit models:
                // the host's usable CPUs (its whole shared pool when empty).
                let usable = match kind {
                    FleetModelKind::Sevplace => topo.online.len(),
                    _ => model.as_ref().shared_pool().len(),
                };
                Host {
                    topo,
                    model,
                    run: Run::new(
                        topo,
                        vms,
                        seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ),
                    usable: u32::try_from(usable).unwrap_or(u32::MAX),
                    committed: 0,
                }
            })
            .collect();
        let mut run = Self {
            kind,
            hosts,
            vms,
            res,
            host_of: vec![None; vms.len()],
            index: RoomIndex::default(),
            domain_sizes_desc,
            admitted: 0,
            rejected: 0,
            before_first_rejection: 0,
            mixed: 0,
            stages: StageCounts::default(),
            checks: FleetChecks::default(),
            packing: PackingSummary::default(),
            ratios: Vec::new(),
        };
        if kind == FleetModelKind::Sevplace {
            for h in 0..run.hosts.len() {
                run.refresh_rooms(h);
            }
        }
        run
    }

    fn refresh_rooms(&mut self, h: usize) {
        let host = &self.hosts[h];
        if let HostModel::Sevplace(m) = &host.model {
            let rooms = domain_rooms(host.topo, m.state(), &self.res);
            self.index.set_host(h, rooms);
        }
    }

    /// Tries VM `n` on host `h`; on success the VM starts there.
    fn try_host(&mut self, h: usize, n: usize) -> Option<Admitted> {
        let spec: &VmSpec = &self.vms[n].spec;
        let host = &mut self.hosts[h];
        let admitted = host.model.as_dyn().admit(spec)?;
        host.committed += spec.vcpus;
        host.run.start(host.model.as_ref(), n, admitted.clone());
        self.host_of[n] = Some(h);
        Some(admitted)
    }

    /// The host for VM `n`, or `None` (a rejection).
    fn choose(&mut self, n: usize) -> Option<(usize, Admitted)> {
        let vcpus = self.vms[n].spec.vcpus;
        match self.kind {
            FleetModelKind::NovaLike | FleetModelKind::KubeletStatic => {
                for h in 0..self.hosts.len() {
                    let host = &self.hosts[h];
                    if host.usable.saturating_sub(host.committed) < vcpus {
                        continue;
                    }
                    if let Some(a) = self.try_host(h, n) {
                        return Some((h, a));
                    }
                }
                None
            }
            FleetModelKind::Sevplace => self.choose_sevplace(n),
        }
    }

    /// The reference scheduler's stages in order; within a stage, best
    /// fit first; a host whose engine refuses is not asked again.
    fn choose_sevplace(&mut self, n: usize) -> Option<(usize, Admitted)> {
        let spec = &self.vms[n].spec;
        let (vcpus, pool) = (spec.vcpus, Pool::of(spec.class));
        let mut refused: BTreeSet<usize> = BTreeSet::new();
        let mut stages = vec![Stage::Pool, Stage::Empty];
        stages.extend((2..=vcpus.min(MAX_SPREAD)).map(Stage::Spread));
        for stage in stages {
            let hosts: Vec<usize> = match stage {
                Stage::Pool => self.index.single(slot_of(Some(pool)), vcpus),
                Stage::Empty => self.index.single(slot_of(None), vcpus),
                Stage::Spread(k) => {
                    let mut c: Vec<(u32, usize)> = self
                        .index
                        .per_host
                        .iter()
                        .enumerate()
                        .filter_map(|(h, rooms)| best_spread(rooms, pool, vcpus, k).map(|l| (l, h)))
                        .collect();
                    c.sort_unstable();
                    c.into_iter().map(|(_, h)| h).collect()
                }
            };
            for h in hosts {
                if refused.contains(&h) {
                    continue;
                }
                match self.try_host(h, n) {
                    Some(a) => {
                        match stage {
                            Stage::Pool => self.stages.pool += 1,
                            Stage::Empty => self.stages.empty += 1,
                            Stage::Spread(_) => self.stages.spread += 1,
                        }
                        return Some((h, a));
                    }
                    None => {
                        self.stages.host_refusals += 1;
                        refused.insert(h);
                    }
                }
            }
        }
        None
    }

    fn arrive(&mut self, n: usize) {
        let spec = &self.vms[n].spec;
        let (vcpus, plain) = (spec.vcpus, !spec.class.is_confidential());
        let Some((h, admitted)) = self.choose(n) else {
            if self.rejected == 0 {
                self.packing.at_first_rejection = Some(self.sample_packing());
            }
            self.rejected += 1;
            return;
        };
        self.admitted += 1;
        if self.rejected == 0 {
            self.before_first_rejection += 1;
        }
        if admitted.shares_confidential_domain {
            self.mixed += 1;
            // The index still shows the rooms before this placement.
            if plain
                && (self
                    .index
                    .room_elsewhere(slot_of(Some(Pool::General)), vcpus, h)
                    || self.index.room_elsewhere(slot_of(None), vcpus, h))
            {
                self.checks.plain_in_confidential_while_room += 1;
            }
        }
        self.refresh_rooms(h);
    }

    fn depart(&mut self, n: usize) {
        let Some(h) = self.host_of[n].take() else {
            return;
        };
        let host = &mut self.hosts[h];
        host.run.depart(host.model.as_dyn(), n);
        host.committed = host.committed.saturating_sub(self.vms[n].spec.vcpus);
        self.refresh_rooms(h);
    }

    /// Confidential domains in use (where a confidential VM may run)
    /// against the lower bound; counts CPUs given twice on the way.
    fn sample_packing(&mut self) -> Packing {
        let mut in_use = 0u64;
        let mut vcpus = 0u64;
        let mut twice = 0u64;
        for host in &self.hosts {
            let shared = host.model.as_ref().shared_pool();
            let mut domains = BTreeSet::new();
            for (&n, r) in &host.run.running {
                let spec = &self.vms[n].spec;
                if !spec.class.is_confidential() {
                    continue;
                }
                vcpus += u64::from(spec.vcpus);
                for set in &r.admitted.per_vcpu {
                    let set = set.as_ref().unwrap_or(&shared);
                    domains.extend(host.topo.l3_domains_of(set));
                }
            }
            in_use += domains.len() as u64;
            twice += cpus_given_twice(host.run.running.values().map(|r| &r.admitted)) as u64;
        }
        self.checks.cpus_given_twice += twice;
        Packing {
            arrivals: 0,
            confidential_vcpus: vcpus,
            domains_in_use: in_use,
            lower_bound: lower_bound_domains(self.domain_sizes_desc, vcpus).unwrap_or(u64::MAX),
        }
    }

    fn replay(&mut self, steps: &[Step], sample_every: usize) {
        let mut arrivals = 0usize;
        for &step in steps {
            match step {
                Step::Arrive(n) => {
                    self.arrive(n);
                    arrivals += 1;
                    if let Some(p) = self.packing.at_first_rejection.as_mut() {
                        if p.arrivals == 0 {
                            p.arrivals = arrivals;
                        }
                    }
                    if self.rejected == 0 && arrivals % sample_every == 0 {
                        let p = self.sample_packing();
                        self.ratios.push(p.ratio());
                    }
                }
                Step::Migrate(n) => {
                    if let Some(h) = self.host_of[n] {
                        let host = &mut self.hosts[h];
                        host.run.migrate(host.model.as_ref(), n);
                    }
                }
                Step::Reclaim(n) => {
                    if let Some(h) = self.host_of[n] {
                        self.hosts[h].run.reclaim(n);
                    }
                }
                Step::Depart(n) => self.depart(n),
            }
        }
        let mut end = self.sample_packing();
        end.arrivals = arrivals;
        self.packing.at_end = end;
        let n = self.ratios.len();
        self.packing.samples_before_first_rejection = n;
        if n > 0 {
            self.packing.mean_ratio_before_first_rejection =
                self.ratios.iter().sum::<f64>() / n as f64;
            self.packing.max_ratio_before_first_rejection =
                self.ratios.iter().copied().fold(0.0, f64::max);
        }
    }

    fn result(mut self, run_seconds: f64) -> FleetModelResult {
        let slot = FlushPolicy::ALL
            .iter()
            .position(|&p| p == FlushPolicy::Sevplace)
            .unwrap_or(2);
        let mut domains = Vec::new();
        let mut hit = Vec::new();
        for host in &mut self.hosts {
            let s = &mut host.run.samples[slot];
            domains.append(&mut s.domains);
            hit.append(&mut s.hit);
            self.checks.reclaims_below_limit += s.checks.reclaims_below_limit;
        }
        FleetModelResult {
            model: self.kind,
            vms_before_first_rejection: self.before_first_rejection,
            admitted: self.admitted,
            rejected: self.rejected,
            reclaims: domains.len() as u64,
            l3_domains_disturbed: Stat::of(&mut domains),
            non_confidential_vcpus_hit: Stat::of(&mut hit),
            confidential_domains: self.packing,
            mixed_pool_placements: self.mixed,
            stages: self.stages,
            checks: self.checks,
            run_seconds,
        }
    }
}

/// Replays `trace` over the fleet `spec` (`topologies[i]` is the topology
/// `spec.topologies[i]` names; `spec_arg` is the argument as given, for
/// the report) through every fleet model.
pub(crate) fn simulate_fleet(
    spec_arg: &str,
    spec: &FleetSpec,
    topologies: &[Topology],
    trace: &Trace,
) -> Result<FleetReport, SimError> {
    trace.check(&trace.name)?;
    let topos: Vec<&Topology> = spec
        .hosts
        .iter()
        .filter_map(|&t| topologies.get(t))
        .collect();
    let largest = topos.iter().map(|t| t.online.len()).max().unwrap_or(0);
    for (i, e) in trace.events.iter().enumerate() {
        if let super::Event::Arrive { vcpus, vm, .. } = e {
            if *vcpus as usize > largest {
                return Err(SimError::Invalid {
                    origin: trace.name.clone(),
                    field: format!("events[{i}].vcpus"),
                    reason: format!(
                        "{vm} asks for {vcpus} vCPUs; the largest host has {largest} online CPUs"
                    ),
                });
            }
        }
    }
    let (vms, steps, reclaim_events, migration_events) = expand(trace);
    let mut sizes: Vec<u32> = topos
        .iter()
        .flat_map(|t| {
            t.l3_domains
                .iter()
                .map(|d| u32::try_from(d.cpus.len()).unwrap_or(0))
        })
        .collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let sample_every = (vms.len() / 200).max(1);
    let mut models = Vec::new();
    for kind in FleetModelKind::ALL {
        let start = Instant::now();
        let mut run = FleetRun::new(kind, &topos, &vms, trace.seed, &sizes);
        run.replay(&steps, sample_every);
        models.push(run.result(start.elapsed().as_secs_f64()));
    }
    Ok(FleetReport {
        trace: trace.name.clone(),
        fleet: FleetSummary {
            spec: spec_arg.to_string(),
            hosts: topos.len(),
            cpus: topos.iter().map(|t| t.online.len()).sum(),
            l3_domains: sizes.len(),
            topologies: spec
                .topologies
                .iter()
                .zip(spec.counts())
                .map(|(t, hosts)| FleetTopologyCount {
                    topology: t.clone(),
                    hosts,
                })
                .collect(),
        },
        arrivals: vms.len(),
        reclaim_events,
        migration_events,
        models,
    })
}

/// `sevplacectl simulate --fleet HOSTS --trace FILE [--json]`: the text to
/// print.
pub fn run_fleet_simulate_cli(trace: &Path, fleet: &str, json: bool) -> Result<String, SimError> {
    let spec = parse_fleet_spec(fleet)?;
    let topologies: Vec<Topology> = spec
        .topologies
        .iter()
        .map(|t| topology_from_arg(t).map(|(_, topo)| topo))
        .collect::<Result<_, _>>()?;
    let trace = Trace::load(trace)?;
    let report = simulate_fleet(fleet, &spec, &topologies, &trace)?;
    if json {
        let mut s = serde_json::to_string_pretty(&report).map_err(|e| SimError::Invalid {
            origin: "report".into(),
            field: "json".into(),
            reason: e.to_string(),
        })?;
        s.push('\n');
        Ok(s)
    } else {
        Ok(report.to_table())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_specs_parse_or_name_the_fault() {
        let ok = |s: &str| parse_fleet_spec(s).unwrap();
        let s = ok("6");
        assert_eq!(s.topologies, FLEET_TOPOLOGIES);
        assert_eq!(s.hosts, [0, 1, 2, 3, 0, 1]);
        let s = ok("genoa-2x96-nps1:2, milan-64c:1");
        assert_eq!(s.topologies, ["genoa-2x96-nps1", "milan-64c"]);
        assert_eq!(s.hosts, [0, 0, 1]);
        assert_eq!(s.counts(), [2, 1]);
        let s = ok("/srv/roots/a:b:3");
        assert_eq!(s.topologies, ["/srv/roots/a:b"]);
        assert_eq!(s.hosts.len(), 3);
        let cases: [(&str, FleetSpecError); 10] = [
            ("", FleetSpecError::Empty),
            ("  ", FleetSpecError::Empty),
            (
                "0",
                FleetSpecError::BadCount {
                    entry: "0".into(),
                    count: "0".into(),
                },
            ),
            (
                "-3",
                FleetSpecError::BadCount {
                    entry: "-3".into(),
                    count: "-3".into(),
                },
            ),
            (
                "milan-64c:x",
                FleetSpecError::BadCount {
                    entry: "milan-64c:x".into(),
                    count: "x".into(),
                },
            ),
            (
                "milan-64c:2,rome-64c",
                FleetSpecError::NoCount {
                    entry: "rome-64c".into(),
                },
            ),
            (":4", FleetSpecError::NoCount { entry: ":4".into() }),
            (
                "milan-64c",
                FleetSpecError::NoCount {
                    entry: "milan-64c".into(),
                },
            ),
            (
                "milan-64c:1,milan-64c:2",
                FleetSpecError::Duplicate {
                    topology: "milan-64c".into(),
                },
            ),
            (
                "milan-64c:60000,rome-64c:50000",
                FleetSpecError::TooMany {
                    hosts: 110_000,
                    max: MAX_FLEET_HOSTS,
                },
            ),
        ];
        for (arg, want) in cases {
            assert_eq!(parse_fleet_spec(arg), Err(want), "{arg:?}");
        }
    }

    fn room(domain: usize, numa: u32, free: u32, pool: Option<Pool>) -> DomainRoom {
        DomainRoom {
            domain,
            numa,
            free,
            pool,
        }
    }

    #[test]
    fn best_spread_is_best_fit_under_one_node() {
        const C: Option<Pool> = Some(Pool::Confidential);
        const G: Option<Pool> = Some(Pool::General);
        // (rooms, pool, n, k, want)
        type Case = (Vec<DomainRoom>, Pool, u32, u32, Option<u32>);
        let cases: Vec<Case> = vec![
            // Two confidential domains with 8 free take 16 exactly.
            (
                vec![room(0, 0, 8, C), room(1, 0, 8, C)],
                Pool::Confidential,
                16,
                2,
                Some(0),
            ),
            // A general domain is not the confidential pool.
            (
                vec![room(0, 0, 8, C), room(1, 0, 8, G)],
                Pool::Confidential,
                16,
                2,
                None,
            ),
            // Empty domains count for either pool.
            (
                vec![room(0, 0, 8, G), room(1, 0, 16, None)],
                Pool::General,
                16,
                2,
                Some(8),
            ),
            // Not across NUMA nodes.
            (
                vec![room(0, 0, 8, C), room(1, 1, 8, C)],
                Pool::Confidential,
                16,
                2,
                None,
            ),
            // 5 over 2 = 3 + 2: two domains of 2 free cannot, 3 and 2 can.
            (
                vec![room(0, 0, 2, C), room(1, 0, 2, C)],
                Pool::Confidential,
                5,
                2,
                None,
            ),
            (
                vec![room(0, 0, 2, C), room(1, 0, 3, C), room(2, 0, 9, C)],
                Pool::Confidential,
                5,
                2,
                Some(0),
            ),
            // The fullest fitting domains win; the best node is chosen.
            (
                vec![
                    room(0, 0, 16, C),
                    room(1, 0, 16, C),
                    room(2, 1, 9, C),
                    room(3, 1, 10, C),
                    room(4, 1, 12, C),
                ],
                Pool::Confidential,
                18,
                2,
                Some(1),
            ),
            // k of 1 is not a spread; more domains than vCPUs neither.
            (vec![room(0, 0, 8, C)], Pool::Confidential, 4, 1, None),
            (
                vec![room(0, 0, 8, C), room(1, 0, 8, C), room(2, 0, 8, C)],
                Pool::Confidential,
                2,
                3,
                None,
            ),
        ];
        for (i, (rooms, pool, n, k, want)) in cases.into_iter().enumerate() {
            assert_eq!(best_spread(&rooms, pool, n, k), want, "case {i}");
        }
    }

    #[test]
    fn lower_bound_takes_the_largest_domains() {
        for (sizes, vcpus, want) in [
            (vec![16, 16, 16], 0, Some(0)),
            (vec![16, 16, 16], 1, Some(1)),
            (vec![16, 16, 16], 16, Some(1)),
            (vec![16, 16, 16], 17, Some(2)),
            (vec![16, 16, 16], 48, Some(3)),
            (vec![16, 16, 16], 49, None),
            (vec![16, 8, 8], 20, Some(2)),
        ] {
            assert_eq!(
                lower_bound_domains(&sizes, vcpus),
                want,
                "{sizes:?} {vcpus}"
            );
        }
    }

    fn exclusive(cpus: &str) -> Admitted {
        let set = CpuSet::parse(cpus).unwrap();
        Admitted {
            per_vcpu: set
                .iter()
                .map(|c| Some([c].into_iter().collect()))
                .collect(),
            exclusive: Some(set),
            shares_confidential_domain: false,
        }
    }

    fn floating(cpus: &str) -> Admitted {
        Admitted {
            per_vcpu: vec![Some(CpuSet::parse(cpus).unwrap()); 2],
            exclusive: None,
            shares_confidential_domain: false,
        }
    }

    #[test]
    fn cpus_given_twice_counts_overlaps() {
        for (set, want) in [
            (
                vec![exclusive("0-3"), exclusive("4-7"), floating("8-11")],
                0,
            ),
            (vec![exclusive("0-3"), exclusive("3-7")], 1),
            (vec![exclusive("0-3"), floating("2-9")], 2),
            // Floating VMs may share their cores with each other.
            (vec![floating("0-3"), floating("0-3")], 0),
        ] {
            assert_eq!(cpus_given_twice(&set), want);
        }
    }

    #[test]
    fn the_index_answers_best_fit_per_pool() {
        let mut index = RoomIndex::default();
        index.set_host(
            0,
            vec![
                room(0, 0, 10, Some(Pool::Confidential)),
                room(1, 0, 16, None),
            ],
        );
        index.set_host(
            1,
            vec![
                room(0, 0, 4, Some(Pool::Confidential)),
                room(1, 0, 6, Some(Pool::Confidential)),
            ],
        );
        assert_eq!(index.single(1, 4), [1, 0]);
        assert_eq!(index.single(1, 7), [0]);
        assert_eq!(index.single(2, 4), [0]);
        assert!(index.room_elsewhere(1, 5, 0));
        assert!(!index.room_elsewhere(1, 7, 0));
        // A host's new rooms replace its old ones.
        index.set_host(1, vec![room(0, 0, 16, None), room(1, 0, 16, None)]);
        assert_eq!(index.single(1, 4), [0]);
        assert_eq!(index.single(2, 16), [0, 1]);
    }
}
