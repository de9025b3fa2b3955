//! The event writer: one task per replica that batches events from every agent session
//! into one transaction (multi-row `INSERT … ON CONFLICT DO NOTHING`, so a re-sent seq is
//! stored once), updates command status, stage and percent, commits, and only then acks
//! to the agents and publishes to subscribers. Acking after commit is what makes "nothing
//! lost" true.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use sqlx::{Any, Row};
use tokio::sync::mpsc;
use trellis_protocol::{
    CancelReason, CommandType, Event, EventAck, EventBody, ProvisionResult, ServerMessage,
};
use uuid::Uuid;

use super::fanout::Published;
use super::{Broker, SessionTx, ToSession};
use crate::db::{error_json, multi_row_insert, DbResult};
use crate::time::now_ms;

/// Most events in one transaction.
const MAX_BATCH_EVENTS: usize = 4000;
/// "No percent in this batch". Bound instead of a NULL: sqlx 0.8's `Any` driver binds a
/// NULL `f64` as PostgreSQL `float4`, and a statement first prepared that way then rejects
/// every real `f64` ("incorrect binary data format").
const NO_PERCENT: f64 = -1.0;
/// Rows per INSERT statement (6 columns each; well below every bind limit).
const ROWS_PER_INSERT: usize = 500;

pub enum WriteOp {
    /// The agent accepted a dispatched command.
    Accept { agent_id: Uuid, command_id: Uuid },
    /// Events from one agent frame; acks go back to `acks_to`.
    Events {
        agent_id: Uuid,
        events: Vec<Event>,
        acks_to: SessionTx,
    },
    /// Shutdown: write what came before, then stop.
    Stop,
}

pub async fn run(broker: Arc<Broker>, mut rx: mpsc::Receiver<WriteOp>) {
    let mut ops: Vec<WriteOp> = Vec::new();
    let mut stop = false;
    while !stop {
        let Some(first) = rx.recv().await else { break };
        let mut n = 0;
        let mut next = Some(first);
        while let Some(op) = next.take() {
            if matches!(op, WriteOp::Stop) {
                stop = true;
                break;
            }
            n += op_events(&op);
            ops.push(op);
            if n < MAX_BATCH_EVENTS {
                next = rx.try_recv().ok();
            }
        }
        if ops.is_empty() {
            continue;
        }
        let started = Instant::now();
        match write_batch(&broker, &ops).await {
            Ok(done) => {
                broker.metrics.observe_batch(n, started.elapsed());
                after_commit(&broker, &mut ops, done);
            }
            Err(e) => {
                // Nothing was acked: make the agents reconnect and re-send.
                tracing::error!(error = %e, events = n, "event batch failed; closing affected sessions");
                for op in &ops {
                    if let WriteOp::Events { acks_to, .. } = op {
                        let _ = acks_to.send(ToSession::Close("event storage failed".into()));
                    }
                }
            }
        }
        ops.clear();
    }
    tracing::debug!("event writer stopped");
}

fn op_events(op: &WriteOp) -> usize {
    match op {
        WriteOp::Accept { .. } => 1,
        WriteOp::Events { events, .. } => events.len(),
        WriteOp::Stop => 0,
    }
}

/// Per-command summary of one batch.
#[derive(Default)]
struct CmdUpdate {
    agent_id: Uuid,
    max_seq: i64,
    stage: Option<String>,
    percent: Option<f64>,
}

struct Finished {
    command_id: Uuid,
    agent_id: Uuid,
}

struct Done {
    finished: Vec<Finished>,
    started: Vec<Uuid>,
    /// Accepted commands whose cancel the agent must be told (again).
    cancels: Vec<(Uuid, Uuid, CancelReason)>,
}

