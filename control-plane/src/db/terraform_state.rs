//! Terraform state: the versions of each workspace's state (sealed by the domain layer
//! before they get here; this module never sees a state in clear) and the one lock per
//! workspace. Whether a lock is still held depends on its command: a lock whose command
//! has finished (or passed its deadline) is stale, and the next `LOCK` takes it over.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::sql::{command_status, id};
use super::{Db, DbResult};
use crate::model::{CommandId, CommandStatus};
use crate::time::now_ms;

/// The lock of a workspace as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLockRow {
    pub lock_id: String,
    pub command_id: CommandId,
    /// The lock info JSON Terraform sent with `LOCK`.
    pub info: String,
    pub created_at: i64,
    /// Its command is neither finished nor past its deadline.
    pub live: bool,
}

/// What a `LOCK` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    Acquired,
    /// Another live command holds it.
    Held(StateLockRow),
}

/// What an `UNLOCK` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnlockOutcome {
    Released,
    NotLocked,
    /// Another live command, or another lock id of this one, holds it.
    Held(StateLockRow),
}

/// What storing a state found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored as this version.
    Stored(i64),
    /// The workspace is locked by another live command, or by another lock id.
    Locked(StateLockRow),
}

/// One stored version, without its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateVersionRow {
    pub version: i64,
    pub command_id: Option<CommandId>,
    pub serial: Option<i64>,
    pub lineage: Option<String>,
    pub size_bytes: i64,
    pub created_at: i64,
}

/// A new version to store.
#[derive(Debug, Clone)]
pub struct NewStateVersion<'a> {
    pub workspace: &'a str,
    pub command_id: CommandId,
    /// The lock id the writer claims (`?ID=`), if any.
    pub lock_id: Option<&'a str>,
    pub serial: Option<i64>,
    pub lineage: Option<&'a str>,
    pub size_bytes: i64,
    /// The sealed state.
    pub sealed: &'a str,
    /// Versions kept per workspace: older ones are deleted once this one is stored.
    pub keep: i64,
}

/// A workspace with its version count and last update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWorkspaceRow {
    pub workspace: String,
    pub versions: i64,
    pub latest_version: i64,
    pub updated_at: i64,
    pub lock: Option<StateLockRow>,
}

const LOCK_SQL: &str = "SELECT l.lock_id, l.command_id, l.info, l.created_at, c.status, \
    c.deadline_at FROM terraform_state_locks l LEFT JOIN commands c ON c.id = l.command_id \
    WHERE l.workspace = $1";

fn lock_row(r: &AnyRow, now: i64) -> DbResult<StateLockRow> {
    let status: Option<String> = r.try_get("status")?;
    let deadline: Option<i64> = r.try_get("deadline_at")?;
    let live = match status {
        Some(_) => {
            let s = command_status(r, "status")?;
            !s.is_terminal() && deadline.is_none_or(|d| d > now)
        }
        // The command is gone (retention): nothing can hold the lock any more.
        None => false,
    };
    Ok(StateLockRow {
        lock_id: r.try_get("lock_id")?,
        command_id: id(r, "command_id")?,
        info: r.try_get("info")?,
        created_at: r.try_get("created_at")?,
        live,
    })
}

