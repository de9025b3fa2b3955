//! Nodes: create, edit, delete, and starting a node's provision through its hypervisor's
//! agent. The node's status moves only through the transitions `db::nodes` stores with
//! the command change that causes them; the browser never sets `running` or `failed`.

use trellis_protocol::{CommandType, MAX_CORES, MAX_MEMORY_MB, MIN_MEMORY_MB};

use super::commands::{prepare, CreateCommand};
use super::{DomainError, DomainResult};
use crate::broker::Broker;
use crate::db::{
    CommandRow, Db, DbError, NewNode, NodeCommandStart, NodeRow, NodeUpdate, ProvisionStart,
};
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
    /// Create it even if another node has this name.
    pub force: bool,
}

/// The one name rule, for every way a node gets a name (create, import, bulk provision,
/// rename): a name another node has (ignoring case; `destroyed` nodes do not count, and
/// forgotten ones have no record) is refused with 409 `duplicate_name`, unless `force`.
/// This check gives the helpful message; the database's live-name index (migration 0008)
/// closes the race between it and the insert, and its violation is the same
/// `duplicate_name` (`DbError::NameTaken`).
pub async fn check_name_free(db: &Db, name: &str, force: bool) -> DomainResult<()> {
    if force {
        return Ok(());
    }
    match db.node_named(name).await? {
        Some(other) => Err(duplicate_name(name, Some(other))),
        None => Ok(()),
    }
}

/// The `duplicate_name` refusal of [`check_name_free`].
pub fn duplicate_name(name: &str, other: Option<NodeId>) -> DomainError {
    let which = other.map(|o| format!(" ({o})")).unwrap_or_default();
    DomainError::conflict(
        "duplicate_name",
        format!(
            "a node named {name:?} already exists{which}; choose another name or send force: true to create it anyway"
        ),
    )
}

/// Where to provision a node.
#[derive(Clone)]
pub struct Provision {
    pub agent_id: String,
    pub target_node: Option<String>,
    /// Keep a VM that failed half-way for inspection.
    pub keep_on_failure: bool,
    /// Proxmox clone options; absent fields take the template's defaults, and an explicit
    /// value overrides them: `""` (storage, ciUser, pool) and `0` (diskSizeGib, vlanTag)
    /// clear a default, as do the lists of [`ClearedLists`].
    pub clone_options: Option<trellis_protocol::CloneOptions>,
    /// Lists the request gave explicitly empty (clearing the template's).
    pub cleared_lists: ClearedLists,
}

/// Which list options a provision request sent as an explicit empty list.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClearedLists {
    pub ssh_keys: bool,
    pub tags: bool,
}

/// The clone options of a provision: what the request gives, field by field over the
/// template's defaults. An explicit value wins, also one that clears (`""`, `0`, an empty
/// list); a linked clone (`full: false`) without a storage of its own drops the default
/// storage (a linked clone stays on the template's storage).
pub fn merge_clone_options(
    request: Option<trellis_protocol::CloneOptions>,
    cleared: ClearedLists,
    defaults: Option<&trellis_protocol::CloneOptions>,
) -> trellis_protocol::CloneOptions {
    let r = request.unwrap_or_default();
    let d = defaults.cloned().unwrap_or_default();
    fn text(r: Option<String>, d: Option<String>) -> Option<String> {
        match r {
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(v),
            None => d,
        }
    }
    fn num<T: PartialEq + Default>(r: Option<T>, d: Option<T>) -> Option<T> {
        match r {
            Some(v) if v == T::default() => None,
            Some(v) => Some(v),
            None => d,
        }
    }
    fn list(r: Vec<String>, cleared: bool, d: Vec<String>) -> Vec<String> {
        if r.is_empty() && !cleared {
            d
        } else {
            r
        }
    }
    let linked = r.full == Some(false);
    let storage = match r.storage {
        None if linked => None,
        r => text(r, d.storage),
    };
    trellis_protocol::CloneOptions {
        storage,
        full: r.full.or(d.full),
        disk_size_gib: num(r.disk_size_gib, d.disk_size_gib),
        vm_id: r.vm_id,
        ci_user: text(r.ci_user, d.ci_user),
        ssh_keys: list(r.ssh_keys, cleared.ssh_keys, d.ssh_keys),
        ip_config: r.ip_config.or(d.ip_config),
        vlan_tag: num(r.vlan_tag, d.vlan_tag),
        pool: text(r.pool, d.pool),
        tags: list(r.tags, cleared.tags, d.tags),
        onboot: r.onboot.or(d.onboot),
    }
}

