//! Replicas: one row per running `trellis serve`, renewed every couple of seconds (its
//! lease). The housekeeping leader sweeps replicas whose lease ran out: the agents whose
//! sessions they held go offline and their rows go. Which replica holds an agent's session
//! is `agents.session_replica` (with `session_epoch`).
//!
//! Leases are written and judged on the database's clock (PostgreSQL's `clock_timestamp()`),
//! never a replica's own: hosts whose clocks disagree would otherwise sweep each other.

use sqlx::Row;

use super::{Backend, Db, DbResult};
use crate::model::{AgentId, AgentStatus};
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub draining: bool,
    pub leader: bool,
    pub agents_online: i64,
}

/// The key of the transaction-scoped advisory lock that serialises template seeding.
const SEED_LOCK: i64 = 0x7472_656c_6c69_7301;

impl Db {
    /// "Now" in milliseconds as SQL: the database server's clock on PostgreSQL (one clock
    /// for every replica), this process's on SQLite (one replica), bound as `$n` (always
    /// bound: PostgreSQL's expression names `$n` too, times zero, so that every bound
    /// parameter has a type).
    fn lease_now(&self, n: usize) -> String {
        match self.backend {
            Backend::Postgres => format!(
                "((EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + 0 * ${n}::BIGINT)"
            ),
            Backend::Sqlite => format!("${n}"),
        }
    }

