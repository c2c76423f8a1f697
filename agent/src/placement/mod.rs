//! Placement: which CPUs the vCPUs of each VM may run on.
//!
//! A pure function of the topology, the current placements, the host
//! reservations and a request. No I/O, no protobuf types: the API layer
//! converts at its edge.
//!
//! Policy (details and ordering rules in `docs/placement.md`):
//! - Confidential VMs (sev, sev-es, sev-snp) go to the confidential pool: the
//!   L3 domains that hold a confidential VM. The pool grows by the domain that
//!   fits best and shrinks when a domain empties (it is derived from the
//!   placements, so there is nothing to shrink by hand).
//! - A VM stays in one L3 domain when one fits; else it takes the fewest
//!   domains of one NUMA node; across nodes only as a last resort.
//! - Exclusive VMs (dedicated, and every sev-snp VM) get CPUs of their
//!   own. Confidential ones get whole physical cores: all SMT siblings of a
//!   core go to one VM (a sibling is a side channel). Plain dedicated VMs
//!   take whole cores while their remaining vCPUs fill a core, then single
//!   threads, first of cores another plain VM already holds part of (as
//!   kubelet's static CPU manager does), unless
//!   `Reservations::whole_cores_for_plain` keeps whole cores for them too.
//!   No core is ever shared across the confidential boundary.
//! - Best fit: the domain with the least room that still fits, so large free
//!   domains stay whole.
//! - Non-confidential VMs stay off confidential domains (and confidential
//!   VMs off general ones) while other room exists; when they must mix, the
//!   placement says so in `shares_confidential_domain`.
//! - Shared (overcommitted) VMs float over a set of cores that other shared
//!   VMs may float over too (each CPU carries up to
//!   `Reservations::shared_vcpus_per_cpu` floating vCPUs); they fill cores
//!   that already carry floating vCPUs first. No exclusive CPU carries
//!   floating vCPUs; a general floating VM may use the free threads of a
//!   core that plain dedicated VMs hold part of, a confidential one only
//!   cores no exclusive VM holds. A floating VM's set never changes once
//!   placed.

mod occupancy;
mod rebuild;
mod select;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use crate::cpuset::CpuSet;
use crate::topology::Topology;
use crate::types::{ConfidentialClass, VmId};
use occupancy::Occupancy;

pub(crate) use rebuild::{rebuild, Decided};
pub use select::{capacity, place};

/// Which pool a VM belongs to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Pool {
    /// sev, sev-es and sev-snp VMs: whole L3 domains set aside for them.
    Confidential,
    /// Every other VM.
    General,
}

