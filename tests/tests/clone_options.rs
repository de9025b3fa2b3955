//! Clone options end to end (the real `trellis`, a real `tendril`, `pve-sim`): the options
//! an admin picks reach Proxmox as the parameters Proxmox expects (pve-sim records every
//! clone, config and resize request), bad values are refused before anything runs, a
//! Proxmox failure caused by one option names that option, duplicate node names are
//! refused unless forced, and a VM Trellis did not make can be imported as a node.

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

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMB4SHSfaWJ3pZ1r1Xp0mL0Q0VQ1xGz3WJ2yq3b2k1bA ops@example";

async fn stack(backend: Backend, tag: &str) -> ProxmoxStack {
    proxmox_stack(
        backend,
        tag,
        FAST,
        &[("TRELLIS_INVENTORY_INTERVAL_SECS", "1")],
    )
    .await
}

async fn debian_template(api: &Api) -> String {
    let t = api.get("/api/templates").await;
    t["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().starts_with("Debian 12"))
        .map(|t| t["id"].as_str().unwrap().to_string())
        .expect("seeded template")
}

async fn new_node(api: &Api, name: &str) -> String {
    let tid = debian_template(api).await;
    let v = api
        .post("/api/nodes", json!({"name": name, "templateId": tid}))
        .await;
    v["node"]["id"].as_str().unwrap().to_string()
}

/// Starts a provision with these clone options and waits for it to end.
async fn provision(s: &ProxmoxStack, node: &str, options: Value) -> Value {
    let v = s
        .api
        .post(
            &format!("/api/nodes/{node}/provision"),
            json!({"agentId": s.agent_id, "cloneOptions": options}),
        )
        .await;
    let cid = v["commandId"].as_str().expect("command id").to_string();
    s.api.wait_done(&cid, Duration::from_secs(60)).await
}

fn param<'a>(r: &'a trellis_tests::pve_sim::RecordedRequest, key: &str) -> Option<&'a str> {
    r.params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_options_reach_proxmox() {
    let s = stack(Backend::Sqlite, "clone-opts").await;
    let node = new_node(&s.api, "opts-1").await;
    let c = provision(
        &s,
        &node,
        json!({
            "storage": "fast-ssd", "diskSizeGib": 16, "vmId": 4242,
            "sshKeys": [ED25519],
            "ipConfig": {"mode": "static", "address": "10.20.0.5/24", "gateway": "10.20.0.1"},
            "vlanTag": 42, "pool": "web", "tags": ["prod", "Web"], "onboot": true,
        }),
    )
    .await;
    assert_eq!(c["status"], "succeeded", "{c}\n{}", s.agent.log());
    assert_eq!(c["result"]["vm_id"], 4242, "the explicit VMID: {c}");
    // The template's default cloud-init user was merged into the command's params.
    assert_eq!(c["params"]["clone_options"]["ci_user"], "debian", "{c}");

    let root = c["rootId"]
        .as_str()
        .or(c["id"].as_str())
        .unwrap()
        .to_string();
    let clones = s.sim.requests("/clone").await.unwrap();
    assert_eq!(clones.len(), 1, "{clones:?}");
    let clone = &clones[0];
    assert_eq!(param(clone, "newid"), Some("4242"));
    assert_eq!(
        param(clone, "full"),
        Some("1"),
        "a storage means a full clone"
    );
    assert_eq!(param(clone, "storage"), Some("fast-ssd"));
    assert_eq!(param(clone, "pool"), Some("web"));

    let configs = s.sim.requests("/qemu/4242/config").await.unwrap();
    let cfg = configs
        .iter()
        .find(|r| param(r, "ciuser").is_some())
        .unwrap_or_else(|| panic!("no config request with ciuser: {configs:?}"));
    assert_eq!(param(cfg, "ciuser"), Some("debian"));
    // Percent-encoded with %20 for spaces (what Proxmox's urlencoded format wants),
    // as the simulator received it after the form decoding.
    assert_eq!(
        param(cfg, "sshkeys"),
        Some(
            "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIMB4SHSfaWJ3pZ1r1Xp0mL0Q0VQ1xGz3WJ2yq3b2k1bA%20ops%40example"
        )
    );
    assert_eq!(
        param(cfg, "ipconfig0"),
        Some("ip=10.20.0.5/24,gw=10.20.0.1")
    );
    assert_eq!(param(cfg, "onboot"), Some("1"));
    let net0 = param(cfg, "net0").unwrap();
    assert!(net0.split(',').any(|kv| kv == "tag=42"), "{net0}");
    let tags = param(cfg, "tags").unwrap();
    for t in ["prod", "web"] {
        assert!(tags.split(';').any(|x| x == t), "{tags}");
    }
    assert!(
        tags.split(';').any(|x| x.starts_with("trellis-")),
        "Trellis's own tag is kept: {tags} (root {root})"
    );

    let resizes = s.sim.requests("/qemu/4242/resize").await.unwrap();
    assert_eq!(resizes.len(), 1, "{resizes:?}");
    assert_eq!(param(&resizes[0], "disk"), Some("scsi0"));
    assert_eq!(param(&resizes[0], "size"), Some("16G"));

    // And the VM in "Proxmox" has them.
    let vm = s
        .sim
        .vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.vmid == 4242)
        .expect("VM 4242");
    assert_eq!(vm.disk_bytes, 16 << 30);
    assert_eq!(vm.storage, "fast-ssd");
    assert_eq!(vm.pool.as_deref(), Some("web"));
    assert_eq!(vm.config.get("onboot").map(String::as_str), Some("1"));
    assert_eq!(vm.status, "running");
    let n = s.api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "running");
    assert_eq!(n["vmId"], 4242);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clone_options_are_refused_and_failures_name_the_field() {
    let s = stack(Backend::Sqlite, "clone-bad").await;
    let api = &s.api;
    let node = new_node(api, "bad-1").await;
    // Refused before anything runs, with the field named.
    for (opts, needle) in [
        (json!({"vlanTag": 5000}), "vlan"),
        (json!({"vlanTag": 4095}), "vlan"),
        (json!({"sshKeys": ["not a key"]}), "ssh_keys"),
        (json!({"sshKeys": ["ssh-ed25519 AAAA"]}), "ssh_keys"),
        (json!({"storage": "local", "full": false}), "storage"),
        (
            json!({"ipConfig": {"mode": "static", "address": "10.0.0.5"}}),
            "ip_config",
        ),
        (
            json!({"ipConfig": {"mode": "static", "address": "10.0.0.5/24", "gateway": "192.168.1.1"}}),
            "gateway",
        ),
        (json!({"tags": ["bad tag"]}), "tags"),
        (json!({"ciUser": "Root"}), "ci_user"),
        (json!({"vmId": 12}), "vm"),
        (json!({"diskSizeGib": 65537}), "disk"),
    ] {
        let (st, e) = api
            .call(
                Method::POST,
                &format!("/api/nodes/{node}/provision"),
                Some(json!({"agentId": s.agent_id, "cloneOptions": opts})),
            )
            .await;
        assert!(st == 400 || st == 422, "{opts}: {st} {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(needle),
            "{opts}: {e}"
        );
    }
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "pending_provision", "nothing started: {n}");
    assert!(s.sim.requests("/clone").await.unwrap().is_empty());

    // A storage Proxmox does not have: the clone fails, and the error names `storage`.
    let c = provision(&s, &node, json!({"storage": "nope-store"})).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["stage"], "clone_template", "{c}");
    assert_eq!(c["error"]["details"]["field"], "storage", "{c}");
    assert!(
        c["error"]["message"]
            .as_str()
            .unwrap()
            .contains("storage 'nope-store' does not exist"),
        "{c}"
    );
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["status"], "failed", "{n}");
    // "Change settings": the same node provisioned again with a storage that exists.
    let c = provision(&s, &node, json!({"storage": "local"})).await;
    assert_eq!(c["status"], "succeeded", "{c}");

    // A disk smaller than the template's (10 GiB): fails at configure, names the field,
    // and the half-built VM is removed.
    let small = new_node(api, "bad-2").await;
    let c = provision(&s, &small, json!({"diskSizeGib": 5})).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["stage"], "configure_vm", "{c}");
    assert_eq!(c["error"]["details"]["field"], "disk_size_gib", "{c}");
    assert_eq!(c["error"]["details"]["status"], "cleaned_up", "{c}");
    assert!(s
        .sim
        .requests("/resize")
        .await
        .unwrap()
        .iter()
        .all(|r| param(r, "size") != Some("5G")));

    // A VMID that is taken (100 is legacy-db): a clear error naming vm_id, no other id.
    let taken = new_node(api, "bad-3").await;
    let c = provision(&s, &taken, json!({"vmId": 100})).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "vmid_taken", "{c}");
    assert_eq!(c["error"]["details"]["field"], "vm_id", "{c}");
}

