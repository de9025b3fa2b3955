//! Commands: create (durable before `202`), list, get (the polling endpoint, optionally
//! long-polling until terminal), logs after a seq, Server-Sent Events resumable with
//! `Last-Event-ID`, cancel and retry.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use trellis_protocol::{CancelReason, Command, CommandType};
use uuid::Uuid;

use super::{parse_id, ApiResult, AppError, AppState, Json};
use crate::broker::fanout::Published;
use crate::broker::Broker;
use crate::db::{CancelOutcome, CommandRow, DbError, EventRow, NewCommand, StageRow};
use crate::time::{now_ms, opt_rfc3339, rfc3339};

const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Largest params accepted (the dispatch frame limit is 1 MiB).
const MAX_PARAMS_BYTES: usize = 512 * 1024;

fn default_timeout(t: CommandType) -> u64 {
    match t {
        CommandType::Ping => 300,
        CommandType::ListTemplates => 60,
        CommandType::Provision => 3600,
        CommandType::TerraformApply => 7200,
        CommandType::Unknown => 300,
    }
}

pub fn command_json(c: &CommandRow, stages: Option<&[StageRow]>) -> Value {
    let mut v = json!({
        "id": c.id,
        "agentId": c.agent_id,
        "type": c.command_type,
        "params": redact_params(&c.command_type, &c.params),
        "status": c.status,
        "stage": c.stage,
        "percent": c.percent,
        "result": c.result,
        "error": c.error,
        "attempt": c.attempt,
        "rootCommandId": c.root_id,
        "retryOf": c.retry_of,
        "idempotencyKey": c.idempotency_key,
        "createdBy": c.created_by,
        "createdAt": rfc3339(c.created_at),
        "dispatchedAt": opt_rfc3339(c.dispatched_at),
        "startedAt": opt_rfc3339(c.started_at),
        "finishedAt": opt_rfc3339(c.finished_at),
        "deadlineAt": rfc3339(c.deadline_at),
        "cancelRequested": c.cancel_requested,
        "lastSeq": c.last_seq,
    });
    if let Some(stages) = stages {
        v["stages"] = stages
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "state": s.state,
                    "startedAt": opt_rfc3339(s.started_at),
                    "finishedAt": opt_rfc3339(s.finished_at),
                    "message": s.message,
                })
            })
            .collect();
    }
    v
}

/// Sensitive Terraform variables are stored (the agent needs them) but never shown.
fn redact_params(command_type: &str, params: &Value) -> Value {
    if command_type != "terraform_apply" {
        return params.clone();
    }
    let Ok(Command::TerraformApply(p)) = Command::parse(command_type, params) else {
        return params.clone();
    };
    let mut out = params.clone();
    if let Some(vars) = out.get_mut("terraform_vars").and_then(Value::as_object_mut) {
        for (k, v) in vars.iter_mut() {
            if p.is_sensitive(k) {
                *v = json!("***");
            }
        }
    }
    out
}

pub struct CreateCommand {
    pub agent_id: Uuid,
    pub command_type: String,
    pub params: Value,
    pub idempotency_key: Option<String>,
    pub timeout_secs: Option<u64>,
    pub created_by: String,
    pub retry_of: Option<CommandRow>,
}

