//! The agent's CPU time per reconcile pass on this real host with hundreds
//! of real idle KVM VMs (`kvm-guest-fixture`, 2 vCPU threads each, a guest
//! exit per vCPU every second), unmanaged as the issue measured them.
//!
//! A pass is what the daemon's loop runs: `VmScanner::scan` of `/proc`
//! (with the daemon's default of a full rescan every 10 passes) and
//! `AgentCore::reconcile`. Baseline in the same run, interleaved with the
//! passes: the floor of listing `/proc`, each VM's `task/` and one
//! `sched_getaffinity` per thread. CPU time is the calling thread's
//! (`CLOCK_THREAD_CPUTIME_ID`), where both run.
//!
//! `cargo bench -p sevplace-tests --bench kvm_pass` (needs `/dev/kvm`;
//! `SEVPLACE_KVM_VMS` sets the number of VMs, default 300).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sevplace::cgroup::{CgroupError, ThreadAffinity};
use sevplace::discovery::VmScanner;
use sevplace::kmod::{fake_tree, ModuleReader};
use sevplace::metrics::Metrics;
use sevplace::placement::Reservations;
use sevplace::reconcile::events::EventBus;
use sevplace::reconcile::{AgentCore, HostAccess};
use sevplace::state::CheckpointStore;
use sevplace::topology::Topology;
use sevplace::CpuSet;

struct NoAffinity;
impl ThreadAffinity for NoAffinity {
    fn set(&self, _: u32, _: &CpuSet) -> Result<(), CgroupError> {
        Ok(())
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid timespec out-parameter.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Kills the fixtures when the bench ends, however it ends.
struct Fixtures(Vec<Child>);
impl Drop for Fixtures {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// The floor: `/proc` names, each VM's task names, one
/// `sched_getaffinity` per thread. Returns the threads.
fn floor_pass(pids: &[u32]) -> usize {
    let names = std::fs::read_dir("/proc").map(Iterator::count).unwrap_or(0);
    std::hint::black_box(names);
    let mut threads = 0;
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let mut set = nix::sched::CpuSet::new();
            if nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid))
                .map(|s| set = s)
                .is_ok()
            {
                threads += 1;
            }
            std::hint::black_box(&set);
        }
    }
    threads
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if std::fs::File::open("/dev/kvm").is_err() {
        println!("kvm_pass: /dev/kvm cannot be opened here; nothing measured");
        return;
    }
    let vms: usize = if full {
        std::env::var("SEVPLACE_KVM_VMS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300)
    } else {
        4
    };
    let rounds = if full { 30 } else { 3 };
    let mut fixtures = Fixtures(Vec::new());
    for _ in 0..vms {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvm-guest-fixture"))
            .args([
                "--vcpus",
                "2",
                "--seconds",
                "900",
                "--exit-sleep-us",
                "1000000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kvm-guest-fixture");
        let stdout = child.stdout.take().expect("fixture stdout");
        fixtures.0.push(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("fixture ready line");
        assert!(line.starts_with("ready"), "fixture said {line:?}");
    }
    let pids: Vec<u32> = fixtures.0.iter().map(Child::id).collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("sevflush");
    fake_tree::write_globals(&module, "targeted", [0; 5]).expect("sevflush tree");
    let scanner = VmScanner::new("/proc");
    let mut core = AgentCore::new(
        Arc::new(Topology::synthetic(1, 1, 2, 1, 1)),
        Reservations::default(),
        HostAccess {
            scanner: scanner.clone(),
            cgroups: None,
            module: ModuleReader::new(&module),
            affinity: Arc::new(NoAffinity),
        },
        CheckpointStore::in_dir(dir.path().join("state")),
        Arc::new(Metrics::new()),
        Arc::new(EventBus::new(1 << 16)),
    )
    .expect("core");
    // The first (full) pass discovers every VM.
    let found = scanner.scan().expect("scan");
    let found_n = found.len();
    core.reconcile(found);

    let mut floors = Vec::new();
    let mut passes = Vec::new();
    let mut threads = 0;
    for _ in 0..rounds {
        let t0 = thread_cpu();
        threads = floor_pass(&pids);
        floors.push(thread_cpu() - t0);
        let t0 = thread_cpu();
        let scan = scanner.scan().expect("scan");
        core.reconcile(scan);
        passes.push(thread_cpu() - t0);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mean = passes.iter().sum::<Duration>() / u32::try_from(passes.len()).unwrap_or(1);
    let floor = median(floors);
    let pass = median(passes);
    println!(
        "kvm_pass: {vms} real VMs (2 vCPUs each), {found_n} found by the first scan, {threads} VM threads; {rounds} rounds, medians of thread CPU time"
    );
    println!(
        "floor (list /proc + tasks + sched_getaffinity per thread): {:.2} ms",
        floor.as_secs_f64() * 1e3
    );
    println!(
        "agent pass (scan + reconcile):                           {:.2} ms ({:.2}x the floor; mean {:.2} ms incl. full rescans)",
        pass.as_secs_f64() * 1e3,
        pass.as_secs_f64() / floor.as_secs_f64().max(1e-9),
        mean.as_secs_f64() * 1e3
    );
}
