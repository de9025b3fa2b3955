//! The command inserter: one task that collects the commands being created at the same
//! moment (every API request that is waiting) and writes them in one transaction — a group
//! commit, so a burst of submissions costs one commit instead of one each. A batch that
//! fails on a taken idempotency key is retried one command at a time, so one client's
//! conflict never fails another client's command.

use tokio::sync::{mpsc, oneshot};

use crate::db::{Db, DbResult, NewCommand};

/// Most commands in one transaction.
const MAX_BATCH: usize = 256;

pub struct InsertRequest {
    pub command: NewCommand,
    /// `created_at` of the stored row, or why it was not stored.
    pub done: oneshot::Sender<DbResult<i64>>,
}

pub async fn run(db: Db, mut rx: mpsc::Receiver<InsertRequest>) {
    let mut batch: Vec<InsertRequest> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let all: Vec<&NewCommand> = batch.iter().map(|r| &r.command).collect();
        match db.insert_commands(&all).await {
            Ok(created_at) => {
                for r in batch.drain(..) {
                    let _ = r.done.send(Ok(created_at));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(r) = batch.pop() {
                    let _ = r.done.send(Err(e));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, n = batch.len(), "command batch failed; inserting one by one");
                for r in batch.drain(..) {
                    let res = db.insert_commands(&[&r.command]).await;
                    let _ = r.done.send(res);
                }
            }
        }
    }
    tracing::debug!("command inserter stopped");
}
