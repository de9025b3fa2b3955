//! The dispatcher: one task that turns wake-ups (a command was queued, a slot was freed)
//! into claims. Wake-ups that arrive together — for one agent or for many — are claimed in
//! one transaction, then each session gets its commands to send. Claiming in the database
//! keeps two replicas from sending the same command.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::model::AgentId;

use super::{Broker, ToSession};

/// Most agents claimed for in one transaction.
const MAX_AGENTS: usize = 256;
/// Pause before claiming again after a failed claim.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

pub async fn run(broker: Arc<Broker>, mut rx: mpsc::UnboundedReceiver<AgentId>) {
    let mut due: Vec<AgentId> = Vec::with_capacity(MAX_AGENTS);
    let mut seen: HashSet<AgentId> = HashSet::with_capacity(MAX_AGENTS);
    loop {
        let first = tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            id = rx.recv() => match id {
                Some(id) => id,
                None => break,
            },
        };
        due.clear();
        seen.clear();
        due.push(first);
        seen.insert(first);
        while due.len() < MAX_AGENTS {
            match rx.try_recv() {
                Ok(id) => {
                    if seen.insert(id) {
                        due.push(id);
                    }
                }
                Err(_) => break,
            }
        }
        // One lock order for every claim transaction (PostgreSQL row locks).
        due.sort_unstable();
        let targets = broker.claim_targets(&due);
        if targets.is_empty() {
            continue;
        }
        match broker.db.claim_queued_many(&targets).await {
            Ok(claimed) => {
                for (agent_id, rows) in claimed {
                    if !rows.is_empty() {
                        // If the session just went away, the rows stay `dispatched`: the
                        // agent's next hello re-sends them.
                        broker.send(&agent_id, ToSession::Dispatch(rows));
                    }
                }
            }
            Err(e) => {
                // Nothing was claimed: try these agents again shortly (the wake-ups are
                // not lost; a database that stays down costs one attempt per pause).
                tracing::warn!(error = %e, agents = targets.len(), "claim failed; retrying");
                tokio::select! {
                    _ = broker.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
                for (agent_id, _, _) in &targets {
                    broker.wake(*agent_id);
                }
            }
        }
    }
    tracing::debug!("dispatcher stopped");
}
