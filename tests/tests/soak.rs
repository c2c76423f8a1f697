//! Soak: the real daemon on the real host under mixed RPC load and VM
//! churn (`kvm-guest-fixture` processes started, placed, released or
//! killed), loopback only, for `SEVPLACE_SOAK_SECS` seconds (60 in the
//! test suite; the long run is `SEVPLACE_SOAK_SECS=600 cargo test -p
//! sevplace-tests --test soak -- --nocapture`). The daemon's resident
//! memory and open file descriptors are sampled every second.
//!
//! Stated bounds, after a warm-up of a sixth of the run (at least 10 s):
//! RSS grows by at most 16 MiB over its value at the end of the warm-up,
//! open fds by at most 16 (each live VM holds a pidfd; at most
//! `MAX_LIVE_VMS` live at once). When the churn stops, every placement is
//! released, the checkpoint holds no intent, and the fd count is back
//! within 4 of the baseline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sevplace_proto::v1 as pb;
use sevplace_tests::{wait_until, Daemon, GuestVm};

const MAX_LIVE_VMS: usize = 3;
const RSS_BOUND_KIB: u64 = 16 * 1024;
const FD_BOUND: usize = 16;
const LOAD_TASKS: usize = 6;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn sample(pid: i32, at: Duration) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    Sample {
        at,
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    }
}

/// Answers the load accepts: OK, or a refusal that is the right answer
/// under churn (an id that just went away, a host that is full).
fn expected(r: Result<(), tonic::Status>, codes: &Mutex<BTreeMap<String, u64>>) {
    let code = match r {
        Ok(()) => tonic::Code::Ok,
        Err(s) => {
            assert!(
                matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::ResourceExhausted
                ),
                "unexpected answer under load: {s:?}"
            );
            s.code()
        }
    };
    *codes
        .lock()
        .unwrap()
        .entry(format!("{code:?}"))
        .or_default() += 1;
}

/// Mixed calls until `stop`: GetHost, ListVms, GetVm of a churned id,
/// PlaceVm validate_only; plus one WatchEvents stream read throughout.
fn load(
    socket: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    codes: Arc<Mutex<BTreeMap<String, u64>>>,
    events: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = sevplace_tests::runtime();
        rt.block_on(async {
            let client = sevplace::client::connect(&socket).await.unwrap();
            let mut watch = client.clone();
            let (stop_w, events_w) = (stop.clone(), events.clone());
            let watcher = tokio::spawn(async move {
                let mut s = watch
                    .watch_events(pb::WatchEventsRequest::default())
                    .await
                    .expect("WatchEvents")
                    .into_inner();
                while !stop_w.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), s.message()).await {
                        Ok(Ok(Some(_))) => {
                            events_w.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(None)) => panic!("WatchEvents ended"),
                        Ok(Err(e)) => panic!("WatchEvents failed: {e:?}"),
                        Err(_) => {}
                    }
                }
            });
            let tasks: Vec<_> = (0..LOAD_TASKS)
                .map(|t| {
                    let mut c = client.clone();
                    let (stop, codes) = (stop.clone(), codes.clone());
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let r = match (n + t as u64) % 4 {
                                0 => c.get_host(pb::GetHostRequest {}).await.map(|_| ()),
                                1 => c.list_vms(pb::ListVmsRequest::default()).await.map(|_| ()),
                                2 => c
                                    .get_vm(pb::GetVmRequest {
                                        vm_id: format!("soak-{}", n % 16),
                                    })
                                    .await
                                    .map(|_| ()),
                                _ => c
                                    .place_vm(pb::PlaceVmRequest {
                                        vm_id: format!("probe-{t}"),
                                        vcpus: 1,
                                        confidential_class: pb::ConfidentialClass::None as i32,
                                        shared: true,
                                        validate_only: true,
                                        ..Default::default()
                                    })
                                    .await
                                    .map(|_| ()),
                            };
                            expected(r, &codes);
                            n += 1;
                            // A steady load, not a flood: the flood is load.rs.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            watcher.await.unwrap();
        });
    })
}

struct Churned {
    vm: GuestVm,
    id: String,
    dies_at: Instant,
    release_first: bool,
}

