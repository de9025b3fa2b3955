//! Commands: create (durable before `202`), list, get (the polling endpoint, optionally
//! long-polling until terminal), logs after a seq, Server-Sent Events resumable with
//! `Last-Event-ID`, cancel, retry, and pin/unpin (keep past the retention period).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use trellis_protocol::CommandType;

use super::auth::Admin;
use super::types::{
    Command, CommandAccepted, CommandGetQuery, CommandList, CommandListQuery, CreateCommandRequest,
    ErrorBody, EventsQuery, LogLine, LogPage, LogsQuery, SseFrame,
};
use super::{parse_id, ApiResult, AppError, AppState, Json, Query};
use crate::broker::fanout::{Fanout, Published};
use crate::db::{CommandFilter, CommandRow, Db, EventRow};
use crate::domain::{self, commands::CreateCommand};
use crate::model::{CommandId, CommandStatus};

/// Create a command; it is stored before the answer and runs when its agent is online.
#[utoipa::path(post, path = "/api/commands", tag = "commands", request_body = CreateCommandRequest,
    responses((status = 202, body = CommandAccepted),
        (status = 400, description = "invalid_params, unsupported_command, params_too_large", body = ErrorBody),
        (status = 404, description = "Unknown agent", body = ErrorBody),
        (status = 409, description = "capability_missing, idempotency_conflict", body = ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    admin: Admin,
    Json(b): Json<CreateCommandRequest>,
) -> ApiResult<Response> {
    let agent_id = b
        .agent_id
        .parse()
        .map_err(|_| AppError::NotFound(format!("agent {:?} not found", b.agent_id)))?;
    let c = domain::commands::create(
        &s.db,
        &s.broker,
        CreateCommand {
            agent_id,
            command_type: b.command_type,
            params: b.params,
            idempotency_key: b.idempotency_key,
            timeout_secs: b.timeout_secs,
            created_by: admin.name,
        },
    )
    .await?;
    let note = super::audit::AuditNote::target(c.id, c.command_type.as_str());
    Ok(note.on((
        StatusCode::ACCEPTED,
        Json(CommandAccepted {
            command_id: c.id,
            status: c.status,
            attempt: None,
        }),
    )
        .into_response()))
}

/// A page cursor: `nextBefore` from the previous page (`"<createdAt ms>.<id>"`), or a
/// bare Unix-milliseconds timestamp.
fn parse_before(raw: &str) -> Option<(i64, Option<CommandId>)> {
    match raw.split_once('.') {
        Some((at, id)) => Some((at.parse().ok()?, Some(id.parse().ok()?))),
        None => Some((raw.parse().ok()?, None)),
    }
}

/// Commands, newest first, without stages; keyset-paged.
#[utoipa::path(get, path = "/api/commands", tag = "commands", params(CommandListQuery),
    responses((status = 200, body = CommandList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    Query(q): Query<CommandListQuery>,
) -> ApiResult<Json<CommandList>> {
    let agent_id = match q.agent_id.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => Some(
            a.parse()
                .map_err(|_| AppError::BadRequest("agentId is not a valid id".into()))?,
        ),
        None => None,
    };
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        Some(st) => Some(
            CommandStatus::parse(st)
                .ok_or_else(|| AppError::BadRequest(format!("unknown status {st:?}")))?,
        ),
        None => None,
    };
    let command_type = match q.command_type.as_deref().filter(|s| !s.is_empty()) {
        Some(t) => Some(
            CommandType::parse(t)
                .ok_or_else(|| AppError::BadRequest(format!("unknown command type {t:?}")))?,
        ),
        None => None,
    };
    let before = match q.before.as_deref().filter(|b| !b.is_empty()) {
        Some(b) => Some(parse_before(b).ok_or_else(|| {
            AppError::BadRequest("before must be a nextBefore cursor or Unix milliseconds".into())
        })?),
        None => None,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows =
        s.db.list_commands(&CommandFilter {
            agent_id,
            status,
            command_type,
            before,
            limit,
        })
        .await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| {
            rows.last()
                .map(|(r, _)| format!("{}.{}", r.created_at, r.id))
        })
        .flatten();
    Ok(Json(CommandList {
        items: rows
            .iter()
            .map(|(c, node)| Command::new(c, None).with_target(c, node.as_ref()))
            .collect(),
        next_before,
    }))
}

