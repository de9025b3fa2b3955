//! Stages `configure_vm` and `start_vm`: memory, cores, network bridge and guest agent
//! on the clone, then power it on.
//!
//! Both are short, single API calls followed by a task or a re-read, and both are safe to
//! repeat on a VM an earlier attempt already configured or started.

use trellis_protocol::CommandError;

use super::{build_description, sleep_or_cancel, Run, POST_DONE_MARK};
use crate::proxmox::client::Repeat;
use crate::proxmox::types::Net0;

impl Run<'_> {
    pub(super) async fn configure(&mut self) -> Result<String, CommandError> {
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
            Some(a) if crate::proxmox::types::property_enabled(&a) => a,
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

    pub(super) async fn start(&mut self) -> Result<String, CommandError> {
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
}
