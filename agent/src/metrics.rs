//! Prometheus metrics of the agent (`/metrics`), in the text exposition
//! format, with the `sevplace_` prefix and base units.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::topology::Topology;

/// Labels of `sevplace_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BuildLabels {
    /// The crate version.
    pub(crate) version: String,
}

/// Labels of `sevplace_cpus`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CpuStateLabels {
    /// `online`, `isolated` or `reserved`.
    pub(crate) state: String,
}

/// Labels of the gRPC request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GrpcLabels {
    /// The RPC's name (`GetHost`, ...).
    pub(crate) method: String,
    /// The gRPC code as tonic's `Code` names it (`Ok`, `NotFound`, ...).
    pub(crate) code: String,
}

/// Labels of the gRPC latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    /// The RPC's name (`GetHost`, ...).
    pub(crate) method: String,
}

/// `phase` of a reconcile pass: `scan` (reading procfs) or
/// `compare_and_act` (matching intents, pinning, module sync).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabels {
    /// `scan` or `compare_and_act`.
    pub(crate) phase: String,
}

/// Every metric the agent exports, registered once.
pub struct Metrics {
    registry: Registry,
    /// `sevplace_cpus` (gauge).
    pub(crate) cpus: Family<CpuStateLabels, Gauge>,
    /// `sevplace_l3_domains` (gauge).
    pub(crate) l3_domains: Gauge,
    /// `sevplace_numa_nodes` (gauge).
    pub(crate) numa_nodes: Gauge,
    /// `sevplace_grpc_requests_total` (counter).
    pub(crate) grpc_requests: Family<GrpcLabels, Counter>,
    /// `sevplace_grpc_request_duration_seconds` (histogram).
    pub(crate) grpc_duration: Family<MethodLabels, Histogram>,
    /// `sevplace_reconcile_phase_duration_seconds` (histogram).
    pub(crate) reconcile_phase_duration: Family<PhaseLabels, Histogram>,
    /// `sevplace_confidential_pool_l3_domains` (gauge).
    pub(crate) confidential_pool_l3_domains: Gauge,
    /// `sevplace_drift_corrections_total` (counter).
    pub(crate) drift_corrections: Family<ReasonLabels, Counter>,
    /// `sevplace_pin_failures_total` (counter).
    pub pin_failures: Family<ReasonLabels, Counter>,
    /// `sevplace_vms_failing_pins` (gauge).
    pub(crate) vms_failing_pins: Gauge,
    /// `sevplace_vms_unplaceable` (gauge).
    pub(crate) vms_unplaceable: Gauge,
    /// `sevplace_reconcile_duration_seconds` (histogram).
    pub(crate) reconcile_duration: Histogram,
    /// `sevplace_reconcile_lock_wait_seconds` (histogram).
    pub(crate) reconcile_lock_wait: Histogram,
    /// `sevplace_condition` (gauge).
    pub(crate) condition: Family<ConditionLabels, Gauge>,
    /// `sevplace_checkpoint_write_failures_total` (counter).
    pub checkpoint_write_failures: Counter,
    /// `sevplace_tls_handshakes_total` (counter).
    pub(crate) tls_handshakes: Family<HandshakeLabels, Counter>,
    /// `sevplace_audit_events_total` (counter).
    pub(crate) audit_events: Family<AuditLabels, Counter>,
    /// `sevplace_vm_dirty_cpus` (gauge).
    pub(crate) vm_dirty_cpus: Family<VmLabels, Gauge>,
    /// `sevplace_vm_ran_cpus` (gauge).
    pub(crate) vm_ran_cpus: Family<VmLabels, Gauge>,
    /// `sevplace_vm_vcpus` (gauge).
    pub(crate) vm_vcpus: Family<VmLabels, Gauge>,
    /// `sevplace_vm_flushes_total` (counter).
    pub(crate) vm_flushes: Family<VmLabels, Counter>,
    /// `sevplace_vm_flushed_cpus_total` (counter).
    pub(crate) vm_flushed_cpus: Family<VmLabels, Counter>,
    /// `sevplace_kmod_flushes_total` (counter).
    pub(crate) kmod_flushes: Family<KindLabels, Counter>,
    /// `sevplace_kmod_flushed_cpus_total` (counter).
    pub(crate) kmod_flushed_cpus: Family<KindLabels, Counter>,
    /// `sevplace_kmod_info` (gauge).
    pub(crate) kmod_info: Family<KmodLabels, Gauge>,
    /// `sevplace_kmod_loaded` (gauge).
    pub(crate) kmod_loaded: Gauge,
    /// `sevplace_confidential_vms` (gauge).
    pub(crate) confidential_vms: Gauge,
    /// `sevplace_fleet_syncs_total` (counter).
    pub(crate) fleet_syncs: Family<ResultLabels, Counter>,
    /// `sevplace_fleet_sync_duration_seconds` (histogram).
    pub(crate) fleet_sync_duration: Histogram,
    /// Last module readings, to turn module counters into increments.
    last: std::sync::Mutex<CounterReadings>,
}

