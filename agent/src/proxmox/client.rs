//! A small Proxmox VE API client on reqwest + rustls.
//!
//! * API-token auth (`PVEAPIToken=USER@REALM!TOKENID=SECRET`, no CSRF token needed); the
//!   header is marked sensitive and never logged.
//! * Answers are `{"data": …}`; errors keep Proxmox's own text: `message`, else
//!   `errors`, else the HTTP reason phrase (servers before 2025-01 put it only there).
//! * Transient failures (connection errors, 502–504, the proxy-hop codes 595–597, lock
//!   timeouts) are retried with exponential backoff and jitter — but only for requests
//!   that are safe to repeat ([`Repeat::Safe`]) or when the error proves that nothing
//!   happened (the connection was never made, or a lock could not be taken).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use trellis_protocol::CommandError;

use super::tls::{self, TlsMode};
use super::types::{
    lenient_string, ClusterResource, ExecStarted, ExecStatus, GuestInterface, GuestInterfaces,
    TaskLogLine, TaskStatus, VmConfig, VmStatus,
};
use super::upid::Upid;
use super::ProxmoxSettings;

/// Whether a request may be sent again after a failure that leaves open whether it was
/// carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// Reads, and writes whose repetition changes nothing (config PUT, stop, delete).
    Safe,
    /// Clone, start, guest exec: repeated only when the error proves nothing happened.
    Unsafe,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total tries, including the first.
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base: Duration::from_millis(250),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with jitter: 50–100 % of `base·2^(attempt-1)`, capped.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        let factor = rand::rng().random_range(0.5..=1.0);
        exp.mul_f64(factor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Connect,
    Timeout,
    Tls,
    Other,
}

/// A failed Proxmox API call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Proxmox (or a proxy in front of it) answered with an error status.
    #[error("{method} {path}: {message} (HTTP {status})")]
    Http {
        method: String,
        path: String,
        status: u16,
        /// Proxmox's text, newline trimmed, with per-parameter errors appended.
        message: String,
        errors: BTreeMap<String, String>,
    },
    /// No (complete) answer: connection, TLS, timeout.
    #[error("{method} {path}: {detail}")]
    Transport {
        method: String,
        path: String,
        kind: TransportKind,
        detail: String,
    },
    /// An answer that is not what the API documents.
    #[error("{method} {path}: unexpected answer: {detail}")]
    Decode {
        method: String,
        path: String,
        detail: String,
    },
    /// The settings are unusable (bad URL, token layout, TLS files).
    #[error("{0}")]
    Setup(String),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Proxmox's own error text (or the transport failure).
    pub fn message(&self) -> &str {
        match self {
            Self::Http { message, .. } => message,
            Self::Transport { detail, .. } | Self::Decode { detail, .. } => detail,
            Self::Setup(m) => m,
        }
    }

    fn is_lock_timeout(&self) -> bool {
        let m = self.message();
        m.contains("can't lock file") || m.contains("got timeout")
    }

    /// Worth trying again later.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Http { status, .. } => {
                matches!(status, 502..=504 | 595..=597)
                    || (*status == 500 && self.is_lock_timeout())
            }
            Self::Transport { kind, .. } => *kind != TransportKind::Tls,
            Self::Decode { .. } | Self::Setup(_) => false,
        }
    }

    /// The request certainly had no effect: no connection was made, the proxy could not
    /// reach the node (595), or Proxmox could not take a lock before acting.
    pub fn nothing_happened(&self) -> bool {
        match self {
            Self::Transport { kind, .. } => *kind == TransportKind::Connect,
            Self::Http { status, .. } => *status == 595 || self.is_lock_timeout(),
            _ => false,
        }
    }

    /// "VM N already exists", "unable to create VM N: config file already exists".
    pub fn is_vmid_taken(&self) -> bool {
        let m = self.message();
        m.contains("already exists")
    }

    /// The VM (its config file) does not exist.
    pub fn is_missing(&self) -> bool {
        self.message().contains("does not exist")
    }

    pub fn is_locked(&self) -> bool {
        self.message().contains("VM is locked")
    }
}

