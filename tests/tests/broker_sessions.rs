//! Agent sessions: a second connection with the same token replaces the first, a silent
//! (dead) peer is dropped after the heartbeat timeout while a live tendril stays online,
//! and a command's server-sent event stream resumes after `Last-Event-ID`.

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_tests::harness::*;
use trellis_tests::raw_agent::RawAgent;
use trellis_tests::sse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_replaces_first_and_sse_resumes() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "replace").await;
    let (id, token) = api.create_agent("twin").await;
    let mut first = RawAgent::hello(&cp.ws_url(), &token).await;
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    let (texts, _) = first.read_until_close().await;
    assert!(texts.iter().any(|t| t.contains("replaced")), "{texts:?}");
    api.wait_agent_online(&id).await;

    // SSE: full stream, then resume after seq 3 with Last-Event-ID
    let cid = api
        .command(&id, "ping", json!({"log_lines": 6, "duration_ms": 300}))
        .await;
    let body = sse::fetch_text(&api, &cid, None).await;
    let ids = sse::ids(&sse::parse(&body));
    assert_eq!(ids, (1..=7).collect::<Vec<_>>(), "{body}");
    assert!(body.contains("event: end"));
    assert!(body.contains("event: finished"));
    let resumed = sse::fetch_text(&api, &cid, Some(3)).await;
    let ids = sse::ids(&sse::parse(&resumed));
    assert_eq!(ids, (4..=7).collect::<Vec<_>>(), "{resumed}");
    // A token in the URL is refused (tests/tests/http_hardening.rs has the details).
    let s = reqwest::get(cp.url(&format!(
        "/api/commands/{cid}/events?access_token={ADMIN_TOKEN}"
    )))
    .await
    .unwrap()
    .status();
    assert_eq!(s, 401);
}

/// A connection whose agent went silent (a dead peer: no frame at all, not even a close)
/// is closed and the agent shown offline within the heartbeat timeout, while a live
/// tendril — told the shorter heartbeat interval in its welcome — stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_is_detected_dead_and_live_agent_stays_online() {
    let dir = TempDir::new("deadconn");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start_with(
        db,
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
    let ws = RawAgent::hello(&cp.ws_url(), &silent_token).await;
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
