//! The HTTP API: routes, admin authentication, the JSON error format, and the mapping of
//! domain errors to status codes. Handlers parse and check the request's shape, call the
//! domain layer, and answer with the typed bodies of [`types`]; the OpenAPI document is
//! generated from those ([`openapi`]).

pub mod admins;
pub mod agents;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod commands;
pub mod install;
pub mod node_batches;
pub mod nodes;
pub mod openapi;
pub mod redact;
pub mod security_headers;
pub mod templates;
pub mod terraform_state;
pub mod types;
mod ui;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::Serialize;

use crate::broker::fanout::Fanout;
use crate::broker::Broker;
use crate::db::sql::{storage_trouble, StorageTrouble};
use crate::db::{Db, DbError};
use crate::domain::DomainError;
use crate::metrics::Metrics;

/// What handlers share, split by concern.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub broker: Arc<Broker>,
    pub fanout: Arc<Fanout>,
    pub metrics: Arc<Metrics>,
    pub admin_token_hash: Arc<str>,
    /// Session cookie settings and the failed-authentication limiter.
    pub auth: Arc<auth::AuthState>,
    /// Group commit of audit rows.
    pub audit: audit::AuditWriter,
    pub ui_dir: Option<PathBuf>,
    /// Where request-spawned tasks (SSE streams) run, so shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// The tendril binary `GET /install/tendril` hands out (`--agent-binary`).
    pub agent_binary: Option<PathBuf>,
    /// `--public-url`, for the install one-liner.
    pub public_url: Option<String>,
}

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/api/agents", get(agents::list).post(agents::create))
        .route("/api/agents/install", get(agents::install_info))
        .route("/api/cluster/replicas", get(cluster::replicas))
        .route(
            "/api/agents/{id}",
            get(agents::get)
                .patch(agents::update)
                .delete(agents::revoke),
        )
        .route("/api/agents/{id}/rotate-token", post(agents::rotate))
        .route("/api/agents/{id}/templates", get(agents::templates))
        .route("/api/agents/{id}/vms", get(agents::vms))
        .route("/api/commands", get(commands::list).post(commands::create))
        .route("/api/commands/{id}", get(commands::get))
        .route("/api/commands/{id}/events", get(commands::events))
        .route("/api/commands/{id}/logs", get(commands::logs))
        .route("/api/commands/{id}/cancel", post(commands::cancel))
        .route("/api/commands/{id}/retry", post(commands::retry))
        .route(
            "/api/commands/{id}/pin",
            put(commands::pin).delete(commands::unpin),
        )
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
        .route("/api/nodes/batches", post(node_batches::create_batch))
        .route("/api/nodes/bulk", post(node_batches::bulk_action))
        .route("/api/nodes/import", post(nodes::import))
        .route(
            "/api/nodes/{id}",
            get(nodes::get).put(nodes::update).delete(nodes::delete),
        )
        .route("/api/nodes/{id}/provision", post(nodes::provision))
        .route("/api/nodes/{id}/power", post(nodes::power))
        .route("/api/nodes/{id}/destroy", post(nodes::destroy))
        .route("/api/nodes/{id}/forget", post(nodes::forget))
        .route("/api/admins", get(admins::list).post(admins::create))
        .route("/api/admins/{name}", axum::routing::delete(admins::revoke))
        .route("/api/audit", get(audit::list))
        .route(
            "/api/terraform/workspaces",
            get(terraform_state::workspaces),
        )
        .route(
            "/api/terraform/state/{workspace}/versions",
            get(terraform_state::versions),
        )
        .route("/api/session", get(auth::who))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    Router::new()
        .route("/api/agents/connect", get(agents::connect))
        .merge(install::routes())
        // Its own authentication (a command's state credential); see `terraform_state`.
        .route(
            "/api/terraform/state/{workspace}",
            axum::routing::any(terraform_state::state),
        )
        .merge(admin)
        .route(
            "/api/session",
            post(auth::sign_in).delete(auth::sign_out),
        )
        .route("/api/openapi.json", get(openapi::serve))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api", get(api_not_found))
        .route("/api/{*rest}", axum::routing::any(api_not_found))
        .fallback(ui::serve)
        .layer(middleware::map_response(security_headers::add))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                // The path only: queries are never logged.
                .make_span_with(|req: &Request| {
                    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG),
                ),
        )
        .with_state(state)
}

