//! Agent-side conformance to protocol v2: the real `tendril` binary against a scripted
//! fake control plane (a bare WebSocket server on 127.0.0.1 at `/api/agents/connect` that
//! checks the bearer token). One test per rule the agent must follow; `ping` needs no
//! Proxmox (the inventory tests run the Proxmox VE API simulator).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use trellis_protocol::{
    AgentMessage, CancelReason, CommandType, Dispatch, Event, EventAck, EventBody, FinalStatus,
    Hello, ProtocolError, ProtocolErrorCode, ServerMessage, FEATURE_INVENTORY,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use trellis_tests::harness::{bin, Agent, TempDir};
use trellis_tests::pve_sim::process::SimProcess;
use trellis_tests::pve_sim::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET};
use uuid::Uuid;

const TOKEN: &str = "conformance-agent-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

/// One accepted agent connection.
struct Conn {
    ws: WebSocketStream<TcpStream>,
    at: Instant,
}

/// The fake control plane: hands every upgraded connection to the test.
struct FakeServer {
    url: String,
    conns: mpsc::UnboundedReceiver<Conn>,
    /// The accept loop (it owns the listener).
    accept: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/api/agents/connect", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::unbounded_channel();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)]
                    let check =
                        |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok());
                            if req.uri().path() != "/api/agents/connect"
                                || auth != Some(&format!("Bearer {TOKEN}"))
                            {
                                let mut e = ErrorResponse::new(Some("bad path or token".into()));
                                *e.status_mut() =
                                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                                return Err(e);
                            }
                            Ok(resp)
                        };
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await {
                        let _ = tx.send(Conn {
                            ws,
                            at: Instant::now(),
                        });
                    }
                });
            }
        });
        Self { url, conns, accept }
    }

    /// Stops listening: new connections are refused (the port is closed); sessions
    /// already handed to the test are not touched.
    async fn stop(&mut self) {
        self.accept.abort();
        let _ = (&mut self.accept).await;
    }

    async fn next_conn(&mut self, within: Duration) -> Conn {
        tokio::time::timeout(within, self.conns.recv())
            .await
            .expect("the agent connects")
            .expect("server running")
    }

    /// The next connection, its hello, and a v2 welcome (heartbeat every 5 s).
    async fn session(&mut self) -> (Conn, Hello) {
        let mut c = self.next_conn(WAIT).await;
        let hello = c.hello().await;
        c.welcome(PROTOCOL_VERSION, 5, &[]).await;
        (c, hello)
    }

    /// Nothing connects within `d`.
    async fn no_conn(&mut self, d: Duration) {
        if let Ok(Some(c)) = tokio::time::timeout(d, self.conns.recv()).await {
            panic!(
                "the agent reconnected after {:?}; expected nothing within {d:?}",
                c.at.elapsed()
            );
        }
    }
}

impl Conn {
    async fn send(&mut self, msg: &ServerMessage) {
        self.ws
            .send(Message::text(msg.encode()))
            .await
            .expect("send to agent");
    }

