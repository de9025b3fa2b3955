//! Commands: storing them (with their planned stages), reading, listing with keyset
//! paging, cancel, and the deadline sweep. Every server-decided end of a provision command
//! moves its node in the same transaction (`nodes::fail_node_of`).

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::Row;
use trellis_protocol::{CancelReason, CommandError, CommandType};

use super::nodes::fail_node_of;
use super::notify::Note;
use super::sql::{
    command_status, error_json, flag, id, is_unique_violation, json_col, multi_row_insert, opt_id,
};
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, CommandId, CommandStatus, NodeId};
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub struct CommandRow {
    pub id: CommandId,
    pub agent_id: AgentId,
    pub command_type: CommandType,
    pub params: serde_json::Value,
    pub status: CommandStatus,
    pub stage: Option<String>,
    pub percent: Option<f64>,
    pub last_seq: i64,
    pub result: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub attempt: i64,
    pub root_id: CommandId,
    pub retry_of: Option<CommandId>,
    pub idempotency_key: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    pub dispatched_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub deadline_at: i64,
    pub cancel_requested: bool,
    /// An admin keeps it past the retention period (see `housekeeping`).
    pub pinned: bool,
}

const COLS: &str = "id, agent_id, type, params, status, stage, percent, last_seq, result, \
    error, attempt, root_id, retry_of, idempotency_key, created_by, created_at, dispatched_at, \
    started_at, finished_at, deadline_at, cancel_requested, pinned";

/// `COLS` of `commands c` joined to the node it acts on (`nodes n`), for the API's
/// `target`: one LEFT JOIN instead of a lookup per row.
fn joined_cols() -> &'static str {
    static JOINED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JOINED.get_or_init(|| {
        let mut s: String = COLS
            .split(',')
            .map(|c| format!("c.{0} AS {0}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(", c.node_id AS target_node_id, n.name AS target_node_name");
        s
    })
}

const JOINED_FROM: &str = "commands c LEFT JOIN nodes n ON n.id = c.node_id";

/// The node a command was started for, with its name when the node still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub id: NodeId,
    pub name: Option<String>,
}

fn node_ref(r: &AnyRow) -> DbResult<Option<NodeRef>> {
    let Some(id) = opt_id(r, "target_node_id")? else {
        return Ok(None);
    };
    Ok(Some(NodeRef {
        id,
        name: r.try_get("target_node_name")?,
    }))
}

/// A stored type this build does not know reads as `Unknown` (a newer replica wrote it).
pub(super) fn command_type(r: &AnyRow, col: &str) -> DbResult<CommandType> {
    let s: String = r.try_get(col)?;
    Ok(CommandType::parse(&s).unwrap_or(CommandType::Unknown))
}

impl CommandRow {
    pub(super) fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: id(r, "id")?,
            agent_id: id(r, "agent_id")?,
            command_type: command_type(r, "type")?,
            params: json_col(r, "params")?.unwrap_or_default(),
            status: command_status(r, "status")?,
            stage: r.try_get("stage")?,
            percent: r.try_get("percent")?,
            last_seq: r.try_get("last_seq")?,
            result: json_col(r, "result")?,
            error: json_col(r, "error")?,
            attempt: r.try_get("attempt")?,
            root_id: id(r, "root_id")?,
            retry_of: opt_id(r, "retry_of")?,
            idempotency_key: r.try_get("idempotency_key")?,
            created_by: r.try_get("created_by")?,
            created_at: r.try_get("created_at")?,
            dispatched_at: r.try_get("dispatched_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            deadline_at: r.try_get("deadline_at")?,
            cancel_requested: flag(r, "cancel_requested")?,
            pinned: flag(r, "pinned")?,
        })
    }

    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The row `insert_commands` wrote for `c`, without reading it back.
    pub fn queued(c: &NewCommand, created_at: i64) -> Self {
        Self {
            id: c.id,
            agent_id: c.agent_id,
            command_type: c.command_type,
            params: c.params.clone(),
            status: CommandStatus::Queued,
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
            pinned: false,
        }
    }
}

/// A command to store (status `queued`). Its id is chosen by the caller, so that other
/// rows written in the same transaction can point at it.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: CommandId,
    pub agent_id: AgentId,
    pub command_type: CommandType,
    pub params: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub created_by: String,
    pub deadline_at: i64,
    pub attempt: i64,
    pub root_id: CommandId,
    pub retry_of: Option<CommandId>,
    /// The stored signature of its `dispatch` frame ([`Db::sign_new`] sets it); a command
    /// stored without one is never sent.
    pub signature: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StageRow {
    pub name: String,
    pub state: String,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub message: Option<String>,
}