fn version_row(r: &AnyRow) -> DbResult<StateVersionRow> {
    let command: Option<String> = r.try_get("command_id")?;
    Ok(StateVersionRow {
        version: r.try_get("version")?,
        command_id: command.and_then(|c| c.parse().ok()),
        serial: r.try_get("serial")?,
        lineage: r.try_get("lineage")?,
        size_bytes: r.try_get("size_bytes")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Db {
    /// The latest version of a workspace's state: `(version, sealed state)`.
    pub async fn latest_state(&self, workspace: &str) -> DbResult<Option<(i64, String)>> {
        let row = sqlx::query(
            "SELECT version, state FROM terraform_state_versions WHERE workspace = $1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(workspace)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("version")?, r.try_get("state")?)))
            .transpose()
    }

    /// The lock of a workspace, if any (live or stale).
    pub async fn state_lock(&self, workspace: &str) -> DbResult<Option<StateLockRow>> {
        let row = sqlx::query(LOCK_SQL)
            .bind(workspace)
            .fetch_optional(&self.pool)
            .await?;
        let now = now_ms();
        row.map(|r| lock_row(&r, now)).transpose()
    }

    /// Takes the lock of `workspace` for `command` unless another live command holds it.
    /// A stale lock, or one `command` itself still holds (a Terraform process of it that
    /// was killed), is taken over.
    pub async fn lock_state(
        &self,
        workspace: &str,
        command: CommandId,
        lock_id: &str,
        info: &str,
    ) -> DbResult<LockOutcome> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let held = sqlx::query(LOCK_SQL)
            .bind(workspace)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| lock_row(&r, now))
            .transpose()?;
        match held {
            Some(l) if l.live && l.command_id != command => return Ok(LockOutcome::Held(l)),
            Some(_) => {
                sqlx::query(
                    "UPDATE terraform_state_locks SET lock_id = $1, command_id = $2, info = $3, \
                     created_at = $4 WHERE workspace = $5",
                )
                .bind(lock_id)
                .bind(command.to_string())
                .bind(info)
                .bind(now)
                .bind(workspace)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO terraform_state_locks (workspace, lock_id, command_id, info, \
                     created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(workspace)
                .bind(lock_id)
                .bind(command.to_string())
                .bind(info)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(LockOutcome::Acquired)
    }

    /// Releases the lock of `workspace` if `command` holds it (with `lock_id`, when given)
    /// or if it is stale.
    pub async fn unlock_state(
        &self,
        workspace: &str,
        command: CommandId,
        lock_id: Option<&str>,
    ) -> DbResult<UnlockOutcome> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let held = sqlx::query(LOCK_SQL)
            .bind(workspace)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| lock_row(&r, now))
            .transpose()?;
        let Some(l) = held else {
            return Ok(UnlockOutcome::NotLocked);
        };
        let ours = l.command_id == command && lock_id.is_none_or(|id| id == l.lock_id);
        if l.live && !ours {
            return Ok(UnlockOutcome::Held(l));
        }
        sqlx::query("DELETE FROM terraform_state_locks WHERE workspace = $1 AND lock_id = $2")
            .bind(workspace)
            .bind(&l.lock_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(if ours {
            UnlockOutcome::Released
        } else {
            UnlockOutcome::NotLocked
        })
    }

    /// Stores a new version of a workspace's state unless another live command (or
    /// another lock id) holds its lock; keeps the newest `keep` versions.
    pub async fn put_state(&self, v: &NewStateVersion<'_>) -> DbResult<PutOutcome> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let held = sqlx::query(LOCK_SQL)
            .bind(v.workspace)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| lock_row(&r, now))
            .transpose()?;
        if let Some(l) = held {
            let other_command = l.command_id != v.command_id;
            let other_id = v.lock_id.is_some_and(|id| id != l.lock_id);
            if l.live && (other_command || other_id) {
                return Ok(PutOutcome::Locked(l));
            }
        }
        let latest: Option<i64> = sqlx::query(
            "SELECT MAX(version) AS v FROM terraform_state_versions WHERE workspace = $1",
        )
        .bind(v.workspace)
        .fetch_one(&mut *tx)
        .await?
        .try_get("v")?;
        let version = latest.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO terraform_state_versions (workspace, version, command_id, serial, \
             lineage, size_bytes, state, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(v.workspace)
        .bind(version)
        .bind(v.command_id.to_string())
        .bind(v.serial)
        .bind(v.lineage)
        .bind(v.size_bytes)
        .bind(v.sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM terraform_state_versions WHERE workspace = $1 AND version <= $2")
            .bind(v.workspace)
            .bind(version - v.keep.max(1))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PutOutcome::Stored(version))
    }

    /// The stored versions of a workspace, newest first (without the states).
    pub async fn state_versions(&self, workspace: &str) -> DbResult<Vec<StateVersionRow>> {
        let rows = sqlx::query(
            "SELECT version, command_id, serial, lineage, size_bytes, created_at \
             FROM terraform_state_versions WHERE workspace = $1 ORDER BY version DESC",
        )
        .bind(workspace)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_row).collect()
    }

    /// Every workspace with a stored state or a lock, by name.
    pub async fn state_workspaces(&self) -> DbResult<Vec<StateWorkspaceRow>> {
        let rows = sqlx::query(
            "SELECT workspace, COUNT(*) AS versions, MAX(version) AS latest, \
             MAX(created_at) AS updated FROM terraform_state_versions GROUP BY workspace \
             ORDER BY workspace",
        )
        .fetch_all(&self.pool)
        .await?;
        let now = now_ms();
        let locks = sqlx::query(
            "SELECT l.workspace, l.lock_id, l.command_id, l.info, l.created_at, c.status, \
             c.deadline_at FROM terraform_state_locks l LEFT JOIN commands c \
             ON c.id = l.command_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut locks = locks
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("workspace")?, lock_row(r, now)?)))
            .collect::<DbResult<std::collections::BTreeMap<_, _>>>()?;
        let mut out = rows
            .iter()
            .map(|r| {
                let workspace: String = r.try_get("workspace")?;
                Ok(StateWorkspaceRow {
                    lock: locks.remove(&workspace),
                    workspace,
                    versions: r.try_get("versions")?,
                    latest_version: r.try_get("latest")?,
                    updated_at: r.try_get("updated")?,
                })
            })
            .collect::<DbResult<Vec<_>>>()?;
        // Locked before any state was stored (a first apply still running).
        for (workspace, lock) in locks {
            out.push(StateWorkspaceRow {
                updated_at: lock.created_at,
                workspace,
                versions: 0,
                latest_version: 0,
                lock: Some(lock),
            });
        }
        out.sort_by(|a, b| a.workspace.cmp(&b.workspace));
        Ok(out)
    }

    /// Whether `status` is one a command can hold a state credential in.
    pub fn state_credential_live(status: CommandStatus, deadline_at: i64) -> bool {
        !status.is_terminal() && deadline_at > now_ms()
    }
}
