//! Real cgroup v1 cpuset tests: a cgroup under `/sys/fs/cgroup/cpuset`,
//! created and removed by the test, real threads of this process moved in,
//! `cpuset.cpus` applied and read back from `/proc/self/task/<tid>/status`.
//! Skipped with a printed reason when not root or no v1 cpuset is mounted.
//!
//! Threads are pinned through the daemon's enforcement path
//! (`reconcile::enforce::apply` with the real `sched_setaffinity`); the
//! test arranges the cgroups and moves the threads the way libvirt does.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sevplace::cgroup::{
    self, CgroupError, CgroupKind, CpusetWriter, Hierarchy, SchedAffinity, ThreadAffinity,
};
use sevplace::reconcile::enforce::{apply, Applied, ThreadFix};
use sevplace::reconcile::events::DriftReason;
use sevplace::CpuSet;

#[path = "../../tests/src/skip.rs"]
mod skip;
use skip::skip;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn v1_writer_or_skip(test: &str) -> Option<CpusetWriter> {
    if !nix::unistd::geteuid().is_root() {
        skip(test, "root", "not root");
        return None;
    }
    if !Path::new(CGROUP_ROOT).join("cpuset/cpuset.cpus").is_file() {
        skip(
            test,
            "cgroup-v1-cpuset",
            format_args!("no cgroup v1 cpuset hierarchy at {CGROUP_ROOT}/cpuset"),
        );
        return None;
    }
    match CpusetWriter::detect(CGROUP_ROOT) {
        Ok(w) if w.hierarchy() == Hierarchy::V1Cpuset => Some(w),
        Ok(_) => {
            skip(
                test,
                "cgroup-v1-cpuset",
                "the cpuset controller is on cgroup v2 here",
            );
            None
        }
        Err(e) => {
            skip(test, "cgroup-v1-cpuset", e);
            None
        }
    }
}

