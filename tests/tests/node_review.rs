//! Review findings of issue 10 in node creation, bulk provisioning and import:
//! * a bulk provision's explicit VMID and static address are start values: node `i` gets
//!   `vmId + i` and `address + i` (gateway unchanged), refused as a whole when the range
//!   leaves the subnet; pve-sim records what each VM got;
//! * a batch's nodes list in their `{n}` order (web-2 before web-10);
//! * create-with-provision is all or nothing: a refused provision leaves no node behind
//!   and the same request works once the cause is fixed, without `force`;
//! * import keeps a VM's Trellis tag only when that provision made this very VM: a VM
//!   tagged by hand (or cloned from a Trellis VM) is imported untagged, so destroy is
//!   refused for it.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;

const FAST: &[&str] = &[
    "--clone-ms",
    "100",
    "--start-ms",
    "100",
    "--agent-boot-ms",
    "200",
    "--exec-ms",
    "20",
];

async fn template(api: &Api) -> String {
    let v = api
        .post(
            "/api/templates",
            json!({"name": "review", "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9000, "networkBridge": "vmbr0"}),
        )
        .await;
    v["id"].as_str().expect("template id").to_string()
}

fn param<'a>(r: &'a trellis_tests::pve_sim::RecordedRequest, key: &str) -> Option<&'a str> {
    r.params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

async fn node_names(api: &Api) -> Vec<String> {
    api.get("/api/nodes").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

async fn bulk_values_count_up(backend: Backend) {
    let s = proxmox_stack(backend, "review-bulk", FAST, &[]).await;
    let api = &s.api;
    let tid = template(api).await;
    // The gateway is .1 of the /24 (none in the /32; .11 for the range from .9).
    let gateway = |address: &str| match address {
        "10.0.0.10/32" => Value::Null,
        "10.0.0.9/24" => json!("10.0.0.11"),
        _ => json!("10.0.0.1"),
    };
    let batch = |count: u32, address: &str| {
        json!({"count": count, "namePattern": "web-{n}", "templateId": tid,
               "provision": {"agentId": s.agent_id, "cloneOptions": {
                   "vmId": 500,
                   "ipConfig": {"mode": "static", "address": address, "gateway": gateway(address)}}}})
    };

    // A range that reaches the broadcast address or leaves the subnet is refused, and
    // nothing is created.
    for (count, address, what) in [
        (3, "10.0.0.253/24", "broadcast"),
        (2, "10.0.0.10/32", "outside 10.0.0.10/32"),
        (3, "10.0.0.9/24", "gateway"),
    ] {
        let (st, e) = api
            .call(
                Method::POST,
                "/api/nodes/batches",
                Some(batch(count, address)),
            )
            .await;
        assert_eq!(st, 400, "{address}: {e}");
        assert_eq!(e["error"]["code"], "invalid_params", "{e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.starts_with("cloneOptions.ipConfig.address"), "{m}");
        assert!(m.contains(what), "{m}");
    }
    let (st, e) = api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(
                json!({"count": 2, "namePattern": "web-{n}", "templateId": tid,
                "provision": {"agentId": s.agent_id, "cloneOptions": {"vmId": 999_999_999}}}),
            ),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cloneOptions.vmId"),
        "{e}"
    );
    assert!(node_names(api).await.is_empty());

    // 11 nodes: VMIDs 500..=510, addresses .10 to .20, one gateway.
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(batch(11, "10.0.0.10/24")),
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let batch_id = v["batchId"].as_str().unwrap().to_string();
    let mut expected = Vec::new();
    for (i, n) in v["nodes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(n["name"], format!("web-{}", i + 1), "{v}");
        let c = api
            .wait_done(n["commandId"].as_str().unwrap(), Duration::from_secs(90))
            .await;
        assert_eq!(c["status"], "succeeded", "{c}");
        let vm = 500 + i as i64;
        let address = format!("10.0.0.{}/24", 10 + i);
        assert_eq!(c["params"]["clone_options"]["vm_id"], vm, "{c}");
        assert_eq!(c["result"]["vm_id"], vm, "{c}");
        expected.push((vm, address));
    }
    let clones = s.sim.requests("/clone").await.unwrap();
    for (vm, address) in &expected {
        assert!(
            clones
                .iter()
                .any(|r| param(r, "newid") == Some(&vm.to_string())),
            "no clone to VM {vm}: {clones:?}"
        );
        let configs = s.sim.requests(&format!("/qemu/{vm}/config")).await.unwrap();
        let ip = configs
            .iter()
            .find_map(|r| param(r, "ipconfig0"))
            .unwrap_or_else(|| panic!("no ipconfig0 for VM {vm}: {configs:?}"));
        assert_eq!(ip, format!("ip={address},gw=10.0.0.1"), "VM {vm}");
    }

    // The batch lists in {n} order (its nodes share one timestamp): web-2 before web-10.
    let listed: Vec<String> = api.get(&format!("/api/nodes?batchId={batch_id}")).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (1..=11).map(|i| format!("web-{i}")).collect();
    assert_eq!(listed, want);
    assert_eq!(node_names(api).await, want);
}
on_both_backends!(bulk_vmid_and_address, bulk_values_count_up);

async fn create_with_provision_is_atomic(backend: Backend) {
    let s = proxmox_stack(backend, "review-create", FAST, &[]).await;
    let api = &s.api;
    let tid = template(api).await;
    // Registered, never connected: offline.
    let (offline, _token) = api.create_agent("offline-lab").await;
    let body =
        |agent: &str| json!({"name": "solo", "templateId": tid, "provision": {"agentId": agent}});
    let (st, e) = api
        .call(Method::POST, "/api/nodes", Some(body(&offline)))
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "agent_offline", "{e}");
    assert!(node_names(api).await.is_empty(), "a node was left behind");
    // An invalid clone option is refused before anything is stored, too.
    let (st, e) = api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "solo", "templateId": tid,
                "provision": {"agentId": s.agent_id, "cloneOptions": {"storage": "bad storage!"}}})),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(node_names(api).await.is_empty(), "a node was left behind");

    // The same request to the online hypervisor works, without force.
    let (st, v) = api
        .call(Method::POST, "/api/nodes", Some(body(&s.agent_id)))
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["node"]["name"], "solo");
    assert_eq!(v["node"]["status"], "provisioning", "{v}");
    let c = api
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(node_names(api).await, ["solo"]);
    // The name is now taken: duplicate_name, and no second node.
    let (st, e) = api
        .call(Method::POST, "/api/nodes", Some(body(&s.agent_id)))
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "duplicate_name", "{e}");
    assert_eq!(node_names(api).await, ["solo"]);
}
on_both_backends!(create_atomic, create_with_provision_is_atomic);

