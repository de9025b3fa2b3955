//! Proxmox VE executor: `list_templates`, `provision`, `vm_power` and `destroy`, and the
//! VM inventory, on a small API client.
//!
//! * [`ProxmoxExecutor`]: owns the connection settings and the state every command on
//!   this agent shares (VMID allocation, clone slots, per-command and per-VM locks).
//! * [`settings`]: the settings and the `PROXMOX_*` variables they are read from.
//! * [`client`]: the HTTP client (token auth, envelope, typed errors, retries).
//! * [`tls`]: certificate fingerprint pinning, CA file, explicit insecure mode.
//! * [`types`] / [`upid`]: the API's answers, parsed leniently.
//! * [`provision`]: the provision stages, VMID allocation, idempotency and cleanup.
//! * [`power`] / [`destroy`]: the VM lifecycle commands, on the helpers in [`op`].
//! * [`inventory`]: every VM of the cluster from one list call, for the control plane.
//!
//! See `shared/proxmox-api.md` for the API facts and pitfalls this follows.

pub mod client;
pub mod destroy;
pub mod inventory;
pub mod op;
pub mod power;
pub mod provision;
pub mod settings;
pub mod tls;
pub mod types;
pub mod upid;

use std::sync::Arc;

use trellis_protocol::{
    CommandError, DestroyParams, DestroyResult, Inventory, ListTemplatesParams,
    ListTemplatesResult, LogStream, ProvisionParams, ProvisionResult, ProxmoxTemplate,
    VmPowerParams, VmPowerResult,
};

use crate::exec::ExecContext;
pub use client::{ApiError, ProxmoxClient};
pub use settings::{ProxmoxArgs, ProxmoxSettings};

/// Runs `list_templates` and `provision` against one Proxmox VE cluster. Cloning it is
/// cheap and the clones share their state, so every provision of one agent draws VMIDs
/// from the same allocator; two executors (two agents in one test process) share nothing.
#[derive(Debug, Clone)]
pub struct ProxmoxExecutor {
    settings: Arc<ProxmoxSettings>,
    provisions: Arc<provision::Shared>,
    /// Power actions and destroys of one VM run one at a time.
    vm_locks: Arc<op::VmLocks>,
}

impl ProxmoxExecutor {
    pub fn new(settings: ProxmoxSettings) -> Self {
        Self {
            provisions: Arc::new(provision::Shared::new(settings.max_parallel_clones)),
            settings: Arc::new(settings),
            vm_locks: Default::default(),
        }
    }

    pub fn settings(&self) -> &ProxmoxSettings {
        &self.settings
    }

    /// The state every provision of this executor shares.
    pub fn provisions(&self) -> &provision::Shared {
        &self.provisions
    }

    /// A client for one command, or the error that says what is wrong with the settings.
    pub fn client(&self) -> Result<ProxmoxClient, CommandError> {
        ProxmoxClient::new(&self.settings)
            .map_err(|e| CommandError::new("proxmox_config", e.to_string()))
    }

    pub async fn list_templates(
        &self,
        ctx: &ExecContext,
        p: ListTemplatesParams,
    ) -> Result<ListTemplatesResult, CommandError> {
        list_templates(self.client()?, ctx, p).await
    }

    pub async fn provision(
        &self,
        ctx: &ExecContext,
        p: ProvisionParams,
    ) -> Result<ProvisionResult, CommandError> {
        provision::run(ctx, &self.settings, &self.provisions, self.client(), p).await
    }

    pub async fn vm_power(
        &self,
        ctx: &ExecContext,
        p: VmPowerParams,
    ) -> Result<VmPowerResult, CommandError> {
        power::run(ctx, &self.settings, &self.vm_locks, self.client(), p).await
    }

    pub async fn destroy(
        &self,
        ctx: &ExecContext,
        p: DestroyParams,
    ) -> Result<DestroyResult, CommandError> {
        destroy::run(ctx, &self.settings, &self.vm_locks, self.client(), p).await
    }

    /// The cluster's VMs from one list call (see [`inventory`]).
    pub async fn inventory(&self) -> Result<Inventory, CommandError> {
        let client = self.client()?;
        inventory::fetch(&client)
            .await
            .map_err(|e| client.command_error(&e))
    }
}

/// The error for a Proxmox command on an agent without a Proxmox connection.
pub fn not_configured() -> CommandError {
    CommandError::new(
        "proxmox_not_configured",
        "this agent has no Proxmox connection: set PROXMOX_URL, PROXMOX_TOKEN_ID and PROXMOX_TOKEN_SECRET",
    )
}

async fn list_templates(
    client: ProxmoxClient,
    ctx: &ExecContext,
    p: ListTemplatesParams,
) -> Result<ListTemplatesResult, CommandError> {
    let vms = tokio::select! {
        r = client.cluster_vms() => r.map_err(|e| client.command_error(&e))?,
        _ = ctx.cancel.cancelled() => return Err(CommandError::new("cancelled", "cancelled")),
    };
    let mut templates: Vec<ProxmoxTemplate> = vms
        .into_iter()
        .filter(|r| r.is_qemu() && r.template)
        .filter(|r| {
            p.node
                .as_deref()
                .is_none_or(|n| r.node.as_deref() == Some(n))
        })
        .filter_map(|r| {
            let vmid = r.vmid()?;
            Some(ProxmoxTemplate {
                vmid,
                name: r.name.clone().unwrap_or_else(|| format!("VM {vmid}")),
                node: r.node.clone().unwrap_or_default(),
                memory: r.maxmem.unwrap_or(0) / (1024 * 1024),
                cores: r
                    .maxcpu
                    .map(|c| u32::try_from(c).unwrap_or(u32::MAX))
                    .unwrap_or(0),
                disk_bytes: r.maxdisk.filter(|d| *d > 0),
            })
        })
        .collect();
    templates.sort_by_key(|t| t.vmid);
    ctx.log(
        LogStream::System,
        &format!(
            "{} VM template(s) found via {}\n",
            templates.len(),
            client.base_url()
        ),
    )
    .await;
    Ok(ListTemplatesResult { templates })
}
