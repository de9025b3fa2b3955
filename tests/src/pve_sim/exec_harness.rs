//! Drives the agent's Proxmox executors directly (no control plane) against a running
//! `pve-sim`: a [`Recorded`] command's reports land in a [`Recorder`] the test inspects.

use tendril::proxmox::{ProxmoxExecutor, ProxmoxSettings};
use trellis_protocol::{
    CommandError, ProvisionParams, ProvisionResult, ProvisionTemplate, StageState,
};
use uuid::Uuid;

use super::process::SimProcess;
use super::state::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET};
use crate::recorder::Recorder;

/// Settings that reach `sim` with the default token.
pub fn settings_for(sim: &SimProcess) -> ProxmoxSettings {
    let mut s = ProxmoxSettings::new(sim.url.clone(), DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET);
    s.tls_fingerprint = sim.fingerprint.clone();
    s
}

/// A Proxmox executor for `sim` with the default token. Commands that must share VMID
/// allocation and per-command locks (as on one agent) use the same executor.
pub fn executor_for(sim: &SimProcess) -> ProxmoxExecutor {
    ProxmoxExecutor::new(settings_for(sim))
}

/// Starts `pve-sim` (the binary `bin`) with short task durations, then `extra`.
pub async fn fast_sim(bin: &str, extra: &[&str]) -> SimProcess {
    let mut args = vec![
        "--clone-ms",
        "300",
        "--start-ms",
        "150",
        "--stop-ms",
        "80",
        "--destroy-ms",
        "80",
        "--agent-boot-ms",
        "400",
        "--exec-ms",
        "30",
        "--auth-fail-delay-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    SimProcess::start(bin, &args).await.expect("pve-sim starts")
}

/// One command on a Proxmox executor, its reports recorded. Derefs to its [`Recorder`]
/// (`ctx`, `stages()`, `log(…)`, …).
pub struct Recorded {
    executor: ProxmoxExecutor,
    rec: Recorder,
}

impl Recorded {
    /// A fresh command on `executor` (`root` = its own id unless given).
    pub fn new(executor: &ProxmoxExecutor, root: Option<Uuid>) -> anyhow::Result<Self> {
        Ok(Self {
            executor: executor.clone(),
            rec: Recorder::new(root),
        })
    }

    /// Runs the `provision` executor, recording reports as they arrive.
    pub async fn provision(&mut self, p: ProvisionParams) -> Result<ProvisionResult, CommandError> {
        let executor = self.executor.clone();
        self.rec
            .run(|ctx| async move { executor.provision(&ctx, p).await })
            .await
    }
}

impl std::ops::Deref for Recorded {
    type Target = Recorder;

    fn deref(&self) -> &Recorder {
        &self.rec
    }
}

impl std::ops::DerefMut for Recorded {
    fn deref_mut(&mut self) -> &mut Recorder {
        &mut self.rec
    }
}

/// Provision params for `name` from template 9000 (1 GiB, 2 cores, bridge `vmbr1`,
/// 20 s network timeout, no guest commands).
pub fn provision_params(name: &str) -> ProvisionParams {
    ProvisionParams {
        name: name.into(),
        template: ProvisionTemplate {
            kind: "proxmox".into(),
            template_id: Some(9000),
            template_node: None,
            memory: 1024,
            cores: 2,
            description: Some("made by a test".into()),
            network_bridge: Some("vmbr1".into()),
            pre_provision_commands: vec![],
            post_provision_commands: vec![],
        },
        target_node: None,
        min_vm_id: None,
        skip_post_provision: false,
        keep_on_failure: false,
        network_timeout_secs: Some(20),
        clone_options: Default::default(),
    }
}

/// `(stage, state)` as [`Recorder::stages`] lists them.
pub fn stage(name: &str, state: StageState) -> (String, StageState) {
    (name.to_string(), state)
}
