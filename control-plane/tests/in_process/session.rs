//! Agent sessions over channels: the real session task, dispatcher, writer and database,
//! with the test playing the agent frame by frame.

use std::time::Duration;

use axum::extract::ws::Message;
use axum::http::StatusCode;
use serde_json::{json, Value};
use trellis_protocol::{ServerMessage, PROVISION_STAGES};

use crate::common::{FakeAgent, TestApp};

pub async fn dispatched(a: &mut FakeAgent) -> trellis_protocol::Dispatch {
    loop {
        match a.recv().await {
            ServerMessage::Dispatch(d) => return d,
            ServerMessage::HeartbeatAck | ServerMessage::Acks { .. } => continue,
            other => panic!("expected a dispatch, got {other:?}"),
        }
    }
}

pub async fn acked(a: &mut FakeAgent, seq: u64) {
    loop {
        match a.recv().await {
            ServerMessage::Acks { acks } if acks.iter().any(|k| k.seq >= seq) => return,
            ServerMessage::Acks { .. } | ServerMessage::HeartbeatAck => continue,
            other => panic!("expected acks, got {other:?}"),
        }
    }
}

pub fn event(command: &str, seq: u64, body: Value) -> Value {
    let mut e = json!({"command_id": command, "seq": seq, "ts": 1_700_000_000_000i64 + seq as i64});
    e.as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    e
}

async fn wait_status(t: &TestApp, path: &str, want: &str) -> Value {
    for _ in 0..200 {
        let (_, v) = t.call("GET", path, None).await;
        if v["status"] == want {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, v) = t.call("GET", path, None).await;
    panic!("{path} never became {want}: {v}");
}

#[tokio::test]
async fn a_command_runs_through_a_session_and_is_stored_before_it_is_acked() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-a").await;
    let mut a = FakeAgent::connect(&t, &agent, &["ping"]).await;
    let (_, v) = t.call("GET", &format!("/api/agents/{agent}"), None).await;
    assert_eq!(v["status"], "online");
    assert_eq!(v["capabilities"], json!(["ping"]));

    let (_, v) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {}})),
        )
        .await;
    let id = v["commandId"].as_str().unwrap().to_string();
    let d = dispatched(&mut a).await;
    assert_eq!(d.command_id.to_string(), id);
    a.send(json!({"type": "accept", "command_id": id}));
    wait_status(&t, &format!("/api/commands/{id}"), "running").await;
    a.send(json!({"type": "events", "events": [
        event(&id, 1, json!({"kind": "log", "stream": "stdout", "data": "pong\n"})),
        event(&id, 2, json!({"kind": "finished", "status": "succeeded", "result": {"rtt_ms": 1}})),
    ]}));
    acked(&mut a, 2).await;
    // Acked means stored: the command is terminal and its log is readable now.
    let (_, c) = t.call("GET", &format!("/api/commands/{id}"), None).await;
    assert_eq!(c["status"], "succeeded");
    assert_eq!(c["lastSeq"], 2);
    let (_, logs) = t
        .call("GET", &format!("/api/commands/{id}/logs"), None)
        .await;
    assert_eq!(logs["items"][0]["data"], "pong\n");
    assert_eq!(logs["done"], true);
    // A re-sent event (after a reconnect, say) is stored once and acked again.
    a.send(json!({"type": "events", "events": [
        event(&id, 1, json!({"kind": "log", "stream": "stdout", "data": "pong\n"})),
    ]}));
    acked(&mut a, 1).await;
    let (_, logs) = t
        .call("GET", &format!("/api/commands/{id}/logs"), None)
        .await;
    assert_eq!(logs["items"].as_array().unwrap().len(), 1);
    t.stop().await;
}

