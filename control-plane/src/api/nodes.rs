//! Nodes (VM records) and provisioning them through an agent. The control plane, not the
//! browser, moves a node to `running` with its VM id and IP (or `failed`) when the
//! provision command ends.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Row;
use trellis_protocol::{CommandType, FinalStatus, Outcome};
use uuid::Uuid;

use super::commands::{create_command, CreateCommand};
use super::templates::{self, validate_size};
use super::{parse_id, ApiResult, AppError, AppState, Json};
use crate::broker::Broker;
use crate::db::{CommandRow, DbError};
use crate::time::{now_ms, rfc3339};

const COLS: &str =
    "id, application, name, template_id, memory, cores, vm_id, hypervisor_id, ip_address, status, \
    last_command_id, error, created_at, updated_at";

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: Uuid,
    pub application: Option<String>,
    pub name: String,
    pub template_id: Option<String>,
    pub memory: i64,
    pub cores: i64,
    pub vm_id: Option<i64>,
    pub hypervisor_id: Option<String>,
    pub ip_address: Option<String>,
    pub status: String,
    pub last_command_id: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn from_row(r: &sqlx::any::AnyRow) -> Result<NodeRow, sqlx::Error> {
    let id: String = r.try_get("id")?;
    Ok(NodeRow {
        id: id.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        application: r.try_get("application")?,
        name: r.try_get("name")?,
        template_id: r.try_get("template_id")?,
        memory: r.try_get("memory")?,
        cores: r.try_get("cores")?,
        vm_id: r.try_get("vm_id")?,
        hypervisor_id: r.try_get("hypervisor_id")?,
        ip_address: r.try_get("ip_address")?,
        status: r.try_get("status")?,
        last_command_id: r.try_get("last_command_id")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub fn node_json(n: &NodeRow) -> Value {
    json!({
        "id": n.id, "application": n.application, "name": n.name, "templateId": n.template_id,
        "memory": n.memory, "cores": n.cores, "vmId": n.vm_id, "hypervisorId": n.hypervisor_id,
        "ipAddress": n.ip_address, "status": n.status, "lastCommandId": n.last_command_id,
        "error": n.error, "createdAt": rfc3339(n.created_at), "updatedAt": rfc3339(n.updated_at),
    })
}

async fn load(broker: &Broker, id: Uuid) -> ApiResult<NodeRow> {
    let row = sqlx::query(&format!("SELECT {COLS} FROM nodes WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&broker.db.pool)
        .await
        .map_err(DbError::from)?
        .ok_or_else(|| AppError::NotFound(format!("node {id} not found")))?;
    Ok(from_row(&row).map_err(DbError::from)?)
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(&format!("SELECT {COLS} FROM nodes ORDER BY created_at"))
        .fetch_all(&s.broker.db.pool)
        .await
        .map_err(DbError::from)?;
    let items = rows
        .iter()
        .map(|r| from_row(r).map(|n| node_json(&n)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(DbError::from)?;
    Ok(Json(json!({ "items": items })))
}

pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "node")?;
    Ok(Json(node_json(&load(&s.broker, id).await?)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionBody {
    agent_id: String,
    #[serde(default)]
    target_node: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBody {
    name: String,
    template_id: String,
    #[serde(default)]
    memory: Option<i64>,
    #[serde(default)]
    cores: Option<i64>,
    #[serde(default)]
    application: Option<String>,
    #[serde(default)]
    provision: Option<ProvisionBody>,
}

fn validate_name(name: &str) -> ApiResult<()> {
    trellis_protocol::validate_vm_name(name)
        .map_err(|e| AppError::Invalid("invalid_params", e.message))
}

pub async fn create(State(s): State<AppState>, Json(b): Json<NodeBody>) -> ApiResult<Response> {
    validate_name(&b.name)?;
    let tid = b.template_id.parse().map_err(|_| {
        AppError::Invalid("invalid_params", "templateId is not a template id".into())
    })?;
    let t = templates::load(&s.broker.db, tid).await?;
    let memory = b.memory.unwrap_or(t.memory);
    let cores = b.cores.unwrap_or(t.cores);
    validate_size(memory, cores)?;
    let id = Uuid::new_v4();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO nodes (id, application, name, template_id, memory, cores, status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending_provision', $7, $7)",
    )
    .bind(id.to_string())
    .bind(b.application.filter(|a| !a.trim().is_empty()))
    .bind(&b.name)
    .bind(tid.to_string())
    .bind(memory)
    .bind(cores)
    .bind(now)
    .execute(s.broker.db.writer())
    .await
    .map_err(DbError::from)?;
    let mut command_id = None;
    if let Some(p) = b.provision {
        let (_, cid) = start_provision(&s.broker, id, p).await?;
        command_id = Some(cid);
    }
    let node = load(&s.broker, id).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"node": node_json(&node), "commandId": command_id})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    template_id: Option<String>,
    #[serde(default)]
    memory: Option<i64>,
    #[serde(default)]
    cores: Option<i64>,
    #[serde(default)]
    application: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

pub async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<UpdateBody>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "node")?;
    let n = load(&s.broker, id).await?;
    let name = b.name.unwrap_or(n.name.clone());
    validate_name(&name)?;
    let memory = b.memory.unwrap_or(n.memory);
    let cores = b.cores.unwrap_or(n.cores);
    validate_size(memory, cores)?;
    let template_id = match b.template_id {
        Some(t) => {
            let tid = t.parse().map_err(|_| {
                AppError::Invalid("invalid_params", "templateId is not a template id".into())
            })?;
            templates::load(&s.broker.db, tid).await?;
            Some(tid.to_string())
        }
        None => n.template_id.clone(),
    };
    let status = match b.status.as_deref() {
        None => n.status.clone(),
        Some(st @ ("running" | "stopped")) if n.vm_id.is_some() => st.to_string(),
        Some(st) => {
            return Err(AppError::Invalid(
                "invalid_params",
                format!("status {st:?} cannot be set here"),
            ))
        }
    };
    if n.status == "provisioning" {
        return Err(AppError::Conflict(
            "node_busy",
            "the node is being provisioned".into(),
        ));
    }
    sqlx::query(
        "UPDATE nodes SET name = $1, template_id = $2, memory = $3, cores = $4, application = $5, status = $6, updated_at = $7 WHERE id = $8",
    )
    .bind(&name)
    .bind(template_id)
    .bind(memory)
    .bind(cores)
    // `""` clears the application; absent keeps it.
    .bind(match b.application {
        Some(a) if a.trim().is_empty() => None,
        Some(a) => Some(a),
        None => n.application,
    })
    .bind(status)
    .bind(now_ms())
    .bind(id.to_string())
    .execute(s.broker.db.writer())
    .await
    .map_err(DbError::from)?;
    Ok(Json(node_json(&load(&s.broker, id).await?)))
}

pub async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "node")?;
    let n = load(&s.broker, id).await?;
    if n.status == "provisioning" {
        return Err(AppError::Conflict(
            "node_busy",
            "the node is being provisioned; cancel the command first".into(),
        ));
    }
    sqlx::query("DELETE FROM nodes WHERE id = $1")
        .bind(id.to_string())
        .execute(s.broker.db.writer())
        .await
        .map_err(DbError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn provision(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<ProvisionBody>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "node")?;
    let (node, command_id) = start_provision(&s.broker, id, b).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"node": node_json(&node), "commandId": command_id})),
    )
        .into_response())
}

