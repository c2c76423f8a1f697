//! Reconcile pass at scale on a fake host: a procfs tree of QEMU-shaped VMs
//! (every fifth one SEV), a sevflush tree with one record per VM, a Genoa
//! 2x96 topology (384 CPUs), every VM placed as a shared (overcommitted) VM
//! so every vCPU thread is compared against a placement on every pass.
//! Affinity writes go to a no-op (the tids are fake).
//!
//! Baselines measured in the same run, on the same tree:
//! - `list /proc`: reading the names of the fixture's root, the least any
//!   scan does;
//! - `floor`: listing the root, each VM's `task/` and reading one affinity
//!   per thread (the `status` file: on a fixture there is no thread for
//!   `sched_getaffinity`), what a pass that catches affinity drift cannot
//!   avoid;
//! - `full rescan`: a scanner that reads everything on every pass
//!   (`full_rescan_every = 1`, what every pass did before incremental
//!   discovery).
//!
//! Each size runs in a child process of its own so that its resident memory
//! is its own. Sizes: `SEVPLACE_BENCH_SIZES="500x16,5000x4"` (default: the
//! idle host, 500x16 and 1250x4, 2500x4, 5000x4). The full-rescan baseline
//! keeps a scanner cache of its own (every VM's identity and threads a
//! second time), which the resident memory then includes;
//! `SEVPLACE_BENCH_NO_BASELINES=1` runs the daemon's passes alone, for the
//! daemon's own resident memory.
//!
//! `cargo bench -p sevplace-agent --bench reconcile`

use std::sync::Arc;
use std::time::{Duration, Instant};

use sevplace::cgroup::CgroupError;
use sevplace::cgroup::ThreadAffinity;
use sevplace::discovery::fake_procfs::{write_process, FakeProcess};
use sevplace::discovery::VmScanner;
use sevplace::kmod::{fake_tree, ModuleReader};
use sevplace::metrics::Metrics;
use sevplace::placement::Reservations;
use sevplace::reconcile::events::EventBus;
use sevplace::reconcile::{AgentCore, HostAccess, PlaceCall};
use sevplace::state::{CheckpointStore, PlacementRequest, VmSelector};
use sevplace::topology::Topology;
use sevplace::{ConfidentialClass, CpuSet, VmId};

struct NoAffinity;
impl ThreadAffinity for NoAffinity {
    fn set(&self, _: u32, _: &CpuSet) -> Result<(), CgroupError> {
        Ok(())
    }
}

/// `VmRSS` and `VmHWM` of this process, KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The median; zero for no sample (baselines skipped).
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const SIZE_VAR: &str = "SEVPLACE_BENCH_ONE_SIZE";

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as
    // a smoke test with a small host.
    let full = std::env::args().any(|a| a == "--bench");
    if let Ok(size) = std::env::var(SIZE_VAR) {
        let (vms, vcpus) = parse_size(&size);
        run(vms, vcpus, if full { 15 } else { 3 });
        return;
    }
    let sizes = if full {
        std::env::var("SEVPLACE_BENCH_SIZES")
            .unwrap_or_else(|_| "0x0,500x16,1250x4,2500x4,5000x4".to_string())
    } else {
        "0x0,20x16".to_string()
    };
    let exe = std::env::current_exe().expect("own path");
    for size in sizes.split(',') {
        let status = std::process::Command::new(&exe)
            .args(std::env::args().skip(1))
            .env(SIZE_VAR, size)
            .status()
            .expect("run one size");
        assert!(status.success(), "size {size}: {status}");
    }
}

fn parse_size(s: &str) -> (u32, u32) {
    let (a, b) = s.split_once('x').expect("size is VMSxVCPUS");
    (a.parse().expect("VMs"), b.parse().expect("vCPUs"))
}

/// The floor of a pass on this tree: the root's names, each VM's `task/`
/// names and one `status` read per thread. Returns the threads read.
fn floor_pass(proc_root: &std::path::Path, vm_pids: &[u32]) -> usize {
    let names = std::fs::read_dir(proc_root).expect("root").count();
    let mut threads = 0;
    for pid in vm_pids {
        let task = proc_root.join(pid.to_string()).join("task");
        for t in std::fs::read_dir(&task).expect("task dir").flatten() {
            let status = std::fs::read(t.path().join("status")).expect("status");
            threads += usize::from(!status.is_empty());
        }
    }
    std::hint::black_box(names);
    threads
}

