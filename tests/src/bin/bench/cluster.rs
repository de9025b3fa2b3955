//! `trellis-bench --replicas 1,2,3` and `--storm N`: several replicas on one PostgreSQL.
//!
//! * Replicas: N simulated agents spread evenly over 1, 2, 3 … replicas (agent i connects
//!   to replica i mod r); ping round trip p50/p99 when the command is created on the
//!   replica holding the agent and on another one; commands/s with API clients spread over
//!   the replicas; RSS per agent summed over the replicas.
//! * Storm: 2 replicas share N agents; commands are running on the agents of replica 1
//!   when it is killed (SIGKILL); the time until every agent is online again (on replica
//!   0) and how many of those commands did not end `succeeded` (lost: must be 0).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use trellis_tests::cluster::Cluster;
use trellis_tests::harness::{Api, TempDir};
use trellis_tests::raw_agent::{PingAgent, PingAgentLog};

use super::{pct, round_trip, rss_kib};

struct Fleet {
    ids: Vec<String>,
    logs: Vec<Arc<PingAgentLog>>,
    /// Replica each agent was connected to first.
    home: Vec<usize>,
    stop: CancellationToken,
}

/// Creates `n` agents (through replica 0's API, 32 at a time) and connects agent i to
/// replica `i % replicas` (then the others, in turn, after a lost session).
async fn fleet(c: &Cluster, n: usize) -> anyhow::Result<Fleet> {
    let api = c.api(0);
    let r = c.len();
    let stop = CancellationToken::new();
    let mut ids = vec![String::new(); n];
    let mut logs = Vec::with_capacity(n);
    let mut home = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let reqs = chunk.iter().map(|&i| {
            let api = api.clone();
            async move {
                let v = api
                    .post(
                        "/api/agents",
                        json!({"name": format!("sim-{i}"), "maxConcurrency": 64}),
                    )
                    .await;
                (
                    i,
                    v["agent"]["id"].as_str().unwrap_or_default().to_string(),
                    v["token"].as_str().unwrap_or_default().to_string(),
                )
            }
        });
        created.extend(futures_util::future::join_all(reqs).await);
    }
    for (i, id, token) in created {
        let h = i % r;
        let urls: Vec<String> = (0..r).map(|k| c.ws_url((h + k) % r)).collect();
        let log = Arc::new(PingAgentLog::default());
        PingAgent::spawn(urls, token, log.clone(), stop.clone());
        ids[i] = id;
        logs.push(log);
        home.push(h);
    }
    let t = Instant::now();
    while logs.iter().any(|l| !l.online.load(Ordering::Relaxed)) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(180),
            "agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Fleet {
        ids,
        logs,
        home,
        stop,
    })
}

