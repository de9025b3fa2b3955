//! The `provision` executor: clone a template, configure, start, wait for the guest's
//! IPv4, run commands in the guest, report the result.
//!
//! What makes it safe to run many at once and to run again:
//! * **VMIDs** are picked under the executor's allocation lock (Proxmox's `nextid`
//!   reserves nothing), skipping ids this executor handed out recently; "already exists"
//!   from a clone means someone else won the race, and another id is taken (`vmid.rs`).
//! * **Idempotency**: the VM's description carries `trellis-command=<root command id>`.
//!   Before cloning, the executor looks for a VM with that tag and continues with it, so
//!   a retry or a resumed command never makes a second VM (`clone.rs`). Commands with the
//!   same root id are also serialised inside the executor. Finished guest commands leave
//!   `trellis-post-provision=done` so they are not run twice (`guest_agent.rs`).
//! * **Locks**: every task is followed to its end by UPID, and the VM's `lock` must be
//!   gone before the next step (`tasks.rs`).
//! * **Failure or cancel**: the stage is reported `failed`, and the VM this command made is
//!   stopped and destroyed unless `keep_on_failure`; the error's details say what is left
//!   (`cleanup.rs`).
//! * **Post-provision failure**: once the VM is up, failing guest commands do not destroy
//!   it: the stage is reported `failed`, `register` still runs, and the command succeeds
//!   with `status: partial` and the `post_provision_failed` error in the result.
//! * **Tags**: besides the description line, the VM gets the Proxmox tag
//!   `trellis-<root id>` (`configure.rs`), which the inventory reads from one list call.
//!
//! This file holds the stage sequence and the bookkeeping every stage uses; each stage's
//! work lives in the file named after it, as more methods on `Run`.

mod cleanup;
mod clone;
mod configure;
mod guest_agent;
mod tasks;
pub mod vmid;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use trellis_protocol::{
    CommandError, LogStream, ProvisionParams, ProvisionResult, ProvisionStatus, StageState,
};
use uuid::Uuid;

use super::client::{ApiError, ProxmoxClient};
use super::ProxmoxSettings;
use crate::exec::ExecContext;
use vmid::VmidAllocator;

pub const TAG_PREFIX: &str = "trellis-command=";
pub const POST_DONE_MARK: &str = "trellis-post-provision=done";
/// Proxmox allows 8 KiB of description; keep room for our lines.
const MAX_USER_DESCRIPTION: usize = 7 * 1024;

/// State shared by every provision of one [`ProxmoxExecutor`](super::ProxmoxExecutor).
#[derive(Debug)]
pub struct Shared {
    vmids: VmidAllocator,
    /// Clones running at once (`max_parallel_clones`).
    clone_slots: Arc<Semaphore>,
    /// One lock per root command id, alive while some attempt holds it.
    commands: StdMutex<HashMap<Uuid, Weak<Mutex<()>>>>,
}

impl Shared {
    pub fn new(max_parallel_clones: usize) -> Self {
        Self {
            vmids: VmidAllocator::default(),
            clone_slots: Arc::new(Semaphore::new(max_parallel_clones.max(1))),
            commands: Default::default(),
        }
    }

    pub fn vmids(&self) -> &VmidAllocator {
        &self.vmids
    }

    fn command_lock(&self, root: Uuid) -> Arc<Mutex<()>> {
        let mut map = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = map.get(&root).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(Mutex::new(()));
        map.insert(root, Arc::downgrade(&l));
        l
    }
}

fn cancelled() -> CommandError {
    CommandError::new("cancelled", "cancelled")
}

/// Sleeps, or fails at once when `cancel` fires.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> Result<(), CommandError> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = cancel.cancelled() => Err(cancelled()),
    }
}

/// Whether a description carries this command's tag.
pub fn has_tag(description: Option<&str>, root: Uuid) -> bool {
    let tag = format!("{TAG_PREFIX}{root}");
    description.is_some_and(|d| d.lines().any(|l| l.trim() == tag))
}

