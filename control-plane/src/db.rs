//! Persistence. One [`Db`] over sqlx's `Any` driver runs the same run-time queries on
//! SQLite (embedded default) and PostgreSQL; the schema in `migrations/` is portable
//! (text ids, BIGINT millisecond timestamps, TEXT JSON). The database owns command state:
//! nothing the broker needs after a restart lives only in memory.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use trellis_protocol::{CommandError, CommandType};
use uuid::Uuid;

use crate::time::now_ms;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub const TERMINAL: [&str; 4] = ["succeeded", "failed", "cancelled", "timed_out"];
const TERMINAL_SQL: &str = "('succeeded','failed','cancelled','timed_out')";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A failure shared by every request of a batch (the original error is logged).
    #[error("database unavailable: {0}")]
    Unavailable(String),
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
    pub pool: AnyPool,
    /// Writes. On SQLite one connection: SQLite has a single writer, and waiting for it
    /// in this pool's queue is fair and asynchronous, where several connections contending
    /// for the lock would back off in SQLite's sleeping busy handler.
    writer: AnyPool,
    pub backend: Backend,
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code()
                .is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
                || d.message().contains("UNIQUE constraint failed")
        }
        _ => false,
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
        let url = if backend == Backend::Sqlite && !url.contains("mode=") {
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
            Backend::Sqlite => {
                let writer = sqlite_pool(1).await.map_err(open)?;
                migrate(writer.clone()).await?;
                // WAL: readers run beside the writer.
                (sqlite_pool(4).await.map_err(open)?, writer)
            }
            Backend::Postgres => {
                let pool = opts()
                    .max_connections(16)
                    .connect(&url)
                    .await
                    .map_err(open)?;
                migrate(pool.clone()).await?;
                (pool.clone(), pool)
            }
        };
        Ok(Self {
            pool,
            writer,
            backend,
        })
    }

    /// The pool for statements that write (see `writer`).
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// Closes every connection (SQLite checkpoints its WAL).
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// Starts a write transaction. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`) so that it waits for another writer instead of failing.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.writer.begin().await,
        }
    }

    pub async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
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

async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in [
        "PRAGMA journal_mode=WAL",
        sqlite_synchronous(),
        "PRAGMA busy_timeout=10000",
        "PRAGMA foreign_keys=ON",
    ] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    Ok(())
}

// -------------------------------------------------------------------------------------
// rows

fn uuid(row: &AnyRow, col: &str) -> DbResult<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::from_str(&s).map_err(|e| DbError::Corrupt(format!("{col}: {e}")))
}

