//! The agent's connection loop: dial the control plane, say hello, run dispatched
//! commands, ship their events with per-command `seq`, keep every unacknowledged event
//! (journaled) and re-send it after a reconnect, and reconnect forever with exponential
//! backoff and full jitter.
//!
//! One task owns the socket, the journal and the outbox; executors only hold a channel to
//! it. While disconnected, executors keep running and their events are journaled.
//!
//! With several server URLs (control plane replicas, or load balancers), the agent holds
//! one session at a time and moves to the next URL after a failed connect or a lost
//! session, round robin; the backoff between attempts is the same as with one URL. A
//! session that lasted resets the backoff; one that ended within [`SESSION_LASTED`] (a
//! server that welcomes and drops us at once) keeps it growing, so nothing ever loops
//! tightly. The URL of the current session is shared with the commands
//! ([`ConnectedServer`]): Terraform's state backend calls that server.
//!
//! When the server's `welcome` lists the `inventory` feature and Proxmox is configured, a
//! task per connection reports the cluster's VMs (`inventory` frame) on connect, every
//! `inventory_interval_secs` (default 30) and right after a provision, vm_power or destroy
//! ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, protocol::WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use trellis_protocol::{
    AgentMessage, CancelReason, Command, CommandType, Dispatch, Event, EventBody, FinalStatus,
    Hello, Outcome, ProtocolErrorCode, ServerMessage, FEATURE_INVENTORY, HEARTBEATS_PER_TIMEOUT,
    HEARTBEAT_INTERVAL_SECS, MAX_FRAME_BYTES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use uuid::Uuid;

use crate::config::AgentConfig;
use crate::dispatch::Executors;
use crate::exec::deadline::{Deadline, SystemClock, WallClock};
use crate::exec::{ConnectedServer, ExecContext, Report};
use crate::journal::{Journal, Pending};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Stop reading executor reports when this many bytes are unacknowledged: executors then
/// wait (backpressure) instead of growing memory without bound while the server is away.
const OUTBOX_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// Largest batch of events in one frame (bytes of event data, roughly).
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_EVENTS: usize = 512;
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// The shortest wait after the server said the token was replaced.
const MIN_REFUSED_DELAY: Duration = Duration::from_secs(1);
/// How long a stopping agent waits for its executors to wind down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// A session that lasted at least this long resets the backoff when it ends; a shorter one
/// (welcomed, then dropped) lets it keep growing.
const SESSION_LASTED: Duration = Duration::from_secs(5);
/// The backoff step a welcome brings the failure count down to: the server answered, so a
/// long streak of failed connects is over, but a session that ends at once still grows it
/// from here.
const WELCOMED_FAILURES: u32 = 2;

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let (journal, replayed) = Journal::open(&config.work_dir.join("journal"))?;
    if !replayed.interrupted.is_empty() {
        tracing::warn!(
            count = replayed.interrupted.len(),
            "commands were interrupted by an agent restart; the control plane will mark them lost"
        );
    }
    let trust = crate::trust::Trust::open(&config.work_dir, &config.server_public_keys)?;
    let (reports_tx, reports_rx) = mpsc::channel(4096);
    let mut agent = Agent {
        trust,
        interrupted: replayed.interrupted,
        executors: Arc::new(Executors::from_config(&config)),
        config,
        journal,
        pending: replayed.pending,
        running: HashMap::new(),
        forgotten: HashSet::new(),
        reports_tx,
        reports_rx,
        unacked_bytes: 0,
        heartbeat_interval: Duration::from_secs(HEARTBEAT_INTERVAL_SECS),
        concurrency: Arc::new(tokio::sync::Semaphore::new(0)),
        inventory_interval: None,
        inventory_kick: Default::default(),
        connected: ConnectedServer::default(),
        next_server: 0,
    };
    agent.unacked_bytes = agent
        .pending
        .values()
        .flat_map(|p| p.unacked.iter())
        .map(event_size)
        .sum();
    agent
        .concurrency
        .add_permits(agent.config.max_concurrency.max(1) as usize);
    agent.run(shutdown).await
}

