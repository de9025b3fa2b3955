//! End-to-end tests of the broker core with the real `trellis` and `tendril` binaries over
//! real WebSockets, on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;

async fn setup(backend: Backend, name: &str) -> (std::path::PathBuf, ControlPlane, Api) {
    let dir = scratch(name);
    let db = database(backend, &dir).await;
    let cp = ControlPlane::start(&db, &dir).await;
    let api = cp.api();
    (dir, cp, api)
}

/// Log lines must be present exactly once, in order, with strictly increasing seqs.
fn assert_lines_once(logs: &[Value], expected: usize) {
    let seqs: Vec<i64> = logs.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs not increasing: {seqs:?}"
    );
    let lines: Vec<String> = logs
        .iter()
        .map(|l| l["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        lines.len(),
        expected,
        "expected {expected} log lines, got {}",
        lines.len()
    );
    for (i, l) in lines.iter().enumerate() {
        assert!(
            l.starts_with(&format!("line {:08} ", i + 1)),
            "line {i} out of order or doubled: {l:?}"
        );
    }
}

async fn ping_round_trip(backend: Backend) {
    let (dir, cp, api) = setup(backend, "ping").await;
    let (id, token) = api.create_agent("agent-1").await;
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let a = api.get(&format!("/api/agents/{id}")).await;
    assert_eq!(a["hostname"], "test-agent");
    assert!(a["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("ping")));

    let started = Instant::now();
    let cid = api.command(&id, "ping", json!({})).await;
    let c = api.wait_done(&cid, Duration::from_secs(20)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["result"]["pong"], true);
    assert_eq!(c["result"]["hostname"], "test-agent");
    assert!(c["startedAt"].is_string() && c["finishedAt"].is_string());
    assert!(started.elapsed() < Duration::from_secs(5));

    // streaming ping: progress and logs stored in order, percent reaches 100
    let cid = api
        .command(
            &id,
            "ping",
            json!({"progress_events": 5, "log_lines": 20, "duration_ms": 200}),
        )
        .await;
    let c = api.wait_done(&cid, Duration::from_secs(20)).await;
    assert_eq!(c["status"], "succeeded");
    assert_eq!(c["percent"], 100.0);
    assert_lines_once(&api.all_logs(&cid).await, 20);

    // metrics reflect it
    let m = reqwest::get(cp.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("trellis_agents_online 1"), "{m}");
    assert!(
        m.contains("trellis_commands{status=\"succeeded\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("trellis_dispatch_latency_seconds_count 2"),
        "{m}"
    );
}
on_both_backends!(ping, ping_round_trip);

async fn queued_while_offline(backend: Backend) {
    let (dir, cp, api) = setup(backend, "offline").await;
    let (id, token) = api.create_agent("late-agent").await;
    let cid = api.command(&id, "ping", json!({"log_lines": 3})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = api.get(&format!("/api/commands/{cid}")).await;
    assert_eq!(c["status"], "queued", "{c}");
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    let c = api.wait_done(&cid, Duration::from_secs(20)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_lines_once(&api.all_logs(&cid).await, 3);
}
on_both_backends!(offline_queue, queued_while_offline);

async fn agent_killed_mid_command(backend: Backend) {
    let (dir, cp, api) = setup(backend, "agentkill").await;
    let (id, token) = api.create_agent("crashy").await;
    let mut agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command(&id, "ping", json!({"log_lines": 60, "duration_ms": 6000}))
        .await;
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/commands/{cid}")).await["lastSeq"]
            .as_i64()
            .unwrap_or(0)
            >= 5
    })
    .await;
    agent.kill();
    agent.restart();
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "agent_lost_command");
    assert_eq!(c["error"]["retryable"], true);
    let logs = api.all_logs(&cid).await;
    let n = logs.len();
    assert!(n >= 5, "events before the kill are kept");
    assert_lines_once(&logs, n);
    // the restarted agent keeps working
    api.wait_agent_online(&id).await;
    let again = api.command(&id, "ping", json!({})).await;
    assert_eq!(
        api.wait_done(&again, Duration::from_secs(20)).await["status"],
        "succeeded"
    );
}
on_both_backends!(agent_sigkill, agent_killed_mid_command);

async fn control_plane_restart_loses_nothing(backend: Backend) {
    restart_mid_stream(backend, false).await;
}
on_both_backends!(trellis_restart, control_plane_restart_loses_nothing);

async fn control_plane_sigterm_is_prompt_and_loses_nothing(backend: Backend) {
    restart_mid_stream(backend, true).await;
}
on_both_backends!(
    trellis_sigterm,
    control_plane_sigterm_is_prompt_and_loses_nothing
);

async fn restart_mid_stream(backend: Backend, graceful: bool) {
    let (dir, mut cp, api) = setup(backend, "cprestart").await;
    let (id, token) = api.create_agent("steady").await;
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command(&id, "ping", json!({"log_lines": 150, "duration_ms": 4500}))
        .await;
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/commands/{cid}")).await["lastSeq"]
            .as_i64()
            .unwrap_or(0)
            >= 20
    })
    .await;
    if graceful {
        // SIGTERM: sessions close, the writer drains what they sent, and it is quick
        let (status, took) = cp.terminate();
        assert!(status.success(), "trellis exits 0 on SIGTERM: {status:?}");
        assert!(took < Duration::from_secs(5), "graceful stop took {took:?}");
    } else {
        cp.kill();
    }
    // events keep being produced (and journaled) while the control plane is down
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cp.restart().await;
    let api = cp.api();
    let c = api.wait_done(&cid, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_lines_once(&api.all_logs(&cid).await, 150);
    assert_eq!(c["lastSeq"], 151, "150 logs + finished");
}

async fn deadline_times_out(backend: Backend) {
    let (dir, cp, api) = setup(backend, "deadline").await;
    let (id, token) = api.create_agent("slow").await;
    let agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command_with(json!({"agentId": id, "type": "ping", "params": {"duration_ms": 20000}, "timeoutSecs": 1}))
        .await;
    let c = api.wait_done(&cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "timed_out", "{c}");
    assert_eq!(c["error"]["code"], "timed_out");
    // the agent was told to cancel: its own final event arrives and does not change the status
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/commands/{cid}")).await["lastSeq"]
            .as_i64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    // ...and it says the command was stopped for its deadline (told by the server, or by
    // its own copy of the deadline, whichever came first)
    let sse = reqwest::Client::new()
        .get(cp.url(&format!("/api/commands/{cid}/events")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let finished = sse
        .split("\n\n")
        .find(|b| b.contains("event: finished"))
        .unwrap_or_else(|| panic!("no finished event: {sse}\n{}", agent.log()));
    assert!(finished.contains(r#""status":"timed_out""#), "{finished}");
    let c = api.get(&format!("/api/commands/{cid}")).await;
    assert_eq!(c["status"], "timed_out");
    // a queued command for an offline agent also times out
    let (other, _) = api.create_agent("never-online").await;
    let q = api
        .command_with(json!({"agentId": other, "type": "ping", "params": {}, "timeoutSecs": 1}))
        .await;
    assert_eq!(
        api.wait_done(&q, Duration::from_secs(10)).await["status"],
        "timed_out"
    );
}
on_both_backends!(deadline, deadline_times_out);

async fn cancel_retry_idempotency(backend: Backend) {
    let (dir, cp, api) = setup(backend, "cancel").await;
    let (id, token) = api.create_agent("worker").await;
    // cancel while queued
    let q = api.command(&id, "ping", json!({})).await;
    let (s, c) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{q}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, 202);
    assert_eq!(c["status"], "cancelled");
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    // cancel while running
    let r = api
        .command(&id, "ping", json!({"log_lines": 100, "duration_ms": 10000}))
        .await;
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/commands/{r}")).await["status"] == "running"
    })
    .await;
    api.post(&format!("/api/commands/{r}/cancel"), json!({}))
        .await;
    let c = api.wait_done(&r, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "cancelled", "{c}");
    // retry is a new attempt linked to the first
    let v = api
        .post(&format!("/api/commands/{r}/retry"), json!({}))
        .await;
    let r2 = v["commandId"].as_str().unwrap().to_string();
    assert_ne!(r2, r);
    let c2 = api.get(&format!("/api/commands/{r2}")).await;
    assert_eq!(c2["retryOf"], json!(r));
    assert_eq!(c2["rootCommandId"], json!(r));
    assert_eq!(c2["attempt"], 2);
    api.post(&format!("/api/commands/{r2}/cancel"), json!({}))
        .await;
    // a succeeded command cannot be retried
    let ok = api.command(&id, "ping", json!({})).await;
    api.wait_done(&ok, Duration::from_secs(10)).await;
    let (s, e) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{ok}/retry"),
            None,
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(e["error"]["code"], "not_retryable");
    // idempotency key
    let body = json!({"agentId": id, "type": "ping", "params": {}, "idempotencyKey": "deploy-42"});
    let a = api.command_with(body.clone()).await;
    let b = api.command_with(body).await;
    assert_eq!(a, b);
    // ...but the same key for a different request is a conflict, not a silent match
    let (s, e) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": id, "type": "ping", "params": {"log_lines": 1}, "idempotencyKey": "deploy-42"})),
        )
        .await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "idempotency_conflict");
    // params that could not fit in a protocol frame are refused up front
    let (s, e) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": id, "type": "terraform_apply", "params": {
                "template_source": {"repo": "/x", "version": "v1"},
                "terraform_vars": {"blob": "x".repeat(600 * 1024)}}})),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["code"], "params_too_large");
    // invalid params are a 400 with the reason, and nothing is stored
    let (s, e) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": id, "type": "ping", "params": {"nope": 1}})),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["code"], "invalid_params");
    let (s, e) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": id, "type": "format_disk"})),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["code"], "unsupported_command");
    let (s, _) = api
        .call(reqwest::Method::GET, "/api/commands/not-a-uuid", None)
        .await;
    assert_eq!(s, 404);
}
on_both_backends!(cancel_retry, cancel_retry_idempotency);

