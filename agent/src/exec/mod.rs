//! The context executors report through, and the end of every command.
//!
//! Every command runs in its own task with an [`ExecContext`]. An executor reports stages,
//! progress and logs through the context (which hands them to the session, where they get
//! their `seq`, are journaled and sent), watches `ctx.cancel` and returns its result or a
//! [`CommandError`]. [`finish`] turns that into the final `finished` event; an executor
//! never sends it itself.
//!
//! The context carries only what identifies and steers one command: its settings and
//! long-lived state (VMID allocation, workspace locks) belong to the executor struct, so
//! no executor sees the agent's own config or its server token. Which executor runs which
//! command is decided in [`crate::dispatch`].

pub mod deadline;
pub mod ping;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_protocol::{
    CancelReason, CommandError, EventBody, FinalStatus, LogStream, Outcome, StageState,
    MAX_EVENT_MESSAGE_BYTES, MAX_LOG_CHUNK_BYTES, MAX_STAGE_NAME_BYTES,
};
use uuid::Uuid;

pub use ping::PingExecutor;

/// The wire form of a percent: the decimal the `f32` stands for (3.33, not
/// 3.3299999237…), clamped to 0–100 as the protocol requires.
fn wire_percent(p: f32) -> f64 {
    let exact = p.to_string().parse::<f64>().unwrap_or(f64::from(p));
    if exact.is_finite() {
        exact.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with "…".
fn truncate_to(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// A stage name of 1–64 printable bytes: control characters become spaces, a long name
/// is cut, an empty one is called "stage".
fn wire_stage_name(name: String) -> String {
    let mut name: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if name.len() > MAX_STAGE_NAME_BYTES {
        let mut end = MAX_STAGE_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    if name.is_empty() {
        name.push_str("stage");
    }
    name
}

/// The event body made to obey the per-event limits (logs are split by
/// [`ExecContext::log`], not here).
fn within_limits(body: EventBody) -> EventBody {
    let message = |m: Option<String>| m.map(|m| truncate_to(m, MAX_EVENT_MESSAGE_BYTES));
    let percent = |p: f64| {
        if p.is_finite() {
            p.clamp(0.0, 100.0)
        } else {
            0.0
        }
    };
    match body {
        EventBody::Stage {
            stage,
            state,
            percent: pct,
            message: msg,
        } => EventBody::Stage {
            stage: wire_stage_name(stage),
            state,
            percent: pct.map(percent),
            message: message(msg),
        },
        EventBody::Progress {
            percent: pct,
            message: msg,
        } => EventBody::Progress {
            percent: percent(pct),
            message: message(msg),
        },
        other => other,
    }
}

/// What an executor hands to the session: one event body for one command.
#[derive(Debug)]
pub struct Report {
    pub command_id: Uuid,
    pub body: EventBody,
}

/// The control plane URL (`ws(s)://…/api/agents/connect`) of the agent's current session,
/// or of its last one while it is disconnected; `None` before the first welcome. The
/// session sets it at each welcome; a command reads it when it calls the server back
/// (Terraform's state backend), so with several server URLs it reaches the replica the
/// agent is connected to then, not the one it was first configured with. Clones share it.
#[derive(Clone, Default, Debug)]
pub struct ConnectedServer(Arc<std::sync::RwLock<Option<Arc<str>>>>);

impl ConnectedServer {
    /// A cell already holding `url` (tests, and executors run without a session).
    pub fn new(url: &str) -> Self {
        let c = Self::default();
        c.set(url);
        c
    }

    pub fn set(&self, url: &str) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(url));
    }

    pub fn get(&self) -> Option<Arc<str>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What one running command gives its executor: who it is, how to stop, where to report.
#[derive(Clone)]
pub struct ExecContext {
    pub command_id: Uuid,
    /// The first attempt's id (equal to `command_id` on a first attempt). Use it to make
    /// retries idempotent.
    pub root_command_id: Uuid,
    pub attempt: u32,
    /// Cancelled on a user cancel, a deadline, or agent shutdown. Check it between steps;
    /// clean up before returning.
    pub cancel: CancellationToken,
    reports: mpsc::Sender<Report>,
    cancel_reason: Arc<std::sync::Mutex<Option<CancelReason>>>,
    /// `terraform_apply`: the command's Terraform state credential from its dispatch
    /// (`dispatch.terraform_state`), when the server keeps the state.
    pub terraform_state: Option<crate::secret::Secret>,
    /// The control plane the agent is connected to (see [`ConnectedServer`]).
    pub server: ConnectedServer,
}

impl ExecContext {
    pub fn new(
        command_id: Uuid,
        root_command_id: Uuid,
        attempt: u32,
        reports: mpsc::Sender<Report>,
    ) -> Self {
        Self {
            command_id,
            root_command_id,
            attempt,
            cancel: CancellationToken::new(),
            reports,
            cancel_reason: Default::default(),
            terraform_state: None,
            server: ConnectedServer::default(),
        }
    }

    /// This context with the command's Terraform state credential.
    pub fn with_terraform_state(mut self, credential: Option<String>) -> Self {
        self.terraform_state = credential.map(crate::secret::Secret::new);
        self
    }

    /// This context reading the connected control plane from `server`.
    pub fn with_server(mut self, server: ConnectedServer) -> Self {
        self.server = server;
        self
    }

    /// Requests cancellation; the first reason wins.
    pub fn request_cancel(&self, reason: CancelReason) {
        let mut r = self.cancel_reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason);
        drop(r);
        self.cancel.cancel();
    }

    pub fn cancel_reason(&self) -> Option<CancelReason> {
        *self.cancel_reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Sends one event. Waits when the session's outbox is full (backpressure), so a
    /// runaway producer slows down instead of exhausting memory.
    ///
    /// The body is made to obey the protocol's per-event limits first (see
    /// [`trellis_protocol::Event::validate`]): a long log is split, a percent clamped, a
    /// stage name or message cut to its limit.
    pub async fn report(&self, body: EventBody) {
        match body {
            EventBody::Log { stream, data } if data.len() > MAX_LOG_CHUNK_BYTES => {
                self.log(stream, &data).await
            }
            body => self.send(within_limits(body)).await,
        }
    }

    async fn send(&self, body: EventBody) {
        // The receiver lives as long as the agent; a send error means shutdown.
        let _ = self
            .reports
            .send(Report {
                command_id: self.command_id,
                body,
            })
            .await;
    }

    pub async fn stage(
        &self,
        stage: &str,
        state: StageState,
        percent: Option<f32>,
        message: Option<String>,
    ) {
        self.report(EventBody::Stage {
            stage: stage.to_string(),
            state,
            percent: percent.map(wire_percent),
            message,
        })
        .await
    }

    pub async fn progress(&self, percent: f32, message: Option<String>) {
        self.report(EventBody::Progress {
            percent: wire_percent(percent),
            message,
        })
        .await
    }

    /// Sends output, split into chunks of at most [`MAX_LOG_CHUNK_BYTES`] on UTF-8
    /// boundaries. Callers that batch output (500 ms / 10 KB) call this once per batch.
    pub async fn log(&self, stream: LogStream, data: &str) {
        let mut rest = data;
        while !rest.is_empty() {
            let mut end = rest.len().min(MAX_LOG_CHUNK_BYTES);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            self.send(EventBody::Log {
                stream,
                data: rest[..end].to_string(),
            })
            .await;
            rest = &rest[end..];
        }
    }
}

/// Reports the `finished` event for an executor's result: cancelled, timed out or
/// stopped by shutdown when the context was cancelled, else succeeded or failed.
pub async fn finish(ctx: &ExecContext, result: Result<serde_json::Value, CommandError>) {
    let outcome = match result {
        Ok(result) if !ctx.is_cancelled() => Outcome {
            status: FinalStatus::Succeeded,
            result: Some(result),
            error: None,
        },
        Ok(_) => cancelled_outcome(ctx, None),
        Err(e) if ctx.is_cancelled() => cancelled_outcome(ctx, Some(e)),
        Err(e) => Outcome {
            status: FinalStatus::Failed,
            result: None,
            error: Some(e),
        },
    };
    ctx.report(EventBody::Finished(outcome)).await;
}

fn cancelled_outcome(ctx: &ExecContext, err: Option<CommandError>) -> Outcome {
    let (status, code, message) = match ctx.cancel_reason() {
        Some(CancelReason::TimedOut) => (
            FinalStatus::TimedOut,
            "timed_out",
            "deadline exceeded; command stopped",
        ),
        Some(CancelReason::AgentShutdown) => (
            FinalStatus::Failed,
            "agent_shutdown",
            "the agent was shut down while the command ran",
        ),
        _ => (FinalStatus::Cancelled, "cancelled", "cancelled by request"),
    };
    let mut error = CommandError::new(code, message);
    error.retryable = status != FinalStatus::Cancelled;
    if let Some(e) = err {
        error.stage = e.stage.clone();
        error.message = format!("{message}: {}", e.message);
        error.details = e.details;
    }
    Outcome {
        status,
        result: None,
        error: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_protocol::Event;

    fn ctx() -> (ExecContext, mpsc::Receiver<Report>) {
        let (tx, rx) = mpsc::channel(100);
        let id = Uuid::new_v4();
        (ExecContext::new(id, id, 1, tx), rx)
    }

    fn valid(body: EventBody) -> bool {
        Event {
            command_id: Uuid::nil(),
            seq: 1,
            ts: 0,
            body,
        }
        .validate()
        .is_ok()
    }

    #[tokio::test]
    async fn reported_events_obey_the_per_event_limits() {
        let (ctx, mut rx) = ctx();
        ctx.stage(
            &format!("a\nvery-{}", "long-".repeat(30)),
            StageState::Running,
            Some(250.0),
            Some("é".repeat(5000)),
        )
        .await;
        ctx.stage("", StageState::Completed, Some(f32::NAN), None)
            .await;
        ctx.progress(-3.0, Some("x".repeat(10_000))).await;
        ctx.progress(3.33, None).await;
        ctx.report(EventBody::Log {
            stream: LogStream::Stdout,
            data: "ü".repeat(MAX_LOG_CHUNK_BYTES),
        })
        .await;
        let mut bodies = Vec::new();
        while let Ok(r) = rx.try_recv() {
            bodies.push(r.body);
        }
        assert_eq!(bodies.len(), 4 + 2, "the 128 KiB log was split in two");
        for b in &bodies {
            assert!(valid(b.clone()), "{b:?}");
        }
        assert!(matches!(&bodies[3], EventBody::Progress { percent, .. } if *percent == 3.33));
        assert!(matches!(&bodies[1], EventBody::Stage { stage, .. } if stage == "stage"));
    }
}
