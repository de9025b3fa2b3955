//! One task per connected agent. It owns the socket: reads the hello, reconciles the
//! agent's commands, dispatches queued work, forwards events to the writer and acks back,
//! answers heartbeats, and closes on a protocol violation, an idle timeout, revocation or
//! replacement by a newer connection of the same agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

// Tokio's clock, so that liveness is tested with paused time.
use tokio::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use trellis_protocol::{
    AgentMessage, CancelReason, Event, EventBody, Hello, LogStream, ProtocolError,
    ProtocolErrorCode, ServerMessage, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use uuid::Uuid;

use super::writer::WriteOp;
use super::{Broker, ToSession};
use crate::db::{AgentRow, DispatchRow};
use crate::model::{AgentId, CommandId};
use crate::time::now_ms;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a session checks that its peer is alive (at most; a third of the heartbeat
/// timeout when that is shorter).
const LIVENESS_CHECK: Duration = Duration::from_secs(5);
/// How often it also looks for queued commands a wake-up missed (a read; at 10 000
/// agents that is ~330 reads/s).
const QUEUED_CHECK: Duration = Duration::from_secs(30);

/// Close codes (RFC 6455).
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_GOING_AWAY: u16 = 1001;

/// The sending half of an agent connection.
pub trait AgentSink: Sink<Message, Error = axum::Error> + Unpin {}
impl<T: Sink<Message, Error = axum::Error> + Unpin> AgentSink for T {}
/// The receiving half of an agent connection.
pub trait AgentStream: Stream<Item = Result<Message, axum::Error>> + Unpin {}
impl<T: Stream<Item = Result<Message, axum::Error>> + Unpin> AgentStream for T {}

/// The two halves of an agent's connection. Generic so that session logic is tested with
/// channels; in production it is a split axum `WebSocket`.
pub struct Conn<W, R> {
    tx: W,
    rx: R,
}

impl<W: AgentSink, R: AgentStream> Conn<W, R> {
    pub fn new(tx: W, rx: R) -> Self {
        Self { tx, rx }
    }

    async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        self.rx.next().await
    }

    async fn send(&mut self, m: Message) -> Result<(), axum::Error> {
        self.tx.send(m).await
    }
}

/// Serves one upgraded agent WebSocket until it closes.
pub async fn run(broker: Arc<Broker>, agent: AgentRow, socket: WebSocket) {
    let (tx, rx) = socket.split();
    serve(broker, agent, Conn::new(tx, rx)).await
}

/// Serves one agent connection: hello, reconciliation, then frames until it closes.
pub async fn serve<W: AgentSink, R: AgentStream>(
    broker: Arc<Broker>,
    agent: AgentRow,
    mut socket: Conn<W, R>,
) {
    let agent_id = agent.id;
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => match AgentMessage::decode(t.as_str()) {
            Ok(AgentMessage::Hello(h)) => h,
            Ok(_) => {
                reject(
                    &mut socket,
                    ProtocolErrorCode::UnexpectedMessage,
                    "the first message must be hello",
                    CLOSE_PROTOCOL,
                )
                .await;
                return;
            }
            Err(e) => {
                broker.metrics.protocol_error();
                reject(
                    &mut socket,
                    e.to_protocol_error().code,
                    &e.to_string(),
                    CLOSE_PROTOCOL,
                )
                .await;
                return;
            }
        },
        Ok(Some(Err(e))) => {
            tracing::debug!(%agent_id, error = %e, "socket error before hello");
            close_for_error(&mut socket, &e.to_string()).await;
            return;
        }
        _ => {
            reject(
                &mut socket,
                ProtocolErrorCode::UnexpectedMessage,
                "no hello within 10 s",
                CLOSE_PROTOCOL,
            )
            .await;
            return;
        }
    };
    let Some(version) = negotiate(&hello) else {
        reject(
            &mut socket,
            ProtocolErrorCode::UnsupportedProtocolVersion,
            &format!(
                "protocol versions {}–{} are not supported; this control plane speaks {MIN_PROTOCOL_VERSION}–{PROTOCOL_VERSION}",
                hello
                    .min_protocol_version
                    .unwrap_or(hello.protocol_version)
                    .min(hello.protocol_version),
                hello.protocol_version
            ),
            CLOSE_POLICY,
        )
        .await;
        return;
    };
    let epoch = match broker.db.agent_connected(agent_id, &hello).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%agent_id, error = %e, "cannot record agent connection");
            reject(
                &mut socket,
                ProtocolErrorCode::Internal,
                "control plane storage unavailable",
                CLOSE_GOING_AWAY,
            )
            .await;
            return;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    // The admin's setting is the limit; an agent may ask for fewer slots, never more.
    let max_concurrency = agent
        .max_concurrency
        .min(i64::from(hello.max_concurrency.clamp(1, 1024)));
    broker.register(
        agent_id,
        epoch,
        max_concurrency,
        i64::from(hello.max_concurrency.clamp(1, 1024)),
        agent.credential_version,
        tx.clone(),
    );
    tracing::info!(%agent_id, name = %agent.name, epoch, version = %hello.agent_version,
        protocol = version, hostname = %hello.hostname, "agent connected");

    let mut s = Session {
        broker: broker.clone(),
        agent_id,
        epoch,
        version,
        max_concurrency,
        owned: HashMap::new(),
        not_ours: Default::default(),
        log_limited: Default::default(),
        inflight: HashMap::new(),
        tx,
    };
    let why = s.serve(&mut socket, rx, &hello).await;
    tracing::info!(%agent_id, epoch, reason = %why, "agent disconnected");
    broker.unregister(agent_id, epoch);
    if let Err(e) = broker
        .db
        .agent_disconnected(agent_id, epoch, now_ms())
        .await
    {
        tracing::warn!(%agent_id, error = %e, "cannot record agent disconnect");
    }
}

