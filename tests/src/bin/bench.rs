//! `trellis-bench`: starts the real control plane, connects N simulated agents and
//! prints ping round-trip latency (API request → result durable and visible), commands
//! per second, control-plane RSS per connected agent, log streaming throughput through a
//! real `tendril`, and — as the floor — a raw WebSocket echo round trip on loopback.
//!
//! Run: `cargo build --release --workspace --bins && target/release/trellis-bench`
//! (`--agents 1,100,1000`, `--backend sqlite|postgres`).
//!
//! `--bulk 20` measures bulk provisioning instead: on the Proxmox VE simulator (default
//! task timings) through a real `tendril` whose concurrency the admin set to
//! `--bulk-concurrency` (4), one provision, then a bulk of 20 (`POST /api/nodes/batches`)
//! until every node runs; prints both times and their ratio (the goal: ≤ 6 at 20 × 4-way).
//!
//! `--replicas 1,2,3` (`--cluster-agents 10000`) and `--storm 5000` measure several
//! replicas on one PostgreSQL instead: see `cluster`.

#[path = "bench/cluster.rs"]
mod cluster;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use trellis_protocol::{
    AgentMessage, CommandType, Event, EventBody, FinalStatus, Hello, Outcome, ServerMessage,
};
use trellis_tests::harness::{proxmox_stack, Agent, Api, Backend, ControlPlane, TempDir, TestDb};
use trellis_tests::raw_agent;

#[derive(Parser)]
struct Args {
    /// Agent counts to measure, comma-separated.
    #[arg(long, default_value = "1,100,1000", value_delimiter = ',')]
    agents: Vec<usize>,
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Sequential pings for the latency measurement.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent API clients in the throughput run.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// MB of log output for the streaming measurement (0 to skip).
    #[arg(long, default_value_t = 40)]
    log_mb: usize,
    /// Measure a bulk provision of this many nodes against a single one (and nothing else).
    #[arg(long, default_value_t = 0)]
    bulk: u32,
    /// The agent's concurrency limit for `--bulk`.
    #[arg(long, default_value_t = 4)]
    bulk_concurrency: i64,
    /// Measure replicas on one PostgreSQL instead (and nothing else): these counts, e.g.
    /// `1,2,3`, with `--cluster-agents` simulated agents spread over them.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<usize>,
    #[arg(long, default_value_t = 10_000)]
    cluster_agents: usize,
    /// A reconnect storm instead (and nothing else): this many agents on 2 replicas, one
    /// killed with `--storm-commands` commands running on its agents.
    #[arg(long, default_value_t = 0)]
    storm: usize,
    #[arg(long, default_value_t = 500)]
    storm_commands: usize,
}

/// One provision, then a bulk of `n`, on pve-sim through a real tendril limited to
/// `concurrency`; returns (single, bulk) wall times until the nodes run.
async fn bulk_provision(
    backend: Backend,
    n: u32,
    concurrency: i64,
) -> anyhow::Result<(Duration, Duration)> {
    let s = proxmox_stack(backend, "bench-bulk", &[], &[]).await;
    let (code, v) = s
        .api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/agents/{}", s.agent_id),
            Some(json!({ "maxConcurrency": concurrency })),
        )
        .await;
    anyhow::ensure!(code == 200, "setting the concurrency: {v}");
    let t = s
        .api
        .post(
            "/api/templates",
            json!({"name": "bench", "memory": 1024, "cores": 1, "proxmoxTemplateId": 9000}),
        )
        .await;
    let tid = t["id"].as_str().unwrap_or_default().to_string();
    let wait_batch = |batch: String, count: usize| {
        let api = s.api.clone();
        async move {
            loop {
                let v = api.get(&format!("/api/nodes?batchId={batch}")).await;
                let items = v["items"].as_array().cloned().unwrap_or_default();
                let running = items.iter().filter(|n| n["status"] == "running").count();
                let failed = items.iter().filter(|n| n["status"] == "failed").count();
                anyhow::ensure!(failed == 0, "a bulk node failed: {v}");
                if running == count {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut times = Vec::new();
    for (count, pattern) in [(1, "single-{n}"), (n, "bulk-{n}")] {
        let started = Instant::now();
        let (code, v) = s
            .api
            .call(
                reqwest::Method::POST,
                "/api/nodes/batches",
                Some(
                    json!({"count": count, "namePattern": pattern, "templateId": tid,
                            "provision": {"agentId": s.agent_id}}),
                ),
            )
            .await;
        anyhow::ensure!(code == 202, "bulk provision refused: {v}");
        let batch = v["batchId"].as_str().unwrap_or_default().to_string();
        tokio::time::timeout(Duration::from_secs(900), wait_batch(batch, count as usize)).await??;
        times.push(started.elapsed());
    }
    Ok((times[0], times[1]))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Raw WebSocket echo round trip on loopback: the floor a command round trip stands on.
async fn ws_echo_floor(samples: usize) -> Vec<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() && ws.send(m).await.is_err() {
                break;
            }
        }
    });
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(format!("ws://{addr}/"), None, true, None)
            .await
            .unwrap();
    let msg = r#"{"type":"events","events":[{"command_id":"00000000-0000-0000-0000-000000000000","seq":1,"ts":0,"kind":"finished","status":"succeeded"}]}"#;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 50 {
        let t = Instant::now();
        ws.send(Message::text(msg)).await.unwrap();
        ws.next().await.unwrap().unwrap();
        if i >= 50 {
            out.push(t.elapsed());
        }
    }
    out
}

