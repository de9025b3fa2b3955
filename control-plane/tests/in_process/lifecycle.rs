//! The node lifecycle through the real session, writer and database: power and destroy
//! commands move their node in the outcome's commit, the inventory moves nodes whose VM
//! drifted, a destroy the agent lost runs again, and no path drops a node whose VM lives.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{FakeAgent, TestApp};
use crate::session::{acked, dispatched, event};

const CAPS: [&str; 3] = ["provision", "vm_power", "destroy"];

/// Provisions a node through the fake agent; returns `(node id, command id)` with the node
/// running as VM `vm_id` on Proxmox node `pve`.
async fn running_node(
    t: &TestApp,
    a: &mut FakeAgent,
    agent: &str,
    name: &str,
    vm_id: u32,
) -> (String, String) {
    let tpl = t.mapped_template().await;
    let (st, v) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": name, "templateId": tpl, "provision": {"agentId": agent}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let id = v["commandId"].as_str().unwrap().to_string();
    let d = dispatched(a).await;
    assert_eq!(
        d.params["template"]["type"], "clone",
        "the original design's shape"
    );
    a.send(json!({"type": "accept", "command_id": id}));
    a.send(json!({"type": "events", "events": [event(&id, 1, json!({"kind": "finished", "status": "succeeded",
        "result": {"vm_id": vm_id, "node": "pve", "ip_address": "10.0.0.7", "name": name,
                   "status": "completed", "stages_completed": []}}))]}));
    acked(a, 1).await;
    (node, id)
}

async fn node(t: &TestApp, id: &str) -> Value {
    t.call("GET", &format!("/api/nodes/{id}"), None).await.1
}

