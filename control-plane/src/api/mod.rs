//! The HTTP API: routes, admin authentication, the JSON error format and shared helpers.

pub mod agents;
pub mod commands;
pub mod nodes;
pub mod templates;
mod ui;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use trellis_protocol::{Event, EventBody};

use crate::broker::Broker;
use crate::db::DbError;

#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub admin_token_hash: Arc<str>,
    pub ui_dir: Option<PathBuf>,
}

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/api/agents", get(agents::list).post(agents::create))
        .route("/api/agents/{id}", get(agents::get).delete(agents::revoke))
        .route("/api/agents/{id}/rotate-token", post(agents::rotate))
        .route("/api/agents/{id}/templates", get(agents::templates))
        .route("/api/commands", get(commands::list).post(commands::create))
        .route("/api/commands/{id}", get(commands::get))
        .route("/api/commands/{id}/events", get(commands::events))
        .route("/api/commands/{id}/logs", get(commands::logs))
        .route("/api/commands/{id}/cancel", post(commands::cancel))
        .route("/api/commands/{id}/retry", post(commands::retry))
        .route(
            "/api/templates",
            get(templates::list).post(templates::create),
        )
        .route(
            "/api/templates/{id}",
            get(templates::get)
                .put(templates::update)
                .delete(templates::delete),
        )
        .route("/api/nodes", get(nodes::list).post(nodes::create))
        .route(
            "/api/nodes/{id}",
            get(nodes::get).put(nodes::update).delete(nodes::delete),
        )
        .route("/api/nodes/{id}/provision", post(nodes::provision))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/api/agents/connect", get(agents::connect))
        .merge(admin)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api", get(api_not_found))
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .fallback(ui::serve)
        .with_state(state)
}

async fn api_not_found() -> AppError {
    AppError::NotFound("no such API endpoint".into())
}

async fn readyz(State(s): State<AppState>) -> Result<&'static str, AppError> {
    s.broker.db.ping().await?;
    Ok("ready")
}

async fn metrics(State(s): State<AppState>) -> Result<Response, AppError> {
    let by_status = s.broker.db.count_by_status().await?;
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        s.broker.metrics.render(&by_status),
    )
        .into_response())
}

/// Admin bearer token on every UI/admin route. `?access_token=` is accepted on the SSE
/// endpoint only, because `EventSource` cannot set headers.
async fn require_admin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let header = crate::auth::bearer(req.headers().get("authorization")).map(str::to_string);
    let token = header.or_else(|| {
        if req.uri().path().ends_with("/events") {
            req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("access_token="))
                    .map(|t| t.to_string())
            })
        } else {
            None
        }
    });
    match token {
        Some(t) if crate::auth::verify(&t, &s.admin_token_hash) => next.run(req).await,
        Some(_) => AppError::Unauthorized("the admin token is not valid".into()).into_response(),
        None => AppError::Unauthorized(
            "missing admin token: send Authorization: Bearer <admin token>".into(),
        )
        .into_response(),
    }
}

/// The one error type of the HTTP layer. It logs the real cause of internal errors and
/// answers with a stable code and a safe message — never SQL text.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{1}")]
    Invalid(&'static str, String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("{1}")]
    Upstream(&'static str, String),
    #[error("{0}")]
    Timeout(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound => Self::NotFound("not found".into()),
            DbError::Conflict(m) => Self::Conflict("conflict", m),
            other => Self::Internal(other.into()),
        }
    }
}

impl From<trellis_protocol::CommandError> for AppError {
    fn from(e: trellis_protocol::CommandError) -> Self {
        let code = match e.code.as_str() {
            "unsupported_command" => "unsupported_command",
            _ => "invalid_params",
        };
        Self::Invalid(code, e.message)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Invalid(c, _) => (StatusCode::BAD_REQUEST, *c),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(c, _) => (StatusCode::CONFLICT, *c),
            Self::Upstream(c, _) => (StatusCode::BAD_GATEWAY, *c),
            Self::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "agent_timeout"),
            Self::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let body = serde_json::json!({"error": {"code": code, "message": self.to_string()}});
        (status, axum::Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, AppError>;

/// `axum::Json` with our error format for bad bodies.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rej) => Err(AppError::BadRequest(format!(
                "invalid JSON body: {}",
                rej.body_text()
            ))),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Parses a path id, answering 404 (not 400 or 500) for something that is not a UUID.
pub fn parse_id(s: &str, what: &str) -> ApiResult<uuid::Uuid> {
    s.parse()
        .map_err(|_| AppError::NotFound(format!("{what} {s:?} not found")))
}

/// The SSE form of an event: its name and JSON data.
pub fn sse_json(e: &Event) -> (&'static str, String) {
    let kind = match &e.body {
        EventBody::Log { .. } => "log",
        EventBody::Stage { .. } => "stage",
        EventBody::Progress { .. } => "progress",
        EventBody::Finished(_) => "finished",
    };
    let mut v = serde_json::to_value(&e.body).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("seq".into(), e.seq.into());
        o.insert("ts".into(), e.ts.into());
    }
    (kind, v.to_string())
}