/// Removes the test cgroup tree on drop, after moving any task left in it
/// back to the root cgroup.
struct CgroupGuard {
    writer: CpusetWriter,
    base: String,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let Ok(dir) = self.writer.dir_of(&self.base) else {
            return;
        };
        for entry in walk(&dir) {
            if let Ok(tasks) = std::fs::read_to_string(entry.join("tasks")) {
                for t in tasks.lines() {
                    let _ = std::fs::write(self.writer.host().mount.join("tasks"), t);
                }
            }
        }
        if let Err(e) = self.writer.remove(&self.base) {
            eprintln!("cleanup of {}: {e}", self.base);
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

fn unique_base() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("/sevplace-test-{}-{nanos:x}", std::process::id())
}

/// Pins thread `tid` (vCPU `index`) in `cgroup` to `desired` through the
/// daemon's path; returns whether the cgroup had to be rewritten.
fn pin_like_daemon(
    writer: &CpusetWriter,
    cgroup: &str,
    index: u32,
    tid: u32,
    desired: &CpuSet,
) -> Result<bool, CgroupError> {
    let observed =
        sevplace::discovery::read_thread_cpus_allowed(proc_self(), std::process::id(), tid)?;
    let fix = ThreadFix {
        tid,
        vcpu: Some(index),
        cgroup: Some(cgroup.to_string()),
        helper: false,
        observed,
        desired: desired.clone(),
        reason: DriftReason::NewThread,
    };
    match apply(&fix, Some(writer), &SchedAffinity)? {
        Applied::Pinned { cgroup_rewritten } => Ok(cgroup_rewritten),
        Applied::HelperGone => unreachable!("a vCPU fix is never a helper's"),
    }
}

/// Threads that alternate short bursts of work and sleep until stopped.
struct Workers {
    tids: Vec<u32>,
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn spawn(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        for _ in 0..n {
            let tx = tx.clone();
            let stop = Arc::clone(&stop);
            handles.push(std::thread::spawn(move || {
                tx.send(u32::try_from(nix::unistd::gettid().as_raw()).unwrap())
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_micros(300) {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }
        let tids = (0..n).map(|_| rx.recv().unwrap()).collect();
        Self {
            tids,
            stop,
            handles,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join().unwrap();
        }
    }
}

fn proc_self() -> &'static Path {
    Path::new("/proc")
}

/// Context switches of a thread (voluntary + nonvoluntary, from status).
fn switches(pid: u32, tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Samples the thread's last CPU `n` times and returns those outside `set`.
/// A sample counts only after the thread has switched since this call (a
/// sleeping thread keeps its old CPU in stat field 39 until it wakes); the
/// workers wake every 2 ms, so at least one sample must count.
fn stray_samples(pid: u32, tid: u32, set: &CpuSet, n: usize) -> Vec<u32> {
    let base = switches(pid, tid);
    let mut stray = Vec::new();
    let mut counted = 0;
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(10));
        if switches(pid, tid) <= base {
            continue;
        }
        if let Ok(Some(cpu)) = sevplace::discovery::read_thread_last_cpu(proc_self(), pid, tid) {
            counted += 1;
            if !set.contains(cpu) {
                stray.push(cpu);
            }
        }
    }
    assert!(counted > 0, "thread {tid} never ran while sampled");
    stray
}

#[test]
fn v1_cpuset_moves_threads_and_applies_cpus() {
    let Some(writer) = v1_writer_or_skip("v1_cpuset_moves_threads_and_applies_cpus") else {
        return;
    };
    let pid = std::process::id();
    let host_cpus = writer.read_cpus("/").unwrap();
    let cpu_a = host_cpus.first().unwrap();
    let cpu_b = host_cpus.iter().last().unwrap();
    let base = unique_base();
    let guard = CgroupGuard {
        writer: writer.clone(),
        base: base.clone(),
    };
    let workers = Workers::spawn(2);

    let set_a: CpuSet = [cpu_a].into_iter().collect();
    let set_b: CpuSet = [cpu_b].into_iter().collect();
    let t0 = format!("{base}/t0");
    let t1 = format!("{base}/t1");
    // Arranged as libvirt does: each thread in its own cgroup on every CPU.
    for (cg, tid) in [(&t0, workers.tids[0]), (&t1, workers.tids[1])] {
        writer
            .ensure_cpuset(cg, &host_cpus, None, CgroupKind::Threaded)
            .unwrap();
        writer.move_thread(cg, tid).unwrap();
    }
    assert!(pin_like_daemon(&writer, &t0, 0, workers.tids[0], &set_a).unwrap());
    assert!(pin_like_daemon(&writer, &t1, 1, workers.tids[1], &set_b).unwrap());

    assert_eq!(writer.read_cpus(&t0).unwrap(), set_a);
    assert_eq!(writer.read_effective_cpus(&t1).unwrap(), set_b);
    assert_eq!(writer.read_threads(&t0).unwrap(), vec![workers.tids[0]]);
    for (tid, set) in [(workers.tids[0], &set_a), (workers.tids[1], &set_b)] {
        assert_eq!(
            &sevplace::discovery::read_thread_cpus_allowed(proc_self(), pid, tid).unwrap(),
            set
        );
        assert_eq!(&cgroup::get_thread_affinity(tid).unwrap(), set);
        let stray = stray_samples(pid, tid, set, 20);
        assert!(stray.is_empty(), "tid {tid} ran on {stray:?} outside {set}");
    }

    // Re-pin t0 to the other CPU: the kernel updates the thread's mask.
    assert!(pin_like_daemon(&writer, &t0, 0, workers.tids[0], &set_b).unwrap());
    assert_eq!(
        sevplace::discovery::read_thread_cpus_allowed(proc_self(), pid, workers.tids[0]).unwrap(),
        set_b
    );
    assert!(stray_samples(pid, workers.tids[0], &set_b, 10).is_empty());

    // rmdir of a cgroup that holds tasks is EBUSY.
    assert!(matches!(writer.remove(&t0), Err(CgroupError::Busy { .. })));

    workers.stop();
    drop(guard);
    assert!(!writer.dir_of(&base).unwrap().exists());
    println!("real v1 cpuset: pinned 2 threads to {set_a} and {set_b}, read back, cleaned up");
}

#[test]
fn v1_cpuset_errors_are_typed() {
    let Some(writer) = v1_writer_or_skip("v1_cpuset_errors_are_typed") else {
        return;
    };
    let host_cpus = writer.read_cpus("/").unwrap();
    let base = unique_base();
    let guard = CgroupGuard {
        writer: writer.clone(),
        base: base.clone(),
    };
    let workers = Workers::spawn(1);
    let tid = workers.tids[0];

    // ENOSPC: a fresh v1 cgroup has no CPUs or memory nodes.
    let empty = format!("{base}/empty");
    std::fs::create_dir_all(writer.dir_of(&empty).unwrap()).unwrap();
    let err = writer.move_thread(&empty, tid).unwrap_err();
    assert!(matches!(err, CgroupError::NoSpace { .. }), "{err:?}");
    assert!(err.to_string().contains("empty/tasks"), "{err}");

    // ESRCH: a thread that has exited.
    let dead = std::thread::spawn(|| u32::try_from(nix::unistd::gettid().as_raw()).unwrap())
        .join()
        .unwrap();
    let ok = format!("{base}/ok");
    writer
        .ensure_cpuset(&ok, &host_cpus, None, CgroupKind::Threaded)
        .unwrap();
    let err = writer.move_thread(&ok, dead).unwrap_err();
    assert!(err.is_gone(), "{err:?}");
    let err = SchedAffinity.set(dead, &host_cpus).unwrap_err();
    assert!(err.is_gone(), "{err:?}");

    // EINVAL: a child set outside its parent's (needs two CPUs).
    if host_cpus.len() >= 2 {
        let first: CpuSet = host_cpus.first().into_iter().collect();
        let last: CpuSet = host_cpus.iter().last().into_iter().collect();
        let narrow = format!("{base}/narrow");
        let child = format!("{narrow}/child");
        writer
            .ensure_cpuset(&narrow, &first, None, CgroupKind::Domain)
            .unwrap();
        writer
            .ensure_cpuset(&child, &first, None, CgroupKind::Threaded)
            .unwrap();
        let err = writer.set_cpus(&child, &last).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidSet { .. }), "{err:?}");
        // The daemon's path widens the parent first, so the same request
        // succeeds.
        writer.move_thread(&child, tid).unwrap();
        assert!(pin_like_daemon(&writer, &child, 0, tid, &last).unwrap());
        assert_eq!(writer.read_cpus(&child).unwrap(), last);
        assert!(last.is_subset(&writer.read_cpus(&narrow).unwrap()));
    } else {
        skip("real_cgroup_v1 EINVAL case", "two-cpus", "only one CPU");
    }

    // sched_setaffinity for a thread with no cgroup of its own.
    let one: CpuSet = host_cpus.iter().last().into_iter().collect();
    let fix = ThreadFix {
        tid,
        vcpu: Some(0),
        cgroup: None,
        helper: false,
        observed: host_cpus.clone(),
        desired: one.clone(),
        reason: DriftReason::NewThread,
    };
    assert_eq!(
        apply(&fix, Some(&writer), &SchedAffinity).unwrap(),
        Applied::Pinned {
            cgroup_rewritten: false
        }
    );
    assert_eq!(
        sevplace::discovery::read_thread_cpus_allowed(proc_self(), std::process::id(), tid)
            .unwrap(),
        one
    );

    workers.stop();
    drop(guard);
}
