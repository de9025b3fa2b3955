//! One name rule for every way a node gets a name: create (`POST /api/nodes`), bulk
//! provision (`POST /api/nodes/batches`), import (`POST /api/nodes/import`) and rename
//! (`PUT /api/nodes/{id}`) refuse a name a live node has, ignoring case, with the same
//! 409 `duplicate_name` (create and import accept `force: true`). Concurrent creates of
//! one name cannot both win: the database's live-name index (migration 0008) closes the
//! window between the check and the insert. A bulk provision passes its clone options
//! to every VM it makes.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;

const FAST: &[&str] = &[
    "--clone-ms",
    "200",
    "--start-ms",
    "150",
    "--agent-boot-ms",
    "300",
    "--exec-ms",
    "30",
];

async fn template(api: &Api) -> String {
    let v = api
        .post(
            "/api/templates",
            json!({"name": "names", "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9000, "networkBridge": "vmbr0"}),
        )
        .await;
    v["id"].as_str().expect("template id").to_string()
}

fn assert_duplicate(status: u16, v: &Value, what: &str) {
    assert_eq!(status, 409, "{what}: {v}");
    assert_eq!(v["error"]["code"], "duplicate_name", "{what}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already exists")),
        "{what}: {v}"
    );
}

fn param<'a>(r: &'a trellis_tests::pve_sim::RecordedRequest, key: &str) -> Option<&'a str> {
    r.params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