fn opt_uuid(row: &AnyRow, col: &str) -> DbResult<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| Uuid::from_str(&s).map_err(|e| DbError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

fn json_col(row: &AnyRow, col: &str) -> DbResult<Option<serde_json::Value>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| DbError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

#[derive(Debug, Clone)]
pub struct AgentRow {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub last_heartbeat: Option<i64>,
    pub connected_at: Option<i64>,
    pub version: Option<String>,
    pub hostname: Option<String>,
    pub capabilities: Vec<String>,
    pub facts: serde_json::Value,
    pub max_concurrency: i64,
    pub session_epoch: i64,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

const AGENT_COLS: &str = "id, name, status, last_heartbeat, connected_at, version, hostname, \
    capabilities, facts, max_concurrency, session_epoch, revoked_at, created_at";

impl AgentRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: uuid(r, "id")?,
            name: r.try_get("name")?,
            status: r.try_get("status")?,
            last_heartbeat: r.try_get("last_heartbeat")?,
            connected_at: r.try_get("connected_at")?,
            version: r.try_get("version")?,
            hostname: r.try_get("hostname")?,
            capabilities: json_col(r, "capabilities")?
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default(),
            facts: json_col(r, "facts")?.unwrap_or_default(),
            max_concurrency: r.try_get("max_concurrency")?,
            session_epoch: r.try_get("session_epoch")?,
            revoked_at: r.try_get("revoked_at")?,
            created_at: r.try_get("created_at")?,
        })
    }

    pub fn has_capability(&self, t: CommandType) -> bool {
        self.capabilities.iter().any(|c| c == t.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct CommandRow {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub command_type: String,
    pub params: serde_json::Value,
    pub status: String,
    pub stage: Option<String>,
    pub percent: Option<f64>,
    pub last_seq: i64,
    pub result: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub attempt: i64,
    pub root_id: Uuid,
    pub retry_of: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    pub dispatched_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub deadline_at: i64,
    pub cancel_requested: bool,
}

const COMMAND_COLS: &str = "id, agent_id, type, params, status, stage, percent, last_seq, result, \
    error, attempt, root_id, retry_of, idempotency_key, created_by, created_at, dispatched_at, \
    started_at, finished_at, deadline_at, cancel_requested";

impl CommandRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: uuid(r, "id")?,
            agent_id: uuid(r, "agent_id")?,
            command_type: r.try_get("type")?,
            params: json_col(r, "params")?.unwrap_or_default(),
            status: r.try_get("status")?,
            stage: r.try_get("stage")?,
            percent: r.try_get("percent")?,
            last_seq: r.try_get("last_seq")?,
            result: json_col(r, "result")?,
            error: json_col(r, "error")?,
            attempt: r.try_get("attempt")?,
            root_id: uuid(r, "root_id")?,
            retry_of: opt_uuid(r, "retry_of")?,
            idempotency_key: r.try_get("idempotency_key")?,
            created_by: r.try_get("created_by")?,
            created_at: r.try_get("created_at")?,
            dispatched_at: r.try_get("dispatched_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            deadline_at: r.try_get("deadline_at")?,
            cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        })
    }

    pub fn is_terminal(&self) -> bool {
        TERMINAL.contains(&self.status.as_str())
    }

    /// The row `insert_commands` wrote for `c`, without reading it back.
    pub fn queued(c: &NewCommand, created_at: i64) -> Self {
        Self {
            id: c.id,
            agent_id: c.agent_id,
            command_type: c.command_type.as_str().to_string(),
            params: c.params.clone(),
            status: "queued".into(),
            stage: None,
            percent: None,
            last_seq: 0,
            result: None,
            error: None,
            attempt: c.attempt,
            root_id: c.root_id,
            retry_of: c.retry_of,
            idempotency_key: c.idempotency_key.clone(),
            created_by: c.created_by.clone(),
            created_at,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            deadline_at: c.deadline_at,
            cancel_requested: false,
        }
    }
}

/// Claims queued commands for an agent up to its free concurrency, returning them.
///
/// One statement (not read-then-write), so it is atomic on its own. The outer
/// `status = 'queued'` makes a concurrent claim (another replica) skip rows already taken
/// under PostgreSQL's READ COMMITTED re-check.
fn claim_query(
    agent_id: Uuid,
    epoch: i64,
    max_concurrency: i64,
    now: i64,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments<'static>> {
    sqlx::query(
        "UPDATE commands SET status = 'dispatched', dispatched_at = $1, session_epoch = $2 \
         WHERE status = 'queued' AND id IN (SELECT id FROM commands WHERE agent_id = $3 AND status = 'queued' \
         ORDER BY created_at LIMIT (SELECT CASE WHEN COUNT(*) >= $4 THEN 0 ELSE $4 - COUNT(*) END \
         FROM commands WHERE agent_id = $3 AND status IN ('dispatched', 'running'))) \
         RETURNING id, type, params, deadline_at, attempt, root_id",
    )
    .bind(now)
    .bind(epoch)
    .bind(agent_id.to_string())
    .bind(max_concurrency)
}

/// `INSERT … VALUES ($1,…,$cols),(…)` for `rows` rows.
pub fn multi_row_insert(head: &str, cols: usize, rows: usize) -> String {
    use std::fmt::Write;
    let mut sql = String::with_capacity(head.len() + rows * cols * 5);
    sql.push_str(head);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ",(" });
        for c in 0..cols {
            if c > 0 {
                sql.push(',');
            }
            let _ = write!(sql, "${}", r * cols + c + 1);
        }
        sql.push(')');
    }
    sql
}