/// Durable commits a ping round trip needs: the command's insert, the admin request's audit
/// row, the dispatch claim, and the agent's `accept` + `finished` events (one batch).
const ROUND_TRIP_COMMITS: f64 = 4.0;

/// One durable commit on the storage the control plane uses (a single-row INSERT in its
/// own transaction, SQLite with WAL and `TRELLIS_SQLITE_SYNCHRONOUS` (default FULL) in the
/// bench's temp dir, or the PostgreSQL server): the floor each commit of a round trip
/// stands on.
async fn commit_floor(backend: Backend, samples: usize) -> Vec<Duration> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let dir = TempDir::new("bench-commit");
    let db = TestDb::create(backend, &dir).await;
    let url = match backend {
        Backend::Sqlite => format!("{}?mode=rwc", db.url()),
        Backend::Postgres => db.url().to_string(),
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    if backend == Backend::Sqlite {
        let sync = std::env::var("TRELLIS_SQLITE_SYNCHRONOUS").unwrap_or_else(|_| "FULL".into());
        for p in [
            "PRAGMA journal_mode=WAL".to_string(),
            format!("PRAGMA synchronous={sync}"),
        ] {
            sqlx::query(&p).execute(&mut conn).await.unwrap();
        }
    }
    sqlx::query("CREATE TABLE floor (id BIGINT PRIMARY KEY, data TEXT NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let t = Instant::now();
        sqlx::query("INSERT INTO floor (id, data) VALUES ($1, $2)")
            .bind(i as i64)
            .bind("x".repeat(200))
            .execute(&mut conn)
            .await
            .unwrap();
        if i >= 20 {
            out.push(t.elapsed());
        }
    }
    conn.close().await.unwrap();
    out
}

/// A minimal agent speaking the real protocol: accepts every dispatch and answers `ping`
/// with a result at once.
async fn sim_agent(ws_url: String, token: String, ready: Arc<AtomicU64>) {
    let ws = match raw_agent::connect(&ws_url, &token).await {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("sim agent connect failed: {e}");
            return;
        }
    };
    let (mut tx, mut rx) = ws.split();
    let hello = AgentMessage::Hello(Hello {
        protocol_version: trellis_protocol::PROTOCOL_VERSION,
        min_protocol_version: None,
        agent_version: "bench".into(),
        hostname: "sim".into(),
        capabilities: vec![CommandType::Ping],
        max_concurrency: 64,
        active_commands: vec![],
        interrupted_commands: vec![],
        facts: json!({}),
    });
    tx.send(Message::text(hello.encode())).await.unwrap();
    let mut beat = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(Message::Text(t))) = m else { return };
                match ServerMessage::decode(&t) {
                    Ok(ServerMessage::Welcome { .. }) => { ready.fetch_add(1, Ordering::Relaxed); }
                    Ok(ServerMessage::Dispatch(d)) => {
                        let accept = AgentMessage::Accept { command_id: d.command_id };
                        let done = AgentMessage::Events { events: vec![Event {
                            command_id: d.command_id, seq: 1, ts: 0,
                            body: EventBody::Finished(Outcome { status: FinalStatus::Succeeded, result: Some(json!({"pong": true, "hostname": "sim", "agent_version": "bench", "events_sent": 0})), error: None }),
                        }]};
                        if tx.send(Message::text(accept.encode())).await.is_err() || tx.send(Message::text(done.encode())).await.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
            _ = beat.tick() => {
                if tx.send(Message::text(AgentMessage::Heartbeat { running: 0 }.encode())).await.is_err() { return; }
            }
        }
    }
}

