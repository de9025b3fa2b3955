//! Agents: registration, token lookup, rotation, revocation, and the session bookkeeping
//! (online/offline, session epoch, heartbeats) their connections record.

use sqlx::any::AnyRow;
use sqlx::Row;
use trellis_protocol::{CommandError, CommandType};

use super::notify::{notify, Note};
use super::sql::{error_json, id, is_unique_violation, json_col, string_list, TERMINAL_SQL};
use super::{Db, DbError, DbResult};
use crate::model::{AgentId, AgentStatus};
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub struct AgentRow {
    pub id: AgentId,
    pub name: String,
    pub status: AgentStatus,
    pub last_heartbeat: Option<i64>,
    pub connected_at: Option<i64>,
    pub version: Option<String>,
    pub hostname: Option<String>,
    pub capabilities: Vec<String>,
    pub facts: serde_json::Value,
    pub max_concurrency: i64,
    pub session_epoch: i64,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    /// Moves on with every token rotation and revocation (see `credential_versions`).
    pub credential_version: i64,
    /// The replica holding its current session: `(id, name)` (while that replica lives).
    pub replica: Option<(String, String)>,
}

const COLS: &str = "id, name, status, last_heartbeat, connected_at, version, hostname, \
    capabilities, facts, max_concurrency, session_epoch, revoked_at, created_at, credential_version, \
    session_replica, (SELECT r.name FROM replicas r WHERE r.id = agents.session_replica) AS replica_name";

impl AgentRow {
    fn from_row(r: &AnyRow) -> DbResult<Self> {
        let status: String = r.try_get("status")?;
        Ok(Self {
            id: id(r, "id")?,
            name: r.try_get("name")?,
            status: AgentStatus::parse(&status)
                .ok_or_else(|| DbError::Corrupt(format!("agent status {status:?}")))?,
            last_heartbeat: r.try_get("last_heartbeat")?,
            connected_at: r.try_get("connected_at")?,
            version: r.try_get("version")?,
            hostname: r.try_get("hostname")?,
            capabilities: string_list(r, "capabilities")?,
            facts: json_col(r, "facts")?.unwrap_or_default(),
            max_concurrency: r.try_get("max_concurrency")?,
            session_epoch: r.try_get("session_epoch")?,
            revoked_at: r.try_get("revoked_at")?,
            created_at: r.try_get("created_at")?,
            credential_version: r.try_get("credential_version")?,
            replica: match (
                r.try_get::<Option<String>, _>("session_replica")?,
                r.try_get::<Option<String>, _>("replica_name")?,
            ) {
                (Some(id), Some(name)) => Some((id, name)),
                _ => None,
            },
        })
    }

    pub fn has_capability(&self, t: CommandType) -> bool {
        self.capabilities.iter().any(|c| c == t.as_str())
    }

    pub fn is_online(&self) -> bool {
        self.status == AgentStatus::Online
    }
}

/// Online agents whose heartbeat stopped (`agents_status_heartbeat`).
pub(super) const STALE_AGENTS_SQL: &str =
    "UPDATE agents SET status = $2 WHERE status = $3 AND last_heartbeat < $1";

/// The credential versions of `n` agents (by primary key), revoked ones included.
pub(super) fn credential_versions_sql(n: usize) -> String {
    format!(
        "SELECT id, credential_version, revoked_at FROM agents WHERE id IN ({})",
        super::sql::placeholders(n)
    )
}

