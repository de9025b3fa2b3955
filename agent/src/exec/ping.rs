//! `ping`: answers at once, or spreads progress and log events over a duration so the
//! streaming path can be exercised without Proxmox or Terraform.

use std::time::Duration;

use trellis_protocol::{CommandError, LogStream, PingParams, PingResult};

use super::ExecContext;

/// Runs `ping`; owns the one setting it reports (the agent's hostname).
#[derive(Debug, Clone)]
pub struct PingExecutor {
    hostname: String,
}

impl PingExecutor {
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
        }
    }

    pub async fn run(&self, ctx: &ExecContext, p: PingParams) -> Result<PingResult, CommandError> {
        run(ctx, &self.hostname, p).await
    }
}

async fn run(ctx: &ExecContext, hostname: &str, p: PingParams) -> Result<PingResult, CommandError> {
    let steps = p.progress_events.max(p.log_lines) as u64;
    let pause = Duration::from_millis(p.duration_ms.checked_div(steps).unwrap_or(p.duration_ms));
    let line_bytes = p.log_line_bytes.unwrap_or(80) as usize;
    let mut sent = 0u64;
    let mut line = String::with_capacity(line_bytes + 1);
    for i in 0..steps {
        if ctx.is_cancelled() {
            return Err(CommandError::new(
                "cancelled",
                format!("stopped after {i} of {steps} steps"),
            ));
        }
        if (i as u32) < p.progress_events {
            let pct = (i + 1) as f32 * 100.0 / p.progress_events as f32;
            ctx.progress(
                pct,
                Some(format!("step {} of {}", i + 1, p.progress_events)),
            )
            .await;
            sent += 1;
        }
        if (i as u32) < p.log_lines {
            line.clear();
            use std::fmt::Write;
            let _ = write!(line, "line {:08} ", i + 1);
            while line.len() < line_bytes {
                line.push('.');
            }
            line.truncate(line_bytes);
            line.push('\n');
            ctx.log(LogStream::Stdout, &line).await;
            sent += 1;
        }
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = ctx.cancel.cancelled() => {}
            }
        }
    }
    if steps == 0 && !pause.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ctx.cancel.cancelled() => {}
        }
    }
    if ctx.is_cancelled() {
        return Err(CommandError::new("cancelled", "stopped"));
    }
    if let Some(msg) = p.fail_with {
        return Err(CommandError::new("ping_failed", msg));
    }
    Ok(PingResult {
        pong: true,
        hostname: hostname.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        events_sent: sent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[tokio::test]
    async fn ping_reports_the_executors_hostname() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let id = Uuid::new_v4();
        let ctx = ExecContext::new(id, id, 1, tx);
        let p: PingParams = serde_json::from_value(serde_json::json!({"log_lines": 2})).unwrap();
        let r = PingExecutor::new("host-a").run(&ctx, p).await.unwrap();
        assert_eq!(r.hostname, "host-a");
        assert_eq!(r.events_sent, 2);
        assert!(rx.try_recv().is_ok());
    }
}
