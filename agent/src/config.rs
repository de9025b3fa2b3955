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

/// The TLS connector for `wss://` URLs: the web PKI roots plus an optional extra CA
/// (`TENDRIL_SERVER_CA_FILE`), for control planes behind a private CA.
pub fn tls_connector(config: &AgentConfig) -> anyhow::Result<Option<tokio_tungstenite::Connector>> {
    let Some(ca) = &config.server_ca_file else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let pem = std::fs::read(ca)
        .map_err(|e| anyhow::anyhow!("cannot read server CA file {}: {e}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_tungstenite::Connector::Rustls(
        std::sync::Arc::new(tls),
    )))
}
