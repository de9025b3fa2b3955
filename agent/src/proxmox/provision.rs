//! The `provision` executor: clone a template, configure, start, wait for the guest's
//! IPv4, run commands in the guest, report the result.
//!
//! What makes it safe to run many at once and to run again:
//! * **VMIDs** are picked under a per-agent mutex (Proxmox's `nextid` reserves nothing),
//!   skipping ids this agent handed out recently; "already exists" from a clone means
//!   someone else won the race, and another id is taken.
//! * **Idempotency**: the VM's description carries `trellis-command=<root command id>`.
//!   Before cloning, the executor looks for a VM with that tag and continues with it, so
//!   a retry or a resumed command never makes a second VM. Commands with the same root id
//!   are also serialised inside the agent. Finished guest commands leave
//!   `trellis-post-provision=done` so they are not run twice.
//! * **Locks**: every task is followed to its end by UPID, and the VM's `lock` must be
//!   gone before the next step.
//! * **Failure or cancel**: the stage is reported `failed`, and the VM this command made is
//!   stopped and destroyed unless `keep_on_failure`; the error's details say what is left.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, LazyLock, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use trellis_protocol::{
    CommandError, LogStream, ProvisionParams, ProvisionResult, ProvisionStatus, StageState,
};
use uuid::Uuid;

use super::client::{ApiError, CloneRequest, ProxmoxClient, Repeat};
use super::types::{ClusterResource, Net0, VmConfig};
use super::upid::Upid;
use super::ProxmoxSettings;
use crate::exec::ExecContext;

pub const TAG_PREFIX: &str = "trellis-command=";
pub const POST_DONE_MARK: &str = "trellis-post-provision=done";
/// Proxmox allows 8 KiB of description; keep room for our lines.
const MAX_USER_DESCRIPTION: usize = 7 * 1024;
/// How long an id handed out by this agent stays off-limits even if Proxmox does not show
/// it yet.
const RECENT_ID_TTL: Duration = Duration::from_secs(120);
const MAX_CLONE_ATTEMPTS: u32 = 10;

/// State shared by every provision on this agent.
struct Shared {
    alloc: Mutex<()>,
    recent: StdMutex<HashMap<String, Vec<(u32, Instant)>>>,
    clone_slots: StdMutex<HashMap<String, Arc<Semaphore>>>,
    commands: StdMutex<HashMap<Uuid, Weak<Mutex<()>>>>,
}

static SHARED: LazyLock<Shared> = LazyLock::new(|| Shared {
    alloc: Mutex::new(()),
    recent: Default::default(),
    clone_slots: Default::default(),
    commands: Default::default(),
});

fn command_lock(root: Uuid) -> Arc<Mutex<()>> {
    let mut map = SHARED.commands.lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(l) = map.get(&root).and_then(Weak::upgrade) {
        return l;
    }
    let l = Arc::new(Mutex::new(()));
    map.insert(root, Arc::downgrade(&l));
    l
}

fn clone_slots(url: &str, n: usize) -> Arc<Semaphore> {
    let mut map = SHARED.clone_slots.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(url.to_string())
        .or_insert_with(|| Arc::new(Semaphore::new(n.max(1))))
        .clone()
}

fn recent_ids(url: &str) -> HashSet<u32> {
    let mut map = SHARED.recent.lock().unwrap_or_else(|e| e.into_inner());
    let v = map.entry(url.to_string()).or_default();
    v.retain(|(_, t)| t.elapsed() < RECENT_ID_TTL);
    v.iter().map(|(id, _)| *id).collect()
}

