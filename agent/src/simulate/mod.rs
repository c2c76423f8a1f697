//! Blast-radius simulator: replays a trace of VM arrivals, departures,
//! vCPU migrations and memory reclaims on a topology, through each
//! placement model and each flush policy, and counts what every reclaim
//! flushes.
//!
//! Model (assumptions in `docs/placement.md`):
//! - Each vCPU is always resident on one CPU of its allowed set and enters
//!   the guest there; a migration moves one random vCPU of the VM to a
//!   random other CPU of its set (seeded xorshift, so runs repeat).
//! - A reclaim of an SEV or SEV-ES VM flushes: every online CPU (stock
//!   KVM); every CPU that ever ran the VM (6.17 `have_run_cpus`, seed v4);
//!   the CPUs that entered the VM since its last flush (sevplace, clear on
//!   flush). The limit is that last set. Reclaims of sev-snp VMs (firmware
//!   handles them) and of plain VMs flush nothing and are only counted.
//! - After a flush, the dirty set restarts with the CPUs the vCPUs sit on,
//!   since they enter the guest again right away.

pub(crate) mod baselines;
mod bound;
pub(crate) mod fleet;
mod generate;
mod rng;
mod trace;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub(crate) use baselines::{PlacementModel, PlacementModelKind};
pub use fleet::run_fleet_simulate_cli;
pub(crate) use fleet::FleetSpecError;
#[cfg(test)]
use generate::generate_trace;
pub use generate::{shipped_fleet_trace_specs, shipped_trace_specs, TraceSpec};
pub(crate) use rng::XorShift;
pub use trace::Trace;
pub(crate) use trace::{Event, Format};

use crate::cpuset::{count_u32, CpuSet};
use crate::placement::Reservations;
use crate::topology::{Topology, TopologyError};
use crate::types::{ConfidentialClass, VmId};
use baselines::{Admitted, Floating, KubeletStatic, Sevplace, VmSpec};
use bound::Change;

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The trace file could not be read.
    #[error("cannot read trace {path}: {source}")]
    Read {
        /// The trace file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// The trace is not valid YAML or JSON of the trace format.
    #[error("{origin}{}: {message}", location(*line, *column))]
    Parse {
        /// The trace file, or the shipped trace's name.
        origin: String,
        /// Line of the fault, when the parser knows it.
        line: Option<usize>,
        /// Column of the fault, when the parser knows it.
        column: Option<usize>,
        /// What the parser reported.
        message: String,
    },
    /// A trace entry holds a value out of range.
    #[error("{origin}: {field}: {reason}")]
    Invalid {
        /// The trace file, or the shipped trace's name.
        origin: String,
        /// The entry and field.
        field: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// `--topology` is neither a host root nor a named topology.
    #[error("unknown topology {arg:?}: not a directory with a sys/ tree, nor one of {known}")]
    UnknownTopology {
        /// The argument.
        arg: String,
        /// The named topologies.
        known: String,
    },
    /// The host root given as `--topology` could not be read.
    #[error("topology {arg}: {source}")]
    Topology {
        /// The argument.
        arg: String,
        /// What reading the topology returned.
        source: TopologyError,
    },
    /// `--fleet` is not a fleet.
    #[error(transparent)]
    Fleet(#[from] FleetSpecError),
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" line {l} column {c}"),
        (Some(l), None) => format!(" line {l}"),
        _ => String::new(),
    }
}

/// A flush policy.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FlushPolicy {
    /// `wbinvd_on_all_cpus()`: every online CPU.
    Stock,
    /// Linux 6.17 `have_run_cpus` (seed v4): every CPU that ever ran the VM.
    HaveRunCpus,
    /// sevflush: the CPUs that entered the VM since its last flush.
    Sevplace,
}

impl FlushPolicy {
    pub(crate) const ALL: [Self; 3] = [Self::Stock, Self::HaveRunCpus, Self::Sevplace];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stock => "stock",
            Self::HaveRunCpus => "have-run-cpus",
            Self::Sevplace => "sevplace",
        }
    }
}

/// Simulation settings.
#[derive(Debug, Clone, Default)]
pub(crate) struct SimOptions {
    pub(crate) reservations: Reservations,
}