/// Parses an error answer: `message`, else `errors`, else the reason phrase, else a
/// snippet of a non-JSON body, else the canonical reason.
pub fn error_text(
    status: u16,
    reason: Option<&str>,
    body: &[u8],
) -> (String, BTreeMap<String, String>) {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        errors: Option<serde_json::Value>,
    }
    let mut errors = BTreeMap::new();
    let mut message = None;
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
    if let Some(b) = &parsed {
        if let Some(serde_json::Value::Object(map)) = &b.errors {
            for (k, v) in map {
                let text = match v {
                    serde_json::Value::String(s) => s.trim().to_string(),
                    other => other.to_string(),
                };
                errors.insert(k.clone(), text);
            }
        }
        message = b
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string);
    }
    let detail = errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    let text = match (message, detail.is_empty()) {
        (Some(m), true) => m,
        (Some(m), false) => format!("{m} ({detail})"),
        (None, false) => match reason {
            Some(r) if !detail.contains(r) => format!("{r} ({detail})"),
            _ => detail,
        },
        (None, true) => match reason {
            Some(r) => r.to_string(),
            None if parsed.is_none() && !body.is_empty() => {
                let snippet: String = String::from_utf8_lossy(body)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect();
                format!("HTTP {status}: {snippet}")
            }
            None => reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}")),
        },
    };
    (text, errors)
}

