//! Group commit of the checkpoint.
//!
//! Decisions are made one at a time under the core's lock, each staging the
//! whole new checkpoint (generation + 1) here. Writing it is not done under
//! that lock: the first caller that waits while no write is in flight
//! becomes the leader, takes the newest staged checkpoint and writes it
//! ([`CheckpointWriter`]: one journal record of what changed since the
//! durable checkpoint, or now and then a new snapshot) while further
//! decisions are staged behind it; every caller whose generation that
//! write covers is then answered. A burst of N calls costs a few writes,
//! not N, and a write costs what it changes, not the whole checkpoint.
//!
//! A failed write fails every decision not yet durable (the one written and
//! every one staged after it, which were decided on top of it) and ends the
//! current epoch: a checkpoint staged for an older epoch is refused, and the
//! core rolls its state back to [`GroupCommit::durable`] before it decides
//! again ([`super::AgentCore`]'s `sync_with_log`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crate::state::{Checkpoint, CheckpointError, CheckpointStore, CheckpointWriter, Written};

/// How one write ended for the decisions it covered.
type Outcome = Result<(), Arc<CheckpointError>>;

/// A decision waiting for a write that covers its generation.
#[derive(Debug)]
struct Slot {
    generation: u64,
    outcome: OnceLock<Outcome>,
}

/// What a caller waits on before it answers.
#[derive(Debug, Clone)]
pub(crate) struct Ticket(TicketState);

#[derive(Debug, Clone)]
enum TicketState {
    /// Known at once: durable already, or refused.
    Done(Outcome),
    Waiting(Arc<Slot>),
}

impl Ticket {
    /// A ticket for an answer that depends on no staged decision.
    pub(crate) fn durable() -> Self {
        Self(TicketState::Done(Ok(())))
    }
}

/// The log's state, under its mutex.
#[derive(Debug)]
struct Log {
    /// Bumped by every failed write.
    epoch: u64,
    /// The newest checkpoint on disk.
    durable: Arc<Checkpoint>,
    /// The newest staged checkpoint no writer has taken yet.
    staged: Option<Arc<Checkpoint>>,
    writing: bool,
    waiting: Vec<Arc<Slot>>,
    /// The error of the last write when it failed; `None` after a success.
    last_failure: Option<Arc<CheckpointError>>,
    /// The error of the write that ended the current epoch.
    ended_by: Option<Arc<CheckpointError>>,
    writes: u64,
    snapshots: u64,
}

/// The checkpoint's writer and the callers waiting on it.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    /// Taken only by the leader, one at a time (`Log::writing`).
    writer: Mutex<CheckpointWriter>,
    log: Mutex<Log>,
    written: Condvar,
}

/// What the core needs to catch up with the log: see
/// [`GroupCommit::state`].
#[derive(Debug, Clone)]
pub(crate) struct LogState {
    pub(crate) epoch: u64,
    pub(crate) durable: Arc<Checkpoint>,
    pub(crate) last_failure: Option<Arc<CheckpointError>>,
    /// Writes attempted so far.
    // Read by this module's tests only.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) writes: u64,
    /// Writes that rewrote the snapshot (the rest appended to the journal).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) snapshots: u64,
}

