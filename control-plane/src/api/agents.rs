//! Agents: registration with a one-time token, listing, rotation, revocation, the
//! WebSocket endpoint agents dial, and a live `list_templates`.

use std::time::Duration;

use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use trellis_protocol::{CommandType, ListTemplatesResult, MAX_FRAME_BYTES};

use super::types::{
    Agent, AgentList, AgentTemplates, AgentVm, AgentVmList, CreateAgentRequest, CreatedAgent,
    ErrorBody, InstallInfo, NewToken, ProxmoxTemplate, UpdateAgentRequest,
};
use super::{parse_id, ApiResult, AppError, AppState, Json};
use crate::domain::{self, commands::CreateCommand, DomainError};
use crate::model::{AgentId, CommandStatus};

/// Register an agent; its token is in the answer, only this once.
#[utoipa::path(post, path = "/api/agents", tag = "agents", request_body = CreateAgentRequest,
    responses((status = 201, body = CreatedAgent),
        (status = 400, body = ErrorBody), (status = 409, description = "Name taken", body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    Json(body): Json<CreateAgentRequest>,
) -> ApiResult<Response> {
    let (agent, token) = domain::agents::create(&s.db, &body.name, body.max_concurrency).await?;
    let note = super::audit::AuditNote::target(agent.id, agent.name.clone());
    Ok(note.on((
        StatusCode::CREATED,
        Json(CreatedAgent {
            agent: Agent::from(&agent),
            token,
            server_public_key: s.broker.signing.public_key_base64(),
            public_url: s.public_url.clone(),
        }),
    )
        .into_response()))
}

/// What installing an agent needs besides its token: the public URL, the signing key
/// to pin, and the install one-liner — so an agent that never connected can be installed
/// with the token given at registration, without rotating it.
#[utoipa::path(get, path = "/api/agents/install", tag = "agents",
    responses((status = 200, body = InstallInfo)))]
pub async fn install_info(State(s): State<AppState>) -> Json<InstallInfo> {
    let key = s.broker.signing.public_key_base64();
    Json(InstallInfo {
        install_command: s
            .public_url
            .as_deref()
            .map(|u| super::install::one_liner(u, Some(&key))),
        public_url: s.public_url.clone(),
        server_public_key: key,
    })
}

/// List live (not revoked) agents.
#[utoipa::path(get, path = "/api/agents", tag = "agents", responses((status = 200, body = AgentList)))]
pub async fn list(State(s): State<AppState>) -> ApiResult<Json<AgentList>> {
    let items = s.db.list_agents().await?.iter().map(Agent::from).collect();
    Ok(Json(AgentList { items }))
}

#[utoipa::path(get, path = "/api/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = Agent), (status = 404, body = ErrorBody)))]
pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Agent>> {
    let id: AgentId = parse_id(&id, "agent")?;
    Ok(Json(Agent::from(&domain::agents::get(&s.db, id).await?)))
}

/// Change an agent's settings (its command concurrency).
#[utoipa::path(patch, path = "/api/agents/{id}", tag = "agents", params(("id" = String, Path)),
    request_body = UpdateAgentRequest,
    responses((status = 200, body = Agent), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<UpdateAgentRequest>,
) -> ApiResult<Json<Agent>> {
    let id: AgentId = parse_id(&id, "agent")?;
    let a =
        domain::agents::set_max_concurrency(&s.db, Some(&s.broker), id, b.max_concurrency).await?;
    Ok(Json(Agent::from(&a)))
}

