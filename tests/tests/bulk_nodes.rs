//! Many nodes at once, end to end: the real `trellis`, a real `tendril` and the Proxmox VE
//! API simulator. A bulk provision of 10 with one forced clone failure runs at most the
//! agent's concurrency at a time and shows each node's stage and percent in the nodes
//! list; "retry failed" brings the failed one up; a bulk stop gives one result per node
//! and stops the VMs in Proxmox, an unknown node's refusal not failing the others; bad
//! counts and patterns are refused.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::pve_sim::Faults;

const FAST: &[&str] = &[
    "--clone-ms",
    "400",
    "--start-ms",
    "200",
    "--stop-ms",
    "200",
    "--destroy-ms",
    "200",
    "--agent-boot-ms",
    "400",
    "--exec-ms",
    "50",
];

async fn stack(backend: Backend, name: &str) -> ProxmoxStack {
    let s = proxmox_stack(backend, name, FAST, &[]).await;
    let (code, v) = s
        .api
        .call(
            Method::PATCH,
            &format!("/api/agents/{}", s.agent_id),
            Some(json!({"maxConcurrency": 4})),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    s
}

async fn template(api: &Api) -> String {
    let v = api
        .post(
            "/api/templates",
            json!({"name": "bulk", "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9000, "networkBridge": "vmbr0"}),
        )
        .await;
    v["id"].as_str().expect("template id").to_string()
}

async fn batch(s: &ProxmoxStack, tid: &str, count: u32, pattern: &str) -> Value {
    let (code, v) = s
        .api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(
                json!({"count": count, "namePattern": pattern, "templateId": tid,
                        "provision": {"agentId": s.agent_id}}),
            ),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    v
}

async fn batch_nodes(api: &Api, batch: &str) -> Vec<Value> {
    api.get(&format!("/api/nodes?batchId={batch}")).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

fn ids(v: &Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nodeId"].as_str().unwrap().to_string())
        .collect()
}

/// Polls the batch until no node has a command running; returns the largest number of
/// its commands seen dispatched or running at once and whether a stage with a percent
/// was seen in the list.
async fn settle(api: &Api, batch: &str, within: Duration) -> (usize, bool) {
    let t = Instant::now();
    let (mut most, mut staged) = (0, false);
    loop {
        let nodes = batch_nodes(api, batch).await;
        let active = nodes
            .iter()
            .filter(|n| {
                matches!(
                    n["progress"]["commandStatus"].as_str(),
                    Some("dispatched" | "running")
                )
            })
            .count();
        most = most.max(active);
        staged |= nodes.iter().any(|n| {
            n["status"] == "provisioning"
                && n["progress"]["stage"].is_string()
                && n["progress"]["percent"].is_number()
        });
        if nodes.iter().all(|n| n["progress"].is_null()) {
            return (most, staged);
        }
        assert!(t.elapsed() < within, "batch did not settle: {nodes:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bulk(api: &Api, body: Value) -> Value {
    let (code, v) = api.call(Method::POST, "/api/nodes/bulk", Some(body)).await;
    assert_eq!(code, 200, "{v}");
    v
}

async fn bulk_provision_and_retry_failed(backend: Backend) {
    let s = stack(backend, "bulk-10").await;
    let tid = template(&s.api).await;
    // Exactly one clone fails: whichever of the ten the agent clones first.
    s.sim
        .set_faults(&Faults {
            fail_next_clone: Some("storage 'local-lvm' is full".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let v = batch(&s, &tid, 10, "web-{n}").await;
    let batch_id = v["batchId"].as_str().unwrap().to_string();
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (1..=10).map(|n| format!("web-{n}")).collect();
    assert_eq!(names, expected);
    assert!(v["nodes"][0]["commandId"].is_string(), "{v}");

    let (most, staged) = settle(&s.api, &batch_id, Duration::from_secs(90)).await;
    assert!(
        most <= 4,
        "the agent's concurrency (4) was exceeded: {most} at once"
    );
    assert!(
        most >= 2,
        "the batch did not run in parallel (at most {most} at once)"
    );
    assert!(staged, "the nodes list never showed a stage and percent");

    let nodes = batch_nodes(&s.api, &batch_id).await;
    assert_eq!(nodes.len(), 10);
    let failed: Vec<&Value> = nodes.iter().filter(|n| n["status"] == "failed").collect();
    let running = nodes.iter().filter(|n| n["status"] == "running").count();
    assert_eq!((failed.len(), running), (1, 9), "{nodes:#?}");
    let failed_id = failed[0]["id"].as_str().unwrap().to_string();
    assert!(
        failed[0]["error"].as_str().unwrap().contains("local-lvm"),
        "{}",
        failed[0]
    );
    assert!(failed[0]["vmId"].is_null());

    // "Retry failed" on the whole batch: only the failed node is provisioned again.
    let r = bulk(&s.api, json!({"nodeIds": ids(&v), "action": "retry"})).await;
    assert_eq!(
        (r["succeeded"].as_u64(), r["failed"].as_u64()),
        (Some(1), Some(9)),
        "{r}"
    );
    for res in r["results"].as_array().unwrap() {
        if res["nodeId"] == failed_id.as_str() {
            assert!(res["commandId"].is_string(), "{res}");
        } else {
            assert_eq!(res["error"]["code"], "not_retryable", "{res}");
        }
    }
    settle(&s.api, &batch_id, Duration::from_secs(60)).await;
    let n = s.api.get(&format!("/api/nodes/{failed_id}")).await;
    assert_eq!(n["status"], "running", "{n}");
    assert!(n["vmId"].is_number() && n["ipAddress"].is_string(), "{n}");
    let c = s
        .api
        .get(&format!(
            "/api/commands/{}",
            n["lastCommandId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(c["attempt"], 2, "{c}");

    // Ten VMs run in Proxmox, one per node, named as the nodes.
    let vms = s.sim.created_vms().await.unwrap();
    let running: HashSet<String> = vms
        .iter()
        .filter(|v| v.status == "running")
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(running, expected.into_iter().collect::<HashSet<_>>());
}

async fn bulk_stop_destroy_and_unknown_nodes(backend: Backend) {
    let s = stack(backend, "bulk-stop").await;
    let tid = template(&s.api).await;
    let v = batch(&s, &tid, 3, "db-{n}").await;
    let batch_id = v["batchId"].as_str().unwrap().to_string();
    settle(&s.api, &batch_id, Duration::from_secs(60)).await;
    let nodes = batch_nodes(&s.api, &batch_id).await;
    assert!(nodes.iter().all(|n| n["status"] == "running"), "{nodes:#?}");
    let node_ids = ids(&v);

    // Three nodes and two that do not exist: one result each, in order.
    let mut asked = node_ids.clone();
    asked.push("00000000-0000-4000-8000-000000000000".into());
    asked.push("not-a-node".into());
    let r = bulk(&s.api, json!({"nodeIds": asked, "action": "stop"})).await;
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "{r}");
    assert_eq!(
        (r["succeeded"].as_u64(), r["failed"].as_u64()),
        (Some(3), Some(2))
    );
    for (res, id) in results.iter().zip(&asked) {
        assert_eq!(res["nodeId"], id.as_str());
    }
    for res in &results[..3] {
        let c = s
            .api
            .wait_done(res["commandId"].as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(c["status"], "succeeded", "{c}");
        assert!(res["name"].as_str().unwrap().starts_with("db-"));
    }
    for res in &results[3..] {
        assert_eq!(res["error"]["code"], "not_found", "{res}");
        assert!(res["commandId"].is_null());
    }
    let nodes = batch_nodes(&s.api, &batch_id).await;
    assert!(nodes.iter().all(|n| n["status"] == "stopped"), "{nodes:#?}");
    let vms = s.sim.created_vms().await.unwrap();
    for n in &nodes {
        let vm = vms
            .iter()
            .find(|v| i64::from(v.vmid) == n["vmId"].as_i64().unwrap())
            .expect("the node's VM");
        assert_eq!(vm.status, "stopped", "{vm:?}");
    }

    // Destroy needs each name confirmed: the unconfirmed node is refused, the others go.
    let names: Vec<String> = nodes
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    let r = bulk(
        &s.api,
        json!({"nodeIds": node_ids, "action": "destroy", "confirmNames": names[..2]}),
    )
    .await;
    assert_eq!(
        (r["succeeded"].as_u64(), r["failed"].as_u64()),
        (Some(2), Some(1)),
        "{r}"
    );
    assert_eq!(
        r["results"][2]["error"]["code"], "confirmation_mismatch",
        "{r}"
    );
    settle(&s.api, &batch_id, Duration::from_secs(60)).await;
    let statuses: Vec<String> = batch_nodes(&s.api, &batch_id)
        .await
        .iter()
        .map(|n| n["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["destroyed", "destroyed", "stopped"]);
    assert_eq!(s.sim.created_vms().await.unwrap().len(), 1);
    // A destroyed node's name is free again; the stopped one's is not.
    let v = batch(&s, &tid, 2, "db-{n}").await;
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db-1", "db-2"]);
    let v = batch(&s, &tid, 1, "db-{n}").await;
    assert_eq!(v["nodes"][0]["name"], "db-4", "{v}");
}

async fn bad_requests_and_names(backend: Backend) {
    let s = stack(backend, "bulk-bad").await;
    let tid = template(&s.api).await;
    let agent = s.agent_id.clone();
    for (body, code) in [
        (
            json!({"count": 0, "namePattern": "web-{n}"}),
            "invalid_params",
        ),
        (
            json!({"count": 51, "namePattern": "web-{n}"}),
            "invalid_params",
        ),
        (json!({"count": 2, "namePattern": "web"}), "invalid_params"),
        (
            json!({"count": 2, "namePattern": "web-{n}-{n}"}),
            "invalid_params",
        ),
        (
            json!({"count": 2, "namePattern": "web_{n}"}),
            "invalid_params",
        ),
        (
            json!({"count": 2, "namePattern": "web-{n}", "memory": 1}),
            "invalid_params",
        ),
        (
            json!({"count": -1, "namePattern": "web-{n}"}),
            "bad_request",
        ),
    ] {
        let mut body = body;
        body["templateId"] = json!(tid);
        body["provision"] = json!({"agentId": agent});
        let (status, v) = s
            .api
            .call(Method::POST, "/api/nodes/batches", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body} → {v}");
        assert_eq!(v["error"]["code"], code, "{body} → {v}");
    }
    for body in [
        json!({"nodeIds": [], "action": "stop"}),
        json!({"nodeIds": ["x"], "action": "explode"}),
        json!({"nodeIds": ["x"]}),
    ] {
        let (status, v) = s
            .api
            .call(Method::POST, "/api/nodes/bulk", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body} → {v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    // Nothing was created by the refused requests.
    assert_eq!(s.api.get("/api/nodes").await["items"], json!([]));

    // Taken names are skipped; a literal taken name is refused.
    let (status, v) = s
        .api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "APP-2", "templateId": tid})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let v = batch(&s, &tid, 2, "app-{n}").await;
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app-1", "app-3"]);
    let (status, v) = s
        .api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(
                json!({"count": 1, "namePattern": "app-3", "templateId": tid,
                        "provision": {"agentId": agent}}),
            ),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "duplicate_name");
}

on_both_backends!(provision_ten_retry_failed, bulk_provision_and_retry_failed);
on_both_backends!(stop_destroy_unknown, bulk_stop_destroy_and_unknown_nodes);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests() {
    bad_requests_and_names(Backend::Sqlite).await
}
