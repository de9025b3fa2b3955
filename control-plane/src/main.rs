//! `trellis`: the control plane binary and its admin CLI.

mod cli;

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
    #[command(flatten)]
    client: cli::GlobalArgs,
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
    /// Directory for private files: the keys (`credentials.key`, `secrets.key`,
    /// `signing.key`) and a generated admin token. Default: the SQLite database's
    /// directory, or the working directory with PostgreSQL. The `agents` and `admins`
    /// commands need the same one as `trellis serve` (tokens are hashed with its key).
    #[arg(long, env = "TRELLIS_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
}

impl DbArgs {
    /// Connects, with the credential key loaded (tokens made here must verify there).
    async fn open(&self) -> anyhow::Result<Db> {
        let dir = trellis::data_dir::resolve(self.data_dir.as_deref(), &self.database_url);
        let env = std::env::var(trellis::auth::KEY_ENV).ok();
        trellis::auth::set_key(&trellis::auth::load_key(env.as_deref(), &dir, false)?);
        Db::connect(&self.database_url).await
    }
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
        /// Directory of the built UI (default: ui/dist if it exists).
        #[arg(long, env = "TRELLIS_UI_DIR")]
        ui_dir: Option<PathBuf>,
        /// PEM certificate chain for HTTPS/WSS.
        #[arg(long, env = "TRELLIS_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for HTTPS/WSS.
        #[arg(long, env = "TRELLIS_TLS_KEY")]
        tls_key: Option<PathBuf>,
        /// The URL users and agents reach trellis at (e.g. behind a TLS-terminating proxy:
        /// `https://trellis.example.com`). `https://` here makes session cookies `Secure`
        /// even when trellis itself speaks plain HTTP.
        #[arg(long, env = "TRELLIS_PUBLIC_URL", value_parser = parse_public_url)]
        public_url: Option<String>,
        /// Seconds between an open event stream's checks that its session or token still
        /// works (a stream of a signed-out or revoked admin ends at the next check).
        #[arg(long, env = "TRELLIS_STREAM_RECHECK_SECS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        stream_recheck_secs: u64,
        /// Failed authentications (a wrong token at sign-in or as a bearer token) allowed
        /// per remote address a minute; then every token from it is refused (429) for the
        /// rest of the minute.
        #[arg(long, env = "TRELLIS_MAX_AUTH_FAILURES", default_value_t = trellis::api::auth::MAX_FAILURES,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_auth_failures: u32,
        /// Seconds without any frame from an agent before its connection is considered dead
        /// and closed; agents are told to heartbeat every third of it. Lower it behind load
        /// balancers or NATs that drop idle connections sooner.
        #[arg(long, env = "TRELLIS_HEARTBEAT_TIMEOUT_SECS", default_value_t = trellis_protocol::HEARTBEAT_TIMEOUT_SECS,
              value_parser = clap::value_parser!(u64).range(3..=3600))]
        heartbeat_timeout_secs: u64,
        /// This replica's name among several on one PostgreSQL (shown in
        /// `GET /api/cluster/replicas` and on agents). Default: the host name and a
        /// random suffix.
        #[arg(long, env = "TRELLIS_REPLICA_NAME")]
        replica_name: Option<String>,
        /// On SIGTERM, seconds over which this replica's agents are moved to the other
        /// replicas a few at a time (`/readyz` fails and new agent sessions are refused
        /// meanwhile). Without another live replica, sessions close at once.
        #[arg(long, env = "TRELLIS_DRAIN_SECS", default_value_t = 10,
              value_parser = clap::value_parser!(u64).range(0..=600))]
        drain_secs: u64,
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
        /// The tendril binary handed to agents at `/install/tendril` (the install script
        /// downloads it). Default: a `tendril` file beside this executable.
        #[arg(long, env = "TRELLIS_AGENT_BINARY")]
        agent_binary: Option<PathBuf>,
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
    /// Client commands: talk to a running control plane over its HTTP API.
    #[command(flatten)]
    Client(cli::ClientCmd),
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
    /// Register an agent and print its id, one-time token and the install one-liner.
    Create {
        name: String,
        #[arg(long, default_value_t = 4)]
        max_concurrency: i64,
        /// The URL hosts reach trellis at, for the install one-liner.
        #[arg(long, env = "TRELLIS_PUBLIC_URL", value_parser = parse_public_url)]
        public_url: Option<String>,
        /// Then wait until the agent is online (checked in the database every second).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (exit status 1).
        #[arg(long, default_value_t = 1800, requires = "wait")]
        wait_secs: u64,
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
        Cmd::Client(cmd) => std::process::exit(cli::run(cmd, cli.client).await),
        Cmd::Serve {
            listen,
            db,
            admin_token,
            ui_dir,
            tls_cert,
            tls_key,
            public_url,
            stream_recheck_secs,
            max_auth_failures,
            heartbeat_timeout_secs,
            inventory_interval_secs,
            max_log_bytes_per_command,
            retention_days,
            max_connections,
            header_read_timeout_secs,
            agent_binary,
            replica_name,
            drain_secs,
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
                    data_dir: db.data_dir,
                    ui_dir,
                    tls_cert,
                    tls_key,
                    public_url,
                    stream_recheck: std::time::Duration::from_secs(stream_recheck_secs),
                    max_auth_failures,
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
                    agent_binary,
                    replica_name,
                    drain: std::time::Duration::from_secs(drain_secs),
                },
                shutdown,
            )
            .await
        }
        Cmd::Admins { command, db } => {
            let db = db.open().await?;
            let fail = |e: trellis::domain::DomainError| anyhow::anyhow!("{e}");
            match command {
                AdminCmd::Create { name } => {
                    let r = admins::create(&db, &name).await;
                    let what = CliAction::new("admin.create", "admin", &name, &name);
                    cli_audit(&db, what, r.as_ref().err()).await;
                    let (a, token) = r.map_err(fail)?;
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
                    let r = admins::revoke(&db, &name).await;
                    let what = CliAction::new("admin.revoke", "admin", &name, &name);
                    cli_audit(&db, what, r.as_ref().err()).await;
                    r.map_err(fail)?;
                    println!("admin {name} revoked");
                }
            }
            Ok(())
        }
        Cmd::Agents { command, db } => {
            let db_args_key = server_public_key(&db);
            let db = db.open().await?;
            let fail = |e: trellis::domain::DomainError| anyhow::anyhow!("{e}");
            match command {
                AgentCmd::Create {
                    name,
                    max_concurrency,
                    public_url,
                    wait,
                    wait_secs,
                } => {
                    let r = agents::create(&db, &name, Some(max_concurrency.clamp(1, 1024))).await;
                    let id = r
                        .as_ref()
                        .map(|(a, _)| a.id.to_string())
                        .unwrap_or_default();
                    let what = CliAction::new("agent.create", "agent", &id, &name);
                    cli_audit(&db, what, r.as_ref().err()).await;
                    let (a, token) = r.map_err(fail)?;
                    println!(
                        "agent id: {}\ntoken:    {token}\n(the token is shown only once)",
                        a.id
                    );
                    print_install_hint(public_url.as_deref(), db_args_key.as_deref());
                    if wait {
                        wait_online(&db, a.id, std::time::Duration::from_secs(wait_secs)).await?;
                    }
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
                    let name = agent_name(&db, id.into()).await;
                    let r = agents::rotate(&db, None, id.into()).await;
                    let what = CliAction::new("agent.rotate_token", "agent", &id, &name);
                    cli_audit(&db, what, r.as_ref().err()).await;
                    let token = r.map_err(fail)?;
                    println!("new token: {token}\n(the token is shown only once)");
                }
                AgentCmd::Revoke { id } => {
                    let name = agent_name(&db, id.into()).await;
                    let r = agents::revoke(&db, None, id.into()).await;
                    let what = CliAction::new("agent.revoke", "agent", &id, &name);
                    cli_audit(&db, what, r.as_ref().err()).await;
                    r.map_err(fail)?;
                    println!("agent {id} revoked");
                }
            }
            Ok(())
        }
    }
}

