//! What GetVm and ListVms report: one view per intent and per unmanaged
//! VM process.

use std::time::SystemTime;

use crate::discovery::DiscoveredVm;
use crate::placement::Placement;
use crate::types::{ConfidentialClass, VmId};

use super::agent_core::AgentCore;

/// Lifecycle of a VM as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    Pending,
    Placed,
    Drifted,
    Unmanaged,
    Exited,
}

/// Where a VM's class came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassSource {
    Orchestrator,
    CommandLine,
    Unknown,
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
}

impl AgentCore {
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
        let state = match (observed, rt.is_some_and(|r| r.drifted)) {
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
