//! Proxmox VE executors: `list_templates` and `provision`, on a small API client.
//!
//! * [`client`]: the HTTP client (token auth, envelope, typed errors, retries).
//! * [`tls`]: certificate fingerprint pinning, CA file, explicit insecure mode.
//! * [`types`] / [`upid`]: the API's answers, parsed leniently.
//! * [`provision`]: the provision stages, VMID allocation, idempotency and cleanup.
//!
//! See `shared/proxmox-api.md` for the API facts and pitfalls this follows.

pub mod client;
pub mod provision;
pub mod tls;
pub mod types;
pub mod upid;

use std::time::Duration;

use trellis_protocol::{
    CommandError, ListTemplatesParams, ListTemplatesResult, LogStream, ProvisionParams,
    ProvisionResult, ProxmoxTemplate,
};

use crate::exec::ExecContext;
pub use client::{ApiError, ProxmoxClient};

/// Connection settings read from `PROXMOX_*` environment variables.
#[derive(Debug, Clone)]
pub struct ProxmoxSettings {
    pub url: String,
    pub token_id: String,
    pub token_secret: crate::config::Secret,
    pub tls_fingerprint: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub insecure_tls: bool,
    /// Per HTTP request (`PROXMOX_TIMEOUT_SECS`, default 30). Long work is always an
    /// async task polled by UPID, so requests themselves stay short.
    pub request_timeout: Duration,
    /// How long one Proxmox task (clone, start, stop, destroy) may run
    /// (`PROXMOX_TASK_TIMEOUT_SECS`, default 1800: full clones of big disks are slow).
    pub task_timeout: Duration,
    /// How long one guest command may run (`PROXMOX_COMMAND_TIMEOUT_SECS`, default 1800).
    pub command_timeout: Duration,
    /// Clones running at once from this agent (`PROXMOX_MAX_PARALLEL_CLONES`, default 2):
    /// parallel clones on one storage run into storage lock timeouts.
    pub max_parallel_clones: usize,
}

impl ProxmoxSettings {
    /// Settings with defaults for everything but the connection.
    pub fn new(
        url: impl Into<String>,
        token_id: impl Into<String>,
        token_secret: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            token_id: token_id.into(),
            token_secret: crate::config::Secret(token_secret.into()),
            tls_fingerprint: None,
            ca_file: None,
            insecure_tls: false,
            request_timeout: Duration::from_secs(30),
            task_timeout: Duration::from_secs(1800),
            command_timeout: Duration::from_secs(1800),
            max_parallel_clones: 2,
        }
    }

    /// `Ok(None)` when `PROXMOX_URL` is unset.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Ok(url) = std::env::var("PROXMOX_URL") else {
            return Ok(None);
        };
        let token_id = std::env::var("PROXMOX_TOKEN_ID")
            .map_err(|_| anyhow::anyhow!("PROXMOX_URL is set but PROXMOX_TOKEN_ID is not"))?;
        let token_secret = std::env::var("PROXMOX_TOKEN_SECRET")
            .map_err(|_| anyhow::anyhow!("PROXMOX_URL is set but PROXMOX_TOKEN_SECRET is not"))?;
        client::validate_token_id(&token_id).map_err(|e| anyhow::anyhow!(e))?;
        let secs = |name: &str, default: u64| -> anyhow::Result<Duration> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs)
                    .ok_or_else(|| {
                        anyhow::anyhow!("{name} must be a positive number of seconds, got {v:?}")
                    }),
                Err(_) => Ok(Duration::from_secs(default)),
            }
        };
        let mut s = Self::new(url, token_id, token_secret);
        s.tls_fingerprint = std::env::var("PROXMOX_TLS_FINGERPRINT")
            .ok()
            .filter(|f| !f.trim().is_empty());
        if let Some(fp) = &s.tls_fingerprint {
            tls::parse_fingerprint(fp).map_err(|e| anyhow::anyhow!(e))?;
        }
        s.ca_file = std::env::var_os("PROXMOX_CA_FILE")
            .filter(|v| !v.is_empty())
            .map(Into::into);
        s.insecure_tls =
            std::env::var("PROXMOX_INSECURE_TLS").is_ok_and(|v| v == "1" || v == "true");
        s.request_timeout = secs("PROXMOX_TIMEOUT_SECS", 30)?;
        s.task_timeout = secs("PROXMOX_TASK_TIMEOUT_SECS", 1800)?;
        s.command_timeout = secs("PROXMOX_COMMAND_TIMEOUT_SECS", 1800)?;
        if let Ok(v) = std::env::var("PROXMOX_MAX_PARALLEL_CLONES") {
            s.max_parallel_clones = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    anyhow::anyhow!("PROXMOX_MAX_PARALLEL_CLONES must be ≥ 1, got {v:?}")
                })?;
        }
        Ok(Some(s))
    }
}

fn not_configured() -> CommandError {
    CommandError::new(
        "proxmox_not_configured",
        "this agent has no Proxmox connection: set PROXMOX_URL, PROXMOX_TOKEN_ID and PROXMOX_TOKEN_SECRET",
    )
}

/// The client for this command, or the error that says what is wrong with the settings.
pub(crate) fn client_for(ctx: &ExecContext) -> Result<ProxmoxClient, CommandError> {
    let settings = ctx.config.proxmox.as_ref().ok_or_else(not_configured)?;
    ProxmoxClient::new(settings).map_err(|e| CommandError::new("proxmox_config", e.to_string()))
}

pub async fn list_templates(
    ctx: &ExecContext,
    p: ListTemplatesParams,
) -> Result<ListTemplatesResult, CommandError> {
    let client = client_for(ctx)?;
    let vms = tokio::select! {
        r = client.cluster_vms() => r.map_err(|e| client.command_error(&e))?,
        _ = ctx.cancel.cancelled() => return Err(CommandError::new("cancelled", "cancelled")),
    };
    let mut templates: Vec<ProxmoxTemplate> = vms
        .into_iter()
        .filter(|r| r.is_qemu() && r.template)
        .filter(|r| {
            p.node
                .as_deref()
                .is_none_or(|n| r.node.as_deref() == Some(n))
        })
        .filter_map(|r| {
            let vmid = r.vmid()?;
            Some(ProxmoxTemplate {
                vmid,
                name: r.name.clone().unwrap_or_else(|| format!("VM {vmid}")),
                node: r.node.clone().unwrap_or_default(),
                memory: r.maxmem.unwrap_or(0) / (1024 * 1024),
                cores: r
                    .maxcpu
                    .map(|c| u32::try_from(c).unwrap_or(u32::MAX))
                    .unwrap_or(0),
                disk_bytes: r.maxdisk.filter(|d| *d > 0),
            })
        })
        .collect();
    templates.sort_by_key(|t| t.vmid);
    ctx.log(
        LogStream::System,
        &format!(
            "{} VM template(s) found via {}\n",
            templates.len(),
            client.base_url()
        ),
    )
    .await;
    Ok(ListTemplatesResult { templates })
}

pub async fn provision(
    ctx: &ExecContext,
    p: ProvisionParams,
) -> Result<ProvisionResult, CommandError> {
    provision::run(ctx, p).await
}