async fn wait_vm_tag(api: &Api, agent: &str, vm_id: i64, tag: &str) {
    let path = format!("/api/agents/{agent}/vms");
    api.wait_until(Duration::from_secs(30), || async {
        let v: Value = api.get(&path).await;
        v["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|vm| vm["vmId"] == vm_id && vm["tag"] == tag))
    })
    .await;
}

async fn import_checks_the_tag(backend: Backend) {
    let s = proxmox_stack(
        backend,
        "review-import",
        FAST,
        &[("TRELLIS_INVENTORY_INTERVAL_SECS", "1")],
    )
    .await;
    let api = &s.api;
    let tid = template(api).await;
    let v = api
        .post(
            "/api/nodes",
            json!({"name": "made", "templateId": tid, "provision": {"agentId": s.agent_id}}),
        )
        .await;
    let made_id = v["node"]["id"].as_str().unwrap().to_string();
    let root = v["commandId"].as_str().unwrap().to_string();
    let c = api.wait_done(&root, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let made_vm = c["result"]["vm_id"].as_i64().unwrap();
    let tag = format!("trellis-command={root}");

    // VM 100 (not Trellis's) gets that provision's Proxmox tag by hand.
    s.sim
        .pve(
            Method::PUT,
            "/nodes/pve1/qemu/100/config",
            &[("tags", &format!("trellis-{root}"))],
        )
        .await
        .unwrap();
    wait_vm_tag(api, &s.agent_id, 100, &tag).await;
    let (st, n) = api
        .call(
            Method::POST,
            "/api/nodes/import",
            Some(json!({"agentId": s.agent_id, "vmId": 100, "name": "handmade"})),
        )
        .await;
    assert_eq!(st, 201, "{n}");
    let (st, e) = api
        .call(
            Method::POST,
            &format!("/api/nodes/{}/destroy", n["id"].as_str().unwrap()),
            Some(json!({"confirmName": "handmade"})),
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "vm_untagged", "{e}");
    assert!(s.sim.vms().await.unwrap().iter().any(|v| v.vmid == 100));

    // The VM that provision made, forgotten and imported again, keeps its tag: destroy
    // works.
    let (st, e) = api
        .call(
            Method::POST,
            &format!("/api/nodes/{made_id}/forget"),
            Some(json!({})),
        )
        .await;
    assert!(st < 300, "forget: {st} {e}");
    wait_vm_tag(api, &s.agent_id, made_vm, &tag).await;
    let n = api
        .post(
            "/api/nodes/import",
            json!({"agentId": s.agent_id, "vmId": made_vm, "name": "made-again"}),
        )
        .await;
    let (st, v) = api
        .call(
            Method::POST,
            &format!("/api/nodes/{}/destroy", n["id"].as_str().unwrap()),
            Some(json!({"confirmName": "made-again"})),
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let c = api
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert!(!s
        .sim
        .vms()
        .await
        .unwrap()
        .iter()
        .any(|v| i64::from(v.vmid) == made_vm));
}
on_both_backends!(import_tag, import_checks_the_tag);