#[tokio::test]
async fn a_provision_moves_its_node_to_running_with_the_vm_in_the_same_commit() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-b").await;
    let mut a = FakeAgent::connect(&t, &agent, &["provision"]).await;
    let tpl = t.mapped_template().await;
    let (st, v) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": "app-1", "templateId": tpl, "provision": {"agentId": agent}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["node"]["status"], "provisioning");
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let id = v["commandId"].as_str().unwrap().to_string();
    assert_eq!(
        v["node"]["lastCommandId"],
        id.as_str(),
        "linked in the same transaction"
    );
    // A second click is refused without a second command.
    let (st, _) = t
        .call(
            "POST",
            &format!("/api/nodes/{node}/provision"),
            Some(json!({"agentId": agent})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);

    let d = dispatched(&mut a).await;
    assert_eq!(d.command_type, "provision");
    assert_eq!(d.params["name"], "app-1");
    a.send(json!({"type": "accept", "command_id": id}));
    let mut events: Vec<Value> = Vec::new();
    for (i, stage) in PROVISION_STAGES.iter().enumerate() {
        events.push(event(
            &id,
            2 * i as u64 + 1,
            json!({"kind": "stage", "stage": stage, "state": "running"}),
        ));
        events.push(event(
            &id,
            2 * i as u64 + 2,
            json!({"kind": "stage", "stage": stage, "state": "completed"}),
        ));
    }
    let last = events.len() as u64 + 1;
    events.push(event(
        &id,
        last,
        json!({"kind": "finished", "status": "succeeded", "result": {
            "vm_id": 123, "node": "pve", "ip_address": "10.0.0.5", "name": "app-1",
            "status": "completed", "stages_completed": PROVISION_STAGES,
        }}),
    ));
    a.send(json!({"type": "events", "events": events}));
    acked(&mut a, last).await;
    let (_, n) = t.call("GET", &format!("/api/nodes/{node}"), None).await;
    assert_eq!(n["status"], "running", "{n}");
    assert_eq!(n["vmId"], 123);
    assert_eq!(n["ipAddress"], "10.0.0.5");
    assert_eq!(n["hypervisorId"], agent.as_str());
    let (_, c) = t.call("GET", &format!("/api/commands/{id}"), None).await;
    let states: Vec<&str> = c["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert!(states.iter().all(|s| *s == "completed"), "{states:?}");

    let (_, m) = t.call_as(None, "GET", "/metrics", None).await;
    let m = m.as_str().unwrap();
    assert!(
        m.contains(
            "trellis_command_duration_seconds_count{type=\"provision\",outcome=\"succeeded\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("trellis_stage_duration_seconds_count{stage=\"clone_template\",outcome=\"completed\"} 1"), "{m}");
    t.stop().await;
}

#[tokio::test]
async fn a_failed_provision_fails_its_node_and_a_retry_takes_it_over() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-c").await;
    let mut a = FakeAgent::connect(&t, &agent, &["provision"]).await;
    let tpl = t.mapped_template().await;
    let (_, v) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": "app-2", "templateId": tpl, "provision": {"agentId": agent}})),
        )
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let id = v["commandId"].as_str().unwrap().to_string();
    dispatched(&mut a).await;
    a.send(json!({"type": "accept", "command_id": id}));
    a.send(json!({"type": "events", "events": [event(&id, 1, json!({"kind": "finished", "status": "failed",
        "error": {"code": "storage_full", "message": "no space on local-lvm", "stage": "clone_template"}}))]}));
    acked(&mut a, 1).await;
    let (_, n) = t.call("GET", &format!("/api/nodes/{node}"), None).await;
    assert_eq!(n["status"], "failed");
    assert_eq!(
        n["error"],
        "storage_full (stage clone_template): no space on local-lvm"
    );

    let (st, r) = t
        .call("POST", &format!("/api/commands/{id}/retry"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{r}");
    let retry = r["commandId"].as_str().unwrap();
    let (_, n) = t.call("GET", &format!("/api/nodes/{node}"), None).await;
    assert_eq!(n["status"], "provisioning");
    assert_eq!(n["lastCommandId"], retry);
    assert_eq!(n["error"], Value::Null);
    let d = dispatched(&mut a).await;
    assert_eq!(d.command_id.to_string(), retry);
    assert_eq!(d.attempt, 2);
    t.stop().await;
}

#[tokio::test]
async fn a_frame_that_is_not_json_is_a_typed_protocol_error_and_a_close() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-d").await;
    let mut a = FakeAgent::connect(&t, &agent, &[]).await;
    a.to_server.send(Ok(Message::Text("{nope".into()))).unwrap();
    match a.recv().await {
        ServerMessage::Error(e) => assert_eq!(
            serde_json::to_value(e.code).unwrap(),
            json!("malformed_message")
        ),
        other => panic!("expected an error, got {other:?}"),
    }
    match a.recv_frame().await {
        Message::Close(Some(c)) => assert_eq!(c.code, 1002),
        other => panic!("expected a close, got {other:?}"),
    }
    t.stop().await;
}

#[tokio::test]
async fn a_silent_agent_is_closed_after_the_heartbeat_timeout() {
    let t = TestApp::with_heartbeat_timeout(Duration::from_secs(3)).await;
    let agent = t.agent("pve-e").await;
    let mut a = FakeAgent::connect(&t, &agent, &[]).await;
    // A heartbeat answered means the session is in its main loop (no storage call pending).
    a.send(json!({"type": "heartbeat"}));
    assert!(matches!(a.recv().await, ServerMessage::HeartbeatAck));
    // Virtual time from here: the session's liveness tick is the only timer that matters.
    tokio::time::pause();
    let close = async {
        loop {
            match a.recv_frame().await {
                Message::Close(Some(c)) => return c,
                Message::Close(None) => panic!("close without a reason"),
                _ => continue,
            }
        }
    };
    let c = tokio::time::timeout(Duration::from_secs(60), close)
        .await
        .expect("closed within the virtual minute");
    assert_eq!(c.code, 1008);
    assert_eq!(c.reason.as_str(), "no heartbeat");
    tokio::time::resume();
    t.stop().await;
}

#[tokio::test]
async fn a_command_past_its_deadline_times_out_and_its_agent_is_told_to_stop() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-f").await;
    let mut a = FakeAgent::connect(&t, &agent, &["ping"]).await;
    let (_, v) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {}, "timeoutSecs": 1})),
        )
        .await;
    let id = v["commandId"].as_str().unwrap().to_string();
    dispatched(&mut a).await;
    a.send(json!({"type": "accept", "command_id": id}));
    // The reaper sweeps every 500 ms; the deadline is a second away.
    let (_, c) = t
        .call("GET", &format!("/api/commands/{id}?wait=5"), None)
        .await;
    assert_eq!(c["status"], "timed_out", "{c}");
    assert_eq!(c["error"]["code"], "timed_out");
    loop {
        match a.recv().await {
            ServerMessage::Cancel {
                command_id, reason, ..
            } => {
                assert_eq!(command_id.to_string(), id);
                assert_eq!(reason, trellis_protocol::CancelReason::TimedOut);
                break;
            }
            ServerMessage::Acks { .. } | ServerMessage::HeartbeatAck => continue,
            other => panic!("expected a cancel, got {other:?}"),
        }
    }
    t.stop().await;
}

