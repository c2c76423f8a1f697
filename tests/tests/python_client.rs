//! A real non-Rust client: Python grpcio with default channel options,
//! stubs generated from proto/ by grpcio-tools, against the real `sevplaced`
//! on the milan-64c fixture host root (tests/python/client_test.py says
//! what it checks), then grpcurl (grpc-go) on the same socket: services
//! through reflection v1alpha, a describe, GetHost, and vcpus=0 refused as
//! INVALID_ARGUMENT. The venv is made once under the target directory from
//! tests/python/requirements.txt and reused while that file is unchanged.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sevplace_tests::{bin_dir, free_port, skip, wait_tcp, Daemon};

const TEST: &str = "python_grpcio_client_calls_every_rpc";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What pip prints when the package index cannot be reached.
fn index_unreachable(pip_output: &str) -> bool {
    [
        "Failed to establish a new connection",
        "Temporary failure in name resolution",
        "Name or service not known",
        "Network is unreachable",
        "ConnectTimeoutError",
        "No matching distribution found",
    ]
    .iter()
    .any(|s| pip_output.contains(s))
}

enum Venv {
    Ready(PathBuf),
    /// The package index is unreachable: pip's output.
    Offline(String),
}

/// `<target>/python-venv` with tests/python/requirements.txt installed; a
/// copy of the requirements in the venv marks it complete.
fn venv() -> Venv {
    let requirements = repo().join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("read requirements.txt");
    let target = bin_dir().parent().expect("target directory").to_path_buf();
    let dir = target.join("python-venv");
    let stamp = dir.join("sevplace-requirements.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Venv::Ready(dir);
    }
    let out = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&dir)
        .output()
        .expect("run python3 -m venv");
    assert!(out.status.success(), "python3 -m venv: {}", text(&out));
    let out = Command::new(dir.join("bin/pip"))
        .args([
            "install",
            "--disable-pip-version-check",
            "--quiet",
            "--retries",
            "2",
            "--timeout",
            "20",
            "-r",
        ])
        .arg(&requirements)
        .output()
        .expect("run pip");
    if !out.status.success() {
        let log = text(&out);
        if index_unreachable(&log) {
            return Venv::Offline(log);
        }
        panic!("pip install -r {}: {log}", requirements.display());
    }
    std::fs::write(&stamp, wanted).expect("mark the venv complete");
    Venv::Ready(dir)
}

#[test]
fn python_grpcio_client_calls_every_rpc() {
    if !nix::unistd::geteuid().is_root() {
        skip(TEST, "root", "mutating calls need root (peer credentials)");
        return;
    }
    if Command::new("python3").arg("--version").output().is_err() {
        skip(TEST, "python3", "python3 is not installed");
        return;
    }
    let venv = match venv() {
        Venv::Ready(dir) => dir,
        Venv::Offline(log) => {
            skip(
                TEST,
                "pypi",
                format_args!(
                    "the Python package index is unreachable: {}",
                    log.trim().lines().last().unwrap_or_default()
                ),
            );
            return;
        }
    };
    let python = venv.join("bin/python");

    let stubs = tempfile::tempdir().expect("tempdir");
    let out = Command::new(&python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", repo().join("proto").display()))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg("sevplace/v1/sevplace.proto")
        .current_dir(repo().join("proto"))
        .output()
        .expect("run grpc_tools.protoc");
    assert!(out.status.success(), "grpc_tools.protoc: {}", text(&out));

    let addr = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("sevplaced.toml"),
        format!("[server]\nlisten_tcp = {addr:?}\ninsecure_tcp = true\n"),
    )
    .expect("write config");
    let root = repo().join("agent/tests/fixtures/milan-64c");
    let d = Daemon::start_in(
        dir,
        &["--host-root", root.to_str().expect("utf-8 path")],
        &[],
    );
    wait_tcp(&addr, Duration::from_secs(10));

    let out = Command::new(&python)
        .arg(repo().join("tests/python/client_test.py"))
        .arg(&d.socket)
        .arg(addr.as_str())
        .arg(stubs.path())
        .output()
        .expect("run client_test.py");
    let log = text(&out);
    eprintln!("{log}");
    assert!(out.status.success(), "client_test.py failed:\n{log}");
    assert!(log.contains("python client: all checks passed"), "{log}");

    // grpcurl (Go, grpc-go): reflection v1alpha and calls on the socket.
    let grpcurl = |args: &[&str]| {
        let out = Command::new(venv.join("bin/grpcurl"))
            .args(["-plaintext", "-unix"])
            .args(args)
            .output()
            .expect("run grpcurl");
        (out.status.code(), text(&out))
    };
    let socket = d.socket.to_str().expect("utf-8 path");
    let (code, out) = grpcurl(&[socket, "list"]);
    assert_eq!(code, Some(0), "grpcurl list: {out}");
    for service in [
        "sevplace.v1.SevplaceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(out.lines().any(|l| l == service), "{service} in {out}");
    }
    let (code, out) = grpcurl(&[socket, "describe", "sevplace.v1.SevplaceService"]);
    assert_eq!(code, Some(0), "grpcurl describe: {out}");
    assert!(out.contains("rpc PlaceVm"), "{out}");
    let (code, out) = grpcurl(&["-d", "{}", socket, "sevplace.v1.SevplaceService/GetHost"]);
    assert_eq!(code, Some(0), "grpcurl GetHost: {out}");
    assert!(out.contains("\"agentVersion\""), "{out}");
    let (code, out) = grpcurl(&[
        "-d",
        r#"{"vmId": "curl-1", "vcpus": 0, "confidentialClass": "CONFIDENTIAL_CLASS_SEV"}"#,
        socket,
        "sevplace.v1.SevplaceService/PlaceVm",
    ]);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("Code: InvalidArgument") && out.contains("vcpus"),
        "{out}"
    );
}