/// What the session needs to know about a command an agent mentions.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub agent_id: AgentId,
    pub dispatched: bool,
    pub finished_seq: Option<i64>,
    /// Log bytes stored so far (see the per-command log limit).
    pub log_bytes: i64,
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

/// Filters and the page cursor of a command listing.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub agent_id: Option<AgentId>,
    pub status: Option<CommandStatus>,
    pub command_type: Option<CommandType>,
    /// Rows strictly before `(created_at, id)`; without an id, before `created_at`.
    pub before: Option<(i64, Option<CommandId>)>,
    pub limit: i64,
}

/// Commands per INSERT statement.
const INSERT_ROWS: usize = 200;

/// Inserts commands and their planned stages on `conn` (inside the caller's
/// transaction), all with `created_at = now`.
pub(super) async fn insert_commands_on(
    conn: &mut sqlx::AnyConnection,
    cmds: &[&NewCommand],
    now: i64,
) -> DbResult<()> {
    const COLS: usize = 13;
    const ROWS: usize = INSERT_ROWS;
    if let Some(c) = cmds.iter().find(|c| c.signature.is_none()) {
        // Every path that makes a command signs it (`Db::sign_new`) after its last change.
        return Err(DbError::Corrupt(format!("command {} was not signed", c.id)));
    }
    for chunk in cmds.chunks(ROWS) {
        let sql = multi_row_insert(
            "INSERT INTO commands (id, agent_id, type, params, status, attempt, root_id, \
             retry_of, idempotency_key, created_by, created_at, deadline_at, signature) VALUES ",
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
                .bind(CommandStatus::Queued.as_str())
                .bind(c.attempt)
                .bind(c.root_id.to_string())
                .bind(c.retry_of.map(|u| u.to_string()))
                .bind(c.idempotency_key.clone())
                .bind(c.created_by.clone())
                .bind(now)
                .bind(c.deadline_at)
                .bind(c.signature.clone());
        }
        match q.execute(&mut *conn).await {
            Err(e) if is_unique_violation(&e) => {
                return Err(DbError::Conflict("idempotency key already used".into()))
            }
            r => r?,
        };
    }
    let stages: Vec<(CommandId, usize, &str)> = cmds
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
        q.execute(&mut *conn).await?;
    }
    // The replica holding each agent's session claims them once this commits.
    let mut agents: Vec<AgentId> = cmds.iter().map(|c| c.agent_id).collect();
    agents.sort_unstable();
    agents.dedup();
    let notes: Vec<Note> = agents.into_iter().map(Note::Wake).collect();
    super::notify::notify(conn, &notes).await
}

/// The deadline sweep. `status IN (…)` repeats the predicate of the partial index
/// `commands_live_deadline` word for word, so both backends read only live commands.
pub(super) const EXPIRE_SQL: &str =
    "UPDATE commands SET status = 'timed_out', finished_at = $1, error = $2 \
    WHERE status IN ('queued', 'dispatched', 'running') AND deadline_at < $1 \
    RETURNING id, agent_id, dispatched_at";

impl Db {
    /// Inserts commands (status `queued`) and their planned stages in one transaction and
    /// returns their common `created_at`. A taken idempotency key fails the whole batch
    /// with `Conflict`; the caller retries such a batch one command at a time.
    pub async fn insert_commands(&self, cmds: &[&NewCommand]) -> DbResult<i64> {
        let now = now_ms();
        // On PostgreSQL, commands without planned stages that fit one INSERT and send no
        // notes are one statement: atomic alone, without `BEGIN` and `COMMIT` round trips.
        if self.backend == super::Backend::Postgres
            && cmds.len() <= INSERT_ROWS
            && cmds.iter().all(|c| c.command_type.stages().is_empty())
            && !super::notify::sends_notes(self.backend)
        {
            let mut conn = self.writer().acquire().await?;
            insert_commands_on(&mut conn, cmds, now).await?;
            return Ok(now);
        }
        let mut tx = self.begin_write().await?;
        insert_commands_on(&mut tx, cmds, now).await?;
        tx.commit().await?;
        Ok(now)
    }