/// Validates and persists a command, then wakes the agent's session. The command is
/// committed before this returns.
pub async fn create_command(broker: &Broker, c: CreateCommand) -> ApiResult<CommandRow> {
    // The dispatch must fit in one protocol frame with room to spare.
    let size = c.params.to_string().len();
    if size > MAX_PARAMS_BYTES {
        return Err(AppError::Invalid(
            "params_too_large",
            format!("params are {size} bytes; at most {MAX_PARAMS_BYTES} are accepted"),
        ));
    }
    let cmd = Command::parse(&c.command_type, &c.params)?;
    let agent = broker.db.get_agent(c.agent_id).await.map_err(|e| match e {
        DbError::NotFound => AppError::NotFound(format!("agent {} not found", c.agent_id)),
        e => e.into(),
    })?;
    let ty = cmd.command_type();
    // Only reject for a missing capability when the agent has told us what it can do.
    if !agent.capabilities.is_empty() && !agent.has_capability(ty) {
        return Err(AppError::Conflict(
            "capability_missing",
            format!("agent {:?} cannot run {ty} commands", agent.name),
        ));
    }
    if let Some(key) = &c.idempotency_key {
        if key.is_empty() || key.len() > 200 {
            return Err(AppError::Invalid(
                "invalid_params",
                "idempotencyKey must be 1–200 characters".into(),
            ));
        }
        if let Some(existing) = broker.db.command_by_idempotency_key(key).await? {
            return same_request(existing, &c);
        }
    }
    let timeout = c.timeout_secs.unwrap_or_else(|| default_timeout(ty));
    if timeout == 0 || timeout > MAX_TIMEOUT_SECS {
        return Err(AppError::Invalid(
            "invalid_params",
            format!("timeoutSecs must be 1–{MAX_TIMEOUT_SECS}"),
        ));
    }
    let id = Uuid::new_v4();
    let new = NewCommand {
        id,
        agent_id: c.agent_id,
        command_type: ty,
        params: c.params.clone(),
        idempotency_key: c.idempotency_key.clone(),
        created_by: c.created_by.clone(),
        deadline_at: now_ms() + (timeout as i64) * 1000,
        attempt: c.retry_of.as_ref().map_or(1, |r| r.attempt + 1),
        root_id: c.retry_of.as_ref().map_or(id, |r| r.root_id),
        retry_of: c.retry_of.as_ref().map(|r| r.id),
    };
    let mut row = CommandRow::queued(&new, 0);
    row.created_at = match broker.insert_command(new).await {
        Ok(at) => at,
        // Lost a race on the idempotency key: answer with the winner.
        Err(DbError::Conflict(msg)) => {
            let key = c.idempotency_key.as_deref().unwrap_or_default();
            return match broker.db.command_by_idempotency_key(key).await? {
                Some(existing) => same_request(existing, &c),
                None => Err(DbError::Conflict(msg).into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    broker.wake(c.agent_id);
    Ok(row)
}

/// A reused idempotency key must name the same request; anything else is a client bug.
fn same_request(existing: CommandRow, c: &CreateCommand) -> ApiResult<CommandRow> {
    if existing.agent_id == c.agent_id
        && existing.command_type == c.command_type
        && existing.params == c.params
    {
        Ok(existing)
    } else {
        Err(AppError::Conflict(
            "idempotency_conflict",
            format!(
                "idempotency key already used for a different request (command {})",
                existing.id
            ),
        ))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBody {
    agent_id: String,
    #[serde(rename = "type")]
    command_type: String,
    #[serde(default)]
    params: Value,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

pub async fn create(State(s): State<AppState>, Json(b): Json<CreateBody>) -> ApiResult<Response> {
    let agent_id: Uuid = b
        .agent_id
        .parse()
        .map_err(|_| AppError::NotFound(format!("agent {:?} not found", b.agent_id)))?;
    let c = create_command(
        &s.broker,
        CreateCommand {
            agent_id,
            command_type: b.command_type,
            params: b.params,
            idempotency_key: b.idempotency_key,
            timeout_secs: b.timeout_secs,
            created_by: "admin".into(),
            retry_of: None,
        },
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"commandId": c.id, "status": c.status})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    agent_id: Option<String>,
    status: Option<String>,
    #[serde(rename = "type")]
    command_type: Option<String>,
    limit: Option<i64>,
    before: Option<String>,
}

/// A page cursor: `nextBefore` from the previous page (`"<createdAt ms>.<id>"`), or a
/// bare Unix-milliseconds timestamp.
fn parse_before(raw: &str) -> Option<(i64, Option<Uuid>)> {
    match raw.split_once('.') {
        Some((at, id)) => Some((at.parse().ok()?, Some(id.parse().ok()?))),
        None => Some((raw.parse().ok()?, None)),
    }
}

const STATUSES: [&str; 7] = [
    "queued",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
];

pub async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let agent = match q.agent_id.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => Some(
            a.parse()
                .map_err(|_| AppError::BadRequest("agentId is not a valid id".into()))?,
        ),
        None => None,
    };
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(st) = status {
        if !STATUSES.contains(&st) {
            return Err(AppError::BadRequest(format!("unknown status {st:?}")));
        }
    }
    let ty = q.command_type.as_deref().filter(|s| !s.is_empty());
    if let Some(t) = ty {
        if CommandType::parse(t).is_none() {
            return Err(AppError::BadRequest(format!("unknown command type {t:?}")));
        }
    }
    let before = match q.before.as_deref().filter(|b| !b.is_empty()) {
        Some(b) => Some(parse_before(b).ok_or_else(|| {
            AppError::BadRequest("before must be a nextBefore cursor or Unix milliseconds".into())
        })?),
        None => None,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = s
        .broker
        .db
        .list_commands(agent, status, ty, before, limit)
        .await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| format!("{}.{}", r.created_at, r.id)))
        .flatten();
    let items: Vec<Value> = rows.iter().map(|c| command_json(c, None)).collect();
    Ok(Json(json!({ "items": items, "nextBefore": next_before })))
}

#[derive(Deserialize)]
pub struct GetQuery {
    wait: Option<f64>,
}

async fn load(broker: &Broker, id: Uuid) -> ApiResult<CommandRow> {
    broker.db.get_command(id).await.map_err(|e| match e {
        DbError::NotFound => AppError::NotFound(format!("command {id} not found")),
        e => e.into(),
    })
}

pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "command")?;
    let c = match q.wait {
        Some(w) if w > 0.0 => {
            wait_terminal(&s.broker, id, Duration::from_secs_f64(w.min(60.0))).await?
        }
        _ => load(&s.broker, id).await?,
    };
    let stages = s.broker.db.get_stages(id).await?;
    Ok(Json(command_json(&c, Some(&stages))))
}

/// Waits until the command is terminal or `timeout` passes; returns its latest state.
pub async fn wait_terminal(broker: &Broker, id: Uuid, timeout: Duration) -> ApiResult<CommandRow> {
    let mut sub = broker.fanout.subscribe(id);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let c = load(broker, id).await?;
        if c.is_terminal() {
            return Ok(c);
        }
        // Re-read on a status change, on lag, and at least once a second (a missed
        // notification costs at most that).
        let until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        loop {
            match tokio::time::timeout_at(until, sub.recv()).await {
                Ok(Ok(Published::Status)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    break
                }
                Ok(Ok(Published::Event { .. })) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    sub = broker.fanout.subscribe(id);
                    break;
                }
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return load(broker, id).await;
        }
    }
}

