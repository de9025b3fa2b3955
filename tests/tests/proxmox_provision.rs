//! The agent's `provision` executor against the real `pve-sim` binary: stages, parallel
//! VMID allocation, faults (failing clone task, silent guest agent, 5xx bursts), cleanup,
//! idempotency by root command id, cancel.

use std::time::Duration;

use serde_json::json;
use trellis_protocol::{
    LogStream, ProvisionParams, ProvisionStatus, ProvisionTemplate, StageState,
};
use trellis_tests::pve_sim::exec_harness::{executor_for, Recorded};
use trellis_tests::pve_sim::process::SimProcess;
use trellis_tests::pve_sim::{Burst, Faults};
use uuid::Uuid;

const SIM: &str = env!("CARGO_BIN_EXE_pve-sim");

/// A simulator with short task durations.
async fn sim(extra: &[&str]) -> SimProcess {
    let mut args = vec![
        "--clone-ms",
        "300",
        "--start-ms",
        "150",
        "--stop-ms",
        "80",
        "--destroy-ms",
        "80",
        "--agent-boot-ms",
        "400",
        "--exec-ms",
        "30",
        "--auth-fail-delay-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    SimProcess::start(SIM, &args).await.expect("pve-sim starts")
}

fn params(name: &str) -> ProvisionParams {
    ProvisionParams {
        name: name.into(),
        template: ProvisionTemplate {
            kind: "proxmox".into(),
            template_id: Some(9000),
            template_node: None,
            memory: 1024,
            cores: 2,
            description: Some("made by a test".into()),
            network_bridge: Some("vmbr1".into()),
            pre_provision_commands: vec![],
            post_provision_commands: vec![],
        },
        target_node: None,
        min_vm_id: None,
        skip_post_provision: false,
        keep_on_failure: false,
        network_timeout_secs: Some(20),
    }
}

use StageState::{Completed, Failed, Running, Skipped};

fn s(stage: &str, state: StageState) -> (String, StageState) {
    (stage.to_string(), state)
}

#[tokio::test]
async fn provision_succeeds_with_stages_in_order() {
    let sim = sim(&[]).await;
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let mut p = params("web-1");
    p.template.pre_provision_commands = vec!["echo preparing".into()];
    p.template.post_provision_commands = vec![
        "echo hello from $(hostname) && echo warn >&2".into(),
        "true".into(),
    ];
    let started = std::time::Instant::now();
    let r = rec.provision(p).await.expect("provision succeeds");
    let total = started.elapsed();

    assert_eq!(r.vm_id, 101, "first free VMID after the seeded VM 100");
    assert_eq!(r.node, "pve1");
    assert_eq!(r.name, "web-1");
    assert_eq!(r.status, ProvisionStatus::Completed);
    assert_eq!(
        r.ip_address.as_deref(),
        Some("10.20.0.101"),
        "the NIC's IPv4, not docker0/lo/link-local"
    );
    let all = [
        "clone_template",
        "configure_vm",
        "start_vm",
        "wait_network",
        "post_provision",
        "register",
    ];
    assert_eq!(r.stages_completed, all);
    let expected: Vec<_> = all
        .iter()
        .flat_map(|st| [s(st, Running), s(st, Completed)])
        .collect();
    assert_eq!(rec.stages(), expected);

    let stdout = rec.log(LogStream::Stdout);
    assert!(
        stdout.contains("preparing\n") && stdout.contains("hello from"),
        "{stdout}"
    );
    assert_eq!(rec.log(LogStream::Stderr), "warn\n");
    let system = rec.log(LogStream::System);
    assert!(system.contains("exit code 0"), "{system}");
    assert!(system.contains("cloning template 9000"), "{system}");

    let vms = sim.created_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    assert_eq!(
        (vm.vmid, vm.status.as_str(), vm.memory, vm.cores),
        (101, "running", 1024, 2)
    );
    assert!(
        vm.net0.as_deref().unwrap().contains("bridge=vmbr1"),
        "{:?}",
        vm.net0
    );
    let desc = vm.description.as_deref().unwrap();
    assert!(desc.starts_with("made by a test"), "{desc}");
    assert!(
        desc.contains(&format!("trellis-command={}", rec.ctx.root_command_id)),
        "{desc}"
    );
    assert!(desc.contains("trellis-post-provision=done"), "{desc}");
    assert_eq!(vm.lock, None);

    // Stage timings, for the record.
    let events = rec.stage_events();
    let mut line = String::new();
    let mut started_at = std::collections::HashMap::new();
    for (t, stage, state, _) in &events {
        match state {
            Running => {
                started_at.insert(stage.clone(), *t);
            }
            Completed => {
                let d = started_at
                    .get(stage)
                    .map(|s| t.duration_since(*s))
                    .unwrap_or_default();
                line.push_str(&format!("{stage}={}ms ", d.as_millis()));
            }
            _ => {}
        }
    }
    eprintln!("stage timings: {line}total={}ms", total.as_millis());
}

#[tokio::test]
async fn three_parallel_provisions_get_distinct_vmids() {
    let sim = sim(&[]).await;
    let executor = executor_for(&sim);
    let mut a = Recorded::new(&executor, None).unwrap();
    let mut b = Recorded::new(&executor, None).unwrap();
    let mut c = Recorded::new(&executor, None).unwrap();
    let (ra, rb, rc) = tokio::join!(
        a.provision(params("par-a")),
        b.provision(params("par-b")),
        c.provision(params("par-c")),
    );
    let mut ids = vec![ra.unwrap().vm_id, rb.unwrap().vm_id, rc.unwrap().vm_id];
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct VMIDs: {ids:?}");
    let vms = sim.created_vms().await.unwrap();
    assert_eq!(vms.len(), 3);
    assert!(vms.iter().all(|v| v.status == "running"));
}

#[tokio::test]
async fn taken_vmid_means_take_another() {
    let sim = sim(&[]).await;
    // The next two clones find their id taken by "someone else" just before them.
    sim.set_faults(&Faults {
        steal_next_ids: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let mut p = params("race-1");
    p.min_vm_id = Some(500);
    let r = rec
        .provision(p)
        .await
        .expect("provision succeeds after the races");
    assert_eq!(r.vm_id, 502, "500 and 501 were stolen");
    let foreign: Vec<u32> = sim
        .vms()
        .await
        .unwrap()
        .iter()
        .filter(|v| v.foreign)
        .map(|v| v.vmid)
        .collect();
    assert_eq!(foreign, vec![500, 501]);
    let system = rec.log(LogStream::System);
    assert!(system.contains("config file already exists"), "{system}");
}

#[tokio::test]
async fn failing_clone_task_names_the_stage_and_leaves_nothing() {
    let sim = sim(&[]).await;
    sim.set_faults(&Faults {
        fail_next_clone: Some(
            "clone failed: storage 'local-lvm' does not have enough free space".into(),
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let e = rec.provision(params("doomed")).await.unwrap_err();
    assert_eq!(e.stage.as_deref(), Some("clone_template"));
    assert_eq!(e.code, "proxmox_task_failed");
    assert!(
        e.message.contains("not have enough free space"),
        "{}",
        e.message
    );
    assert_eq!(
        rec.stages(),
        vec![s("clone_template", Running), s("clone_template", Failed)]
    );
    assert_eq!(e.details.as_ref().unwrap()["status"], "cleaned_up");
    assert!(sim.created_vms().await.unwrap().is_empty());
    assert!(
        rec.log(LogStream::System).contains("TASK ERROR"),
        "the task log tail is shown"
    );
}

#[tokio::test]
async fn silent_guest_agent_times_out_and_cleans_up() {
    let sim = sim(&["--fault-agent-never-up"]).await;
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let mut p = params("no-ip");
    p.network_timeout_secs = Some(1);
    let e = rec.provision(p).await.unwrap_err();
    assert_eq!(e.stage.as_deref(), Some("wait_network"));
    assert_eq!(e.code, "network_timeout");
    assert!(e.message.contains("guest agent"), "{}", e.message);
    assert_eq!(e.details.as_ref().unwrap()["status"], "cleaned_up");
    assert_eq!(e.details.as_ref().unwrap()["vm_id"], 101);
    assert_eq!(rec.stages().last(), Some(&s("wait_network", Failed)));
    assert!(
        sim.created_vms().await.unwrap().is_empty(),
        "running VM stopped and destroyed"
    );
}

#[tokio::test]
async fn burst_of_596_on_start_fails_start_vm_and_cleans_up() {
    let sim = sim(&[]).await;
    sim.set_faults(&Faults {
        burst: Some(Burst {
            count: 50,
            status: 596,
            path_contains: Some("/status/start".into()),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let e = rec.provision(params("bursty")).await.unwrap_err();
    assert_eq!(e.stage.as_deref(), Some("start_vm"));
    assert!(
        e.message.contains("596") && e.message.contains("Connection timed out"),
        "{}",
        e.message
    );
    assert!(e.retryable, "a proxy-hop failure is worth retrying");
    assert_eq!(e.details.as_ref().unwrap()["status"], "cleaned_up");
    assert!(sim.created_vms().await.unwrap().is_empty());
    // The start POST is not blindly repeated: 3 tries with a status check in between.
    let left = sim.faults().await.unwrap().burst.map(|b| b.count);
    assert_eq!(left, Some(47));
}

#[tokio::test]
async fn short_5xx_burst_is_retried_transparently() {
    let sim = sim(&[]).await;
    sim.set_faults(&Faults {
        burst: Some(Burst {
            count: 3,
            status: 596,
            path_contains: None,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let r = rec
        .provision(params("retried"))
        .await
        .expect("reads are retried");
    assert_eq!(r.vm_id, 101);
    assert_eq!(
        sim.faults().await.unwrap().burst,
        None,
        "the burst was consumed"
    );
}

#[tokio::test]
async fn failed_command_with_keep_on_failure_reports_partial_vm() {
    let sim = sim(&[]).await;
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let mut p = params("keep-me");
    p.keep_on_failure = true;
    p.template.post_provision_commands =
        vec!["echo step1".into(), "echo disk full >&2 && exit 3".into()];
    let e = rec.provision(p).await.unwrap_err();
    assert_eq!(e.stage.as_deref(), Some("post_provision"));
    assert_eq!(e.code, "post_provision_failed");
    assert!(
        e.message.contains("exit code 3") && e.message.contains("disk full"),
        "{}",
        e.message
    );
    let d = e.details.unwrap();
    assert_eq!(d["status"], "partial");
    assert_eq!(d["vm_id"], 101);
    assert_eq!(
        d["stages_completed"],
        json!(["clone_template", "configure_vm", "start_vm", "wait_network"])
    );
    let vms = sim.created_vms().await.unwrap();
    assert_eq!(vms.len(), 1, "kept for inspection");
    assert!(rec.log(LogStream::System).contains("exit code 3"));
}

#[tokio::test]
async fn same_root_command_makes_one_vm() {
    let sim = sim(&[]).await;
    let executor = executor_for(&sim);
    let root = Uuid::new_v4();
    let mut p = params("idem-1");
    p.template.post_provision_commands = vec!["echo once".into()];

    let mut first = Recorded::new(&executor, Some(root)).unwrap();
    let r1 = first.provision(p.clone()).await.unwrap();
    // A retry (new command id, same root) continues with the same VM.
    let mut second = Recorded::new(&executor, Some(root)).unwrap();
    let r2 = second.provision(p.clone()).await.unwrap();
    assert_eq!(r1.vm_id, r2.vm_id);
    assert_eq!(r2.ip_address, r1.ip_address);
    assert!(second.log(LogStream::System).contains("earlier attempt"));
    assert_eq!(
        second.log(LogStream::Stdout),
        "",
        "guest commands did not run twice"
    );
    assert!(second.stages().contains(&s("post_provision", Skipped)));
    assert_eq!(sim.created_vms().await.unwrap().len(), 1);

    // Two at once with another root id: still one VM between them.
    let root2 = Uuid::new_v4();
    let mut a = Recorded::new(&executor, Some(root2)).unwrap();
    let mut b = Recorded::new(&executor, Some(root2)).unwrap();
    let mut p2 = params("idem-2");
    p2.skip_post_provision = true;
    let (ra, rb) = tokio::join!(a.provision(p2.clone()), b.provision(p2));
    assert_eq!(ra.unwrap().vm_id, rb.unwrap().vm_id);
    assert_eq!(sim.created_vms().await.unwrap().len(), 2);
}

#[tokio::test]
async fn resumes_a_half_built_vm_from_an_earlier_attempt() {
    let sim = sim(&[]).await;
    let executor = executor_for(&sim);
    let root = Uuid::new_v4();
    // First attempt dies at the network stage, keeping the VM.
    sim.set_faults(&Faults {
        agent_never_up: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut p = params("resume-1");
    p.keep_on_failure = true;
    p.network_timeout_secs = Some(1);
    let mut first = Recorded::new(&executor, Some(root)).unwrap();
    let e = first.provision(p.clone()).await.unwrap_err();
    assert_eq!(e.details.as_ref().unwrap()["status"], "partial");
    let vmid = e.details.as_ref().unwrap()["vm_id"].as_u64().unwrap() as u32;
    // The retry picks it up and finishes.
    sim.set_faults(&Faults::default()).await.unwrap();
    p.network_timeout_secs = Some(20);
    let mut second = Recorded::new(&executor, Some(root)).unwrap();
    let r = second.provision(p).await.unwrap();
    assert_eq!(r.vm_id, vmid);
    assert!(second
        .stage_events()
        .iter()
        .any(|(_, st, state, msg)| st == "start_vm"
            && *state == Completed
            && msg.as_deref().unwrap_or("").contains("already running")));
    assert_eq!(sim.created_vms().await.unwrap().len(), 1);
}

#[tokio::test]
async fn cancel_while_waiting_for_network_cleans_up() {
    let sim = sim(&["--fault-agent-never-up"]).await;
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let ctx = rec.ctx.clone();
    let mut p = params("cancel-me");
    p.network_timeout_secs = Some(60);
    let canceller = async {
        // Cancel once the wait for the network has begun.
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let vms = sim.created_vms().await.unwrap_or_default();
            if vms.iter().any(|v| v.status == "running") {
                tokio::time::sleep(Duration::from_millis(300)).await;
                ctx.request_cancel(trellis_protocol::CancelReason::Cancelled);
                break;
            }
        }
    };
    let started = std::time::Instant::now();
    let (r, ()) = tokio::join!(rec.provision(p), canceller);
    let e = r.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cancel is prompt"
    );
    assert_eq!(e.code, "cancelled");
    assert_eq!(e.stage.as_deref(), Some("wait_network"));
    assert_eq!(e.details.as_ref().unwrap()["status"], "cleaned_up");
    assert!(sim.created_vms().await.unwrap().is_empty());
}

#[tokio::test]
async fn unknown_template_and_non_template_are_clear_errors() {
    let sim = sim(&[]).await;
    let mut p = params("bad-template");
    p.template.template_id = Some(4242);
    let e = Recorded::new(&executor_for(&sim), None)
        .unwrap()
        .provision(p.clone())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.stage.as_deref()),
        ("template_not_found", Some("clone_template"))
    );
    assert!(e.details.is_none(), "nothing was created");
    p.template.template_id = Some(100);
    let e = Recorded::new(&executor_for(&sim), None)
        .unwrap()
        .provision(p)
        .await
        .unwrap_err();
    assert_eq!(e.code, "invalid_template");
    assert!(e.message.contains("legacy-db"), "{}", e.message);
}

#[tokio::test]
async fn failing_start_task_and_unknown_bridge() {
    let sim = sim(&[]).await;
    let mut p = params("nobridge");
    p.template.network_bridge = Some("vmbr9".into());
    let e = Recorded::new(&executor_for(&sim), None)
        .unwrap()
        .provision(p)
        .await
        .unwrap_err();
    assert_eq!(e.stage.as_deref(), Some("start_vm"));
    assert!(
        e.message.contains("bridge 'vmbr9' does not exist"),
        "{}",
        e.message
    );
    assert!(sim.created_vms().await.unwrap().is_empty());
}

#[tokio::test]
async fn storage_lock_timeout_in_clone_task_is_retried() {
    let sim = sim(&[]).await;
    sim.set_faults(&Faults {
        fail_next_clone: Some(
            "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout".into(),
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let r = rec
        .provision(params("lock-retry"))
        .await
        .expect("second clone works");
    assert_eq!(r.vm_id, 102, "a fresh id after the failed clone of 101");
    assert!(rec.log(LogStream::System).contains("lock timeout"));
    assert_eq!(sim.created_vms().await.unwrap().len(), 1);
    let failed = sim
        .tasks()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.kind == "qmclone" && t.exitstatus.as_deref() != Some("OK"))
        .count();
    assert_eq!(failed, 1);
}

#[tokio::test]
async fn target_node_gets_a_full_clone_there() {
    let sim = sim(&[]).await;
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let mut p = params("on-pve2");
    p.target_node = Some("pve2".into());
    p.skip_post_provision = true;
    let r = rec.provision(p).await.unwrap();
    assert_eq!(r.node, "pve2");
    let vms = sim.created_vms().await.unwrap();
    assert_eq!((vms[0].vmid, vms[0].node.as_str()), (r.vm_id, "pve2"));
    assert_eq!(
        rec.stages()
            .iter()
            .filter(|(st, _)| st == "post_provision")
            .collect::<Vec<_>>(),
        vec![&s("post_provision", Skipped)]
    );
}
