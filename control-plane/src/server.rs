//! Starting and stopping the control plane.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::broker::fanout::Fanout;
use crate::broker::{cluster, cluster::Replica, reaper, Broker};
use crate::db::{Backend, Db};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    pub database_url: String,
    /// When `None`, the stored admin token hash is used, or a new token is generated and
    /// written to `<data dir>/admin-token` (0600).
    pub admin_token: Option<String>,
    /// Where private files go (default: the SQLite file's directory, else `.`).
    pub data_dir: Option<PathBuf>,
    pub ui_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The URL users reach trellis at (`--public-url`); `https://` means session cookies
    /// are `Secure` also when a proxy terminates TLS.
    pub public_url: Option<String>,
    /// How often an SSE stream re-checks its session or token (zero: 30 s).
    pub stream_recheck: std::time::Duration,
    /// Failed authentications allowed per remote address a minute (zero: 10).
    pub max_auth_failures: u32,
    /// An agent silent for this long is considered dead and its session closed.
    pub heartbeat_timeout: std::time::Duration,
    /// How often agents report their VM inventory (zero: the default, 30 s).
    pub inventory_interval: std::time::Duration,
    /// Most log bytes one command may store (0: no limit).
    pub max_log_bytes_per_command: u64,
    /// Days terminal commands are kept (0: forever).
    pub retention_days: u64,
    /// Connection cap and header-read timeout of the HTTP server.
    pub http_limits: crate::http_server::Limits,
    /// The tendril binary served at `/install/tendril` (`None`: a `tendril` file beside
    /// the trellis executable).
    pub agent_binary: Option<PathBuf>,
    /// This replica's name among several (`--replica-name`; default: host name and a
    /// random suffix).
    pub replica_name: Option<String>,
    /// On stop, how long agents are moved to the other replicas, a few at a time
    /// (`--drain-secs`; only when another replica is alive).
    pub drain: Duration,
}

