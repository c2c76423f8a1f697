//! The wall clock jumps a day forward, then two days back, under the real
//! daemon (libfaketime with the monotonic clock left alone: what
//! `settimeofday` or an NTP step does to a running process). Through every
//! jump the systemd watchdog keeps being fed, reconcile passes keep their
//! period, PlaceVm and ReleaseVm work, and event timestamps follow the wall
//! clock. Skipped with a printed reason without libfaketime.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sevplace_proto::v1 as pb;
use sevplace_tests::{metric_value, skip, Daemon};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const DAY: i64 = 86_400;

/// The wall clock `date +%s` reports under libfaketime with `offset`
/// (`+1d`), or `None` when libfaketime does not shift it.
fn faked_now(offset_file: &Path) -> Option<i64> {
    let out = std::process::Command::new("date")
        .arg("+%s")
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", offset_file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn real_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn passes(d: &Daemon) -> f64 {
    metric_value(&d.metrics_addr, "sevplace_reconcile_duration_seconds_count")
        .expect("reconcile pass count")
}

#[test]
fn wall_clock_jumps_change_nothing_but_timestamps() {
    let test = "wall_clock_jumps_change_nothing_but_timestamps";
    if !Path::new(LIBFAKETIME).is_file() {
        skip(
            test,
            "faketime",
            format_args!("{LIBFAKETIME} missing (Debian package faketime)"),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let offset: PathBuf = dir.path().join("faketime");
    std::fs::write(&offset, "+1d\n").unwrap();
    match faked_now(&offset) {
        Some(t) if (t - real_now() - DAY).abs() < 60 => {}
        other => {
            skip(
                test,
                "faketime",
                format_args!("libfaketime does not shift the clock here ({other:?})"),
            );
            return;
        }
    }
    std::fs::write(&offset, "+0\n").unwrap();

    // The daemon's sd_notify socket, read by a thread.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let pings: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pings, stop) = (pings.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf) {
                    if &buf[..n] == b"WATCHDOG=1" {
                        pings.lock().unwrap().push(Instant::now());
                    }
                }
            }
        })
    };

    let env = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
        ("SEVPLACE__RECONCILE__PERIOD_MS", "200"),
    ];
    // The real host: the passes scan the real /proc.
    let d = Daemon::start_in(tempfile::tempdir().unwrap(), &[], &env);
    let rt = sevplace_tests::runtime();
    let mut c = rt.block_on(sevplace::client::connect(&d.socket)).unwrap();
    let mut events = rt
        .block_on(c.watch_events(pb::WatchEventsRequest::default()))
        .unwrap()
        .into_inner();

    for (phase, (file, shift)) in [("+0\n", 0), ("+1d\n", DAY), ("-1d\n", -DAY)]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&offset, file).unwrap();
        let window = Duration::from_secs(3);
        let since = Instant::now();
        let passes_before = passes(&d);
        let id = format!("clock-{phase}");
        rt.block_on(c.place_vm(pb::PlaceVmRequest {
            vm_id: id.clone(),
            vcpus: 1,
            confidential_class: pb::ConfidentialClass::Sev as i32,
            ..Default::default()
        }))
        .unwrap_or_else(|s| panic!("PlaceVm at shift {shift}: {s:?}"));
        // The Placed event carries the daemon's (shifted) wall clock.
        let placed_at = rt.block_on(async {
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
                    .await
                    .expect("an event within 10 s")
                    .expect("stream")
                    .expect("event");
                if let Some(e) = ev.event.filter(|e| e.vm_id == id) {
                    if let Some(pb::event::Kind::Placed(_)) = e.kind {
                        return e.time.expect("time").seconds;
                    }
                }
            }
        });
        assert!(
            (placed_at - real_now() - shift).abs() < 600,
            "shift {shift}: event at {placed_at}, real now {}",
            real_now()
        );
        rt.block_on(c.release_vm(pb::ReleaseVmRequest { vm_id: id }))
            .unwrap_or_else(|s| panic!("ReleaseVm at shift {shift}: {s:?}"));
        std::thread::sleep(window.saturating_sub(since.elapsed()));
        let elapsed = since.elapsed();
        let passes = passes(&d) - passes_before;
        let fed = pings
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t >= since)
            .count();
        eprintln!("shift {shift:+} s: {passes} passes, {fed} watchdog pings in {elapsed:?}");
        // Period 200 ms: 15 passes; ping every 500 ms: 6. Half of each
        // absorbs a loaded machine; a stalled loop or a starved feed
        // gives none.
        assert!(
            passes >= 7.0,
            "shift {shift}: {passes} passes in {elapsed:?}"
        );
        assert!(
            fed >= 3,
            "shift {shift}: {fed} watchdog pings in {elapsed:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
}