struct Session {
    broker: Arc<Broker>,
    agent_id: AgentId,
    epoch: i64,
    /// The protocol version chosen in the handshake.
    version: u32,
    max_concurrency: i64,
    /// Command ids known to belong to this agent (an agent touches only its own).
    owned: HashMap<CommandId, Option<u64>>,
    /// Commands found not dispatched to this agent (see `remember_not_ours`).
    not_ours: std::collections::HashSet<CommandId>,
    /// Commands found past the per-command log limit: their log data is not kept.
    log_limited: std::collections::HashSet<CommandId>,
    /// Dispatches sent and not yet accepted, for the latency histogram.
    inflight: HashMap<CommandId, Instant>,
    tx: super::SessionTx,
}

impl Session {
    async fn serve<W: AgentSink, R: AgentStream>(
        &mut self,
        socket: &mut Conn<W, R>,
        mut rx: mpsc::UnboundedReceiver<ToSession>,
        hello: &Hello,
    ) -> String {
        // Reconcile before welcoming: the agent forgets interrupted commands on welcome.
        let rec = match self
            .broker
            .db
            .reconcile_on_connect(
                self.agent_id,
                self.epoch,
                &ids(&hello.active_commands),
                &ids(&hello.interrupted_commands),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                reject(
                    socket,
                    ProtocolErrorCode::Internal,
                    "control plane storage unavailable",
                    CLOSE_GOING_AWAY,
                )
                .await;
                return format!("reconcile failed: {e}");
            }
        };
        for id in &rec.lost {
            tracing::warn!(agent_id = %self.agent_id, command_id = %id, "agent lost command");
            self.broker
                .fanout
                .publish(id, super::fanout::Published::Status);
        }
        for id in &rec.cancelled {
            self.broker
                .fanout
                .publish(id, super::fanout::Published::Status);
        }
        let welcome = ServerMessage::Welcome {
            protocol_version: self.version,
            agent_id: self.agent_id.0,
            session_id: Uuid::new_v4(),
            heartbeat_interval_secs: self.broker.heartbeat_interval_secs(),
            // Version 1 agents know no optional frames.
            features: if self.version >= 2 {
                vec![
                    trellis_protocol::FEATURE_INVENTORY.to_string(),
                    trellis_protocol::FEATURE_SIGNED_DISPATCH.to_string(),
                    trellis_protocol::FEATURE_TERRAFORM_STATE.to_string(),
                ]
            } else {
                Vec::new()
            },
            inventory_interval_secs: (self.version >= 2)
                .then(|| self.broker.inventory_interval.as_secs().max(1)),
            signing_key: (self.version >= 2).then(|| self.broker.signing.advertised()),
        };
        if send(socket, &welcome).await.is_err() {
            return "send failed".into();
        }
        for d in rec.resend {
            if self.dispatch(socket, d).await.is_err() {
                return "send failed".into();
            }
        }
        for id in rec.cancel {
            let mut msg = ServerMessage::Cancel {
                command_id: id.0,
                reason: CancelReason::Cancelled,
                signature: None,
            };
            self.broker.signing.sign(self.agent_id.0, &mut msg);
            if send(socket, &msg).await.is_err() {
                return "send failed".into();
            }
        }
        if let Err(e) = self.claim_and_dispatch(socket).await {
            return e;
        }

