//! sevplace agent library: topology, placement, enforcement and the API of
//! `sevplaced`, and the client side used by `sevplacectl`.

pub mod access;
pub mod api;
pub mod authority;
pub mod cgroup;
pub mod client;
pub mod conditions;
pub mod config;
pub mod cpuset;
pub mod ctl;
pub mod daemon;
pub mod discovery;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod kmod;
pub mod metrics;
pub mod notify;
pub mod placement;
pub mod reconcile;
pub mod server;
pub mod simulate;
/// The skip helper of every test (tests/src/skip.rs).
#[cfg(test)]
#[path = "../../tests/src/skip.rs"]
pub(crate) mod skip;
pub mod state;
pub mod tls;
pub mod topology;
pub mod types;

pub use cpuset::CpuSet;
pub use types::{ConfidentialClass, VmId};
