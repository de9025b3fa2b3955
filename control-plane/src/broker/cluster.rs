//! Several replicas on one PostgreSQL, with the database as the only coordinator.
//!
//! * **Wake-ups** (`listen`): every replica `LISTEN`s on one channel; changes send notes in
//!   their own transaction (`db::notify`). A note about an agent is acted on by the replica
//!   holding its session (claim, cancel, re-read credentials, close an older session); a
//!   note about a command wakes that command's stream subscribers here. A lost connection
//!   is re-established and followed by a catch-up pass, and a backup pass every
//!   [`BACKUP_POLL`] bounds what a lost note can cost.
//! * **Leases** (`lease`): each replica renews its `replicas` row every [`RENEW`]; one
//!   replica, the holder of a PostgreSQL advisory lock on its own connection, is the
//!   housekeeping leader (deadlines, retention, stale agents, node repair, dead replicas).
//!   When it dies its connection goes, the lock with it, and another replica takes over
//!   within one renew interval. SQLite has one replica: always leader.
//! * **Draining** (`drain`): on SIGTERM `/readyz` fails and new agent sessions are refused,
//!   so the load balancer sends agents elsewhere; live sessions are closed a few at a time
//!   over the drain period (when another replica is alive to take them), not all at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::Connection;
use tokio::time::Instant;

use super::{Broker, ToSession};
use crate::db::notify::{self, Note};
use crate::db::{Backend, ReplicaRow};
use crate::time::now_ms;

/// How often a replica renews its lease (and the leader sweeps).
pub const RENEW: Duration = Duration::from_secs(2);
/// A replica whose lease was not renewed for this long is dead.
pub const LEASE: Duration = Duration::from_secs(10);
/// The backup for lost notes: queued commands and requested cancels of this replica's
/// agents are looked for this often.
pub const BACKUP_POLL: Duration = Duration::from_secs(5);
/// How often the listening connection is probed (and how long it has to answer).
const LISTENER_PROBE: Duration = Duration::from_secs(5);
/// The advisory lock the housekeeping leader holds.
const LEADER_LOCK: i64 = 0x7472_656c_6c69_7300;

/// This replica, as the others see it.
pub struct Replica {
    pub id: String,
    pub name: String,
    draining: AtomicBool,
    leader: AtomicBool,
}

impl Replica {
    /// `single`: the only replica there can be (SQLite), leader from the start.
    pub fn new(name: Option<String>, single: bool) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        let name = name.unwrap_or_else(|| format!("{}-{}", hostname(), &id[..8]));
        Self {
            id,
            name,
            draining: AtomicBool::new(false),
            leader: AtomicBool::new(single),
        }
    }

    /// Whether this replica runs cluster-wide housekeeping now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Whether this replica is draining (stopping): not ready, no new sessions.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn row(&self) -> ReplicaRow {
        ReplicaRow {
            id: self.id.clone(),
            name: self.name.clone(),
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now_ms(),
            heartbeat_at: now_ms(),
            draining: false,
            leader: false,
            agents_online: 0,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "trellis".into())
}

/// Listens for notes from other replicas and acts on those about this replica's sessions
/// and subscribers. PostgreSQL only; stops with the broker.
pub async fn listen(broker: Arc<Broker>) {
    let Some(url) = broker.db.pg_url().map(str::to_string) else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    'connect: loop {
        let mut listener = tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            l = connect_listener(&url) => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for notifications; retrying");
                    tokio::select! {
                        _ = broker.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'connect;
                }
            },
        };
        let connected = Instant::now();
        // Anything sent while we were not listening is unknown: catch up.
        catch_up(&broker).await;
        // An idle connection can die silently (a NAT's idle timeout, a lost host): it is
        // probed every few seconds, and one that does not answer is replaced.
        let mut probe = tokio::time::interval(LISTENER_PROBE);
        probe.tick().await;
        let why = loop {
            tokio::select! {
                biased;
                _ = broker.shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => handle(&broker, n.payload()),
                    // The connection was lost; notes sent meanwhile are gone.
                    Ok(None) => break "connection lost".to_string(),
                    Err(e) => break e.to_string(),
                },
                _ = probe.tick() => {
                    let alive = tokio::time::timeout(
                        LISTENER_PROBE,
                        sqlx::query("SELECT 1").execute(&mut listener),
                    )
                    .await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break "the connection did not answer a probe".to_string();
                    }
                }
            }
        };
        tracing::warn!(error = %why, "notification connection failed; reconnecting");
        // A connection that keeps dropping at once must not loop through catch-ups.
        if connected.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn connect_listener(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect(url).await?;
    sqlx::query("SET application_name = 'trellis listener'")
        .execute(&mut l)
        .await?;
    for set in KEEPALIVES {
        sqlx::query(set).execute(&mut l).await?;
    }
    l.listen(notify::CHANNEL).await?;
    Ok(l)
}

