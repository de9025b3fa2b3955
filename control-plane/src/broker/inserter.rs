//! The command inserter: one task that collects the commands being created at the same
//! moment (every API request that is waiting) and writes them in one transaction — a group
//! commit, so a burst of submissions costs one commit instead of one each. A batch that
//! fails on a taken idempotency key is retried one command at a time, so one client's
//! conflict never fails another client's command; any other failure fails the whole batch.

use tokio::sync::{mpsc, oneshot};

use crate::db::sql::{storage_trouble, StorageTrouble};
use crate::db::{Db, DbError, DbResult, NewCommand};

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
        // A request whose client went away (timed out, disconnected) is not stored: the
        // client never learnt its id and would submit it again.
        batch.retain(|r| !r.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let all: Vec<&NewCommand> = batch.iter().map(|r| &r.command).collect();
        match db.insert_commands(&all).await {
            Ok(created_at) => {
                for r in batch.drain(..) {
                    let _ = r.done.send(Ok(created_at));
                }
            }
            Err(DbError::Conflict(_)) if batch.len() > 1 => {
                tracing::debug!(
                    n = batch.len(),
                    "idempotency conflict in a batch; inserting one by one"
                );
                for r in batch.drain(..) {
                    if r.done.is_closed() {
                        continue;
                    }
                    let res = db.insert_commands(&[&r.command]).await;
                    let _ = r.done.send(res);
                }
            }
            Err(DbError::Conflict(m)) => {
                if let Some(r) = batch.pop() {
                    let _ = r.done.send(Err(DbError::Conflict(m)));
                }
            }
            Err(e) => {
                // Not about one command (the database is unreachable, say): every
                // command of the batch gets the error at once rather than one retry each.
                tracing::warn!(error = %e, n = batch.len(), "command batch failed");
                let msg = e.to_string();
                let trouble = storage_trouble(&e);
                for r in batch.drain(..) {
                    // Only storage trouble is worth retrying; anything else (a bug, a
                    // corrupt row) is an internal error, not "try again shortly".
                    let e = match trouble {
                        Some(StorageTrouble::Full) => DbError::Full(msg.clone()),
                        Some(StorageTrouble::Unavailable) => DbError::Unavailable(msg.clone()),
                        None => DbError::Corrupt(msg.clone()),
                    };
                    let _ = r.done.send(Err(e));
                }
            }
        }
    }
    tracing::debug!("command inserter stopped");
}
