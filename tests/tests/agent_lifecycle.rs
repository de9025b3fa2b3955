//! The agent's VM lifecycle executors (`vm_power`, `destroy`), the Proxmox tag and partial
//! result of `provision`, and the inventory, driven directly against the real `pve-sim`
//! binary: each power action reaches its state (also when the node hint is stale), a guest
//! that ignores ACPI fails a plain shutdown and is stopped hard with `force_after_s`,
//! destroy deletes only a VM carrying its tag (stopping it first, refusing protected and
//! untagged VMs, succeeding when it is already gone), and the inventory lists VMs with
//! their tags from one list call.

use std::sync::Arc;
use std::time::Duration;

use tendril::proxmox::ProxmoxExecutor;
use trellis_protocol::{
    proxmox_tag, vm_tag, CommandError, DestroyParams, DestroyResult, LogStream, PowerAction,
    ProvisionStatus, StageState, VmPowerParams, VmPowerResult, VmState,
};
use trellis_tests::pve_sim::exec_harness::{
    executor_for, fast_sim, provision_params, stage as s, Recorded,
};
use trellis_tests::pve_sim::process::SimProcess;
use trellis_tests::pve_sim::VmView;
use trellis_tests::recorder::Recorder;
use uuid::Uuid;

use StageState::{Completed, Failed, Running, Skipped};

const SIM: &str = env!("CARGO_BIN_EXE_pve-sim");

async fn sim() -> SimProcess {
    fast_sim(SIM, &[]).await
}

async fn power(
    executor: &ProxmoxExecutor,
    vm_id: u32,
    node: &str,
    action: PowerAction,
    force_after_s: Option<u32>,
) -> (Recorder, Result<VmPowerResult, CommandError>) {
    let mut rec = Recorder::new(None);
    let p = VmPowerParams {
        vm_id,
        node: node.into(),
        action,
        timeout_s: Some(20),
        force_after_s,
    };
    let ex = executor.clone();
    let r = rec
        .run(|ctx| async move { ex.vm_power(&ctx, p).await })
        .await;
    (rec, r)
}

async fn destroy(
    executor: &ProxmoxExecutor,
    vm_id: u32,
    node: &str,
    expected_tag: String,
) -> (Recorder, Result<DestroyResult, CommandError>) {
    let mut rec = Recorder::new(None);
    let p = DestroyParams {
        vm_id,
        node: node.into(),
        expected_tag,
    };
    let ex = executor.clone();
    let r = rec
        .run(|ctx| async move { ex.destroy(&ctx, p).await })
        .await;
    (rec, r)
}

/// A VM as the agent provisions it (running, tagged); returns its VMID and root id.
async fn provisioned(executor: &ProxmoxExecutor, name: &str) -> (u32, Uuid) {
    let root = Uuid::new_v4();
    let mut rec = Recorded::new(executor, Some(root)).unwrap();
    let r = rec
        .provision(provision_params(name))
        .await
        .expect("provision");
    (r.vm_id, root)
}

async fn vm(sim: &SimProcess, vmid: u32) -> Option<VmView> {
    sim.vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.vmid == vmid)
}

async fn sim_post(sim: &SimProcess, path: &str, body: serde_json::Value) {
    reqwest::Client::new()
        .post(format!("{}/_sim/{path}", sim.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
}

async fn sim_delete_vm(sim: &SimProcess, vmid: u32) {
    reqwest::Client::new()
        .delete(format!("{}/_sim/vms/{vmid}", sim.url))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
}

fn power_stages() -> Vec<(String, StageState)> {
    vec![
        s("request", Running),
        s("request", Completed),
        s("wait_state", Running),
        s("wait_state", Completed),
    ]
}

#[tokio::test]
async fn each_power_action_reaches_its_state() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    // The seeded VM 100 runs on pve1.
    let steps = [
        (PowerAction::Stop, VmState::Stopped, "stopped"),
        (PowerAction::Start, VmState::Running, "running"),
        (PowerAction::Reboot, VmState::Running, "running"),
        (PowerAction::Shutdown, VmState::Stopped, "stopped"),
        // A reboot of a stopped VM starts it.
        (PowerAction::Reboot, VmState::Running, "running"),
    ];
    for (action, state, sim_status) in steps {
        let (mut rec, r) = power(&ex, 100, "pve1", action, None).await;
        let r = r.unwrap_or_else(|e| panic!("{action:?}: {e:?}"));
        assert_eq!(
            (r.vm_id, r.node.as_str(), r.status, r.forced),
            (100, "pve1", state, false),
            "{action:?}"
        );
        assert_eq!(rec.stages(), power_stages(), "{action:?}");
        assert_eq!(
            vm(&sim, 100).await.unwrap().status,
            sim_status,
            "{action:?}"
        );
    }
    let tasks: Vec<String> = sim
        .tasks()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.kind)
        .collect();
    assert_eq!(
        tasks,
        ["qmstop", "qmstart", "qmreboot", "qmshutdown", "qmstart"]
    );
}