#[derive(Deserialize)]
pub struct LogsQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

pub async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "command")?;
    let c = load(&s.broker, id).await?;
    let after = q.after.unwrap_or(0).max(0);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let rows = s.broker.db.events_after(id, after, limit, true).await?;
    let last = rows.last().map_or(after, |r| r.seq);
    let done = c.is_terminal() && (rows.len() as i64) < limit;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| json!({"seq": r.seq, "ts": r.ts, "stream": r.stream, "data": r.data}))
        .collect();
    Ok(Json(
        json!({ "items": items, "lastSeq": last, "done": done }),
    ))
}

fn row_sse(r: &EventRow) -> (String, String) {
    let json = if r.kind == "log" {
        json!({"seq": r.seq, "ts": r.ts, "kind": "log", "stream": r.stream, "data": r.data})
            .to_string()
    } else {
        let mut v: Value = serde_json::from_str(&r.data).unwrap_or_else(|_| json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert("seq".into(), r.seq.into());
            o.insert("ts".into(), r.ts.into());
            o.entry("kind").or_insert_with(|| r.kind.clone().into());
        }
        v.to_string()
    };
    (r.kind.clone(), json)
}

#[derive(Deserialize)]
pub struct EventsQuery {
    after: Option<i64>,
}

/// Server-Sent Events for one command. Subscribes to live fan-out first, then replays
/// the stored backlog after `Last-Event-ID`, dropping duplicates by seq.
pub async fn events(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = parse_id(&id, "command")?;
    load(&s.broker, id).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0)
        .max(0);
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    let broker = s.broker.clone();
    tokio::spawn(async move {
        if let Err(e) = stream_events(broker, id, after, tx).await {
            tracing::debug!(command_id = %id, error = %e, "event stream ended");
        }
    });
    let stream = futures_util::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, Infallible>,
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

