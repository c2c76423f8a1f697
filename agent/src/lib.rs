//! sevplace agent library: topology, placement, enforcement and the API of
//! `sevplaced`, and the client side used by `sevplacectl`.

pub(crate) mod access;
pub(crate) mod api;
pub(crate) mod authority;
pub mod cgroup;
pub mod client;
pub(crate) mod conditions;
pub mod config;
pub(crate) mod cpuset;
pub mod ctl;
pub mod daemon;
pub mod discovery;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod kmod;
pub mod metrics;
pub(crate) mod notify;
pub mod placement;
pub mod reconcile;
pub(crate) mod server;
pub mod simulate;
/// The skip helper of every test (tests/src/skip.rs).
#[cfg(test)]
#[path = "../../tests/src/skip.rs"]
pub(crate) mod skip;
pub mod state;
pub mod tls;
pub mod topology;
pub(crate) mod types;

pub use cpuset::CpuSet;
pub use types::{ConfidentialClass, VmId};
