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

pub mod ping;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_protocol::{
    CancelReason, CommandError, EventBody, FinalStatus, LogStream, Outcome, StageState,
    MAX_LOG_CHUNK_BYTES,
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

/// What an executor hands to the session: one event body for one command.
#[derive(Debug)]
pub struct Report {
    pub command_id: Uuid,
    pub body: EventBody,
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
        }
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
    pub async fn report(&self, body: EventBody) {
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
            self.report(EventBody::Log {
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
