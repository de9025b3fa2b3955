//! The event writer: one task per replica that batches events from every agent session
//! into one transaction (`Db::store_event_batch`: a re-sent seq is stored once; command
//! status, stage, percent and the node a provision moves are updated with it), and only
//! after the commit acks to the agents and publishes to subscribers. Acking after commit
//! is what makes "nothing lost" true.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use trellis_protocol::{Event, EventAck, ServerMessage};

use super::fanout::Published;
use super::{Broker, SessionTx, ToSession};
use crate::db::{BatchDone, DbResult, EventBatch};
use crate::model::{AgentId, CommandId};

/// Most events in one transaction.
const MAX_BATCH_EVENTS: usize = 4000;

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
                        let _ =
                            acks_to.send(ToSession::StorageFailed("event storage failed".into()));
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

async fn write_batch(broker: &Broker, ops: &[WriteOp]) -> DbResult<BatchDone> {
    let mut batch = EventBatch::default();
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
    for op in ops.iter() {
        let WriteOp::Events {
            events, acks_to, ..
        } = op
        else {
            continue;
        };
        // An ack covers the contiguous durable prefix only: after a gap, events are
        // stored but acked once the gap is filled.
        let mut acks: Vec<EventAck> = Vec::new();
        for e in events {
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
        for e in events {
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
}