    /// The next frame from the agent (heartbeats included), `None` when closed or on
    /// timeout.
    async fn recv_any(&mut self, within: Duration) -> Option<AgentMessage> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(Message::Text(t)) => {
                    return Some(AgentMessage::decode(&t).expect("agent frames decode"))
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(Message::Binary(_)) => panic!("the agent sent a binary frame"),
                Ok(_) => continue,
            }
        }
    }

    /// The next frame that is not a heartbeat (heartbeats are answered).
    async fn recv_within(&mut self, within: Duration) -> Option<AgentMessage> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_any(left).await? {
                AgentMessage::Heartbeat { .. } => self.send(&ServerMessage::HeartbeatAck).await,
                other => return Some(other),
            }
        }
    }

    async fn recv(&mut self) -> AgentMessage {
        self.recv_within(WAIT)
            .await
            .expect("a frame from the agent")
    }

    async fn hello(&mut self) -> Hello {
        match self.recv_any(WAIT).await {
            Some(AgentMessage::Hello(h)) => h,
            other => panic!("expected hello first, got {other:?}"),
        }
    }

    async fn welcome(&mut self, version: u32, heartbeat_secs: u64, features: &[&str]) {
        self.send(&ServerMessage::Welcome {
            protocol_version: version,
            agent_id: Uuid::new_v4(),
            session_id: Uuid::new_v4(),
            heartbeat_interval_secs: heartbeat_secs,
            features: features.iter().map(|f| f.to_string()).collect(),
            inventory_interval_secs: Some(1),
            signing_key: None,
        })
        .await;
    }

    async fn dispatch(&mut self, id: Uuid, params: serde_json::Value) {
        self.send(&ServerMessage::Dispatch(Dispatch {
            command_id: id,
            command_type: "ping".into(),
            params,
            deadline_ms: None,
            attempt: 1,
            root_command_id: None,
            signature: None,
            terraform_state: None,
        }))
        .await;
    }

    async fn expect_accept(&mut self, id: Uuid) {
        match self.recv().await {
            AgentMessage::Accept { command_id } => assert_eq!(command_id, id),
            other => panic!("expected accept of {id}, got {other:?}"),
        }
    }

    /// Events of `id` until its `finished` one (other frames must not come).
    async fn events_until_finished(&mut self, id: Uuid) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            match self.recv().await {
                AgentMessage::Events { events } => {
                    for e in events {
                        assert_eq!(e.command_id, id);
                        let done = matches!(e.body, EventBody::Finished(_));
                        out.push(e);
                        if done {
                            return out;
                        }
                    }
                }
                other => panic!("expected events of {id}, got {other:?}"),
            }
        }
    }

    /// Every event that arrives within `d`.
    async fn events_within(&mut self, d: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + d;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Some(AgentMessage::Events { events }) => out.extend(events),
                Some(AgentMessage::Accept { .. }) => {}
                Some(other) => panic!("unexpected frame {other:?}"),
                None => return out,
            }
        }
    }

    async fn ack(&mut self, id: Uuid, seq: u64) {
        self.send(&ServerMessage::Acks {
            acks: vec![EventAck {
                command_id: id,
                seq,
            }],
        })
        .await;
    }

    async fn error(&mut self, code: ProtocolErrorCode, command_id: Option<Uuid>, seq: Option<u64>) {
        self.send(&ServerMessage::Error(ProtocolError {
            code,
            message: format!("{code:?} from the conformance server"),
            command_id,
            seq,
        }))
        .await;
    }

    /// Sends a fatal error and closes with 1008, as the server does.
    async fn refuse(mut self, code: ProtocolErrorCode) {
        self.error(code, None, None).await;
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "refused".into(),
            }))
            .await;
        // Let the close handshake finish.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await;
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn finished(events: &[Event]) -> Vec<FinalStatus> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Finished(o) => Some(o.status),
            _ => None,
        })
        .collect()
}

struct Setup {
    server: FakeServer,
    agent: Agent,
    _dir: TempDir,
}

async fn setup(tag: &str, env: &[(&str, &str)]) -> Setup {
    let dir = TempDir::new(tag);
    let server = FakeServer::start().await;
    let agent = Agent::start_with(&server.url, TOKEN, &dir.join("agent"), env);
    Setup {
        server,
        agent,
        _dir: dir,
    }
}

fn quick_ping() -> serde_json::Value {
    json!({"progress_events": 3, "log_lines": 3})
}

/// Runs a quick ping to its end on `c`; returns its events.
async fn run_ping(c: &mut Conn, id: Uuid) -> Vec<Event> {
    c.dispatch(id, quick_ping()).await;
    c.expect_accept(id).await;
    let events = c.events_until_finished(id).await;
    assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());
    events
}

