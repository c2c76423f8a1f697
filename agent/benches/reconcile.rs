//! Reconcile pass at scale: a fake host (procfs tree) with 500 VMs x 16
//! vCPUs, every one placed as a shared (overcommitted) VM on a Genoa 2x96
//! topology, plus a sevflush tree with one record per VM. Measures the scan,
//! the compare-and-act pass and the whole pass, `/metrics` encoding with
//! 500 VMs, and the process's resident memory. Affinity writes go to a
//! no-op (the tids are fake). Baseline in the same run: the scan alone.
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as
    // a smoke test with a small host.
    let full = std::env::args().any(|a| a == "--bench");
    let vms_n: u32 = if full { 500 } else { 20 };
    run(vms_n, 16);
}

fn run(vms_n: u32, vcpus: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let proc_root = dir.path().join("proc");
    let module = dir.path().join("sevflush");
    fake_tree::write_globals(&module, "targeted", [0; 5]).expect("sevflush tree");
    for i in 0..vms_n {
        let pid = 10_000 + i * 100;
        let class = if i % 5 == 0 {
            "sev-guest,id=s,policy=0x1"
        } else {
            "memory-backend-ram,id=m"
        };
        let p = FakeProcess::qemu_vm(pid, vcpus, &["qemu-system-x86_64", "-object", class]);
        write_process(&proc_root, &p).unwrap();
        fake_tree::write_record(&module, u64::from(i) + 1, pid, "0-7", "0-15", 3, 24)
            .expect("sevflush record");
    }
    let metrics = Arc::new(Metrics::new());
    let mut core = AgentCore::new(
        Arc::new(Topology::synthetic(2, 12, 8, 2, 1)),
        Reservations {
            host: CpuSet::new(),
            shared_vcpus_per_cpu: 32,
            ..Reservations::default()
        },
        HostAccess {
            scanner: VmScanner::new(&proc_root),
            cgroups: None,
            module: ModuleReader::new(&module),
            affinity: Arc::new(NoAffinity),
        },
        CheckpointStore::in_dir(dir.path().join("state")),
        metrics.clone(),
        Arc::new(EventBus::new(1 << 16)),
    )
    .expect("core");
    let scan = core.scanner().scan().expect("scan");
    core.reconcile(scan);
    let t = Instant::now();
    let mut placed = 0;
    for i in 0..vms_n {
        let pid = 10_000 + i * 100;
        let call = PlaceCall {
            vm_id: VmId::new(format!("vm-{i}")).unwrap(),
            selector: Some(VmSelector::Process {
                pid,
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
    let mut scans = Vec::new();
    let mut passes = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        let scan = scanner.scan().expect("scan");
        let t1 = Instant::now();
        core.reconcile(scan);
        let t2 = Instant::now();
        scans.push(t1 - t0);
        passes.push(t2 - t1);
        whole.push(t2 - t0);
    }
    let mut enc = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let t0 = Instant::now();
        size = metrics.encode_prometheus().len();
        enc.push(t0.elapsed());
    }
    let scan_ms = median(scans).as_secs_f64() * 1e3;
    let pass_ms = median(passes).as_secs_f64() * 1e3;
    let whole_ms = median(whole).as_secs_f64() * 1e3;
    println!("reconcile bench: {vms_n} VMs x {vcpus} vCPUs, {placed} placed (shared, 32 vCPUs/CPU) on 384 CPUs");
    println!(
        "place all {vms_n}:             {:.1} ms ({:.0} µs each, checkpoint write included)",
        place_all.as_secs_f64() * 1e3,
        place_all.as_secs_f64() * 1e6 / f64::from(vms_n)
    );
    println!("scan only (baseline):        {scan_ms:.1} ms");
    println!("compare+act+module+metrics:  {pass_ms:.1} ms");
    println!(
        "whole pass:                  {whole_ms:.1} ms ({:.2}x the scan)",
        whole_ms / scan_ms
    );
    println!(
        "/metrics encode ({size} bytes): {:.2} ms",
        median(enc).as_secs_f64() * 1e3
    );
    println!("resident memory:             {} KiB", rss_kib());
}