        let idle_limit = self.broker.heartbeat_timeout;
        let mut liveness = tokio::time::interval(LIVENESS_CHECK.min(idle_limit / 3));
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        liveness.reset();
        let mut last_queued_check = Instant::now();
        // Dead-connection detection: any frame counts; checked on the periodic tick (a
        // per-recv timeout would be reset by every other select branch).
        let mut last_rx = Instant::now();
        let writer = self.broker.writer_for(self.agent_id);
        let (inventories, latest) = tokio::sync::watch::channel(None);
        // Ends when `inventories` is dropped with this function's return.
        tokio::spawn(store_inventories(
            self.broker.clone(),
            self.agent_id,
            latest,
        ));
        loop {
            tokio::select! {
                _ = self.broker.shutdown.cancelled() => {
                    close(socket, CLOSE_GOING_AWAY, "control plane shutting down").await;
                    return "shutdown".into();
                }
                msg = socket.recv() => {
                    last_rx = Instant::now();
                    let msg = match msg {
                        None => return "connection closed".into(),
                        Some(Err(e)) => {
                            self.broker.metrics.protocol_error();
                            close_for_error(socket, &e.to_string()).await;
                            return format!("socket error: {e}");
                        }
                        Some(Ok(m)) => m,
                    };
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Close(_) => return "closed by agent".into(),
                        Message::Binary(_) => {
                            self.broker.metrics.protocol_error();
                            reject(socket, ProtocolErrorCode::MalformedMessage, "binary frames are not part of the protocol", CLOSE_PROTOCOL).await;
                            return "binary frame".into();
                        }
                        _ => continue,
                    };
                    let msg = match AgentMessage::decode(text.as_str()) {
                        Ok(m) => m,
                        Err(e) => {
                            self.broker.metrics.protocol_error();
                            tracing::warn!(agent_id = %self.agent_id, error = %e, "malformed frame from agent");
                            let code = e.to_protocol_error().code;
                            let close_code = if code == ProtocolErrorCode::FrameTooLarge { CLOSE_TOO_BIG } else { CLOSE_PROTOCOL };
                            reject(socket, code, &e.to_string(), close_code).await;
                            return format!("malformed frame: {e}");
                        }
                    };
                    match msg {
                        AgentMessage::Hello(_) => {
                            reject(socket, ProtocolErrorCode::UnexpectedMessage, "hello sent twice", CLOSE_PROTOCOL).await;
                            return "second hello".into();
                        }
                        AgentMessage::Heartbeat { .. } => {
                            self.broker.heartbeat(self.agent_id, self.epoch, now_ms());
                            if send(socket, &ServerMessage::HeartbeatAck).await.is_err() {
                                return "send failed".into();
                            }
                        }
                        AgentMessage::Accept { command_id } => {
                            let command_id = CommandId(command_id);
                            match self.owns(command_id).await {
                                Ok(Some(_)) => {}
                                Ok(None) => {
                                    self.unknown(socket, command_id).await;
                                    continue;
                                }
                                Err(e) => {
                                    reject(socket, ProtocolErrorCode::Internal, "control plane storage unavailable", CLOSE_GOING_AWAY).await;
                                    return e;
                                }
                            }
                            if let Some(t) = self.inflight.remove(&command_id) {
                                self.broker.metrics.observe_dispatch(t.elapsed());
                            }
                            if writer.send(WriteOp::Accept { agent_id: self.agent_id, command_id }).await.is_err() {
                                return "writer stopped".into();
                            }
                        }
                        AgentMessage::Events { events } => {
                            let (keep, then_close) = match self.check_events(socket, events).await {
                                Ok(keep) => keep,
                                Err(e) => {
                                    reject(socket, ProtocolErrorCode::Internal, "control plane storage unavailable", CLOSE_GOING_AWAY).await;
                                    return e;
                                }
                            };
                            if !keep.is_empty() {
                                let op = WriteOp::Events { agent_id: self.agent_id, events: keep, acks_to: self.tx.clone(), then_close };
                                if writer.send(op).await.is_err() {
                                    return "writer stopped".into();
                                }
                            }
                        }
                        AgentMessage::Inventory(inv) => {
                            // Stored off this loop (events and accepts never wait for
                            // it); only the latest report is kept if one is still in work.
                            let _ = inventories.send(Some(inv));
                        }
                        AgentMessage::Error(e) => {
                            tracing::warn!(agent_id = %self.agent_id, code = ?e.code, message = %e.message, "agent reported a protocol error");
                        }
                    }
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return "session channel closed".into() };
                    match cmd {
                        ToSession::Send(mut m) => {
                            // Cancel frames are signed for this agent (a dispatch carries
                            // its stored signature and never passes here).
                            if matches!(m, ServerMessage::Cancel { .. }) {
                                self.broker.signing.sign(self.agent_id.0, &mut m);
                            }
                            if send(socket, &m).await.is_err() {
                                return "send failed".into();
                            }
                        }
                        ToSession::Dispatch(rows) => {
                            for d in rows {
                                self.broker.fanout.publish(&d.id, super::fanout::Published::Status);
                                if self.dispatch(socket, d).await.is_err() {
                                    return "send failed".into();
                                }
                            }
                        }
                        ToSession::Superseded(reason) => {
                            reject(socket, ProtocolErrorCode::Superseded, &reason, CLOSE_POLICY).await;
                            return reason;
                        }
                        ToSession::StorageFailed(reason) => {
                            // Nothing was acked: the agent reconnects and re-sends.
                            reject(socket, ProtocolErrorCode::Internal, &reason, CLOSE_GOING_AWAY).await;
                            return reason;
                        }
                        ToSession::ShuttingDown => {
                            close(socket, CLOSE_GOING_AWAY, "control plane shutting down").await;
                            return "shutdown".into();
                        }
                        ToSession::Revoked => {
                            reject(socket, ProtocolErrorCode::Revoked, "this agent was revoked", CLOSE_POLICY).await;
                            return "revoked".into();
                        }
                        ToSession::Fatal(mut err) => {
                            if self.version < 2 && !err.code.is_fatal() {
                                err.code = ProtocolErrorCode::UnexpectedMessage;
                            }
                            self.broker.metrics.protocol_error();
                            let _ = send(socket, &ServerMessage::Error(err.clone())).await;
                            let code = match err.code {
                                ProtocolErrorCode::EventTooLarge | ProtocolErrorCode::FrameTooLarge => CLOSE_TOO_BIG,
                                _ => CLOSE_POLICY,
                            };
                            close(socket, code, &err.message).await;
                            return err.message;
                        }
                        ToSession::TokenRotated => {
                            // Version 1 knows only `revoked` for a token that stopped working.
                            let code = if self.version < 2 { ProtocolErrorCode::Revoked } else { ProtocolErrorCode::TokenRotated };
                            reject(socket, code, "this agent's token was replaced; reconnect with the new token", CLOSE_POLICY).await;
                            return "token rotated".into();
                        }
                    }
                }
                _ = liveness.tick() => {
                    if last_rx.elapsed() > idle_limit {
                        close(socket, CLOSE_POLICY, "no heartbeat").await;
                        return format!("no traffic for {} s", idle_limit.as_secs());
                    }
                    // On PostgreSQL the replica's backup pass covers every session at once
                    // (`cluster`); SQLite has no notes to lose, but keeps this per session.
                    if last_queued_check.elapsed() < QUEUED_CHECK
                        || self.broker.db.backend == crate::db::Backend::Postgres
                    {
                        continue;
                    }
                    last_queued_check = Instant::now();
                    // A backup for a missed wake-up: a read first, so an idle agent
                    // costs no write.
                    match self.broker.db.has_queued(self.agent_id).await {
                        Ok(true) => self.broker.wake(self.agent_id),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(agent_id = %self.agent_id, error = %e, "queued check failed"),
                    }
                }
            }
        }
    }

    /// Whether the command belongs to this agent. A storage error is an `Err`: the caller
    /// closes the session (the agent re-sends) rather than dropping events.
    /// Whether the command is dispatched to this agent: `Some(finished seq, if known)`, or
    /// `None` for one that is unknown, another agent's, or still queued. A storage error is
    /// an `Err`: the caller closes the session (the agent re-sends) rather than drop events.
    async fn owns(&mut self, id: CommandId) -> Result<Option<Option<u64>>, String> {
        if let Some(fin) = self.owned.get(&id) {
            return Ok(Some(*fin));
        }
        match self.broker.db.command_owner(id).await {
            Ok(Some(o)) if o.agent_id == self.agent_id && o.dispatched => {
                let fin = o.finished_seq.and_then(|s| u64::try_from(s).ok());
                let limit = self.broker.max_log_bytes_per_command;
                if limit > 0 && o.log_bytes > limit {
                    self.log_limited.insert(id);
                }
                self.owned.insert(id, fin);
                Ok(Some(fin))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(format!(
                "storage error while checking command ownership: {e}"
            )),
        }
    }

    /// Applies the per-event rules to one `events` frame and returns what to store:
    /// events of commands not dispatched here are dropped (`unknown_command`); an event
    /// that breaks a stated limit, or follows its command's `finished`, is replaced by a
    /// `system` log line saying why (`invalid_event`), so the sequence goes on and
    /// nothing is dropped silently; seq 0 is refused.
    async fn check_events<W: AgentSink, R: AgentStream>(
        &mut self,
        socket: &mut Conn<W, R>,
        events: Vec<Event>,
    ) -> Result<(Vec<Event>, Option<ProtocolError>), String> {
        /// At most this many errors (of both kinds) per frame: a broken agent must not
        /// flood its socket or the log.
        const MAX_ERRORS: usize = 16;
        let mut keep = Vec::with_capacity(events.len());
        let mut unknown: Vec<CommandId> = Vec::new();
        let mut errors = 0;
        let mut rejected = 0usize;
        let mut too_large: Option<ProtocolError> = None;
        for mut e in events {
            let command_id = CommandId(e.command_id);
            if unknown.contains(&command_id) || self.not_ours.contains(&command_id) {
                if !unknown.contains(&command_id) && unknown.len() < MAX_ERRORS {
                    unknown.push(command_id);
                }
                continue;
            }
            let Some(finished) = self.owns(command_id).await? else {
                self.remember_not_ours(command_id);
                if unknown.len() < MAX_ERRORS {
                    unknown.push(command_id);
                }
                continue;
            };
            if self.version < 2 {
                // Version 1 stated no limits on messages or percent: bring them within
                // them instead of rejecting what an older agent always sent.
                lenient_v1(&mut e);
            }
            let reason = if e.seq == 0 {
                Some("seq starts at 1".to_string())
            } else if e.seq > i64::MAX as u64 {
                Some(format!("seq is larger than {}", i64::MAX))
            } else {
                e.validate().err().or_else(|| {
                    finished.filter(|f| e.seq > *f).map(|f| {
                        format!("the command's finished event was seq {f}; nothing may follow it")
                    })
                })
            };
            if let Some(reason) = reason {
                self.broker.metrics.protocol_error();
                rejected += 1;
                if errors + unknown.len() < MAX_ERRORS {
                    errors += 1;
                    let mut err = ProtocolError::new(
                        self.code_for_version(ProtocolErrorCode::InvalidEvent),
                        format!("event {} rejected: {reason}", e.seq),
                    );
                    err.command_id = Some(e.command_id);
                    err.seq = Some(e.seq);
                    let _ = send(socket, &ServerMessage::Error(err)).await;
                }
                if rejected == 1 {
                    tracing::warn!(agent_id = %self.agent_id, %command_id, seq = e.seq, %reason, "invalid event");
                }
                if e.seq == 0 || e.seq > i64::MAX as u64 {
                    continue;
                }
                e.body = EventBody::Log {
                    stream: LogStream::System,
                    data: format!("event {} rejected: {reason}\n", e.seq),
                };
            } else {
                sanitize(&mut e);
                if let EventBody::Log { data, .. } = &mut e.body {
                    // Past the command's log limit: the seq is kept (and acked), the data
                    // is not.
                    if self.log_limited.contains(&command_id) {
                        data.clear();
                    }
                } else if let Some(size) = oversized(&e) {
                    self.broker.metrics.protocol_error();
                    let reason = format!(
                        "event {} is {size} bytes; at most {} per event",
                        e.seq,
                        trellis_protocol::MAX_EVENT_BYTES
                    );
                    tracing::warn!(agent_id = %self.agent_id, %command_id, seq = e.seq, %reason, "event too large");
                    // Stored in its place (a `finished` still ends the command), acked,
                    // then the session is closed (see `WriteOp::Events::then_close`).
                    e.body = match e.body {
                        EventBody::Finished(_) => EventBody::Finished(trellis_protocol::Outcome {
                            status: trellis_protocol::FinalStatus::Failed,
                            result: None,
                            error: Some(trellis_protocol::CommandError::new(
                                "event_too_large",
                                format!("the agent's finished event was too large: {reason}"),
                            )),
                        }),
                        _ => EventBody::Log {
                            stream: LogStream::System,
                            data: format!("event {} rejected: {reason}\n", e.seq),
                        },
                    };
                    if too_large.is_none() {
                        let mut err = ProtocolError::new(
                            if self.version < 2 {
                                ProtocolErrorCode::FrameTooLarge
                            } else {
                                ProtocolErrorCode::EventTooLarge
                            },
                            reason,
                        );
                        err.command_id = Some(e.command_id);
                        err.seq = Some(e.seq);
                        too_large = Some(err);
                    }
                }
                if matches!(e.body, EventBody::Finished(_)) && finished.is_none() {
                    self.owned.insert(command_id, Some(e.seq));
                }
            }
            keep.push(e);
        }
        if rejected > 1 {
            tracing::warn!(agent_id = %self.agent_id, rejected, "invalid events in one frame");
        }
        for id in unknown {
            self.unknown(socket, id).await;
        }
        Ok((keep, too_large))
    }

    /// Commands this session found not dispatched to it, so a flood of them costs one
    /// lookup each, not one per event (bounded; cleared when full).
    fn remember_not_ours(&mut self, id: CommandId) {
        if self.not_ours.len() >= 4096 {
            self.not_ours.clear();
        }
        self.not_ours.insert(id);
    }

    /// Version 1 has no `invalid_event` or `unknown_command`: its agents get the non-fatal
    /// `unexpected_message` they always got for such frames.
    fn code_for_version(&self, code: ProtocolErrorCode) -> ProtocolErrorCode {
        if self.version < 2 {
            ProtocolErrorCode::UnexpectedMessage
        } else {
            code
        }
    }

    /// A command that is not dispatched to this agent: a non-fatal `unknown_command`.
    async fn unknown<W: AgentSink, R: AgentStream>(&self, socket: &mut Conn<W, R>, id: CommandId) {
        self.broker.metrics.protocol_error();
        tracing::warn!(agent_id = %self.agent_id, command_id = %id, "agent referenced a command not dispatched to it");
        let mut err = ProtocolError::new(
            self.code_for_version(ProtocolErrorCode::UnknownCommand),
            format!("command {id} is not dispatched to this agent; ignored"),
        );
        err.command_id = Some(id.0);
        let _ = send(socket, &ServerMessage::Error(err)).await;
    }

    async fn claim_and_dispatch<W: AgentSink, R: AgentStream>(
        &mut self,
        socket: &mut Conn<W, R>,
    ) -> Result<(), String> {
        let claimed = self
            .broker
            .db
            .claim_queued(self.agent_id, self.epoch, self.max_concurrency)
            .await
            .map_err(|e| format!("claim failed: {e}"))?;
        for d in claimed {
            self.broker
                .fanout
                .publish(&d.id, super::fanout::Published::Status);
            self.dispatch(socket, d)
                .await
                .map_err(|_| "send failed".to_string())?;
        }
        Ok(())
    }

    async fn dispatch<W: AgentSink, R: AgentStream>(
        &mut self,
        socket: &mut Conn<W, R>,
        d: DispatchRow,
    ) -> Result<(), axum::Error> {
        let Some(d) = self.broker.unseal(self.agent_id, d).await else {
            return Ok(());
        };
        self.owned.insert(d.id, None);
        self.inflight.insert(d.id, Instant::now());
        // Sent with the signature stored when the command was created: nothing here signs
        // what the database hands over.
        send(socket, &d.into_message()).await
    }
}

