//! What `:authority` each gRPC listener accepts.
//!
//! grpc-core clients (Python, C++, Ruby, PHP), grpc-java and grpcurl send
//! the path of the Unix socket they dial as `:authority`, percent-encoded
//! (`run%2Fsevplace%2Fsevplaced.sock`) or raw, which is not a valid URI
//! authority. The patched h2 (third_party/h2/PATCHES.md) lets
//! such a request through with the value in [`h2::ext::PathAuthority`]. The
//! Unix socket serves it: the socket path names the peer, and the caller is
//! identified by its peer credentials, not by the authority. The TCP
//! listeners refuse it exactly as stock h2 does, with RST_STREAM
//! PROTOCOL_ERROR, through [`refuse_path_authority`].

use h2::ext::PathAuthority;
use tower::filter::FilterLayer;

/// A request refused by [`refuse_path_authority`]. Its source is the h2
/// PROTOCOL_ERROR that hyper resets the stream with (hyper takes the reason
/// from the error's source chain). The h2 error is the source, not the
/// error itself, because tonic turns a top-level `h2::Error` into a gRPC
/// status answer instead of a reset.
#[derive(Debug, thiserror::Error)]
#[error("malformed :authority {authority:?} on a TCP listener")]
pub(crate) struct PathAuthorityRefused {
    authority: String,
    #[source]
    reset: h2::Error,
}

/// Refuses a request whose `:authority` was a path: the stream is reset
/// with PROTOCOL_ERROR, as stock h2 resets it.
pub(crate) fn refuse_path_authority<B>(
    req: hyper::Request<B>,
) -> Result<hyper::Request<B>, PathAuthorityRefused> {
    match req.extensions().get::<PathAuthority>() {
        Some(authority) => {
            tracing::debug!(
                authority = authority.as_str(),
                "malformed :authority on a TCP listener; resetting the stream"
            );
            Err(PathAuthorityRefused {
                authority: authority.as_str().to_string(),
                reset: h2::Error::from(h2::Reason::PROTOCOL_ERROR),
            })
        }
        None => Ok(req),
    }
}

/// The layer of the TCP listeners that applies [`refuse_path_authority`].
pub(crate) type TcpAuthorityLayer<B> =
    FilterLayer<fn(hyper::Request<B>) -> Result<hyper::Request<B>, PathAuthorityRefused>>;

/// [`TcpAuthorityLayer`] for the request body of a tonic server.
pub(crate) fn tcp_authority_layer() -> TcpAuthorityLayer<tonic::body::Body> {
    FilterLayer::new(refuse_path_authority::<tonic::body::Body>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_path_authority_passes() {
        let req = hyper::Request::builder()
            .uri("http://localhost/sevplace.v1.SevplaceService/GetHost")
            .body(())
            .expect("request");
        assert!(refuse_path_authority(req).is_ok());
    }
}