#[tokio::test]
async fn the_admins_concurrency_limits_dispatch_and_a_change_applies_to_the_live_session() {
    let t = TestApp::start().await;
    let (_, v) = t
        .call(
            "POST",
            "/api/agents",
            Some(json!({"name": "pve-g", "maxConcurrency": 1})),
        )
        .await;
    let agent = v["agent"]["id"].as_str().unwrap().to_string();
    // The agent asks for 4; the admin's 1 is the limit.
    let mut a = FakeAgent::connect(&t, &agent, &["ping"]).await;
    for _ in 0..2 {
        t.call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {}})),
        )
        .await;
    }
    let first = dispatched(&mut a).await;
    a.send(json!({"type": "accept", "command_id": first.command_id}));
    // Nothing more within a while: one slot.
    let more = tokio::time::timeout(Duration::from_millis(300), a.from_server.recv()).await;
    assert!(
        !matches!(&more, Ok(Some(Message::Text(t))) if t.contains("dispatch")),
        "{more:?}"
    );
    let (st, v) = t
        .call(
            "PATCH",
            &format!("/api/agents/{agent}"),
            Some(json!({"maxConcurrency": 2})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["maxConcurrency"], 2);
    let second = dispatched(&mut a).await;
    assert_ne!(second.command_id, first.command_id);
    let (st, _) = t
        .call(
            "PATCH",
            &format!("/api/agents/{agent}"),
            Some(json!({"maxConcurrency": 0})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    t.stop().await;
}
