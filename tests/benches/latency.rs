//! RPC latency of the real daemon over its Unix socket with 1, 16 and 128
//! concurrent clients (one connection each): GetHost, PlaceVm with
//! validate_only, and acting PlaceVm (checkpoint write + fsync + rename on
//! every call, each followed by a ReleaseVm). Baseline measured in the same
//! run: grpc.health.v1 Check, the transport's floor. Then the daemon's
//! resident memory and CPU use over 60 s idle on the real host.
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
}

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
        "{:<22} {:>8} {:>10} {:>10} {:>12}",
        "rpc", "clients", "p50", "p99", "p50/health"
    );
    for clients in [1u32, 16, 128] {
        let (base50, base99) = measure(&rt, &d.socket, Rpc::Health, clients, total);
        println!(
            "{:<22} {:>8} {:>10.1?} {:>10.1?} {:>12}",
            "health Check (base)", clients, base50, base99, "1.00"
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
                if matches!(rpc, Rpc::Place) {
                    total / 4
                } else {
                    total
                },
            );
            println!(
                "{:<22} {:>8} {:>10.1?} {:>10.1?} {:>12.2}",
                name,
                clients,
                p50,
                p99,
                p50.as_secs_f64() / base50.as_secs_f64()
            );
        }
    }
    drop(d);
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
