//! Following Proxmox's asynchronous work: a task to its end by UPID, and a VM until its
//! `lock` is gone.
//!
//! Every stage (and cleanup) needs these; they bound each wait by the task timeout and
//! stop at once on cancel.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use trellis_protocol::CommandError;

use super::{secs, sleep_or_cancel, Run};
use crate::proxmox::upid::Upid;

impl Run<'_> {
    /// Polls a task to its end; a failed task's log tail goes to the command log.
    pub(super) async fn wait_task(
        &self,
        upid: &Upid,
        what: &str,
        cancel: &CancellationToken,
    ) -> Result<(), CommandError> {
        let c = self.client();
        let deadline = Instant::now() + self.settings.task_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let st = c.task_status(upid).await.map_err(|e| self.api(e))?;
            if !st.is_running() {
                let Some(err) = st.failure() else {
                    return Ok(());
                };
                if let Ok(lines) = c.task_log(upid, 0, 1000).await {
                    let tail: Vec<&str> = lines.iter().map(|l| l.t.as_str()).collect();
                    let tail = &tail[tail.len().saturating_sub(20)..];
                    self.log(format!(
                        "{what} task log ({upid}):\n  {}",
                        tail.join("\n  ")
                    ))
                    .await;
                }
                return Err(CommandError::new(
                    "proxmox_task_failed",
                    format!("Proxmox {what} task failed: {err}"),
                ));
            }
            if Instant::now() >= deadline {
                return Err(CommandError::new(
                    "proxmox_task_timeout",
                    format!(
                        "Proxmox {what} task {upid} still running after {}",
                        secs(self.settings.task_timeout)
                    ),
                )
                .retryable());
            }
            sleep_or_cancel(delay, cancel).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
        }
    }

    pub(super) async fn wait_unlocked(
        &self,
        vmid: u32,
        cancel: &CancellationToken,
    ) -> Result<(), CommandError> {
        self.wait_unlocked_on(&self.node, vmid, cancel).await
    }

    /// Waits until the VM has no `lock` (e.g. `clone`) any more.
    pub(super) async fn wait_unlocked_on(
        &self,
        node: &str,
        vmid: u32,
        cancel: &CancellationToken,
    ) -> Result<(), CommandError> {
        let c = self.client();
        let deadline = Instant::now() + self.settings.task_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let st = c.vm_status(node, vmid).await.map_err(|e| self.api(e))?;
            let Some(lock) = st.lock else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(CommandError::new(
                    "vm_locked",
                    format!(
                        "VM {vmid} is still locked ({lock}) after {}",
                        secs(self.settings.task_timeout)
                    ),
                )
                .retryable());
            }
            sleep_or_cancel(delay, cancel).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
        }
    }
}
