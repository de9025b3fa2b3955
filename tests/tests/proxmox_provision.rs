//! The agent's `provision` executor against the real `pve-sim` binary, when it works:
//! stages in order with their logs and the VM as configured, parallel VMID allocation
//! (also when another client takes an id first), a target node, and idempotency by root
//! command id (a retry continues with the VM of an earlier attempt, never a second one).

use trellis_protocol::{LogStream, ProvisionStatus, StageState};
use trellis_tests::pve_sim::exec_harness::{
    executor_for, fast_sim, provision_params as params, stage as s, Recorded,
};
use trellis_tests::pve_sim::process::SimProcess;
use trellis_tests::pve_sim::Faults;
use uuid::Uuid;

use StageState::{Completed, Running, Skipped};

const SIM: &str = env!("CARGO_BIN_EXE_pve-sim");

/// A simulator with short task durations.
async fn sim(extra: &[&str]) -> SimProcess {
    fast_sim(SIM, extra).await
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
