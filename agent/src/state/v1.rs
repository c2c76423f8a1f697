//! Format version 1 of the checkpoint payload, read only to migrate it.
//!
//! Version 1 stored each decision twice: `placement` (the CPUs enforced on
//! threads) and `engine` (the engine's whole `Placement`, with topology
//! indices and the request again). The migration keeps the request and the
//! CPUs, takes the class the VM was placed as and its NUMA nodes from
//! `engine`, and drops the indices: the engine rebuilds them on load. An
//! intent without `engine` (written before version 1 had it) keeps the
//! request's class and the union of its vCPU sets.
//! `agent/src/state/testdata/checkpoint-v1.json` is a file version 1 wrote.

use serde::Deserialize;

use super::{Checkpoint, IntentRecord, PlacementRecord, PlacementRequest, VmSelector};
use crate::{ConfidentialClass, CpuSet, VmId};

/// The version 1 payload.
#[derive(Debug, Deserialize)]
pub(super) struct PayloadV1 {
    generation: u64,
    intents: Vec<IntentV1>,
}

#[derive(Debug, Deserialize)]
struct IntentV1 {
    /// The intent's id; `pid-<N>` for a VM auto placement placed.
    vm_id: VmId,
    selector: VmSelector,
    request: PlacementRequest,
    placement: Option<PlacementV1>,
    #[serde(default)]
    engine: Option<EngineV1>,
}

#[derive(Debug, Deserialize)]
struct PlacementV1 {
    vcpu_cpus: Vec<CpuSet>,
    emulator_cpus: Option<CpuSet>,
}

/// The fields of version 1's engine placement the migration keeps; the
/// rest (topology indices) is read and dropped.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EngineV1 {
    cpus: CpuSet,
    numa_nodes: Vec<u32>,
    #[serde(default)]
    shares_confidential_domain: bool,
    request: EngineRequestV1,
}

#[derive(Debug, Deserialize)]
struct EngineRequestV1 {
    class: ConfidentialClass,
}

/// The version 2 checkpoint of a version 1 payload.
pub(super) fn migrate(v1: PayloadV1) -> Result<Checkpoint, String> {
    let intents = v1
        .intents
        .into_iter()
        .map(|i| {
            let placement = match (i.placement, i.engine) {
                (None, _) => None,
                (Some(p), Some(engine)) => Some(PlacementRecord {
                    class: engine.request.class,
                    cpus: engine.cpus,
                    vcpu_cpus: p.vcpu_cpus,
                    emulator_cpus: p.emulator_cpus,
                    l3_groups: Vec::new(),
                    numa_nodes: engine.numa_nodes,
                    shares_confidential_domain: engine.shares_confidential_domain,
                }),
                // Written before version 1 stored the engine's placement:
                // the class is the request's, the CPUs are the vCPUs'
                // sets, and the NUMA nodes are not known (not checked on
                // load).
                (Some(p), None) => {
                    let Some(class) = i.request.class else {
                        return Err(format!(
                            "intent {} has a placement but neither a class nor an engine placement to take it from",
                            i.vm_id
                        ));
                    };
                    Some(PlacementRecord {
                        class,
                        cpus: p.vcpu_cpus.iter().fold(CpuSet::new(), |acc, s| acc.union(s)),
                        vcpu_cpus: p.vcpu_cpus,
                        emulator_cpus: p.emulator_cpus,
                        l3_groups: Vec::new(),
                        numa_nodes: Vec::new(),
                        shares_confidential_domain: false,
                    })
                }
            };
            let key = crate::types::VmKey::of_id(&i.vm_id);
            Ok(std::sync::Arc::new(IntentRecord {
                vm_id: key.to_id(),
                selector: i.selector,
                request: i.request,
                placement,
            }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Checkpoint {
        generation: v1.generation,
        intents,
    })
}