impl Pool {
    pub(crate) fn of(class: ConfidentialClass) -> Self {
        if class.is_confidential() {
            Self::Confidential
        } else {
            Self::General
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Confidential => "confidential",
            Self::General => "general",
        }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the orchestrator asks for one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementRequest {
    /// The VM.
    pub vm_id: VmId,
    /// vCPUs of the VM.
    pub vcpus: u32,
    /// The VM's confidential class, which decides its pool.
    pub class: ConfidentialClass,
    /// True: one CPU per vCPU, pinned, on cores of its own. False: shared
    /// (overcommitted), the vCPUs float over the VM's set.
    pub dedicated: bool,
    /// NUMA node to try first.
    pub numa_preference: Option<u32>,
}

impl PlacementRequest {
    /// Whether the VM gets cores of its own: dedicated VMs, and sev-snp VMs
    /// always (an SNP guest never shares a physical core with another VM).
    pub(crate) fn exclusive_cores(&self) -> bool {
        self.dedicated || self.class == ConfidentialClass::SevSnp
    }

    /// The pool of the VM's class.
    pub(crate) fn pool(&self) -> Pool {
        Pool::of(self.class)
    }
}

/// Where one VM runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The VM.
    pub(crate) vm_id: VmId,
    /// Every CPU the VM may run on (for exclusive VMs holding whole cores:
    /// all CPUs of its cores; for plain VMs sharing cores: the threads it
    /// holds).
    pub(crate) cpus: CpuSet,
    /// One entry per vCPU: a single CPU for dedicated VMs, `cpus` for
    /// floating ones.
    pub(crate) vcpu_cpus: Vec<CpuSet>,
    /// L3 domains used, as indices into `Topology::l3_domains`, in the order
    /// the vCPUs fill them.
    pub(crate) l3_domains: Vec<usize>,
    /// vCPUs counted against each domain of `l3_domains` (same order).
    pub(crate) vcpus_per_domain: Vec<u32>,
    /// Physical cores used, as indices into `Topology::cores`: held whole
    /// by an exclusive VM, or shared with other floating VMs.
    pub(crate) cores: Vec<usize>,
    /// vCPUs counted against each core of `cores` (same order).
    pub(crate) vcpus_per_core: Vec<u32>,
    /// NUMA nodes of `l3_domains`, ascending.
    pub(crate) numa_nodes: Vec<u32>,
    /// The pool the VM is placed in.
    pub(crate) pool: Pool,
    /// The VM holds whole cores of its own (dedicated or sev-snp).
    pub(crate) exclusive: bool,
    /// The VM was placed in an L3 domain that also holds VMs of the other
    /// pool (a non-confidential VM in a confidential domain, or the reverse),
    /// because no other room existed.
    pub(crate) shares_confidential_domain: bool,
    /// The request this placement answers.
    pub(crate) request: PlacementRequest,
}

impl Placement {
    /// Whether the VM spans NUMA nodes (the last resort).
    #[cfg(test)]
    pub(crate) fn spans_numa_nodes(&self) -> bool {
        self.numa_nodes.len() > 1
    }
}

/// What the host keeps for itself, and how far shared VMs overcommit.
///
/// Isolated CPUs (`isolcpus`, `Topology::isolated`) are used only by
/// dedicated, pinned vCPUs: the scheduler does not balance tasks onto them,
/// so a floating vCPU on one would be stuck there. Exclusive placements may
/// use them; floating sets exclude them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservations {
    /// CPUs never given to a VM. A core with any reserved CPU is not given
    /// to an exclusive VM either (its siblings would share with the host).
    pub host: CpuSet,
    /// How many floating vCPUs one CPU carries (1 = no overcommit).
    pub shared_vcpus_per_cpu: u32,
    /// True: plain dedicated VMs get whole cores like confidential ones.
    /// False (kubelet's static default): two plain dedicated VMs may hold
    /// the two threads of one core.
    #[serde(default)]
    pub whole_cores_for_plain: bool,
}

impl Default for Reservations {
    fn default() -> Self {
        Self {
            host: CpuSet::new(),
            shared_vcpus_per_cpu: 1,
            whole_cores_for_plain: false,
        }
    }
}

/// The placements in force, by VM id, and what they hold (held CPUs,
/// floating loads, VMs per domain), updated on every apply and release so a
/// decision does not walk all placements. Serialized as the placements
/// alone; the occupancy is rebuilt on load.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "PlacementsWire", into = "PlacementsWire")]
pub struct PlacementState {
    placements: BTreeMap<VmId, Placement>,
    occupancy: Occupancy,
}

/// The serialized form of `PlacementState`.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct PlacementsWire {
    placements: BTreeMap<VmId, Placement>,
}

impl From<PlacementsWire> for PlacementState {
    fn from(w: PlacementsWire) -> Self {
        Self {
            occupancy: Occupancy::rebuild(w.placements.values()),
            placements: w.placements,
        }
    }
}

impl From<PlacementState> for PlacementsWire {
    fn from(s: PlacementState) -> Self {
        Self {
            placements: s.placements,
        }
    }
}

/// Equal when the placements are equal (the occupancy follows from them).
impl PartialEq for PlacementState {
    fn eq(&self, other: &Self) -> bool {
        self.placements == other.placements
    }
}

impl Eq for PlacementState {}

impl PlacementState {
    /// No placements.
    pub fn new() -> Self {
        Self::default()
    }

    /// The placement of `vm`.
    pub(crate) fn get(&self, vm: &VmId) -> Option<&Placement> {
        self.placements.get(vm)
    }

    /// Placements in VM id order.
    pub fn iter(&self) -> impl Iterator<Item = &Placement> {
        self.placements.values()
    }

    /// Number of placements.
    pub fn len(&self) -> usize {
        self.placements.len()
    }

