//! `:authority` on each listener of the real `sevplaced`, with HTTP/2
//! frames written by hand (no Rust HTTP/2 client can send a path as
//! authority): the socket path that grpc-core clients send is served on the
//! Unix socket and refused with RST_STREAM PROTOCOL_ERROR on plaintext TCP
//! and on mutual TLS, as stock h2 refuses it; `localhost` is served
//! everywhere; a malformed authority that is not a path is refused on the
//! Unix socket too.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use sevplace_tests::{free_port, wait_tcp, Daemon, TestPki};

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_GOAWAY: u8 = 7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const PROTOCOL_ERROR: u32 = 1;

/// How the server answered one gRPC health check.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The response message (without the 5-byte gRPC prefix).
    Message(Vec<u8>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a frame payload fits in u32");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    let byte = |x: usize| u8::try_from(x).expect("below 256");
    if v < max {
        out.push(first | byte(v));
        return;
    }
    out.push(first | byte(max));
    v -= max;
    while v >= 128 {
        out.push(byte(v % 128) | 0x80);
        v /= 128;
    }
    out.push(byte(v));
}

/// A header block of literal fields without indexing, new names, no
/// Huffman coding (RFC 7541 section 6.2.2).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend(value.as_bytes());
    }
    out
}

fn read_frame(s: &mut impl Read) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).expect("read frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("read frame payload");
    (head[3], head[4], stream, payload)
}

/// Sends one `grpc.health.v1.Health/Check` with `authority` on a fresh
/// HTTP/2 connection and reads until the server answers stream 1.
fn health_check(s: &mut (impl Read + Write), authority: &str) -> Answer {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    out.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
    // An empty HealthCheckRequest: uncompressed, length 0.
    out.extend(frame(FRAME_DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
    s.write_all(&out).expect("send request");
    s.flush().expect("flush");
    loop {
        let (kind, flags, stream, payload) = read_frame(s);
        match kind {
            FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                s.write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                    .expect("ack settings");
                s.flush().expect("flush");
            }
            FRAME_DATA if stream == 1 => {
                assert!(payload.len() >= 5, "short gRPC message {payload:?}");
                return Answer::Message(payload[5..].to_vec());
            }
            FRAME_RST_STREAM if stream == 1 => {
                return Answer::Reset(u32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]))
            }
            FRAME_GOAWAY => {
                return Answer::GoAway(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]))
            }
            _ => {}
        }
    }
}

/// The `:authority` grpcio 1.85 sends for `unix://<path>`: the path without
/// its leading `/`, each `/` percent-encoded (seen in the h2 debug log).
fn grpc_core_authority(path: &str) -> String {
    path.trim_start_matches('/').replace('/', "%2F")
}

/// HealthCheckResponse { status: SERVING }.
fn serving() -> Answer {
    Answer::Message(vec![0x08, 0x01])
}

fn unix(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).expect("connect to the socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s
}

fn tcp(addr: &str) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).expect("connect over TCP");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s
}

#[test]
fn socket_path_authority_is_served_on_unix_and_refused_on_plaintext_tcp() {
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("sevplaced.toml"),
        format!("[server]\nlisten_tcp = {addr:?}\ninsecure_tcp = true\n"),
    )
    .expect("write config");
    let d = Daemon::start_in(dir, &[], &[]);
    wait_tcp(&addr, Duration::from_secs(10));
    let path = d.socket.display().to_string();

    // What grpcio 1.85 (grpc-core) sends for `unix://<path>`, and the raw
    // path that other clients send.
    let encoded = grpc_core_authority(&path);
    assert_eq!(health_check(&mut unix(&d), &encoded), serving());
    assert_eq!(health_check(&mut unix(&d), &path), serving());
    assert_eq!(health_check(&mut unix(&d), "localhost"), serving());
    // Not a path and not an authority: refused as stock h2 does.
    assert_eq!(
        health_check(&mut unix(&d), "bad authority"),
        Answer::Reset(PROTOCOL_ERROR)
    );

    assert_eq!(health_check(&mut tcp(&addr), "localhost"), serving());
    assert_eq!(
        health_check(&mut tcp(&addr), &path),
        Answer::Reset(PROTOCOL_ERROR)
    );
    assert_eq!(
        health_check(&mut tcp(&addr), &encoded),
        Answer::Reset(PROTOCOL_ERROR)
    );
    assert_eq!(
        health_check(&mut tcp(&addr), "bad authority"),
        Answer::Reset(PROTOCOL_ERROR)
    );
}

#[test]
fn socket_path_authority_is_refused_on_mutual_tls() {
    let pki = TestPki::generate();
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("sevplaced.toml"),
        pki.server_config(&addr, &["monitor.example"], &[]),
    )
    .expect("write config");
    let d = Daemon::start_in(dir, &[], &[]);
    wait_tcp(&addr, Duration::from_secs(10));
    let path = d.socket.display().to_string();

    let tls = |config: Arc<rustls::ClientConfig>| {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let conn = rustls::ClientConnection::new(config, name).expect("TLS client");
        rustls::StreamOwned::new(conn, tcp(&addr))
    };
    assert_eq!(
        health_check(&mut tls(pki.client("monitor")), "localhost"),
        serving()
    );
    assert_eq!(
        health_check(&mut tls(pki.client("monitor")), &path),
        Answer::Reset(PROTOCOL_ERROR)
    );
    assert_eq!(
        health_check(&mut tls(pki.client("monitor")), &grpc_core_authority(&path)),
        Answer::Reset(PROTOCOL_ERROR)
    );
}
