//! Many nodes at once: a bulk provision (`POST /api/nodes/batches`, followed with
//! `GET /api/nodes?batchId=…`) and a bulk action on chosen nodes (`POST /api/nodes/bulk`:
//! power, destroy, or retry of failed provisions) answering with one result per node.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::audit::AuditNote;
use super::auth::Admin;
use super::types::{
    BatchMember, BatchStarted, BulkActionRequest, BulkActionResults, BulkNodeAction,
    BulkNodeResult, BulkProvisionRequest, ErrorBody, ErrorDetail,
};
use super::{ApiResult, AppState, Json};
use crate::domain::node_batches::{self, BulkAction, BulkProvision};
use crate::domain::DomainError;

/// Create `count` nodes named from `namePattern` and start provisioning them all on one
/// hypervisor, stored in one transaction. The hypervisor's `maxConcurrency` bounds how
/// many run at a time; the rest wait `queued`.
#[utoipa::path(post, path = "/api/nodes/batches", tag = "nodes", request_body = BulkProvisionRequest,
    responses((status = 202, body = BatchStarted),
        (status = 400, description = "invalid_params (count, namePattern, size), template_not_mapped", body = ErrorBody),
        (status = 404, description = "Unknown template or hypervisor", body = ErrorBody),
        (status = 409, description = "duplicate_name, agent_offline, capability_missing", body = ErrorBody)))]
pub async fn create_batch(
    State(s): State<AppState>,
    admin: Admin,
    Json(b): Json<BulkProvisionRequest>,
) -> ApiResult<Response> {
    let started = node_batches::bulk_provision(
        &s.db,
        &s.broker,
        &admin.name,
        BulkProvision {
            count: b.count,
            name_pattern: b.name_pattern,
            template_id: b.template_id,
            memory: b.memory,
            cores: b.cores,
            application: b.application,
            provision: super::nodes::provision_of(b.provision),
        },
    )
    .await?;
    let body = BatchStarted {
        batch_id: started.batch_id,
        nodes: started
            .nodes
            .into_iter()
            .map(|m| BatchMember {
                node_id: m.node_id,
                name: m.name,
                command_id: m.command_id,
            })
            .collect(),
    };
    let pattern = body
        .nodes
        .first()
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let note = AuditNote::target(&body.batch_id, pattern).with_details(serde_json::json!({
        "count": body.nodes.len(),
        "nodes": body.nodes,
    }));
    Ok(note.on((StatusCode::ACCEPTED, Json(body)).into_response()))
}

/// Run one action on many nodes: `start`, `shutdown`, `stop`, `reboot`, `destroy` (each
/// node's name must be in `confirmNames`) or `retry` (provision a node whose provision
/// failed again). Answers 200 with one result per node — a command id or an error — so
/// one node's refusal does not fail the others.
#[utoipa::path(post, path = "/api/nodes/bulk", tag = "nodes", request_body = BulkActionRequest,
    responses((status = 200, body = BulkActionResults),
        (status = 400, description = "invalid_params (no nodes, or more than 200)", body = ErrorBody)))]
pub async fn bulk_action(
    State(s): State<AppState>,
    admin: Admin,
    Json(b): Json<BulkActionRequest>,
) -> ApiResult<Response> {
    use trellis_protocol::PowerAction as P;
    let action = match b.action {
        BulkNodeAction::Start => BulkAction::Power(P::Start),
        BulkNodeAction::Shutdown => BulkAction::Power(P::Shutdown),
        BulkNodeAction::Stop => BulkAction::Power(P::Stop),
        BulkNodeAction::Reboot => BulkAction::Power(P::Reboot),
        BulkNodeAction::Destroy => BulkAction::Destroy,
        BulkNodeAction::Retry => BulkAction::Retry,
    };
    let outcomes = node_batches::bulk_action(
        &s.db,
        &s.broker,
        &admin.name,
        &b.node_ids,
        action,
        &b.confirm_names,
    )
    .await?;
    let results: Vec<BulkNodeResult> = outcomes
        .into_iter()
        .map(|o| {
            let (command_id, error) = match o.result {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(error_detail(e))),
            };
            BulkNodeResult {
                node_id: o.node_id,
                name: o.name,
                command_id,
                error,
            }
        })
        .collect();
    let succeeded = results.iter().filter(|r| r.command_id.is_some()).count();
    // The audit row lists every node's outcome (ids, names, command or error code); its
    // outcome is `partial` when some nodes were refused, `error` when all were.
    let outcome = super::audit::parts_outcome(succeeded, results.len() - succeeded);
    let note = AuditNote::default()
        .with_outcome(outcome)
        .with_details(serde_json::json!({
            "action": b.action,
            "results": results
                .iter()
                .map(|r| serde_json::json!({
                    "nodeId": r.node_id,
                    "name": r.name,
                    "commandId": r.command_id,
                    "error": r.error.as_ref().map(|e| &e.code),
                }))
                .collect::<Vec<_>>(),
        }));
    Ok(note.on(Json(BulkActionResults {
        failed: results.len() - succeeded,
        succeeded,
        results,
    })
    .into_response()))
}

/// The code and safe message a refused node gets (the codes a single-node request would
/// answer with); a storage error is logged and shown as `internal`.
fn error_detail(e: DomainError) -> ErrorDetail {
    let (code, message) = match e {
        DomainError::NotFound(m) => ("not_found", m),
        DomainError::Invalid { code, message }
        | DomainError::Conflict { code, message }
        | DomainError::Upstream { code, message } => (code, message),
        DomainError::Timeout(m) => ("agent_timeout", m),
        DomainError::Storage(e) => {
            tracing::error!(error = ?e, "bulk node action");
            ("internal", "internal error".to_string())
        }
    };
    ErrorDetail {
        code: code.to_string(),
        message,
    }
}
