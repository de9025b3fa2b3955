//! Signed dispatch: trellis signs every `dispatch` and `cancel` with its Ed25519 key
//! (`<data dir>/signing.key`, 0600, or `TRELLIS_SIGNING_KEY`); the real `tendril` pins the
//! key (trust on first use into `<work dir>/server-keys`, 0600, or `--server-public-key`)
//! and then refuses anything unsigned, tampered with, meant for another agent or signed by
//! another key with `signature_invalid`, running nothing. Key rotation: a changed server
//! key is refused until the agent is re-pinned; pinning old and new key together carries
//! an agent across the switch.
//!
//! The real control plane covers the key file, pinning and rotation; a scripted control
//! plane (a bare WebSocket server) sends the frames trellis never would: tampered,
//! unsigned, for another agent, signed by a stranger.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use trellis_protocol::signing::SigningKey;
use trellis_protocol::{
    AgentMessage, CancelReason, Dispatch, Event, EventBody, FinalStatus, Outcome,
    ProtocolErrorCode, ServerMessage, FEATURE_INVENTORY, FEATURE_SIGNED_DISPATCH, PROTOCOL_VERSION,
};
use trellis_tests::harness::*;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The base64 public keys pinned in an agent's work dir.
fn pinned(work: &Path) -> Vec<String> {
    std::fs::read_to_string(work.join("server-keys"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("key "))
        .map(str::to_string)
        .collect()
}

/// Waits until the agent's pin file holds `expected`: right after an agent is replaced, the
/// control plane may still list the killed one's session as online, so "online" alone does
/// not say the new agent has started (and written its pins) yet.
async fn wait_pinned(work: &Path, expected: &[String]) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pinned(work) != expected && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(pinned(work), expected);
}

async fn ping(api: &Api, agent: &str) -> Value {
    let id = api
        .command(agent, "ping", json!({"progress_events": 2}))
        .await;
    api.wait_done(&id, WAIT).await
}

