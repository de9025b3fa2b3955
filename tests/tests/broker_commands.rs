//! The command API against the real `trellis` and `tendril` over real WebSockets, on
//! SQLite and PostgreSQL: a ping round trip with its logs and metrics, a command queued
//! for an offline agent, deadlines, cancel / retry / idempotency keys and request
//! validation, list paging, and a burst of concurrent submissions.

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::sse;

async fn ping_round_trip(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "ping").await;
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
    let (dir, cp, api) = control_plane(backend, "offline").await;
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

async fn deadline_times_out(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "deadline").await;
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
    api.wait_last_seq(&cid, 1).await;
    // ...and it says the command was stopped for its deadline (told by the server, or by
    // its own copy of the deadline, whichever came first)
    let text = sse::fetch_text(&api, &cid, None).await;
    let finished = sse::parse(&text)
        .into_iter()
        .find(|e| e.event == "finished")
        .unwrap_or_else(|| panic!("no finished event: {text}\n{}", agent.log()));
    assert!(
        finished.data.contains(r#""status":"timed_out""#),
        "{finished:?}"
    );
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
    let (dir, cp, api) = control_plane(backend, "cancel").await;
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

async fn command_list_paging(backend: Backend) {
    let (_dir, _cp, api) = control_plane(backend, "paging").await;
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
    let (dir, cp, api) = control_plane(backend, "burst").await;
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
