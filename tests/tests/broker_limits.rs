//! Bounded storage enforced by the server, with raw agents: the per-command log limit
//! (`--max-log-bytes-per-command`: the command ends `failed`/`log_limit`, the session is
//! closed with `log_limit`, later log events are acked without their data), the per-event
//! size limit (64 KiB: `event_too_large`), `ping` params limits, and `GET …/logs` and the
//! SSE backlog paged by bytes with a correct cursor.

use std::time::Duration;

use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::raw_agent::{acked, RawAgent};

/// A v2 agent with a `ping` command dispatched and accepted: `(session, command id)`.
async fn agent_running(
    cp: &ControlPlane,
    api: &Api,
    name: &str,
) -> (RawAgent, String, String, String) {
    let (id, token) = api.create_agent(name).await;
    let mut ws = RawAgent::connect(&cp.ws_url(), &token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "iso", "hostname": name, "capabilities": ["ping"], "max_concurrency": 4}),
    )
    .await;
    assert_eq!(
        ws.next_frame(Duration::from_secs(10)).await.unwrap()["type"],
        "welcome"
    );
    let cid = api.command(&id, "ping", json!({})).await;
    loop {
        let v = ws.next_frame(Duration::from_secs(10)).await.unwrap();
        if v["type"] == "dispatch" && v["command_id"] == cid {
            break;
        }
    }
    ws.send(json!({"type": "accept", "command_id": cid})).await;
    (ws, cid, id, token)
}

fn events(evs: Vec<Value>) -> Value {
    json!({"type": "events", "events": evs})
}

fn log(cid: &str, seq: u64, data: &str) -> Value {
    json!({"command_id": cid, "seq": seq, "ts": 1, "kind": "log", "stream": "stdout", "data": data})
}

fn finished(cid: &str, seq: u64) -> Value {
    json!({"command_id": cid, "seq": seq, "ts": 1, "kind": "finished", "status": "succeeded",
           "result": {"pong": true}})
}

/// Reads until the server closes: the frames before and the close code.
async fn until_close(ws: &mut RawAgent) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        match ws.next_frame(Duration::from_secs(20)).await {
            Ok(v) => frames.push(v),
            Err(code) => return (frames, code),
        }
    }
}

async fn limited_control_plane(tag: &str, limit: &str) -> (TempDir, ControlPlane, Api) {
    let dir = TempDir::new(tag);
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start_with(
        db,
        &dir,
        "127.0.0.1:0",
        &[("TRELLIS_MAX_LOG_BYTES_PER_COMMAND", limit)],
    )
    .await;
    let api = cp.api();
    (dir, cp, api)
}

/// A command whose log passes `--max-log-bytes-per-command` ends `failed` with
/// `log_limit`; the agent gets the acks, a cancel, then the fatal `log_limit` and a close
/// (1008); after reconnecting, its later log events for that command are acked but their
/// data is not kept; another agent's command is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_limit_fails_the_command_and_closes_the_session() {
    let (_dir, cp, api) = limited_control_plane("lim-log", "10000").await;
    let (mut ws, cid, _id, token) = agent_running(&cp, &api, "chatty").await;
    let (mut other, other_cid, _, _) = agent_running(&cp, &api, "quiet").await;
    let chunk = "x".repeat(3999) + "\n";
    ws.send(events(vec![log(&cid, 1, &chunk), log(&cid, 2, &chunk)]))
        .await;
    ws.wait_ack(&cid, 2).await;
    ws.send(events(vec![log(&cid, 3, &chunk)])).await;
    let (frames, close) = until_close(&mut ws).await;
    let ack = frames.iter().position(|v| acked(v, &cid) == Some(3));
    let cancel = frames
        .iter()
        .position(|v| v["type"] == "cancel" && v["command_id"] == cid.as_str());
    let err = frames
        .iter()
        .position(|v| v["type"] == "error" && v["code"] == "log_limit");
    assert!(
        ack.is_some() && cancel.is_some() && err.is_some(),
        "{frames:?}"
    );
    assert!(
        ack < err && cancel < err,
        "acks and cancel before the error: {frames:?}"
    );
    assert_eq!(frames[err.unwrap()]["command_id"], cid.as_str());
    assert_eq!(close, Some(1008));
    let c = api.get(&format!("/api/commands/{cid}")).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "log_limit", "{c}");

    // Reconnect: the command ended meanwhile → cancel; more log is acked, not kept.
    let mut ws = RawAgent::connect(&cp.ws_url(), &token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "iso", "hostname": "chatty", "capabilities": ["ping"],
        "max_concurrency": 4, "active_commands": [cid]}),
    )
    .await;
    assert_eq!(
        ws.next_frame(Duration::from_secs(10)).await.unwrap()["type"],
        "welcome"
    );
    ws.send(events(vec![log(&cid, 4, &chunk), finished(&cid, 5)]))
        .await;
    ws.wait_ack(&cid, 5).await;
    ws.assert_open().await;
    let logs = api.all_logs(&cid).await;
    let seqs: Vec<i64> = logs.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "{logs:?}");
    assert_eq!(logs[3]["data"], "", "data past the limit is not kept");
    let stored: usize = logs.iter().map(|l| l["data"].as_str().unwrap().len()).sum();
    assert_eq!(stored, 12_000);

    other
        .send(events(vec![
            log(&other_cid, 1, &chunk),
            finished(&other_cid, 2),
        ]))
        .await;
    other.wait_ack(&other_cid, 2).await;
    assert_eq!(
        api.get(&format!("/api/commands/{other_cid}")).await["status"],
        "succeeded"
    );
}

