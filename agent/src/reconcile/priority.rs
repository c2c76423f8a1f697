//! The core's lock, with the reconcile loop ahead of API calls.
//!
//! Calls take the lock in two steps: first `calls` (one call at a time
//! passes it), then `next` and the data. The reconcile loop skips `calls`
//! and takes `next` directly, so it competes with at most one call at `next`
//! and waits for at most one call's critical section, however many calls
//! are queued: a flood of requests delays a pass by one call, not by the
//! whole queue. Calls among themselves are served in the order the OS
//! mutex hands `calls` over.
//!
//! A panic while the lock is held does not make it unusable: every mutation
//! of the core is checkpointed before it is applied, so the state stays
//! consistent and the lock is taken over.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// A mutex with two classes of lockers: calls and the reconcile loop.
#[derive(Debug, Default)]
pub struct PriorityMutex<T> {
    calls: Mutex<()>,
    next: Mutex<()>,
    data: Mutex<T>,
}

/// The data, locked by a call; the call gate stays held until the guard
/// drops, after the data.
pub struct CallGuard<'a, T> {
    // Field order is drop order: data first, then the gate.
    data: MutexGuard<'a, T>,
    _calls: MutexGuard<'a, ()>,
}

fn take<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T> PriorityMutex<T> {
    /// A lock around `value`.
    pub fn new(value: T) -> Self {
        Self {
            calls: Mutex::new(()),
            next: Mutex::new(()),
            data: Mutex::new(value),
        }
    }

    /// Locks for an API call: behind the reconcile loop when it waits.
    pub fn lock(&self) -> CallGuard<'_, T> {
        let calls = take(&self.calls);
        let next = take(&self.next);
        let data = take(&self.data);
        drop(next);
        CallGuard {
            data,
            _calls: calls,
        }
    }

    /// Locks for the reconcile loop: ahead of every queued call.
    pub fn lock_first(&self) -> MutexGuard<'_, T> {
        let next = take(&self.next);
        let data = take(&self.data);
        drop(next);
        data
    }
}

impl<T> Deref for CallGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.data
    }
}

impl<T> DerefMut for CallGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// 32 threads hammer the lock as calls, each holding it for 500 us;
    /// the reconcile side takes it 20 times. Each of its takes waits for
    /// the call holding the lock and at most one more (two when the
    /// reconcile thread wakes late on a loaded machine), never for the queue
    /// of 31.
    #[test]
    fn the_reconcile_side_overtakes_queued_calls() {
        let m = Arc::new(PriorityMutex::new(0u64));
        let entered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let (m, entered, stop) = (m.clone(), entered.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut g = m.lock();
                        entered.fetch_add(1, Ordering::SeqCst);
                        *g += 1;
                        std::thread::sleep(Duration::from_micros(500));
                    }
                })
            })
            .collect();
        // Let the queue form.
        std::thread::sleep(Duration::from_millis(50));
        let mut worst = 0;
        for _ in 0..20 {
            let before = entered.load(Ordering::SeqCst);
            let g = m.lock_first();
            let overtaken = entered.load(Ordering::SeqCst) - before;
            drop(g);
            worst = worst.max(overtaken);
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        for c in callers {
            c.join().unwrap();
        }
        assert!(
            worst <= 4,
            "{worst} calls entered while the reconcile side waited"
        );
        assert!(*m.lock_first() > 100, "the callers made progress");
    }

    #[test]
    fn a_panic_under_the_lock_leaves_it_usable() {
        let m = Arc::new(PriorityMutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("call panicked");
        })
        .join();
        *m.lock() += 1;
        *m.lock_first() += 1;
        assert_eq!(*m.lock(), 3);
    }
}
