//! How long the reconcile loop waits for the agent's state lock while API
//! calls hammer it: `PriorityMutex::lock_first` (the reconcile side) against
//! a plain `std::sync::Mutex` (the baseline, what the core used before), in
//! the same run. Callers hold the lock for 50 µs of work each time (a
//! GetHost-sized critical section) and take it again at once; the reconcile
//! side takes it every 2 ms. A row stops after 1000 takes or 10 s; the
//! `takes` column says how many the reconcile side got in that time.
//!
//! `cargo bench -p sevplace-agent --bench lock`; `cargo test` runs it as a
//! short smoke test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sevplace::reconcile::priority::PriorityMutex;

const HOLD: Duration = Duration::from_micros(50);

fn work() {
    let t = Instant::now();
    while t.elapsed() < HOLD {
        std::hint::spin_loop();
    }
}

/// The two locks behind one interface: the callers' lock and the reconcile
/// side's lock.
trait StateLock: Send + Sync + 'static {
    fn call(&self);
    fn reconcile(&self);
}

impl StateLock for Mutex<u64> {
    fn call(&self) {
        let mut g = self.lock().unwrap_or_else(|p| p.into_inner());
        work();
        *g += 1;
    }
    fn reconcile(&self) {
        let mut g = self.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
    }
}

impl StateLock for PriorityMutex<u64> {
    fn call(&self) {
        let mut g = self.lock();
        work();
        *g += 1;
    }
    fn reconcile(&self) {
        *self.lock_first() += 1;
    }
}

// (len - 1) * p with p in 0..=1, rounded, is a whole index in 0..len: the
// cast neither truncates nor drops a sign.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Waits of the reconcile side with `callers` threads calling, `takes`
/// times or until `budget` is spent: p50, p99, max, and the takes made.
fn measure<L: StateLock>(
    lock: Arc<L>,
    callers: usize,
    takes: usize,
    budget: Duration,
) -> (Duration, Duration, Duration, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let (lock, stop) = (lock.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    lock.call();
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let mut waits = Vec::with_capacity(takes);
    let start = Instant::now();
    while waits.len() < takes && start.elapsed() < budget {
        let t = Instant::now();
        lock.reconcile();
        waits.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("caller thread");
    }
    waits.sort();
    (
        pct(&waits, 0.5),
        pct(&waits, 0.99),
        waits[waits.len() - 1],
        waits.len(),
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (takes, budget) = if full {
        (1000, Duration::from_secs(10))
    } else {
        (20, Duration::from_secs(1))
    };
    println!(
        "reconcile-side wait for the state lock, {takes} takes per row (at most {budget:?}), \
         callers hold it 50 µs"
    );
    println!(
        "{:<28} {:>8} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "lock", "callers", "takes", "p50", "p99", "max", "base/p50"
    );
    for callers in [1usize, 8, 32, 128] {
        let (b50, b99, bmax, bn) = measure(Arc::new(Mutex::new(0u64)), callers, takes, budget);
        let (p50, p99, pmax, pn) =
            measure(Arc::new(PriorityMutex::new(0u64)), callers, takes, budget);
        println!(
            "{:<28} {:>8} {:>6} {:>10.1?} {:>10.1?} {:>10.1?} {:>10}",
            "std Mutex (baseline)", callers, bn, b50, b99, bmax, "1.00"
        );
        println!(
            "{:<28} {:>8} {:>6} {:>10.1?} {:>10.1?} {:>10.1?} {:>10.0}",
            "PriorityMutex::lock_first",
            callers,
            pn,
            p50,
            p99,
            pmax,
            b50.as_secs_f64() / p50.as_secs_f64().max(1e-9)
        );
    }
}
