//! Persistence: the one owner of stored state. Every SQL statement of the control plane
//! lives in this module, split by concern (`agents`, `commands`, `dispatch`, `events`,
//! `nodes`, `templates`, `settings`); callers see typed rows, typed ids and status enums
//! (`crate::model`), never SQL or column strings. One [`Db`] over sqlx's `Any` driver runs
//! the same run-time queries on SQLite (embedded default) and PostgreSQL; the schema in
//! `migrations/` is portable (text ids, BIGINT millisecond timestamps, TEXT JSON), and the
//! workarounds that portability needs are in [`sql`]. The database owns command state:
//! nothing the broker needs after a restart lives only in memory.

mod admins;
mod agents;
mod audit;
mod commands;
mod credentials;
mod dispatch;
mod events;
mod housekeeping;
mod inventory;
mod node_batches;
mod node_import;
mod nodes;
pub mod notify;
mod reads;
mod replicas;
mod secrets;
mod settings;
mod signatures;
pub mod sql;
mod templates;
mod terraform_state;

pub use admins::{AdminRow, SessionRow};
pub use agents::AgentRow;
pub use audit::{AuditFilter, AuditRow};
pub use commands::{
    CancelOutcome, CommandFilter, CommandRow, NewCommand, NodeRef, Owner, StageRow,
};
pub use dispatch::{DispatchRow, Reconciled};
pub use events::{BatchDone, EventBatch, EventRow, Finished, StageDone};
pub use housekeeping::Pruned;
pub use inventory::{AgentVmRow, InventoryApplied};
pub use node_batches::{BatchNode, NodeProgress};
pub use node_import::NodeImport;
pub use nodes::{NewNode, NodeCommandStart, NodeRow, NodeUpdate, ProvisionStart};
pub use replicas::ReplicaRow;
pub use signatures::Signed;
pub use templates::{TemplateFields, TemplateRow};
pub use terraform_state::{
    LockOutcome, NewStateVersion, PutOutcome, StateLockRow, StateVersionRow, StateWorkspaceRow,
    UnlockOutcome,
};

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    /// A live node has the name (the `nodes_live_name` index; API code `duplicate_name`).
    #[error("name taken: {0}")]
    NameTaken(String),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A retry's node no longer waits for it (re-provisioned, forgotten or deleted).
    #[error("the node moved on")]
    NodeMoved,
    /// A failure shared by every request of a batch (the original error is logged).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Like `Unavailable`, when the database cannot grow (see [`sql::StorageTrouble`]).
    #[error("database full: {0}")]
    Full(String),
}

pub type DbResult<T> = Result<T, DbError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    /// Reads (and, on PostgreSQL, everything).
    pool: AnyPool,
    /// Writes. On SQLite one connection: SQLite has a single writer, and waiting for it
    /// in this pool's queue is fair and asynchronous, where several connections contending
    /// for the lock would back off in SQLite's sleeping busy handler.
    writer: AnyPool,
    pub backend: Backend,
    /// `sqlite::memory:`: the one connection is the database (never reconnected).
    memory: bool,
    /// The key sensitive command params are stored under (see [`crate::secrets`]).
    secrets: crate::secrets::Secrets,
    /// Signs every command as it is stored (see `commands.signature`).
    signing: std::sync::Arc<trellis_protocol::signing::SigningKey>,
    /// The PostgreSQL URL, for the notification listener and the leader lock's own
    /// connections (`None` on SQLite).
    pg_url: Option<std::sync::Arc<str>>,
    /// Grouped hot reads (PostgreSQL only; see [`reads`]).
    reads: Option<std::sync::Arc<Reads>>,
}

/// The readers of [`reads`], one per kind of row.
struct Reads {
    commands: reads::Reader<crate::model::CommandId, (CommandRow, Option<NodeRef>)>,
    stages: reads::Reader<crate::model::CommandId, Vec<StageRow>>,
    agents: reads::Reader<crate::model::AgentId, AgentRow>,
}