#[derive(Debug, Clone)]
pub struct StageRow {
    pub name: String,
    pub state: String,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub ts: i64,
    pub kind: String,
    pub stream: Option<String>,
    pub data: String,
}

/// What the dispatcher sends for one claimed command.
#[derive(Debug, Clone)]
pub struct DispatchRow {
    pub id: Uuid,
    pub command_type: String,
    pub params: serde_json::Value,
    pub deadline_at: i64,
    pub attempt: i64,
    pub root_id: Uuid,
}

impl DispatchRow {
    /// The `dispatch` frame for this command.
    pub fn into_message(self) -> trellis_protocol::ServerMessage {
        trellis_protocol::ServerMessage::Dispatch(trellis_protocol::Dispatch {
            command_id: self.id,
            command_type: self.command_type,
            params: self.params,
            deadline_ms: Some(self.deadline_at),
            attempt: self.attempt.clamp(1, i64::from(u32::MAX)) as u32,
            root_command_id: Some(self.root_id),
        })
    }

    fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: uuid(r, "id")?,
            command_type: r.try_get("type")?,
            params: json_col(r, "params")?.unwrap_or_default(),
            deadline_at: r.try_get("deadline_at")?,
            attempt: r.try_get("attempt")?,
            root_id: uuid(r, "root_id")?,
        })
    }
}

pub struct NewCommand {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub command_type: CommandType,
    pub params: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub created_by: String,
    pub deadline_at: i64,
    pub attempt: i64,
    pub root_id: Uuid,
    pub retry_of: Option<Uuid>,
}

// -------------------------------------------------------------------------------------
// agents

