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
        create_private_dir(&dir)
            .await
            .map_err(|e| io("create", e))?;
        ws.touch().await;
        Ok(ws)
    }

    /// The existing workspace of `command_id` under `root` (a `terraform_plan`'s, for the
    /// apply of its saved plan), marked in use; `None` if it is gone.
    pub async fn open(&self, root: &Path, command_id: Uuid) -> Option<Workspace> {
        let dir = root.join(command_id.to_string());
        if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
            return None;
        }
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.clone());
        Some(Workspace {
            dir,
            in_use: self.in_use.clone(),
        })
    }

    /// Removes command workspaces under `root` not used for longer than `retention`
    /// (directories named by a command id only; never one in use). Returns how many went.
    pub async fn remove_expired(&self, root: &Path, retention: Duration) -> usize {
        remove_expired(root, retention, self.in_use.clone()).await
    }
}

/// Creates `dir` (with its parents) as 0700, and narrows it to 0700 if it already
/// existed wider: workspaces hold templates, variables and state while a command runs.
pub async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder.create(dir).await?;
    let mode = tokio::fs::metadata(dir).await?.permissions().mode() & 0o777;
    if mode != 0o700 {
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).await?;
    }
    Ok(())
}

/// Files Terraform (or the agent) leaves in the template directory that hold secrets:
/// the variables the agent wrote, the state (resource attributes, sensitive outputs) and
/// its backup, and the backend settings `init` keeps (they may carry backend credentials).
pub const SECRET_FILES: [&str; 4] = [
    super::TFVARS,
    "terraform.tfstate",
    "terraform.tfstate.backup",
    ".terraform/terraform.tfstate",
];
/// State of non-default Terraform workspaces.
const SECRET_DIRS: [&str; 1] = ["terraform.tfstate.d"];

/// Name of the file in a workspace that names (relative to it) the directory Terraform
/// runs in while secret files may be there: a workspace left by a killed agent is
/// scrubbed by the next apply.
const SECRETS_MARK: &str = ".trellis-secrets-in";

/// Makes the secret files Terraform left in `dir` readable by this user only (0600).
pub async fn restrict_secret_files(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for name in SECRET_FILES {
        let path = dir.join(name);
        if tokio::fs::symlink_metadata(&path)
            .await
            .is_ok_and(|m| m.is_file())
        {
            let _ = tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).await;
        }
    }
}

/// Removes the secret files from `dir`; returns the names removed, and the errors.
pub async fn remove_secret_files(dir: &Path) -> (Vec<&'static str>, Vec<String>) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || remove_secret_files_blocking(&dir))
        .await
        .unwrap_or_else(|e| (Vec::new(), vec![e.to_string()]))
}

fn remove_secret_files_blocking(dir: &Path) -> (Vec<&'static str>, Vec<String>) {
    let (mut removed, mut errors) = (Vec::new(), Vec::new());
    let files = SECRET_FILES.iter().map(|n| (*n, false));
    let dirs = SECRET_DIRS.iter().map(|n| (*n, true));
    for (name, is_dir) in files.chain(dirs) {
        let path = dir.join(name);
        let r = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match r {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    (removed, errors)
}

/// A command's workspace directory, marked in use until dropped.
pub struct Workspace {
    pub dir: PathBuf,
    in_use: InUse,
}

impl Workspace {
    /// Records that Terraform runs in `dir` (inside this workspace), where secret files
    /// are about to appear: if the agent dies before [`Workspace::secrets_removed`], the
    /// next apply removes them.
    pub async fn secrets_in(&self, dir: &Path) -> std::io::Result<()> {
        let rel = dir.strip_prefix(&self.dir).unwrap_or(dir);
        tokio::fs::write(
            self.dir.join(SECRETS_MARK),
            rel.as_os_str().as_encoded_bytes(),
        )
        .await
    }

    /// The secret files are gone: forget where they were.
    pub async fn secrets_removed(&self) {
        let _ = tokio::fs::remove_file(self.dir.join(SECRETS_MARK)).await;
    }

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
            if in_use
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&path)
            {
                continue;
            }
            if age <= retention {
                scrub_leftover_secrets(&path);
                super::plan::remove_if_expired(&path);
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

/// Removes the secret files of a workspace whose command never got to remove them (the
/// agent was killed while Terraform ran); the workspace itself stays for its retention.
fn scrub_leftover_secrets(ws: &Path) {
    let mark = ws.join(SECRETS_MARK);
    let Ok(rel) = std::fs::read_to_string(&mark) else {
        return;
    };
    let rel = Path::new(rel.trim());
    // Only a directory inside the workspace, as written by `secrets_in`.
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        let _ = std::fs::remove_file(&mark);
        return;
    }
    let (_, errors) = remove_secret_files_blocking(&ws.join(rel));
    let failed = !errors.is_empty();
    if failed {
        tracing::warn!(workspace = %ws.display(), "cannot remove secret files left in a terraform workspace");
    } else {
        let _ = std::fs::remove_file(&mark);
        tracing::info!(workspace = %ws.display(), "removed secret files left in a terraform workspace by an interrupted apply");
    }
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