async fn duplicate_names_and_import(backend: Backend) {
    let s = stack(backend, "dup-import").await;
    let api = &s.api;
    let tid = debian_template(api).await;
    let first = api
        .post("/api/nodes", json!({"name": "dup", "templateId": tid}))
        .await;
    let first_id = first["node"]["id"].as_str().unwrap().to_string();
    for name in ["dup", "DUP"] {
        let (st, e) = api
            .call(
                Method::POST,
                "/api/nodes",
                Some(json!({"name": name, "templateId": tid})),
            )
            .await;
        assert_eq!(st, 409, "{e}");
        assert_eq!(e["error"]["code"], "duplicate_name", "{e}");
    }
    let (st, forced) = api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "dup", "templateId": tid, "force": true})),
        )
        .await;
    assert_eq!(st, 201, "{forced}");
    assert_ne!(forced["node"]["id"], first_id);
    // A deleted node's name is free again.
    api.call(Method::DELETE, &format!("/api/nodes/{first_id}"), None)
        .await;
    let (st, _) = api
        .call(
            Method::DELETE,
            &format!("/api/nodes/{}", forced["node"]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, 204);
    let (st, e) = api
        .call(
            Method::POST,
            "/api/nodes",
            Some(json!({"name": "dup", "templateId": tid})),
        )
        .await;
    assert_eq!(st, 201, "{e}");

    // Import: VM 100 (legacy-db, running) is in the inventory and not Trellis's.
    let vms_path = format!("/api/agents/{}/vms", s.agent_id);
    api.wait_until(Duration::from_secs(20), || async {
        let v = api.get(&vms_path).await;
        v["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|vm| vm["vmId"] == 100))
    })
    .await;
    let (st, n) = api
        .call(
            Method::POST,
            "/api/nodes/import",
            Some(json!({"agentId": s.agent_id, "vmId": 100})),
        )
        .await;
    assert_eq!(st, 201, "{n}");
    assert_eq!(n["name"], "legacy-db");
    assert_eq!(n["status"], "running");
    assert_eq!(n["vmId"], 100);
    assert_eq!(n["vmNode"], "pve1");
    assert_eq!(n["hypervisorId"], json!(s.agent_id));
    let id = n["id"].as_str().unwrap().to_string();
    let (st, e) = api
        .call(
            Method::POST,
            "/api/nodes/import",
            Some(json!({"agentId": s.agent_id, "vmId": 100, "name": "other-name"})),
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "already_tracked", "{e}");
    let (st, e) = api
        .call(
            Method::POST,
            "/api/nodes/import",
            Some(json!({"agentId": s.agent_id, "vmId": 777})),
        )
        .await;
    assert_eq!(st, 404, "{e}");
    let v = api.get(&vms_path).await;
    let vm = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["vmId"] == 100)
        .unwrap()
        .clone();
    assert_eq!(vm["nodeId"], json!(id), "{v}");

    // Power works on the imported node.
    let v = api
        .post(&format!("/api/nodes/{id}/power"), json!({"action": "stop"}))
        .await;
    let c = api
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(
        api.get(&format!("/api/nodes/{id}")).await["status"],
        "stopped"
    );
    let v = api
        .post(
            &format!("/api/nodes/{id}/power"),
            json!({"action": "start"}),
        )
        .await;
    let c = api
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(
        api.get(&format!("/api/nodes/{id}")).await["status"],
        "running"
    );
    // Destroy is refused: Trellis did not make this VM.
    let (st, e) = api
        .call(
            Method::POST,
            &format!("/api/nodes/{id}/destroy"),
            Some(json!({"confirmName": "legacy-db"})),
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "vm_untagged", "{e}");
    let vm = s.sim.vms().await.unwrap();
    assert!(vm.iter().any(|v| v.vmid == 100 && v.status == "running"));
}
on_both_backends!(duplicates_and_import, duplicate_names_and_import);

