//! Agent events: the event writer's batch (one transaction: accepts, multi-row
//! `INSERT … ON CONFLICT DO NOTHING` so a re-sent seq is stored once, stage rows, command
//! progress and outcomes, and the node a provision outcome moves), and reading events back.

use std::collections::{HashMap, HashSet};

use sqlx::{Any, Row};
use trellis_protocol::{CancelReason, CommandType, Event, EventBody};
use uuid::Uuid;

use super::nodes::node_outcome;
use super::sql::{
    error_json, multi_row_insert, no_nul, padded, padded_rows, values_rows, NO_PERCENT,
};
use super::{Db, DbResult};
use crate::model::{AgentId, CommandId, CommandStatus};
use crate::time::now_ms;

// Progress of the batch's commands, one statement for all of them (`WITH v(…) AS
// (VALUES …) UPDATE commands … FROM v`, on both backends): each statement is a round trip
// that waits for the database, so their number per batch stays constant as the batch
// grows. The durable prefix moves on with the run of seqs that starts at the batch's
// lowest one when that run touches it (the common, in-order case: no extra read); a
// command that still has stored seqs beyond it afterwards is walked once more
// (`extend_prefix`).

/// Commands per set-based statement (at most 12 parameters a row).
const ROWS_PER_UPDATE: usize = 200;

/// Agents' `finished` for commands still live: the final state with the progress.
/// `$1` now; per row id, agent, status, result, error, stage, percent, max seq, finished
/// seq, the batch's first run (start, end), new log bytes.
fn finish_sql(rows: usize) -> String {
    format!(
        "WITH v(v_id, v_agent, v_status, v_result, v_error, v_stage, v_percent, v_max_seq, \
         v_fin_seq, v_run_start, v_run_end, v_log) AS (VALUES {}) \
         UPDATE commands SET status = v.v_status, result = v.v_result, error = v.v_error, \
         finished_at = $1, started_at = COALESCE(started_at, $1), \
         stage = CASE WHEN last_seq <= v.v_max_seq THEN COALESCE(v.v_stage, stage) ELSE stage END, \
         percent = CASE WHEN v.v_status = 'succeeded' THEN 100.0 \
           WHEN v.v_percent < 0 OR last_seq > v.v_max_seq THEN percent ELSE v.v_percent END, \
         last_seq = CASE WHEN last_seq < v.v_max_seq THEN v.v_max_seq ELSE last_seq END, \
         finished_seq = COALESCE(finished_seq, v.v_fin_seq), \
         durable_seq = CASE WHEN durable_seq + 1 >= v.v_run_start AND durable_seq < v.v_run_end \
           THEN v.v_run_end ELSE durable_seq END, \
         log_bytes = log_bytes + v.v_log \
         FROM v WHERE commands.id = v.v_id AND commands.agent_id = v.v_agent \
         AND commands.status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') \
         RETURNING id, type, created_at, root_id, durable_seq, last_seq",
        values_rows(1, 12, rows)
    )
}

/// Progress of any command (a `finished` of one that already ended here still marks its
/// last seq). `$1` now; per row id, agent, stage, percent, max seq, finished seq or 0,
/// the batch's first run (start, end), new log bytes.
fn progress_sql(rows: usize) -> String {
    format!(
        "WITH v(v_id, v_agent, v_stage, v_percent, v_max_seq, v_fin_seq, v_run_start, v_run_end, \
         v_log) AS (VALUES {}) \
         UPDATE commands SET \
         status = CASE WHEN status IN ('queued', 'dispatched') THEN 'running' ELSE status END, \
         started_at = COALESCE(started_at, $1), \
         stage = CASE WHEN last_seq <= v.v_max_seq THEN COALESCE(v.v_stage, stage) ELSE stage END, \
         percent = CASE WHEN v.v_percent < 0 OR last_seq > v.v_max_seq THEN percent ELSE v.v_percent END, \
         last_seq = CASE WHEN last_seq < v.v_max_seq THEN v.v_max_seq ELSE last_seq END, \
         finished_seq = CASE WHEN v.v_fin_seq > 0 THEN COALESCE(finished_seq, v.v_fin_seq) \
           ELSE finished_seq END, \
         durable_seq = CASE WHEN durable_seq + 1 >= v.v_run_start AND durable_seq < v.v_run_end \
           THEN v.v_run_end ELSE durable_seq END, \
         log_bytes = log_bytes + v.v_log \
         FROM v WHERE commands.id = v.v_id AND commands.agent_id = v.v_agent \
         RETURNING id, durable_seq, last_seq, log_bytes, status",
        values_rows(1, 9, rows)
    )
}

