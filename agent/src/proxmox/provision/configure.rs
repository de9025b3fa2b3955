//! Stages `configure_vm` and `start_vm`: memory, cores, network bridge and guest agent
//! on the clone, then power it on.
//!
//! Both are short, single API calls followed by a task or a re-read, and both are safe to
//! repeat on a VM an earlier attempt already configured or started.
//!
//! Besides the description line, configure sets the Proxmox tag `trellis-<root id>` (see
//! [`merge_tags`]) so that the inventory finds Trellis VMs in one list call.

use trellis_protocol::{proxmox_tag, tag_from_proxmox_tags, CommandError};

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
        let tags = merge_tags(
            cfg.get_str("tags").as_deref(),
            &proxmox_tag(self.ctx.root_command_id),
        );
        let t = &self.p.template;
        let params = vec![
            ("memory", t.memory.to_string()),
            ("cores", t.cores.to_string()),
            ("net0", net0.render()),
            ("agent", agent),
            ("tags", tags.clone()),
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
            "{} MiB, {} cores, net0 {}, guest agent enabled, tags {tags}",
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

/// The VM's Proxmox `tags` (`a;b`) with `ours` added: other tags are kept (a clone copies
/// the template's), Trellis tags of other commands are dropped (a template made from a
/// Trellis VM carries one), and duplicates go.
pub fn merge_tags(existing: Option<&str>, ours: &str) -> String {
    let mut tags: Vec<&str> = Vec::new();
    for t in existing
        .unwrap_or("")
        .split([';', ',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if tag_from_proxmox_tags(t).is_none() && !tags.contains(&t) {
            tags.push(t);
        }
    }
    tags.push(ours);
    tags.join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_keep_others_and_replace_foreign_trellis_tags() {
        let ours = proxmox_tag(uuid::Uuid::from_u128(1));
        let old = proxmox_tag(uuid::Uuid::from_u128(2));
        assert_eq!(merge_tags(None, &ours), ours);
        assert_eq!(merge_tags(Some(""), &ours), ours);
        assert_eq!(
            merge_tags(Some(&format!("web;{old},prod;web")), &ours),
            format!("web;prod;{ours}")
        );
        assert_eq!(merge_tags(Some(&ours), &ours), ours);
        assert_eq!(
            merge_tags(Some("trellis-ui"), &ours),
            format!("trellis-ui;{ours}")
        );
    }
}
