//! The daemon's listeners: the gRPC Unix socket (with single-instance
//! locking and safe stale-socket replacement), optional TCP, and the HTTP
//! `/metrics` endpoint.

use std::convert::Infallible;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another daemon holds the socket's lock: the socket, then the lock file.
    #[error("another sevplaced is running on {0} (lock {1} is held); refusing to take its socket")]
    AlreadyRunning(PathBuf, PathBuf),
    /// The socket path holds a file that is not a socket.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// A file operation on the socket, its directory or its lock failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file it was on.
        path: PathBuf,
        /// What it returned.
        source: std::io::Error,
    },
    /// `server.socket_group` names no group.
    #[error("unknown group {0:?} for the socket")]
    UnknownGroup(String),
    /// A TCP address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What binding returned.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ListenError + 'a {
    move |source| ListenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A bound Unix socket and the lock that makes this daemon its only owner.
/// Dropping it removes the socket file; the lock file stays, so a starting
/// daemon never locks an unlinked file.
pub(crate) struct OwnedSocket {
    path: PathBuf,
    _lock: Flock<fs::File>,
}

impl OwnedSocket {
    /// Takes `<path>.lock`, replaces a stale socket (one nobody answers on),
    /// binds, and applies `mode` and `group`.
    pub(crate) fn bind(
        path: &Path,
        mode: u32,
        group: Option<&str>,
    ) -> Result<(Self, UnixListener), ListenError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
                fs::set_permissions(parent, fs::Permissions::from_mode(0o755))
                    .map_err(io("cannot chmod", parent))?;
            }
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                ListenError::AlreadyRunning(path.to_path_buf(), lock_path.clone())
            } else {
                ListenError::Io {
                    what: "cannot lock",
                    path: lock_path.clone(),
                    source: e.into(),
                }
            }
        })?;

        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(ListenError::AlreadyRunning(path.to_path_buf(), lock_path))
                    }
                    Err(_) => {
                        tracing::info!(socket = %path.display(), "replacing stale socket");
                        fs::remove_file(path).map_err(io("cannot remove stale socket", path))?;
                    }
                }
            }
            Ok(_) => return Err(ListenError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot stat", path)(e)),
        }

        let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
            addr: path.display().to_string(),
            source,
        })?;
        let owned = Self {
            path: path.to_path_buf(),
            _lock: lock,
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io("cannot chmod", path))?;
        if let Some(name) = group {
            let g = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| ListenError::UnknownGroup(name.to_string()))?;
            nix::unistd::chown(path, None, Some(g.gid))
                .map_err(|e| io("cannot chown", path)(e.into()))?;
        }
        Ok((owned, listener))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove socket");
            }
        }
    }
}

/// Binds the TCP listener of `/metrics`.
pub(crate) async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind {
            addr: addr.to_string(),
            source,
        })
}

async fn metrics_response(
    metrics: Arc<Metrics>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    let openmetrics = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    Ok(match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") if openmetrics => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode_openmetrics(),
        ),
        (&hyper::Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode_prometheus(),
        ),
        (&hyper::Method::GET, _) => {
            reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
        }
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
    })
}

/// Serves `/metrics` until `shutdown` turns true.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        continue;
                    }
                };
                let m = metrics.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| metrics_response(m.clone(), req));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, "metrics connection ended");
                    }
                });
            }
        }
    }
}