/// Accepted commands start running. `$1` now; per row id, agent. The status test is a
/// `CASE`, not `status IN (…)`, so that no status index can serve it: under churn those
/// are mostly dead entries, and PostgreSQL with a young table's statistics chose a bitmap
/// scan of them (~1 ms) over the primary key the rows are joined on.
fn accept_sql(rows: usize) -> String {
    format!(
        "WITH v(v_id, v_agent) AS (VALUES {}) \
         UPDATE commands SET status = 'running', started_at = COALESCE(started_at, $1) \
         FROM v WHERE commands.id = v.v_id AND commands.agent_id = v.v_agent \
         AND CASE commands.status WHEN 'queued' THEN 1 WHEN 'dispatched' THEN 1 ELSE 0 END = 1 \
         RETURNING id, agent_id, cancel_requested",
        values_rows(1, 2, rows)
    )
}

/// A command whose log passed the per-command limit ends `failed` (`log_limit`).
/// `$1` now, `$2` error, `$3` id.
const LOG_LIMIT_SQL: &str = "UPDATE commands SET status = 'failed', finished_at = $1, error = $2 \
    WHERE id = $3 AND status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') \
    RETURNING type, created_at";

/// About the most event data one page of [`Db::events_page`] carries (one `GET …/logs`
/// response, one read of an SSE backlog).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Rows per INSERT statement (6 columns each; well below every bind limit).
const ROWS_PER_INSERT: usize = 500;

#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub ts: i64,
    pub kind: String,
    pub stream: Option<String>,
    pub data: String,
}

/// What the event writer stores in one transaction.
#[derive(Default)]
pub struct EventBatch<'a> {
    /// Commands an agent accepted, in arrival order.
    pub accepts: Vec<(AgentId, CommandId)>,
    /// Events, each with the agent that sent it.
    pub events: Vec<(AgentId, &'a Event)>,
    /// Most log bytes one command may store (0: no limit).
    pub log_limit: i64,
}

/// A command that ended in this batch.
pub struct Finished {
    pub command_id: CommandId,
    pub agent_id: AgentId,
    pub command_type: CommandType,
    pub status: CommandStatus,
    /// From creation to the end, in milliseconds (what an admin waited).
    pub millis: i64,
}

/// A stage that finished in this batch.
pub struct StageDone {
    pub name: String,
    pub state: trellis_protocol::StageState,
    pub millis: i64,
}

/// What a stored batch changed, for the writer to act on after commit.
#[derive(Default)]
pub struct BatchDone {
    pub finished: Vec<Finished>,
    /// Commands that started running now.
    pub started: Vec<CommandId>,
    /// Accepted commands whose cancel the agent must be told (again).
    pub cancels: Vec<(AgentId, CommandId, CancelReason)>,
    pub stages: Vec<StageDone>,
    /// Per command of the batch: every seq up to this one is stored (what may be acked).
    pub acks: HashMap<CommandId, i64>,
    /// Commands whose log passed the limit in this batch: now `failed` (`log_limit`);
    /// their agents' sessions are closed.
    pub log_limited: Vec<(AgentId, CommandId)>,
}

/// A command of the batch with its outcome: id, summary, first run, outcome, finished seq.
type Finishing<'a> = (
    Uuid,
    &'a CmdUpdate,
    (i64, i64),
    &'a trellis_protocol::Outcome,
    i64,
);