async fn api_not_found() -> AppError {
    AppError::NotFound("no such API endpoint".into())
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// How long readiness waits for the database. Shorter than the pool's acquire timeout:
/// a probe must say "not ready" while the database is down, not wait for it to return.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness: the database answers within 2 s (`READY_TIMEOUT`).
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "The database does not answer, or this replica is draining", body = types::ErrorBody)))]
pub async fn readyz(State(s): State<AppState>) -> Result<&'static str, AppError> {
    // A draining replica tells the load balancer to send agents and users elsewhere.
    if s.broker.replica.is_draining() {
        return Err(AppError::Unavailable(
            "draining",
            "this replica is stopping; its agents are moving to the other replicas".into(),
        ));
    }
    match tokio::time::timeout(READY_TIMEOUT, s.db.ping()).await {
        Ok(Ok(())) => Ok("ready"),
        Ok(Err(e)) => match AppError::from(e) {
            // Whatever the cause, the database does not answer: not ready.
            AppError::Internal(e) => {
                tracing::warn!(error = ?e, "readiness: the database failed");
                Err(AppError::Storage(
                    StorageTrouble::Unavailable,
                    "the database is unavailable".into(),
                ))
            }
            other => Err(other),
        },
        Err(_) => Err(AppError::Storage(
            StorageTrouble::Unavailable,
            format!(
                "the database did not answer within {} s",
                READY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "health", security(()),
    responses((status = 200, description = "Metrics (OpenMetrics text)", body = String,
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
pub async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(&s.db).await,
    )
        .into_response()
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
    /// 503 with its own code (`draining`): this replica cannot serve it now, another can.
    #[error("{1}")]
    Unavailable(&'static str, String),
    /// The database is unreachable or cannot grow (503 `database_unavailable`, 507
    /// `database_full`): the request may work later, and the client should know it is not
    /// its fault. The cause is logged where the error is made.
    #[error("{1}")]
    Storage(StorageTrouble, String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound => Self::NotFound("not found".into()),
            DbError::Conflict(m) => Self::Conflict("conflict", m),
            DbError::NameTaken(m) => Self::Conflict("duplicate_name", m),
            other => match storage_trouble(&other) {
                Some(t) => {
                    tracing::warn!(error = %other, "database trouble; answering 503/507");
                    let msg = match t {
                        StorageTrouble::Full => {
                            "the database is full: nothing new can be stored until it has space again"
                        }
                        StorageTrouble::Unavailable => {
                            "the database is unavailable; try again shortly"
                        }
                    };
                    Self::Storage(t, msg.into())
                }
                None => Self::Internal(other.into()),
            },
        }
    }
}

impl From<DomainError> for AppError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::NotFound(m) => Self::NotFound(m),
            DomainError::Invalid { code, message } => Self::Invalid(code, message),
            DomainError::Conflict { code, message } => Self::Conflict(code, message),
            DomainError::Upstream { code, message } => Self::Upstream(code, message),
            DomainError::Timeout(m) => Self::Timeout(m),
            DomainError::Storage(e) => e.into(),
        }
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
            Self::Unavailable(c, _) => (StatusCode::SERVICE_UNAVAILABLE, *c),
            Self::Storage(StorageTrouble::Full, _) => {
                (StatusCode::INSUFFICIENT_STORAGE, "database_full")
            }
            Self::Storage(StorageTrouble::Unavailable, _) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Self::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let body = types::ErrorBody {
            error: types::ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.extensions_mut()
            .insert(audit::ErrorCode(code.to_string()));
        resp
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

/// `Query` with our error format for bad query strings.
pub struct Query<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(rej) => Err(AppError::BadRequest(format!(
                "invalid query string: {}",
                rej.body_text()
            ))),
        }
    }
}

/// Parses a path id, answering 404 (not 400 or 500) for something that is not an id.
pub fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> ApiResult<T> {
    s.parse()
        .map_err(|_| AppError::NotFound(format!("{what} {s:?} not found")))
}