/// Whether a request asks for an option at all (not only Proxmox's defaults or clearing
/// a template's): those need an agent that applies clone options.
fn asks_for_options(request: Option<&trellis_protocol::CloneOptions>) -> bool {
    let Some(r) = request else { return false };
    let mut o = merge_clone_options(Some(r.clone()), ClearedLists::default(), None);
    if o.onboot == Some(false) {
        o.onboot = None;
    }
    if o.full == Some(false) {
        o.full = None;
    }
    !o.is_empty()
}

#[cfg(test)]
mod clone_merge_tests {
    use super::*;
    use trellis_protocol::CloneOptions;

    fn defaults() -> CloneOptions {
        CloneOptions {
            storage: Some("fast-ssd".into()),
            full: Some(true),
            disk_size_gib: Some(20),
            ci_user: Some("debian".into()),
            ssh_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMB4SHSfaWJ3pZ1r1Xp0mL0Q0VQ1xGz3WJ2yq3b2k1bA ops@example".into(),
            ],
            vlan_tag: Some(10),
            pool: Some("web".into()),
            tags: vec!["prod".into()],
            onboot: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn absent_fields_take_the_defaults() {
        let m = merge_clone_options(None, ClearedLists::default(), Some(&defaults()));
        assert_eq!(m, defaults());
    }

    #[test]
    fn explicit_values_override_and_clear_the_defaults() {
        let r = CloneOptions {
            storage: Some(String::new()),
            disk_size_gib: Some(0),
            ci_user: Some(String::new()),
            vlan_tag: Some(0),
            pool: Some(String::new()),
            onboot: Some(false),
            ..Default::default()
        };
        let cleared = ClearedLists {
            ssh_keys: true,
            tags: true,
        };
        let m = merge_clone_options(Some(r), cleared, Some(&defaults()));
        assert_eq!(
            m,
            CloneOptions {
                full: Some(true),
                onboot: Some(false),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_linked_clone_drops_the_default_storage() {
        let r = CloneOptions {
            full: Some(false),
            ..Default::default()
        };
        let m = merge_clone_options(Some(r), ClearedLists::default(), Some(&defaults()));
        assert_eq!((m.full, m.storage.as_deref()), (Some(false), None));
        assert!(m.validate().is_ok(), "{m:?}");
        // only clearing or Proxmox's defaults is not asking for options
        assert!(!asks_for_options(Some(&CloneOptions {
            full: Some(false),
            onboot: Some(false),
            storage: Some(String::new()),
            ..Default::default()
        })));
        assert!(asks_for_options(Some(&CloneOptions {
            onboot: Some(true),
            ..Default::default()
        })));
    }
}

/// Creates a node (size defaults from its template).
pub async fn create(db: &Db, b: CreateNode) -> DomainResult<NodeId> {
    let n = checked_new_node(db, b).await?;
    db.insert_node(&n).await?;
    Ok(n.id)
}

/// The node `b` asks for, checked (name, template, size) but not stored.
async fn checked_new_node(db: &Db, b: CreateNode) -> DomainResult<NewNode> {
    validate_name(&b.name)?;
    check_name_free(db, &b.name, b.force).await?;
    let tid = parse_template_id(&b.template_id)?;
    let t = super::templates::get(db, tid).await?;
    let memory = b.memory.unwrap_or(t.fields.memory);
    let cores = b.cores.unwrap_or(t.fields.cores);
    validate_size(memory, cores)?;
    Ok(NewNode {
        id: NodeId::new(),
        application: b.application.filter(|a| !a.trim().is_empty()),
        name: b.name,
        template_id: tid,
        memory,
        cores,
        name_forced: b.force,
    })
}

/// Creates a node and starts provisioning it, all or nothing: the provision is planned
/// (hypervisor online and able, template mapped, clone options valid) before anything is
/// stored, and the node is stored with its command in one transaction. A refused
/// provision (`agent_offline`, `capability_missing`, …) leaves no node behind, so the
/// same request can be sent again once the cause is fixed.
pub async fn create_with_provision(
    db: &Db,
    broker: &Broker,
    actor: &str,
    b: CreateNode,
    p: Provision,
) -> DomainResult<(NodeId, CommandRow)> {
    let n = checked_new_node(db, b).await?;
    let now = crate::time::now_ms();
    // The node as it will be stored, so the provision is planned from it.
    let row = NodeRow {
        id: n.id,
        application: n.application.clone(),
        name: n.name.clone(),
        template_id: Some(n.template_id),
        memory: n.memory,
        cores: n.cores,
        vm_id: None,
        hypervisor_id: None,
        ip_address: None,
        status: NodeStatus::PendingProvision,
        last_command_id: None,
        error: None,
        created_at: now,
        updated_at: now,
        vm_tag: None,
        vm_node: None,
        observed_at: None,
    };
    let new = plan_provision(db, actor, &row, p).await?;
    let agent_id = new.agent_id;
    let mut command = CommandRow::queued(&new, 0);
    // A name taken meanwhile is `DbError::NameTaken`: 409 `duplicate_name`.
    command.created_at = db
        .insert_node_provisioning(
            &n,
            &ProvisionStart {
                node: n.id,
                agent: agent_id,
                command: &new,
            },
        )
        .await?;
    broker.wake(agent_id);
    Ok((n.id, command))
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
    // A new name (not just other case) must be free; a rename has no force.
    if !name.eq_ignore_ascii_case(&n.name) {
        check_name_free(db, &name, false).await?;
    }
    let memory = b.memory.unwrap_or(n.memory);
    let cores = b.cores.unwrap_or(n.cores);
    // An imported node's size is unknown (0) until someone sets it.
    if b.memory.is_some() || b.cores.is_some() || n.memory > 0 {
        validate_size(memory, cores)?;
    }
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
            // Only between running and stopped, on a node whose VM Trellis tracks.
            Some(s)
                if NodeStatus::SETTABLE.contains(&s)
                    && NodeStatus::SETTABLE.contains(&n.status)
                    && n.vm_id.is_some() =>
            {
                s
            }
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

/// Deletes a node record whose VM does not exist (never made, destroyed, missing). A node
/// whose VM lives must be destroyed or explicitly forgotten: no path drops a record while
/// its VM runs on untracked.
pub async fn delete(db: &Db, id: NodeId) -> DomainResult<()> {
    let n = get(db, id).await?;
    if n.has_live_vm() {
        return Err(DomainError::conflict(
            "vm_exists",
            format!(
                "node {:?} still has VM {}: destroy it (deletes the VM) or forget it (keeps the VM)",
                n.name,
                n.vm_id.unwrap_or_default()
            ),
        ));
    }
    db.delete_node(id, false).await.map_err(busy)
}

/// What to import: a VM of a hypervisor's inventory.
pub struct Import {
    pub agent_id: String,
    pub vm_id: i64,
    /// Default: the VM's name.
    pub name: Option<String>,
    pub application: Option<String>,
    pub force: bool,
}

/// Creates a node for a VM Trellis did not make (or made and forgot), as the hypervisor's
/// latest inventory shows it: `running` or `stopped`, linked to the VM. Its size is
/// unknown (0) until set. Power works as for any node; destroy works only if the VM
/// carries a Trellis tag — for another VM it is refused (`vm_untagged`), so Trellis never
/// deletes a VM it did not make: forget the node and delete the VM in Proxmox.
pub async fn import(db: &Db, b: Import) -> DomainResult<NodeRow> {
    let agent_id: AgentId = b
        .agent_id
        .parse()
        .map_err(|_| DomainError::NotFound(format!("hypervisor {:?} not found", b.agent_id)))?;
    db.get_agent(agent_id)
        .await
        .map_err(DomainError::not_found(format_args!(
            "hypervisor {agent_id}"
        )))?;
    let vms = db.agent_vms(agent_id).await?;
    let Some(vm) = vms.iter().find(|v| v.vm_id == b.vm_id) else {
        return Err(DomainError::NotFound(format!(
            "VM {} is not in the latest inventory of hypervisor {agent_id}",
            b.vm_id
        )));
    };
    if let Some(node) = vm.tracked_by {
        return Err(DomainError::conflict(
            "already_tracked",
            format!("VM {} is already node {node}", b.vm_id),
        ));
    }
    let name = b
        .name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| vm.name.clone());
    validate_name(&name)?;
    check_name_free(db, &name, b.force).await?;
    let id = NodeId::new();
    db.import_node(&crate::db::NodeImport {
        id,
        agent: agent_id,
        vm_id: b.vm_id,
        name,
        application: b.application.filter(|a| !a.trim().is_empty()),
        memory: 0,
        cores: 0,
        name_forced: b.force,
    })
    .await
    .map_err(|e| match e {
        DbError::Conflict(m) => DomainError::conflict("already_tracked", m),
        DbError::NotFound => DomainError::NotFound(format!(
            "VM {} is no longer in the inventory of hypervisor {agent_id}",
            b.vm_id
        )),
        e => e.into(),
    })?;
    tracing::info!(node = %id, vm_id = b.vm_id, agent = %agent_id, "VM imported as a node");
    get(db, id).await
}

/// Drops a node record and keeps its VM in Proxmox (untracked from now on).
pub async fn forget(db: &Db, id: NodeId) -> DomainResult<NodeRow> {
    let n = get(db, id).await?;
    db.delete_node(id, true).await.map_err(busy)?;
    tracing::info!(node = %id, name = %n.name, vm_id = ?n.vm_id, "node forgotten; its VM is kept");
    Ok(n)
}

/// The Proxmox node a node's VM is on: what the inventory or the provision last saw, else
/// the hypervisor's first node (the agent looks the VM up again if it moved).
async fn vm_location(db: &Db, n: &NodeRow) -> DomainResult<(AgentId, u32, String)> {
    let (Some(agent_id), Some(vm_id)) = (n.hypervisor_id, n.vm_id) else {
        return Err(DomainError::conflict(
            "no_vm",
            format!("node {:?} has no VM", n.name),
        ));
    };
    let agent = db
        .get_agent(agent_id)
        .await
        .map_err(DomainError::not_found(format_args!(
            "hypervisor {agent_id}"
        )))?;
    let node = n
        .vm_node
        .clone()
        .or_else(|| {
            agent.facts["proxmox_nodes"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .ok_or_else(|| {
            DomainError::conflict(
                "vm_location_unknown",
                format!(
                    "the Proxmox node of VM {vm_id} is not known yet; wait for hypervisor {:?} to report its inventory",
                    agent.name
                ),
            )
        })?;
    let vm_id = u32::try_from(vm_id)
        .map_err(|_| DomainError::invalid("invalid_params", "the node's VM id is not a VMID"))?;
    Ok((agent_id, vm_id, node))
}

/// A power action on a node's VM.
pub struct Power {
    pub action: trellis_protocol::PowerAction,
    pub timeout_s: Option<u32>,
    pub force_after_s: Option<u32>,
}

/// Starts a power command on the node's VM; the node follows the state Proxmox reports
/// when it ends.
pub async fn power(
    db: &Db,
    broker: &Broker,
    actor: &str,
    id: NodeId,
    p: Power,
) -> DomainResult<(NodeRow, CommandRow)> {
    let n = get(db, id).await?;
    if !n.status.can_power() || n.vm_id.is_none() {
        return Err(DomainError::conflict(
            "invalid_state",
            format!(
                "node {:?} is {}: power actions need a node with a VM that no command is changing",
                n.name, n.status
            ),
        ));
    }
    let (agent_id, vm_id, node) = vm_location(db, &n).await?;
    let params = serde_json::to_value(trellis_protocol::VmPowerParams {
        vm_id,
        node,
        action: p.action,
        timeout_s: p.timeout_s,
        force_after_s: p.force_after_s,
    })
    .map_err(|e| DomainError::invalid("invalid_params", e.to_string()))?;
    let row = start_on_node(
        db,
        broker,
        actor,
        &n,
        agent_id,
        trellis_protocol::CommandType::VmPower,
        params,
        &[NodeStatus::Running, NodeStatus::Stopped, NodeStatus::Failed],
        None,
    )
    .await?;
    Ok((get(db, id).await?, row))
}

/// Starts destroying the node's VM (stop if running, delete with its disks); the agent
/// refuses a VM without this node's tag. The node is `destroying`, then `destroyed` (the
/// record stays with its history) or `failed`.
pub async fn destroy(
    db: &Db,
    broker: &Broker,
    actor: &str,
    id: NodeId,
    confirm_name: &str,
) -> DomainResult<(NodeRow, CommandRow)> {
    let n = get(db, id).await?;
    if confirm_name != n.name {
        return Err(DomainError::invalid(
            "confirmation_mismatch",
            format!("type the node's name ({:?}) to destroy its VM", n.name),
        ));
    }
    if !n.status.can_destroy() || n.vm_id.is_none() {
        return Err(DomainError::conflict(
            "invalid_state",
            format!(
                "node {:?} is {}: only a node with a VM that no command is changing can be destroyed",
                n.name, n.status
            ),
        ));
    }
    let Some(tag) = n.vm_tag.clone() else {
        return Err(DomainError::conflict(
            "vm_untagged",
            format!(
                "Trellis does not know the tag of VM {} of node {:?}, so it will not delete it; forget the node and delete the VM in Proxmox",
                n.vm_id.unwrap_or_default(),
                n.name
            ),
        ));
    };
    let (agent_id, vm_id, node) = vm_location(db, &n).await?;
    let params = serde_json::to_value(trellis_protocol::DestroyParams {
        vm_id,
        node,
        expected_tag: tag,
    })
    .map_err(|e| DomainError::invalid("invalid_params", e.to_string()))?;
    let row = start_on_node(
        db,
        broker,
        actor,
        &n,
        agent_id,
        trellis_protocol::CommandType::Destroy,
        params,
        &[
            NodeStatus::Running,
            NodeStatus::Stopped,
            NodeStatus::Failed,
            NodeStatus::Missing,
        ],
        Some(NodeStatus::Destroying),
    )
    .await?;
    Ok((get(db, id).await?, row))
}

/// Stores the command (`prepare` checks the agent can run `ty`) and links it to the node,
/// in one transaction.
#[allow(clippy::too_many_arguments)]
async fn start_on_node(
    db: &Db,
    broker: &Broker,
    actor: &str,
    n: &NodeRow,
    agent_id: AgentId,
    ty: trellis_protocol::CommandType,
    params: serde_json::Value,
    allowed: &[NodeStatus],
    status: Option<NodeStatus>,
) -> DomainResult<CommandRow> {
    let req = CreateCommand {
        agent_id,
        command_type: ty.as_str().into(),
        params,
        idempotency_key: None,
        timeout_secs: None,
        created_by: actor.to_string(),
    };
    let new = prepare(db, &req, None).await?.map_err(|existing| {
        DomainError::conflict(
            "node_busy",
            format!("command {} is already running", existing.id),
        )
    })?;
    let mut row = CommandRow::queued(&new, 0);
    row.created_at = db
        .start_node_command(&NodeCommandStart {
            node: n.id,
            command: &new,
            allowed,
            status,
        })
        .await
        .map_err(|e| match e {
            DbError::Conflict(m) => DomainError::conflict("node_busy", m),
            e => e.into(),
        })?;
    broker.wake(agent_id);
    Ok(row)
}

/// Starts provisioning a node on a hypervisor: checks the node, agent and template,
/// then claims the node and stores the command in one transaction, and wakes the agent.
pub async fn start_provision(
    db: &Db,
    broker: &Broker,
    actor: &str,
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
    let new = plan_provision(db, actor, &n, p).await?;
    let agent_id = new.agent_id;
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

/// Checks the hypervisor (online, can provision) and the node's template (mapped to a
/// Proxmox template), and builds the node's provision command — not stored yet. Also used
/// for the nodes of a bulk provision, which do not exist before their batch is stored.
pub(super) async fn plan_provision(
    db: &Db,
    actor: &str,
    n: &NodeRow,
    p: Provision,
) -> DomainResult<crate::db::NewCommand> {
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
    let Some(vmid) = t.fields.proxmox_template_id else {
        return Err(DomainError::invalid(
            "template_not_mapped",
            format!(
                "template {:?} is not mapped to a Proxmox template; set its Proxmox template id",
                t.fields.name
            ),
        ));
    };
    let features = agent.facts["provision_features"].as_array();
    let knows_options = features.is_some_and(|f| {
        f.iter()
            .any(|v| v.as_str() == Some(trellis_protocol::CLONE_OPTIONS_FEATURE))
    });
    let requested = asks_for_options(p.clone_options.as_ref());
    if requested && !knows_options {
        return Err(DomainError::conflict(
            "capability_missing",
            format!(
                "hypervisor {:?} runs a tendril that does not apply clone options (storage, cloud-init, VLAN, …); upgrade it or provision without them",
                agent.name
            ),
        ));
    }
    // A template's defaults go only to agents that apply them (an older tendril would
    // ignore them anyway; they are not the admin's explicit choice).
    let defaults = t.fields.clone_defaults.as_ref().filter(|_| knows_options);
    let options = merge_clone_options(p.clone_options, p.cleared_lists, defaults);
    options.validate().map_err(|e| {
        DomainError::invalid("invalid_params", format!("cloneOptions: {}", e.message))
    })?;
    let mut params = serde_json::json!({
        "name": n.name,
        "template": {
            // `clone` is the contract's name; agents from before the node lifecycle (they
            // do not offer vm_power) know only the older spelling.
            "type": if agent.has_capability(CommandType::VmPower) { "clone" } else { "proxmox" },
            "template_id": vmid,
            "template_node": t.fields.proxmox_node,
            "memory": n.memory,
            "cores": n.cores,
            "description": t.fields.description,
            "network_bridge": t.fields.network_bridge,
            "pre_provision_commands": t.fields.pre_provision_commands,
            "post_provision_commands": t.fields.post_provision_commands,
        },
        "target_node": p.target_node.filter(|s| !s.is_empty()),
        "keep_on_failure": p.keep_on_failure,
    });
    if !options.is_empty() {
        params["clone_options"] = serde_json::to_value(&options)
            .map_err(|e| DomainError::invalid("invalid_params", e.to_string()))?;
    }
    let req = CreateCommand {
        agent_id,
        command_type: CommandType::Provision.as_str().into(),
        params,
        idempotency_key: None,
        timeout_secs: None,
        created_by: actor.to_string(),
    };
    // Without an idempotency key `prepare` never finds an earlier command.
    let new = prepare(db, &req, None).await?.map_err(|existing| {
        DomainError::conflict(
            "already_provisioning",
            format!("command {} already provisions this node", existing.id),
        )
    })?;
    Ok(new)
}
