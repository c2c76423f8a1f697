//! Why an operation of the core failed, named for what failed. The API
//! edge (`api::status_of`) maps each to a gRPC code; nothing here knows
//! about gRPC.

use crate::discovery::DiscoveryError;
use crate::kmod::ModuleError;
use crate::placement::PlaceError;
use crate::state::CheckpointError;
use crate::types::VmId;

/// Why an id of the form `pid-<N>` is refused for an orchestrator's VM.
const RESERVED_FOR_PROCESS: &str =
    "has the form pid-<N>, which names a VM by its process; choose another id";
/// Why a request without a class is refused.
const UNCLASSIFIED: &str = "unspecified, and no VM process was found to classify";

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A request field holds a value the agent does not take.
    #[error("invalid {field}: {reason}")]
    BadField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// PlaceVm under an id of the form `pid-<N>` for another process.
    #[error("invalid vm_id: {0} {RESERVED_FOR_PROCESS}")]
    ReservedVmId(VmId),
    /// The selector's pid is a process, but not a KVM VM.
    #[error("invalid selector.pid: process {pid} is not a KVM VM")]
    NotAVm {
        /// The process named.
        pid: u32,
    },
    /// PlaceVm without a class, and no process to classify.
    #[error("invalid confidential_class: {UNCLASSIFIED}")]
    Unclassified,
    /// The selector's pid names no process.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The process named.
        pid: u32,
    },
    /// No VM, managed or unmanaged, has this key.
    #[error("no VM {0:?}")]
    NoSuchVm(String),
    /// ReleaseVm of a VM without an intent.
    #[error("VM {0} is not placed")]
    NotPlaced(VmId),
    /// The engine found no placement, or the request does not fit it.
    #[error("{0}")]
    Place(#[from] PlaceError),
    /// PlaceVm for a placed VM with another request.
    #[error("VM {0} is already placed with a different request; release it first")]
    PlacedDifferently(VmId),
    /// The selector names several VMs or a cgroup above VMs' own (the
    /// message names them).
    #[error("{0}")]
    SelectorUnresolved(String),
    /// The selector names a VM another intent holds.
    #[error("the selector names {process}, which is VM {holder}")]
    HeldByOther {
        /// The process, as the selector names it.
        process: String,
        /// The VM that holds it.
        holder: VmId,
    },
    /// The VM exited while its threads were being pinned; the placement
    /// was released.
    #[error("VM {0} exited while it was being pinned; its placement was released")]
    ExitedWhilePinning(VmId),
    /// ScrubVm of a VM without a running process.
    #[error("VM {0} has no running process")]
    NotRunning(String),
    /// The sevflush module's VM records cannot be read.
    #[error("{0}")]
    ModuleUnreadable(ModuleError),
    /// The sevflush module has no record of the VM.
    #[error("the sevflush module does not track VM {vm} (pid {pid})")]
    NotTrackedByModule {
        /// The VM.
        vm: String,
        /// Its process.
        pid: u32,
    },
    /// The checkpoint could not be written.
    #[error("the intent could not be saved, nothing was changed: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The host scan failed.
    #[error("host scan failed: {0}")]
    Discovery(#[from] DiscoveryError),
    /// ScrubVm of a VM scrubbed less than `server.scrub_min_interval_ms` ago.
    #[error("VM {vm} was scrubbed less than the minimum interval ago; retry in {} ms", retry_after.as_millis().max(1))]
    ScrubTooSoon {
        /// The VM.
        vm: String,
        /// How long until the VM may be scrubbed again.
        retry_after: std::time::Duration,
    },
    /// The module refused or failed the scrub.
    #[error("{0}")]
    Scrub(ModuleError),
}

impl AgentError {
    /// The request field at fault and why, for the errors that are a bad
    /// value of one request field.
    pub(crate) fn field_violation(&self) -> Option<(&'static str, String)> {
        match self {
            Self::BadField { field, reason } => Some((field, reason.clone())),
            Self::ReservedVmId(id) => Some(("vm_id", format!("{id} {RESERVED_FOR_PROCESS}"))),
            Self::NotAVm { pid } => {
                Some(("selector.pid", format!("process {pid} is not a KVM VM")))
            }
            Self::Unclassified => Some(("confidential_class", UNCLASSIFIED.to_string())),
            _ => None,
        }
    }
}