/// Opens a raw agent WebSocket with a token and says hello.
async fn raw_agent(
    cp: &ControlPlane,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = cp.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"type": "hello", "protocol_version": 1, "agent_version": "raw", "hostname": "raw",
               "capabilities": ["ping"], "max_concurrency": 1})
        .to_string(),
    ))
    .await
    .unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("welcome"),
        "{welcome:?}"
    );
    ws
}

/// Reads frames until the server closes; returns the texts and the close code.
async fn read_until_close(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (Vec<String>, Option<u16>) {
    let mut texts = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => texts.push(t.to_string()),
            Ok(Some(Ok(Message::Close(f)))) => return (texts, f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => return (texts, None),
            Err(_) => panic!("server did not close the connection"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_isolation() {
    let (dir, cp, api) = setup(Backend::Sqlite, "auth").await;
    let (a_id, a_token) = api.create_agent("alpha").await;
    let (b_id, b_token) = api.create_agent("beta").await;
    // the token is never returned again
    let listed = api.get("/api/agents").await.to_string();
    assert!(
        !listed.contains(&a_token) && !listed.contains("token"),
        "{listed}"
    );
    // an agent token is useless on the admin API
    let agent_api = Api {
        token: a_token.clone(),
        ..api.clone()
    };
    for path in [
        "/api/agents",
        "/api/commands",
        &format!("/api/agents/{a_id}"),
    ] {
        let (s, e) = agent_api.call(reqwest::Method::GET, path, None).await;
        assert_eq!(s, 401, "{path}");
        assert_eq!(e["error"]["code"], "unauthorized");
    }
    let (s, _) = Api {
        token: String::new(),
        ..api.clone()
    }
    .call(reqwest::Method::GET, "/api/agents", None)
    .await;
    assert_eq!(s, 401);
    // a bad agent token cannot connect
    let mut req = cp.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer trl_agent_bogus".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());

    // agent alpha cannot write events into beta's command
    let b_cmd = api.command(&b_id, "ping", json!({})).await;
    let mut ws = raw_agent(&cp, &a_token).await;
    ws.send(Message::text(
        json!({"type": "events", "events": [{"command_id": b_cmd, "seq": 1, "ts": 0, "kind": "log",
               "stream": "stdout", "data": "forged"}]})
        .to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!({"type": "accept", "command_id": b_cmd}).to_string(),
    ))
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        reply.to_text().unwrap().contains("does not belong"),
        "{reply:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = api.get(&format!("/api/commands/{b_cmd}")).await;
    assert_eq!(c["status"], "queued", "{c}");
    assert!(api.all_logs(&b_cmd).await.is_empty());
    drop(ws);

    // rotate: the old token stops working, the new one works
    let v = api
        .post(&format!("/api/agents/{b_id}/rotate-token"), json!({}))
        .await;
    let new_token = v["token"].as_str().unwrap();
    let mut req = cp.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {b_token}").parse().unwrap(),
    );
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    let _b = Agent::start(&cp.ws_url(), new_token, &dir.join("b"));
    assert_eq!(
        api.wait_done(&b_cmd, Duration::from_secs(20)).await["status"],
        "succeeded"
    );

    // revoke disconnects at once
    let mut ws = raw_agent(&cp, &a_token).await;
    let started = Instant::now();
    let (s, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/agents/{a_id}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (texts, code) = read_until_close(&mut ws).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(texts.iter().any(|t| t.contains("revoked")), "{texts:?}");
    assert_eq!(code, Some(1008));
    let (s, _) = api
        .call(reqwest::Method::GET, &format!("/api/agents/{a_id}"), None)
        .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_rejected_and_server_keeps_serving() {
    let (dir, cp, api) = setup(Backend::Sqlite, "frames").await;
    let (id, token) = api.create_agent("good").await;
    let (_bad_id, bad_token) = api.create_agent("bad").await;
    let _good = Agent::start(&cp.ws_url(), &token, &dir.join("good"));
    api.wait_agent_online(&id).await;

    // malformed JSON after hello
    let mut ws = raw_agent(&cp, &bad_token).await;
    ws.send(Message::text("{this is not json")).await.unwrap();
    let (texts, code) = read_until_close(&mut ws).await;
    assert!(
        texts.iter().any(|t| t.contains("malformed_message")),
        "{texts:?}"
    );
    assert_eq!(code, Some(1002));

    // unknown message type
    let mut ws = raw_agent(&cp, &bad_token).await;
    ws.send(Message::text(r#"{"type":"format_everything"}"#))
        .await
        .unwrap();
    let (texts, _) = read_until_close(&mut ws).await;
    assert!(
        texts.iter().any(|t| t.contains("malformed_message")),
        "{texts:?}"
    );

    // oversized frame (2 MiB > 1 MiB limit)
    let mut ws = raw_agent(&cp, &bad_token).await;
    let big = format!(
        r#"{{"type":"heartbeat","pad":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let _ = ws.send(Message::text(big)).await;
    let (_, code) = read_until_close(&mut ws).await;
    assert!(code.is_none() || code == Some(1009), "closed with {code:?}");

    // wrong first message and wrong protocol version
    let mut req = cp.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {bad_token}").parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(
        json!({"type": "hello", "protocol_version": 99, "agent_version": "x", "hostname": "x"})
            .to_string(),
    ))
    .await
    .unwrap();
    let (texts, _) = read_until_close(&mut ws).await;
    assert!(
        texts
            .iter()
            .any(|t| t.contains("unsupported_protocol_version")),
        "{texts:?}"
    );

    // the server still serves the good agent and the API
    let cid = api.command(&id, "ping", json!({"log_lines": 5})).await;
    assert_eq!(
        api.wait_done(&cid, Duration::from_secs(20)).await["status"],
        "succeeded"
    );
    let m = reqwest::get(cp.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!m.contains("trellis_protocol_errors_total 0"), "{m}");
    assert_eq!(reqwest::get(cp.url("/readyz")).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_replaces_first_and_sse_resumes() {
    let (dir, cp, api) = setup(Backend::Sqlite, "replace").await;
    let (id, token) = api.create_agent("twin").await;
    let mut first = raw_agent(&cp, &token).await;
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    let (texts, _) = read_until_close(&mut first).await;
    assert!(texts.iter().any(|t| t.contains("replaced")), "{texts:?}");
    api.wait_agent_online(&id).await;

    // SSE: full stream, then resume after seq 3 with Last-Event-ID
    let cid = api
        .command(&id, "ping", json!({"log_lines": 6, "duration_ms": 300}))
        .await;
    let body = reqwest::Client::new()
        .get(cp.url(&format!("/api/commands/{cid}/events")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ids: Vec<i64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=7).collect::<Vec<_>>(), "{body}");
    assert!(body.contains("event: end"));
    assert!(body.contains("event: finished"));
    let resumed = reqwest::Client::new()
        .get(cp.url(&format!("/api/commands/{cid}/events")))
        .bearer_auth(ADMIN_TOKEN)
        .header("last-event-id", "3")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ids: Vec<i64> = resumed
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ids, (4..=7).collect::<Vec<_>>(), "{resumed}");
    // access_token works for EventSource clients
    let s = reqwest::get(cp.url(&format!(
        "/api/commands/{cid}/events?access_token={ADMIN_TOKEN}"
    )))
    .await
    .unwrap()
    .status();
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_ends_running_commands_cleanly() {
    let (dir, cp, api) = setup(Backend::Sqlite, "sigterm").await;
    let (id, token) = api.create_agent("polite").await;
    let mut agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command(&id, "ping", json!({"log_lines": 100, "duration_ms": 20000}))
        .await;
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/commands/{cid}")).await["lastSeq"]
            .as_i64()
            .unwrap_or(0)
            >= 2
    })
    .await;
    let status = agent.terminate();
    assert!(status.success(), "tendril exits 0 on SIGTERM: {status:?}");
    let c = api.wait_done(&cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "agent_shutdown");
    assert_eq!(c["error"]["retryable"], true);
}

async fn cancel_while_agent_away(backend: Backend) {
    let (dir, cp, api) = setup(backend, "awaycancel").await;
    let (id, token) = api.create_agent("flaky").await;
    // A session receives the dispatch but drops before accepting it.
    let mut ws = raw_agent(&cp, &token).await;
    let cid = api.command(&id, "ping", json!({"log_lines": 3})).await;
    let d = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(d.to_text().unwrap().contains("dispatch"), "{d:?}");
    drop(ws);
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/agents/{id}")).await["status"] == "offline"
    })
    .await;
    assert_eq!(
        api.get(&format!("/api/commands/{cid}")).await["status"],
        "dispatched"
    );
    let (s, _) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{cid}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, 202);
    // The real agent connects: the command is cancelled, never sent, never run.
    let agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    let c = api.wait_done(&cid, Duration::from_secs(20)).await;
    assert_eq!(c["status"], "cancelled", "{c}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = api.get(&format!("/api/commands/{cid}")).await;
    assert_eq!(c["lastSeq"], 0, "it never ran: {c}");
    assert!(
        !agent
            .log()
            .contains(&format!("running command command_id={cid}")),
        "{}",
        agent.log()
    );
    // cancelling it again is a clear 409
    let (s, e) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{cid}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(e["error"]["code"], "already_finished");
}
on_both_backends!(away_cancel, cancel_while_agent_away);

async fn command_list_paging(backend: Backend) {
    let (_dir, _cp, api) = setup(backend, "paging").await;
    let (id, _token) = api.create_agent("pager").await;
    // Created back to back: many share a millisecond, which paging must not skip or repeat.
    let mut created = Vec::new();
    for _ in 0..23 {
        created.push(api.command(&id, "ping", json!({})).await);
    }
    let mut seen = Vec::new();
    let mut created_at = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..20 {
        let mut path = format!("/api/commands?agentId={id}&limit=4");
        if let Some(b) = &before {
            path += &format!("&before={b}");
        }
        let page = api.get(&path).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 4, "{page}");
        seen.extend(items.iter().map(|c| c["id"].as_str().unwrap().to_string()));
        created_at.extend(
            items
                .iter()
                .map(|c| c["createdAt"].as_str().unwrap().to_string()),
        );
        match page["nextBefore"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => break,
        }
    }
    let mut want = created.clone();
    want.sort();
    let mut got = seen.clone();
    got.sort();
    assert_eq!(got, want, "every command exactly once across pages");
    // newest first (same-format RFC 3339 in UTC sorts as text)
    assert!(
        created_at.windows(2).all(|w| w[0] >= w[1]),
        "{created_at:?}"
    );
    let (s, e) = api
        .call(reqwest::Method::GET, "/api/commands?before=yesterday", None)
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
}
on_both_backends!(paging, command_list_paging);

/// A burst of submissions is stored in shared transactions; an idempotency key submitted
/// twice in the same burst still yields one command, and no other submission is harmed.
async fn burst_with_repeated_idempotency_keys(backend: Backend) {
    let (dir, cp, api) = setup(backend, "burst").await;
    let (id, token) = api.create_agent("bursty").await;
    let mut calls = Vec::new();
    for i in 0..60 {
        let api = api.clone();
        // keys k0..k19 are each sent twice; the other 20 submissions have none
        let body = if i < 40 {
            json!({"agentId": id, "type": "ping", "params": {}, "idempotencyKey": format!("k{}", i % 20)})
        } else {
            json!({"agentId": id, "type": "ping", "params": {}})
        };
        calls.push(tokio::spawn(async move {
            api.call(reqwest::Method::POST, "/api/commands", Some(body))
                .await
        }));
    }
    let mut ids = Vec::new();
    for c in calls {
        let (s, v) = c.await.unwrap();
        assert_eq!(s, 202, "{v}");
        ids.push(v["commandId"].as_str().unwrap().to_string());
    }
    for k in 0..20 {
        assert_eq!(ids[k], ids[k + 20], "key k{k} gave two commands");
    }
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 40);
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    for cid in &distinct {
        let c = api.wait_done(cid, Duration::from_secs(30)).await;
        assert_eq!(c["status"], "succeeded", "{c}");
    }
}
on_both_backends!(burst, burst_with_repeated_idempotency_keys);

/// Reads frames until one contains `needle`.
async fn read_until(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    needle: &str,
) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("frame");
        if let Ok(t) = m.to_text() {
            if t.contains(needle) {
                return t.to_string();
            }
        }
    }
}

