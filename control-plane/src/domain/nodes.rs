//! Nodes: create, edit, delete, and starting a node's provision through its hypervisor's
//! agent. The node's status moves only through the transitions `db::nodes` stores with
//! the command change that causes them; the browser never sets `running` or `failed`.

use trellis_protocol::{CommandType, MAX_CORES, MAX_MEMORY_MB, MIN_MEMORY_MB};

use super::commands::{prepare, CreateCommand};
use super::{DomainError, DomainResult};
use crate::broker::Broker;
use crate::db::{CommandRow, Db, DbError, NewNode, NodeRow, NodeUpdate, ProvisionStart};
use crate::model::{AgentId, NodeId, NodeStatus, TemplateId};

pub fn validate_name(name: &str) -> DomainResult<()> {
    trellis_protocol::validate_vm_name(name)
        .map_err(|e| DomainError::invalid("invalid_params", e.message))
}

pub fn validate_size(memory: i64, cores: i64) -> DomainResult<()> {
    if !(i64::from(MIN_MEMORY_MB)..=i64::from(MAX_MEMORY_MB)).contains(&memory) {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB"),
        ));
    }
    if !(1..=i64::from(MAX_CORES)).contains(&cores) {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("cores must be between 1 and {MAX_CORES}"),
        ));
    }
    Ok(())
}

fn parse_template_id(raw: &str) -> DomainResult<TemplateId> {
    raw.parse()
        .map_err(|_| DomainError::invalid("invalid_params", "templateId is not a template id"))
}

pub async fn get(db: &Db, id: NodeId) -> DomainResult<NodeRow> {
    db.get_node(id)
        .await
        .map_err(DomainError::not_found(format_args!("node {id}")))
}

pub struct CreateNode {
    pub name: String,
    pub template_id: String,
    pub memory: Option<i64>,
    pub cores: Option<i64>,
    pub application: Option<String>,
}

/// Where to provision a node.
pub struct Provision {
    pub agent_id: String,
    pub target_node: Option<String>,
}

/// Creates a node (size defaults from its template).
pub async fn create(db: &Db, b: CreateNode) -> DomainResult<NodeId> {
    validate_name(&b.name)?;
    let tid = parse_template_id(&b.template_id)?;
    let t = super::templates::get(db, tid).await?;
    let memory = b.memory.unwrap_or(t.memory);
    let cores = b.cores.unwrap_or(t.cores);
    validate_size(memory, cores)?;
    let id = NodeId::new();
    db.insert_node(&NewNode {
        id,
        application: b.application.filter(|a| !a.trim().is_empty()),
        name: b.name,
        template_id: tid,
        memory,
        cores,
    })
    .await?;
    Ok(id)
}

/// A partial edit: absent fields keep their value; `application: ""` clears it.
#[derive(Default)]
pub struct EditNode {
    pub name: Option<String>,
    pub template_id: Option<String>,
    pub memory: Option<i64>,
    pub cores: Option<i64>,
    pub application: Option<String>,
    pub status: Option<String>,
}

pub async fn update(db: &Db, id: NodeId, b: EditNode) -> DomainResult<NodeRow> {
    let n = get(db, id).await?;
    let name = b.name.unwrap_or(n.name.clone());
    validate_name(&name)?;
    let memory = b.memory.unwrap_or(n.memory);
    let cores = b.cores.unwrap_or(n.cores);
    validate_size(memory, cores)?;
    let template_id = match b.template_id {
        Some(t) => {
            let tid = parse_template_id(&t)?;
            super::templates::get(db, tid).await?;
            Some(tid)
        }
        None => n.template_id,
    };
    let status = match b.status.as_deref() {
        None => n.status,
        Some(st) => match NodeStatus::parse(st) {
            Some(s) if NodeStatus::SETTABLE.contains(&s) && n.vm_id.is_some() => s,
            _ => {
                return Err(DomainError::invalid(
                    "invalid_params",
                    format!("status {st:?} cannot be set here"),
                ))
            }
        },
    };
    let application = match b.application {
        Some(a) if a.trim().is_empty() => None,
        Some(a) => Some(a),
        None => n.application,
    };
    db.update_node(
        id,
        &NodeUpdate {
            name,
            template_id,
            memory,
            cores,
            application,
            status,
        },
    )
    .await
    .map_err(busy)?;
    get(db, id).await
}

