//! Nodes (VM records) and provisioning them through an agent. The control plane, not the
//! browser, moves a node to `running` with its VM id and IP (or `failed`) when the
//! provision command ends.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::audit::AuditNote;
use super::auth::Admin;
use super::types::{
    CreateNodeRequest, DestroyRequest, ErrorBody, ImportNodeRequest, Node, NodeList,
    NodeWithCommand, PowerRequest, ProvisionRequest, UpdateNodeRequest,
};
use super::{parse_id, ApiResult, AppState, Json};
use crate::domain::{self, nodes::Provision};
use crate::model::NodeId;

/// Nodes, each with the stage and percent of the command running on it (`progress`).
#[utoipa::path(get, path = "/api/nodes", tag = "nodes", params(super::types::NodeListQuery),
    responses((status = 200, body = NodeList)))]
pub async fn list(
    State(s): State<AppState>,
    super::Query(q): super::Query<super::types::NodeListQuery>,
) -> ApiResult<Json<NodeList>> {
    let batch = q.batch_id.filter(|b| !b.is_empty());
    let rows = s.db.list_nodes_with_progress(batch.as_deref()).await?;
    let items = rows
        .iter()
        .map(|(n, p)| {
            let mut node = Node::from(n);
            node.progress = p.as_ref().map(Into::into);
            node
        })
        .collect();
    Ok(Json(NodeList { items }))
}

#[utoipa::path(get, path = "/api/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Node>> {
    let id: NodeId = parse_id(&id, "node")?;
    Ok(Json(Node::from(&domain::nodes::get(&s.db, id).await?)))
}

pub(super) fn provision_of(p: ProvisionRequest) -> Provision {
    let cleared_lists = p
        .clone_options
        .as_ref()
        .map(|o| domain::nodes::ClearedLists {
            ssh_keys: o.ssh_keys.as_ref().is_some_and(Vec::is_empty),
            tags: o.tags.as_ref().is_some_and(Vec::is_empty),
        })
        .unwrap_or_default();
    Provision {
        agent_id: p.agent_id,
        target_node: p.target_node,
        keep_on_failure: p.keep_on_failure,
        clone_options: p.clone_options.map(Into::into),
        cleared_lists,
    }
}

/// Create a node, and with `provision` start provisioning it at once.
#[utoipa::path(post, path = "/api/nodes", tag = "nodes", request_body = CreateNodeRequest,
    responses((status = 201, body = NodeWithCommand), (status = 400, body = ErrorBody),
        (status = 404, description = "Unknown template or hypervisor", body = ErrorBody),
        (status = 409, description = "duplicate_name (another node has this name; send force: true), agent_offline, capability_missing", body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    admin: Admin,
    Json(b): Json<CreateNodeRequest>,
) -> ApiResult<Response> {
    let create = domain::nodes::CreateNode {
        name: b.name,
        template_id: b.template_id,
        memory: b.memory,
        cores: b.cores,
        application: b.application,
        force: b.force,
    };
    // With a provision: both or neither (a refused provision leaves no node behind).
    let (id, command_id) = match b.provision {
        Some(p) => {
            let (id, c) = domain::nodes::create_with_provision(
                &s.db,
                &s.broker,
                &admin.name,
                create,
                provision_of(p),
            )
            .await?;
            (id, Some(c.id))
        }
        None => (domain::nodes::create(&s.db, create).await?, None),
    };
    let node = domain::nodes::get(&s.db, id).await?;
    let note = AuditNote::target(node.id, node.name.clone())
        .with_details(serde_json::json!({ "commandId": command_id }));
    Ok(note.on((
        StatusCode::CREATED,
        Json(NodeWithCommand {
            node: Node::from(&node),
            command_id,
        }),
    )
        .into_response()))
}

/// Import a VM of a hypervisor's inventory that Trellis does not track as a node
/// (`running` or `stopped` as Proxmox reports it). Power actions work on it; destroy only
/// when the VM carries a Trellis tag (else 409 `vm_untagged`: Trellis never deletes a VM
/// it did not make).
#[utoipa::path(post, path = "/api/nodes/import", tag = "nodes", request_body = ImportNodeRequest,
    responses((status = 201, body = Node), (status = 400, body = ErrorBody),
        (status = 404, description = "Unknown hypervisor, or the VM is not in its inventory", body = ErrorBody),
        (status = 409, description = "already_tracked (a node already tracks this VM), duplicate_name", body = ErrorBody)))]
pub async fn import(
    State(s): State<AppState>,
    Json(b): Json<ImportNodeRequest>,
) -> ApiResult<Response> {
    let node = domain::nodes::import(
        &s.db,
        domain::nodes::Import {
            agent_id: b.agent_id,
            vm_id: b.vm_id,
            name: b.name,
            application: b.application,
            force: b.force,
        },
    )
    .await?;
    let note = AuditNote::target(node.id, node.name.clone())
        .with_details(serde_json::json!({ "vmId": node.vm_id, "imported": true }));
    Ok(note.on((StatusCode::CREATED, Json(Node::from(&node))).into_response()))
}

