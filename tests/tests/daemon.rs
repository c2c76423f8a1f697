//! The real `sevplaced` binary on a temp socket: GetHost through the
//! generated client, health, reflection-free metrics scrape, CLI contract,
//! single-instance rule and clean SIGTERM exit.

use std::time::Duration;

use sevplace_proto::v1::GetHostRequest;
use sevplace_tests::{http_get, promtool_check_metrics, runtime, Daemon};

#[test]
fn get_host_health_metrics_and_sigterm() {
    let mut d = Daemon::start(&[]);
    let rt = runtime();

    let host = rt.block_on(async {
        let mut c = sevplace::client::connect(&d.socket).await.expect("connect");
        c.get_host(GetHostRequest {})
            .await
            .expect("GetHost")
            .into_inner()
    });
    let host = host.host.expect("host");
    let real =
        sevplace::topology::Topology::from_sysfs(std::path::Path::new("/sys")).expect("topology");
    let topo = host.topology.expect("topology");
    assert_eq!(topo.online_cpus, real.online.to_vec());
    assert_eq!(topo.l3_domains.len(), real.l3_domains.len());
    assert_eq!(host.agent_version, env!("CARGO_PKG_VERSION"));
    let module = host.module.expect("module status");
    if !std::path::Path::new("/sys/kernel/sevflush").exists() {
        assert_eq!(module.state, sevplace_proto::v1::ModuleState::Absent as i32);
    }

    let status = rt.block_on(async {
        let ch = sevplace::client::channel(&d.socket).await.expect("channel");
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let whole = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        let svc = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "sevplace.v1.SevplaceService".into(),
            })
            .await
            .expect("health of the service")
            .into_inner()
            .status;
        (whole, svc)
    });
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(status, (serving, serving));

    // Prometheus text 0.0.4, parsed by a real parser.
    let resp = http_get(&d.metrics_addr, "/metrics", None);
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "{resp}"
    );
    assert!(resp.contains("text/plain; version=0.0.4"), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).expect("body");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parse metrics");
    let find = |name: &'static str| scrape.samples.iter().filter(move |s| s.metric == name);
    assert_eq!(find("sevplace_build_info").count(), 1);
    let online = find("sevplace_cpus")
        .find(|s| s.labels.get("state") == Some("online"))
        .expect("sevplace_cpus{state=online}");
    assert!(
        matches!(online.value, prometheus_parse::Value::Gauge(v) if v == real.online.len() as f64)
    );
    let gethost = find("sevplace_grpc_requests_total")
        .find(|s| s.labels.get("method") == Some("GetHost") && s.labels.get("code") == Some("Ok"))
        .expect("GetHost counter");
    assert!(
        matches!(gethost.value, prometheus_parse::Value::Counter(v) if v >= 1.0),
        "{gethost:?}"
    );
    let hist = find("sevplace_grpc_request_duration_seconds")
        .find(|s| s.labels.get("method") == Some("GetHost"))
        .expect("GetHost latency histogram");
    assert!(
        matches!(&hist.value, prometheus_parse::Value::Histogram(b) if !b.is_empty()),
        "{hist:?}"
    );
    assert_eq!(
        scrape.docs.get("sevplace_cpus").map(String::as_str),
        Some("Logical CPUs of the host by state.")
    );

    promtool_check_metrics(body);

    // OpenMetrics on request.
    let om = http_get(
        &d.metrics_addr,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert!(
        om.contains("application/openmetrics-text") && om.trim_end().ends_with("# EOF"),
        "{om}"
    );
    assert!(http_get(&d.metrics_addr, "/nope", None).contains(" 404 "));

    let status = d.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!d.socket.exists(), "socket left behind after SIGTERM");
}

