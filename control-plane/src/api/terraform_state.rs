//! Terraform state over HTTP: Terraform's `http` backend protocol at
//! `/api/terraform/state/{workspace}` (`GET`, `POST`, and the custom methods `LOCK` and
//! `UNLOCK` Terraform 1.0.3 uses by default), and the admin's read-only views of the
//! workspaces and their versions. See `docs/api.md` "Terraform state".
//!
//! Authentication is not `require_admin`'s: Terraform sends HTTP Basic with the user name
//! = a `terraform_apply`'s command id and the password = that command's state credential
//! (`dispatch.terraform_state`). An admin bearer token may `GET` a state; the session
//! cookie is not taken here at all (nothing in a browser needs these endpoints, and a
//! cookie would make `POST`/`LOCK` cross-site-forgeable).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::types::ErrorBody;
use super::{AppError, AppState, Json, Query};
use crate::domain::terraform_state::{self as tfstate, StateCaller, StateError};
use crate::time::rfc3339;

/// Largest state a `POST` may carry.
pub const MAX_STATE_BYTES: usize = 32 * 1024 * 1024;

/// `?ID=<lock id>` of a state write (Terraform sends it while it holds the lock).
#[derive(Debug, Deserialize, IntoParams)]
pub struct LockQuery {
    /// The lock id Terraform holds (`LOCK`'s `ID`).
    #[serde(rename = "ID")]
    #[param(rename = "ID")]
    pub id: Option<String>,
}

/// A workspace whose state trellis keeps.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TerraformWorkspace {
    /// The workspace name: a `terraform_apply`'s `workspace_key`, else `<repo>#<path>`.
    pub workspace: String,
    /// Stored versions (the newest 100 are kept).
    pub versions: i64,
    /// The newest version's number (0: none stored yet).
    pub latest_version: i64,
    /// RFC 3339: when the newest version was stored (or the lock taken, with none).
    pub updated_at: String,
    /// The command holding the lock, if a live one does.
    pub locked_by: Option<crate::model::CommandId>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TerraformWorkspaceList {
    pub items: Vec<TerraformWorkspace>,
}

/// One stored version of a workspace's state (the state itself: `GET` on the workspace).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TerraformStateVersion {
    /// 1 for the first state stored, one more per write.
    pub version: i64,
    /// The `terraform_apply` that wrote it.
    pub command_id: Option<crate::model::CommandId>,
    /// Terraform's `serial`.
    pub serial: Option<i64>,
    /// Terraform's `lineage`.
    pub lineage: Option<String>,
    pub size_bytes: i64,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TerraformStateVersionList {
    /// Newest first.
    pub items: Vec<TerraformStateVersion>,
}

/// Who calls a state endpoint.
enum Caller {
    Command(StateCaller),
    Admin,
}

fn state_error(e: StateError) -> Response {
    let lock_info = |status: StatusCode, info: String| {
        (status, [(header::CONTENT_TYPE, "application/json")], info).into_response()
    };
    match e {
        StateError::Unauthorized(m) => {
            let mut r = AppError::Unauthorized(m).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"trellis-terraform-state\""),
            );
            r
        }
        StateError::Forbidden(m) => {
            let body = ErrorBody {
                error: super::types::ErrorDetail {
                    code: "forbidden".into(),
                    message: m,
                },
            };
            (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
        }
        StateError::Locked(info) => lock_info(StatusCode::LOCKED, info),
        StateError::Conflict(info) => lock_info(StatusCode::CONFLICT, info),
        StateError::Invalid(m) => AppError::Invalid("invalid_state", m).into_response(),
        StateError::NotFound(m) => AppError::NotFound(m).into_response(),
        StateError::Storage(e) => AppError::from(e).into_response(),
        e @ StateError::Undecryptable(_) => AppError::Internal(e.into()).into_response(),
    }
}

/// `Authorization: Basic base64(user:password)`.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, data) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

/// Resolves the caller; admins only with `allow_admin` (reads).
async fn caller(
    s: &AppState,
    headers: &HeaderMap,
    ext: &axum::http::Extensions,
    workspace: &str,
    allow_admin: bool,
) -> Result<Caller, Response> {
    let ip = super::auth::remote_ip(ext);
    if s.auth.limiter.blocked(ip) {
        return Err(AppError::Unauthorized(
            "too many failed authentications from this address; wait a minute".into(),
        )
        .into_response());
    }
    let result = if let Some((user, pass)) = basic(headers) {
        tfstate::authenticate(&s.db, &user, &pass, workspace)
            .await
            .map(Caller::Command)
    } else if let Some(token) = crate::auth::bearer(headers.get(header::AUTHORIZATION)) {
        match crate::domain::admins::authenticate(&s.db, &s.admin_token_hash, token).await {
            Ok(Some(_)) if allow_admin => Ok(Caller::Admin),
            Ok(Some(_)) => Err(StateError::Forbidden(
                "admins may only read Terraform state; writes and locks take the command's \
                 state credential"
                    .into(),
            )),
            Ok(None) => Err(StateError::Unauthorized(
                "the admin token is not valid".into(),
            )),
            Err(e) => return Err(AppError::from(e).into_response()),
        }
    } else {
        Err(StateError::Unauthorized(
            "send HTTP Basic with a terraform_apply's command id and state credential \
             (or, to read, Authorization: Bearer <admin token>)"
                .into(),
        ))
    };
    result.map_err(|e| {
        if matches!(e, StateError::Unauthorized(_)) {
            s.auth.limiter.fail(ip);
        }
        state_error(e)
    })
}