async fn write_batch(broker: &Broker, ops: &[WriteOp]) -> DbResult<Done> {
    let now = now_ms();
    let mut tx = broker.db.begin_write().await?;
    let mut started = Vec::new();
    let mut cancels = Vec::new();
    let mut updates: HashMap<Uuid, CmdUpdate> = HashMap::new();
    let mut all: Vec<&Event> = Vec::new();
    for op in ops {
        match op {
            WriteOp::Accept {
                agent_id,
                command_id,
            } => {
                let (is_new, cancel) = accept(&mut tx, *agent_id, *command_id, now).await?;
                if is_new {
                    started.push(*command_id);
                }
                if let Some(reason) = cancel {
                    cancels.push((*agent_id, *command_id, reason));
                }
            }
            WriteOp::Stop => {}
            WriteOp::Events {
                agent_id, events, ..
            } => {
                for e in events {
                    let u = updates.entry(e.command_id).or_default();
                    u.agent_id = *agent_id;
                    u.max_seq = u.max_seq.max(e.seq as i64);
                    match &e.body {
                        EventBody::Stage { stage, percent, .. } => {
                            u.stage = Some(stage.clone());
                            if let Some(p) = percent {
                                u.percent = Some(f64::from(*p));
                            }
                        }
                        EventBody::Progress { percent, .. } => {
                            u.percent = Some(f64::from(*percent))
                        }
                        _ => {}
                    }
                    all.push(e);
                }
            }
        }
    }

    let mut new_stage_events: std::collections::HashSet<(Uuid, i64)> = Default::default();
    for chunk in all.chunks(ROWS_PER_INSERT) {
        let mut sql = multi_row_insert(
            "INSERT INTO command_events (command_id, seq, ts, kind, stream, data) VALUES ",
            6,
            chunk.len(),
        );
        sql.push_str(" ON CONFLICT (command_id, seq) DO NOTHING");
        // Which stage events are new: a re-sent one (after a reconnect) must not move
        // its stage back. Only chunks with stage events pay for RETURNING.
        let has_stage = chunk
            .iter()
            .any(|e| matches!(e.body, EventBody::Stage { .. }));
        if has_stage {
            sql.push_str(" RETURNING command_id, seq");
        }
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
        if has_stage {
            for row in q.fetch_all(&mut *tx).await? {
                let id: String = row.try_get("command_id")?;
                let seq: i64 = row.try_get("seq")?;
                if let Ok(id) = id.parse::<Uuid>() {
                    new_stage_events.insert((id, seq));
                }
            }
        } else {
            q.execute(&mut *tx).await?;
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
            sqlx::query(
                "INSERT INTO command_stages (command_id, idx, name, state, started_at, finished_at, message) \
                 VALUES ($1, 1000, $2, $3, $4, $5, $6) ON CONFLICT (command_id, name) DO UPDATE SET \
                 state = excluded.state, \
                 started_at = COALESCE(command_stages.started_at, excluded.started_at), \
                 finished_at = excluded.finished_at, \
                 message = COALESCE(excluded.message, command_stages.message) \
                 WHERE command_stages.state NOT IN ('completed', 'failed', 'skipped') \
                 OR excluded.state NOT IN ('pending', 'running')",
            )
            .bind(e.command_id.to_string())
            .bind(stage.as_str())
            .bind(state.as_str())
            .bind(e.ts)
            .bind(finished_at)
            .bind(message.as_deref().map(no_nul))
            .execute(&mut *tx)
            .await?;
        }
    }

    // The first `finished` event of each command in this batch.
    let mut outcomes: HashMap<Uuid, &trellis_protocol::Outcome> = HashMap::new();
    for e in &all {
        if let EventBody::Finished(o) = &e.body {
            outcomes.entry(e.command_id).or_insert(o);
        }
    }

    let mut finished = Vec::new();
    for (id, u) in &updates {
        if let Some(o) = outcomes.get(id) {
            // Progress and the final state in one statement; `RETURNING type` tells
            // whether a node follows this command.
            let row = sqlx::query(
                "UPDATE commands SET status = $1, result = $2, error = $3, finished_at = $4, \
                 started_at = COALESCE(started_at, $4), \
                 stage = CASE WHEN last_seq <= $7 THEN COALESCE($5, stage) ELSE stage END, \
                 percent = CASE WHEN $1 = 'succeeded' THEN 100.0 WHEN $6 < 0 OR last_seq > $7 THEN percent ELSE $6 END, \
                 last_seq = CASE WHEN last_seq < $7 THEN $7 ELSE last_seq END \
                 WHERE id = $8 AND agent_id = $9 \
                 AND status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') RETURNING type",
            )
            .bind(o.status.as_str())
            .bind(o.result.as_ref().map(|r| r.to_string()))
            .bind(o.error.as_ref().map(error_json))
            .bind(now)
            .bind(u.stage.clone())
            .bind(u.percent.unwrap_or(NO_PERCENT))
            .bind(u.max_seq)
            .bind(id.to_string())
            .bind(u.agent_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                let ty: String = row.try_get("type")?;
                if ty == CommandType::Provision.as_str() {
                    node_outcome(&mut tx, *id, u.agent_id, o).await?;
                }
                finished.push(Finished {
                    command_id: *id,
                    agent_id: u.agent_id,
                });
                continue;
            }
            // Already ended (cancelled, timed out): still record how far it got.
        }
        sqlx::query(
            "UPDATE commands SET status = CASE WHEN status IN ('queued', 'dispatched') THEN 'running' ELSE status END, \
             started_at = COALESCE(started_at, $1), \
             stage = CASE WHEN last_seq <= $4 THEN COALESCE($2, stage) ELSE stage END, \
             percent = CASE WHEN $3 < 0 OR last_seq > $4 THEN percent ELSE $3 END, \
             last_seq = CASE WHEN last_seq < $4 THEN $4 ELSE last_seq END \
             WHERE id = $5 AND agent_id = $6",
        )
        .bind(now)
        .bind(u.stage.clone())
        .bind(u.percent.unwrap_or(NO_PERCENT))
        .bind(u.max_seq)
        .bind(id.to_string())
        .bind(u.agent_id.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Done {
        finished,
        started,
        cancels,
    })
}

/// Marks an accepted command running. Returns whether it started now, and the cancel the
/// agent must be told: a cancel (or a deadline) that came between the claim and the agent
/// receiving the dispatch reached an agent that did not know the command yet and was
/// dropped there, so it is repeated now that the agent knows it.
async fn accept(
    conn: &mut sqlx::AnyConnection,
    agent_id: Uuid,
    command_id: Uuid,
    now: i64,
) -> DbResult<(bool, Option<CancelReason>)> {
    let row = sqlx::query(
        "UPDATE commands SET status = 'running', started_at = COALESCE(started_at, $1) \
         WHERE id = $2 AND agent_id = $3 AND status IN ('queued', 'dispatched') \
         RETURNING cancel_requested",
    )
    .bind(now)
    .bind(command_id.to_string())
    .bind(agent_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(r) = row {
        let cancel = r.try_get::<i64, _>("cancel_requested")? != 0;
        return Ok((true, cancel.then_some(CancelReason::Cancelled)));
    }
    // Not started now: already running (a repeated accept) or already ended here.
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM commands WHERE id = $1 AND agent_id = $2")
            .bind(command_id.to_string())
            .bind(agent_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let cancel = match status.as_deref() {
        Some("cancelled") => Some(CancelReason::Cancelled),
        Some("timed_out") => Some(CancelReason::TimedOut),
        _ => None,
    };
    Ok((false, cancel))
}

/// Keeps the node record in step with the provision command that last ran for it.
pub async fn node_outcome(
    conn: &mut sqlx::AnyConnection,
    command_id: Uuid,
    agent_id: Uuid,
    o: &trellis_protocol::Outcome,
) -> DbResult<()> {
    let now = now_ms();
    let result = o
        .result
        .as_ref()
        .and_then(|r| serde_json::from_value::<ProvisionResult>(r.clone()).ok());
    match (o.status, result) {
        (trellis_protocol::FinalStatus::Succeeded, Some(r)) => {
            sqlx::query(
                "UPDATE nodes SET status = 'running', vm_id = $1, ip_address = $2, hypervisor_id = $3, \
                 error = NULL, updated_at = $4 WHERE last_command_id = $5",
            )
            .bind(i64::from(r.vm_id))
            .bind(r.ip_address)
            .bind(agent_id.to_string())
            .bind(now)
            .bind(command_id.to_string())
            .execute(&mut *conn)
            .await?;
        }
        _ => {
            let msg = o
                .error
                .as_ref()
                .map(|e| match &e.stage {
                    Some(s) => format!("{} (stage {s}): {}", e.code, e.message),
                    None => format!("{}: {}", e.code, e.message),
                })
                .unwrap_or_else(|| format!("provision ended {}", o.status.as_str()));
            sqlx::query(
                "UPDATE nodes SET status = 'failed', error = $1, updated_at = $2 \
                 WHERE last_command_id = $3 AND status = 'provisioning'",
            )
            .bind(msg)
            .bind(now)
            .bind(command_id.to_string())
            .execute(&mut *conn)
            .await?;
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

/// PostgreSQL TEXT cannot hold NUL; program output sometimes does.
fn no_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

fn after_commit(broker: &Broker, ops: &mut [WriteOp], done: Done) {
    for op in ops.iter() {
        let WriteOp::Events {
            events, acks_to, ..
        } = op
        else {
            continue;
        };
        let mut acks: Vec<EventAck> = Vec::new();
        for e in events {
            match acks.iter_mut().find(|a| a.command_id == e.command_id) {
                Some(a) => a.seq = a.seq.max(e.seq),
                None => acks.push(EventAck {
                    command_id: e.command_id,
                    seq: e.seq,
                }),
            }
        }
        let _ = acks_to.send(ToSession::Send(ServerMessage::Acks { acks }));
        for e in events {
            if broker.fanout.has_subscribers(&e.command_id) {
                let (kind, json) = crate::api::sse_json(e);
                broker.fanout.publish(
                    &e.command_id,
                    Published::Event {
                        seq: e.seq as i64,
                        kind,
                        json: json.into(),
                    },
                );
            }
        }
    }
    for id in &done.started {
        broker.fanout.publish(id, Published::Status);
    }
    for &(agent_id, command_id, reason) in &done.cancels {
        broker.cancel(agent_id, command_id, reason);
    }
    for f in &done.finished {
        broker.fanout.publish(&f.command_id, Published::Status);
        broker.metrics.command_finished();
        broker.wake(f.agent_id);
    }
}
