//! `tendril`: the Trellis agent binary.

use clap::Parser;
use tendril::config::Cli;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A bad setting is one line on stderr and exit status 2, before anything connects.
    let config = match cli
        .into_config()
        .and_then(|c| tendril::config::create_private_dir(&c.work_dir).map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril: error: {e:#}");
            std::process::exit(2);
        }
    };
    for url in &config.server_urls {
        if config.insecure_plaintext && url.starts_with("ws://") {
            tracing::warn!(
                server = %url,
                "--insecure-plaintext: the token and every command travel unencrypted"
            );
        }
    }
    tracing::info!(server = %config.server_urls.join(","), work_dir = %config.work_dir.display(),
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

/// Logs go to stderr (journald under systemd); `RUST_LOG` filters them.
fn init_logging(format: tendril::config::LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        tendril::config::LogFormat::Json => builder.json().init(),
        tendril::config::LogFormat::Text => {
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
}
