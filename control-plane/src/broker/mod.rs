//! The command broker: agent sessions, the dispatcher, the event writer, fan-out and the
//! reaper. Memory here is routing only (which agent is connected to this process, who
//! listens to which command); command state lives in the database, written through `db`.
//! The broker depends on `db` and `model`, never on `domain` or `api`.

pub mod cluster;
pub mod dispatcher;
pub mod fanout;
pub mod inserter;
pub mod reaper;
mod secrets;
pub mod session;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_protocol::{CancelReason, ServerMessage};

use crate::db::{Db, DbError, DbResult, NewCommand};
use crate::metrics::Metrics;
use crate::model::{AgentId, CommandId};

/// Instructions to a session task (the only owner of its socket).
#[derive(Debug)]
pub enum ToSession {
    Send(ServerMessage),
    /// Commands the dispatcher claimed for this agent: send them.
    Dispatch(Vec<crate::db::DispatchRow>),
    /// Replaced by a newer connection of the same agent (`superseded`).
    Superseded(String),
    /// Storage failed: close so that the agent reconnects and re-sends (`internal`).
    StorageFailed(String),
    /// The control plane is stopping (close 1001, no error: reconnect later).
    ShuttingDown,
    /// The agent was revoked (its token will never work again).
    Revoked,
    /// The agent's token was replaced (the session authenticated with the old one).
    TokenRotated,
    /// A fatal protocol error about what this session sent (e.g. `invalid_event` for
    /// events the database refused even on their own): sent, then the session closes.
    Fatal(trellis_protocol::ProtocolError),
}

pub type SessionTx = mpsc::UnboundedSender<ToSession>;

struct SessionHandle {
    epoch: i64,
    /// The effective limit: the admin's, lowered by what the agent asked for.
    max_concurrency: i64,
    /// What the agent asked for in its hello.
    agent_max: i64,
    tx: SessionTx,
    last_heartbeat: i64,
    /// The agent's credential version when this session authenticated.
    credential_version: i64,
}

/// The broker's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_timeout: Duration,
    pub inventory_interval: Duration,
    /// Most log bytes one command may store (0: no limit).
    pub max_log_bytes_per_command: u64,
    /// Terminal commands older than this are deleted with their events and stages
    /// (`None`: kept forever).
    pub retention: Option<Duration>,
}

/// Default of `--max-log-bytes-per-command`: 256 MiB.
pub const DEFAULT_MAX_LOG_BYTES_PER_COMMAND: u64 = 256 * 1024 * 1024;
/// Default of `--retention-days`.
pub const DEFAULT_RETENTION_DAYS: u64 = 30;

pub struct Broker {
    pub db: Db,
    pub fanout: Arc<fanout::Fanout>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// A session with no frame from its agent for this long is closed as dead.
    pub heartbeat_timeout: Duration,
    /// How often agents are asked to report their VM inventory.
    pub inventory_interval: Duration,
    /// Most log bytes one command may store (0: no limit).
    pub max_log_bytes_per_command: i64,
    /// How long terminal commands are kept (`None`: forever).
    pub retention: Option<Duration>,
    /// The database's signing key: it signs `cancel` frames here (commands are signed when
    /// stored) and `welcome` advertises its public key.
    pub signing: Arc<trellis_protocol::signing::SigningKey>,
    /// This replica (its id is the origin of the notes it sends).
    pub replica: Arc<cluster::Replica>,
    sessions: Mutex<HashMap<AgentId, SessionHandle>>,
    /// Event writers, each for a fixed share of the agents (see [`Broker::shard`]).
    writers: Vec<mpsc::Sender<writer::WriteOp>>,
    inserter: mpsc::Sender<inserter::InsertRequest>,
    /// Dispatchers, sharded like the writers.
    dispatchers: Vec<mpsc::UnboundedSender<AgentId>>,
}

/// Writers and dispatchers on PostgreSQL. Each runs one transaction at a time, and on
/// PostgreSQL a transaction of many statements is bound by network round trips, not by
/// the database: a few in parallel (for disjoint agents, so one agent's frames keep their
/// order and no two claim for one agent) use the server's concurrency. SQLite has one
/// writer connection: one of each.
const PG_SHARDS: usize = 4;

