//! The agent install script trellis serves (`/install/tendril.sh`), run the way the
//! one-liner runs it (`curl … | sh -s -- --server …`) against a real trellis whose agent
//! binary is the debug tendril: the agent comes online and the script prints its name, the
//! environment file is 0600 and holds the token, and the token — given in the environment
//! — never shows in any process's argv while the script runs. An agent registered but never
//! connected is installed later with the line `GET /api/agents/install` gives, and the
//! token from its registration (no rotation).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trellis_tests::harness::{bin, Backend, ControlPlane, TempDir, TestDb};

/// Kills the tendril the script started (its pid file), also when the test fails.
struct StartedAgent(PathBuf);

impl StartedAgent {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for StartedAgent {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread")]
async fn install_script_brings_the_agent_online_without_the_token_in_argv() {
    let dir = TempDir::new("install-script");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let tendril = bin("tendril");
    let cp = ControlPlane::start_with(
        db,
        &dir,
        "127.0.0.1:0",
        &[(
            "TRELLIS_AGENT_BINARY",
            tendril.to_str().expect("utf-8 path"),
        )],
    )
    .await;
    let api = cp.api();
    let (agent_id, token) = api.create_agent("pve-install-1").await;
    let server = cp.url("");
    let prefix = dir.join("root");
    let started = StartedAgent(prefix.join("run/tendril.pid"));

    // The one-liner, with the token in the environment as the printed form puts it, and
    // Proxmox settings as flags with the token secret from the environment too (nothing
    // listens on the Proxmox port: the agent connects to trellis regardless).
    let pve_secret = format!("pve-secret-{}", uuid::Uuid::new_v4().simple());
    let fingerprint = ["AB"; 32].join(":");
    let out_path = dir.join("script.out");
    let err_path = dir.join("script.err");
    let t0 = Instant::now();
    let mut script = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -fsSL {server}/install/tendril.sh | sh -s -- --server {server} \
             --prefix {} --no-systemd --wait-secs 60 --proxmox-url https://127.0.0.1:9 \
             --proxmox-token-id 'root@pam!trellis' --proxmox-fingerprint {fingerprint}",
            prefix.display()
        ))
        .env("TENDRIL_TOKEN", &token)
        .env("PROXMOX_TOKEN_SECRET", &pve_secret)
        .env("TENDRIL_HOSTNAME", "install-test-host")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("out file"))
        .stderr(std::fs::File::create(&err_path).expect("err file"))
        .spawn()
        .expect("start the install one-liner");

    // While it runs, no process's command line may carry the token (and the script's own
    // command line, with the prefix, shows that ps saw it running).
    let prefix_arg = prefix.display().to_string();
    let mut samples = 0;
    let mut saw_script = false;
    let status = loop {
        if let Some(status) = script.try_wait().expect("wait for the script") {
            break status;
        }
        let ps = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps");
        let listing = String::from_utf8_lossy(&ps.stdout);
        assert!(
            !listing.contains(&token),
            "the agent token is on a command line:\n{listing}"
        );
        assert!(
            !listing.contains(&pve_secret),
            "the Proxmox token secret is on a command line:\n{listing}"
        );
        samples += 1;
        saw_script |= listing.contains(&prefix_arg);
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = script.kill();
            panic!(
                "the install script did not finish within 90 s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = t0.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "install script failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("tendril is online as agent pve-install-1"),
        "the script did not print the agent's name:\n{stdout}\n{stderr}"
    );
    assert!(
        saw_script,
        "ps never saw the running script ({samples} samples)"
    );
    eprintln!("install script: {took:?}, {samples} ps samples without the token");

    // trellis agrees, and the agent is the one the script started.
    let a = api.get(&format!("/api/agents/{agent_id}")).await;
    assert_eq!(a["status"], "online", "{a}");
    assert_eq!(a["hostname"], "install-test-host", "{a}");
    let pid = started.pid().expect("pid file");
    assert!(alive(pid), "tendril (pid {pid}) is not running");

    // The environment file: root-only, with the token and the ws:// endpoint.
    let env_file = prefix.join("etc/tendril/tendril.env");
    let mode = std::fs::metadata(&env_file)
        .expect("env file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "env file mode {mode:o}");
    let env = std::fs::read_to_string(&env_file).expect("read env file");
    assert!(env.contains(&format!("TENDRIL_TOKEN='{token}'")), "{env}");
    for line in [
        format!("PROXMOX_TOKEN_SECRET='{pve_secret}'"),
        "PROXMOX_URL='https://127.0.0.1:9'".to_string(),
        "PROXMOX_TOKEN_ID='root@pam!trellis'".to_string(),
        format!("PROXMOX_TLS_FINGERPRINT='{fingerprint}'"),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in:\n{env}");
    }
    assert!(
        env.contains(&format!("TENDRIL_SERVER_URL='{}'", cp.ws_url())),
        "{env}"
    );
    let installed = prefix.join("usr/local/bin/tendril");
    let mode = std::fs::metadata(&installed)
        .expect("binary")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "binary mode {mode:o}");

    // Clean up: the started tendril stops on SIGTERM and the agent goes offline.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let stop = Instant::now();
    while alive(pid) {
        assert!(
            stop.elapsed() < Duration::from_secs(15),
            "tendril did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.wait_until(Duration::from_secs(15), || async {
        api.get(&format!("/api/agents/{agent_id}")).await["status"] == "offline"
    })
    .await;
    drop(started);
}