/// Mean, 99th percentile and maximum of a per-reclaim count.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Stat {
    pub(crate) mean: f64,
    pub(crate) p99: f64,
    pub(crate) max: u32,
}

impl Stat {
    // The rank, ceil(0.99 n) for n samples, is a non-negative whole number
    // at most n: the float-to-usize cast neither truncates nor drops a sign.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn of(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let sum: u64 = samples.iter().map(|&x| u64::from(x)).sum();
        // Nearest-rank percentile.
        let rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
        Self {
            mean: sum as f64 / n as f64,
            p99: f64::from(samples[rank - 1]),
            max: samples[n - 1],
        }
    }
}

/// Invariant checks counted during the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Checks {
    /// Reclaims whose flushed set missed a CPU of the limit (unsafe).
    pub(crate) reclaims_below_limit: u64,
    /// Reclaims of VMs with exclusive CPUs that flushed a CPU outside them.
    pub(crate) reclaims_outside_exclusive_cpus: u64,
}

/// Results of one (placement model, flush policy) pair.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Combination {
    pub(crate) placement: PlacementModelKind,
    pub(crate) flush: FlushPolicy,
    /// Reclaims that flushed (sev and sev-es VMs).
    pub(crate) reclaims: u64,
    pub(crate) flushed_cpus: Stat,
    pub(crate) l3_domains_disturbed: Stat,
    /// `l3_domains_disturbed` over the reclaims before the first rejection:
    /// until then every model runs the same VMs, so this compares
    /// placements on equal terms (later each admits other VMs).
    pub(crate) l3_domains_disturbed_before_first_rejection: Stat,
    /// vCPUs of non-confidential VMs resident in a disturbed L3 domain.
    pub(crate) non_confidential_vcpus_hit: Stat,
    /// CPUs that entered the VM since its last flush.
    pub(crate) limit_cpus: Stat,
    /// Mean flushed CPUs over mean limit.
    pub(crate) flushed_over_limit: f64,
    /// Arrivals placed before the first rejection.
    pub(crate) vms_before_first_rejection: u32,
    pub(crate) admitted: u32,
    pub(crate) rejected: u32,
    /// Placements the engine reported as mixing pools in an L3 domain.
    pub(crate) mixed_pool_placements: u32,
    /// Of those, placements made before the first rejection (while the
    /// host still had room for every VM).
    pub(crate) mixed_pool_placements_before_first_rejection: u32,
    pub(crate) checks: Checks,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TopologySummary {
    pub(crate) name: String,
    pub(crate) cpus: usize,
    pub(crate) l3_domains: usize,
    pub(crate) numa_nodes: usize,
}

/// The whole result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Report {
    pub(crate) trace: String,
    pub(crate) topology: TopologySummary,
    pub(crate) arrivals: usize,
    /// Reclaim events, including those of VMs that flush nothing.
    pub(crate) reclaim_events: u64,
    pub(crate) migration_events: u64,
    /// The most VMs a placement that keeps confidential VMs on whole cores
    /// can admit before its first rejection (`bound::whole_core_fit_bound`).
    pub(crate) whole_core_fit_bound: u32,
    pub(crate) combinations: Vec<Combination>,
}

impl Report {
    #[cfg(test)]
    pub(crate) fn combination(
        &self,
        p: PlacementModelKind,
        f: FlushPolicy,
    ) -> Option<&Combination> {
        self.combinations
            .iter()
            .find(|c| c.placement == p && c.flush == f)
    }

