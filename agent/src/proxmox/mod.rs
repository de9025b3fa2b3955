//! Proxmox VE executors: `list_templates` and `provision`.
//! (Interface only; the client and executors land with the Proxmox issue.)

use trellis_protocol::{
    CommandError, ListTemplatesParams, ListTemplatesResult, ProvisionParams, ProvisionResult,
};

use crate::exec::ExecContext;

/// Connection settings read from `PROXMOX_*` environment variables.
#[derive(Debug, Clone)]
pub struct ProxmoxSettings {
    pub url: String,
    pub token_id: String,
    pub token_secret: crate::config::Secret,
    pub tls_fingerprint: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub insecure_tls: bool,
}

impl ProxmoxSettings {
    /// `Ok(None)` when `PROXMOX_URL` is unset.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Ok(url) = std::env::var("PROXMOX_URL") else {
            return Ok(None);
        };
        let token_id = std::env::var("PROXMOX_TOKEN_ID")
            .map_err(|_| anyhow::anyhow!("PROXMOX_URL is set but PROXMOX_TOKEN_ID is not"))?;
        let token_secret = std::env::var("PROXMOX_TOKEN_SECRET")
            .map_err(|_| anyhow::anyhow!("PROXMOX_URL is set but PROXMOX_TOKEN_SECRET is not"))?;
        Ok(Some(Self {
            url,
            token_id,
            token_secret: crate::config::Secret(token_secret),
            tls_fingerprint: std::env::var("PROXMOX_TLS_FINGERPRINT").ok(),
            ca_file: std::env::var_os("PROXMOX_CA_FILE").map(Into::into),
            insecure_tls: std::env::var("PROXMOX_INSECURE_TLS")
                .is_ok_and(|v| v == "1" || v == "true"),
        }))
    }
}

fn not_available() -> CommandError {
    CommandError::new(
        "unsupported_command",
        "this agent build has no Proxmox executor",
    )
}

pub async fn list_templates(
    _ctx: &ExecContext,
    _p: ListTemplatesParams,
) -> Result<ListTemplatesResult, CommandError> {
    Err(not_available())
}

pub async fn provision(
    _ctx: &ExecContext,
    _p: ProvisionParams,
) -> Result<ProvisionResult, CommandError> {
    Err(not_available())
}