    /// Whether there is no placement.
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty()
    }

    /// Records a placement. The same placement twice is a no-op; a
    /// different placement for a placed VM, or an exclusive set that
    /// overlaps another VM's exclusive set, is a `Conflict`.
    pub fn apply(&mut self, placement: Placement) -> Result<(), PlaceError> {
        if let Some(old) = self.placements.get(&placement.vm_id) {
            if *old == placement {
                return Ok(());
            }
            return Err(PlaceError::Conflict {
                vm_id: placement.vm_id.clone(),
                reason: "already placed with a different request or CPU set".into(),
            });
        }
        if placement.exclusive && !self.occupancy.held.is_disjoint(&placement.cpus) {
            if let Some(other) = self
                .placements
                .values()
                .find(|p| p.exclusive && !p.cpus.is_disjoint(&placement.cpus))
            {
                return Err(PlaceError::Conflict {
                    vm_id: placement.vm_id.clone(),
                    reason: format!(
                        "CPUs {} are held by {}",
                        other.cpus.intersection(&placement.cpus),
                        other.vm_id
                    ),
                });
            }
        }
        self.occupancy.add(&placement);
        self.placements.insert(placement.vm_id.clone(), placement);
        Ok(())
    }

    /// Removes a VM's placement; its CPUs are free again.
    pub(crate) fn release(&mut self, vm: &VmId) -> Option<Placement> {
        let p = self.placements.remove(vm)?;
        self.occupancy.remove(&p);
        Some(p)
    }

    /// Which CPUs, cores and domains the placements use.
    pub(crate) fn occupancy(&self) -> &Occupancy {
        &self.occupancy
    }

    /// Places and records in one step.
    pub fn place(
        &mut self,
        topo: &Topology,
        reservations: &Reservations,
        request: &PlacementRequest,
    ) -> Result<Placement, PlaceError> {
        let p = place(topo, self, reservations, request)?;
        self.apply(p.clone())?;
        Ok(p)
    }

    /// The confidential pool: L3 domains that hold a confidential VM,
    /// ascending.
    pub(crate) fn confidential_domains(&self) -> Vec<usize> {
        let slot = Pool::Confidential.slot();
        self.occupancy
            .domain_vms
            .iter()
            .enumerate()
            .filter(|(_, vms)| vms[slot] > 0)
            .map(|(d, _)| d)
            .collect()
    }
}

/// CPUs free for a new dedicated VM of each pool, without mixing pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FreeCpus {
    /// Free CPUs in confidential pool domains and in empty domains.
    pub(crate) confidential: u32,
    /// Free CPUs in domains without confidential VMs.
    pub(crate) general: u32,
}

impl fmt::Display for FreeCpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "free for confidential VMs: {} CPUs, for general VMs: {} CPUs",
            self.confidential, self.general
        )
    }
}

/// Why a VM could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The host has too few free CPUs of the pool for the request.
    #[error(
        "not enough capacity for {requested} {kind} vCPUs of class {class}: {free}",
        kind = if *dedicated { "dedicated" } else { "shared" }
    )]
    NotEnoughCapacity {
        /// The class asked for.
        class: ConfidentialClass,
        /// Whether the vCPUs were asked as dedicated (whole CPUs each).
        dedicated: bool,
        /// vCPUs asked for.
        requested: u32,
        /// What the host has free for the class.
        free: FreeCpus,
    },
    /// A request field is out of range.
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The request contradicts what the engine holds for the VM.
    #[error("conflict for VM {vm_id}: {reason}")]
    Conflict {
        /// The VM.
        vm_id: VmId,
        /// What contradicts.
        reason: String,
    },
}

/// How many more VMs of one size fit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SizeFit {
    pub(crate) vcpus: u32,
    pub(crate) count: u32,
}

/// Room for one confidential class.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClassCapacity {
    pub(crate) class: ConfidentialClass,
    pub(crate) pool: Pool,
    /// CPUs a dedicated VM of this class could use without mixing pools.
    pub(crate) free_cpus: u32,
    /// For each common size: dedicated VMs that would still be placed, one
    /// after the other, without mixing pools.
    pub(crate) fits: Vec<SizeFit>,
    /// vCPUs of the largest dedicated VM placeable without mixing pools.
    pub(crate) largest_vm: u32,
}

/// What the host can still take, per class, from the same engine that
/// places.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacitySummary {
    pub(crate) classes: Vec<ClassCapacity>,
    /// The confidential pool: L3 domains holding a confidential VM.
    pub(crate) confidential_domains: Vec<usize>,
    /// L3 domains with no VM at all.
    pub(crate) empty_domains: Vec<usize>,
}

/// Sizes reported by `capacity`.
pub(crate) const COMMON_SIZES: [u32; 6] = [1, 2, 4, 8, 16, 32];
