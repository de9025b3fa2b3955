//! The agent's `provision` executor against the real `pve-sim` binary, when something
//! goes wrong: a failing clone or start task, a silent guest agent, 5xx bursts (retried
//! when short and safe), storage lock timeouts, unknown templates and bridges, a failing
//! guest command, and a cancel mid-wait. Each names its stage and cleans up (or, with
//! `keep_on_failure`, reports the partial VM).

use std::time::Duration;

use trellis_protocol::{LogStream, ProvisionStatus, StageState};
use trellis_tests::pve_sim::exec_harness::{
    executor_for, fast_sim, provision_params as params, stage as s, Recorded,
};
use trellis_tests::pve_sim::process::SimProcess;
use trellis_tests::pve_sim::{Burst, Faults};

use StageState::{Failed, Running};

const SIM: &str = env!("CARGO_BIN_EXE_pve-sim");

/// A simulator with short task durations.
async fn sim(extra: &[&str]) -> SimProcess {
    fast_sim(SIM, extra).await
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
async fn a_failed_post_provision_command_keeps_the_vm_and_ends_partial() {
    // The VM is up: a failing post-provision command no longer destroys it (with or
    // without keep_on_failure); the command succeeds with a partial result and the error.
    let sim = sim(&[]).await;
    let mut rec = Recorded::new(&executor_for(&sim), None).unwrap();
    let mut p = params("keep-me");
    p.template.post_provision_commands =
        vec!["echo step1".into(), "echo disk full >&2 && exit 3".into()];
    let r = rec.provision(p).await.unwrap();
    assert_eq!(r.status, ProvisionStatus::Partial);
    assert_eq!(r.vm_id, 101);
    let e = r.error.expect("the post-provision error");
    assert_eq!(e.stage.as_deref(), Some("post_provision"));
    assert_eq!(e.code, "post_provision_failed");
    assert!(
        e.message.contains("exit code 3") && e.message.contains("disk full"),
        "{}",
        e.message
    );
    assert!(!r.stages_completed.contains(&"post_provision".to_string()));
    let vms = sim.created_vms().await.unwrap();
    assert_eq!(vms.len(), 1, "the working VM is kept");
    assert!(rec.log(LogStream::System).contains("exit code 3"));
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
