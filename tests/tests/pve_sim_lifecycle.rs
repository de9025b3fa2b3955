//! pve-sim's VM lifecycle against raw HTTP: `status/current`, start/shutdown/stop/reboot
//! tasks (with a guest that ignores ACPI, with and without `forceStop`), destroy (running,
//! protected), tags in config and listings, and the `/_sim` control API that acts behind
//! the client's back. The simulator runs in-process with short timings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use trellis_tests::pve_sim::{
    self, Sim, SimConfig, VmView, DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET,
};

/// One Proxmox second in the simulator.
const SECOND_MS: u64 = 20;

struct TestSim {
    url: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("").trim_end()
    }

    fn upid(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.body);
        self.body["data"].as_str().expect("a UPID").to_string()
    }
}

async fn start() -> TestSim {
    let config = SimConfig {
        auth_fail_delay: Duration::from_millis(10),
        clone_ms: 100,
        start_ms: 150,
        stop_ms: 60,
        shutdown_ms: 100,
        destroy_ms: 80,
        sim_second_ms: SECOND_MS,
        agent_boot_ms: 100,
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let sim = Arc::new(Sim::new(config));
    tokio::spawn(async move {
        pve_sim::serve(listener, sim, None, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestSim {
        url: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        _stop: tx,
    }
}

impl TestSim {
    async fn api(&self, method: Method, path: &str, form: &[(&str, &str)]) -> Answer {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/api2/json{path}", self.url))
            .header(
                "Authorization",
                format!("PVEAPIToken={DEFAULT_TOKEN_ID}={DEFAULT_TOKEN_SECRET}"),
            );
        if !form.is_empty() {
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish();
            req = if method == Method::GET || method == Method::DELETE {
                req.query(form)
            } else {
                req.header("Content-Type", "application/x-www-form-urlencoded")
                    .body(body)
            };
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body }
    }

    async fn get(&self, path: &str) -> Answer {
        self.api(Method::GET, path, &[]).await
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.api(Method::POST, path, form).await
    }

    /// `POST …/status/{action}` on pve1.
    async fn power(&self, vmid: u32, action: &str, form: &[(&str, &str)]) -> Answer {
        self.post(&format!("/nodes/pve1/qemu/{vmid}/status/{action}"), form)
            .await
    }

    async fn status(&self, vmid: u32) -> Value {
        let a = self
            .get(&format!("/nodes/pve1/qemu/{vmid}/status/current"))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["data"].clone()
    }

    async fn task(&self, upid: &str) -> Value {
        let node = upid.split(':').nth(1).unwrap();
        let a = self
            .get(&format!("/nodes/{node}/tasks/{upid}/status"))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["data"].clone()
    }

    /// Polls the task to its end; returns its exit status and how long that took.
    async fn wait(&self, upid: &str) -> (String, Duration) {
        let t0 = Instant::now();
        loop {
            let t = self.task(upid).await;
            if t["status"] == "stopped" {
                return (t["exitstatus"].as_str().unwrap().to_string(), t0.elapsed());
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "task never ends");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn log(&self, upid: &str) -> Vec<String> {
        let node = upid.split(':').nth(1).unwrap();
        let a = self.get(&format!("/nodes/{node}/tasks/{upid}/log")).await;
        a.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["t"].as_str().unwrap().to_string())
            .collect()
    }

    async fn control(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/_sim{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn set_power(&self, vmid: u32, running: bool) -> (u16, Value) {
        self.control(
            Method::POST,
            &format!("/vms/{vmid}/power"),
            Some(json!({ "running": running })),
        )
        .await
    }

    async fn flags(&self, vmid: u32, flags: Value) -> (u16, Value) {
        self.control(Method::POST, &format!("/vms/{vmid}/flags"), Some(flags))
            .await
    }

    async fn vm(&self, vmid: u32) -> Option<VmView> {
        let (_, v) = self.control(Method::GET, "/vms", None).await;
        let vms: Vec<VmView> = serde_json::from_value(v).unwrap();
        vms.into_iter().find(|v| v.vmid == vmid)
    }

    /// Clones template 9000 to `newid` on pve1 and waits for it (stopped, unlocked).
    async fn clone(&self, newid: u32) {
        let id = newid.to_string();
        let upid = self
            .post(
                "/nodes/pve1/qemu/9000/clone",
                &[("newid", &id), ("name", "lc-test")],
            )
            .await
            .upid();
        assert_eq!(self.wait(&upid).await.0, "OK");
    }
}

fn missing(vmid: u32) -> String {
    format!("Configuration file 'nodes/pve1/qemu-server/{vmid}.conf' does not exist")
}

#[tokio::test]
async fn status_current_shows_state_and_missing_vms_are_500() {
    let sim = start().await;
    let s = sim.status(100).await;
    assert_eq!(s["status"], "running");
    assert_eq!(s["qmpstatus"], "running");
    assert_eq!(s["name"], "legacy-db");
    assert_eq!(s["vmid"], 100);
    assert_eq!(s["agent"], 1);
    assert_eq!(s["ha"], json!({"managed": 0}));
    assert!(s["uptime"].as_u64().unwrap() >= 3600);
    assert!(s.get("lock").is_none());
    assert!(s.get("tags").is_none());

    // Gone, or on another node: Proxmox's "does not exist".
    let a = sim.get("/nodes/pve1/qemu/4242/status/current").await;
    assert_eq!((a.status, a.message()), (500, missing(4242).as_str()));
    let a = sim.get("/nodes/pve1/qemu/9002/status/current").await;
    assert_eq!((a.status, a.message()), (500, missing(9002).as_str()));
    let a = sim.get("/nodes/pve2/qemu/9002/status/current").await;
    assert_eq!(a.status, 200);

    // A template: stopped, template 1; it can't start.
    let t = sim.status(9000).await;
    assert_eq!(
        (t["status"].as_str(), t["template"].as_u64()),
        (Some("stopped"), Some(1))
    );
    let a = sim.power(9000, "start", &[]).await;
    assert_eq!(
        (a.status, a.message()),
        (500, "you can't start a vm if it's a template")
    );
}

#[tokio::test]
async fn start_stop_and_shutdown_change_state_only_when_the_task_ends() {
    let sim = start().await;
    let a = sim.power(100, "start", &[]).await;
    assert_eq!((a.status, a.message()), (500, "VM 100 already running"));

    // stop: accepted is not reached.
    let upid = sim.power(100, "stop", &[("timeout", "5")]).await.upid();
    assert!(
        upid.starts_with("UPID:pve1:") && upid.contains(":qmstop:100:"),
        "{upid}"
    );
    assert_eq!(sim.status(100).await["status"], "running");
    assert_eq!(sim.wait(&upid).await.0, "OK");
    let s = sim.status(100).await;
    assert_eq!(
        (s["status"].as_str(), s["uptime"].as_u64()),
        (Some("stopped"), Some(0))
    );

    // Shutdown or stop of a stopped VM: a task that does nothing and ends OK.
    let upid = sim.power(100, "shutdown", &[]).await.upid();
    assert_eq!(sim.wait(&upid).await.0, "OK");
    let upid = sim.power(100, "stop", &[]).await.upid();
    assert_eq!(sim.wait(&upid).await.0, "OK");
    // reboot needs a running VM.
    let a = sim.power(100, "reboot", &[]).await;
    assert_eq!((a.status, a.message()), (500, "VM 100 not running"));

    let upid = sim.power(100, "start", &[]).await.upid();
    assert!(upid.contains(":qmstart:100:"));
    assert_eq!(sim.status(100).await["status"], "stopped");
    let a = sim.power(100, "start", &[]).await;
    assert_eq!(
        a.status, 200,
        "a second start is accepted while the first runs"
    );
    let second = a.upid();
    assert_eq!(sim.wait(&upid).await.0, "OK");
    assert_eq!(sim.status(100).await["status"], "running");
    // The second start waited for the config lock, then found the VM running.
    assert_eq!(sim.wait(&second).await.0, "VM 100 already running");

    // A cooperating guest shuts down well within the timeout.
    let upid = sim
        .power(100, "shutdown", &[("timeout", "30"), ("forceStop", "0")])
        .await
        .upid();
    assert!(upid.contains(":qmshutdown:100:"));
    assert_eq!(sim.status(100).await["status"], "running");
    let (exit, took) = sim.wait(&upid).await;
    assert_eq!(exit, "OK");
    assert!(took < Duration::from_millis(30 * SECOND_MS), "{took:?}");
    assert_eq!(sim.status(100).await["status"], "stopped");

    // Unknown parameters and root-only options are refused like Proxmox does.
    let a = sim.power(100, "start", &[("forceStop", "1")]).await;
    assert_eq!(a.status, 400);
    assert!(a.body["errors"]["forceStop"]
        .as_str()
        .unwrap()
        .contains("not defined in schema"));
    let a = sim.power(100, "shutdown", &[("keepActive", "1")]).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body["errors"]["keepActive"],
        "Only root may use this option."
    );
    let a = sim.power(100, "shutdown", &[("timeout", "-1")]).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        sim.power(100, "shutdown", &[("keepActive", "0")])
            .await
            .status,
        200
    );
    let a = sim.power(100, "hibernate", &[]).await;
    assert_eq!(a.status, 501);
    let a = sim.power(4242, "start", &[]).await;
    assert_eq!((a.status, a.message()), (500, missing(4242).as_str()));
}

#[tokio::test]
async fn a_guest_ignoring_acpi_fails_the_shutdown_at_the_timeout_unless_force_stop() {
    let sim = start().await;
    let (code, v) = sim.flags(100, json!({"ignore_acpi": true})).await;
    assert_eq!((code, v["ignore_acpi"].as_bool()), (200, Some(true)));

    // Without forceStop: the task fails at the timeout, the VM keeps running.
    let upid = sim
        .power(100, "shutdown", &[("timeout", "10")])
        .await
        .upid();
    let (exit, took) = sim.wait(&upid).await;
    assert_eq!(exit, "VM quit/powerdown failed - got timeout");
    assert!(took >= Duration::from_millis(10 * SECOND_MS), "{took:?}");
    assert_eq!(sim.status(100).await["status"], "running");
    assert_eq!(
        sim.log(&upid).await.last().unwrap(),
        "TASK ERROR: VM quit/powerdown failed - got timeout"
    );

    // With forceStop=1: stopped at the timeout, with a warning.
    let upid = sim
        .power(100, "shutdown", &[("timeout", "10"), ("forceStop", "1")])
        .await
        .upid();
    tokio::time::sleep(Duration::from_millis(5 * SECOND_MS)).await;
    assert_eq!(
        sim.status(100).await["status"],
        "running",
        "not before the timeout"
    );
    let (exit, took) = sim.wait(&upid).await;
    assert_eq!(exit, "WARNINGS: 1");
    assert!(took >= Duration::from_millis(5 * SECOND_MS), "{took:?}");
    assert_eq!(sim.status(100).await["status"], "stopped");
    let log = sim.log(&upid).await;
    assert!(
        log.contains(&"VM still running - terminating now with SIGTERM".to_string()),
        "{log:?}"
    );
    assert_eq!(log.last().unwrap(), "TASK WARNINGS: 1");

    // The default timeout is 60 s.
    sim.set_power(100, true).await;
    let upid = sim.power(100, "shutdown", &[]).await.upid();
    let (exit, took) = sim.wait(&upid).await;
    assert_eq!(exit, "VM quit/powerdown failed - got timeout");
    assert!(took >= Duration::from_millis(60 * SECOND_MS), "{took:?}");

    // A timeout shorter than the guest needs to power off also runs out.
    sim.flags(100, json!({"ignore_acpi": false})).await;
    let upid = sim.power(100, "shutdown", &[("timeout", "0")]).await.upid();
    assert_eq!(
        sim.wait(&upid).await.0,
        "VM quit/powerdown failed - got timeout"
    );
    assert_eq!(sim.status(100).await["status"], "running");
}

#[tokio::test]
async fn stop_waits_for_a_running_shutdown_or_overrules_it() {
    let sim = start().await;
    sim.flags(100, json!({"ignore_acpi": true})).await;
    // A long shutdown holds the VM's config lock; a plain stop gives up after 10 s.
    let shutdown = sim
        .power(100, "shutdown", &[("timeout", "30")])
        .await
        .upid();
    let stop = sim.power(100, "stop", &[]).await.upid();
    let (exit, took) = sim.wait(&stop).await;
    assert_eq!(
        exit,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout"
    );
    assert!(took >= Duration::from_millis(10 * SECOND_MS), "{took:?}");
    assert_eq!(sim.task(&shutdown).await["status"], "running");

    // overrule-shutdown aborts the shutdown task, then stops.
    let stop = sim
        .power(100, "stop", &[("overrule-shutdown", "1")])
        .await
        .upid();
    let t = sim.task(&shutdown).await;
    assert_eq!(
        (t["status"].as_str(), t["exitstatus"].as_str()),
        (Some("stopped"), Some("received interrupt"))
    );
    assert_eq!(sim.wait(&stop).await.0, "OK");
    assert_eq!(sim.status(100).await["status"], "stopped");
    let log = sim.log(&stop).await;
    assert_eq!(log[0], format!("overruled qmshutdown tasks: {shutdown}"));

    // A stop queued behind a short job just waits for it.
    sim.flags(100, json!({"ignore_acpi": false})).await;
    let start = sim.power(100, "start", &[]).await.upid();
    let stop = sim.power(100, "stop", &[]).await.upid();
    assert_eq!(sim.wait(&start).await.0, "OK");
    assert_eq!(sim.wait(&stop).await.0, "OK");
    assert_eq!(sim.status(100).await["status"], "stopped");
}

#[tokio::test]
async fn reboot_ends_running_with_a_fresh_boot() {
    let sim = start().await;
    assert!(sim.status(100).await["uptime"].as_u64().unwrap() >= 3600);
    let upid = sim.power(100, "reboot", &[("timeout", "20")]).await.upid();
    assert!(upid.contains(":qmreboot:100:"));
    assert_eq!(sim.wait(&upid).await.0, "OK");
    let s = sim.status(100).await;
    assert_eq!(s["status"], "running");
    assert!(s["uptime"].as_u64().unwrap() < 5, "{s}");

    sim.flags(100, json!({"ignore_acpi": true})).await;
    let upid = sim.power(100, "reboot", &[("timeout", "3")]).await.upid();
    assert_eq!(
        sim.wait(&upid).await.0,
        "VM quit/powerdown failed - got timeout"
    );
    assert_eq!(sim.status(100).await["status"], "running");
    let a = sim.power(100, "reboot", &[("forceStop", "1")]).await;
    assert_eq!(a.status, 400, "reboot has no forceStop");
}

#[tokio::test]
async fn destroy_refuses_running_and_protected_vms_and_removes_at_the_end() {
    let sim = start().await;
    let a = sim
        .api(Method::DELETE, "/nodes/pve1/qemu/100", &[("purge", "1")])
        .await;
    assert_eq!(
        (a.status, a.message()),
        (500, "VM 100 is running - destroy failed")
    );

    sim.clone(555).await;
    sim.post("/nodes/pve1/qemu/555/config", &[("protection", "1")])
        .await
        .upid();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cfg = sim.get("/nodes/pve1/qemu/555/config").await.body["data"].clone();
    assert_eq!(cfg["protection"], 1);
    let a = sim.api(Method::DELETE, "/nodes/pve1/qemu/555", &[]).await;
    assert_eq!(
        (a.status, a.message()),
        (500, "can't remove VM 555 - protection mode enabled")
    );
    // The control API clears it (and shows it).
    let (_, v) = sim.flags(555, json!({"protection": false})).await;
    assert_eq!(v["protection"], false);

    let upid = sim
        .api(
            Method::DELETE,
            "/nodes/pve1/qemu/555",
            &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
        )
        .await
        .upid();
    assert!(upid.contains(":qmdestroy:555:"), "{upid}");
    // Still there while the task runs, locked "destroyed".
    let s = sim.status(555).await;
    assert_eq!(s["lock"], "destroyed");
    let a = sim.power(555, "start", &[]).await;
    assert_eq!((a.status, a.message()), (500, "VM is locked (destroyed)"));
    assert_eq!(sim.wait(&upid).await.0, "OK");
    let a = sim.get("/nodes/pve1/qemu/555/status/current").await;
    assert_eq!((a.status, a.message()), (500, missing(555).as_str()));
    let log = sim.log(&upid).await;
    assert!(log.iter().any(|l| l.contains("purging VM 555")), "{log:?}");
    let list = sim.get("/cluster/resources?type=vm").await.body["data"].clone();
    assert!(!list.as_array().unwrap().iter().any(|v| v["vmid"] == 555));
    let a = sim.api(Method::DELETE, "/nodes/pve1/qemu/555", &[]).await;
    assert_eq!((a.status, a.message()), (500, missing(555).as_str()));

    // Protection can also be set through the control API; a stopped VM then still
    // refuses destroy.
    sim.clone(556).await;
    sim.flags(556, json!({"protection": true})).await;
    let a = sim.api(Method::DELETE, "/nodes/pve1/qemu/556", &[]).await;
    assert_eq!(a.message(), "can't remove VM 556 - protection mode enabled");
    let a = sim
        .api(Method::DELETE, "/nodes/pve1/qemu/556", &[("skiplock", "1")])
        .await;
    assert_eq!(a.status, 400, "skiplock is root only");

    // Destroy queued behind a start: it begins when the start has ended, checks again,
    // finds the VM running and fails; the VM stays.
    sim.flags(556, json!({"protection": false})).await;
    let start = sim.power(556, "start", &[]).await.upid();
    let upid = sim
        .api(Method::DELETE, "/nodes/pve1/qemu/556", &[])
        .await
        .upid();
    assert_eq!(sim.wait(&start).await.0, "OK");
    assert_eq!(
        sim.wait(&upid).await.0,
        "VM 556 is running - destroy failed"
    );
    assert_eq!(sim.status(556).await["status"], "running");
}

#[tokio::test]
async fn tags_show_in_config_and_listings_and_every_vm_is_listed() {
    let sim = start().await;
    sim.clone(560).await;
    let a = sim
        .api(
            Method::PUT,
            "/nodes/pve1/qemu/560/config",
            &[("tags", "trellis;Node-7,trellis")],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let cfg = sim.get("/nodes/pve1/qemu/560/config").await.body["data"].clone();
    assert_eq!(cfg["tags"], "node-7;trellis");
    assert_eq!(sim.status(560).await["tags"], "node-7;trellis");
    let a = sim
        .api(
            Method::PUT,
            "/nodes/pve1/qemu/560/config",
            &[("tags", "bad tag!")],
        )
        .await;
    assert_eq!(a.status, 400);
    assert!(a.body["errors"]["tags"].is_string());

    let list = sim.get("/cluster/resources?type=vm").await.body["data"].clone();
    let items = list.as_array().unwrap();
    let ids: Vec<u64> = items.iter().map(|v| v["vmid"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![100, 560, 9000, 9001, 9002]);
    let vm = items.iter().find(|v| v["vmid"] == 560).unwrap();
    assert_eq!(vm["tags"], "node-7;trellis");
    assert_eq!(
        (
            &vm["id"],
            &vm["type"],
            &vm["node"],
            &vm["status"],
            &vm["name"],
            &vm["template"]
        ),
        (
            &json!("qemu/560"),
            &json!("qemu"),
            &json!("pve1"),
            &json!("stopped"),
            &json!("lc-test"),
            &json!(0)
        )
    );
    assert_eq!(
        (vm["maxmem"].as_u64(), vm["maxcpu"].as_u64()),
        (Some(2048 << 20), Some(2))
    );
    let legacy = items.iter().find(|v| v["vmid"] == 100).unwrap();
    assert!(legacy.get("tags").is_none(), "no tags field when unset");
    assert_eq!(
        items.iter().find(|v| v["vmid"] == 9002).unwrap()["template"],
        1
    );

    let node = sim.get("/nodes/pve1/qemu").await.body["data"].clone();
    let node = node.as_array().unwrap();
    assert_eq!(node.len(), 4);
    let vm = node.iter().find(|v| v["vmid"] == 560).unwrap();
    assert_eq!(
        (vm["tags"].as_str(), vm["status"].as_str()),
        (Some("node-7;trellis"), Some("stopped"))
    );
    assert!(vm.get("template").is_none());
    assert_eq!(
        node.iter().find(|v| v["vmid"] == 9000).unwrap()["template"],
        1
    );

    // The control API's view shows them; deleting the key removes the field.
    assert_eq!(
        sim.vm(560).await.unwrap().tags.as_deref(),
        Some("node-7;trellis")
    );
    sim.api(
        Method::PUT,
        "/nodes/pve1/qemu/560/config",
        &[("delete", "tags")],
    )
    .await;
    let cfg = sim.get("/nodes/pve1/qemu/560/config").await.body["data"].clone();
    assert!(cfg.get("tags").is_none());
    let list = sim.get("/cluster/resources?type=vm").await.body["data"].clone();
    let vm = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vmid"] == 560)
        .unwrap()
        .clone();
    assert!(vm.get("tags").is_none());
}

#[tokio::test]
async fn control_api_acts_behind_the_clients_back() {
    let sim = start().await;
    let (code, v) = sim.set_power(100, false).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("stopped")));
    assert_eq!(sim.status(100).await["status"], "stopped");
    let (_, v) = sim.set_power(100, true).await;
    assert_eq!(v["status"], "running");
    let s = sim.status(100).await;
    assert_eq!(
        (s["status"].as_str(), s["uptime"].as_u64()),
        (Some("running"), Some(0))
    );
    let (code, _) = sim.set_power(9000, true).await;
    assert_eq!(code, 409, "a template never runs");
    let (code, _) = sim.set_power(4242, true).await;
    assert_eq!(code, 404);
    let (code, _) = sim
        .control(Method::POST, "/vms/100/power", Some(json!({"on": true})))
        .await;
    assert!(code >= 400);

    let (code, v) = sim.control(Method::DELETE, "/vms/100", None).await;
    assert_eq!((code, v["vmid"].as_u64()), (200, Some(100)));
    let a = sim.get("/nodes/pve1/qemu/100/status/current").await;
    assert_eq!((a.status, a.message()), (500, missing(100).as_str()));
    assert!(sim.vm(100).await.is_none());
    let (code, _) = sim.control(Method::DELETE, "/vms/100", None).await;
    assert_eq!(code, 404);
    let (code, _) = sim.flags(100, json!({"ignore_acpi": true})).await;
    assert_eq!(code, 404);

    let v = sim.vm(9001).await.unwrap();
    assert!(!v.ignore_acpi && !v.protection && v.tags.is_none());
}