/// Labels of per-VM series: bounded by the live VMs; series of exited VMs
/// are removed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct VmLabels {
    /// The VM's key.
    pub vm: String,
    /// Its confidential class, or `unknown`.
    pub confidential: String,
}

/// Labels of module flush counters: `targeted`, `full` or `scrub`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    /// `targeted`, `full` or `scrub`.
    pub(crate) kind: String,
}

/// Labels of `sevplace_kmod_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KmodLabels {
    /// The module's ABI version.
    pub(crate) abi: String,
    /// The module's mode (`observe`, `targeted`).
    pub(crate) mode: String,
    /// The module's state (`loaded`, `absent`, ...).
    pub(crate) state: String,
}

/// One VM's module figures, for [`Metrics::set_vms`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFigures {
    /// The VM's labels.
    pub labels: VmLabels,
    /// vCPU threads of the VM.
    pub vcpus: u32,
    /// `None` when the module does not track the VM.
    pub dirty_cpus: Option<usize>,
    /// CPUs in the module's `ran_cpus`; `None` when the module does not track the VM.
    pub ran_cpus: Option<usize>,
    /// The module's `flushes` of the VM; `None` when it does not track the VM.
    pub flushes: Option<u64>,
    /// The module's `flushed_cpus` of the VM; `None` when it does not track the VM.
    pub flushed_cpus: Option<u64>,
}

#[derive(Debug, Default)]
struct CounterReadings {
    vm: std::collections::BTreeMap<VmLabels, (u64, u64)>,
    kmod: std::collections::BTreeMap<String, (u64, u64)>,
}

/// Advances `counter` to a source counter's new `reading`: by the
/// difference, or by the whole reading when the source restarted (a module
/// reload), so the exported counter never goes down.
fn advance(counter: &Counter, last: u64, reading: u64) {
    let delta = if reading >= last {
        reading - last
    } else {
        reading
    };
    if delta > 0 {
        counter.inc_by(delta);
    }
}

/// Labels of `sevplace_tls_handshakes_total`: `ok`, `refused` (the
/// client's certificate or name was not accepted, or TLS failed),
/// `timeout`, or `closed` (the connection ended before the handshake, as a
/// TCP probe does).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    /// `ok`, `refused`, `timeout` or `closed`.
    pub(crate) result: String,
}

/// Labels of `sevplace_audit_events_total`: the mutating RPC and its
/// result (`ok` or the gRPC code name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AuditLabels {
    /// The mutating RPC (`PlaceVm`, `ReleaseVm`, `ScrubVm`).
    pub(crate) rpc: String,
    /// `ok` or the gRPC code name.
    pub(crate) result: String,
}

/// Labels of `sevplace_condition`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConditionLabels {
    /// The condition's name.
    pub(crate) condition: String,
}

/// Labels of `sevplace_fleet_syncs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    /// `ok` or `error`.
    pub(crate) result: String,
}

/// Labels of `sevplace_drift_corrections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason's name.
    pub reason: String,
}

fn latency_buckets() -> Histogram {
    // 50 µs to about 1.6 s, doubling.
    Histogram::new((0..16).map(|i| 50e-6 * f64::powi(2.0, i)))
}