/// Percent-encodes one path segment (RFC 3986 `pchar`s stay, so UPIDs keep their `:`,
/// `@` and `!`).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks the `USER@REALM!TOKENID` layout so that a typo gets a precise message instead
/// of a 401.
pub fn validate_token_id(id: &str) -> Result<(), String> {
    let hint = "PROXMOX_TOKEN_ID must be USER@REALM!TOKENID, e.g. root@pam!trellis";
    if id.contains('=') || (id.contains(':') && !id.contains('!')) {
        return Err(format!(
            "{hint}; it contains '=' or ':' — put only the token id there and the secret in PROXMOX_TOKEN_SECRET"
        ));
    }
    let Some((user, token)) = id.split_once('!') else {
        return Err(format!(
            "{hint} (the '!' and token name are missing in {id:?})"
        ));
    };
    let Some((name, realm)) = user.split_once('@') else {
        return Err(format!("{hint} (the '@REALM' part is missing in {id:?})"));
    };
    if name.is_empty()
        || realm.is_empty()
        || token.is_empty()
        || id.chars().any(char::is_whitespace)
    {
        return Err(format!("{hint}; got {id:?}"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

/// Parameters of a clone.
#[derive(Debug, Clone)]
pub struct CloneRequest {
    pub newid: u32,
    pub name: String,
    pub description: String,
    pub target: Option<String>,
    pub full: bool,
    /// Target storage (full clones only).
    pub storage: Option<String>,
    /// Resource pool to add the new VM to.
    pub pool: Option<String>,
}

pub struct ProxmoxClient {
    http: reqwest::Client,
    /// `https://host:8006/api2/json`
    base: String,
    auth: HeaderValue,
    token_id: String,
    tls_mode: TlsMode,
    pub retry: RetryPolicy,
}

impl fmt::Debug for ProxmoxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxmoxClient")
            .field("base", &self.base)
            .field("token_id", &self.token_id)
            .field("tls", &self.tls_mode)
            .finish_non_exhaustive()
    }
}

impl ProxmoxClient {
    pub fn new(s: &ProxmoxSettings) -> Result<Self, ApiError> {
        let url = reqwest::Url::parse(s.url.trim())
            .map_err(|e| ApiError::Setup(format!("PROXMOX_URL {:?} is not a URL: {e}", s.url)))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err(ApiError::Setup(format!(
                "PROXMOX_URL {:?} must be https://HOST:8006",
                s.url
            )));
        }
        let mut base = url.as_str().trim_end_matches('/').to_string();
        if let Some(q) = base.find(['?', '#']) {
            base.truncate(q);
        }
        if !base.ends_with("/api2/json") {
            base.push_str("/api2/json");
        }
        validate_token_id(&s.token_id).map_err(ApiError::Setup)?;
        let secret = s.token_secret.expose().trim();
        if secret.is_empty() || secret.chars().any(|c| c.is_whitespace() || c == '=') {
            return Err(ApiError::Setup(
                "PROXMOX_TOKEN_SECRET must be the token's secret (a UUID) alone, without spaces or '='".into(),
            ));
        }
        let mut auth = HeaderValue::from_str(&format!("PVEAPIToken={}={secret}", s.token_id))
            .map_err(|_| ApiError::Setup("PROXMOX_TOKEN_ID or PROXMOX_TOKEN_SECRET holds characters not allowed in an HTTP header".into()))?;
        auth.set_sensitive(true);
        let (tls_config, tls_mode) = tls::client_config(s).map_err(ApiError::Setup)?;
        if url.scheme() == "http" {
            tracing::warn!(url = %s.url, "PROXMOX_URL uses plain http: the API token travels unencrypted");
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config)
            .connect_timeout(Duration::from_secs(10))
            .timeout(s.request_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("tendril/", env!("CARGO_PKG_VERSION")))
            // The agent runs beside the cluster; an HTTP proxy meant for package mirrors
            // must not capture the API (and the token).
            .no_proxy()
            .build()
            .map_err(|e| ApiError::Setup(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            auth,
            token_id: s.token_id.clone(),
            tls_mode,
            retry: RetryPolicy::default(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The [`CommandError`] an admin can act on.
    pub fn command_error(&self, e: &ApiError) -> CommandError {
        let host = self.base.trim_end_matches("/api2/json");
        match e {
            ApiError::Setup(m) => CommandError::new("proxmox_config", m.clone()),
            ApiError::Http { status: 401, .. } => CommandError::new(
                "proxmox_auth_failed",
                format!(
                    "Proxmox at {host} rejected the API token {:?} (401 authentication failure). Check that \
                     PROXMOX_TOKEN_ID is USER@REALM!TOKENID (e.g. root@pam!trellis) and PROXMOX_TOKEN_SECRET is \
                     that token's secret (the UUID shown once when it was created); the token may also have been \
                     deleted, expired, or its user disabled.",
                    self.token_id
                ),
            ),
            ApiError::Http { status: 403, message, .. } => CommandError::new(
                "proxmox_permission_denied",
                format!(
                    "Proxmox refused the request: {message} (403). The token {:?} authenticated but lacks this \
                     privilege: a privilege-separated token needs ACLs of its own (e.g. PVEVMAdmin on /vms, \
                     PVEDatastoreUser on the storage, PVEAuditor on /), or create it without privilege separation.",
                    self.token_id
                ),
            ),
            ApiError::Transport { kind: TransportKind::Tls, detail, .. } => CommandError::new(
                "proxmox_tls_error",
                format!(
                    "TLS verification of {host} failed: {detail}. Pin the node certificate with \
                     PROXMOX_TLS_FINGERPRINT (shown by `pvenode cert info`) or trust the cluster CA with \
                     PROXMOX_CA_FILE=/etc/pve/pve-root-ca.pem."
                ),
            ),
            ApiError::Transport { kind: TransportKind::Timeout, .. } => {
                CommandError::new("proxmox_timeout", format!("Proxmox at {host} did not answer in time: {e}")).retryable()
            }
            ApiError::Transport { .. } => {
                CommandError::new("proxmox_unreachable", format!("cannot reach Proxmox at {host}: {e}")).retryable()
            }
            ApiError::Http { .. } if e.is_transient() => {
                CommandError::new("proxmox_unavailable", format!("Proxmox API error: {e}")).retryable()
            }
            ApiError::Http { .. } => CommandError::new("proxmox_error", format!("Proxmox API error: {e}")),
            ApiError::Decode { .. } => CommandError::new("proxmox_bad_response", e.to_string()),
        }
    }

    /// One API call with the retry policy applied.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: Option<&[(&str, String)]>,
        repeat: Repeat,
    ) -> Result<T, ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.once(method.clone(), path, query, form).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let may_retry =
                        e.is_transient() && (repeat == Repeat::Safe || e.nothing_happened());
                    if !may_retry || attempt >= self.retry.attempts {
                        return Err(e);
                    }
                    let delay = self.retry.delay(attempt);
                    tracing::warn!(%method, path, attempt, error = %e, ?delay, "transient Proxmox API error; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn once<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: Option<&[(&str, String)]>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header(AUTHORIZATION, self.auth.clone());
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(f) = form {
            req = req.form(f);
        }
        let transport = |e: reqwest::Error| {
            let kind = classify(&e);
            ApiError::Transport {
                method: method.to_string(),
                path: path.to_string(),
                kind,
                detail: chain(&e),
            }
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let body = resp.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let (message, errors) = error_text(status.as_u16(), reason.as_deref(), &body);
            return Err(ApiError::Http {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                message,
                errors,
            });
        }
        serde_json::from_slice::<Envelope<T>>(&body)
            .map(|e| e.data)
            .map_err(|e| ApiError::Decode {
                method: method.to_string(),
                path: path.to_string(),
                detail: format!(
                    "{e} in {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
            })
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ApiError> {
        self.call(Method::GET, path, query, None, Repeat::Safe)
            .await
    }

    fn upid(&self, path: &str, raw: String) -> Result<Upid, ApiError> {
        Upid::parse(&raw).map_err(|e| ApiError::Decode {
            method: "POST".into(),
            path: path.to_string(),
            detail: e.to_string(),
        })
    }

    // ---- calls --------------------------------------------------------------------------

    pub async fn version(&self) -> Result<serde_json::Value, ApiError> {
        self.get("/version", &[]).await
    }

    /// Names of the cluster's nodes.
    pub async fn nodes(&self) -> Result<Vec<String>, ApiError> {
        #[derive(Deserialize)]
        struct Node {
            node: String,
        }
        let nodes: Vec<Node> = self.get("/nodes", &[]).await?;
        Ok(nodes.into_iter().map(|n| n.node).collect())
    }

    pub async fn cluster_vms(&self) -> Result<Vec<ClusterResource>, ApiError> {
        self.get("/cluster/resources", &[("type", "vm".into())])
            .await
    }

    /// The first free VMID (reserves nothing).
    pub async fn next_id(&self) -> Result<u32, ApiError> {
        #[derive(Deserialize)]
        struct Id(#[serde(deserialize_with = "lenient_string")] Option<String>);
        let Id(v) = self.get("/cluster/nextid", &[]).await?;
        v.as_deref()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| ApiError::Decode {
                method: "GET".into(),
                path: "/cluster/nextid".into(),
                detail: format!("not a VMID: {v:?}"),
            })
    }

    /// Whether `vmid` is free right now (reserves nothing).
    pub async fn is_vmid_free(&self, vmid: u32) -> Result<bool, ApiError> {
        let r: Result<serde_json::Value, _> = self
            .get("/cluster/nextid", &[("vmid", vmid.to_string())])
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e @ ApiError::Http { status: 400, .. }) if e.is_vmid_taken() => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn clone_vm(
        &self,
        node: &str,
        template: u32,
        req: &CloneRequest,
    ) -> Result<Upid, ApiError> {
        let path = format!("/nodes/{}/qemu/{template}/clone", seg(node));
        let mut form = vec![
            ("newid", req.newid.to_string()),
            ("name", req.name.clone()),
            ("description", req.description.clone()),
        ];
        if let Some(t) = &req.target {
            form.push(("target", t.clone()));
        }
        if req.full {
            form.push(("full", "1".into()));
            if let Some(st) = &req.storage {
                form.push(("storage", st.clone()));
            }
        }
        if let Some(p) = &req.pool {
            form.push(("pool", p.clone()));
        }
        let raw: String = self
            .call(Method::POST, &path, &[], Some(&form), Repeat::Unsafe)
            .await?;
        self.upid(&path, raw)
    }

    pub async fn task_status(&self, upid: &Upid) -> Result<TaskStatus, ApiError> {
        self.get(
            &format!(
                "/nodes/{}/tasks/{}/status",
                seg(&upid.node),
                seg(upid.as_str())
            ),
            &[],
        )
        .await
    }

    pub async fn task_log(
        &self,
        upid: &Upid,
        start: u64,
        limit: u64,
    ) -> Result<Vec<TaskLogLine>, ApiError> {
        self.get(
            &format!(
                "/nodes/{}/tasks/{}/log",
                seg(&upid.node),
                seg(upid.as_str())
            ),
            &[("start", start.to_string()), ("limit", limit.to_string())],
        )
        .await
    }

    pub async fn vm_config(&self, node: &str, vmid: u32) -> Result<VmConfig, ApiError> {
        self.get(&format!("/nodes/{}/qemu/{vmid}/config", seg(node)), &[])
            .await
    }

    /// Synchronous config update (`PUT`): idempotent, so it is retried freely.
    pub async fn update_config(
        &self,
        node: &str,
        vmid: u32,
        params: &[(&str, String)],
    ) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .call(
                Method::PUT,
                &format!("/nodes/{}/qemu/{vmid}/config", seg(node)),
                &[],
                Some(params),
                Repeat::Safe,
            )
            .await?;
        Ok(())
    }

    /// `PUT …/resize disk=… size=NG`: grows a disk. Older Proxmox answers `null` once done,
    /// newer versions a UPID of a `resize` task (returned here to be awaited).
    pub async fn resize_disk(
        &self,
        node: &str,
        vmid: u32,
        disk: &str,
        size_gib: u32,
    ) -> Result<Option<Upid>, ApiError> {
        let path = format!("/nodes/{}/qemu/{vmid}/resize", seg(node));
        let form = [("disk", disk.to_string()), ("size", format!("{size_gib}G"))];
        let raw: serde_json::Value = self
            .call(Method::PUT, &path, &[], Some(&form), Repeat::Unsafe)
            .await?;
        match raw {
            serde_json::Value::String(s) if s.starts_with("UPID:") => self.upid(&path, s).map(Some),
            _ => Ok(None),
        }
    }

    pub async fn vm_status(&self, node: &str, vmid: u32) -> Result<VmStatus, ApiError> {
        self.get(
            &format!("/nodes/{}/qemu/{vmid}/status/current", seg(node)),
            &[],
        )
        .await
    }

    /// `start`, `stop`, `shutdown` or `reboot` without parameters; returns the task.
    pub async fn power(
        &self,
        node: &str,
        vmid: u32,
        action: &str,
        repeat: Repeat,
    ) -> Result<Upid, ApiError> {
        self.power_with(node, vmid, action, &[], repeat).await
    }

    /// `start`, `stop`, `shutdown` or `reboot` with its parameters (e.g. `timeout`);
    /// returns the task.
    pub async fn power_with(
        &self,
        node: &str,
        vmid: u32,
        action: &str,
        params: &[(&str, String)],
        repeat: Repeat,
    ) -> Result<Upid, ApiError> {
        let path = format!("/nodes/{}/qemu/{vmid}/status/{}", seg(node), seg(action));
        let raw: String = self
            .call(Method::POST, &path, &[], Some(params), repeat)
            .await?;
        self.upid(&path, raw)
    }

    /// Destroys a (stopped) VM with its disks.
    pub async fn delete_vm(&self, node: &str, vmid: u32) -> Result<Upid, ApiError> {
        let path = format!("/nodes/{}/qemu/{vmid}", seg(node));
        let raw: String = self
            .call(
                Method::DELETE,
                &path,
                &[
                    ("purge", "1".into()),
                    ("destroy-unreferenced-disks", "1".into()),
                ],
                None,
                Repeat::Safe,
            )
            .await?;
        self.upid(&path, raw)
    }

    pub async fn guest_interfaces(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<Vec<GuestInterface>, ApiError> {
        let r: GuestInterfaces = self
            .get(
                &format!(
                    "/nodes/{}/qemu/{vmid}/agent/network-get-interfaces",
                    seg(node)
                ),
                &[],
            )
            .await?;
        Ok(r.result)
    }

    /// Starts `argv` in the guest; returns the guest pid.
    pub async fn guest_exec(
        &self,
        node: &str,
        vmid: u32,
        argv: &[String],
    ) -> Result<u64, ApiError> {
        let path = format!("/nodes/{}/qemu/{vmid}/agent/exec", seg(node));
        let form: Vec<(&str, String)> = argv.iter().map(|a| ("command", a.clone())).collect();
        let r: ExecStarted = self
            .call(Method::POST, &path, &[], Some(&form), Repeat::Unsafe)
            .await?;
        r.pid.ok_or_else(|| ApiError::Decode {
            method: "POST".into(),
            path,
            detail: "no pid in the answer".into(),
        })
    }

    pub async fn guest_exec_status(
        &self,
        node: &str,
        vmid: u32,
        pid: u64,
    ) -> Result<ExecStatus, ApiError> {
        self.get(
            &format!("/nodes/{}/qemu/{vmid}/agent/exec-status", seg(node)),
            &[("pid", pid.to_string())],
        )
        .await
    }
}

fn classify(e: &reqwest::Error) -> TransportKind {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return TransportKind::Tls;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
            {
                return TransportKind::Tls;
            }
        }
        src = s.source();
    }
    let text = chain(e).to_ascii_lowercase();
    if text.contains("certificate") || text.contains("tls handshake") {
        TransportKind::Tls
    } else if e.is_timeout() {
        TransportKind::Timeout
    } else if e.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Other
    }
}

/// The error and its causes, deduplicated, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        let mut text = s.to_string();
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                text = inner.to_string();
            }
        }
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_variants() {
        // Current servers: message (with newline) plus errors on 400.
        let (m, e) = error_text(
            400,
            Some("Parameter verification failed."),
            br#"{"data":null,"message":"Parameter verification failed.\n","errors":{"vmid":"VM 105 already exists"}}"#,
        );
        assert_eq!(
            m,
            "Parameter verification failed. (vmid: VM 105 already exists)"
        );
        assert_eq!(e["vmid"], "VM 105 already exists");
        // Message only.
        let (m, _) = error_text(
            500,
            None,
            b"{\"data\":null,\"message\":\"VM is locked (clone)\\n\"}",
        );
        assert_eq!(m, "VM is locked (clone)");
        // Old servers: only the reason phrase.
        let (m, _) = error_text(500, Some("VM is locked (clone)"), br#"{"data":null}"#);
        assert_eq!(m, "VM is locked (clone)");
        // Old servers on 400: errors without message.
        let (m, _) = error_text(
            400,
            None,
            br#"{"data":null,"errors":{"newid":"property is missing"}}"#,
        );
        assert_eq!(m, "newid: property is missing");
        // Proxy hop: empty body, custom reason.
        let (m, _) = error_text(596, Some("Connection timed out"), b"");
        assert_eq!(m, "Connection timed out");
        // 401: empty body, canonical reason only.
        let (m, _) = error_text(401, None, b"");
        assert_eq!(m, "Unauthorized");
        // HTML from a reverse proxy.
        let (m, _) = error_text(502, None, b"<html><body>Bad gateway</body></html>");
        assert!(m.starts_with("HTTP 502: <html>"), "{m}");
    }

    #[test]
    fn classification() {
        let http = |status, message: &str| ApiError::Http {
            method: "POST".into(),
            path: "/x".into(),
            status,
            message: message.into(),
            errors: Default::default(),
        };
        assert!(http(596, "Connection timed out").is_transient());
        assert!(!http(596, "Connection timed out").nothing_happened());
        assert!(http(595, "No route to host").nothing_happened());
        let lock = http(
            500,
            "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout",
        );
        assert!(lock.is_transient() && lock.nothing_happened());
        assert!(!http(500, "VM 101 is running - destroy failed").is_transient());
        assert!(http(500, "unable to create VM 101: config file already exists").is_vmid_taken());
        assert!(http(500, "VM 101 already exists on node 'pve1'").is_vmid_taken());
        assert!(http(
            500,
            "Configuration file 'nodes/pve1/qemu-server/101.conf' does not exist"
        )
        .is_missing());
        assert!(!http(401, "").is_transient());
    }

    #[test]
    fn token_layout() {
        assert!(validate_token_id("root@pam!trellis").is_ok());
        assert!(validate_token_id("svc@pve!ci-1").is_ok());
        assert!(validate_token_id("root@pam").unwrap_err().contains("'!'"));
        assert!(validate_token_id("root!trellis")
            .unwrap_err()
            .contains("@REALM"));
        assert!(validate_token_id("root@pam!trellis=abc").is_err());
        assert!(validate_token_id("root@pam:trellis").is_err());
    }

    #[test]
    fn segments() {
        assert_eq!(seg("pve1"), "pve1");
        assert_eq!(
            seg("UPID:pve1:0001A2B7:0254A1C3:6745ABCD:qmclone:9000:root@pam!trellis:"),
            "UPID:pve1:0001A2B7:0254A1C3:6745ABCD:qmclone:9000:root@pam!trellis:"
        );
        assert_eq!(seg("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for attempt in 1..10 {
            let d = p.delay(attempt);
            assert!(d <= p.max, "{d:?}");
            assert!(d >= p.base / 2);
        }
    }
}
