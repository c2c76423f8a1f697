//! sevplace agent library: topology, placement, enforcement and the API of
//! `sevplaced`, and the client side used by `sevplacectl`.

pub mod cgroup;
pub mod cpuset;
pub mod discovery;
pub mod state;
pub mod topology;
pub mod types;

pub use cpuset::CpuSet;
pub use types::{ConfidentialClass, VmId};
