//! Stage `clone_template`: find the template, reuse a VM an earlier attempt of this
//! command made, or clone a new one under the VMID allocation lock, retrying on VMID races
//! and storage lock timeouts.
//!
//! Kept apart because it is the one stage that decides *which* VM the command owns; every
//! later stage only works on `self.vm`.

use trellis_protocol::CommandError;

use super::{build_description, cancelled, has_tag, sleep_or_cancel, Run};
use crate::proxmox::client::CloneRequest;
use crate::proxmox::types::{ClusterResource, VmConfig};

/// The explicit VMID of the clone options is taken.
fn vmid_taken(vmid: u32) -> CommandError {
    CommandError::new(
        "vmid_taken",
        format!("VMID {vmid} is already in use in the Proxmox cluster; choose another VMID or leave it empty"),
    )
    .with_details(serde_json::json!({"field": "vm_id"}))
}

/// Clone requests tried (new VMID each time) before the stage gives up.
const MAX_CLONE_ATTEMPTS: u32 = 10;

impl Run<'_> {
    pub(super) async fn clone_stage(&mut self, template_id: u32) -> Result<(), CommandError> {
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

        let slots = self.shared.clone_slots.clone();
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
            let mut alloc = tokio::select! {
                g = self.shared.vmids.begin() => g,
                _ = self.ctx.cancel.cancelled() => return Err(cancelled()),
            };
            let vmid = match self.p.clone_options.vm_id {
                // An explicit VMID is the admin's choice: taken means stop, not another id.
                // Taken is what Proxmox says (and the clone's own "already exists"), not
                // this executor's recent ids: those hold this very id after a lock
                // timeout's cleanup or a failed attempt, which must not block the retry.
                Some(v) => {
                    let free = self
                        .client()
                        .is_vmid_free(v)
                        .await
                        .map_err(|e| self.api(e))?;
                    if !free {
                        return Err(vmid_taken(v));
                    }
                    v
                }
                None => self.pick_vmid(&mut alloc).await?,
            };
            let opts = &self.p.clone_options;
            let req = CloneRequest {
                newid: vmid,
                name: self.p.name.clone(),
                description: description.clone(),
                target: target.clone(),
                // A linked clone can only live where the template's disks are; to
                // put the VM on another node (or storage), copy the disks.
                full: opts.full_clone(target.is_some()),
                storage: opts.storage.clone(),
                pool: opts.pool.clone(),
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
            alloc.remember(vmid);
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
                Err(e) if e.is_vmid_taken() && self.p.clone_options.vm_id.is_some() => {
                    return Err(vmid_taken(vmid));
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

    /// Pins a clone failure on the clone option that caused it, so the admin is sent back
    /// to that setting: Proxmox names an unknown storage (`storage 'x' does not exist`,
    /// `storage 'x' is not enabled`, no space on it) or pool (`pool 'x' does not exist`).
    pub(super) fn attribute_clone_error(&self, e: CommandError) -> CommandError {
        if e.details.as_ref().is_some_and(|d| d.get("field").is_some()) {
            return e;
        }
        let o = &self.p.clone_options;
        let m = e.message.to_ascii_lowercase();
        let field = if o.storage.as_deref().is_some_and(|s| {
            m.contains(&format!("storage '{}'", s.to_ascii_lowercase()))
                || (m.contains("storage") && m.contains(&s.to_ascii_lowercase()))
        }) {
            Some("storage")
        } else if o
            .pool
            .as_deref()
            .is_some_and(|p| m.contains("pool") && m.contains(&p.to_ascii_lowercase()))
        {
            Some("pool")
        } else {
            None
        };
        match field {
            Some(f) => {
                let mut details = match e.details.clone() {
                    Some(serde_json::Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                details.insert("field".into(), f.into());
                e.with_details(details.into())
            }
            None => e,
        }
    }

    /// A config that carries our tag — or, while a clone is still writing it, has no
    /// description yet but the clone lock.
    pub(super) fn is_ours(&self, cfg: &VmConfig) -> bool {
        has_tag(cfg.description().as_deref(), self.ctx.root_command_id)
            || (cfg.lock().as_deref() == Some("clone") && cfg.description().is_none())
    }

    /// A VM made by an earlier attempt of this command, found by its tag.
    pub(super) async fn find_existing(
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
}
