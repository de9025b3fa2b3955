//! The audit log. `require_admin` writes one row for every admin request that changes
//! something (any method but GET/HEAD), named by its route: `(method, matched path)` →
//! a stable dotted action (`node.power`, `command.cancel`, `agent.rotate_token`;
//! `DELETE` on a named sub-resource undoes its `PUT`: `command.pin`/`command.unpin`), the
//! target from the path's `{id}`, the outcome from the response status (and the error
//! code `AppError` leaves on the response). Handlers add what only they know (a created
//! target's id and name, the command started, per-node results of a bulk request) with
//! an [`AuditNote`] on the response. Request bodies are never stored: they may carry
//! secrets. Failed authentications and sign-ins are recorded by `auth`.

use std::net::IpAddr;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::response::Response;

use super::types::{AuditEntry, AuditList, AuditQuery, ErrorBody};
use super::{ApiResult, AppError, AppState, Json, Query};
use crate::db::sql::is_data_error;
use crate::db::{AuditFilter, AuditRow};
use crate::time::now_ms;

/// What a handler adds to its request's audit row.
#[derive(Debug, Clone, Default)]
pub struct AuditNote {
    pub target_id: Option<String>,
    pub target_name: Option<String>,
    pub details: Option<serde_json::Value>,
    /// Overrides the outcome the status gives: `partial` (some parts refused) or `error`
    /// (all refused) for a request answered `200` with per-part results.
    pub outcome: Option<&'static str>,
}

/// The outcome of a request made of parts (a bulk action): `success`, `partial` or `error`.
pub fn parts_outcome(succeeded: usize, failed: usize) -> &'static str {
    match (succeeded, failed) {
        (_, 0) => "success",
        (0, _) => "error",
        _ => "partial",
    }
}

impl AuditNote {
    pub fn target(id: impl ToString, name: impl Into<String>) -> Self {
        Self {
            target_id: Some(id.to_string()),
            target_name: Some(name.into()),
            details: None,
            outcome: None,
        }
    }

    pub fn with_outcome(mut self, outcome: &'static str) -> Self {
        self.outcome = Some(outcome);
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Attaches the note to a response.
    pub fn on(self, mut resp: Response) -> Response {
        resp.extensions_mut().insert(self);
        resp
    }
}

/// The stable error code of an error response (set by `AppError`).
#[derive(Debug, Clone)]
pub struct ErrorCode(pub String);

/// A request's action and target, from its route.
#[derive(Debug, Clone)]
pub struct Described {
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
}

/// `(method, route)` → action and target; `None` for reads (not audited).
pub fn describe(req: &Request) -> Option<Described> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())?;
    Some(describe_route(req.method(), &route, req.uri().path()))
}

fn singular(collection: &str) -> String {
    match collection {
        "nodes" => "node".into(),
        "agents" => "agent".into(),
        "commands" => "command".into(),
        "templates" => "template".into(),
        "admins" => "admin".into(),
        other => other.trim_end_matches('s').into(),
    }
}