struct Agent {
    config: Arc<AgentConfig>,
    /// The control plane keys that must sign `dispatch` and `cancel` frames.
    trust: crate::trust::Trust,
    /// Every executor with its settings and state, shared by the commands' tasks.
    executors: Arc<Executors>,
    /// Accepted before a restart and never finished; reported in every hello.
    interrupted: Vec<Uuid>,
    journal: Journal,
    pending: HashMap<Uuid, Pending>,
    running: HashMap<Uuid, ExecContext>,
    /// Still running, but the server said it does not know them (`unknown_command`):
    /// their events are dropped until they finish.
    forgotten: HashSet<Uuid>,
    reports_tx: mpsc::Sender<Report>,
    reports_rx: mpsc::Receiver<Report>,
    unacked_bytes: usize,
    /// As the control plane asked in `welcome`; the server is presumed gone after
    /// `HEARTBEATS_PER_TIMEOUT` intervals without a frame.
    heartbeat_interval: Duration,
    concurrency: Arc<tokio::sync::Semaphore>,
    /// Seconds between inventory reports, when the server takes them (its `welcome` lists
    /// [`FEATURE_INVENTORY`]) and Proxmox is configured; `None` sends none.
    inventory_interval: Option<Duration>,
    /// Notified when a command that touched a VM ends: the next inventory goes out at once.
    inventory_kick: Arc<tokio::sync::Notify>,
    /// The URL of the current (or last) session, shared with every command.
    connected: ConnectedServer,
    /// Index into `config.server_urls` of the URL the next attempt dials.
    next_server: usize,
}

/// Seconds between inventory reports when the server names none.
const DEFAULT_INVENTORY_INTERVAL_SECS: u64 = 30;

/// A frame whose signature did not verify with a pinned key.
enum Refused {
    Dispatch(Box<Dispatch>, String),
    Cancel(Uuid, String),
}

enum Disconnect {
    Shutdown,
    /// Could not connect (or no welcome): the backoff keeps growing.
    Unreachable,
    Lost(String),
    /// The agent's token was replaced (`token_rotated`): it will not work again, but a new
    /// one may be configured; retry with backoff (never in a tight loop).
    TokenRotated(String),
    /// The server refuses us (revoked, bad token, incompatible): wait the maximum backoff.
    Refused(String),
}

/// The server answered a hello with a fatal error; carried through `anyhow` so that the
/// reconnect loop can pick the backoff.
#[derive(Debug)]
struct HelloRefused(ProtocolErrorCode, String);

impl std::fmt::Display for HelloRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "control plane refused hello: {:?}: {}", self.0, self.1)
    }
}

impl std::error::Error for HelloRefused {}

/// How a fatal error code from the server ends the connection, when it needs more than
/// the usual reconnect (`None`: wait for the close that follows).
fn disconnect_for(code: ProtocolErrorCode, message: String) -> Option<Disconnect> {
    match code {
        ProtocolErrorCode::Revoked
        | ProtocolErrorCode::Unauthorized
        | ProtocolErrorCode::UnsupportedProtocolVersion => Some(Disconnect::Refused(message)),
        ProtocolErrorCode::TokenRotated => Some(Disconnect::TokenRotated(message)),
        ProtocolErrorCode::Superseded => Some(Disconnect::Lost(message)),
        _ => None,
    }
}

