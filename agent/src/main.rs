//! `tendril`: the Trellis agent binary.

use clap::Parser;
use tendril::config::Cli;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Cli::parse().into_config()?;
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
