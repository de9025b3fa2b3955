//! Several `trellis serve` replicas on one PostgreSQL database behind a real HAProxy
//! (Debian's package): what an organisation runs when one control-plane machine is not
//! enough. The replicas share the three keys and the admin token, as a real deployment
//! must; HAProxy balances agents and API calls over the replicas that answer `/readyz`,
//! with no stickiness.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::db::{Backend, TestDb};
use crate::harness::{Api, ControlPlane, ADMIN_TOKEN};

/// The HAProxy binary: `HAPROXY`, else Debian's path. `None` when it is not installed.
pub fn haproxy_bin() -> Option<PathBuf> {
    let p = std::env::var_os("HAPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    p.exists().then_some(p)
}

/// Whether HAProxy is here; when not, says so — and fails under CI, where the setup
/// script installs it, so a missing install step cannot pass as a skipped test.
pub fn require_haproxy() -> bool {
    if haproxy_bin().is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "haproxy is missing: scripts/setup.sh installs Debian's haproxy package"
    );
    eprintln!("SKIP: haproxy is not installed (apt-get install haproxy)");
    false
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The environment every replica shares: the keys and the admin token.
pub fn shared_env() -> Vec<(String, String)> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (_, signing) = trellis_protocol::signing::SigningKey::generate().expect("signing key");
    vec![
        (
            "TRELLIS_CREDENTIALS_KEY".into(),
            b64(&rand::random::<[u8; 32]>()),
        ),
        (
            "TRELLIS_SECRETS_KEY".into(),
            b64(&rand::random::<[u8; 32]>()),
        ),
        ("TRELLIS_SIGNING_KEY".into(), b64(&signing)),
        ("TRELLIS_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
    ]
}

pub struct Cluster {
    pub dir: PathBuf,
    pub db_url: String,
    /// Owns (drops) the database.
    _db: TestDb,
    env: Vec<(String, String)>,
    replicas: Vec<Option<ControlPlane>>,
    /// Fixed per replica, so a restarted replica is the same HAProxy server.
    addrs: Vec<String>,
    haproxy: Option<Child>,
    pub lb_port: u16,
}

impl Cluster {
    /// `n` replicas (named `replica-0` …) on a fresh PostgreSQL database, started at
    /// once, and, with `lb`, HAProxy in front of them. Extra environment for every replica
    /// in `env`.
    pub async fn start(n: usize, dir: &Path, lb: bool, env: &[(&str, &str)]) -> Self {
        let db = TestDb::create(Backend::Postgres, dir).await;
        let db_url = db.url().to_string();
        let mut shared = shared_env();
        shared.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        // Started together, as after a data-centre power cut.
        let starts = (0..n).map(|i| {
            let d = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&d).expect("replica dir");
            let mut env = shared.clone();
            env.push(("TRELLIS_REPLICA_NAME".into(), format!("replica-{i}")));
            let url = db_url.clone();
            let addr = addrs[i].clone();
            async move {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                ControlPlane::start_with(TestDb::existing(&url), &d, &addr, &env).await
            }
        });
        let replicas = futures_util::future::join_all(starts)
            .await
            .into_iter()
            .map(Some)
            .collect();
        let mut c = Self {
            dir: dir.to_path_buf(),
            db_url,
            _db: db,
            env: shared,
            replicas,
            addrs,
            haproxy: None,
            lb_port: 0,
        };
        if lb {
            c.start_haproxy().await;
        }
        c
    }

    async fn start_haproxy(&mut self) {
        let bin = haproxy_bin().expect("haproxy installed");
        self.lb_port = free_port();
        let servers: String = self
            .addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("    server replica-{i} {a}\n"))
            .collect();
        let cfg = format!(
            "global\n    maxconn 8000\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n\
             frontend trellis\n    bind 127.0.0.1:{port}\n    default_backend replicas\n\
             backend replicas\n    balance leastconn\n    option redispatch\n    retries 3\n    option httpchk GET /readyz\n    http-check expect status 200\n\
             \x20   default-server check inter 300ms fall 2 rise 2\n{servers}",
            port = self.lb_port
        );
        let path = self.dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("haproxy.cfg");
        let log = std::fs::File::create(self.dir.join("haproxy.log")).expect("haproxy log");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        self.haproxy = Some(child);
        // Ready once it answers and has found the replicas up.
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ok = http
                .get(self.lb_url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "haproxy did not come up: {}",
                std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    pub fn lb_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.lb_port)
    }

    /// The agent endpoint through HAProxy.
    pub fn lb_ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/api/agents/connect", self.lb_port)
    }

    pub fn replica(&self, i: usize) -> &ControlPlane {
        self.replicas[i].as_ref().expect("replica running")
    }

    pub fn replica_mut(&mut self, i: usize) -> &mut ControlPlane {
        self.replicas[i].as_mut().expect("replica running")
    }

    /// The agent endpoint of one replica (bypassing HAProxy).
    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/api/agents/connect", self.addrs[i])
    }

    /// The admin API of one replica.
    pub fn api(&self, i: usize) -> Api {
        self.replica(i).api()
    }

    /// The admin API through HAProxy.
    pub fn lb_api(&self) -> Api {
        Api::new(&format!("http://127.0.0.1:{}", self.lb_port), ADMIN_TOKEN)
    }

    /// SIGKILL of one replica.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut r) = self.replicas[i].take() {
            r.kill();
        }
    }

    /// SIGTERM of one replica (it drains); returns how long it took to exit.
    pub fn terminate(&mut self, i: usize) -> Duration {
        let mut r = self.replicas[i].take().expect("replica running");
        r.terminate().1
    }

    /// Starts a stopped replica again on its address.
    pub async fn start_replica(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} is running");
        let d = self.dir.join(format!("replica-{i}"));
        let mut env = self.env.clone();
        env.push(("TRELLIS_REPLICA_NAME".into(), format!("replica-{i}")));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let started = Instant::now();
        loop {
            if std::net::TcpListener::bind(&self.addrs[i]).is_ok() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "port busy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.replicas[i] = Some(
            ControlPlane::start_with(TestDb::existing(&self.db_url), &d, &self.addrs[i], &env)
                .await,
        );
    }

    /// The replicas as the cluster reports them (asked of a live replica).
    pub async fn replicas_report(&self) -> Vec<Value> {
        let i = (0..self.len())
            .find(|i| self.replicas[*i].is_some())
            .expect("a live replica");
        let v = self.api(i).get("/api/cluster/replicas").await;
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// `trellis_housekeeping_leader` of every live replica, from its `/metrics`.
    pub async fn leader_gauges(&self) -> Vec<(usize, i64)> {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        for (i, r) in self.replicas.iter().enumerate() {
            let Some(r) = r else { continue };
            let text = http
                .get(r.url("/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .unwrap_or_default();
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix("trellis_housekeeping_leader "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(-1);
            out.push((i, v));
        }
        out
    }

    /// The index of the replica holding the agent's session (from its `replica` name),
    /// if it is online.
    pub async fn which_replica(&self, agent_id: &str) -> Option<usize> {
        let i = (0..self.len()).find(|i| self.replicas[*i].is_some())?;
        let a = self.api(i).get(&format!("/api/agents/{agent_id}")).await;
        if a["status"] != "online" {
            return None;
        }
        a["replica"]
            .as_str()?
            .strip_prefix("replica-")?
            .parse()
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut h) = self.haproxy.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        for r in self.replicas.iter_mut() {
            if let Some(mut r) = r.take() {
                r.kill();
            }
        }
    }
}
