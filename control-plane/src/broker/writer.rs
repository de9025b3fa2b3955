//! The event writer: one task per replica (a few on PostgreSQL, each for a fixed share of
//! the agents: `Broker::shard`) that batches events from the agent sessions
//! into one transaction (`Db::store_event_batch`: a re-sent seq is stored once; command
//! status, stage, percent and the node a provision moves are updated with it), and only
//! after the commit acks to the agents and publishes to subscribers. Acking after commit
//! is what makes "nothing lost" true.
//!
//! Failure isolation: sessions validate and bound every string before it gets here, but
//! when the database still refuses a batch because of what it carried
//! ([`crate::db::sql::is_data_error`]), the batch is written again one session frame at a
//! time, so the other sessions' events commit and are acked. A frame the database refuses
//! on its own is written event by event: each event refused alone takes its seq as a
//! `system` line "event N rejected: …" (stored and acked, so the agent does not re-send it
//! forever), and that session gets a fatal `invalid_event` and is closed. A failure that is
//! not about the data (storage unreachable, busy, full) still closes every session of the
//! batch with `internal`: nothing was acked, the agents re-send.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use trellis_protocol::{Event, EventAck, ServerMessage};

use super::fanout::Published;
use super::{Broker, SessionTx, ToSession};
use crate::db::sql::is_data_error;
use crate::db::{BatchDone, DbError, DbResult, EventBatch};
use crate::model::{AgentId, CommandId};
use trellis_protocol::{EventBody, LogStream, ProtocolError, ProtocolErrorCode};

/// Most events in one transaction.
const MAX_BATCH_EVENTS: usize = 4000;
/// A refused frame with more events than this is not written event by event (a
/// transaction each would hold up every other agent): it is not stored, and its session is
/// closed (its agent re-sends it later).
const MAX_ISOLATED_EVENTS: usize = 256;

pub enum WriteOp {
    /// The agent accepted a dispatched command.
    Accept {
        agent_id: AgentId,
        command_id: CommandId,
    },
    /// Events from one agent frame; acks go back to `acks_to`.
    Events {
        agent_id: AgentId,
        events: Vec<Event>,
        acks_to: SessionTx,
        /// A fatal error to send after this frame's acks (then the session closes).
        then_close: Option<ProtocolError>,
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
            Err(e) if is_data_error(&e) => {
                tracing::warn!(error = %e, events = n, ops = ops.len(),
                    "the database refused an event batch; writing it frame by frame");
                isolate(&broker, &mut ops).await;
                broker.metrics.observe_batch(n, started.elapsed());
            }
            Err(e) => {
                // Nothing was acked: make the agents reconnect and re-send.
                tracing::error!(error = %e, events = n, "event batch failed; closing affected sessions");
                storage_failed(&ops);
            }
        }
        ops.clear();
    }
    tracing::debug!("event writer stopped");
}

fn storage_failed(ops: &[WriteOp]) {
    for op in ops {
        if let WriteOp::Events { acks_to, .. } = op {
            let _ = acks_to.send(ToSession::StorageFailed("event storage failed".into()));
        }
    }
}

/// Writes a refused batch again, one op at a time (in arrival order, so one session's
/// frames keep their order); see the module doc.
async fn isolate(broker: &Broker, ops: &mut [WriteOp]) {
    for i in 0..ops.len() {
        let one = std::slice::from_mut(&mut ops[i]);
        match write_batch(broker, one).await {
            Ok(done) => after_commit(broker, one, done),
            Err(e) if is_data_error(&e) => isolate_events(broker, &mut one[0], e).await,
            Err(e) => {
                tracing::error!(error = %e, "event storage failed while isolating a refused batch");
                storage_failed(&ops[i..]);
                return;
            }
        }
    }
}

/// One session's frame that the database refused on its own: each event alone, and an
/// event refused alone replaced by a `system` line in its place. Then the session gets
/// `invalid_event` and is closed.
async fn isolate_events(broker: &Broker, op: &mut WriteOp, first: DbError) {
    let WriteOp::Events {
        agent_id,
        events,
        acks_to,
        ..
    } = op
    else {
        // An accept the database refuses is not the agent's fault: storage trouble.
        tracing::error!(error = %first, "the database refused an accept");
        return;
    };
    let agent_id = *agent_id;
    if events.len() > MAX_ISOLATED_EVENTS {
        tracing::warn!(%agent_id, events = events.len(), error = %first,
            "the database refused a large frame; not stored, closing its session");
        let _ = acks_to.send(ToSession::Fatal(ProtocolError::new(
            ProtocolErrorCode::InvalidEvent,
            "the control plane could not store this frame's events; send fewer per frame",
        )));
        return;
    }
    let mut merged = BatchDone::default();
    let mut refused: Vec<(uuid::Uuid, u64)> = Vec::new();
    let mut storage_trouble = false;
    for e in events.iter_mut() {
        let mut res = store_one(broker, agent_id, e).await;
        if matches!(&res, Err(err) if is_data_error(err)) {
            tracing::warn!(%agent_id, command_id = %e.command_id, seq = e.seq,
                error = %res.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
                "the database refused an event; storing a system line in its place");
            refused.push((e.command_id, e.seq));
            e.body = EventBody::Log {
                stream: LogStream::System,
                data: format!(
                    "event {} rejected: the control plane could not store it\n",
                    e.seq
                ),
            };
            res = store_one(broker, agent_id, e).await;
        }
        match res {
            Ok(done) => merge(&mut merged, done),
            Err(err) => {
                tracing::error!(%agent_id, error = %err, "event storage failed while isolating");
                storage_trouble = true;
                break;
            }
        }
    }
    after_commit(broker, std::slice::from_mut(op), merged);
    let WriteOp::Events { acks_to, .. } = op else {
        return;
    };
    if storage_trouble {
        let _ = acks_to.send(ToSession::StorageFailed("event storage failed".into()));
        return;
    }
    let mut err = ProtocolError::new(
        ProtocolErrorCode::InvalidEvent,
        match refused.as_slice() {
            [] => "the control plane could not store this frame".to_string(),
            [(_, seq)] => format!("event {seq} rejected: the control plane could not store it"),
            [(_, seq), rest @ ..] => format!(
                "event {seq} and {} more rejected: the control plane could not store them",
                rest.len()
            ),
        },
    );
    if let Some((command_id, seq)) = refused.first() {
        err.command_id = Some(*command_id);
        err.seq = Some(*seq);
    }
    let _ = acks_to.send(ToSession::Fatal(err));
}

