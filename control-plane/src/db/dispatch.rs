//! Dispatch: claiming queued commands for a session up to the agent's free concurrency,
//! the reconciliation an agent's hello triggers, and finding dispatches never accepted.

use sqlx::any::AnyRow;
use sqlx::Row;
use trellis_protocol::CommandError;

use super::commands::command_type;
use super::nodes::fail_node_of;
use super::sql::{command_status, error_json, flag, id, json_col, TERMINAL_SQL};
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, CommandId, CommandStatus};
use crate::time::now_ms;

/// A destroy the agent keeps losing (it crashes on it) stops being re-run here.
const MAX_DESTROY_ATTEMPTS: i64 = 3;

/// The claim statement, with a lock clause on the session check (see `claim_query`).
macro_rules! claim_sql {
    ($lock:literal) => {
        concat!(
            "UPDATE commands SET status = 'dispatched', dispatched_at = $1, session_epoch = $2 ",
            "WHERE status = 'queued' ",
            "AND EXISTS (SELECT 1 FROM agents WHERE id = $3 AND session_epoch = $2 ", $lock, ") ",
            "AND id IN (SELECT id FROM commands WHERE agent_id = $3 AND status = 'queued' ",
            "ORDER BY created_at LIMIT (SELECT CASE WHEN n >= $4 THEN 0 ELSE $4 - n END FROM (SELECT ",
            "(SELECT COUNT(*) FROM commands WHERE agent_id = $3 AND status = 'dispatched') + ",
            "(SELECT COUNT(*) FROM commands WHERE agent_id = $3 AND status = 'running') AS n) busy)) ",
            "RETURNING id, type, params, deadline_at, attempt, root_id, signature"
        )
    };
}

/// Claims queued commands for an agent up to its free concurrency, returning them.
///
/// The busy count is two equality ranges of `commands_agent_status`, not one
/// `status IN (…)`: with stale statistics (a young table) PostgreSQL scanned every
/// command the agent ever ran for the `IN` and filtered them, ~5 ms at 12 000 commands.
///
/// One statement (not read-then-write), so it is atomic on its own. The outer
/// `status = 'queued'` makes a concurrent claim (another replica) skip rows already taken
/// under PostgreSQL's READ COMMITTED re-check. Only the agent's current session (its
/// epoch) claims: an older session on another replica, about to be superseded, gets
/// nothing.
fn claim_query(
    agent_id: AgentId,
    epoch: i64,
    max_concurrency: i64,
    now: i64,
    backend: super::Backend,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments<'static>> {
    // On PostgreSQL the session check key-share-locks the agent's row until commit, so a
    // new session's `agent_connected` (which takes the row `FOR UPDATE` before it bumps the
    // epoch) waits for this claim or makes it claim nothing, never both; SQLite's single
    // writer orders them already. A key-share lock does not block the heartbeats' updates
    // of the row (a share lock did: 500 agents' heartbeats waited ~0.5 s on the claims,
    // and the claims then on them).
    let sql = match backend {
        super::Backend::Postgres => claim_sql!("FOR KEY SHARE"),
        super::Backend::Sqlite => claim_sql!(""),
    };
    sqlx::query(sql)
        .bind(now)
        .bind(epoch)
        .bind(agent_id.to_string())
        .bind(max_concurrency)
}

/// Agents per set-based claim statement on PostgreSQL (3 parameters each).
const CLAIM_AGENTS_PER_STATEMENT: usize = 500;

