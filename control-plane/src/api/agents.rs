//! Agents: registration with a one-time token, listing, rotation, revocation, the
//! WebSocket endpoint agents dial, and a live `list_templates`.

use std::time::Duration;

use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_protocol::{CommandType, ListTemplatesResult, MAX_FRAME_BYTES};

use super::commands::{create_command, wait_terminal, CreateCommand};
use super::{parse_id, ApiResult, AppError, AppState, Json};
use crate::db::AgentRow;
use crate::time::opt_rfc3339;

pub fn agent_json(a: &AgentRow) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "status": a.status,
        "lastHeartbeat": opt_rfc3339(a.last_heartbeat),
        "connectedAt": opt_rfc3339(a.connected_at),
        "version": a.version,
        "hostname": a.hostname,
        "capabilities": a.capabilities,
        "facts": a.facts,
        "maxConcurrency": a.max_concurrency,
        "createdAt": crate::time::rfc3339(a.created_at),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAgent {
    name: String,
    #[serde(default)]
    max_concurrency: Option<i64>,
}

pub fn validate_agent_name(name: &str) -> ApiResult<()> {
    let ok = !name.trim().is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AppError::Invalid(
            "invalid_name",
            "agent name must be 1–64 characters of letters, digits, '-', '_', '.' or space".into(),
        ))
    }
}

pub async fn create(
    State(s): State<AppState>,
    Json(body): Json<CreateAgent>,
) -> ApiResult<Response> {
    validate_agent_name(&body.name)?;
    let conc = body.max_concurrency.unwrap_or(4);
    if !(1..=1024).contains(&conc) {
        return Err(AppError::Invalid(
            "invalid_params",
            "maxConcurrency must be 1–1024".into(),
        ));
    }
    let token = crate::auth::generate("agent");
    let agent = s
        .broker
        .db
        .create_agent(body.name.trim(), &crate::auth::hash(&token), conc)
        .await?;
    tracing::info!(agent_id = %agent.id, name = %agent.name, "agent registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({"agent": agent_json(&agent), "token": token})),
    )
        .into_response())
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let items: Vec<Value> = s
        .broker
        .db
        .list_agents()
        .await?
        .iter()
        .map(agent_json)
        .collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "agent")?;
    let a = s.broker.db.get_agent(id).await.map_err(not_found)?;
    Ok(Json(agent_json(&a)))
}

fn not_found(e: crate::db::DbError) -> AppError {
    match e {
        crate::db::DbError::NotFound => AppError::NotFound("agent not found".into()),
        e => e.into(),
    }
}

pub async fn rotate(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "agent")?;
    let token = crate::auth::generate("agent");
    s.broker
        .db
        .rotate_token(id, &crate::auth::hash(&token))
        .await
        .map_err(not_found)?;
    // The connected session authenticated with the old token: make it reconnect.
    s.broker.revoke(id);
    tracing::info!(agent_id = %id, "agent token rotated");
    Ok(Json(json!({ "token": token })))
}

pub async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "agent")?;
    s.broker.db.revoke_agent(id).await.map_err(not_found)?;
    s.broker.revoke(id);
    tracing::info!(agent_id = %id, "agent revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/agents/connect`: authenticates the agent token before the upgrade.
pub async fn connect(
    State(s): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = crate::auth::bearer(headers.get("authorization")) else {
        return AppError::Unauthorized("missing agent token".into()).into_response();
    };
    let agent = match s
        .broker
        .db
        .agent_by_token_hash(&crate::auth::hash(token))
        .await
    {
        Ok(Some((agent, stored))) if crate::auth::verify(token, &stored) => agent,
        Ok(_) => {
            tracing::warn!("agent connection with an unknown or revoked token");
            return AppError::Unauthorized("unknown or revoked agent token".into()).into_response();
        }
        Err(e) => return AppError::from(e).into_response(),
    };
    let broker = s.broker.clone();
    // Small per-connection buffers: 10 000 idle agents must fit in tens of KiB each; a
    // busy agent's buffers grow on demand.
    ws.read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| crate::broker::session::run(broker, agent, socket))
}

/// `GET /api/agents/:id/templates`: runs `list_templates` on the agent and answers with it.
pub async fn templates(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "agent")?;
    let agent = s.broker.db.get_agent(id).await.map_err(not_found)?;
    if agent.status != "online" {
        return Err(AppError::Conflict(
            "agent_offline",
            format!(
                "hypervisor {:?} is offline; start its tendril agent and try again",
                agent.name
            ),
        ));
    }
    if !agent.has_capability(CommandType::ListTemplates) {
        return Err(AppError::Conflict(
            "capability_missing",
            format!(
                "hypervisor {:?} has no Proxmox connection configured (PROXMOX_URL)",
                agent.name
            ),
        ));
    }
    let cmd = create_command(
        &s.broker,
        CreateCommand {
            agent_id: id,
            command_type: "list_templates".into(),
            params: json!({}),
            idempotency_key: None,
            timeout_secs: Some(60),
            created_by: "api:templates".into(),
            retry_of: None,
        },
    )
    .await?;
    let done = wait_terminal(&s.broker, cmd.id, Duration::from_secs(30)).await?;
    match done.status.as_str() {
        "succeeded" => {
            let r: ListTemplatesResult = serde_json::from_value(done.result.unwrap_or_default())
                .map_err(|e| {
                    AppError::Upstream(
                        "agent_error",
                        format!("agent sent an invalid template list: {e}"),
                    )
                })?;
            let items: Vec<Value> = r
                .templates
                .iter()
                .map(|t| json!({"vmid": t.vmid, "name": t.name, "node": t.node, "memory": t.memory, "cores": t.cores, "diskBytes": t.disk_bytes}))
                .collect();
            Ok(Json(json!({ "templates": items, "commandId": done.id })))
        }
        s if crate::db::TERMINAL.contains(&s) => {
            let msg = done
                .error
                .as_ref()
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("the agent could not list templates")
                .to_string();
            Err(AppError::Upstream("agent_error", msg))
        }
        _ => {
            let _ = s.broker.db.request_cancel(done.id).await;
            s.broker
                .cancel(id, done.id, trellis_protocol::CancelReason::TimedOut);
            Err(AppError::Timeout(
                "the agent did not list its templates within 30 s".into(),
            ))
        }
    }
}