fn assert_refused(c: &Value) {
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "signature_invalid", "{c}");
    // Only the `finished` event: the ping's progress events never happened.
    assert_eq!(c["lastSeq"], 1, "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_refusal_and_rotation_against_the_real_control_plane() {
    let (dir, mut cp, api) = control_plane(Backend::Sqlite, "signed").await;
    // The key file: generated on first start, owner-only.
    let key_file = dir.join("signing.key");
    assert_eq!(mode(&key_file), 0o600);
    let key_a = SigningKey::from_base64(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert!(
        cp.log().contains(&key_a.public_key_base64()),
        "the public key is logged for --server-public-key"
    );
    assert!(!cp
        .log()
        .contains(std::fs::read_to_string(&key_file).unwrap().trim()));

    // Registration hands out the public key with the one-time token.
    let created = api.post("/api/agents", json!({"name": "signed"})).await;
    assert_eq!(
        created["serverPublicKey"],
        key_a.public_key_base64(),
        "{created}"
    );
    let agent_id = created["agent"]["id"].as_str().unwrap().to_string();
    let token = created["token"].as_str().unwrap().to_string();
    let work = dir.join("work");
    let mut agent = Agent::start(&cp.ws_url(), &token, &work);
    api.wait_agent_online(&agent_id).await;

    // Trust on first use: signed commands run, the key is pinned in a 0600 file.
    let c = ping(&api, &agent_id).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(pinned(&work), vec![key_a.public_key_base64()]);
    assert_eq!(mode(&work.join("server-keys")), 0o600);
    assert!(agent.log().contains("trust on first use"));

    // The server's key changes (a stolen database without the key, a replaced server, or
    // a rotation nobody told the agent about): every command is refused, nothing runs.
    let (key_b, der_b) = SigningKey::generate().unwrap();
    let b64_b = SigningKey::pkcs8_to_base64(&der_b);
    cp.restart_with(&[("TRELLIS_SIGNING_KEY", &b64_b)]).await;
    api.wait_agent_online(&agent_id).await;
    assert_refused(&ping(&api, &agent_id).await);
    assert_eq!(
        pinned(&work),
        vec![key_a.public_key_base64()],
        "not re-pinned"
    );
    assert!(agent.log().contains("has not pinned"), "{}", agent.log());

    // Rotation, step 1: the agent pins old and new key (re-pinning replaces the file).
    let both = format!(
        "{},{}",
        key_a.public_key_base64(),
        key_b.public_key_base64()
    );
    agent.kill();
    let mut agent = Agent::start_with(
        &cp.ws_url(),
        &token,
        &work,
        &[("TENDRIL_SERVER_PUBLIC_KEY", &both)],
    );
    wait_pinned(
        &work,
        &[key_a.public_key_base64(), key_b.public_key_base64()],
    )
    .await;
    api.wait_agent_online(&agent_id).await;
    let c = ping(&api, &agent_id).await;
    assert_eq!(c["status"], "succeeded", "new key: {c}");
    // ... both keys are accepted during the transition (back on the old key) ...
    // (the environment overrode the key file, which still holds key A)
    cp.restart_with(&[]).await;
    api.wait_agent_online(&agent_id).await;
    let c = ping(&api, &agent_id).await;
    assert_eq!(
        c["status"], "succeeded",
        "old key during the transition: {c}"
    );

    // Step 2: only the new key is pinned; the file is kept across restarts without the flag.
    agent.kill();
    let mut agent = Agent::start_with(
        &cp.ws_url(),
        &token,
        &work,
        &[("TENDRIL_SERVER_PUBLIC_KEY", &key_b.public_key_base64())],
    );
    wait_pinned(&work, &[key_b.public_key_base64()]).await;
    api.wait_agent_online(&agent_id).await;
    assert_refused(&ping(&api, &agent_id).await);
    agent.kill();
    let _agent = Agent::start(&cp.ws_url(), &token, &work);
    cp.restart_with(&[("TRELLIS_SIGNING_KEY", &b64_b)]).await;
    api.wait_agent_online(&agent_id).await;
    let c = ping(&api, &agent_id).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(pinned(&work), vec![key_b.public_key_base64()]);
}

/// Commands are signed when they are stored and sent with that signature: a row altered
/// in the database afterwards (by someone who can write it but has no signing key) is
/// refused by the agent, a row without a signature is never sent, neither is copied into
/// a retry — nothing signs a row read back from the database, not even at a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_altered_in_the_database_is_refused_by_the_agent() {
    use sqlx::Connection;
    let (dir, mut cp, api) = control_plane(Backend::Sqlite, "tamper").await;
    let (agent_id, token) = api.create_agent("tamper").await;
    let work = dir.join("work");
    let mut agent = Agent::start(&cp.ws_url(), &token, &work);
    api.wait_agent_online(&agent_id).await;
    assert_eq!(ping(&api, &agent_id).await["status"], "succeeded");
    assert_eq!(pinned(&work).len(), 1, "the key is pinned");

    // Commands queued while the agent is away, then altered in the database.
    agent.kill();
    api.wait_until(WAIT, || async {
        api.get(&format!("/api/agents/{agent_id}")).await["status"] == "offline"
    })
    .await;
    let tampered = api
        .command(&agent_id, "ping", json!({"progress_events": 2}))
        .await;
    let unsigned = api
        .command(&agent_id, "ping", json!({"progress_events": 2}))
        .await;
    let honest = api
        .command(&agent_id, "ping", json!({"progress_events": 2}))
        .await;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&cp.db_url).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT signature FROM commands WHERE id = $1")
        .bind(&honest)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let key = SigningKey::from_base64(&std::fs::read_to_string(dir.join("signing.key")).unwrap())
        .unwrap();
    assert!(
        stored.starts_with(&format!("{}:", key.key_id())),
        "signed by the server key at creation: {stored}"
    );
    sqlx::query("UPDATE commands SET params = $1 WHERE id = $2")
        .bind(json!({"progress_events": 5}).to_string())
        .bind(&tampered)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE commands SET signature = NULL WHERE id = $1")
        .bind(&unsigned)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let _agent = Agent::start(&cp.ws_url(), &token, &work);
    api.wait_agent_online(&agent_id).await;
    // The altered row reached the agent, which refused it: nothing ran.
    assert_refused(&api.wait_done(&tampered, WAIT).await);
    // The unsigned row was never sent.
    let c = api.wait_done(&unsigned, WAIT).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "unsigned", "{c}");
    assert_eq!(c["lastSeq"], 0, "never dispatched: {c}");
    assert!(c["startedAt"].is_null(), "never started: {c}");
    // The untouched one ran.
    assert_eq!(api.wait_done(&honest, WAIT).await["status"], "succeeded");

    // Neither altered row is copied into a retry (a retry is signed anew).
    for id in [&tampered, &unsigned] {
        let (status, body) = api
            .call(
                reqwest::Method::POST,
                &format!("/api/commands/{id}/retry"),
                None,
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "signature_invalid", "{body}");
    }

    // Nothing signs a row read back from the database, not even at a restart (a row an
    // earlier version stored unsigned looks the same as one emptied by an attacker): its
    // retry stays refused, and the agent still runs only what was signed at creation.
    let before = api
        .command(&agent_id, "ping", json!({"fail_with": "for a retry"}))
        .await;
    assert_eq!(api.wait_done(&before, WAIT).await["status"], "failed");
    let mut conn = sqlx::AnyConnection::connect(&cp.db_url).await.unwrap();
    sqlx::query("UPDATE commands SET signature = NULL WHERE id = $1")
        .bind(&before)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    cp.restart_with(&[]).await;
    api.wait_agent_online(&agent_id).await;
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{before}/retry"),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "signature_invalid", "{body}");
    assert_eq!(ping(&api, &agent_id).await["status"], "succeeded");
}

