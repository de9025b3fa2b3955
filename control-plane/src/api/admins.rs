//! Named admins over the API (the CLI does the same: `trellis admins create|list|revoke`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::audit::AuditNote;
use super::types::{AdminCreated, AdminInfo, AdminList, CreateAdminRequest, ErrorBody};
use super::{ApiResult, AppState, Json};
use crate::domain::admins;

#[utoipa::path(get, path = "/api/admins", tag = "admins", responses((status = 200, body = AdminList)))]
pub async fn list(State(s): State<AppState>) -> ApiResult<Json<AdminList>> {
    let items =
        s.db.list_admins()
            .await?
            .iter()
            .map(AdminInfo::from)
            .collect();
    Ok(Json(AdminList { items }))
}

/// Create a named admin; its token is in this answer only (only its hash is stored).
#[utoipa::path(post, path = "/api/admins", tag = "admins", request_body = CreateAdminRequest,
    responses((status = 201, body = AdminCreated), (status = 400, body = ErrorBody),
        (status = 409, description = "name_taken", body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    Json(b): Json<CreateAdminRequest>,
) -> ApiResult<Response> {
    let (a, token) = admins::create(&s.db, &b.name).await?;
    let resp = (
        StatusCode::CREATED,
        Json(AdminCreated {
            admin: AdminInfo::from(&a),
            token,
        }),
    )
        .into_response();
    Ok(AuditNote::target(&a.name, a.name.clone()).on(resp))
}

/// Revoke a named admin: its token stops working and its sessions end.
#[utoipa::path(delete, path = "/api/admins/{name}", tag = "admins", params(("name" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    admins::revoke(&s.db, &name).await?;
    Ok(AuditNote::target(&name, name.clone()).on(StatusCode::NO_CONTENT.into_response()))
}