impl Agent {
    async fn run(&mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut failures: u32 = 0;
        loop {
            let urls = &self.config.server_urls;
            let server = urls[self.next_server % urls.len()].clone();
            // Whatever happens to this attempt, the next one dials the next URL.
            self.next_server = (self.next_server + 1) % urls.len();
            // How long the session lasted, when there was one.
            let mut lasted = None;
            let why = match self.connect_once(&server, &shutdown).await {
                Ok(mut ws) => {
                    failures = failures.min(WELCOMED_FAILURES);
                    let started = Instant::now();
                    let why = self.serve(&mut ws, &shutdown).await;
                    if matches!(why, Disconnect::Shutdown) {
                        self.stop_executors(Some(&mut ws)).await;
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                    let _ = ws.close(None).await;
                    lasted = Some(started.elapsed());
                    why
                }
                Err(e) => match e.downcast::<HelloRefused>() {
                    Ok(HelloRefused(code, message)) => disconnect_for(code, message.clone())
                        .unwrap_or_else(|| {
                            Disconnect::Lost(format!("hello refused: {code:?}: {message}"))
                        }),
                    Err(e) => {
                        tracing::warn!(%server, error = %e, attempt = failures.saturating_add(1), "cannot connect to control plane");
                        Disconnect::Unreachable
                    }
                },
            };
            let delay = match why {
                Disconnect::Shutdown => unreachable!("handled above"),
                Disconnect::Unreachable => {
                    failures = failures.saturating_add(1);
                    backoff(failures)
                }
                Disconnect::Lost(reason) => {
                    tracing::warn!(%server, %reason, "disconnected from control plane");
                    failures = after_lost(failures, lasted);
                    backoff(failures)
                }
                Disconnect::TokenRotated(reason) => {
                    tracing::error!(
                        %reason,
                        "the token was replaced; configure the new one (TENDRIL_TOKEN)"
                    );
                    // Keep growing: a rotated token keeps failing until it is replaced.
                    failures = failures.saturating_add(1).max(2);
                    backoff(failures).max(MIN_REFUSED_DELAY)
                }
                Disconnect::Refused(reason) => {
                    tracing::error!(
                        %reason,
                        "control plane refused this agent; retrying at the maximum backoff"
                    );
                    failures = 16;
                    max_backoff()
                }
            };
            let urls = &self.config.server_urls;
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                server = %urls[self.next_server % urls.len()],
                "reconnecting"
            );
            let wake = tokio::time::sleep(delay);
            tokio::pin!(wake);
            // Keep journaling executor events while disconnected.
            loop {
                tokio::select! {
                    _ = &mut wake => break,
                    _ = shutdown.cancelled() => { self.stop_executors(None).await; return Ok(()); }
                    Some(r) = self.reports_rx.recv(), if self.unacked_bytes < OUTBOX_LIMIT_BYTES => {
                        let mut batch = Vec::new();
                        self.take_report(r, &mut batch)?;
                        self.journal.flush()?;
                    }
                }
            }
        }
    }