/// The claim of [`claim_query`] for several agents in one statement (PostgreSQL: a
/// `LATERAL` pick of each agent's oldest queued commands up to its free slots). The
/// agents' rows are key-share-locked in id order, as one claim at a time would. Every
/// agent is reached through a `LATERAL` probe of its primary key
/// (a join let PostgreSQL, with a young table's statistics, hash all agents: ~0.3 ms at
/// 1 000). The outer `status = 'queued'` re-checks a row another replica took meanwhile.
async fn claim_set(
    conn: &mut sqlx::AnyConnection,
    targets: &[(AgentId, i64, i64)],
    now: i64,
) -> DbResult<Vec<(AgentId, Vec<DispatchRow>)>> {
    let sql = format!(
        "WITH t(t_agent, t_epoch, t_max) AS (VALUES {}), \
         live AS (SELECT t.t_agent, t.t_epoch, t.t_max \
           FROM (SELECT * FROM t ORDER BY t_agent) t CROSS JOIN LATERAL ( \
             SELECT 1 FROM agents a WHERE a.id = t.t_agent AND a.session_epoch = t.t_epoch \
             FOR KEY SHARE) l), \
         pick AS (SELECT q.id AS p_id, live.t_epoch AS p_epoch FROM live CROSS JOIN LATERAL ( \
           SELECT c.id FROM commands c WHERE c.agent_id = live.t_agent AND c.status = 'queued' \
           ORDER BY c.created_at, c.id \
           LIMIT (SELECT CASE WHEN n >= live.t_max THEN 0 ELSE live.t_max - n END FROM (SELECT \
             (SELECT COUNT(*) FROM commands b WHERE b.agent_id = live.t_agent AND b.status = 'dispatched') + \
             (SELECT COUNT(*) FROM commands b WHERE b.agent_id = live.t_agent AND b.status = 'running') \
             AS n) busy) \
         ) q) \
         UPDATE commands SET status = 'dispatched', dispatched_at = $1, session_epoch = pick.p_epoch \
         FROM pick WHERE commands.id = pick.p_id AND commands.status = 'queued' \
         RETURNING commands.id, commands.agent_id, commands.type, commands.params, \
           commands.deadline_at, commands.attempt, commands.root_id, commands.signature, \
           commands.created_at",
        super::sql::values_rows(1, 3, super::sql::padded(targets.len()))
    );
    let mut q = sqlx::query(&sql).bind(now);
    // Repeated agents change nothing: a command is updated and returned once.
    for &(agent, epoch, max) in super::sql::padded_rows(targets) {
        q = q.bind(agent.to_string()).bind(epoch).bind(max);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    let mut by_agent: std::collections::HashMap<AgentId, Vec<(i64, DispatchRow)>> =
        std::collections::HashMap::new();
    for r in &rows {
        let agent: AgentId = id(r, "agent_id")?;
        let created_at: i64 = r.try_get("created_at")?;
        by_agent
            .entry(agent)
            .or_default()
            .push((created_at, DispatchRow::from_row(r)?));
    }
    Ok(targets
        .iter()
        .map(|&(agent, _, _)| {
            let mut rows = by_agent.remove(&agent).unwrap_or_default();
            // Sent oldest first, as they were queued.
            rows.sort_by_key(|(created_at, d)| (*created_at, d.id));
            (agent, rows.into_iter().map(|(_, d)| d).collect())
        })
        .collect())
}

/// What the dispatcher sends for one claimed command.
#[derive(Debug, Clone)]
pub struct DispatchRow {
    pub id: CommandId,
    pub command_type: trellis_protocol::CommandType,
    pub params: serde_json::Value,
    pub deadline_at: i64,
    pub attempt: i64,
    pub root_id: CommandId,
    /// Stored when the command was created (see `db::signatures`); sent unchanged.
    pub signature: Option<String>,
    /// `terraform_apply`: its state credential, derived when the dispatch is unsealed
    /// (never stored; see `Secrets::state_credential`).
    pub terraform_state: Option<String>,
}

impl DispatchRow {
    /// The `dispatch` frame for this command.
    pub fn into_message(self) -> trellis_protocol::ServerMessage {
        trellis_protocol::ServerMessage::Dispatch(trellis_protocol::Dispatch {
            command_id: self.id.0,
            command_type: self.command_type.as_str().to_string(),
            params: self.params,
            deadline_ms: Some(self.deadline_at),
            attempt: self.attempt.clamp(1, i64::from(u32::MAX)) as u32,
            root_command_id: Some(self.root_id.0),
            signature: self
                .signature
                .as_deref()
                .and_then(trellis_protocol::FrameSignature::from_stored),
            terraform_state: self.terraform_state,
        })
    }

    pub(super) fn from_row(r: &AnyRow) -> DbResult<Self> {
        Ok(Self {
            id: id(r, "id")?,
            command_type: command_type(r, "type")?,
            params: json_col(r, "params")?.unwrap_or_default(),
            deadline_at: r.try_get("deadline_at")?,
            attempt: r.try_get("attempt")?,
            root_id: id(r, "root_id")?,
            signature: r.try_get("signature")?,
            terraform_state: None,
        })
    }

    /// The fields its signature covers, as a dispatch to `agent_id`.
    pub fn signed(&self, agent_id: AgentId) -> super::Signed<'_> {
        super::Signed {
            id: self.id,
            agent_id,
            command_type: self.command_type,
            params: &self.params,
            deadline_at: self.deadline_at,
            attempt: self.attempt,
            root_id: self.root_id,
        }
    }
}

/// Dispatched commands not accepted since `$1`.
pub(super) const STALE_DISPATCHES_SQL: &str =
    "SELECT id, agent_id FROM commands WHERE status = 'dispatched' AND dispatched_at < $1";

impl Db {
    /// Claims queued commands for an agent up to its free concurrency and returns them.
    pub async fn claim_queued(
        &self,
        agent_id: AgentId,
        epoch: i64,
        max_concurrency: i64,
    ) -> DbResult<Vec<DispatchRow>> {
        let rows = claim_query(agent_id, epoch, max_concurrency, now_ms(), self.backend)
            .fetch_all(self.writer())
            .await?;
        rows.iter().map(DispatchRow::from_row).collect()
    }

