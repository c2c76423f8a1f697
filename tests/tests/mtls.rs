//! The real `sevplaced` on TCP: mutual TLS with certificates made at test
//! time (good, read-only and admin names; unknown CA, expired, unlisted
//! name and no certificate refused), sevplacectl over mTLS, the start-up
//! rule for TCP without TLS, `insecure_tcp`, and bad PEM files at start.

use std::process::{Command, Stdio};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use sevplace_proto::v1 as pb;
use sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient;
use sevplace_tests::{bin, free_port, runtime, wait_tcp, wait_until, Daemon, TestPki};

fn place_request() -> pb::PlaceVmRequest {
    pb::PlaceVmRequest {
        vm_id: "vm-mtls".into(),
        vcpus: 1,
        confidential_class: pb::ConfidentialClass::Sev as i32,
        validate_only: true,
        ..Default::default()
    }
}

/// A dir whose `sevplaced.toml` (the harness's config file) is `config`.
fn dir_with_config(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("sevplaced.toml"), config).expect("write config");
    dir
}

/// GetHost (and PlaceVm validate_only when `place`) with the client pair
/// `name`: Ok, or the error text of the connect or the call.
async fn call_as(
    pki: &TestPki,
    addr: &str,
    name: &str,
    place: bool,
) -> Result<(), (Option<tonic::Code>, String)> {
    let ch = sevplace::client::channel_tls(addr, Some("localhost"), pki.client(name))
        .await
        .map_err(|e| (None, e.to_string()))?;
    let mut c = SevplaceServiceClient::new(ch);
    c.get_host(pb::GetHostRequest {})
        .await
        .map_err(|s| (Some(s.code()), s.to_string()))?;
    if place {
        c.place_vm(place_request())
            .await
            .map_err(|s| (Some(s.code()), s.to_string()))?;
    }
    Ok(())
}

#[test]
fn mutual_tls_admits_listed_names_and_refuses_the_rest() {
    let pki = TestPki::generate();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = pki.server_config(&addr, &["monitor.example"], &["orchestrator.example"]);
    let mut d = Daemon::start_logged(dir_with_config(&config), &[]);
    wait_tcp(&addr, Duration::from_secs(10));
    let rt = runtime();

    // A read-only name: GetHost works, a mutating call is denied.
    let r = rt.block_on(call_as(&pki, &addr, "monitor", true));
    let (code, msg) = r.expect_err("monitor may not place");
    assert_eq!(code, Some(tonic::Code::PermissionDenied), "{msg}");
    assert!(msg.contains("server.tls_admin_clients"), "{msg}");
    assert!(d.log().contains("permission denied"), "{}", d.log());

    // An admin name: PlaceVm validate_only is answered.
    rt.block_on(call_as(&pki, &addr, "orchestrator", true))
        .expect("orchestrator places");

    // Refused at the handshake: an unlisted name, an expired certificate,
    // a certificate of another CA.
    for bad in ["stranger", "expired", "unknown-ca"] {
        let r = rt.block_on(call_as(&pki, &addr, bad, false));
        let (code, msg) = r.expect_err(bad);
        assert_ne!(code, Some(tonic::Code::Ok), "{bad}: {msg}");
        assert_ne!(code, Some(tonic::Code::PermissionDenied), "{bad}: {msg}");
    }
    // No client certificate: the TLS handshake needs one.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("ca.pem")).expect("read CA");
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let mut anonymous = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let r = rt.block_on(async {
        let ch = sevplace::client::channel_tls(&addr, None, std::sync::Arc::new(anonymous))
            .await
            .map_err(|e| e.to_string())?;
        SevplaceServiceClient::new(ch)
            .get_host(pb::GetHostRequest {})
            .await
            .map_err(|e| e.to_string())
    });
    assert!(r.is_err(), "a client without a certificate was served");

    // The daemon is alive and still serves the good clients, on TCP and on
    // its socket.
    assert!(d.child.try_wait().expect("try_wait").is_none());
    rt.block_on(call_as(&pki, &addr, "monitor", false))
        .expect("monitor after the bad ones");
    rt.block_on(call_as(&pki, &addr, "orchestrator", true))
        .expect("orchestrator after");
    assert!(d.ctl(&["host"]).status.success());
    assert!(
        wait_until(Duration::from_secs(5), || d
            .log()
            .contains("TLS handshake failed")),
        "handshake failures are logged: {}",
        d.log()
    );
    assert!(
        d.log().contains("serving gRPC on TCP with mutual TLS"),
        "{}",
        d.log()
    );
    // Handshakes are counted by result.
    let metrics = sevplace_tests::http_get(&d.metrics_addr, "/metrics", None);
    for result in ["ok", "refused"] {
        let series = format!("sevplace_tls_handshakes_total{{result=\"{result}\"}}");
        let n = sevplace_tests::sample_in(&metrics, &series).unwrap_or(0.0);
        assert!(n >= 1.0, "no {result} handshake counted:\n{metrics}");
    }
    assert!(d.terminate(Duration::from_secs(10)).success());
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = TestPki::generate();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = pki.server_config(&addr, &[], &[]);
    let _d = Daemon::start_in(dir_with_config(&config), &[], &[]);
    wait_tcp(&addr, Duration::from_secs(10));
    // sevplacectl refuses half a TLS setup before it connects.
    let out = Command::new(bin("sevplacectl"))
        .args(["--tcp", &addr, "--ca"])
        .arg(pki.path("ca.pem"))
        .arg("host")
        .output()
        .expect("run sevplacectl");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert"));
    // Plaintext against the TLS listener fails too.
    let out = Command::new(bin("sevplacectl"))
        .args(["--tcp", &addr, "--insecure", "host"])
        .output()
        .expect("run sevplacectl");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // With every certificate of the CA admitted, a signed one works.
    runtime()
        .block_on(call_as(&pki, &addr, "stranger", false))
        .expect("any name of the CA");
}