/// An explicit VMID does not block its own retries: a clone that hits a storage lock
/// timeout is cleaned up and tried again with the same id, and a provision that failed
/// and was cleaned up can be provisioned again at once with that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_vmid_survives_its_own_retries() {
    let s = stack(Backend::Sqlite, "clone-vmid-retry").await;
    let api = &s.api;
    s.sim
        .set_faults(&trellis_tests::pve_sim::Faults {
            fail_next_clone: Some(
                "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
                    .into(),
            ),
            ..Default::default()
        })
        .await
        .unwrap();
    let node = new_node(api, "vmid-retry-1").await;
    let c = provision(&s, &node, json!({"vmId": 4343})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let n = api.get(&format!("/api/nodes/{node}")).await;
    assert_eq!(n["vmId"], 4343, "{n}");
    let clones: Vec<_> = s
        .sim
        .requests("/clone")
        .await
        .unwrap()
        .into_iter()
        .filter(|r| param(r, "newid") == Some("4343"))
        .collect();
    assert_eq!(clones.len(), 2, "one lock timeout, then the retry");

    // failed at configure (a shrinking disk) and cleaned up; at once again, same id
    let node2 = new_node(api, "vmid-retry-2").await;
    let c = provision(&s, &node2, json!({"vmId": 4344, "diskSizeGib": 5})).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["details"]["status"], "cleaned_up", "{c}");
    let c = provision(&s, &node2, json!({"vmId": 4344})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(api.get(&format!("/api/nodes/{node2}")).await["vmId"], 4344);
}

