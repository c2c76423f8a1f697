//! The first hour of an operator: a non-root start in a fresh HOME, log
//! lines on a pipe, in JSON and on a terminal, the connection errors of
//! sevplacectl (no socket, nobody answering, permission denied, --json),
//! its help, and the start-up errors that name the file, the cause and the
//! fix.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sevplace_tests::{bin, free_port, wait_until, Daemon};

const NOBODY: u32 = 65534;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures")
        .join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A 0755 directory with copies of the binaries and of the 2-CPU fixture
/// host, so an unprivileged user can run and read them wherever the clone
/// lives (CI clones under /root, which is 0700).
struct Shared {
    dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        for b in ["sevplaced", "sevplacectl"] {
            std::fs::copy(bin(b), dir.path().join(b)).expect("copy binary");
        }
        let status = Command::new("cp")
            .arg("-r")
            .arg(fixture("ci-host-2cpu"))
            .arg(dir.path().join("host"))
            .status()
            .expect("cp");
        assert!(status.success());
        let status = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(dir.path())
            .status()
            .expect("chmod");
        assert!(status.success());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A command run as uid/gid 65534 with no supplementary groups and only
/// `env` in its environment; `None` when this machine cannot do that (not
/// root, no setpriv).
fn as_nobody(program: &Path, env: &[(&str, &Path)]) -> Option<Command> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let ok = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg("env")
        .arg("-i")
        .arg("PATH=/usr/bin:/bin");
    for (k, v) in env {
        c.arg(format!("{k}={}", v.display()));
    }
    c.arg(program);
    Some(c)
}

fn skip_or_fail(test: &str, why: &str) {
    // Root and setpriv (util-linux) are on every CI machine.
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {why} under CI"
    );
    eprintln!("SKIP {test}: {why}");
}

fn chown_nobody(p: &Path) {
    nix::unistd::chown(
        p,
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .expect("chown");
}

#[test]
fn non_root_start_in_a_fresh_home_keeps_state_there() {
    let shared = Shared::new();
    let home = tempfile::tempdir().expect("home");
    chown_nobody(home.path());
    let run = home.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    chown_nobody(&run);
    let env = [("HOME", home.path()), ("XDG_RUNTIME_DIR", run.as_path())];
    let daemon = |extra: &[&str]| {
        as_nobody(&shared.path("sevplaced"), &env).map(|mut c| {
            c.arg("--host-root")
                .arg(shared.path("host"))
                .args(["--metrics-addr", ""])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            c
        })
    };
    let Some(mut cmd) = daemon(&[]) else {
        return skip_or_fail(
            "non_root_start_in_a_fresh_home_keeps_state_there",
            "needs root and setpriv",
        );
    };
    let socket = run.join("sevplace/sevplaced.sock");
    let state = home.path().join(".local/state/sevplace");
    let mut child = cmd.spawn().expect("spawn sevplaced");
    let up = wait_until(Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
            || child.try_wait().ok().flatten().is_some()
    });
    if child.try_wait().ok().flatten().is_some() || !up {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!("non-root sevplaced did not start: {}", text(&out.stderr));
    }
    let ctl = |args: &[&str]| -> Output {
        let mut c = as_nobody(&shared.path("sevplacectl"), &env).expect("as nobody");
        c.args(args).output().expect("run sevplacectl")
    };
    // The daemon's own user may place (no admin group needed), and the
    // intent lands under ~/.local/state/sevplace.
    let out = ctl(&["place", "web1", "--vcpus", "1", "--confidential", "sev"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(state.join("checkpoint.json").is_file());
    let out = ctl(&["vm", "web1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("pid         -"),
        "{}",
        text(&out.stdout)
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = text(&out.stderr);
    assert!(
        log.contains(&format!("dir={}", state.display())),
        "state directory not logged: {log}"
    );
    assert!(!log.contains("\x1b["), "colour on a pipe: {log}");
    // Left behind: the checkpoint and the socket's lock file, nothing else.
    assert!(!socket.exists());
    let mut names: Vec<String> = std::fs::read_dir(run.join("sevplace"))
        .expect("read run dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["sevplaced.sock.lock"]);

    // A state directory this user may not write stops the start with the
    // directory, the cause and a fix; following the fix starts.
    let locked = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(locked.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let forbidden = locked.path().join("state");
    std::fs::create_dir(&forbidden).expect("mkdir");
    let flag = format!("--state-dir={}", forbidden.display());
    let out = daemon(&[&flag]).expect("as nobody").output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&forbidden.display().to_string())
            && err.contains("Permission denied")
            && err.contains("--state-dir"),
        "{err}"
    );
    assert!(!err.contains("--reset-state"), "{err}");
    // An unreadable checkpoint in a directory of another user: same
    // words, never the --reset-state loop.
    std::fs::write(forbidden.join("checkpoint.json"), "{}").expect("write");
    std::fs::set_permissions(
        forbidden.join("checkpoint.json"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let out = daemon(&[&flag, "--reset-state"])
        .expect("as nobody")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--state-dir") && !err.contains("run sevplaced --reset-state"),
        "{err}"
    );
}

#[test]
fn logs_on_a_pipe_are_plain_and_json_lines_are_valid() {
    let root = fixture("ci-host-2cpu");
    let d = Daemon::start_logged(
        tempfile::tempdir().expect("tempdir"),
        &["--host-root", root.to_str().expect("utf-8")],
    );
    assert!(wait_until(Duration::from_secs(10), || d
        .log()
        .contains("serving gRPC")));
    let log = d.log();
    assert!(!log.contains('\x1b'), "ANSI codes on a pipe: {log}");
    assert!(
        log.contains(&format!("addr={}", d.metrics_addr)),
        "metrics address not in Display form: {log}"
    );
    assert!(!log.contains("Some("), "Debug formatting in the log: {log}");
    drop(d);

    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_logged(
        dir,
        &[
            "--host-root",
            root.to_str().expect("utf-8"),
            "--log-format",
            "json",
        ],
    );
    // The fixture has no /proc: the condition line carries a field that
    // used to be called "message" too.
    assert!(wait_until(Duration::from_secs(10), || d
        .log()
        .contains("condition raised")));
    let log = d.log();
    let mut n = 0;
    for line in log.lines() {
        let keys = json_keys(line).unwrap_or_else(|e| panic!("not a JSON line: {line}: {e}"));
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len(), "duplicate key in {line}");
        assert!(keys.iter().any(|k| k == "message"), "{line}");
        n += 1;
    }
    assert!(n >= 3, "{log}");
}

/// The top-level keys of one JSON object, duplicates kept.
fn json_keys(line: &str) -> Result<Vec<String>, serde_json::Error> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(k);
            }
            Ok(keys)
        }
    }
    serde_json::Deserializer::from_str(line).deserialize_map(Keys)
}

