//! Harness of the end-to-end tests: finds the real binaries and runs
//! `sevplaced` on a temporary socket, state directory and metrics port.

// A test harness, not a library with users: its items are documented where
// a test needs to know more than the name says.
#![allow(missing_docs)]

pub mod openstack;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod skip;
pub use skip::skip;

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
                "--locked",
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
    /// stderr of the daemon, when started with [`Daemon::start_logged`].
    log: Option<std::sync::Arc<std::sync::Mutex<String>>>,
}

impl Daemon {
    /// Starts `sevplaced` with `extra` arguments after the test defaults
    /// (so flags in `extra` win) and waits until its socket answers.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra, &[])
    }

    /// Starts `sevplaced` in `dir` (reused across restarts: same socket,
    /// same state directory) with extra flags and environment.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(dir, extra, env, false)
    }

    /// Like [`Daemon::start_in`], and keeps the daemon's stderr for
    /// [`Daemon::log`] (it is also echoed to the test's stderr).
    pub fn start_logged(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_with(dir, extra, &[], true)
    }

    /// Everything the daemon wrote to stderr so far (empty unless started
    /// with [`Daemon::start_logged`]).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    fn start_with(
        dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
        capture: bool,
    ) -> Self {
        let socket = dir.path().join("run/sevplaced.sock");
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("sevplaced.toml");
        if !config.exists() {
            std::fs::write(&config, "").expect("write config");
        }
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
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if capture {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn sevplaced");
        let mut child = child;
        let log = child.stderr.take().map(|stderr| {
            let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let sink = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
            log
        });
        let mut d = Self {
            child,
            dir,
            socket,
            metrics_addr,
            log,
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

    /// Kills the daemon with SIGKILL and hands back its directory.
    pub fn kill9(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("placeholder");
        std::mem::replace(&mut self.dir, dir)
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

/// The value of `series` (a metric name with its labels, as exported) in
/// a `/metrics` body; `None` when the body has no such sample.
pub fn sample_in(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The value of `series` in the `/metrics` the daemon at `addr` serves now.
pub fn metric_value(addr: &str, series: &str) -> Option<f64> {
    sample_in(&http_get(addr, "/metrics", None), series)
}

/// A `kvm-guest-fixture` VM; killed and reaped on drop.
pub struct GuestVm {
    pub child: Child,
    pub pid: u32,
}

impl GuestVm {
    /// Starts the fixture with `args` and waits for `ready pid=N`; `None`
    /// (with a printed reason) when `/dev/kvm` is unusable.
    pub fn start(test: &str, args: &[&str]) -> Option<Self> {
        use std::io::BufRead;
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            skip(test, "kvm", format_args!("/dev/kvm unusable: {e}"));
            return None;
        }
        let mut child = Command::new(bin("kvm-guest-fixture"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kvm-guest-fixture");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready line");
        let pid = line
            .trim()
            .strip_prefix("ready pid=")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected fixture output {line:?}"));
        Some(Self { child, pid })
    }

    /// `(tid, comm)` of every thread.
    pub fn threads(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) {
            for e in rd.flatten() {
                let tid: u32 = match e.file_name().to_str().and_then(|s| s.parse().ok()) {
                    Some(t) => t,
                    None => continue,
                };
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                out.push((tid, comm.trim().to_string()));
            }
        }
        out
    }

    /// tid of vCPU `index` (`CPU N/KVM`).
    pub fn vcpu_tid(&self, index: u32) -> u32 {
        let name = format!("CPU {index}/KVM");
        self.threads()
            .into_iter()
            .find(|(_, c)| *c == name)
            .map(|(t, _)| t)
            .unwrap_or_else(|| panic!("no thread {name}"))
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Cpus_allowed_list` of a thread.
pub fn cpus_allowed(pid: u32, tid: u32) -> sevplace::CpuSet {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .and_then(|v| sevplace::CpuSet::parse(v).ok())
        .unwrap_or_default()
}

/// The CPU a thread last ran on (stat field 39).
pub fn last_cpu(pid: u32, tid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace()
        .nth(39 - 3)
        .and_then(|v| v.parse().ok())
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A current-thread tokio runtime for a test's gRPC client.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `promtool check metrics` (Debian's prometheus package) on a scrape;
/// skipped with a printed reason when promtool is not installed.
pub fn promtool_check_metrics(body: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        skip(
            "promtool check metrics",
            "promtool",
            "promtool is not installed (apt install prometheus)",
        );
        return;
    };
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates made at test time for the mutual-TLS tests, as PEM files in
/// one directory: `ca.pem`; `server.pem`/`server-key.pem` for `localhost`
/// and 127.0.0.1; and client pairs `<name>.pem`/`<name>-key.pem`:
/// `orchestrator` and `monitor` (SAN `<name>.example`, signed by the CA),
/// `stranger` (signed by the CA, a name no config admits), `expired`
/// (`monitor.example`, not valid after 2020-01-01), `unknown-ca`
/// (`monitor.example`, signed by another CA).
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let new_ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().expect("CA key");
            let pem = p.self_signed(&key).expect("CA cert").pem();
            (Issuer::new(p, key), pem)
        };
        let (ca, ca_pem) = new_ca("sevplace test CA");
        let (other, _) = new_ca("another CA");
        let pki = Self {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::write(pki.path("ca.pem"), ca_pem).expect("write CA");
        let leaf = |file: &str,
                    issuer: &Issuer<'_, KeyPair>,
                    sans: &[&str],
                    server: bool,
                    expired: bool| {
            let mut p =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .expect("params");
            p.distinguished_name.push(DnType::CommonName, sans[0]);
            p.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            if expired {
                p.not_before = rcgen::date_time_ymd(2019, 1, 1);
                p.not_after = rcgen::date_time_ymd(2020, 1, 1);
            }
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, issuer).expect("sign");
            std::fs::write(pki.path(&format!("{file}.pem")), cert.pem()).expect("write cert");
            std::fs::write(pki.path(&format!("{file}-key.pem")), key.serialize_pem())
                .expect("write key");
        };
        leaf("server", &ca, &["localhost", "127.0.0.1"], true, false);
        leaf("orchestrator", &ca, &["orchestrator.example"], false, false);
        leaf("monitor", &ca, &["monitor.example"], false, false);
        leaf("stranger", &ca, &["stranger.example"], false, false);
        leaf("expired", &ca, &["monitor.example"], false, true);
        leaf("unknown-ca", &other, &["monitor.example"], false, false);
        pki
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The `[server]` lines of a daemon that serves mutual TLS on `addr`.
    pub fn server_config(&self, addr: &str, allowed: &[&str], admin: &[&str]) -> String {
        let list = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "[server]\nlisten_tcp = {addr:?}\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\ntls_allowed_clients = [{}]\ntls_admin_clients = [{}]\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem"),
            list(allowed),
            list(admin),
        )
    }

    /// A client TLS config with the client pair `name`.
    pub fn client(&self, name: &str) -> std::sync::Arc<sevplace::tls::ClientConfig> {
        sevplace::tls::client_config(
            &self.path("ca.pem"),
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}-key.pem")),
        )
        .expect("client TLS config")
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_tcp(addr: &str, timeout: Duration) {
    assert!(
        wait_until(timeout, || std::net::TcpStream::connect(addr).is_ok()),
        "nothing listens on {addr} after {timeout:?}"
    );
}
