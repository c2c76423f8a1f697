//! The agent's core: intents (checkpointed), the placement engine's state,
//! the VMs discovered on the host, and the one loop that makes the host
//! match the intents (observe, compare, act, record).
//!
//! Every mutation of intents is written to the checkpoint (write, fsync,
//! rename) before any thread is pinned, so an acknowledged PlaceVm survives
//! `kill -9`. Observed state is always re-read from procfs, never assumed
//! from what was last written.

pub mod conditions;
pub mod enforce;
pub mod events;
pub mod matching;
pub mod priority;
pub mod refit;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::cgroup::{CgroupError, CpusetWriter};
use crate::cpuset::CpuSet;
use crate::discovery::{DiscoveredVm, DiscoveryError, VmScanner};
use crate::kmod::ModuleReader;
use crate::metrics::Metrics;
use crate::placement::{
    self, PlaceError, Placement, PlacementRequest, PlacementState, Reservations,
};
use crate::state::selector::Resolution;
use crate::state::{
    self, Checkpoint, CheckpointError, CheckpointStore, IntentRecord, PlacementRecord, VmSelector,
};
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};

use conditions::{Change, Condition, ConditionKind, Conditions};
use events::{EventBus, EventKind};

/// Lifecycle of a VM as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Pending,
    Placed,
    Drifted,
    Unmanaged,
    Exited,
    /// Kept, but no placement fits the current topology.
    Unplaceable,
}

/// Where a VM's class came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassSource {
    Orchestrator,
    CommandLine,
    Unknown,
}

/// A PlaceVm call, validated at the API edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceCall {
    pub vm_id: VmId,
    /// `None`: wait for a VM whose libvirt domain or guest name is `vm_id`.
    pub selector: Option<VmSelector>,
    pub vcpus: u32,
    pub class: Option<ConfidentialClass>,
    pub shared: bool,
    pub numa_node: Option<u32>,
    pub validate_only: bool,
}

/// A VM as reported by GetVm and ListVms.
#[derive(Debug, Clone)]
pub struct VmView {
    pub vm_id: String,
    pub pid: u32,
    pub libvirt_domain: Option<String>,
    pub class: Option<ConfidentialClass>,
    pub class_source: ClassSource,
    pub state: VmState,
    pub vcpus: u32,
    pub shared: bool,
    pub placement: Option<Placement>,
    pub threads: Vec<crate::discovery::VcpuThread>,
    pub placed_at: Option<SystemTime>,
    /// Set while the intent is unplaceable.
    pub unplaceable: Option<refit::Unplaceable>,
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Place(#[from] PlaceError),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the intent could not be saved, nothing was changed: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("host scan failed: {0}")]
    Discovery(#[from] DiscoveryError),
}

/// Runtime facts of one intent.
#[derive(Debug, Clone, Default)]
struct Runtime {
    /// The VM process matched to the intent, from the last observation.
    observed: Option<DiscoveredVm>,
    /// vCPU thread ids pinned so far.
    pinned_tids: BTreeSet<u32>,
    drifted: bool,
    placed_at: Option<SystemTime>,
    /// Consecutive failed enforcement attempts, for backoff.
    failures: u32,
    /// Passes to skip before the next attempt.
    backoff: u32,
}

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub vms_seen: usize,
    pub corrections: usize,
    pub released: Vec<String>,
    pub errors: Vec<String>,
}

/// Host access of the core.
pub struct HostAccess {
    pub scanner: VmScanner,
    /// `None` when the host has no usable cpuset hierarchy: affinity only.
    pub cgroups: Option<CpusetWriter>,
    pub module: ModuleReader,
    pub affinity: Arc<dyn enforce::ThreadAffinity>,
}

/// The agent's state and the operations on it.
pub struct AgentCore {
    topology: Arc<Topology>,
    reservations: Reservations,
    host: HostAccess,
    store: CheckpointStore,
    checkpoint: Checkpoint,
    placements: PlacementState,
    runtime: BTreeMap<VmId, Runtime>,
    unmanaged: BTreeMap<u32, DiscoveredVm>,
    /// Place discovered confidential VMs without an orchestrator call.
    auto_place: bool,
    /// `(pid, start_time)` of VMs auto placement could not place; tried
    /// once, so a full host does not log every pass.
    auto_failed: BTreeSet<(u32, u64)>,
    pub events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    /// The capacity summary of the placements at a checkpoint generation:
    /// placements change only with a new generation, and GetHost asks
    /// for the summary far more often than placements change.
    capacity_cache: Mutex<Option<(u64, placement::CapacitySummary)>>,
    conditions: Conditions,
    /// Shortest time between two scrubs of one VM.
    scrub_min_interval: std::time::Duration,
    /// When each VM was last scrubbed (monotonic clock).
    last_scrub: BTreeMap<VmId, Instant>,
    /// Intents no placement fits on the current topology; kept in the
    /// checkpoint with their last placement, not pinned.
    unplaceable: BTreeMap<VmId, refit::Unplaceable>,
}

/// The emulator threads of a confidential VM run outside the confidential
/// pool's domains when such CPUs exist, so they neither dirty nor are
/// disturbed by the pool's flushes.
fn emulator_cpus(
    topo: &Topology,
    placements: &PlacementState,
    res: &Reservations,
    p: &Placement,
) -> Option<CpuSet> {
    if !p.request.class.is_confidential() {
        return None;
    }
    let pool = topo.cpus_of_l3(&placements.confidential_domains());
    let outside = topo.online.difference(&pool).difference(&res.host);
    (!outside.is_empty()).then_some(outside)
}

impl AgentCore {
    /// Loads the checkpoint and restores the engine state from it. A
    /// corrupt or newer checkpoint is an error: it is never dropped.
    pub fn new(
        topology: Arc<Topology>,
        reservations: Reservations,
        host: HostAccess,
        store: CheckpointStore,
        metrics: Arc<Metrics>,
        events: Arc<EventBus>,
    ) -> Result<Self, AgentError> {
        let checkpoint = store.load()?;
        let runtime = checkpoint
            .intents
            .iter()
            .map(|i| (i.vm_id.clone(), Runtime::default()))
            .collect();
        let fitted = refit::refit(&topology, &reservations, &checkpoint.intents);
        let mut core = Self {
            topology,
            reservations,
            host,
            store,
            checkpoint,
            placements: PlacementState::new(),
            runtime,
            unmanaged: BTreeMap::new(),
            auto_place: false,
            auto_failed: BTreeSet::new(),
            events,
            metrics,
            capacity_cache: Mutex::new(None),
            conditions: Conditions::default(),
            scrub_min_interval: std::time::Duration::from_secs(1),
            last_scrub: BTreeMap::new(),
            unplaceable: BTreeMap::new(),
        };
        core.adopt_refit(fitted);
        Ok(core)
    }