#[test]
fn sevplacectl_calls_over_mutual_tls() {
    let pki = TestPki::generate();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = pki.server_config(&addr, &["monitor.example"], &["orchestrator.example"]);
    let _d = Daemon::start_in(dir_with_config(&config), &[], &[]);
    wait_tcp(&addr, Duration::from_secs(10));
    let ctl = |target: &str, name: &str, extra: &[&str], args: &[&str]| {
        Command::new(bin("sevplacectl"))
            .args(["--tcp", target, "--ca"])
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path(&format!("{name}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{name}-key.pem")))
            .args(extra)
            .args(args)
            .output()
            .expect("run sevplacectl")
    };
    // The server certificate names 127.0.0.1 and localhost.
    let out = ctl(&addr, "monitor", &[], &["--json", "host"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["host"]["topology"].is_object(), "{v}");
    let out = ctl(
        &format!("localhost:{port}"),
        "monitor",
        &["--server-name", "localhost"],
        &["host"],
    );
    assert!(out.status.success(), "{out:?}");
    // A name the server certificate does not carry.
    let out = ctl(
        &addr,
        "monitor",
        &["--server-name", "other.example"],
        &["host"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Read-only name: PERMISSION_DENIED; admin name: answered.
    let place = [
        "place",
        "vm-ctl",
        "--vcpus",
        "1",
        "--confidential",
        "sev",
        "--validate-only",
    ];
    let out = ctl(&addr, "monitor", &[], &place);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"),
        "{out:?}"
    );
    let out = ctl(&addr, "orchestrator", &[], &place);
    assert!(out.status.success(), "{out:?}");
    // Refused certificate.
    let out = ctl(&addr, "stranger", &[], &["host"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Runs sevplaced with `config` and expects it to stop at start; returns
/// its exit code and stderr.
fn start_fails(config: &str) -> (Option<i32>, String) {
    let dir = dir_with_config(config);
    let mut child = Command::new(bin("sevplaced"))
        .arg("--config")
        .arg(dir.path().join("sevplaced.toml"))
        .arg("--socket")
        .arg(dir.path().join("run/sevplaced.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--metrics-addr", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sevplaced");
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    assert!(exited, "sevplaced kept running");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tcp_without_tls_does_not_start() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (code, err) = start_fails(&format!("[server]\nlisten_tcp = {addr:?}\n"));
    assert_eq!(code, Some(2), "{err}");
    for key in [
        "server.listen_tcp",
        "server.tls_cert",
        "server.tls_key",
        "server.tls_client_ca",
        "server.insecure_tcp",
    ] {
        assert!(err.contains(key), "{key} not named: {err}");
    }
}

#[test]
fn bad_tls_files_stop_the_start_with_their_name() {
    let pki = TestPki::generate();
    let addr = format!("127.0.0.1:{}", free_port());
    // The key of another certificate.
    let config = pki
        .server_config(&addr, &[], &[])
        .replace("server-key.pem", "monitor-key.pem");
    let (code, err) = start_fails(&config);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains("monitor-key.pem"), "{err}");
    // Garbage in the CA bundle.
    std::fs::write(pki.path("garbage.pem"), "not a certificate\n").expect("write");
    let config = pki
        .server_config(&addr, &[], &[])
        .replace("ca.pem", "garbage.pem");
    let (code, err) = start_fails(&config);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("garbage.pem"), "{err}");
    assert!(err.contains("server.tls_client_ca"), "{err}");
    // A file that is not there.
    let config = pki
        .server_config(&addr, &[], &[])
        .replace("server.pem", "missing.pem");
    let (code, err) = start_fails(&config);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
}

#[test]
fn insecure_tcp_serves_read_only_plaintext_and_warns() {
    let addr = format!("127.0.0.1:{}", free_port());
    let config = format!("[server]\nlisten_tcp = {addr:?}\ninsecure_tcp = true\n");
    let d = Daemon::start_logged(dir_with_config(&config), &[]);
    wait_tcp(&addr, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || d
            .log()
            .contains("serving gRPC on plaintext TCP")),
        "no warning: {}",
        d.log()
    );
    assert!(d.log().contains("WARN"), "{}", d.log());
    let rt = runtime();
    let denied = rt.block_on(async {
        let ch = sevplace::client::channel_tcp(&addr).await.expect("channel");
        let mut c = SevplaceServiceClient::new(ch);
        c.get_host(pb::GetHostRequest {}).await.expect("GetHost");
        c.place_vm(place_request()).await.expect_err("read-only")
    });
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let out = Command::new(bin("sevplacectl"))
        .args(["--tcp", &addr, "--insecure", "host"])
        .output()
        .expect("run sevplacectl");
    assert!(out.status.success(), "{out:?}");
}
