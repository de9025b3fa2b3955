//! Trellis templates: what the UI offers, mapped to a Proxmox template VMID.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::types::{ErrorBody, Template, TemplateList, TemplateRequest};
use super::{parse_id, ApiResult, AppState, Json};
use crate::domain;
use crate::model::TemplateId;

#[utoipa::path(get, path = "/api/templates", tag = "templates", responses((status = 200, body = TemplateList)))]
pub async fn list(State(s): State<AppState>) -> ApiResult<Json<TemplateList>> {
    let items =
        s.db.list_templates()
            .await?
            .iter()
            .map(Template::from)
            .collect();
    Ok(Json(TemplateList { items }))
}

#[utoipa::path(get, path = "/api/templates/{id}", tag = "templates", params(("id" = String, Path)),
    responses((status = 200, body = Template), (status = 404, body = ErrorBody)))]
pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Template>> {
    let id: TemplateId = parse_id(&id, "template")?;
    Ok(Json(Template::from(
        &domain::templates::get(&s.db, id).await?,
    )))
}

#[utoipa::path(post, path = "/api/templates", tag = "templates", request_body = TemplateRequest,
    responses((status = 201, body = Template), (status = 400, body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    Json(b): Json<TemplateRequest>,
) -> ApiResult<Response> {
    let t = domain::templates::create(&s.db, b.into()).await?;
    let note = super::audit::AuditNote::target(t.id, t.fields.name.clone());
    Ok(note.on((StatusCode::CREATED, Json(Template::from(&t))).into_response()))
}

#[utoipa::path(put, path = "/api/templates/{id}", tag = "templates", params(("id" = String, Path)),
    request_body = TemplateRequest,
    responses((status = 200, body = Template), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Json(b): Json<TemplateRequest>,
) -> ApiResult<Json<Template>> {
    let id: TemplateId = parse_id(&id, "template")?;
    let t = domain::templates::update(&s.db, id, b.into()).await?;
    Ok(Json(Template::from(&t)))
}

/// Delete a template no node uses.
#[utoipa::path(delete, path = "/api/templates/{id}", tag = "templates", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "template_in_use", body = ErrorBody)))]
pub async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id: TemplateId = parse_id(&id, "template")?;
    // The name, read before it is gone, for the audit log.
    let name = domain::templates::get(&s.db, id).await?.fields.name;
    domain::templates::delete(&s.db, id).await?;
    Ok(super::audit::AuditNote::target(id, name).on(StatusCode::NO_CONTENT.into_response()))
}
