//! What happens when a stage fails or the command is cancelled: report the failed stage,
//! then stop and destroy the VM this command made (or keep it when `keep_on_failure`),
//! and say in the error's details what is left.
//!
//! Kept apart because it must work from any stage and outlive a cancel (it uses its own
//! token that never fires).

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use trellis_protocol::{CommandError, StageState};

use super::{sleep_or_cancel, Run};
use crate::proxmox::client::Repeat;

impl Run<'_> {
    pub(super) async fn fail(&mut self, err: CommandError) -> CommandError {
        let stage = self.stage;
        let cancelled_now = self.ctx.is_cancelled();
        let err = if cancelled_now && err.code != "cancelled" {
            // Whatever broke, the cause is the cancel.
            CommandError::new("cancelled", format!("cancelled ({})", err.message))
        } else {
            err
        };
        self.ctx
            .stage(
                stage,
                StageState::Failed,
                Some(self.stage_pct),
                Some(err.message.clone()),
            )
            .await;
        self.log(format!("[{stage}] failed: {}", err.message)).await;
        let details = self.cleanup().await;
        let mut err = err.at_stage(stage);
        if let Some(serde_json::Value::Object(mut d)) = details {
            // Keep what the error already said (e.g. `field`: the setting at fault).
            if let Some(serde_json::Value::Object(before)) = err.details.take() {
                for (k, v) in before {
                    d.entry(k).or_insert(v);
                }
            }
            err = err.with_details(d.into());
        }
        err
    }

    /// Destroys the half-built VM (or keeps it when asked); returns what is left.
    pub(super) async fn cleanup(&mut self) -> Option<serde_json::Value> {
        let vmid = self.vm?;
        let node = self.node.clone();
        if self.p.keep_on_failure {
            self.log(format!(
                "keeping VM {vmid} on {node} for inspection (keep_on_failure)"
            ))
            .await;
            return Some(json!({"vm_id": vmid, "node": node, "status": "partial",
                "stages_completed": self.completed}));
        }
        self.log(format!(
            "cleaning up: stopping and destroying VM {vmid} on {node}"
        ))
        .await;
        // Cleanup outlives a cancel: it has its own token that never fires.
        let never = CancellationToken::new();
        match self.destroy(vmid, &never).await {
            Ok(()) => {
                self.log(format!("VM {vmid} destroyed")).await;
                Some(json!({"vm_id": vmid, "node": node, "status": "cleaned_up"}))
            }
            Err(e) => {
                self.log(format!(
                    "cleanup of VM {vmid} failed: {}; it is left on {node}",
                    e.message
                ))
                .await;
                Some(json!({"vm_id": vmid, "node": node, "status": "partial",
                    "stages_completed": self.completed, "cleanup_error": e.message}))
            }
        }
    }

    pub(super) async fn destroy(
        &self,
        vmid: u32,
        cancel: &CancellationToken,
    ) -> Result<(), CommandError> {
        let c = self.client();
        let node = self.node.as_str();
        // A clone still running (e.g. after a cancel) holds the lock: let it end.
        match self.wait_unlocked(vmid, cancel).await {
            Err(e) if e.message.contains("does not exist") => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        for attempt in 1..=3 {
            let st = match c.vm_status(node, vmid).await {
                Ok(st) => st,
                Err(e) if e.is_missing() => return Ok(()),
                Err(e) => return Err(self.api(e)),
            };
            if st.is_running() {
                match c.power(node, vmid, "stop", Repeat::Safe).await {
                    Ok(upid) => self.wait_task(&upid, "stop", cancel).await?,
                    Err(e) if e.is_missing() => return Ok(()),
                    Err(e) => return Err(self.api(e)),
                }
            }
            match c.delete_vm(node, vmid).await {
                Ok(upid) => {
                    self.wait_task(&upid, "destroy", cancel).await?;
                    return Ok(());
                }
                Err(e) if e.is_missing() => return Ok(()),
                // Started meanwhile, or a lock from a task we do not know: go round again.
                Err(e) if (e.message().contains("is running") || e.is_locked()) && attempt < 3 => {
                    sleep_or_cancel(Duration::from_millis(500), cancel).await?;
                }
                Err(e) => return Err(self.api(e)),
            }
        }
        Err(CommandError::new(
            "cleanup_failed",
            format!("VM {vmid} could not be destroyed"),
        ))
    }
}
