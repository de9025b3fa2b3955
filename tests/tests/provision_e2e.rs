//! Provisioning end to end: the real `trellis`, a real `tendril` and the Proxmox VE API
//! simulator. Nodes and templates through the API, stages as they happen, the node
//! updated by the control plane, failures, retries and an agent killed mid-provision.

use std::time::Duration;

use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::pve_sim::Faults;
use trellis_tests::sse;

type Stack = ProxmoxStack;

async fn stack(backend: Backend, name: &str, sim_args: &[&str]) -> Stack {
    proxmox_stack(backend, name, sim_args, &[]).await
}

const FAST: &[&str] = &[
    "--clone-ms",
    "300",
    "--start-ms",
    "200",
    "--agent-boot-ms",
    "600",
    "--exec-ms",
    "50",
];

async fn template_id(api: &Api, name_prefix: &str) -> String {
    let t = api.get("/api/templates").await;
    t["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().starts_with(name_prefix))
        .map(|t| t["id"].as_str().unwrap().to_string())
        .expect("seeded template")
}

async fn new_node(api: &Api, name: &str) -> String {
    let tid = template_id(api, "Debian 12").await;
    let v = api
        .post(
            "/api/nodes",
            json!({"name": name, "templateId": tid, "application": "web"}),
        )
        .await;
    v["node"]["id"].as_str().unwrap().to_string()
}

fn stage_names(c: &Value) -> Vec<(String, String)> {
    c["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn provision_node(backend: Backend) {
    let s = stack(backend, "prov", FAST).await;
    let api = &s.api;
    // the agent's real Proxmox templates
    let t = api
        .get(&format!("/api/agents/{}/templates", s.agent_id))
        .await;
    let vmids: Vec<i64> = t["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["vmid"].as_i64().unwrap())
        .collect();
    assert!(vmids.contains(&9000), "{t}");

    let node = new_node(api, "web-1").await;
    let v = api
        .post(
            &format!("/api/nodes/{node}/provision"),
            json!({"agentId": s.agent_id}),
        )
        .await;
    assert_eq!(v["node"]["status"], "provisioning");
    let cid = v["commandId"].as_str().unwrap().to_string();
    // stages advance while it runs: sample the polling endpoint
    let mut seen_running = std::collections::BTreeSet::new();
    let c = loop {
        let c = api.get(&format!("/api/commands/{cid}")).await;
        for (name, state) in stage_names(&c) {
            if state == "running" {
                seen_running.insert(name);
            }
        }
        if ["succeeded", "failed", "cancelled", "timed_out"]
            .contains(&c["status"].as_str().unwrap())
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    assert_eq!(c["status"], "succeeded", "{c}");
    let stages = stage_names(&c);
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "clone_template",
            "configure_vm",
            "start_vm",
            "wait_network",
            "post_provision",
            "register"
        ]
    );
    assert!(
        stages.iter().all(|(_, st)| st == "completed"),
        "a finished command must show every stage completed: {stages:?}\n{c}\nagent log:\n{}\ncontrol plane log:\n{}",
        s.agent.log(),
        s.cp.log()
    );
    // Every stage was reported as it started and as it ended, in order (from the stored
    // event stream, which is what the UI follows).
    let text = sse::fetch_text(api, &cid, None).await;
    let mut transitions: Vec<(String, String)> = sse::parse(&text)
        .iter()
        .filter(|e| e.event == "stage")
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            (
                v["stage"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    transitions.dedup();
    let expected: Vec<(String, String)> = names
        .iter()
        .flat_map(|n| {
            [
                (n.to_string(), "running".to_string()),
                (n.to_string(), "completed".to_string()),
            ]
        })
        .collect();
    assert_eq!(transitions, expected, "{text}");
    let _ = seen_running;
    let r = &c["result"];
    assert_eq!(r["status"], "completed");
    let vm_id = r["vm_id"].as_i64().unwrap();
    assert!(vm_id >= 100);
    // the node is updated by the control plane
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "running", "{n}");
    assert_eq!(n["vmId"], vm_id);
    assert_eq!(n["hypervisorId"], json!(s.agent_id));
    assert_eq!(n["ipAddress"], r["ip_address"]);
    assert!(n["ipAddress"].as_str().unwrap().contains('.'));
    // the VM exists in "Proxmox" with the configured size
    let vms = s.sim.created_vms().await.unwrap();
    let vm = vms
        .iter()
        .find(|v| i64::from(v.vmid) == vm_id)
        .expect("vm in sim");
    assert_eq!(vm.name, "web-1");
    assert_eq!(vm.memory, 2048);
    assert_eq!(vm.status, "running");
    // post-provision command output was logged
    let logs = api.all_logs(&cid).await;
    assert!(
        logs.iter()
            .any(|l| l["data"].as_str().unwrap().contains("hostname")),
        "{logs:?}"
    );
    // provisioning again is refused
    let (st, e) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/nodes/{node}/provision"),
            Some(json!({"agentId": s.agent_id})),
        )
        .await;
    assert_eq!(st, 409);
    assert_eq!(e["error"]["code"], "already_provisioned");
}
on_both_backends!(provision, provision_node);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_provisions_get_distinct_vmids() {
    let s = stack(Backend::Sqlite, "prov-par", FAST).await;
    let api = &s.api;
    let mut cmds = Vec::new();
    for i in 0..3 {
        let node = new_node(api, &format!("par-{i}")).await;
        let v = api
            .post(
                &format!("/api/nodes/{node}/provision"),
                json!({"agentId": s.agent_id}),
            )
            .await;
        cmds.push((node, v["commandId"].as_str().unwrap().to_string()));
    }
    let mut vmids = std::collections::BTreeSet::new();
    for (node, cid) in &cmds {
        let c = api.wait_done(cid, Duration::from_secs(60)).await;
        assert_eq!(c["status"], "succeeded", "{c}");
        let n = api.get(&format!("/api/nodes/{node}")).await;
        vmids.insert(n["vmId"].as_i64().unwrap());
    }
    assert_eq!(vmids.len(), 3, "distinct VMIDs: {vmids:?}");
    assert_eq!(s.sim.created_vms().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_clone_shows_error_and_retry_succeeds() {
    let s = stack(Backend::Sqlite, "prov-fail", FAST).await;
    let api = &s.api;
    s.sim
        .set_faults(&Faults {
            fail_next_clone: Some("storage 'local-lvm' is full".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let node = new_node(api, "db-1").await;
    let v = api
        .post(
            &format!("/api/nodes/{node}/provision"),
            json!({"agentId": s.agent_id}),
        )
        .await;
    let cid = v["commandId"].as_str().unwrap().to_string();
    let c = api.wait_done(&cid, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["stage"], "clone_template", "{c}");
    assert!(
        c["error"]["message"].as_str().unwrap().contains("is full"),
        "{c}"
    );
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "failed");
    assert!(
        n["error"].as_str().unwrap().contains("clone_template"),
        "{n}"
    );
    assert!(n["vmId"].is_null());
    assert!(
        s.sim.created_vms().await.unwrap().is_empty(),
        "half-built VM cleaned up"
    );
    // retry: a new attempt that takes over the node
    let v = api
        .post(&format!("/api/commands/{cid}/retry"), json!({}))
        .await;
    let retry = v["commandId"].as_str().unwrap().to_string();
    assert_eq!(
        api.get(&format!("/api/nodes/{node}")).await["status"],
        "provisioning"
    );
    let c = api.wait_done(&retry, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["attempt"], 2);
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "running");
    assert_eq!(n["lastCommandId"], json!(retry));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_never_up_fails_at_wait_network_and_cleans_up() {
    let s = stack(Backend::Sqlite, "prov-noip", FAST).await;
    let api = &s.api;
    s.sim
        .set_faults(&Faults {
            agent_never_up: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let cid = api
        .command(
            &s.agent_id,
            "provision",
            json!({"name": "noip-1", "network_timeout_secs": 2,
                   "template": {"type": "proxmox", "template_id": 9000, "memory": 1024, "cores": 1}}),
        )
        .await;
    let c = api.wait_done(&cid, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["stage"], "wait_network", "{c}");
    let states: Vec<(String, String)> = stage_names(&c);
    assert!(
        states.contains(&("wait_network".into(), "failed".into())),
        "{states:?}"
    );
    assert!(
        s.sim.created_vms().await.unwrap().is_empty(),
        "VM destroyed after the failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_wait_network_never_makes_a_second_vm() {
    let mut s = stack(
        Backend::Sqlite,
        "prov-kill",
        &[
            "--clone-ms",
            "300",
            "--start-ms",
            "200",
            "--agent-boot-ms",
            "4000",
        ],
    )
    .await;
    let api = s.api.clone();
    let node = new_node(&api, "kill-1").await;
    let v = api
        .post(
            &format!("/api/nodes/{node}/provision"),
            json!({"agentId": s.agent_id}),
        )
        .await;
    let cid = v["commandId"].as_str().unwrap().to_string();
    api.wait_until(Duration::from_secs(30), || async {
        let c = api.get(&format!("/api/commands/{cid}")).await;
        stage_names(&c).contains(&("wait_network".into(), "running".into()))
    })
    .await;
    s.agent.kill();
    s.agent.restart();
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "agent_lost_command");
    assert_eq!(
        api.get(&format!("/api/nodes/{node}")).await["status"],
        "failed"
    );
    // retry: finds the VM it tagged instead of cloning a second one
    api.wait_agent_online(&s.agent_id).await;
    let v = api
        .post(&format!("/api/commands/{cid}/retry"), json!({}))
        .await;
    let retry = v["commandId"].as_str().unwrap().to_string();
    let c = api.wait_done(&retry, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let vms = s.sim.created_vms().await.unwrap();
    assert_eq!(vms.len(), 1, "exactly one VM: {vms:?}");
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["vmId"], i64::from(vms[0].vmid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_bad_provision_requests() {
    let s = stack(Backend::Sqlite, "prov-errors", FAST).await;
    let api = &s.api;
    // template not mapped to Proxmox
    let unmapped = template_id(api, "Unmapped").await;
    let v = api
        .post("/api/nodes", json!({"name": "x-1", "templateId": unmapped}))
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let (st, e) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/nodes/{node}/provision"),
            Some(json!({"agentId": s.agent_id})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str().unwrap()),
        (400, "template_not_mapped"),
        "{e}"
    );
    // invalid memory / cores / name
    let tid = template_id(api, "Debian 12").await;
    for (body, needle) in [
        (
            json!({"name": "ok-1", "templateId": tid, "memory": 1}),
            "memory",
        ),
        (
            json!({"name": "ok-1", "templateId": tid, "cores": 0}),
            "cores",
        ),
        (json!({"name": "not ok", "templateId": tid}), "name"),
    ] {
        let (st, e) = api
            .call(reqwest::Method::POST, "/api/nodes", Some(body))
            .await;
        assert_eq!(st, 400, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{e}"
        );
    }
    // a double-clicked Provision starts one provisioning, not two
    let dbl = new_node(api, "dbl-1").await;
    let path = format!("/api/nodes/{dbl}/provision");
    let body = json!({"agentId": s.agent_id});
    let (a, b) = tokio::join!(
        api.call(reqwest::Method::POST, &path, Some(body.clone())),
        api.call(reqwest::Method::POST, &path, Some(body.clone()))
    );
    let mut codes = [a.0, b.0];
    codes.sort();
    assert_eq!(codes, [202, 409], "{a:?} {b:?}");
    // a Proxmox template id that the host does not have
    let cid = api
        .command(&s.agent_id, "provision", json!({"name": "ghost-1", "template": {"type": "proxmox", "template_id": 4242, "memory": 512, "cores": 1}}))
        .await;
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "failed");
    assert!(
        c["error"]["message"].as_str().unwrap().contains("4242"),
        "{c}"
    );
    // an agent without Proxmox cannot provision; an offline one is refused
    let (plain_id, plain_token) = api.create_agent("no-proxmox").await;
    let node2 = new_node(api, "y-1").await;
    let (st, e) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/nodes/{node2}/provision"),
            Some(json!({"agentId": plain_id})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str().unwrap()),
        (409, "agent_offline"),
        "{e}"
    );
    let _plain = Agent::start(&s.cp.ws_url(), &plain_token, &s.dir.join("plain"));
    api.wait_agent_online(&plain_id).await;
    let (st, e) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/nodes/{node2}/provision"),
            Some(json!({"agentId": plain_id})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str().unwrap()),
        (409, "capability_missing"),
        "{e}"
    );
    let (st, e) = api
        .call(
            reqwest::Method::GET,
            &format!("/api/agents/{plain_id}/templates"),
            None,
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str().unwrap()),
        (409, "capability_missing"),
        "{e}"
    );
}
