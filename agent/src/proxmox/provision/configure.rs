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
        let opts = self.p.clone_options.clone();
        // Proxmox accepts cloud-init settings on a VM without a cloud-init drive and they
        // do nothing (a static IP would then time out at wait_network): refuse them here.
        if let Some(field) = cloudinit_field(&opts) {
            if cfg.cloudinit_drive().is_none() {
                let tpl = self
                    .p
                    .template
                    .template_id
                    .map_or_else(|| "<template>".to_string(), |t| t.to_string());
                return Err(CommandError::new(
                    "no_cloudinit_drive",
                    format!(
                        "VM {vmid} (a clone of template {tpl}) has no cloud-init drive, so the cloud-init user, SSH keys and IP configuration would do nothing; add a CloudInit drive to the template (qm set {tpl} --ide2 <storage>:cloudinit) or provision without them"
                    ),
                )
                .with_details(serde_json::json!({ "field": field })));
            }
        }
        if let Some(tag) = opts.vlan_tag {
            net0.rest.retain(|kv| !kv.starts_with("tag="));
            net0.rest.push(format!("tag={tag}"));
        }
        let agent = match cfg.get_str("agent") {
            Some(a) if crate::proxmox::types::property_enabled(&a) => a,
            Some(a) if a.contains("enabled=") => a.replace("enabled=0", "enabled=1"),
            _ => "1".into(),
        };
        let mut existing_tags = cfg.get_str("tags").unwrap_or_default();
        for t in &opts.tags {
            existing_tags.push(';');
            existing_tags.push_str(&t.to_ascii_lowercase());
        }
        let tags = merge_tags(Some(&existing_tags), &proxmox_tag(self.ctx.root_command_id));
        let t = self.p.template.clone();
        let mut params = vec![
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
        if let Some(u) = &opts.ci_user {
            params.push(("ciuser", u.clone()));
        }
        if !opts.ssh_keys.is_empty() {
            params.push(("sshkeys", encode_sshkeys(&opts.ssh_keys)));
        }
        if let Some(ip) = &opts.ip_config {
            params.push(("ipconfig0", ip.render()));
        }
        if let Some(b) = opts.onboot {
            params.push(("onboot", if b { "1" } else { "0" }.into()));
        }
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
                Err(e) => return Err(with_config_field(self.api(e.clone()), &e)),
            }
        }
        let resized = match opts.disk_size_gib {
            Some(size) => self.grow_disk(vmid, size).await?,
            None => None,
        };
        self.mac = net0.mac.clone();
        if self.mac.is_none() {
            // Proxmox generated one: read it back for matching the guest's interface.
            if let Ok(cfg) = self.client().vm_config(&self.node, vmid).await {
                self.mac = cfg.net0().and_then(|n| n.mac);
            }
        }
        let mut extra = String::new();
        if let Some(u) = &opts.ci_user {
            extra.push_str(&format!(", cloud-init user {u}"));
        }
        if !opts.ssh_keys.is_empty() {
            extra.push_str(&format!(", {} SSH key(s)", opts.ssh_keys.len()));
        }
        if let Some(ip) = &opts.ip_config {
            extra.push_str(&format!(", ipconfig0 {}", ip.render()));
        }
        if opts.onboot == Some(true) {
            extra.push_str(", start at boot");
        }
        if let Some(r) = resized {
            extra.push_str(&format!(", {r}"));
        }
        Ok(format!(
            "{} MiB, {} cores, net0 {}, guest agent enabled, tags {tags}{extra}",
            t.memory,
            t.cores,
            net0.render()
        ))
    }

    /// Grows the boot disk to `size_gib` (never shrinks: a smaller size is an error that
    /// names `disk_size_gib`; the same size does nothing, so a retry is safe).
    async fn grow_disk(&self, vmid: u32, size_gib: u32) -> Result<Option<String>, CommandError> {
        let cfg = self
            .client()
            .vm_config(&self.node, vmid)
            .await
            .map_err(|e| self.api(e))?;
        let Some((disk, current)) = boot_disk(&cfg) else {
            return Err(CommandError::new(
                "invalid_template",
                format!("VM {vmid} has no disk to resize"),
            )
            .with_details(serde_json::json!({"field": "disk_size_gib"})));
        };
        let wanted = u64::from(size_gib) << 30;
        if wanted < current {
            return Err(CommandError::new(
                "invalid_params",
                format!(
                    "disk_size_gib {size_gib} is smaller than the template's disk {disk} ({}); disks can only grow",
                    human_gib(current)
                ),
            )
            .with_details(serde_json::json!({"field": "disk_size_gib"})));
        }
        if wanted == current {
            return Ok(Some(format!("{disk} already {size_gib} GiB")));
        }
        self.log(format!(
            "growing {disk} of VM {vmid} from {} to {size_gib} GiB",
            human_gib(current)
        ))
        .await;
        match self
            .client()
            .resize_disk(&self.node, vmid, &disk, size_gib)
            .await
        {
            Ok(Some(upid)) => {
                let cancel = self.ctx.cancel.clone();
                self.wait_task(&upid, "resize", &cancel)
                    .await
                    .map_err(|e| e.with_details(serde_json::json!({"field": "disk_size_gib"})))?;
            }
            Ok(None) => {}
            Err(e) => {
                return Err(self
                    .api(e)
                    .with_details(serde_json::json!({"field": "disk_size_gib"})))
            }
        }
        Ok(Some(format!(
            "{disk} grown from {} to {size_gib} GiB",
            human_gib(current)
        )))
    }

    /// Whether VM `vmid` is running within 30 s (checked every half second).
    async fn becomes_running(
        &self,
        vmid: u32,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, CommandError> {
        let c = self.client();
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if c.vm_status(&self.node, vmid)
                .await
                .is_ok_and(|s| s.is_running())
            {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= until {
                return Ok(false);
            }
            sleep_or_cancel(std::time::Duration::from_millis(500), cancel).await?;
        }
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
                    if let Err(e) = self.wait_task(&upid, "start", &cancel).await {
                        // A start task of an earlier attempt (whose agent was killed) may
                        // still hold the VM: ours then fails with "already running" or a
                        // lock timeout. Give that task time to end; a running VM is all
                        // this stage wants.
                        let raced =
                            e.message.contains("already running") || e.message.contains("lock");
                        if !raced || !self.becomes_running(vmid, &cancel).await? {
                            return Err(e);
                        }
                        self.log(format!(
                            "VM {vmid} was started by an earlier attempt's task"
                        ))
                        .await;
                    }
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

/// `sshkeys` as Proxmox wants it: the newline-joined keys percent-encoded (every byte but
/// `A-Za-z0-9-_.~`, so spaces are `%20`, never `+`: Proxmox decodes with `uri_unescape`).
/// The form encoding of the request then encodes the `%` again, as Proxmox expects.
pub fn encode_sshkeys(keys: &[String]) -> String {
    let joined = keys.iter().map(|k| k.trim()).collect::<Vec<_>>().join("\n");
    let mut out = String::with_capacity(joined.len() * 3 / 2);
    for b in joined.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Points a rejected config update at the clone option Proxmox complained about.
fn with_config_field(err: CommandError, e: &crate::proxmox::client::ApiError) -> CommandError {
    let crate::proxmox::client::ApiError::Http { errors, .. } = e else {
        return err;
    };
    let field = errors.keys().find_map(|k| match k.as_str() {
        "sshkeys" => Some("ssh_keys"),
        "ipconfig0" => Some("ip_config"),
        "ciuser" => Some("ci_user"),
        "tags" => Some("tags"),
        "onboot" => Some("onboot"),
        "net0" => Some("vlan_tag"),
        _ => None,
    });
    match field {
        Some(f) => err.with_details(serde_json::json!({"field": f})),
        None => err,
    }
}

/// The boot disk (first disk of `boot: order=…`, else the first of scsi0, virtio0, sata0,
/// ide0 that is not a CD-ROM) and its size in bytes.
fn boot_disk(cfg: &crate::proxmox::types::VmConfig) -> Option<(String, u64)> {
    let is_disk = |k: &str| {
        cfg.get_str(k)
            .filter(|v| !v.contains("media=cdrom"))
            .and_then(|v| disk_size(&v))
    };
    let order: Vec<String> = cfg
        .get_str("boot")
        .and_then(|b| {
            b.split(',')
                .find_map(|kv| kv.strip_prefix("order=").map(str::to_string))
        })
        .map(|o| o.split(';').map(str::to_string).collect())
        .unwrap_or_default();
    let found = order
        .iter()
        .map(String::as_str)
        .chain(["scsi0", "virtio0", "sata0", "ide0"])
        .find_map(|k| is_disk(k).map(|s| (k.to_string(), s)));
    found
}

/// `size=10G` (K, M, G, T; bytes without a unit) of a disk property.
fn disk_size(v: &str) -> Option<u64> {
    let s = v.split(',').find_map(|kv| kv.strip_prefix("size="))?;
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        b'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult as f64) as u64)
}

fn human_gib(bytes: u64) -> String {
    let g = bytes as f64 / f64::from(1u32 << 30);
    if g.fract() == 0.0 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.1} GiB")
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

/// The first cloud-init option set (its protocol name), if any.
fn cloudinit_field(o: &trellis_protocol::CloneOptions) -> Option<&'static str> {
    if o.ci_user.is_some() {
        Some("ci_user")
    } else if !o.ssh_keys.is_empty() {
        Some("ssh_keys")
    } else if o.ip_config.is_some() {
        Some("ip_config")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sshkeys_are_percent_encoded_with_20_for_spaces() {
        let keys = vec![
            "ssh-ed25519 AAAA+b/c= me@host".to_string(),
            " ssh-rsa AAAB x ".into(),
        ];
        assert_eq!(
            encode_sshkeys(&keys),
            "ssh-ed25519%20AAAA%2Bb%2Fc%3D%20me%40host%0Assh-rsa%20AAAB%20x"
        );
    }

    #[test]
    fn boot_disk_and_sizes() {
        let cfg: crate::proxmox::types::VmConfig = serde_json::from_value(serde_json::json!({
            "boot": "order=scsi0;net0", "scsi0": "local-lvm:vm-101-disk-0,iothread=1,size=10G",
            "ide2": "local-lvm:vm-101-cloudinit,media=cdrom"
        }))
        .unwrap();
        assert_eq!(boot_disk(&cfg), Some(("scsi0".into(), 10 << 30)));
        assert_eq!(disk_size("x,size=512M"), Some(512 << 20));
        assert_eq!(disk_size("x,size=1.5T"), Some(3 << 39));
        assert_eq!(human_gib(10 << 30), "10 GiB");
    }

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