    /// Adopts a new topology (CPU hotplug, SMT toggled) and checks every
    /// intent's placement against it.
    pub fn set_topology(&mut self, topology: Arc<Topology>) {
        if *topology == *self.topology {
            return;
        }
        tracing::warn!(
            online = %topology.online,
            was = %self.topology.online,
            l3_domains = topology.l3_domains.len(),
            "host topology changed; checking every placement against it"
        );
        self.topology = topology;
        let fitted = refit::refit(&self.topology, &self.reservations, &self.checkpoint.intents);
        self.adopt_refit(fitted);
    }

    /// Makes `fitted` the engine state: re-placed intents are saved to the
    /// checkpoint before any pin (a failed save keeps them unplaceable,
    /// with the error), then reported as events; unplaceable ones are kept
    /// and named in a condition, a metric and the log.
    fn adopt_refit(&mut self, mut fitted: refit::Refit) {
        if !fitted.replaced.is_empty() {
            let mut next = self.checkpoint.clone();
            for (id, m) in &fitted.replaced {
                if let Some(intent) = next.intents.iter_mut().find(|i| &i.vm_id == id) {
                    intent.placement = Some(PlacementRecord {
                        vcpu_cpus: m.new.vcpu_cpus.clone(),
                        emulator_cpus: emulator_cpus(
                            &self.topology,
                            &fitted.placements,
                            &self.reservations,
                            &m.new,
                        ),
                    });
                    intent.engine = Some(m.new.clone());
                }
            }
            if let Err(e) = self.commit(next) {
                for (id, m) in std::mem::take(&mut fitted.replaced) {
                    fitted.placements.release(&id);
                    fitted.unplaceable.insert(
                        id,
                        refit::Unplaceable {
                            missing: m.old.cpus.difference(&self.topology.online),
                            reason: format!("{}; the new placement could not be saved: {e}", m.reason),
                        },
                    );
                }
            }
        }
        for (id, m) in &fitted.replaced {
            tracing::warn!(vm = %id, old = %m.old.cpus, new = %m.new.cpus, reason = %m.reason, "placement re-placed on the new topology");
            if let Some(rt) = self.runtime.get_mut(id) {
                // Every thread is pinned afresh: a placement, not drift.
                rt.pinned_tids.clear();
                rt.backoff = 0;
            }
            self.events.publish(
                id.as_str(),
                EventKind::Replaced {
                    old_cpus: m.old.cpus.clone(),
                    new: m.new.clone(),
                    reason: m.reason.clone(),
                },
            );
        }
        for (id, u) in &fitted.unplaceable {
            if self.unplaceable.get(id) != Some(u) {
                tracing::error!(vm = %id, missing = %u.missing, reason = %u.reason, "no placement fits this topology; the intent is kept, unplaceable");
            }
        }
        self.placements = fitted.placements;
        self.unplaceable = fitted.unplaceable;
        *self
            .capacity_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.update_pool_metric();
        self.update_unplaceable();
    }

