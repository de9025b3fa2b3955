//! Trellis templates: what the UI offers, mapped to a Proxmox template VMID.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Row;
use trellis_protocol::{MAX_CORES, MAX_MEMORY_MB, MIN_MEMORY_MB};
use uuid::Uuid;

use super::{parse_id, ApiResult, AppError, AppState, Json};
use crate::db::Db;
use crate::time::{now_ms, rfc3339};

#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub memory: i64,
    pub cores: i64,
    pub proxmox_template_id: Option<i64>,
    pub proxmox_node: Option<String>,
    pub network_bridge: Option<String>,
    pub pre_provision_commands: Vec<String>,
    pub post_provision_commands: Vec<String>,
    pub system: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLS: &str =
    "id, name, description, memory, cores, proxmox_template_id, proxmox_node, network_bridge, \
    pre_provision_commands, post_provision_commands, system, created_at, updated_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<TemplateRow, sqlx::Error> {
    let list = |col: &str| -> Result<Vec<String>, sqlx::Error> {
        let s: String = r.try_get(col)?;
        Ok(serde_json::from_str(&s).unwrap_or_default())
    };
    let id: String = r.try_get("id")?;
    Ok(TemplateRow {
        id: id.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        memory: r.try_get("memory")?,
        cores: r.try_get("cores")?,
        proxmox_template_id: r.try_get("proxmox_template_id")?,
        proxmox_node: r.try_get("proxmox_node")?,
        network_bridge: r.try_get("network_bridge")?,
        pre_provision_commands: list("pre_provision_commands")?,
        post_provision_commands: list("post_provision_commands")?,
        system: r.try_get::<i64, _>("system")? != 0,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub fn template_json(t: &TemplateRow) -> Value {
    json!({
        "id": t.id, "name": t.name, "description": t.description, "memory": t.memory, "cores": t.cores,
        "proxmoxTemplateId": t.proxmox_template_id, "proxmoxNode": t.proxmox_node,
        "networkBridge": t.network_bridge, "preProvisionCommands": t.pre_provision_commands,
        "postProvisionCommands": t.post_provision_commands, "system": t.system,
        "createdAt": rfc3339(t.created_at), "updatedAt": rfc3339(t.updated_at),
    })
}

pub async fn load(db: &Db, id: Uuid) -> ApiResult<TemplateRow> {
    let row = sqlx::query(&format!("SELECT {COLS} FROM templates WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await
        .map_err(crate::db::DbError::from)?
        .ok_or_else(|| AppError::NotFound(format!("template {id} not found")))?;
    Ok(from_row(&row).map_err(crate::db::DbError::from)?)
}

/// Seeds a few system templates on an empty database so the demo has something to pick.
pub async fn seed(db: &Db) -> anyhow::Result<()> {
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM templates")
        .fetch_one(&db.pool)
        .await?
        .try_get(0)?;
    if n > 0 {
        return Ok(());
    }
    let now = now_ms();
    for (name, desc, mem, cores, vmid) in [
        (
            "Debian 12 (small)",
            "Debian 12 cloud image, 2 GiB / 2 cores",
            2048,
            2,
            9000,
        ),
        (
            "Ubuntu 24.04 (medium)",
            "Ubuntu 24.04 LTS cloud image, 4 GiB / 2 cores",
            4096,
            2,
            9001,
        ),
        (
            "Unmapped example",
            "Not mapped to a Proxmox template yet",
            1024,
            1,
            0,
        ),
    ] {
        sqlx::query(
            "INSERT INTO templates (id, name, description, memory, cores, proxmox_template_id, network_bridge, \
             post_provision_commands, system, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'vmbr0', $7, 1, $8, $8)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(name)
        .bind(desc)
        .bind(mem as i64)
        .bind(cores as i64)
        .bind((vmid > 0).then_some(vmid as i64))
        .bind(r#"["hostname"]"#)
        .bind(now)
        .execute(db.writer())
        .await?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateBody {
    name: String,
    #[serde(default)]
    description: Option<String>,
    memory: i64,
    cores: i64,
    #[serde(default)]
    proxmox_template_id: Option<i64>,
    #[serde(default)]
    proxmox_node: Option<String>,
    #[serde(default)]
    network_bridge: Option<String>,
    #[serde(default)]
    pre_provision_commands: Vec<String>,
    #[serde(default)]
    post_provision_commands: Vec<String>,
}

pub fn validate_size(memory: i64, cores: i64) -> ApiResult<()> {
    if !(i64::from(MIN_MEMORY_MB)..=i64::from(MAX_MEMORY_MB)).contains(&memory) {
        return Err(AppError::Invalid(
            "invalid_params",
            format!("memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB"),
        ));
    }
    if !(1..=i64::from(MAX_CORES)).contains(&cores) {
        return Err(AppError::Invalid(
            "invalid_params",
            format!("cores must be between 1 and {MAX_CORES}"),
        ));
    }
    Ok(())
}

fn validate(b: &TemplateBody) -> ApiResult<()> {
    if b.name.trim().is_empty() || b.name.len() > 100 {
        return Err(AppError::Invalid(
            "invalid_params",
            "name must be 1–100 characters".into(),
        ));
    }
    validate_size(b.memory, b.cores)?;
    if b.proxmox_template_id
        .is_some_and(|v| !(100..=999_999_999).contains(&v))
    {
        return Err(AppError::Invalid(
            "invalid_params",
            "proxmoxTemplateId must be a Proxmox VMID (100–999999999)".into(),
        ));
    }
    if let Some(br) = b.network_bridge.as_deref().filter(|s| !s.is_empty()) {
        if !br.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
            return Err(AppError::Invalid(
                "invalid_params",
                format!("networkBridge {br:?} is not a bridge name"),
            ));
        }
    }
    Ok(())
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(&format!("SELECT {COLS} FROM templates ORDER BY name"))
        .fetch_all(&s.broker.db.pool)
        .await
        .map_err(crate::db::DbError::from)?;
    let items = rows
        .iter()
        .map(|r| from_row(r).map(|t| template_json(&t)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(crate::db::DbError::from)?;
    Ok(Json(json!({ "items": items })))
}

pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "template")?;
    Ok(Json(template_json(&load(&s.broker.db, id).await?)))
}

fn opt(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

pub async fn create(State(s): State<AppState>, Json(b): Json<TemplateBody>) -> ApiResult<Response> {
    validate(&b)?;
    let id = Uuid::new_v4();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO templates (id, name, description, memory, cores, proxmox_template_id, proxmox_node, network_bridge, \
         pre_provision_commands, post_provision_commands, system, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, $11)",
    )
    .bind(id.to_string())
    .bind(b.name.trim())
    .bind(opt(&b.description))
    .bind(b.memory)
    .bind(b.cores)
    .bind(b.proxmox_template_id)
    .bind(opt(&b.proxmox_node))
    .bind(opt(&b.network_bridge))
    .bind(serde_json::to_string(&b.pre_provision_commands).unwrap_or_default())
    .bind(serde_json::to_string(&b.post_provision_commands).unwrap_or_default())
    .bind(now)
    .execute(s.broker.db.writer())
    .await
    .map_err(crate::db::DbError::from)?;
    Ok((
        StatusCode::CREATED,
        Json(template_json(&load(&s.broker.db, id).await?)),
    )
        .into_response())
}

pub async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<TemplateBody>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "template")?;
    validate(&b)?;
    load(&s.broker.db, id).await?;
    sqlx::query(
        "UPDATE templates SET name = $1, description = $2, memory = $3, cores = $4, proxmox_template_id = $5, \
         proxmox_node = $6, network_bridge = $7, pre_provision_commands = $8, post_provision_commands = $9, \
         updated_at = $10 WHERE id = $11",
    )
    .bind(b.name.trim())
    .bind(opt(&b.description))
    .bind(b.memory)
    .bind(b.cores)
    .bind(b.proxmox_template_id)
    .bind(opt(&b.proxmox_node))
    .bind(opt(&b.network_bridge))
    .bind(serde_json::to_string(&b.pre_provision_commands).unwrap_or_default())
    .bind(serde_json::to_string(&b.post_provision_commands).unwrap_or_default())
    .bind(now_ms())
    .bind(id.to_string())
    .execute(s.broker.db.writer())
    .await
    .map_err(crate::db::DbError::from)?;
    Ok(Json(template_json(&load(&s.broker.db, id).await?)))
}

pub async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "template")?;
    load(&s.broker.db, id).await?;
    let used: i64 = sqlx::query("SELECT COUNT(*) FROM nodes WHERE template_id = $1")
        .bind(id.to_string())
        .fetch_one(&s.broker.db.pool)
        .await
        .map_err(crate::db::DbError::from)?
        .try_get(0)
        .map_err(crate::db::DbError::from)?;
    if used > 0 {
        return Err(AppError::Conflict(
            "template_in_use",
            format!("{used} node(s) use this template; change them first"),
        ));
    }
    sqlx::query("DELETE FROM templates WHERE id = $1")
        .bind(id.to_string())
        .execute(s.broker.db.writer())
        .await
        .map_err(crate::db::DbError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