/// Stores an agent's inventory reports in order, the latest first when several came in
/// while one was stored; an unchanged report does not rewrite the stored snapshot.
async fn store_inventories(
    broker: Arc<Broker>,
    agent_id: AgentId,
    mut latest: tokio::sync::watch::Receiver<Option<trellis_protocol::Inventory>>,
) {
    use std::hash::{Hash, Hasher};
    let mut last_hash = None;
    while latest.changed().await.is_ok() {
        let Some(inv) = latest.borrow_and_update().clone() else {
            continue;
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&inv.vms)
            .unwrap_or_default()
            .hash(&mut h);
        let hash = h.finish();
        let changed = last_hash != Some(hash);
        match broker.db.apply_inventory(agent_id, &inv.vms, changed).await {
            Ok(applied) => {
                last_hash = Some(hash);
                for (node, from, to) in applied.moved {
                    tracing::info!(%agent_id, %node, %from, %to, "node follows its VM");
                }
            }
            // Not fatal: the next report tries again.
            Err(e) => tracing::warn!(%agent_id, error = %e, "cannot store inventory"),
        }
    }
}

/// The newest version both sides speak: the agent's `min_protocol_version`..=
/// `protocol_version` (just `protocol_version` without a minimum) against ours.
pub fn negotiate(hello: &Hello) -> Option<u32> {
    let agent_min = hello
        .min_protocol_version
        .unwrap_or(hello.protocol_version)
        .min(hello.protocol_version);
    let best = hello.protocol_version.min(PROTOCOL_VERSION);
    (best >= agent_min.max(MIN_PROTOCOL_VERSION)).then_some(best)
}