async fn round_trip(api: &Api, agent: &str) -> Duration {
    let t = Instant::now();
    let id = api.command(agent, "ping", json!({})).await;
    let c = api.get(&format!("/api/commands/{id}?wait=10")).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    t.elapsed()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backend = match args.backend.as_str() {
        "postgres" => Backend::Postgres,
        _ => Backend::Sqlite,
    };
    if !args.replicas.is_empty() {
        return cluster::replicas(&args.replicas, args.cluster_agents, &args).await;
    }
    if args.storm > 0 {
        return cluster::storm(args.storm, args.storm_commands).await;
    }
    if args.bulk > 0 {
        let (one, many) = bulk_provision(backend, args.bulk, args.bulk_concurrency).await?;
        println!(
            "bulk provisioning on pve-sim ({backend:?}, agent concurrency {}): 1 node {:.1} s, {} nodes {:.1} s, ratio {:.2} (ideal {})",
            args.bulk_concurrency,
            one.as_secs_f64(),
            args.bulk,
            many.as_secs_f64(),
            many.as_secs_f64() / one.as_secs_f64(),
            (args.bulk as i64 + args.bulk_concurrency - 1) / args.bulk_concurrency,
        );
        return Ok(());
    }
    println!(
        "# trellis-bench ({:?}, {} cores)",
        backend,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let mut floor = ws_echo_floor(2000).await;
    floor.sort();
    println!(
        "raw websocket echo round trip (loopback): p50 {:.3} ms  p99 {:.3} ms",
        pct(&floor, 0.5),
        pct(&floor, 0.99)
    );

    let mut commit = commit_floor(backend, 300).await;
    commit.sort();
    println!(
        "durable commit ({backend:?}, one row): p50 {:.3} ms  p99 {:.3} ms",
        pct(&commit, 0.5),
        pct(&commit, 0.99)
    );
    // A round trip's floor: the echo plus the commits it needs.
    let floor_p50 = pct(&floor, 0.5) + ROUND_TRIP_COMMITS * pct(&commit, 0.5);

    for &n in &args.agents {
        let dir = TempDir::new("bench");
        let db = TestDb::create(backend, &dir).await;
        let cp = ControlPlane::start(db, &dir).await;
        let pid = cp.pid();
        let api = cp.api();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let base_rss = rss_kib(pid);
        let ready = Arc::new(AtomicU64::new(0));
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            // The admin's maxConcurrency is the limit (the simulated agents ask for 64).
            let v = api
                .post(
                    "/api/agents",
                    json!({"name": format!("sim-{i}"), "maxConcurrency": 64}),
                )
                .await;
            let (id, token) = (
                v["agent"]["id"].as_str().unwrap_or_default().to_string(),
                v["token"].as_str().unwrap_or_default().to_string(),
            );
            tokio::spawn(sim_agent(cp.ws_url(), token, ready.clone()));
            ids.push(id);
        }
        let t = Instant::now();
        while (ready.load(Ordering::Relaxed) as usize) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "agents did not connect"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(pid);
        // warm-up
        for id in ids.iter().take(20) {
            round_trip(&api, id).await;
        }
        let mut lat = Vec::with_capacity(args.samples);
        for i in 0..args.samples {
            lat.push(round_trip(&api, &ids[i % ids.len()]).await);
        }
        lat.sort();
        // throughput: concurrent clients, each submitting and waiting
        let done = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(args.seconds);
        let mut tasks = Vec::new();
        for c in 0..args.clients {
            let api = api.clone();
            let ids = ids.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = c;
                while Instant::now() < until {
                    round_trip(&api, &ids[i % ids.len()]).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += args.clients;
                }
            }));
        }
        let t = Instant::now();
        for t in tasks {
            t.await?;
        }
        let cps = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        println!(
            "agents {n:>5}: ping round trip p50 {:.2} ms  p99 {:.2} ms | {cps:.0} commands/s ({} clients) | RSS {} KiB base, {:.1} KiB per agent",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            args.clients,
            base_rss,
            (rss.saturating_sub(base_rss)) as f64 / n as f64,
        );
        println!(
            "agents {n:>5}: round trip p50 / (echo + {ROUND_TRIP_COMMITS} commits) = {:.2}x",
            pct(&lat, 0.5) / floor_p50
        );
    }

    if args.log_mb > 0 {
        let dir = TempDir::new("bench-logs");
        let db = TestDb::create(backend, &dir).await;
        let cp = ControlPlane::start(db, &dir).await;
        let api = cp.api();
        let (id, token) = api.create_agent("logger").await;
        let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
        api.wait_agent_online(&id).await;
        // 10 KB chunks: what the terraform executor ships (flush at 500 ms or 10 KB).
        let line = 10_000u32;
        let lines = (args.log_mb * 1_000_000 / line as usize) as u32;
        let t = Instant::now();
        let cid = api
            .command_with(json!({"agentId": id, "type": "ping", "timeoutSecs": 600,
            "params": {"log_lines": lines, "log_line_bytes": line}}))
            .await;
        let c = api.wait_done(&cid, Duration::from_secs(600)).await;
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(c["status"], "succeeded");
        let stored = c["lastSeq"].as_i64().unwrap_or(0) - 1;
        println!(
            "log streaming via real tendril: {:.0} MB in {secs:.2} s = {:.1} MB/s ({stored} chunks stored)",
            (lines as f64 * line as f64) / 1e6,
            (lines as f64 * line as f64) / 1e6 / secs
        );
    }
    Ok(())
}