async fn start_provision(
    broker: &Broker,
    id: Uuid,
    b: ProvisionBody,
) -> ApiResult<(NodeRow, Uuid)> {
    let n = load(broker, id).await?;
    if let Some(vm) = n.vm_id {
        return Err(AppError::Conflict(
            "already_provisioned",
            format!("node {:?} already has VM {vm}", n.name),
        ));
    }
    if n.status == "provisioning" {
        return Err(AppError::Conflict(
            "already_provisioning",
            format!(
                "node {:?} is already being provisioned (command {})",
                n.name,
                n.last_command_id.unwrap_or_default()
            ),
        ));
    }
    let agent_id: Uuid = b
        .agent_id
        .parse()
        .map_err(|_| AppError::NotFound(format!("hypervisor {:?} not found", b.agent_id)))?;
    let agent = broker.db.get_agent(agent_id).await.map_err(|e| match e {
        DbError::NotFound => AppError::NotFound(format!("hypervisor {agent_id} not found")),
        e => e.into(),
    })?;
    if agent.status != "online" {
        return Err(AppError::Conflict(
            "agent_offline",
            format!("hypervisor {:?} is offline", agent.name),
        ));
    }
    if !agent.has_capability(CommandType::Provision) {
        return Err(AppError::Conflict(
            "capability_missing",
            format!(
                "hypervisor {:?} cannot provision VMs (no Proxmox connection configured)",
                agent.name
            ),
        ));
    }
    let Some(tid) = n.template_id.as_deref().and_then(|t| t.parse().ok()) else {
        return Err(AppError::Invalid(
            "template_missing",
            "the node has no template".into(),
        ));
    };
    let t = templates::load(&broker.db, tid).await?;
    let Some(vmid) = t.proxmox_template_id else {
        return Err(AppError::Invalid(
            "template_not_mapped",
            format!(
                "template {:?} is not mapped to a Proxmox template; set its Proxmox template id",
                t.name
            ),
        ));
    };
    let params = json!({
        "name": n.name,
        "template": {
            "type": "proxmox",
            "template_id": vmid,
            "template_node": t.proxmox_node,
            "memory": n.memory,
            "cores": n.cores,
            "description": t.description,
            "network_bridge": t.network_bridge,
            "pre_provision_commands": t.pre_provision_commands,
            "post_provision_commands": t.post_provision_commands,
        },
        "target_node": b.target_node.filter(|s| !s.is_empty()),
    });
    // Claim the node first, atomically: two clicks on Provision must not make two VMs.
    let claimed = sqlx::query(
        "UPDATE nodes SET status = 'provisioning', hypervisor_id = $1, error = NULL, updated_at = $2 \
         WHERE id = $3 AND status <> 'provisioning' AND vm_id IS NULL",
    )
    .bind(agent_id.to_string())
    .bind(now_ms())
    .bind(id.to_string())
    .execute(broker.db.writer())
    .await
    .map_err(DbError::from)?
    .rows_affected();
    if claimed == 0 {
        return Err(AppError::Conflict(
            "already_provisioning",
            format!("node {:?} is already being provisioned", n.name),
        ));
    }
    let created = create_command(
        broker,
        CreateCommand {
            agent_id,
            command_type: "provision".into(),
            params,
            idempotency_key: None,
            timeout_secs: None,
            created_by: format!("node:{id}"),
            retry_of: None,
        },
    )
    .await;
    let cmd = match created {
        Ok(c) => c,
        Err(e) => {
            // Give the node back as it was.
            let _ = sqlx::query(
                "UPDATE nodes SET status = $1, hypervisor_id = $2, error = $3 WHERE id = $4 AND status = 'provisioning'",
            )
            .bind(&n.status)
            .bind(n.hypervisor_id.clone())
            .bind(n.error.clone())
            .bind(id.to_string())
            .execute(broker.db.writer())
            .await;
            return Err(e);
        }
    };
    sqlx::query("UPDATE nodes SET last_command_id = $1, updated_at = $2 WHERE id = $3")
        .bind(cmd.id.to_string())
        .bind(now_ms())
        .bind(id.to_string())
        .execute(broker.db.writer())
        .await
        .map_err(DbError::from)?;
    // A command that ended before the node pointed at it would otherwise be missed.
    if let Ok(c) = broker.db.get_command(cmd.id).await {
        if c.is_terminal() {
            sync_node_after_server_end(broker, &c).await;
        }
    }
    Ok((load(broker, id).await?, cmd.id))
}