    /// The unplaceable metric and condition from `self.unplaceable`.
    fn update_unplaceable(&mut self) {
        self.metrics
            .vms_unplaceable
            .set(self.unplaceable.len() as i64);
        let result = if self.unplaceable.is_empty() {
            Ok(())
        } else {
            let each: Vec<String> = self
                .unplaceable
                .iter()
                .map(|(id, u)| {
                    if u.missing.is_empty() {
                        format!("{id} ({})", u.reason)
                    } else {
                        format!("{id} (missing CPUs {})", u.missing)
                    }
                })
                .collect();
            Err(format!(
                "{} VM(s) have no placement that fits this host's topology and are kept unplaceable: {}",
                each.len(),
                each.join(", ")
            ))
        };
        self.set_condition(ConditionKind::PlacementsUnplaceable, result);
    }

    /// Sets the shortest time between two scrubs of one VM (zero: no limit).
    pub fn set_scrub_min_interval(&mut self, d: std::time::Duration) {
        self.scrub_min_interval = d;
    }

    /// Admits a scrub of `vm` at `now`, or says how long to wait: scrubs of
    /// one VM are at least the configured interval apart, which bounds the
    /// flush IPIs an admin caller can cause.
    pub fn admit_scrub(&mut self, vm: &VmId, now: Instant) -> Result<(), std::time::Duration> {
        let min = self.scrub_min_interval;
        self.last_scrub
            .retain(|_, at| now.saturating_duration_since(*at) < min);
        if let Some(at) = self.last_scrub.get(vm) {
            return Err(min.saturating_sub(now.saturating_duration_since(*at)));
        }
        if !min.is_zero() {
            self.last_scrub.insert(vm.clone(), now);
        }
        Ok(())
    }

    /// Turns auto placement of discovered confidential VMs on or off.
    pub fn set_auto_place(&mut self, on: bool) {
        self.auto_place = on;
    }

    /// `(pid, start_time)` of every running VM process the agent manages,
    /// for exit watches.
    pub fn managed_processes(&self) -> Vec<(u32, u64)> {
        self.runtime
            .values()
            .filter_map(|r| r.observed.as_ref())
            .map(|v| (v.pid, v.start_time))
            .collect()
    }