/// The `http` backend's endpoint: `GET`, `POST`, `LOCK`, `UNLOCK` (other methods: 405).
pub async fn state(
    State(s): State<AppState>,
    method: Method,
    Path(workspace): Path<String>,
    Query(q): Query<LockQuery>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(e) = tfstate::check_workspace(&workspace) {
        return state_error(e);
    }
    let allowed = ["GET", "POST", "LOCK", "UNLOCK"];
    if !allowed.contains(&method.as_str()) {
        let body = ErrorBody {
            error: super::types::ErrorDetail {
                code: "method_not_allowed".into(),
                message: format!(
                    "{method} is not a Terraform state method (GET, POST, LOCK, UNLOCK)"
                ),
            },
        };
        let mut r = (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response();
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, POST, LOCK, UNLOCK"),
        );
        return r;
    }
    let who = match caller(
        &s,
        &parts.headers,
        &parts.extensions,
        &workspace,
        method == Method::GET,
    )
    .await
    {
        Ok(c) => c,
        Err(r) => return r,
    };
    if method == Method::GET {
        return get_state(&s, &workspace).await;
    }
    let Caller::Command(c) = who else {
        return state_error(StateError::Forbidden(
            "admins may only read Terraform state".into(),
        ));
    };
    let body = match axum::body::to_bytes(body, MAX_STATE_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return AppError::Invalid(
                "state_too_large",
                format!("the body is larger than {MAX_STATE_BYTES} bytes (or was cut off)"),
            )
            .into_response()
        }
    };
    match method.as_str() {
        "POST" => post_state(&s, c, &workspace, q.id.as_deref(), body).await,
        "LOCK" => match tfstate::lock(&s.db, c, &workspace, &body).await {
            Ok(()) => StatusCode::OK.into_response(),
            Err(e) => state_error(e),
        },
        _ => match tfstate::unlock(&s.db, c, &workspace, &body).await {
            Ok(()) => StatusCode::OK.into_response(),
            Err(e) => state_error(e),
        },
    }
}

/// Read a workspace's latest Terraform state (the `http` backend's `GET`).
#[utoipa::path(get, path = "/api/terraform/state/{workspace}", tag = "terraform", operation_id = "get_state",
    params(("workspace" = String, Path, description = "The workspace name (percent-encoded)")),
    security(("terraform_state" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "The latest state (Terraform's JSON, as stored)", body = Object),
        (status = 204, description = "No state stored yet"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "Not a workspace name", body = ErrorBody)))]
pub async fn get_state_doc() {}

async fn get_state(s: &AppState, workspace: &str) -> Response {
    match tfstate::get(&s.db, workspace).await {
        Ok(Some((version, state))) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::HeaderName::from_static("x-trellis-state-version"),
                    HeaderValue::from(version),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            state,
        )
            .into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => state_error(e),
    }
}

/// Store a new version of a workspace's Terraform state (the `http` backend's `POST`;
/// the command's state credential only).
#[utoipa::path(post, path = "/api/terraform/state/{workspace}", tag = "terraform", operation_id = "post_state",
    params(("workspace" = String, Path, description = "The workspace name (percent-encoded)"), LockQuery),
    request_body(content = Object, description = "The Terraform state (JSON)"),
    security(("terraform_state" = [])),
    responses(
        (status = 200, description = "Stored"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "Not a workspace name", body = ErrorBody),
        (status = 423, description = "Locked by another command: its lock info", body = Object)))]
pub async fn post_state_doc() {}

async fn post_state(
    s: &AppState,
    c: StateCaller,
    workspace: &str,
    lock_id: Option<&str>,
    body: Bytes,
) -> Response {
    match tfstate::put(&s.db, c, workspace, lock_id, &body).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => state_error(e),
    }
}

/// Workspaces whose Terraform state trellis keeps, with their version count and last update.
#[utoipa::path(get, path = "/api/terraform/workspaces", tag = "terraform",
    responses((status = 200, body = TerraformWorkspaceList)))]
pub async fn workspaces(
    State(s): State<AppState>,
) -> Result<Json<TerraformWorkspaceList>, Response> {
    let rows = tfstate::workspaces(&s.db).await.map_err(state_error)?;
    Ok(Json(TerraformWorkspaceList {
        items: rows
            .into_iter()
            .map(|w| TerraformWorkspace {
                locked_by: w.lock.filter(|l| l.live).map(|l| l.command_id),
                workspace: w.workspace,
                versions: w.versions,
                latest_version: w.latest_version,
                updated_at: rfc3339(w.updated_at),
            })
            .collect(),
    }))
}

/// The stored versions of a workspace's Terraform state, newest first.
#[utoipa::path(get, path = "/api/terraform/state/{workspace}/versions", tag = "terraform",
    params(("workspace" = String, Path, description = "The workspace name (percent-encoded)")),
    responses((status = 200, body = TerraformStateVersionList),
        (status = 404, description = "No state stored for the workspace", body = ErrorBody)))]
pub async fn versions(
    State(s): State<AppState>,
    Path(workspace): Path<String>,
) -> Result<Json<TerraformStateVersionList>, Response> {
    let rows = tfstate::versions(&s.db, &workspace)
        .await
        .map_err(state_error)?;
    Ok(Json(TerraformStateVersionList {
        items: rows
            .into_iter()
            .map(|v| TerraformStateVersion {
                version: v.version,
                command_id: v.command_id,
                serial: v.serial,
                lineage: v.lineage,
                size_bytes: v.size_bytes,
                created_at: rfc3339(v.created_at),
            })
            .collect(),
    }))
}