/// Issue a new token; the old one stops working and a session on it is closed.
#[utoipa::path(post, path = "/api/agents/{id}/rotate-token", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = NewToken), (status = 404, body = ErrorBody)))]
pub async fn rotate(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NewToken>> {
    let id: AgentId = parse_id(&id, "agent")?;
    let token = domain::agents::rotate(&s.db, Some(&s.broker), id).await?;
    Ok(Json(NewToken { token }))
}

/// Revoke an agent: its token stops working, it is disconnected and its unfinished
/// commands are cancelled.
#[utoipa::path(delete, path = "/api/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 404, body = ErrorBody)))]
pub async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id: AgentId = parse_id(&id, "agent")?;
    domain::agents::revoke(&s.db, Some(&s.broker), id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The VMs the hypervisor reported in its latest inventory, each with the node tracking
/// it (none: a VM Trellis does not track).
#[utoipa::path(get, path = "/api/agents/{id}/vms", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = AgentVmList), (status = 404, body = ErrorBody)))]
pub async fn vms(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentVmList>> {
    let id: AgentId = parse_id(&id, "agent")?;
    domain::agents::get(&s.db, id).await?;
    let items =
        s.db.agent_vms(id)
            .await?
            .iter()
            .map(AgentVm::from)
            .collect();
    Ok(Json(AgentVmList { items }))
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
    // A draining replica takes no new sessions: the agent retries, and the load balancer
    // (which sees `/readyz` fail) sends it to another replica.
    if s.broker.replica.is_draining() {
        return AppError::Unavailable(
            "draining",
            "this replica is stopping; connect to another".into(),
        )
        .into_response();
    }
    let agent = match s.db.agent_by_token_hash(&crate::auth::hash(token)).await {
        Ok(Some((agent, stored))) if crate::auth::verify(token, &stored) => agent,
        Ok(_) => {
            tracing::warn!("agent connection with an unknown or revoked token");
            return AppError::Unauthorized("unknown or revoked agent token".into()).into_response();
        }
        Err(e) => return AppError::from(e).into_response(),
    };
    let broker = s.broker.clone();
    let tasks = s.tasks.clone();
    // Small per-connection buffers: 10 000 idle agents must fit in tens of KiB each; a
    // busy agent's buffers grow on demand.
    ws.read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| {
            // Tracked with every other task, so shutdown waits for the session to end.
            tasks.track_future(crate::broker::session::run(broker, agent, socket))
        })
}

/// The Proxmox templates the agent's host has (runs `list_templates` on the agent).
#[utoipa::path(get, path = "/api/agents/{id}/templates", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = AgentTemplates), (status = 404, body = ErrorBody),
        (status = 409, description = "agent_offline or capability_missing", body = ErrorBody),
        (status = 502, description = "The agent failed", body = ErrorBody),
        (status = 504, description = "The agent did not answer in 30 s", body = ErrorBody)))]
pub async fn templates(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentTemplates>> {
    let id: AgentId = parse_id(&id, "agent")?;
    let agent = domain::agents::get(&s.db, id).await?;
    if !agent.is_online() {
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
    let cmd = domain::commands::create(
        &s.db,
        &s.broker,
        CreateCommand {
            agent_id: id,
            command_type: CommandType::ListTemplates.as_str().into(),
            params: serde_json::json!({}),
            idempotency_key: None,
            timeout_secs: Some(60),
            created_by: "api:templates".into(),
        },
    )
    .await?;
    let done =
        domain::commands::wait_terminal(&s.db, &s.broker, cmd.id, Duration::from_secs(30)).await?;
    match done.status {
        CommandStatus::Succeeded => {
            let r: ListTemplatesResult = serde_json::from_value(done.result.unwrap_or_default())
                .map_err(|e| {
                    AppError::Upstream(
                        "agent_error",
                        format!("agent sent an invalid template list: {e}"),
                    )
                })?;
            let templates = r
                .templates
                .into_iter()
                .map(|t| ProxmoxTemplate {
                    vmid: t.vmid,
                    name: t.name,
                    node: t.node,
                    memory: t.memory,
                    cores: t.cores,
                    disk_bytes: t.disk_bytes,
                })
                .collect();
            Ok(Json(AgentTemplates {
                templates,
                command_id: done.id,
            }))
        }
        s if s.is_terminal() => {
            let msg = done
                .error
                .as_ref()
                .and_then(|e| e.get("message"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("the agent could not list templates")
                .to_string();
            Err(DomainError::Upstream {
                code: "agent_error",
                message: msg,
            }
            .into())
        }
        _ => {
            let _ = s.db.request_cancel(done.id).await;
            s.broker
                .cancel(id, done.id, trellis_protocol::CancelReason::TimedOut);
            Err(AppError::Timeout(
                "the agent did not list its templates within 30 s".into(),
            ))
        }
    }
}
