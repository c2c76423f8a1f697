//! The real OpenStack Placement service for the fleet tests:
//! openstack-placement from PyPI in a venv made by
//! `scripts/placement-venv.sh`, served by gunicorn on 127.0.0.1, on SQLite
//! (one request at a time) or on a private MariaDB (`mariadbd` from
//! Debian's mariadb-server) for concurrent clients. The configuration sets
//! `[placement] allocation_conflict_retry_count = 1`: with the default
//! (10) concurrent claims over-allocate (docs/fleet.md, "Deploy").

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

/// Where the venv is made (or found), or why it cannot be.
pub fn placement_venv() -> Result<PathBuf, String> {
    static VENV: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    VENV.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/placement-venv.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): openstack-placement could not be installed",
                script.display(),
                out.status
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
}

/// A private MariaDB server on 127.0.0.1, killed on drop.
pub struct MariaDb {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

impl MariaDb {
    /// Starts one, or says why not.
    pub fn start() -> Result<Self, String> {
        let server = find_tool(&["mariadbd", "mysqld"])
            .ok_or("mariadbd is not installed (apt install mariadb-server)")?;
        let install = find_tool(&["mariadb-install-db", "mysql_install_db"])
            .ok_or("mariadb-install-db is not installed")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let out = Command::new(&install)
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--auth-root-authentication-method=normal"])
            .arg("--skip-test-db")
            .output()
            .map_err(|e| format!("{}: {e}", install.display()))?;
        if !out.status.success() {
            return Err(format!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port();
        let mut db = Self {
            child: None,
            dir,
            port,
        };
        let child = Command::new(&server)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", db.dir.path().join("sock").display()))
            .arg(format!(
                "--pid-file={}",
                db.dir.path().join("pid").display()
            ))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                "--innodb-buffer-pool-size=64M",
                "--skip-log-bin",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", server.display()))?;
        db.child = Some(child);
        if !wait_until(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }) {
            return Err("mariadbd did not listen within 60 s".into());
        }
        let client = find_tool(&["mariadb", "mysql"]).ok_or("the mariadb client is missing")?;
        let out = Command::new(client)
            .arg(format!("--socket={}", db.dir.path().join("sock").display()))
            .args(["-e", "CREATE DATABASE placement"])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "CREATE DATABASE failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(db)
    }

    pub fn connection(&self) -> String {
        format!("mysql+pymysql://root@127.0.0.1:{}/placement", self.port)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running Placement API (gunicorn), stopped on drop.
pub struct PlacementService {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    venv: PathBuf,
    pub port: u16,
    threads: u32,
    /// Kept alive as long as the service.
    pub mariadb: Option<MariaDb>,
}

impl PlacementService {
    /// On SQLite, one worker thread; `None` (printed skip) where the venv
    /// cannot be made.
    pub fn start_sqlite(test: &str) -> Option<Self> {
        Self::start(test, None, 1)
    }

    /// On a private MariaDB with `threads` API threads.
    pub fn start_mariadb(test: &str, threads: u32) -> Option<Self> {
        let db = match MariaDb::start() {
            Ok(db) => db,
            Err(reason) => {
                crate::skip(test, "mariadb", reason);
                return None;
            }
        };
        Self::start(test, Some(db), threads)
    }

    fn start(test: &str, db: Option<MariaDb>, threads: u32) -> Option<Self> {
        let venv = match placement_venv() {
            Ok(v) => v,
            Err(reason) => {
                crate::skip(test, "openstack-placement", reason);
                return None;
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let connection = match &db {
            Some(db) => db.connection(),
            None => format!(
                "sqlite:///{}",
                dir.path().join("placement.sqlite").display()
            ),
        };
        std::fs::write(
            dir.path().join("placement.conf"),
            format!(
                "[DEFAULT]\nlog_dir =\n[api]\nauth_strategy = noauth2\n[placement]\nallocation_conflict_retry_count = 1\n[placement_database]\nconnection = {connection}\n"
            ),
        )
        .expect("write placement.conf");
        std::fs::write(dir.path().join("token"), "admin\n").expect("write token");
        let out = Command::new(venv.join("bin/placement-manage"))
            .arg("--config-file")
            .arg(dir.path().join("placement.conf"))
            .args(["db", "sync"])
            .output()
            .expect("run placement-manage");
        assert!(
            out.status.success(),
            "placement-manage db sync: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = Self {
            child: None,
            dir,
            venv,
            port: free_port(),
            threads,
            mariadb: db,
        };
        s.resume();
        Some(s)
    }

    /// Starts gunicorn (again) on the same port and database.
    pub fn resume(&mut self) {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("gunicorn.log")).expect("log file");
        let child = Command::new(self.venv.join("bin/gunicorn"))
            .env("OS_PLACEMENT_CONFIG_DIR", self.dir.path())
            .env("HOME", self.dir.path())
            .arg("--bind")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--workers", "1", "--threads"])
            .arg(self.threads.to_string())
            .args(["--no-control-socket", "--timeout", "120", "-p"])
            .arg(self.dir.path().join("gunicorn.pid"))
            .arg("placement.wsgi.api:application")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn gunicorn");
        self.child = Some(child);
        let url = self.url();
        assert!(
            wait_until(Duration::from_secs(60), || {
                self.client().get("/").is_ok()
            }),
            "Placement at {url} not ready after 60 s; see {}",
            self.dir.path().join("gunicorn.log").display()
        );
    }

    /// Stops gunicorn (the database stays).
    pub fn pause(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// A client with the noauth2 admin token.
    pub fn client(&self) -> sevplace::fleet::PlacementClient {
        sevplace::fleet::PlacementClient::new(
            &self.url(),
            sevplace::fleet::FleetAuth::TokenFile(self.token_file()),
            Duration::from_secs(30),
        )
    }

    /// The `[fleet]` lines of a sevplaced reporting here as `host`.
    pub fn fleet_config(&self, host: &str, extra: &str) -> String {
        format!(
            "[fleet]\nenabled = true\nplacement_url = {:?}\ntoken_file = {:?}\nhost_name = {host:?}\nretry_ms = 300\n{extra}",
            self.url(),
            self.token_file()
        )
    }
}

impl Drop for PlacementService {
    fn drop(&mut self) {
        self.pause();
    }
}