    /// Stops running commands on shutdown: asks each executor to stop (terraform gets
    /// SIGINT, provisions clean up), waits a bounded time for their final events, sends
    /// them when still connected, and journals them for the next start either way.
    async fn stop_executors(&mut self, mut ws: Option<&mut Ws>) {
        for ctx in self.running.values() {
            ctx.request_cancel(CancelReason::AgentShutdown);
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !self.running.is_empty() {
            let Ok(Some(r)) = tokio::time::timeout_at(deadline, self.reports_rx.recv()).await
            else {
                break;
            };
            let mut batch = Vec::new();
            if self.collect_batch(r, &mut batch).is_err() {
                break;
            }
            if let Some(ws) = ws.as_deref_mut() {
                let _ = send(ws, &AgentMessage::Events { events: batch }).await;
            }
        }
        if !self.running.is_empty() {
            tracing::warn!(
                count = self.running.len(),
                "commands still running at shutdown"
            );
        }
        let _ = self.journal.sync();
    }

    /// Dials `server`, says hello and waits for the welcome.
    async fn connect_once(
        &mut self,
        server: &str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Ws> {
        let mut request = server.into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.config.token.expose()).parse()?,
        );
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let connector = crate::config::tls_connector(&self.config)?;
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            true,
            connector,
        );
        let (mut ws, _resp) = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(20), connect) => match r {
                Ok(Ok(ok)) => ok,
                Ok(Err(tungstenite::Error::Http(resp))) => {
                    let status = resp.status();
                    let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                    let hint = if status == tungstenite::http::StatusCode::UNAUTHORIZED {
                        " (the token is unknown, revoked or was replaced)"
                    } else {
                        ""
                    };
                    anyhow::bail!("control plane answered {status}: {body}{hint}");
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => anyhow::bail!("connect timed out"),
            },
            _ = shutdown.cancelled() => anyhow::bail!("shutting down"),
        };
        let mut active: Vec<Uuid> = self.running.keys().copied().collect();
        active.extend(
            self.pending
                .keys()
                .filter(|id| !self.running.contains_key(id)),
        );
        let hello = AgentMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: Some(MIN_PROTOCOL_VERSION),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: self.config.hostname.clone(),
            capabilities: self.capabilities(),
            max_concurrency: self.config.max_concurrency,
            active_commands: active,
            interrupted_commands: self.interrupted.clone(),
            facts: self.facts().await,
        });
        ws.send(tungstenite::Message::text(hello.encode())).await?;
        let welcome = tokio::time::timeout(Duration::from_secs(20), ws.next()).await;
        match welcome {
            Ok(Some(Ok(tungstenite::Message::Text(t)))) => match ServerMessage::decode(&t)? {
                ServerMessage::Welcome {
                    protocol_version,
                    agent_id,
                    heartbeat_interval_secs,
                    features,
                    inventory_interval_secs,
                    signing_key,
                    ..
                } => {
                    // The server names the version it chose from our range.
                    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&protocol_version) {
                        return Err(HelloRefused(
                            ProtocolErrorCode::UnsupportedProtocolVersion,
                            format!(
                                "the control plane chose protocol version {protocol_version}; \
                                 this agent speaks {MIN_PROTOCOL_VERSION}–{PROTOCOL_VERSION}"
                            ),
                        )
                        .into());
                    }
                    tracing::info!(%server, %agent_id, protocol_version, heartbeat_interval_secs, ?features, "connected to control plane");
                    self.connected.set(server);
                    // Only a server that says it signs is taken at its word for the key.
                    let advertised = signing_key.as_ref().filter(|_| {
                        features
                            .iter()
                            .any(|f| f == trellis_protocol::FEATURE_SIGNED_DISPATCH)
                    });
                    self.trust.welcome(agent_id, advertised)?;
                    self.heartbeat_interval =
                        Duration::from_secs(heartbeat_interval_secs.clamp(1, 300));
                    // Inventory is a v2 frame: a v1 session never sends it.
                    self.inventory_interval = (protocol_version >= 2
                        && features.iter().any(|f| f == FEATURE_INVENTORY)
                        && self.executors.proxmox.is_some())
                    .then(|| {
                        Duration::from_secs(
                            inventory_interval_secs
                                .unwrap_or(DEFAULT_INVENTORY_INTERVAL_SECS)
                                .clamp(1, 3600),
                        )
                    });
                    // The server reconciled before welcoming us: interrupted commands
                    // are now marked lost there, so stop reporting them.
                    for id in std::mem::take(&mut self.interrupted) {
                        self.journal.done(id)?;
                    }
                    self.journal.flush()?;
                }
                ServerMessage::Error(e) => return Err(HelloRefused(e.code, e.message).into()),
                other => anyhow::bail!("expected welcome, got {other:?}"),
            },
            Ok(Some(Ok(tungstenite::Message::Close(frame)))) => {
                anyhow::bail!("control plane closed the connection: {frame:?}")
            }
            Ok(other) => anyhow::bail!("no welcome from control plane: {other:?}"),
            Err(_) => anyhow::bail!("no welcome from control plane within 20 s"),
        }
        Ok(ws)
    }

    fn capabilities(&self) -> Vec<CommandType> {
        self.executors.capabilities()
    }

    /// Facts shown to admins: the platform, and the Proxmox nodes this agent reaches (or
    /// why it reaches none), asked afresh on every connect.
    async fn facts(&self) -> serde_json::Value {
        let mut facts = serde_json::json!({
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        });
        if let Some(p) = &self.config.proxmox {
            facts["proxmox_url"] = p.url.clone().into();
            // What this build's `provision` applies beyond the basic params.
            facts["provision_features"] =
                serde_json::json!([trellis_protocol::CLONE_OPTIONS_FEATURE]);
            let nodes = match crate::proxmox::client::ProxmoxClient::new(p) {
                Ok(client) => {
                    match tokio::time::timeout(Duration::from_secs(5), client.nodes()).await {
                        Ok(Ok(nodes)) => Ok(nodes),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("Proxmox did not answer within 5 s".to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match nodes {
                Ok(n) => facts["proxmox_nodes"] = n.into(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach Proxmox");
                    facts["proxmox_error"] = e.into();
                }
            }
        }
        facts
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, ws: &mut Ws, shutdown: &CancellationToken) -> Disconnect {
        // Re-send everything not yet acknowledged, in seq order per command.
        let resend: Vec<Event> = self
            .pending
            .values()
            .flat_map(|p| p.unacked.iter().cloned())
            .collect();
        for chunk in chunk_events(resend) {
            if let Err(e) = send(ws, &AgentMessage::Events { events: chunk }).await {
                return Disconnect::Lost(e.to_string());
            }
        }
        // The inventory is listed by its own task (a slow Proxmox must not hold up this
        // loop) and ends with this connection.
        let (inventory_tx, mut inventory_rx) = mpsc::channel(1);
        let inventory_stop = CancellationToken::new();
        let _inventory_stop = inventory_stop.clone().drop_guard();
        let inventory_on = match (self.inventory_interval, &self.executors.proxmox) {
            (Some(every), Some(px)) => {
                tokio::spawn(crate::proxmox::inventory::report_loop(
                    px.clone(),
                    every,
                    self.inventory_kick.clone(),
                    inventory_tx,
                    inventory_stop,
                ));
                true
            }
            _ => false,
        };
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        let server_timeout = self.heartbeat_interval * HEARTBEATS_PER_TIMEOUT;
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_heard = Instant::now();
        let mut batch: Vec<Event> = Vec::with_capacity(BATCH_EVENTS);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Disconnect::Shutdown,
                msg = ws.next() => {
                    last_heard = Instant::now();
                    let text = match msg {
                        Some(Ok(tungstenite::Message::Text(t))) => t,
                        Some(Ok(tungstenite::Message::Close(frame))) => {
                            return Disconnect::Lost(format!("closed by server: {frame:?}"));
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Disconnect::Lost(e.to_string()),
                        None => return Disconnect::Lost("connection ended".into()),
                    };
                    let msg = match ServerMessage::decode(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable message from server");
                            let _ = send(ws, &AgentMessage::Error(e.to_protocol_error())).await;
                            continue;
                        }
                    };
                    let msg = match self.verified(&text, msg) {
                        Ok(m) => m,
                        Err(Refused::Dispatch(d, why)) => {
                            tracing::error!(command_id = %d.command_id, command_type = %d.command_type, %why, "refused a dispatch: bad signature");
                            let error = trellis_protocol::CommandError::new(
                                trellis_protocol::signing::SIGNATURE_INVALID,
                                format!("the agent refused this command: {why}"),
                            );
                            if let Err(d) = self.dispatch(ws, *d, Some(error)).await {
                                return d;
                            }
                            continue;
                        }
                        Err(Refused::Cancel(command_id, why)) => {
                            tracing::error!(%command_id, %why, "ignored a cancel: bad signature");
                            let mut err = trellis_protocol::ProtocolError::new(
                                ProtocolErrorCode::SignatureInvalid,
                                format!("cancel ignored: {why}"),
                            );
                            err.command_id = Some(command_id);
                            let _ = send(ws, &AgentMessage::Error(err)).await;
                            continue;
                        }
                    };
                    if let Err(d) = self.handle(ws, msg).await {
                        return d;
                    }
                }
                Some(r) = self.reports_rx.recv(), if self.unacked_bytes < OUTBOX_LIMIT_BYTES => {
                    if let Err(e) = self.collect_batch(r, &mut batch) {
                        tracing::error!(error = %e, "journal write failed");
                        return Disconnect::Lost(format!("journal: {e}"));
                    }
                    let events = std::mem::take(&mut batch);
                    if let Err(e) = send(ws, &AgentMessage::Events { events }).await {
                        return Disconnect::Lost(e.to_string());
                    }
                }
                Some(inventory) = inventory_rx.recv(), if inventory_on => {
                    if let Err(e) = send(ws, &AgentMessage::Inventory(inventory)).await {
                        return Disconnect::Lost(e.to_string());
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > server_timeout {
                        return Disconnect::Lost("no traffic from server within the heartbeat timeout".into());
                    }
                    let running = self.running.len() as u32;
                    if let Err(e) = send(ws, &AgentMessage::Heartbeat { running }).await {
                        return Disconnect::Lost(e.to_string());
                    }
                }
            }
        }
    }

    /// Takes one report and everything already waiting, up to the batch limits.
    fn collect_batch(&mut self, first: Report, batch: &mut Vec<Event>) -> anyhow::Result<()> {
        let mut bytes = self.take_report(first, batch)?;
        // Stop well before the frame limit: the next event may be up to ~600 KiB.
        while batch.len() < BATCH_EVENTS
            && bytes < BATCH_BYTES
            && self.unacked_bytes < OUTBOX_LIMIT_BYTES
        {
            match self.reports_rx.try_recv() {
                Ok(r) => bytes += self.take_report(r, batch)?,
                Err(_) => break,
            }
        }
        let finished = batch
            .iter()
            .any(|e| matches!(e.body, EventBody::Finished(_)));
        if finished {
            self.journal.sync()?;
        } else {
            self.journal.flush()?;
        }
        Ok(())
    }

    /// Assigns the next seq, journals the event and keeps it until acknowledged.
    fn take_report(&mut self, r: Report, batch: &mut Vec<Event>) -> anyhow::Result<usize> {
        if self.forgotten.contains(&r.command_id) {
            // The server does not know this command: its events go nowhere.
            if matches!(r.body, EventBody::Finished(_)) {
                self.forgotten.remove(&r.command_id);
                self.running.remove(&r.command_id);
            }
            return Ok(0);
        }
        let p = self.pending.entry(r.command_id).or_default();
        p.next_seq += 1;
        if matches!(r.body, EventBody::Finished(_)) {
            p.finished = true;
            self.running.remove(&r.command_id);
        }
        let mut ev = Event {
            command_id: r.command_id,
            seq: p.next_seq,
            ts: now_ms(),
            body: r.body,
        };
        let mut size = event_size(&ev);
        if size > MAX_FINISHED_BYTES && matches!(ev.body, EventBody::Finished(_)) {
            ev.body = EventBody::Finished(Outcome {
                status: FinalStatus::Failed,
                result: None,
                error: Some(trellis_protocol::CommandError::new(
                    "result_too_large",
                    format!("the command's result is {size} bytes; at most {MAX_FINISHED_BYTES} can be reported"),
                )),
            });
            size = event_size(&ev);
        }
        self.journal.event(&ev)?;
        p.unacked.push_back(ev.clone());
        self.unacked_bytes += size;
        batch.push(ev);
        Ok(size)
    }

    async fn handle(&mut self, ws: &mut Ws, msg: ServerMessage) -> Result<(), Disconnect> {
        match msg {
            ServerMessage::Dispatch(d) => self.dispatch(ws, d, None).await?,
            ServerMessage::Cancel {
                command_id, reason, ..
            } => {
                if let Some(ctx) = self.running.get(&command_id) {
                    tracing::info!(%command_id, ?reason, "cancelling command");
                    ctx.request_cancel(reason);
                }
            }
            ServerMessage::Acks { acks } => {
                for a in acks {
                    let Some(p) = self.pending.get_mut(&a.command_id) else {
                        continue;
                    };
                    while p.unacked.front().is_some_and(|e| e.seq <= a.seq) {
                        if let Some(e) = p.unacked.pop_front() {
                            self.unacked_bytes = self.unacked_bytes.saturating_sub(event_size(&e));
                        }
                    }
                    let _ = self.journal.acked(a.command_id, a.seq);
                    if p.unacked.is_empty()
                        && (p.finished || !self.running.contains_key(&a.command_id))
                    {
                        self.pending.remove(&a.command_id);
                        let _ = self.journal.done(a.command_id);
                    }
                }
                let _ = self.journal.flush();
                if let Err(e) = self.journal.maybe_compact(&self.pending) {
                    tracing::warn!(error = %e, "journal compaction failed");
                }
            }
            ServerMessage::HeartbeatAck | ServerMessage::Welcome { .. } => {}
            ServerMessage::Error(e) => match e.code {
                ProtocolErrorCode::InvalidEvent => {
                    // The server stored a `system` line in that seq's place and acks it:
                    // the sequence goes on, nothing to re-send.
                    tracing::warn!(
                        command_id = ?e.command_id,
                        seq = ?e.seq,
                        message = %e.message,
                        "the control plane rejected an event"
                    );
                }
                ProtocolErrorCode::UnknownCommand => match e.command_id {
                    Some(id) => self.forget(id, &e.message),
                    None => {
                        tracing::warn!(message = %e.message, "unknown_command without a command id")
                    }
                },
                code if !code.is_fatal() => {
                    tracing::warn!(?code, message = %e.message, "error from control plane");
                }
                code => {
                    tracing::warn!(?code, message = %e.message, "fatal error from control plane");
                    if let Some(d) = disconnect_for(code, e.message) {
                        return Err(d);
                    }
                    // Otherwise the close follows.
                }
            },
        }
        Ok(())
    }

    /// The server does not know `id` as a command of this agent (`unknown_command`): it
    /// will never take its events, so drop them from the outbox and the journal instead of
    /// re-sending them forever, and stop the command if it still runs (its further events
    /// are dropped too).
    fn forget(&mut self, id: Uuid, message: &str) {
        let pending = self.pending.remove(&id);
        let running = self.running.get(&id);
        if pending.is_none() && running.is_none() {
            tracing::debug!(command_id = %id, %message, "unknown_command for a command already forgotten");
            return;
        }
        let dropped = pending.as_ref().map_or(0, |p| p.unacked.len());
        tracing::warn!(
            command_id = %id,
            dropped_events = dropped,
            still_running = running.is_some(),
            %message,
            "the control plane does not know this command; dropping its events"
        );
        if let Some(p) = &pending {
            for e in &p.unacked {
                self.unacked_bytes = self.unacked_bytes.saturating_sub(event_size(e));
            }
            // Acking the last seq drops them from the journal on the next replay.
            if p.next_seq > 0 {
                let _ = self.journal.acked(id, p.next_seq);
            }
        }
        if let Some(ctx) = running {
            ctx.request_cancel(CancelReason::Cancelled);
            self.forgotten.insert(id);
        }
        let _ = self.journal.done(id);
        let _ = self.journal.flush();
    }

    /// Checks the signature of a `dispatch` or `cancel` once a key is pinned; a verified
    /// dispatch carries the params parsed from exactly the signed bytes.
    fn verified(&self, text: &str, msg: ServerMessage) -> Result<ServerMessage, Refused> {
        if !self.trust.required() {
            return Ok(msg);
        }
        // Before any welcome there is no agent id: nothing verifies.
        let agent_id = self.trust.agent_id().unwrap_or_default();
        match msg {
            ServerMessage::Dispatch(mut d) => {
                match trellis_protocol::signing::verify_dispatch(
                    text,
                    &d,
                    agent_id,
                    self.trust.keys(),
                ) {
                    Ok(params) => {
                        d.params = params;
                        Ok(ServerMessage::Dispatch(d))
                    }
                    Err(e) => Err(Refused::Dispatch(Box::new(d), e.to_string())),
                }
            }
            ServerMessage::Cancel {
                command_id,
                reason,
                signature,
            } => match trellis_protocol::signing::verify_cancel(
                command_id,
                reason,
                signature.as_ref(),
                agent_id,
                self.trust.keys(),
            ) {
                Ok(()) => Ok(ServerMessage::Cancel {
                    command_id,
                    reason,
                    signature,
                }),
                Err(e) => Err(Refused::Cancel(command_id, e.to_string())),
            },
            other => Ok(other),
        }
    }

    /// Runs a dispatched command, or, with `refusal`, ends it `failed` with that error
    /// without running anything.
    async fn dispatch(
        &mut self,
        ws: &mut Ws,
        d: Dispatch,
        refusal: Option<trellis_protocol::CommandError>,
    ) -> Result<(), Disconnect> {
        let id = d.command_id;
        let accept = AgentMessage::Accept { command_id: id };
        if self.journal.has_seen(&id) {
            // Already accepted before (our accept was lost, or we restarted): never run
            // it twice. Unacked events, if any, were re-sent on connect.
            if !self.running.contains_key(&id) && !self.pending.contains_key(&id) {
                tracing::warn!(command_id = %id, "dispatch of a command this agent accepted before and no longer runs");
            }
            return send(ws, &accept)
                .await
                .map_err(|e| Disconnect::Lost(e.to_string()));
        }
        if let Err(e) = self.journal.accept(id) {
            return Err(Disconnect::Lost(format!("journal: {e}")));
        }
        // Start it before answering: once journaled as accepted it must run even if the
        // connection drops before the accept goes out.
        let ctx = ExecContext::new(
            id,
            d.root_command_id.unwrap_or(id),
            d.attempt,
            self.reports_tx.clone(),
        )
        .with_terraform_state(d.terraform_state.clone())
        .with_server(self.connected.clone());
        self.running.insert(id, ctx.clone());
        let refusal = refusal.or_else(|| {
            d.deadline_ms
                .filter(|&ms| crate::exec::deadline::long_past(ms, &SystemClock))
                .map(|_| {
                    trellis_protocol::CommandError::new(
                        "deadline_passed",
                        "the command's deadline passed long before it arrived (a replayed \
                         dispatch, or this host's clock is far ahead): not run",
                    )
                })
        });
        let parsed = match refusal {
            Some(e) => Err(e),
            None => Command::parse(&d.command_type, &d.params),
        };
        match parsed {
            Ok(command) => {
                // The server times commands out too; this stops the work even when the
                // server cannot reach us. The absolute deadline becomes a monotonic one
                // here, once: a wall-clock step later never cancels the running work.
                let deadline = d
                    .deadline_ms
                    .map(|ms| Deadline::from_server(ms, &SystemClock));
                tracing::info!(
                    command_id = %id,
                    command_type = %d.command_type,
                    deadline_in_ms = deadline.map(|d| d.remaining.as_millis() as u64),
                    "running command"
                );
                if let Some(deadline) = deadline {
                    if deadline.remaining.is_zero() {
                        tracing::warn!(
                            command_id = %id,
                            "the command's deadline passed before it arrived (or this \
                             host's clock is ahead of the control plane's)"
                        );
                    }
                    tokio::spawn(deadline.enforce(ctx.clone()));
                }
                let permits = self.concurrency.clone();
                let executors = self.executors.clone();
                let touches_vm = matches!(
                    command.command_type(),
                    CommandType::Provision | CommandType::VmPower | CommandType::Destroy
                );
                let kick = self.inventory_kick.clone();
                tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let reporter = ctx.clone();
                    // A panicking executor must still end its command.
                    let run = async move { executors.run(ctx, command).await };
                    if let Err(e) = tokio::spawn(run).await {
                        tracing::error!(command_id = %id, error = %e, "executor crashed");
                        reporter
                            .report(EventBody::Finished(Outcome {
                                status: FinalStatus::Failed,
                                result: None,
                                error: Some(trellis_protocol::CommandError::new(
                                    "agent_internal_error",
                                    format!("the executor crashed: {e}"),
                                )),
                            }))
                            .await;
                    }
                    if touches_vm {
                        kick.notify_one();
                    }
                });
            }
            Err(error) => {
                tracing::warn!(command_id = %id, error = %error, "rejected command");
                tokio::spawn(async move {
                    ctx.report(EventBody::Finished(Outcome {
                        status: FinalStatus::Failed,
                        result: None,
                        error: Some(error),
                    }))
                    .await
                });
            }
        }
        send(ws, &accept)
            .await
            .map_err(|e| Disconnect::Lost(e.to_string()))
    }
}