/// Acts on one payload of notes (those this replica sent itself were acted on already).
pub fn handle(broker: &Arc<Broker>, payload: &str) {
    let (origin, notes) = notify::parse(payload);
    if origin == broker.replica.id {
        return;
    }
    for n in notes {
        match n {
            Note::Wake(a) => broker.wake(a),
            Note::Changed(c) => {
                if broker.fanout.has_subscribers(&c) {
                    broker.fanout.publish(&c, super::fanout::Published::Status);
                }
            }
            // Notes are hints (anyone who may connect to the database may NOTIFY): what
            // they would make this replica sign and send is read back first.
            Note::Cancel(a, c, r) => {
                if broker.is_connected(&a) {
                    let b = broker.clone();
                    tokio::spawn(async move {
                        match b.db.get_command(c).await {
                            Ok(row)
                                if row.agent_id == a
                                    && (row.cancel_requested
                                        || row.status == crate::model::CommandStatus::TimedOut) =>
                            {
                                b.cancel(a, c, r)
                            }
                            Ok(_) | Err(crate::db::DbError::NotFound) => {}
                            Err(e) => {
                                tracing::warn!(command_id = %c, error = %e, "cannot read a cancelled command")
                            }
                        }
                    });
                }
            }
            Note::Agent(a) => {
                if broker.is_connected(&a) {
                    let b = broker.clone();
                    tokio::spawn(async move { b.refresh_agent(a).await });
                }
            }
            Note::Replica(_) => notify::peers_seen(),
            Note::Session(a, _) => {
                if broker.is_connected(&a) {
                    let b = broker.clone();
                    tokio::spawn(async move {
                        match b.db.get_agent(a).await {
                            Ok(row) => b.supersede_older(a, row.session_epoch),
                            // Revoked: its credential check closes the session.
                            Err(crate::db::DbError::NotFound) => b.refresh_agent(a).await,
                            Err(e) => {
                                tracing::warn!(agent_id = %a, error = %e, "cannot read a reconnected agent")
                            }
                        }
                    });
                }
            }
        }
    }
}

/// After notes may have been lost: claim for every agent here, re-send requested
/// cancels, close sessions whose credentials moved, wake every stream subscriber.
async fn catch_up(broker: &Arc<Broker>) {
    backup_pass(broker).await;
    if let Err(e) = broker.check_credentials().await {
        tracing::warn!(error = %e, "credential check failed");
    }
    broker.fanout.publish_all(super::fanout::Published::Status);
}

/// The backup for lost notes: agents of this replica with queued commands are woken and
/// requested cancels of their running commands are sent again (agents ignore repeats).
async fn backup_pass(broker: &Arc<Broker>) {
    let agents: Vec<_> = broker
        .local_sessions()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    if agents.is_empty() {
        return;
    }
    match broker.db.agents_with_queued(&agents).await {
        Ok(due) => due.into_iter().for_each(|a| broker.wake(a)),
        Err(e) => tracing::warn!(error = %e, "backup queued check failed"),
    }
    match broker.db.pending_cancels(&agents).await {
        Ok(c) => {
            for (a, c) in c {
                broker.cancel(a, c, trellis_protocol::CancelReason::Cancelled);
            }
        }
        Err(e) => tracing::warn!(error = %e, "backup cancel check failed"),
    }
}

