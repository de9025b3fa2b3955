//! Terraform state kept by trellis for `terraform_apply`: Terraform's `http` backend
//! protocol (state `GET`/`POST`, `LOCK`/`UNLOCK` with Terraform's lock info) over the
//! versions and locks `db` stores, each state sealed with the secrets key before it is
//! stored (the workspace name as associated data).
//!
//! Who may use a workspace's state: the `terraform_apply` command whose state credential
//! is presented ([`authenticate`]) — an HMAC over (command id, workspace) the control plane
//! derives again on every request, honoured only while that command is neither finished nor
//! past its deadline and only for the workspace its own params name — and, to read, admins.
//!
//! Terraform 1.0.3's http client does not retry a refused `LOCK` (its error is not a
//! `LockError`, so `-lock-timeout` does not apply), so a `LOCK` on a workspace another
//! live command holds waits here, re-checking every [`LOCK_POLL`], until the lock is free,
//! the caller's deadline, or [`LOCK_WAIT_MAX`]; only then is it refused with the holder's
//! lock info. Two applies of one workspace through two agents therefore run one after
//! the other instead of failing.

use std::time::Duration;

use serde_json::Value;
use trellis_protocol::TerraformApplyParams;

use crate::db::{
    Db, DbError, LockOutcome, NewStateVersion, PutOutcome, StateVersionRow, StateWorkspaceRow,
    UnlockOutcome,
};
use crate::model::CommandId;
use crate::time::now_ms;

/// Versions kept per workspace; older ones are deleted as new ones are stored.
pub const KEEP_VERSIONS: i64 = 100;
/// Longest a `LOCK` waits for another command's lock.
pub const LOCK_WAIT_MAX: Duration = Duration::from_secs(600);
/// How often a waiting `LOCK` looks again (the lock may be released on another replica).
pub const LOCK_POLL: Duration = Duration::from_millis(250);
/// Longest workspace name.
pub const MAX_WORKSPACE_BYTES: usize = 1024;

/// Why a state request was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No, a malformed, a wrong or an expired credential (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid credential for something else: another workspace, or a write by a reader (403).
    #[error("{0}")]
    Forbidden(String),
    /// The workspace is locked by someone else; the holder's lock info JSON (423).
    #[error("the state is locked by another command")]
    Locked(String),
    /// An `UNLOCK` or write that names a lock it does not hold; the holder's lock info (409).
    #[error("the state lock is held by another command or lock id")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// Not a workspace name, or a workspace with nothing stored (404).
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] DbError),
    /// A stored state that does not open (another secrets key, tampered).
    #[error("the stored state cannot be decrypted")]
    Undecryptable(#[source] crate::secrets::SecretError),
}

/// The command a state request acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateCaller {
    pub command: CommandId,
    pub deadline_at: i64,
}

/// The state workspace of a `terraform_apply`'s (opened) params.
pub fn workspace_of(params: &Value) -> Option<String> {
    <TerraformApplyParams as serde::Deserialize>::deserialize(params)
        .ok()
        .map(|p| p.state_workspace())
}

/// Checks a state credential: `user` must be a live `terraform_apply`'s id and `password`
/// its credential, and `workspace` the one its params name.
pub async fn authenticate(
    db: &Db,
    user: &str,
    password: &str,
    workspace: &str,
) -> Result<StateCaller, StateError> {
    let invalid = || StateError::Unauthorized("the Terraform state credential is not valid".into());
    let id: CommandId = user.trim().parse().map_err(|_| invalid())?;
    let c = match db.get_command(id).await {
        Ok(c) => c,
        Err(DbError::NotFound) => return Err(invalid()),
        Err(e) => return Err(e.into()),
    };
    if !c.command_type.is_terraform() {
        return Err(invalid());
    }
    let params = db
        .secrets()
        .open_params(c.command_type, &c.params)
        .map_err(|e| {
            tracing::warn!(command_id = %id, error = %e, "cannot open a command's params to check its state credential");
            invalid()
        })?;
    let own = workspace_of(&params).ok_or_else(invalid)?;
    if !db.secrets().check_state_credential(id.0, &own, password) {
        return Err(invalid());
    }
    if own != workspace {
        return Err(StateError::Forbidden(format!(
            "this credential is for command {id}'s own workspace, not {workspace:?}"
        )));
    }
    if !Db::state_credential_live(c.status, c.deadline_at) {
        return Err(StateError::Unauthorized(format!(
            "the Terraform state credential has expired: command {id} is {}",
            if c.status.is_terminal() {
                c.status.as_str()
            } else {
                "past its deadline"
            }
        )));
    }
    Ok(StateCaller {
        command: id,
        deadline_at: c.deadline_at,
    })
}

/// Checks a workspace name from a URL: something that cannot be one is not found (like
/// a malformed id elsewhere in the API).
pub fn check_workspace(workspace: &str) -> Result<(), StateError> {
    if workspace.is_empty()
        || workspace.len() > MAX_WORKSPACE_BYTES
        || workspace.chars().any(char::is_control)
    {
        return Err(StateError::NotFound(format!(
            "no workspace {workspace:?}: a name has 1 to {MAX_WORKSPACE_BYTES} bytes and no control characters"
        )));
    }
    Ok(())
}

