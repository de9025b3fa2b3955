//! `tendril`: the Trellis agent binary.

use std::path::PathBuf;

use clap::Parser;
use tendril::config::{AgentConfig, Secret};
use tendril::{proxmox::ProxmoxSettings, terraform::TerraformSettings};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "tendril",
    version,
    about = "Trellis agent: dials the control plane and runs Proxmox and Terraform commands"
)]
struct Args {
    /// Control plane agent endpoint, `ws://` or `wss://…/api/agents/connect`.
    #[arg(long = "server", env = "TENDRIL_SERVER_URL")]
    server: String,
    /// This agent's token (from `trellis agents create` or the UI).
    #[arg(long, env = "TENDRIL_TOKEN", hide_env_values = true)]
    token: String,
    /// Where the journal and command workspaces live.
    #[arg(long, env = "TENDRIL_WORK_DIR", default_value = "./tendril-work")]
    work_dir: PathBuf,
    /// How many commands run at once.
    #[arg(long, env = "TENDRIL_MAX_CONCURRENCY", default_value_t = 4)]
    max_concurrency: u32,
    /// Extra CA certificate (PEM) to trust for a `wss://` control plane.
    #[arg(long, env = "TENDRIL_SERVER_CA_FILE")]
    server_ca_file: Option<PathBuf>,
    /// Name reported to the control plane (default: the machine's hostname).
    #[arg(long, env = "TENDRIL_HOSTNAME")]
    hostname: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if !(args.server.starts_with("ws://") || args.server.starts_with("wss://")) {
        anyhow::bail!("--server must be a ws:// or wss:// URL ending in /api/agents/connect");
    }
    let hostname = args.hostname.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    });
    let config = AgentConfig {
        server_url: args.server,
        token: Secret(args.token),
        work_dir: args.work_dir,
        max_concurrency: args.max_concurrency.max(1),
        hostname,
        server_ca_file: args.server_ca_file,
        proxmox: ProxmoxSettings::from_env()?,
        terraform: TerraformSettings::from_env()?,
    };
    std::fs::create_dir_all(&config.work_dir)?;
    tracing::info!(server = %config.server_url, work_dir = %config.work_dir.display(),
        proxmox = config.proxmox.is_some(), "tendril starting");
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        s.cancel();
    });
    tendril::session::run(config, shutdown).await
}
