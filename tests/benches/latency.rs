//! RPC latency of the real daemon over its Unix socket with 1, 16, 64 and
//! 128 concurrent clients (one connection each): GetHost, PlaceVm with
//! validate_only, and acting PlaceVm (each answered once a checkpoint write
//! covering it is durable, group-committed with the calls decided while the
//! previous write was in flight; each followed by a ReleaseVm). Baseline
//! measured in the same run: grpc.health.v1 Check, the transport's floor.
//! Then checkpoint writes with 1, 500 and 5,000 intents on the file system
//! of the daemon's state: the fsync floor (the baseline of acting PlaceVm
//! at 1 client), a whole snapshot, and a decision's write (a journal
//! append). Then the daemon's
//! resident memory and CPU use over 60 s idle on the real host, and the
//! time of a `/metrics` scrape over HTTP with 500 VMs (baseline: the same
//! daemon with no VM, in the same run).
//!
//! `cargo bench -p sevplace-tests --bench latency`; `cargo test` runs it
//! as a short smoke test.

use std::time::{Duration, Instant};

use sevplace_proto::v1 as pb;
use sevplace_tests::Daemon;

#[derive(Clone, Copy, Debug)]
enum Rpc {
    Health,
    GetHost,
    Validate,
    Place,
    /// ReleaseVm of one of `held` placed VMs, then its PlaceVm again (the
    /// PlaceVm timed): the checkpoint keeps its size, the host its room.
    Replace {
        held: u32,
        clients: u32,
    },
}

// (len - 1) * p with p in 0..=1, rounded, is a whole index in 0..len: the
// cast neither truncates nor drops a sign.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn one_client(socket: std::path::PathBuf, rpc: Rpc, n: u32, client: u32) -> Vec<Duration> {
    let ch = sevplace::client::channel(&socket).await.expect("channel");
    let mut c = pb::sevplace_service_client::SevplaceServiceClient::new(ch.clone());
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        match rpc {
            Rpc::Health => {
                h.check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .expect("health");
            }
            Rpc::GetHost => {
                c.get_host(pb::GetHostRequest {}).await.expect("GetHost");
            }
            Rpc::Replace { held, clients } => {
                // Client c owns the ids c, c + clients, ...: no two clients
                // release the same VM.
                let slots = (held / clients).max(1);
                let id = format!("held-{}", client + clients * (i % slots));
                c.release_vm(pb::ReleaseVmRequest { vm_id: id.clone() })
                    .await
                    .expect("ReleaseVm of a held VM");
                let t = Instant::now();
                c.place_vm(held_request(id))
                    .await
                    .expect("PlaceVm of a held VM");
                out.push(t.elapsed());
                continue;
            }
            Rpc::Validate | Rpc::Place => {
                let id = format!("lat-{client}-{i}");
                c.place_vm(pb::PlaceVmRequest {
                    vm_id: id.clone(),
                    vcpus: 2,
                    confidential_class: pb::ConfidentialClass::Sev as i32,
                    shared: true,
                    validate_only: matches!(rpc, Rpc::Validate),
                    ..Default::default()
                })
                .await
                .expect("PlaceVm");
                out.push(t.elapsed());
                if matches!(rpc, Rpc::Place) {
                    c.release_vm(pb::ReleaseVmRequest { vm_id: id })
                        .await
                        .expect("ReleaseVm");
                }
                continue;
            }
        }
        out.push(t.elapsed());
    }
    out
}

fn measure(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    rpc: Rpc,
    clients: u32,
    total: u32,
) -> (Duration, Duration) {
    let per = (total / clients).max(1);
    let mut all: Vec<Duration> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for c in 0..clients {
            set.spawn(one_client(socket.to_path_buf(), rpc, per, c));
        }
        let mut v = Vec::new();
        while let Some(r) = set.join_next().await {
            v.extend(r.expect("client task"));
        }
        v
    });
    all.sort();
    (pct(&all, 0.5), pct(&all, 0.99))
}

/// A held VM: plain, 1 vCPU, shared.
fn held_request(vm_id: String) -> pb::PlaceVmRequest {
    pb::PlaceVmRequest {
        vm_id,
        vcpus: 1,
        confidential_class: pb::ConfidentialClass::None as i32,
        shared: true,
        ..Default::default()
    }
}

