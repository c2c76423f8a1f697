//! A gRPC client of `sevplaced`: over its Unix socket, or over TCP with
//! mutual TLS (or plaintext TCP against a daemon with `insecure_tcp`).

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to sevplaced at {target}: {source}")]
    Transport {
        target: String,
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("bad TLS server name {0:?}")]
    ServerName(String),
}

/// Opens a channel to the daemon's socket.
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let target = socket.display().to_string();
    let p = socket.to_path_buf();
    // The URI is not used for a Unix socket; it must only parse.
    let endpoint = Endpoint::from_static("http://localhost");
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|source| ConnectError::Transport { target, source })
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
    endpoint(addr)?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| ConnectError::Transport {
            target: addr.to_string(),
            source,
        })
}

/// Opens a plaintext TCP channel to `addr` (a daemon with `insecure_tcp`).
pub async fn channel_tcp(addr: &str) -> Result<Channel, ConnectError> {
    endpoint(addr)?
        .connect()
        .await
        .map_err(|source| ConnectError::Transport {
            target: addr.to_string(),
            source,
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
