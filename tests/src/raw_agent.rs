//! Speaking the agent protocol by hand over the agent WebSocket: for tests that must
//! send exactly the frames a misbehaving, racing or silent agent would, and for the
//! benchmark's simulated agents.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the agent WebSocket at `ws_url` with `token` as the bearer token (TCP_NODELAY
/// on); says nothing yet. Fails when the server refuses the upgrade (a bad token).
pub async fn connect(ws_url: &str, token: &str) -> Result<Ws, tungstenite::Error> {
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, true, None).await?;
    Ok(ws)
}

/// A connected agent session driven frame by frame.
pub struct RawAgent {
    pub ws: Ws,
}

impl RawAgent {
    /// Connects with `token`, says hello (protocol 1, capability `ping`, one at a time)
    /// and waits for the welcome.
    pub async fn hello(ws_url: &str, token: &str) -> Self {
        let mut a = Self::connect(ws_url, token).await;
        a.send(
            json!({"type": "hello", "protocol_version": 1, "agent_version": "raw",
               "hostname": "raw", "capabilities": ["ping"], "max_concurrency": 1}),
        )
        .await;
        let welcome = a.recv(Duration::from_secs(10)).await;
        assert!(
            welcome.to_text().unwrap().contains("welcome"),
            "{welcome:?}"
        );
        a
    }

    /// Connects with `token` without saying anything.
    pub async fn connect(ws_url: &str, token: &str) -> Self {
        Self {
            ws: connect(ws_url, token).await.expect("connect"),
        }
    }

    /// Sends one JSON frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    /// Sends one text frame as it is.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::text(text.into()))
            .await
            .expect("send frame");
    }

    /// Sends one text frame; the error (the server may already have closed) is returned.
    pub async fn try_send_text(
        &mut self,
        text: impl Into<String>,
    ) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::text(text.into())).await
    }

    /// The next frame, which must come within `within`.
    pub async fn recv(&mut self, within: Duration) -> Message {
        tokio::time::timeout(within, self.ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("frame")
    }

    /// Reads frames until a text frame contains `needle`; returns it.
    pub async fn read_until(&mut self, needle: &str) -> String {
        loop {
            let m = self.recv(Duration::from_secs(10)).await;
            if let Ok(t) = m.to_text() {
                if t.contains(needle) {
                    return t.to_string();
                }
            }
        }
    }

    /// Reads frames until the server closes; returns the texts and the close code.
    pub async fn read_until_close(&mut self) -> (Vec<String>, Option<u16>) {
        let mut texts = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => texts.push(t.to_string()),
                Ok(Some(Ok(Message::Close(f)))) => return (texts, f.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return (texts, None),
                Err(_) => panic!("server did not close the connection"),
            }
        }
    }

    /// The next JSON frame, or `Err(close code)` when the server closed.
    pub async fn next_frame(&mut self, within: Duration) -> Result<Value, Option<u16>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("nothing from the server within {within:?}"),
                Ok(None) | Ok(Some(Err(_))) => return Err(None),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Ok(serde_json::from_str(t.as_str()).unwrap())
                }
                Ok(Some(Ok(Message::Close(f)))) => return Err(f.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Reads until `cid` is acked up to `seq`; panics on a close or an error frame.
    pub async fn wait_ack(&mut self, cid: &str, seq: u64) {
        loop {
            match self.next_frame(Duration::from_secs(20)).await {
                Ok(v) if acked(&v, cid).is_some_and(|s| s >= seq) => return,
                Ok(v) if v["type"] == "error" => panic!("healthy agent got an error: {v}"),
                Ok(_) => {}
                Err(code) => panic!("healthy agent was disconnected ({code:?})"),
            }
        }
    }

    /// Still open: a heartbeat is answered.
    pub async fn assert_open(&mut self) {
        self.send(json!({"type": "heartbeat", "running": 0})).await;
        loop {
            match self.next_frame(Duration::from_secs(10)).await {
                Ok(v) if v["type"] == "heartbeat_ack" => return,
                Ok(v) if v["type"] == "error" => panic!("unexpected error: {v}"),
                Ok(_) => {}
                Err(code) => panic!("session closed ({code:?})"),
            }
        }
    }
}

/// The highest seq of `cid` an `acks` frame acknowledges.
pub fn acked(v: &Value, cid: &str) -> Option<u64> {
    (v["type"] == "acks").then_some(())?;
    v["acks"]
        .as_array()?
        .iter()
        .filter(|a| a["command_id"] == cid)
        .filter_map(|a| a["seq"].as_u64())
        .max()
}

/// What a [`PingAgent`] saw, shared with the test or benchmark that runs it.
#[derive(Default)]
pub struct PingAgentLog {
    /// Sessions opened (welcome received).
    pub sessions: std::sync::atomic::AtomicU64,
    /// Whether a session is open now.
    pub online: std::sync::atomic::AtomicBool,
    /// When each command's dispatch arrived (the first time).
    pub dispatched: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, std::time::Instant>>,
    /// When each command's cancel arrived (the first time).
    pub cancelled: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, std::time::Instant>>,
    /// Close codes and reasons the server sent, with when.
    pub closes: std::sync::Mutex<Vec<(std::time::Instant, Option<u16>, String)>>,
}

/// A minimal agent with the durability rules of the real one, for many-agent tests and
/// the benchmark: it answers `ping` (after `params.duration_ms`, if given) and cancels,
/// keeps every result until the server acks it, and on a lost session reconnects — to the
/// next of its URLs, after a short jittered pause — naming its unfinished commands in
/// hello and sending their results again. Stops when `stop` is cancelled.
pub struct PingAgent;