/// A template's clone defaults can be switched off or cleared per provision: an explicit
/// `false`, `""`, `0` or `[]` overrides the default, and a linked clone drops the
/// template's default storage instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_options_override_template_defaults() {
    let s = stack(Backend::Sqlite, "clone-overrides").await;
    let api = &s.api;
    let t = api
        .post(
            "/api/templates",
            json!({"name": "with-defaults", "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9000, "networkBridge": "vmbr0",
                   "cloneDefaults": {"storage": "fast-ssd", "full": true, "onboot": true,
                       "tags": ["prod"], "sshKeys": [ED25519], "pool": "web", "vlanTag": 42,
                       "diskSizeGib": 16, "ciUser": "debian"}}),
        )
        .await;
    let tid = t["id"].as_str().expect("template id").to_string();
    let node = |name: &'static str| {
        let tid = tid.clone();
        async move {
            let v = api
                .post("/api/nodes", json!({"name": name, "templateId": tid}))
                .await;
            v["node"]["id"].as_str().unwrap().to_string()
        }
    };

    // the defaults apply when nothing is said
    let a = node("defaults-1").await;
    let c = provision(&s, &a, json!({"vmId": 4501})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let clone = s.sim.requests("/clone").await.unwrap();
    let clone = clone
        .iter()
        .find(|r| param(r, "newid") == Some("4501"))
        .unwrap();
    assert_eq!(param(clone, "storage"), Some("fast-ssd"));

    // everything switched off or cleared, and a linked clone
    let b = node("overrides-1").await;
    let c = provision(
        &s,
        &b,
        json!({"vmId": 4502, "full": false, "onboot": false, "tags": [], "sshKeys": [],
               "pool": "", "vlanTag": 0, "diskSizeGib": 0}),
    )
    .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let o = &c["params"]["clone_options"];
    assert_eq!(o["full"], false, "{o}");
    assert_eq!(o["onboot"], false, "{o}");
    for gone in [
        "storage",
        "pool",
        "vlan_tag",
        "disk_size_gib",
        "ssh_keys",
        "tags",
    ] {
        assert!(o.get(gone).is_none(), "{gone} kept: {o}");
    }
    assert_eq!(o["ci_user"], "debian", "not cleared: {o}");
    let clone = s.sim.requests("/clone").await.unwrap();
    let clone = clone
        .iter()
        .find(|r| param(r, "newid") == Some("4502"))
        .unwrap();
    assert_eq!(param(clone, "storage"), None);
    assert_eq!(param(clone, "pool"), None);
    assert_ne!(param(clone, "full"), Some("1"));
    let configs = s.sim.requests("/qemu/4502/config").await.unwrap();
    assert!(configs.iter().all(|r| param(r, "sshkeys").is_none()));
    assert!(configs.iter().all(|r| param(r, "onboot") != Some("1")));
    assert!(s
        .sim
        .requests("/qemu/4502/resize")
        .await
        .unwrap()
        .is_empty());
    let vm = s
        .sim
        .vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.vmid == 4502)
        .expect("VM 4502");
    assert_ne!(vm.config.get("onboot").map(String::as_str), Some("1"));
    assert!(vm.pool.is_none());

    // a linked clone with a storage of its own is still refused
    let d = node("overrides-2").await;
    let (st, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/nodes/{d}/provision"),
            Some(json!({"agentId": s.agent_id,
                        "cloneOptions": {"full": false, "storage": "local"}})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
}

/// Cloud-init options on a template without a cloud-init drive fail `configure_vm` with
/// `no_cloudinit_drive` naming the option (Proxmox would accept them and do nothing, and
/// a static IP would then time out at wait_network); without them the template works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_init_options_need_a_cloud_init_drive() {
    let s = stack(Backend::Sqlite, "clone-no-ci").await;
    let api = &s.api;
    s.sim
        .set_flags(9001, json!({"cloudinit": false}))
        .await
        .unwrap();
    let t = api
        .post(
            "/api/templates",
            json!({"name": "no-cloud-init", "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9001, "networkBridge": "vmbr0"}),
        )
        .await;
    let tid = t["id"].as_str().unwrap().to_string();
    let node = |name: &'static str| {
        let tid = tid.clone();
        async move {
            let v = api
                .post("/api/nodes", json!({"name": name, "templateId": tid}))
                .await;
            v["node"]["id"].as_str().unwrap().to_string()
        }
    };
    for (opts, field) in [
        (json!({"ciUser": "ops"}), "ci_user"),
        (json!({"sshKeys": [ED25519]}), "ssh_keys"),
        (
            json!({"ipConfig": {"mode": "static", "address": "10.0.0.5/24"}}),
            "ip_config",
        ),
    ] {
        let n = node(match field {
            "ci_user" => "no-ci-1",
            "ssh_keys" => "no-ci-2",
            _ => "no-ci-3",
        })
        .await;
        let c = provision(&s, &n, opts.clone()).await;
        assert_eq!(c["status"], "failed", "{opts}: {c}");
        assert_eq!(c["error"]["code"], "no_cloudinit_drive", "{c}");
        assert_eq!(c["error"]["stage"], "configure_vm", "{c}");
        assert_eq!(c["error"]["details"]["field"], field, "{c}");
        assert_eq!(c["error"]["details"]["status"], "cleaned_up", "{c}");
    }
    // nothing of cloud-init asked: the same template provisions
    let ok = node("no-ci-ok").await;
    let c = provision(&s, &ok, json!({"vlanTag": 7})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
}
