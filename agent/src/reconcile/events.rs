//! Events of the agent (placements, drift, exits) and their bounded
//! broadcast to WatchEvents subscribers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::cpuset::CpuSet;
use crate::types::ConfidentialClass;

/// Why a drift correction was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriftReason {
    /// A pinned thread's affinity was changed by someone else.
    ThreadMoved,
    /// A vCPU thread appeared that had not been pinned yet.
    NewThread,
    /// A libvirt vcpuN cgroup's cpuset differed from the placement.
    CgroupRecreated,
}

impl DriftReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ThreadMoved => "thread_moved",
            Self::NewThread => "new_thread",
            Self::CgroupRecreated => "cgroup_recreated",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Placed {
        cpus: CpuSet,
        vcpu_cpus: Vec<CpuSet>,
        l3_domains: Vec<usize>,
    },
    Released {
        cpus: CpuSet,
    },
    Drift {
        reason: DriftReason,
        tid: u32,
        observed: CpuSet,
        enforced: CpuSet,
    },
    Exited {
        pid: u32,
    },
    Discovered {
        pid: u32,
        class: Option<ConfidentialClass>,
        vcpus: u32,
    },
    /// The topology changed under a placement; the engine chose `new`.
    Replaced {
        old_cpus: CpuSet,
        new: Box<crate::placement::Placement>,
        reason: String,
    },
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub sequence: u64,
    pub time: SystemTime,
    pub vm_id: String,
    pub kind: EventKind,
}

/// Numbers events and fans them out; a subscriber that falls more than
/// `capacity` events behind loses them and is told so.
pub struct EventBus {
    sequence: AtomicU64,
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            sequence: AtomicU64::new(0),
            tx,
        }
    }

    /// Publishes an event; never blocks.
    pub fn publish(&self, vm_id: &str, kind: EventKind) -> Event {
        let ev = Event {
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            time: SystemTime::now(),
            vm_id: vm_id.to_string(),
            kind,
        };
        // No subscriber is not an error.
        let _ = self.tx.send(ev.clone());
        ev
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
