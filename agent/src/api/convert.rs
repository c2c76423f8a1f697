//! Conversions between the agent's types and the generated `sevplace.v1`
//! messages. Nothing below the API layer sees protobuf types.

use sevplace_proto::v1 as pb;

use std::time::SystemTime;

use crate::cpuset::{count_u32, CpuSet};
use crate::kmod::{ModuleState, ModuleStatus, ModuleVm};
use crate::placement::{Placement, Pool};
use crate::reconcile::events::{Event, EventKind};
use crate::reconcile::{AgentCore, ClassSource, VmState, VmView};
use crate::topology::Topology;
use crate::types::ConfidentialClass;

pub(crate) fn cpus(set: &CpuSet) -> Vec<u32> {
    set.to_vec()
}

pub(crate) fn class_to_pb(c: ConfidentialClass) -> pb::ConfidentialClass {
    match c {
        ConfidentialClass::None => pb::ConfidentialClass::None,
        ConfidentialClass::Sev => pb::ConfidentialClass::Sev,
        ConfidentialClass::SevEs => pb::ConfidentialClass::SevEs,
        ConfidentialClass::SevSnp => pb::ConfidentialClass::SevSnp,
    }
}

/// `None` for UNSPECIFIED (the agent classifies the VM itself).
pub(crate) fn class_from_pb(c: pb::ConfidentialClass) -> Option<ConfidentialClass> {
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
pub(crate) fn topology(
    t: &Topology,
    pool_of: impl Fn(usize) -> pb::Pool,
    free_of: impl Fn(usize) -> CpuSet,
) -> pb::Topology {
    pb::Topology {
        online_cpus: cpus(&t.online),
        isolated_cpus: cpus(&t.isolated),
        threads_per_core: count_u32(t.threads_per_core()),
        core_count: count_u32(t.cores.len()),
        l3_domains: t
            .l3_domains
            .iter()
            .map(|d| pb::L3Domain {
                index: count_u32(d.index),
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
                l3_domains: indices(&n.l3_domains),
            })
            .collect(),
    }
}

pub(crate) fn module_status(s: &ModuleStatus) -> pb::ModuleStatus {
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

fn timestamp(t: SystemTime) -> sevplace_proto::pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    sevplace_proto::pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn pool(p: Pool) -> pb::Pool {
    match p {
        Pool::Confidential => pb::Pool::Confidential,
        Pool::General => pb::Pool::General,
    }
}

/// The CPUs of each vCPU, by vCPU index.
fn vcpu_placements(vcpu_cpus: &[CpuSet]) -> Vec<pb::VcpuPlacement> {
    vcpu_cpus
        .iter()
        .enumerate()
        .map(|(i, s)| pb::VcpuPlacement {
            index: count_u32(i),
            cpus: cpus(s),
        })
        .collect()
}

fn indices(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&i| count_u32(i)).collect()
}

pub(crate) fn placement(p: &Placement) -> pb::Placement {
    pb::Placement {
        cpus: cpus(&p.cpus),
        vcpus: vcpu_placements(&p.vcpu_cpus),
        l3_domains: indices(&p.l3_domains),
        numa_nodes: p.numa_nodes.clone(),
        pool: pool(p.pool) as i32,
        shares_confidential_domain: p.shares_confidential_domain,
    }
}

fn state(s: VmState) -> pb::VmState {
    match s {
        VmState::Pending => pb::VmState::Pending,
        VmState::Placed => pb::VmState::Placed,
        VmState::Drifted => pb::VmState::Drifted,
        VmState::Unmanaged => pb::VmState::Unmanaged,
        VmState::Unplaceable => pb::VmState::Unplaceable,
    }
}

/// Flush tracking of a VM from its module record: the blast radius of the
/// next flush is every L3 domain that holds a dirty CPU.
pub(crate) fn flush_status(topo: &Topology, record: Option<&ModuleVm>) -> pb::FlushStatus {
    let Some(r) = record else {
        return pb::FlushStatus::default();
    };
    let domains = topo.l3_domains_of(&r.dirty_cpus);
    pb::FlushStatus {
        tracked: true,
        dirty_cpus: cpus(&r.dirty_cpus),
        ran_cpus: cpus(&r.ran_cpus),
        flushes: r.flushes,
        flushed_cpus: r.flushed_cpus,
        blast_radius_l3_domains: count_u32(domains.len()),
        blast_radius_cpus: count_u32(topo.cpus_of_l3(&domains).len()),
    }
}

pub(crate) fn vm(topo: &Topology, v: &VmView, record: Option<&ModuleVm>) -> pb::Vm {
    pb::Vm {
        vm_id: v.key.to_string(),
        pid: v.pid.unwrap_or(0),
        libvirt_domain: v.libvirt_domain.clone().unwrap_or_default(),
        confidential_class: v
            .class
            .map_or(pb::ConfidentialClass::Unspecified, class_to_pb)
            as i32,
        class_source: match v.class_source {
            ClassSource::Orchestrator => pb::ClassSource::Orchestrator,
            ClassSource::CommandLine => pb::ClassSource::CommandLine,
            ClassSource::Unknown => pb::ClassSource::Unspecified,
        } as i32,
        state: state(v.state) as i32,
        vcpus: v.vcpus,
        placement: v.placement.as_ref().map(placement),
        vcpu_threads: v
            .threads
            .iter()
            .map(|t| pb::VcpuThread {
                index: t.index,
                tid: t.tid,
                allowed_cpus: cpus(&t.cpus_allowed),
                last_cpu: t.last_cpu.unwrap_or(0),
            })
            .collect(),
        flush: Some(flush_status(topo, record)),
        placed_at: v.placed_at.map(timestamp),
        shared: !v.dedicated,
        missing_cpus: v
            .unplaceable
            .as_ref()
            .map(|u| cpus(&u.missing))
            .unwrap_or_default(),
        unplaceable_reason: v
            .unplaceable
            .as_ref()
            .map(|u| u.reason.clone())
            .unwrap_or_default(),
    }
}

/// GetHost from the core: topology, pools, capacity, module status.
pub(crate) fn host(core: &AgentCore) -> pb::Host {
    let topo = core.topology();
    let reserved = &core.reservations().host;
    let conf = core.placements().confidential_domains();
    let taken = core
        .placements()
        .iter()
        .filter(|p| p.exclusive)
        .fold(reserved.clone(), |a, p| a.union(&p.cpus));
    let cap = core.capacity();
    pb::Host {
        hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        topology: Some(topology(
            topo,
            |d| {
                if conf.contains(&d) {
                    pb::Pool::Confidential
                } else {
                    pb::Pool::General
                }
            },
            |d| topo.l3_domains[d].cpus.difference(&taken),
        )),
        reserved_cpus: cpus(reserved),
        confidential_pool_l3_domains: indices(&cap.confidential_domains),
        capacity: cap
            .classes
            .iter()
            .map(|c| pb::ClassCapacity {
                confidential_class: class_to_pb(c.class) as i32,
                free_cpus: c.free_cpus,
                largest_vm_vcpus: c.largest_vm,
                fits: c
                    .fits
                    .iter()
                    .map(|f| pb::SizeFit {
                        vcpus: f.vcpus,
                        count: f.count,
                    })
                    .collect(),
            })
            .collect(),
        module: Some(module_status(&core.module_status())),
        vm_count: count_u32(core.vm_count()),
        conditions: core.conditions().iter().map(condition).collect(),
    }
}

pub(crate) fn condition(c: &crate::conditions::Condition) -> pb::Condition {
    use crate::conditions::ConditionKind as K;
    let t = match c.kind {
        K::CheckpointWriteFailing => pb::ConditionType::CheckpointWriteFailing,
        K::HostScanFailing => pb::ConditionType::HostScanFailing,
        K::PinsFailing => pb::ConditionType::PinsFailing,
        K::ModuleUnusable => pb::ConditionType::ModuleUnusable,
        K::SelectorsAmbiguous => pb::ConditionType::SelectorsAmbiguous,
        K::PlacementsUnplaceable => pb::ConditionType::PlacementsUnplaceable,
        K::FleetSyncFailing => pb::ConditionType::FleetSyncFailing,
    };
    pb::Condition {
        r#type: t as i32,
        message: c.message.clone(),
        since: Some(timestamp(c.since)),
    }
}

pub(crate) fn event(e: &Event) -> pb::Event {
    use pb::event::Kind;
    let kind = match &e.kind {
        EventKind::Placed {
            cpus: c,
            vcpu_cpus,
            l3_domains,
        } => Kind::Placed(pb::VmPlaced {
            placement: Some(pb::Placement {
                cpus: cpus(c),
                vcpus: vcpu_placements(vcpu_cpus),
                l3_domains: indices(l3_domains),
                ..Default::default()
            }),
        }),
        EventKind::Replaced {
            old_cpus,
            new,
            reason,
        } => Kind::Replaced(pb::VmReplaced {
            old_cpus: cpus(old_cpus),
            placement: Some(placement(new)),
            reason: reason.clone(),
        }),
        EventKind::Released { cpus: c } => Kind::Released(pb::VmReleased {
            released_cpus: cpus(c),
        }),
        EventKind::Drift {
            reason,
            tid,
            observed,
            enforced,
        } => Kind::Drift(pb::DriftCorrected {
            reason: reason.as_str().to_string(),
            tid: *tid,
            observed_cpus: cpus(observed),
            enforced_cpus: cpus(enforced),
        }),
        EventKind::Exited { pid } => Kind::Exited(pb::VmExited { pid: *pid }),
        EventKind::Discovered { pid, class, vcpus } => Kind::Discovered(pb::VmDiscovered {
            pid: *pid,
            confidential_class: class.map_or(pb::ConfidentialClass::Unspecified, class_to_pb)
                as i32,
            vcpus: *vcpus,
        }),
    };
    pb::Event {
        sequence: e.sequence,
        time: Some(timestamp(e.time)),
        vm_id: e.vm_id.clone(),
        kind: Some(kind),
    }
}