impl Reads {
    fn spawn(pool: &AnyPool) -> Self {
        let (p1, p2, p3) = (pool.clone(), pool.clone(), pool.clone());
        Self {
            commands: reads::Reader::spawn(move |ids| {
                commands::commands_with_target(p1.clone(), ids)
            }),
            stages: reads::Reader::spawn(move |ids| commands::stages_of(p2.clone(), ids)),
            agents: reads::Reader::spawn(move |ids| agents::agents_by_id(p3.clone(), ids)),
        }
    }
}

impl Db {
    /// Connects (creating a SQLite file if needed) and applies migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            anyhow::bail!("unsupported database URL {url:?}: use sqlite://FILE or postgres://…");
        };
        // `sqlite::memory:` (tests): one connection that lives as long as the pool, which
        // serves reads and writes alike (every connection would see its own database).
        let memory = backend == Backend::Sqlite && url.contains(":memory:");
        if backend == Backend::Sqlite && !memory {
            crate::data_dir::private_sqlite_file(url)
                .map_err(|e| anyhow::anyhow!("cannot make the database file private: {e}"))?;
        }
        let url = if backend == Backend::Sqlite && !memory && !url.contains("mode=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        } else {
            url.to_string()
        };
        let opts = || AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let sqlite_pool = |max: u32| {
            opts()
                .max_connections(max)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .after_connect(|conn, _| Box::pin(sqlite_pragmas(conn)))
                .connect(&url)
        };
        let migrate = |pool: AnyPool| async move {
            MIGRATOR
                .run(&pool)
                .await
                .map_err(|e| anyhow::anyhow!("database migration failed: {e}"))
        };
        let open = |e: sqlx::Error| anyhow::anyhow!("cannot open database: {e}");
        let (pool, writer) = match backend {
            Backend::Sqlite if memory => {
                let pool = sqlite_pool(1).await.map_err(open)?;
                migrate(pool.clone()).await?;
                (pool.clone(), pool)
            }
            Backend::Sqlite => {
                let writer = sqlite_pool(1).await.map_err(open)?;
                migrate(writer.clone()).await?;
                // WAL: readers run beside the writer.
                (sqlite_pool(4).await.map_err(open)?, writer)
            }
            Backend::Postgres => {
                let pool = opts()
                    .max_connections(pg_pool_size())
                    // sqlx pings a connection before every use by default: a round trip
                    // to the server per statement or transaction, as slow as the statement
                    // itself on a busy host. Only a connection that sat idle for a while
                    // (its server may have restarted, a firewall may have dropped it) is
                    // checked; a busy one that broke fails its statement, which is retried
                    // like any storage failure.
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for < PG_IDLE_CHECK {
                                return Ok(true);
                            }
                            use sqlx::Connection;
                            Ok(conn.ping().await.is_ok())
                        })
                    })
                    .connect(&url)
                    .await
                    .map_err(open)?;
                migrate(pool.clone()).await?;
                (pool.clone(), pool)
            }
        };
        let reads =
            (backend == Backend::Postgres).then(|| std::sync::Arc::new(Reads::spawn(&pool)));
        Ok(Self {
            pool,
            writer,
            backend,
            memory,
            pg_url: (backend == Backend::Postgres).then(|| url.as_str().into()),
            reads,
            // The server sets its persistent key with `with_secrets`.
            secrets: crate::secrets::Secrets::ephemeral(),
            // The server sets its persistent key with `with_signing`.
            signing: std::sync::Arc::new(
                trellis_protocol::signing::SigningKey::generate()
                    .map_err(anyhow::Error::msg)?
                    .0,
            ),
        })
    }

    /// The PostgreSQL URL (`None` on SQLite).
    pub fn pg_url(&self) -> Option<&str> {
        self.pg_url.as_deref()
    }

    /// This database with `signing` as the key commands are signed with when stored.
    pub fn with_signing(
        mut self,
        signing: std::sync::Arc<trellis_protocol::signing::SigningKey>,
    ) -> Self {
        self.signing = signing;
        self
    }

    /// The key commands are signed with.
    pub fn signing(&self) -> &std::sync::Arc<trellis_protocol::signing::SigningKey> {
        &self.signing
    }

    /// This database with `secrets` as the key of sensitive command params.
    pub fn with_secrets(mut self, secrets: crate::secrets::Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    /// The key of sensitive command params.
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    /// The pool for statements that write (see `writer`).
    fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// Closes every connection (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// Starts a write transaction. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`) so that it waits for another writer instead of failing.
    ///
    /// When SQLite fails a statement with `SQLITE_FULL` (or an I/O error) it may roll the
    /// whole transaction back on its own; sqlx's `ROLLBACK` then fails ("no transaction is
    /// active") and its connection counts a transaction that no longer exists, so every
    /// later `BEGIN` on it fails with `InvalidSavePointStatement`. With one writer
    /// connection that stopped every write for good, even once the disk had space again:
    /// such a connection is closed here and the transaction started on a new one.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => match self.writer.begin_with("BEGIN IMMEDIATE").await {
                // An in-memory database lives in its one connection: closing it would
                // leave an empty, unmigrated one, so the error stands.
                Err(sqlx::Error::InvalidSavePointStatement) if !self.memory => {
                    tracing::warn!(
                        "the SQLite writer connection lost track of a rolled-back transaction; reconnecting"
                    );
                    self.writer.acquire().await?.close().await?;
                    self.writer.begin_with("BEGIN IMMEDIATE").await
                }
                other => other,
            },
            Backend::Postgres => self.writer.begin().await,
        }
    }

    pub async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// A pooled PostgreSQL connection idle this long is pinged before it is used again.