#[tokio::test]
async fn hello_comes_first_with_the_required_fields_and_version_range() {
    let mut s = setup("conf-hello", &[]).await;
    // The server only upgrades with the right bearer token on the right path.
    let mut c = s.server.next_conn(WAIT).await;
    let h = c.hello().await;
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
    assert_eq!(h.protocol_version, 2);
    assert_eq!(h.min_protocol_version, Some(MIN_PROTOCOL_VERSION));
    assert_eq!(h.min_protocol_version, Some(1));
    assert!(!h.agent_version.is_empty());
    assert_eq!(h.hostname, "test-agent");
    assert!(h.capabilities.contains(&CommandType::Ping));
    assert!(h.max_concurrency >= 1);
    assert!(h.active_commands.is_empty() && h.interrupted_commands.is_empty());
    // Nothing else before the welcome.
    assert!(
        c.recv_any(Duration::from_millis(700)).await.is_none(),
        "the agent waits for welcome"
    );
    c.welcome(2, 5, &[]).await;
}

#[tokio::test]
async fn welcome_v2_with_inventory_gets_inventory() {
    let (_sim, env) = sim().await;
    let mut s = setup("conf-inv2", &env).await;
    let mut c = s.server.next_conn(WAIT).await;
    c.hello().await;
    c.welcome(2, 5, &[FEATURE_INVENTORY]).await;
    match c.recv().await {
        AgentMessage::Inventory(_) => {}
        other => panic!("expected inventory, got {other:?}"),
    }
}

#[tokio::test]
async fn welcome_v1_is_accepted_and_no_inventory_is_sent() {
    let (_sim, env) = sim().await;
    let mut s = setup("conf-inv1", &env).await;
    let mut c = s.server.next_conn(WAIT).await;
    c.hello().await;
    // Even a (wrong) features list must not make a v1 session send v2 frames.
    c.welcome(1, 5, &[FEATURE_INVENTORY]).await;
    let id = Uuid::new_v4();
    run_ping(&mut c, id).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match c.recv_within(Duration::from_millis(300)).await {
            Some(AgentMessage::Inventory(_)) => panic!("inventory sent on a v1 session"),
            Some(other) => panic!("unexpected frame {other:?}"),
            None => {}
        }
    }
    assert!(
        s.server.conns.try_recv().is_err(),
        "the v1 session was kept"
    );
}

async fn sim() -> (SimProcess, Vec<(&'static str, &'static str)>) {
    let sim = SimProcess::start(bin("pve-sim").to_str().unwrap(), &[])
        .await
        .expect("pve-sim");
    let url: &'static str = Box::leak(sim.url.clone().into_boxed_str());
    (
        sim,
        vec![
            ("PROXMOX_URL", url),
            ("PROXMOX_TOKEN_ID", DEFAULT_TOKEN_ID),
            ("PROXMOX_TOKEN_SECRET", DEFAULT_TOKEN_SECRET),
        ],
    )
}