#[tokio::test(flavor = "multi_thread")]
async fn install_routes_answer_without_admin_auth() {
    let dir = TempDir::new("install-routes");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let missing = dir.join("no-such-tendril");
    let cp = ControlPlane::start_with(
        db,
        &dir,
        "127.0.0.1:0",
        &[(
            "TRELLIS_AGENT_BINARY",
            missing.to_str().expect("utf-8 path"),
        )],
    )
    .await;
    let http = reqwest::Client::new();

    let r = http
        .get(cp.url("/install/tendril.sh"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").starts_with("#!/bin/sh"));
    let r = http
        .get(cp.url("/install/tendril.service"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .expect("body")
        .contains("ProtectSystem=strict"));

    // No binary to hand out: 404 with the error format and a message that says what to do.
    let r = http
        .get(cp.url("/install/tendril"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("--agent-binary"), "{msg}");

    // /api/agents/self: the agent token (not an admin's) answers with the name and status.
    let api = cp.api();
    let (_, token) = api.create_agent("pve-self").await;
    let r = http
        .get(cp.url("/api/agents/self"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let me: serde_json::Value = r.json().await.expect("json");
    assert_eq!(me["name"], "pve-self", "{me}");
    assert_eq!(me["status"], "offline", "{me}");
    // The install info is for admins (an agent token is refused); without --public-url it
    // has no install line, the browser fills in the address it used.
    let r = http
        .get(cp.url("/api/agents/install"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    let info = api.get("/api/agents/install").await;
    assert!(
        info["publicUrl"].is_null() && info["installCommand"].is_null(),
        "{info}"
    );
    assert_eq!(
        info["serverPublicKey"].as_str().map(str::len),
        Some(44),
        "{info}"
    );
    for bad in [None, Some("not-a-token-0123456789")] {
        let mut req = http.get(cp.url("/api/agents/self"));
        if let Some(t) = bad {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("get");
        assert_eq!(r.status(), 401, "token {bad:?}");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_create_wait_prints_the_one_liner_and_waits_for_the_agent() {
    let dir = TempDir::new("install-cli");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start(db, &dir).await;
    let public = "https://trellis.example.com";
    let mut cli = Command::new(bin("trellis"))
        .args([
            "agents",
            "create",
            "pve-cli-wait",
            "--wait",
            "--wait-secs",
            "60",
        ])
        .args(["--public-url", public, "--database-url", &cp.db_url])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trellis agents create");
    let stdout = cli.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let next = |printed: &mut Vec<String>| {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no more output ({e}) after:\n{}", printed.join("\n")));
        printed.push(line.clone());
        line
    };
    // The token line, then the one-liner (without the token), then the wait.
    let token = loop {
        if let Some(t) = next(&mut printed).strip_prefix("token:") {
            break t.trim().to_string();
        }
    };
    // It pins the control plane's signing key, read from its data dir.
    let key = trellis_protocol::signing::SigningKey::from_base64(
        &std::fs::read_to_string(dir.join("signing.key")).unwrap(),
    )
    .unwrap()
    .public_key_base64();
    let one_liner = format!(
        "curl -fsSL {public}/install/tendril.sh | sh -s -- --server {public} --server-public-key {key}"
    );
    while !next(&mut printed).contains("waiting for the agent") {}
    let text = printed.join("\n");
    assert!(text.contains(&one_liner), "{text}");
    assert!(
        text.contains(&format!(
            "TENDRIL_TOKEN=\"$TENDRIL_TOKEN\" sh -s -- --server {public} --server-public-key {key}"
        )),
        "the unattended form pins it too: {text}"
    );
    assert!(
        !text
            .lines()
            .filter(|l| l.contains("curl"))
            .any(|l| l.contains(&token)),
        "the one-liner carries the token:\n{text}"
    );
    assert!(
        cli.try_wait().expect("try_wait").is_none(),
        "--wait returned early:\n{text}"
    );

    // The agent connects; the CLI sees it online and exits 0.
    let _agent = trellis_tests::harness::Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = cli.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "--wait did not return"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{status}: {text}\n{}", rest.join("\n"));
    assert!(
        rest.iter()
            .chain(printed.iter())
            .any(|l| l.contains("agent pve-cli-wait is online")),
        "{text}\n{}",
        rest.join("\n")
    );
    eprintln!(
        "agents create --wait returned {:?} after the agent started",
        t0.elapsed()
    );
}

/// A hypervisor registered earlier that never connected: the admin API gives its install
/// line (the public URL and the pinned signing key, never a token), and that line, run with
/// the token from the registration, brings it online — no token rotation needed.
#[tokio::test(flavor = "multi_thread")]
async fn a_never_connected_agent_installs_with_the_line_from_the_api() {
    let dir = TempDir::new("install-later");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let public = format!("http://127.0.0.1:{port}");
    let tendril = bin("tendril");
    let cp = ControlPlane::start_with(
        db,
        &dir,
        &format!("127.0.0.1:{port}"),
        &[
            (
                "TRELLIS_AGENT_BINARY",
                tendril.to_str().expect("utf-8 path"),
            ),
            ("TRELLIS_PUBLIC_URL", &public),
        ],
    )
    .await;
    let api = cp.api();
    let created = api
        .post("/api/agents", serde_json::json!({"name": "pve-later"}))
        .await;
    let agent_id = created["agent"]["id"].as_str().expect("id").to_string();
    let token = created["token"].as_str().expect("token").to_string();
    let key = created["serverPublicKey"]
        .as_str()
        .expect("key")
        .to_string();
    let a = api.get(&format!("/api/agents/{agent_id}")).await;
    assert!(
        a["lastHeartbeat"].is_null() && a["status"] == "offline",
        "{a}"
    );

    let info = api.get("/api/agents/install").await;
    assert_eq!(info["publicUrl"], public.as_str(), "{info}");
    assert_eq!(info["serverPublicKey"], key.as_str(), "{info}");
    let line = info["installCommand"].as_str().expect("installCommand");
    assert_eq!(
        line,
        format!(
            "curl -fsSL {public}/install/tendril.sh | sh -s -- --server {public} \
             --server-public-key {key}"
        )
    );
    assert!(!line.contains(&token), "{line}");

    let prefix = dir.join("root");
    let started = StartedAgent(prefix.join("run/tendril.pid"));
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{line} --prefix {} --no-systemd --wait-secs 60",
            prefix.display()
        ))
        .env("TENDRIL_TOKEN", &token)
        .env("TENDRIL_HOSTNAME", "later-host")
        .stdin(Stdio::null())
        .output()
        .expect("run the install line");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("tendril is online as agent pve-later"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = api.get(&format!("/api/agents/{agent_id}")).await;
    assert_eq!(
        (a["status"].as_str(), a["hostname"].as_str()),
        (Some("online"), Some("later-host")),
        "{a}"
    );
    // The pinned key is the control plane's.
    let env = std::fs::read_to_string(prefix.join("etc/tendril/tendril.env")).expect("env file");
    assert!(
        env.contains(&format!("TENDRIL_SERVER_PUBLIC_KEY='{key}'")),
        "{env}"
    );
    if let Some(pid) = started.pid() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    drop(started);
}
