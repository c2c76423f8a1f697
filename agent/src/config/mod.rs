//! Settings of `sevplaced`: embedded defaults, then a TOML file (default
//! `/etc/sevplace/sevplaced.toml`, a missing file is fine), then
//! `SEVPLACE__SECTION__KEY` environment variables, then command-line flags.
//!
//! Unknown keys and bad values fail at start with the key named.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::cpuset::CpuSet;

pub(crate) mod fleet;

/// The embedded defaults; also the list of known keys.
pub(crate) const DEFAULTS_TOML: &str = include_str!("defaults.toml");

/// Default config file.
pub(crate) const DEFAULT_CONFIG_FILE: &str = "/etc/sevplace/sevplaced.toml";

/// Prefix of environment overrides: `SEVPLACE__SERVER__SOCKET`.
pub(crate) const ENV_PREFIX: &str = "SEVPLACE";

/// Why the settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key that no setting has.
    #[error("unknown config key `{key}` (from {origin})")]
    UnknownKey {
        /// The key, dotted (`server.socket`).
        key: String,
        /// Where it came from (a file, the environment).
        origin: String,
    },
    /// A value that the key does not take.
    #[error("bad value for config key `{key}`: {reason}")]
    BadValue {
        /// The key, dotted.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// The config crate could not merge or parse the sources.
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    /// TCP is on without the mutual TLS files or `insecure_tcp`.
    #[error(
        "server.listen_tcp is set, and TCP is served with mutual TLS only: set {missing} \
         (or server.insecure_tcp = true for plaintext read-only TCP)"
    )]
    TcpNeedsTls {
        /// The TLS keys left unset.
        missing: String,
    },
    /// `insecure_tcp` is set together with TLS files.
    #[error(
        "server.insecure_tcp = true conflicts with {set}: TCP is either plaintext or mutual TLS"
    )]
    InsecureWithTls {
        /// The TLS keys that are set.
        set: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// When text logs carry ANSI colour codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogColor {
    /// Only when stderr is a terminal (never into a file, a pipe or the
    /// journal).
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl LogColor {
    /// Whether to colour, given whether stderr is a terminal.
    pub fn enabled(self, stderr_is_terminal: bool) -> bool {
        match self {
            LogColor::Auto => stderr_is_terminal,
            LogColor::Always => true,
            LogColor::Never => false,
        }
    }
}

/// Permission bits as the octal string they are written in (`"0660"`).
fn serialize_octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

/// Mutual TLS of the TCP listener: paths are read (and checked) when the
/// daemon starts, by [`crate::tls::server_config`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct TlsSettings {
    /// Server certificate chain, PEM, leaf first.
    pub(crate) cert: PathBuf,
    /// Private key of `cert`, PEM.
    pub(crate) key: PathBuf,
    /// CAs that sign client certificates, PEM bundle.
    pub(crate) client_ca: PathBuf,
    /// Admitted client names (lower case); empty: every certificate the CA
    /// signed.
    pub(crate) allowed_clients: Vec<String>,
    /// Client names that may make mutating calls (lower case).
    pub(crate) admin_clients: Vec<String>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Settings {
    /// `server.socket`: path of the gRPC Unix socket.
    pub(crate) socket: PathBuf,
    /// `server.socket_mode`: permission bits of the socket.
    #[serde(serialize_with = "serialize_octal")]
    pub(crate) socket_mode: u32,
    /// `server.socket_group`: group that owns the socket.
    pub(crate) socket_group: Option<String>,
    /// `server.read_group`: group whose members may make read-only calls.
    pub(crate) read_group: Option<String>,
    /// `server.admin_group`: group whose members may also make mutating calls.
    pub(crate) admin_group: Option<String>,
    /// `server.max_message_bytes`: largest request accepted.
    pub(crate) max_message_bytes: usize,
    /// `server.max_concurrent_streams`: concurrent calls per connection.
    pub(crate) max_concurrent_streams: u32,
    /// `server.request_timeout_ms`: time limit of one call until its answer starts.
    pub(crate) request_timeout_ms: u64,
    /// `server.scrub_min_interval_ms`: least time between two ScrubVm of one VM.
    pub(crate) scrub_min_interval_ms: u64,
    /// `server.listen_tcp`: the TCP address to serve on, if any.
    pub(crate) listen_tcp: Option<SocketAddr>,
    /// mTLS of `listen_tcp`; `None` with `listen_tcp` set means
    /// `insecure_tcp` (plaintext, read-only).
    pub(crate) tls: Option<TlsSettings>,
    /// `server.insecure_tcp`: TCP without TLS, read-only calls only.
    pub(crate) insecure_tcp: bool,
    /// `metrics.addr`: the address of the `/metrics` HTTP server, if any.
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// `host.root`: prefix of every host path the agent reads or writes.
    pub(crate) host_root: PathBuf,
    /// `state.dir`: directory of the intent checkpoint.
    pub(crate) state_dir: PathBuf,
    /// `placement.reserved_cpus`: CPUs kept for the host, never given to VMs.
    pub(crate) reserved_cpus: CpuSet,
    /// Plain dedicated VMs get whole cores too (no SMT sharing between
    /// plain VMs).
    pub(crate) whole_cores_for_plain_vms: bool,
    /// `reconcile.period_ms`: time between two reconcile passes.
    pub(crate) reconcile_period_ms: u64,
    /// Passes between two full procfs rescans.
    pub(crate) full_rescan_every: u32,
    /// `reconcile.auto_place_confidential`: place confidential VMs that no call placed.
    pub(crate) auto_place_confidential: bool,
    /// `log.format`.
    pub log_format: LogFormat,
    /// `log.color`.
    pub log_color: LogColor,
    /// `log.level`: a tracing filter (`info`, `sevplace=debug`).
    pub log_level: String,
    /// `[fleet]`; `None` when reporting is off.
    pub(crate) fleet: Option<fleet::FleetSettings>,
}

impl Settings {
    /// A host path under `host_root`: `host_path("/sys")`.
    pub(crate) fn host_path(&self, abs: &str) -> PathBuf {
        self.host_root.join(abs.trim_start_matches('/'))
    }
}

/// Overrides given as command-line flags; `None` leaves the value alone.
#[derive(Debug, Clone, Default)]
pub struct FlagOverrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--listen-tcp`.
    pub listen_tcp: Option<String>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<String>,
    /// `--host-root`.
    pub host_root: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<String>,
}

/// The default state directory for this user: `/var/lib/sevplace` for
/// root, else `$XDG_STATE_HOME/sevplace` or `$HOME/.local/state/sevplace`
/// (`None` without either variable). `env` is the process environment.
pub(crate) fn default_state_dir(is_root: bool, env: &[(String, String)]) -> Option<PathBuf> {
    if is_root {
        return Some(PathBuf::from("/var/lib/sevplace"));
    }
    let var = |k: &str| {
        env.iter()
            .find(|(n, v)| n == k && v.starts_with('/'))
            .map(|(_, v)| PathBuf::from(v))
    };
    var("XDG_STATE_HOME")
        .map(|d| d.join("sevplace"))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/sevplace")))
}

/// The default socket path for this user: `/run/sevplace/sevplaced.sock`
/// for root, else under `$XDG_RUNTIME_DIR` or `/tmp/sevplace-UID`.
pub(crate) fn default_socket() -> PathBuf {
    let uid = nix::unistd::Uid::effective();
    if uid.is_root() {
        return PathBuf::from("/run/sevplace/sevplaced.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("sevplace/sevplaced.sock"),
        _ => PathBuf::from(format!("/tmp/sevplace-{uid}/sevplaced.sock")),
    }
}

fn known_keys() -> Result<BTreeSet<String>, ConfigError> {
    let table: toml::Table =
        DEFAULTS_TOML
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::BadValue {
                key: "<embedded defaults>".into(),
                reason: e.to_string(),
            })?;
    let mut keys = BTreeSet::new();
    for (section, v) in table {
        if let toml::Value::Table(t) = v {
            for k in t.keys() {
                keys.insert(format!("{section}.{k}"));
            }
        }
    }
    Ok(keys)
}

/// Lists `section.key` paths of a config value tree.
fn key_paths(prefix: &str, v: &config::Value, out: &mut Vec<String>) {
    match &v.kind {
        config::ValueKind::Table(t) => {
            for (k, child) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                key_paths(&p, child, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn check_keys(
    source: &dyn config::Source,
    origin: &str,
    known: &BTreeSet<String>,
) -> Result<(), ConfigError> {
    let map = source.collect()?;
    let mut keys = Vec::new();
    for (k, v) in &map {
        key_paths(k, v, &mut keys);
    }
    match keys.into_iter().find(|k| !known.contains(k)) {
        Some(key) => Err(ConfigError::UnknownKey {
            origin: origin.to_string(),
            key,
        }),
        None => Ok(()),
    }
}

/// Builds the settings. `file`: an explicit `--config` (must exist) or the
/// default file (may be absent). `env`: the environment to read overrides
/// from (the process environment in the daemon, a map in tests).
pub fn load(
    file: Option<&Path>,
    env: &[(String, String)],
    flags: &FlagOverrides,
) -> Result<Settings, ConfigError> {
    let known = known_keys()?;
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        DEFAULTS_TOML,
        config::FileFormat::Toml,
    ));

    let (path, required) = match file {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let src = config::File::from_str(&text, config::FileFormat::Toml);
            check_keys(&src, &path.display().to_string(), &known)?;
            builder = builder.add_source(src);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
        Err(source) => return Err(ConfigError::File { path, source }),
    }

    let env_map: std::collections::HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .cloned()
        .collect();
    let env_src = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .source(Some(env_map));
    check_keys(&env_src, "environment", &known)?;
    builder = builder.add_source(env_src);

    let flag_values: [(&str, Option<String>); 6] = [
        (
            "server.socket",
            flags.socket.as_ref().map(|p| p.display().to_string()),
        ),
        ("server.listen_tcp", flags.listen_tcp.clone()),
        ("metrics.addr", flags.metrics_addr.clone()),
        (
            "host.root",
            flags.host_root.as_ref().map(|p| p.display().to_string()),
        ),
        (
            "state.dir",
            flags.state_dir.as_ref().map(|p| p.display().to_string()),
        ),
        ("log.format", flags.log_format.clone()),
    ];
    for (key, value) in flag_values {
        if let Some(v) = value {
            builder = builder.set_override(key, v)?;
        }
    }
    let cfg = builder.build()?;
    validate(&cfg, env)
}

pub(crate) fn get_string(cfg: &config::Config, key: &str) -> Result<String, ConfigError> {
    cfg.get_string(key).map_err(|e| ConfigError::BadValue {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// The integer setting `key`, checked against `lo..=hi`, in the type the
/// setting is kept in (every range fits its type).
fn int_in<T: TryFrom<i64>>(
    cfg: &config::Config,
    key: &str,
    lo: i64,
    hi: i64,
) -> Result<T, ConfigError> {
    let v = cfg.get_int(key).map_err(|e| bad(key, e))?;
    if !(lo..=hi).contains(&v) {
        return Err(bad(key, format!("{v} is outside {lo}..={hi}")));
    }
    T::try_from(v).map_err(|_| {
        bad(
            key,
            format!("{v} does not fit in {}", std::any::type_name::<T>()),
        )
    })
}

pub(crate) fn bad(key: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn optional_addr(cfg: &config::Config, key: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let s = get_string(cfg, key)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.trim()
        .parse()
        .map(Some)
        .map_err(|e| bad(key, format!("{s:?} is not an IP:port address ({e})")))
}

/// A list of client names: a TOML array of strings, or (from the
/// environment) one string of names separated by commas or spaces. Names
/// are DNS names, compared case-insensitively, so they are kept lower case.
fn name_list(cfg: &config::Config, key: &str) -> Result<Vec<String>, ConfigError> {
    let value: config::Value = cfg.get(key).map_err(|e| bad(key, e))?;
    let items: Vec<String> = match value.kind {
        config::ValueKind::Array(a) => a
            .into_iter()
            .map(|v| v.into_string().map_err(|e| bad(key, e)))
            .collect::<Result<_, _>>()?,
        config::ValueKind::String(s) => s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
        _ => return Err(bad(key, "must be a list of names")),
    };
    items
        .into_iter()
        .map(|n| {
            let n = n.trim().to_ascii_lowercase();
            if n.is_empty() || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(bad(key, format!("{n:?} is not a client name")))
            } else {
                Ok(n)
            }
        })
        .collect()
}

/// The TCP rule: with `listen_tcp` set, either all three TLS paths are set
/// or `insecure_tcp` is true, never both and never neither.
fn tcp_security(
    cfg: &config::Config,
    listen_tcp: Option<SocketAddr>,
) -> Result<(Option<TlsSettings>, bool), ConfigError> {
    let insecure = cfg
        .get_bool("server.insecure_tcp")
        .map_err(|e| bad("server.insecure_tcp", e))?;
    let paths = ["server.tls_cert", "server.tls_key", "server.tls_client_ca"];
    let mut values = Vec::with_capacity(paths.len());
    for key in paths {
        values.push(get_string(cfg, key)?.trim().to_string());
    }
    let allowed_clients = name_list(cfg, "server.tls_allowed_clients")?;
    let admin_clients = name_list(cfg, "server.tls_admin_clients")?;
    let set: Vec<&str> = paths
        .iter()
        .zip(&values)
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, _)| *k)
        .collect();
    if listen_tcp.is_none() {
        // Nothing listens on TCP: the TLS keys are unused; their name lists
        // were still checked above, so a typo shows before it matters.
        return Ok((None, insecure));
    }
    if insecure {
        if !set.is_empty() {
            return Err(ConfigError::InsecureWithTls {
                set: set.join(", "),
            });
        }
        return Ok((None, true));
    }
    let missing: Vec<&str> = paths
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.is_empty())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        return Err(ConfigError::TcpNeedsTls {
            missing: missing.join(", "),
        });
    }
    let [cert, key, client_ca] = [0, 1, 2].map(|i| PathBuf::from(&values[i]));
    Ok((
        Some(TlsSettings {
            cert,
            key,
            client_ca,
            allowed_clients,
            admin_clients,
        }),
        false,
    ))
}

fn validate(cfg: &config::Config, env: &[(String, String)]) -> Result<Settings, ConfigError> {
    let socket = get_string(cfg, "server.socket")?;
    let socket = if socket.is_empty() {
        default_socket()
    } else {
        PathBuf::from(socket)
    };
    let mode_s = get_string(cfg, "server.socket_mode")?;
    let socket_mode = u32::from_str_radix(mode_s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            bad(
                "server.socket_mode",
                format!("{mode_s:?} is not octal permission bits"),
            )
        })?;
    let group = get_string(cfg, "server.socket_group")?;
    let host_root = PathBuf::from(get_string(cfg, "host.root")?);
    if !host_root.is_absolute() {
        return Err(bad("host.root", "must be an absolute path"));
    }
    let state_dir = get_string(cfg, "state.dir")?;
    let state_dir = if state_dir.is_empty() {
        default_state_dir(nix::unistd::Uid::effective().is_root(), env).ok_or_else(|| {
            bad(
                "state.dir",
                "empty and neither XDG_STATE_HOME nor HOME is set; set state.dir or --state-dir",
            )
        })?
    } else {
        PathBuf::from(state_dir)
    };
    if !state_dir.is_absolute() {
        return Err(bad("state.dir", "must be an absolute path"));
    }
    let reserved = get_string(cfg, "placement.reserved_cpus")?;
    let reserved_cpus = CpuSet::parse(&reserved).map_err(|e| bad("placement.reserved_cpus", e))?;
    let period: u64 = int_in(cfg, "reconcile.period_ms", 100, 3_600_000)?;
    let max_message_bytes: usize = int_in(cfg, "server.max_message_bytes", 1024, 64 << 20)?;
    let max_concurrent_streams: u32 = int_in(cfg, "server.max_concurrent_streams", 1, 10_000)?;
    let request_timeout_ms: u64 = int_in(cfg, "server.request_timeout_ms", 100, 3_600_000)?;
    let scrub_min_interval_ms: u64 = int_in(cfg, "server.scrub_min_interval_ms", 0, 3_600_000)?;
    let log_format = match get_string(cfg, "log.format")?.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(bad("log.format", format!("{other:?} is not text or json"))),
    };
    let log_color = match get_string(cfg, "log.color")?.as_str() {
        "auto" => LogColor::Auto,
        "always" => LogColor::Always,
        "never" => LogColor::Never,
        other => {
            return Err(bad(
                "log.color",
                format!("{other:?} is not auto, always or never"),
            ))
        }
    };
    let log_level = get_string(cfg, "log.level")?;
    tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| bad("log.level", e))?;
    let listen_tcp = optional_addr(cfg, "server.listen_tcp")?;
    let (tls, insecure_tcp) = tcp_security(cfg, listen_tcp)?;
    let fleet = fleet::settings(cfg)?;
    Ok(Settings {
        fleet,
        socket,
        socket_mode,
        socket_group: (!group.is_empty()).then_some(group),
        read_group: Some(get_string(cfg, "server.read_group")?).filter(|g| !g.is_empty()),
        admin_group: Some(get_string(cfg, "server.admin_group")?).filter(|g| !g.is_empty()),
        max_message_bytes,
        max_concurrent_streams,
        request_timeout_ms,
        scrub_min_interval_ms,
        listen_tcp,
        tls,
        insecure_tcp,
        metrics_addr: optional_addr(cfg, "metrics.addr")?,
        host_root,
        state_dir,
        reserved_cpus,
        whole_cores_for_plain_vms: cfg
            .get_bool("placement.whole_cores_for_plain_vms")
            .map_err(|e| bad("placement.whole_cores_for_plain_vms", e))?,
        reconcile_period_ms: period,
        full_rescan_every: int_in(cfg, "reconcile.full_rescan_every", 1, 10_000)?,
        auto_place_confidential: cfg
            .get_bool("reconcile.auto_place_confidential")
            .map_err(|e| bad("reconcile.auto_place_confidential", e))?,
        log_format,
        log_color,
        log_level,
    })
}

#[cfg(test)]
mod tests;