impl GroupCommit {
    /// A log whose durable checkpoint is `durable` (as loaded from `store`).
    pub(crate) fn new(store: CheckpointStore, durable: Arc<Checkpoint>) -> Self {
        Self {
            writer: Mutex::new(CheckpointWriter::new(store)),
            log: Mutex::new(Log {
                epoch: 0,
                durable,
                staged: None,
                writing: false,
                waiting: Vec::new(),
                last_failure: None,
                ended_by: None,
                writes: 0,
                snapshots: 0,
            }),
            written: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // Nothing panics under this lock; a poisoned one is still consistent.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch, the durable checkpoint and the last write's error.
    pub(crate) fn state(&self) -> LogState {
        let log = self.lock();
        LogState {
            epoch: log.epoch,
            durable: log.durable.clone(),
            last_failure: log.last_failure.clone(),
            writes: log.writes,
            snapshots: log.snapshots,
        }
    }

    /// Stages `next`, decided in `epoch`, as the checkpoint to write. A
    /// stage for an epoch a failed write has ended is refused: it was
    /// decided on top of a decision that is not on disk.
    pub(crate) fn stage(&self, epoch: u64, next: Arc<Checkpoint>) -> Ticket {
        let mut log = self.lock();
        if epoch != log.epoch {
            return Self::refused(&log);
        }
        let generation = next.generation;
        log.staged = Some(next);
        Self::enlist(&mut log, generation)
    }

    /// A ticket for an answer read from the staged state at `generation`
    /// (an identical retry, a NOT_FOUND): it is given once that state is
    /// durable, so no answer reveals a decision that a failed write undoes.
    pub(crate) fn covering(&self, epoch: u64, generation: u64) -> Ticket {
        let mut log = self.lock();
        if epoch != log.epoch {
            return Self::refused(&log);
        }
        if generation <= log.durable.generation {
            return Ticket::durable();
        }
        Self::enlist(&mut log, generation)
    }

    fn refused(log: &Log) -> Ticket {
        // Only an ended epoch refuses, and ending one sets `ended_by`.
        let e = log.ended_by.clone().unwrap_or_else(|| {
            Arc::new(CheckpointError::Io {
                op: "stage",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other("decided before a failed write"),
            })
        });
        Ticket(TicketState::Done(Err(e)))
    }

    fn enlist(log: &mut Log, generation: u64) -> Ticket {
        let slot = Arc::new(Slot {
            generation,
            outcome: OnceLock::new(),
        });
        log.waiting.push(slot.clone());
        Ticket(TicketState::Waiting(slot))
    }

    /// Blocks until a write covering `ticket` is durable, writing the newest
    /// staged checkpoint itself when no write is in flight. Needs no lock
    /// of the core, so it may be called with or without it.
    pub(crate) fn wait(&self, ticket: &Ticket) -> Result<(), CheckpointError> {
        let slot = match &ticket.0 {
            TicketState::Done(outcome) => return outcome.clone().map_err(|e| copy_error(&e)),
            TicketState::Waiting(slot) => slot,
        };
        let mut log = self.lock();
        loop {
            if let Some(outcome) = slot.outcome.get() {
                return outcome.clone().map_err(|e| copy_error(&e));
            }
            if !log.writing {
                if let Some(next) = log.staged.take() {
                    log.writing = true;
                    log.writes += 1;
                    // What the files hold: only the leader writes.
                    let durable = log.durable.clone();
                    drop(log);
                    let written = self
                        .writer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write(&durable, &next);
                    log = self.lock();
                    log.writing = false;
                    if matches!(written, Ok(Written::Snapshot(_))) {
                        log.snapshots += 1;
                    }
                    Self::settle(&mut log, next, written.map(|_| ()));
                    self.written.notify_all();
                    continue;
                }
            }
            log = self.written.wait(log).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Answers the slots a write covered: on success those at or below its
    /// generation; on failure every waiting one, and the epoch ends.
    fn settle(log: &mut Log, next: Arc<Checkpoint>, written: Result<(), CheckpointError>) {
        match written {
            Ok(()) => {
                let generation = next.generation;
                log.durable = next;
                log.last_failure = None;
                log.waiting.retain(|s| {
                    if s.generation <= generation {
                        let _ = s.outcome.set(Ok(()));
                        false
                    } else {
                        true
                    }
                });
            }
            Err(e) => {
                let e = Arc::new(e);
                log.epoch += 1;
                log.staged = None;
                for s in log.waiting.drain(..) {
                    let _ = s.outcome.set(Err(e.clone()));
                }
                log.last_failure = Some(e.clone());
                log.ended_by = Some(e);
            }
        }
    }
}

/// A caller's own copy of a write error shared by every caller it failed
/// (`io::Error` is not `Clone`): same variant, kind and message.
fn copy_error(e: &CheckpointError) -> CheckpointError {
    match e {
        CheckpointError::Io { op, path, source } => CheckpointError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => CheckpointError::Io {
            op: "save",
            path: std::path::PathBuf::new(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::IntentRecord;

    fn checkpoint(generation: u64, ids: &[&str]) -> Arc<Checkpoint> {
        let intents = ids
            .iter()
            .map(|id| {
                Arc::new(IntentRecord {
                    vm_id: crate::types::VmId::new(*id).unwrap(),
                    selector: crate::state::VmSelector::LibvirtDomain { name: (*id).into() },
                    request: crate::state::PlacementRequest {
                        vcpus: 1,
                        class: None,
                        dedicated: false,
                        numa_node: None,
                    },
                    placement: None,
                })
            })
            .collect();
        Arc::new(Checkpoint {
            generation,
            intents,
        })
    }

    /// A store whose directory is a regular file while `broken` exists:
    /// every save fails with ENOTDIR (a real failure, not a mock).
    fn store_in(dir: &std::path::Path) -> (CheckpointStore, std::path::PathBuf) {
        let state = dir.join("state");
        (CheckpointStore::in_dir(&state), state)
    }

    fn ids(c: &Checkpoint) -> Vec<String> {
        c.intents.iter().map(|i| i.vm_id.to_string()).collect()
    }

    /// Three decisions staged before anyone waits are made durable by one
    /// write: the file holds the newest, every ticket is answered.
    #[test]
    fn one_write_answers_every_staged_decision() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_in(dir.path());
        let log = GroupCommit::new(store.clone(), checkpoint(0, &[]));
        let a = log.stage(0, checkpoint(1, &["a"]));
        let b = log.stage(0, checkpoint(2, &["a", "b"]));
        let c = log.stage(0, checkpoint(3, &["a", "b", "c"]));
        log.wait(&b).unwrap();
        // The leader wrote the newest staged checkpoint, not b's own.
        assert_eq!(store.load().unwrap().generation, 3);
        log.wait(&a).unwrap();
        log.wait(&c).unwrap();
        assert_eq!(log.state().writes, 1, "one write covered all three");
        assert_eq!(log.state().durable.generation, 3);
        assert!(matches!(log.covering(0, 3).0, TicketState::Done(Ok(()))));
    }

    /// A failed write fails every staged decision with the store's error,
    /// ends the epoch (a stage decided before the failure is refused), and
    /// leaves the durable checkpoint as it was; after the fault heals the
    /// next epoch writes again.
    #[test]
    fn a_failed_write_fails_every_undurable_decision_and_ends_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, state) = store_in(dir.path());
        let log = GroupCommit::new(store.clone(), checkpoint(0, &[]));
        let a = log.stage(0, checkpoint(1, &["a"]));
        log.wait(&a).unwrap();

        // The state directory becomes a file: the journal cannot be
        // opened (the write after a snapshot is an append).
        std::fs::remove_dir_all(&state).unwrap();
        std::fs::write(&state, b"not a directory").unwrap();
        let b = log.stage(0, checkpoint(2, &["a", "b"]));
        let retry_of_b = log.covering(0, 2);
        let c = log.stage(0, checkpoint(3, &["a", "b", "c"]));
        for t in [&b, &retry_of_b, &c] {
            let e = log.wait(t).unwrap_err();
            assert!(
                matches!(
                    &e,
                    CheckpointError::Io {
                        op: "open journal",
                        ..
                    }
                ),
                "{e}"
            );
        }
        let after = log.state();
        assert_eq!(after.epoch, 1);
        assert_eq!(after.durable.generation, 1);
        assert_eq!(ids(&after.durable), ["a"]);
        assert!(after.last_failure.is_some());
        // Decided in epoch 0 after the failure: refused without a write.
        assert!(log.wait(&log.stage(0, checkpoint(2, &["a", "d"]))).is_err());
        assert!(log.wait(&log.covering(0, 1)).is_err());

        std::fs::remove_file(&state).unwrap();
        let d = log.stage(1, checkpoint(2, &["a", "d"]));
        log.wait(&d).unwrap();
        assert_eq!(ids(&store.load().unwrap()), ["a", "d"]);
        assert!(log.state().last_failure.is_none());
        // The first write and the one after the failure were snapshots.
        assert_eq!((log.state().writes, log.state().snapshots), (3, 2));
        // Still refused after the heal, with the error that ended epoch 0.
        let stale = log
            .wait(&log.stage(0, checkpoint(3, &["a", "e"])))
            .unwrap_err();
        assert!(
            matches!(
                &stale,
                CheckpointError::Io {
                    op: "open journal",
                    ..
                }
            ),
            "{stale}"
        );
        assert_eq!(ids(&store.load().unwrap()), ["a", "d"]);
    }

    /// Many threads stage and wait at once: each is answered only after a
    /// write whose generation is at least its own, and the writes are fewer
    /// than the calls.
    #[test]
    fn concurrent_callers_share_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_in(dir.path());
        let log = Arc::new(GroupCommit::new(store.clone(), checkpoint(0, &[])));
        // The decisions are serialized by this mutex, as by the core's lock.
        let core = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (log, core) = (log.clone(), core.clone());
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..8 {
                        let (generation, ticket) = {
                            let mut g = core.lock().unwrap();
                            *g += 1;
                            (*g, log.stage(0, checkpoint(*g, &[])))
                        };
                        log.wait(&ticket).unwrap();
                        let durable = log.state().durable.generation;
                        assert!(durable >= generation, "{durable} < {generation}");
                        mine.push(generation);
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=128).collect::<Vec<_>>());
        assert_eq!(store.load().unwrap().generation, 128);
        let writes = log.state().writes;
        assert!(writes < 128, "{writes} writes for 128 decisions");
        assert_eq!(
            log.state().snapshots,
            1,
            "only the first write is a snapshot"
        );
    }
}