/// The VM description: the user's text, then our tag (and the post-provision mark).
pub fn build_description(user: Option<&str>, root: Uuid, post_done: bool) -> String {
    let mut text: String = user
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim().starts_with(TAG_PREFIX) && l.trim() != POST_DONE_MARK)
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string();
    if text.len() > MAX_USER_DESCRIPTION {
        let mut end = MAX_USER_DESCRIPTION;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(TAG_PREFIX);
    text.push_str(&root.to_string());
    if post_done {
        text.push('\n');
        text.push_str(POST_DONE_MARK);
    }
    text
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Runs one `provision`. `client` is the executor's client for this command, or what is
/// wrong with its settings (reported as the first stage failing).
pub async fn run(
    ctx: &ExecContext,
    settings: &ProxmoxSettings,
    shared: &Shared,
    client: Result<ProxmoxClient, CommandError>,
    p: ProvisionParams,
) -> Result<ProvisionResult, CommandError> {
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            // Unusable settings: say so on the first stage.
            ctx.stage(
                "clone_template",
                StageState::Failed,
                Some(0.0),
                Some(e.message.clone()),
            )
            .await;
            return Err(e.at_stage("clone_template"));
        }
    };
    let mut run = Run {
        ctx,
        client,
        settings,
        shared,
        p,
        node: String::new(),
        vm: None,
        mac: None,
        ip: None,
        post_done: false,
        stage: "clone_template",
        stage_pct: 0.0,
        stage_started: Instant::now(),
        completed: Vec::new(),
    };
    // One provision per root command at a time on this agent: a duplicate waits and then
    // finds the VM the first one made.
    let lock = shared.command_lock(ctx.root_command_id);
    let _guard = tokio::select! {
        g = lock.lock() => g,
        _ = ctx.cancel.cancelled() => return Err(cancelled().at_stage("clone_template")),
    };
    match run.steps().await {
        Ok(r) => Ok(r),
        Err(e) => Err(run.fail(e).await),
    }
}

/// One provision in progress: what it was asked, what it made so far, where it is.
struct Run<'a> {
    ctx: &'a ExecContext,
    client: ProxmoxClient,
    settings: &'a ProxmoxSettings,
    shared: &'a Shared,
    p: ProvisionParams,
    /// Node the new VM lives on.
    node: String,
    vm: Option<u32>,
    mac: Option<String>,
    ip: Option<Ipv4Addr>,
    post_done: bool,
    stage: &'static str,
    stage_pct: f32,
    stage_started: Instant,
    completed: Vec<String>,
}

