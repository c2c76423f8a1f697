//! A blocking REST client of OpenStack Placement (microversion 1.39) with
//! token-file or Keystone v3 application-credential authentication. It runs
//! on the reporter's own thread, never on the API's.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

/// Microversion sent on every call.
pub(crate) const MICROVERSION: &str = "placement 1.39";

pub(crate) use crate::config::fleet::FleetAuth;

/// Why a Placement call failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The request did not get an answer.
    #[error("{method} {path}: {reason}")]
    Transport {
        /// The HTTP method.
        method: &'static str,
        /// The path under the Placement URL.
        path: String,
        /// What the HTTP client reported.
        reason: String,
    },
    /// Placement answered with an error status.
    #[error("{method} {path}: HTTP {status} {code}: {detail}")]
    Status {
        /// The HTTP method.
        method: &'static str,
        /// The path under the Placement URL.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Placement's error code (`placement.concurrent_update`, ...).
        code: String,
        /// Placement's error detail.
        detail: String,
    },
    /// The answer is not the JSON the call expects.
    #[error("{method} {path}: answer is not the JSON expected: {reason}")]
    Body {
        /// The HTTP method.
        method: &'static str,
        /// The path under the Placement URL.
        path: String,
        /// What is missing or malformed.
        reason: String,
    },
    /// A token or credential file could not be read.
    #[error("cannot read {path}: {source}")]
    CredentialFile {
        /// The file.
        path: PathBuf,
        /// What reading it returned.
        source: std::io::Error,
    },
    /// A token or credential file is empty.
    #[error("{path} is empty")]
    EmptyCredential {
        /// The file.
        path: PathBuf,
    },
    /// Keystone answered without a token.
    #[error("Keystone at {url} issued no token: {reason}")]
    Keystone {
        /// The Keystone URL.
        url: String,
        /// What Keystone answered.
        reason: String,
    },
    /// The provider tree in Placement cannot be made to match this host.
    #[error("{0}")]
    Tree(String),
}

impl FleetError {
    /// A 409 because a generation moved (re-read and retry).
    pub(crate) fn is_generation_conflict(&self) -> bool {
        matches!(self, Self::Status { status: 409, code, .. } if code == "placement.concurrent_update")
    }

    /// A 409 for any other reason (capacity exceeded, in use).
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(self, Self::Status { status: 409, .. })
    }

    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status: 404, .. })
    }
}

/// The Placement endpoint and its credentials.
pub struct PlacementClient {
    agent: ureq::Agent,
    base: String,
    auth: FleetAuth,
    token: Mutex<Option<String>>,
}

fn read_secret(path: &PathBuf) -> Result<String, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|source| FleetError::CredentialFile {
        path: path.clone(),
        source,
    })?;
    let t = text.trim().to_string();
    if t.is_empty() {
        return Err(FleetError::EmptyCredential { path: path.clone() });
    }
    Ok(t)
}

/// Placement's `{"errors": [{"code", "detail"}]}`, or the raw body.
fn error_parts(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let first = &v["errors"][0];
    let code = first["code"].as_str().unwrap_or("").to_string();
    let detail = first["detail"]
        .as_str()
        .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| body.chars().take(300).collect());
    (code, detail)
}

impl PlacementClient {
    /// A client of the Placement API at `base`, authenticating with `auth`; each request may take at most `timeout`.
    pub fn new(base: &str, auth: FleetAuth, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            agent,
            base: base.trim_end_matches('/').to_string(),
            auth,
            token: Mutex::new(None),
        }
    }

    fn issue_token(&self) -> Result<String, FleetError> {
        match &self.auth {
            FleetAuth::TokenFile(path) => read_secret(path),
            FleetAuth::ApplicationCredential {
                keystone_url,
                id,
                secret_file,
            } => {
                let secret = read_secret(secret_file)?;
                let url = format!("{}/v3/auth/tokens", keystone_url.trim_end_matches('/'));
                let body = serde_json::json!({"auth": {"identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret}}}});
                let keystone = |reason: String| FleetError::Keystone {
                    url: url.clone(),
                    reason,
                };
                let resp = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .send(body.to_string())
                    .map_err(|e| keystone(e.to_string()))?;
                if resp.status().as_u16() != 201 {
                    return Err(keystone(format!("HTTP {}", resp.status().as_u16())));
                }
                resp.headers()
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .ok_or_else(|| keystone("no X-Subject-Token header".into()))
            }
        }
    }

    fn token(&self, renew: bool) -> Result<String, FleetError> {
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if renew || t.is_none() {
            *t = Some(self.issue_token()?);
        }
        Ok(t.clone().unwrap_or_default())
    }

    /// One call; `Ok((status, body))` for 2xx, a typed error otherwise. A
    /// 401 renews the token once.
    pub(crate) fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), FleetError> {
        let url = format!("{}{path}", self.base);
        let transport = |reason: String| FleetError::Transport {
            method,
            path: path.to_string(),
            reason,
        };
        let mut renew = false;
        loop {
            let token = self.token(renew)?;
            let result = match (method, body) {
                ("GET", _) => self.with_headers(self.agent.get(&url), &token).call(),
                ("DELETE", _) => self.with_headers(self.agent.delete(&url), &token).call(),
                ("PUT", b) => self
                    .with_headers(self.agent.put(&url), &token)
                    .header("Content-Type", "application/json")
                    .send(b.map(Value::to_string).unwrap_or_default()),
                (_, b) => self
                    .with_headers(self.agent.post(&url), &token)
                    .header("Content-Type", "application/json")
                    .send(b.map(Value::to_string).unwrap_or_default()),
            };
            let mut resp = result.map_err(|e| transport(e.to_string()))?;
            let status = resp.status().as_u16();
            let text = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| transport(e.to_string()))?;
            if status == 401 && !renew {
                renew = true;
                continue;
            }
            if !(200..300).contains(&status) {
                let (code, detail) = error_parts(&text);
                return Err(FleetError::Status {
                    method,
                    path: path.to_string(),
                    status,
                    code,
                    detail,
                });
            }
            if text.trim().is_empty() {
                return Ok((status, Value::Null));
            }
            let v = serde_json::from_str(&text).map_err(|e| FleetError::Body {
                method,
                path: path.to_string(),
                reason: e.to_string(),
            })?;
            return Ok((status, v));
        }
    }

    fn with_headers<B>(
        &self,
        req: ureq::RequestBuilder<B>,
        token: &str,
    ) -> ureq::RequestBuilder<B> {
        req.header("X-Auth-Token", token)
            .header("OpenStack-API-Version", MICROVERSION)
            .header("Accept", "application/json")
    }

    /// `GET path`: the JSON answer, or the error.
    pub fn get(&self, path: &str) -> Result<Value, FleetError> {
        self.call("GET", path, None).map(|(_, v)| v)
    }

    /// `PUT path` with `body`: the JSON answer, or the error.
    pub fn put(&self, path: &str, body: &Value) -> Result<Value, FleetError> {
        self.call("PUT", path, Some(body)).map(|(_, v)| v)
    }

    /// `POST path` with `body`: the JSON answer, or the error.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, FleetError> {
        self.call("POST", path, Some(body)).map(|(_, v)| v)
    }

    /// DELETE; a 404 (already gone) is success.
    pub(crate) fn delete(&self, path: &str) -> Result<(), FleetError> {
        match self.call("DELETE", path, None) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}
