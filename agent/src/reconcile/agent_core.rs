//! The core's state, how it is loaded from the checkpoint, the staging and
//! commit of a new checkpoint through the group commit log, the roll-back
//! after a failed write, and the conditions it raises.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use crate::cgroup::CpusetWriter;
use crate::conditions::{Change, Condition, ConditionKind, Conditions};
use crate::discovery::{DiscoveredVm, VmScanner};
use crate::kmod::{ModuleReader, ModuleStatus, ModuleVm};
use crate::metrics::Metrics;
use crate::placement::{PlacementState, Reservations};
use crate::state::{Checkpoint, CheckpointError, CheckpointStore};
use crate::topology::Topology;
use crate::types::VmId;

use super::capacity::CapacityCache;
use super::error::AgentError;
use super::events::EventBus;
use super::events::EventKind;
use super::group_commit::{GroupCommit, Ticket};
use super::refit;
use super::scrub::ScrubAdmission;
use crate::cgroup::ThreadAffinity;

/// Host access of the core.
pub struct HostAccess {
    /// Reads VM processes from procfs.
    pub scanner: VmScanner,
    /// `None` when the host has no usable cpuset hierarchy: affinity only.
    pub cgroups: Option<CpusetWriter>,
    /// Reads the sevflush module's sysfs tree.
    pub module: ModuleReader,
    /// Sets the CPUs of a thread (`sched_setaffinity`, or a fake in tests).
    pub affinity: Arc<dyn ThreadAffinity>,
}

/// Runtime facts of one intent.
#[derive(Debug, Clone, Default)]
pub(super) struct Runtime {
    /// The VM process matched to the intent, from the last observation.
    pub(super) observed: Option<DiscoveredVm>,
    /// vCPU thread ids pinned so far.
    pub(super) pinned_tids: BTreeSet<u32>,
    pub(super) drifted: bool,
    pub(super) placed_at: Option<SystemTime>,
    /// Consecutive failed enforcement attempts, for backoff.
    pub(super) failures: u32,
    /// Passes to skip before the next attempt.
    pub(super) backoff: u32,
}

