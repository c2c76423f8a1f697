//! The agent's core: intents (checkpointed), the placement engine's state,
//! the VMs discovered on the host, and the one loop that makes the host
//! match the intents (observe, compare, act, record).
//!
//! Every mutation of intents is written to the checkpoint (write, fsync,
//! rename) before it is answered and before any thread is pinned, so an
//! acknowledged PlaceVm survives `kill -9`. Calls are decided one at a time
//! under the core's lock and made durable together by `group_commit`: one
//! write, outside the lock, covers every decision staged while the
//! previous write was in flight. Observed state is always re-read from procfs, never assumed
//! from what was last written.
//!
//! One file per concern, each adding methods to [`AgentCore`]:
//! - `agent_core`: the core's state, loading, staging and committing the
//!   checkpoint, the roll-back after a failed write, conditions;
//! - `group_commit`: [`group_commit::GroupCommit`], the checkpoint's one
//!   writer and the callers waiting for a durable write;
//! - `place`: PlaceVm, ReleaseVm (decided, then finished once durable) and
//!   the pin of one VM;
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
pub(crate) mod group_commit;
pub(crate) mod matching;
mod module_sync;
mod pass;
mod place;
pub mod priority;
pub(crate) mod refit;
mod scrub;
mod views;

pub use agent_core::{AgentCore, HostAccess};
pub(crate) use context::AgentContext;
pub(crate) use error::AgentError;
pub(crate) use pass::run_pass;
#[cfg(test)]
use pass::PassReport;
pub use place::PlaceCall;
pub(crate) use views::{ClassSource, VmState, VmView};

#[cfg(test)]
mod tests;