pub async fn replicas(counts: &[usize], agents: usize, args: &super::Args) -> anyhow::Result<()> {
    println!("# replicas on one PostgreSQL: {agents} simulated agents spread evenly");
    for &r in counts {
        let dir = TempDir::new("bench-replicas");
        // 10 000 agents plus the API clients: above the default connection cap.
        let c = Cluster::start(r, &dir, false, &[("TRELLIS_MAX_CONNECTIONS", "15000")]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let base: Vec<u64> = (0..r).map(|i| rss_kib(c.replica(i).pid())).collect();
        let f = fleet(&c, agents).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss: u64 = (0..r)
            .map(|i| rss_kib(c.replica(i).pid()).saturating_sub(base[i]))
            .sum();
        let apis: Vec<Api> = (0..r).map(|i| c.api(i)).collect();
        for k in 0..20 {
            round_trip(&apis[f.home[k % agents]], &f.ids[k % agents]).await;
        }
        let mut same = Vec::with_capacity(args.samples);
        let mut cross = Vec::with_capacity(args.samples);
        for k in 0..args.samples {
            let a = (k * 7919) % agents;
            same.push(round_trip(&apis[f.home[a]], &f.ids[a]).await);
            if r > 1 {
                let other = (f.home[a] + 1 + k % (r - 1)) % r;
                cross.push(round_trip(&apis[other], &f.ids[a]).await);
            }
        }
        same.sort();
        cross.sort();
        // Throughput: clients spread over the replicas, any agent.
        let done = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(args.seconds);
        let mut tasks = Vec::new();
        for cl in 0..args.clients {
            let api = apis[cl % r].clone();
            let ids = f.ids.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = cl * 131;
                while Instant::now() < until {
                    round_trip(&api, &ids[i % ids.len()]).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 7;
                }
            }));
        }
        let t = Instant::now();
        for t in tasks {
            t.await?;
        }
        let cps = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        let cross_txt = if r > 1 {
            format!(
                "cross-replica p50 {:.2} ms p99 {:.2} ms",
                pct(&cross, 0.5),
                pct(&cross, 0.99)
            )
        } else {
            "cross-replica –".into()
        };
        println!(
            "replicas {r}: same-replica ping p50 {:.2} ms p99 {:.2} ms | {cross_txt} | {cps:.0} commands/s ({} clients) | RSS {:.1} KiB per agent",
            pct(&same, 0.5),
            pct(&same, 0.99),
            args.clients,
            rss as f64 / agents as f64,
        );
        f.stop.cancel();
    }
    Ok(())
}

pub async fn storm(agents: usize, in_flight: usize) -> anyhow::Result<()> {
    let dir = TempDir::new("bench-storm");
    let mut c = Cluster::start(2, &dir, false, &[("TRELLIS_MAX_CONNECTIONS", "15000")]).await;
    let f = fleet(&c, agents).await?;
    let api = c.api(0);
    // Commands running on replica 1's agents when it dies (created through replica 0).
    let victims: Vec<usize> = (0..agents).filter(|&i| f.home[i] == 1).collect();
    let mut cmds = Vec::with_capacity(in_flight);
    for k in 0..in_flight {
        let a = victims[k % victims.len()];
        cmds.push(
            api.command(&f.ids[a], "ping", json!({"duration_ms": 3000}))
                .await,
        );
    }
    // Every one dispatched before the kill.
    let t = Instant::now();
    loop {
        let n = cmds
            .iter()
            .filter(|id| {
                let u: uuid::Uuid = id.parse().unwrap();
                victims
                    .iter()
                    .any(|&a| f.logs[a].dispatched.lock().unwrap().contains_key(&u))
            })
            .count();
        if n == cmds.len() {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "not all dispatched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<u64> = victims
        .iter()
        .map(|&a| f.logs[a].sessions.load(Ordering::Relaxed))
        .collect();
    let killed = Instant::now();
    c.kill(1);
    // All online again: every victim opened a new session.
    loop {
        let back = victims
            .iter()
            .zip(&before)
            .filter(|(&a, &b)| {
                f.logs[a].sessions.load(Ordering::Relaxed) > b
                    && f.logs[a].online.load(Ordering::Relaxed)
            })
            .count();
        if back == victims.len() {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(120),
            "{back} of {} back after 120 s",
            victims.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = killed.elapsed();
    // The API agrees: every agent online.
    let t = Instant::now();
    loop {
        let v = api.get("/api/agents").await;
        let online = v["items"]
            .as_array()
            .map(|a| a.iter().filter(|x| x["status"] == "online").count())
            .unwrap_or(0);
        if online == agents {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "{online} online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let api_settled = killed.elapsed();
    let mut lost = 0;
    for id in &cmds {
        let v = api.wait_done(id, Duration::from_secs(60)).await;
        if v["status"] != "succeeded" {
            lost += 1;
        }
    }
    println!(
        "reconnect storm: {agents} agents on 2 replicas, replica 1 ({} agents) killed: all agents back in {:.2} s (all online in the API after {:.2} s); {in_flight} commands running on them: {lost} lost",
        victims.len(),
        settled.as_secs_f64(),
        api_settled.as_secs_f64(),
    );
    f.stop.cancel();
    Ok(())
}
