//! A gRPC client of `sevplaced` over its Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use sevplace_proto::v1::sevplace_service_client::SevplaceServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to sevplaced at {path}: {source}")]
pub struct ConnectError {
    pub path: PathBuf,
    pub source: tonic::transport::Error,
}

/// Opens a channel to the daemon's socket.
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let path = socket.to_path_buf();
    let p = path.clone();
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
        .map_err(|source| ConnectError { path, source })
}

/// A `SevplaceService` client on the daemon's socket.
pub async fn connect(socket: &Path) -> Result<SevplaceServiceClient<Channel>, ConnectError> {
    Ok(SevplaceServiceClient::new(channel(socket).await?))
}