/// One command with its stages; with `wait`, answers as soon as it is terminal.
#[utoipa::path(get, path = "/api/commands/{id}", tag = "commands",
    params(("id" = String, Path), CommandGetQuery),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<CommandGetQuery>,
) -> ApiResult<Json<Command>> {
    let id: CommandId = parse_id(&id, "command")?;
    let (c, node) = match q.wait {
        Some(w) if w > 0.0 && w.is_finite() => {
            domain::commands::wait_terminal_with_target(
                &s.db,
                &s.broker,
                id,
                Duration::from_secs_f64(w.min(60.0)),
            )
            .await?
        }
        _ => domain::commands::get_with_target(&s.db, id).await?,
    };
    let stages = s.db.get_stages(id).await?;
    Ok(Json(
        Command::new(&c, Some(&stages)).with_target(&c, node.as_ref()),
    ))
}

/// Stored log lines after a seq.
#[utoipa::path(get, path = "/api/commands/{id}/logs", tag = "commands",
    params(("id" = String, Path), LogsQuery),
    responses((status = 200, body = LogPage), (status = 404, body = ErrorBody)))]
pub async fn logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<LogPage>> {
    let id: CommandId = parse_id(&id, "command")?;
    let c = domain::commands::get(&s.db, id).await?;
    let after = q.after.unwrap_or(0).max(0);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    // At most `limit` lines and about 4 MiB of data per response (`lastSeq` pages on).
    let (rows, more) = s.db.events_page(id, after, limit, true).await?;
    let last = rows.last().map_or(after, |r| r.seq);
    let done = c.is_terminal() && !more;
    let items = rows
        .into_iter()
        .map(|r| LogLine {
            seq: r.seq,
            ts: r.ts,
            stream: r.stream,
            data: r.data,
        })
        .collect();
    Ok(Json(LogPage {
        items,
        last_seq: last,
        done,
    }))
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

/// Server-Sent Events for one command. Subscribes to live fan-out first, then replays
/// the stored backlog after `Last-Event-ID`, dropping duplicates by seq.
#[utoipa::path(get, path = "/api/commands/{id}/events", tag = "commands",
    params(("id" = String, Path), EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")),
    responses((status = 200, description = "`text/event-stream` of `status`, `log`, `stage`, `progress`, `finished` and `end` events", body = SseFrame, content_type = "text/event-stream"),
        (status = 404, body = ErrorBody)))]
