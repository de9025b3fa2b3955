//! The VM inventory the agent reports to a control plane that takes it: every QEMU VM of
//! the cluster (templates and containers left out) with its node, name, state and
//! Trellis tag, from ONE `GET /cluster/resources?type=vm` call — never one call per VM.
//!
//! The tag comes from the Proxmox `tags` field (`trellis-<root command id>`, which
//! provision sets), so no per-VM config read is needed. Addresses would need a guest-agent
//! call per VM, so `ip_addresses` stays empty.
//!
//! [`report_loop`] is what the session runs while connected to a server whose `welcome`
//! lists the `inventory` feature.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use trellis_protocol::{tag_from_proxmox_tags, Inventory, InventoryVm};

use super::client::{ApiError, ProxmoxClient};
use super::types::ClusterResource;
use super::ProxmoxExecutor;

/// Builds the inventory from the items of `/cluster/resources?type=vm`, sorted by VMID.
pub fn build(resources: &[ClusterResource]) -> Inventory {
    let mut vms: Vec<InventoryVm> = resources
        .iter()
        .filter(|r| r.is_qemu() && !r.template)
        .filter_map(|r| {
            let vm_id = r.vmid()?;
            Some(InventoryVm {
                vm_id,
                node: r.node.clone().unwrap_or_default(),
                name: r.name.clone().unwrap_or_default(),
                status: r.status.clone().unwrap_or_else(|| "unknown".into()),
                ip_addresses: Vec::new(),
                tag: r.tags.as_deref().and_then(tag_from_proxmox_tags),
            })
        })
        .collect();
    vms.sort_by_key(|v| v.vm_id);
    Inventory { vms }
}

/// One list call, turned into the inventory.
pub async fn fetch(client: &ProxmoxClient) -> Result<Inventory, ApiError> {
    Ok(build(&client.cluster_vms().await?))
}

/// Reports the inventory into `tx` at once, then every `every` and whenever `kick` is
/// notified (a command that touched a VM ended), until `stop` fires or `tx` closes. A
/// failed list call is logged and tried again at the next interval or kick.
pub async fn report_loop(
    executor: ProxmoxExecutor,
    every: Duration,
    kick: Arc<Notify>,
    tx: mpsc::Sender<Inventory>,
    stop: CancellationToken,
) {
    // A kick stored while no loop ran is covered by the first report.
    let _ = kick.notified().now_or_never();
    loop {
        let listed = tokio::select! {
            r = executor.inventory() => r,
            _ = stop.cancelled() => return,
        };
        match listed {
            Ok(inv) => {
                tracing::debug!(vms = inv.vms.len(), "inventory listed");
                let closed = tokio::select! {
                    r = tx.send(inv) => r.is_err(),
                    _ = stop.cancelled() => true,
                };
                if closed {
                    return;
                }
            }
            Err(e) => tracing::warn!(
                code = %e.code,
                error = %e.message,
                "listing the cluster's VMs for the inventory failed; trying again next interval"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = kick.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_qemu_vms_with_their_tags_and_skips_templates_and_containers() {
        let root = uuid::Uuid::from_u128(7);
        let items: Vec<ClusterResource> = serde_json::from_value(json!([
            {"id": "qemu/9000", "type": "qemu", "vmid": 9000, "node": "pve1", "name": "tpl",
             "status": "stopped", "template": 1},
            {"id": "qemu/102", "type": "qemu", "vmid": "102", "node": "pve2", "name": "web",
             "status": "running", "tags": format!("prod;trellis-{root}")},
            {"id": "qemu/101", "type": "qemu", "vmid": 101, "node": "pve1",
             "status": "unknown"},
            {"id": "lxc/200", "type": "lxc", "vmid": 200, "node": "pve1", "name": "ct",
             "status": "running"},
            {"id": "qemu/103", "type": "qemu", "vmid": 103, "node": "pve1", "name": "other",
             "status": "stopped", "tags": "trellis-notauuid;db"}
        ]))
        .unwrap();
        let inv = build(&items);
        let ids: Vec<u32> = inv.vms.iter().map(|v| v.vm_id).collect();
        assert_eq!(ids, [101, 102, 103]);
        let web = &inv.vms[1];
        assert_eq!(
            (web.node.as_str(), web.name.as_str(), web.status.as_str()),
            ("pve2", "web", "running")
        );
        assert_eq!(web.tag, Some(trellis_protocol::vm_tag(root)));
        assert!(web.ip_addresses.is_empty());
        assert_eq!(inv.vms[0].tag, None);
        assert_eq!(inv.vms[0].name, "");
        assert_eq!(inv.vms[2].tag, None);
    }
}
