//! Many nodes at once: a batch of nodes created and claimed for their provisions in one
//! transaction, and the nodes list with each node's running command's progress (one
//! query, a join on the node's last command — not one read per node).

use std::sync::OnceLock;

use sqlx::Row;

use super::commands::{command_type, insert_commands_on, NewCommand};
use super::nodes::NodeRow;
use super::sql::{command_status, is_unique_violation, multi_row_insert};
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, CommandStatus, NodeId, NodeStatus, TemplateId};
use crate::time::now_ms;
use trellis_protocol::CommandType;

/// How far a node's running command has got.
#[derive(Debug, Clone)]
pub struct NodeProgress {
    pub command_type: CommandType,
    pub command_status: CommandStatus,
    pub stage: Option<String>,
    pub percent: Option<f64>,
    pub attempt: i64,
}

/// One node of a batch: created already `provisioning`, pointing at its provision command.
pub struct BatchNode {
    pub id: NodeId,
    pub name: String,
    pub application: Option<String>,
    pub template_id: TemplateId,
    pub memory: i64,
    pub cores: i64,
    pub command: NewCommand,
}

/// `nodes` columns prefixed with `n.`, for joins (derived from the one column list).
fn node_cols() -> &'static str {
    static COLS: OnceLock<String> = OnceLock::new();
    COLS.get_or_init(|| {
        super::nodes::COLS
            .split(',')
            .map(|c| format!("n.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

impl Db {
    /// Nodes (of one batch when given) with the progress of the command running on each;
    /// a node whose last command has ended has none.
    pub async fn list_nodes_with_progress(
        &self,
        batch: Option<&str>,
    ) -> DbResult<Vec<(NodeRow, Option<NodeProgress>)>> {
        let filter = if batch.is_some() {
            "WHERE n.batch_id = $1"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {}, c.type AS c_type, c.status AS c_status, c.stage AS c_stage, \
             c.percent AS c_percent, c.attempt AS c_attempt \
             FROM nodes n LEFT JOIN commands c ON c.id = n.last_command_id {filter} \
             ORDER BY n.created_at, n.name, n.id",
            node_cols()
        );
        let mut q = sqlx::query(&sql);
        if let Some(b) = batch {
            q = q.bind(b.to_string());
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out = rows
            .iter()
            .map(|r| {
                let node = NodeRow::from_row(r)?;
                let ty: Option<String> = r.try_get("c_type")?;
                let progress = match ty {
                    None => None,
                    Some(_) => {
                        let status = command_status(r, "c_status")?;
                        (!status.is_terminal())
                            .then(|| -> DbResult<NodeProgress> {
                                Ok(NodeProgress {
                                    command_type: command_type(r, "c_type")?,
                                    command_status: status,
                                    stage: r.try_get("c_stage")?,
                                    percent: r.try_get("c_percent")?,
                                    attempt: r.try_get("c_attempt")?,
                                })
                            })
                            .transpose()?
                    }
                };
                Ok((node, progress))
            })
            .collect::<DbResult<Vec<_>>>()?;
        // Nodes made together (a batch shares one timestamp) in their {n} order:
        // web-1, web-2, …, web-10, not web-1, web-10, web-2 as text order has it.
        out.sort_by(|(a, _), (b, _)| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| natural_cmp(&a.name, &b.name))
        });
        Ok(out)
    }

    /// Names of nodes (not `destroyed`) that start with `prefix` (ASCII case-insensitively).
    pub async fn node_names_with_prefix(&self, prefix: &str) -> DbResult<Vec<String>> {
        // VM names are letters, digits, '-' and '.': nothing LIKE would treat specially.
        let rows = sqlx::query("SELECT name FROM nodes WHERE LOWER(name) LIKE $1 AND status <> $2")
            .bind(format!("{}%", prefix.to_ascii_lowercase()))
            .bind(NodeStatus::Destroyed.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("name").map_err(DbError::from))
            .collect()
    }

    /// Creates the batch's nodes already claimed for `agent` (`provisioning`, pointing at
    /// their commands) and stores the commands, in one transaction: a crash leaves the
    /// whole batch or nothing. `NameTaken` when one of the names was taken meanwhile (the
    /// check below names them; the live-name index catches a concurrent insert).
    /// Returns the commands' `created_at`.
    pub async fn insert_node_batch(
        &self,
        batch: &str,
        agent: AgentId,
        nodes: &[BatchNode],
    ) -> DbResult<i64> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // The names were chosen free before; another request may have taken one since.
        let names: Vec<String> = nodes.iter().map(|n| n.name.to_ascii_lowercase()).collect();
        let placeholders = (2..=names.len() + 1)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT name FROM nodes WHERE status <> $1 AND LOWER(name) IN ({placeholders})"
        );
        let mut q = sqlx::query(&sql).bind(NodeStatus::Destroyed.as_str());
        for n in &names {
            q = q.bind(n.clone());
        }
        let taken = q.fetch_all(&mut *tx).await?;
        if !taken.is_empty() {
            let taken: Vec<String> = taken
                .iter()
                .filter_map(|r| r.try_get::<String, _>("name").ok())
                .collect();
            return Err(DbError::NameTaken(format!(
                "node names already taken: {}",
                taken.join(", ")
            )));
        }
        let cmds: Vec<&NewCommand> = nodes.iter().map(|n| &n.command).collect();
        insert_commands_on(&mut tx, &cmds, now).await?;
        const COLS: usize = 12;
        for chunk in nodes.chunks(50) {
            let sql = multi_row_insert(
                "INSERT INTO nodes (id, application, name, template_id, memory, cores, status, \
                 hypervisor_id, last_command_id, batch_id, created_at, updated_at) VALUES ",
                COLS,
                chunk.len(),
            );
            let mut q = sqlx::query(&sql);
            for n in chunk {
                q = q
                    .bind(n.id.to_string())
                    .bind(n.application.clone())
                    .bind(n.name.clone())
                    .bind(n.template_id.to_string())
                    .bind(n.memory)
                    .bind(n.cores)
                    .bind(NodeStatus::Provisioning.as_str())
                    .bind(agent.to_string())
                    .bind(n.command.id.to_string())
                    .bind(batch.to_string())
                    .bind(now)
                    .bind(now);
            }
            q.execute(&mut *tx).await.map_err(|e| {
                if is_unique_violation(&e) {
                    DbError::NameTaken(
                        "another request took one of the batch's names meanwhile; try again".into(),
                    )
                } else {
                    e.into()
                }
            })?;
        }
        // Each command knows the node it was started for (a retry finds it by this).
        let ids = (1..=nodes.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "UPDATE commands SET node_id = (SELECT n.id FROM nodes n WHERE n.last_command_id = commands.id) \
             WHERE id IN ({ids})"
        );
        let mut q = sqlx::query(&sql);
        for n in nodes {
            q = q.bind(n.command.id.to_string());
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(now)
    }
}

/// Compares names with runs of digits as numbers (`web-2` < `web-10`), ignoring ASCII
/// case; equal names keep their order (the sort is stable).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                // Without leading zeros, a longer run is a larger number.
                let strip = |n: &[u8]| -> usize { n.iter().take_while(|c| **c == b'0').count() };
                let (ta, tb) = (&na[strip(na)..], &nb[strip(nb)..]);
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                let ord = x.to_ascii_lowercase().cmp(&y.to_ascii_lowercase());
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

#[cfg(test)]
mod natural_order_tests {
    use super::natural_cmp;

    #[test]
    fn numbers_in_names_sort_as_numbers() {
        let mut names = vec![
            "web-10", "web-2", "web-1", "Web-3", "web-02x", "db", "web-100",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["db", "web-1", "web-2", "web-02x", "Web-3", "web-10", "web-100"]
        );
    }
}