impl Db {
    pub async fn create_agent(
        &self,
        name: &str,
        token_hash: &str,
        max_concurrency: i64,
    ) -> DbResult<AgentRow> {
        let id = Uuid::new_v4();
        let res = sqlx::query(
            "INSERT INTO agents (id, name, token_hash, max_concurrency, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(token_hash)
        .bind(max_concurrency)
        .bind(now_ms())
        .execute(self.writer())
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(DbError::Conflict(format!(
                    "an agent named {name:?} already exists"
                )))
            }
            r => r?,
        };
        self.get_agent(id).await
    }

    pub async fn get_agent(&self, id: Uuid) -> DbResult<AgentRow> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE id = $1 AND revoked_at IS NULL"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound)?;
        AgentRow::from_row(&row)
    }

    pub async fn list_agents(&self) -> DbResult<Vec<AgentRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE revoked_at IS NULL ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(AgentRow::from_row).collect()
    }

    pub async fn agent_by_token_hash(&self, hash: &str) -> DbResult<Option<(AgentRow, String)>> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS}, token_hash FROM agents WHERE token_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((AgentRow::from_row(&r)?, r.try_get("token_hash")?)))
            .transpose()
    }

    pub async fn rotate_token(&self, id: Uuid, hash: &str) -> DbResult<()> {
        let n =
            sqlx::query("UPDATE agents SET token_hash = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(hash)
                .bind(id.to_string())
                .execute(self.writer())
                .await?
                .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        Ok(())
    }

    /// Revokes an agent: its token stops working; queued commands are cancelled.
    pub async fn revoke_agent(&self, id: Uuid) -> DbResult<()> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE agents SET revoked_at = $1, status = 'offline', token_hash = $2 WHERE id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        // keep the unique index happy and make the old hash unusable
        .bind(format!("revoked:{id}"))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        sqlx::query(&format!(
            "UPDATE commands SET status = 'cancelled', finished_at = $1, error = $2 \
             WHERE agent_id = $3 AND status NOT IN {TERMINAL_SQL}"
        ))
        .bind(now)
        .bind(error_json(&CommandError::new(
            "agent_revoked",
            "the agent was revoked",
        )))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE nodes SET status = 'failed', error = 'agent_revoked: the hypervisor was revoked',              updated_at = $1 WHERE hypervisor_id = $2 AND status = 'provisioning'",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks an agent online with a new session epoch and returns the epoch.
    pub async fn agent_connected(
        &self,
        id: Uuid,
        hello: &trellis_protocol::Hello,
    ) -> DbResult<i64> {
        let now = now_ms();
        let caps: Vec<&str> = hello
            .capabilities
            .iter()
            .filter(|c| **c != CommandType::Unknown)
            .map(|c| c.as_str())
            .collect();
        let row = sqlx::query(
            "UPDATE agents SET session_epoch = session_epoch + 1, status = 'online', connected_at = $1, \
             last_heartbeat = $1, version = $2, hostname = $3, capabilities = $4, facts = $5, \
             max_concurrency = $6 WHERE id = $7 AND revoked_at IS NULL RETURNING session_epoch",
        )
        .bind(now)
        .bind(&hello.agent_version)
        .bind(&hello.hostname)
        .bind(serde_json::to_string(&caps).unwrap_or_default())
        .bind(hello.facts.to_string())
        .bind(i64::from(hello.max_concurrency.clamp(1, 1024)))
        .bind(id.to_string())
        .fetch_optional(self.writer())
        .await?
        .ok_or(DbError::NotFound)?;
        Ok(row.try_get(0)?)
    }

    pub async fn agent_disconnected(
        &self,
        id: Uuid,
        epoch: i64,
        last_heartbeat: i64,
    ) -> DbResult<()> {
        sqlx::query(
            "UPDATE agents SET status = 'offline', last_heartbeat = $1 WHERE id = $2 AND session_epoch = $3",
        )
        .bind(last_heartbeat)
        .bind(id.to_string())
        .bind(epoch)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Agents revoked since `since` (e.g. by the CLI, which cannot reach live sessions).
    pub async fn revoked_since(&self, since: i64) -> DbResult<Vec<Uuid>> {
        let rows =
            sqlx::query("SELECT id FROM agents WHERE revoked_at IS NOT NULL AND revoked_at >= $1")
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| uuid(r, "id")).collect()
    }

    /// At start-up no session of this process exists yet.
    pub async fn mark_all_offline(&self) -> DbResult<()> {
        sqlx::query("UPDATE agents SET status = 'offline' WHERE status <> 'offline'")
            .execute(self.writer())
            .await?;
        Ok(())
    }

    pub async fn record_heartbeats(&self, beats: &[(Uuid, i64)]) -> DbResult<()> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (id, ts) in beats {
            sqlx::query("UPDATE agents SET last_heartbeat = $1 WHERE id = $2")
                .bind(ts)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Marks the node a provision command was building as failed, in the caller's
/// transaction, so a reader never sees the command ended but its node still provisioning.
async fn fail_node_of(
    conn: &mut sqlx::AnyConnection,
    command_id: Uuid,
    message: &str,
    now: i64,
) -> DbResult<()> {
    sqlx::query(
        "UPDATE nodes SET status = 'failed', error = $1, updated_at = $2          WHERE last_command_id = $3 AND status = 'provisioning'",
    )
    .bind(message)
    .bind(now)
    .bind(command_id.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

pub fn error_json(e: &CommandError) -> String {
    serde_json::to_string(e).unwrap_or_else(|_| "{}".into())
}

// -------------------------------------------------------------------------------------
// commands

impl Db {
    /// Persists a command and its pending stages in one transaction.
    /// Inserts commands (status `queued`) and their planned stages in one transaction and
    /// returns their common `created_at`. A taken idempotency key fails the whole batch
    /// with `Conflict`; the caller retries such a batch one command at a time.
    pub async fn insert_commands(&self, cmds: &[&NewCommand]) -> DbResult<i64> {
        const COLS: usize = 12;
        const ROWS: usize = 200;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for chunk in cmds.chunks(ROWS) {
            let sql = multi_row_insert(
                "INSERT INTO commands (id, agent_id, type, params, status, attempt, root_id, \
                 retry_of, idempotency_key, created_by, created_at, deadline_at) VALUES ",
                COLS,
                chunk.len(),
            );
            let mut q = sqlx::query(&sql);
            for c in chunk {
                q = q
                    .bind(c.id.to_string())
                    .bind(c.agent_id.to_string())
                    .bind(c.command_type.as_str())
                    .bind(c.params.to_string())
                    .bind("queued")
                    .bind(c.attempt)
                    .bind(c.root_id.to_string())
                    .bind(c.retry_of.map(|u| u.to_string()))
                    .bind(c.idempotency_key.clone())
                    .bind(c.created_by.clone())
                    .bind(now)
                    .bind(c.deadline_at);
            }
            match q.execute(&mut *tx).await {
                Err(e) if is_unique_violation(&e) => {
                    return Err(DbError::Conflict("idempotency key already used".into()))
                }
                r => r?,
            };
        }
        let stages: Vec<(Uuid, usize, &str)> = cmds
            .iter()
            .flat_map(|c| {
                c.command_type
                    .stages()
                    .iter()
                    .enumerate()
                    .map(move |(i, name)| (c.id, i, *name))
            })
            .collect();
        for chunk in stages.chunks(ROWS) {
            let sql = multi_row_insert(
                "INSERT INTO command_stages (command_id, idx, name) VALUES ",
                3,
                chunk.len(),
            );
            let mut q = sqlx::query(&sql);
            for (id, i, name) in chunk {
                q = q.bind(id.to_string()).bind(*i as i64).bind(*name);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(now)
    }

    pub async fn command_by_idempotency_key(&self, key: &str) -> DbResult<Option<CommandRow>> {
        let row = sqlx::query(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(CommandRow::from_row).transpose()
    }

    pub async fn get_command(&self, id: Uuid) -> DbResult<CommandRow> {
        let row = sqlx::query(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound)?;
        CommandRow::from_row(&row)
    }

    pub async fn command_owner(&self, id: Uuid) -> DbResult<Option<Uuid>> {
        let row = sqlx::query("SELECT agent_id FROM commands WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| uuid(&r, "agent_id")).transpose()
    }

    pub async fn get_stages(&self, id: Uuid) -> DbResult<Vec<StageRow>> {
        let rows = sqlx::query(
            "SELECT name, state, started_at, finished_at, message FROM command_stages \
             WHERE command_id = $1 ORDER BY idx, started_at",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StageRow {
                    name: r.try_get("name")?,
                    state: r.try_get("state")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    pub async fn list_commands(
        &self,
        agent_id: Option<Uuid>,
        status: Option<&str>,
        command_type: Option<&str>,
        before: Option<(i64, Option<Uuid>)>,
        limit: i64,
    ) -> DbResult<Vec<CommandRow>> {
        let mut sql = format!("SELECT {COMMAND_COLS} FROM commands WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if agent_id.is_some() {
            sql += &format!(" AND agent_id = {}", next());
        }
        if status.is_some() {
            sql += &format!(" AND status = {}", next());
        }
        if command_type.is_some() {
            sql += &format!(" AND type = {}", next());
        }
        // Keyset paging on (created_at, id): rows created in the same millisecond are
        // neither skipped nor repeated across pages.
        match before {
            Some((_, Some(_))) => {
                let (a, b, c) = (next(), next(), next());
                sql += &format!(" AND (created_at < {a} OR (created_at = {b} AND id < {c}))");
            }
            Some((_, None)) => sql += &format!(" AND created_at < {}", next()),
            None => {}
        }
        sql += &format!(" ORDER BY created_at DESC, id DESC LIMIT {}", next());
        let mut q = sqlx::query(&sql);
        if let Some(a) = agent_id {
            q = q.bind(a.to_string());
        }
        if let Some(s) = status {
            q = q.bind(s.to_string());
        }
        if let Some(t) = command_type {
            q = q.bind(t.to_string());
        }
        match before {
            Some((at, Some(id))) => q = q.bind(at).bind(at).bind(id.to_string()),
            Some((at, None)) => q = q.bind(at),
            None => {}
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(CommandRow::from_row).collect()
    }

    /// Claims queued commands for an agent up to its free concurrency and returns them.
    pub async fn claim_queued(
        &self,
        agent_id: Uuid,
        epoch: i64,
        max_concurrency: i64,
    ) -> DbResult<Vec<DispatchRow>> {
        let rows = claim_query(agent_id, epoch, max_concurrency, now_ms())
            .fetch_all(self.writer())
            .await?;
        rows.iter().map(DispatchRow::from_row).collect()
    }

    /// Claims for several agents in one transaction: `(agent, epoch, max_concurrency)`.
    pub async fn claim_queued_many(
        &self,
        targets: &[(Uuid, i64, i64)],
    ) -> DbResult<Vec<(Uuid, Vec<DispatchRow>)>> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut out = Vec::with_capacity(targets.len());
        for &(agent_id, epoch, max_concurrency) in targets {
            let rows = claim_query(agent_id, epoch, max_concurrency, now)
                .fetch_all(&mut *tx)
                .await?;
            let rows = rows
                .iter()
                .map(DispatchRow::from_row)
                .collect::<DbResult<Vec<_>>>()?;
            out.push((agent_id, rows));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Whether the agent has queued commands (a read: no write lock).
    pub async fn has_queued(&self, agent_id: Uuid) -> DbResult<bool> {
        let row =
            sqlx::query("SELECT 1 FROM commands WHERE agent_id = $1 AND status = 'queued' LIMIT 1")
                .bind(agent_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Reconciles an agent's commands at connect time (see `Hello`):
    /// running-but-unknown and interrupted commands are marked lost; dispatched commands
    /// the agent never saw are sent again, unless they were cancelled meanwhile; commands
    /// the agent still runs but that ended here (or have a pending cancel) are cancelled
    /// on the agent.
    pub async fn reconcile_on_connect(
        &self,
        agent_id: Uuid,
        epoch: i64,
        active: &[Uuid],
        interrupted: &[Uuid],
    ) -> DbResult<Reconciled> {
        let rows = sqlx::query(
            "SELECT id, type, params, deadline_at, attempt, root_id, status, cancel_requested FROM commands \
             WHERE agent_id = $1 AND status IN ('dispatched', 'running')",
        )
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut out = Reconciled::default();
        let mut lost = Vec::new();
        for r in &rows {
            let d = DispatchRow::from_row(r)?;
            let status: String = r.try_get("status")?;
            let cancel: i64 = r.try_get("cancel_requested")?;
            let is_active = active.contains(&d.id);
            if interrupted.contains(&d.id) || (status == "running" && !is_active) {
                lost.push(d.id);
            } else if is_active {
                if cancel != 0 {
                    out.cancel.push(d.id);
                }
                out.known.push(d.id);
            } else if cancel != 0 {
                // Cancelled while the agent was away and never accepted: it never runs.
                out.cancelled.push(d.id);
            } else {
                out.resend.push(d);
            }
        }
        // Commands the agent still runs but that ended here (cancelled or timed out while
        // it was away) must be stopped there. Ids are UUIDs we format ourselves.
        for chunk in active.chunks(500) {
            let list: Vec<String> = chunk.iter().map(|id| format!("'{id}'")).collect();
            let rows = sqlx::query(&format!(
                "SELECT id FROM commands WHERE agent_id = $1 AND status IN ('cancelled', 'timed_out') AND id IN ({})",
                list.join(",")
            ))
            .bind(agent_id.to_string())
            .fetch_all(&self.pool)
            .await?;
            for r in &rows {
                out.cancel.push(uuid(r, "id")?);
            }
        }
        // Interrupted commands may not be in dispatched/running (already terminal); the
        // update below only touches live ones.
        for id in interrupted {
            if !lost.contains(id) {
                lost.push(*id);
            }
        }
        let now = now_ms();
        let err = error_json(
            &CommandError::new(
                "agent_lost_command",
                "the agent restarted and no longer knows this command; it may have partly run",
            )
            .retryable(),
        );
        let mut tx = self.begin_write().await?;
        for id in &lost {
            let n = sqlx::query(&format!(
                "UPDATE commands SET status = 'failed', error = $1, finished_at = $2 \
                 WHERE id = $3 AND agent_id = $4 AND status NOT IN {TERMINAL_SQL}"
            ))
            .bind(&err)
            .bind(now)
            .bind(id.to_string())
            .bind(agent_id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                fail_node_of(
                    &mut tx,
                    *id,
                    "agent_lost_command: the agent restarted and no longer knows this command",
                    now,
                )
                .await?;
                out.lost.push(*id);
            }
        }
        for id in &out.cancelled {
            sqlx::query(
                "UPDATE commands SET status = 'cancelled', finished_at = $1, error = $2 \
                 WHERE id = $3 AND status = 'dispatched'",
            )
            .bind(now)
            .bind(error_json(&CommandError::new(
                "cancelled",
                "cancelled by request",
            )))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
            fail_node_of(&mut tx, *id, "cancelled: provisioning was cancelled", now).await?;
        }
        for d in &out.resend {
            sqlx::query(
                "UPDATE commands SET session_epoch = $1, dispatched_at = $2 WHERE id = $3 AND status = 'dispatched'",
            )
            .bind(epoch)
            .bind(now)
            .bind(d.id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Cancels a command. Queued ones end at once; dispatched and running ones get
    /// `cancel_requested` and the agent is told. Returns the new row and what happened.
    pub async fn request_cancel(&self, id: Uuid) -> DbResult<(CommandRow, CancelOutcome)> {
        let now = now_ms();
        let err = error_json(&CommandError::new("cancelled", "cancelled by request"));
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE commands SET status = 'cancelled', finished_at = $1, error = $2 WHERE id = $3 AND status = 'queued'",
        )
        .bind(now)
        .bind(&err)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let outcome = if n > 0 {
            fail_node_of(&mut tx, id, "cancelled: provisioning was cancelled", now).await?;
            CancelOutcome::Cancelled
        } else {
            let n = sqlx::query(
                "UPDATE commands SET cancel_requested = 1 WHERE id = $1 AND status IN ('dispatched', 'running')",
            )
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                CancelOutcome::Requested
            } else {
                CancelOutcome::AlreadyFinished
            }
        };
        tx.commit().await?;
        Ok((self.get_command(id).await?, outcome))
    }

    /// Moves commands past their deadline to `timed_out` (and their nodes to `failed`);
    /// returns `(id, agent_id, was_dispatched)`: dispatched ones must be cancelled on the agent.
    pub async fn expire_deadlines(&self) -> DbResult<Vec<(Uuid, Uuid, bool)>> {
        let now = now_ms();
        let err = error_json(
            &CommandError::new(
                "timed_out",
                "the command did not finish before its deadline",
            )
            .retryable(),
        );
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(&format!(
            "UPDATE commands SET status = 'timed_out', finished_at = $1, error = $2 \
             WHERE status NOT IN {TERMINAL_SQL} AND deadline_at < $1 RETURNING id, agent_id, dispatched_at"
        ))
        .bind(now)
        .bind(&err)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let dispatched: Option<i64> = r.try_get("dispatched_at")?;
            let id = uuid(r, "id")?;
            fail_node_of(
                &mut tx,
                id,
                "timed_out: provisioning did not finish before its deadline",
                now,
            )
            .await?;
            out.push((id, uuid(r, "agent_id")?, dispatched.is_some()));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Agents shown online whose heartbeat stopped (e.g. their replica died): offline.
    pub async fn expire_stale_agents(&self, older_than: i64) -> DbResult<u64> {
        Ok(sqlx::query(
            "UPDATE agents SET status = 'offline' WHERE status = 'online' AND last_heartbeat < $1",
        )
        .bind(older_than)
        .execute(self.writer())
        .await?
        .rows_affected())
    }

    /// Dispatched commands not accepted for a while on a live session: sent again.
    pub async fn stale_dispatches(&self, older_than: i64) -> DbResult<Vec<(Uuid, Uuid)>> {
        let rows = sqlx::query(
            "SELECT id, agent_id FROM commands WHERE status = 'dispatched' AND dispatched_at < $1",
        )
        .bind(older_than)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((uuid(r, "id")?, uuid(r, "agent_id")?)))
            .collect()
    }

    pub async fn dispatch_row(&self, id: Uuid) -> DbResult<DispatchRow> {
        let row = sqlx::query(
            "SELECT id, type, params, deadline_at, attempt, root_id FROM commands WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound)?;
        DispatchRow::from_row(&row)
    }

    pub async fn count_by_status(&self) -> DbResult<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM commands GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
            .collect()
    }

    // ---------------------------------------------------------------------------------
    // events

    pub async fn events_after(
        &self,
        id: Uuid,
        after: i64,
        limit: i64,
        logs_only: bool,
    ) -> DbResult<Vec<EventRow>> {
        let sql = if logs_only {
            "SELECT seq, ts, kind, stream, data FROM command_events WHERE command_id = $1 AND seq > $2 \
             AND kind = 'log' ORDER BY seq LIMIT $3"
        } else {
            "SELECT seq, ts, kind, stream, data FROM command_events WHERE command_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        };
        let rows = sqlx::query(sql)
            .bind(id.to_string())
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    seq: r.try_get("seq")?,
                    ts: r.try_get("ts")?,
                    kind: r.try_get("kind")?,
                    stream: r.try_get("stream")?,
                    data: r.try_get("data")?,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled.
    Cancelled,
    /// The agent must stop it; it ends when the agent reports.
    Requested,
    /// It had already ended.
    AlreadyFinished,
}

#[derive(Debug, Default)]
pub struct Reconciled {
    pub lost: Vec<Uuid>,
    /// Dispatched, never accepted, cancelled meanwhile: ended here, never sent.
    pub cancelled: Vec<Uuid>,
    pub resend: Vec<DispatchRow>,
    pub cancel: Vec<Uuid>,
    pub known: Vec<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_insert_numbers_placeholders_row_by_row() {
        assert_eq!(
            multi_row_insert("INSERT INTO t (a, b) VALUES ", 2, 3),
            "INSERT INTO t (a, b) VALUES ($1,$2),($3,$4),($5,$6)"
        );
    }

    #[tokio::test]
    async fn a_batch_with_a_taken_idempotency_key_stores_nothing() {
        let dir = std::env::temp_dir().join(format!("trellis-db-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.join("t.db").display()))
            .await
            .unwrap();
        let agent = db.create_agent("a", "hash-a", 4).await.unwrap().id;
        let cmd = |key: Option<&str>| {
            let id = Uuid::new_v4();
            NewCommand {
                id,
                agent_id: agent,
                command_type: CommandType::TerraformApply,
                params: serde_json::json!({}),
                idempotency_key: key.map(str::to_string),
                created_by: "test".into(),
                deadline_at: now_ms() + 60_000,
                attempt: 1,
                root_id: id,
                retry_of: None,
            }
        };
        let (a, b) = (cmd(Some("k")), cmd(None));
        db.insert_commands(&[&a, &b]).await.unwrap();
        let stages = db.get_stages(a.id).await.unwrap();
        let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, CommandType::TerraformApply.stages());
        let (c, d) = (cmd(None), cmd(Some("k")));
        assert!(matches!(
            db.insert_commands(&[&c, &d]).await,
            Err(DbError::Conflict(_))
        ));
        assert!(matches!(db.get_command(c.id).await, Err(DbError::NotFound)));
        assert_eq!(db.get_command(b.id).await.unwrap().status, "queued");
        std::fs::remove_dir_all(&dir).ok();
    }
}