async fn stream_events(
    broker: Arc<Broker>,
    id: Uuid,
    mut last: i64,
    tx: mpsc::Sender<SseEvent>,
) -> anyhow::Result<()> {
    let mut sub = broker.fanout.subscribe(id);
    let send_status = |c: &CommandRow| {
        SseEvent::default()
            .event("status")
            .data(command_json(c, None).to_string())
    };
    let mut c = broker.db.get_command(id).await?;
    tx.send(send_status(&c)).await?;
    loop {
        // Backlog from the database.
        loop {
            let rows = broker.db.events_after(id, last, 1000, false).await?;
            for r in &rows {
                let (kind, json) = row_sse(r);
                tx.send(
                    SseEvent::default()
                        .id(r.seq.to_string())
                        .event(kind)
                        .data(json),
                )
                .await?;
                last = r.seq;
            }
            if rows.len() < 1000 {
                break;
            }
        }
        if c.is_terminal() {
            tx.send(SseEvent::default().event("end").data("{}")).await?;
            return Ok(());
        }
        // Live: contiguous events go straight out; a gap, lag or status change sends us
        // back to the database.
        loop {
            let msg = tokio::select! {
                m = sub.recv() => m,
                _ = tx.closed() => return Ok(()),
                // Open streams must not hold up a graceful shutdown; clients resume.
                _ = broker.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(5)) => Ok(Published::Status),
            };
            match msg {
                Ok(Published::Event { seq, kind, json }) => {
                    if seq <= last {
                        continue;
                    }
                    if seq == last + 1 {
                        tx.send(
                            SseEvent::default()
                                .id(seq.to_string())
                                .event(kind)
                                .data(&*json),
                        )
                        .await?;
                        last = seq;
                        continue;
                    }
                    break;
                }
                Ok(Published::Status) => {
                    let fresh = broker.db.get_command(id).await?;
                    if fresh.status != c.status
                        || fresh.cancel_requested != c.cancel_requested
                        || fresh.is_terminal()
                    {
                        tx.send(send_status(&fresh)).await?;
                    }
                    c = fresh;
                    if c.is_terminal() || c.last_seq > last {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => {
                    sub = broker.fanout.subscribe(id);
                    break;
                }
            }
        }
    }
}

pub async fn cancel(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id, "command")?;
    load(&s.broker, id).await?;
    let (c, outcome) = s.broker.db.request_cancel(id).await?;
    match outcome {
        CancelOutcome::Requested => s.broker.cancel(c.agent_id, id, CancelReason::Cancelled),
        CancelOutcome::Cancelled => s.broker.wake(c.agent_id),
        CancelOutcome::AlreadyFinished => {
            return Err(AppError::Conflict(
                "already_finished",
                format!("command already {}", c.status),
            ))
        }
    }
    s.broker.fanout.publish(&id, Published::Status);
    let stages = s.broker.db.get_stages(id).await?;
    Ok((StatusCode::ACCEPTED, Json(command_json(&c, Some(&stages)))).into_response())
}

pub async fn retry(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id, "command")?;
    let old = load(&s.broker, id).await?;
    if !old.is_terminal() || old.status == "succeeded" {
        return Err(AppError::Conflict(
            "not_retryable",
            format!(
                "only failed, cancelled or timed-out commands can be retried; this one is {}",
                old.status
            ),
        ));
    }
    let new = create_command(
        &s.broker,
        CreateCommand {
            agent_id: old.agent_id,
            command_type: old.command_type.clone(),
            params: old.params.clone(),
            // A double-clicked Retry makes one new attempt, not two.
            idempotency_key: Some(format!("retry:{}", old.id)),
            timeout_secs: None,
            created_by: "admin:retry".into(),
            retry_of: Some(old.clone()),
        },
    )
    .await?;
    crate::api::nodes::retarget_node(&s.broker, old.id, new.id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"commandId": new.id, "status": new.status, "attempt": new.attempt})),
    )
        .into_response())
}