// ---------------------------------------------------------------------------------------
// A scripted control plane.

const TOKEN: &str = "signed-dispatch-token-0123456789";

struct FakeServer {
    url: String,
    conns: mpsc::UnboundedReceiver<WebSocketStream<TcpStream>>,
}

impl FakeServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/api/agents/connect", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    let _ = tx.send(ws);
                }
            }
        });
        Self { url, conns }
    }

    /// The next connection after its hello, welcomed as `agent_id` (advertising `key`).
    async fn session(&mut self, agent_id: Uuid, key: Option<&SigningKey>) -> Conn {
        let ws = tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("the agent connects")
            .unwrap();
        let mut c = Conn { ws };
        match c.recv().await {
            AgentMessage::Hello(_) => {}
            other => panic!("expected hello, got {other:?}"),
        }
        let mut features = vec![FEATURE_INVENTORY.to_string()];
        if key.is_some() {
            features.push(FEATURE_SIGNED_DISPATCH.to_string());
        }
        c.send_text(
            ServerMessage::Welcome {
                protocol_version: PROTOCOL_VERSION,
                agent_id,
                session_id: Uuid::new_v4(),
                heartbeat_interval_secs: 5,
                features,
                inventory_interval_secs: None,
                signing_key: key.map(SigningKey::advertised),
            }
            .encode(),
        )
        .await;
        c
    }
}

struct Conn {
    ws: WebSocketStream<TcpStream>,
}

fn wall_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn ping_dispatch(id: Uuid, params: Value) -> ServerMessage {
    ServerMessage::Dispatch(Dispatch {
        command_id: id,
        command_type: "ping".into(),
        params,
        deadline_ms: None,
        attempt: 1,
        root_command_id: None,
        signature: None,
        terraform_state: None,
    })
}

