//! Agent inventories: the VMs each agent's hypervisor reports (one list call per
//! interval), kept as that agent's latest snapshot, and the drift they show applied to the
//! nodes that follow the inventory — a VM stopped or started outside Trellis, or deleted
//! (`missing`). Nodes a command is changing are left to that command.

use std::collections::HashMap;

use sqlx::Row;
use trellis_protocol::InventoryVm;

use super::sql::{id, multi_row_insert, no_nul, opt_id, string_list, TERMINAL_SQL};
use super::{Db, DbResult};
use crate::model::{AgentId, NodeId, NodeStatus};
use crate::time::now_ms;

/// Reports in a row without a node's VM before the node is `missing`.
const MISSING_AFTER_REPORTS: i64 = 2;

/// How stale `observed_at` may get before an unchanged node is written again.
const OBSERVED_REFRESH_MS: i64 = 5 * 60 * 1000;

/// One VM of an agent's latest inventory, with the node that tracks it (if any).
#[derive(Debug, Clone)]
pub struct AgentVmRow {
    pub vm_id: i64,
    pub node: String,
    pub name: String,
    pub status: String,
    pub tag: Option<String>,
    pub ip_addresses: Vec<String>,
    pub seen_at: i64,
    pub tracked_by: Option<NodeId>,
}

/// What an inventory changed.
#[derive(Debug, Default)]
pub struct InventoryApplied {
    /// Nodes whose status moved: `(node, from, to)`.
    pub moved: Vec<(NodeId, NodeStatus, NodeStatus)>,
}

