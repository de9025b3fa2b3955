//! Nodes (the records of the VMs Trellis provisions) and their state machine's stored
//! side. Every transition a command causes is written here, on the caller's connection,
//! in the same transaction as the command change that causes it: starting a provision
//! (claim the node, store the command, link them), a retry taking over the node, a
//! provision outcome, and a server-decided end. [`Db::repair_stuck_nodes`] is the
//! housekeeping pass that repairs a node whose command is terminal or absent.

use sqlx::any::AnyRow;
use sqlx::Row;
use trellis_protocol::{FinalStatus, Outcome, ProvisionResult};

use super::commands::{insert_commands_on, NewCommand};
use super::sql::{id, opt_id, TERMINAL_SQL};
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, CommandId, CommandStatus, NodeId, NodeStatus, TemplateId};
use crate::time::now_ms;

const COLS: &str =
    "id, application, name, template_id, memory, cores, vm_id, hypervisor_id, ip_address, status, \
    last_command_id, error, created_at, updated_at";

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
}

impl NodeRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
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
        })
    }
}

pub struct NewNode {
    pub id: NodeId,
    pub application: Option<String>,
    pub name: String,
    pub template_id: TemplateId,
    pub memory: i64,
    pub cores: i64,
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
        let now = now_ms();
        sqlx::query(
            "INSERT INTO nodes (id, application, name, template_id, memory, cores, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(n.id.to_string())
        .bind(n.application.clone())
        .bind(&n.name)
        .bind(n.template_id.to_string())
        .bind(n.memory)
        .bind(n.cores)
        .bind(NodeStatus::PendingProvision.as_str())
        .bind(now)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Updates a node that is not being provisioned (`Conflict` if it is).
    pub async fn update_node(&self, node: NodeId, u: &NodeUpdate) -> DbResult<()> {
        let n = sqlx::query(
            "UPDATE nodes SET name = $1, template_id = $2, memory = $3, cores = $4, application = $5, \
             status = $6, updated_at = $7 WHERE id = $8 AND status <> $9",
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
        .execute(self.writer())
        .await?
        .rows_affected();
        if n == 0 {
            self.get_node(node).await?;
            return Err(DbError::Conflict("the node is being provisioned".into()));
        }
        Ok(())
    }

    /// Deletes a node that is not being provisioned (`Conflict` if it is).
    pub async fn delete_node(&self, node: NodeId) -> DbResult<()> {
        let n = sqlx::query("DELETE FROM nodes WHERE id = $1 AND status <> $2")
            .bind(node.to_string())
            .bind(NodeStatus::Provisioning.as_str())
            .execute(self.writer())
            .await?
            .rows_affected();
        if n == 0 {
            self.get_node(node).await?;
            return Err(DbError::Conflict(
                "the node is being provisioned; cancel the command first".into(),
            ));
        }
        Ok(())
    }

    /// Claims the node (only one without a VM that is not already provisioning: two
    /// clicks must not make two VMs), stores the provision command and points the node at
    /// it — one transaction, so a crash leaves either all of it or none. Returns the
    /// command's `created_at`; `Conflict` when the node cannot be claimed.
    pub async fn start_provision(&self, p: &ProvisionStart<'_>) -> DbResult<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let claimed = sqlx::query(
            "UPDATE nodes SET status = $1, hypervisor_id = $2, last_command_id = $3, error = NULL, \
             updated_at = $4 WHERE id = $5 AND status <> $1 AND vm_id IS NULL",
        )
        .bind(NodeStatus::Provisioning.as_str())
        .bind(p.agent.to_string())
        .bind(p.command.id.to_string())
        .bind(now)
        .bind(p.node.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            return Err(DbError::Conflict(
                "the node is already being provisioned".into(),
            ));
        }
        insert_commands_on(&mut tx, &[p.command], now).await?;
        tx.commit().await?;
        Ok(now)
    }

    /// Stores a retry and lets it take over the node its original was provisioning, in
    /// one transaction. Returns the new command's `created_at`; `Conflict` when the retry
    /// already exists (its idempotency key is taken).
    pub async fn insert_retry(&self, retry: &NewCommand, of: CommandId) -> DbResult<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        insert_commands_on(&mut tx, &[retry], now).await?;
        sqlx::query(
            "UPDATE nodes SET last_command_id = $1, status = $2, error = NULL, updated_at = $3 \
             WHERE last_command_id = $4 AND vm_id IS NULL",
        )
        .bind(retry.id.to_string())
        .bind(NodeStatus::Provisioning.as_str())
        .bind(now)
        .bind(of.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(now)
    }

    /// Housekeeping: a node left `provisioning` whose command is terminal gets that
    /// command's outcome; one whose command is absent fails. Returns the nodes repaired.
    pub async fn repair_stuck_nodes(&self) -> DbResult<Vec<NodeId>> {
        let rows = sqlx::query(&format!(
            "SELECT n.id, n.last_command_id, c.id AS command_id, c.agent_id, c.status AS command_status, \
             c.result, c.error AS command_error FROM nodes n LEFT JOIN commands c ON c.id = n.last_command_id \
             WHERE n.status = $1 AND (c.id IS NULL OR c.status IN {TERMINAL_SQL})"
        ))
        .bind(NodeStatus::Provisioning.as_str())
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
                    node_outcome(&mut tx, command, id(r, "agent_id")?, &outcome).await?;
                }
                None => {
                    sqlx::query(
                        "UPDATE nodes SET status = $1, error = $2, updated_at = $3 WHERE id = $4 AND status = $5",
                    )
                    .bind(NodeStatus::Failed.as_str())
                    .bind("provision_interrupted: the provision command was never stored; provision again")
                    .bind(now)
                    .bind(node.to_string())
                    .bind(NodeStatus::Provisioning.as_str())
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

/// Marks the node a provision command was building as failed, in the caller's
/// transaction, so a reader never sees the command ended but its node still provisioning.
pub(super) async fn fail_node_of(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
    message: &str,
    now: i64,
) -> DbResult<()> {
    sqlx::query(
        "UPDATE nodes SET status = $1, error = $2, updated_at = $3 \
         WHERE last_command_id = $4 AND status = $5",
    )
    .bind(NodeStatus::Failed.as_str())
    .bind(message)
    .bind(now)
    .bind(command.to_string())
    .bind(NodeStatus::Provisioning.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the node that points at a provision command to where its outcome leads
/// ([`NodeStatus::after_provision`]), in the caller's transaction.
pub(super) async fn node_outcome(
    conn: &mut sqlx::AnyConnection,
    command: CommandId,
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
            sqlx::query(
                "UPDATE nodes SET status = $1, vm_id = $2, ip_address = $3, hypervisor_id = $4, \
                 error = NULL, updated_at = $5 WHERE last_command_id = $6",
            )
            .bind(NodeStatus::Running.as_str())
            .bind(i64::from(r.vm_id))
            .bind(r.ip_address)
            .bind(agent.to_string())
            .bind(now)
            .bind(command.to_string())
            .execute(&mut *conn)
            .await?;
        }
        _ => {
            let msg = o
                .error
                .as_ref()
                .map(|e| match &e.stage {
                    Some(s) => format!("{} (stage {s}): {}", e.code, e.message),
                    None => format!("{}: {}", e.code, e.message),
                })
                .unwrap_or_else(|| match o.status {
                    FinalStatus::Succeeded => {
                        "provision ended without a VM in its result".to_string()
                    }
                    s => format!("provision ended {}", s.as_str()),
                });
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