fn chunk_events(events: Vec<Event>) -> Vec<Vec<Event>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for e in events {
        let size = event_size(&e);
        if !cur.is_empty() && (cur.len() >= BATCH_EVENTS || bytes + size > BATCH_BYTES) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size;
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

async fn send(ws: &mut Ws, msg: &AgentMessage) -> Result<(), tungstenite::Error> {
    ws.send(tungstenite::Message::text(msg.encode())).await
}

/// Wire size of an event (JSON-escaped, as sent): batches must stay under the frame limit.
fn event_size(e: &Event) -> usize {
    serde_json::to_vec(e).map_or(0, |v| v.len()) + 1
}

/// The largest final event sent; a bigger result is replaced by an error so that it can
/// never jam the connection (frames are limited to 1 MiB).
const MAX_FINISHED_BYTES: usize = 600 * 1024;

/// An event's timestamp (for display only: no timing decision depends on it).
fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// The wait after the server refused this agent (revoked, unauthorized, incompatible):
/// the maximum backoff, jittered within its upper half.
fn max_backoff() -> Duration {
    let cap = BACKOFF_CAP.as_millis() as u64;
    Duration::from_millis(rand::random_range(cap / 2..=cap))
}

/// The failure count after a lost session: reset when the session lasted
/// ([`SESSION_LASTED`]), grown when it ended at once (or there was none), so a server that
/// welcomes and drops the agent over and over is not dialled in a tight loop.
fn after_lost(failures: u32, lasted: Option<Duration>) -> u32 {
    match lasted {
        Some(d) if d >= SESSION_LASTED => 1,
        _ => failures.saturating_add(1),
    }
}

/// Exponential backoff with full jitter, capped.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(10));
    let cap = exp.min(BACKOFF_CAP);
    let ms = rand::random_range(0..=cap.as_millis() as u64);
    Duration::from_millis(ms.max(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        for f in 0..40 {
            assert!(backoff(f) <= BACKOFF_CAP);
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(8)).collect();
        assert!(samples.len() > 1, "jitter should spread reconnects");
    }

    #[test]
    fn a_session_that_lasted_resets_the_backoff_a_short_one_grows_it() {
        assert_eq!(after_lost(9, Some(SESSION_LASTED)), 1);
        assert_eq!(after_lost(9, Some(Duration::from_secs(3600))), 1);
        // Welcomed (the count came down to WELCOMED_FAILURES) and dropped at once, again
        // and again: the delay never falls back to the first step.
        let mut failures = 0;
        let steps: Vec<u32> = (0..6)
            .map(|_| {
                failures = after_lost(failures.min(WELCOMED_FAILURES), Some(Duration::ZERO));
                failures
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 3, 3, 3]);
        assert_eq!(after_lost(4, None), 5);
    }
}
