//! A flood of API calls does not starve the reconcile loop: the loop runs
//! on a thread and runtime of its own and takes the core lock ahead of
//! queued calls. While 64 concurrent clients call GetHost, ListVms and
//! PlaceVm(validate_only) as fast as the daemon answers, passes keep their
//! period and a vCPU moved by hand is put back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sevplace_proto::v1 as pb;
use sevplace_tests::{cpus_allowed, http_get, sample_in, wait_until, Daemon, GuestVm};

const PERIOD_MS: u64 = 200;
const CLIENT_THREADS: usize = 4;
const CALLS_PER_THREAD: usize = 16;
const FLOOD: Duration = Duration::from_secs(6);

/// Starts the flood; returns the stop flag, the call counter and the
/// threads.
fn flood(
    socket: &std::path::Path,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let threads = (0..CLIENT_THREADS)
        .map(|t| {
            let (socket, stop, calls) = (socket.to_path_buf(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let rt = sevplace_tests::runtime();
                rt.block_on(async {
                    let client = sevplace::client::connect(&socket).await.unwrap();
                    let tasks: Vec<_> = (0..CALLS_PER_THREAD)
                        .map(|i| {
                            let mut c = client.clone();
                            let (stop, calls) = (stop.clone(), calls.clone());
                            tokio::spawn(async move {
                                let mut n = 0u32;
                                while !stop.load(Ordering::Relaxed) {
                                    // An answer that the host is full is an
                                    // answer; only a failed call is not.
                                    let answered = |r: Result<(), tonic::Status>| match r {
                                        Ok(()) => true,
                                        Err(s) => s.code() == tonic::Code::ResourceExhausted,
                                    };
                                    let ok = match n % 3 {
                                        0 => c.get_host(pb::GetHostRequest {}).await.is_ok(),
                                        1 => {
                                            c.list_vms(pb::ListVmsRequest::default()).await.is_ok()
                                        }
                                        _ => answered(
                                            c.place_vm(pb::PlaceVmRequest {
                                                vm_id: format!("flood-{t}-{i}"),
                                                vcpus: 1,
                                                confidential_class: pb::ConfidentialClass::Sev
                                                    as i32,
                                                validate_only: true,
                                                ..Default::default()
                                            })
                                            .await
                                            .map(|_| ()),
                                        ),
                                    };
                                    assert!(ok, "a flood call failed");
                                    calls.fetch_add(1, Ordering::Relaxed);
                                    n += 1;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
            })
        })
        .collect();
    (stop, calls, threads)
}

#[test]
fn reconcile_keeps_its_period_under_a_request_flood() {
    let Some(vm) = GuestVm::start(
        "reconcile_keeps_its_period_under_a_request_flood",
        &[
            "--vcpus",
            "2",
            "-name",
            "guest=flood,debug-threads=on",
            "-object",
            "sev-guest,id=sev0,policy=0x5",
            "-machine",
            "q35,confidential-guest-support=sev0",
        ],
    ) else {
        return;
    };
    let d = Daemon::start_in(
        tempfile::tempdir().unwrap(),
        &[],
        &[("SEVPLACE__RECONCILE__PERIOD_MS", &PERIOD_MS.to_string())],
    );
    let pid = vm.pid.to_string();
    assert!(wait_until(Duration::from_secs(10), || {
        d.ctl(&["vms"])
            .stdout
            .windows(pid.len())
            .any(|w| w == pid.as_bytes())
    }));
    let placed = d.ctl(&["--json", "place", "vm-flood", "--pid", &pid, "--vcpus", "2"]);
    assert!(
        placed.status.success(),
        "{}",
        String::from_utf8_lossy(&placed.stderr)
    );
    let tid0 = vm.vcpu_tid(0);
    let pinned = cpus_allowed(vm.pid, tid0);
    let online = sevplace::topology::Topology::from_sysfs(std::path::Path::new("/sys"))
        .unwrap()
        .online;

    let (stop, calls, threads) = flood(&d.socket);
    // Let the flood reach full strength.
    std::thread::sleep(Duration::from_secs(1));
    let sample = |body: &str, series: &str| {
        sample_in(body, series).unwrap_or_else(|| panic!("no sample {series} in /metrics"))
    };
    let before = http_get(&d.metrics_addr, "/metrics", None);
    let passes_before = sample(&before, "sevplace_reconcile_duration_seconds_count");
    let calls_before = calls.load(Ordering::Relaxed);
    let start = Instant::now();

    // Drift during the flood: vCPU 0 moved to every CPU by hand.
    let corrected_in = if pinned != online {
        let out = std::process::Command::new("taskset")
            .args(["-p", "-c", &online.to_string(), &tid0.to_string()])
            .output()
            .expect("taskset");
        assert!(out.status.success());
        let moved = Instant::now();
        assert!(
            wait_until(FLOOD, || cpus_allowed(vm.pid, tid0) == pinned),
            "vCPU 0 not put back to {pinned} during the flood"
        );
        Some(moved.elapsed())
    } else {
        eprintln!("note: the placement covers every online CPU; no drift to correct");
        None
    };
    std::thread::sleep(FLOOD.saturating_sub(start.elapsed()));
    let after = http_get(&d.metrics_addr, "/metrics", None);
    let elapsed = start.elapsed();
    let flood_calls = calls.load(Ordering::Relaxed) - calls_before;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("flood thread");
    }

    let passes = sample(&after, "sevplace_reconcile_duration_seconds_count") - passes_before;
    let waits = sample(&after, "sevplace_reconcile_lock_wait_seconds_count");
    let wait_sum = sample(&after, "sevplace_reconcile_lock_wait_seconds_sum");
    let expected = elapsed.as_secs_f64() * 1000.0 / PERIOD_MS as f64;
    eprintln!(
        "flood: {flood_calls} calls in {elapsed:?} ({:.0}/s) from {} clients; \
         {passes} reconcile passes (period: {expected:.1}); mean lock wait {:.3} ms; \
         drift corrected in {corrected_in:?}",
        flood_calls as f64 / elapsed.as_secs_f64(),
        CLIENT_THREADS * CALLS_PER_THREAD,
        wait_sum / waits * 1000.0,
    );
    assert!(
        flood_calls as f64 >= 50.0 * elapsed.as_secs_f64(),
        "the flood was not a flood: {flood_calls} calls"
    );
    // Half the period's passes: a starved loop makes few or none; the
    // margin absorbs a loaded test machine.
    assert!(
        passes >= expected / 2.0,
        "{passes} passes in {elapsed:?} with a {PERIOD_MS} ms period"
    );
}