/// Inventories are stored off the session loop: poll for the node's status.
async fn wait_for(t: &TestApp, id: &str, status: &str) -> Value {
    for _ in 0..500 {
        let v = node(t, id).await;
        if v["status"] == status {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("node {id} never became {status}: {}", node(t, id).await);
}

/// Runs the dispatched command to its end with `finished` = `outcome`.
async fn finish_next(a: &mut FakeAgent, outcome: Value) -> trellis_protocol::Dispatch {
    let d = dispatched(a).await;
    let id = d.command_id.to_string();
    a.send(json!({"type": "accept", "command_id": id}));
    let mut fin = json!({"kind": "finished"});
    fin.as_object_mut()
        .unwrap()
        .extend(outcome.as_object().unwrap().clone());
    a.send(json!({"type": "events", "events": [event(&id, 1, fin)]}));
    acked(a, 1).await;
    d
}

#[tokio::test]
async fn power_commands_move_the_node_to_the_state_proxmox_reported() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-l1").await;
    let mut a = FakeAgent::connect(&t, &agent, &CAPS).await;
    let (n, _) = running_node(&t, &mut a, &agent, "web-1", 201).await;
    assert_eq!(node(&t, &n).await["vmNode"], "pve");

    let (st, v) = t
        .call(
            "POST",
            &format!("/api/nodes/{n}/power"),
            Some(json!({"action": "shutdown", "forceAfterS": 30})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    // A second action while one runs is refused.
    let (st, e) = t
        .call(
            "POST",
            &format!("/api/nodes/{n}/power"),
            Some(json!({"action": "start"})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("node_busy"))
    );
    let d = finish_next(
        &mut a,
        json!({"status": "succeeded",
        "result": {"vm_id": 201, "node": "pve", "status": "stopped", "forced": true}}),
    )
    .await;
    assert_eq!(d.command_type, "vm_power");
    assert_eq!(d.params["action"], "shutdown");
    assert_eq!(d.params["force_after_s"], 30);
    assert_eq!(d.params["vm_id"], 201);
    assert_eq!(node(&t, &n).await["status"], "stopped");

    t.call(
        "POST",
        &format!("/api/nodes/{n}/power"),
        Some(json!({"action": "start"})),
    )
    .await;
    finish_next(
        &mut a,
        json!({"status": "succeeded",
        "result": {"vm_id": 201, "node": "pve", "status": "running"}}),
    )
    .await;
    assert_eq!(node(&t, &n).await["status"], "running");

    // A failed power action keeps the status and shows why.
    t.call(
        "POST",
        &format!("/api/nodes/{n}/power"),
        Some(json!({"action": "shutdown"})),
    )
    .await;
    let d = finish_next(
        &mut a,
        json!({"status": "failed",
        "error": {"code": "shutdown_timeout", "message": "the guest did not shut down"}}),
    )
    .await;
    let v = node(&t, &n).await;
    assert_eq!(v["status"], "running");
    assert_eq!(v["error"], "shutdown_timeout: the guest did not shut down");
    // A VM action runs again from the node (which checks its state), never as a blind retry.
    let (st, e) = t
        .call(
            "POST",
            &format!("/api/commands/{}/retry", d.command_id),
            None,
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("not_retryable"))
    );
    t.stop().await;
}

#[tokio::test]
async fn destroy_needs_the_typed_name_sends_the_tag_and_keeps_the_record() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-l2").await;
    let mut a = FakeAgent::connect(&t, &agent, &CAPS).await;
    let (n, provision) = running_node(&t, &mut a, &agent, "db-1", 202).await;

    // No path drops the record while its VM lives.
    let (st, e) = t.call("DELETE", &format!("/api/nodes/{n}"), None).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("vm_exists"))
    );
    let (st, e) = t
        .call(
            "POST",
            &format!("/api/nodes/{n}/destroy"),
            Some(json!({"confirmName": "db-2"})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("confirmation_mismatch"))
    );

    let (st, v) = t
        .call(
            "POST",
            &format!("/api/nodes/{n}/destroy"),
            Some(json!({"confirmName": "db-1"})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["node"]["status"], "destroying");
    let d = dispatched(&mut a).await;
    assert_eq!(d.command_type, "destroy");
    assert_eq!(
        d.params["expected_tag"],
        format!("trellis-command={provision}")
    );
    let id = d.command_id.to_string();
    a.send(json!({"type": "accept", "command_id": id}));
    a.send(json!({"type": "events", "events": [event(&id, 1, json!({"kind": "finished", "status": "succeeded",
        "result": {"vm_id": 202, "node": "pve", "already_gone": false}}))]}));
    acked(&mut a, 1).await;
    let v = node(&t, &n).await;
    assert_eq!(v["status"], "destroyed");
    assert_eq!(v["vmId"], 202, "the record keeps its history");
    // A destroyed node's record may go now.
    let (st, _) = t.call("DELETE", &format!("/api/nodes/{n}"), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    t.stop().await;
}

#[tokio::test]
async fn a_refused_destroy_fails_the_node_with_the_reason() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-l3").await;
    let mut a = FakeAgent::connect(&t, &agent, &CAPS).await;
    let (n, _) = running_node(&t, &mut a, &agent, "db-2", 203).await;
    t.call(
        "POST",
        &format!("/api/nodes/{n}/destroy"),
        Some(json!({"confirmName": "db-2"})),
    )
    .await;
    finish_next(&mut a, json!({"status": "failed",
        "error": {"code": "vm_tag_mismatch", "message": "VM 203 does not carry this node's tag", "stage": "check_tag"}})).await;
    let v = node(&t, &n).await;
    assert_eq!(v["status"], "failed");
    assert_eq!(
        v["error"],
        "vm_tag_mismatch (stage check_tag): VM 203 does not carry this node's tag"
    );
    // Forget keeps the VM and drops the record.
    let (st, f) = t
        .call("POST", &format!("/api/nodes/{n}/forget"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(f["vmId"], 203);
    let (st, _) = t.call("GET", &format!("/api/nodes/{n}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    t.stop().await;
}

#[tokio::test]
async fn the_inventory_moves_nodes_whose_vm_drifted_and_lists_untracked_trellis_vms() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-l4").await;
    let mut a = FakeAgent::connect(&t, &agent, &CAPS).await;
    let (n1, c1) = running_node(&t, &mut a, &agent, "app-1", 301).await;
    let (n2, _) = running_node(&t, &mut a, &agent, "app-2", 302).await;
    let stranger = "trellis-command=6f1c2a9e-0000-4000-8000-000000000001";
    // 301 was stopped outside Trellis (and moved); 302 was deleted; 303 is a Trellis VM
    // nobody tracks.
    let report = json!({"type": "inventory", "vms": [
        {"vm_id": 301, "node": "pve2", "name": "app-1", "status": "stopped", "tag": format!("trellis-command={c1}")},
        {"vm_id": 303, "node": "pve", "name": "left-over", "status": "running", "tag": stranger},
        {"vm_id": 9000, "node": "pve", "name": "other", "status": "running"},
    ]});
    a.send(report.clone());
    let v1 = wait_for(&t, &n1, "stopped").await;
    assert_eq!(v1["vmNode"], "pve2", "it migrated");
    // One report without a VM may be a partial listing: missing takes two in a row.
    assert_eq!(node(&t, &n2).await["status"], "running");
    a.send(report);
    let v2 = wait_for(&t, &n2, "missing").await;
    assert!(
        v2["error"].as_str().unwrap().starts_with("vm_missing"),
        "{v2}"
    );
    let (_, vms) = t
        .call("GET", &format!("/api/agents/{agent}/vms"), None)
        .await;
    let items = vms["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let by = |id: i64| items.iter().find(|v| v["vmId"] == id).unwrap();
    assert_eq!(by(301)["nodeId"], n1.as_str());
    assert_eq!(by(303)["nodeId"], Value::Null);
    assert!(by(303)["tag"]
        .as_str()
        .unwrap()
        .starts_with("trellis-command="));

    // It comes back running (started outside Trellis). A VM at 302 with another Trellis
    // tag (Proxmox reused the id) is not the missing node's.
    a.send(json!({"type": "inventory", "vms": [
        {"vm_id": 301, "node": "pve2", "name": "app-1", "status": "running", "tag": format!("trellis-command={c1}")},
        {"vm_id": 302, "node": "pve", "name": "someone-else", "status": "running", "tag": stranger},
    ]}));
    wait_for(&t, &n1, "running").await;
    assert_eq!(node(&t, &n2).await["status"], "missing");
    // A missing node's record may be deleted (its VM is gone).
    let (st, _) = t.call("DELETE", &format!("/api/nodes/{n2}"), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    t.stop().await;
}

#[tokio::test]
async fn a_destroy_the_agent_lost_runs_again_and_the_node_stays_destroying() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-l5").await;
    let mut a = FakeAgent::connect(&t, &agent, &CAPS).await;
    let (n, _) = running_node(&t, &mut a, &agent, "tmp-1", 401).await;
    t.call(
        "POST",
        &format!("/api/nodes/{n}/destroy"),
        Some(json!({"confirmName": "tmp-1"})),
    )
    .await;
    let d = dispatched(&mut a).await;
    let first = d.command_id.to_string();
    a.send(json!({"type": "accept", "command_id": first}));
    // The agent dies mid-way and comes back without the command (it was interrupted).
    drop(a);
    let mut a =
        FakeAgent::connect_with(&t, &agent, &CAPS, json!({"interrupted_commands": [first]})).await;
    let again = dispatched(&mut a).await;
    assert_ne!(again.command_id.to_string(), first);
    assert_eq!(again.command_type, "destroy");
    assert_eq!(again.attempt, 2);
    let v = node(&t, &n).await;
    assert_eq!(v["status"], "destroying");
    assert_eq!(v["lastCommandId"], again.command_id.to_string());
    let (_, lost) = t.call("GET", &format!("/api/commands/{first}"), None).await;
    assert_eq!(lost["error"]["code"], "agent_lost_command");
    let id = again.command_id.to_string();
    a.send(json!({"type": "accept", "command_id": id}));
    a.send(json!({"type": "events", "events": [event(&id, 1, json!({"kind": "finished", "status": "succeeded",
        "result": {"vm_id": 401, "node": "pve", "already_gone": true}}))]}));
    acked(&mut a, 1).await;
    assert_eq!(node(&t, &n).await["status"], "destroyed");
    t.stop().await;
}

#[tokio::test]
async fn a_vm_kept_after_a_failed_provision_is_recorded_so_it_can_be_destroyed() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-l6").await;
    let mut a = FakeAgent::connect(&t, &agent, &CAPS).await;
    let tpl = t.mapped_template().await;
    let (_, v) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": "kept-1", "templateId": tpl,
                        "provision": {"agentId": agent, "keepOnFailure": true}})),
        )
        .await;
    let n = v["node"]["id"].as_str().unwrap().to_string();
    let provision = v["commandId"].as_str().unwrap().to_string();
    let d = finish_next(
        &mut a,
        json!({"status": "failed", "error": {"code": "network_timeout", "message": "no IPv4",
            "stage": "wait_network", "details": {"status": "partial", "vm_id": 501, "node": "pve"}}}),
    )
    .await;
    assert_eq!(d.params["keep_on_failure"], true);
    let v = node(&t, &n).await;
    assert_eq!(v["status"], "failed");
    assert_eq!(v["vmId"], 501, "the kept VM is tracked");
    let (st, e) = t.call("DELETE", &format!("/api/nodes/{n}"), None).await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("vm_exists"))
    );
    let (st, v) = t
        .call(
            "POST",
            &format!("/api/nodes/{n}/destroy"),
            Some(json!({"confirmName": "kept-1"})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let d = dispatched(&mut a).await;
    assert_eq!(d.params["vm_id"], 501);
    assert_eq!(
        d.params["expected_tag"],
        format!("trellis-command={provision}")
    );
    t.stop().await;
}
