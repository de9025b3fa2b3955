//! The node lifecycle end to end: the real `trellis`, a real `tendril` and the Proxmox VE
//! API simulator. Power actions move the node to the state Proxmox reached; destroy
//! deletes a tagged VM and keeps the record; an untagged VM is never deleted; a VM
//! stopped, started or deleted behind Trellis's back shows within an inventory interval;
//! an agent killed during a destroy finishes it after a restart; a post-provision failure
//! keeps the working VM (`partial`).

use std::time::Duration;

use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;

type Stack = ProxmoxStack;

const FAST: &[&str] = &[
    "--clone-ms",
    "300",
    "--start-ms",
    "200",
    "--stop-ms",
    "200",
    "--destroy-ms",
    "300",
    "--agent-boot-ms",
    "400",
    "--exec-ms",
    "50",
];

// Inventory every second: drift shows within a second or two.
async fn stack(backend: Backend, name: &str, sim_args: &[&str]) -> Stack {
    proxmox_stack(
        backend,
        name,
        sim_args,
        &[("TRELLIS_INVENTORY_INTERVAL_SECS", "1")],
    )
    .await
}

async fn template(api: &Api, post: &[&str]) -> String {
    let v = api
        .post(
            "/api/templates",
            json!({"name": format!("lifecycle-{}", post.len()), "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9000, "networkBridge": "vmbr0",
                   "postProvisionCommands": post}),
        )
        .await;
    v["id"].as_str().expect("template id").to_string()
}

/// Creates and provisions a node; returns `(node id, vm id)` once it runs.
async fn running_node(s: &Stack, name: &str, post: &[&str]) -> (String, u32) {
    let tid = template(&s.api, post).await;
    let v = s
        .api
        .post(
            "/api/nodes",
            json!({"name": name, "templateId": tid, "provision": {"agentId": s.agent_id}}),
        )
        .await;
    let node = v["node"]["id"].as_str().expect("node id").to_string();
    let cid = v["commandId"].as_str().expect("command id").to_string();
    let c = s.api.wait_done(&cid, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let n = s.api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "running", "{n}");
    (node, n["vmId"].as_u64().unwrap() as u32)
}

async fn node_reaches(s: &Stack, node: &str, status: &str, within: Duration) -> Value {
    let path = format!("/api/nodes/{node}");
    s.api
        .wait_until(within, || async {
            s.api.get(&path).await["status"] == status
        })
        .await;
    s.api.get(&path).await
}

async fn sim_vm(s: &Stack, vmid: u32) -> Option<trellis_tests::pve_sim::VmView> {
    s.sim
        .vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.vmid == vmid)
}

