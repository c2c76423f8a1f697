//! The audit trail: every mutating call (PlaceVm, ReleaseVm, ScrubVm),
//! answered or denied, over the Unix socket and over mutual TLS, is one
//! info line under target `sevplace::audit` with the RPC, the VM id, the
//! caller (uid/gid/pid, or the certificate's names and address) and the
//! result, and a count in `sevplace_audit_events_total{rpc,result}`.

use std::process::{Command, Output};
use std::time::Duration;

use sevplace_tests::{bin, free_port, sample_in, wait_tcp, wait_until, Daemon, TestPki};

fn audit_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "sevplace::audit")
        .collect()
}

#[test]
fn every_mutating_call_is_audited_on_both_transports() {
    let pki = TestPki::generate();
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("sevplaced.toml"),
        pki.server_config(&addr, &["monitor.example"], &["orchestrator.example"]),
    )
    .expect("config");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/ci-host-2cpu");
    let d = Daemon::start_logged(
        dir,
        &[
            "--host-root",
            root.to_str().expect("utf-8"),
            "--log-format",
            "json",
        ],
    );
    wait_tcp(&addr, Duration::from_secs(10));
    let tls = |name: &str, args: &[&str]| -> Output {
        Command::new(bin("sevplacectl"))
            .args(["--tcp", &addr, "--server-name", "localhost", "--ca"])
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path(&format!("{name}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{name}-key.pem")))
            .args(args)
            .output()
            .expect("run sevplacectl")
    };
    let place = ["place", "web1", "--vcpus", "1", "--confidential", "sev"];
    // Unix socket, as root: place, scrub (no process: refused), release.
    assert!(d.ctl(&place).status.success());
    assert_eq!(d.ctl(&["scrub", "web1"]).status.code(), Some(1));
    assert!(d.ctl(&["release", "web1"]).status.success());
    // mTLS: the admin name places and releases; the read-only name is
    // denied, and the denial is audited too.
    let out = tls(
        "orchestrator",
        &["place", "web2", "--vcpus", "1", "--confidential", "sev"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tls("monitor", &["release", "web2"]).status.code(), Some(1));
    assert_eq!(
        tls("orchestrator", &["scrub", "web2"]).status.code(),
        Some(1)
    );
    assert!(tls("orchestrator", &["release", "web2"]).status.success());
    // Read-only calls are not audited.
    assert!(d.ctl(&["vms"]).status.success());

    assert!(wait_until(Duration::from_secs(5), || audit_lines(&d.log())
        .len()
        >= 7));
    let lines = audit_lines(&d.log());
    let got: Vec<(String, String, String, String)> = lines
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (s("rpc"), s("vm_id"), s("transport"), s("result"))
        })
        .collect();
    let want = [
        ("PlaceVm", "web1", "unix", "ok"),
        ("ScrubVm", "web1", "unix", "FailedPrecondition"),
        ("ReleaseVm", "web1", "unix", "ok"),
        ("PlaceVm", "web2", "tls", "ok"),
        ("ReleaseVm", "web2", "tls", "PermissionDenied"),
        ("ScrubVm", "web2", "tls", "FailedPrecondition"),
        ("ReleaseVm", "web2", "tls", "ok"),
    ];
    let want: Vec<(String, String, String, String)> = want
        .iter()
        .map(|(a, b, c, e)| (a.to_string(), b.to_string(), c.to_string(), e.to_string()))
        .collect();
    assert_eq!(got, want, "{}", d.log());
    for v in &lines {
        assert_eq!(v["level"], "INFO", "{v}");
        match v["transport"].as_str() {
            Some("unix") => {
                assert_eq!(v["uid"], 0, "{v}");
                assert_eq!(v["gid"], 0, "{v}");
                assert!(v["pid"].as_u64().is_some_and(|p| p > 0), "{v}");
            }
            Some("tls") => {
                assert!(
                    v["client"]
                        .as_str()
                        .is_some_and(|c| c.ends_with(".example")),
                    "{v}"
                );
                assert!(
                    v["addr"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("127.0.0.1:")),
                    "{v}"
                );
            }
            other => panic!("transport {other:?}: {v}"),
        }
        if v["result"] != "ok" {
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        }
    }
    assert_eq!(lines[4]["client"], "monitor.example");

    let metrics = sevplace_tests::http_get(&d.metrics_addr, "/metrics", None);
    for (rpc, result, n) in [
        ("PlaceVm", "ok", 2.0),
        ("ReleaseVm", "ok", 2.0),
        ("ReleaseVm", "PermissionDenied", 1.0),
        ("ScrubVm", "FailedPrecondition", 2.0),
    ] {
        let series = format!("sevplace_audit_events_total{{rpc=\"{rpc}\",result=\"{result}\"}}");
        assert_eq!(sample_in(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
}