    pub async fn command_by_idempotency_key(&self, key: &str) -> DbResult<Option<CommandRow>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM commands WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(CommandRow::from_row).transpose()
    }

    /// The node a command acts on (and its name), if it was started for one.
    pub async fn command_target_node(&self, command: CommandId) -> DbResult<Option<NodeRef>> {
        let row = sqlx::query(
            "SELECT c.node_id AS target_node_id, n.name AS target_node_name \
             FROM commands c LEFT JOIN nodes n ON n.id = c.node_id WHERE c.id = $1",
        )
        .bind(command.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound)?;
        node_ref(&row)
    }

    /// A command with the node it acts on: `get_command` and `command_target_node` in one
    /// statement (what `GET /api/commands/{id}` shows); grouped with concurrent ones on
    /// PostgreSQL (`db::reads`).
    pub async fn get_command_with_target(
        &self,
        command: CommandId,
    ) -> DbResult<(CommandRow, Option<NodeRef>)> {
        let row = match &self.reads {
            Some(r) => r.commands.get(command).await?,
            None => commands_with_target(self.pool.clone(), vec![command])
                .await?
                .remove(&command),
        };
        row.ok_or(DbError::NotFound)
    }

    pub async fn get_command(&self, command: CommandId) -> DbResult<CommandRow> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM commands WHERE id = $1"))
            .bind(command.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound)?;
        CommandRow::from_row(&row)
    }

    /// Who a command belongs to, whether it was ever dispatched, and the seq of its
    /// `finished` event if one is stored.
    pub async fn command_owner(&self, command: CommandId) -> DbResult<Option<Owner>> {
        let row = sqlx::query(
            "SELECT agent_id, dispatched_at, finished_seq, log_bytes FROM commands WHERE id = $1",
        )
        .bind(command.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let dispatched: Option<i64> = r.try_get("dispatched_at")?;
            Ok(Owner {
                agent_id: id(&r, "agent_id")?,
                dispatched: dispatched.is_some(),
                finished_seq: r.try_get("finished_seq")?,
                log_bytes: r.try_get("log_bytes")?,
            })
        })
        .transpose()
    }

    /// A command's stages in order (grouped with concurrent reads on PostgreSQL).
    pub async fn get_stages(&self, command: CommandId) -> DbResult<Vec<StageRow>> {
        let stages = match &self.reads {
            Some(r) => r.stages.get(command).await?,
            None => stages_of(self.pool.clone(), vec![command])
                .await?
                .remove(&command),
        };
        Ok(stages.unwrap_or_default())
    }

    /// Newest first, keyset-paged on `(created_at, id)` so rows created in the same
    /// millisecond are neither skipped nor repeated across pages. Each with the node it
    /// acts on (one join).
    pub async fn list_commands(
        &self,
        f: &CommandFilter,
    ) -> DbResult<Vec<(CommandRow, Option<NodeRef>)>> {
        let mut sql = format!("SELECT {} FROM {JOINED_FROM} WHERE 1 = 1", joined_cols());
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if f.agent_id.is_some() {
            sql += &format!(" AND c.agent_id = {}", next());
        }
        if f.status.is_some() {
            sql += &format!(" AND c.status = {}", next());
        }
        if f.command_type.is_some() {
            sql += &format!(" AND c.type = {}", next());
        }
        match f.before {
            Some((_, Some(_))) => {
                let (a, b, c) = (next(), next(), next());
                sql += &format!(" AND (c.created_at < {a} OR (c.created_at = {b} AND c.id < {c}))");
            }
            Some((_, None)) => sql += &format!(" AND c.created_at < {}", next()),
            None => {}
        }
        sql += &format!(" ORDER BY c.created_at DESC, c.id DESC LIMIT {}", next());
        let mut q = sqlx::query(&sql);
        if let Some(a) = f.agent_id {
            q = q.bind(a.to_string());
        }
        if let Some(s) = f.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = f.command_type {
            q = q.bind(t.as_str());
        }
        match f.before {
            Some((at, Some(id))) => q = q.bind(at).bind(at).bind(id.to_string()),
            Some((at, None)) => q = q.bind(at),
            None => {}
        }
        let rows = q.bind(f.limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((CommandRow::from_row(r)?, node_ref(r)?)))
            .collect()
    }

    /// Cancels a command. Queued ones end at once (and their node fails in the same
    /// transaction); dispatched and running ones get `cancel_requested` and the agent must
    /// be told. Returns the new row and what happened.
    pub async fn request_cancel(
        &self,
        command: CommandId,
    ) -> DbResult<(CommandRow, CancelOutcome)> {
        let now = now_ms();
        let err = error_json(&CommandError::new("cancelled", "cancelled by request"));
        let mut tx = self.begin_write().await?;
        let ended = sqlx::query(
            "UPDATE commands SET status = 'cancelled', finished_at = $1, error = $2 WHERE id = $3 AND status = 'queued' \
             RETURNING agent_id",
        )
        .bind(now)
        .bind(&err)
        .bind(command.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = if let Some(r) = ended {
            // A slot is not freed (it was queued), but its stream watchers must hear.
            let agent: AgentId = id(&r, "agent_id")?;
            super::notify::notify(&mut tx, &[Note::Changed(command), Note::Wake(agent)]).await?;
            fail_node_of(
                &mut tx,
                command,
                "cancelled: provisioning was cancelled",
                now,
            )
            .await?;
            CancelOutcome::Cancelled
        } else {
            let requested = sqlx::query(
                "UPDATE commands SET cancel_requested = 1 WHERE id = $1 AND status IN ('dispatched', 'running') \
                 RETURNING agent_id",
            )
            .bind(command.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = requested {
                // The replica holding the agent's session tells it.
                let agent: AgentId = id(&r, "agent_id")?;
                super::notify::notify(
                    &mut tx,
                    &[
                        Note::Cancel(agent, command, CancelReason::Cancelled),
                        Note::Changed(command),
                    ],
                )
                .await?;
                CancelOutcome::Requested
            } else {
                CancelOutcome::AlreadyFinished
            }
        };
        tx.commit().await?;
        Ok((self.get_command(command).await?, outcome))
    }

    /// Moves commands past their deadline to `timed_out` (`EXPIRE_SQL`: the live ones only,
    /// through `commands_live_deadline`, however long the history) (and their nodes to `failed`);
    /// returns `(id, agent_id, was_dispatched)`: dispatched ones must be cancelled on the agent.
    pub async fn expire_deadlines(&self) -> DbResult<Vec<(CommandId, AgentId, bool)>> {
        let now = now_ms();
        let err = error_json(
            &CommandError::new(
                "timed_out",
                "the command did not finish before its deadline",
            )
            .retryable(),
        );
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(EXPIRE_SQL)
            .bind(now)
            .bind(&err)
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let dispatched: Option<i64> = r.try_get("dispatched_at")?;
            let command: CommandId = id(r, "id")?;
            fail_node_of(
                &mut tx,
                command,
                "timed_out: the command did not finish before its deadline",
                now,
            )
            .await?;
            out.push((command, id(r, "agent_id")?, dispatched.is_some()));
        }
        // Whichever replica holds each agent's session cancels it there.
        let mut notes = Vec::with_capacity(out.len() * 2);
        for &(command, agent, dispatched) in &out {
            notes.push(Note::Changed(command));
            if dispatched {
                notes.push(Note::Cancel(agent, command, CancelReason::TimedOut));
            }
            // A slot is free (or a queued command ended): claim again.
            notes.push(Note::Wake(agent));
        }
        super::notify::notify(&mut tx, &notes).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// How many commands are in each status (one grouped read; callers cache it).
    pub async fn count_by_status(&self) -> DbResult<Vec<(CommandStatus, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM commands GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((command_status(r, "status")?, r.try_get("n")?)))
            .collect()
    }

    /// Queued commands per agent (only agents with some).
    pub async fn queue_depths(&self) -> DbResult<Vec<(AgentId, i64)>> {
        let rows = sqlx::query(
            "SELECT agent_id, COUNT(*) AS n FROM commands WHERE status = 'queued' GROUP BY agent_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((id(r, "agent_id")?, r.try_get("n")?)))
            .collect()
    }
}

/// Commands with the node each acts on, by id (one statement; see `db::reads`).
pub(super) async fn commands_with_target(
    pool: sqlx::AnyPool,
    ids: Vec<CommandId>,
) -> DbResult<HashMap<CommandId, (CommandRow, Option<NodeRef>)>> {
    let sql = format!(
        "SELECT {} FROM {JOINED_FROM} WHERE c.id IN ({{keys}})",
        joined_cols()
    );
    super::sql::fetch_by_keys(&pool, &sql, &ids)
        .await?
        .iter()
        .map(|r| {
            let c = CommandRow::from_row(r)?;
            Ok((c.id, (c, node_ref(r)?)))
        })
        .collect()
}

/// The stages of commands, each command's in order (one statement; see `db::reads`).
/// A command without stages has no entry.
pub(super) async fn stages_of(
    pool: sqlx::AnyPool,
    ids: Vec<CommandId>,
) -> DbResult<HashMap<CommandId, Vec<StageRow>>> {
    let rows = super::sql::fetch_by_keys(
        &pool,
        "SELECT command_id, name, state, started_at, finished_at, message FROM command_stages \
         WHERE command_id IN ({keys}) ORDER BY command_id, idx, started_at",
        &ids,
    )
    .await?;
    let mut out: HashMap<CommandId, Vec<StageRow>> = HashMap::new();
    for r in rows {
        out.entry(id(&r, "command_id")?)
            .or_default()
            .push(StageRow {
                name: r.try_get("name")?,
                state: r.try_get("state")?,
                started_at: r.try_get("started_at")?,
                finished_at: r.try_get("finished_at")?,
                message: r.try_get("message")?,
            });
    }
    Ok(out)
}