pub fn describe_route(method: &Method, route: &str, path: &str) -> Described {
    let segs: Vec<&str> = route.trim_start_matches("/api/").split('/').collect();
    let actual: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    let ty = singular(segs.first().copied().unwrap_or("api"));
    let mut target_id = None;
    let mut verbs = Vec::new();
    for (i, seg) in segs.iter().enumerate().skip(1) {
        if seg.starts_with('{') {
            if target_id.is_none() {
                target_id = actual.get(i).map(|s| percent_decode(s));
            }
        } else {
            verbs.push(seg.replace('-', "_"));
        }
    }
    let verb = if verbs.is_empty() {
        match (method, target_id.is_some()) {
            (&Method::POST, false) => "create".to_string(),
            (&Method::DELETE, true) if ty == "agent" || ty == "admin" => "revoke".into(),
            (&Method::DELETE, _) => "delete".into(),
            (&Method::PUT | &Method::PATCH, _) => "update".into(),
            (m, _) => m.as_str().to_ascii_lowercase(),
        }
    } else {
        match (method, verbs.join(".").as_str()) {
            // Bulk endpoints: one row per request with per-node details.
            (_, "batches") => "bulk_provision".into(),
            (_, "bulk") => "bulk_action".into(),
            // A flag set with PUT and cleared with DELETE (`…/pin`): `pin` and `unpin`.
            (&Method::DELETE, v) => format!("un{v}"),
            (_, v) => v.to_string(),
        }
    };
    Described {
        action: format!("{ty}.{verb}"),
        target_type: Some(ty),
        target_id,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An audit row being built.
pub struct Audit(pub AuditRow);

impl std::ops::Deref for Audit {
    type Target = AuditRow;
    fn deref(&self) -> &AuditRow {
        &self.0
    }
}

impl std::ops::DerefMut for Audit {
    fn deref_mut(&mut self) -> &mut AuditRow {
        &mut self.0
    }
}

impl Audit {
    /// A row for `action` by `actor` with the outcome of `resp`.
    pub fn new(actor: &str, action: &str, resp: &Response, ip: Option<IpAddr>) -> Self {
        let status = resp.status();
        let ok = status.is_success() || status.is_redirection();
        Self(AuditRow {
            id: uuid::Uuid::new_v4().to_string(),
            at: now_ms(),
            actor: actor.into(),
            action: action.into(),
            outcome: if ok { "success" } else { "error" }.into(),
            status: i64::from(status.as_u16()),
            error_code: if ok {
                None
            } else {
                Some(
                    resp.extensions()
                        .get::<ErrorCode>()
                        .map(|c| c.0.clone())
                        .unwrap_or_else(|| {
                            status
                                .canonical_reason()
                                .unwrap_or("error")
                                .to_ascii_lowercase()
                                .replace(' ', "_")
                        }),
                )
            },
            remote_addr: ip.map(|i| i.to_string()),
            ..AuditRow::default()
        })
    }
}

/// Group commit for audit rows: every request's row goes through one task that stores
/// whatever has queued up in one transaction (SQLite commits with `synchronous=FULL`, so a
/// commit per request would cap admin requests at the disk's fsync rate). A request still
/// waits until its row is committed before it answers.
#[derive(Clone)]
pub struct AuditWriter {
    tx: tokio::sync::mpsc::Sender<(AuditRow, tokio::sync::oneshot::Sender<()>)>,
}

/// Rows stored per transaction at most.
const AUDIT_BATCH: usize = 512;

impl AuditWriter {
    /// Starts the writer on `tasks`; it ends once every `AuditWriter` clone is dropped.
    pub fn start(db: crate::db::Db, tasks: &tokio_util::task::TaskTracker) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4 * AUDIT_BATCH);
        tasks.spawn(async move {
            let mut queued = Vec::with_capacity(AUDIT_BATCH);
            while rx.recv_many(&mut queued, AUDIT_BATCH).await > 0 {
                let (rows, acks): (Vec<AuditRow>, Vec<tokio::sync::oneshot::Sender<()>>) =
                    queued.drain(..).unzip();
                match db.insert_audit_batch(&rows).await {
                    Ok(()) => {}
                    Err(e) if is_data_error(&e) => {
                        // One bad row must not cost the others theirs: store them one by one.
                        tracing::warn!(error = %e, rows = rows.len(), "audit batch failed; storing its rows one by one");
                        for a in &rows {
                            if let Err(e) = db.insert_audit(a).await {
                                tracing::error!(error = %e, action = %a.action, "cannot write the audit log");
                            }
                        }
                    }
                    Err(e) => {
                        // The database is down or full: row by row would fail the same way,
                        // an acquire timeout each, while every audited request waits.
                        tracing::error!(error = %e, rows = rows.len(), "cannot write the audit log");
                    }
                }
                for ack in acks {
                    let _ = ack.send(());
                }
            }
        });
        Self { tx }
    }
}

/// Stores a row and waits for its commit; a failure is logged, never turned into the
/// request's failure (the action it records has happened).
///
/// A request refused because the database is unavailable or full is not held for its
/// row: the row cannot be stored before the database is back either, and waiting would
/// keep the answer for another acquire timeout. It is queued all the same.
pub async fn record(s: &AppState, a: Audit) {
    let wait = !matches!(
        a.error_code.as_deref(),
        Some("database_unavailable" | "database_full")
    );
    let (done, stored) = tokio::sync::oneshot::channel();
    if s.audit.tx.send((a.0, done)).await.is_err() {
        tracing::error!("cannot write the audit log: its writer has stopped");
        return;
    }
    if wait {
        let _ = stored.await;
    }
}

/// The row of an audited admin request, from its route and response.
pub fn row_for(actor: &str, what: Described, ip: Option<IpAddr>, resp: &Response) -> Audit {
    let mut a = Audit::new(actor, &what.action, resp, ip);
    a.target_type = what.target_type;
    a.target_id = what.target_id;
    if let Some(n) = resp.extensions().get::<AuditNote>() {
        if n.target_id.is_some() {
            a.target_id = n.target_id.clone();
        }
        a.target_name = n.target_name.clone();
        a.details = n.details.clone();
        if let Some(o) = n.outcome {
            a.outcome = o.into();
        }
    }
    a
}

