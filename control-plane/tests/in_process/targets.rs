//! A command's `target`: the node it acts on by name (read with the command, so a renamed
//! node shows its new name), the VM, or the Terraform workspace; commands of one type can
//! be told apart in the list.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{FakeAgent, TestApp};
use crate::session::{acked, dispatched, event};

/// Accepts the next dispatched command and finishes it with `outcome`.
async fn finish_next(a: &mut FakeAgent, outcome: Value) -> String {
    let d = dispatched(a).await;
    let id = d.command_id.to_string();
    a.send(json!({"type": "accept", "command_id": id}));
    let mut fin = json!({"kind": "finished"});
    fin.as_object_mut()
        .unwrap()
        .extend(outcome.as_object().unwrap().clone());
    a.send(json!({"type": "events", "events": [event(&id, 1, fin)]}));
    acked(a, 1).await;
    id
}

async fn new_node(t: &TestApp, tpl: &str, agent: &str, name: &str) -> (String, String) {
    let (st, v) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": name, "templateId": tpl, "provision": {"agentId": agent}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    (
        v["node"]["id"].as_str().unwrap().to_string(),
        v["commandId"].as_str().unwrap().to_string(),
    )
}

fn item<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("command {id} not listed: {list}"))
}

#[tokio::test]
async fn commands_name_their_target_node_vm_and_workspace() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-t1").await;
    let mut a = FakeAgent::connect(
        &t,
        &agent,
        &[
            "provision",
            "vm_power",
            "destroy",
            "terraform_apply",
            "ping",
        ],
    )
    .await;
    let tpl = t.mapped_template().await;

    // Two provisions of the same template: one succeeds as VM 301, one fails after the
    // agent removed its half-built VM 302.
    let (web1, p1) = new_node(&t, &tpl, &agent, "web-1").await;
    finish_next(
        &mut a,
        json!({"status": "succeeded", "result": {"vm_id": 301, "node": "pve", "ip_address": "10.0.0.9",
            "name": "web-1", "status": "completed", "stages_completed": []}}),
    )
    .await;
    let (web2, p2) = new_node(&t, &tpl, &agent, "web-2").await;
    finish_next(
        &mut a,
        json!({"status": "failed", "error": {"code": "proxmox_error", "message": "disk full",
            "stage": "configure_vm", "details": {"vm_id": 302, "node": "pve", "status": "cleaned_up"}}}),
    )
    .await;
    // A power action on web-1.
    let (st, v) = t
        .call(
            "POST",
            &format!("/api/nodes/{web1}/power"),
            Some(json!({"action": "stop"})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let power = finish_next(
        &mut a,
        json!({"status": "succeeded", "result": {"vm_id": 301, "node": "pve", "status": "stopped"}}),
    )
    .await;
    // A Terraform apply and a ping, made directly.
    let (st, tf) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "terraform_apply", "params": {
                "template_source": {"repo": "https://git.example/infra.git", "version": "v3", "path": "envs/prod"}}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{tf}");
    let tf = tf["commandId"].as_str().unwrap().to_string();
    let (st, ping) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{ping}");
    let ping = ping["commandId"].as_str().unwrap().to_string();

    let (st, list) = t.call("GET", "/api/commands", None).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let t1 = &item(&list, &p1)["target"];
    assert_eq!(
        (
            t1["nodeId"].as_str(),
            t1["nodeName"].as_str(),
            t1["vmId"].as_i64()
        ),
        (Some(web1.as_str()), Some("web-1"), Some(301))
    );
    let t2 = &item(&list, &p2)["target"];
    assert_eq!(
        (t2["nodeName"].as_str(), t2["vmId"].as_i64()),
        (Some("web-2"), Some(302)),
        "a failed provision names its node and the VM it had built"
    );
    let tp = &item(&list, &power)["target"];
    assert_eq!(
        (
            tp["nodeName"].as_str(),
            tp["vmId"].as_i64(),
            tp["proxmoxNode"].as_str()
        ),
        (Some("web-1"), Some(301), Some("pve"))
    );
    // The state workspace's own name (as /api/terraform/workspaces lists it), the
    // version apart.
    assert_eq!(
        (
            item(&list, &tf)["target"]["workspace"].as_str(),
            item(&list, &tf)["target"]["version"].as_str()
        ),
        (Some("https://git.example/infra.git#envs/prod"), Some("v3"))
    );
    assert!(
        item(&list, &ping).get("target").is_none(),
        "a ping acts on nothing"
    );

    // The name is read with the command: a renamed node shows its new name, in the list
    // and on the single read; the status filter still works with the join.
    let (st, v) = t
        .call(
            "PUT",
            &format!("/api/nodes/{web2}"),
            Some(json!({"name": "web-2-renamed"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, one) = t.call("GET", &format!("/api/commands/{p2}"), None).await;
    assert_eq!(one["target"]["nodeName"], "web-2-renamed", "{one}");
    assert_eq!(one["target"]["nodeId"], web2.as_str());
    let (_, failed) = t.call("GET", "/api/commands?status=failed", None).await;
    let items = failed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{failed}");
    assert_eq!(items[0]["target"]["nodeName"], "web-2-renamed");
    // Keyset paging over the join: one per page, every command once.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let path = match &before {
            Some(b) => format!("/api/commands?limit=1&before={b}"),
            None => "/api/commands?limit=1".to_string(),
        };
        let (st, page) = t.call("GET", &path, None).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        for c in page["items"].as_array().unwrap() {
            seen.push(c["id"].as_str().unwrap().to_string());
        }
        match page["nextBefore"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "{seen:?}");
    t.stop().await;
}
