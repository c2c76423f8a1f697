//! Harness of the end-to-end tests: finds the real binaries and runs
//! `sevplaced` on a temporary socket, state directory and metrics port.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory of the workspace's built binaries (`target/<profile>`), found
/// from the test executable (`target/<profile>/deps/<test>`). Cargo does not
/// rebuild another package's binaries for this crate's tests, so the first
/// call runs `cargo build` for them (a no-op when they are fresh): a test
/// never runs a stale binary.
pub fn bin_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile> directory")
                .to_path_buf();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "sevplace-agent",
                "-p",
                "sevplace-tests",
                "--bins",
            ]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            if let Some(target) = dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build of the binaries failed");
            dir
        })
        .clone()
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `sevplaced` with its own temp directory.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics_addr: String,
}

impl Daemon {
    /// Starts `sevplaced` with `extra` arguments after the test defaults
    /// (so flags in `extra` win) and waits until its socket answers.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/sevplaced.sock");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("sevplaced.toml");
        std::fs::write(&config, "").expect("write config");
        let child = Command::new(bin("sevplaced"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--metrics-addr")
            .arg(&metrics_addr)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sevplaced");
        let mut d = Self {
            child,
            dir,
            socket,
            metrics_addr,
        };
        d.wait_ready(Duration::from_secs(30));
        d
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sevplaced exited early: {status}");
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "sevplaced not ready after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Runs `sevplacectl --socket <this daemon's socket> args...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("sevplacectl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run sevplacectl")
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("sevplaced did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// GET `http://addr/path` with a plain HTTP/1.0 request; returns (status
/// line, headers and body as one string).
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out
}
