//! The agent's Proxmox client and `list_templates` against the real `pve-sim` binary:
//! templates, auth errors, permission errors, TLS pinning and CA file, error shapes of
//! old and new servers.

use reqwest::Method;
use tendril::proxmox::client::{ApiError, ProxmoxClient, Repeat};
use tendril::proxmox::{ProxmoxExecutor, ProxmoxSettings};
use trellis_protocol::{ListTemplatesParams, ProxmoxTemplate};
use trellis_tests::pve_sim::exec_harness::{settings_for, Recorded};
use trellis_tests::pve_sim::process::SimProcess;
use trellis_tests::pve_sim::Faults;

const SIM: &str = env!("CARGO_BIN_EXE_pve-sim");

async fn sim(extra: &[&str]) -> SimProcess {
    let mut args = vec!["--auth-fail-delay-ms", "50"];
    args.extend_from_slice(extra);
    SimProcess::start(SIM, &args).await.expect("pve-sim starts")
}

async fn templates(
    settings: ProxmoxSettings,
    node: Option<&str>,
) -> Result<Vec<ProxmoxTemplate>, trellis_protocol::CommandError> {
    let executor = ProxmoxExecutor::new(settings);
    let rec = Recorded::new(&executor, None).unwrap();
    let p = ListTemplatesParams {
        node: node.map(Into::into),
    };
    executor
        .list_templates(&rec.ctx, p)
        .await
        .map(|r| r.templates)
}

#[tokio::test]
async fn list_templates_returns_the_seeded_templates() {
    let sim = sim(&[]).await;
    let t = templates(settings_for(&sim), None).await.unwrap();
    let ids: Vec<(u32, &str, &str)> = t
        .iter()
        .map(|t| (t.vmid, t.name.as_str(), t.node.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            (9000, "debian-12-cloud", "pve1"),
            (9001, "ubuntu-24.04-cloud", "pve1"),
            (9002, "rocky-9-cloud", "pve2"),
        ],
        "templates only, not the ordinary VM 100"
    );
    assert_eq!(
        (t[0].memory, t[0].cores, t[0].disk_bytes),
        (2048, 2, Some(10 << 30))
    );
    let pve2 = templates(settings_for(&sim), Some("pve2")).await.unwrap();
    assert_eq!(pve2.iter().map(|t| t.vmid).collect::<Vec<_>>(), vec![9002]);
}

#[tokio::test]
async fn wrong_token_gives_a_clear_401_message() {
    let sim = sim(&[]).await;
    let mut s = settings_for(&sim);
    s.token_secret = tendril::secret::Secret::new("00000000-0000-0000-0000-000000000000");
    let e = templates(s, None).await.unwrap_err();
    assert_eq!(e.code, "proxmox_auth_failed");
    assert!(
        e.message.contains("401") && e.message.contains("PROXMOX_TOKEN_ID is USER@REALM!TOKENID"),
        "{}",
        e.message
    );
    assert!(
        !e.message.contains("00000000-0000"),
        "the secret never shows up: {}",
        e.message
    );
    assert!(!e.retryable);

    // A token id with the wrong layout is caught before any request.
    let mut s = settings_for(&sim);
    s.token_id = "root@pam:trellis".into();
    let e = templates(s, None).await.unwrap_err();
    assert_eq!(e.code, "proxmox_config");
    assert!(e.message.contains("USER@REALM!TOKENID"), "{}", e.message);

    // The client's Debug output hides the secret too.
    let c = ProxmoxClient::new(&settings_for(&sim)).unwrap();
    let dbg = format!("{c:?} {:?}", settings_for(&sim));
    assert!(
        !dbg.contains(trellis_tests::pve_sim::DEFAULT_TOKEN_SECRET),
        "{dbg}"
    );
}