    /// Adds this replica's row (its lease starts now). On SQLite, the one replica, rows an
    /// earlier run left are removed first.
    pub async fn register_replica(&self, r: &ReplicaRow) -> DbResult<()> {
        let mut tx = self.begin_write().await?;
        if self.backend == Backend::Sqlite {
            sqlx::query("DELETE FROM replicas")
                .execute(&mut *tx)
                .await?;
        }
        let now = self.lease_now(5);
        sqlx::query(&format!(
            "INSERT INTO replicas (id, name, hostname, version, started_at, heartbeat_at, draining, leader) \
             VALUES ($1, $2, $3, $4, {now}, {now}, 0, 0)"
        ))
        .bind(&r.id)
        .bind(&r.name)
        .bind(&r.hostname)
        .bind(&r.version)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        // The others send notes from now on (see `notify::peers_seen`).
        super::notify::notify(&mut tx, &[super::notify::Note::Replica(r.id.clone())]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Renews this replica's lease; the leader also marks itself (and only itself) leader.
    /// `false` when the row is gone: the leader swept this replica as dead (it stalled for
    /// longer than the lease), and the caller registers again and re-asserts its sessions.
    pub async fn renew_replica(&self, id: &str, draining: bool, leader: bool) -> DbResult<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(&format!(
            "UPDATE replicas SET heartbeat_at = {}, draining = $2 WHERE id = $3",
            self.lease_now(1)
        ))
        .bind(now_ms())
        .bind(i64::from(draining))
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if leader && n > 0 {
            sqlx::query(
                "UPDATE replicas SET leader = CASE WHEN id = $1 THEN 1 ELSE 0 END \
                 WHERE leader = 1 OR id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        } else if !leader {
            sqlx::query("UPDATE replicas SET leader = 0 WHERE id = $1 AND leader = 1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    /// Marks these sessions online again (after this replica was swept as dead while it
    /// still held them): only where the epoch is still theirs.
    pub async fn reassert_sessions(
        &self,
        replica: &str,
        sessions: &[(AgentId, i64)],
    ) -> DbResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (agent, epoch) in sessions {
            sqlx::query(
                "UPDATE agents SET status = $1, session_replica = $2, last_heartbeat = $5 \
                 WHERE id = $3 AND session_epoch = $4",
            )
            .bind(AgentStatus::Online.as_str())
            .bind(replica)
            .bind(agent.to_string())
            .bind(epoch)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes this replica's row (clean stop: its sessions are closed already).
    pub async fn remove_replica(&self, id: &str) -> DbResult<()> {
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// Replicas whose lease is older than `lease_ms` (on the database's clock) are dead:
    /// their rows are deleted first, then the agents shown online on them go offline, in
    /// one transaction. Deleting first matters under READ COMMITTED: a replica renewing at
    /// that moment either renews before (and is not swept) or finds its row gone (and
    /// registers again, re-asserting its sessions); its agents are never marked offline
    /// while it keeps a row. Agents with no recorded replica (an earlier version's) are
    /// left to the stale-heartbeat sweep. Returns `(replicas, agents)` swept.
    pub async fn sweep_dead_replicas(&self, lease_ms: i64) -> DbResult<(u64, u64)> {
        let mut tx = self.begin_write().await?;
        let dead = sqlx::query(&format!(
            "DELETE FROM replicas WHERE heartbeat_at < {} - $2 RETURNING id",
            self.lease_now(1)
        ))
        .bind(now_ms())
        .bind(lease_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut agents = 0;
        for r in &dead {
            let id: String = r.try_get("id")?;
            agents += sqlx::query(
                "UPDATE agents SET status = $1 WHERE status = $2 AND session_replica = $3",
            )
            .bind(AgentStatus::Offline.as_str())
            .bind(AgentStatus::Online.as_str())
            .bind(&id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        // Agents online on a replica that has no row at all (swept earlier while one of
        // its sessions was being recorded, say).
        agents += sqlx::query(
            "UPDATE agents SET status = $1 WHERE status = $2 AND session_replica IS NOT NULL \
             AND session_replica NOT IN (SELECT id FROM replicas)",
        )
        .bind(AgentStatus::Offline.as_str())
        .bind(AgentStatus::Online.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((dead.len() as u64, agents))
    }

    /// Every replica with a row, by name, with the number of agents online on each.
    pub async fn list_replicas(&self) -> DbResult<Vec<ReplicaRow>> {
        let rows = sqlx::query(
            "SELECT r.id, r.name, r.hostname, r.version, r.started_at, r.heartbeat_at, r.draining, r.leader, \
             (SELECT COUNT(*) FROM agents a WHERE a.session_replica = r.id AND a.status = $1) AS agents_online \
             FROM replicas r ORDER BY r.name, r.id",
        )
        .bind(AgentStatus::Online.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    hostname: r.try_get("hostname")?,
                    version: r.try_get("version")?,
                    started_at: r.try_get("started_at")?,
                    heartbeat_at: r.try_get("heartbeat_at")?,
                    draining: r.try_get::<i64, _>("draining")? != 0,
                    leader: r.try_get::<i64, _>("leader")? != 0,
                    agents_online: r.try_get("agents_online")?,
                })
            })
            .collect()
    }

    /// Other replicas that are alive (lease renewed within `lease_ms`) and not draining:
    /// where this replica's agents can go.
    /// How many other replicas are registered, live or not yet swept (who may listen
    /// for notes).
    pub async fn replicas_besides(&self, me: &str) -> DbResult<i64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM replicas WHERE id <> $1")
            .bind(me)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    pub async fn other_live_replicas(&self, me: &str, lease_ms: i64) -> DbResult<i64> {
        let r = sqlx::query(&format!(
            "SELECT COUNT(*) FROM replicas WHERE id <> $1 AND heartbeat_at >= {} - $2 AND draining = 0",
            self.lease_now(3)
        ))
        .bind(me)
        .bind(lease_ms)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(r.try_get(0)?)
    }

    /// Agents with queued commands among `agents` (the backup for lost wake-ups).
    pub async fn agents_with_queued(&self, agents: &[AgentId]) -> DbResult<Vec<AgentId>> {
        let rows = self
            .rows_of_agents(
                "SELECT DISTINCT agent_id FROM commands WHERE status = 'queued' AND agent_id IN",
                agents,
            )
            .await?;
        rows.iter().map(|r| super::sql::id(r, "agent_id")).collect()
    }

    /// Running commands of `agents` whose cancel was requested (the backup for a lost
    /// cancel note): `(agent, command)`.
    pub async fn pending_cancels(
        &self,
        agents: &[AgentId],
    ) -> DbResult<Vec<(AgentId, crate::model::CommandId)>> {
        let rows = self
            .rows_of_agents(
                "SELECT agent_id, id FROM commands WHERE status IN ('dispatched', 'running') \
                 AND cancel_requested = 1 AND agent_id IN",
                agents,
            )
            .await?;
        rows.iter()
            .map(|r| Ok((super::sql::id(r, "agent_id")?, super::sql::id(r, "id")?)))
            .collect()
    }

    /// `head (…)` with the ids of `agents` in the list: one read per 500.
    async fn rows_of_agents(
        &self,
        head: &str,
        agents: &[AgentId],
    ) -> DbResult<Vec<sqlx::any::AnyRow>> {
        let mut out = Vec::new();
        for chunk in agents.chunks(500) {
            let sql = format!("{head} ({})", super::sql::placeholders(chunk.len()));
            let mut q = sqlx::query(&sql);
            for a in chunk {
                q = q.bind(a.to_string());
            }
            out.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(out)
    }

    /// Serialises seeding among replicas starting together (PostgreSQL: a
    /// transaction-scoped advisory lock, taken first in the seeding transaction).
    pub(super) async fn seed_lock(conn: &mut sqlx::AnyConnection) -> DbResult<()> {
        if conn.backend_name() == "PostgreSQL" {
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                .bind(SEED_LOCK)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}
