//! Starting the real `trellis` and `tendril` binaries for end-to-end tests, on
//! 127.0.0.1, against a fresh SQLite file or a fresh PostgreSQL database ([`TestDb`]) in
//! a fresh directory ([`TempDir`]), and a small client for the admin API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// `target/debug` (or release) — where the workspace binaries are.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

pub use crate::db::{postgres_base, Backend, TestDb};
pub use crate::tempdir::TempDir;

/// The repository root (the parent of `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A fresh directory and database (`tag` names the directory) with a control plane on
/// them, and its admin API client. The control plane owns the database; the directory
/// outlives both, as the caller drops the tuple's parts in reverse order.
pub async fn control_plane(backend: Backend, tag: &str) -> (TempDir, ControlPlane, Api) {
    let dir = TempDir::new(tag);
    let db = TestDb::create(backend, &dir).await;
    let cp = ControlPlane::start(db, &dir).await;
    let api = cp.api();
    (dir, cp, api)
}

/// A running `trellis serve`, killed on drop. It owns its [`TestDb`], which is dropped
/// after the process is gone (and kept across [`ControlPlane::restart`]).
pub struct ControlPlane {
    child: Option<Child>,
    db: Option<TestDb>,
    pub addr: String,
    pub db_url: String,
    pub dir: PathBuf,
    log: PathBuf,
}

impl ControlPlane {
    pub async fn start(db: TestDb, dir: &Path) -> Self {
        Self::start_with(db, dir, "127.0.0.1:0", &[]).await
    }

    /// Starts `trellis serve` with extra environment variables.
    pub async fn start_with(db: TestDb, dir: &Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let mut cp = Self::launch(db.url(), dir, listen, env).await;
        cp.db = Some(db);
        cp
    }

