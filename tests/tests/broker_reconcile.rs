//! Races between what the agent knows and what the server knows, played by a raw
//! WebSocket agent: a command cancelled while its agent was away after the dispatch,
//! events re-sent or stored out of order (a stage or percent never goes back), and a
//! cancel or deadline that overtook its dispatch (told again on accept); on SQLite and
//! PostgreSQL.

use std::time::Duration;

use serde_json::json;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::raw_agent::RawAgent;

async fn cancel_while_agent_away(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "awaycancel").await;
    let (id, token) = api.create_agent("flaky").await;
    // A session receives the dispatch but drops before accepting it.
    let mut ws = RawAgent::hello(&cp.ws_url(), &token).await;
    let cid = api.command(&id, "ping", json!({"log_lines": 3})).await;
    let d = ws.recv(Duration::from_secs(5)).await;
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

/// An agent that re-sends events it already sent (as after a reconnect) must not move a
/// stage back: the duplicate is ignored, not re-applied.
async fn resent_stage_event_does_not_regress(backend: Backend) {
    let (_dir, cp, api) = control_plane(backend, "resend").await;
    let (id, token) = api.create_agent("resender").await;
    let mut ws = RawAgent::hello(&cp.ws_url(), &token).await;
    let cid = api.command(&id, "ping", json!({})).await;
    ws.read_until("dispatch").await;
    let stage = |seq: u64, state: &str| json!({"command_id": cid, "seq": seq, "ts": 0, "kind": "stage", "stage": "warm_up", "state": state});
    for frame in [
        json!({"type": "accept", "command_id": cid}),
        json!({"type": "events", "events": [stage(1, "running")]}),
        json!({"type": "events", "events": [stage(2, "completed")]}),
        // the duplicate of seq 1, as a reconnecting agent would re-send it
        json!({"type": "events", "events": [stage(1, "running")]}),
    ] {
        ws.send(frame).await;
    }
    // wait until the duplicate has been processed (its ack comes after the others)
    let mut acked = 0;
    while acked < 3 {
        ws.read_until("acks").await;
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
        ws.send(frame).await;
        ws.read_until("acks").await;
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
    let (_dir, cp, api) = control_plane(backend, "overtake").await;
    let (id, token) = api.create_agent("overtaken").await;
    let mut ws = RawAgent::hello(&cp.ws_url(), &token).await;
    let finish = |cid: &str| {
        json!({"type": "events", "events": [{"command_id": cid, "seq": 1, "ts": 0,
               "kind": "finished", "status": "cancelled", "result": null,
               "error": {"code": "cancelled", "message": "cancelled", "retryable": false}}]})
    };

    // Cancelled by request.
    let cid = api.command(&id, "ping", json!({})).await;
    ws.read_until("dispatch").await;
    api.post(&format!("/api/commands/{cid}/cancel"), json!({}))
        .await;
    // This first cancel is the one the agent "did not understand" (it came first).
    let first = ws.read_until("cancel").await;
    assert!(first.contains(&cid), "{first}");
    ws.send(json!({"type": "accept", "command_id": cid})).await;
    let again = ws.read_until("cancel").await;
    assert!(
        again.contains(&cid) && again.contains("cancelled"),
        "{again}"
    );
    ws.send(finish(&cid)).await;
    let c = api.wait_done(&cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "cancelled", "{c}");

    // Timed out between the dispatch and the accept.
    let cid = api
        .command_with(json!({"agentId": id, "type": "ping", "params": {}, "timeoutSecs": 1}))
        .await;
    ws.read_until("dispatch").await;
    let c = api.wait_done(&cid, Duration::from_secs(15)).await;
    assert_eq!(c["status"], "timed_out", "{c}");
    ws.send(json!({"type": "accept", "command_id": cid})).await;
    // (a cancel sent when the deadline passed may come first; the one after the accept
    // must follow)
    let mut seen = 0;
    while seen < 2 {
        let m = ws.read_until("cancel").await;
        if m.contains(&cid) && m.contains("timed_out") {
            seen += 1;
        }
    }
}
on_both_backends!(
    overtaken_cancel,
    cancel_that_overtook_its_dispatch_is_repeated_on_accept
);