    /// Places the unmanaged confidential VMs (auto mode).
    fn auto_place_unmanaged(&mut self, report: &mut PassReport) {
        let candidates: Vec<DiscoveredVm> = self
            .unmanaged
            .values()
            .filter(|v| v.class.is_some_and(|c| c.is_confidential()))
            .filter(|v| !self.auto_failed.contains(&(v.pid, v.start_time)))
            .cloned()
            .collect();
        for vm in candidates {
            let vcpus = vm.vcpu_fds.len().max(vm.vcpus.len()) as u32;
            let Ok(vm_id) = VmId::new(format!("pid-{}", vm.pid)) else {
                continue;
            };
            let call = PlaceCall {
                vm_id: vm_id.clone(),
                selector: Some(VmSelector::Process {
                    pid: vm.pid,
                    start_time: Some(vm.start_time),
                }),
                vcpus,
                class: None,
                shared: false,
                numa_node: None,
                validate_only: false,
            };
            match self.place(call) {
                Ok(_) => tracing::info!(vm = %vm_id, vcpus, "auto-placed confidential VM"),
                Err(e) => {
                    tracing::warn!(vm = %vm_id, error = %e, "auto placement failed; the VM stays unmanaged");
                    report.errors.push(format!("{vm_id}: {e}"));
                    self.auto_failed.insert((vm.pid, vm.start_time));
                }
            }
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn reservations(&self) -> &Reservations {
        &self.reservations
    }

    pub fn placements(&self) -> &PlacementState {
        &self.placements
    }

    pub fn module(&self) -> &ModuleReader {
        &self.host.module
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    fn update_pool_metric(&self) {
        self.metrics
            .confidential_pool_l3_domains
            .set(self.placements.confidential_domains().len() as i64);
    }

    /// Capacity summary from the engine, computed once per checkpoint
    /// generation.
    pub fn capacity(&self) -> placement::CapacitySummary {
        let generation = self.checkpoint.generation;
        let mut cache = self
            .capacity_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match cache.as_ref() {
            Some((g, c)) if *g == generation => c.clone(),
            _ => {
                let c = placement::capacity(&self.topology, &self.placements, &self.reservations);
                *cache = Some((generation, c.clone()));
                c
            }
        }
    }

    /// Writes `next` as the checkpoint, then adopts it. A failed write
    /// leaves the current checkpoint in force and raises
    /// `CheckpointWriteFailing` until a write succeeds.
    fn commit(&mut self, mut next: Checkpoint) -> Result<(), CheckpointError> {
        next.generation = self.checkpoint.generation + 1;
        if let Err(e) = self.store.save(&next) {
            self.metrics.checkpoint_write_failures.inc();
            self.set_condition(ConditionKind::CheckpointWriteFailing, Err(e.to_string()));
            return Err(e);
        }
        self.set_condition(ConditionKind::CheckpointWriteFailing, Ok(()));
        self.checkpoint = next;
        Ok(())
    }

    /// Raises (`Err`) or clears (`Ok`) a condition, logging and exporting
    /// the change.
    pub fn set_condition(&mut self, kind: ConditionKind, result: Result<(), String>) {
        let change = match result {
            Ok(()) => self.conditions.clear(kind),
            Err(message) => self.conditions.raise(kind, message, SystemTime::now()),
        };
        let message = self.conditions.get(kind).map(|c| c.message.as_str());
        match change {
            Change::Raised | Change::MessageChanged => {
                tracing::error!(
                    condition = kind.as_str(),
                    message = message.unwrap_or(""),
                    "condition raised"
                );
            }
            Change::Cleared => tracing::info!(condition = kind.as_str(), "condition cleared"),
            Change::None => {}
        }
        self.metrics
            .set_condition(kind, self.conditions.is_raised(kind));
    }

    /// The raised conditions.
    pub fn conditions(&self) -> Vec<Condition> {
        self.conditions.list()
    }

    /// Records a failed host scan (the pass did not run).
    pub fn scan_failed(&mut self, message: String) {
        self.set_condition(ConditionKind::HostScanFailing, Err(message));
    }

    /// The live VM `selector` names for the intent `for_vm`: none, one, or a
    /// FAILED_PRECONDITION naming the VMs when it names several, a cgroup
    /// above VMs' own cgroups, or a VM another intent holds.
    fn find_process(
        &self,
        for_vm: &VmId,
        selector: &VmSelector,
    ) -> Result<Option<DiscoveredVm>, AgentError> {
        if let VmSelector::Process { pid, .. } = selector {
            return match self.host.scanner.inspect(*pid) {
                Ok(vm) => self.unheld(for_vm, vm).map(Some),
                Err(e) if e.is_gone() => {
                    Err(AgentError::NotFound(format!("no process with pid {pid}")))
                }
                Err(DiscoveryError::NotAVm { pid, .. }) => Err(AgentError::InvalidArgument {
                    field: "selector.pid",
                    reason: format!("process {pid} is not a KVM VM"),
                }),
                Err(e) => Err(e.into()),
            };
        }
        let known: Vec<&DiscoveredVm> = self
            .unmanaged
            .values()
            .chain(self.runtime.values().filter_map(|r| r.observed.as_ref()))
            .collect();
        match crate::state::selector::resolve(selector, known.iter().copied()) {
            Resolution::None => Ok(None),
            Resolution::One(vm) => self.unheld(for_vm, vm.clone()).map(Some),
            Resolution::Invalid(e) => Err(AgentError::InvalidArgument {
                field: e.field,
                reason: e.reason,
            }),
            other => Err(AgentError::FailedPrecondition(
                other.problem(selector).unwrap_or_default(),
            )),
        }
    }

    /// `vm`, unless an intent other than `for_vm` holds it.
    fn unheld(&self, for_vm: &VmId, vm: DiscoveredVm) -> Result<DiscoveredVm, AgentError> {
        let holder = self
            .runtime
            .iter()
            .find(|(id, r)| *id != for_vm && r.observed.as_ref().is_some_and(|o| o.pid == vm.pid));
        match holder {
            Some((other, _)) => Err(AgentError::FailedPrecondition(format!(
                "the selector names {}, which is VM {other}",
                crate::state::selector::describe(&vm)
            ))),
            None => Ok(vm),
        }
    }

    /// PlaceVm: idempotent by vm_id.
    pub fn place(&mut self, call: PlaceCall) -> Result<VmView, AgentError> {
        if call.vcpus == 0 {
            return Err(AgentError::InvalidArgument {
                field: "vcpus",
                reason: "must be at least 1".into(),
            });
        }
        let selector = call.selector.clone().unwrap_or(VmSelector::LibvirtDomain {
            name: call.vm_id.to_string(),
        });
        crate::state::selector::validate(&selector).map_err(|e| AgentError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        })?;
        let stored_request = state::PlacementRequest {
            vcpus: call.vcpus,
            class: call.class,
            dedicated: !call.shared,
            numa_node: call.numa_node,
        };
        // An identical retry is answered from the intent, whatever the host
        // shows now (the VM may have a twin since it was placed).
        if let Some(existing) = self.checkpoint.get(&call.vm_id) {
            let same_selector = match (&existing.selector, &selector) {
                (VmSelector::Process { pid: a, .. }, VmSelector::Process { pid: b, .. }) => a == b,
                (a, b) => a == b,
            };
            if existing.request == stored_request && same_selector {
                return self
                    .view(call.vm_id.as_str())
                    .ok_or_else(|| AgentError::NotFound(call.vm_id.to_string()));
            }
            return Err(AgentError::AlreadyExists(format!(
                "VM {} is already placed with a different request; release it first",
                call.vm_id
            )));
        }

        let found = self.find_process(&call.vm_id, &selector)?;
        let selector = match (&selector, &found) {
            (VmSelector::Process { pid, .. }, Some(vm)) => VmSelector::Process {
                pid: *pid,
                start_time: Some(vm.start_time),
            },
            _ => selector,
        };
        let (class, source) = match (call.class, found.as_ref().and_then(|v| v.class)) {
            (Some(c), _) => (c, ClassSource::Orchestrator),
            (None, Some(c)) => (c, ClassSource::CommandLine),
            (None, None) => {
                return Err(AgentError::InvalidArgument {
                    field: "confidential_class",
                    reason: "unspecified, and no VM process was found to classify".into(),
                })
            }
        };
        let request = PlacementRequest {
            vm_id: call.vm_id.clone(),
            vcpus: call.vcpus,
            class,
            dedicated: !call.shared,
            numa_preference: call.numa_node,
        };
        let p = placement::place(
            &self.topology,
            &self.placements,
            &self.reservations,
            &request,
        )?;
        if call.validate_only {
            return Ok(VmView {
                vm_id: call.vm_id.to_string(),
                pid: found.as_ref().map_or(0, |v| v.pid),
                libvirt_domain: found.as_ref().and_then(|v| v.libvirt_domain.clone()),
                class: Some(class),
                class_source: source,
                state: VmState::Pending,
                vcpus: call.vcpus,
                shared: call.shared,
                threads: found.map(|v| v.vcpus).unwrap_or_default(),
                placement: Some(p),
                placed_at: None,
                unplaceable: None,
            });
        }

        let mut after = self.placements.clone();
        after.apply(p.clone())?;
        let record = PlacementRecord {
            vcpu_cpus: p.vcpu_cpus.clone(),
            emulator_cpus: emulator_cpus(&self.topology, &after, &self.reservations, &p),
        };
        let mut next = self.checkpoint.clone();
        next.upsert(IntentRecord {
            vm_id: call.vm_id.clone(),
            selector,
            request: stored_request,
            placement: Some(record),
            engine: Some(p.clone()),
        });
        self.commit(next)?;
        self.placements = after;
        self.update_pool_metric();
        self.runtime.insert(
            call.vm_id.clone(),
            Runtime {
                placed_at: Some(SystemTime::now()),
                ..Runtime::default()
            },
        );
        if let Some(vm) = &found {
            self.unmanaged.remove(&vm.pid);
        }
        self.events.publish(
            call.vm_id.as_str(),
            EventKind::Placed {
                cpus: p.cpus.clone(),
                vcpu_cpus: p.vcpu_cpus.clone(),
                l3_domains: p.l3_domains.clone(),
            },
        );
        if let Some(vm) = found {
            if let Err(e) = self.enforce(&call.vm_id, vm) {
                if e.is_gone() {
                    let _ = self.release_internal(&call.vm_id, true);
                    return Err(AgentError::FailedPrecondition(format!(
                        "VM {} exited while it was being pinned; its placement was released",
                        call.vm_id
                    )));
                }
                tracing::warn!(vm = %call.vm_id, error = %e, "pinning failed; the reconcile loop retries");
            }
        }
        self.view(call.vm_id.as_str())
            .ok_or_else(|| AgentError::NotFound(call.vm_id.to_string()))
    }

    /// Pins `vm`'s threads to the intent's placement; records what it did.
    fn enforce(&mut self, vm_id: &VmId, vm: DiscoveredVm) -> Result<usize, CgroupError> {
        let Some(record) = self.checkpoint.get(vm_id).and_then(|i| i.placement.clone()) else {
            return Ok(0);
        };
        let rt = self.runtime.entry(vm_id.clone()).or_default();
        let fixes = enforce::desired_sets(
            &vm,
            &record,
            &rt.pinned_tids,
            self.host.cgroups.as_ref().map(|w| w.hierarchy()),
        );
        let first_pin = rt.pinned_tids.is_empty();
        let mut result = Ok(0);
        let mut applied = 0;
        for fix in &fixes {
            match enforce::apply(fix, self.host.cgroups.as_ref(), self.host.affinity.as_ref()) {
                Ok(cgroup_rewritten) => {
                    applied += 1;
                    let reason = if cgroup_rewritten {
                        events::DriftReason::CgroupRecreated
                    } else {
                        fix.reason
                    };
                    // The first pin of a VM is its placement, not drift.
                    if !first_pin || reason != events::DriftReason::NewThread {
                        self.metrics.observe_drift(reason.as_str());
                        self.events.publish(
                            vm_id.as_str(),
                            EventKind::Drift {
                                reason,
                                tid: fix.tid,
                                observed: fix.observed.clone(),
                                enforced: fix.desired.clone(),
                            },
                        );
                    }
                }
                Err(e) => {
                    if !e.is_gone() {
                        self.metrics
                            .pin_failures
                            .get_or_create(&crate::metrics::ReasonLabels {
                                reason: e.kind().to_string(),
                            })
                            .inc();
                    }
                    result = Err(e);
                    break;
                }
            }
        }
        // The observation now reflects what was written.
        let mut vm = vm;
        for fix in fixes.iter().take(applied) {
            if let Some(t) = vm.vcpus.iter_mut().find(|t| t.tid == fix.tid) {
                t.cpus_allowed = fix.desired.clone();
            } else if let Some(t) = vm.other_threads.iter_mut().find(|t| t.tid == fix.tid) {
                t.cpus_allowed = fix.desired.clone();
            }
        }
        let rt = self.runtime.entry(vm_id.clone()).or_default();
        rt.pinned_tids = vm.vcpus.iter().map(|t| t.tid).collect();
        rt.drifted = result.is_err();
        rt.observed = Some(vm);
        match &result {
            Ok(_) => {
                rt.failures = 0;
                rt.backoff = 0;
            }
            Err(_) => {
                rt.failures = rt.failures.saturating_add(1);
                rt.backoff = (1u32 << rt.failures.min(6)) - 1;
            }
        }
        result.map(|_| applied)
    }

    /// ReleaseVm.
    pub fn release(&mut self, vm_id: &VmId) -> Result<CpuSet, AgentError> {
        self.release_internal(vm_id, false)
    }

    fn release_internal(&mut self, vm_id: &VmId, exited: bool) -> Result<CpuSet, AgentError> {
        if self.checkpoint.get(vm_id).is_none() {
            return Err(AgentError::NotFound(format!("VM {vm_id} is not placed")));
        }
        let mut next = self.checkpoint.clone();
        next.remove(vm_id);
        self.commit(next)?;
        let cpus = self
            .placements
            .release(vm_id)
            .map(|p| p.cpus)
            .unwrap_or_default();
        self.update_pool_metric();
        if self.unplaceable.remove(vm_id).is_some() {
            self.update_unplaceable();
        }
        let rt = self.runtime.remove(vm_id).unwrap_or_default();
        if exited {
            if let Some(vm) = &rt.observed {
                self.events
                    .publish(vm_id.as_str(), EventKind::Exited { pid: vm.pid });
            }
        } else if let Some(vm) = rt.observed {
            // The process lives on, unmanaged.
            self.unmanaged.insert(vm.pid, vm);
        }
        self.events
            .publish(vm_id.as_str(), EventKind::Released { cpus: cpus.clone() });
        Ok(cpus)
    }

    /// One reconcile pass over a fresh scan of the host.
    pub fn reconcile(&mut self, scan: Vec<DiscoveredVm>) -> PassReport {
        let start = Instant::now();
        self.set_condition(ConditionKind::HostScanFailing, Ok(()));
        let mut report = PassReport {
            vms_seen: scan.len(),
            ..PassReport::default()
        };
        let mut by_pid: BTreeMap<u32, DiscoveredVm> =
            scan.into_iter().map(|v| (v.pid, v)).collect();

        let matches = matching::match_intents(&self.checkpoint.intents, &by_pid);
        let intents: Vec<IntentRecord> = self.checkpoint.intents.clone();
        for intent in intents {
            if let Some(problem) = matches.problems.get(&intent.vm_id) {
                // Neither pinned nor taken for exited: the selector names
                // VMs, just not one.
                report.errors.push(format!("{}: {problem}", intent.vm_id));
                if let Some(pid) = self
                    .runtime
                    .get(&intent.vm_id)
                    .and_then(|r| r.observed.as_ref())
                    .map(|v| v.pid)
                {
                    by_pid.remove(&pid);
                }
                continue;
            }
            let matched = matches.matched.get(&intent.vm_id).copied();
            let rt = self.runtime.entry(intent.vm_id.clone()).or_default();
            match matched.and_then(|pid| by_pid.remove(&pid)) {
                Some(vm) => {
                    if self.unplaceable.contains_key(&intent.vm_id) {
                        rt.observed = Some(vm);
                        continue;
                    }
                    if rt.backoff > 0 {
                        rt.backoff -= 1;
                        rt.observed = Some(vm);
                        continue;
                    }
                    match self.enforce(&intent.vm_id, vm) {
                        Ok(n) => report.corrections += n,
                        Err(e) if e.is_gone() => {
                            if self.release_internal(&intent.vm_id, true).is_ok() {
                                report.released.push(intent.vm_id.to_string());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(vm = %intent.vm_id, error = %e, "pinning failed; retrying with backoff");
                            report.errors.push(format!("{}: {e}", intent.vm_id));
                        }
                    }
                }
                None => {
                    // A VM seen before and gone now exited; one never seen
                    // stays pending. A process selector whose pid is gone
                    // names an exited VM too.
                    let exited = rt.observed.is_some()
                        || matches!(
                            intent.selector,
                            VmSelector::Process {
                                start_time: Some(_),
                                ..
                            }
                        );
                    if exited {
                        match self.release_internal(&intent.vm_id, true) {
                            Ok(_) => report.released.push(intent.vm_id.to_string()),
                            Err(e) => report.errors.push(format!("{}: {e}", intent.vm_id)),
                        }
                    }
                }
            }
        }

        // Whatever is left is unmanaged.
        for (pid, vm) in &by_pid {
            if !self.unmanaged.contains_key(pid) {
                self.events.publish(
                    &format!("pid-{pid}"),
                    EventKind::Discovered {
                        pid: *pid,
                        class: vm.class,
                        vcpus: vm.vcpus.len() as u32,
                    },
                );
            }
        }
        let gone: Vec<u32> = self
            .unmanaged
            .keys()
            .filter(|p| !by_pid.contains_key(p))
            .copied()
            .collect();
        for pid in gone {
            self.events
                .publish(&format!("pid-{pid}"), EventKind::Exited { pid });
        }
        self.unmanaged = by_pid;
        let failing: Vec<&VmId> = self
            .runtime
            .iter()
            .filter(|(_, r)| r.failures > 0)
            .map(|(id, _)| id)
            .collect();
        self.metrics.vms_failing_pins.set(failing.len() as i64);
        let pins = if failing.is_empty() {
            Ok(())
        } else {
            let names: Vec<String> = failing.iter().map(|id| id.to_string()).collect();
            Err(format!(
                "placements of {} VM(s) cannot be applied, retried with backoff: {}",
                names.len(),
                names.join(", ")
            ))
        };
        self.set_condition(ConditionKind::PinsFailing, pins);
        self.set_condition(
            ConditionKind::SelectorsAmbiguous,
            matches.summary().map_or(Ok(()), Err),
        );
        self.auto_failed
            .retain(|(pid, _)| self.unmanaged.contains_key(pid));
        if self.auto_place {
            self.auto_place_unmanaged(&mut report);
        }
        self.sync_module();
        self.metrics.observe_reconcile(start.elapsed());
        report
    }

    /// Reads the module (absent is a state, not an error), labels its VM
    /// records with the agent's classification, and refreshes the module
    /// and per-VM metrics.
    fn sync_module(&mut self) {
        use crate::kmod::ModuleState;
        let status = self.host.module.status();
        self.metrics.set_module(&status);
        let (records, usable) = match status.state {
            ModuleState::Loaded => match self.host.module.vm_records() {
                Ok(r) => (r, Ok(())),
                // Unloaded between the two reads: absent, not unusable.
                Err(e) if e.is_vanished() => (Vec::new(), Ok(())),
                Err(e) => (
                    Vec::new(),
                    Err(format!("cannot read sevflush VM records: {e}")),
                ),
            },
            ModuleState::Absent => (Vec::new(), Ok(())),
            ModuleState::AbiMismatch | ModuleState::Error => {
                (Vec::new(), Err(status.message.clone()))
            }
        };
        self.set_condition(ConditionKind::ModuleUnusable, usable);
        let mut figures = Vec::new();
        for v in self.views() {
            if v.pid == 0 {
                continue;
            }
            let record = records.iter().find(|r| r.pid == v.pid);
            if let (Some(r), Some(class)) = (record, v.class) {
                if r.confidential != class.as_str() {
                    if let Err(e) = self.host.module.set_confidential(r.id, class) {
                        tracing::warn!(vm = %v.vm_id, error = %e, "cannot label the module's VM record");
                    }
                }
            }
            figures.push(crate::metrics::VmFigures {
                labels: crate::metrics::VmLabels {
                    vm: v.vm_id.clone(),
                    confidential: v.class.map_or("unknown", |c| c.as_str()).to_string(),
                },
                vcpus: v.vcpus,
                dirty_cpus: record.map(|r| r.dirty_cpus.len()),
                ran_cpus: record.map(|r| r.ran_cpus.len()),
                flushes: record.map(|r| r.flushes),
                flushed_cpus: record.map(|r| r.flushed_cpus),
            });
        }
        self.metrics.set_vms(&figures);
    }

    /// Scans the host (the slow part; callers run it without holding the
    /// core's lock).
    pub fn scanner(&self) -> VmScanner {
        self.host.scanner.clone()
    }

    /// One VM by id (`pid-N` for unmanaged VMs).
    pub fn view(&self, vm_id: &str) -> Option<VmView> {
        if let Some(pid) = vm_id
            .strip_prefix("pid-")
            .and_then(|p| p.parse::<u32>().ok())
        {
            if let Some(vm) = self.unmanaged.get(&pid) {
                return Some(Self::unmanaged_view(vm));
            }
        }
        let id = VmId::new(vm_id).ok()?;
        let intent = self.checkpoint.get(&id)?;
        let rt = self.runtime.get(&id);
        let observed = rt.and_then(|r| r.observed.as_ref());
        let placement = self.placements.get(&id).cloned();
        let unplaceable = self.unplaceable.get(&id).cloned();
        let state = match (observed, rt.is_some_and(|r| r.drifted)) {
            _ if unplaceable.is_some() => VmState::Unplaceable,
            (None, _) => VmState::Pending,
            (Some(_), true) => VmState::Drifted,
            (Some(_), false) => VmState::Placed,
        };
        let class = placement.as_ref().map(|p| p.request.class);
        Some(VmView {
            vm_id: id.to_string(),
            pid: observed.map_or(0, |v| v.pid),
            libvirt_domain: observed.and_then(|v| v.libvirt_domain.clone()),
            class,
            class_source: if intent.request.class.is_some() {
                ClassSource::Orchestrator
            } else {
                ClassSource::CommandLine
            },
            state,
            vcpus: intent.request.vcpus,
            shared: !intent.request.dedicated,
            placement,
            threads: observed.map(|v| v.vcpus.clone()).unwrap_or_default(),
            placed_at: rt.and_then(|r| r.placed_at),
            unplaceable,
        })
    }

    fn unmanaged_view(vm: &DiscoveredVm) -> VmView {
        VmView {
            vm_id: format!("pid-{}", vm.pid),
            pid: vm.pid,
            libvirt_domain: vm.libvirt_domain.clone(),
            class: vm.class,
            class_source: if vm.class.is_some() {
                ClassSource::CommandLine
            } else {
                ClassSource::Unknown
            },
            state: VmState::Unmanaged,
            vcpus: vm.vcpus.len() as u32,
            shared: false,
            placement: None,
            threads: vm.vcpus.clone(),
            placed_at: None,
            unplaceable: None,
        }
    }

    /// Every VM, ordered by id.
    pub fn views(&self) -> Vec<VmView> {
        let mut out: Vec<VmView> = self
            .checkpoint
            .intents
            .iter()
            .filter_map(|i| self.view(i.vm_id.as_str()))
            .chain(self.unmanaged.values().map(Self::unmanaged_view))
            .collect();
        out.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        out
    }

    /// Number of VMs known.
    pub fn vm_count(&self) -> usize {
        self.checkpoint.intents.len() + self.unmanaged.len()
    }
}

#[cfg(test)]
mod tests;