/// A version-1 event brought within the limits version 2 states: messages cut to
/// [`trellis_protocol::MAX_EVENT_MESSAGE_BYTES`], percent clamped to 0–100.
fn lenient_v1(e: &mut Event) {
    fn cut(m: &mut Option<String>) {
        if let Some(m) = m.as_mut() {
            let max = trellis_protocol::MAX_EVENT_MESSAGE_BYTES;
            if m.len() > max {
                let mut end = max;
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                m.truncate(end);
            }
        }
    }
    let clamp = |p: f64| {
        if p.is_finite() {
            p.clamp(0.0, 100.0)
        } else {
            0.0
        }
    };
    match &mut e.body {
        EventBody::Stage {
            percent, message, ..
        } => {
            *percent = percent.map(clamp);
            cut(message);
        }
        EventBody::Progress { percent, message } => {
            *percent = clamp(*percent);
            cut(message);
        }
        _ => {}
    }
}

/// The stored size of an event other than a log chunk (its body's JSON) when it is over
/// [`trellis_protocol::MAX_EVENT_BYTES`]. Log data is limited by `Event::validate`.
fn oversized(e: &Event) -> Option<usize> {
    let size = match &e.body {
        EventBody::Log { .. } => return None,
        // Stage and progress messages are limited to 4 KiB: no need to measure.
        EventBody::Stage { .. } | EventBody::Progress { .. } => return None,
        EventBody::Finished(o) => serde_json::to_vec(o).map_or(usize::MAX, |v| v.len()),
    };
    (size > trellis_protocol::MAX_EVENT_BYTES).then_some(size)
}