#[test]
fn second_daemon_refuses_the_socket() {
    let d = Daemon::start(&[]);
    let out = std::process::Command::new(sevplace_tests::bin("sevplaced"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--metrics-addr", "", "--config"])
        .arg(d.dir.path().join("sevplaced.toml"))
        .output()
        .expect("run second sevplaced");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another sevplaced is running"), "{err}");
    // The first one still answers.
    assert!(d.ctl(&["host"]).status.success());
}

#[test]
fn stale_socket_is_replaced_and_non_socket_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    // A socket nobody listens on (its listener is gone).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let out = std::process::Command::new(sevplace_tests::bin("sevplaced"))
        .arg("--socket")
        .arg(&sock)
        .args(["--metrics-addr", "", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut child = std::process::Command::new(sevplace_tests::bin("sevplaced"))
        .arg("--socket")
        .arg(&sock)
        .args(["--metrics-addr", ""])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stale socket not replaced"
        );
        assert!(child.try_wait().unwrap().is_none(), "sevplaced exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let file = dir.path().join("file.sock");
    std::fs::write(&file, "not a socket").unwrap();
    let out = std::process::Command::new(sevplace_tests::bin("sevplaced"))
        .arg("--socket")
        .arg(&file)
        .args(["--metrics-addr", ""])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket");
}

#[test]
fn ctl_host_table_json_and_exit_codes() {
    let d = Daemon::start(&[]);
    let out = d.ctl(&["host"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("l3 domains") && text.contains("sevflush"),
        "{text}"
    );

    let out = d.ctl(&["--json", "host"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert!(
        v["host"]["topology"]["onlineCpus"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    assert!(
        v["host"]["topology"]["l3Domains"][0]["cpus"].is_array(),
        "{v}"
    );
    assert!(v["host"]["module"]["state"].is_string(), "{v}");

    // Bad usage: 2. Unreachable daemon: 1 with a one-line error.
    assert_eq!(d.ctl(&["--no-such-flag"]).status.code(), Some(2));
    let out = std::process::Command::new(sevplace_tests::bin("sevplacectl"))
        .args(["--socket", "/nonexistent/x.sock", "host"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[server]\nsockett = \"/x\"\n").unwrap();
    let out = std::process::Command::new(sevplace_tests::bin("sevplaced"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.sockett"));

    let out = std::process::Command::new(sevplace_tests::bin("sevplaced"))
        .args(["--print-config", "--config"])
        .arg(&cfg)
        .env("SEVPLACE__SERVER__SOCKETT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn fixture_host_root() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/milan-64c");
    let d = Daemon::start(&["--host-root", root.to_str().unwrap()]);
    let out = d.ctl(&["--json", "host"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["host"]["topology"]["l3Domains"].as_array().map(Vec::len),
        Some(8)
    );
    assert_eq!(
        v["host"]["topology"]["onlineCpus"].as_array().map(Vec::len),
        Some(128)
    );
    assert_eq!(v["host"]["module"]["state"], "MODULE_STATE_ABSENT");
}

#[test]
fn simulate_json_holds_the_invariants() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (trace, topo) in [
        ("agent/traces/mixed-host.json", "genoa-2x96-nps1"),
        (
            "agent/traces/confidential-heavy.yaml",
            "agent/tests/fixtures/milan-64c",
        ),
    ] {
        let topo_arg = if topo.contains('/') {
            root.join(topo).display().to_string()
        } else {
            topo.to_string()
        };
        let out = std::process::Command::new(sevplace_tests::bin("sevplacectl"))
            .args(["--json", "simulate", "--trace"])
            .arg(root.join(trace))
            .args(["--topology", &topo_arg])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let combos = v["combinations"].as_array().expect("combinations");
        assert_eq!(combos.len(), 9, "3 placements x 3 flush policies");
        for c in combos {
            if c["flush"] == "sevplace" {
                // Never below the limit; never outside a dedicated VM's CPUs.
                assert_eq!(c["checks"]["reclaimsBelowLimit"], 0, "{c}");
                assert_eq!(c["checks"]["reclaimsOutsideExclusiveCpus"], 0, "{c}");
                assert!(
                    c["flushedCpus"]["mean"].as_f64().unwrap()
                        >= c["limitCpus"]["mean"].as_f64().unwrap() - 1e-9
                );
            }
        }
        let fit = |p: &str| {
            combos
                .iter()
                .find(|c| c["placement"] == p && c["flush"] == "sevplace")
                .map(|c| c["vmsBeforeFirstRejection"].as_u64().unwrap())
                .unwrap()
        };
        assert!(fit("sevplace") >= fit("kubelet-static"), "{trace}");
    }
    // A malformed trace names the place.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"events\": [\n  {\"at\": \"soon\"}\n]}").unwrap();
    let out = std::process::Command::new(sevplace_tests::bin("sevplacectl"))
        .args(["simulate", "--topology", "milan-64c", "--trace"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line") || err.contains("events"), "{err}");
}

#[test]
fn peer_credentials_gate_mutating_calls() {
    let nobody_ok = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !nobody_ok || !nix::unistd::Uid::effective().is_root() {
        sevplace_tests::skip(
            "peer_credentials_gate_mutating_calls",
            "root",
            "needs root and setpriv",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Everyone may connect; nobody (uid 65534) is in no admin group.
    std::fs::write(
        dir.path().join("sevplaced.toml"),
        "[server]\nsocket_mode = \"0666\"\n",
    )
    .unwrap();
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/milan-64c");
    let d = Daemon::start_in(dir, &["--host-root", root.to_str().unwrap()], &[]);
    // The temp dir is 0700: let nobody reach the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        d.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let ctl = sevplace_tests::bin("sevplacectl");
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&ctl)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["host"]);
    if out.status.code() == Some(126)
        || String::from_utf8_lossy(&out.stderr).contains("Permission denied (os error 13)")
    {
        sevplace_tests::skip(
            "peer_credentials_gate_mutating_calls",
            "nobody-runs-test-binaries",
            "uid 65534 cannot run the test binaries here",
        );
        return;
    }
    assert!(
        out.status.success(),
        "read call denied: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_nobody(&["place", "x", "--vcpus", "1", "--confidential", "sev"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("uid 65534"),
        "{err}"
    );
    let out = as_nobody(&["release", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
    // Root still may.
    assert!(d
        .ctl(&["place", "x", "--vcpus", "1", "--confidential", "sev"])
        .status
        .success());
    // The daemon survived the denials.
    assert!(d.ctl(&["vm", "x"]).status.success());
}

#[test]
fn message_size_and_time_limits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sevplaced.toml"),
        "[server]\nmax_message_bytes = 1024\nrequest_timeout_ms = 300\n",
    )
    .unwrap();
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/milan-64c");
    let d = Daemon::start_in(dir, &["--host-root", root.to_str().unwrap()], &[]);
    let rt = runtime();
    rt.block_on(async {
        let mut c = sevplace::client::connect(&d.socket).await.unwrap();
        let big = c
            .place_vm(sevplace_proto::v1::PlaceVmRequest {
                vm_id: "x".repeat(4096),
                vcpus: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(big.code(), tonic::Code::OutOfRange, "{big:?}");
        assert!(big.message().contains("too large"), "{big:?}");
        // The service still answers normal calls.
        assert!(c.get_host(GetHostRequest {}).await.is_ok());
        // The call time limit does not cut a WatchEvents stream.
        let mut s = c
            .watch_events(sevplace_proto::v1::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let r = tokio::time::timeout(Duration::from_millis(1200), s.message()).await;
        assert!(r.is_err(), "the stream ended early: {r:?}");
    });
}