/// An agent that re-sends events it already sent (as after a reconnect) must not move a
/// stage back: the duplicate is ignored, not re-applied.
async fn resent_stage_event_does_not_regress(backend: Backend) {
    let (_dir, cp, api) = setup(backend, "resend").await;
    let (id, token) = api.create_agent("resender").await;
    let mut ws = raw_agent(&cp, &token).await;
    let cid = api.command(&id, "ping", json!({})).await;
    read_until(&mut ws, "dispatch").await;
    let stage = |seq: u64, state: &str| json!({"command_id": cid, "seq": seq, "ts": 0, "kind": "stage", "stage": "warm_up", "state": state});
    for frame in [
        json!({"type": "accept", "command_id": cid}),
        json!({"type": "events", "events": [stage(1, "running")]}),
        json!({"type": "events", "events": [stage(2, "completed")]}),
        // the duplicate of seq 1, as a reconnecting agent would re-send it
        json!({"type": "events", "events": [stage(1, "running")]}),
    ] {
        ws.send(Message::text(frame.to_string())).await.unwrap();
    }
    // wait until the duplicate has been processed (its ack comes after the others)
    let mut acked = 0;
    while acked < 3 {
        read_until(&mut ws, "acks").await;
        acked += 1;
    }
    let c = api.get(&format!("/api/commands/{cid}")).await;
    let stages = c["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1, "{c}");
    assert_eq!(stages[0]["name"], "warm_up");
    assert_eq!(stages[0]["state"], "completed", "{c}");
    assert_eq!(c["lastSeq"], 2, "{c}");

    // Older events stored after newer ones (a failed batch re-sent after a later one
    // committed): neither the stage nor the percent goes back.
    let progress = |seq: u64, percent: f64| json!({"command_id": cid, "seq": seq, "ts": 0, "kind": "progress", "percent": percent});
    let cool = |seq: u64, state: &str| json!({"command_id": cid, "seq": seq, "ts": seq, "kind": "stage", "stage": "cool_down", "state": state, "message": state});
    for frame in [
        json!({"type": "events", "events": [cool(5, "completed"), progress(6, 90.0)]}),
        json!({"type": "events", "events": [cool(3, "running"), progress(4, 10.0)]}),
    ] {
        ws.send(Message::text(frame.to_string())).await.unwrap();
        read_until(&mut ws, "acks").await;
    }
    let c = api.get(&format!("/api/commands/{cid}")).await;
    let cool_down = c["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cool_down")
        .cloned()
        .unwrap_or_else(|| panic!("{c}"));
    assert_eq!(cool_down["state"], "completed", "{c}");
    assert_eq!(cool_down["message"], "completed", "{c}");
    assert!(!cool_down["finishedAt"].is_null(), "{c}");
    assert_eq!(c["percent"], 90.0, "{c}");
    assert_eq!(c["stage"], "cool_down", "{c}");
    assert_eq!(c["lastSeq"], 6, "{c}");
}
on_both_backends!(resend_stage, resent_stage_event_does_not_regress);

/// A cancel, or a deadline, that reaches the agent before the dispatch it belongs to
/// (they travel separately) is dropped by the agent, which does not know the command
/// yet; when the agent then accepts the command it is told again.
async fn cancel_that_overtook_its_dispatch_is_repeated_on_accept(backend: Backend) {
    let (_dir, cp, api) = setup(backend, "overtake").await;
    let (id, token) = api.create_agent("overtaken").await;
    let mut ws = raw_agent(&cp, &token).await;
    let finish = |cid: &str| {
        json!({"type": "events", "events": [{"command_id": cid, "seq": 1, "ts": 0,
               "kind": "finished", "status": "cancelled", "result": null,
               "error": {"code": "cancelled", "message": "cancelled", "retryable": false}}]})
    };

    // Cancelled by request.
    let cid = api.command(&id, "ping", json!({})).await;
    read_until(&mut ws, "dispatch").await;
    api.post(&format!("/api/commands/{cid}/cancel"), json!({}))
        .await;
    // This first cancel is the one the agent "did not understand" (it came first).
    let first = read_until(&mut ws, "cancel").await;
    assert!(first.contains(&cid), "{first}");
    ws.send(Message::text(
        json!({"type": "accept", "command_id": cid}).to_string(),
    ))
    .await
    .unwrap();
    let again = read_until(&mut ws, "cancel").await;
    assert!(
        again.contains(&cid) && again.contains("cancelled"),
        "{again}"
    );
    ws.send(Message::text(finish(&cid).to_string()))
        .await
        .unwrap();
    let c = api.wait_done(&cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "cancelled", "{c}");

    // Timed out between the dispatch and the accept.
    let cid = api
        .command_with(json!({"agentId": id, "type": "ping", "params": {}, "timeoutSecs": 1}))
        .await;
    read_until(&mut ws, "dispatch").await;
    let c = api.wait_done(&cid, Duration::from_secs(15)).await;
    assert_eq!(c["status"], "timed_out", "{c}");
    ws.send(Message::text(
        json!({"type": "accept", "command_id": cid}).to_string(),
    ))
    .await
    .unwrap();
    // (a cancel sent when the deadline passed may come first; the one after the accept
    // must follow)
    let mut seen = 0;
    while seen < 2 {
        let m = read_until(&mut ws, "cancel").await;
        if m.contains(&cid) && m.contains("timed_out") {
            seen += 1;
        }
    }
}
on_both_backends!(
    overtaken_cancel,
    cancel_that_overtook_its_dispatch_is_repeated_on_accept
);

/// A connection whose agent went silent (a dead peer: no frame at all, not even a close)
/// is closed and the agent shown offline within the heartbeat timeout, while a live
/// tendril — told the shorter heartbeat interval in its welcome — stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_is_detected_dead_and_live_agent_stays_online() {
    let dir = scratch("deadconn");
    let db = database(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start_with(
        &db,
        &dir,
        "127.0.0.1:0",
        &[("TRELLIS_HEARTBEAT_TIMEOUT_SECS", "3")],
    )
    .await;
    let api = cp.api();
    let (silent_id, silent_token) = api.create_agent("silent").await;
    let (live_id, live_token) = api.create_agent("live").await;
    let _live = Agent::start(&cp.ws_url(), &live_token, &dir.join("live"));
    api.wait_agent_online(&live_id).await;

    // Connects, says hello, then never sends or reads another frame.
    let ws = raw_agent(&cp, &silent_token).await;
    api.wait_agent_online(&silent_id).await;
    let since = Instant::now();
    api.wait_until(Duration::from_secs(15), || async {
        api.get(&format!("/api/agents/{silent_id}")).await["status"] == "offline"
    })
    .await;
    let took = since.elapsed();
    assert!(took >= Duration::from_secs(2), "closed too early: {took:?}");
    assert!(cp.log().contains("no traffic for 3 s"), "{}", cp.log());
    // The live agent, heartbeating every second, was never dropped.
    let live = api.get(&format!("/api/agents/{live_id}")).await;
    assert_eq!(live["status"], "online", "{live}");
    assert_eq!(
        cp.log()
            .matches(&format!("agent connected agent_id={live_id}"))
            .count(),
        1,
        "{}",
        cp.log()
    );
    drop(ws);
}