/// Longest stored `error.message` of a command outcome, in bytes (longer ones are cut).
const MAX_ERROR_MESSAGE_BYTES: usize = 16 * 1024;
/// Longest stored `error.code` and `error.stage`, in bytes (longer ones are cut).
const MAX_ERROR_CODE_BYTES: usize = 64;

/// Brings every string of a valid event within what storage holds, before it reaches the
/// database: NUL (which PostgreSQL TEXT refuses) becomes U+FFFD in log data, messages and
/// everything in an outcome (its error and result, keys included), and an outcome's error
/// code, stage and message are cut to their limits. Stage names are not repaired here:
/// one with a control character is an `invalid_event` (see `Event::validate`).
fn sanitize(e: &mut Event) {
    fn fix(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{FFFD}");
        }
    }
    fn cut(s: &mut String, max: usize) {
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
    }
    fn fix_json(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => fix(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(fix_json),
            serde_json::Value::Object(o) => {
                if o.keys().any(|k| k.contains('\0')) {
                    let old = std::mem::take(o);
                    *o = old
                        .into_iter()
                        .map(|(mut k, v)| {
                            fix(&mut k);
                            (k, v)
                        })
                        .collect();
                }
                o.values_mut().for_each(fix_json);
            }
            _ => {}
        }
    }
    match &mut e.body {
        EventBody::Log { data, .. } => fix(data),
        EventBody::Stage { message, .. } | EventBody::Progress { message, .. } => {
            if let Some(m) = message {
                fix(m);
            }
        }
        EventBody::Finished(o) => {
            if let Some(r) = &mut o.result {
                fix_json(r);
            }
            if let Some(err) = &mut o.error {
                fix(&mut err.code);
                cut(&mut err.code, MAX_ERROR_CODE_BYTES);
                fix(&mut err.message);
                cut(&mut err.message, MAX_ERROR_MESSAGE_BYTES);
                if let Some(st) = &mut err.stage {
                    fix(st);
                    cut(st, MAX_ERROR_CODE_BYTES);
                }
                if let Some(d) = &mut err.details {
                    fix_json(d);
                }
            }
        }
    }
}

