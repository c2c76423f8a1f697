//! Conversions between the agent's types and the generated `sevplace.v1`
//! messages. Nothing below the API layer sees protobuf types.

use sevplace_proto::v1 as pb;

use crate::cpuset::CpuSet;
use crate::kmod::{ModuleState, ModuleStatus};
use crate::topology::Topology;
use crate::types::ConfidentialClass;

pub fn cpus(set: &CpuSet) -> Vec<u32> {
    set.to_vec()
}

pub fn class_to_pb(c: ConfidentialClass) -> pb::ConfidentialClass {
    match c {
        ConfidentialClass::None => pb::ConfidentialClass::None,
        ConfidentialClass::Sev => pb::ConfidentialClass::Sev,
        ConfidentialClass::SevEs => pb::ConfidentialClass::SevEs,
        ConfidentialClass::SevSnp => pb::ConfidentialClass::SevSnp,
    }
}

/// `None` for UNSPECIFIED (the agent classifies the VM itself).
pub fn class_from_pb(c: pb::ConfidentialClass) -> Option<ConfidentialClass> {
    match c {
        pb::ConfidentialClass::Unspecified => None,
        pb::ConfidentialClass::None => Some(ConfidentialClass::None),
        pb::ConfidentialClass::Sev => Some(ConfidentialClass::Sev),
        pb::ConfidentialClass::SevEs => Some(ConfidentialClass::SevEs),
        pb::ConfidentialClass::SevSnp => Some(ConfidentialClass::SevSnp),
    }
}

/// Topology message; `pool_of(domain)` and `free_of(domain)` come from the
/// placement state.
pub fn topology(
    t: &Topology,
    pool_of: impl Fn(usize) -> pb::Pool,
    free_of: impl Fn(usize) -> CpuSet,
) -> pb::Topology {
    pb::Topology {
        online_cpus: cpus(&t.online),
        isolated_cpus: cpus(&t.isolated),
        threads_per_core: t.threads_per_core() as u32,
        core_count: t.cores.len() as u32,
        l3_domains: t
            .l3_domains
            .iter()
            .map(|d| pb::L3Domain {
                index: d.index as u32,
                cpus: cpus(&d.cpus),
                numa_node: d.numa,
                package: d.package,
                pool: pool_of(d.index) as i32,
                free_cpus: cpus(&free_of(d.index)),
            })
            .collect(),
        numa_nodes: t
            .numa_nodes
            .iter()
            .map(|n| pb::NumaNode {
                id: n.id,
                cpus: cpus(&n.cpus),
                l3_domains: n.l3_domains.iter().map(|&i| i as u32).collect(),
            })
            .collect(),
    }
}

pub fn module_status(s: &ModuleStatus) -> pb::ModuleStatus {
    let state = match s.state {
        ModuleState::Absent => pb::ModuleState::Absent,
        ModuleState::Loaded => pb::ModuleState::Loaded,
        ModuleState::AbiMismatch => pb::ModuleState::AbiMismatch,
        ModuleState::Error => pb::ModuleState::Error,
    };
    pb::ModuleStatus {
        state: state as i32,
        abi_version: s.abi_version,
        mode: s.mode.clone(),
        flushes_total: s.flushes_total,
        flushed_cpus_total: s.flushed_cpus_total,
        full_flushes_total: s.full_flushes_total,
        scrubs_total: s.scrubs_total,
        scrubbed_cpus_total: s.scrubbed_cpus_total,
        message: s.message.clone(),
    }
}