    /// A table for humans. Columns: reclaims that flushed; CPUs flushed,
    /// L3 domains disturbed and non-confidential vCPUs in those domains per
    /// reclaim; the limit; mean flushed over mean limit; VMs placed before
    /// the first rejection; rejections; placements that mixed pools.
    pub(crate) fn to_table(&self) -> String {
        let t = &self.topology;
        let title = format!(
            "trace {} on {} ({} CPUs, {} L3 domains, {} NUMA nodes): {} arrivals, {} reclaim events, {} migrations; FIT with confidential VMs on whole cores at most {}",
            self.trace, t.name, t.cpus, t.l3_domains, t.numa_nodes, self.arrivals, self.reclaim_events, self.migration_events, self.whole_core_fit_bound
        );
        let columns = [
            Column::left("PLACEMENT", 15),
            Column::left("FLUSH", 14),
            Column::right("RECLAIMS", 8),
            Column::right("FLUSHED mean/p99", 16),
            Column::right("L3 mean/p99", 12),
            Column::right("NONCONF mean/p99", 16),
            Column::right("LIMIT mean/p99", 14),
            Column::right("xLIMIT", 7),
            Column::right("FIT", 4),
            Column::right("REJECTED", 8),
            Column::right("MIXED", 5),
        ];
        let rows = self.combinations.iter().map(|c| {
            vec![
                c.placement.as_str().to_string(),
                c.flush.as_str().to_string(),
                c.reclaims.to_string(),
                format!("{:.1}/{}", c.flushed_cpus.mean, c.flushed_cpus.p99),
                format!(
                    "{:.2}/{}",
                    c.l3_domains_disturbed.mean, c.l3_domains_disturbed.p99
                ),
                format!(
                    "{:.1}/{}",
                    c.non_confidential_vcpus_hit.mean, c.non_confidential_vcpus_hit.p99
                ),
                format!("{:.1}/{}", c.limit_cpus.mean, c.limit_cpus.p99),
                format!("{:.2}", c.flushed_over_limit),
                c.vms_before_first_rejection.to_string(),
                c.rejected.to_string(),
                c.mixed_pool_placements.to_string(),
            ]
        });
        render_table(&title, &columns, rows)
    }
}

/// A column of a text table: its header, its width, and whether its cells
/// align left (names) or right (numbers).
struct Column {
    header: &'static str,
    width: usize,
    left: bool,
}

impl Column {
    const fn left(header: &'static str, width: usize) -> Self {
        Self {
            header,
            width,
            left: true,
        }
    }

    const fn right(header: &'static str, width: usize) -> Self {
        Self {
            header,
            width,
            left: false,
        }
    }

    /// Writes `cell` padded to the column's width.
    fn write_cell(&self, out: &mut String, cell: &str) {
        let width = self.width;
        let _ = if self.left {
            write!(out, "{cell:<width$}")
        } else {
            write!(out, "{cell:>width$}")
        };
    }
}

/// The tables of [`Report::to_table`] and [`fleet::FleetReport::to_table`]:
/// `title` on the first line, then the headers, then one line per row; each
/// cell is padded to its column's width, cells are one space apart.
fn render_table(
    title: &str,
    columns: &[Column],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> String {
    let mut out = format!("{title}\n");
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_string()).collect();
    for row in std::iter::once(headers).chain(rows) {
        for (i, (column, cell)) in columns.iter().zip(&row).enumerate() {
            if i > 0 {
                out.push(' ');
            }
            column.write_cell(&mut out, cell);
        }
        out.push('\n');
    }
    out
}

// ---- topologies ----

/// Named topologies: the shipped fixtures (`agent/tests/fixtures`), built
/// from `Topology::synthetic` so the CLI needs no files.
pub(crate) const TOPOLOGY_NAMES: [&str; 7] = [
    "milan-64c",
    "genoa-2x96-nps1",
    "genoa-2x96-nps4",
    "rome-64c",
    "rome-64c-offline",
    "vm-no-l3",
    "ci-host-2cpu",
];

/// The named topology, if known.
pub(crate) fn named_topology(name: &str) -> Option<Topology> {
    let t = match name {
        "milan-64c" => Topology::synthetic(1, 8, 8, 2, 1),
        "genoa-2x96-nps1" => Topology::synthetic(2, 12, 8, 2, 1),
        "genoa-2x96-nps4" => Topology::synthetic(2, 12, 8, 2, 4),
        "rome-64c" => Topology::synthetic(1, 16, 4, 2, 1),
        "rome-64c-offline" => Topology::synthetic(1, 16, 4, 2, 1).with_changes(
            &CpuSet::parse("5,70-71").ok()?,
            &CpuSet::parse("0,64").ok()?,
            true,
        ),
        "vm-no-l3" => {
            Topology::synthetic(2, 1, 4, 1, 1).with_changes(&CpuSet::new(), &CpuSet::new(), false)
        }
        "ci-host-2cpu" => Topology::synthetic(1, 1, 2, 1, 1),
        _ => return None,
    };
    Some(t)
}

