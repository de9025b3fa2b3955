//! Agent configuration: flags and environment, secrets hidden from `Debug`.

use std::path::PathBuf;

use crate::{proxmox::ProxmoxSettings, terraform::TerraformSettings};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `ws://` or `wss://…/api/agents/connect`.
    pub server_url: String,
    pub token: Secret,
    pub work_dir: PathBuf,
    pub max_concurrency: u32,
    pub hostname: String,
    /// Extra CA certificate (PEM) to trust for `wss://` besides the web PKI roots.
    pub server_ca_file: Option<PathBuf>,
    /// `None` when Proxmox is not configured: the agent then does not advertise
    /// `provision` or `list_templates`.
    pub proxmox: Option<ProxmoxSettings>,
    pub terraform: TerraformSettings,
}

/// A string that never shows up in `Debug` output or logs.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