#[tokio::test]
async fn privilege_separated_token_without_acl_gets_a_403_hint() {
    let sim = sim(&[]).await;
    sim.set_faults(&Faults {
        forbidden: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let e = templates(settings_for(&sim), None).await.unwrap_err();
    assert_eq!(e.code, "proxmox_permission_denied");
    assert!(
        e.message.contains("Permission check failed"),
        "{}",
        e.message
    );
    assert!(e.message.contains("privilege-separated"), "{}", e.message);
}

#[tokio::test]
async fn fingerprint_pinning_accepts_the_right_and_rejects_a_wrong_certificate() {
    let sim = sim(&["--tls"]).await;
    let right = sim.fingerprint.clone().expect("fingerprint printed");
    assert!(sim.url.starts_with("https://"));

    let ok = templates(settings_for(&sim), None).await.unwrap();
    assert_eq!(ok.len(), 3);

    let mut wrong = settings_for(&sim);
    wrong.tls_fingerprint = Some("AB:".repeat(31) + "CD");
    let e = templates(wrong, None).await.unwrap_err();
    assert_eq!(e.code, "proxmox_tls_error");
    assert!(e.message.contains("does not match"), "{}", e.message);
    assert!(
        e.message.contains(&right),
        "the message shows the server's real fingerprint: {}",
        e.message
    );

    // No pin and no CA: the self-signed cluster CA is not trusted.
    let mut none = settings_for(&sim);
    none.tls_fingerprint = None;
    let e = templates(none.clone(), None).await.unwrap_err();
    assert_eq!(e.code, "proxmox_tls_error", "{e:?}");
    assert!(e.message.contains("PROXMOX_CA_FILE"), "{}", e.message);

    // The cluster CA file works (the certificate names 127.0.0.1).
    let mut ca = none.clone();
    ca.ca_file = sim.ca_file.clone();
    assert_eq!(templates(ca, None).await.unwrap().len(), 3);

    // Insecure only when asked for explicitly.
    let mut insecure = none;
    insecure.insecure_tls = true;
    assert_eq!(templates(insecure, None).await.unwrap().len(), 3);
}

#[tokio::test]
async fn malformed_fingerprint_is_a_config_error() {
    let sim = sim(&["--tls"]).await;
    let mut s = settings_for(&sim);
    s.tls_fingerprint = Some("AB:CD".into());
    let e = templates(s, None).await.unwrap_err();
    assert_eq!(e.code, "proxmox_config");
    assert!(e.message.contains("32"), "{}", e.message);
}

async fn vm_status_error(sim: &SimProcess) -> ApiError {
    let c = ProxmoxClient::new(&settings_for(sim)).unwrap();
    c.vm_status("pve1", 4242).await.unwrap_err()
}

#[tokio::test]
async fn errors_keep_proxmox_text_from_new_and_old_servers() {
    let new = sim(&[]).await;
    let old = sim(&["--legacy-errors"]).await;
    for s in [&new, &old] {
        let e = vm_status_error(s).await;
        assert_eq!(e.status(), Some(500));
        assert_eq!(
            e.message(),
            "Configuration file 'nodes/pve1/qemu-server/4242.conf' does not exist"
        );
        assert!(e.is_missing());
    }
    // 400 with per-parameter errors.
    let c = ProxmoxClient::new(&settings_for(&new)).unwrap();
    let e = c
        .call::<serde_json::Value>(
            Method::GET,
            "/cluster/nextid",
            &[("vmid", "100".into())],
            None,
            Repeat::Safe,
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert_eq!(
        e.message(),
        "Parameter verification failed. (vmid: VM 100 already exists)"
    );
    assert!(!c.is_vmid_free(100).await.unwrap());
    assert!(c.is_vmid_free(4242).await.unwrap());
    // Unknown path → 501.
    let e = c
        .call::<serde_json::Value>(Method::GET, "/nodes/pve1/bogus", &[], None, Repeat::Safe)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(501));
    assert_eq!(
        e.message(),
        "Method 'GET /nodes/pve1/bogus' not implemented"
    );
}

#[tokio::test]
async fn clone_locks_the_vm_until_the_task_ends() {
    let sim = sim(&["--clone-ms", "400"]).await;
    let c = ProxmoxClient::new(&settings_for(&sim)).unwrap();
    let req = tendril::proxmox::client::CloneRequest {
        newid: 777,
        name: "locked".into(),
        description: "x".into(),
        target: None,
        full: false,
        storage: None,
        pool: None,
    };
    let upid = c.clone_vm("pve1", 9000, &req).await.unwrap();
    assert_eq!(
        (upid.node.as_str(), upid.kind.as_str(), upid.id.as_str()),
        ("pve1", "qmclone", "9000")
    );
    assert_eq!(upid.user, trellis_tests::pve_sim::DEFAULT_TOKEN_ID);
    assert_eq!(
        c.vm_status("pve1", 777).await.unwrap().lock.as_deref(),
        Some("clone")
    );
    let e = c
        .update_config("pve1", 777, &[("memory", "512".into())])
        .await
        .unwrap_err();
    assert_eq!(e.message(), "VM is locked (clone)");
    let e = c
        .power("pve1", 777, "start", Repeat::Unsafe)
        .await
        .unwrap_err();
    assert!(e.is_locked());
    // A second clone to the same id: "already exists".
    let e = c.clone_vm("pve1", 9000, &req).await.unwrap_err();
    assert!(e.is_vmid_taken(), "{e}");
    // Brand-new VMs show up with status unknown and no name.
    let r = c.cluster_vms().await.unwrap();
    let new = r.iter().find(|r| r.vmid() == Some(777)).unwrap();
    assert_eq!(
        (new.status.as_deref(), new.name.as_deref()),
        (Some("unknown"), None)
    );
    loop {
        let st = c.task_status(&upid).await.unwrap();
        if !st.is_running() {
            assert_eq!(st.failure(), None);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(c.vm_status("pve1", 777).await.unwrap().lock, None);
    c.update_config("pve1", 777, &[("memory", "512".into())])
        .await
        .unwrap();
    let log = c.task_log(&upid, 0, 50).await.unwrap();
    assert_eq!(log.last().map(|l| l.t.as_str()), Some("TASK OK"));
    // A running VM refuses to be destroyed.
    let up = c.power("pve1", 777, "start", Repeat::Unsafe).await.unwrap();
    while c.task_status(&up).await.unwrap().is_running() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let e = c.delete_vm("pve1", 777).await.unwrap_err();
    assert_eq!(e.message(), "VM 777 is running - destroy failed");
}

#[tokio::test]
async fn sim_listens_on_https_and_reports_its_fingerprint_format() {
    let sim = sim(&["--tls"]).await;
    let fp = sim.fingerprint.clone().unwrap();
    assert_eq!(fp.len(), 32 * 3 - 1);
    assert!(fp.split(':').all(|b| b.len() == 2
        && b.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())));
    let st = sim.stats().await.unwrap();
    assert_eq!(st["vms"], 4);
}

#[tokio::test]
async fn slow_server_hits_the_request_timeout_and_is_retryable() {
    let sim = sim(&[]).await;
    sim.set_faults(&Faults {
        slow_ms: 1500,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = settings_for(&sim);
    s.request_timeout = std::time::Duration::from_millis(300);
    let mut c = ProxmoxClient::new(&s).unwrap();
    c.retry.attempts = 2;
    let e = c.cluster_vms().await.unwrap_err();
    let ce = c.command_error(&e);
    assert_eq!(ce.code, "proxmox_timeout", "{ce:?}");
    assert!(ce.retryable);
    assert_eq!(
        sim.stats().await.unwrap()["requests"],
        2,
        "a GET is retried"
    );
}

#[tokio::test]
async fn sim_checks_the_token_header_layout_like_pve() {
    let sim = sim(&[]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api2/json/version", sim.url);
    let id = trellis_tests::pve_sim::DEFAULT_TOKEN_ID;
    let secret = trellis_tests::pve_sim::DEFAULT_TOKEN_SECRET;
    for (header, status) in [
        (format!("PVEAPIToken={id}={secret}"), 200),
        (format!("PVEAPIToken={id}:{secret}"), 401), // the PBS/PDM separator
        (format!("PVEAPIToken {id}={secret}"), 401),
        (format!("PVEAPIToken={id}=wrong"), 401),
        (format!("Bearer {secret}"), 401),
    ] {
        let r = http
            .get(&url)
            .header("Authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{header}");
        if status == 401 {
            assert_eq!(r.text().await.unwrap(), "", "401 has an empty body");
        }
    }
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Unknown paths are 501, inside and outside /api2/json.
    let r = http
        .get(format!("{}/api2/json/nodes/pve1/lxc", sim.url))
        .header("Authorization", format!("PVEAPIToken={id}={secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 501);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["data"], serde_json::Value::Null);
    assert_eq!(
        body["message"],
        "Method 'GET /nodes/pve1/lxc' not implemented\n"
    );
}