/// A topology from the command line: a name from [`TOPOLOGY_NAMES`], or a
/// host root directory (its `sys/` tree is read, as with `--host-root`).
pub(crate) fn topology_from_arg(arg: &str) -> Result<(String, Topology), SimError> {
    if let Some(t) = named_topology(arg) {
        return Ok((arg.to_string(), t));
    }
    let root = Path::new(arg);
    let sys = root.join("sys");
    if sys.join("devices/system/cpu").is_dir() {
        let t = Topology::from_sysfs(&sys).map_err(|source| SimError::Topology {
            arg: arg.to_string(),
            source,
        })?;
        return Ok((arg.to_string(), t));
    }
    Err(SimError::UnknownTopology {
        arg: arg.to_string(),
        known: TOPOLOGY_NAMES.join(", "),
    })
}

/// `sevplacectl simulate --trace FILE --topology ROOT_OR_NAME [--json]`:
/// the text to print.
pub fn run_simulate_cli(trace: &Path, topology: &str, json: bool) -> Result<String, SimError> {
    let (name, topo) = topology_from_arg(topology)?;
    let trace = Trace::load(trace)?;
    let mut report = simulate(&topo, &trace, &SimOptions::default())?;
    report.topology.name = name;
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

// ---- the run ----

/// One step of the expanded timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Arrive(usize),
    Migrate(usize),
    Reclaim(usize),
    Depart(usize),
}

/// Arrival facts, indexed by VM number.
#[derive(Debug, Clone)]
struct VmInfo {
    spec: VmSpec,
}

/// The trace with rates expanded, in time order. Steps at the same time
/// keep trace order; generated steps follow explicit ones.
fn expand(trace: &Trace) -> (Vec<VmInfo>, Vec<Step>, u64, u64) {
    let mut vms: Vec<VmInfo> = Vec::new();
    let mut index: BTreeMap<&VmId, usize> = BTreeMap::new();
    let mut order: Vec<usize> = (0..trace.events.len()).collect();
    order.sort_by(|&a, &b| {
        trace.events[a]
            .at()
            .total_cmp(&trace.events[b].at())
            .then(a.cmp(&b))
    });
    // Arrivals first, so departures can bound the generated events.
    let mut departs: BTreeMap<usize, f64> = BTreeMap::new();
    for &i in &order {
        if let Event::Arrive {
            vm,
            vcpus,
            class,
            dedicated,
            ..
        } = &trace.events[i]
        {
            index.insert(vm, vms.len());
            vms.push(VmInfo {
                spec: VmSpec {
                    vm: vm.clone(),
                    vcpus: *vcpus,
                    class: *class,
                    dedicated: *dedicated,
                },
            });
        }
    }
    for &i in &order {
        if let Event::Depart { vm, at } = &trace.events[i] {
            if let Some(&n) = index.get(vm) {
                departs.insert(n, *at);
            }
        }
    }
    let end = trace.end();
    // (time, rank, seq): rank keeps arrive < explicit < generated < depart at equal times.
    let mut steps: Vec<(f64, u8, usize, Step)> = Vec::new();
    let (mut reclaims, mut migrations) = (0u64, 0u64);
    for (seq, &i) in order.iter().enumerate() {
        let e = &trace.events[i];
        let Some(&n) = index.get(e.vm()) else {
            continue;
        };
        let (rank, step) = match e {
            Event::Arrive { .. } => (0, Step::Arrive(n)),
            Event::Migrate { .. } => {
                migrations += 1;
                (1, Step::Migrate(n))
            }
            Event::Reclaim { .. } => {
                reclaims += 1;
                (1, Step::Reclaim(n))
            }
            Event::Depart { .. } => (3, Step::Depart(n)),
        };
        steps.push((e.at(), rank, seq, step));
    }
    let mut rng = XorShift::new(trace.seed ^ 0x7261_7465);
    let mut seq = steps.len();
    for &i in &order {
        if let Event::Arrive {
            vm,
            at,
            reclaim_rate,
            migration_rate,
            ..
        } = &trace.events[i]
        {
            let Some(&n) = index.get(vm) else {
                continue;
            };
            let until = departs.get(&n).copied().unwrap_or(end);
            for (rate, is_reclaim) in [(*reclaim_rate, true), (*migration_rate, false)] {
                if rate <= 0.0 {
                    continue;
                }
                let mut t = *at + rng.exp(rate);
                while t < until {
                    let step = if is_reclaim {
                        reclaims += 1;
                        Step::Reclaim(n)
                    } else {
                        migrations += 1;
                        Step::Migrate(n)
                    };
                    steps.push((t, 2, seq, step));
                    seq += 1;
                    t += rng.exp(rate);
                }
            }
        }
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    (
        vms,
        steps.into_iter().map(|s| s.3).collect(),
        reclaims,
        migrations,
    )
}

/// A VM while it runs in one model.
#[derive(Debug, Clone)]
struct Running {
    admitted: Admitted,
    /// Current CPU of each vCPU.
    cur: Vec<u32>,
    ran: CpuSet,
    dirty: CpuSet,
}

/// Per-policy samples.
#[derive(Debug, Default)]
struct Samples {
    flushed: Vec<u32>,
    domains: Vec<u32>,
    /// `domains` of the reclaims before the first rejection.
    domains_before_first_rejection: Vec<u32>,
    hit: Vec<u32>,
    checks: Checks,
}

fn pick(rng: &mut XorShift, set: &CpuSet, avoid: Option<u32>) -> Option<u32> {
    let n = set.len();
    if n == 0 {
        return None;
    }
    if let Some(a) = avoid.filter(|a| set.contains(*a) && n > 1) {
        // Uniform over the set without `a`.
        let k = rng.below(n - 1);
        return set.iter().filter(|&c| c != a).nth(k);
    }
    set.iter().nth(rng.below(n))
}

struct Run<'a> {
    topo: &'a Topology,
    vms: &'a [VmInfo],
    rng: XorShift,
    running: BTreeMap<usize, Running>,
    /// Non-confidential vCPUs resident per L3 domain.
    nonconf_per_domain: Vec<u32>,
    samples: [Samples; 3],
    limits: Vec<u32>,
    admitted: u32,
    rejected: u32,
    before_first_rejection: u32,
    mixed: u32,
    mixed_before_first_rejection: u32,
}

