//! What the VM lifecycle commands (`vm_power`, `destroy`) share: one command's client,
//! context and current stage ([`Op`]), finding a VM that may have moved, following a task
//! to its end, polling `status/current`, and per-VMID serialisation ([`VmLocks`]).
//!
//! Provision keeps its own richer bookkeeping (`provision::Run`); these commands are short
//! sequences of "ask, then watch until it happened", so their helpers live here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use trellis_protocol::{CommandError, LogStream, StageState};

use super::client::{ApiError, ProxmoxClient};
use super::types::{ClusterResource, VmStatus};
use super::upid::Upid;
use super::ProxmoxSettings;
use crate::exec::ExecContext;

/// One lock per VMID, alive while some command holds it: a power action and a destroy of
/// the same VM on one agent never interleave.
#[derive(Debug, Default)]
pub struct VmLocks {
    map: StdMutex<HashMap<u32, Weak<Mutex<()>>>>,
}

impl VmLocks {
    pub fn lock_for(&self, vmid: u32) -> Arc<Mutex<()>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = map.get(&vmid).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(Mutex::new(()));
        map.insert(vmid, Arc::downgrade(&l));
        l
    }
}

pub fn cancelled() -> CommandError {
    CommandError::new("cancelled", "cancelled")
}

/// How a Proxmox task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEnd {
    Ok,
    /// The task's exit status (the error text).
    Failed(String),
}

/// One lifecycle command in progress.
pub struct Op<'a> {
    pub ctx: &'a ExecContext,
    pub client: ProxmoxClient,
    pub settings: &'a ProxmoxSettings,
    pub vmid: u32,
    /// Where the VM is now (the command's hint until it was looked up).
    pub node: String,
    stage: Option<&'static str>,
    stage_pct: f32,
    stage_started: Instant,
}

impl<'a> Op<'a> {
    pub fn new(
        ctx: &'a ExecContext,
        client: ProxmoxClient,
        settings: &'a ProxmoxSettings,
        vmid: u32,
        node: &str,
    ) -> Self {
        Self {
            ctx,
            client,
            settings,
            vmid,
            node: node.to_string(),
            stage: None,
            stage_pct: 0.0,
            stage_started: Instant::now(),
        }
    }

    pub fn api(&self, e: &ApiError) -> CommandError {
        self.client.command_error(e)
    }

    pub async fn log(&self, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        tracing::info!(command_id = %self.ctx.command_id, vm_id = self.vmid, "{msg}");
        self.ctx.log(LogStream::System, &format!("{msg}\n")).await;
    }

    /// Starts a stage (fails at once when the command was cancelled).
    pub async fn begin(
        &mut self,
        stage: &'static str,
        pct: f32,
        msg: impl Into<String>,
    ) -> Result<(), CommandError> {
        if self.ctx.is_cancelled() {
            return Err(cancelled());
        }
        let msg = msg.into();
        self.stage = Some(stage);
        self.stage_pct = pct;
        self.stage_started = Instant::now();
        self.ctx
            .stage(stage, StageState::Running, Some(pct), Some(msg.clone()))
            .await;
        self.log(format!("[{stage}] {msg}")).await;
        Ok(())
    }

    pub async fn complete(&mut self, pct: f32, msg: impl Into<String>) {
        let Some(stage) = self.stage.take() else {
            return;
        };
        let msg = format!(
            "{} ({:.1} s)",
            msg.into(),
            self.stage_started.elapsed().as_secs_f64()
        );
        self.ctx
            .stage(stage, StageState::Completed, Some(pct), Some(msg.clone()))
            .await;
        self.log(format!("[{stage}] done: {msg}")).await;
    }

    /// Reports a stage that has nothing to do.
    pub async fn skip(&mut self, stage: &'static str, pct: f32, reason: impl Into<String>) {
        let reason = reason.into();
        self.stage = None;
        self.ctx
            .stage(stage, StageState::Skipped, Some(pct), Some(reason.clone()))
            .await;
        self.log(format!("[{stage}] skipped: {reason}")).await;
    }

