//! Who may call what. On the Unix socket the caller is known by
//! `SO_PEERCRED`: read-only RPCs are open to root, the admin group and the
//! read group (to everyone who can connect when no read group is set);
//! mutating RPCs to root, the daemon's own uid and the admin group only. On TCP with mutual TLS
//! the caller is known by the names of its client certificate (admitted at
//! the handshake): read-only RPCs for every admitted client, mutating RPCs
//! for names in `server.tls_admin_clients`. A caller without credentials
//! (plaintext TCP with `server.insecure_tcp`) gets read-only access.

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    Read,
    Admin,
}

/// The caller as the transport knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A Unix socket peer: uid, primary gid, pid, and every group it
    /// belongs to (primary and supplementary).
    Local {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        gids: Vec<u32>,
    },
    /// A mutual-TLS client, known by the names of its certificate (SAN DNS
    /// names, or subject CNs without them); its chain and an admitted name
    /// were checked at the handshake.
    Tls {
        names: Vec<String>,
        addr: Option<std::net::SocketAddr>,
    },
    /// A peer without credentials (plaintext TCP).
    Remote,
}

/// The groups that grant access, resolved at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AccessPolicy {
    pub(crate) read_gid: Option<u32>,
    pub(crate) admin_gid: Option<u32>,
    /// TLS client names (lower case) that may make mutating calls.
    pub(crate) tls_admin_clients: Vec<String>,
    /// The uid the daemon runs as: a local caller with it may do what the
    /// daemon itself can (a non-root daemon is managed by its own user).
    pub(crate) daemon_uid: u32,
}

/// Why a group could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error("unknown group {name:?} for {key}")]
pub struct UnknownGroup {
    pub(crate) key: &'static str,
    pub(crate) name: String,
}

impl AccessPolicy {
    /// Resolves group names (empty: not set).
    pub(crate) fn resolve(
        read_group: Option<&str>,
        admin_group: Option<&str>,
    ) -> Result<Self, UnknownGroup> {
        let gid = |key: &'static str, name: Option<&str>| -> Result<Option<u32>, UnknownGroup> {
            match name.filter(|n| !n.is_empty()) {
                None => Ok(None),
                Some(n) => nix::unistd::Group::from_name(n)
                    .ok()
                    .flatten()
                    .map(|g| Some(g.gid.as_raw()))
                    .ok_or_else(|| UnknownGroup {
                        key,
                        name: n.to_string(),
                    }),
            }
        };
        Ok(Self {
            read_gid: gid("server.read_group", read_group)?,
            admin_gid: gid("server.admin_group", admin_group)?,
            tls_admin_clients: Vec::new(),
            daemon_uid: nix::unistd::Uid::effective().as_raw(),
        })
    }
}

/// The decision: `Err` carries the reason for PERMISSION_DENIED.
pub(crate) fn authorize(peer: &Peer, need: Need, policy: &AccessPolicy) -> Result<(), String> {
    match peer {
        Peer::Remote => match need {
            Need::Read => Ok(()),
            Need::Admin => {
                Err("mutating calls are not accepted over TCP without client credentials".into())
            }
        },
        Peer::Tls { names, .. } => match need {
            Need::Read => Ok(()),
            Need::Admin => {
                if names
                    .iter()
                    .any(|n| policy.tls_admin_clients.iter().any(|a| a == n))
                {
                    Ok(())
                } else {
                    Err(format!(
                        "TLS client {names:?} may not make mutating calls (not in server.tls_admin_clients)"
                    ))
                }
            }
        },
        Peer::Local { uid: 0, .. } => Ok(()),
        Peer::Local { uid, .. } if *uid == policy.daemon_uid => Ok(()),
        Peer::Local { uid, gids, .. } => {
            let in_group = |g: Option<u32>| g.is_some_and(|g| gids.contains(&g));
            let allowed = match need {
                Need::Admin => in_group(policy.admin_gid),
                Need::Read => {
                    policy.read_gid.is_none()
                        || in_group(policy.read_gid)
                        || in_group(policy.admin_gid)
                }
            };
            if allowed {
                Ok(())
            } else {
                Err(format!(
                    "uid {uid} may not make {} calls",
                    if need == Need::Admin {
                        "mutating"
                    } else {
                        "read"
                    }
                ))
            }
        }
    }
}

/// Every group of `uid` (primary `gid` included), from the user database.
pub(crate) fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let mut out = vec![gid];
    if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        if let Ok(name) = std::ffi::CString::new(user.name) {
            if let Ok(gs) = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)) {
                out.extend(gs.into_iter().map(|g| g.as_raw()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let local = |uid, gids: &[u32]| Peer::Local {
            uid,
            gid: gids.first().copied().unwrap_or(uid),
            pid: Some(1),
            gids: gids.to_vec(),
        };
        let open = AccessPolicy::default();
        let grouped = AccessPolicy {
            read_gid: Some(100),
            admin_gid: Some(200),
            tls_admin_clients: vec!["orchestrator".into()],
            daemon_uid: 0,
        };
        let own = AccessPolicy {
            daemon_uid: 1000,
            ..grouped.clone()
        };
        let tls = |names: &[&str]| Peer::Tls {
            names: names.iter().map(|n| n.to_string()).collect(),
            addr: None,
        };
        let cases = [
            (local(0, &[0]), Need::Admin, &grouped, true),
            (local(1000, &[1000]), Need::Read, &open, true),
            (local(1000, &[1000]), Need::Admin, &open, false),
            (local(1000, &[1000]), Need::Read, &grouped, false),
            (local(1000, &[1000, 100]), Need::Read, &grouped, true),
            (local(1000, &[1000, 100]), Need::Admin, &grouped, false),
            (local(1000, &[200]), Need::Admin, &grouped, true),
            (local(1000, &[200]), Need::Read, &grouped, true),
            (Peer::Remote, Need::Read, &grouped, true),
            (Peer::Remote, Need::Admin, &grouped, false),
            (tls(&["monitor"]), Need::Read, &grouped, true),
            (tls(&["monitor"]), Need::Admin, &grouped, false),
            (tls(&[]), Need::Read, &grouped, true),
            (tls(&[]), Need::Admin, &grouped, false),
            (
                tls(&["monitor", "orchestrator"]),
                Need::Admin,
                &grouped,
                true,
            ),
            (tls(&["orchestrator"]), Need::Admin, &open, false),
            (local(1000, &[1000]), Need::Admin, &own, true),
            (local(1001, &[1001]), Need::Admin, &own, false),
        ];
        for (peer, need, policy, want) in cases {
            assert_eq!(
                authorize(&peer, need, policy).is_ok(),
                want,
                "{peer:?} {need:?} {policy:?}"
            );
        }
    }

    #[test]
    fn resolves_groups() {
        assert_eq!(
            AccessPolicy::resolve(Some("root"), None).unwrap().read_gid,
            Some(0)
        );
        assert!(AccessPolicy::resolve(None, Some("no-such-group-xyz")).is_err());
        assert!(groups_of(0, 0).contains(&0));
    }
}
