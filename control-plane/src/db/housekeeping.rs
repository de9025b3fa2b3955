//! Housekeeping queries the reaper runs periodically, each served by an index that holds
//! only the rows it looks for (migration 0007): retention of terminal commands, and
//! [`Db::explain_periodic`], which shows the plan of every periodic query (a test asserts
//! none scans a table).

use sqlx::Row;

use super::sql::{id, multi_row_insert};
use super::{Backend, Db, DbResult};
use crate::model::{AgentId, CommandId};

/// Terminal commands finished before `$1`, unpinned and not a node's latest command,
/// oldest first: a range of `commands_finished` (the status test is written `NOT IN` so
/// that no planner prefers the status index, which would walk all history), and one
/// probe of `nodes_last_command` per row.
const RETENTION_SQL: &str = "SELECT id FROM commands \
    WHERE finished_at < $1 AND status NOT IN ('queued', 'dispatched', 'running') \
    AND pinned = 0 AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.last_command_id = commands.id) \
    ORDER BY finished_at LIMIT $2";

/// What one retention pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub commands: u64,
    pub events: u64,
    pub stages: u64,
}

impl Db {
    /// Deletes terminal commands that finished before `before` with their events and
    /// stages, `batch` commands per transaction and at most `max` in all, so the write
    /// lock is never held for long. Pinned commands and each node's latest command stay.
    pub async fn prune_history(&self, before: i64, batch: i64, max: i64) -> DbResult<Pruned> {
        let mut out = Pruned::default();
        while (out.commands as i64) < max {
            let take = batch.min(max - out.commands as i64);
            let ids: Vec<CommandId> = sqlx::query(RETENTION_SQL)
                .bind(before)
                .bind(take)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| id(r, "id"))
                .collect::<DbResult<_>>()?;
            if ids.is_empty() {
                break;
            }
            let selected = ids.len();
            let placeholders = |n: usize| {
                (1..=n)
                    .map(|i| format!("${i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut tx = self.begin_write().await?;
            // Checked again inside the transaction, and only those rows go: a pin or a node
            // may have come since the read (SQLite holds the write lock from BEGIN
            // IMMEDIATE; PostgreSQL locks the rows), and a kept command keeps its events.
            let lock = match self.backend {
                Backend::Postgres => " FOR UPDATE",
                Backend::Sqlite => "",
            };
            let recheck = format!(
                "SELECT id FROM commands WHERE id IN ({}) AND pinned = 0 AND NOT EXISTS \
                 (SELECT 1 FROM nodes n WHERE n.last_command_id = commands.id){lock}",
                placeholders(ids.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&recheck);
            for c in &ids {
                q = q.bind(c.to_string());
            }
            let ids: Vec<String> = q.fetch_all(&mut *tx).await?;
            let mut counts = [0u64; 3];
            if !ids.is_empty() {
                let list = placeholders(ids.len());
                for (i, sql) in [
                    format!("DELETE FROM command_events WHERE command_id IN ({list})"),
                    format!("DELETE FROM command_stages WHERE command_id IN ({list})"),
                    format!("DELETE FROM commands WHERE id IN ({list})"),
                ]
                .iter()
                .enumerate()
                {
                    let mut q = sqlx::query(sql);
                    for c in &ids {
                        q = q.bind(c);
                    }
                    counts[i] = q.execute(&mut *tx).await?.rows_affected();
                }
            }
            tx.commit().await?;
            out.events += counts[0];
            out.stages += counts[1];
            out.commands += counts[2];
            if (selected as i64) < take {
                break;
            }
        }
        Ok(out)
    }

    /// Keeps a command past the retention period (or lets it go again).
    pub async fn set_pinned(&self, command: CommandId, pinned: bool) -> DbResult<()> {
        let n = sqlx::query("UPDATE commands SET pinned = $1 WHERE id = $2")
            .bind(i64::from(pinned))
            .bind(command.to_string())
            .execute(self.writer())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(super::DbError::NotFound);
        }
        Ok(())
    }

    /// The plan of every periodic query, `(name, plan)`: SQLite's `EXPLAIN QUERY PLAN`,
    /// PostgreSQL's `EXPLAIN` with sequential scans disabled (on tables this small the
    /// planner would scan anyway; what matters is that an index can serve the query).
    pub async fn explain_periodic(&self) -> DbResult<Vec<(&'static str, String)>> {
        let queries: [(&'static str, String, Vec<Arg>); 6] = [
            (
                "deadline sweep",
                super::commands::EXPIRE_SQL.to_string(),
                vec![Arg::I(0), Arg::S(String::new())],
            ),
            (
                "retention",
                RETENTION_SQL.to_string(),
                vec![Arg::I(0), Arg::I(100)],
            ),
            (
                "stale agents",
                super::agents::STALE_AGENTS_SQL.to_string(),
                vec![Arg::I(0), Arg::S("offline".into()), Arg::S("online".into())],
            ),
            (
                "stale dispatches",
                super::dispatch::STALE_DISPATCHES_SQL.to_string(),
                vec![Arg::I(0)],
            ),
            (
                "stuck nodes",
                super::nodes::REPAIR_SQL.to_string(),
                vec![Arg::S("provisioning".into()), Arg::S("destroying".into())],
            ),
            (
                "credential versions",
                super::agents::credential_versions_sql(2),
                vec![
                    Arg::S(AgentId::new().to_string()),
                    Arg::S(AgentId::new().to_string()),
                ],
            ),
        ];
        let mut conn = self.writer.acquire().await?;
        let prefix = match self.backend {
            Backend::Sqlite => "EXPLAIN QUERY PLAN ",
            Backend::Postgres => {
                sqlx::query("SET enable_seqscan = off")
                    .execute(&mut *conn)
                    .await?;
                "EXPLAIN "
            }
        };
        let mut out = Vec::new();
        for (name, sql, args) in queries {
            let text = format!("{prefix}{sql}");
            let mut q = sqlx::query(&text);
            for a in args {
                q = match a {
                    Arg::I(i) => q.bind(i),
                    Arg::S(s) => q.bind(s),
                };
            }
            let rows = q.fetch_all(&mut *conn).await?;
            let plan = rows
                .iter()
                .map(|r| match self.backend {
                    Backend::Sqlite => r.try_get::<String, _>("detail"),
                    Backend::Postgres => r.try_get::<String, _>(0),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join("\n");
            out.push((name, plan));
        }
        if self.backend == Backend::Postgres {
            sqlx::query("RESET enable_seqscan")
                .execute(&mut *conn)
                .await?;
        }
        Ok(out)
    }

    /// Test and benchmark support: `n` terminal `ping` commands of `agent` that finished
    /// at `finished_at`, inserted in multi-row statements, 50 000 per transaction.
    #[doc(hidden)]
    pub async fn seed_terminal_history(
        &self,
        agent: AgentId,
        n: usize,
        finished_at: i64,
    ) -> DbResult<Vec<CommandId>> {
        const COLS: usize = 11;
        const ROWS: usize = 500;
        let ids: Vec<CommandId> = (0..n).map(|_| CommandId::new()).collect();
        for tx_ids in ids.chunks(50_000) {
            let mut tx = self.begin_write().await?;
            for chunk in tx_ids.chunks(ROWS) {
                let sql = multi_row_insert(
                    "INSERT INTO commands (id, agent_id, type, params, status, root_id, created_by, \
                     created_at, deadline_at, finished_at, dispatched_at) VALUES ",
                    COLS,
                    chunk.len(),
                );
                let mut q = sqlx::query(&sql);
                for c in chunk {
                    q = q
                        .bind(c.to_string())
                        .bind(agent.to_string())
                        .bind("ping")
                        .bind("{}")
                        .bind("succeeded")
                        .bind(c.to_string())
                        .bind("bench")
                        .bind(finished_at - 1000)
                        .bind(finished_at + 60_000)
                        .bind(finished_at)
                        .bind(finished_at - 900);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(ids)
    }
}

impl Db {
    /// Test and benchmark support: `events` stored `log` events of `line_bytes` each for
    /// every command in `commands` (seqs 1..=events), in multi-row statements, one
    /// transaction per 50 000 commands.
    #[doc(hidden)]
    pub async fn seed_history_events(
        &self,
        commands: &[CommandId],
        events: usize,
        line_bytes: usize,
        ts: i64,
    ) -> DbResult<()> {
        const ROWS: usize = 500;
        let data =
            serde_json::json!({"stream": "stdout", "data": "x".repeat(line_bytes)}).to_string();
        for tx_ids in commands.chunks(50_000) {
            let all: Vec<(CommandId, i64)> = tx_ids
                .iter()
                .flat_map(|c| (1..=events as i64).map(move |seq| (*c, seq)))
                .collect();
            let mut tx = self.begin_write().await?;
            for chunk in all.chunks(ROWS) {
                let sql = multi_row_insert(
                    "INSERT INTO command_events (command_id, seq, ts, kind, stream, data) VALUES ",
                    6,
                    chunk.len(),
                );
                let mut q = sqlx::query(&sql);
                for (c, seq) in chunk {
                    q = q
                        .bind(c.to_string())
                        .bind(*seq)
                        .bind(ts)
                        .bind("log")
                        .bind("stdout")
                        .bind(data.clone());
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Test and benchmark support: the database's size in bytes (pages in use and free,
    /// after a WAL checkpoint on SQLite), and how many of them are free for reuse.
    #[doc(hidden)]
    pub async fn storage_size(&self) -> DbResult<(i64, i64)> {
        match self.backend {
            Backend::Sqlite => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(self.writer())
                    .await?;
                let one = |sql: &'static str| async move {
                    let v: i64 = sqlx::query(sql)
                        .fetch_one(self.writer())
                        .await?
                        .try_get(0)?;
                    DbResult::Ok(v)
                };
                let size = one("PRAGMA page_size").await?;
                Ok((
                    one("PRAGMA page_count").await? * size,
                    one("PRAGMA freelist_count").await? * size,
                ))
            }
            Backend::Postgres => {
                let v: i64 = sqlx::query("SELECT pg_database_size(current_database())::BIGINT")
                    .fetch_one(&self.pool)
                    .await?
                    .try_get(0)?;
                Ok((v, 0))
            }
        }
    }
}

impl Db {
    /// Test support: makes `command` the node's latest command.
    #[doc(hidden)]
    pub async fn link_node_command(
        &self,
        node: crate::model::NodeId,
        command: CommandId,
    ) -> DbResult<()> {
        sqlx::query("UPDATE nodes SET last_command_id = $1 WHERE id = $2")
            .bind(command.to_string())
            .bind(node.to_string())
            .execute(self.writer())
            .await?;
        Ok(())
    }
}

enum Arg {
    I(i64),
    S(String),
}