impl<'a> Run<'a> {
    fn new(topo: &'a Topology, vms: &'a [VmInfo], seed: u64) -> Self {
        Run {
            topo,
            vms,
            rng: XorShift::new(seed),
            running: BTreeMap::new(),
            nonconf_per_domain: vec![0; topo.l3_domains.len()],
            samples: Default::default(),
            limits: Vec::new(),
            admitted: 0,
            rejected: 0,
            before_first_rejection: 0,
            mixed: 0,
            mixed_before_first_rejection: 0,
        }
    }

    fn l3_of(&self, cpu: u32) -> Option<usize> {
        self.topo.cpu(cpu).map(|c| c.l3)
    }

    fn residency(&mut self, n: usize, cpu: u32, delta: i32) {
        if self.vms[n].spec.class.is_confidential() {
            return;
        }
        if let Some(d) = self.l3_of(cpu) {
            let v = &mut self.nonconf_per_domain[d];
            *v = v.saturating_add_signed(delta);
        }
    }

    fn allowed(&self, model: &dyn PlacementModel, r: &Running, vcpu: usize) -> CpuSet {
        match r.admitted.per_vcpu.get(vcpu).cloned().flatten() {
            Some(s) => s,
            None => model.shared_pool(),
        }
    }

    fn arrive(&mut self, model: &mut dyn PlacementModel, n: usize) {
        let spec = &self.vms[n].spec;
        let Some(admitted) = model.admit(spec) else {
            self.rejected += 1;
            return;
        };
        self.admitted += 1;
        if self.rejected == 0 {
            self.before_first_rejection += 1;
        }
        if admitted.shares_confidential_domain {
            self.mixed += 1;
            if self.rejected == 0 {
                self.mixed_before_first_rejection += 1;
            }
        }
        self.start(model, n, admitted);
    }

