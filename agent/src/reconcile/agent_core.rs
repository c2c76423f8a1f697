//! The core's state, how it is loaded from the checkpoint, the commit of a
//! new checkpoint, and the conditions it raises.

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
use super::enforce::ThreadAffinity;
use super::error::AgentError;
use super::events::EventBus;
use super::scrub::ScrubAdmission;

/// Host access of the core.
pub struct HostAccess {
    pub scanner: VmScanner,
    /// `None` when the host has no usable cpuset hierarchy: affinity only.
    pub cgroups: Option<CpusetWriter>,
    pub module: ModuleReader,
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
    pub(super) store: CheckpointStore,
    pub(super) checkpoint: Checkpoint,
    pub(super) placements: PlacementState,
    pub(super) runtime: BTreeMap<VmId, Runtime>,
    pub(super) unmanaged: BTreeMap<u32, DiscoveredVm>,
    /// Place discovered confidential VMs without an orchestrator call.
    pub(super) auto_place: bool,
    /// `(pid, start_time)` of VMs auto placement could not place; tried
    /// once, so a full host does not log every pass.
    pub(super) auto_failed: BTreeSet<(u32, u64)>,
    pub events: Arc<EventBus>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) capacity_cache: CapacityCache,
    pub(super) conditions: Conditions,
    pub(super) scrubs: ScrubAdmission,
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
        let mut placements = PlacementState::new();
        let mut runtime = BTreeMap::new();
        for intent in &checkpoint.intents {
            if let Some(p) = &intent.engine {
                placements.apply(p.clone())?;
            }
            runtime.insert(intent.vm_id.clone(), Runtime::default());
        }
        let core = Self {
            topology,
            reservations,
            host,
            store,
            checkpoint,
            placements,
            runtime,
            unmanaged: BTreeMap::new(),
            auto_place: false,
            auto_failed: BTreeSet::new(),
            events,
            metrics,
            capacity_cache: CapacityCache::default(),
            conditions: Conditions::default(),
            scrubs: ScrubAdmission::default(),
        };
        core.update_pool_metric();
        Ok(core)
    }

    /// Turns auto placement of discovered confidential VMs on or off.
    pub fn set_auto_place(&mut self, on: bool) {
        self.auto_place = on;
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

    /// The sevflush module's state and counters.
    pub fn module_status(&self) -> ModuleStatus {
        self.host.module.status()
    }

    /// The module's VM records; none when the module is absent or
    /// unusable (the `ModuleUnusable` condition says why).
    pub fn module_records(&self) -> Vec<ModuleVm> {
        self.host.module.vm_records().unwrap_or_default()
    }

    pub fn checkpoint(&self) -> &Checkpoint {
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

    /// Writes `next` as the checkpoint, then adopts it. A failed write
    /// leaves the current checkpoint in force and raises
    /// `CheckpointWriteFailing` until a write succeeds.
    pub(super) fn commit(&mut self, mut next: Checkpoint) -> Result<(), CheckpointError> {
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
}