#[tokio::test]
async fn nothing_to_do_needs_no_task_and_a_stale_node_hint_is_followed() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    // Running already; and the command thinks it is on pve2.
    let (mut rec, r) = power(&ex, 100, "pve2", PowerAction::Start, None).await;
    let r = r.unwrap();
    assert_eq!((r.node.as_str(), r.status), ("pve1", VmState::Running));
    assert_eq!(rec.stages(), power_stages());
    let system = rec.log(LogStream::System);
    assert!(system.contains("already running"), "{system}");
    assert!(system.contains("is on node pve1, not pve2"), "{system}");
    assert!(sim.tasks().await.unwrap().is_empty(), "no task for a no-op");

    sim_post(&sim, "vms/100/power", serde_json::json!({"running": false})).await;
    for action in [PowerAction::Stop, PowerAction::Shutdown] {
        let (_, r) = power(&ex, 100, "pve1", action, None).await;
        assert_eq!(r.unwrap().status, VmState::Stopped);
    }
    assert!(sim.tasks().await.unwrap().is_empty());

    // A VM that does not exist anywhere.
    let (mut rec, r) = power(&ex, 4242, "pve1", PowerAction::Start, None).await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.stage.as_deref()),
        ("vm_not_found", Some("request"))
    );
    assert_eq!(rec.stages(), [s("request", Running), s("request", Failed)]);
    // A template cannot be powered.
    let (_, r) = power(&ex, 9000, "pve1", PowerAction::Start, None).await;
    assert_eq!(r.unwrap_err().code, "vm_is_template");
}

#[tokio::test]
async fn shutdown_of_a_guest_ignoring_acpi_fails_without_force_and_is_forced_with_it() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    sim_post(
        &sim,
        "vms/100/flags",
        serde_json::json!({"ignore_acpi": true}),
    )
    .await;

    let mut rec = Recorder::new(None);
    let p = VmPowerParams {
        vm_id: 100,
        node: "pve1".into(),
        action: PowerAction::Shutdown,
        timeout_s: Some(2),
        force_after_s: None,
    };
    let ex2 = ex.clone();
    let e = rec
        .run(|ctx| async move { ex2.vm_power(&ctx, p).await })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.stage.as_deref()),
        ("shutdown_timeout", Some("request"))
    );
    assert!(
        e.message.contains("did not shut down within 2 s") && e.message.contains("force_after_s"),
        "{}",
        e.message
    );
    assert!(!e.retryable);
    assert_eq!(vm(&sim, 100).await.unwrap().status, "running");

    let (mut rec, r) = power(&ex, 100, "pve1", PowerAction::Shutdown, Some(2)).await;
    let r = r.unwrap();
    assert_eq!((r.status, r.forced), (VmState::Stopped, true));
    assert_eq!(rec.stages(), power_stages());
    assert!(rec.log(LogStream::System).contains("stopping VM 100 hard"));
    assert_eq!(vm(&sim, 100).await.unwrap().status, "stopped");
    let kinds: Vec<(String, Option<String>)> = sim
        .tasks()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.kind, t.exitstatus))
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(kinds[2], ("qmstop".to_string(), Some("OK".to_string())));

    // A cooperating guest shuts down within force_after_s without being forced.
    sim_post(
        &sim,
        "vms/100/flags",
        serde_json::json!({"ignore_acpi": false}),
    )
    .await;
    sim_post(&sim, "vms/100/power", serde_json::json!({"running": true})).await;
    let (_, r) = power(&ex, 100, "pve1", PowerAction::Shutdown, Some(60)).await;
    let r = r.unwrap();
    assert_eq!((r.status, r.forced), (VmState::Stopped, false));
}

