//! Workspaces: one directory per command under `<work_dir>/terraform/<command_id>`, a
//! per-key lock so two applies of the same template (or explicit `workspace_key`) never
//! run at once on this agent, and removal of workspaces past their retention.
//!
//! The key locks and the set of workspaces in use belong to the [`Workspaces`] of one
//! [`TerraformExecutor`](super::TerraformExecutor): two agents in one process (tests)
//! share nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedMutexGuard;
use trellis_protocol::CommandError;
use uuid::Uuid;

use super::logs::LogSink;
use crate::exec::ExecContext;

type KeyLock = tokio::sync::Mutex<()>;
type InUse = Arc<Mutex<BTreeSet<PathBuf>>>;

/// One executor's workspace bookkeeping.
#[derive(Debug, Default)]
pub struct Workspaces {
    /// One lock per workspace key, alive while some command holds or waits for it.
    key_locks: Mutex<BTreeMap<String, Weak<KeyLock>>>,
    /// Workspace directories of running commands: never removed as expired.
    in_use: InUse,
}

/// Name of the file touched when a workspace is created and when its command ends; its
/// write keeps the directory's modification time current for the retention check.
const STAMP: &str = ".trellis-last-used";

/// Holds the workspace key until dropped.
pub struct KeyGuard {
    _guard: OwnedMutexGuard<()>,
}

impl Workspaces {
    /// Waits (cancellably) until no other command with `key` runs on this agent.
    pub async fn lock_key(
        &self,
        ctx: &ExecContext,
        sink: &mut LogSink<'_>,
        key: &str,
    ) -> Result<KeyGuard, CommandError> {
        let lock = {
            let mut map = self.key_locks.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(KeyLock::new(()));
                    map.insert(key.to_string(), Arc::downgrade(&l));
                    l
                }
            }
        };
        if let Ok(g) = lock.clone().try_lock_owned() {
            return Ok(KeyGuard { _guard: g });
        }
        sink.system(&format!(
            "waiting for another terraform_apply with workspace key {key:?} to finish"
        ))
        .await;
        tokio::select! {
            g = lock.lock_owned() => {
                sink.system("workspace key acquired").await;
                Ok(KeyGuard { _guard: g })
            }
            _ = ctx.cancel.cancelled() => Err(CommandError::new(
                "cancelled",
                "cancelled while waiting for another apply with the same workspace key",
            )),
        }
    }

    /// Creates (afresh) the workspace of `command_id` under `root`, marked in use.
    pub async fn create(&self, root: &Path, command_id: Uuid) -> Result<Workspace, CommandError> {
        let dir = root.join(command_id.to_string());
        let io = |what: &str, e: std::io::Error| {
            CommandError::new(
                "workspace_error",
                format!("cannot {what} workspace {}: {e}", dir.display()),
            )
            .retryable()
        };
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.clone());
        let ws = Workspace {
            dir: dir.clone(),
            in_use: self.in_use.clone(),
        };
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|e| io("clean", e))?;
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io("create", e))?;
        ws.touch().await;
        Ok(ws)
    }

    /// Removes command workspaces under `root` not used for longer than `retention`
    /// (directories named by a command id only; never one in use). Returns how many went.
    pub async fn remove_expired(&self, root: &Path, retention: Duration) -> usize {
        remove_expired(root, retention, self.in_use.clone()).await
    }
}

/// A command's workspace directory, marked in use until dropped.
pub struct Workspace {
    pub dir: PathBuf,
    in_use: InUse,
}

impl Workspace {
    /// Marks the workspace as used now (for the retention).
    pub async fn touch(&self) {
        let stamp = self.dir.join(STAMP);
        let _ = tokio::fs::remove_file(&stamp).await;
        let now = humantime_now();
        let _ = tokio::fs::write(&stamp, now).await;
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.dir);
    }
}

fn humantime_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{secs}\n")
}

async fn remove_expired(root: &Path, retention: Duration, in_use: InUse) -> usize {
    let root = root.to_path_buf();
    let r = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&root) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let is_ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| Uuid::parse_str(n).is_ok());
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !is_ours || !meta.is_dir() {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age <= retention {
                continue;
            }
            if in_use
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&path)
            {
                continue;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove old terraform workspace")
                }
            }
        }
        removed
    })
    .await;
    r.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terraform::redact::Redactor;

    #[tokio::test]
    async fn key_locks_belong_to_one_executor() {
        let (tx, _rx) = tokio::sync::mpsc::channel(100);
        let id = Uuid::new_v4();
        let ctx = ExecContext::new(id, id, 1, tx);
        let mut sink = LogSink::new(&ctx, Arc::new(Redactor::default()), 1 << 20);
        let mine = Workspaces::default();
        let held = mine.lock_key(&ctx, &mut sink, "k").await.unwrap();
        let second = tokio::time::timeout(
            Duration::from_millis(50),
            mine.lock_key(&ctx, &mut sink, "k"),
        )
        .await;
        assert!(second.is_err(), "the same key ran twice on one executor");
        // Another executor (another agent in this process) is not held up.
        let other = Workspaces::default();
        let _other_guard = other.lock_key(&ctx, &mut sink, "k").await.unwrap();
        drop(held);
        let _again = mine.lock_key(&ctx, &mut sink, "k").await.unwrap();
    }
}