/// The agent's state and the operations on it.
pub struct AgentCore {
    pub(super) topology: Arc<Topology>,
    pub(super) reservations: Reservations,
    pub(super) host: HostAccess,
    /// Writes the checkpoint; shared with callers waiting off the lock.
    pub(super) log: Arc<GroupCommit>,
    /// The newest decided checkpoint: durable, or staged in `log`.
    pub(super) checkpoint: Arc<Checkpoint>,
    /// The log's epoch this state was decided in (see `sync_with_log`).
    pub(super) epoch: u64,
    pub(super) placements: PlacementState,
    pub(super) runtime: BTreeMap<VmId, Runtime>,
    pub(super) unmanaged: BTreeMap<u32, DiscoveredVm>,
    /// Place discovered confidential VMs without an orchestrator call.
    pub(super) auto_place: bool,
    /// `(pid, start_time)` of VMs auto placement could not place; tried
    /// once, so a full host does not log every pass.
    pub(super) auto_failed: BTreeSet<(u32, u64)>,
    /// The broadcast of the core's events.
    pub(crate) events: Arc<EventBus>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) capacity_cache: CapacityCache,
    pub(super) conditions: Conditions,
    pub(super) scrubs: ScrubAdmission,
    /// Intents no placement fits on the current topology; kept in the
    /// checkpoint with their last placement, not pinned.
    pub(super) unplaceable: BTreeMap<VmId, super::refit::Unplaceable>,
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
        let checkpoint = Arc::new(store.load()?);
        let log = Arc::new(GroupCommit::new(store, checkpoint.clone()));
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
            log,
            checkpoint,
            epoch: 0,
            placements: PlacementState::new(),
            runtime,
            unmanaged: BTreeMap::new(),
            auto_place: false,
            auto_failed: BTreeSet::new(),
            events,
            metrics,
            capacity_cache: CapacityCache::default(),
            conditions: Conditions::default(),
            scrubs: ScrubAdmission::default(),
            unplaceable: BTreeMap::new(),
        };
        core.adopt_refit(fitted);
        Ok(core)
    }

    /// Adopts a new topology (CPU hotplug, SMT toggled) and checks every
    /// intent's placement against it.
    pub(crate) fn set_topology(&mut self, topology: Arc<Topology>) {
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
        // The refit starts from durable state only.
        self.settle();
        let fitted = refit::refit(&self.topology, &self.reservations, &self.checkpoint.intents);
        self.adopt_refit(fitted);
    }

    /// Makes `fitted` the engine state: re-placed intents are saved to the
    /// checkpoint before any pin (a failed save keeps them unplaceable,
    /// with the error), then reported as events; unplaceable ones are kept
    /// and named in a condition, a metric and the log.
    fn adopt_refit(&mut self, mut fitted: refit::Refit) {
        // Each decision in force is stored as the engine now holds it: a
        // re-placed one with its new CPUs, one kept or re-indexed with the
        // L3 grouping and NUMA nodes of this topology, and every emulator
        // set derived from the pools on it (CPUs outside the confidential
        // domains that are online now). Unplaceable intents keep their
        // last decision.
        let mut next = Checkpoint::clone(&self.checkpoint);
        let mut changed = false;
        for intent in &mut next.intents {
            let Some(p) = fitted.placements.get(&intent.vm_id) else {
                continue;
            };
            if let Some((_, why)) = fitted.reindexed.get(&intent.vm_id) {
                tracing::info!(vm = %intent.vm_id, cpus = %p.cpus, reason = %why, "placement re-placed on the new topology on the same CPUs");
            }
            let emulator = super::place::emulator_cpus(
                &self.topology,
                &fitted.placements,
                &self.reservations,
                p,
            );
            let record = crate::state::PlacementRecord::of_placement(&self.topology, p, emulator);
            if intent.placement.as_ref() != Some(&record) {
                Arc::make_mut(intent).placement = Some(record);
                changed = true;
            }
        }
        if changed {
            if let Err(e) = self.commit(next) {
                for (id, m) in std::mem::take(&mut fitted.replaced) {
                    fitted.placements.release(&id);
                    fitted.unplaceable.insert(
                        id,
                        refit::Unplaceable {
                            missing: m.old_cpus.difference(&self.topology.online),
                            reason: format!(
                                "{}; the new placement could not be saved: {e}",
                                m.reason
                            ),
                        },
                    );
                }
            }
        }
        for (id, m) in &fitted.replaced {
            tracing::warn!(vm = %id, old = %m.old_cpus, new = %m.new.cpus, reason = %m.reason, "placement re-placed on the new topology");
            if let Some(rt) = self.runtime.get_mut(id) {
                // Every thread is pinned afresh: a placement, not drift.
                rt.pinned_tids.clear();
                rt.backoff = 0;
            }
            self.events.publish(
                id.as_str(),
                EventKind::Replaced {
                    old_cpus: m.old_cpus.clone(),
                    new: Box::new(m.new.clone()),
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
        self.capacity_cache.clear();
        self.update_pool_metric();
        self.update_unplaceable();
    }

    /// The unplaceable metric and condition from `self.unplaceable`.
    pub(super) fn update_unplaceable(&mut self) {
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

    /// Turns auto placement of discovered confidential VMs on or off.
    pub(crate) fn set_auto_place(&mut self, on: bool) {
        self.auto_place = on;
    }

    /// The host topology the core places on.
    pub(crate) fn topology(&self) -> &Topology {
        &self.topology
    }

    /// What the host keeps from VMs, and the overcommit of floating vCPUs.
    pub(crate) fn reservations(&self) -> &Reservations {
        &self.reservations
    }

    /// The placements the engine holds.
    pub(crate) fn placements(&self) -> &PlacementState {
        &self.placements
    }

    /// The sevflush module's state and counters.
    pub(crate) fn module_status(&self) -> ModuleStatus {
        self.host.module.status()
    }

    /// The module's VM records; none when the module is absent or
    /// unusable (the `ModuleUnusable` condition says why).
    pub(crate) fn module_records(&self) -> Vec<ModuleVm> {
        self.host.module.vm_records().unwrap_or_default()
    }

    /// The newest decided checkpoint (durable, or staged for the next write).
    #[cfg(test)]
    pub(crate) fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The host scanner (the scan is the slow part; callers run it without
    /// holding the core's lock).
    pub fn scanner(&self) -> VmScanner {
        self.host.scanner.clone()
    }

    pub(super) fn update_pool_metric(&self) {
        self.metrics
            .confidential_pool_l3_domains
            .set(self.placements.confidential_domains().len() as i64);
    }

    /// Stages `next` as the checkpoint (generation + 1) and makes it the
    /// decided state; the caller waits on the ticket, with or without the
    /// lock, before it answers or pins.
    pub(super) fn stage(&mut self, mut next: Checkpoint) -> Ticket {
        next.generation = self.checkpoint.generation + 1;
        let next = Arc::new(next);
        let ticket = self.log.stage(self.epoch, next.clone());
        self.checkpoint = next;
        ticket
    }

    /// A ticket for an answer read from the decided state: given once that
    /// state is durable.
    pub(super) fn covering(&self) -> Ticket {
        self.log.covering(self.epoch, self.checkpoint.generation)
    }

    /// The log the API waits on off the core's lock.
    pub(crate) fn log(&self) -> Arc<GroupCommit> {
        self.log.clone()
    }

    /// Waits, under the lock, until every staged decision is durable or
    /// rolled back, so what follows starts from durable state.
    pub(super) fn settle(&mut self) {
        let ticket = self.covering();
        let _ = self.log.wait(&ticket);
        self.sync_with_log();
    }

    /// Writes `next` as the checkpoint and waits for it under the lock
    /// (the reconcile pass, start-up, a topology change): first every
    /// staged decision, then this one. A failed write leaves the durable
    /// checkpoint in force and raises `CheckpointWriteFailing` until a
    /// write succeeds.
    pub(super) fn commit(&mut self, next: Checkpoint) -> Result<(), CheckpointError> {
        self.settle();
        let ticket = self.stage(next);
        let written = self.log.wait(&ticket);
        self.sync_with_log();
        written
    }

    /// Catches up with the log: after failed writes, counts them and rolls
    /// the engine back to the durable checkpoint; sets
    /// `CheckpointWriteFailing` from the last write.
    pub(super) fn sync_with_log(&mut self) {
        let log = self.log.state();
        if log.epoch != self.epoch {
            self.metrics
                .checkpoint_write_failures
                .inc_by(log.epoch - self.epoch);
            self.epoch = log.epoch;
            self.roll_back(log.durable);
        }
        let result = log.last_failure.map_or(Ok(()), |e| Err(e.to_string()));
        self.set_condition(ConditionKind::CheckpointWriteFailing, result);
    }

    /// Makes `durable` the decided state again, undoing every decision a
    /// failed write did not make durable: the placements are those of its
    /// intents (as a restart would restore them), intents it lacks lose
    /// their runtime (their VMs are unmanaged again), intents it has again
    /// get one back (matched on the next pass). Their callers are answered
    /// with the write's error; nothing was pinned or published for them.
    fn roll_back(&mut self, durable: Arc<Checkpoint>) {
        tracing::warn!(
            decided = self.checkpoint.generation,
            durable = durable.generation,
            "checkpoint write failed; decisions not on disk are rolled back"
        );
        let kept: BTreeSet<VmId> = durable.intents.iter().map(|i| i.vm_id.clone()).collect();
        self.checkpoint = durable;
        self.unplaceable.retain(|id, _| kept.contains(id));
        let mut placements = PlacementState::new();
        for intent in &self.checkpoint.intents {
            if self.unplaceable.contains_key(&intent.vm_id) {
                continue;
            }
            let (Some(request), Some(record)) = (intent.engine_request(), &intent.placement) else {
                continue;
            };
            let rebuilt = crate::placement::rebuild(
                &self.topology,
                &placements,
                &self.reservations,
                &request,
                record.decided(),
            )
            .map_err(|m| m.reason)
            .and_then(|p| placements.apply(p).map_err(|e| e.to_string()));
            if let Err(e) = rebuilt {
                tracing::error!(vm = %intent.vm_id, error = %e, "durable placement does not apply on roll-back");
            }
        }
        self.placements = placements;
        let dropped: Vec<VmId> = self
            .runtime
            .keys()
            .filter(|id| !kept.contains(*id))
            .cloned()
            .collect();
        for id in dropped {
            if let Some(vm) = self.runtime.remove(&id).and_then(|rt| rt.observed) {
                self.unmanaged.insert(vm.pid, vm);
            }
        }
        for intent in &self.checkpoint.intents {
            self.runtime.entry(intent.vm_id.clone()).or_default();
        }
        self.capacity_cache.clear();
        self.update_pool_metric();
        self.update_unplaceable();
    }

    /// Raises (`Err`) or clears (`Ok`) a condition, logging and exporting
    /// the change.
    pub(crate) fn set_condition(&mut self, kind: ConditionKind, result: Result<(), String>) {
        let change = match result {
            Ok(()) => self.conditions.clear(kind),
            Err(message) => self.conditions.raise(kind, message, SystemTime::now()),
        };
        let message = self.conditions.get(kind).map(|c| c.message.as_str());
        match change {
            Change::Raised | Change::MessageChanged => {
                tracing::error!(
                    condition = kind.as_str(),
                    detail = message.unwrap_or(""),
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
    pub(crate) fn conditions(&self) -> Vec<Condition> {
        self.conditions.list()
    }

    /// Records a failed host scan (the pass did not run).
    pub(crate) fn scan_failed(&mut self, message: String) {
        self.set_condition(ConditionKind::HostScanFailing, Err(message));
    }
}