/// Places `count` held VMs, which stay placed.
fn hold(rt: &tokio::runtime::Runtime, socket: &std::path::Path, count: u32) {
    rt.block_on(async {
        let ch = sevplace::client::channel(socket).await.expect("channel");
        let mut c = pb::sevplace_service_client::SevplaceServiceClient::new(ch);
        for i in 0..count {
            c.place_vm(held_request(format!("held-{i}")))
                .await
                .expect("PlaceVm of a held VM");
        }
    });
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15; after "pid (comm)" they are 11th and 12th.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total = if full { 4096 } else { 64 };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/genoa-2x96-nps1");
    let d = Daemon::start(&["--host-root", root.to_str().expect("path")]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("latency over the Unix socket, {total} calls per row, genoa-2x96-nps1 host root");
    println!(
        "{:<22} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "rpc", "clients", "p50", "p99", "p50/health", "p99/health"
    );
    let mut acting = Vec::new();
    for clients in [1u32, 16, 64, 128] {
        let (base50, base99) = measure(&rt, &d.socket, Rpc::Health, clients, total);
        println!(
            "{:<22} {:>8} {:>10.1?} {:>10.1?} {:>12} {:>12}",
            "health Check (base)", clients, base50, base99, "1.00", "1.00"
        );
        for (name, rpc) in [
            ("GetHost", Rpc::GetHost),
            ("PlaceVm validate_only", Rpc::Validate),
            ("PlaceVm (acting)", Rpc::Place),
        ] {
            let (p50, p99) = measure(
                &rt,
                &d.socket,
                rpc,
                clients,
                if matches!(rpc, Rpc::Place | Rpc::Replace { .. }) {
                    total / 4
                } else {
                    total
                },
            );
            println!(
                "{:<22} {:>8} {:>10.1?} {:>10.1?} {:>12.2} {:>12.2}",
                name,
                clients,
                p50,
                p99,
                p50.as_secs_f64() / base50.as_secs_f64(),
                p99.as_secs_f64() / base99.as_secs_f64()
            );
            if matches!(rpc, Rpc::Place) {
                acting.push((clients, p50, p99, base99));
            }
        }
    }
    // Acting calls while the checkpoint holds many intents: 360 plain
    // 1-vCPU VMs placed through the API (the host root has 384 CPUs and
    // shares none, so 360 leave room for the others), each call replacing
    // one of them. A write costs what it changes, so these rows match the
    // ones above.
    // At least one held VM per client (each client replaces its own).
    let held = if full { 360 } else { 64 };
    hold(&rt, &d.socket, held);
    for clients in [1u32, 64] {
        let (base50, base99) = measure(&rt, &d.socket, Rpc::Health, clients, total);
        let (p50, p99) = measure(
            &rt,
            &d.socket,
            Rpc::Replace { held, clients },
            clients,
            total / 4,
        );
        println!(
            "{:<22} {:>8} {:>10.1?} {:>10.1?} {:>12.2} {:>12.2}",
            format!("PlaceVm, {held} held"),
            clients,
            p50,
            p99,
            p50.as_secs_f64() / base50.as_secs_f64(),
            p99.as_secs_f64() / base99.as_secs_f64()
        );
    }
    let fsync50 = checkpoint_writes(if full { 200 } else { 5 });
    if let (Some(one), Some(many)) = (
        acting.iter().find(|a| a.0 == 1),
        acting.iter().find(|a| a.0 == 64),
    ) {
        println!(
            "acting PlaceVm p99 at 64 clients / health p99 at 64 clients: {:.2} (goal <= 5)",
            many.2.as_secs_f64() / many.3.as_secs_f64()
        );
        println!(
            "acting PlaceVm p50 at 1 client / one checkpoint fsync: {:.2} (goal <= 1.5)",
            one.1.as_secs_f64() / fsync50.as_secs_f64()
        );
    }
    drop(d);
    scrape(if full { 500 } else { 20 }, if full { 400 } else { 20 });
    // Idle: the real host, default settings, 60 s.
    let d = Daemon::start(&[]);
    let secs = if full { 60 } else { 2 };
    std::thread::sleep(Duration::from_secs(1));
    let (t0, c0) = (Instant::now(), cpu_ticks(d.pid()));
    std::thread::sleep(Duration::from_secs(secs));
    let ticks = cpu_ticks(d.pid()) - c0;
    let hz = 100.0;
    let cpu = ticks as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    println!(
        "idle on the real host for {secs} s: CPU {cpu:.2}% of one core, RSS {} KiB",
        rss_kib(d.pid())
    );
}

/// A checkpoint of `count` shared 2-vCPU VMs (every fifth SEV) placed by
/// the engine on the Genoa topology, as the daemon would store them.
fn checkpoint_of(count: usize) -> sevplace::state::Checkpoint {
    use sevplace::placement::{PlacementRequest, PlacementState, Reservations};
    use sevplace::state::{self, IntentRecord, PlacementRecord, VmSelector};
    let genoa = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/genoa-2x96-nps1/sys");
    let topo = sevplace::topology::Topology::from_sysfs(&genoa).expect("Genoa topology");
    let res = Reservations::default();
    let mut engine = PlacementState::new();
    let mut intents = Vec::with_capacity(count);
    for i in 0..count {
        let vm_id = sevplace::VmId::new(format!("vm-{i:05}")).expect("vm id");
        let class = if i % 5 == 0 {
            sevplace::ConfidentialClass::Sev
        } else {
            sevplace::ConfidentialClass::None
        };
        let request = PlacementRequest {
            vm_id: vm_id.clone(),
            vcpus: 2,
            class,
            dedicated: false,
            numa_preference: None,
        };
        // The host holds fewer VMs than the largest checkpoint measured:
        // when it is full the engine starts over, so every record still
        // has the shape of a real placement.
        let p = match engine.place(&topo, &res, &request) {
            Ok(p) => p,
            Err(_) => {
                engine = PlacementState::new();
                engine
                    .place(&topo, &res, &request)
                    .expect("room on an empty host")
            }
        };
        intents.push(std::sync::Arc::new(IntentRecord {
            selector: VmSelector::LibvirtDomain {
                name: vm_id.to_string(),
            },
            vm_id,
            request: state::PlacementRequest {
                vcpus: 2,
                class: Some(class),
                dedicated: false,
                numa_node: None,
            },
            placement: Some(PlacementRecord::of_placement(&topo, &p, None)),
        }));
    }
    state::Checkpoint {
        generation: 1,
        intents,
    }
}

/// Checkpoint writes with 1, 500 and 5,000 intents in a directory on the
/// file system of the daemon's state (the system temporary directory):
///
/// - the floor: one small append and `fdatasync` to a file there;
/// - a snapshot: encode, write, fsync, rename, fsync of the directory,
///   which every write was before the journal;
/// - a decision: the copy of the checkpoint a decision makes under the
///   core's lock, one intent changed, and `CheckpointWriter::write` (a
///   journal append, a snapshot when the journal would outgrow it).
///
/// Returns the floor's p50: one checkpoint fsync.
fn checkpoint_writes(n: u32) -> Duration {
    use sevplace::state::{CheckpointStore, CheckpointWriter, VmSelector, Written};
    use std::io::Write;
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut floor = Vec::new();
    let mut f = std::fs::File::create(dir.path().join("floor")).expect("floor file");
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&[b'x'; 512]).expect("append");
        f.sync_data().expect("fdatasync");
        floor.push(t.elapsed());
    }
    floor.sort();
    let floor50 = pct(&floor, 0.5);
    println!(
        "checkpoint writes, {n} per row; floor (512-byte append + fdatasync) p50 {floor50:.1?} p99 {:.1?}",
        pct(&floor, 0.99)
    );
    println!(
        "{:<8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "intents",
        "bytes",
        "snap p50",
        "snap p99",
        "copy p50",
        "write p50",
        "write p99",
        "record",
        "every",
        "amortized"
    );
    for count in [1usize, 500, 5000] {
        let checkpoint = checkpoint_of(count);
        let bytes = sevplace::state::encode(&checkpoint).expect("encode").len();
        let store = CheckpointStore::in_dir(dir.path().join(format!("c{count}")));
        let mut snaps = Vec::new();
        for _ in 0..n.min(50) {
            let t = Instant::now();
            store.save(&checkpoint).expect("save");
            snaps.push(t.elapsed());
        }
        snaps.sort();
        let mut writer = CheckpointWriter::new(store.clone());
        let mut durable = Arc::new(checkpoint);
        writer.write(&durable, &durable).expect("first write");
        let (mut copies, mut writes) = (Vec::new(), Vec::new());
        let mut record = 0;
        for k in 0..n as usize {
            let t = Instant::now();
            let mut next = sevplace::state::Checkpoint::clone(&durable);
            copies.push(t.elapsed());
            next.generation += 1;
            let i = k % next.intents.len();
            Arc::make_mut(&mut next.intents[i]).selector = VmSelector::LibvirtDomain {
                name: format!("renamed-{k}"),
            };
            let t = Instant::now();
            if let Written::Journal(b) = writer.write(&durable, &next).expect("write") {
                record = b;
            }
            writes.push(t.elapsed());
            durable = Arc::new(next);
        }
        assert_eq!(
            store.load().expect("load"),
            *durable,
            "what was written reads back"
        );
        for v in [&mut copies, &mut writes] {
            v.sort();
        }
        // A snapshot every `every` records; its cost spread over them.
        let budget = (bytes as u64).max(sevplace::state::JOURNAL_MIN_BYTES);
        let every = budget / record.max(1);
        let amortized =
            pct(&writes, 0.5) + pct(&snaps, 0.5) / u32::try_from(every.max(1)).unwrap_or(u32::MAX);
        println!(
            "{:<8} {:>9} {:>10.1?} {:>10.1?} {:>10.1?} {:>10.1?} {:>10.1?} {:>10} {:>10} {:>11.1?}",
            count,
            bytes,
            pct(&snaps, 0.5),
            pct(&snaps, 0.99),
            pct(&copies, 0.5),
            pct(&writes, 0.5),
            pct(&writes, 0.99),
            record,
            every,
            amortized,
        );
    }
    floor50
}

