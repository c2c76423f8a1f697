//! Mutual TLS of the TCP listener (rustls with the ring provider): loading
//! and checking the PEM files, the client-certificate check (chain to a
//! configured CA, then an allowed name), the accept loop that hands only
//! finished handshakes to tonic, and the client side used by sevplacectl.
//!
//! A client's names are the DNS names of its certificate's subject
//! alternative names, or its subject common names when it has no DNS SAN.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
/// The rustls configs this module builds, for callers of
/// [`crate::client::channel_tls`].
pub use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsSettings;

/// How long a TCP client may take to finish the TLS handshake; a stalled
/// client is dropped after it.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; the accept loop waits for a slot, so a
/// flood of stalled clients queues in the kernel's backlog instead of
/// holding memory and tasks here.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// A failed handshake is logged at warn level at most once per this
/// interval (with the number of failures in between), every one at debug.
const FAILURE_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// What the file is (CA, certificate, key).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        source: io::Error,
    },
    /// A file holds no usable PEM item of its kind.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// What the file is (CA, certificate, key).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("key {key} does not match the certificate {cert}: {reason}")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// What rustls reported.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The crypto provider of every TLS config here: ring, chosen explicitly so
/// no process-wide default is needed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Every certificate of a PEM file; at least one, each a parseable X.509
/// certificate.
pub(crate) fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no CERTIFICATE block in the file"));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c).map_err(|e| {
            pem_error(
                what,
                path,
                format!("certificate {} is not X.509: {e}", i + 1),
            )
        })?;
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn load_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| pem_error(what, path, format!("no usable private key: {e}")))
}

/// A root store of every certificate in a CA bundle.
fn load_roots(what: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, c) in load_certs(what, path)?.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| pem_error(what, path, format!("certificate {}: {e}", i + 1)))?;
    }
    Ok(Arc::new(roots))
}

/// Checks that `key` is a usable signing key for the leaf of `chain`.
fn check_key_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(), TlsError> {
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), key.clone_key(), provider)
        .map(|_| ())
        .map_err(|e| TlsError::KeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The names a client certificate identifies: its SAN DNS names, or its
/// subject CNs when it has no DNS SAN; lower case.
pub(crate) fn cert_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// The client-certificate check: the chain must verify against the client
/// CAs (webpki: signature, validity period, client-auth usage), then one of
/// the certificate's names must be admitted. A refused name fails the
/// handshake with an `access_denied` alert.
#[derive(Debug)]
struct NameCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// `None`: every certificate that verifies.
    admitted: Option<BTreeSet<String>>,
}

impl ClientCertVerifier for NameCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let Some(admitted) = &self.admitted else {
            return Ok(verified);
        };
        let names = cert_names(end_entity).map_err(|_| CertificateError::BadEncoding)?;
        if names.iter().any(|n| admitted.contains(n)) {
            Ok(verified)
        } else {
            Err(CertificateError::ApplicationVerificationFailure.into())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server's TLS config from the settings: reads and checks every file
/// (a missing or garbage file, or a key that does not match the
/// certificate, is an error naming the file). HTTP/2 only (ALPN `h2`).
pub(crate) fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = load_certs("server certificate (server.tls_cert)", &s.cert)?;
    let key = load_key("server key (server.tls_key)", &s.key)?;
    check_key_pair(&chain, &key, &s.cert, &s.key, &provider)?;
    let roots = load_roots("client CA (server.tls_client_ca)", &s.client_ca)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(format!("client verifier: {e}")))?;
    let admitted = if s.allowed_clients.is_empty() {
        None
    } else {
        Some(
            s.allowed_clients
                .iter()
                .chain(&s.admin_clients)
                .cloned()
                .collect(),
        )
    };
    let verifier = Arc::new(NameCheckingVerifier { inner, admitted });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::KeyMismatch {
            key: s.key.clone(),
            cert: s.cert.clone(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client's TLS config: trusts the CAs of `ca` for the server, presents
/// `cert` with `key`. HTTP/2 only (ALPN `h2`).
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let roots = load_roots("CA", ca)?;
    let chain = load_certs("client certificate", cert)?;
    let key_der = load_key("client key", key)?;
    check_key_pair(&chain, &key_der, cert, key, &provider)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(format!("server verifier: {e}")))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| TlsError::KeyMismatch {
            key: key.to_path_buf(),
            cert: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of a TLS connection; tonic puts it into every
/// request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsPeerInfo {
    pub(crate) remote_addr: Option<SocketAddr>,
    /// The names of the client's certificate ([`cert_names`]).
    pub(crate) names: Arc<[String]>,
}

/// A server-side TLS connection whose handshake finished, with its peer.
pub(crate) struct MtlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: TlsPeerInfo,
}

impl tonic::transport::server::Connected for MtlsStream {
    type ConnectInfo = TlsPeerInfo;

    fn connect_info(&self) -> TlsPeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Logs failed handshakes: each at debug level, and at warn level at most
/// once per [`FAILURE_WARN_INTERVAL`], so a scanner or a misconfigured
/// client cannot flood the log.
#[derive(Default)]
struct FailureLog {
    /// Time of the last warning and failures since then.
    state: Mutex<(Option<Instant>, u64)>,
}

impl FailureLog {
    fn record(&self, peer: SocketAddr, reason: &str) {
        tracing::debug!(%peer, reason, "TLS handshake failed");
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if st
            .0
            .is_none_or(|t| now.duration_since(t) >= FAILURE_WARN_INTERVAL)
        {
            tracing::warn!(
                %peer,
                reason,
                earlier_failures_not_shown = st.1,
                "TLS handshake failed (more within {}s are logged at debug level)",
                FAILURE_WARN_INTERVAL.as_secs()
            );
            *st = (Some(now), 0);
        } else {
            st.1 += 1;
        }
    }
}

/// Accepts TCP connections and runs each TLS handshake in its own task
/// with `handshake_timeout`; only finished handshakes come out of the
/// stream, so a failing or stalled client never reaches (or stops) the
/// gRPC server. The loop ends when the stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) -> ReceiverStream<Result<MtlsStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(config),
        handshake_timeout,
        tx,
        metrics,
    ));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    tx: mpsc::Sender<Result<MtlsStream, io::Error>>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let failures = Arc::new(FailureLog::default());
    loop {
        let slot = tokio::select! {
            _ = tx.closed() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // and keep accepting.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let failures = failures.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let result = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
            metrics.observe_tls_handshake(match &result {
                Ok(Ok(_)) => "ok",
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => "closed",
                Ok(Err(_)) => "refused",
                Err(_) => "timeout",
            });
            match result {
                Ok(Ok(tls)) => {
                    let names = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| cert_names(c).ok())
                        .unwrap_or_default();
                    tracing::debug!(peer = %addr, ?names, "TLS client connected");
                    let stream = MtlsStream {
                        inner: tls,
                        peer: TlsPeerInfo {
                            remote_addr: Some(addr),
                            names: names.into(),
                        },
                    };
                    // A closed channel means the server is stopping.
                    let _ = tx.send(Ok(stream)).await;
                }
                // A connection closed before or during the ClientHello is
                // a TCP probe (load balancer, port scan), not a TLS client.
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(peer = %addr, error = %e, "connection closed before the TLS handshake finished")
                }
                Ok(Err(e)) => failures.record(addr, &e.to_string()),
                Err(_) => failures.record(addr, "handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests;
