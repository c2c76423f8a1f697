//! ScrubVm: flush a VM's dirty CPUs through the sevflush module, at most
//! once per configured interval per VM, which bounds the flush IPIs an
//! admin caller can cause.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cpuset::CpuSet;
use crate::types::VmId;

use super::agent_core::AgentCore;
use super::error::AgentError;

/// When each VM was last scrubbed, and the shortest time between two
/// scrubs of one VM.
#[derive(Debug)]
pub(super) struct ScrubAdmission {
    min_interval: Duration,
    /// Monotonic clock.
    last: BTreeMap<VmId, Instant>,
}

impl Default for ScrubAdmission {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            last: BTreeMap::new(),
        }
    }
}

impl ScrubAdmission {
    /// Admits a scrub of `vm` at `now`, or says how long to wait.
    fn admit(&mut self, vm: &VmId, now: Instant) -> Result<(), Duration> {
        let min = self.min_interval;
        self.last
            .retain(|_, at| now.saturating_duration_since(*at) < min);
        if let Some(at) = self.last.get(vm) {
            return Err(min.saturating_sub(now.saturating_duration_since(*at)));
        }
        if !min.is_zero() {
            self.last.insert(vm.clone(), now);
        }
        Ok(())
    }
}

/// What a scrub flushed and how long the module took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scrubbed {
    /// The VM's dirty CPUs before the scrub.
    pub(crate) flushed_cpus: CpuSet,
    pub(crate) took: Duration,
}

impl AgentCore {
    /// Sets the shortest time between two scrubs of one VM (zero: no limit).
    pub(crate) fn set_scrub_min_interval(&mut self, d: Duration) {
        self.scrubs.min_interval = d;
    }

    /// Admits a scrub of `vm` at `now`, or says how long to wait: scrubs of
    /// one VM are at least the configured interval apart.
    pub(crate) fn admit_scrub(&mut self, vm: &VmId, now: Instant) -> Result<(), Duration> {
        self.scrubs.admit(vm, now)
    }

    /// ScrubVm: flushes the dirty CPUs of the VM `id` (`pid-N` for an
    /// unmanaged VM) through the module.
    pub(crate) fn scrub(&mut self, id: &str) -> Result<Scrubbed, AgentError> {
        let view = self
            .view(id)
            .ok_or_else(|| AgentError::NoSuchVm(id.to_string()))?;
        let Some(pid) = view.pid else {
            return Err(AgentError::NotRunning(id.to_string()));
        };
        let records = self
            .host
            .module
            .vm_records()
            .map_err(AgentError::ModuleUnreadable)?;
        let before = records.into_iter().find(|r| r.pid == pid).ok_or_else(|| {
            AgentError::NotTrackedByModule {
                vm: id.to_string(),
                pid,
            }
        })?;
        let t0 = Instant::now();
        let vm_id = VmId::new(id).map_err(|e| AgentError::BadField {
            field: "vm_id",
            reason: e.to_string(),
        })?;
        if let Err(wait) = self.admit_scrub(&vm_id, t0) {
            return Err(AgentError::ScrubTooSoon {
                vm: id.to_string(),
                retry_after: wait,
            });
        }
        self.host
            .module
            .scrub(before.id)
            .map_err(AgentError::Scrub)?;
        Ok(Scrubbed {
            flushed_cpus: before.dirty_cpus,
            took: t0.elapsed(),
        })
    }
}
