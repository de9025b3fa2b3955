//! Nodes (the records of the VMs Trellis provisions) and their state machine's stored
//! side. Every transition a command causes is written here, on the caller's connection,
//! in the same transaction as the command change that causes it: starting a provision
//! (claim the node, store the command, link them), a retry taking over the node, a
//! provision outcome, and a server-decided end. [`Db::repair_stuck_nodes`] is the
//! housekeeping pass that repairs a node whose command is terminal or absent.

use sqlx::any::AnyRow;
use sqlx::Row;
use trellis_protocol::{
    CommandType, FinalStatus, Outcome, ProvisionResult, VmPowerResult, VmState,
};

use super::commands::{insert_commands_on, NewCommand};
use super::sql::{id, opt_id, TERMINAL_SQL};
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, CommandId, CommandStatus, NodeId, NodeStatus, TemplateId};
use crate::time::now_ms;

pub(super) const COLS: &str =
    "id, application, name, template_id, memory, cores, vm_id, hypervisor_id, ip_address, status, \
    last_command_id, error, created_at, updated_at, vm_tag, vm_node, observed_at";

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: NodeId,
    pub application: Option<String>,
    pub name: String,
    pub template_id: Option<TemplateId>,
    pub memory: i64,
    pub cores: i64,
    pub vm_id: Option<i64>,
    pub hypervisor_id: Option<AgentId>,
    pub ip_address: Option<String>,
    pub status: NodeStatus,
    pub last_command_id: Option<CommandId>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The tag its VM carries (`trellis-command=<root id of its provision>`).
    pub vm_tag: Option<String>,
    /// The Proxmox node its VM is on.
    pub vm_node: Option<String>,
    /// When the agent's inventory last showed its VM.
    pub observed_at: Option<i64>,
}

impl NodeRow {
    pub(super) fn from_row(r: &AnyRow) -> DbResult<Self> {
        let status: String = r.try_get("status")?;
        Ok(Self {
            id: id(r, "id")?,
            application: r.try_get("application")?,
            name: r.try_get("name")?,
            template_id: opt_id(r, "template_id")?,
            memory: r.try_get("memory")?,
            cores: r.try_get("cores")?,
            vm_id: r.try_get("vm_id")?,
            hypervisor_id: opt_id(r, "hypervisor_id")?,
            ip_address: r.try_get("ip_address")?,
            status: NodeStatus::parse(&status)
                .ok_or_else(|| DbError::Corrupt(format!("node status {status:?}")))?,
            last_command_id: opt_id(r, "last_command_id")?,
            error: r.try_get("error")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            vm_tag: r.try_get("vm_tag")?,
            vm_node: r.try_get("vm_node")?,
            observed_at: r.try_get("observed_at")?,
        })
    }

    /// Whether a VM Trellis has not deleted may exist for this node.
    pub fn has_live_vm(&self) -> bool {
        self.vm_id.is_some() && !matches!(self.status, NodeStatus::Destroyed | NodeStatus::Missing)
    }
}

pub struct NewNode {
    pub id: NodeId,
    pub application: Option<String>,
    pub name: String,
    pub template_id: TemplateId,
    pub memory: i64,
    pub cores: i64,
    /// Created with `force`: the name may duplicate a live node's.
    pub name_forced: bool,
}

/// The editable fields of a node, all given (the caller merges with the current row).
pub struct NodeUpdate {
    pub name: String,
    pub template_id: Option<TemplateId>,
    pub memory: i64,
    pub cores: i64,
    pub application: Option<String>,
    pub status: NodeStatus,
}

/// Starting a node's provision: claim the node for `agent` and store `command`, linked.
pub struct ProvisionStart<'a> {
    pub node: NodeId,
    pub agent: AgentId,
    pub command: &'a NewCommand,
}

/// Starting a command on a node's VM (power, destroy): the node must be in one of
/// `allowed` with no command still running on it; it points at `command` and, when given,
/// moves to `status`.
pub struct NodeCommandStart<'a> {
    pub node: NodeId,
    pub command: &'a NewCommand,
    pub allowed: &'a [NodeStatus],
    pub status: Option<NodeStatus>,
}