const PG_IDLE_CHECK: Duration = Duration::from_secs(5);

/// Connections per replica to PostgreSQL: `TRELLIS_DB_MAX_CONNECTIONS` (default 16). Each
/// replica also holds one for notifications and one for the housekeeping lock, so the
/// server's `max_connections` must cover `replicas × (this + 2)` plus the CLI and admins.
fn pg_pool_size() -> u32 {
    std::env::var("TRELLIS_DB_MAX_CONNECTIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n >= 2)
        .unwrap_or(16)
}

/// `TRELLIS_SQLITE_SYNCHRONOUS`: `FULL` (default) fsyncs every commit, so what was
/// acknowledged survives a power loss; `NORMAL` survives a crash of trellis but may lose
/// the last commits on power loss, for more throughput.
fn sqlite_synchronous() -> &'static str {
    match std::env::var("TRELLIS_SQLITE_SYNCHRONOUS").map(|v| v.to_ascii_uppercase()) {
        Ok(v) if v == "NORMAL" => "PRAGMA synchronous=NORMAL",
        _ => "PRAGMA synchronous=FULL",
    }
}

/// `TRELLIS_SQLITE_MAX_PAGE_COUNT` (a test knob, not a setting): caps the database at
/// that many pages (`PRAGMA max_page_count`), so that a test can make SQLite "full" without
/// filling a disk; writes that need more then fail with `SQLITE_FULL`. Unset (or not a
/// number): no cap beyond SQLite's own.
fn sqlite_max_page_count() -> Option<String> {
    let pages: u64 = std::env::var("TRELLIS_SQLITE_MAX_PAGE_COUNT")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(format!("PRAGMA max_page_count={pages}"))
}

async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in [
        "PRAGMA journal_mode=WAL",
        sqlite_synchronous(),
        "PRAGMA busy_timeout=10000",
        "PRAGMA foreign_keys=ON",
    ] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    if let Some(pragma) = sqlite_max_page_count() {
        sqlx::query(&pragma).execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
