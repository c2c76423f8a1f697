//! The audit trail of mutating calls: one `info` line per PlaceVm,
//! ReleaseVm and ScrubVm answer (denials included) with the RPC, the VM id,
//! the caller as the transport knows it and the result, under the log
//! target `sevplace::audit` (fields in [`record`]); and the counter
//! `sevplace_audit_events_total{rpc,result}`.

use std::fmt;

use tonic::Status;

use crate::access::Peer;
use crate::metrics::Metrics;

/// The caller of an audited call, as one log field: `uid=0 gid=0 pid=42`
/// on the Unix socket, `tls=orchestrator addr=10.0.0.1:50000` on mutual
/// TLS, `tcp` on plaintext TCP.
pub(crate) struct Caller<'a>(pub &'a Peer);

impl fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Peer::Local { uid, gid, pid, .. } => {
                write!(f, "uid={uid} gid={gid}")?;
                match pid {
                    Some(p) => write!(f, " pid={p}"),
                    None => write!(f, " pid=unknown"),
                }
            }
            Peer::Tls { names, addr } => {
                write!(f, "tls={}", names.join(","))?;
                if let Some(a) = addr {
                    write!(f, " addr={a}")?;
                }
                Ok(())
            }
            Peer::Remote => write!(f, "tcp"),
        }
    }
}

/// The `result` label and log field: `ok`, or the gRPC code name
/// (`PermissionDenied`, `NotFound`, ...).
pub(crate) fn result_name(outcome: Result<(), &Status>) -> String {
    match outcome {
        Ok(()) => "ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// Logs and counts one answered mutating call. The caller's fields
/// depend on the transport: `transport="unix"` with `uid`, `gid`, `pid`
/// (from SO_PEERCRED); `transport="tls"` with `client` (the certificate's
/// names) and `addr`; `transport="tcp"` (plaintext, no identity). `error`
/// is the message of a failed call, empty on success.
pub(crate) fn record(
    metrics: &Metrics,
    rpc: &'static str,
    vm_id: &str,
    peer: &Peer,
    outcome: Result<(), &Status>,
) {
    let result = result_name(outcome);
    metrics.observe_audit(rpc, &result);
    let error = outcome.err().map_or("", |s| s.message());
    const T: &str = "sevplace::audit";
    match peer {
        Peer::Local { uid, gid, pid, .. } => tracing::info!(
            target: T,
            rpc,
            vm_id,
            transport = "unix",
            uid,
            gid,
            pid = pid.unwrap_or(0),
            %result,
            error,
            "audit"
        ),
        Peer::Tls { names, addr } => tracing::info!(
            target: T,
            rpc,
            vm_id,
            transport = "tls",
            client = %names.join(","),
            addr = %addr.map_or_else(String::new, |a| a.to_string()),
            %result,
            error,
            "audit"
        ),
        Peer::Remote => tracing::info!(
            target: T,
            rpc,
            vm_id,
            transport = "tcp",
            %result,
            error,
            "audit"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_fields() {
        let local = Peer::Local {
            uid: 1000,
            gid: 100,
            pid: Some(42),
            gids: vec![100],
        };
        assert_eq!(Caller(&local).to_string(), "uid=1000 gid=100 pid=42");
        let tls = Peer::Tls {
            names: vec!["orchestrator".into()],
            addr: "127.0.0.1:5000".parse().ok(),
        };
        assert_eq!(
            Caller(&tls).to_string(),
            "tls=orchestrator addr=127.0.0.1:5000"
        );
        assert_eq!(Caller(&Peer::Remote).to_string(), "tcp");
        assert_eq!(result_name(Ok(())), "ok");
        assert_eq!(
            result_name(Err(&Status::permission_denied("no"))),
            "PermissionDenied"
        );
    }
}