async fn store_one(
    broker: &Broker,
    agent_id: AgentId,
    e: &trellis_protocol::Event,
) -> DbResult<BatchDone> {
    let mut batch = EventBatch {
        log_limit: broker.max_log_bytes_per_command,
        ..EventBatch::default()
    };
    batch.events.push((agent_id, e));
    broker.db.store_event_batch(&batch).await
}

/// Adds what a later transaction changed (acks only move forward).
fn merge(into: &mut BatchDone, done: BatchDone) {
    into.finished.extend(done.finished);
    into.started.extend(done.started);
    into.cancels.extend(done.cancels);
    into.stages.extend(done.stages);
    into.log_limited.extend(done.log_limited);
    for (id, seq) in done.acks {
        let e = into.acks.entry(id).or_insert(seq);
        *e = (*e).max(seq);
    }
}

fn op_events(op: &WriteOp) -> usize {
    match op {
        WriteOp::Accept { .. } => 1,
        WriteOp::Events { events, .. } => events.len(),
        WriteOp::Stop => 0,
    }
}

async fn write_batch(broker: &Broker, ops: &[WriteOp]) -> DbResult<BatchDone> {
    let mut batch = EventBatch {
        log_limit: broker.max_log_bytes_per_command,
        ..EventBatch::default()
    };
    for op in ops {
        match op {
            WriteOp::Accept {
                agent_id,
                command_id,
            } => batch.accepts.push((*agent_id, *command_id)),
            WriteOp::Events {
                agent_id, events, ..
            } => batch.events.extend(events.iter().map(|e| (*agent_id, e))),
            WriteOp::Stop => {}
        }
    }
    broker.db.store_event_batch(&batch).await
}

fn after_commit(broker: &Broker, ops: &mut [WriteOp], done: BatchDone) {
    for op in ops.iter_mut() {
        let WriteOp::Events {
            events,
            acks_to,
            then_close,
            ..
        } = op
        else {
            continue;
        };
        // An ack covers the contiguous durable prefix only: after a gap, events are
        // stored but acked once the gap is filled.
        let mut acks: Vec<EventAck> = Vec::new();
        for e in events.iter() {
            if acks.iter().any(|a| a.command_id == e.command_id) {
                continue;
            }
            if let Some(&prefix) = done.acks.get(&CommandId(e.command_id)) {
                if prefix > 0 {
                    acks.push(EventAck {
                        command_id: e.command_id,
                        seq: prefix as u64,
                    });
                }
            }
        }
        if !acks.is_empty() {
            let _ = acks_to.send(ToSession::Send(ServerMessage::Acks { acks }));
        }
        if let Some(err) = then_close.take() {
            let _ = acks_to.send(ToSession::Fatal(err));
        }
        for e in events.iter() {
            let id = CommandId(e.command_id);
            if broker.fanout.has_subscribers(&id) {
                broker.fanout.publish(&id, Published::event(e));
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
        broker
            .metrics
            .command_finished(f.command_type.as_str(), f.status, f.millis);
        broker.wake(f.agent_id);
    }
    for s in &done.stages {
        broker
            .metrics
            .stage_finished(&s.name, s.state.as_str(), s.millis);
    }
    // After the acks and the cancel: the session that passed a command's log limit is
    // closed with the reason.
    for &(agent_id, command_id) in &done.log_limited {
        tracing::warn!(%agent_id, %command_id, limit = broker.max_log_bytes_per_command,
            "command passed the per-command log limit; failed and cancelled");
        let to = ops.iter().find_map(|op| match op {
            WriteOp::Events {
                agent_id: a,
                acks_to,
                ..
            } if *a == agent_id => Some(acks_to),
            _ => None,
        });
        if let Some(to) = to {
            let mut err = ProtocolError::new(
                ProtocolErrorCode::LogLimit,
                format!(
                    "command {command_id} passed the log limit of {} bytes; it was stopped",
                    broker.max_log_bytes_per_command
                ),
            );
            err.command_id = Some(command_id.0);
            let _ = to.send(ToSession::Fatal(err));
        }
    }
}