#[tokio::test]
async fn dispatch_is_accepted_then_events_seq_1_2_3_and_one_finished_last() {
    let mut s = setup("conf-dispatch", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    c.dispatch(
        id,
        json!({"progress_events": 4, "log_lines": 4, "duration_ms": 200}),
    )
    .await;
    c.expect_accept(id).await;
    let events = c.events_until_finished(id).await;
    assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(events.len(), 9, "4 progress, 4 logs, finished");
    assert_eq!(finished(&events), vec![FinalStatus::Succeeded]);
    for e in &events {
        e.validate().unwrap();
    }
    assert!(c.events_within(Duration::from_millis(800)).await.is_empty());
}

#[tokio::test]
async fn a_redispatch_is_accepted_again_but_not_run_twice() {
    let mut s = setup("conf-redispatch", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    let params = json!({"progress_events": 5, "duration_ms": 1000});
    c.dispatch(id, params.clone()).await;
    c.expect_accept(id).await;
    // Again while it runs…
    c.dispatch(id, params.clone()).await;
    let mut accepts = 0;
    let mut events = Vec::new();
    while finished(&events).is_empty() {
        match c.recv().await {
            AgentMessage::Accept { command_id } => {
                assert_eq!(command_id, id);
                accepts += 1;
            }
            AgentMessage::Events { events: e } => events.extend(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(accepts, 1, "the re-sent dispatch is accepted again");
    // …and after it ended.
    c.dispatch(id, params).await;
    c.expect_accept(id).await;
    events.extend(c.events_within(Duration::from_millis(1500)).await);
    assert_eq!(finished(&events).len(), 1, "run once: {:?}", seqs(&events));
    assert_eq!(seqs(&events), (1..=6).collect::<Vec<_>>());
}

#[tokio::test]
async fn every_unacked_event_is_resent_after_a_reconnect_and_a_restart() {
    let mut s = setup("conf-resend", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    let events = run_ping(&mut c, id).await;
    let all = seqs(&events);
    drop(c);
    // Nothing was acked: all of it comes again, and the command is still active.
    let (mut c, hello) = s.server.session().await;
    assert!(hello.active_commands.contains(&id), "{hello:?}");
    let again = c.events_within(Duration::from_secs(2)).await;
    assert_eq!(seqs(&again), all);
    assert_eq!(again, events, "the same events, byte for byte");
    // The outbox is on disk: a restarted agent re-sends them too.
    drop(c);
    s.agent.restart();
    let (mut c, hello) = s.server.session().await;
    assert!(hello.active_commands.contains(&id), "{hello:?}");
    assert_eq!(seqs(&c.events_within(Duration::from_secs(2)).await), all);
}

#[tokio::test]
async fn an_ack_of_a_prefix_drops_only_that_prefix() {
    let mut s = setup("conf-acks", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    let events = run_ping(&mut c, id).await;
    let n = events.len() as u64;
    assert!(n >= 4);
    c.ack(id, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    let (mut c, hello) = s.server.session().await;
    assert!(hello.active_commands.contains(&id));
    assert_eq!(
        seqs(&c.events_within(Duration::from_secs(2)).await),
        (3..=n).collect::<Vec<_>>()
    );
    // Acks for what the agent no longer has change nothing; the full ack ends it.
    c.ack(id, 1).await;
    c.ack(id, n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    let (mut c, hello) = s.server.session().await;
    assert!(!hello.active_commands.contains(&id), "{hello:?}");
    assert!(c.events_within(Duration::from_secs(2)).await.is_empty());
}

#[tokio::test]
async fn cancel_ends_the_command_finished_cancelled() {
    let mut s = setup("conf-cancel", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    c.dispatch(id, json!({"progress_events": 100, "duration_ms": 20_000}))
        .await;
    c.expect_accept(id).await;
    let first = c.recv().await;
    assert!(matches!(first, AgentMessage::Events { .. }), "{first:?}");
    let t = Instant::now();
    c.send(&ServerMessage::Cancel {
        command_id: id,
        reason: CancelReason::Cancelled,
        signature: None,
    })
    .await;
    let rest = c.events_until_finished(id).await;
    assert_eq!(finished(&rest), vec![FinalStatus::Cancelled]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A cancel for a command the agent does not know is ignored.
    c.send(&ServerMessage::Cancel {
        command_id: Uuid::new_v4(),
        reason: CancelReason::Cancelled,
        signature: None,
    })
    .await;
    run_ping(&mut c, Uuid::new_v4()).await;
}

#[tokio::test]
async fn heartbeats_come_at_the_interval_from_welcome() {
    let mut s = setup("conf-heartbeat", &[]).await;
    let mut c = s.server.next_conn(WAIT).await;
    c.hello().await;
    c.welcome(2, 1, &[]).await;
    let mut at = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(4500) {
        match c.recv_any(Duration::from_secs(3)).await {
            Some(AgentMessage::Heartbeat { running }) => {
                assert_eq!(running, 0);
                at.push(Instant::now());
                c.send(&ServerMessage::HeartbeatAck).await;
            }
            other => panic!("expected heartbeats, got {other:?}"),
        }
    }
    assert!(
        (4..=7).contains(&at.len()),
        "{} heartbeats in 4.5 s",
        at.len()
    );
    for w in at.windows(2).skip(1) {
        let gap = w[1] - w[0];
        assert!(
            gap > Duration::from_millis(600) && gap < Duration::from_millis(1600),
            "{gap:?}"
        );
    }
}

#[tokio::test]
async fn invalid_event_is_not_fatal() {
    let mut s = setup("conf-invalid", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    let events = run_ping(&mut c, id).await;
    // The server rejected seq 2, stored a system line in its place and acks everything.
    c.error(ProtocolErrorCode::InvalidEvent, Some(id), Some(2))
        .await;
    c.ack(id, events.len() as u64).await;
    // The same connection goes on.
    let other = Uuid::new_v4();
    let more = run_ping(&mut c, other).await;
    c.ack(other, more.len() as u64).await;
    s.server.no_conn(Duration::from_millis(500)).await;
    drop(c);
    let (mut c, hello) = s.server.session().await;
    assert!(!hello.active_commands.contains(&id));
    assert!(c.events_within(Duration::from_secs(1)).await.is_empty());
    assert!(s.agent.log().contains("rejected an event"));
}

#[tokio::test]
async fn unknown_command_events_are_dropped_not_resent() {
    let mut s = setup("conf-unknown", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    run_ping(&mut c, id).await;
    c.error(ProtocolErrorCode::UnknownCommand, Some(id), None)
        .await;
    // Not fatal: the connection stays.
    let other = Uuid::new_v4();
    let events = run_ping(&mut c, other).await;
    c.ack(other, events.len() as u64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    let (mut c, hello) = s.server.session().await;
    assert!(!hello.active_commands.contains(&id), "{hello:?}");
    assert!(!hello.interrupted_commands.contains(&id), "{hello:?}");
    assert!(c.events_within(Duration::from_secs(2)).await.is_empty());
    // Not from the journal either.
    drop(c);
    s.agent.restart();
    let (mut c, hello) = s.server.session().await;
    assert!(!hello.active_commands.contains(&id) && !hello.interrupted_commands.contains(&id));
    assert!(c.events_within(Duration::from_secs(2)).await.is_empty());
    // And it is still never run twice.
    c.dispatch(id, quick_ping()).await;
    c.expect_accept(id).await;
    assert!(c.events_within(Duration::from_secs(1)).await.is_empty());
}

#[tokio::test]
async fn token_rotated_close_reconnects_with_backoff() {
    let mut s = setup("conf-rotated", &[]).await;
    let mut c = s.server.next_conn(WAIT).await;
    for _ in 0..3 {
        c.hello().await;
        c.welcome(PROTOCOL_VERSION, 5, &[]).await;
        let closed = Instant::now();
        c.refuse(ProtocolErrorCode::TokenRotated).await;
        c = s.server.next_conn(Duration::from_secs(20)).await;
        let gap = c.at - closed;
        assert!(
            gap >= Duration::from_millis(900),
            "reconnected after {gap:?}"
        );
    }
    assert!(s
        .agent
        .log()
        .contains("the token was replaced; configure the new one"));
}

#[tokio::test]
async fn revoked_close_retries_at_the_maximum_backoff() {
    let mut s = setup("conf-revoked", &[]).await;
    let (c, _) = s.server.session().await;
    let closed = Instant::now();
    c.refuse(ProtocolErrorCode::Revoked).await;
    s.server.no_conn(Duration::from_secs(10)).await;
    let next = s.server.next_conn(Duration::from_secs(30)).await;
    let gap = next.at - closed;
    assert!(gap >= Duration::from_secs(14), "reconnected after {gap:?}");
    assert!(s.agent.log().contains("refused this agent"));
}

#[tokio::test]
async fn percent_values_are_within_0_and_100() {
    let mut s = setup("conf-percent", &[]).await;
    let (mut c, _) = s.server.session().await;
    let id = Uuid::new_v4();
    c.dispatch(id, json!({"progress_events": 7})).await;
    c.expect_accept(id).await;
    let events = c.events_until_finished(id).await;
    let percents: Vec<f64> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Progress { percent, .. } => Some(*percent),
            EventBody::Stage { percent, .. } => *percent,
            _ => None,
        })
        .collect();
    assert_eq!(percents.len(), 7);
    assert!(
        percents.iter().all(|p| (0.0..=100.0).contains(p)),
        "{percents:?}"
    );
    assert_eq!(percents.last(), Some(&100.0));
    // Sent as the decimal they stand for (14.29, not 14.285714149475098).
    assert!(percents[0].to_string().len() <= 9, "{percents:?}");
    for e in &events {
        e.validate().unwrap();
    }
}

/// A `ws://` URL on a loopback port nothing listens on (connections are refused).
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("ws://{addr}/api/agents/connect")
}

/// Waits until the agent's log has a line containing every one of `needles`.
async fn log_line(agent: &Agent, needles: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let log = agent.log();
        if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return l.to_string();
        }
        assert!(
            started.elapsed() < WAIT,
            "no log line with {needles:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn several_servers_the_first_dead_the_second_used_and_reconnected_to() {
    let dir = TempDir::new("conf-servers-dead");
    let dead = dead_url();
    let mut live = FakeServer::start().await;
    // Comma-separated in TENDRIL_SERVER_URL; the dead one first.
    let agent = Agent::start(&format!("{dead},{}", live.url), TOKEN, &dir.join("agent"));
    let (mut c, _) = live.session().await;
    let id = Uuid::new_v4();
    let events = run_ping(&mut c, id).await;
    c.ack(id, events.len() as u64).await;
    log_line(&agent, &["cannot connect to control plane", &dead]).await;
    log_line(&agent, &["connected to control plane", &live.url]).await;
    // The live server closes the session: the agent tries the next URL (dead), then this
    // one again, with backoff, and works on.
    drop(c);
    let closed = Instant::now();
    let (mut c, hello) = live.session().await;
    assert!(hello.active_commands.is_empty(), "{hello:?}");
    assert!(
        closed.elapsed() >= Duration::from_millis(100),
        "reconnected without a backoff"
    );
    let dead_tries = agent
        .log()
        .lines()
        .filter(|l| l.contains("cannot connect to control plane") && l.contains(&dead))
        .count();
    assert!(dead_tries >= 2, "the dead URL was tried again in turn");
    run_ping(&mut c, Uuid::new_v4()).await;
}

#[tokio::test]
async fn several_servers_are_tried_in_turn_and_a_stopped_one_is_skipped() {
    let dir = TempDir::new("conf-servers-turn");
    let mut a = FakeServer::start().await;
    let mut b = FakeServer::start().await;
    let agent = Agent::start(&format!("{},{}", a.url, b.url), TOKEN, &dir.join("agent"));
    let (mut ca, _) = a.session().await;
    let id = Uuid::new_v4();
    let events = run_ping(&mut ca, id).await;
    // Lost before the acks: the events go to whichever server comes next.
    drop(ca);
    let (mut cb, hello) = b.session().await;
    assert!(hello.active_commands.contains(&id), "{hello:?}");
    assert_eq!(cb.events_within(Duration::from_secs(2)).await, events);
    cb.ack(id, events.len() as u64).await;
    log_line(&agent, &["connected to control plane", &b.url]).await;
    // The next turn is A again, then B.
    drop(cb);
    let (ca, _) = a.session().await;
    drop(ca);
    let (cb, _) = b.session().await;
    // A goes away: when B drops the agent, A's turn fails and B takes it back.
    a.stop().await;
    drop(cb);
    // Four short sessions and a refused connect in a row: the backoff has grown (up to
    // 4 s, then up to 8 s).
    let mut cb = b.next_conn(Duration::from_secs(30)).await;
    cb.hello().await;
    cb.welcome(PROTOCOL_VERSION, 5, &[]).await;
    log_line(&agent, &["cannot connect to control plane", &a.url]).await;
    run_ping(&mut cb, Uuid::new_v4()).await;
}
