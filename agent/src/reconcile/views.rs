//! What GetVm and ListVms report: one view per intent and per unmanaged
//! VM process.

use std::time::SystemTime;

use crate::discovery::DiscoveredVm;
use crate::placement::Placement;
use crate::types::{ConfidentialClass, VmKey};

use super::agent_core::AgentCore;

/// Lifecycle of a VM as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum VmState {
    Pending,
    Placed,
    Drifted,
    Unmanaged,
    /// Kept, but no placement fits the current topology.
    Unplaceable,
}

/// Where a VM's class came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClassSource {
    Orchestrator,
    CommandLine,
    Unknown,
}

/// A VM as reported by GetVm and ListVms.
#[derive(Debug, Clone)]
pub struct VmView {
    pub(crate) key: VmKey,
    /// The VM's process, when one is running.
    pub(crate) pid: Option<u32>,
    pub(crate) libvirt_domain: Option<String>,
    pub(crate) class: Option<ConfidentialClass>,
    pub(crate) class_source: ClassSource,
    pub(crate) state: VmState,
    pub(crate) vcpus: u32,
    /// Whole cores of its own (false: shared, floating vCPUs). Unmanaged
    /// VMs report true: the agent shares nothing of theirs.
    pub(crate) dedicated: bool,
    pub(crate) placement: Option<Placement>,
    pub(crate) threads: Vec<crate::discovery::VcpuThread>,
    pub(crate) placed_at: Option<SystemTime>,
    /// Set while the intent is unplaceable.
    pub(crate) unplaceable: Option<super::refit::Unplaceable>,
}

impl AgentCore {
    /// One VM by its wire id (`pid-N` for VMs known by process only).
    pub(crate) fn view(&self, vm_id: &str) -> Option<VmView> {
        self.view_key(&VmKey::parse(vm_id).ok()?)
    }

    /// One VM by key: a process key names an unmanaged VM, or the intent
    /// auto placement made for it; a named key names an intent.
    pub(crate) fn view_key(&self, key: &VmKey) -> Option<VmView> {
        if let VmKey::Process(pid) = key {
            if let Some(vm) = self.unmanaged.get(pid) {
                return Some(Self::unmanaged_view(vm));
            }
        }
        let id = key.to_id();
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
            key: key.clone(),
            pid: observed.map(|v| v.pid),
            libvirt_domain: observed.and_then(|v| v.libvirt_domain.clone()),
            class,
            class_source: if intent.request.class.is_some() {
                ClassSource::Orchestrator
            } else {
                ClassSource::CommandLine
            },
            state,
            vcpus: intent.request.vcpus,
            dedicated: intent.request.dedicated,
            placement,
            threads: observed.map(|v| v.vcpus.clone()).unwrap_or_default(),
            placed_at: rt.and_then(|r| r.placed_at),
            unplaceable,
        })
    }

    fn unmanaged_view(vm: &DiscoveredVm) -> VmView {
        VmView {
            key: VmKey::Process(vm.pid),
            pid: Some(vm.pid),
            libvirt_domain: vm.libvirt_domain.clone(),
            class: vm.class,
            class_source: if vm.class.is_some() {
                ClassSource::CommandLine
            } else {
                ClassSource::Unknown
            },
            state: VmState::Unmanaged,
            vcpus: crate::cpuset::count_u32(vm.vcpus.len()),
            dedicated: true,
            placement: None,
            threads: vm.vcpus.clone(),
            placed_at: None,
            unplaceable: None,
        }
    }

    /// Every VM, ordered by id.
    pub(crate) fn views(&self) -> Vec<VmView> {
        let mut out: Vec<VmView> = self
            .checkpoint
            .intents
            .iter()
            .filter_map(|i| self.view_key(&VmKey::of_id(&i.vm_id)))
            .chain(self.unmanaged.values().map(Self::unmanaged_view))
            .collect();
        out.sort_by_key(|v| v.key.to_string());
        out
    }

    /// Number of VMs known.
    pub(crate) fn vm_count(&self) -> usize {
        self.checkpoint.intents.len() + self.unmanaged.len()
    }
}