/// Renews this replica's lease, holds or seeks the leader lock, and (as leader) sweeps
/// dead replicas; on PostgreSQL also runs the backup pass. Stops with the broker (the
/// server removes the row after every task has stopped).
pub async fn lease(broker: Arc<Broker>) {
    let pg = broker.db.backend == Backend::Postgres;
    let mut lock = LeaderLock::default();
    let mut tick = tokio::time::interval(RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_backup = Instant::now();
    // SQLite has one replica: its row is informational, renewed every 30 s rather than
    // costing the single writer a synced write every 2 s.
    let renew_every: u32 = if pg { 1 } else { 15 };
    let mut n: u32 = 0;
    broker.metrics.set_leader(broker.replica.is_leader());
    loop {
        tokio::select! {
            biased;
            _ = broker.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        n = n.wrapping_add(1);
        let leader = if pg { lock.hold(&broker).await } else { true };
        if broker.replica.leader.swap(leader, Ordering::Relaxed) != leader {
            if leader {
                tracing::info!(replica = %broker.replica.name, "this replica is now the housekeeping leader");
            } else {
                tracing::warn!(replica = %broker.replica.name, "this replica is no longer the housekeeping leader");
            }
            broker.metrics.set_leader(leader);
        }
        if n % renew_every == 1 % renew_every {
            renew(&broker, leader).await;
        }
        if pg {
            // Notes only when someone else may listen (see `db::notify`).
            match broker.db.replicas_besides(&broker.replica.id).await {
                Ok(0) => crate::db::notify::no_peers_seen(),
                Ok(_) | Err(_) => crate::db::notify::peers_seen(),
            }
        }
        if leader && pg && !broker.shutdown.is_cancelled() {
            match broker
                .db
                .sweep_dead_replicas(LEASE.as_millis() as i64)
                .await
            {
                Ok((0, 0)) => {}
                Ok((replicas, agents)) => tracing::info!(
                    replicas,
                    agents,
                    "swept replicas whose lease expired; their agents are offline"
                ),
                Err(e) => tracing::warn!(error = %e, "dead replica sweep failed"),
            }
        }
        if pg && last_backup.elapsed() >= BACKUP_POLL {
            last_backup = Instant::now();
            backup_pass(&broker).await;
        }
    }
    broker.replica.leader.store(false, Ordering::Relaxed);
    broker.metrics.set_leader(false);
    lock.release().await;
}

async fn renew(broker: &Arc<Broker>, leader: bool) {
    match broker
        .db
        .renew_replica(&broker.replica.id, broker.replica.is_draining(), leader)
        .await
    {
        Ok(true) => {}
        // A stopping replica does not come back.
        Ok(false) if broker.shutdown.is_cancelled() => {}
        Ok(false) => {
            // Swept as dead while alive (a stall longer than the lease): come back, and
            // show this replica's sessions online again.
            tracing::warn!("this replica's lease had expired; registering again");
            let r = broker.db.register_replica(&broker.replica.row()).await;
            let s = broker
                .db
                .reassert_sessions(&broker.replica.id, &broker.local_sessions())
                .await;
            if let Err(e) = r.and(s) {
                tracing::warn!(error = %e, "cannot register this replica again");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot renew this replica's lease"),
    }
}

/// Server-side TCP keepalives on this replica's own connections (the lock's and the
/// listener's): if this host vanishes without closing them, PostgreSQL notices within
/// about 10 s and ends the session — releasing the leader lock — instead of after the
/// kernel's two hours.
const KEEPALIVES: [&str; 3] = [
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
];

/// The leader lock's own connection, kept open whether or not it holds the lock.
#[derive(Default)]
struct LeaderLock {
    conn: Option<sqlx::PgConnection>,
    held: bool,
    /// The last failure was logged (logged once per outage, not every 2 s).
    failing: bool,
}

impl LeaderLock {
    /// `true` while this replica holds the lock: checked (or tried for) on its connection,
    /// with a timeout; a failed connection loses the lock (PostgreSQL releases it with
    /// the session) and is opened again on the next tick.
    async fn hold(&mut self, broker: &Broker) -> bool {
        const CHECK: Duration = Duration::from_secs(2);
        match tokio::time::timeout(CHECK, self.try_hold(broker)).await {
            Ok(Ok(held)) => {
                if self.failing {
                    tracing::info!("the leader lock's connection works again");
                    self.failing = false;
                }
                self.held = held;
            }
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("timed out"),
        }
        self.held
    }

    async fn try_hold(&mut self, broker: &Broker) -> Result<bool, sqlx::Error> {
        if self.conn.is_none() {
            let url = broker.db.pg_url().unwrap_or_default();
            let mut c = sqlx::PgConnection::connect(url).await?;
            sqlx::query("SET application_name = 'trellis leader lock'")
                .execute(&mut c)
                .await?;
            for set in KEEPALIVES {
                sqlx::query(set).execute(&mut c).await?;
            }
            self.conn = Some(c);
            self.held = false;
        }
        let c = self.conn.as_mut().expect("connected above");
        if self.held {
            sqlx::query("SELECT 1").execute(&mut *c).await?;
            return Ok(true);
        }
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut *c)
            .await?;
        Ok(got)
    }

    fn failed(&mut self, why: &str) {
        if !self.failing {
            tracing::warn!(
                error = why,
                "the leader lock's connection failed; this replica cannot lead until it works"
            );
            self.failing = true;
        }
        // Dropped without a goodbye: whatever it held, PostgreSQL releases with it.
        self.conn = None;
        self.held = false;
    }

    async fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.close().await;
        }
    }
}

/// Drains this replica before it stops: not ready, no new sessions; when another replica is
/// alive, sessions are closed a few at a time over `period` (agents reconnect through the
/// load balancer to the others), else all at once. Returns when no session is left or the
/// period (plus a second) is over.
pub async fn drain(broker: &Arc<Broker>, period: Duration) {
    broker.replica.draining.store(true, Ordering::Relaxed);
    let _ = broker
        .db
        .renew_replica(&broker.replica.id, true, broker.replica.is_leader())
        .await;
    let others = broker
        .db
        .other_live_replicas(&broker.replica.id, LEASE.as_millis() as i64)
        .await
        .unwrap_or(0);
    if others == 0 || period.is_zero() || broker.online_count() == 0 {
        return;
    }
    let sessions = broker.local_sessions();
    tracing::info!(
        sessions = sessions.len(),
        seconds = period.as_secs_f64(),
        "draining: moving agents to the other replicas"
    );
    // Evenly over the period: at most one group every 100 ms.
    const STEP: Duration = Duration::from_millis(100);
    let groups = ((period.as_millis() / STEP.as_millis()).max(1) as usize).min(sessions.len());
    let per_group = sessions.len().div_ceil(groups);
    let pause = period / groups as u32;
    for chunk in sessions.chunks(per_group.max(1)) {
        for (agent, epoch) in chunk {
            broker.send_if_epoch(*agent, *epoch, ToSession::ShuttingDown);
        }
        tokio::time::sleep(pause).await;
    }
    let until = Instant::now() + Duration::from_secs(1);
    while broker.online_count() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