/// Parses `nextBefore` (`"<at ms>.<id>"`) or a bare Unix-milliseconds timestamp.
fn parse_before(raw: &str) -> Option<(i64, Option<String>)> {
    match raw.split_once('.') {
        Some((at, id)) if !id.is_empty() => Some((at.parse().ok()?, Some(id.to_string()))),
        Some(_) => None,
        None => Some((raw.parse().ok()?, None)),
    }
}

/// The audit log, newest first; keyset-paged (pass `nextBefore` back as `before`).
#[utoipa::path(get, path = "/api/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(AppError::BadRequest("limit must be 1–500".into()));
    }
    let before = match q.before.as_deref().filter(|b| !b.is_empty()) {
        Some(b) => Some(parse_before(b).ok_or_else(|| {
            AppError::BadRequest("before must be a nextBefore cursor or Unix milliseconds".into())
        })?),
        None => None,
    };
    let outcome = q.outcome.filter(|o| !o.is_empty());
    if let Some(o) = &outcome {
        if !matches!(o.as_str(), "success" | "partial" | "error") {
            return Err(AppError::BadRequest(
                "outcome must be success, partial or error".into(),
            ));
        }
    }
    let nonempty = |o: Option<String>| o.filter(|v| !v.trim().is_empty());
    let rows =
        s.db.list_audit(&AuditFilter {
            actor: nonempty(q.actor),
            action_prefix: nonempty(q.action),
            target_id: nonempty(q.target_id),
            outcome,
            since: q.since,
            until: q.until,
            before,
            limit: i64::from(limit),
        })
        .await?;
    let next_before = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| format!("{}.{}", r.at, r.id)))
        .flatten();
    Ok(Json(AuditList {
        items: rows.into_iter().map(AuditEntry::from).collect(),
        next_before,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_from_routes() {
        let d = |m: Method, r: &str, p: &str| {
            let d = describe_route(&m, r, p);
            (d.action, d.target_id)
        };
        assert_eq!(
            d(
                Method::POST,
                "/api/nodes/{id}/power",
                "/api/nodes/abc/power"
            ),
            ("node.power".into(), Some("abc".into()))
        );
        assert_eq!(
            d(
                Method::POST,
                "/api/agents/{id}/rotate-token",
                "/api/agents/x/rotate-token"
            )
            .0,
            "agent.rotate_token"
        );
        assert_eq!(
            d(Method::POST, "/api/nodes", "/api/nodes"),
            ("node.create".into(), None)
        );
        assert_eq!(
            d(Method::PUT, "/api/templates/{id}", "/api/templates/t").0,
            "template.update"
        );
        assert_eq!(
            d(Method::DELETE, "/api/agents/{id}", "/api/agents/a").0,
            "agent.revoke"
        );
        assert_eq!(
            d(Method::DELETE, "/api/nodes/{id}", "/api/nodes/a").0,
            "node.delete"
        );
        assert_eq!(
            d(Method::DELETE, "/api/admins/{name}", "/api/admins/al%40x")
                .1
                .as_deref(),
            Some("al@x")
        );
        assert_eq!(
            d(Method::POST, "/api/nodes/bulk", "/api/nodes/bulk").0,
            "node.bulk_action"
        );
        assert_eq!(
            d(
                Method::POST,
                "/api/commands/{id}/cancel",
                "/api/commands/c/cancel"
            )
            .0,
            "command.cancel"
        );
        assert_eq!(
            d(Method::PUT, "/api/commands/{id}/pin", "/api/commands/c/pin"),
            ("command.pin".into(), Some("c".into()))
        );
        assert_eq!(
            d(
                Method::DELETE,
                "/api/commands/{id}/pin",
                "/api/commands/c/pin"
            ),
            ("command.unpin".into(), Some("c".into()))
        );
    }

    #[test]
    fn outcome_of_parts() {
        assert_eq!(parts_outcome(3, 0), "success");
        assert_eq!(parts_outcome(2, 1), "partial");
        assert_eq!(parts_outcome(0, 3), "error");
    }

    #[test]
    fn cursors() {
        assert_eq!(parse_before("12.ab"), Some((12, Some("ab".into()))));
        assert_eq!(parse_before("12"), Some((12, None)));
        assert_eq!(parse_before("x"), None);
        assert_eq!(parse_before("12."), None);
    }
}