    async fn launch(db_url: &str, dir: &Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("trellis-{}.log", uuid::Uuid::new_v4().simple()));
        let child = Command::new(bin("trellis"))
            .args(["serve", "--listen", listen, "--database-url", db_url])
            .env("TRELLIS_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(env.iter().copied())
            // TRELLIS_TEST_LOG overrides the control plane's log filter (e.g. `sqlx=debug`).
            .env(
                "RUST_LOG",
                std::env::var("TRELLIS_TEST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
            )
            .env("NO_COLOR", "1")
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start trellis");
        let started = Instant::now();
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("trellis listening")) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .expect("addr in listening line")
                    .to_string();
                break strip_ansi(&addr);
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "trellis did not start:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        Self {
            child: Some(child),
            db: None,
            addr,
            db_url: db_url.to_string(),
            dir: dir.to_path_buf(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/api/agents/connect", self.addr)
    }

    pub fn api(&self) -> Api {
        Api {
            base: format!("http://{}", self.addr),
            token: ADMIN_TOKEN.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running (`false` once it exited on its own, or was
    /// killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful shutdown); returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().expect("trellis running");
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let status = c.wait().expect("wait for trellis");
        (status, started.elapsed())
    }

    /// Starts again on the same address and database.
    pub async fn restart(&mut self) {
        self.restart_with(&[]).await;
    }

    /// Starts again on the same address and database with these environment variables
    /// (e.g. another `TRELLIS_ADMIN_TOKEN`).
    pub async fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.kill();
        let addr = self.addr.clone();
        let started = Instant::now();
        loop {
            let next = Self::try_start_on(&self.db_url, &self.dir, &addr, env).await;
            if let Some(mut next) = next {
                next.db = self.db.take();
                *self = next;
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "could not restart trellis on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_start_on(
        db_url: &str,
        dir: &Path,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Option<Self> {
        // The port may linger briefly after a kill; probe it first.
        std::net::TcpListener::bind(listen).ok()?;
        Some(Self::launch(db_url, dir, listen, env).await)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub struct Agent {
    child: Option<Child>,
    pub work_dir: PathBuf,
    server: String,
    token: String,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Agent {
    pub fn start(server_ws: &str, token: &str, work_dir: &Path) -> Self {
        Self::start_with(server_ws, token, work_dir, &[])
    }

    pub fn start_with(server_ws: &str, token: &str, work_dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut a = Self {
            child: None,
            work_dir: work_dir.to_path_buf(),
            server: server_ws.to_string(),
            token: token.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: work_dir.join("tendril.log"),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.work_dir).expect("work dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut cmd = Command::new(bin("tendril"));
        cmd.env("TENDRIL_SERVER_URL", &self.server)
            .env("TENDRIL_TOKEN", &self.token)
            .env("TENDRIL_WORK_DIR", &self.work_dir)
            .env("TENDRIL_HOSTNAME", "test-agent")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start tendril"));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().expect("wait for tendril")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A small admin API client.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    /// An admin API client of the server at `base` (`http://host:port`).
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, path, None).await;
        assert!(s < 300, "GET {path} → {s}: {v}");
        v
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!(s < 300, "POST {path} → {s}: {v}");
        v
    }

    /// Registers an agent; returns `(id, token)`.
    pub async fn create_agent(&self, name: &str) -> (String, String) {
        let v = self.post("/api/agents", json!({ "name": name })).await;
        (
            v["agent"]["id"].as_str().expect("id").to_string(),
            v["token"].as_str().expect("token").to_string(),
        )
    }

    pub async fn command(&self, agent_id: &str, ty: &str, params: Value) -> String {
        self.command_with(json!({"agentId": agent_id, "type": ty, "params": params}))
            .await
    }

    pub async fn command_with(&self, body: Value) -> String {
        let v = self.post("/api/commands", body).await;
        v["commandId"].as_str().expect("commandId").to_string()
    }

    pub async fn wait_agent_online(&self, agent_id: &str) {
        self.wait_until(Duration::from_secs(30), || async {
            self.get(&format!("/api/agents/{agent_id}")).await["status"] == "online"
        })
        .await;
    }

    /// Waits until the command is terminal and returns it.
    pub async fn wait_done(&self, id: &str, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let c = self.get(&format!("/api/commands/{id}?wait=5")).await;
            let st = c["status"].as_str().unwrap_or_default();
            if ["succeeded", "failed", "cancelled", "timed_out"].contains(&st) {
                return c;
            }
            assert!(
                started.elapsed() < within,
                "command {id} not done within {within:?}: {c}"
            );
        }
    }

    /// Waits (up to 10 s) until the command has stored at least `seq` events.
    pub async fn wait_last_seq(&self, id: &str, seq: i64) {
        self.wait_until(Duration::from_secs(10), || async {
            self.get(&format!("/api/commands/{id}")).await["lastSeq"]
                .as_i64()
                .unwrap_or(0)
                >= seq
        })
        .await;
    }

    pub async fn wait_until<F, Fut>(&self, within: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while !f().await {
            assert!(
                started.elapsed() < within,
                "condition not met within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// All log chunks of a command, following `after` paging.
    pub async fn all_logs(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let v = self
                .get(&format!("/api/commands/{id}/logs?after={after}&limit=500"))
                .await;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                return out;
            }
            after = v["lastSeq"].as_i64().expect("lastSeq");
            out.extend(items);
        }
    }
}

/// Runs an async test body on both backends.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $body($crate::db::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $body($crate::db::Backend::Postgres).await
            }
        }
    };
}

/// The log lines of a streaming `ping` (`line 00000001 …`) must be present exactly once,
/// in order, with strictly increasing seqs.
pub fn assert_lines_once(logs: &[Value], expected: usize) {
    let seqs: Vec<i64> = logs.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs not increasing: {seqs:?}"
    );
    let lines: Vec<String> = logs
        .iter()
        .map(|l| l["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        lines.len(),
        expected,
        "expected {expected} log lines, got {}",
        lines.len()
    );
    for (i, l) in lines.iter().enumerate() {
        assert!(
            l.starts_with(&format!("line {:08} ", i + 1)),
            "line {i} out of order or doubled: {l:?}"
        );
    }
}

/// The Proxmox stack end-to-end tests provision against: a control plane, the Proxmox VE
/// API simulator and one `tendril` managing it. Fields drop in order: the processes stop
/// before their directory is removed.
pub struct ProxmoxStack {
    pub agent: Agent,
    pub cp: ControlPlane,
    pub sim: crate::pve_sim::process::SimProcess,
    pub api: Api,
    pub agent_id: String,
    pub dir: TempDir,
}

/// Starts a [`ProxmoxStack`] (`tag` names its directory) with `sim_args` for `pve-sim` and
/// `trellis_env` for `trellis serve`, and waits for the agent to be online.
pub async fn proxmox_stack(
    backend: Backend,
    tag: &str,
    sim_args: &[&str],
    trellis_env: &[(&str, &str)],
) -> ProxmoxStack {
    let dir = TempDir::new(tag);
    let db = TestDb::create(backend, &dir).await;
    let cp = ControlPlane::start_with(db, &dir, "127.0.0.1:0", trellis_env).await;
    let api = cp.api();
    let sim =
        crate::pve_sim::process::SimProcess::start(bin("pve-sim").to_str().unwrap(), sim_args)
            .await
            .expect("pve-sim");
    let (agent_id, token) = api.create_agent("pve-lab").await;
    let agent = Agent::start_with(
        &cp.ws_url(),
        &token,
        &dir.join("agent"),
        &[
            ("PROXMOX_URL", sim.url.as_str()),
            ("PROXMOX_TOKEN_ID", crate::pve_sim::DEFAULT_TOKEN_ID),
            ("PROXMOX_TOKEN_SECRET", crate::pve_sim::DEFAULT_TOKEN_SECRET),
        ],
    );
    api.wait_agent_online(&agent_id).await;
    ProxmoxStack {
        agent,
        cp,
        sim,
        api,
        agent_id,
        dir,
    }
}