impl Metrics {
    /// Registers every metric, with the build info set.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sevplace");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "Agent build information (always 1)", build);
        let cpus = Family::<CpuStateLabels, Gauge>::default();
        registry.register("cpus", "Logical CPUs of the host by state", cpus.clone());
        let l3_domains = Gauge::default();
        registry.register(
            "l3_domains",
            "L3 cache domains of the host",
            l3_domains.clone(),
        );
        let numa_nodes = Gauge::default();
        registry.register("numa_nodes", "NUMA nodes of the host", numa_nodes.clone());
        let confidential_pool_l3_domains = Gauge::default();
        registry.register(
            "confidential_pool_l3_domains",
            "L3 domains currently in the confidential pool",
            confidential_pool_l3_domains.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC requests handled, by method and status code",
            grpc_requests.clone(),
        );
        let grpc_duration =
            Family::<MethodLabels, Histogram>::new_with_constructor(latency_buckets as fn() -> _);
        registry.register(
            "grpc_request_duration_seconds",
            "Time to handle a gRPC request",
            grpc_duration.clone(),
        );
        let drift_corrections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "drift_corrections",
            "Threads or cgroups put back into their placement, by reason",
            drift_corrections.clone(),
        );
        let pin_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "pin_failures",
            "Failed attempts to apply a placement to a VM's threads or cgroups, by error kind",
            pin_failures.clone(),
        );
        let vms_failing_pins = Gauge::default();
        registry.register(
            "vms_failing_pins",
            "VMs whose placement could not be applied on the last attempt (retried with backoff)",
            vms_failing_pins.clone(),
        );
        let vms_unplaceable = Gauge::default();
        registry.register(
            "vms_unplaceable",
            "Intents kept without a placement because none fits the host's topology now",
            vms_unplaceable.clone(),
        );
        let reconcile_duration = latency_buckets();
        registry.register(
            "reconcile_duration_seconds",
            "Time of one whole reconcile pass: procfs scan, lock wait, compare and act",
            reconcile_duration.clone(),
        );
        let reconcile_phase_duration =
            Family::<PhaseLabels, Histogram>::new_with_constructor(latency_buckets as fn() -> _);
        registry.register(
            "reconcile_phase_duration_seconds",
            "Time of one phase of a reconcile pass: scan (procfs) or compare_and_act",
            reconcile_phase_duration.clone(),
        );
        let condition = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "condition",
            "1 while a condition keeps the agent from doing its whole job (GetHost lists them)",
            condition.clone(),
        );
        for kind in crate::conditions::ConditionKind::ALL {
            condition
                .get_or_create(&ConditionLabels {
                    condition: kind.as_str().to_string(),
                })
                .set(0);
        }
        let checkpoint_write_failures = Counter::default();
        registry.register(
            "checkpoint_write_failures",
            "Failed writes of the intent checkpoint (the change was refused or postponed)",
            checkpoint_write_failures.clone(),
        );
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the TCP listener by result (ok, refused, timeout, closed)",
            tls_handshakes.clone(),
        );
        let reconcile_lock_wait = latency_buckets();
        registry.register(
            "reconcile_lock_wait_seconds",
            "Time a reconcile pass waited for the core lock held by API calls",
            reconcile_lock_wait.clone(),
        );
        let vm_dirty_cpus = Family::<VmLabels, Gauge>::default();
        registry.register(
            "vm_dirty_cpus",
            "CPUs that entered the VM since their last flush (sevflush)",
            vm_dirty_cpus.clone(),
        );
        let vm_ran_cpus = Family::<VmLabels, Gauge>::default();
        registry.register(
            "vm_ran_cpus",
            "CPUs that ever entered the VM (sevflush)",
            vm_ran_cpus.clone(),
        );
        let vm_vcpus = Family::<VmLabels, Gauge>::default();
        registry.register("vm_vcpus", "vCPUs of the VM", vm_vcpus.clone());
        let vm_flushes = Family::<VmLabels, Counter>::default();
        registry.register(
            "vm_flushes",
            "Targeted flushes of the VM's dirty CPUs (sevflush)",
            vm_flushes.clone(),
        );
        let vm_flushed_cpus = Family::<VmLabels, Counter>::default();
        registry.register(
            "vm_flushed_cpus",
            "CPUs flushed by the VM's targeted flushes (sevflush)",
            vm_flushed_cpus.clone(),
        );
        let kmod_flushes = Family::<KindLabels, Counter>::default();
        registry.register(
            "kmod_flushes",
            "Flushes made by sevflush, by kind (targeted, full, scrub)",
            kmod_flushes.clone(),
        );
        let kmod_flushed_cpus = Family::<KindLabels, Counter>::default();
        registry.register(
            "kmod_flushed_cpus",
            "CPUs flushed by sevflush's targeted flushes and scrubs, by kind",
            kmod_flushed_cpus.clone(),
        );
        let kmod_info = Family::<KmodLabels, Gauge>::default();
        registry.register(
            "kmod_info",
            "sevflush module ABI, mode and state (always 1)",
            kmod_info.clone(),
        );
        let kmod_loaded = Gauge::default();
        registry.register(
            "kmod_loaded",
            "1 when the sevflush module is loaded with a supported ABI",
            kmod_loaded.clone(),
        );
        let audit_events = Family::<AuditLabels, Counter>::default();
        registry.register(
            "audit_events",
            "Answered mutating calls (PlaceVm, ReleaseVm, ScrubVm) by RPC and result",
            audit_events.clone(),
        );
        let confidential_vms = Gauge::default();
        registry.register(
            "confidential_vms",
            "Running VMs with a confidential class (placed or not)",
            confidential_vms.clone(),
        );
        let fleet_syncs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fleet_syncs",
            "Syncs of this host's provider tree and allocations to OpenStack Placement, by result (ok, error)",
            fleet_syncs.clone(),
        );
        let fleet_sync_duration = Histogram::new((0..16).map(|i| 1e-3 * f64::powi(2.0, i)));
        registry.register(
            "fleet_sync_duration_seconds",
            "Time of one sync to OpenStack Placement",
            fleet_sync_duration.clone(),
        );
        Self {
            fleet_syncs,
            fleet_sync_duration,
            pin_failures,
            vms_failing_pins,
            vms_unplaceable,
            vm_dirty_cpus,
            vm_ran_cpus,
            vm_vcpus,
            vm_flushes,
            vm_flushed_cpus,
            kmod_flushes,
            kmod_flushed_cpus,
            kmod_info,
            kmod_loaded,
            confidential_vms,
            last: std::sync::Mutex::new(CounterReadings::default()),
            drift_corrections,
            reconcile_duration,
            reconcile_phase_duration,
            reconcile_lock_wait,
            condition,
            checkpoint_write_failures,
            tls_handshakes,
            audit_events,
            registry,
            cpus,
            l3_domains,
            numa_nodes,
            grpc_requests,
            grpc_duration,
            confidential_pool_l3_domains,
        }
    }

    /// Sets the topology gauges.
    pub(crate) fn set_topology(&self, topo: &Topology, reserved: usize) {
        let set = |state: &str, v: usize| {
            self.cpus
                .get_or_create(&CpuStateLabels {
                    state: state.to_string(),
                })
                .set(v as i64);
        };
        set("online", topo.online.len());
        set("isolated", topo.isolated.len());
        set("reserved", reserved);
        self.l3_domains.set(topo.l3_domains.len() as i64);
        self.numa_nodes.set(topo.numa_nodes.len() as i64);
    }

    /// Sets the module gauges and counters from a status reading.
    pub fn set_module(&self, s: &crate::kmod::ModuleStatus) {
        use crate::kmod::ModuleState;
        self.kmod_info.clear();
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.kmod_info
            .get_or_create(&KmodLabels {
                abi: s.abi_version.to_string(),
                mode: s.mode.clone(),
                state,
            })
            .set(1);
        let loaded = s.state == ModuleState::Loaded;
        self.kmod_loaded.set(i64::from(loaded));
        if !loaded {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, flushes, cpus) in [
            ("targeted", s.flushes_total, s.flushed_cpus_total),
            ("full", s.full_flushes_total, 0),
            ("scrub", s.scrubs_total, s.scrubbed_cpus_total),
        ] {
            let labels = KindLabels {
                kind: kind.to_string(),
            };
            let (lf, lc) = last.kmod.get(kind).copied().unwrap_or((0, 0));
            advance(&self.kmod_flushes.get_or_create(&labels), lf, flushes);
            if kind != "full" {
                advance(&self.kmod_flushed_cpus.get_or_create(&labels), lc, cpus);
            }
            last.kmod.insert(kind.to_string(), (flushes, cpus));
        }
    }

    /// Replaces the per-VM series with `vms`: series of VMs not in the list
    /// are removed, so cardinality follows the live VMs.
    pub fn set_vms(&self, vms: &[VmFigures]) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let live: std::collections::BTreeSet<&VmLabels> = vms.iter().map(|v| &v.labels).collect();
        let stale: Vec<VmLabels> = last
            .vm
            .keys()
            .filter(|l| !live.contains(l))
            .cloned()
            .collect();
        for l in &stale {
            self.vm_dirty_cpus.remove(l);
            self.vm_ran_cpus.remove(l);
            self.vm_vcpus.remove(l);
            self.vm_flushes.remove(l);
            self.vm_flushed_cpus.remove(l);
            last.vm.remove(l);
        }
        for v in vms {
            let l = &v.labels;
            self.vm_vcpus.get_or_create(l).set(i64::from(v.vcpus));
            match (v.dirty_cpus, v.ran_cpus, v.flushes, v.flushed_cpus) {
                (Some(d), Some(r), Some(f), Some(fc)) => {
                    self.vm_dirty_cpus.get_or_create(l).set(d as i64);
                    self.vm_ran_cpus.get_or_create(l).set(r as i64);
                    let (lf, lc) = last.vm.get(l).copied().unwrap_or((0, 0));
                    advance(&self.vm_flushes.get_or_create(l), lf, f);
                    advance(&self.vm_flushed_cpus.get_or_create(l), lc, fc);
                    last.vm.insert(l.clone(), (f, fc));
                }
                _ => {
                    self.vm_dirty_cpus.remove(l);
                    self.vm_ran_cpus.remove(l);
                    last.vm.entry(l.clone()).or_insert((0, 0));
                }
            }
        }
        self.confidential_vms.set(
            vms.iter()
                .filter(|v| !matches!(v.labels.confidential.as_str(), "none" | "unknown"))
                .count() as i64,
        );
    }

    /// Records one drift correction.
    pub fn observe_drift(&self, reason: &str) {
        self.drift_corrections
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records one whole reconcile pass, scan included.
    pub fn observe_reconcile(&self, elapsed: Duration) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    /// Records one phase of a reconcile pass (`scan`, `compare_and_act`).
    pub(crate) fn observe_reconcile_phase(&self, phase: &str, elapsed: Duration) {
        self.reconcile_phase_duration
            .get_or_create(&PhaseLabels {
                phase: phase.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one sync to Placement and its time.
    pub(crate) fn observe_fleet_sync(&self, ok: bool, elapsed: Duration) {
        self.fleet_syncs
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
        self.fleet_sync_duration.observe(elapsed.as_secs_f64());
    }

    /// Sets `sevplace_condition{condition}`.
    pub(crate) fn set_condition(&self, kind: crate::conditions::ConditionKind, raised: bool) {
        self.condition
            .get_or_create(&ConditionLabels {
                condition: kind.as_str().to_string(),
            })
            .set(i64::from(raised));
    }

    /// Records how long a reconcile pass waited for the core lock.
    pub fn observe_reconcile_lock_wait(&self, waited: Duration) {
        self.reconcile_lock_wait.observe(waited.as_secs_f64());
    }

    /// Counts one TLS handshake on the TCP listener by its result.
    pub fn observe_tls_handshake(&self, result: &str) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts one answered mutating call by RPC and result.
    pub(crate) fn observe_audit(&self, rpc: &str, result: &str) {
        self.audit_events
            .get_or_create(&AuditLabels {
                rpc: rpc.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Records one gRPC call.
    pub fn observe_grpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.grpc_duration
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Every metric in the OpenMetrics text format.
    pub(crate) fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        sort_series(&out)
    }

    /// Every metric in the Prometheus text format 0.0.4.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }
}

/// The label set of a sample line without its `le` label: the key that
/// orders the series of a family (a histogram's `_bucket`, `_sum` and
/// `_count` lines of one series share it).
fn series_key(line: &str) -> String {
    let (Some(open), Some(close)) = (line.find('{'), line.rfind('}')) else {
        return String::new();
    };
    let labels = line.get(open + 1..close).unwrap_or_default();
    match labels.find("le=\"") {
        Some(i) => {
            let rest = &labels[i + 4..];
            let end = rest.find('"').map_or(labels.len(), |e| i + 4 + e + 1);
            let (before, after) = (&labels[..i], &labels[end..]);
            match (before.trim_end_matches(','), after.trim_start_matches(',')) {
                ("", a) => a.to_string(),
                (b, "") => b.to_string(),
                (b, a) => format!("{b},{a}"),
            }
        }
        None => labels.to_string(),
    }
}

/// Orders the samples of each family by their label set, so the output is
/// the same from scrape to scrape (the encoder walks hash maps). A stable
/// sort keeps the lines of one series (histogram buckets, sum, count) in
/// the encoder's order.
pub(crate) fn sort_series(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run: Vec<&str> = Vec::new();
    let flush = |run: &mut Vec<&str>, out: &mut String| {
        run.sort_by_cached_key(|l| series_key(l));
        for l in run.drain(..) {
            out.push_str(l);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut run, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            run.push(line);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter family
/// `x` becomes `x_total` (its samples already carry the suffix), `info`
/// families become gauges named `x_info`, and `# UNIT` and `# EOF` lines,
/// which 0.0.4 does not have, are dropped.
pub(crate) fn openmetrics_to_prometheus(text: &str) -> String {
    let mut kinds = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                kinds.insert(name.to_string(), kind.to_string());
            }
        }
    }
    let rename = |name: &str| match kinds.get(name).map(String::as_str) {
        Some("counter") => (format!("{name}_total"), "counter"),
        Some("info") => (format!("{name}_info"), "gauge"),
        Some("histogram") => (name.to_string(), "histogram"),
        Some("gauge") => (name.to_string(), "gauge"),
        _ => (name.to_string(), "untyped"),
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (new, kind) = rename(name);
            out.push_str(&format!("# TYPE {new} {kind}\n"));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", rename(name).0));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_renames_counters_and_drops_openmetrics_lines() {
        let m = Metrics::new();
        m.observe_grpc("GetHost", tonic::Code::Ok, Duration::from_micros(70));
        m.observe_grpc("PlaceVm", tonic::Code::Ok, Duration::from_micros(70));
        m.observe_grpc("ListVms", tonic::Code::NotFound, Duration::from_micros(70));
        let om = m.encode_openmetrics();
        assert!(om.contains("# TYPE sevplace_grpc_requests counter"));
        assert!(om.ends_with("# EOF\n"));
        let text = m.encode_prometheus();
        assert!(
            text.contains("# TYPE sevplace_grpc_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("sevplace_grpc_requests_total{method=\"GetHost\",code=\"Ok\"} 1"));
        assert!(text.contains("# TYPE sevplace_build_info gauge"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn series_are_sorted_by_labels_and_histograms_stay_whole() {
        let m = Metrics::new();
        for method in ["PlaceVm", "GetHost", "ListVms", "GetVm"] {
            m.observe_grpc(method, tonic::Code::Ok, Duration::from_micros(70));
        }
        let text = m.encode_prometheus();
        let requests: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sevplace_grpc_requests_total{"))
            .collect();
        let mut sorted = requests.clone();
        sorted.sort();
        assert_eq!(requests, sorted);
        assert_eq!(requests.len(), 4);
        // One series' histogram lines stay together, buckets in le order.
        let get_host: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("sevplace_grpc_request_duration_seconds")
                    && l.contains("method=\"GetHost\"")
            })
            .collect();
        let first = text.lines().position(|l| l == get_host[0]).unwrap_or(0);
        let block: Vec<&str> = text.lines().skip(first).take(get_host.len()).collect();
        assert_eq!(block, get_host);
        assert!(get_host
            .iter()
            .rev()
            .find(|l| l.contains("_bucket"))
            .is_some_and(|l| l.contains("le=\"+Inf\"")));
        assert_eq!(
            series_key("x_bucket{method=\"A\",le=\"0.5\"} 1"),
            "method=\"A\""
        );
        assert_eq!(
            series_key("x_bucket{le=\"0.5\",method=\"A\"} 1"),
            series_key("x_sum{method=\"A\"} 1")
        );
        assert_eq!(text, m.encode_prometheus());
    }
}