impl Conn {
    async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next frame that is not a heartbeat or inventory.
    async fn recv(&mut self) -> AgentMessage {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame from the agent")
                .expect("connection open")
                .expect("frame");
            if let Message::Text(t) = msg {
                match AgentMessage::decode(&t).expect("decodes") {
                    AgentMessage::Heartbeat { .. } => {
                        self.send_text(ServerMessage::HeartbeatAck.encode()).await
                    }
                    AgentMessage::Inventory(_) => {}
                    other => return other,
                }
            }
        }
    }

    /// A signed dispatch of `ping` with `params`, as the frame text.
    fn signed(&self, key: &SigningKey, id: Uuid, params: Value, for_agent: Uuid) -> String {
        let mut msg = ping_dispatch(id, params);
        key.sign(for_agent, &mut msg);
        msg.encode()
    }

    /// Accept and events of `id` up to its `finished`, acked as they come.
    async fn run(&mut self, id: Uuid) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match self.recv().await {
                AgentMessage::Accept { command_id } => assert_eq!(command_id, id),
                AgentMessage::Events { events: batch } => {
                    let last = batch.last().map(|e| e.seq).unwrap_or(0);
                    let done = batch
                        .iter()
                        .any(|e| matches!(e.body, EventBody::Finished(_)));
                    for e in &batch {
                        assert_eq!(e.command_id, id, "{e:?}");
                    }
                    events.extend(batch);
                    self.send_text(
                        ServerMessage::Acks {
                            acks: vec![trellis_protocol::EventAck {
                                command_id: id,
                                seq: last,
                            }],
                        }
                        .encode(),
                    )
                    .await;
                    if done {
                        return events;
                    }
                }
                other => panic!("expected accept/events of {id}, got {other:?}"),
            }
        }
    }
}

fn outcome(events: &[Event]) -> &Outcome {
    match &events.last().expect("events").body {
        EventBody::Finished(o) => o,
        other => panic!("last event is not finished: {other:?}"),
    }
}