#[test]
fn soak_mixed_load_and_vm_churn() {
    let secs: u64 = std::env::var("SEVPLACE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    // Probe KVM once; without it the soak has no VMs to churn.
    let Some(probe) = GuestVm::start("soak_mixed_load_and_vm_churn", &["--vcpus", "1"]) else {
        return;
    };
    drop(probe);
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[],
        &[("SEVPLACE__RECONCILE__PERIOD_MS", "250")],
    );
    let run = Duration::from_secs(secs);
    let warmup = (run / 6).max(Duration::from_secs(10));
    let stop = Arc::new(AtomicBool::new(false));
    let codes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let events = Arc::new(AtomicU64::new(0));
    let loader = load(
        d.socket.clone(),
        stop.clone(),
        codes.clone(),
        events.clone(),
    );

    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let start = Instant::now();
    let mut samples = vec![sample(d.pid(), Duration::ZERO)];
    let mut next_sample = start + Duration::from_secs(1);
    let mut live: Vec<Churned> = Vec::new();
    let (mut started, mut placed, mut refused, mut released_by_call) = (0u64, 0u64, 0u64, 0u64);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while start.elapsed() < run {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Retire the VMs whose time is up.
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = live.drain(..).partition(|v| v.dies_at <= now);
        live = keep;
        for v in due {
            if v.release_first {
                let r = rt.block_on(c.release_vm(pb::ReleaseVmRequest {
                    vm_id: v.id.clone(),
                }));
                if r.is_ok() {
                    released_by_call += 1;
                }
            }
            drop(v.vm);
        }
        if live.len() < MAX_LIVE_VMS {
            let n = started;
            started += 1;
            let name = format!("guest=soak-{n},debug-threads=on");
            let mut args = vec!["--vcpus", "1", "-name", name.as_str()];
            let confidential = n % 4 == 0;
            if confidential {
                args.extend([
                    "-object",
                    "sev-guest,id=sev0,policy=0x1",
                    "-machine",
                    "q35,confidential-guest-support=sev0",
                ]);
            }
            let vm = GuestVm::start("soak", &args).expect("KVM worked a moment ago");
            let id = format!("soak-{}", n % 16);
            let r = rt.block_on(c.place_vm(pb::PlaceVmRequest {
                vm_id: id.clone(),
                vcpus: 1,
                shared: !confidential,
                selector: Some(pb::VmSelector {
                    selector: Some(pb::vm_selector::Selector::Pid(vm.pid)),
                }),
                ..Default::default()
            }));
            match r {
                Ok(_) => placed += 1,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::AlreadyExists
                    ) =>
                {
                    refused += 1
                }
                Err(s) => panic!("PlaceVm of a live VM: {s:?}"),
            }
            live.push(Churned {
                vm,
                id,
                dies_at: Instant::now() + Duration::from_millis(800 + x % 2200),
                release_first: x % 3 == 0,
            });
        }
        if Instant::now() >= next_sample {
            samples.push(sample(d.pid(), start.elapsed()));
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().expect("load thread");
    live.clear();

    // Every placement is released once the VMs are gone.
    let all_released = wait_until(Duration::from_secs(15), || {
        rt.block_on(c.list_vms(pb::ListVmsRequest::default()))
            .map(|r| {
                r.into_inner()
                    .vms
                    .iter()
                    .all(|v| !v.vm_id.starts_with("soak-"))
            })
            .unwrap_or(false)
    });
    // The snapshot with the journal applied, as the daemon loads it.
    let checkpoint = sevplace::state::CheckpointStore::in_dir(d.dir.path().join("state"))
        .load()
        .expect("checkpoint");
    drop(c);
    std::thread::sleep(Duration::from_secs(2));
    let end = sample(d.pid(), start.elapsed());

    let base = samples
        .iter()
        .rev()
        .find(|s| s.at <= warmup)
        .copied()
        .unwrap_or(samples[0]);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at > warmup).collect();
    let max_rss = after
        .iter()
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(base.rss_kib);
    let max_fds = after.iter().map(|s| s.fds).max().unwrap_or(base.fds);
    let max_threads = after
        .iter()
        .map(|s| s.threads)
        .max()
        .unwrap_or(base.threads);
    let calls: u64 = codes.lock().unwrap().values().sum();
    eprintln!(
        "soak {secs} s: {started} VMs started, {placed} placed, {refused} refused (host full), \
         {released_by_call} released by call, the rest by exit; {calls} calls {:?}, \
         {} events watched",
        codes.lock().unwrap(),
        events.load(Ordering::Relaxed)
    );
    eprintln!(
        "daemon after warm-up ({warmup:?}): RSS {} -> max {} KiB (bound +{RSS_BOUND_KIB}), \
         fds {} -> max {} (bound +{FD_BOUND}), threads {} -> max {}; after the churn: \
         RSS {} KiB, fds {}",
        base.rss_kib, max_rss, base.fds, max_fds, base.threads, max_threads, end.rss_kib, end.fds
    );
    assert!(all_released, "placements left after every VM exited");
    let intents: Vec<String> = checkpoint
        .intents
        .iter()
        .map(|i| i.vm_id.to_string())
        .collect();
    assert!(
        intents.is_empty(),
        "checkpoint still holds intents: {intents:?}"
    );
    assert!(placed > 0, "no VM was placed");
    assert!(
        max_rss <= base.rss_kib + RSS_BOUND_KIB,
        "RSS grew from {} to {max_rss} KiB",
        base.rss_kib
    );
    assert!(
        max_fds <= base.fds + FD_BOUND,
        "fds grew from {} to {max_fds}",
        base.fds
    );
    assert!(
        end.fds <= base.fds + 4,
        "fds after the churn: {} (baseline {})",
        end.fds,
        base.fds
    );
}