impl PingAgent {
    pub fn spawn(
        urls: Vec<String>,
        token: String,
        log: std::sync::Arc<PingAgentLog>,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run_ping_agent(urls, token, log, stop))
    }
}

async fn run_ping_agent(
    urls: Vec<String>,
    token: String,
    log: std::sync::Arc<PingAgentLog>,
    stop: tokio_util::sync::CancellationToken,
) {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    use trellis_protocol::{
        AgentMessage, CommandType, Event, EventBody, FinalStatus, Hello, Outcome, ServerMessage,
    };
    // Results not acked yet, by command (seq 1 each: a ping's only event).
    let mut unacked: BTreeMap<uuid::Uuid, Event> = BTreeMap::new();
    // Accepted, result not made yet (waiting out `duration_ms`).
    let mut running: HashSet<uuid::Uuid> = HashSet::new();
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<(uuid::Uuid, FinalStatus)>();
    let finished = |id: uuid::Uuid, status: FinalStatus| {
        Event {
        command_id: id,
        seq: 1,
        ts: 0,
        body: EventBody::Finished(Outcome {
            status,
            result: (status == FinalStatus::Succeeded).then(|| {
                json!({"pong": true, "hostname": "sim", "agent_version": "sim", "events_sent": 0})
            }),
            error: (status != FinalStatus::Succeeded).then(|| trellis_protocol::CommandError::new("cancelled", "cancelled")),
        }),
    }
    };
    let mut attempt = 0usize;
    while !stop.is_cancelled() {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let ws = tokio::select! {
            _ = stop.cancelled() => return,
            ws = connect(url, &token) => ws,
        };
        let Ok(ws) = ws else {
            let pause = 50 + rand::random::<u64>() % 250;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            continue;
        };
        let (mut tx, mut rx) = ws.split();
        let hello = AgentMessage::Hello(Hello {
            protocol_version: trellis_protocol::PROTOCOL_VERSION,
            min_protocol_version: None,
            agent_version: "sim".into(),
            hostname: "sim".into(),
            capabilities: vec![CommandType::Ping],
            max_concurrency: 64,
            active_commands: unacked.keys().chain(running.iter()).copied().collect(),
            interrupted_commands: vec![],
            facts: json!({}),
        });
        if tx.send(Message::text(hello.encode())).await.is_err() {
            continue;
        }
        let mut beat = tokio::time::interval(Duration::from_secs(10));
        let mut welcomed = false;
        let close: (Option<u16>, String) = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = tx.send(Message::Close(None)).await;
                    log.online.store(false, Ordering::Relaxed);
                    return;
                }
                d = due_rx.recv() => {
                    let Some((id, status)) = d else { return };
                    running.remove(&id);
                    let e = finished(id, status);
                    unacked.insert(id, e.clone());
                    if tx.send(Message::text(AgentMessage::Events { events: vec![e] }.encode())).await.is_err() {
                        break (None, "send failed".into());
                    }
                }
                _ = beat.tick() => {
                    if tx.send(Message::text(AgentMessage::Heartbeat { running: running.len() as u32 }.encode())).await.is_err() {
                        break (None, "send failed".into());
                    }
                }
                m = rx.next() => {
                    let t = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(c))) => {
                            break (c.as_ref().map(|c| u16::from(c.code)), c.map(|c| c.reason.to_string()).unwrap_or_default());
                        }
                        Some(Ok(_)) => continue,
                        _ => break (None, "connection lost".into()),
                    };
                    match ServerMessage::decode(&t) {
                        Ok(ServerMessage::Welcome { .. }) if !welcomed => {
                            welcomed = true;
                            log.sessions.fetch_add(1, Ordering::Relaxed);
                            log.online.store(true, Ordering::Relaxed);
                            // Results the last session did not see acked, again.
                            if !unacked.is_empty() {
                                let events: Vec<Event> = unacked.values().cloned().collect();
                                if tx.send(Message::text(AgentMessage::Events { events }.encode())).await.is_err() {
                                    break (None, "send failed".into());
                                }
                            }
                        }
                        Ok(ServerMessage::Dispatch(d)) => {
                            log.dispatched.lock().unwrap().entry(d.command_id).or_insert_with(Instant::now);
                            if unacked.contains_key(&d.command_id) || running.contains(&d.command_id) {
                                continue;
                            }
                            let accept = AgentMessage::Accept { command_id: d.command_id };
                            if tx.send(Message::text(accept.encode())).await.is_err() {
                                break (None, "send failed".into());
                            }
                            let ms = d.params.get("duration_ms").and_then(|v| v.as_u64()).unwrap_or(0);
                            running.insert(d.command_id);
                            if ms == 0 {
                                let _ = due_tx.send((d.command_id, FinalStatus::Succeeded));
                            } else {
                                let due = due_tx.clone();
                                let id = d.command_id;
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                    let _ = due.send((id, FinalStatus::Succeeded));
                                });
                            }
                        }
                        Ok(ServerMessage::Cancel { command_id, .. }) => {
                            log.cancelled.lock().unwrap().entry(command_id).or_insert_with(Instant::now);
                            if running.contains(&command_id) {
                                let _ = due_tx.send((command_id, FinalStatus::Cancelled));
                            }
                        }
                        Ok(ServerMessage::Acks { acks }) => {
                            for a in acks {
                                unacked.remove(&a.command_id);
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        log.online.store(false, Ordering::Relaxed);
        log.closes
            .lock()
            .unwrap()
            .push((Instant::now(), close.0, close.1));
        let pause = 50 + rand::random::<u64>() % 250;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
