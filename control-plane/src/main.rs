//! `trellis`: the control plane binary and its admin CLI.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trellis::{
    db::Db,
    domain::{admins, agents},
    ServeConfig,
};

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis control plane")]
struct Cli {
    /// Log lines as text (no colours unless stderr is a terminal) or JSON (for log shippers).
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr (journald under systemd); `RUST_LOG` filters them.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

#[derive(clap::Args, Clone)]
struct DbArgs {
    /// `sqlite://FILE` (created if missing) or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://trellis.db",
        global = true
    )]
    database_url: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane.
    Serve {
        #[arg(long, env = "TRELLIS_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        #[command(flatten)]
        db: DbArgs,
        /// Bootstrap admin bearer token (≥ 16 characters). When unset on first start, one
        /// is generated into `<data dir>/admin-token` (readable by its owner only).
        #[arg(long, env = "TRELLIS_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Directory for private files (the generated admin token). Default: the SQLite
        /// database's directory, or the working directory with PostgreSQL.
        #[arg(long, env = "TRELLIS_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Directory of the built UI (default: ui/dist if it exists).
        #[arg(long, env = "TRELLIS_UI_DIR")]
        ui_dir: Option<PathBuf>,
        /// PEM certificate chain for HTTPS/WSS.
        #[arg(long, env = "TRELLIS_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for HTTPS/WSS.
        #[arg(long, env = "TRELLIS_TLS_KEY")]
        tls_key: Option<PathBuf>,
        /// Seconds without any frame from an agent before its connection is considered dead
        /// and closed; agents are told to heartbeat every third of it. Lower it behind load
        /// balancers or NATs that drop idle connections sooner.
        #[arg(long, env = "TRELLIS_HEARTBEAT_TIMEOUT_SECS", default_value_t = trellis_protocol::HEARTBEAT_TIMEOUT_SECS,
              value_parser = clap::value_parser!(u64).range(3..=3600))]
        heartbeat_timeout_secs: u64,
        /// Seconds between the VM inventory reports agents send (drift shows within one).
        #[arg(long, env = "TRELLIS_INVENTORY_INTERVAL_SECS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        inventory_interval_secs: u64,
        /// Most log bytes one command may store (default 256 MiB). A command whose log
        /// passes it ends `failed` (`log_limit`), is cancelled on its agent, and the
        /// session that sent it is closed with that reason. 0: no limit.
        #[arg(long, env = "TRELLIS_MAX_LOG_BYTES_PER_COMMAND",
              default_value_t = trellis::broker::DEFAULT_MAX_LOG_BYTES_PER_COMMAND)]
        max_log_bytes_per_command: u64,
        /// Days a finished command is kept with its events and stages (default 30); pinned
        /// commands and the latest command of each node are kept longer. 0: keep forever.
        #[arg(long, env = "TRELLIS_RETENTION_DAYS",
              default_value_t = trellis::broker::DEFAULT_RETENTION_DAYS)]
        retention_days: u64,
        /// Most HTTP connections open at once (agents' WebSockets included); further
        /// clients wait in the listen backlog until one closes.
        #[arg(long, env = "TRELLIS_MAX_CONNECTIONS",
              default_value_t = trellis::http_server::DEFAULT_MAX_CONNECTIONS as u64,
              value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        max_connections: u64,
        /// Seconds a client has to send a request's complete header; also how long an idle
        /// keep-alive connection stays open. WebSocket sessions are not affected.
        #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT_SECS",
              default_value_t = trellis::http_server::DEFAULT_HEADER_READ_TIMEOUT_SECS,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        header_read_timeout_secs: u64,
    },
    /// Manage agents directly in the database.
    Agents {
        #[command(subcommand)]
        command: AgentCmd,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Manage named admins (each with its own API token) directly in the database.
    Admins {
        #[command(subcommand)]
        command: AdminCmd,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Create a named admin and print its one-time token.
    Create { name: String },
    /// List named admins (the bootstrap admin is "admin" and has no row).
    List,
    /// Revoke an admin: its token stops working and its browser sessions end.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Register an agent and print its id and one-time token.
    Create {
        name: String,
        #[arg(long, default_value_t = 4)]
        max_concurrency: i64,
    },
    /// List agents.
    List,
    /// Issue a new token (the old one stops working).
    RotateToken { id: uuid::Uuid },
    /// Revoke an agent (a running control plane disconnects it within seconds).
    Revoke { id: uuid::Uuid },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Cmd::Serve {
            listen,
            db,
            admin_token,
            data_dir,
            ui_dir,
            tls_cert,
            tls_key,
            heartbeat_timeout_secs,
            inventory_interval_secs,
            max_log_bytes_per_command,
            retention_days,
            max_connections,
            header_read_timeout_secs,
        } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            let ui_dir = ui_dir.or_else(|| {
                let d = PathBuf::from("ui/dist");
                d.join("index.html").exists().then_some(d)
            });
            let shutdown = CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down");
                s.cancel();
            });
            trellis::serve(
                listener,
                ServeConfig {
                    database_url: db.database_url,
                    admin_token,
                    data_dir,
                    ui_dir,
                    tls_cert,
                    tls_key,
                    heartbeat_timeout: std::time::Duration::from_secs(heartbeat_timeout_secs),
                    inventory_interval: std::time::Duration::from_secs(inventory_interval_secs),
                    max_log_bytes_per_command,
                    retention_days,
                    http_limits: trellis::http_server::Limits {
                        max_connections: max_connections as usize,
                        header_read_timeout: std::time::Duration::from_secs(
                            header_read_timeout_secs,
                        ),
                    },
                },
                shutdown,
            )
            .await
        }
        Cmd::Admins { command, db } => {
            let db = Db::connect(&db.database_url).await?;
            let fail = |e: trellis::domain::DomainError| anyhow::anyhow!("{e}");
            match command {
                AdminCmd::Create { name } => {
                    let (a, token) = admins::create(&db, &name).await.map_err(fail)?;
                    println!(
                        "admin:    {}\ntoken:    {token}\n(the token is shown only once)",
                        a.name
                    );
                }
                AdminCmd::List => {
                    for a in db.list_admins().await? {
                        let state = if a.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        };
                        println!(
                            "{:<24} {:<8} created {}  last used {}",
                            a.name,
                            state,
                            trellis::time::rfc3339(a.created_at),
                            a.last_used_at
                                .map(trellis::time::rfc3339)
                                .unwrap_or_else(|| "never".into())
                        );
                    }
                }
                AdminCmd::Revoke { name } => {
                    admins::revoke(&db, &name).await.map_err(fail)?;
                    println!("admin {name} revoked");
                }
            }
            Ok(())
        }
        Cmd::Agents { command, db } => {
            let db = Db::connect(&db.database_url).await?;
            let fail = |e: trellis::domain::DomainError| anyhow::anyhow!("{e}");
            match command {
                AgentCmd::Create {
                    name,
                    max_concurrency,
                } => {
                    let (a, token) =
                        agents::create(&db, &name, Some(max_concurrency.clamp(1, 1024)))
                            .await
                            .map_err(fail)?;
                    println!(
                        "agent id: {}\ntoken:    {token}\n(the token is shown only once)",
                        a.id
                    );
                }
                AgentCmd::List => {
                    for a in db.list_agents().await? {
                        println!(
                            "{}  {:<24} {:<8} {}",
                            a.id,
                            a.name,
                            a.status,
                            a.hostname.unwrap_or_default()
                        );
                    }
                }
                AgentCmd::RotateToken { id } => {
                    let token = agents::rotate(&db, None, id.into()).await.map_err(fail)?;
                    println!("new token: {token}\n(the token is shown only once)");
                }
                AgentCmd::Revoke { id } => {
                    agents::revoke(&db, None, id.into()).await.map_err(fail)?;
                    println!("agent {id} revoked");
                }
            }
            Ok(())
        }
    }
}