#[tokio::test]
async fn provision_tags_the_vm_and_destroy_stops_and_deletes_it_then_finds_it_gone() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    let (vmid, root) = provisioned(&ex, "doomed").await;
    let v = vm(&sim, vmid).await.unwrap();
    assert_eq!(v.tags.as_deref(), Some(proxmox_tag(root).as_str()));
    assert_eq!(v.status, "running");

    // The inventory sees it, with its tag, in one list call.
    let before = sim.stats().await.unwrap()["requests"].as_u64().unwrap();
    let inv = ex.inventory().await.unwrap();
    let after = sim.stats().await.unwrap()["requests"].as_u64().unwrap();
    assert_eq!(after - before, 1, "one list call, not one per VM");
    let ids: Vec<u32> = inv.vms.iter().map(|v| v.vm_id).collect();
    assert_eq!(ids, [100, vmid], "templates left out");
    let mine = &inv.vms[1];
    assert_eq!(
        (mine.node.as_str(), mine.name.as_str(), mine.status.as_str()),
        ("pve1", "doomed", "running")
    );
    assert_eq!(mine.tag, Some(vm_tag(root)));
    assert_eq!(inv.vms[0].tag, None);

    let (mut rec, r) = destroy(&ex, vmid, "pve1", vm_tag(root)).await;
    let r = r.unwrap();
    assert_eq!(
        (r.vm_id, r.node.as_str(), r.already_gone),
        (vmid, "pve1", false)
    );
    let all = ["check_tag", "stop_vm", "delete_vm", "confirm_gone"];
    let expected: Vec<_> = all
        .iter()
        .flat_map(|st| [s(st, Running), s(st, Completed)])
        .collect();
    assert_eq!(rec.stages(), expected);
    assert!(vm(&sim, vmid).await.is_none());
    let kinds: Vec<String> = sim
        .tasks()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.kind == "qmstop" || t.kind == "qmdestroy")
        .map(|t| t.kind)
        .collect();
    assert_eq!(kinds, ["qmstop", "qmdestroy"]);

    // Again (e.g. re-run after the agent lost it): already gone, every stage skipped.
    let (mut rec, r) = destroy(&ex, vmid, "pve1", vm_tag(root)).await;
    assert!(r.unwrap().already_gone);
    let skipped: Vec<_> = all.iter().map(|st| s(st, Skipped)).collect();
    assert_eq!(rec.stages(), skipped);
}

#[tokio::test]
async fn destroy_of_a_stopped_vm_skips_the_stop_and_of_a_vanished_one_is_already_gone() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    let (a, root_a) = provisioned(&ex, "stopped-one").await;
    let (b, root_b) = provisioned(&ex, "vanishing").await;
    sim_post(
        &sim,
        &format!("vms/{a}/power"),
        serde_json::json!({"running": false}),
    )
    .await;
    let (mut rec, r) = destroy(&ex, a, "pve1", vm_tag(root_a)).await;
    assert!(!r.unwrap().already_gone);
    assert_eq!(
        rec.stages(),
        [
            s("check_tag", Running),
            s("check_tag", Completed),
            s("stop_vm", Skipped),
            s("delete_vm", Running),
            s("delete_vm", Completed),
            s("confirm_gone", Running),
            s("confirm_gone", Completed),
        ]
    );
    assert!(vm(&sim, a).await.is_none());

    sim_delete_vm(&sim, b).await;
    let (_, r) = destroy(&ex, b, "pve2", vm_tag(root_b)).await;
    let r = r.unwrap();
    assert!(r.already_gone);
    assert_eq!(r.vm_id, b);
}

#[tokio::test]
async fn destroy_refuses_a_vm_without_its_tag_and_a_protected_vm() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    // VM 100 was not made by Trellis.
    let (mut rec, r) = destroy(&ex, 100, "pve1", vm_tag(Uuid::new_v4())).await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.stage.as_deref(), e.retryable),
        ("vm_tag_mismatch", Some("check_tag"), false)
    );
    assert_eq!(
        rec.stages(),
        [s("check_tag", Running), s("check_tag", Failed)]
    );
    assert_eq!(vm(&sim, 100).await.unwrap().status, "running");

    // A Trellis VM, but with another command's tag: refused too.
    let (vmid, root) = provisioned(&ex, "kept").await;
    let (_, r) = destroy(&ex, vmid, "pve1", vm_tag(Uuid::new_v4())).await;
    assert_eq!(r.unwrap_err().code, "vm_tag_mismatch");

    sim_post(
        &sim,
        &format!("vms/{vmid}/flags"),
        serde_json::json!({"protection": true}),
    )
    .await;
    let (_, r) = destroy(&ex, vmid, "pve1", vm_tag(root)).await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.stage.as_deref()),
        ("vm_protected", Some("check_tag"))
    );
    let v = vm(&sim, vmid).await.unwrap();
    assert_eq!(v.status, "running", "nothing was touched");
    assert!(sim
        .tasks()
        .await
        .unwrap()
        .iter()
        .all(|t| t.kind != "qmstop" && t.kind != "qmdestroy"));
}