/// Edit a node (absent fields keep their value).
#[utoipa::path(put, path = "/api/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    request_body = UpdateNodeRequest,
    responses((status = 200, body = Node), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "node_busy, duplicate_name (another node has the new name)", body = ErrorBody)))]
pub async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<UpdateNodeRequest>,
) -> ApiResult<Json<Node>> {
    let id: NodeId = parse_id(&id, "node")?;
    let n = domain::nodes::update(
        &s.db,
        id,
        domain::nodes::EditNode {
            name: b.name,
            template_id: b.template_id,
            memory: b.memory,
            cores: b.cores,
            application: b.application,
            status: b.status,
        },
    )
    .await?;
    Ok(Json(Node::from(&n)))
}

/// Remove a node record whose VM does not exist (never made, destroyed, or missing).
/// A node whose VM lives is refused (`vm_exists`): destroy it or forget it.
#[utoipa::path(delete, path = "/api/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody),
        (status = 409, description = "vm_exists, node_busy", body = ErrorBody)))]
pub async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id: NodeId = parse_id(&id, "node")?;
    // The name, read before it is gone, for the audit log.
    let name = domain::nodes::get(&s.db, id).await?.name;
    domain::nodes::delete(&s.db, id).await?;
    Ok(AuditNote::target(id, name).on(StatusCode::NO_CONTENT.into_response()))
}

/// Provision the node's VM on a hypervisor.
#[utoipa::path(post, path = "/api/nodes/{id}/provision", tag = "nodes", params(("id" = String, Path)),
    request_body = ProvisionRequest,
    responses((status = 202, body = NodeWithCommand), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "already_provisioned, already_provisioning, agent_offline, capability_missing", body = ErrorBody)))]
pub async fn provision(
    State(s): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    Json(b): Json<ProvisionRequest>,
) -> ApiResult<Response> {
    let id: NodeId = parse_id(&id, "node")?;
    let (node, c) =
        domain::nodes::start_provision(&s.db, &s.broker, &admin.name, id, provision_of(b)).await?;
    Ok(accepted(&node, c.id))
}

/// Start, shut down, stop or reboot the node's VM; the node follows the state Proxmox
/// reports when the command ends.
#[utoipa::path(post, path = "/api/nodes/{id}/power", tag = "nodes", params(("id" = String, Path)),
    request_body = PowerRequest,
    responses((status = 202, body = NodeWithCommand), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "invalid_state, node_busy, capability_missing", body = ErrorBody)))]
pub async fn power(
    State(s): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    Json(b): Json<PowerRequest>,
) -> ApiResult<Response> {
    let id: NodeId = parse_id(&id, "node")?;
    let (node, c) = domain::nodes::power(
        &s.db,
        &s.broker,
        &admin.name,
        id,
        domain::nodes::Power {
            action: b.action.into(),
            timeout_s: b.timeout_s,
            force_after_s: b.force_after_s,
        },
    )
    .await?;
    Ok(accepted(&node, c.id))
}

/// Destroy the node's VM (stop, delete with its disks); the record is kept as
/// `destroyed`. The VM must carry this node's tag. `confirmName` must be the node's name.
#[utoipa::path(post, path = "/api/nodes/{id}/destroy", tag = "nodes", params(("id" = String, Path)),
    request_body = DestroyRequest,
    responses((status = 202, body = NodeWithCommand), (status = 400, description = "confirmation_mismatch", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "invalid_state, node_busy, vm_untagged, capability_missing", body = ErrorBody)))]
pub async fn destroy(
    State(s): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    Json(b): Json<DestroyRequest>,
) -> ApiResult<Response> {
    let id: NodeId = parse_id(&id, "node")?;
    let (node, c) =
        domain::nodes::destroy(&s.db, &s.broker, &admin.name, id, &b.confirm_name).await?;
    Ok(accepted(&node, c.id))
}

/// Forget the node: drop its record and keep its VM in Proxmox, untracked.
#[utoipa::path(post, path = "/api/nodes/{id}/forget", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, description = "The forgotten record", body = Node), (status = 404, body = ErrorBody),
        (status = 409, description = "node_busy", body = ErrorBody)))]
pub async fn forget(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id: NodeId = parse_id(&id, "node")?;
    let n = domain::nodes::forget(&s.db, id).await?;
    let note = AuditNote::target(n.id, n.name.clone()).with_details(serde_json::json!({
        "vmId": n.vm_id,
    }));
    Ok(note.on(Json(Node::from(&n)).into_response()))
}

/// `202` with the node and its command, noted for the audit log.
fn accepted(node: &crate::db::NodeRow, command: crate::model::CommandId) -> Response {
    AuditNote::target(node.id, node.name.clone())
        .with_details(serde_json::json!({ "commandId": command }))
        .on((
            StatusCode::ACCEPTED,
            Json(NodeWithCommand {
                node: Node::from(node),
                command_id: Some(command),
            }),
        )
            .into_response())
}