impl Run<'_> {
    fn client(&self) -> &ProxmoxClient {
        &self.client
    }

    fn api(&self, e: ApiError) -> CommandError {
        self.client.command_error(&e)
    }

    async fn log(&self, msg: impl AsRef<str>) {
        let msg = msg.as_ref();
        tracing::info!(command_id = %self.ctx.command_id, vm_id = ?self.vm, "{msg}");
        self.ctx.log(LogStream::System, &format!("{msg}\n")).await;
    }

    async fn begin(
        &mut self,
        stage: &'static str,
        pct: f32,
        msg: String,
    ) -> Result<(), CommandError> {
        self.stage = stage;
        self.stage_pct = pct;
        self.stage_started = Instant::now();
        if self.ctx.is_cancelled() {
            return Err(cancelled());
        }
        self.ctx
            .stage(stage, StageState::Running, Some(pct), Some(msg.clone()))
            .await;
        self.log(format!("[{stage}] {msg}")).await;
        Ok(())
    }

    async fn complete(&mut self, pct: f32, msg: String) {
        let took = self.stage_started.elapsed();
        let msg = format!("{msg} ({})", secs(took));
        self.ctx
            .stage(
                self.stage,
                StageState::Completed,
                Some(pct),
                Some(msg.clone()),
            )
            .await;
        self.log(format!("[{}] done: {msg}", self.stage)).await;
        self.completed.push(self.stage.to_string());
    }

    async fn steps(&mut self) -> Result<ProvisionResult, CommandError> {
        let template_id = self.p.template.template_id.ok_or_else(|| {
            CommandError::new("invalid_params", "template.template_id is required")
        })?;
        self.begin(
            "clone_template",
            0.0,
            format!(
                "cloning template {template_id} to a new VM {:?}",
                self.p.name
            ),
        )
        .await?;
        if let Err(e) = self.clone_stage(template_id).await {
            return Err(self.attribute_clone_error(e));
        }

        self.begin(
            "configure_vm",
            20.0,
            "setting memory, cores, network and guest agent".into(),
        )
        .await?;
        let summary = self.configure().await?;
        self.complete(30.0, summary).await;

        self.begin("start_vm", 30.0, "starting the VM".into())
            .await?;
        let summary = self.start().await?;
        self.complete(40.0, summary).await;

        let timeout = Duration::from_secs(self.p.network_timeout_secs.unwrap_or(300).max(1));
        self.begin(
            "wait_network",
            40.0,
            format!(
                "waiting up to {} for the guest agent to report an IPv4 address",
                secs(timeout)
            ),
        )
        .await?;
        let summary = self.wait_network(timeout).await?;
        self.complete(70.0, summary).await;

        // The VM is up: failing guest commands leave it running (a partial result), and
        // only a cancel still ends in the usual failure and cleanup.
        let partial = match self.post_provision().await {
            Ok(()) => None,
            Err(e) if e.code == "cancelled" || self.ctx.is_cancelled() => return Err(e),
            Err(e) => Some(self.keep_partial(e).await),
        };

        self.begin("register", 95.0, "reporting the new VM".into())
            .await?;
        let vm_id = self.vm.unwrap_or_default();
        let ip = self.ip.map(|ip| ip.to_string());
        let mut stages = self.completed.clone();
        stages.push("register".into());
        let result = ProvisionResult {
            vm_id,
            node: self.node.clone(),
            ip_address: ip.clone(),
            name: self.p.name.clone(),
            status: if partial.is_some() {
                ProvisionStatus::Partial
            } else {
                ProvisionStatus::Completed
            },
            stages_completed: stages,
            error: partial,
        };
        self.complete(
            100.0,
            format!(
                "VM {vm_id} {:?} on {} at {}{}",
                self.p.name,
                self.node,
                ip.as_deref().unwrap_or("no address"),
                if result.error.is_some() {
                    " (partial: post-provision commands failed)"
                } else {
                    ""
                }
            ),
        )
        .await;
        Ok(result)
    }

    /// Post-provision commands failed on a VM that is up: report the stage failed, keep
    /// the VM, and return the error the partial result carries.
    async fn keep_partial(&mut self, e: CommandError) -> CommandError {
        self.ctx
            .stage(
                "post_provision",
                StageState::Failed,
                Some(self.stage_pct),
                Some(e.message.clone()),
            )
            .await;
        let vmid = self.vm.unwrap_or_default();
        self.log(format!(
            "[post_provision] failed: {}; VM {vmid} is up and kept (partial result)",
            e.message
        ))
        .await;
        let mut err = CommandError::new("post_provision_failed", e.message.clone())
            .at_stage("post_provision");
        if e.code != "post_provision_failed" {
            err = err.with_details(serde_json::json!({"cause": e.code}));
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_tagging() {
        let root = Uuid::nil();
        let d = build_description(Some("web server\nteam A\n"), root, false);
        assert_eq!(d, format!("web server\nteam A\n\n{TAG_PREFIX}{root}"));
        assert!(has_tag(Some(&d), root));
        assert!(!has_tag(Some(&d), Uuid::from_u128(1)));
        assert!(!has_tag(None, root));
        // Rebuilding keeps exactly one tag and adds the mark.
        let d2 = build_description(Some(&d), root, true);
        assert_eq!(d2.matches(TAG_PREFIX).count(), 1);
        assert!(d2.ends_with(POST_DONE_MARK));
        assert_eq!(
            build_description(None, root, false),
            format!("{TAG_PREFIX}{root}")
        );
        let long = "é".repeat(10_000);
        assert!(build_description(Some(&long), root, true).len() < 8192);
    }
}