/// What a CLI command did, for its audit row.
struct CliAction<'a> {
    action: &'a str,
    target_type: &'a str,
    target_id: String,
    target_name: String,
}

impl<'a> CliAction<'a> {
    fn new(action: &'a str, target_type: &'a str, id: &impl ToString, name: &str) -> Self {
        Self {
            action,
            target_type,
            target_id: id.to_string(),
            target_name: name.to_string(),
        }
    }
}

/// `cli:<os user>`: who ran the CLI, from `$USER`/`$LOGNAME`, else the name of the
/// process's uid in `/etc/passwd`, else the uid.
fn cli_actor() -> String {
    let env = ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    let user = env.unwrap_or_else(|| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
            let by_passwd = uid.and_then(|uid| {
                std::fs::read_to_string("/etc/passwd")
                    .ok()?
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| f[0].to_string())
                    })
            });
            by_passwd.unwrap_or_else(|| uid.map_or("unknown".into(), |u| format!("uid {u}")))
        }
        #[cfg(not(unix))]
        {
            "unknown".to_string()
        }
    });
    format!("cli:{}", user.trim())
}

/// The name of an agent, for the audit row of a CLI command on it ("" if unknown).
async fn agent_name(db: &Db, id: trellis::model::AgentId) -> String {
    db.get_agent(id).await.map(|a| a.name).unwrap_or_default()
}

