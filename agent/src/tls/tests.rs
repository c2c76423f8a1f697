//! Real TLS connections to a real listener with certificates made by rcgen
//! at test time; the service behind it is grpc.health.v1.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn new_ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

/// A leaf certificate and key (PEM) signed by `ca`.
fn leaf(ca: &Ca, sans: &[&str], cn: Option<&str>, server: bool, expired: bool) -> (String, String) {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = rcgen::date_time_ymd(2019, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Every file of the tests in one directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Self { dir };
        let ca = new_ca("sevplace test CA");
        let other = new_ca("some other CA");
        pki.write("ca.pem", &ca.pem);
        let put = |name: &str, (cert, key): (String, String)| {
            pki.write(&format!("{name}.pem"), &cert);
            pki.write(&format!("{name}-key.pem"), &key);
        };
        put(
            "server",
            leaf(&ca, &["localhost", "127.0.0.1"], None, true, false),
        );
        put("good", leaf(&ca, &["monitor.example"], None, false, false));
        put(
            "cn-only",
            leaf(&ca, &[], Some("Monitor.Example"), false, false),
        );
        put(
            "wrong-name",
            leaf(&ca, &["stranger.example"], None, false, false),
        );
        put(
            "expired",
            leaf(&ca, &["monitor.example"], None, false, true),
        );
        put(
            "unknown-ca",
            leaf(&other, &["monitor.example"], None, false, false),
        );
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn settings(&self, allowed: &[&str]) -> TlsSettings {
        TlsSettings {
            cert: self.path("server.pem"),
            key: self.path("server-key.pem"),
            client_ca: self.path("ca.pem"),
            allowed_clients: allowed.iter().map(|s| s.to_string()).collect(),
            admin_clients: Vec::new(),
        }
    }

    fn client(&self, name: &str) -> Arc<ClientConfig> {
        client_config(
            &self.path("ca.pem"),
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}-key.pem")),
        )
        .unwrap()
    }
}