    /// Claims for several agents in one transaction: `(agent, epoch, max_concurrency)`.
    pub async fn claim_queued_many(
        &self,
        targets: &[(AgentId, i64, i64)],
    ) -> DbResult<Vec<(AgentId, Vec<DispatchRow>)>> {
        let now = now_ms();
        // One claim statement and no notes to send: it runs alone (atomic on its own;
        // `BEGIN` and `COMMIT` would be two more round trips per claim).
        if self.backend == super::Backend::Postgres
            && targets.len() <= CLAIM_AGENTS_PER_STATEMENT
            && !super::notify::sends_notes(self.backend)
        {
            let mut conn = self.writer().acquire().await?;
            return claim_set(&mut conn, targets, now).await;
        }
        let mut tx = self.begin_write().await?;
        let mut out = Vec::with_capacity(targets.len());
        match self.backend {
            // One statement for every agent of the batch: a statement is a round trip
            // that waits for the server.
            super::Backend::Postgres => {
                for chunk in targets.chunks(CLAIM_AGENTS_PER_STATEMENT) {
                    out.extend(claim_set(&mut tx, chunk, now).await?);
                }
            }
            // In-process calls: one per agent costs nothing worth saving.
            super::Backend::Sqlite => {
                for &(agent_id, epoch, max_concurrency) in targets {
                    let rows = claim_query(agent_id, epoch, max_concurrency, now, self.backend)
                        .fetch_all(&mut *tx)
                        .await?;
                    let rows = rows
                        .iter()
                        .map(DispatchRow::from_row)
                        .collect::<DbResult<Vec<_>>>()?;
                    out.push((agent_id, rows));
                }
            }
        }
        // Stream watchers on other replicas see `dispatched` now, not at the next event.
        let notes: Vec<super::notify::Note> = out
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(|r| super::notify::Note::Changed(r.id)))
            .collect();
        super::notify::notify(&mut tx, &notes).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Whether the agent has queued commands (a read: no write lock).
    pub async fn has_queued(&self, agent_id: AgentId) -> DbResult<bool> {
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
        agent_id: AgentId,
        epoch: i64,
        active: &[CommandId],
        interrupted: &[CommandId],
    ) -> DbResult<Reconciled> {
        let rows = sqlx::query(
            "SELECT id, type, params, deadline_at, attempt, root_id, signature, status, cancel_requested FROM commands \
             WHERE agent_id = $1 AND status IN ('dispatched', 'running')",
        )
        .bind(agent_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut out = Reconciled::default();
        let mut lost = Vec::new();
        // Lost destroys are re-run (destroy is idempotent: a VM already gone succeeds),
        // unless the admin cancelled them, and at most to the third attempt.
        let mut lost_destroys: std::collections::HashMap<CommandId, DispatchRow> =
            Default::default();
        for r in &rows {
            let d = DispatchRow::from_row(r)?;
            // Only a row that still matches its signature is copied into a new attempt.
            if d.command_type == trellis_protocol::CommandType::Destroy
                && !flag(r, "cancel_requested")?
                && d.attempt < MAX_DESTROY_ATTEMPTS
                && self
                    .verify_stored(&d.signed(agent_id), d.signature.as_deref())
                    .is_ok()
            {
                lost_destroys.insert(d.id, d.clone());
            }
            let status = command_status(r, "status")?;
            let cancel = flag(r, "cancel_requested")?;
            let is_active = active.contains(&d.id);
            if interrupted.contains(&d.id) || (status == CommandStatus::Running && !is_active) {
                lost.push(d.id);
            } else if is_active {
                if cancel {
                    out.cancel.push(d.id);
                }
                out.known.push(d.id);
            } else if cancel {
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
                out.cancel.push(id(r, "id")?);
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
                match lost_destroys.get(id) {
                    Some(d) => {
                        let retry =
                            super::nodes::rerun_lost_destroy(self, &mut tx, agent_id, d, now)
                                .await?;
                        out.rerun.push(retry);
                    }
                    None => fail_node_of(
                        &mut tx,
                        *id,
                        "agent_lost_command: the agent restarted and no longer knows its command",
                        now,
                    )
                    .await?,
                }
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
            fail_node_of(&mut tx, *id, "cancelled: the command was cancelled", now).await?;
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

    /// Dispatched commands not accepted for a while on a live session: sent again
    /// (`STALE_DISPATCHES_SQL`, through `commands_status_deadline`).
    pub async fn stale_dispatches(&self, older_than: i64) -> DbResult<Vec<(CommandId, AgentId)>> {
        let rows = sqlx::query(STALE_DISPATCHES_SQL)
            .bind(older_than)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((id(r, "id")?, id(r, "agent_id")?)))
            .collect()
    }

    pub async fn dispatch_row(&self, command: CommandId) -> DbResult<DispatchRow> {
        let row = sqlx::query(
            "SELECT id, type, params, deadline_at, attempt, root_id, signature FROM commands WHERE id = $1",
        )
        .bind(command.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(DbError::NotFound)?;
        DispatchRow::from_row(&row)
    }
}

#[derive(Debug, Default)]
pub struct Reconciled {
    pub lost: Vec<CommandId>,
    /// Dispatched, never accepted, cancelled meanwhile: ended here, never sent.
    pub cancelled: Vec<CommandId>,
    pub resend: Vec<DispatchRow>,
    pub cancel: Vec<CommandId>,
    pub known: Vec<CommandId>,
    /// New attempts of lost destroys (queued; the node stays `destroying`).
    pub rerun: Vec<CommandId>,
}