fn remember_id(url: &str, id: u32) {
    let mut map = SHARED.recent.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(url.to_string())
        .or_default()
        .push((id, Instant::now()));
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

pub async fn run(ctx: &ExecContext, p: ProvisionParams) -> Result<ProvisionResult, CommandError> {
    let settings = ctx
        .config
        .proxmox
        .clone()
        .ok_or_else(super::not_configured)?;
    let client = match super::client_for(ctx) {
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
    let lock = command_lock(ctx.root_command_id);
    let _guard = tokio::select! {
        g = lock.lock() => g,
        _ = ctx.cancel.cancelled() => return Err(cancelled().at_stage("clone_template")),
    };
    match run.steps().await {
        Ok(r) => Ok(r),
        Err(e) => Err(run.fail(e).await),
    }
}

struct Run<'a> {
    ctx: &'a ExecContext,
    client: ProxmoxClient,
    settings: ProxmoxSettings,
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
        self.clone_stage(template_id).await?;

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

        self.post_provision().await?;

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
            status: ProvisionStatus::Completed,
            stages_completed: stages,
        };
        self.complete(
            100.0,
            format!(
                "VM {vm_id} {:?} on {} at {}",
                self.p.name,
                self.node,
                ip.as_deref().unwrap_or("no address")
            ),
        )
        .await;
        Ok(result)
    }

    // ---- clone_template -----------------------------------------------------------------

    async fn clone_stage(&mut self, template_id: u32) -> Result<(), CommandError> {
        let resources = self.client().cluster_vms().await.map_err(|e| self.api(e))?;
        let template = resources
            .iter()
            .find(|r| r.is_qemu() && r.vmid() == Some(template_id));
        let Some(template) = template else {
            return Err(CommandError::new(
                "template_not_found",
                format!("template VMID {template_id} does not exist in the Proxmox cluster"),
            ));
        };
        if !template.template {
            return Err(CommandError::new(
                "invalid_template",
                format!(
                    "VM {template_id} ({}) is not a template; convert it to a template in Proxmox first",
                    template.name.as_deref().unwrap_or("unnamed")
                ),
            ));
        }
        let template_node = template.node.clone().unwrap_or_default();
        if let Some(n) = &self.p.template.template_node {
            if *n != template_node {
                self.log(format!(
                    "template {template_id} lives on node {template_node}, not {n}; using {template_node}"
                ))
                .await;
            }
        }
        let target = self.p.target_node.clone().filter(|t| *t != template_node);
        self.node = target.clone().unwrap_or_else(|| template_node.clone());

        if let Some((vmid, node)) = self.find_existing(&resources).await? {
            // Follow the VM if it was migrated meanwhile.
            self.node = node;
            self.vm = Some(vmid);
            self.log(format!(
                "VM {vmid} on {} was made by an earlier attempt of this command; continuing with it",
                self.node
            ))
            .await;
            self.wait_unlocked(vmid, &self.ctx.cancel.clone()).await?;
            self.complete(20.0, format!("reusing VM {vmid} from an earlier attempt"))
                .await;
            return Ok(());
        }

        let slots = clone_slots(self.client().base_url(), self.settings.max_parallel_clones);
        let _permit = tokio::select! {
            p = slots.acquire_owned() => p.map_err(|_| CommandError::new("internal", "clone slots closed"))?,
            _ = self.ctx.cancel.cancelled() => return Err(cancelled()),
        };
        let description = build_description(
            self.p.template.description.as_deref(),
            self.ctx.root_command_id,
            false,
        );
        let cancel = self.ctx.cancel.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > MAX_CLONE_ATTEMPTS {
                return Err(CommandError::new(
                    "vmid_allocation_failed",
                    format!("no clone succeeded after {MAX_CLONE_ATTEMPTS} attempts (VMID races or lock timeouts)"),
                )
                .retryable());
            }
            let alloc = tokio::select! {
                g = SHARED.alloc.lock() => g,
                _ = self.ctx.cancel.cancelled() => return Err(cancelled()),
            };
            let vmid = self.pick_vmid().await?;
            let req = CloneRequest {
                newid: vmid,
                name: self.p.name.clone(),
                description: description.clone(),
                target: target.clone(),
                // A linked clone can only live where the template's disks are; to
                // put the VM on another node, copy the disks.
                full: target.is_some(),
            };
            self.log(format!(
                "cloning template {template_id} ({}) on {template_node} to VM {vmid}{}",
                template.name.as_deref().unwrap_or("unnamed"),
                target
                    .as_deref()
                    .map(|t| format!(" on {t}"))
                    .unwrap_or_default()
            ))
            .await;
            let res = self
                .client()
                .clone_vm(&template_node, template_id, &req)
                .await;
            remember_id(self.client().base_url(), vmid);
            drop(alloc);
            match res {
                Ok(upid) => {
                    self.vm = Some(vmid);
                    match self.wait_task(&upid, "clone", &cancel).await {
                        Ok(()) => break,
                        // Parallel clones on one storage time out on its lock; Proxmox
                        // drops the half-made VM. Try again a little later.
                        Err(e)
                            if e.code == "proxmox_task_failed"
                                && e.message.contains("got timeout")
                                && attempt < MAX_CLONE_ATTEMPTS =>
                        {
                            self.log(format!(
                                "clone to VM {vmid} hit a lock timeout; trying again ({})",
                                e.message
                            ))
                            .await;
                            self.destroy(vmid, &cancel).await?;
                            self.vm = None;
                            sleep_or_cancel(self.client().retry.delay(attempt), &cancel).await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.is_vmid_taken() => {
                    self.log(format!(
                        "VMID {vmid} was taken meanwhile ({}); trying another",
                        e.message()
                    ))
                    .await;
                }
                Err(e) if e.is_transient() => {
                    // The clone may or may not have started: look before trying again.
                    self.log(format!(
                        "clone request for VM {vmid} failed: {e}; checking whether it happened"
                    ))
                    .await;
                    sleep_or_cancel(self.client().retry.delay(attempt), &cancel).await?;
                    match self.client().vm_config(&self.node, vmid).await {
                        Ok(cfg) if self.is_ours(&cfg) => {
                            self.vm = Some(vmid);
                            self.log(format!("VM {vmid} exists and is ours; following it"))
                                .await;
                            break;
                        }
                        Ok(_) => {}
                        Err(e2) if e2.is_missing() => {}
                        Err(e2) => return Err(self.api(e2)),
                    }
                }
                Err(e) => return Err(self.api(e)),
            }
        }
        let vmid = self.vm.unwrap_or_default();
        self.wait_unlocked(vmid, &cancel).await?;
        self.complete(
            20.0,
            format!(
                "cloned template {template_id} to VM {vmid} on {}",
                self.node
            ),
        )
        .await;
        Ok(())
    }

    /// A config that carries our tag — or, while a clone is still writing it, has no
    /// description yet but the clone lock.
    fn is_ours(&self, cfg: &VmConfig) -> bool {
        has_tag(cfg.description().as_deref(), self.ctx.root_command_id)
            || (cfg.lock().as_deref() == Some("clone") && cfg.description().is_none())
    }

    /// A VM made by an earlier attempt of this command, found by its tag.
    async fn find_existing(
        &self,
        resources: &[ClusterResource],
    ) -> Result<Option<(u32, String)>, CommandError> {
        let root = self.ctx.root_command_id;
        let mut found: Vec<(u32, String)> = Vec::new();
        for r in resources.iter().filter(|r| r.is_qemu() && !r.template) {
            // A clone in progress may show no name yet.
            if r.name.as_deref().is_some_and(|n| n != self.p.name) {
                continue;
            }
            let (Some(node), Some(vmid)) = (r.node.as_deref(), r.vmid()) else {
                continue;
            };
            match self.client().vm_config(node, vmid).await {
                Ok(cfg) if has_tag(cfg.description().as_deref(), root) => {
                    found.push((vmid, node.to_string()));
                }
                Ok(cfg)
                    if cfg.lock().as_deref() == Some("clone") && cfg.description().is_none() =>
                {
                    // Could be ours from a run that died mid-clone: wait for it to settle.
                    self.wait_unlocked_on(node, vmid, &self.ctx.cancel).await?;
                    if let Ok(cfg) = self.client().vm_config(node, vmid).await {
                        if has_tag(cfg.description().as_deref(), root) {
                            found.push((vmid, node.to_string()));
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.is_missing() => {}
                Err(e) => return Err(self.api(e)),
            }
        }
        found.sort();
        if found.len() > 1 {
            self.log(format!(
                "several VMs carry this command's tag ({:?}); using the first",
                found.iter().map(|f| f.0).collect::<Vec<_>>()
            ))
            .await;
        }
        Ok(found.into_iter().next())
    }

    /// Picks a VMID that is free now and not recently handed out by this agent. Called
    /// with the allocation mutex held.
    async fn pick_vmid(&self) -> Result<u32, CommandError> {
        let c = self.client();
        let mut used: HashSet<u32> = c
            .cluster_vms()
            .await
            .map_err(|e| self.api(e))?
            .iter()
            .filter_map(|r| r.vmid())
            .collect();
        used.extend(recent_ids(c.base_url()));
        let mut candidate = match self.p.min_vm_id {
            Some(min) => min.max(100),
            None => c.next_id().await.map_err(|e| self.api(e))?,
        };
        for _ in 0..10_000 {
            if !used.contains(&candidate) {
                if c.is_vmid_free(candidate).await.map_err(|e| self.api(e))? {
                    return Ok(candidate);
                }
                used.insert(candidate);
            }
            candidate = candidate.checked_add(1).ok_or_else(|| {
                CommandError::new("vmid_allocation_failed", "VMID range exhausted")
            })?;
        }
        Err(CommandError::new(
            "vmid_allocation_failed",
            format!(
                "no free VMID found from {}",
                self.p.min_vm_id.unwrap_or(100)
            ),
        ))
    }

    // ---- configure_vm --------------------------------------------------------------------

    async fn configure(&mut self) -> Result<String, CommandError> {
        let vmid = self.vm.unwrap_or_default();
        let cfg = self
            .client()
            .vm_config(&self.node, vmid)
            .await
            .map_err(|e| self.api(e))?;
        self.post_done = cfg
            .description()
            .is_some_and(|d| d.lines().any(|l| l.trim() == POST_DONE_MARK));
        let mut net0 = cfg.net0().unwrap_or_else(|| Net0::parse("virtio"));
        if let Some(b) = &self.p.template.network_bridge {
            net0.bridge = Some(b.clone());
        }
        if net0.bridge.is_none() {
            net0.bridge = Some("vmbr0".into());
        }
        let agent = match cfg.get_str("agent") {
            Some(a) if super::types::property_enabled(&a) => a,
            Some(a) if a.contains("enabled=") => a.replace("enabled=0", "enabled=1"),
            _ => "1".into(),
        };
        let t = &self.p.template;
        let params = vec![
            ("memory", t.memory.to_string()),
            ("cores", t.cores.to_string()),
            ("net0", net0.render()),
            ("agent", agent),
            (
                "description",
                build_description(
                    t.description.as_deref(),
                    self.ctx.root_command_id,
                    self.post_done,
                ),
            ),
        ];
        let mut tries = 0;
        loop {
            tries += 1;
            match self.client().update_config(&self.node, vmid, &params).await {
                Ok(()) => break,
                Err(e) if e.is_locked() && tries < 3 => {
                    self.log(format!("VM {vmid} is locked ({}); waiting", e.message()))
                        .await;
                    self.wait_unlocked(vmid, &self.ctx.cancel.clone()).await?;
                }
                Err(e) => return Err(self.api(e)),
            }
        }
        self.mac = net0.mac.clone();
        if self.mac.is_none() {
            // Proxmox generated one: read it back for matching the guest's interface.
            if let Ok(cfg) = self.client().vm_config(&self.node, vmid).await {
                self.mac = cfg.net0().and_then(|n| n.mac);
            }
        }
        Ok(format!(
            "{} MiB, {} cores, net0 {}, guest agent enabled",
            t.memory,
            t.cores,
            net0.render()
        ))
    }

    // ---- start_vm ------------------------------------------------------------------------

    async fn start(&mut self) -> Result<String, CommandError> {
        let vmid = self.vm.unwrap_or_default();
        let c = self.client();
        let st = c
            .vm_status(&self.node, vmid)
            .await
            .map_err(|e| self.api(e))?;
        if st.is_running() {
            return Ok(format!("VM {vmid} is already running"));
        }
        let cancel = self.ctx.cancel.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match c.power(&self.node, vmid, "start", Repeat::Unsafe).await {
                Ok(upid) => {
                    self.wait_task(&upid, "start", &cancel).await?;
                    break;
                }
                Err(e) if e.message().contains("already running") => break,
                Err(e) if e.is_transient() && attempt < 3 => {
                    self.log(format!("start request failed: {e}; checking the VM"))
                        .await;
                    sleep_or_cancel(c.retry.delay(attempt), &cancel).await?;
                    if c.vm_status(&self.node, vmid)
                        .await
                        .is_ok_and(|s| s.is_running())
                    {
                        break;
                    }
                }
                Err(e) => return Err(self.api(e)),
            }
        }
        let st = c
            .vm_status(&self.node, vmid)
            .await
            .map_err(|e| self.api(e))?;
        if !st.is_running() {
            return Err(CommandError::new(
                "vm_not_running",
                format!("VM {vmid} is {} after its start task ended", st.status),
            ));
        }
        Ok(format!("VM {vmid} is running"))
    }

    // ---- wait_network --------------------------------------------------------------------

    async fn wait_network(&mut self, timeout: Duration) -> Result<String, CommandError> {
        let vmid = self.vm.unwrap_or_default();
        let c = self.client();
        let started = Instant::now();
        let deadline = started + timeout;
        let st = c
            .vm_status(&self.node, vmid)
            .await
            .map_err(|e| self.api(e))?;
        if !st.agent {
            return Err(CommandError::new(
                "guest_agent_disabled",
                format!("the QEMU guest agent is not enabled for VM {vmid} (config `agent`)"),
            ));
        }
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        loop {
            let state = match c.guest_interfaces(&self.node, vmid).await {
                Ok(ifaces) => match super::types::pick_ipv4(&ifaces, self.mac.as_deref()) {
                    Some((ip, iface)) => {
                        self.ip = Some(ip);
                        return Ok(format!("IPv4 {ip} on {iface}"));
                    }
                    None => "the guest reports no usable IPv4 address yet".to_string(),
                },
                Err(e) if e.message().contains("guest agent is not running") => {
                    "the QEMU guest agent is not running yet (guest booting)".to_string()
                }
                Err(e) if e.message().contains("No QEMU guest agent configured") => {
                    return Err(CommandError::new(
                        "guest_agent_disabled",
                        e.message().to_string(),
                    ));
                }
                Err(e) if e.message().contains("is not running") => {
                    return Err(CommandError::new(
                        "vm_not_running",
                        format!(
                            "VM {vmid} stopped while waiting for its network: {}",
                            e.message()
                        ),
                    ));
                }
                Err(e) if e.is_transient() || e.status() == Some(500) => e.message().to_string(),
                Err(e) => return Err(self.api(e)),
            };
            if state != last {
                self.log(format!("waiting for network: {state}")).await;
                let frac = started.elapsed().as_secs_f32() / timeout.as_secs_f32();
                self.ctx
                    .progress(40.0 + 30.0 * frac.min(1.0), Some(state.clone()))
                    .await;
                last = state;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommandError::new(
                    "network_timeout",
                    format!(
                        "VM {vmid} reported no IPv4 address within {} ({last}); check that qemu-guest-agent is \
                         installed and enabled in the template and that net0's bridge has DHCP",
                        secs(timeout)
                    ),
                )
                .retryable());
            }
            sleep_or_cancel(delay.min(deadline - now), &self.ctx.cancel).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
        }
    }

    // ---- post_provision ------------------------------------------------------------------

    async fn post_provision(&mut self) -> Result<(), CommandError> {
        let t = &self.p.template;
        let commands: Vec<String> = t
            .pre_provision_commands
            .iter()
            .chain(t.post_provision_commands.iter())
            .filter(|c| !c.trim().is_empty())
            .cloned()
            .collect();
        let skip = if self.p.skip_post_provision {
            Some("skipped: skip_post_provision is set")
        } else if commands.is_empty() {
            Some("skipped: no commands to run")
        } else if self.post_done {
            Some("skipped: the commands already ran in an earlier attempt")
        } else {
            None
        };
        if let Some(reason) = skip {
            self.stage = "post_provision";
            if self.ctx.is_cancelled() {
                return Err(cancelled());
            }
            self.ctx
                .stage(
                    "post_provision",
                    StageState::Skipped,
                    Some(95.0),
                    Some(reason.into()),
                )
                .await;
            self.log(format!("[post_provision] {reason}")).await;
            return Ok(());
        }
        let n = commands.len();
        self.begin(
            "post_provision",
            70.0,
            format!("running {n} command(s) in the guest"),
        )
        .await?;
        for (i, cmd) in commands.iter().enumerate() {
            self.guest_command(i + 1, n, cmd).await?;
            self.ctx
                .progress(
                    70.0 + 25.0 * (i + 1) as f32 / n as f32,
                    Some(format!("{}/{n} commands done", i + 1)),
                )
                .await;
        }
        let vmid = self.vm.unwrap_or_default();
        let desc = build_description(
            self.p.template.description.as_deref(),
            self.ctx.root_command_id,
            true,
        );
        if let Err(e) = self
            .client()
            .update_config(&self.node, vmid, &[("description", desc)])
            .await
        {
            self.log(format!(
                "could not mark the commands as done on VM {vmid}: {e}"
            ))
            .await;
        }
        self.post_done = true;
        self.complete(95.0, format!("{n} command(s) succeeded"))
            .await;
        Ok(())
    }

    async fn guest_command(&self, i: usize, n: usize, cmd: &str) -> Result<(), CommandError> {
        let vmid = self.vm.unwrap_or_default();
        let c = self.client();
        let started = Instant::now();
        self.log(format!("[{i}/{n}] $ {cmd}")).await;
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), cmd.to_string()];
        let pid = c
            .guest_exec(&self.node, vmid, &argv)
            .await
            .map_err(|e| self.api(e))?;
        let deadline = started + self.settings.command_timeout;
        let mut delay = Duration::from_millis(150);
        let status = loop {
            let s = c
                .guest_exec_status(&self.node, vmid, pid)
                .await
                .map_err(|e| self.api(e))?;
            if s.exited {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(CommandError::new(
                    "command_timeout",
                    format!(
                        "command {i}/{n} `{cmd}` still running after {}",
                        secs(self.settings.command_timeout)
                    ),
                ));
            }
            sleep_or_cancel(delay, &self.ctx.cancel).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(2));
        };
        if let Some(out) = status.out_data.as_deref().filter(|s| !s.is_empty()) {
            self.ctx.log(LogStream::Stdout, out).await;
        }
        if let Some(err) = status.err_data.as_deref().filter(|s| !s.is_empty()) {
            self.ctx.log(LogStream::Stderr, err).await;
        }
        if status.out_truncated || status.err_truncated {
            self.log("(output truncated by the guest agent)").await;
        }
        let code = status.exitcode.unwrap_or(-1);
        let how = match status.signal {
            Some(sig) => format!("killed by signal {sig}"),
            None => format!("exit code {code}"),
        };
        self.log(format!("[{i}/{n}] {how} ({})", secs(started.elapsed())))
            .await;
        if code != 0 || status.signal.is_some() {
            let last_err = status
                .err_data
                .as_deref()
                .and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty()))
                .map(|l| format!(": {}", l.trim()))
                .unwrap_or_default();
            return Err(CommandError::new(
                "post_provision_failed",
                format!("command {i}/{n} `{cmd}` failed with {how}{last_err}"),
            ));
        }
        Ok(())
    }

    // ---- tasks and locks -----------------------------------------------------------------

    /// Polls a task to its end; a failed task's log tail goes to the command log.
    async fn wait_task(
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

    async fn wait_unlocked(
        &self,
        vmid: u32,
        cancel: &CancellationToken,
    ) -> Result<(), CommandError> {
        self.wait_unlocked_on(&self.node, vmid, cancel).await
    }

    /// Waits until the VM has no `lock` (e.g. `clone`) any more.
    async fn wait_unlocked_on(
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

    // ---- failure -------------------------------------------------------------------------

    async fn fail(&mut self, err: CommandError) -> CommandError {
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
        if let Some(d) = details {
            err = err.with_details(d);
        }
        err
    }

    /// Destroys the half-built VM (or keeps it when asked); returns what is left.
    async fn cleanup(&mut self) -> Option<serde_json::Value> {
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

    async fn destroy(&self, vmid: u32, cancel: &CancellationToken) -> Result<(), CommandError> {
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