fn ids(v: &[Uuid]) -> Vec<CommandId> {
    v.iter().copied().map(CommandId).collect()
}

async fn send<W: AgentSink, R: AgentStream>(
    socket: &mut Conn<W, R>,
    msg: &ServerMessage,
) -> Result<(), axum::Error> {
    socket.send(Message::Text(msg.encode().into())).await
}

async fn close<W: AgentSink, R: AgentStream>(socket: &mut Conn<W, R>, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes; cut on a character boundary (the reason
    // may echo network input).
    let mut cut = reason.len().min(120);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = reason[..cut].to_string();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Sends a typed error, then closes.
async fn reject<W: AgentSink, R: AgentStream>(
    socket: &mut Conn<W, R>,
    code: ProtocolErrorCode,
    message: &str,
    close_code: u16,
) {
    let _ = send(
        socket,
        &ServerMessage::Error(ProtocolError::new(code, message)),
    )
    .await;
    close(socket, close_code, message).await;
}

async fn close_for_error<W: AgentSink, R: AgentStream>(socket: &mut Conn<W, R>, err: &str) {
    if err.contains("too long")
        || err.contains("too big")
        || err.contains("Space limit")
        || err.contains("size")
    {
        reject(
            socket,
            ProtocolErrorCode::FrameTooLarge,
            "frame exceeds the 1 MiB limit",
            CLOSE_TOO_BIG,
        )
        .await;
    } else {
        close(socket, CLOSE_PROTOCOL, "protocol error").await;
    }
}