/// Writes the audit row of a CLI command (outcome from its error, if any). A failure to
/// write it is reported on stderr, not turned into the command's failure.
async fn cli_audit(db: &Db, what: CliAction<'_>, err: Option<&trellis::domain::DomainError>) {
    use trellis::domain::DomainError as E;
    let code = err.map(|e| match e {
        E::NotFound(_) => "not_found",
        E::Invalid { code, .. } | E::Conflict { code, .. } | E::Upstream { code, .. } => code,
        E::Timeout(_) => "agent_timeout",
        E::Storage(_) => "internal",
    });
    let row = trellis::db::AuditRow {
        id: uuid::Uuid::new_v4().to_string(),
        at: trellis::time::now_ms(),
        actor: cli_actor(),
        action: what.action.into(),
        target_type: Some(what.target_type.into()),
        target_id: Some(what.target_id).filter(|s| !s.is_empty()),
        target_name: Some(what.target_name).filter(|s| !s.is_empty()),
        outcome: if err.is_some() { "error" } else { "success" }.into(),
        // No HTTP request: 0.
        status: 0,
        error_code: code.map(str::to_string),
        remote_addr: None,
        details: Some(serde_json::json!({ "via": "cli" })),
    };
    if let Err(e) = db.insert_audit(&row).await {
        eprintln!("warning: cannot write the audit log: {e}");
    }
}

/// The control plane's dispatch-signing public key, if this host has it
/// (`TRELLIS_SIGNING_KEY`, or `<data dir>/signing.key`; never created here): the install
/// line pins it, so the agent trusts only that key from its first connection.
fn server_public_key(db: &DbArgs) -> Option<String> {
    let text = match std::env::var(trellis::signing::SIGNING_KEY_ENV) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => {
            let dir = trellis::data_dir::resolve(db.data_dir.as_deref(), &db.database_url);
            std::fs::read_to_string(dir.join(trellis::signing::SIGNING_KEY_FILE)).ok()?
        }
    };
    trellis_protocol::signing::SigningKey::from_base64(&text)
        .ok()
        .map(|k| k.public_key_base64())
}

/// How to install the agent on a host: the one-liner, which asks for the token on the
/// terminal (so it stays out of shell history and `ps`), and a form for scripts.
fn print_install_hint(public_url: Option<&str>, server_key: Option<&str>) {
    let base = public_url.unwrap_or("https://<trellis address>");
    let cmd = trellis::api::install::one_liner(base, server_key);
    let unattended = cmd.replacen("| sh -s", "| TENDRIL_TOKEN=\"$TENDRIL_TOKEN\" sh -s", 1);
    println!(
        "\nInstall the agent on the Proxmox host (as root; paste the token when asked):\n  \
         {cmd}\nor, unattended (read -rs keeps the token out of shell history):\n  \
         IFS= read -rs TENDRIL_TOKEN && {unattended}"
    );
    if public_url.is_none() {
        println!("(pass --public-url or set TRELLIS_PUBLIC_URL to fill in the address)");
    }
}

/// Polls the database until the agent is online, or fails after `within`.
async fn wait_online(
    db: &Db,
    id: trellis::model::AgentId,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    println!("\nwaiting for the agent to connect ...");
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let a = db.get_agent(id).await?;
        if a.status == trellis::model::AgentStatus::Online {
            println!(
                "agent {} is online ({})",
                a.name,
                a.hostname.as_deref().unwrap_or("hostname not reported")
            );
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "agent {} did not come online within {} s",
                a.name,
                within.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// `--public-url`: an absolute `http://` or `https://` URL (a trailing `/` is dropped).
fn parse_public_url(raw: &str) -> Result<String, String> {
    let u = raw.trim().trim_end_matches('/');
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| format!("{raw:?} must start with https:// or http://"))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("{raw:?} is not a URL with a host"));
    }
    Ok(u.to_string())
}
