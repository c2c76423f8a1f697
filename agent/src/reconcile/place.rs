//! PlaceVm and ReleaseVm, and the pin of one VM's threads to its intent.
//!
//! Each call has two halves under the core's lock: `decide_*` checks the
//! request against the decided state, applies it to the engine and stages
//! the new checkpoint; `finish_*` runs once a write covering it is durable
//! (or failed) and publishes events, pins and answers. Between the two the
//! API waits on the group commit log without the lock.

use std::sync::Arc;
use std::time::SystemTime;

use crate::cgroup::CgroupError;
use crate::cpuset::CpuSet;
use crate::discovery::{DiscoveredVm, DiscoveryError};
use crate::placement::{self, Placement, PlacementRequest, PlacementState, Reservations};
use crate::state::selector::{self, Resolution};
use crate::state::{self, Checkpoint, CheckpointError, IntentRecord, PlacementRecord, VmSelector};
use crate::topology::Topology;
use crate::types::{VmId, VmKey};

use super::agent_core::{AgentCore, Runtime};
use super::enforce;
use super::error::AgentError;
use super::events::{self, EventKind};
use super::group_commit::Ticket;
use super::views::{ClassSource, VmState, VmView};

/// A PlaceVm call, validated at the API edge. `request` is the one
/// request type from the wire to the checkpoint (the wire's `shared` is
/// turned into `dedicated` once, at the edge); the engine's
/// `placement::PlacementRequest` adds the VM id and the resolved class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceCall {
    /// The orchestrator's id of the VM.
    pub vm_id: VmId,
    /// `None`: wait for a VM whose libvirt domain or guest name is `vm_id`.
    pub selector: Option<VmSelector>,
    /// The request fields.
    pub request: state::PlacementRequest,
    /// `validate_only`: decide and answer, but change nothing.
    pub validate_only: bool,
}

/// A PlaceVm decided under the core's lock: answered by
/// [`AgentCore::finish_place`] once `ticket` is durable.
#[derive(Debug)]
pub(crate) struct PlaceDecision {
    pub(crate) ticket: Ticket,
    outcome: Result<PlaceOutcome, AgentError>,
}

#[derive(Debug)]
// Built once per call and moved, never stored in bulk: its size is no cost.
#[allow(clippy::large_enum_variant)]
enum PlaceOutcome {
    /// Answered from the state: a validate-only call (which needs no
    /// write) or an identical retry.
    Answer { view: VmView, validated: bool },
    /// A new intent, staged: published and pinned once durable.
    Placed {
        ticket: Ticket,
        vm_id: VmId,
        found: Box<Option<DiscoveredVm>>,
        placement: Placement,
        view: VmView,
    },
}

/// A ReleaseVm decided under the core's lock: answered by
/// [`AgentCore::finish_release`] once `ticket` is durable.
#[derive(Debug)]
pub(crate) struct ReleaseDecision {
    pub(crate) ticket: Ticket,
    outcome: Result<Released, AgentError>,
}

#[derive(Debug)]
struct Released {
    vm_id: VmId,
    cpus: CpuSet,
    /// The VM's process, when the release is for its exit.
    exited_pid: Option<u32>,
}