/// The latest state of `workspace`, in clear: `(version, state)`.
pub async fn get(db: &Db, workspace: &str) -> Result<Option<(i64, Vec<u8>)>, StateError> {
    let Some((version, sealed)) = db.latest_state(workspace).await? else {
        return Ok(None);
    };
    let plain = db
        .secrets()
        .open_blob(workspace, &sealed)
        .map_err(StateError::Undecryptable)?;
    Ok(Some((version, plain)))
}

/// Stores `body` (a Terraform state, JSON) as the newest version of `workspace`.
pub async fn put(
    db: &Db,
    caller: StateCaller,
    workspace: &str,
    lock_id: Option<&str>,
    body: &[u8],
) -> Result<i64, StateError> {
    let state: Value = serde_json::from_slice(body)
        .map_err(|e| StateError::Invalid(format!("the state is not JSON: {e}")))?;
    if !state.is_object() {
        return Err(StateError::Invalid("the state is not a JSON object".into()));
    }
    let sealed = db.secrets().seal_blob(workspace, body);
    let v = NewStateVersion {
        workspace,
        command_id: caller.command,
        lock_id,
        serial: state.get("serial").and_then(Value::as_i64),
        lineage: state.get("lineage").and_then(Value::as_str),
        size_bytes: body.len() as i64,
        sealed: &sealed,
        keep: KEEP_VERSIONS,
    };
    match db.put_state(&v).await? {
        PutOutcome::Stored(version) => {
            tracing::info!(workspace, version, command_id = %caller.command, "terraform state stored");
            Ok(version)
        }
        PutOutcome::Locked(l) => Err(StateError::Locked(l.info)),
    }
}

/// The `ID` of Terraform's lock info JSON.
fn lock_id(info: &[u8]) -> Result<String, StateError> {
    let v: Value = serde_json::from_slice(info)
        .map_err(|e| StateError::Invalid(format!("the lock info is not JSON: {e}")))?;
    match v.get("ID").and_then(Value::as_str) {
        Some(id) if !id.is_empty() && id.len() <= 256 => Ok(id.to_string()),
        _ => Err(StateError::Invalid(
            "the lock info has no ID (a string of 1 to 256 bytes)".into(),
        )),
    }
}

/// Takes the lock of `workspace` for `caller`, waiting (see the module docs) while
/// another live command holds it.
pub async fn lock(
    db: &Db,
    caller: StateCaller,
    workspace: &str,
    info: &[u8],
) -> Result<(), StateError> {
    let id = lock_id(info)?;
    let info = String::from_utf8_lossy(info);
    let until_deadline = Duration::from_millis((caller.deadline_at - now_ms()).max(0) as u64);
    let give_up = tokio::time::Instant::now() + until_deadline.min(LOCK_WAIT_MAX);
    let mut waited = false;
    loop {
        match db.lock_state(workspace, caller.command, &id, &info).await? {
            LockOutcome::Acquired => {
                tracing::info!(workspace, lock_id = %id, command_id = %caller.command, waited, "terraform state locked");
                return Ok(());
            }
            LockOutcome::Held(l) => {
                if tokio::time::Instant::now() + LOCK_POLL > give_up {
                    return Err(StateError::Locked(l.info));
                }
                if !waited {
                    tracing::info!(workspace, holder = %l.command_id, command_id = %caller.command, "waiting for the terraform state lock");
                    waited = true;
                }
                tokio::time::sleep(LOCK_POLL).await;
                // A waiter whose own command ended (cancelled, timed out) stops waiting:
                // its Terraform may be gone without the connection being noticed closed.
                let me = db.get_command(caller.command).await?;
                if !Db::state_credential_live(me.status, me.deadline_at) {
                    return Err(StateError::Unauthorized(format!(
                        "command {} ended while waiting for the state lock",
                        caller.command
                    )));
                }
            }
        }
    }
}

/// Releases `caller`'s lock of `workspace` (`info`: the lock info Terraform sends with
/// `UNLOCK`, whose `ID` must be the held one when it has one).
pub async fn unlock(
    db: &Db,
    caller: StateCaller,
    workspace: &str,
    info: &[u8],
) -> Result<(), StateError> {
    let id = lock_id(info).ok();
    match db
        .unlock_state(workspace, caller.command, id.as_deref())
        .await?
    {
        UnlockOutcome::Released | UnlockOutcome::NotLocked => Ok(()),
        UnlockOutcome::Held(l) => Err(StateError::Conflict(l.info)),
    }
}

/// Every workspace with stored state (or a lock).
pub async fn workspaces(db: &Db) -> Result<Vec<StateWorkspaceRow>, StateError> {
    Ok(db.state_workspaces().await?)
}

/// The versions of a workspace, newest first (404 when it has none).
pub async fn versions(db: &Db, workspace: &str) -> Result<Vec<StateVersionRow>, StateError> {
    check_workspace(workspace)?;
    let rows = db.state_versions(workspace).await?;
    if rows.is_empty() {
        return Err(StateError::NotFound(format!(
            "no Terraform state stored for workspace {workspace:?}"
        )));
    }
    Ok(rows)
}
