//! Periodic housekeeping (the cluster-wide parts only on the housekeeping leader, see
//! `cluster`): deadlines → `timed_out` + cancel on the agent, re-sending
//! dispatches an agent has not accepted, flushing heartbeats, dropping idle fan-out
//! channels, repairing nodes left `provisioning` by a command that ended or was never
//! stored, closing sessions whose credentials changed (once per heartbeat interval), and
//! deleting terminal commands past the retention period (once a minute, bounded). Every state it moves a command to is in the database, so a restart loses
//! nothing; a missed tick is skipped, not replayed.

use std::sync::Arc;
use std::time::Duration;

use trellis_protocol::CancelReason;

use super::{fanout::Published, Broker, ToSession};
use crate::db::Pruned;
use crate::time::now_ms;

const TICK: Duration = Duration::from_millis(500);
const HEARTBEAT_FLUSH_EVERY: u32 = 20; // ticks (10 s)
const REDISPATCH_AFTER_MS: i64 = 30_000;
/// Retention runs every minute: at most 1 000 commands per pass, 100 per transaction
/// (the SQLite write lock is never held for long; 1 000 a minute is far more than a
/// busy control plane creates).
const RETENTION_EVERY: u32 = 120;
const RETENTION_BATCH: i64 = 100;
const RETENTION_MAX_PER_PASS: i64 = 1000;

/// One retention pass as the reaper runs it every minute: terminal commands past
/// `--retention-days` go with their events and stages, bounded per pass; pinned ones and
/// each node's latest stay. Nothing when retention is off. Public so tests run the very
/// pass the reaper does instead of waiting a minute for it.
pub async fn retention_pass(broker: &Broker) -> crate::db::DbResult<Pruned> {
    let Some(keep) = broker.retention else {
        return Ok(Pruned::default());
    };
    let before = now_ms() - keep.as_millis() as i64;
    broker
        .db
        .prune_history(before, RETENTION_BATCH, RETENTION_MAX_PER_PASS)
        .await
}

pub async fn run(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Credentials are checked once per heartbeat interval, so a rotated or revoked
    // token's session is closed within one interval wherever the change was made.
    let credential_every =
        u32::try_from(broker.heartbeat_interval_secs() * 1000 / TICK.as_millis() as u64)
            .unwrap_or(u32::MAX)
            .max(1);
    // The first pass runs at once: a node a crash left behind is repaired on start.
    let mut n: u32 = HEARTBEAT_FLUSH_EVERY - 1;
    loop {
        tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        n = n.wrapping_add(1);
        // Cluster-wide work runs on one replica, the housekeeping leader (see `cluster`);
        // what concerns this replica's own sessions runs on each.
        let leader = broker.replica.is_leader();
        if leader {
            if let Err(e) = expire(&broker).await {
                tracing::warn!(error = %e, "deadline sweep failed");
            }
        }
        if n.is_multiple_of(credential_every) {
            if let Err(e) = broker.check_credentials().await {
                tracing::warn!(error = %e, "credential check failed");
            }
        }
        if leader && n.is_multiple_of(RETENTION_EVERY) {
            match retention_pass(&broker).await {
                Ok(p) if p.commands == 0 => {}
                Ok(p) => tracing::info!(
                    commands = p.commands,
                    events = p.events,
                    stages = p.stages,
                    "deleted commands past the retention period"
                ),
                Err(e) => tracing::warn!(error = %e, "retention pass failed"),
            }
        }
        if n.is_multiple_of(HEARTBEAT_FLUSH_EVERY) {
            if let Err(e) = broker.db.record_heartbeats(&broker.heartbeats()).await {
                tracing::warn!(error = %e, "heartbeat flush failed");
            }
            broker.fanout.sweep();
            if let Err(e) = redispatch(&broker).await {
                tracing::warn!(error = %e, "re-dispatch sweep failed");
            }
            if leader {
                let stale = now_ms() - 2 * broker.heartbeat_timeout.as_millis() as i64;
                match broker.db.expire_stale_agents(stale).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(agents = n, "marked agents with stale heartbeats offline")
                    }
                    Err(e) => tracing::warn!(error = %e, "stale agent sweep failed"),
                }
                match broker.db.repair_stuck_nodes().await {
                    Ok(nodes) if nodes.is_empty() => {}
                    Ok(nodes) => tracing::warn!(?nodes, "repaired nodes left provisioning"),
                    Err(e) => tracing::warn!(error = %e, "node repair sweep failed"),
                }
            }
        }
    }
    // Last heartbeat flush so the UI shows a fresh "last seen" after a restart.
    let _ = broker.db.record_heartbeats(&broker.heartbeats()).await;
}

async fn expire(broker: &Broker) -> crate::db::DbResult<()> {
    for (command_id, agent_id, was_dispatched) in broker.db.expire_deadlines().await? {
        tracing::info!(%command_id, %agent_id, "command timed out");
        if was_dispatched {
            broker.cancel(agent_id, command_id, CancelReason::TimedOut);
        }
        broker.fanout.publish(&command_id, Published::Status);
        broker.wake(agent_id);
    }
    Ok(())
}

async fn redispatch(broker: &Broker) -> crate::db::DbResult<()> {
    for (command_id, agent_id) in broker
        .db
        .stale_dispatches(now_ms() - REDISPATCH_AFTER_MS)
        .await?
    {
        if !broker.is_connected(&agent_id) {
            continue;
        }
        let d = broker.db.dispatch_row(command_id).await?;
        let Some(d) = broker.unseal(agent_id, d).await else {
            continue;
        };
        tracing::info!(%command_id, %agent_id, "re-sending unaccepted dispatch");
        broker.send(&agent_id, ToSession::Send(d.into_message()));
    }
    Ok(())
}