fn run(vms_n: u32, vcpus: u32, rounds: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    // The checkpoint on tmpfs: placing thousands of VMs one by one writes
    // the growing checkpoint each time; its fsync is not what is measured.
    let state_dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("state dir");
    let proc_root = dir.path().join("proc");
    std::fs::create_dir_all(&proc_root).expect("proc root");
    let module = dir.path().join("sevflush");
    fake_tree::write_globals(&module, "targeted", [0; 5]).expect("sevflush tree");
    let built = Instant::now();
    let mut vm_pids = Vec::new();
    for i in 0..vms_n {
        let pid = 10_000 + i * 100;
        let class = if i % 5 == 0 {
            "sev-guest,id=s,policy=0x1"
        } else {
            "memory-backend-ram,id=m"
        };
        let p = FakeProcess::qemu_vm(pid, vcpus, &["qemu-system-x86_64", "-object", class]);
        write_process(&proc_root, &p).expect("fake VM");
        fake_tree::write_record(&module, u64::from(i) + 1, pid, "0-7", "0-15", 3, 24)
            .expect("sevflush record");
        vm_pids.push(pid);
    }
    let build_time = built.elapsed();
    let metrics = Arc::new(Metrics::new());
    let mut core = AgentCore::new(
        Arc::new(Topology::synthetic(2, 12, 8, 2, 1)),
        Reservations {
            host: CpuSet::new(),
            shared_vcpus_per_cpu: 64,
            ..Reservations::default()
        },
        HostAccess {
            scanner: VmScanner::new(&proc_root),
            cgroups: None,
            module: ModuleReader::new(&module),
            affinity: Arc::new(NoAffinity),
        },
        CheckpointStore::in_dir(state_dir.path().join("state")),
        metrics.clone(),
        Arc::new(EventBus::new(1 << 16)),
    )
    .expect("core");
    let scan = core.scanner().scan().expect("scan");
    core.reconcile(scan);
    let t = Instant::now();
    let mut placed = 0;
    for i in 0..vms_n {
        let call = PlaceCall {
            vm_id: VmId::new(format!("vm-{i}")).expect("id"),
            selector: Some(VmSelector::Process {
                pid: vm_pids[i as usize],
                start_time: None,
            }),
            request: PlacementRequest {
                vcpus,
                class: Some(if i % 5 == 0 {
                    ConfidentialClass::Sev
                } else {
                    ConfidentialClass::None
                }),
                dedicated: false,
                numa_node: None,
            },
            validate_only: false,
        };
        if core.place(call).is_ok() {
            placed += 1;
        }
    }
    let place_all = t.elapsed();

    let scanner = core.scanner();
    let baselines = std::env::var_os("SEVPLACE_BENCH_NO_BASELINES").is_none();
    let full_scanner = baselines.then(|| VmScanner::new(&proc_root).with_full_rescan_every(1));
    let mut lists = Vec::new();
    let mut floors = Vec::new();
    let mut fulls = Vec::new();
    let mut scans = Vec::new();
    let mut acts = Vec::new();
    let mut whole = Vec::new();
    let mut threads = 0;
    // A warm-up pass, then rounds of: list, floor, full rescan, pass;
    // interleaved so that load from other processes hits all alike.
    core.reconcile(scanner.scan().expect("scan"));
    for _ in 0..rounds {
        if let Some(full_scanner) = &full_scanner {
            let t0 = Instant::now();
            std::hint::black_box(std::fs::read_dir(&proc_root).expect("root").count());
            lists.push(t0.elapsed());
            let t0 = Instant::now();
            threads = floor_pass(&proc_root, &vm_pids);
            floors.push(t0.elapsed());
            let t0 = Instant::now();
            std::hint::black_box(full_scanner.scan().expect("full scan").len());
            fulls.push(t0.elapsed());
        }
        // The daemon's pass: its scanner does a full rescan every
        // `full_rescan_every` (10) passes; those are in the samples.
        let t0 = Instant::now();
        let scan = scanner.scan().expect("scan");
        let t1 = Instant::now();
        core.reconcile(scan);
        let t2 = Instant::now();
        scans.push(t1 - t0);
        acts.push(t2 - t1);
        whole.push(t2 - t0);
    }
    let mut sorted = whole.clone();
    sorted.sort();
    let worst = sorted.last().copied().unwrap_or_default();
    let mean = whole.iter().sum::<Duration>() / u32::try_from(whole.len()).unwrap_or(1);
    let mut enc = Vec::new();
    let mut size = 0;
    for _ in 0..10 {
        let t0 = Instant::now();
        size = metrics.encode_prometheus().len();
        enc.push(t0.elapsed());
    }
    let (rss, hwm) = memory_kib();
    let list = median(lists);
    let floor = median(floors);
    let full = median(fulls);
    let scan = median(scans);
    let act = median(acts);
    let pass = median(whole);
    println!(
        "== {vms_n} VMs x {vcpus} vCPUs ({threads} threads read by the floor), {placed} placed; \
         fixture written in {:.1} s; {rounds} rounds, medians",
        build_time.as_secs_f64()
    );
    if vms_n > 0 {
        println!(
            "place all {vms_n}:                    {:.1} ms ({:.0} µs each, checkpoint on tmpfs)",
            ms(place_all),
            place_all.as_secs_f64() * 1e6 / f64::from(vms_n)
        );
    }
    if baselines {
        println!("list /proc (baseline):               {:.3} ms", ms(list));
        println!(
            "floor: list + task dirs + 1 affinity/thread: {:.2} ms",
            ms(floor)
        );
        println!(
            "full rescan every pass (old shape):  {:.2} ms ({:.2}x the floor)",
            ms(full),
            ms(full) / ms(floor).max(1e-9)
        );
    }
    println!("scan (incremental):                  {:.2} ms", ms(scan));
    println!("compare+act+module+metrics:          {:.2} ms", ms(act));
    if baselines {
        println!(
            "whole pass:                          {:.3} ms ({:.2}x the floor, {:.1}x list /proc; mean {:.2} ms, max {:.2} ms incl. full rescans)",
            ms(pass),
            ms(pass) / ms(floor).max(1e-9),
            ms(pass) / ms(list).max(1e-9),
            ms(mean),
            ms(worst)
        );
    } else {
        println!(
            "whole pass:                          {:.3} ms (mean {:.2} ms, max {:.2} ms incl. full rescans)",
            ms(pass),
            ms(mean),
            ms(worst)
        );
    }
    println!(
        "/metrics encode ({size} bytes):       {:.2} ms",
        ms(median(enc))
    );
    println!(
        "resident memory: {rss} KiB (peak {hwm} KiB){}",
        if baselines {
            ", with the full-rescan baseline's own scanner cache"
        } else {
            ", the daemon's passes alone (no baselines)"
        }
    );
}