fn assert_refused_events(events: &[Event], why: &str) {
    assert_eq!(
        events.len(),
        1,
        "{why}: only the finished event, nothing ran: {events:?}"
    );
    let o = outcome(events);
    assert_eq!(o.status, FinalStatus::Failed, "{why}");
    let e = o.error.as_ref().expect("error");
    assert_eq!(e.code, "signature_invalid", "{why}: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_agent_refuses_tampered_unsigned_misaddressed_and_foreign_frames() {
    let dir = TempDir::new("signed-fake");
    let work = dir.join("work");
    let mut server = FakeServer::start().await;
    let key = SigningKey::generate().unwrap().0;
    let stranger = SigningKey::generate().unwrap().0;
    let agent_id = Uuid::new_v4();
    let _agent = Agent::start(&server.url, TOKEN, &work);
    let mut c = server.session(agent_id, Some(&key)).await;

    // A signed command runs (trust on first use pinned the key, 0600).
    let id = Uuid::new_v4();
    c.send_text(c.signed(&key, id, json!({"progress_events": 2}), agent_id))
        .await;
    let events = c.run(id).await;
    assert_eq!(outcome(&events).status, FinalStatus::Succeeded);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(pinned(&work), vec![key.public_key_base64()]);
    assert_eq!(mode(&work.join("server-keys")), 0o600);

    // One params byte changed after signing.
    let id = Uuid::new_v4();
    let frame = c.signed(
        &key,
        id,
        json!({"progress_events": 1, "fail_with": null}),
        agent_id,
    );
    let tampered = frame.replace("\"progress_events\":1", "\"progress_events\":2");
    assert_ne!(frame, tampered);
    c.send_text(tampered).await;
    assert_refused_events(&c.run(id).await, "tampered params");

    // Properly signed but long expired: an old frame replayed (a finished row set back to
    // `queued` is re-sent with its valid signature); the agent runs nothing.
    let id = Uuid::new_v4();
    let mut msg = ping_dispatch(id, json!({"progress_events": 2}));
    if let ServerMessage::Dispatch(d) = &mut msg {
        d.deadline_ms = Some(wall_now_ms() - 3_600_000);
    }
    key.sign(agent_id, &mut msg);
    c.send_text(msg.encode()).await;
    let events = c.run(id).await;
    assert_eq!(events.len(), 1, "nothing ran: {events:?}");
    let e = outcome(&events).error.as_ref().expect("error");
    assert_eq!(e.code, "deadline_passed", "{e:?}");

    // Unsigned.
    let id = Uuid::new_v4();
    c.send_text(ping_dispatch(id, json!({"progress_events": 2})).encode())
        .await;
    assert_refused_events(&c.run(id).await, "unsigned");

    // Signed for another agent (replayed from another agent's session).
    let id = Uuid::new_v4();
    c.send_text(c.signed(&key, id, json!({"progress_events": 2}), Uuid::new_v4()))
        .await;
    assert_refused_events(&c.run(id).await, "another agent");

    // Signed by another key.
    let id = Uuid::new_v4();
    c.send_text(c.signed(&stranger, id, json!({"progress_events": 2}), agent_id))
        .await;
    assert_refused_events(&c.run(id).await, "another key");

    // An unsigned cancel is ignored (signature_invalid error) and the command goes on; a
    // signed one stops it.
    let id = Uuid::new_v4();
    c.send_text(c.signed(
        &key,
        id,
        json!({"duration_ms": 3000, "progress_events": 3}),
        agent_id,
    ))
    .await;
    match c.recv().await {
        AgentMessage::Accept { command_id } => assert_eq!(command_id, id),
        other => panic!("{other:?}"),
    }
    c.send_text(
        ServerMessage::Cancel {
            command_id: id,
            reason: CancelReason::Cancelled,
            signature: None,
        }
        .encode(),
    )
    .await;
    let mut events = Vec::new();
    loop {
        match c.recv().await {
            AgentMessage::Error(e) => {
                assert_eq!(e.code, ProtocolErrorCode::SignatureInvalid, "{e:?}");
                assert_eq!(e.command_id, Some(id));
                break;
            }
            AgentMessage::Events { events: b } => events.extend(b),
            other => panic!("{other:?}"),
        }
    }
    // It goes on running.
    while !events
        .iter()
        .any(|e| matches!(e.body, EventBody::Progress { .. }))
    {
        match c.recv().await {
            AgentMessage::Events { events: b } => events.extend(b),
            other => panic!("{other:?}"),
        }
    }
    let mut cancel = ServerMessage::Cancel {
        command_id: id,
        reason: CancelReason::Cancelled,
        signature: None,
    };
    key.sign(agent_id, &mut cancel);
    c.send_text(cancel.encode()).await;
    let rest = c.run(id).await;
    events.extend(rest);
    assert_eq!(
        outcome(&events).status,
        FinalStatus::Cancelled,
        "{events:?}"
    );
    let progress = events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Progress { .. }))
        .count();
    assert!(
        progress >= 1,
        "it kept running after the unsigned cancel: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_given_at_registration_is_pinned_before_the_first_connection() {
    let dir = TempDir::new("signed-flag");
    let work = dir.join("work");
    let mut server = FakeServer::start().await;
    let key = SigningKey::generate().unwrap().0;
    let impostor = SigningKey::generate().unwrap().0;
    let agent_id = Uuid::new_v4();
    let _agent = Agent::start_with(
        &server.url,
        TOKEN,
        &work,
        &[("TENDRIL_SERVER_PUBLIC_KEY", &key.public_key_base64())],
    );
    // An impostor (first to answer) advertises its own key: not trusted, its commands are
    // refused and nothing is re-pinned.
    let mut c = server.session(agent_id, Some(&impostor)).await;
    let id = Uuid::new_v4();
    c.send_text(c.signed(&impostor, id, json!({"progress_events": 2}), agent_id))
        .await;
    assert_refused_events(&c.run(id).await, "impostor");
    // Even a server that does not say it signs gets nothing run.
    let id = Uuid::new_v4();
    c.send_text(ping_dispatch(id, json!({})).encode()).await;
    assert_refused_events(&c.run(id).await, "unsigned");
    assert_eq!(pinned(&work), vec![key.public_key_base64()]);
    assert_eq!(mode(&work.join("server-keys")), 0o600);
    // The real key works.
    let id = Uuid::new_v4();
    c.send_text(c.signed(&key, id, json!({}), agent_id)).await;
    assert_eq!(outcome(&c.run(id).await).status, FinalStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_nothing_pinned_still_serves_a_server_that_does_not_sign() {
    let dir = TempDir::new("signed-old");
    let work = dir.join("work");
    let mut server = FakeServer::start().await;
    let _agent = Agent::start(&server.url, TOKEN, &work);
    let mut c = server.session(Uuid::new_v4(), None).await;
    let id = Uuid::new_v4();
    c.send_text(ping_dispatch(id, json!({"progress_events": 1})).encode())
        .await;
    assert_eq!(outcome(&c.run(id).await).status, FinalStatus::Succeeded);
    assert!(!work.join("server-keys").exists());
}