/// Serves grpc.health.v1 over mutual TLS on 127.0.0.1; returns the address.
async fn serve(config: Arc<ServerConfig>, handshake_timeout: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = incoming(
        listener,
        config,
        handshake_timeout,
        Arc::new(crate::metrics::Metrics::new()),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    addr
}

/// One health check over a new connection: Ok, or where it failed.
async fn check(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<(), String> {
    let ch = crate::client::channel_tls(&addr.to_string(), Some("localhost"), config)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_client_passes_and_bad_ones_fail_without_stopping_the_listener() {
    let pki = Pki::new();
    let config = server_config(&pki.settings(&["monitor.example"])).unwrap();
    let addr = serve(config, Duration::from_secs(5)).await;

    check(addr, pki.client("good")).await.unwrap();
    // A CN is the name when the certificate has no DNS SAN; case does not
    // matter.
    check(addr, pki.client("cn-only")).await.unwrap();
    for bad in ["wrong-name", "expired", "unknown-ca"] {
        // The client's key and chain are fine; it is the server that
        // refuses. With TLS 1.3 the client learns it on the first read, so
        // the connect or the call fails.
        let config = client_config(
            &pki.path("ca.pem"),
            &pki.path(&format!("{bad}.pem")),
            &pki.path(&format!("{bad}-key.pem")),
        )
        .unwrap();
        let r = check(addr, config).await;
        assert!(r.is_err(), "{bad} was admitted");
    }
    // No client certificate at all.
    let roots = load_roots("CA", &pki.path("ca.pem")).unwrap();
    let mut anonymous = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    assert!(check(addr, Arc::new(anonymous)).await.is_err());
    // The listener still serves the good client.
    check(addr, pki.client("good")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_allowed_list_admits_every_certificate_of_the_ca() {
    let pki = Pki::new();
    let config = server_config(&pki.settings(&[])).unwrap();
    let addr = serve(config, Duration::from_secs(5)).await;
    check(addr, pki.client("wrong-name")).await.unwrap();
    check(addr, pki.client("good")).await.unwrap();
    let expired = client_config(
        &pki.path("ca.pem"),
        &pki.path("expired.pem"),
        &pki.path("expired-key.pem"),
    )
    .unwrap();
    assert!(check(addr, expired).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_names_are_admitted_too() {
    let pki = Pki::new();
    let mut s = pki.settings(&["nobody.example"]);
    s.admin_clients = vec!["monitor.example".into()];
    let addr = serve(server_config(&s).unwrap(), Duration::from_secs(5)).await;
    check(addr, pki.client("good")).await.unwrap();
    assert!(check(addr, pki.client("wrong-name")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_dropped_after_the_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let config = server_config(&pki.settings(&[])).unwrap();
    let addr = serve(config, Duration::from_millis(300)).await;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    // Meanwhile a good client is served.
    check(addr, pki.client("good")).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("the server closes a stalled connection")
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server sent {n} bytes to a client that said nothing"
    );
    check(addr, pki.client("good")).await.unwrap();
}

#[test]
fn bad_files_are_named() {
    let pki = Pki::new();
    let name_of = |p: &Path| p.display().to_string();

    let mut s = pki.settings(&[]);
    s.cert = pki.path("missing.pem");
    let e = server_config(&s).unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }), "{e}");
    assert!(e.to_string().contains(&name_of(&s.cert)), "{e}");
    assert!(e.to_string().contains("server.tls_cert"), "{e}");

    pki.write("garbage.pem", "this is not PEM\n");
    let mut s = pki.settings(&[]);
    s.cert = pki.path("garbage.pem");
    let e = server_config(&s).unwrap_err();
    assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    assert!(e.to_string().contains(&name_of(&s.cert)), "{e}");

    pki.write(
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    );
    let mut s = pki.settings(&[]);
    s.client_ca = pki.path("bad-der.pem");
    let e = server_config(&s).unwrap_err();
    assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    assert!(e.to_string().contains("server.tls_client_ca"), "{e}");

    let mut s = pki.settings(&[]);
    s.key = pki.path("server.pem");
    let e = server_config(&s).unwrap_err();
    assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    assert!(e.to_string().contains("server.tls_key"), "{e}");

    // A real key of another certificate.
    let mut s = pki.settings(&[]);
    s.key = pki.path("good-key.pem");
    let e = server_config(&s).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&name_of(&s.key)), "{e}");
    assert!(e.to_string().contains(&name_of(&s.cert)), "{e}");

    let e = client_config(
        &pki.path("ca.pem"),
        &pki.path("good.pem"),
        &pki.path("server-key.pem"),
    )
    .unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
}

/// The verifier's reasons, without a connection: the alert a refused
/// client gets depends on them.
#[test]
fn verifier_reasons() {
    let pki = Pki::new();
    let der = |name: &str| {
        CertificateDer::from_pem_slice(&std::fs::read(pki.path(&format!("{name}.pem"))).unwrap())
            .unwrap()
    };
    let roots = load_roots("CA", &pki.path("ca.pem")).unwrap();
    let verifier = NameCheckingVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap(),
        admitted: Some(["monitor.example".to_string()].into()),
    };
    let now = UnixTime::now();
    assert!(verifier.verify_client_cert(&der("good"), &[], now).is_ok());
    assert!(verifier
        .verify_client_cert(&der("cn-only"), &[], now)
        .is_ok());
    let reason = |name: &str| {
        verifier
            .verify_client_cert(&der(name), &[], now)
            .unwrap_err()
    };
    assert_eq!(
        reason("wrong-name"),
        CertificateError::ApplicationVerificationFailure.into()
    );
    assert!(
        matches!(
            reason("expired"),
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{:?}",
        reason("expired")
    );
    assert_eq!(reason("unknown-ca"), CertificateError::UnknownIssuer.into());
    assert!(verifier.client_auth_mandatory());
}

#[test]
fn names_of_a_certificate() {
    let ca = new_ca("CA");
    let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (c, _) = leaf(
        &ca,
        &["A.example", "b.example", "10.0.0.1"],
        Some("cn"),
        false,
        false,
    );
    assert_eq!(cert_names(&der(&c)).unwrap(), ["a.example", "b.example"]);
    let (c, _) = leaf(&ca, &[], Some("Only-CN"), false, false);
    assert_eq!(cert_names(&der(&c)).unwrap(), ["only-cn"]);
    assert!(cert_names(b"junk").is_err());
}
