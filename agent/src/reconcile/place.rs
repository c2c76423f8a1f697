//! PlaceVm and ReleaseVm, and the pin of one VM's threads to its intent.

use std::time::SystemTime;

use crate::cgroup::CgroupError;
use crate::cpuset::CpuSet;
use crate::discovery::{DiscoveredVm, DiscoveryError};
use crate::placement::{self, Placement, PlacementRequest, PlacementState, Reservations};
use crate::state::selector::{self, Resolution};
use crate::state::{self, IntentRecord, PlacementRecord, VmSelector};
use crate::topology::Topology;
use crate::types::{VmId, VmKey};

use super::agent_core::{AgentCore, Runtime};
use super::enforce;
use super::error::AgentError;
use super::events::{self, EventKind};
use super::views::{ClassSource, VmState, VmView};

/// A PlaceVm call, validated at the API edge. `request` is the one
/// request type from the wire to the checkpoint (the wire's `shared` is
/// turned into `dedicated` once, at the edge); the engine's
/// `placement::PlacementRequest` adds the VM id and the resolved class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceCall {
    pub vm_id: VmId,
    /// `None`: wait for a VM whose libvirt domain or guest name is `vm_id`.
    pub selector: Option<VmSelector>,
    pub request: state::PlacementRequest,
    pub validate_only: bool,
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

    /// PlaceVm: idempotent by vm_id.
    pub fn place(&mut self, call: PlaceCall) -> Result<VmView, AgentError> {
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
                return self
                    .view(call.vm_id.as_str())
                    .ok_or_else(|| AgentError::NoSuchVm(call.vm_id.to_string()));
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
            return Ok(VmView {
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
            });
        }

        let mut after = self.placements.clone();
        after.apply(p.clone())?;
        let record = PlacementRecord::of_placement(
            &self.topology,
            &p,
            emulator_cpus(&self.topology, &after, &self.reservations, &p),
        );
        let mut next = self.checkpoint.clone();
        next.upsert(IntentRecord {
            vm_id: call.vm_id.clone(),
            selector,
            request: stored_request,
            placement: Some(record),
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
                    return Err(AgentError::ExitedWhilePinning(call.vm_id.clone()));
                }
                tracing::warn!(vm = %call.vm_id, error = %e, "pinning failed; the reconcile loop retries");
            }
        }
        self.view(call.vm_id.as_str())
            .ok_or_else(|| AgentError::NoSuchVm(call.vm_id.to_string()))
    }

    /// Pins `vm`'s threads to the intent's placement; records what it did.
    pub(super) fn enforce(&mut self, vm_id: &VmId, vm: DiscoveredVm) -> Result<usize, CgroupError> {
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

    /// ReleaseVm.
    pub fn release(&mut self, vm_id: &VmId) -> Result<CpuSet, AgentError> {
        self.release_internal(vm_id, false)
    }

    pub(super) fn release_internal(
        &mut self,
        vm_id: &VmId,
        exited: bool,
    ) -> Result<CpuSet, AgentError> {
        if self.checkpoint.get(vm_id).is_none() {
            return Err(AgentError::NotPlaced(vm_id.clone()));
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
}