    /// Starts VM `n` where `model` admitted it: each vCPU lands on a CPU of
    /// its set, and vCPUs of other VMs leave CPUs an exclusive set took.
    fn start(&mut self, model: &dyn PlacementModel, n: usize, admitted: Admitted) {
        let spec = &self.vms[n].spec;
        let mut r = Running {
            admitted,
            cur: Vec::new(),
            ran: CpuSet::new(),
            dirty: CpuSet::new(),
        };
        for v in 0..spec.vcpus as usize {
            let set = self.allowed(model, &r, v);
            if let Some(c) = pick(&mut self.rng, &set, None) {
                r.cur.push(c);
                r.ran.insert(c);
                r.dirty.insert(c);
            }
        }
        let cpus: Vec<u32> = r.cur.clone();
        self.running.insert(n, r);
        for c in cpus {
            self.residency(n, c, 1);
        }
        // Exclusive sets may have shrunk a shared pool: vCPUs outside their
        // allowed set move (the agent or kubelet rewrites their cpusets).
        if self.running[&n].admitted.exclusive.is_some() {
            self.evict(model, n);
        }
    }

    fn evict(&mut self, model: &dyn PlacementModel, newcomer: usize) {
        let keys: Vec<usize> = self
            .running
            .keys()
            .copied()
            .filter(|&k| k != newcomer)
            .collect();
        for k in keys {
            let Some(r) = self.running.get(&k) else {
                continue;
            };
            if r.admitted.per_vcpu.iter().all(Option::is_some) {
                continue;
            }
            for v in 0..r.cur.len() {
                let Some(r) = self.running.get(&k) else {
                    break;
                };
                let set = self.allowed(model, r, v);
                let old = r.cur[v];
                if set.contains(old) {
                    continue;
                }
                if let Some(c) = pick(&mut self.rng, &set, None) {
                    self.move_vcpu(k, v, old, c);
                }
            }
        }
    }

    fn move_vcpu(&mut self, n: usize, v: usize, old: u32, new: u32) {
        if let Some(r) = self.running.get_mut(&n) {
            r.cur[v] = new;
            r.ran.insert(new);
            r.dirty.insert(new);
        }
        self.residency(n, old, -1);
        self.residency(n, new, 1);
    }

    fn migrate(&mut self, model: &dyn PlacementModel, n: usize) {
        let Some(r) = self.running.get(&n) else {
            return;
        };
        if r.cur.is_empty() {
            return;
        }
        let v = self.rng.below(r.cur.len());
        let set = self.allowed(model, r, v);
        let old = r.cur[v];
        if set.len() < 2 {
            return;
        }
        if let Some(c) = pick(&mut self.rng, &set, Some(old)) {
            self.move_vcpu(n, v, old, c);
        }
    }

    fn reclaim(&mut self, n: usize) {
        let class = self.vms[n].spec.class;
        if !matches!(class, ConfidentialClass::Sev | ConfidentialClass::SevEs) {
            return;
        }
        let Some(r) = self.running.get(&n) else {
            return;
        };
        let limit = r.dirty.clone();
        self.limits.push(count_u32(limit.len()));
        let sets = [&self.topo.online, &r.ran, &r.dirty];
        let exclusive = r.admitted.exclusive.clone();
        let mut results = Vec::with_capacity(3);
        for set in sets {
            let mut seen = vec![false; self.topo.l3_domains.len()];
            for c in set.iter() {
                if let Some(d) = self.l3_of(c) {
                    seen[d] = true;
                }
            }
            let domains = count_u32(seen.iter().filter(|&&s| s).count());
            let hit: u32 = seen
                .iter()
                .zip(&self.nonconf_per_domain)
                .filter(|(s, _)| **s)
                .map(|(_, n)| *n)
                .sum();
            let below = !limit.is_subset(set);
            let outside = exclusive.as_ref().is_some_and(|e| !set.is_subset(e));
            results.push((count_u32(set.len()), domains, hit, below, outside));
        }
        for (s, (flushed, domains, hit, below, outside)) in self.samples.iter_mut().zip(results) {
            s.flushed.push(flushed);
            s.domains.push(domains);
            if self.rejected == 0 {
                s.domains_before_first_rejection.push(domains);
            }
            s.hit.push(hit);
            s.checks.reclaims_below_limit += u64::from(below);
            s.checks.reclaims_outside_exclusive_cpus += u64::from(outside);
        }
        // Clear on flush; resident vCPUs enter again at once.
        if let Some(r) = self.running.get_mut(&n) {
            r.dirty = r.cur.iter().copied().collect();
        }
    }