/// The emulator threads of a confidential VM run outside the confidential
/// pool's domains when such CPUs exist, so they neither dirty nor are
/// disturbed by the pool's flushes.
pub(super) fn emulator_cpus(
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
                Err(e) if e.is_gone() => Err(AgentError::NoSuchProcess { pid: *pid }),
                Err(DiscoveryError::NotAVm { pid, .. }) => Err(AgentError::NotAVm { pid }),
                Err(e) => Err(e.into()),
            };
        }
        let known: Vec<&DiscoveredVm> = self
            .unmanaged
            .values()
            .chain(self.runtime.values().filter_map(|r| r.observed.as_ref()))
            .collect();
        match selector::resolve(selector, known.iter().copied()) {
            Resolution::None => Ok(None),
            Resolution::One(vm) => self.unheld(for_vm, vm.clone()).map(Some),
            Resolution::Invalid(e) => Err(AgentError::BadField {
                field: e.field,
                reason: e.reason,
            }),
            other => Err(AgentError::SelectorUnresolved(
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
            Some((other, _)) => Err(AgentError::HeldByOther {
                process: selector::describe(&vm),
                holder: other.clone(),
            }),
            None => Ok(vm),
        }
    }

    /// PlaceVm, waiting for its write under the lock (auto placement,
    /// tests); the API decides, waits off the lock, then finishes.
    pub fn place(&mut self, call: PlaceCall) -> Result<VmView, AgentError> {
        let decision = self.decide_place(call);
        let written = self.log.wait(&decision.ticket);
        self.finish_place(decision, written)
    }

    /// The first half of PlaceVm (idempotent by vm_id): decided against the
    /// decided state, so no CPU is given twice; a new intent is staged.
    /// Every answer read from staged state waits for it to be durable.
    pub(crate) fn decide_place(&mut self, call: PlaceCall) -> PlaceDecision {
        self.sync_with_log();
        let outcome = self.decide_place_outcome(call);
        let ticket = match &outcome {
            Ok(PlaceOutcome::Placed { ticket, .. }) => ticket.clone(),
            Ok(PlaceOutcome::Answer {
                validated: true, ..
            }) => Ticket::durable(),
            _ => self.covering(),
        };
        PlaceDecision { ticket, outcome }
    }

    /// The second half of PlaceVm, once the decision's write has ended: on
    /// success publishes the placement, pins the VM when it runs and
    /// answers; on failure the decision was rolled back and the caller gets
    /// the write's error (UNAVAILABLE, retryable).
    pub(crate) fn finish_place(
        &mut self,
        decision: PlaceDecision,
        written: Result<(), CheckpointError>,
    ) -> Result<VmView, AgentError> {
        self.sync_with_log();
        written?;
        let (vm_id, found, p, view) = match decision.outcome? {
            PlaceOutcome::Answer {
                view,
                validated: true,
            } => return Ok(view),
            PlaceOutcome::Answer { view, .. } => {
                return Ok(self.view_key(&view.key).unwrap_or(view));
            }
            PlaceOutcome::Placed {
                vm_id,
                found,
                placement,
                view,
                ..
            } => (vm_id, *found, placement, view),
        };
        self.events.publish(
            vm_id.as_str(),
            EventKind::Placed {
                cpus: p.cpus.clone(),
                vcpu_cpus: p.vcpu_cpus.clone(),
                l3_domains: p.l3_domains.clone(),
            },
        );
        if let Some(vm) = found {
            if let Err(e) = self.enforce(&vm_id, vm) {
                if e.is_gone() {
                    let _ = self.release_internal(&vm_id, true);
                    return Err(AgentError::ExitedWhilePinning(vm_id.clone()));
                }
                tracing::warn!(vm = %vm_id, error = %e, "pinning failed; the reconcile loop retries");
            }
        }
        // Released again since the decision: the answer is the decision.
        Ok(self.view(vm_id.as_str()).unwrap_or(view))
    }

    fn decide_place_outcome(&mut self, call: PlaceCall) -> Result<PlaceOutcome, AgentError> {
        if call.request.vcpus == 0 {
            return Err(AgentError::BadField {
                field: "vcpus",
                reason: "must be at least 1".into(),
            });
        }
        // `pid-N` names the VM process N only: an intent under that id for
        // another process would collide with it.
        if let VmKey::Process(pid) = VmKey::of_id(&call.vm_id) {
            if !matches!(call.selector, Some(VmSelector::Process { pid: p, .. }) if p == pid) {
                return Err(AgentError::ReservedVmId(call.vm_id.clone()));
            }
        }
        let selector = call.selector.clone().unwrap_or(VmSelector::LibvirtDomain {
            name: call.vm_id.to_string(),
        });
        selector::validate(&selector).map_err(|e| AgentError::BadField {
            field: e.field,
            reason: e.reason,
        })?;
        let stored_request = call.request.clone();
        // An identical retry is answered from the intent, whatever the host
        // shows now (the VM may have a twin since it was placed).
        if let Some(existing) = self.checkpoint.get(&call.vm_id) {
            let same_selector = match (&existing.selector, &selector) {
                (VmSelector::Process { pid: a, .. }, VmSelector::Process { pid: b, .. }) => a == b,
                (a, b) => a == b,
            };
            if existing.request == stored_request && same_selector {
                let view = self
                    .view(call.vm_id.as_str())
                    .ok_or_else(|| AgentError::NoSuchVm(call.vm_id.to_string()))?;
                return Ok(PlaceOutcome::Answer {
                    view,
                    validated: false,
                });
            }
            return Err(AgentError::PlacedDifferently(call.vm_id.clone()));
        }

        let found = self.find_process(&call.vm_id, &selector)?;
        let selector = match (&selector, &found) {
            (VmSelector::Process { pid, .. }, Some(vm)) => VmSelector::Process {
                pid: *pid,
                start_time: Some(vm.start_time),
            },
            _ => selector,
        };
        let (class, source) = match (stored_request.class, found.as_ref().and_then(|v| v.class)) {
            (Some(c), _) => (c, ClassSource::Orchestrator),
            (None, Some(c)) => (c, ClassSource::CommandLine),
            (None, None) => return Err(AgentError::Unclassified),
        };
        let request = PlacementRequest {
            vm_id: call.vm_id.clone(),
            vcpus: stored_request.vcpus,
            class,
            dedicated: stored_request.dedicated,
            numa_preference: stored_request.numa_node,
        };
        let p = placement::place(
            &self.topology,
            &self.placements,
            &self.reservations,
            &request,
        )?;
        if call.validate_only {
            let view = VmView {
                key: VmKey::of_id(&call.vm_id),
                pid: found.as_ref().map(|v| v.pid),
                libvirt_domain: found.as_ref().and_then(|v| v.libvirt_domain.clone()),
                class: Some(class),
                class_source: source,
                state: VmState::Pending,
                vcpus: stored_request.vcpus,
                dedicated: stored_request.dedicated,
                threads: found.map(|v| v.vcpus).unwrap_or_default(),
                placement: Some(p),
                placed_at: None,
                unplaceable: None,
            };
            return Ok(PlaceOutcome::Answer {
                view,
                validated: true,
            });
        }

        self.placements.apply(p.clone())?;
        let record = PlacementRecord::of_placement(
            &self.topology,
            &p,
            emulator_cpus(&self.topology, &self.placements, &self.reservations, &p),
        );
        let mut next = Checkpoint::clone(&self.checkpoint);
        next.upsert(IntentRecord {
            vm_id: call.vm_id.clone(),
            selector,
            request: stored_request,
            placement: Some(record),
        });
        let ticket = self.stage(next);
        self.update_pool_metric();
        // The process is the intent's from now on, so no other intent
        // claims it while the write is in flight.
        self.runtime.insert(
            call.vm_id.clone(),
            Runtime {
                observed: found.clone(),
                placed_at: Some(SystemTime::now()),
                ..Runtime::default()
            },
        );
        if let Some(vm) = &found {
            self.unmanaged.remove(&vm.pid);
        }
        let view = self
            .view(call.vm_id.as_str())
            .ok_or_else(|| AgentError::NoSuchVm(call.vm_id.to_string()))?;
        Ok(PlaceOutcome::Placed {
            ticket,
            vm_id: call.vm_id,
            found: Box::new(found),
            placement: p,
            view,
        })
    }

    /// Pins `vm`'s threads to the intent's placement; records what it did.
    pub(super) fn enforce(&mut self, vm_id: &VmId, vm: DiscoveredVm) -> Result<usize, CgroupError> {
        // The decided checkpoint, shared: the record is borrowed, not copied.
        let checkpoint = Arc::clone(&self.checkpoint);
        let Some(record) = checkpoint.get(vm_id).and_then(|i| i.placement.as_ref()) else {
            return Ok(0);
        };
        let rt = self.runtime.entry(vm_id.clone()).or_default();
        let fixes = enforce::desired_sets(
            &vm,
            record,
            &rt.pinned_tids,
            self.host.cgroups.as_ref().map(|w| w.hierarchy()),
        );
        let first_pin = rt.pinned_tids.is_empty();
        let mut result = Ok(0);
        let mut applied = 0;
        for fix in &fixes {
            match enforce::apply(fix, self.host.cgroups.as_ref(), self.host.affinity.as_ref()) {
                Ok(enforce::Applied::HelperGone) => applied += 1,
                Ok(enforce::Applied::Pinned { cgroup_rewritten }) => {
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

    /// ReleaseVm, waiting for its write under the lock.
    #[cfg(test)]
    pub(crate) fn release(&mut self, vm_id: &VmId) -> Result<CpuSet, AgentError> {
        self.release_internal(vm_id, false)
    }

    /// The first half of ReleaseVm: the intent is removed from the decided
    /// state and its CPUs are free for the next decision; NOT_FOUND when
    /// the decided state has no such intent.
    pub(crate) fn decide_release(&mut self, vm_id: &VmId) -> ReleaseDecision {
        self.sync_with_log();
        self.decide_release_for(vm_id, false)
    }

    /// The second half of ReleaseVm, once the decision's write has ended.
    pub(crate) fn finish_release(
        &mut self,
        decision: ReleaseDecision,
        written: Result<(), CheckpointError>,
    ) -> Result<CpuSet, AgentError> {
        self.sync_with_log();
        written?;
        let released = decision.outcome?;
        let id = released.vm_id.as_str();
        if let Some(pid) = released.exited_pid {
            self.events.publish(id, EventKind::Exited { pid });
        }
        self.events.publish(
            id,
            EventKind::Released {
                cpus: released.cpus.clone(),
            },
        );
        Ok(released.cpus)
    }

    pub(super) fn release_internal(
        &mut self,
        vm_id: &VmId,
        exited: bool,
    ) -> Result<CpuSet, AgentError> {
        let decision = self.decide_release_for(vm_id, exited);
        let written = self.log.wait(&decision.ticket);
        self.finish_release(decision, written)
    }

    fn decide_release_for(&mut self, vm_id: &VmId, exited: bool) -> ReleaseDecision {
        if self.checkpoint.get(vm_id).is_none() {
            return ReleaseDecision {
                ticket: self.covering(),
                outcome: Err(AgentError::NotPlaced(vm_id.clone())),
            };
        }
        let mut next = Checkpoint::clone(&self.checkpoint);
        next.remove(vm_id);
        let ticket = self.stage(next);
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
        let exited_pid = match rt.observed {
            Some(vm) if exited => Some(vm.pid),
            Some(vm) => {
                // The process lives on, unmanaged.
                self.unmanaged.insert(vm.pid, vm);
                None
            }
            None => None,
        };
        ReleaseDecision {
            ticket,
            outcome: Ok(Released {
                vm_id: vm_id.clone(),
                cpus,
                exited_pid,
            }),
        }
    }
}