/// Per-command summary of one batch.
struct CmdUpdate {
    agent_id: AgentId,
    max_seq: i64,
    stage: Option<String>,
    percent: Option<f64>,
    /// Every seq of the batch, to find the run that extends the durable prefix.
    seqs: Vec<i64>,
    /// Log bytes of this batch's events that were not stored before.
    new_log_bytes: i64,
}

impl CmdUpdate {
    /// The contiguous run of this batch's seqs that starts at its lowest: `(start, end)`.
    fn first_run(&mut self) -> (i64, i64) {
        self.seqs.sort_unstable();
        self.seqs.dedup();
        let start = self.seqs.first().copied().unwrap_or(0);
        let mut end = start;
        for &s in &self.seqs[1..] {
            if s != end + 1 {
                break;
            }
            end = s;
        }
        (start, end)
    }
}

impl Db {
    /// Stores one batch in one transaction; nothing of it is visible before the commit,
    /// and nothing is stored if it fails.
    pub async fn store_event_batch(&self, batch: &EventBatch<'_>) -> DbResult<BatchDone> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut done = BatchDone::default();
        accept(&mut tx, &batch.accepts, now, &mut done).await?;
        let mut updates: HashMap<Uuid, CmdUpdate> = HashMap::new();
        let mut durable: Vec<(CommandId, i64, i64)> = Vec::new();
        let mut all: Vec<&Event> = Vec::with_capacity(batch.events.len());
        for &(agent_id, e) in &batch.events {
            let u = updates.entry(e.command_id).or_insert(CmdUpdate {
                agent_id,
                max_seq: 0,
                stage: None,
                percent: None,
                seqs: Vec::new(),
                new_log_bytes: 0,
            });
            u.agent_id = agent_id;
            u.max_seq = u.max_seq.max(e.seq as i64);
            u.seqs.push(e.seq as i64);
            match &e.body {
                EventBody::Stage { stage, percent, .. } => {
                    u.stage = Some(stage.clone());
                    if let Some(p) = percent {
                        u.percent = Some(*p);
                    }
                }
                EventBody::Progress { percent, .. } => u.percent = Some(*percent),
                _ => {}
            }
            all.push(e);
        }

        // Which events are new: a re-sent one (after a reconnect) must not move its stage
        // back or count its log bytes twice.
        let mut new_events: HashSet<(Uuid, i64)> = HashSet::new();
        for chunk in all.chunks(ROWS_PER_INSERT) {
            let mut sql = multi_row_insert(
                "INSERT INTO command_events (command_id, seq, ts, kind, stream, data) VALUES ",
                6,
                chunk.len(),
            );
            sql.push_str(" ON CONFLICT (command_id, seq) DO NOTHING RETURNING command_id, seq");
            let mut q = sqlx::query::<Any>(&sql);
            for e in chunk {
                let (kind, stream, data) = stored_form(e);
                q = q
                    .bind(e.command_id.to_string())
                    .bind(e.seq as i64)
                    .bind(e.ts)
                    .bind(kind)
                    .bind(stream)
                    .bind(data);
            }
            for row in q.fetch_all(&mut *tx).await? {
                let id: String = row.try_get("command_id")?;
                let seq: i64 = row.try_get("seq")?;
                if let Ok(id) = id.parse::<Uuid>() {
                    new_events.insert((id, seq));
                }
            }
        }
        let mut new_stage_events: HashSet<(Uuid, i64)> = HashSet::new();
        for e in &all {
            // `remove`: a duplicate later in this same batch is counted once.
            if !new_events.remove(&(e.command_id, e.seq as i64)) {
                continue;
            }
            match &e.body {
                EventBody::Log { data, .. } => {
                    if let Some(u) = updates.get_mut(&e.command_id) {
                        u.new_log_bytes += data.len() as i64;
                    }
                }
                EventBody::Stage { .. } => {
                    new_stage_events.insert((e.command_id, e.seq as i64));
                }
                _ => {}
            }
        }

        for e in &all {
            // `remove`: a duplicate later in this same batch is skipped too.
            if !new_stage_events.remove(&(e.command_id, e.seq as i64)) {
                continue;
            }
            if let EventBody::Stage {
                stage,
                state,
                message,
                ..
            } = &e.body
            {
                use trellis_protocol::StageState as S;
                let finished_at =
                    matches!(state, S::Completed | S::Failed | S::Skipped).then_some(e.ts);
                // A finished stage never goes back to running (the `WHERE`): an older event can
                // be stored after a newer one (a batch failed, a later one of the same session
                // committed, and the agent re-sent the failed one after reconnecting).
                let row = sqlx::query(
                    "INSERT INTO command_stages (command_id, idx, name, state, started_at, finished_at, message) \
                     VALUES ($1, 1000, $2, $3, $4, $5, $6) ON CONFLICT (command_id, name) DO UPDATE SET \
                     state = excluded.state, \
                     started_at = COALESCE(command_stages.started_at, excluded.started_at), \
                     finished_at = excluded.finished_at, \
                     message = COALESCE(excluded.message, command_stages.message) \
                     WHERE command_stages.state NOT IN ('completed', 'failed', 'skipped') \
                     OR excluded.state NOT IN ('pending', 'running') \
                     RETURNING started_at, finished_at",
                )
                .bind(e.command_id.to_string())
                .bind(stage.as_str())
                .bind(state.as_str())
                .bind(e.ts)
                .bind(finished_at)
                .bind(message.as_deref().map(no_nul))
                .fetch_optional(&mut *tx)
                .await?;
                // A stage that finished now: how long it ran (for the stage histogram).
                if let Some(r) = row {
                    let started: Option<i64> = r.try_get("started_at")?;
                    let ended: Option<i64> = r.try_get("finished_at")?;
                    if let (Some(a), Some(b), S::Completed | S::Failed) = (started, ended, state) {
                        done.stages.push(StageDone {
                            name: stage.clone(),
                            state: *state,
                            millis: (b - a).max(0),
                        });
                    }
                }
            }
        }

        // The first `finished` event of each command in this batch, with its seq.
        // (The lowest seq wins: batch order may differ from seq order.)
        let mut outcomes: HashMap<Uuid, (&trellis_protocol::Outcome, i64)> = HashMap::new();
        for e in &all {
            if let EventBody::Finished(o) = &e.body {
                let seq = e.seq as i64;
                let entry = outcomes.entry(e.command_id).or_insert((o, seq));
                if seq < entry.1 {
                    *entry = (o, seq);
                }
            }
        }

        // Commands with an outcome end now (unless they already ended here: cancelled,
        // timed out); the others, and those, only move on.
        let mut finishing: Vec<Finishing> = Vec::new();
        let mut moving: Vec<(Uuid, &CmdUpdate, (i64, i64), i64)> = Vec::new();
        for (id, u) in updates.iter_mut() {
            let run = u.first_run();
            match outcomes.get(id) {
                Some(&(o, fin_seq)) => finishing.push((*id, u, run, o, fin_seq)),
                None => moving.push((*id, u, run, 0)),
            }
        }
        // One order for the row locks of every writer's statements.
        finishing.sort_unstable_by_key(|f| f.0);
        for chunk in finishing.chunks(ROWS_PER_UPDATE) {
            let sql = finish_sql(padded(chunk.len()));
            let mut q = sqlx::query(&sql).bind(now);
            for &(id, u, (run_start, run_end), o, fin_seq) in padded_rows(chunk) {
                q = q
                    .bind(id.to_string())
                    .bind(u.agent_id.to_string())
                    .bind(o.status.as_str())
                    .bind(o.result.as_ref().map(|r| r.to_string()))
                    .bind(o.error.as_ref().map(error_json))
                    .bind(u.stage.clone())
                    .bind(u.percent.unwrap_or(NO_PERCENT))
                    .bind(u.max_seq)
                    .bind(fin_seq)
                    .bind(run_start)
                    .bind(run_end)
                    .bind(u.new_log_bytes);
            }
            let mut ended: HashSet<Uuid> = HashSet::with_capacity(chunk.len());
            for row in q.fetch_all(&mut *tx).await? {
                let command: CommandId = super::sql::id(&row, "id")?;
                let Some(&(_, u, _, o, _)) = chunk.iter().find(|f| f.0 == command.0) else {
                    continue;
                };
                ended.insert(command.0);
                durable.push((
                    command,
                    row.try_get("durable_seq")?,
                    row.try_get("last_seq")?,
                ));
                let ty: String = row.try_get("type")?;
                let command_type = CommandType::parse(&ty).unwrap_or(CommandType::Unknown);
                let root: CommandId = super::sql::id(&row, "root_id")?;
                // Whether a node follows this command.
                node_outcome(&mut tx, command_type, command, root, u.agent_id, o).await?;
                let created_at: i64 = row.try_get("created_at")?;
                done.finished.push(Finished {
                    command_id: command,
                    agent_id: u.agent_id,
                    command_type,
                    status: CommandStatus::from_final(o.status),
                    millis: (now - created_at).max(0),
                });
            }
            // Already ended (cancelled, timed out): the finished event still marks the
            // end of its events, and how far it got is still recorded.
            moving.extend(
                chunk
                    .iter()
                    .filter(|f| !ended.contains(&f.0))
                    .map(|&(id, u, run, _, fin_seq)| (id, u, run, fin_seq)),
            );
        }
        moving.sort_unstable_by_key(|m| m.0);
        for chunk in moving.chunks(ROWS_PER_UPDATE) {
            let sql = progress_sql(padded(chunk.len()));
            let mut q = sqlx::query(&sql).bind(now);
            for &(id, u, (run_start, run_end), fin_seq) in padded_rows(chunk) {
                q = q
                    .bind(id.to_string())
                    .bind(u.agent_id.to_string())
                    .bind(u.stage.clone())
                    .bind(u.percent.unwrap_or(NO_PERCENT))
                    .bind(u.max_seq)
                    .bind(fin_seq)
                    .bind(run_start)
                    .bind(run_end)
                    .bind(u.new_log_bytes);
            }
            for row in q.fetch_all(&mut *tx).await? {
                let command: CommandId = super::sql::id(&row, "id")?;
                durable.push((
                    command,
                    row.try_get("durable_seq")?,
                    row.try_get("last_seq")?,
                ));
                let log_bytes: i64 = row.try_get("log_bytes")?;
                let live = !super::sql::command_status(&row, "status")?.is_terminal();
                if batch.log_limit > 0 && log_bytes > batch.log_limit && live {
                    let Some(&(_, u, _, _)) = chunk.iter().find(|m| m.0 == command.0) else {
                        continue;
                    };
                    log_limit(
                        &mut tx,
                        &mut done,
                        command,
                        u.agent_id,
                        batch.log_limit,
                        now,
                    )
                    .await?;
                }
            }
        }
        for (command, mut prefix, last) in durable {
            if last > prefix {
                prefix = extend_prefix(&mut tx, command, prefix).await?;
            }
            done.acks.insert(command, prefix);
        }
        // Stream subscribers on other replicas re-read these commands once this commits.
        let mut notes: Vec<super::notify::Note> = updates
            .keys()
            .map(|id| super::notify::Note::Changed(CommandId(*id)))
            .collect();
        notes.extend(
            batch
                .accepts
                .iter()
                .filter(|(_, c)| !updates.contains_key(&c.0))
                .map(|(_, c)| super::notify::Note::Changed(*c)),
        );
        super::notify::notify(&mut tx, &notes).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Events after `after`, at most `limit` rows and about [`MAX_PAGE_BYTES`] of data
    /// (always at least one row); the rows are read as a stream, so a page of big rows
    /// never sits in memory whole. Returns the rows and whether more may follow (the
    /// limit or the byte budget stopped the page); the next page starts after the last
    /// row's seq.
    pub async fn events_page(
        &self,
        command: CommandId,
        after: i64,
        limit: i64,
        logs_only: bool,
    ) -> DbResult<(Vec<EventRow>, bool)> {
        use futures_util::TryStreamExt;
        let sql = if logs_only {
            "SELECT seq, ts, kind, stream, data FROM command_events WHERE command_id = $1 AND seq > $2 \
             AND kind = 'log' ORDER BY seq LIMIT $3"
        } else {
            "SELECT seq, ts, kind, stream, data FROM command_events WHERE command_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        };
        let command = command.to_string();
        let mut stream = sqlx::query(sql)
            .bind(&command)
            .bind(after)
            .bind(limit)
            .fetch(&self.pool);
        let mut rows = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = stream.try_next().await? {
            let row = EventRow {
                seq: r.try_get("seq")?,
                ts: r.try_get("ts")?,
                kind: r.try_get("kind")?,
                stream: r.try_get("stream")?,
                data: r.try_get("data")?,
            };
            bytes += row.data.len();
            if bytes > MAX_PAGE_BYTES && !rows.is_empty() {
                return Ok((rows, true));
            }
            rows.push(row);
        }
        let more = rows.len() as i64 >= limit;
        Ok((rows, more))
    }

    /// [`Db::events_page`] without the "more" flag.
    pub async fn events_after(
        &self,
        command: CommandId,
        after: i64,
        limit: i64,
        logs_only: bool,
    ) -> DbResult<Vec<EventRow>> {
        Ok(self.events_page(command, after, limit, logs_only).await?.0)
    }
}

/// Ends a command whose log passed the limit: `failed` with `log_limit` (not retryable:
/// the same command would write as much again), its node with it, and a cancel for the
/// agent.
async fn log_limit(
    tx: &mut sqlx::AnyConnection,
    done: &mut BatchDone,
    command: CommandId,
    agent: AgentId,
    limit: i64,
    now: i64,
) -> DbResult<()> {
    let message = format!("the command's log passed the limit of {limit} bytes; it was stopped");
    let row = sqlx::query(LOG_LIMIT_SQL)
        .bind(now)
        .bind(error_json(&trellis_protocol::CommandError::new(
            "log_limit",
            message.clone(),
        )))
        .bind(command.to_string())
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else { return Ok(()) };
    super::nodes::fail_node_of(tx, command, &format!("log_limit: {message}"), now).await?;
    let ty: String = row.try_get("type")?;
    let created_at: i64 = row.try_get("created_at")?;
    done.finished.push(Finished {
        command_id: command,
        agent_id: agent,
        command_type: CommandType::parse(&ty).unwrap_or(CommandType::Unknown),
        status: CommandStatus::Failed,
        millis: (now - created_at).max(0),
    });
    done.cancels.push((agent, command, CancelReason::Cancelled));
    done.log_limited.push((agent, command));
    Ok(())
}

/// Walks the stored seqs after `prefix` and moves `durable_seq` to the end of the
/// contiguous run (after events arrived out of order). In the caller's transaction.
async fn extend_prefix(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    start: i64,
) -> DbResult<i64> {
    /// Seqs read per step; a gap that persists costs one indexed probe per batch.
    const WINDOW: i64 = 1000;
    // The common case after a gap: the next seq is still missing. One indexed probe.
    let next = sqlx::query("SELECT 1 FROM command_events WHERE command_id = $1 AND seq = $2")
        .bind(command.to_string())
        .bind(start + 1)
        .fetch_optional(&mut *conn)
        .await?;
    if next.is_none() {
        return Ok(start);
    }
    let mut prefix = start;
    loop {
        let rows = sqlx::query(
            "SELECT seq FROM command_events WHERE command_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        )
        .bind(command.to_string())
        .bind(prefix)
        .bind(prefix + WINDOW)
        .fetch_all(&mut *conn)
        .await?;
        let before = prefix;
        for r in &rows {
            let seq: i64 = r.try_get("seq")?;
            if seq != prefix + 1 {
                break;
            }
            prefix = seq;
        }
        // A full window walked without a gap: there may be more.
        if prefix - before < WINDOW {
            break;
        }
    }
    if prefix == start {
        return Ok(prefix);
    }
    sqlx::query("UPDATE commands SET durable_seq = $1 WHERE id = $2 AND durable_seq < $1")
        .bind(prefix)
        .bind(command.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(prefix)
}

/// Marks accepted commands running (one statement per [`ROWS_PER_UPDATE`]), in arrival
/// order into `done.started`. A command whose cancel the agent must be told goes into
/// `done.cancels`: a cancel (or a deadline) that came between the claim and the agent
/// receiving the dispatch reached an agent that did not know the command yet and was
/// dropped there, so it is repeated now that the agent knows it.
async fn accept(
    conn: &mut sqlx::AnyConnection,
    accepts: &[(AgentId, CommandId)],
    now: i64,
    done: &mut BatchDone,
) -> DbResult<()> {
    // A repeated accept is one row; the same command id from another agent (which the
    // `agent_id` test makes a no-op) stays its own row, not in place of the right one.
    let mut seen: HashSet<(AgentId, CommandId)> = HashSet::with_capacity(accepts.len());
    let accepts: Vec<(AgentId, CommandId)> = accepts
        .iter()
        .copied()
        .filter(|a| seen.insert(*a))
        .collect();
    for chunk in accepts.chunks(ROWS_PER_UPDATE) {
        let sql = accept_sql(padded(chunk.len()));
        let mut q = sqlx::query(&sql).bind(now);
        for (agent, command) in padded_rows(chunk) {
            q = q.bind(command.to_string()).bind(agent.to_string());
        }
        // Started now: whether a cancel is pending.
        let mut started: HashMap<(AgentId, CommandId), bool> = HashMap::with_capacity(chunk.len());
        for r in q.fetch_all(&mut *conn).await? {
            started.insert(
                (super::sql::id(&r, "agent_id")?, super::sql::id(&r, "id")?),
                r.try_get::<i64, _>("cancel_requested")? != 0,
            );
        }
        // Not started now: already running (a repeated accept) or already ended here.
        let mut ended: HashMap<(AgentId, CommandId), CancelReason> = HashMap::new();
        let rest: Vec<&(AgentId, CommandId)> =
            chunk.iter().filter(|a| !started.contains_key(a)).collect();
        if !rest.is_empty() {
            let sql = format!(
                "WITH v(v_id, v_agent) AS (VALUES {}) SELECT id, agent_id, status FROM commands \
                 JOIN v ON commands.id = v.v_id AND commands.agent_id = v.v_agent",
                values_rows(0, 2, rest.len())
            );
            let mut q = sqlx::query(&sql);
            for (agent, command) in &rest {
                q = q.bind(command.to_string()).bind(agent.to_string());
            }
            for r in q.fetch_all(&mut *conn).await? {
                let reason = match super::sql::command_status(&r, "status")? {
                    CommandStatus::Cancelled => CancelReason::Cancelled,
                    CommandStatus::TimedOut => CancelReason::TimedOut,
                    _ => continue,
                };
                ended.insert(
                    (super::sql::id(&r, "agent_id")?, super::sql::id(&r, "id")?),
                    reason,
                );
            }
        }
        for &(agent, command) in chunk {
            match started.get(&(agent, command)) {
                Some(&cancel) => {
                    done.started.push(command);
                    if cancel {
                        done.cancels.push((agent, command, CancelReason::Cancelled));
                    }
                }
                None => {
                    if let Some(&reason) = ended.get(&(agent, command)) {
                        done.cancels.push((agent, command, reason));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The database form of an event: `(kind, stream, data)`.
fn stored_form(e: &Event) -> (&'static str, Option<&'static str>, String) {
    match &e.body {
        EventBody::Log { stream, data } => ("log", Some(stream.as_str()), no_nul(data)),
        EventBody::Stage { .. } => ("stage", None, body_json(&e.body)),
        EventBody::Progress { .. } => ("progress", None, body_json(&e.body)),
        EventBody::Finished(_) => ("finished", None, body_json(&e.body)),
    }
}

fn body_json(b: &EventBody) -> String {
    // JSON escapes NUL as \u0000, which PostgreSQL TEXT accepts.
    serde_json::to_string(b).unwrap_or_else(|_| "{}".into())
}
