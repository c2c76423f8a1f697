//! A gRPC client of `sevplaced`: over its Unix socket, or over TCP with
//! mutual TLS (or plaintext TCP against a daemon with `insecure_tcp`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why the daemon could not be reached. Each message says what is wrong
/// and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket does not exist.
    #[error("no socket at {}: sevplaced is not running, or serves another socket; start it (systemctl start sevplaced, or sevplaced) or pass the right --socket", path.display())]
    NoSocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket or a directory above it refused this user.
    #[error("permission denied on {} ({access}): {fix}", path.display())]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
        /// Mode and group of the socket, or the directory that refused.
        access: String,
        /// What to change so this user may connect.
        fix: String,
    },
    /// Nothing accepts connections at the address.
    #[error("sevplaced is not answering at {target} (connection refused): it is not running; start it (systemctl start sevplaced, or sevplaced){hint}")]
    NotAnswering {
        /// The socket path or TCP address.
        target: String,
        /// Text added to the message: a cause seen, or another thing to check.
        hint: &'static str,
    },
    /// The connection attempt took longer than its limit.
    #[error("sevplaced at {target} did not answer within {seconds} s: it is stuck or overloaded; see journalctl -u sevplaced")]
    Timeout {
        /// The socket path or TCP address.
        target: String,
        /// The limit.
        seconds: u64,
    },
    /// Another transport error.
    #[error("cannot connect to sevplaced at {target}: {source}")]
    Transport {
        /// The socket path or TCP address.
        target: String,
        /// What tonic reported.
        source: tonic::transport::Error,
    },
    /// The client TLS settings could not be loaded.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The server name to check the certificate against is not a DNS name or IP address.
    #[error("bad TLS server name {0:?}")]
    ServerName(String),
}

/// How long a connection attempt may take before the daemon counts as not
/// answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The I/O error of the last connection attempt, kept by the connector so
/// the failure can be explained (tonic's error hides it).
type LastError = Arc<Mutex<Option<std::io::Error>>>;

fn keep(last: &LastError, e: std::io::Error) -> std::io::Error {
    let copy = std::io::Error::new(e.kind(), e.to_string());
    if let Ok(mut l) = last.lock() {
        *l = Some(e);
    }
    copy
}

fn taken(last: &LastError) -> Option<std::io::Error> {
    last.lock().ok().and_then(|mut l| l.take())
}

/// `mode 0660, owner root, group sevplace` of a path, from its metadata.
fn describe_access(path: &Path) -> Option<(String, Option<String>)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let name_of_group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
        .ok()
        .flatten()
        .map(|g| g.name);
    let owner = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid()))
        .ok()
        .flatten()
        .map_or(meta.uid().to_string(), |u| u.name);
    let group = name_of_group.clone().unwrap_or(meta.gid().to_string());
    Some((
        format!(
            "mode {:04o}, owner {owner}, group {group}",
            meta.mode() & 0o7777
        ),
        name_of_group,
    ))
}

/// The error of a failed connection to the Unix socket `path`.
pub(crate) fn unix_error(path: &Path, e: &std::io::Error) -> Option<ConnectError> {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => Some(ConnectError::NoSocket {
            path: path.to_path_buf(),
        }),
        ErrorKind::ConnectionRefused => Some(ConnectError::NotAnswering {
            target: path.display().to_string(),
            hint: " (the socket file is left from an earlier run; sevplaced replaces it at start)",
        }),
        ErrorKind::PermissionDenied => {
            // The socket itself, or the first directory above it that
            // refuses this user.
            let (access, group) = describe_access(path)
                .or_else(|| path.ancestors().skip(1).find_map(describe_access))
                .unwrap_or_else(|| ("not readable".into(), None));
            let fix = match group {
                Some(g) if g != "root" => format!(
                    "run as root, or as a member of group {g} (usermod -aG {g} $USER, then log in again)"
                ),
                _ => "run as root, or set server.socket_group and server.read_group to a group this user is in".into(),
            };
            Some(ConnectError::PermissionDenied {
                path: path.to_path_buf(),
                access,
                fix,
            })
        }
        _ => None,
    }
}

/// The error of a failed TCP connection to `addr`.
fn tcp_error(addr: &str, e: &std::io::Error) -> Option<ConnectError> {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Some(ConnectError::NotAnswering {
            target: addr.to_string(),
            hint: ", or check that server.listen_tcp is this address",
        }),
        std::io::ErrorKind::TimedOut => Some(ConnectError::Timeout {
            target: addr.to_string(),
            seconds: CONNECT_TIMEOUT.as_secs(),
        }),
        _ => None,
    }
}

/// Opens a channel to the daemon's socket.
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let target = socket.display().to_string();
    let p = socket.to_path_buf();
    let last: LastError = Arc::default();
    let seen = last.clone();
    // The URI is not used for a Unix socket; it must only parse.
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(CONNECT_TIMEOUT);
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            let last = seen.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| keep(&last, e))?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|source| {
            taken(&last)
                .and_then(|e| unix_error(socket, &e))
                .unwrap_or(ConnectError::Transport { target, source })
        })
}

/// A `SevplaceService` client on the daemon's socket.
pub async fn connect(socket: &Path) -> Result<SevplaceServiceClient<Channel>, ConnectError> {
    Ok(SevplaceServiceClient::new(channel(socket).await?))
}

/// The host part of `host:port` or `[v6]:port`: the default TLS server
/// name.
fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

fn endpoint(addr: &str) -> Result<Endpoint, ConnectError> {
    Endpoint::from_shared(format!("http://{addr}")).map_err(|source| ConnectError::Transport {
        target: addr.to_string(),
        source,
    })
}

/// Opens a mutual-TLS channel to `addr` (`host:port`). The server's
/// certificate must be valid for `server_name` (default: the host part of
/// `addr`, a DNS name or an IP address).
pub async fn channel_tls(
    addr: &str,
    server_name: Option<&str>,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, ConnectError> {
    let name = server_name.unwrap_or_else(|| host_of(addr)).to_string();
    let name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|_| ConnectError::ServerName(name))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.to_string();
    let last: LastError = Arc::default();
    let seen = last.clone();
    endpoint(addr)?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let target = target.clone();
            let last = seen.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target)
                    .await
                    .map_err(|e| keep(&last, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| {
            taken(&last)
                .and_then(|e| tcp_error(addr, &e))
                .unwrap_or(ConnectError::Transport {
                    target: addr.to_string(),
                    source,
                })
        })
}

/// Opens a plaintext TCP channel to `addr` (a daemon with `insecure_tcp`).
pub async fn channel_tcp(addr: &str) -> Result<Channel, ConnectError> {
    let target = addr.to_string();
    let last: LastError = Arc::default();
    let seen = last.clone();
    endpoint(addr)?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            let last = seen.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target)
                    .await
                    .map_err(|e| keep(&last, e))?;
                Ok::<_, std::io::Error>(TokioIo::new(tcp))
            }
        }))
        .await
        .map_err(|source| {
            taken(&last)
                .and_then(|e| tcp_error(addr, &e))
                .unwrap_or(ConnectError::Transport {
                    target: addr.to_string(),
                    source,
                })
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_name_defaults_to_the_host() {
        assert_eq!(super::host_of("localhost:9479"), "localhost");
        assert_eq!(super::host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(super::host_of("[::1]:1"), "::1");
        assert_eq!(super::host_of("agent.example"), "agent.example");
    }
}