impl Db {
    /// Stores an agent's inventory as its latest snapshot and moves the nodes it shows
    /// drifted, in one transaction.
    /// `snapshot_changed: false` skips rewriting the stored snapshot (the caller saw the
    /// same report before); nodes are checked either way.
    pub async fn apply_inventory(
        &self,
        agent: AgentId,
        vms: &[InventoryVm],
        snapshot_changed: bool,
    ) -> DbResult<InventoryApplied> {
        const COLS: usize = 8;
        const ROWS: usize = 200;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        if snapshot_changed {
            sqlx::query("DELETE FROM agent_vms WHERE agent_id = $1")
                .bind(agent.to_string())
                .execute(&mut *tx)
                .await?;
        }
        // A VMID appears once per cluster; keep the first if an agent repeats one.
        let mut by_id: HashMap<u32, &InventoryVm> = HashMap::with_capacity(vms.len());
        for vm in vms {
            by_id.entry(vm.vm_id).or_insert(vm);
        }
        let unique: Vec<&InventoryVm> = vms
            .iter()
            .filter(|vm| by_id.get(&vm.vm_id).is_some_and(|v| std::ptr::eq(*v, *vm)))
            .collect();
        for chunk in unique.chunks(ROWS).filter(|_| snapshot_changed) {
            let sql = multi_row_insert(
                "INSERT INTO agent_vms (agent_id, vm_id, node, name, status, tag, ip_addresses, seen_at) VALUES ",
                COLS,
                chunk.len(),
            );
            let mut q = sqlx::query(&sql);
            for vm in chunk {
                q = q
                    .bind(agent.to_string())
                    .bind(i64::from(vm.vm_id))
                    .bind(no_nul(&vm.node))
                    .bind(no_nul(&vm.name))
                    .bind(no_nul(&vm.status))
                    .bind(vm.tag.as_deref().map(no_nul))
                    .bind(serde_json::to_string(&vm.ip_addresses).unwrap_or_else(|_| "[]".into()))
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }

        // Nodes that follow the inventory, with no command running on them.
        let follow: Vec<String> = [
            NodeStatus::Running,
            NodeStatus::Stopped,
            NodeStatus::Missing,
        ]
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
        let rows = sqlx::query(&format!(
            "SELECT id, vm_id, status, vm_tag, vm_tag_listed, ip_address, vm_node, observed_at, \
             absent_reports, last_command_id FROM nodes WHERE hypervisor_id = $1 \
             AND vm_id IS NOT NULL AND status IN ({}) AND (last_command_id IS NULL OR NOT EXISTS \
             (SELECT 1 FROM commands c WHERE c.id = nodes.last_command_id AND c.status NOT IN {TERMINAL_SQL}))",
            follow.join(",")
        ))
        .bind(agent.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let mut applied = InventoryApplied::default();
        for r in &rows {
            let node: NodeId = id(r, "id")?;
            let vm_id: i64 = r.try_get("vm_id")?;
            let status: String = r.try_get("status")?;
            let Some(before) = NodeStatus::parse(&status) else {
                continue;
            };
            let vm_tag: Option<String> = r.try_get("vm_tag")?;
            let tag_listed: i64 = r.try_get("vm_tag_listed")?;
            let ip: Option<String> = r.try_get("ip_address")?;
            let absent: i64 = r.try_get("absent_reports")?;
            let last_command: Option<String> = r.try_get("last_command_id")?;
            // VMIDs are reused: the VM with this id is ours only if it carries our tag. A VM
            // made before the agent set Proxmox tags shows none; match those by id alone.
            let vm = u32::try_from(vm_id)
                .ok()
                .and_then(|v| by_id.get(&v))
                .filter(|vm| match (&vm_tag, &vm.tag) {
                    (Some(ours), Some(theirs)) => ours == theirs,
                    (Some(_), None) => tag_listed == 0,
                    (None, _) => true,
                });
            // One report without the VM may be a partial listing: `missing` takes two.
            let absent_now = if vm.is_some() { 0 } else { absent + 1 };
            let after = match vm {
                Some(vm) => NodeStatus::from_inventory(Some(vm.status.as_str())),
                None if absent_now >= MISSING_AFTER_REPORTS => NodeStatus::Missing,
                None => before,
            };
            let new_ip = vm
                .and_then(|vm| vm.ip_addresses.first().cloned())
                .or(ip.clone());
            let moved = after != before;
            let vm_node: Option<String> = r.try_get("vm_node")?;
            let observed_at: Option<i64> = r.try_get("observed_at")?;
            // Nothing to write for a node that did not change and was seen recently: an
            // idle fleet costs no writes per report.
            let unchanged = !moved
                && absent_now == absent
                && new_ip == ip
                && vm.is_none_or(|vm| vm_node.as_deref() == Some(vm.node.as_str()))
                && observed_at.is_some_and(|t| now - t < OBSERVED_REFRESH_MS);
            if unchanged {
                continue;
            }
            // Compare-and-set on what was read: a command that claimed the node meanwhile
            // (PostgreSQL, another transaction) wins, and this report leaves it alone.
            let n = sqlx::query(
                "UPDATE nodes SET status = $1, vm_node = COALESCE($2, vm_node), ip_address = $3, \
                 observed_at = CASE WHEN $4 = 1 THEN $5 ELSE observed_at END, \
                 updated_at = CASE WHEN $6 = 1 THEN $5 ELSE updated_at END, \
                 error = CASE WHEN $6 = 1 THEN $7 ELSE error END, absent_reports = $8 \
                 WHERE id = $9 AND status = $10 AND COALESCE(last_command_id, '') = $11",
            )
            .bind(after.as_str())
            .bind(vm.map(|vm| vm.node.clone()))
            .bind(new_ip)
            .bind(i64::from(vm.is_some()))
            .bind(now)
            .bind(i64::from(moved))
            .bind(match after {
                NodeStatus::Missing => Some(format!(
                    "vm_missing: VM {vm_id} is no longer on the hypervisor (deleted outside Trellis?)"
                )),
                _ => None,
            })
            .bind(absent_now)
            .bind(node.to_string())
            .bind(before.as_str())
            .bind(last_command.unwrap_or_default())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved && n > 0 {
                applied.moved.push((node, before, after));
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// An agent's latest inventory, with the node tracking each VM.
    pub async fn agent_vms(&self, agent: AgentId) -> DbResult<Vec<AgentVmRow>> {
        let rows = sqlx::query(
            "SELECT v.vm_id, v.node, v.name, v.status, v.tag, v.ip_addresses, v.seen_at, \
             (SELECT n.id FROM nodes n WHERE n.hypervisor_id = v.agent_id AND n.vm_id = v.vm_id \
              AND n.status <> $2 ORDER BY n.created_at LIMIT 1) AS node_id \
             FROM agent_vms v WHERE v.agent_id = $1 ORDER BY v.vm_id",
        )
        .bind(agent.to_string())
        .bind(NodeStatus::Destroyed.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AgentVmRow {
                    vm_id: r.try_get("vm_id")?,
                    node: r.try_get("node")?,
                    name: r.try_get("name")?,
                    status: r.try_get("status")?,
                    tag: r.try_get("tag")?,
                    ip_addresses: string_list(r, "ip_addresses")?,
                    seen_at: r.try_get("seen_at")?,
                    tracked_by: opt_id(r, "node_id")?,
                })
            })
            .collect()
    }
}
