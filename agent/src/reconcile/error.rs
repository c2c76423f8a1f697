//! Why an operation of the core failed.

use crate::discovery::DiscoveryError;
use crate::kmod::ModuleError;
use crate::placement::PlaceError;
use crate::state::CheckpointError;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Place(#[from] PlaceError),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the intent could not be saved, nothing was changed: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("host scan failed: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("VM {vm} was scrubbed less than the minimum interval ago; retry in {} ms", retry_after.as_millis().max(1))]
    ScrubTooSoon {
        vm: String,
        retry_after: std::time::Duration,
    },
    #[error("{0}")]
    Scrub(ModuleError),
}
