//! The capacity summary, cached per checkpoint generation: placements
//! change only with a new generation, and GetHost asks for the summary far
//! more often than placements change.

use std::sync::Mutex;

use crate::placement::{self, CapacitySummary};

use super::agent_core::AgentCore;

/// The summary of the placements at one checkpoint generation.
#[derive(Debug, Default)]
pub(super) struct CapacityCache(Mutex<Option<(u64, CapacitySummary)>>);

impl CapacityCache {
    /// Drops the cached summary (the topology changed under the same
    /// generation).
    pub(super) fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl AgentCore {
    /// Capacity summary from the engine, computed once per checkpoint
    /// generation.
    pub(crate) fn capacity(&self) -> CapacitySummary {
        let generation = self.checkpoint.generation;
        let mut cache = self
            .capacity_cache
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match cache.as_ref() {
            Some((g, c)) if *g == generation => c.clone(),
            _ => {
                let c = placement::capacity(&self.topology, &self.placements, &self.reservations);
                *cache = Some((generation, c.clone()));
                c
            }
        }
    }
}