/// Applies a terminal command to the node that points at it (for ends decided by the
/// server: timeout, lost, cancel of a queued command, or a race with the writer).
pub async fn sync_node_after_server_end(broker: &Broker, c: &CommandRow) {
    if !c.is_terminal() || c.command_type != "provision" {
        return;
    }
    let status = match c.status.as_str() {
        "succeeded" => FinalStatus::Succeeded,
        "cancelled" => FinalStatus::Cancelled,
        "timed_out" => FinalStatus::TimedOut,
        _ => FinalStatus::Failed,
    };
    let outcome = Outcome {
        status,
        result: c.result.clone(),
        error: c.error.clone().and_then(|e| serde_json::from_value(e).ok()),
    };
    let res = async {
        let mut conn = broker.db.writer().acquire().await?;
        crate::broker::writer::node_outcome(&mut conn, c.id, c.agent_id, &outcome).await
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(command_id = %c.id, error = %e, "cannot update node after command end");
    }
}

/// A retry of a node's provision command takes over the node.
pub async fn retarget_node(broker: &Broker, old: Uuid, new: Uuid) -> ApiResult<()> {
    sqlx::query(
        "UPDATE nodes SET last_command_id = $1, status = 'provisioning', error = NULL, updated_at = $2 \
         WHERE last_command_id = $3 AND vm_id IS NULL",
    )
    .bind(new.to_string())
    .bind(now_ms())
    .bind(old.to_string())
    .execute(broker.db.writer())
    .await
    .map_err(DbError::from)?;
    Ok(())
}
