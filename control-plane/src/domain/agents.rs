//! Agents: registration with a one-time token (only its hash is stored), rotation and
//! revocation, which also reach a live session on this replica.

use super::{DomainError, DomainResult};
use crate::broker::Broker;
use crate::db::{AgentRow, Db};
use crate::model::AgentId;

pub fn validate_name(name: &str) -> DomainResult<()> {
    let ok = !name.trim().is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c));
    if ok {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "invalid_name",
            "agent name must be 1–64 characters of letters, digits, '-', '_', '.' or space",
        ))
    }
}

/// Registers an agent; returns it with its token (shown once, never stored).
pub async fn create(
    db: &Db,
    name: &str,
    max_concurrency: Option<i64>,
) -> DomainResult<(AgentRow, String)> {
    validate_name(name)?;
    let conc = max_concurrency.unwrap_or(4);
    if !(1..=1024).contains(&conc) {
        return Err(DomainError::invalid(
            "invalid_params",
            "maxConcurrency must be 1–1024",
        ));
    }
    let token = crate::auth::generate("agent");
    let agent = db
        .create_agent(name.trim(), &crate::auth::hash(&token), conc)
        .await
        .map_err(|e| match e {
            crate::db::DbError::Conflict(m) => DomainError::conflict("conflict", m),
            e => e.into(),
        })?;
    tracing::info!(agent_id = %agent.id, name = %agent.name, "agent registered");
    Ok((agent, token))
}

pub async fn get(db: &Db, id: AgentId) -> DomainResult<AgentRow> {
    db.get_agent(id)
        .await
        .map_err(DomainError::not_found("agent"))
}

/// Sets how many commands the agent runs at once (1–1024). The agent's own setting can
/// only lower it; a live session follows at once.
pub async fn set_max_concurrency(
    db: &Db,
    broker: Option<&Broker>,
    id: AgentId,
    max: i64,
) -> DomainResult<AgentRow> {
    if !(1..=1024).contains(&max) {
        return Err(DomainError::invalid(
            "invalid_params",
            "maxConcurrency must be 1–1024",
        ));
    }
    db.set_max_concurrency(id, max)
        .await
        .map_err(DomainError::not_found("agent"))?;
    if let Some(b) = broker {
        b.set_max_concurrency(id, max);
    }
    get(db, id).await
}

/// Issues a new token; a session on the old one is made to reconnect.
pub async fn rotate(db: &Db, broker: Option<&Broker>, id: AgentId) -> DomainResult<String> {
    let token = crate::auth::generate("agent");
    db.rotate_token(id, &crate::auth::hash(&token))
        .await
        .map_err(DomainError::not_found("agent"))?;
    if let Some(b) = broker {
        b.token_rotated(id);
    }
    tracing::info!(agent_id = %id, "agent token rotated");
    Ok(token)
}

/// Revokes an agent: its token stops working, its unfinished commands are cancelled, and
/// a live session here is closed (other processes' sessions by their reaper).
pub async fn revoke(db: &Db, broker: Option<&Broker>, id: AgentId) -> DomainResult<()> {
    db.revoke_agent(id)
        .await
        .map_err(DomainError::not_found("agent"))?;
    if let Some(b) = broker {
        b.revoke(id);
    }
    tracing::info!(agent_id = %id, "agent revoked");
    Ok(())
}