async fn one_rule_everywhere(backend: Backend) {
    let s = proxmox_stack(
        backend,
        "names-rule",
        FAST,
        &[("TRELLIS_INVENTORY_INTERVAL_SECS", "1")],
    )
    .await;
    let api = &s.api;
    let tid = template(api).await;
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "web", "templateId": tid})),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    // Bulk: a literal taken name, any case, is the single-node refusal.
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(json!({"count": 1, "namePattern": "WEB", "templateId": tid,
                        "provision": {"agentId": s.agent_id}})),
        )
        .await;
    assert_duplicate(st, &v, "bulk literal");

    // Import: VM 100 (legacy-db) under a taken name is refused, forced it is imported.
    api.wait_until(Duration::from_secs(20), || async {
        let v = api.get(&format!("/api/agents/{}/vms", s.agent_id)).await;
        v["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|vm| vm["vmId"] == 100))
    })
    .await;
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes/import",
            Some(json!({"agentId": s.agent_id, "vmId": 100, "name": "Web"})),
        )
        .await;
    assert_duplicate(st, &v, "import");
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes/import",
            Some(json!({"agentId": s.agent_id, "vmId": 100, "name": "Web", "force": true})),
        )
        .await;
    assert_eq!(st, 201, "forced import: {v}");
    let imported = v["id"].as_str().unwrap().to_string();

    // Rename: to another node's name is refused; a change of case of its own name is not.
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "db", "templateId": tid})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let db_id = v["node"]["id"].as_str().unwrap().to_string();
    let (st, v) = api
        .call(
            Method::PUT,
            &format!("/api/nodes/{db_id}"),
            Some(json!({"name": "WEB"})),
        )
        .await;
    assert_duplicate(st, &v, "rename");
    let (st, v) = api
        .call(
            Method::PUT,
            &format!("/api/nodes/{db_id}"),
            Some(json!({"name": "DB"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["name"], "DB");
    // The forced duplicate renamed to a free name gives up its exemption: "web-2" is
    // then taken for everybody.
    let (st, v) = api
        .call(
            Method::PUT,
            &format!("/api/nodes/{imported}"),
            Some(json!({"name": "web-2"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "web-2", "templateId": tid})),
        )
        .await;
    assert_duplicate(st, &v, "create after rename");

    // Bulk passes the clone options to each VM (pve-sim records the requests).
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(
                json!({"count": 2, "namePattern": "opt-{n}", "templateId": tid,
                        "provision": {"agentId": s.agent_id, "cloneOptions": {
                            "storage": "fast-ssd", "pool": "web", "vlanTag": 42,
                            "ipConfig": {"mode": "dhcp"}, "onboot": true}}}),
            ),
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let mut vm_ids = Vec::new();
    for n in v["nodes"].as_array().unwrap() {
        let c = api
            .wait_done(n["commandId"].as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(c["status"], "succeeded", "{c}");
        assert_eq!(c["params"]["clone_options"]["storage"], "fast-ssd", "{c}");
        vm_ids.push(c["result"]["vm_id"].as_i64().unwrap());
    }
    let clones = s.sim.requests("/clone").await.unwrap();
    for vm in &vm_ids {
        let clone = clones
            .iter()
            .find(|r| param(r, "newid") == Some(&vm.to_string()))
            .unwrap_or_else(|| panic!("no clone request for VM {vm}: {clones:?}"));
        assert_eq!(param(clone, "storage"), Some("fast-ssd"), "{clone:?}");
        assert_eq!(param(clone, "full"), Some("1"), "{clone:?}");
        assert_eq!(param(clone, "pool"), Some("web"), "{clone:?}");
        let configs = s.sim.requests(&format!("/qemu/{vm}/config")).await.unwrap();
        let cfg = configs
            .iter()
            .find(|r| param(r, "net0").is_some())
            .unwrap_or_else(|| panic!("no net0 config for VM {vm}: {configs:?}"));
        let net0 = param(cfg, "net0").unwrap();
        assert!(net0.split(',').any(|kv| kv == "tag=42"), "{net0}");
        assert_eq!(param(cfg, "onboot"), Some("1"), "{cfg:?}");
        let vm = s
            .sim
            .vms()
            .await
            .unwrap()
            .into_iter()
            .find(|v| i64::from(v.vmid) == *vm)
            .expect("the VM");
        assert_eq!(vm.storage, "fast-ssd");
        assert_eq!(vm.pool.as_deref(), Some("web"));
    }
}
on_both_backends!(one_rule, one_rule_everywhere);

/// `n` concurrent `POST /api/nodes` of one name; returns the statuses.
async fn race(api: &Api, tid: &str, name: &str, n: usize, force: bool) -> Vec<(u16, Value)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let api = api.clone();
            let body = json!({"name": name, "templateId": tid, "force": force});
            tokio::spawn(async move { api.call(Method::POST, "/api/nodes", Some(body)).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn concurrent_creates(backend: Backend) {
    let (_dir, _cp, api) = control_plane(backend, "names-race").await;
    let tid = template(&api).await;
    // Several rounds, so a read-then-insert race would show.
    for round in 0..5 {
        let name = format!("race-{round}");
        // Mixed case: the rule ignores case, and so does the index.
        let results = race(&api, &tid, &name, 10, false).await;
        let created = results.iter().filter(|(s, _)| *s == 201).count();
        assert_eq!(created, 1, "round {round}: {results:?}");
        for (s, v) in results.iter().filter(|(s, _)| *s != 201) {
            assert_duplicate(*s, v, "concurrent create");
        }
        let upper = race(&api, &tid, &name.to_uppercase(), 4, false).await;
        for (s, v) in &upper {
            assert_duplicate(*s, v, "upper case");
        }
    }
    // Forced creates may all duplicate the name, concurrently too.
    let forced = race(&api, &tid, "race-0", 5, true).await;
    assert!(forced.iter().all(|(s, _)| *s == 201), "{forced:?}");
    let nodes = api.get("/api/nodes").await;
    let count = |name: &str| {
        nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["name"].as_str().unwrap().eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!(count("race-0"), 6);
    for round in 1..5 {
        assert_eq!(count(&format!("race-{round}")), 1);
    }
    // Deleting every node of a name frees it.
    for n in nodes["items"].as_array().unwrap() {
        if n["name"] == "race-1" {
            let (s, v) = api
                .call(
                    Method::DELETE,
                    &format!("/api/nodes/{}", n["id"].as_str().unwrap()),
                    None,
                )
                .await;
            assert_eq!(s, 204, "{v}");
        }
    }
    let again = race(&api, &tid, "race-1", 6, false).await;
    assert_eq!(
        again.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{again:?}"
    );
}
on_both_backends!(concurrent, concurrent_creates);
