//! Node names (the duplicate check) and importing a VM of an agent's inventory as a node.
//!
//! A name is taken by any node record of that name (compared ignoring case) that is not
//! `destroyed`: a destroyed node's VM is gone and its record is only history, and a
//! forgotten node has no record left. The unique index `nodes_live_name` (migration 0008)
//! enforces it for every insert and rename, so two concurrent requests cannot both take a
//! name; a node created with `force` (`name_forced`) is outside the index. An imported node is linked to the VM the inventory
//! shows (`vm_id`, `vm_node`, the hypervisor); it gets a `vm_tag` only when the VM carries
//! a Trellis tag *and* that tag's root command is a provision on this hypervisor whose
//! result (or kept half-built VM) is this very VM id — a VM Trellis made and forgot. A tag
//! alone proves nothing: a VM cloned by hand from a Trellis VM keeps its tags, and anyone
//! can type one. Without that proof (also when retention deleted the command) the node is
//! imported untagged, so destroy stays refused for a VM Trellis did not make.

use sqlx::Row;

use super::sql::is_unique_violation;
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, NodeId, NodeStatus};
use crate::time::now_ms;

/// An inventory VM to turn into a node.
pub struct NodeImport {
    pub id: NodeId,
    pub agent: AgentId,
    pub vm_id: i64,
    pub name: String,
    pub application: Option<String>,
    pub memory: i64,
    pub cores: i64,
    /// Imported with `force`: the name may duplicate a live node's.
    pub name_forced: bool,
}

/// Maps the unique violation of a node insert or rename to `NameTaken`: the node's id is
/// a fresh UUID, so the only unique key it can break is the live-name index.
pub(super) fn name_taken(name: &str) -> impl FnOnce(sqlx::Error) -> DbError + '_ {
    move |e| {
        if is_unique_violation(&e) {
            DbError::NameTaken(format!(
                "a node named {name:?} already exists; choose another name or send force: true to create it anyway"
            ))
        } else {
            e.into()
        }
    }
}

impl Db {
    /// The node (not `destroyed`) with this name, ignoring case, if any.
    pub async fn node_named(&self, name: &str) -> DbResult<Option<NodeId>> {
        let row = sqlx::query(
            "SELECT id FROM nodes WHERE LOWER(name) = $1 AND status <> $2 ORDER BY created_at LIMIT 1",
        )
        .bind(name.to_ascii_lowercase())
        .bind(NodeStatus::Destroyed.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| super::sql::id(&r, "id")).transpose()
    }

    /// Creates a node for VM `vm_id` of `agent`'s latest inventory, `running` or `stopped`
    /// as the inventory shows it, in one statement that also checks no live node tracks
    /// that VM. `NotFound`: the inventory has no such VM; `Conflict`: a node tracks it.
    pub async fn import_node(&self, n: &NodeImport) -> DbResult<()> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let vm = sqlx::query(
            "SELECT status, tag, ip_addresses, \
             (SELECT n.id FROM nodes n WHERE n.hypervisor_id = v.agent_id AND n.vm_id = v.vm_id \
              AND n.status <> $3 LIMIT 1) AS node_id \
             FROM agent_vms v WHERE v.agent_id = $1 AND v.vm_id = $2",
        )
        .bind(n.agent.to_string())
        .bind(n.vm_id)
        .bind(NodeStatus::Destroyed.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound)?;
        if let Some(existing) = super::sql::opt_id::<NodeId>(&vm, "node_id")? {
            return Err(DbError::Conflict(format!(
                "VM {} is already tracked by node {existing}",
                n.vm_id
            )));
        }
        let status: String = vm.try_get("status")?;
        let status = if status == "running" {
            NodeStatus::Running
        } else {
            NodeStatus::Stopped
        };
        let tag: Option<String> = vm.try_get("tag")?;
        let tag = match tag {
            Some(t) if made_by_trellis(&mut tx, &t, n.agent, n.vm_id).await? => Some(t),
            _ => None,
        };
        let ip = super::sql::string_list(&vm, "ip_addresses")?
            .into_iter()
            .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok());
        sqlx::query(
            "INSERT INTO nodes (id, application, name, template_id, memory, cores, vm_id, hypervisor_id, \
             ip_address, status, vm_tag, vm_tag_listed, vm_node, observed_at, name_forced, created_at, updated_at) \
             SELECT $1, $2, $3, NULL, $4, $5, v.vm_id, v.agent_id, $6, $7, $13, $8, v.node, v.seen_at, $12, $9, $9 \
             FROM agent_vms v WHERE v.agent_id = $10 AND v.vm_id = $11",
        )
        .bind(n.id.to_string())
        .bind(n.application.clone())
        .bind(&n.name)
        .bind(n.memory)
        .bind(n.cores)
        .bind(ip)
        .bind(status.as_str())
        .bind(i64::from(tag.is_some()))
        .bind(now)
        .bind(n.agent.to_string())
        .bind(n.vm_id)
        .bind(i64::from(n.name_forced))
        .bind(tag)
        .execute(&mut *tx)
        .await
        .map_err(name_taken(&n.name))?;
        tx.commit().await?;
        Ok(())
    }
}

/// Whether `tag` (`trellis-command=<root id>`) names a provision of `agent` that made VM
/// `vm_id`: one attempt of that root command succeeded with this `vm_id`, or failed and
/// kept this VM (`error.details.vm_id`).
async fn made_by_trellis(
    conn: &mut sqlx::AnyConnection,
    tag: &str,
    agent: AgentId,
    vm_id: i64,
) -> DbResult<bool> {
    let Some(root) = tag
        .strip_prefix(trellis_protocol::VM_TAG_PREFIX)
        .and_then(|id| id.parse::<uuid::Uuid>().ok())
    else {
        return Ok(false);
    };
    let rows = sqlx::query(
        "SELECT result, error FROM commands WHERE root_id = $1 AND agent_id = $2 AND type = $3",
    )
    .bind(root.to_string())
    .bind(agent.to_string())
    .bind(trellis_protocol::CommandType::Provision.as_str())
    .fetch_all(&mut *conn)
    .await?;
    for r in &rows {
        let result = super::sql::json_col(r, "result").unwrap_or(None);
        let error = super::sql::json_col(r, "error").unwrap_or(None);
        let made = result.as_ref().and_then(|r| r["vm_id"].as_i64());
        let kept = error.as_ref().and_then(|e| e["details"]["vm_id"].as_i64());
        if made == Some(vm_id) || kept == Some(vm_id) {
            return Ok(true);
        }
    }
    Ok(false)
}