impl Broker {
    /// Creates the broker and starts its tasks on `tasks`: the inserter (stops when the
    /// broker is dropped), the dispatcher (stops with `shutdown`) and the writer, whose
    /// handle is returned (it stops behind [`Broker::stop_writer`] or when every sender is
    /// gone).
    pub fn start(
        db: Db,
        fanout: Arc<fanout::Fanout>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        timing: Timing,
        replica: Arc<cluster::Replica>,
        tasks: &TaskTracker,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let shards = match db.backend {
            crate::db::Backend::Postgres => PG_SHARDS,
            crate::db::Backend::Sqlite => 1,
        };
        let (writers, writer_rxs): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::channel(8192)).unzip();
        let (itx, irx) = mpsc::channel(4096);
        tasks.spawn(inserter::run(db.clone(), irx));
        let (dispatchers, dispatcher_rxs): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let signing = db.signing().clone();
        let broker = Arc::new(Self {
            db,
            fanout,
            metrics,
            shutdown,
            heartbeat_timeout: timing.heartbeat_timeout,
            inventory_interval: timing.inventory_interval,
            max_log_bytes_per_command: i64::try_from(timing.max_log_bytes_per_command)
                .unwrap_or(i64::MAX),
            retention: timing.retention,
            signing,
            replica,
            sessions: Mutex::new(HashMap::new()),
            writers,
            inserter: itx,
            dispatchers,
        });
        for drx in dispatcher_rxs {
            tasks.spawn(dispatcher::run(broker.clone(), drx));
        }
        tasks.spawn(cluster::listen(broker.clone()));
        tasks.spawn(cluster::lease(broker.clone()));
        let handles: Vec<_> = writer_rxs
            .into_iter()
            .map(|rx| tasks.spawn(writer::run(broker.clone(), rx)))
            .collect();
        let writer = tasks.spawn(async move {
            for h in handles {
                let _ = h.await;
            }
        });
        (broker, writer)
    }

    /// The heartbeat interval agents are told in `welcome`.
    pub fn heartbeat_interval_secs(&self) -> u64 {
        (self.heartbeat_timeout.as_secs() / u64::from(trellis_protocol::HEARTBEATS_PER_TIMEOUT))
            .max(1)
    }

    /// Which writer and dispatcher serve the agent (always the same ones).
    fn shard(&self, agent_id: &AgentId) -> usize {
        (agent_id.0.as_u128() % self.writers.len() as u128) as usize
    }

    /// The event writer of this agent's session.
    pub fn writer_for(&self, agent_id: AgentId) -> mpsc::Sender<writer::WriteOp> {
        self.writers[self.shard(&agent_id)].clone()
    }

    /// Stops the writers once they have written everything sent before this call.
    pub async fn stop_writer(&self) {
        for w in &self.writers {
            let _ = w.send(writer::WriteOp::Stop).await;
        }
    }

    /// Stores a new command (batched with concurrent ones) and returns its `created_at`.
    pub async fn insert_command(&self, command: NewCommand) -> DbResult<i64> {
        let (done, rx) = tokio::sync::oneshot::channel();
        // The inserter only goes away with the database pool at shutdown.
        let stopped = || DbError::Unavailable("the command inserter stopped".into());
        self.inserter
            .send(inserter::InsertRequest { command, done })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Registers a session, replacing (and closing) an older one for the same agent.
    fn register(
        &self,
        agent_id: AgentId,
        epoch: i64,
        max_concurrency: i64,
        agent_max: i64,
        credential_version: i64,
        tx: SessionTx,
    ) {
        let old = {
            let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(
                agent_id,
                SessionHandle {
                    epoch,
                    max_concurrency,
                    agent_max,
                    tx,
                    last_heartbeat: crate::time::now_ms(),
                    credential_version,
                },
            )
        };
        if let Some(old) = old {
            let _ = old.tx.send(ToSession::Superseded(
                "replaced by a newer connection of the same agent".into(),
            ));
        }
        self.metrics.set_online(self.online_count());
    }

    fn unregister(&self, agent_id: AgentId, epoch: i64) {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&agent_id).is_some_and(|h| h.epoch == epoch) {
            map.remove(&agent_id);
        }
        let n = map.len();
        drop(map);
        self.metrics.set_online(n);
    }

    pub fn online_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_connected(&self, agent_id: &AgentId) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(agent_id)
    }

    fn send(&self, agent_id: &AgentId, msg: ToSession) -> bool {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.get(agent_id).is_some_and(|h| h.tx.send(msg).is_ok())
    }

    /// Has the dispatcher claim queued commands for the agent (if connected here).
    pub fn wake(&self, agent_id: AgentId) {
        if self.is_connected(&agent_id) {
            let _ = self.dispatchers[self.shard(&agent_id)].send(agent_id);
        }
    }

    /// `(agent, epoch, max_concurrency)` of those agents connected here.
    fn claim_targets(&self, agents: &[AgentId]) -> Vec<(AgentId, i64, i64)> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .iter()
            .filter_map(|id| map.get(id).map(|h| (*id, h.epoch, h.max_concurrency)))
            .collect()
    }

    pub fn cancel(&self, agent_id: AgentId, command_id: CommandId, reason: CancelReason) {
        self.send(
            &agent_id,
            ToSession::Send(ServerMessage::Cancel {
                command_id: command_id.0,
                reason,
                signature: None,
            }),
        );
    }

    /// The admin changed the agent's limit: a live session follows at once (and may get
    /// more commands now).
    pub fn set_max_concurrency(&self, agent_id: AgentId, admin: i64) {
        {
            let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = map.get_mut(&agent_id) {
                h.max_concurrency = admin.min(h.agent_max);
            }
        }
        self.wake(agent_id);
    }

    pub fn revoke(&self, agent_id: AgentId) {
        self.send(&agent_id, ToSession::Revoked);
    }

    /// Closes the agent's session: it authenticated with a token that was just replaced.
    pub fn token_rotated(&self, agent_id: AgentId) {
        self.send(&agent_id, ToSession::TokenRotated);
    }

    fn heartbeat(&self, agent_id: AgentId, epoch: i64, ts: i64) {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get_mut(&agent_id).filter(|h| h.epoch == epoch) {
            h.last_heartbeat = ts;
        }
    }

    /// Last heartbeats of connected agents, for the periodic flush.
    pub fn heartbeats(&self) -> Vec<(AgentId, i64)> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(id, h)| (*id, h.last_heartbeat)).collect()
    }

    /// Closes the sessions whose agent's credentials changed since they authenticated
    /// (rotated or revoked anywhere: this process, another replica, the CLI). One batched
    /// primary-key read for all sessions of this process; the reaper calls it once per
    /// heartbeat interval.
    pub async fn check_credentials(&self) -> DbResult<usize> {
        let ids: Vec<AgentId> = {
            let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            map.keys().copied().collect()
        };
        self.check_credentials_of(&ids).await
    }

    /// [`Broker::check_credentials`] for these agents' sessions only.
    async fn check_credentials_of(&self, agents: &[AgentId]) -> DbResult<usize> {
        let live: HashMap<AgentId, i64> = {
            let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            agents
                .iter()
                .filter_map(|id| map.get(id).map(|h| (*id, h.credential_version)))
                .collect()
        };
        if live.is_empty() {
            return Ok(0);
        }
        let ids: Vec<AgentId> = live.keys().copied().collect();
        let mut closed = 0;
        for (id, version, revoked) in self.db.credential_versions(&ids).await? {
            if live.get(&id).is_some_and(|v| *v != version) {
                closed += 1;
                if revoked {
                    tracing::info!(agent_id = %id, "closing the session of a revoked agent");
                    self.revoke(id);
                } else {
                    tracing::info!(agent_id = %id, "closing a session whose token was rotated");
                    self.token_rotated(id);
                }
            }
        }
        Ok(closed)
    }

    /// `(agent, epoch)` of every session of this replica.
    pub fn local_sessions(&self) -> Vec<(AgentId, i64)> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(id, h)| (*id, h.epoch)).collect()
    }

    /// Sends to the agent's session only if it is still the one with `epoch`.
    fn send_if_epoch(&self, agent_id: AgentId, epoch: i64, msg: ToSession) -> bool {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&agent_id)
            .filter(|h| h.epoch == epoch)
            .is_some_and(|h| h.tx.send(msg).is_ok())
    }

    /// The agent connected again with `epoch` (on another replica): a session of it here
    /// with an older epoch is closed as superseded.
    pub fn supersede_older(&self, agent_id: AgentId, epoch: i64) {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get(&agent_id).filter(|h| h.epoch < epoch) {
            let _ = h.tx.send(ToSession::Superseded(
                "replaced by a newer connection of the same agent on another replica".into(),
            ));
        }
    }

    /// The agent's row changed elsewhere (rotate, revoke, limit): a session of it here
    /// re-reads it: closed when its credentials moved on, else it follows the new limit.
    pub async fn refresh_agent(&self, agent_id: AgentId) {
        if let Err(e) = self.check_credentials_of(&[agent_id]).await {
            tracing::warn!(%agent_id, error = %e, "credential check failed");
        }
        match self.db.get_agent(agent_id).await {
            Ok(a) => self.set_max_concurrency(agent_id, a.max_concurrency),
            Err(crate::db::DbError::NotFound) => {}
            Err(e) => tracing::warn!(%agent_id, error = %e, "cannot re-read the agent"),
        }
    }

    /// Closes every session (shutdown): close 1001, and the agents reconnect later.
    pub fn close_all(&self) {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for h in map.values() {
            let _ = h.tx.send(ToSession::ShuttingDown);
        }
    }
}
