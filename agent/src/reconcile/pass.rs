//! One reconcile pass: match intents to the scanned processes, correct
//! drift, release exited VMs, list unmanaged ones, auto-place confidential
//! VMs when configured, then sync the module.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::conditions::ConditionKind;
use crate::discovery::DiscoveredVm;
use crate::state::{IntentRecord, PlacementRequest, VmSelector};
use crate::types::{VmId, VmKey};

use super::agent_core::AgentCore;
use super::context::AgentContext;
use super::events::EventKind;
use super::matching;
use super::place::PlaceCall;

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub(crate) vms_seen: usize,
    pub(crate) corrections: usize,
    pub(crate) released: Vec<String>,
    pub(crate) errors: Vec<String>,
}

/// One reconcile pass, on the calling thread: the scan runs without the
/// core's lock, the rest takes it ahead of queued API calls.
///
/// `sevplace_reconcile_duration_seconds` times the whole pass (scan, lock
/// wait, compare and act); the phase histogram splits scan from compare and
/// act.
pub(crate) fn run_pass(ctx: &AgentContext) {
    let started = Instant::now();
    let scanner = ctx.lock_first().scanner();
    let scanned = scanner.scan();
    ctx.metrics
        .observe_reconcile_phase("scan", started.elapsed());
    match scanned {
        Ok(scan) => {
            let asked = Instant::now();
            let mut core = ctx.lock_first();
            ctx.metrics.observe_reconcile_lock_wait(asked.elapsed());
            let report = core.reconcile(scan);
            drop(core);
            for e in &report.errors {
                tracing::warn!(error = %e, "reconcile");
            }
        }
        // Logged by the condition when it starts or changes.
        Err(e) => ctx.lock_first().scan_failed(e.to_string()),
    }
    ctx.metrics.observe_reconcile(started.elapsed());
}

impl AgentCore {
    /// `(pid, start_time)` of every running VM process the agent manages,
    /// for exit watches.
    pub(crate) fn managed_processes(&self) -> Vec<(u32, u64)> {
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
            let vcpus = crate::cpuset::count_u32(vm.vcpu_fds.len().max(vm.vcpus.len()));
            let vm_id = VmKey::Process(vm.pid).to_id();
            let call = PlaceCall {
                vm_id: vm_id.clone(),
                selector: Some(VmSelector::Process {
                    pid: vm.pid,
                    start_time: Some(vm.start_time),
                }),
                request: PlacementRequest {
                    vcpus,
                    class: None,
                    dedicated: true,
                    numa_node: None,
                },
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

    /// One reconcile pass over a fresh scan of the host.
    pub fn reconcile(&mut self, scan: Vec<DiscoveredVm>) -> PassReport {
        let start = Instant::now();
        // The pass works on durable state only: it waits for the write in
        // flight (decisions are pinned only once durable).
        self.settle();
        self.set_condition(ConditionKind::HostScanFailing, Ok(()));
        let mut report = PassReport {
            vms_seen: scan.len(),
            ..PassReport::default()
        };
        let mut by_pid: BTreeMap<u32, DiscoveredVm> =
            scan.into_iter().map(|v| (v.pid, v)).collect();

        let matches = matching::match_intents(&self.checkpoint.intents, &by_pid);
        let intents: Vec<Arc<IntentRecord>> = self.checkpoint.intents.clone();
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
                    &VmKey::Process(*pid).to_string(),
                    EventKind::Discovered {
                        pid: *pid,
                        class: vm.class,
                        vcpus: crate::cpuset::count_u32(vm.vcpus.len()),
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
                .publish(&VmKey::Process(pid).to_string(), EventKind::Exited { pid });
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
        self.metrics
            .observe_reconcile_phase("compare_and_act", start.elapsed());
        report
    }
}