/// Resolves the admin token hash: the configured token, else the stored hash, else a new
/// token written to `<data_dir>/admin-token` (0600; never printed or logged).
async fn admin_token_hash(
    db: &Db,
    configured: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<String> {
    // An empty TRELLIS_ADMIN_TOKEN counts as not set.
    if let Some(t) = configured.filter(|t| !t.is_empty()) {
        if t.len() < 16 {
            anyhow::bail!("the admin token must be at least 16 characters");
        }
        return Ok(crate::auth::hash(t));
    }
    if let Some(hash) = db.admin_token_hash().await? {
        return Ok(hash);
    }
    let token = crate::auth::generate("admin");
    let hash = crate::auth::hash(&token);
    let path = data_dir.join(crate::data_dir::ADMIN_TOKEN_FILE);
    // The file first: a token stored only as a hash but written nowhere would lock us out.
    crate::data_dir::write_private(&path, format!("{token}\n").as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write the admin token to {}: {e}", path.display()))?;
    db.set_admin_token_hash(&hash).await?;
    tracing::info!(
        path = %path.display(),
        "generated the bootstrap admin token (user admin) into this file, readable by its owner only"
    );
    Ok(hash)
}

/// The key of sensitive command params: `TRELLIS_SECRETS_KEY`, else `<data dir>/secrets.key`
/// (generated on first start); an in-memory database with no data dir configured gets a
/// key held in memory (its commands do not outlive the process either).
fn secrets_key(
    config: &ServeConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<crate::secrets::Secrets> {
    let env = std::env::var(crate::secrets::KEY_ENV).ok();
    let memory = config.database_url.starts_with("sqlite:")
        && crate::data_dir::sqlite_file(&config.database_url).is_none();
    if env.is_none() && memory && config.data_dir.is_none() {
        return Ok(crate::secrets::Secrets::ephemeral());
    }
    crate::secrets::Secrets::load(env.as_deref(), data_dir)
}

/// A running control plane's parts, for [`serve`] and for in-process tests.
pub struct App {
    pub state: AppState,
    pub router: axum::Router,
    /// Every background task (dispatcher, inserter, writer, reaper, SSE streams).
    pub tasks: TaskTracker,
    writer: tokio::task::JoinHandle<()>,
}

impl App {
    /// Connects the database, seeds it, and starts the broker and the reaper.
    pub async fn start(config: &ServeConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let db = Db::connect(&config.database_url).await?;
        let replica = Arc::new(Replica::new(
            config.replica_name.clone(),
            db.backend == Backend::Sqlite,
        ));
        crate::db::notify::set_origin(&replica.id);
        db.register_replica(&replica.row()).await?;
        match db.backend {
            // The one replica: no session of this process exists yet.
            Backend::Sqlite => db.mark_all_offline().await?,
            // Other replicas hold sessions: only those of dead replicas go offline.
            Backend::Postgres => {
                db.sweep_dead_replicas(cluster::LEASE.as_millis() as i64)
                    .await?;
            }
        }
        tracing::info!(replica = %replica.name, id = %replica.id, "replica registered");
        crate::domain::templates::seed(&db)
            .await
            .map_err(|e| anyhow::anyhow!("cannot seed templates: {e}"))?;
        let data_dir = crate::data_dir::resolve(config.data_dir.as_deref(), &config.database_url);
        let in_memory = config.data_dir.is_none()
            && config.database_url.starts_with("sqlite")
            && crate::data_dir::sqlite_file(&config.database_url).is_none();
        let signing = crate::signing::load(
            std::env::var(crate::signing::SIGNING_KEY_ENV)
                .ok()
                .as_deref(),
            &data_dir,
            !in_memory,
        )?;
        tracing::info!(
            key_id = signing.key_id(),
            public_key = %signing.public_key_base64(),
            "dispatch signing key (agents pin it: tendril --server-public-key)"
        );
        // Credential hashes are keyed (see `crate::auth`); hashes an earlier version stored
        // unkeyed are converted once per installation, recorded by a marker beside the keys
        // (not in the database: a planted unkeyed hash must never be converted later).
        let env_key = std::env::var(crate::auth::KEY_ENV).ok();
        let credential_key = if in_memory && env_key.is_none() {
            rand::random()
        } else {
            crate::auth::load_key(env_key.as_deref(), &data_dir, true)?
        };
        crate::auth::set_key(&credential_key);
        let db = db
            .with_secrets(secrets_key(config, &data_dir)?)
            .with_signing(Arc::new(signing));
        let marker = data_dir.join(crate::data_dir::CREDENTIALS_KEYED_FILE);
        if !in_memory && !marker.exists() {
            let n = db.key_legacy_credentials().await?;
            crate::data_dir::write_private(&marker, b"credential hashes keyed\n")
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", marker.display()))?;
            if n > 0 {
                tracing::info!(
                    credentials = n,
                    "keyed the credential hashes an earlier version stored"
                );
            }
        }
        let sealed = db.seal_stored_in_clear().await?;
        if sealed > 0 {
            tracing::info!(
                commands = sealed,
                "encrypted the sensitive values an earlier version stored in clear"
            );
        }
        // Commands an earlier version stored unsigned are not signed here: nothing signs a
        // row read back from the database (it may have been written by anyone who can
        // write the database). Queued ones fail `unsigned` when claimed; submit them again.
        let admin_token_hash =
            admin_token_hash(&db, config.admin_token.as_deref(), &data_dir).await?;
        let fanout = Arc::new(Fanout::default());
        let metrics = Arc::new(Metrics::default());
        let tasks = TaskTracker::new();
        let (broker, writer) = Broker::start(
            db.clone(),
            fanout.clone(),
            metrics.clone(),
            shutdown,
            crate::broker::Timing {
                heartbeat_timeout: config.heartbeat_timeout,
                inventory_interval: if config.inventory_interval.is_zero() {
                    Duration::from_secs(30)
                } else {
                    config.inventory_interval
                },
                max_log_bytes_per_command: config.max_log_bytes_per_command,
                retention: (config.retention_days > 0)
                    .then(|| Duration::from_secs(config.retention_days.saturating_mul(86_400))),
            },
            replica,
            &tasks,
        );
        tasks.spawn(reaper::run(broker.clone()));
        let audit = crate::api::audit::AuditWriter::start(db.clone(), &tasks);
        let state = AppState {
            audit,
            db,
            broker,
            fanout,
            metrics,
            admin_token_hash: admin_token_hash.into(),
            auth: Arc::new(crate::api::auth::AuthState {
                stream_recheck: if config.stream_recheck.is_zero() {
                    crate::api::auth::STREAM_RECHECK
                } else {
                    config.stream_recheck
                },
                limiter: crate::api::auth::FailureLimiter::new(match config.max_auth_failures {
                    0 => crate::api::auth::MAX_FAILURES,
                    n => n,
                }),
                ..crate::api::auth::AuthState::new(
                    (config.tls_cert.is_some() && config.tls_key.is_some())
                        || config
                            .public_url
                            .as_deref()
                            .is_some_and(|u| u.starts_with("https://")),
                )
            }),
            ui_dir: config
                .ui_dir
                .clone()
                .filter(|d| d.join("index.html").exists()),
            tasks: tasks.clone(),
            agent_binary: config
                .agent_binary
                .clone()
                .or_else(crate::api::install::default_agent_binary),
            public_url: config.public_url.clone(),
        };
        let router = api::router(state.clone());
        Ok(Self {
            state,
            router,
            tasks,
            writer,
        })
    }

    /// Stops everything in order: sessions close (the shutdown token), the writer drains
    /// what they sent, every task ends (each bounded), the database closes.
    pub async fn stop(self) {
        let Self {
            state,
            router,
            tasks,
            writer,
        } = self;
        drop(router);
        let broker = state.broker.clone();
        broker.close_all();
        broker.shutdown.cancel();
        // A session hands its last events to the writer before it unregisters; once all
        // are gone, a stop behind them in the writer's queue drains everything they sent.
        let closing = tokio::time::Instant::now() + Duration::from_secs(5);
        while broker.online_count() > 0 && tokio::time::Instant::now() < closing {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker.stop_writer().await;
        let db = state.db.clone();
        let replica = broker.replica.clone();
        drop(broker);
        drop(state);
        let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 5 s");
        }
        // A clean stop: the others need not wait for this replica's lease to run out
        // (after every task, so that the lease task cannot register it again).
        if let Err(e) = db.remove_replica(&replica.id).await {
            tracing::warn!(error = %e, "cannot remove this replica's row");
        }
        // Close connections now (SQLite checkpoints its WAL) instead of at runtime teardown.
        db.close().await;
    }
}

/// Runs the control plane on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // `shutdown` asks to stop; the replica drains first (not ready, agents moved away a
    // few at a time), then `stop` ends the HTTP server and every task.
    let stop = CancellationToken::new();
    let app = App::start(&config, stop.child_token()).await?;
    {
        let broker = app.state.broker.clone();
        let stop = stop.clone();
        let drain = config.drain;
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = stop.cancelled() => return,
            }
            cluster::drain(&broker, drain).await;
            stop.cancel();
        });
    }
    let shutdown = stop;
    let router = app.router.clone();
    let addr = listener.local_addr()?;
    let limits = config.http_limits;
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let acceptor = crate::tls::acceptor(cert, key)?;
            tracing::info!(%addr, "trellis listening (https, wss)");
            let listener = crate::tls::TlsListener::new(listener, acceptor, shutdown.clone());
            crate::http_server::serve(listener, router, limits, shutdown.clone()).await;
        }
        (None, None) => {
            tracing::info!(%addr, "trellis listening (http, ws)");
            use axum::serve::ListenerExt;
            // Small frames both ways: Nagle plus delayed ACK would add ~40 ms per round trip.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            crate::http_server::serve(listener, router, limits, shutdown.clone()).await;
        }
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
    app.stop().await;
    tracing::info!("trellis stopped");
    Ok(())
}