    /// Reports the running stage failed and returns the error marked with it. A failure
    /// after a cancel is reported as the cancel.
    pub async fn fail(&mut self, err: CommandError) -> CommandError {
        let err = if self.ctx.is_cancelled() && err.code != "cancelled" {
            CommandError::new("cancelled", format!("cancelled ({})", err.message))
        } else {
            err
        };
        let Some(stage) = self.stage.take() else {
            self.log(format!("failed: {}", err.message)).await;
            return err;
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
        err.at_stage(stage)
    }

    /// Sleeps, or fails at once when the command is cancelled.
    pub async fn sleep(&self, d: Duration) -> Result<(), CommandError> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.ctx.cancel.cancelled() => Err(cancelled()),
        }
    }

    /// The VM's entry in `/cluster/resources` (one list call), if it exists.
    pub async fn find_in_cluster(&self) -> Result<Option<ClusterResource>, CommandError> {
        let all = tokio::select! {
            r = self.client.cluster_vms() => r.map_err(|e| self.api(&e))?,
            _ = self.ctx.cancel.cancelled() => return Err(cancelled()),
        };
        Ok(all
            .into_iter()
            .find(|r| r.is_qemu() && r.vmid() == Some(self.vmid)))
    }

    /// Looks the VM up in `/cluster/resources` and follows it to its node; `None` when
    /// the cluster has no such VM.
    pub async fn relocate(&mut self) -> Result<Option<ClusterResource>, CommandError> {
        let found = self.find_in_cluster().await?;
        if let Some(node) = found.as_ref().and_then(|r| r.node.clone()) {
            if node != self.node {
                self.log(format!(
                    "VM {} is on node {node}, not {} (migrated?); following it",
                    self.vmid, self.node
                ))
                .await;
                self.node = node;
            }
        }
        Ok(found)
    }

    /// `status/current` on the VM's node; `Ok(None)` when the VM is not there.
    pub async fn status_here(&self) -> Result<Option<VmStatus>, ApiError> {
        match self.client.vm_status(&self.node, self.vmid).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `status/current`, following the VM to another node when it is not on the one we
    /// knew; `Ok(None)` when the cluster has no such VM.
    pub async fn status(&mut self) -> Result<Option<VmStatus>, CommandError> {
        match self.status_here().await {
            Ok(Some(s)) => return Ok(Some(s)),
            Ok(None) => {}
            // A wrong node hint may fail otherwise ("no such node", hostname lookup);
            // the cluster list says where the VM really is.
            Err(e) if !e.is_transient() && e.status().is_some_and(|s| s != 401 && s != 403) => {
                tracing::debug!(error = %e, "status/current failed; looking the VM up");
            }
            Err(e) => return Err(self.api(&e)),
        }
        if self.relocate().await?.is_none() {
            return Ok(None);
        }
        // On its (new) node now; still missing there means it went away meanwhile.
        self.status_here()
            .await
            .map_err(|e| self.client.command_error(&e))
    }

    /// Polls a task to its end (bounded by the task timeout, stopped by cancel). A failed
    /// task's log tail goes to the command log.
    pub async fn wait_task(&self, upid: &Upid, what: &str) -> Result<TaskEnd, CommandError> {
        let c = &self.client;
        let deadline = Instant::now() + self.settings.task_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            let st = c.task_status(upid).await.map_err(|e| self.api(&e))?;
            if !st.is_running() {
                let Some(err) = st.failure() else {
                    return Ok(TaskEnd::Ok);
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
                return Ok(TaskEnd::Failed(err));
            }
            if Instant::now() >= deadline {
                return Err(CommandError::new(
                    "proxmox_task_timeout",
                    format!(
                        "Proxmox {what} task {upid} still running after {} s",
                        self.settings.task_timeout.as_secs()
                    ),
                )
                .retryable());
            }
            self.sleep(delay).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
        }
    }

    /// [`Op::wait_task`], with a failed task as an error.
    pub async fn wait_task_ok(&self, upid: &Upid, what: &str) -> Result<(), CommandError> {
        match self.wait_task(upid, what).await? {
            TaskEnd::Ok => Ok(()),
            TaskEnd::Failed(err) => Err(CommandError::new(
                "proxmox_task_failed",
                format!("Proxmox {what} task for VM {} failed: {err}", self.vmid),
            )),
        }
    }
}