#[tokio::test]
async fn failing_post_provision_commands_keep_the_vm_and_end_partial() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    let mut rec = Recorded::new(&ex, None).unwrap();
    let mut p = provision_params("half-done");
    p.template.post_provision_commands = vec!["echo disk full >&2 && exit 3".into()];
    let r = rec.provision(p).await.expect("a working VM is a success");
    assert_eq!(r.status, ProvisionStatus::Partial);
    let e = r.error.expect("the partial result says why");
    assert_eq!(
        (e.code.as_str(), e.stage.as_deref()),
        ("post_provision_failed", Some("post_provision"))
    );
    assert!(e.message.contains("exit code 3"), "{}", e.message);
    assert_eq!(
        r.stages_completed,
        [
            "clone_template",
            "configure_vm",
            "start_vm",
            "wait_network",
            "register"
        ]
    );
    assert!(rec.stages().contains(&s("post_provision", Failed)));
    assert!(rec
        .stages()
        .ends_with(&[s("register", Running), s("register", Completed)]));
    let v = vm(&sim, r.vm_id).await.expect("kept");
    assert_eq!(v.status, "running");
    assert!(r.ip_address.is_some());
}

#[tokio::test]
async fn inventory_loop_reports_at_once_and_again_when_kicked() {
    let sim = sim().await;
    let ex = executor_for(&sim);
    let kick = Arc::new(tokio::sync::Notify::new());
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tendril::proxmox::inventory::report_loop(
        ex.clone(),
        Duration::from_secs(3600),
        kick.clone(),
        tx,
        stop.clone(),
    ));
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.vms.len(), 1);
    assert_eq!(first.vms[0].status, "running");
    sim_post(&sim, "vms/100/power", serde_json::json!({"running": false})).await;
    kick.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.vms[0].status, "stopped");
    // Nothing more until the (hour-long) interval or the next kick.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// The real `trellis` and `tendril` with the simulator: the agent advertises the
/// lifecycle commands, reports its inventory on connect (the server's welcome lists the
/// feature) and again right after a `vm_power` ends, well before the 30 s interval.
#[tokio::test]
async fn agent_reports_inventory_on_connect_and_after_a_power_command() {
    use trellis_tests::harness::{bin, control_plane, Agent};
    use trellis_tests::pve_sim::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET};

    let (dir, cp, api) = control_plane(trellis_tests::db::Backend::Sqlite, "lifecycle-inv").await;
    let sim = fast_sim(bin("pve-sim").to_str().unwrap(), &[]).await;
    let (agent_id, token) = api.create_agent("pve-lab").await;
    let _agent = Agent::start_with(
        &cp.ws_url(),
        &token,
        &dir.join("agent"),
        &[
            ("PROXMOX_URL", sim.url.as_str()),
            ("PROXMOX_TOKEN_ID", DEFAULT_TOKEN_ID),
            ("PROXMOX_TOKEN_SECRET", DEFAULT_TOKEN_SECRET),
        ],
    );
    api.wait_agent_online(&agent_id).await;
    let agent = api.get(&format!("/api/agents/{agent_id}")).await;
    let caps = agent["capabilities"].to_string();
    assert!(
        caps.contains("vm_power") && caps.contains("destroy"),
        "{agent}"
    );

    let vms_path = format!("/api/agents/{agent_id}/vms");
    let status_of_100 = |v: serde_json::Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["vmId"] == 100)
            .map(|i| i["status"].as_str().unwrap().to_string())
    };
    api.wait_until(Duration::from_secs(10), || async {
        status_of_100(api.get(&vms_path).await).as_deref() == Some("running")
    })
    .await;
    let items = api.get(&vms_path).await["items"].as_array().unwrap().len();
    assert_eq!(items, 1, "templates are not in the inventory");

    let id = api
        .command(
            &agent_id,
            "vm_power",
            serde_json::json!({"vm_id": 100, "node": "pve1", "action": "stop"}),
        )
        .await;
    let c = api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["result"]["status"], "stopped", "{c}");
    // The inventory after the command shows it (the interval is 30 s).
    api.wait_until(Duration::from_secs(5), || async {
        status_of_100(api.get(&vms_path).await).as_deref() == Some("stopped")
    })
    .await;

    let id = api
        .command(
            &agent_id,
            "destroy",
            serde_json::json!({"vm_id": 100, "node": "pve1",
                "expected_tag": vm_tag(Uuid::new_v4())}),
        )
        .await;
    let c = api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "vm_tag_mismatch", "{c}");
    assert!(vm(&sim, 100).await.is_some());
}