fn busy(e: DbError) -> DomainError {
    match e {
        DbError::Conflict(m) => DomainError::conflict("node_busy", m),
        e => e.into(),
    }
}

pub async fn delete(db: &Db, id: NodeId) -> DomainResult<()> {
    get(db, id).await?;
    db.delete_node(id).await.map_err(busy)
}

/// Starts provisioning a node on a hypervisor: checks the node, agent and template,
/// then claims the node and stores the command in one transaction, and wakes the agent.
pub async fn start_provision(
    db: &Db,
    broker: &Broker,
    id: NodeId,
    p: Provision,
) -> DomainResult<(NodeRow, CommandRow)> {
    let n = get(db, id).await?;
    if let Some(vm) = n.vm_id {
        return Err(DomainError::conflict(
            "already_provisioned",
            format!("node {:?} already has VM {vm}", n.name),
        ));
    }
    if n.status == NodeStatus::Provisioning {
        return Err(DomainError::conflict(
            "already_provisioning",
            format!(
                "node {:?} is already being provisioned (command {})",
                n.name,
                n.last_command_id.map(|c| c.to_string()).unwrap_or_default()
            ),
        ));
    }
    let agent_id: AgentId = p
        .agent_id
        .parse()
        .map_err(|_| DomainError::NotFound(format!("hypervisor {:?} not found", p.agent_id)))?;
    let agent = db
        .get_agent(agent_id)
        .await
        .map_err(DomainError::not_found(format_args!(
            "hypervisor {agent_id}"
        )))?;
    if !agent.is_online() {
        return Err(DomainError::conflict(
            "agent_offline",
            format!("hypervisor {:?} is offline", agent.name),
        ));
    }
    if !agent.has_capability(CommandType::Provision) {
        return Err(DomainError::conflict(
            "capability_missing",
            format!(
                "hypervisor {:?} cannot provision VMs (no Proxmox connection configured)",
                agent.name
            ),
        ));
    }
    let Some(tid) = n.template_id else {
        return Err(DomainError::invalid(
            "template_missing",
            "the node has no template",
        ));
    };
    let t = super::templates::get(db, tid).await?;
    let Some(vmid) = t.proxmox_template_id else {
        return Err(DomainError::invalid(
            "template_not_mapped",
            format!(
                "template {:?} is not mapped to a Proxmox template; set its Proxmox template id",
                t.name
            ),
        ));
    };
    let params = serde_json::json!({
        "name": n.name,
        "template": {
            "type": "proxmox",
            "template_id": vmid,
            "template_node": t.proxmox_node,
            "memory": n.memory,
            "cores": n.cores,
            "description": t.description,
            "network_bridge": t.network_bridge,
            "pre_provision_commands": t.pre_provision_commands,
            "post_provision_commands": t.post_provision_commands,
        },
        "target_node": p.target_node.filter(|s| !s.is_empty()),
    });
    let req = CreateCommand {
        agent_id,
        command_type: CommandType::Provision.as_str().into(),
        params,
        idempotency_key: None,
        timeout_secs: None,
        created_by: format!("node:{id}"),
    };
    // Without an idempotency key `prepare` never finds an earlier command.
    let new = prepare(db, &req, None).await?.map_err(|existing| {
        DomainError::conflict(
            "already_provisioning",
            format!("command {} already provisions this node", existing.id),
        )
    })?;
    let mut row = CommandRow::queued(&new, 0);
    row.created_at = db
        .start_provision(&ProvisionStart {
            node: id,
            agent: agent_id,
            command: &new,
        })
        .await
        .map_err(|e| match e {
            DbError::Conflict(_) => DomainError::conflict(
                "already_provisioning",
                format!("node {:?} is already being provisioned", n.name),
            ),
            e => e.into(),
        })?;
    broker.wake(agent_id);
    Ok((get(db, id).await?, row))
}