    fn depart(&mut self, model: &mut dyn PlacementModel, n: usize) {
        if let Some(r) = self.running.remove(&n) {
            for c in r.cur {
                self.residency(n, c, -1);
            }
            model.release(&self.vms[n].spec.vm);
        }
    }
}

/// Replays `trace` on `topo` for every placement model and flush policy.
pub(crate) fn simulate(
    topo: &Topology,
    trace: &Trace,
    opts: &SimOptions,
) -> Result<Report, SimError> {
    trace.check(&trace.name)?;
    // A VM larger than the host is a mistake in the trace, not a rejection.
    let online = topo.online.len();
    for (i, e) in trace.events.iter().enumerate() {
        if let Event::Arrive { vcpus, vm, .. } = e {
            if *vcpus as usize > online {
                return Err(SimError::Invalid {
                    origin: trace.name.clone(),
                    field: format!("events[{i}].vcpus"),
                    reason: format!(
                        "{vm} asks for {vcpus} vCPUs; the topology has {online} online CPUs"
                    ),
                });
            }
        }
    }
    let (vms, steps, reclaim_events, migration_events) = expand(trace);
    let mut combinations = Vec::new();
    for kind in PlacementModelKind::ALL {
        let res = &opts.reservations;
        let mut model: Box<dyn PlacementModel + '_> = match kind {
            PlacementModelKind::Floating => Box::new(Floating::new(topo, res)),
            PlacementModelKind::KubeletStatic => Box::new(KubeletStatic::new(topo, res)),
            PlacementModelKind::Sevplace => Box::new(Sevplace::new(topo, res)),
        };
        let mut run = Run::new(topo, &vms, trace.seed);
        for &step in &steps {
            match step {
                Step::Arrive(n) => run.arrive(model.as_mut(), n),
                Step::Migrate(n) => run.migrate(model.as_ref(), n),
                Step::Reclaim(n) => run.reclaim(n),
                Step::Depart(n) => run.depart(model.as_mut(), n),
            }
        }
        let limit = Stat::of(&mut run.limits);
        for (flush, s) in FlushPolicy::ALL.into_iter().zip(run.samples.iter_mut()) {
            let flushed = Stat::of(&mut s.flushed);
            combinations.push(Combination {
                placement: kind,
                flush,
                reclaims: s.domains.len() as u64,
                flushed_over_limit: if limit.mean > 0.0 {
                    flushed.mean / limit.mean
                } else {
                    0.0
                },
                flushed_cpus: flushed,
                l3_domains_disturbed: Stat::of(&mut s.domains),
                l3_domains_disturbed_before_first_rejection: Stat::of(
                    &mut s.domains_before_first_rejection,
                ),
                non_confidential_vcpus_hit: Stat::of(&mut s.hit),
                limit_cpus: limit,
                vms_before_first_rejection: run.before_first_rejection,
                admitted: run.admitted,
                rejected: run.rejected,
                mixed_pool_placements: run.mixed,
                mixed_pool_placements_before_first_rejection: run.mixed_before_first_rejection,
                checks: s.checks,
            });
        }
    }
    Ok(Report {
        trace: trace.name.clone(),
        topology: TopologySummary {
            name: String::new(),
            cpus: topo.online.len(),
            l3_domains: topo.l3_domains.len(),
            numa_nodes: topo.numa_nodes.len(),
        },
        arrivals: vms.len(),
        reclaim_events,
        migration_events,
        whole_core_fit_bound: bound::whole_core_fit_bound(
            topo,
            &opts.reservations,
            steps.iter().filter_map(|&step| match step {
                Step::Arrive(n) => Some(Change::Arrive(n, &vms[n].spec)),
                Step::Depart(n) => Some(Change::Depart(n)),
                Step::Migrate(_) | Step::Reclaim(_) => None,
            }),
        ),
        combinations,
    })
}

#[cfg(test)]
mod tests;
