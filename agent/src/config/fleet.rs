//! The `[fleet]` section: OpenStack Placement reporting (docs/fleet.md).

use std::path::PathBuf;
use std::time::Duration;

use super::{bad, get_string, int_in, ConfigError};

/// Settings of the `[fleet]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct FleetSettings {
    /// `fleet.placement_url`: the Placement endpoint.
    pub(crate) placement_url: String,
    /// How the client authenticates.
    pub(crate) auth: FleetAuth,
    /// `fleet.host_name`: host part of the provider names.
    pub(crate) host_name: String,
    /// Which provider is the root of this host's tree.
    pub(crate) root: RootChoice,
    /// `fleet.sync_period_ms`: time between two syncs.
    pub(crate) sync_period: Duration,
    /// `fleet.retry_ms`: time before a failed sync is tried again.
    pub(crate) retry_period: Duration,
    /// `fleet.request_timeout_ms`: time limit of one request.
    pub(crate) request_timeout: Duration,
}

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum FleetAuth {
    /// `X-Auth-Token` read from a file (re-read after a 401).
    TokenFile(PathBuf),
    /// A Keystone v3 application credential: a token is issued by
    /// `POST {keystone_url}/v3/auth/tokens` and renewed after a 401.
    ApplicationCredential {
        /// `fleet.keystone_url`.
        keystone_url: String,
        /// `fleet.application_credential_id`.
        id: String,
        /// `fleet.application_credential_secret_file`.
        secret_file: PathBuf,
    },
}

/// Which provider is the root of this host's tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) enum RootChoice {
    /// A provider named after the host, created by the agent when missing.
    Own,
    /// An existing provider (a Nova compute node) by name.
    ExistingName(String),
    /// An existing provider by UUID.
    ExistingUuid(String),
}

/// The host name for provider names: the configured one or the kernel's.
pub(crate) fn default_host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The `[fleet]` section: off, or a URL and exactly one way to
/// authenticate.
pub(super) fn settings(cfg: &config::Config) -> Result<Option<FleetSettings>, ConfigError> {
    let enabled = cfg
        .get_bool("fleet.enabled")
        .map_err(|e| bad("fleet.enabled", e))?;
    let s = |key: &str| get_string(cfg, key).map(|v| v.trim().to_string());
    let url = s("fleet.placement_url")?;
    let token_file = s("fleet.token_file")?;
    let keystone = s("fleet.keystone_url")?;
    let cred_id = s("fleet.application_credential_id")?;
    let cred_secret = s("fleet.application_credential_secret_file")?;
    let host = s("fleet.host_name")?;
    let root_name = s("fleet.root_provider_name")?;
    let root_uuid = s("fleet.root_provider_uuid")?;
    let sync_period: u64 = int_in(cfg, "fleet.sync_period_ms", 1000, 86_400_000)?;
    let retry: u64 = int_in(cfg, "fleet.retry_ms", 100, 3_600_000)?;
    let timeout: u64 = int_in(cfg, "fleet.request_timeout_ms", 100, 600_000)?;
    if !enabled {
        return Ok(None);
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad(
            "fleet.placement_url",
            format!("{url:?} is not an http:// or https:// URL"),
        ));
    }
    let app_cred = [&keystone, &cred_id, &cred_secret];
    let auth = match (token_file.is_empty(), app_cred.iter().all(|v| v.is_empty())) {
        (false, true) => FleetAuth::TokenFile(PathBuf::from(&token_file)),
        (true, false) if app_cred.iter().all(|v| !v.is_empty()) => {
            FleetAuth::ApplicationCredential {
                keystone_url: keystone,
                id: cred_id,
                secret_file: PathBuf::from(cred_secret),
            }
        }
        (true, false) => {
            return Err(bad(
                "fleet.keystone_url",
                "keystone_url, application_credential_id and application_credential_secret_file go together",
            ))
        }
        (false, false) => {
            return Err(bad(
                "fleet.token_file",
                "set either token_file or the application credential keys, not both",
            ))
        }
        (true, true) => {
            return Err(bad(
                "fleet.token_file",
                "fleet reporting needs token_file or an application credential",
            ))
        }
    };
    let root = match (root_name.is_empty(), root_uuid.is_empty()) {
        (true, true) => RootChoice::Own,
        (false, true) => RootChoice::ExistingName(root_name),
        (true, false) => RootChoice::ExistingUuid(root_uuid.to_ascii_lowercase()),
        (false, false) => {
            return Err(bad(
                "fleet.root_provider_name",
                "set root_provider_name or root_provider_uuid, not both",
            ))
        }
    };
    let host_name = if host.is_empty() {
        default_host_name()
    } else {
        host
    };
    if host_name.len() > 180 || !host_name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad(
            "fleet.host_name",
            format!("{host_name:?}: 1-180 printable ASCII characters"),
        ));
    }
    Ok(Some(FleetSettings {
        placement_url: url,
        auth,
        host_name,
        root,
        sync_period: Duration::from_millis(sync_period),
        retry_period: Duration::from_millis(retry),
        request_timeout: Duration::from_millis(timeout),
    }))
}
