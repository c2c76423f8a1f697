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
    /// The reason as the API and the metrics name it (`thread_moved`, ...).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ThreadMoved => "thread_moved",
            Self::NewThread => "new_thread",
            Self::CgroupRecreated => "cgroup_recreated",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EventKind {
    /// The VM was placed.
    Placed {
        /// Every CPU of the placement.
        cpus: CpuSet,
        /// The CPUs of each vCPU, by index.
        vcpu_cpus: Vec<CpuSet>,
        /// The L3 domains used, as indices into `Topology::l3_domains`.
        l3_domains: Vec<usize>,
    },
    /// The VM's placement was released.
    Released {
        /// The CPUs it held.
        cpus: CpuSet,
    },
    /// A thread's CPUs differed from the placement and were set again.
    Drift {
        /// Why they differed.
        reason: DriftReason,
        /// The thread.
        tid: u32,
        /// The CPUs the thread had.
        observed: CpuSet,
        /// The CPUs it was given.
        enforced: CpuSet,
    },
    /// The VM's process exited.
    Exited {
        /// The process.
        pid: u32,
    },
    /// A VM process was found that no intent holds.
    Discovered {
        /// The process.
        pid: u32,
        /// Its class from the command line, when one was found.
        class: Option<ConfidentialClass>,
        /// Its vCPU threads found.
        vcpus: u32,
    },
    /// The topology changed under a placement; the engine chose `new`.
    Replaced {
        /// The CPUs the VM held before.
        old_cpus: CpuSet,
        /// The new placement.
        new: Box<crate::placement::Placement>,
        /// Why the old placement no longer fit.
        reason: String,
    },
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the agent's event stream, from 1, without gaps.
    pub(crate) sequence: u64,
    /// When the event was published.
    pub(crate) time: SystemTime,
    /// The VM's key (`vm_id`, or `pid-<N>` for an unmanaged VM).
    pub(crate) vm_id: String,
    /// What happened.
    pub(crate) kind: EventKind,
}

/// Numbers events and fans them out; a subscriber that falls more than
/// `capacity` events behind loses them and is told so.
pub struct EventBus {
    sequence: AtomicU64,
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    /// A bus whose subscribers may fall at most `capacity` events behind.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            sequence: AtomicU64::new(0),
            tx,
        }
    }

    /// Publishes an event; never blocks.
    pub(crate) fn publish(&self, vm_id: &str, kind: EventKind) -> Event {
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

    /// A receiver of every event published from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