impl Db {
    pub async fn create_agent(
        &self,
        name: &str,
        token_hash: &str,
        max_concurrency: i64,
    ) -> DbResult<AgentRow> {
        let agent = AgentId::new();
        let res = sqlx::query(
            "INSERT INTO agents (id, name, token_hash, max_concurrency, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(agent.to_string())
        .bind(name)
        .bind(token_hash)
        .bind(max_concurrency)
        .bind(now_ms())
        .execute(self.writer())
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(DbError::Conflict(format!(
                    "an agent named {name:?} already exists"
                )))
            }
            r => r?,
        };
        self.get_agent(agent).await
    }

    /// An agent that was not revoked (grouped with concurrent reads on PostgreSQL).
    pub async fn get_agent(&self, agent: AgentId) -> DbResult<AgentRow> {
        let row = match &self.reads {
            Some(r) => r.agents.get(agent).await?,
            None => agents_by_id(self.pool.clone(), vec![agent])
                .await?
                .remove(&agent),
        };
        row.ok_or(DbError::NotFound)
    }

    pub async fn list_agents(&self) -> DbResult<Vec<AgentRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM agents WHERE revoked_at IS NULL ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(AgentRow::from_row).collect()
    }

    /// The live agent with this token hash, and the stored hash (for a constant-time check).
    pub async fn agent_by_token_hash(&self, hash: &str) -> DbResult<Option<(AgentRow, String)>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS}, token_hash FROM agents WHERE token_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((AgentRow::from_row(&r)?, r.try_get("token_hash")?)))
            .transpose()
    }

    pub async fn set_max_concurrency(&self, agent: AgentId, max: i64) -> DbResult<()> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE agents SET max_concurrency = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(max)
        .bind(agent.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        // The replica holding its session follows at once.
        notify(&mut tx, &[Note::Agent(agent)]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn rotate_token(&self, agent: AgentId, hash: &str) -> DbResult<()> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE agents SET token_hash = $1, credential_version = credential_version + 1 \
                WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(hash)
        .bind(agent.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        // The replica holding its session closes it at once (the old token is dead).
        notify(&mut tx, &[Note::Agent(agent)]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Revokes an agent: its token stops working; its unfinished commands are cancelled
    /// and the nodes they were provisioning fail, in one transaction.
    pub async fn revoke_agent(&self, agent: AgentId) -> DbResult<()> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE agents SET revoked_at = $1, status = $2, token_hash = $3, \
             credential_version = credential_version + 1 WHERE id = $4 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(AgentStatus::Offline.as_str())
        // keep the unique index happy and make the old hash unusable
        .bind(format!("revoked:{agent}"))
        .bind(agent.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(DbError::NotFound);
        }
        let cancelled = sqlx::query(&format!(
            "UPDATE commands SET status = 'cancelled', finished_at = $1, error = $2 \
             WHERE agent_id = $3 AND status NOT IN {TERMINAL_SQL} RETURNING id"
        ))
        .bind(now)
        .bind(error_json(&CommandError::new(
            "agent_revoked",
            "the agent was revoked",
        )))
        .bind(agent.to_string())
        .fetch_all(&mut *tx)
        .await?;
        // Their nodes move in the same transaction (provisioning/destroying → failed).
        for r in &cancelled {
            super::nodes::fail_node_of(
                &mut tx,
                id(r, "id")?,
                "agent_revoked: the hypervisor was revoked",
                now,
            )
            .await?;
        }
        // The replica holding its session closes it; stream watchers re-read.
        let mut notes = vec![Note::Agent(agent)];
        for r in &cancelled {
            notes.push(Note::Changed(id(r, "id")?));
        }
        notify(&mut tx, &notes).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks an agent online with a new session epoch and returns the epoch.
    pub async fn agent_connected(
        &self,
        agent: AgentId,
        hello: &trellis_protocol::Hello,
    ) -> DbResult<i64> {
        let now = now_ms();
        let caps: Vec<&str> = hello
            .capabilities
            .iter()
            .filter(|c| **c != CommandType::Unknown)
            .map(|c| c.as_str())
            .collect();
        let mut tx = self.begin_write().await?;
        if self.backend == super::Backend::Postgres {
            // The claims key-share-lock the agent's row with its epoch (`db::dispatch`): a
            // claim in flight finishes with the old epoch before this one moves it, or sees
            // the new one. `FOR UPDATE` is what waits for a key-share lock; the update
            // below alone (no key changes) would not, and heartbeats must not either.
            sqlx::query("SELECT 1 FROM agents WHERE id = $1 FOR UPDATE")
                .bind(agent.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        }
        let row = sqlx::query(
            "UPDATE agents SET session_epoch = session_epoch + 1, status = $7, connected_at = $1, \
             last_heartbeat = $1, version = $2, hostname = $3, capabilities = $4, facts = $5, \
             session_replica = $8 WHERE id = $6 AND revoked_at IS NULL RETURNING session_epoch",
        )
        .bind(now)
        .bind(&hello.agent_version)
        .bind(&hello.hostname)
        .bind(serde_json::to_string(&caps).unwrap_or_default())
        .bind(hello.facts.to_string())
        .bind(agent.to_string())
        .bind(AgentStatus::Online.as_str())
        .bind(super::notify::origin())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(DbError::NotFound)?;
        let epoch: i64 = row.try_get(0)?;
        // A session of this agent on another replica is older: that replica closes it.
        notify(&mut tx, &[Note::Session(agent, epoch)]).await?;
        tx.commit().await?;
        Ok(epoch)
    }

    /// Marks the agent offline, unless a newer session (epoch) has taken over.
    pub async fn agent_disconnected(
        &self,
        agent: AgentId,
        epoch: i64,
        last_heartbeat: i64,
    ) -> DbResult<()> {
        sqlx::query(
            "UPDATE agents SET status = $4, last_heartbeat = $1 WHERE id = $2 AND session_epoch = $3",
        )
        .bind(last_heartbeat)
        .bind(agent.to_string())
        .bind(epoch)
        .bind(AgentStatus::Offline.as_str())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// The current credential version of each agent, and whether it is revoked: one
    /// primary-key read per 500 agents. A session whose agent's version moved on since it
    /// authenticated (a rotation or revocation, from this process, another replica or the
    /// CLI) is closed; no clock is involved.
    pub async fn credential_versions(
        &self,
        agents: &[AgentId],
    ) -> DbResult<Vec<(AgentId, i64, bool)>> {
        let mut out = Vec::with_capacity(agents.len());
        for chunk in agents.chunks(500) {
            let sql = credential_versions_sql(chunk.len());
            let mut q = sqlx::query(&sql);
            for a in chunk {
                q = q.bind(a.to_string());
            }
            for r in q.fetch_all(&self.pool).await? {
                let revoked: Option<i64> = r.try_get("revoked_at")?;
                out.push((
                    id(&r, "id")?,
                    r.try_get("credential_version")?,
                    revoked.is_some(),
                ));
            }
        }
        Ok(out)
    }

    /// At start-up no session of this process exists yet.
    pub async fn mark_all_offline(&self) -> DbResult<()> {
        sqlx::query("UPDATE agents SET status = $1 WHERE status <> $1")
            .bind(AgentStatus::Offline.as_str())
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// Agents shown online whose heartbeat stopped (e.g. their replica died): offline.
    pub async fn expire_stale_agents(&self, older_than: i64) -> DbResult<u64> {
        Ok(sqlx::query(STALE_AGENTS_SQL)
            .bind(older_than)
            .bind(AgentStatus::Offline.as_str())
            .bind(AgentStatus::Online.as_str())
            .execute(self.writer())
            .await?
            .rows_affected())
    }

    /// Stores the last heartbeat of each connected agent: one statement per 500 agents
    /// (`WITH v AS (VALUES …) UPDATE … FROM v`), each its own short transaction, so 10 000 agents cost
    /// 20 statements, not 10 000 round trips holding 10 000 row locks.
    pub async fn record_heartbeats(&self, beats: &[(AgentId, i64)]) -> DbResult<()> {
        for chunk in beats.chunks(500) {
            let values = (0..chunk.len())
                .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "WITH v(id, ts) AS (VALUES {values}) \
                 UPDATE agents SET last_heartbeat = v.ts FROM v WHERE agents.id = v.id"
            );
            let mut q = sqlx::query(&sql);
            for (agent, ts) in chunk {
                q = q.bind(agent.to_string()).bind(*ts);
            }
            q.execute(self.writer()).await?;
        }
        Ok(())
    }
}

/// Agents that were not revoked, by id (one statement; see `db::reads`).
pub(super) async fn agents_by_id(
    pool: sqlx::AnyPool,
    ids: Vec<AgentId>,
) -> DbResult<std::collections::HashMap<AgentId, AgentRow>> {
    let sql = format!("SELECT {COLS} FROM agents WHERE id IN ({{keys}}) AND revoked_at IS NULL");
    super::sql::fetch_by_keys(&pool, &sql, &ids)
        .await?
        .iter()
        .map(|r| {
            let a = AgentRow::from_row(r)?;
            Ok((a.id, a))
        })
        .collect()
}
