//! What the gRPC service and the reconcile loop share: the core behind its
//! priority lock, the access policy, the event bus and the metrics.

use std::sync::{Arc, MutexGuard};

use crate::access::AccessPolicy;
use crate::metrics::Metrics;

use super::agent_core::AgentCore;
use super::events::EventBus;
use super::priority::{CallGuard, PriorityMutex};

/// What the service reads and acts on.
pub(crate) struct AgentContext {
    pub(crate) core: Arc<PriorityMutex<AgentCore>>,
    pub(crate) access: AccessPolicy,
    pub(crate) events: Arc<EventBus>,
    pub(crate) metrics: Arc<Metrics>,
}

impl AgentContext {
    /// The core for an API call (behind a waiting reconcile pass).
    pub(crate) fn lock(&self) -> CallGuard<'_, AgentCore> {
        self.core.lock()
    }

    /// The core for the reconcile loop (ahead of queued calls).
    pub(crate) fn lock_first(&self) -> MutexGuard<'_, AgentCore> {
        self.core.lock_first()
    }
}