pub async fn events(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> ApiResult<Response> {
    let id: CommandId = parse_id(&id, "command")?;
    domain::commands::get(&s.db, id).await?;
    // The stream ends when its session or token stops working (checked periodically).
    let auth = super::auth::StreamAuth::of(&headers, &uri);
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0)
        .max(0);
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    let (db, fanout, shutdown) = (s.db.clone(), s.fanout.clone(), s.broker.shutdown.clone());
    let state = s.clone();
    s.tasks.spawn(async move {
        let every = state.auth.stream_recheck;
        tokio::select! {
            r = stream_events(&db, &fanout, &shutdown, id, after, tx) => {
                if let Err(e) = r {
                    tracing::debug!(command_id = %id, error = %e, "event stream ended");
                }
            }
            // Dropping the stream's sender ends the response.
            _ = auth.ended(&state, every) => {
                tracing::debug!(command_id = %id, "event stream ended: its session or token no longer works");
            }
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
    db: &Db,
    fanout: &Fanout,
    shutdown: &tokio_util::sync::CancellationToken,
    id: CommandId,
    mut last: i64,
    tx: mpsc::Sender<SseEvent>,
) -> anyhow::Result<()> {
    let mut sub = fanout.subscribe(id);
    let send_status = |c: &CommandRow| {
        SseEvent::default()
            .event("status")
            .data(serde_json::to_string(&Command::new(c, None)).unwrap_or_default())
    };
    let mut c = db.get_command(id).await?;
    tx.send(send_status(&c)).await?;
    loop {
        // Backlog from the database.
        loop {
            // Pages of at most 1000 events and about 4 MiB.
            let (rows, more) = db.events_page(id, last, 1000, false).await?;
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
            if !more {
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
                _ = shutdown.cancelled() => return Ok(()),
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
                    let fresh = db.get_command(id).await?;
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
                    sub = fanout.subscribe(id);
                    break;
                }
            }
        }
    }
}

/// Cancel a command: a queued one ends at once, a running one is stopped on its agent.
#[utoipa::path(post, path = "/api/commands/{id}/cancel", tag = "commands", params(("id" = String, Path)),
    responses((status = 202, body = Command), (status = 404, body = ErrorBody),
        (status = 409, description = "already_finished", body = ErrorBody)))]
pub async fn cancel(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id: CommandId = parse_id(&id, "command")?;
    let c = domain::commands::cancel(&s.db, &s.broker, id).await?;
    let stages = s.db.get_stages(id).await?;
    let note = super::audit::AuditNote::target(c.id, c.command_type.as_str());
    Ok(note.on((StatusCode::ACCEPTED, Json(Command::new(&c, Some(&stages)))).into_response()))
}

/// Pin a command: retention (`--retention-days`) keeps it, with its events and stages,
/// until it is unpinned. Any status; pinning a pinned command answers the same.
#[utoipa::path(put, path = "/api/commands/{id}/pin", tag = "commands", params(("id" = String, Path)),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody)))]
pub async fn pin(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    set_pinned(&s, &id, true).await
}

/// Unpin a command: the first retention pass after it is past the period deletes it
/// (unless it is its node's latest command). Unpinning an unpinned command answers the same.
#[utoipa::path(delete, path = "/api/commands/{id}/pin", tag = "commands", params(("id" = String, Path)),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody)))]
pub async fn unpin(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    set_pinned(&s, &id, false).await
}

/// Both pin routes: the command as `GET` shows it, named in the audit row.
async fn set_pinned(s: &AppState, id: &str, pinned: bool) -> ApiResult<Response> {
    let id: CommandId = parse_id(id, "command")?;
    let c = domain::commands::set_pinned(&s.db, id, pinned).await?;
    let stages = s.db.get_stages(id).await?;
    let node = s.db.command_target_node(id).await?;
    let note = super::audit::AuditNote::target(c.id, c.command_type.as_str());
    Ok(note
        .on(Json(Command::new(&c, Some(&stages)).with_target(&c, node.as_ref())).into_response()))
}

/// Retry a failed, cancelled or timed-out command as a new attempt (a retried provision
/// takes over its node). Retrying the same command twice gives the same new attempt.
#[utoipa::path(post, path = "/api/commands/{id}/retry", tag = "commands", params(("id" = String, Path)),
    responses((status = 202, body = CommandAccepted), (status = 404, body = ErrorBody),
        (status = 409, description = "not_retryable, secrets_undecryptable (its sensitive values were encrypted with another key)", body = ErrorBody)))]
pub async fn retry(
    State(s): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id: CommandId = parse_id(&id, "command")?;
    let new = domain::commands::retry(&s.db, &s.broker, &admin.name, id).await?;
    let note = super::audit::AuditNote::default()
        .with_details(serde_json::json!({ "commandId": new.id, "attempt": new.attempt }));
    Ok(note.on((
        StatusCode::ACCEPTED,
        Json(CommandAccepted {
            command_id: new.id,
            status: new.status,
            attempt: Some(new.attempt),
        }),
    )
        .into_response()))
}