#[test]
fn logs_on_a_terminal_are_coloured() {
    if Command::new("script").arg("--version").output().is_err() {
        return skip_or_fail(
            "logs_on_a_terminal_are_coloured",
            "script (util-linux) is missing",
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sevplaced.toml");
    std::fs::write(&config, "").expect("write config");
    let cmd = format!(
        "timeout -s TERM 3 '{}' --config '{}' --host-root '{}' --socket '{}' --state-dir '{}' --metrics-addr ''",
        bin("sevplaced").display(),
        config.display(),
        fixture("ci-host-2cpu").display(),
        dir.path().join("s.sock").display(),
        dir.path().join("state").display(),
    );
    // script gives the daemon a pty as stderr and copies it to stdout.
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let log = text(&out.stdout);
    assert!(log.contains("serving gRPC"), "{log}");
    assert!(log.contains("\x1b["), "no colour on a terminal: {log}");
}

#[test]
fn connection_errors_say_what_is_wrong_and_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = |args: &[&str]| -> Output {
        Command::new(bin("sevplacectl"))
            .args(args)
            .output()
            .expect("run sevplacectl")
    };
    // No such socket.
    let missing = dir.path().join("missing.sock");
    let out = ctl(&["--socket", missing.to_str().expect("utf-8"), "host"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("no socket at {}", missing.display()))
            && err.contains("systemctl start sevplaced"),
        "{err}"
    );
    // The same as one JSON object on stderr with --json.
    let out = ctl(&[
        "--json",
        "--socket",
        missing.to_str().expect("utf-8"),
        "host",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&err).expect("JSON error");
    assert_eq!(v["error"]["code"], "connect");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("no socket at")));
    // A socket file nobody answers on (left by a daemon that died).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = ctl(&["--socket", stale.to_str().expect("utf-8"), "host"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("not answering") && err.contains("connection refused"),
        "{err}"
    );
    // Nothing on a TCP port.
    let addr = format!("127.0.0.1:{}", free_port());
    let out = ctl(&["--tcp", &addr, "--insecure", "host"]);
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("not answering at {addr}")) && err.contains("server.listen_tcp"),
        "{err}"
    );
    // An RPC error with --json: the gRPC code.
    let d = Daemon::start(&[
        "--host-root",
        fixture("ci-host-2cpu").to_str().expect("utf-8"),
    ]);
    let out = d.ctl(&["--json", "vm", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).expect("JSON error");
    assert_eq!(v["error"]["code"], "NotFound");

    // Permission denied, with the socket's group and the fix.
    let shared = Shared::new();
    let private = shared.path("private.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&private).expect("bind");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o660)).expect("chmod");
    let Some(mut c) = as_nobody(&shared.path("sevplacectl"), &[]) else {
        return skip_or_fail(
            "connection_errors_say_what_is_wrong_and_what_to_do",
            "needs root and setpriv for the permission case",
        );
    };
    let out = c
        .arg("--socket")
        .arg(&private)
        .arg("host")
        .output()
        .expect("run");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("permission denied on {}", private.display()))
            && err.contains("mode 0660")
            && err.contains("group root")
            && err.contains("run as root"),
        "{err}"
    );
}