/// An event whose stored form is over 64 KiB (here a `finished` with a 70 000-byte
/// result) is stored in its place as `failed`/`event_too_large`, acked, and the session is
/// closed with `event_too_large` (1009).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_over_64_kib_is_event_too_large() {
    let (_dir, cp, api) = control_plane(Backend::Sqlite, "lim-event").await;
    let (mut ws, cid, _, _) = agent_running(&cp, &api, "bulky").await;
    ws.send(events(vec![
        json!({"command_id": cid, "seq": 1, "ts": 1, "kind": "finished",
        "status": "succeeded", "result": {"blob": "y".repeat(70_000)}}),
    ]))
    .await;
    let (frames, close) = until_close(&mut ws).await;
    let ack = frames.iter().position(|v| acked(v, &cid) == Some(1));
    let err = frames
        .iter()
        .position(|v| v["type"] == "error" && v["code"] == "event_too_large");
    assert!(ack.is_some() && ack < err, "{frames:?}");
    assert_eq!(frames[err.unwrap()]["seq"], 1);
    assert_eq!(close, Some(1009));
    let c = api.get(&format!("/api/commands/{cid}")).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "event_too_large", "{c}");
    assert!(c["result"].is_null(), "{c}");
}

/// `ping` asks for at most 1 000 000 lines of at most 16 KiB, 256 MiB in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_params_are_bounded() {
    let (_dir, _cp, api) = control_plane(Backend::Sqlite, "lim-ping").await;
    let (id, _) = api.create_agent("pinger").await;
    for params in [
        json!({"log_lines": 1_000_001}),
        json!({"log_line_bytes": 16_385}),
        json!({"log_lines": 1_000_000, "log_line_bytes": 16_384}),
    ] {
        let (s, v) = api
            .call(
                reqwest::Method::POST,
                "/api/commands",
                Some(json!({"agentId": id, "type": "ping", "params": params})),
            )
            .await;
        assert_eq!(s, 400, "{params} → {v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    let (s, v) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": id, "type": "ping",
                "params": {"log_lines": 16_384, "log_line_bytes": 16_384}})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
}

/// `GET …/logs` answers at most about 4 MiB per response however high `limit` is, with
/// `done: false` and `lastSeq` the last line's seq, so paging on returns every line once;
/// the SSE stream pages its backlog the same way and still sends every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_sse_backlog_are_paged_by_bytes() {
    let (_dir, cp, api) = control_plane(Backend::Sqlite, "lim-pages").await;
    let (mut ws, cid, _, _) = agent_running(&cp, &api, "verbose").await;
    let chunk = "z".repeat(60_000);
    let mut seq = 0;
    for _ in 0..10 {
        let evs = (0..10)
            .map(|_| {
                seq += 1;
                log(&cid, seq, &chunk)
            })
            .collect();
        ws.send(events(evs)).await;
    }
    ws.send(events(vec![finished(&cid, 101)])).await;
    ws.wait_ack(&cid, 101).await;

    let first = api
        .get(&format!("/api/commands/{cid}/logs?after=0&limit=10000"))
        .await;
    let items = first["items"].as_array().unwrap();
    let bytes: usize = items
        .iter()
        .map(|l| l["data"].as_str().unwrap().len())
        .sum();
    assert!(bytes <= 4 * 1024 * 1024, "{bytes} bytes in one response");
    assert!(items.len() < 100 && !items.is_empty(), "{}", items.len());
    assert_eq!(first["done"], false);
    assert_eq!(first["lastSeq"], items.last().unwrap()["seq"]);
    let mut seqs: Vec<i64> = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .get(&format!(
                "/api/commands/{cid}/logs?after={after}&limit=10000"
            ))
            .await;
        seqs.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["seq"].as_i64().unwrap()),
        );
        after = page["lastSeq"].as_i64().unwrap();
        if page["done"] == true {
            break;
        }
    }
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());

    let body = trellis_tests::sse::fetch_text(&api, &cid, None).await;
    let ids = trellis_tests::sse::ids(&trellis_tests::sse::parse(&body));
    assert_eq!(ids, (1..=101).collect::<Vec<_>>());
    assert!(body.contains("event: end"));
}
