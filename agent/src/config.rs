//! Agent configuration: the command line and environment (`tendril --help` lists every
//! variable), secrets hidden from `Debug`.
//!
//! The executors declare their own settings and flags ([`ProxmoxArgs`],
//! [`TerraformArgs`]); this module gathers them into one CLI and one [`AgentConfig`], and
//! is the only place that knows them all. Executors never import it.

use std::path::PathBuf;

use clap::Parser;

use crate::proxmox::{ProxmoxArgs, ProxmoxSettings};
use crate::secret::Secret;
use crate::terraform::{TerraformArgs, TerraformSettings};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The `tendril` command line; every option can also be set by its environment variable.
#[derive(Parser, Debug)]
#[command(
    name = "tendril",
    version,
    about = "Trellis agent: dials the control plane and runs Proxmox and Terraform commands"
)]
pub struct Cli {
    /// Log lines as text (no colours unless stderr is a terminal) or JSON (for log shippers).
    #[arg(long, env = "TENDRIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Control plane agent endpoint, `ws://` or `wss://…/api/agents/connect`.
    #[arg(long = "server", env = "TENDRIL_SERVER_URL")]
    pub server: String,
    /// This agent's token (from `trellis agents create` or the UI).
    #[arg(long, env = "TENDRIL_TOKEN", hide_env_values = true)]
    pub token: Secret,
    /// Where the journal and command workspaces live.
    #[arg(long, env = "TENDRIL_WORK_DIR", default_value = "./tendril-work")]
    pub work_dir: PathBuf,
    /// How many commands run at once.
    #[arg(long, env = "TENDRIL_MAX_CONCURRENCY", default_value_t = 4)]
    pub max_concurrency: u32,
    /// Extra CA certificate (PEM) to trust for a `wss://` control plane.
    #[arg(long, env = "TENDRIL_SERVER_CA_FILE")]
    pub server_ca_file: Option<PathBuf>,
    /// Name reported to the control plane (default: the machine's hostname).
    #[arg(long, env = "TENDRIL_HOSTNAME")]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub proxmox: ProxmoxArgs,
    #[command(flatten)]
    pub terraform: TerraformArgs,
}

impl Cli {
    /// Checks the values and fills in the defaults that need a look at the machine.
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        if !(self.server.starts_with("ws://") || self.server.starts_with("wss://")) {
            anyhow::bail!("--server must be a ws:// or wss:// URL ending in /api/agents/connect");
        }
        let hostname = self.hostname.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        });
        Ok(AgentConfig {
            server_url: self.server,
            token: self.token,
            work_dir: self.work_dir,
            max_concurrency: self.max_concurrency.max(1),
            hostname,
            server_ca_file: self.server_ca_file,
            proxmox: self.proxmox.into_settings()?,
            terraform: self.terraform.into_settings()?,
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_lists_every_environment_variable() {
        let help = Cli::command().render_long_help().to_string();
        for var in [
            "TENDRIL_SERVER_URL",
            "TENDRIL_TOKEN",
            "TENDRIL_WORK_DIR",
            "TENDRIL_MAX_CONCURRENCY",
            "TENDRIL_SERVER_CA_FILE",
            "TENDRIL_HOSTNAME",
            "PROXMOX_URL",
            "PROXMOX_TOKEN_ID",
            "PROXMOX_TOKEN_SECRET",
            "PROXMOX_TLS_FINGERPRINT",
            "PROXMOX_CA_FILE",
            "PROXMOX_INSECURE_TLS",
            "PROXMOX_TIMEOUT_SECS",
            "PROXMOX_TASK_TIMEOUT_SECS",
            "PROXMOX_COMMAND_TIMEOUT_SECS",
            "PROXMOX_MAX_PARALLEL_CLONES",
            "TENDRIL_TERRAFORM_BIN",
            "TENDRIL_TERRAFORM_PLUGIN_DIR",
            "TENDRIL_GIT_BIN",
            "TENDRIL_TERRAFORM_LOG_CAP_BYTES",
            "TENDRIL_TERRAFORM_RETENTION_SECS",
            "TENDRIL_TERRAFORM_SIGINT_GRACE_MS",
        ] {
            assert!(
                help.contains(&format!("env: {var}")),
                "{var} missing from --help:\n{help}"
            );
        }
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_build_the_config_and_secrets_stay_hidden() {
        let cli = Cli::try_parse_from([
            "tendril",
            "--server",
            "ws://127.0.0.1:9/api/agents/connect",
            "--token",
            "agent-token-value",
            "--hostname",
            "h1",
            "--proxmox-url",
            "https://pve:8006",
            "--proxmox-token-id",
            "root@pam!trellis",
            "--proxmox-token-secret",
            "pve-secret-value",
            "--terraform-sigint-grace-ms",
            "250",
        ])
        .unwrap();
        let config = cli.into_config().unwrap();
        assert_eq!(config.token.expose(), "agent-token-value");
        let proxmox = config.proxmox.as_ref().unwrap();
        assert_eq!(proxmox.token_secret.expose(), "pve-secret-value");
        assert_eq!(
            config.terraform.sigint_grace,
            std::time::Duration::from_millis(250)
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("agent-token-value") && !shown.contains("pve-secret-value"),
            "{shown}"
        );

        let bad = Cli::try_parse_from(["tendril", "--server", "http://x", "--token", "t"])
            .unwrap()
            .into_config();
        assert!(bad.is_err());
    }
}
