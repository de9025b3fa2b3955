//! Starting and stopping the control plane.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::Row;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::broker::{reaper, Broker};
use crate::db::Db;

#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    pub database_url: String,
    /// When `None`, the stored admin token hash is used, or a new token is generated and
    /// printed once.
    pub admin_token: Option<String>,
    pub ui_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// An agent silent for this long is considered dead and its session closed.
    pub heartbeat_timeout: std::time::Duration,
}

/// Resolves the admin token hash: the configured token, else the stored hash, else a new
/// token printed once on stdout.
async fn admin_token_hash(db: &Db, configured: Option<&str>) -> anyhow::Result<String> {
    if let Some(t) = configured {
        if t.len() < 16 {
            anyhow::bail!("the admin token must be at least 16 characters");
        }
        return Ok(crate::auth::hash(t));
    }
    let stored = sqlx::query("SELECT value FROM settings WHERE key = 'admin_token_hash'")
        .fetch_optional(&db.pool)
        .await?;
    if let Some(r) = stored {
        return Ok(r.try_get(0)?);
    }
    let token = crate::auth::generate("admin");
    let hash = crate::auth::hash(&token);
    sqlx::query("INSERT INTO settings (key, value) VALUES ('admin_token_hash', $1)")
        .bind(&hash)
        .execute(db.writer())
        .await?;
    println!("Generated admin token (shown once; store it now): {token}");
    Ok(hash)
}

/// Runs the control plane on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = Db::connect(&config.database_url).await?;
    db.mark_all_offline().await?;
    api::templates::seed(&db).await?;
    let admin_token_hash = admin_token_hash(&db, config.admin_token.as_deref()).await?;
    let (broker, writer) = Broker::start(db, shutdown.child_token(), config.heartbeat_timeout);
    let reaper = tokio::spawn(reaper::run(broker.clone()));
    let state = AppState {
        broker: broker.clone(),
        admin_token_hash: admin_token_hash.into(),
        ui_dir: config
            .ui_dir
            .clone()
            .filter(|d| d.join("index.html").exists()),
    };
    let app = api::router(state);
    let addr = listener.local_addr()?;
    let stop = shutdown.clone();
    let graceful = async move { stop.cancelled().await };
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let acceptor = crate::tls::acceptor(cert, key)?;
            tracing::info!(%addr, "trellis listening (https, wss)");
            let listener = crate::tls::TlsListener::new(listener, acceptor, shutdown.clone());
            axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await?;
        }
        (None, None) => {
            tracing::info!(%addr, "trellis listening (http, ws)");
            use axum::serve::ListenerExt;
            // Small frames both ways: Nagle plus delayed ACK would add ~40 ms per round trip.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await?;
        }
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
    // Sessions see the shutdown token and close; then the writer drains what they sent.
    broker.close_all("control plane shutting down");
    broker.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), reaper).await;
    // A session hands its last events to the writer before it unregisters; once all are
    // gone, a stop behind them in the writer's queue drains everything they sent.
    let closing = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.online_count() > 0 && tokio::time::Instant::now() < closing {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.stop_writer().await;
    let db = broker.db.clone();
    drop(broker);
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    // Close connections now (SQLite checkpoints its WAL) instead of at runtime teardown.
    db.close().await;
    tracing::info!("trellis stopped");
    Ok(())
}
