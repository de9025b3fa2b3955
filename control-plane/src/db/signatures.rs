//! Commands signed when they are stored (`commands.signature`, see
//! `trellis_protocol::signing`). The signature covers the `dispatch` frame the row becomes
//! — agent, id, root, attempt, deadline, type and the params the agent receives — and is
//! sent unchanged with every dispatch, so a row altered after it was stored (by anyone who
//! can write the database but does not hold the signing key) is refused by a pinned agent.
//! Nothing signs a row read back from the database: a retry or a re-run first checks the
//! row it copies against its signature, and a row without one (stored by an earlier
//! version, or emptied by someone who can write the database) is never sent and never
//! copied — it fails `unsigned` when claimed, and its retry is refused.

use sqlx::Row;
use trellis_protocol::signing::FrameSignature;
use trellis_protocol::{CommandError, CommandType, Dispatch};

use super::nodes::fail_node_of;
use super::sql::error_json;
use super::{Db, DbResult, NewCommand};
use crate::model::{AgentId, CommandId};
use crate::time::now_ms;

/// The fields of a stored command its signature covers.
pub struct Signed<'a> {
    pub id: CommandId,
    pub agent_id: AgentId,
    pub command_type: CommandType,
    /// As stored (sensitive values sealed).
    pub params: &'a serde_json::Value,
    pub deadline_at: i64,
    pub attempt: i64,
    pub root_id: CommandId,
}

impl Db {
    /// The `dispatch` frame `c` becomes, with the params exactly as a dispatch of the
    /// stored row carries them: parsed back from the stored text, then unsealed.
    fn dispatch_of(&self, c: &Signed<'_>) -> Result<Dispatch, String> {
        let stored: serde_json::Value = serde_json::from_str(&c.params.to_string())
            .map_err(|e| format!("params do not parse: {e}"))?;
        let params = self
            .secrets
            .open_params(c.command_type, &stored)
            .map_err(|e| e.to_string())?;
        Ok(Dispatch {
            command_id: c.id.0,
            command_type: c.command_type.as_str().to_string(),
            params,
            deadline_ms: Some(c.deadline_at),
            attempt: c.attempt.clamp(1, i64::from(u32::MAX)) as u32,
            root_command_id: Some(c.root_id.0),
            signature: None,
            terraform_state: None,
        })
    }

    /// The stored signature of the command `c` describes.
    pub fn sign_command(&self, c: &Signed<'_>) -> Result<String, String> {
        let d = self.dispatch_of(c)?;
        Ok(self.signing.sign_dispatch(c.agent_id.0, &d).to_stored())
    }

    /// Signs a command about to be stored (sets `signature`).
    pub fn sign_new(&self, c: &mut NewCommand) -> Result<(), String> {
        c.signature = Some(self.sign_command(&Signed {
            id: c.id,
            agent_id: c.agent_id,
            command_type: c.command_type,
            params: &c.params,
            deadline_at: c.deadline_at,
            attempt: c.attempt,
            root_id: c.root_id,
        })?);
        Ok(())
    }

    /// Whether `signature` (as stored) is this server's signature of the command: a row
    /// is copied into a retry or re-run only when it is.
    pub fn verify_stored(&self, c: &Signed<'_>, signature: Option<&str>) -> Result<(), String> {
        let sig = signature
            .and_then(FrameSignature::from_stored)
            .ok_or("the command has no signature")?;
        let mut d = self.dispatch_of(c)?;
        d.signature = Some(sig);
        self.signing
            .verify_own_dispatch(c.agent_id.0, &d)
            .map_err(|e| e.to_string())
    }

    /// The stored signature of a command.
    pub async fn command_signature(&self, command: CommandId) -> DbResult<Option<String>> {
        let row = sqlx::query("SELECT signature FROM commands WHERE id = $1")
            .bind(command.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("signature")?,
            None => None,
        })
    }

    /// Ends a claimed command that cannot be sent as stored — no signature, sensitive
    /// values that do not decrypt — as `failed` with `error` (it was never sent). False if
    /// it had already ended.
    pub async fn fail_unsendable(&self, id: CommandId, error: &CommandError) -> DbResult<bool> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE commands SET status = 'failed', error = $1, finished_at = $2 \
             WHERE id = $3 AND status IN ('queued', 'dispatched')",
        )
        .bind(error_json(error))
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            fail_node_of(
                &mut tx,
                id,
                &format!("{}: {}", error.code, error.message),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }
}
