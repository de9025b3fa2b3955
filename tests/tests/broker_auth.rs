//! Who may talk to the broker, and what: agent tokens (never shown again, useless on the
//! admin API, rotated, revoked with an immediate disconnect), one agent's isolation from
//! another's commands, and malformed, unknown, oversized or wrong-version frames refused
//! while the server keeps serving. A raw WebSocket agent sends the bad frames.

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_tests::harness::*;
use trellis_tests::raw_agent::{self, RawAgent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_isolation() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "auth").await;
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
    assert!(raw_agent::connect(&cp.ws_url(), "trl_agent_bogus")
        .await
        .is_err());

    // agent alpha cannot write events into beta's command
    let b_cmd = api.command(&b_id, "ping", json!({})).await;
    let mut ws = RawAgent::hello(&cp.ws_url(), &a_token).await;
    ws.send(
        json!({"type": "events", "events": [{"command_id": b_cmd, "seq": 1, "ts": 0, "kind": "log",
               "stream": "stdout", "data": "forged"}]}),
    )
    .await;
    ws.send(json!({"type": "accept", "command_id": b_cmd}))
        .await;
    let reply = ws.recv(Duration::from_secs(5)).await;
    // (the raw agent speaks protocol 1: the non-fatal error is `unexpected_message`)
    assert!(
        reply
            .to_text()
            .unwrap()
            .contains("is not dispatched to this agent"),
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
    assert!(raw_agent::connect(&cp.ws_url(), &b_token).await.is_err());
    let _b = Agent::start(&cp.ws_url(), new_token, &dir.join("b"));
    assert_eq!(
        api.wait_done(&b_cmd, Duration::from_secs(20)).await["status"],
        "succeeded"
    );

    // revoke disconnects at once
    let mut ws = RawAgent::hello(&cp.ws_url(), &a_token).await;
    let started = Instant::now();
    let (s, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/agents/{a_id}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (texts, code) = ws.read_until_close().await;
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
    let (dir, cp, api) = control_plane(Backend::Sqlite, "frames").await;
    let (id, token) = api.create_agent("good").await;
    let (_bad_id, bad_token) = api.create_agent("bad").await;
    let _good = Agent::start(&cp.ws_url(), &token, &dir.join("good"));
    api.wait_agent_online(&id).await;

    // malformed JSON after hello
    let mut ws = RawAgent::hello(&cp.ws_url(), &bad_token).await;
    ws.send_text("{this is not json").await;
    let (texts, code) = ws.read_until_close().await;
    assert!(
        texts.iter().any(|t| t.contains("malformed_message")),
        "{texts:?}"
    );
    assert_eq!(code, Some(1002));

    // unknown message type
    let mut ws = RawAgent::hello(&cp.ws_url(), &bad_token).await;
    ws.send_text(r#"{"type":"format_everything"}"#).await;
    let (texts, _) = ws.read_until_close().await;
    assert!(
        texts.iter().any(|t| t.contains("malformed_message")),
        "{texts:?}"
    );

    // oversized frame (2 MiB > 1 MiB limit)
    let mut ws = RawAgent::hello(&cp.ws_url(), &bad_token).await;
    let big = format!(
        r#"{{"type":"heartbeat","pad":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let _ = ws.try_send_text(big).await;
    let (_, code) = ws.read_until_close().await;
    assert!(code.is_none() || code == Some(1009), "closed with {code:?}");

    // wrong first message and wrong protocol version
    let mut ws = RawAgent::connect(&cp.ws_url(), &bad_token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 99, "agent_version": "x", "hostname": "x"}),
    )
    .await;
    let (texts, _) = ws.read_until_close().await;
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