/// `n` scrapes of `/metrics` over HTTP/1.0 (a new connection each, as
/// Prometheus does per scrape interval): p50, p99 and the body size.
fn scrapes(addr: &str, n: u32) -> (Duration, Duration, usize) {
    let mut times = Vec::with_capacity(n as usize);
    let mut size = 0;
    for _ in 0..n {
        let t = Instant::now();
        let body = sevplace_tests::http_get(addr, "/metrics", None);
        times.push(t.elapsed());
        assert!(body.starts_with("HTTP/1."), "{body}");
        size = body.len();
    }
    times.sort();
    (pct(&times, 0.5), pct(&times, 0.99), size)
}

/// The daemon on a copy of the Genoa host root: first with an empty
/// procfs (baseline), then with `vms` QEMU-shaped VMs of 16 vCPUs, each
/// with a sevflush record, so every per-VM series is exported. The VMs are
/// discovered, not placed: their thread ids are fake and must never reach
/// sched_setaffinity.
fn scrape(vms: u32, n: u32) {
    use sevplace::discovery::fake_procfs::{write_process, FakeProcess};
    use sevplace::kmod::fake_tree;
    let root = tempfile::tempdir().expect("tempdir");
    let genoa = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/genoa-2x96-nps1");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", genoa.display()))
        .arg(root.path())
        .status()
        .expect("cp")
        .success();
    assert!(ok, "copy of the host root");
    let proc_root = root.path().join("proc");
    let module = root.path().join("sys/kernel/sevflush");
    std::fs::create_dir_all(&proc_root).expect("proc");
    fake_tree::write_globals(&module, "targeted", [0; 5]).expect("sevflush tree");
    let d = Daemon::start_in(
        tempfile::tempdir().expect("tempdir"),
        &["--host-root", root.path().to_str().expect("path")],
        &[("SEVPLACE__RECONCILE__PERIOD_MS", "500")],
    );
    let (b50, b99, bsize) = scrapes(&d.metrics_addr, n);
    for i in 0..vms {
        let pid = 10_000 + i * 100;
        let class = if i % 5 == 0 {
            "sev-guest,id=s,policy=0x1"
        } else {
            "memory-backend-ram,id=m"
        };
        let p = FakeProcess::qemu_vm(pid, 16, &["qemu-system-x86_64", "-object", class]);
        write_process(&proc_root, &p).expect("fake VM");
        fake_tree::write_record(&module, u64::from(i) + 1, pid, "0-7", "0-15", 3, 24)
            .expect("sevflush record");
    }
    let needle = format!("sevplace_vm_vcpus{{vm=\"pid-{}\"", 10_000 + (vms - 1) * 100);
    let seen = sevplace_tests::wait_until(Duration::from_secs(120), || {
        sevplace_tests::http_get(&d.metrics_addr, "/metrics", None).contains(&needle)
    });
    assert!(seen, "the daemon did not export {vms} VMs");
    let (p50, p99, size) = scrapes(&d.metrics_addr, n);
    println!("/metrics over HTTP, {n} scrapes per row, new connection each");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>12}",
        "host", "bytes", "p50", "p99", "p50/base"
    );
    println!(
        "{:<22} {:>10} {:>10.1?} {:>10.1?} {:>12}",
        "no VM (base)", bsize, b50, b99, "1.00"
    );
    println!(
        "{:<22} {:>10} {:>10.1?} {:>10.1?} {:>12.2}",
        format!("{vms} VMs x 16 vCPUs"),
        size,
        p50,
        p99,
        p50.as_secs_f64() / b50.as_secs_f64()
    );
}
