//! systemd readiness and watchdog notifications (`sd_notify(3)` protocol:
//! one datagram per message to `$NOTIFY_SOCKET`). Without `NOTIFY_SOCKET`
//! (not started by systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, from the environment systemd sets.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    socket: Option<String>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`.
    pub(crate) fn from_env() -> Self {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_ok)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// The watchdog period systemd expects, if it armed one.
    pub(crate) fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, msg: &str) -> std::io::Result<()> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), path)?;
        }
        Ok(())
    }

    /// `READY=1`: the socket is bound and the first reconcile pass is done.
    pub(crate) fn ready(&self) {
        if let Err(e) = self.send("READY=1\nSTATUS=serving") {
            tracing::warn!(error = %e, "sd_notify READY failed");
        }
    }

    /// `WATCHDOG=1`.
    pub(crate) fn watchdog_ping(&self) {
        if let Err(e) = self.send("WATCHDOG=1") {
            tracing::warn!(error = %e, "sd_notify WATCHDOG failed");
        }
    }

    /// `STOPPING=1`.
    pub(crate) fn stopping(&self) {
        let _ = self.send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some(path.display().to_string()),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.ready();
        n.watchdog_ping();
        let mut buf = [0u8; 128];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        // No socket: nothing happens, nothing fails.
        Notifier {
            socket: None,
            watchdog: None,
        }
        .ready();
    }
}
