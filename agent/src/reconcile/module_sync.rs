//! Reads the sevflush module each pass: labels its VM records with the
//! agent's classification and refreshes the module and per-VM metrics.

use crate::conditions::ConditionKind;
use crate::types::{ConfidentialClass, VmKey};

use super::agent_core::AgentCore;

/// What the module sync needs of a VM: the fields of its [`super::views::VmView`]
/// that name it, its process, class and size, without the view's copies
/// of the placement and threads.
struct ModuleRow {
    key: VmKey,
    pid: Option<u32>,
    class: Option<ConfidentialClass>,
    vcpus: u32,
}

impl AgentCore {
    /// Reads the module (absent is a state, not an error), labels its VM
    /// records with the agent's classification, and refreshes the module
    /// and per-VM metrics.
    pub(super) fn sync_module(&mut self) {
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
        // One lookup per VM, so the pass is linear in VMs, not VMs x
        // records; a pid with two records (two KVM VMs in one process)
        // keeps its first, as the module lists them.
        let mut by_pid = std::collections::HashMap::with_capacity(records.len());
        for r in &records {
            by_pid.entry(r.pid).or_insert(r);
        }
        let mut figures = Vec::new();
        for v in self.module_rows() {
            let Some(pid) = v.pid else {
                continue;
            };
            let record = by_pid.get(&pid).copied();
            if let (Some(r), Some(class)) = (record, v.class) {
                if r.confidential != class.as_str() {
                    if let Err(e) = self.host.module.set_confidential(r.id, class) {
                        tracing::warn!(vm = %v.key, error = %e, "cannot label the module's VM record");
                    }
                }
            }
            figures.push(crate::metrics::VmFigures {
                labels: crate::metrics::VmLabels {
                    vm: v.key.to_string(),
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

    /// One row per VM that [`AgentCore::views`] lists, with the same key,
    /// pid, class and vCPU count as its view.
    fn module_rows(&self) -> Vec<ModuleRow> {
        let unmanaged_row = |vm: &crate::discovery::DiscoveredVm| ModuleRow {
            key: VmKey::Process(vm.pid),
            pid: Some(vm.pid),
            class: vm.class,
            vcpus: u32::try_from(vm.vcpus.len()).unwrap_or(u32::MAX),
        };
        let intents = self.checkpoint.intents.iter().map(|i| {
            let key = i.key();
            if let VmKey::Process(pid) = key {
                if let Some(vm) = self.unmanaged.get(&pid) {
                    return unmanaged_row(vm);
                }
            }
            ModuleRow {
                pid: self
                    .runtime
                    .get(&i.vm_id)
                    .and_then(|r| r.observed.as_ref())
                    .map(|v| v.pid),
                class: self.placements.get(&i.vm_id).map(|p| p.request.class),
                vcpus: i.request.vcpus,
                key,
            }
        });
        intents
            .chain(self.unmanaged.values().map(unmanaged_row))
            .collect()
    }
}