async fn act(s: &Stack, node: &str, path: &str, body: Value) -> Value {
    let v = s.api.post(&format!("/api/nodes/{node}/{path}"), body).await;
    let cid = v["commandId"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    s.api.wait_done(&cid, Duration::from_secs(60)).await
}

async fn power_actions(backend: Backend) {
    let s = stack(backend, "life-power", FAST).await;
    let (node, vmid) = running_node(&s, "pwr-1", &[]).await;
    let c = act(&s, &node, "power", json!({"action": "stop"})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["result"]["status"], "stopped");
    assert_eq!(
        s.api.get(&format!("/api/nodes/{node}")).await["status"],
        "stopped"
    );
    assert_eq!(sim_vm(&s, vmid).await.unwrap().status, "stopped");

    let c = act(&s, &node, "power", json!({"action": "start"})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(
        s.api.get(&format!("/api/nodes/{node}")).await["status"],
        "running"
    );
    assert_eq!(sim_vm(&s, vmid).await.unwrap().status, "running");

    let c = act(&s, &node, "power", json!({"action": "reboot"})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(
        s.api.get(&format!("/api/nodes/{node}")).await["status"],
        "running"
    );

    let c = act(&s, &node, "power", json!({"action": "shutdown"})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(
        s.api.get(&format!("/api/nodes/{node}")).await["status"],
        "stopped"
    );
    // The command ended when Proxmox reported the state, not when the task was queued.
    let stages: Vec<(String, String)> = c["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        stages.contains(&("wait_state".into(), "completed".into())),
        "{stages:?}"
    );
}

on_both_backends!(power, power_actions);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_the_guest_ignores_fails_unless_forced() {
    let s = stack(Backend::Sqlite, "life-acpi", FAST).await;
    let (node, vmid) = running_node(&s, "acpi-1", &[]).await;
    s.sim
        .set_flags(vmid, json!({"ignore_acpi": true}))
        .await
        .unwrap();
    let c = act(
        &s,
        &node,
        "power",
        json!({"action": "shutdown", "timeoutS": 2}),
    )
    .await;
    assert_eq!(c["status"], "failed", "{c}");
    let n = s.api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(
        n["status"], "running",
        "a failed shutdown leaves the node as it was"
    );
    assert!(n["error"].as_str().is_some(), "{n}");
    let c = act(
        &s,
        &node,
        "power",
        json!({"action": "shutdown", "forceAfterS": 1}),
    )
    .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["result"]["forced"], true, "{c}");
    assert_eq!(
        s.api.get(&format!("/api/nodes/{node}")).await["status"],
        "stopped"
    );
}

async fn destroy_deletes_the_vm(backend: Backend) {
    let s = stack(backend, "life-destroy", FAST).await;
    let (node, vmid) = running_node(&s, "gone-1", &[]).await;
    let (st, e) = s
        .api
        .call(reqwest::Method::DELETE, &format!("/api/nodes/{node}"), None)
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "vm_exists");
    let c = act(&s, &node, "destroy", json!({"confirmName": "gone-1"})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert!(sim_vm(&s, vmid).await.is_none(), "the VM is gone");
    let n = s.api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "destroyed");
    assert_eq!(n["vmId"], vmid, "the record keeps its history");
    let (st, _) = s
        .api
        .call(reqwest::Method::DELETE, &format!("/api/nodes/{node}"), None)
        .await;
    assert_eq!(st, 204);
}

on_both_backends!(destroy, destroy_deletes_the_vm);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_refuses_a_vm_without_the_node_tag() {
    let s = stack(Backend::Sqlite, "life-untagged", FAST).await;
    let (node, vmid) = running_node(&s, "mine-1", &[]).await;
    let vm = sim_vm(&s, vmid).await.unwrap();
    // Someone replaced the description (and with it Trellis's tag) in Proxmox.
    s.sim
        .pve(
            reqwest::Method::PUT,
            &format!("/nodes/{}/qemu/{vmid}/config", vm.node),
            &[("description", "hand-made VM")],
        )
        .await
        .unwrap();
    let c = act(&s, &node, "destroy", json!({"confirmName": "mine-1"})).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "vm_tag_mismatch", "{c}");
    assert!(
        sim_vm(&s, vmid).await.is_some(),
        "never delete a VM Trellis did not make"
    );
    let n = s.api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "failed");
    // Forget keeps the VM.
    let (st, _) = s
        .api
        .call(
            reqwest::Method::POST,
            &format!("/api/nodes/{node}/forget"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert!(sim_vm(&s, vmid).await.is_some());
}

async fn drift_is_reflected(backend: Backend) {
    let s = stack(backend, "life-drift", FAST).await;
    let (node, vmid) = running_node(&s, "drift-1", &[]).await;
    let within = Duration::from_secs(15);
    s.sim.set_running(vmid, false).await.unwrap();
    node_reaches(&s, &node, "stopped", within).await;
    s.sim.set_running(vmid, true).await.unwrap();
    node_reaches(&s, &node, "running", within).await;
    s.sim.delete_vm(vmid).await.unwrap();
    let n = node_reaches(&s, &node, "missing", within).await;
    assert!(
        n["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no longer"),
        "{n}"
    );
    // The agent lists the VMs it sees, Trellis-tagged ones among them.
    let vms = s.api.get(&format!("/api/agents/{}/vms", s.agent_id)).await;
    assert!(vms["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["vmId"] != vmid));
}

on_both_backends!(drift, drift_is_reflected);

async fn agent_killed_during_destroy(backend: Backend) {
    // Slow deletes, so the agent dies in the middle of one.
    let mut args = FAST.to_vec();
    let at = args.iter().position(|a| *a == "--destroy-ms").unwrap();
    args[at + 1] = "3000";
    let mut s = stack(backend, "life-kill", &args).await;
    let (node, vmid) = running_node(&s, "kill-1", &[]).await;
    let v = s
        .api
        .post(
            &format!("/api/nodes/{node}/destroy"),
            json!({"confirmName": "kill-1"}),
        )
        .await;
    let cid = v["commandId"].as_str().unwrap().to_string();
    s.api
        .wait_until(Duration::from_secs(30), || async {
            s.api.get(&format!("/api/commands/{cid}")).await["stage"] == "delete_vm"
        })
        .await;
    // SIGKILL mid-delete, then start it again.
    s.agent.restart();
    let n = node_reaches(&s, &node, "destroyed", Duration::from_secs(60)).await;
    assert_eq!(n["vmId"], vmid);
    assert!(sim_vm(&s, vmid).await.is_none(), "the VM is gone");
    // The agent lost the first attempt; the control plane ran it again.
    let first = s.api.get(&format!("/api/commands/{cid}")).await;
    assert_eq!(first["error"]["code"], "agent_lost_command", "{first}");
    let last = n["lastCommandId"].as_str().unwrap();
    let again = s.api.get(&format!("/api/commands/{last}")).await;
    assert_eq!(
        (again["attempt"].as_i64(), again["status"].as_str()),
        (Some(2), Some("succeeded")),
        "{again}"
    );
}

on_both_backends!(killed_destroy, agent_killed_during_destroy);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_provision_failure_ends_partial_and_keeps_the_vm() {
    let s = stack(Backend::Sqlite, "life-partial", FAST).await;
    let tid = template(&s.api, &["hostname", "exit 3"]).await;
    let v = s
        .api
        .post(
            "/api/nodes",
            json!({"name": "part-1", "templateId": tid, "provision": {"agentId": s.agent_id}}),
        )
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let cid = v["commandId"].as_str().unwrap().to_string();
    let c = s.api.wait_done(&cid, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["result"]["status"], "partial", "{c}");
    let n = s.api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "running", "{n}");
    assert!(n["error"].as_str().is_some(), "the error is shown: {n}");
    let vmid = n["vmId"].as_u64().unwrap() as u32;
    assert!(sim_vm(&s, vmid).await.is_some(), "the working VM is kept");
}
