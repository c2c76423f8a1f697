//! The agent's core: intents (checkpointed), the placement engine's state,
//! the VMs discovered on the host, and the one loop that makes the host
//! match the intents (observe, compare, act, record).
//!
//! Every mutation of intents is written to the checkpoint (write, fsync,
//! rename) before any thread is pinned, so an acknowledged PlaceVm survives
//! `kill -9`. Observed state is always re-read from procfs, never assumed
//! from what was last written.
//!
//! One file per concern, each adding methods to [`AgentCore`]:
//! - `agent_core`: the core's state, loading, the checkpoint commit and
//!   conditions;
//! - `place`: PlaceVm, ReleaseVm and the pin of one VM;
//! - `pass`: one reconcile pass over a scan, and [`run_pass`] which the
//!   daemon's loop calls;
//! - `views`: what GetVm and ListVms report;
//! - `module_sync`: labels and figures from the sevflush module;
//! - `scrub`: ScrubVm and its admission interval;
//! - `capacity`: the capacity summary, cached per checkpoint generation;
//! - `context`: [`AgentContext`], what the API and the loop share;
//! - `error`: [`AgentError`].

mod agent_core;
mod capacity;
mod context;
pub mod enforce;
mod error;
pub mod events;
mod module_sync;
mod pass;
mod place;
pub mod priority;
mod scrub;
mod views;

pub use agent_core::{AgentCore, HostAccess};
pub use context::AgentContext;
pub use error::AgentError;
pub use pass::{run_pass, PassReport};
pub use place::PlaceCall;
pub use scrub::Scrubbed;
pub use views::{ClassSource, VmState, VmView};

#[cfg(test)]
mod tests;