/// Nodes left in a transitional status whose command is terminal or absent (the
/// `nodes_status` index, then the command by primary key).
pub(super) const REPAIR_SQL: &str = "SELECT n.id, n.last_command_id, c.id AS command_id, c.agent_id, \
    c.status AS command_status, c.result, c.error AS command_error, c.type AS command_type, c.root_id \
    FROM nodes n LEFT JOIN commands c ON c.id = n.last_command_id \
    WHERE n.status IN ($1, $2) AND (c.id IS NULL OR c.status IN ('succeeded','failed','cancelled','timed_out'))";

impl Db {
    pub async fn get_node(&self, node: NodeId) -> DbResult<NodeRow> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM nodes WHERE id = $1"))
            .bind(node.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound)?;
        NodeRow::from_row(&row)
    }

    pub async fn list_nodes(&self) -> DbResult<Vec<NodeRow>> {
        let rows = sqlx::query(&format!("SELECT {COLS} FROM nodes ORDER BY created_at"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(NodeRow::from_row).collect()
    }

    pub async fn insert_node(&self, n: &NewNode) -> DbResult<()> {
        let mut conn = self.writer().acquire().await?;
        insert_node_on(&mut conn, n, now_ms()).await
    }

    /// Creates a node and starts its provision in one transaction: the node is stored
    /// already claimed (`provisioning`, pointing at `p.command`) with the command, or not
    /// at all (`NameTaken` when its name was taken meanwhile). Returns the command's
    /// `created_at`.
    pub async fn insert_node_provisioning(
        &self,
        n: &NewNode,
        p: &ProvisionStart<'_>,
    ) -> DbResult<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        insert_node_on(&mut tx, n, now).await?;
        claim_for_provision(&mut tx, p, now).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// Updates a node that is not being provisioned (`Conflict` if it is). A new name
    /// (not just other case) must be free of live nodes (`NameTaken`).
    pub async fn update_node(&self, node: NodeId, u: &NodeUpdate) -> DbResult<()> {
        let n = sqlx::query(
            "UPDATE nodes SET name = $1, template_id = $2, memory = $3, cores = $4, application = $5, \
             status = $6, updated_at = $7, \
             name_forced = CASE WHEN LOWER(name) = LOWER($1) THEN name_forced ELSE 0 END \
             WHERE id = $8 AND status NOT IN ($9, $10)",
        )
        .bind(&u.name)
        .bind(u.template_id.map(|t| t.to_string()))
        .bind(u.memory)
        .bind(u.cores)
        .bind(u.application.clone())
        .bind(u.status.as_str())
        .bind(now_ms())
        .bind(node.to_string())
        .bind(NodeStatus::Provisioning.as_str())
        .bind(NodeStatus::Destroying.as_str())
        .execute(self.writer())
        .await
        .map_err(super::node_import::name_taken(&u.name))?
        .rows_affected();
        if n == 0 {
            self.get_node(node).await?;
            return Err(DbError::Conflict("a command is changing the node".into()));
        }
        Ok(())
    }

    /// Deletes a node record. With `keep_vm` (forget) any node no command is changing;
    /// without, only one whose VM does not exist (never made, destroyed, or missing).
    /// `Conflict` otherwise.
    pub async fn delete_node(&self, node: NodeId, keep_vm: bool) -> DbResult<()> {
        let busy =
            || DbError::Conflict("a command is changing the node, or its VM still exists".into());
        let mut tx = self.begin_write().await?;
        let Some(seen) = idle_node(&mut tx, node).await? else {
            return Err(busy());
        };
        if seen.status.is_transitional()
            || (!keep_vm
                && seen.has_vm
                && !matches!(seen.status, NodeStatus::Destroyed | NodeStatus::Missing))
        {
            return Err(busy());
        }
        // Compare-and-delete on what was read: a command claimed meanwhile (PostgreSQL,
        // another transaction) changed `last_command_id`, so nothing is deleted.
        let n = sqlx::query(
            "DELETE FROM nodes WHERE id = $1 AND status = $2 AND COALESCE(last_command_id, '') = $3",
        )
        .bind(node.to_string())
        .bind(seen.status.as_str())
        .bind(seen.last_command.map(|c| c.to_string()).unwrap_or_default())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(busy());
        }
        tx.commit().await?;
        Ok(())
    }

    /// Points the node at a new command on its VM and stores the command, in one
    /// transaction; `Conflict` when the node is not in an allowed status or a command is
    /// still running on it. Returns the command's `created_at`.
    pub async fn start_node_command(&self, p: &NodeCommandStart<'_>) -> DbResult<i64> {
        let now = now_ms();
        let refused = || {
            DbError::Conflict(
                "a command is still running on the node, or its status does not allow this".into(),
            )
        };
        let mut tx = self.begin_write().await?;
        let Some(seen) = idle_node(&mut tx, p.node).await? else {
            return Err(refused());
        };
        if !seen.has_vm || !p.allowed.contains(&seen.status) {
            return Err(refused());
        }
        // Compare-and-set on what was read: of two concurrent claims (PostgreSQL), the
        // second finds `last_command_id` changed and claims nothing.
        let claimed = sqlx::query(
            "UPDATE nodes SET last_command_id = $1, status = $2, error = NULL, updated_at = $3 \
             WHERE id = $4 AND status = $5 AND COALESCE(last_command_id, '') = $6",
        )
        .bind(p.command.id.to_string())
        .bind(p.status.unwrap_or(seen.status).as_str())
        .bind(now)
        .bind(p.node.to_string())
        .bind(seen.status.as_str())
        .bind(seen.last_command.map(|c| c.to_string()).unwrap_or_default())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            return Err(refused());
        }
        insert_commands_on(&mut tx, &[p.command], now).await?;
        link_node(&mut tx, p.command.id, p.node).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// Claims the node (only one without a VM that is not already provisioning: two
    /// clicks must not make two VMs), stores the provision command and points the node at
    /// it — one transaction, so a crash leaves either all of it or none. Returns the
    /// command's `created_at`; `Conflict` when the node cannot be claimed.
    pub async fn start_provision(&self, p: &ProvisionStart<'_>) -> DbResult<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        claim_for_provision(&mut tx, p, now).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// The node a command was started for (provision, power, destroy and their retries),
    /// whoever started it; `None` for a command made directly (`POST /api/commands`).
    pub async fn command_node(&self, command: CommandId) -> DbResult<Option<NodeId>> {
        let row = sqlx::query("SELECT node_id FROM commands WHERE id = $1")
            .bind(command.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(DbError::NotFound)?;
        opt_id(&row, "node_id")
    }

    /// Stores a retry and lets it take over the node its original was provisioning, in
    /// one transaction. Returns the new command's `created_at`; `Conflict` when the retry
    /// already exists (its idempotency key is taken).
    /// With `node_required` (a node's provision), a node must still point at `of` without a
    /// VM, else `NodeMoved` and nothing is stored: a retry must not build a VM no node tracks.
    pub async fn insert_retry(
        &self,
        retry: &NewCommand,
        of: CommandId,
        node_required: bool,
    ) -> DbResult<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        insert_commands_on(&mut tx, &[retry], now).await?;
        inherit_node(&mut tx, retry.id, of).await?;
        let n = sqlx::query(
            "UPDATE nodes SET last_command_id = $1, status = $2, error = NULL, updated_at = $3 \
             WHERE last_command_id = $4 AND vm_id IS NULL AND status = $5",
        )
        .bind(retry.id.to_string())
        .bind(NodeStatus::Provisioning.as_str())
        .bind(now)
        .bind(of.to_string())
        .bind(NodeStatus::Failed.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if node_required && n == 0 {
            return Err(DbError::NodeMoved);
        }
        tx.commit().await?;
        Ok(now)
    }

    /// Housekeeping: a node left `provisioning` whose command is terminal gets that
    /// command's outcome; one whose command is absent fails. Returns the nodes repaired.
    pub async fn repair_stuck_nodes(&self) -> DbResult<Vec<NodeId>> {
        let rows = sqlx::query(REPAIR_SQL)
            .bind(NodeStatus::Provisioning.as_str())
            .bind(NodeStatus::Destroying.as_str())
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut repaired = Vec::with_capacity(rows.len());
        let mut tx = self.begin_write().await?;
        for r in &rows {
            let node: NodeId = id(r, "id")?;
            let command: Option<CommandId> = opt_id(r, "command_id")?;
            match command {
                Some(command) => {
                    let status = super::sql::command_status(r, "command_status")?;
                    let outcome = Outcome {
                        status: status.to_final(),
                        result: super::sql::json_col(r, "result")?,
                        error: super::sql::json_col(r, "command_error")?
                            .and_then(|e| serde_json::from_value(e).ok()),
                    };
                    let ty = super::commands::command_type(r, "command_type")?;
                    node_outcome(
                        &mut tx,
                        ty,
                        command,
                        id(r, "root_id")?,
                        id(r, "agent_id")?,
                        &outcome,
                    )
                    .await?;
                }
                None => {
                    sqlx::query(
                        "UPDATE nodes SET status = $1, error = $2, updated_at = $3 WHERE id = $4 AND status IN ($5, $6)",
                    )
                    .bind(NodeStatus::Failed.as_str())
                    .bind("command_interrupted: the node's command was never stored; try again")
                    .bind(now)
                    .bind(node.to_string())
                    .bind(NodeStatus::Provisioning.as_str())
                    .bind(NodeStatus::Destroying.as_str())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            repaired.push(node);
        }
        tx.commit().await?;
        Ok(repaired)
    }

    pub async fn nodes_using_template(&self, template: TemplateId) -> DbResult<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM nodes WHERE template_id = $1")
                .bind(template.to_string())
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }
}

/// A node as a claim sees it.
struct Seen {
    status: NodeStatus,
    has_vm: bool,
    last_command: Option<CommandId>,
}

/// The node, if no command is running on it (its last command is absent or terminal).
async fn idle_node(conn: &mut sqlx::AnyConnection, node: NodeId) -> DbResult<Option<Seen>> {
    let row = sqlx::query(&format!(
        "SELECT n.status, n.vm_id, n.last_command_id, \
         (SELECT COUNT(*) FROM commands c WHERE c.id = n.last_command_id AND c.status NOT IN {TERMINAL_SQL}) AS running \
         FROM nodes n WHERE n.id = $1"
    ))
    .bind(node.to_string())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::NotFound)?;
    let running: i64 = row.try_get("running")?;
    if running > 0 {
        return Ok(None);
    }
    let status: String = row.try_get("status")?;
    let vm_id: Option<i64> = row.try_get("vm_id")?;
    Ok(Some(Seen {
        status: NodeStatus::parse(&status)
            .ok_or_else(|| DbError::Corrupt(format!("node status {status:?}")))?,
        has_vm: vm_id.is_some(),
        last_command: opt_id(&row, "last_command_id")?,
    }))
}

/// A destroy the agent lost (it restarted mid-way) runs again as a new attempt that
/// takes over the node, which stays `destroying`: destroy is idempotent, and a node must
/// not be left `failed` by a crash. In the caller's transaction; returns the new id.
pub(super) async fn rerun_lost_destroy(
    db: &super::Db,
    conn: &mut sqlx::AnyConnection,
    agent: AgentId,
    lost: &super::DispatchRow,
    now: i64,
) -> DbResult<CommandId> {
    let mut retry = NewCommand {
        id: CommandId::new(),
        agent_id: agent,
        command_type: CommandType::Destroy,
        params: lost.params.clone(),
        idempotency_key: Some(format!("retry:{}", lost.id)),
        created_by: "trellis:rerun-lost-destroy".into(),
        deadline_at: now + 1800 * 1000,
        attempt: lost.attempt + 1,
        root_id: lost.root_id,
        retry_of: Some(lost.id),
        signature: None,
    };
    db.sign_new(&mut retry).map_err(DbError::Corrupt)?;
    insert_commands_on(conn, &[&retry], now).await?;
    inherit_node(conn, retry.id, lost.id).await?;
    sqlx::query(
        "UPDATE nodes SET last_command_id = $1, updated_at = $2 WHERE last_command_id = $3",
    )
    .bind(retry.id.to_string())
    .bind(now)
    .bind(lost.id.to_string())
    .execute(conn)
    .await?;
    Ok(retry.id)
}

/// Applies a server-decided end (cancel, deadline, lost, revoked) of a command to the
/// node that points at it, in the caller's transaction, so a reader never sees the command
/// ended but its node still changing: a provision or destroy in progress fails; a power
/// command leaves the status and records the error.
pub(super) async fn fail_node_of(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    message: &str,
    now: i64,
) -> DbResult<()> {
    sqlx::query(
        "UPDATE nodes SET status = CASE WHEN status IN ($5, $6) THEN $1 ELSE status END, \
         error = $2, updated_at = $3 WHERE last_command_id = $4",
    )
    .bind(NodeStatus::Failed.as_str())
    .bind(message)
    .bind(now)
    .bind(command.to_string())
    .bind(NodeStatus::Provisioning.as_str())
    .bind(NodeStatus::Destroying.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

fn outcome_message(what: &str, o: &Outcome) -> String {
    o.error
        .as_ref()
        .map(|e| match &e.stage {
            Some(s) => format!("{} (stage {s}): {}", e.code, e.message),
            None => format!("{}: {}", e.code, e.message),
        })
        .unwrap_or_else(|| match o.status {
            FinalStatus::Succeeded => format!("{what} ended without a result"),
            s => format!("{what} ended {}", s.as_str()),
        })
}

/// Moves the node that points at a command to where the command's end leads, in the
/// caller's transaction (see the transitions on [`NodeStatus`]).
pub(super) async fn node_outcome(
    conn: &mut sqlx::AnyConnection,
    ty: CommandType,
    command: CommandId,
    root: CommandId,
    agent: AgentId,
    o: &Outcome,
) -> DbResult<()> {
    match ty {
        CommandType::Provision => provision_outcome(conn, command, root, agent, o).await,
        CommandType::VmPower => power_outcome(conn, command, o).await,
        CommandType::Destroy => destroy_outcome(conn, command, o).await,
        _ => Ok(()),
    }
}

async fn power_outcome(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    o: &Outcome,
) -> DbResult<()> {
    let status = CommandStatus::from_final(o.status);
    let reported = o
        .result
        .as_ref()
        .and_then(|r| serde_json::from_value::<VmPowerResult>(r.clone()).ok())
        .map(|r| r.status == VmState::Running);
    let row = sqlx::query("SELECT status FROM nodes WHERE last_command_id = $1")
        .bind(command.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(()) };
    let before: String = row.try_get("status")?;
    let Some(before) = NodeStatus::parse(&before) else {
        return Ok(());
    };
    let next = before.after_power(status, reported);
    let error = (status != CommandStatus::Succeeded).then(|| outcome_message("power action", o));
    sqlx::query(
        "UPDATE nodes SET status = $1, error = $2, updated_at = $3, \
         observed_at = CASE WHEN $4 = 1 THEN $3 ELSE observed_at END WHERE last_command_id = $5",
    )
    .bind(next.as_str())
    .bind(error)
    .bind(now_ms())
    .bind(i64::from(reported.is_some()))
    .bind(command.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn destroy_outcome(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    o: &Outcome,
) -> DbResult<()> {
    let status = CommandStatus::from_final(o.status);
    let next = NodeStatus::after_destroy(status);
    let error = (next != NodeStatus::Destroyed).then(|| outcome_message("destroy", o));
    sqlx::query(
        "UPDATE nodes SET status = $1, error = $2, updated_at = $3 \
         WHERE last_command_id = $4 AND status = $5",
    )
    .bind(next.as_str())
    .bind(error)
    .bind(now_ms())
    .bind(command.to_string())
    .bind(NodeStatus::Destroying.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves the node that points at a provision command to where its outcome leads
/// ([`NodeStatus::after_provision`]); a VM that is up but whose post-provision commands
/// failed (`status: partial`) makes the node `running` with the error shown.
async fn provision_outcome(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    root: CommandId,
    agent: AgentId,
    o: &Outcome,
) -> DbResult<()> {
    let now = now_ms();
    let result = o
        .result
        .as_ref()
        .and_then(|r| serde_json::from_value::<ProvisionResult>(r.clone()).ok());
    let next = NodeStatus::after_provision(CommandStatus::from_final(o.status), result.is_some());
    match (next, result) {
        (NodeStatus::Running, Some(r)) => {
            let error = (r.status == trellis_protocol::ProvisionStatus::Partial).then(|| {
                match (&r.error, &o.error) {
                    (Some(e), _) | (None, Some(e)) => format!("{}: {}", e.code, e.message),
                    (None, None) => {
                        "partial: the VM is up but its post-provision commands did not all succeed"
                            .into()
                    }
                }
            });
            sqlx::query(
                "UPDATE nodes SET status = $1, vm_id = $2, ip_address = $3, hypervisor_id = $4, \
                 error = $5, updated_at = $6, vm_tag = $7, vm_node = $8, observed_at = $6, \
                 vm_tag_listed = 1, absent_reports = 0 WHERE last_command_id = $9",
            )
            .bind(NodeStatus::Running.as_str())
            .bind(i64::from(r.vm_id))
            .bind(r.ip_address)
            .bind(agent.to_string())
            .bind(error)
            .bind(now)
            .bind(trellis_protocol::vm_tag(root.0))
            .bind(r.node)
            .bind(command.to_string())
            .execute(&mut *conn)
            .await?;
        }
        _ => {
            let msg = outcome_message("provision", o);
            // A VM kept after a failure (keep_on_failure, or a cleanup that could not
            // finish) is recorded, so the admin can power, destroy or forget it.
            let kept = o
                .error
                .as_ref()
                .and_then(|e| e.details.as_ref())
                .filter(|d| d["status"] == "partial")
                .and_then(|d| {
                    let vm = d["vm_id"]
                        .as_u64()
                        .filter(|v| (100..=999_999_999).contains(v))?;
                    Some((vm as i64, d["node"].as_str().map(str::to_string)))
                });
            if let Some((vm_id, vm_node)) = kept {
                sqlx::query(
                    "UPDATE nodes SET status = $1, error = $2, updated_at = $3, vm_id = $4, vm_node = $5, \
                     vm_tag = $6, vm_tag_listed = 1, hypervisor_id = $7 WHERE last_command_id = $8 AND status = $9",
                )
                .bind(NodeStatus::Failed.as_str())
                .bind(msg)
                .bind(now)
                .bind(vm_id)
                .bind(vm_node)
                .bind(trellis_protocol::vm_tag(root.0))
                .bind(agent.to_string())
                .bind(command.to_string())
                .bind(NodeStatus::Provisioning.as_str())
                .execute(&mut *conn)
                .await?;
                return Ok(());
            }
            sqlx::query(
                "UPDATE nodes SET status = $1, error = $2, updated_at = $3 \
                 WHERE last_command_id = $4 AND status = $5",
            )
            .bind(NodeStatus::Failed.as_str())
            .bind(msg)
            .bind(now)
            .bind(command.to_string())
            .bind(NodeStatus::Provisioning.as_str())
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Records the node a command is for, in the caller's transaction.
async fn link_node(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    node: NodeId,
) -> DbResult<()> {
    sqlx::query("UPDATE commands SET node_id = $1 WHERE id = $2")
        .bind(node.to_string())
        .bind(command.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A retry is for the node its original was for.
async fn inherit_node(
    conn: &mut sqlx::AnyConnection,
    retry: CommandId,
    of: CommandId,
) -> DbResult<()> {
    sqlx::query(
        "UPDATE commands SET node_id = (SELECT o.node_id FROM commands o WHERE o.id = $1) WHERE id = $2",
    )
    .bind(of.to_string())
    .bind(retry.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Inserts a new node (`pending_provision`); `NameTaken` on a live name.
async fn insert_node_on(conn: &mut sqlx::AnyConnection, n: &NewNode, now: i64) -> DbResult<()> {
    sqlx::query(
        "INSERT INTO nodes (id, application, name, template_id, memory, cores, status, name_forced, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(n.id.to_string())
    .bind(n.application.clone())
    .bind(&n.name)
    .bind(n.template_id.to_string())
    .bind(n.memory)
    .bind(n.cores)
    .bind(NodeStatus::PendingProvision.as_str())
    .bind(i64::from(n.name_forced))
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(super::node_import::name_taken(&n.name))?;
    Ok(())
}

/// Claims a node without a VM for a provision (`provisioning`, on `p.agent`, pointing at
/// the command) and stores the command; `Conflict` if it is already being provisioned.
async fn claim_for_provision(
    conn: &mut sqlx::AnyConnection,
    p: &ProvisionStart<'_>,
    now: i64,
) -> DbResult<()> {
    let claimed = sqlx::query(
        "UPDATE nodes SET status = $1, hypervisor_id = $2, last_command_id = $3, error = NULL, \
         updated_at = $4 WHERE id = $5 AND status <> $1 AND vm_id IS NULL",
    )
    .bind(NodeStatus::Provisioning.as_str())
    .bind(p.agent.to_string())
    .bind(p.command.id.to_string())
    .bind(now)
    .bind(p.node.to_string())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if claimed == 0 {
        return Err(DbError::Conflict(
            "the node is already being provisioned".into(),
        ));
    }
    insert_commands_on(conn, &[p.command], now).await?;
    link_node(conn, p.command.id, p.node).await?;
    Ok(())
}