#[test]
fn help_groups_connection_options_and_describes_every_argument() {
    let help = |args: &[&str]| {
        let out = Command::new(bin("sevplacectl"))
            .args(args)
            .output()
            .expect("run sevplacectl");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let top = help(&["--help"]);
    let conn = top.find("Connection:").expect("a Connection heading");
    assert!(
        top[conn..].contains("--socket") && top[conn..].contains("--tcp"),
        "{top}"
    );
    let sim = help(&["simulate", "--help"]);
    assert!(!sim.contains("--socket") && !sim.contains("--tcp"), "{sim}");
    for cmd in ["vm", "place", "release", "scrub"] {
        let h = help(&[cmd, "--help"]);
        let line = h
            .lines()
            .find(|l| l.trim_start().starts_with("<ID>"))
            .unwrap_or_else(|| panic!("{cmd}: no <ID> argument: {h}"));
        assert!(
            line.trim_start().len() > "<ID>".len() + 4,
            "{cmd}: <ID> undescribed: {h}"
        );
    }
    // A negative count is a bad value, not a flag to escape.
    let out = Command::new(bin("sevplacectl"))
        .args(["place", "x", "--vcpus", "-1"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("-1") && !err.contains("'-- -1'"), "{err}");
    // Octal shown as octal.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sevplaced.toml");
    std::fs::write(&config, "").expect("write config");
    let out = Command::new(bin("sevplaced"))
        .arg("--config")
        .arg(&config)
        .arg("--print-config")
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["socket_mode"], "0660");
}

#[test]
fn top_and_watch_are_readable_when_piped() {
    let d = Daemon::start(&[
        "--host-root",
        fixture("ci-host-2cpu").to_str().expect("utf-8"),
    ]);
    assert!(d
        .ctl(&["place", "web1", "--vcpus", "1", "--confidential", "sev"])
        .status
        .success());
    let out = d.ctl(&["top", "--iterations", "2", "--interval", "0.1"]);
    assert!(out.status.success());
    let screen = text(&out.stdout);
    assert!(
        !screen.contains('\x1b'),
        "terminal codes on a pipe: {screen}"
    );
    assert_eq!(screen.matches("sevplace top").count(), 2, "{screen}");
    let row = screen
        .lines()
        .find(|l| l.starts_with("web1"))
        .unwrap_or_else(|| panic!("{screen}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "-", "pid of a VM without a process: {row}");
    assert_eq!(cols[7], "-", "L3HIT of an untracked VM: {row}");
    let vms = text(&d.ctl(&["vms"]).stdout);
    let vrow = vms
        .lines()
        .find(|l| l.starts_with("web1"))
        .unwrap_or_default();
    assert_eq!(vrow.split_whitespace().nth(7), Some("-"), "{vms}");

    // watch: a header, then one line per event; --json: one object a line.
    for json in [false, true] {
        let mut args = vec!["--socket".to_string(), d.socket.display().to_string()];
        if json {
            args.push("--json".into());
        }
        args.push("watch".into());
        let mut child = Command::new(bin("sevplacectl"))
            .args(&args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn watch");
        std::thread::sleep(Duration::from_millis(500));
        assert!(d.ctl(&["release", "web1"]).status.success());
        assert!(d
            .ctl(&["place", "web1", "--vcpus", "1", "--confidential", "sev"])
            .status
            .success());
        std::thread::sleep(Duration::from_millis(500));
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
        if json {
            assert!(lines.len() >= 2, "{lines:?}");
            for l in &lines {
                serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            }
        } else {
            assert_eq!(
                lines.first().map(String::as_str),
                Some(sevplace::ctl::render::EVENT_HEADER)
            );
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("web1") && l.contains("released")),
                "{lines:?}"
            );
        }
    }
}
