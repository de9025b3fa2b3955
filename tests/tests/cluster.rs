//! Several replicas on one PostgreSQL behind a real HAProxy (issue 13): cross-replica
//! dispatch and streams through `LISTEN/NOTIFY`, cancel and revoke reaching another
//! replica's agent, a replica killed under a running `terraform_apply`, starting together
//! (one seeding, one leader, leadership moving), and draining on SIGTERM.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use trellis_tests::cluster::{require_haproxy, Cluster};
use trellis_tests::git::GitRepo;
use trellis_tests::harness::{assert_lines_once, Agent, Api, TempDir};
use trellis_tests::raw_agent::{PingAgent, PingAgentLog};
use trellis_tests::sse::SseStream;
use trellis_tests::terraform::terraform_env;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Simulated agents connected through HAProxy until every replica holds at least one;
/// returns `(agent id, token, log, replica index)` for each.
async fn agents_on_every_replica(
    c: &Cluster,
    n: usize,
    stop: &CancellationToken,
) -> Vec<(String, String, Arc<PingAgentLog>, usize)> {
    let api = c.lb_api();
    let mut out = Vec::new();
    // At least `n`, and more while some replica has none (HAProxy's choice also counts the
    // API calls in between).
    for i in 0..n + 30 {
        if i >= n
            && (0..c.len()).all(|r| {
                out.iter()
                    .any(|a: &(String, String, Arc<PingAgentLog>, usize)| a.3 == r)
            })
        {
            break;
        }
        let (id, token) = api.create_agent(&format!("sim-{i}")).await;
        let log = Arc::new(PingAgentLog::default());
        PingAgent::spawn(
            vec![c.lb_ws_url()],
            token.clone(),
            log.clone(),
            stop.clone(),
        );
        api.wait_agent_online(&id).await;
        let r = c
            .which_replica(&id)
            .await
            .expect("agent online on a replica");
        out.push((id, token, log, r));
    }
    let mut seen: Vec<usize> = out.iter().map(|a| a.3).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        c.len(),
        "HAProxy spreads agents over every replica: {:?}",
        out.iter().map(|a| a.3).collect::<Vec<_>>()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_created_on_one_replica_reaches_an_agent_on_another_within_100_ms() {
    if !require_haproxy() {
        return;
    }
    let dir = TempDir::new("cluster-dispatch");
    let c = Cluster::start(3, &dir, true, &[]).await;
    let stop = CancellationToken::new();
    let agents = agents_on_every_replica(&c, 6, &stop).await;

    // 300 commands, each created on a replica other than its agent's.
    let apis: Vec<Api> = (0..c.len()).map(|i| c.api(i)).collect();
    let mut sent: Vec<(String, Instant, usize)> = Vec::new();
    for k in 0..300 {
        let (id, _, _, holder) = &agents[k % agents.len()];
        let creator = (holder + 1 + k % (c.len() - 1)) % c.len();
        assert_ne!(creator, *holder);
        let t = Instant::now();
        let cid = apis[creator].command(id, "ping", json!({})).await;
        sent.push((cid, t, k % agents.len()));
    }
    // Every one dispatched (and finished); latency from the create request to the agent.
    let mut lat = Vec::new();
    for (cid, t, a) in &sent {
        let c0 = apis[0].wait_done(cid, Duration::from_secs(30)).await;
        assert_eq!(c0["status"], "succeeded", "{c0}");
        let at = *agents[*a]
            .2
            .dispatched
            .lock()
            .unwrap()
            .get(&cid.parse::<uuid::Uuid>().unwrap())
            .expect("dispatch reached the agent");
        lat.push(at.duration_since(*t));
    }
    lat.sort();
    let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
    println!(
        "cross-replica dispatch over 300 commands: p50 {p50:?} p99 {p99:?} max {:?}",
        lat.last().unwrap()
    );
    assert!(
        p99 < Duration::from_millis(100),
        "cross-replica dispatch p99 {p99:?} (the backup poll is 5 s: notifications are not working?)"
    );

    // Notifications lost: every replica's listening connection is cut. Commands created
    // meanwhile still arrive (the listener reconnects and catches up; the backup pass
    // bounds the rest), and cross-replica dispatch is fast again afterwards.
    let mut pg = sqlx::PgConnection::connect(&c.db_url).await.unwrap();
    use sqlx::Connection;
    let cut: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'trellis listener'",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap();
    assert_eq!(cut.len(), c.len(), "one listener per replica");
    let mut during = Vec::new();
    for (k, (id, _, _, holder)) in agents.iter().enumerate() {
        let creator = (holder + 1 + k % (c.len() - 1)) % c.len();
        during.push(apis[creator].command(id, "ping", json!({})).await);
    }
    for cid in &during {
        let v = apis[0].wait_done(cid, Duration::from_secs(10)).await;
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (id, _, log, holder) = &agents[0];
    let t = Instant::now();
    let cid = apis[(holder + 1) % c.len()]
        .command(id, "ping", json!({}))
        .await;
    apis[0].wait_done(&cid, Duration::from_secs(10)).await;
    let at = *log
        .dispatched
        .lock()
        .unwrap()
        .get(&cid.parse::<uuid::Uuid>().unwrap())
        .unwrap();
    println!(
        "after the listeners were cut: dispatched in {:?}",
        at.duration_since(t)
    );
    assert!(at.duration_since(t) < Duration::from_millis(100));

    // A stream opened on a third replica (neither the creator nor the holder) is live.
    for (k, (id, _, _, holder)) in agents.iter().enumerate().take(3) {
        let creator = (holder + 1) % c.len();
        let third = (holder + 2) % c.len();
        let cid = apis[creator]
            .command(id, "ping", json!({"duration_ms": 800}))
            .await;
        let mut s = SseStream::subscribe(&apis[third], &cid).await;
        let t = Instant::now();
        let mut finished = None;
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("stream stalled")
        {
            if ev.event == "finished" {
                finished = Some(t.elapsed());
                break;
            }
        }
        let took = finished.expect("finished event on the third replica");
        println!(
            "agent {k}: SSE on a third replica saw finished after {took:?} (agent took 800 ms)"
        );
        // Well under the 5 s backup poll: the event store's notification woke the stream.
        assert!(took < Duration::from_millis(2500), "{took:?}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_revoke_on_one_replica_reach_an_agent_on_another_within_a_second() {
    if !require_haproxy() {
        return;
    }
    let dir = TempDir::new("cluster-cancel");
    let c = Cluster::start(3, &dir, true, &[]).await;
    let stop = CancellationToken::new();
    let agents = agents_on_every_replica(&c, 3, &stop).await;
    for (id, _, log, holder) in &agents {
        let other = (holder + 1) % c.len();
        let api = c.api(other);
        let cid = api
            .command(id, "ping", json!({"duration_ms": 60_000}))
            .await;
        let uuid: uuid::Uuid = cid.parse().unwrap();
        api.wait_until(Duration::from_secs(10), || async {
            api.get(&format!("/api/commands/{cid}")).await["status"] == "running"
        })
        .await;
        let t = Instant::now();
        let (status, _) = api
            .call(
                reqwest::Method::POST,
                &format!("/api/commands/{cid}/cancel"),
                None,
            )
            .await;
        assert_eq!(status, 202);
        let reached = loop {
            if let Some(at) = log.cancelled.lock().unwrap().get(&uuid) {
                break at.duration_since(t);
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "cancel never reached the agent"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "cancel from replica {other} reached the agent on replica {holder} in {reached:?}"
        );
        assert!(reached < Duration::from_secs(1), "{reached:?}");
        let done = api.wait_done(&cid, Duration::from_secs(10)).await;
        assert_eq!(done["status"], "cancelled", "{done}");
    }

    // Revoke on another replica: the agent's socket is closed within a second.
    let (id, _, log, holder) = &agents[0];
    let other = (holder + 2) % c.len();
    let closes_before = log.closes.lock().unwrap().len();
    let t = Instant::now();
    let (status, _) = c
        .api(other)
        .call(reqwest::Method::DELETE, &format!("/api/agents/{id}"), None)
        .await;
    assert!(status == 204 || status == 200, "{status}");
    let (at, code, reason) = loop {
        if let Some(x) = log.closes.lock().unwrap().get(closes_before).cloned() {
            break x;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the revoked agent's session stayed open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let took = at.duration_since(t);
    println!("revoke on replica {other} closed the session on replica {holder} in {took:?} ({code:?} {reason})");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(reason.contains("revoked"), "{reason}");
    stop.cancel();
}

const SLOW_TF: &str = r#"
resource "null_resource" "slow" {
  provisioner "local-exec" {
    command = "for i in $(seq 1 40); do echo \"line $i of 40\"; sleep 0.25; done"
  }
}
output "done" {
  value = "yes"
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_under_a_running_terraform_apply_loses_nothing() {
    if !require_haproxy() {
        return;
    }
    let dir = TempDir::new("cluster-kill");
    let mut c = Cluster::start(3, &dir, true, &[]).await;
    let repo = GitRepo::init(&dir.join("template"));
    repo.write("main.tf", SLOW_TF);
    repo.commit_all("template");
    repo.tag("v1");
    let api = c.lb_api();
    let (agent_id, token) = api.create_agent("tf-host").await;
    let env = terraform_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _agent = Agent::start_with(&c.lb_ws_url(), &token, &dir.join("agent"), &env);
    api.wait_agent_online(&agent_id).await;
    let holder = c
        .which_replica(&agent_id)
        .await
        .expect("agent on a replica");
    let other = (holder + 1) % c.len();
    let cid = c
        .api(other)
        .command(
            &agent_id,
            "terraform_apply",
            json!({"template_source": {"repo": repo.path.to_str().unwrap(), "version": "v1"}}),
        )
        .await;
    // Some lines stored, then the replica holding the agent dies.
    let a = c.api(other);
    a.wait_until(Duration::from_secs(60), || async {
        a.all_logs(&cid)
            .await
            .iter()
            .any(|l| l["data"].as_str().unwrap_or("").contains("line 5 of 40"))
    })
    .await;
    c.kill(holder);
    let t = Instant::now();
    // The agent comes back through HAProxy, on another replica.
    a.wait_until(Duration::from_secs(30), || async {
        let v = a.get(&format!("/api/agents/{agent_id}")).await;
        v["status"] == "online" && v["replica"] != json!(format!("replica-{holder}"))
    })
    .await;
    println!(
        "agent back online on another replica {:?} after the kill",
        t.elapsed()
    );
    let done = a.wait_done(&cid, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["outputs"]["done"]["value"], "yes", "{done}");
    // Every line exactly once, and the event seqs contiguous.
    let logs = a.all_logs(&cid).await;
    let text: String = logs
        .iter()
        .filter_map(|l| l["data"].as_str())
        .collect::<Vec<_>>()
        .join("");
    for i in 1..=40 {
        let needle = format!("line {i} of 40\n");
        assert_eq!(text.matches(&needle).count(), 1, "{needle:?} in:\n{text}");
    }
    // The command's events are stored once each, with contiguous seqs 1..=last.
    let events = trellis_tests::sse::parse(&trellis_tests::sse::fetch_text(&a, &cid, None).await);
    let mut seqs = trellis_tests::sse::ids(&events);
    let n = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "an event stored twice");
    assert_eq!(
        seqs,
        (1..=n as i64).collect::<Vec<_>>(),
        "a gap in the events"
    );
    assert_eq!(done["lastSeq"].as_i64(), Some(n as i64), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_seed_once_elect_one_leader_and_fail_over() {
    let dir = TempDir::new("cluster-leader");
    let mut c = Cluster::start(3, &dir, false, &[]).await;
    // One set of system templates, whoever seeded them.
    let templates = c.api(1).get("/api/templates").await;
    let names: Vec<&str> = templates["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert!(!names.is_empty());
    assert_eq!(
        names.len(),
        unique.len(),
        "seeded more than once: {names:?}"
    );

    let leaders = |v: &[serde_json::Value]| -> Vec<String> {
        v.iter()
            .filter(|r| r["leader"] == true)
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    let t = Instant::now();
    let leader = loop {
        let v = c.replicas_report().await;
        let l = leaders(&v);
        if v.len() == 3 && l.len() == 1 {
            break l[0].clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no single leader: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // It stays one leader, by each replica's own account (its metric), not only by the
    // column the leader writes.
    for _ in 0..15 {
        let g = c.leader_gauges().await;
        assert_eq!(
            g.iter().map(|(_, v)| v).sum::<i64>(),
            1,
            "leaders by /metrics: {g:?}"
        );
        let i: usize = leader.strip_prefix("replica-").unwrap().parse().unwrap();
        assert!(g.contains(&(i, 1)), "{leader} is the one: {g:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let i: usize = leader.strip_prefix("replica-").unwrap().parse().unwrap();
    c.kill(i);
    let t = Instant::now();
    let next = loop {
        let v = c.replicas_report().await;
        let l: Vec<String> = leaders(&v).into_iter().filter(|n| *n != leader).collect();
        if l.len() == 1 {
            break l[0].clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no new leader: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "leadership moved from {leader} to {next} in {:?}",
        t.elapsed()
    );
    let g = c.leader_gauges().await;
    assert_eq!(
        g.iter().map(|(_, v)| v).sum::<i64>(),
        1,
        "leaders by /metrics: {g:?}"
    );
    // The dead replica's lease runs out and the new leader removes its row.
    let t = Instant::now();
    loop {
        let v = c.replicas_report().await;
        if v.iter().all(|r| r["name"] != json!(leader)) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "dead replica never swept: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_replica_its_agents_move_and_readyz_fails_meanwhile() {
    if !require_haproxy() {
        return;
    }
    let dir = TempDir::new("cluster-drain");
    let mut c = Cluster::start(2, &dir, true, &[("TRELLIS_DRAIN_SECS", "2")]).await;
    let stop = CancellationToken::new();
    let agents = agents_on_every_replica(&c, 6, &stop).await;
    let victim = agents[0].3;
    let moving: Vec<&String> = agents
        .iter()
        .filter(|a| a.3 == victim)
        .map(|a| &a.0)
        .collect();
    let ready = c.replica(victim).url("/readyz");
    let probe = tokio::spawn(async move {
        // Sees 503 `draining` while the replica drains.
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(&ready).send().await {
                if r.status() == 503 {
                    return r.text().await.unwrap_or_default();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        String::new()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let took = c.terminate(victim);
    let body = probe.await.unwrap();
    assert!(body.contains("draining"), "readyz while draining: {body:?}");
    println!("replica {victim} drained and stopped in {took:?}");
    // Each moved agent was closed with 1001 (going away, no error), and the closes were
    // spread over the 2 s drain, not made at once.
    let mut closed: Vec<Duration> = Vec::new();
    for a in agents.iter().filter(|a| a.3 == victim) {
        let closes = a.2.closes.lock().unwrap().clone();
        let (at, code, _) = closes.first().cloned().expect("closed by the drain");
        assert_eq!(code, Some(1001), "{closes:?}");
        closed.push(at.duration_since(t));
    }
    closed.sort();
    let spread = *closed.last().unwrap() - closed[0];
    println!("drain closes at {closed:?} (spread {spread:?})");
    assert!(
        closed.len() < 2 || spread >= Duration::from_millis(700),
        "closed at once: {closed:?}"
    );
    let other = 1 - victim;
    let api = c.api(other);
    let mut at: HashMap<&String, usize> = HashMap::new();
    for id in &moving {
        api.wait_until(Duration::from_secs(15), || async {
            let v = api.get(&format!("/api/agents/{id}")).await;
            v["status"] == "online" && v["replica"] == json!(format!("replica-{other}"))
        })
        .await;
        at.insert(id, other);
    }
    // And they work there.
    for id in &moving {
        let cid = api.command(id, "ping", json!({})).await;
        assert_eq!(
            api.wait_done(&cid, Duration::from_secs(10)).await["status"],
            "succeeded"
        );
    }
    stop.cancel();
}

/// tendril given every replica's own URL (no load balancer, `--server r0,r1`): it holds its
/// session on the first; when that replica is SIGKILLed it moves to the next URL and the
/// ping it was streaming finishes there, every line stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tendril_given_every_replica_url_moves_on_when_its_replica_dies() {
    let dir = TempDir::new("cluster-urls");
    let mut c = Cluster::start(2, &dir, false, &[]).await;
    let (agent_id, token) = c.api(0).create_agent("multi-url").await;
    let urls = format!("{},{}", c.ws_url(0), c.ws_url(1));
    let agent = Agent::start(&urls, &token, &dir.join("agent"));
    let api = c.api(1);
    api.wait_agent_online(&agent_id).await;
    assert_eq!(
        c.which_replica(&agent_id).await,
        Some(0),
        "the first URL first"
    );
    let cid = api
        .command(
            &agent_id,
            "ping",
            json!({"duration_ms": 4000, "log_lines": 40}),
        )
        .await;
    api.wait_last_seq(&cid, 8).await;
    c.kill(0);
    let t = Instant::now();
    api.wait_until(Duration::from_secs(20), || async {
        let v = api.get(&format!("/api/agents/{agent_id}")).await;
        v["status"] == "online" && v["replica"] == json!("replica-1")
    })
    .await;
    println!(
        "tendril back online on replica-1 {:?} after the kill",
        t.elapsed()
    );
    let done = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_lines_once(&api.all_logs(&cid).await, 40);
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("connected to control plane") && l.contains(&c.ws_url(1))),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_on_another_replica_replaces_the_first_cleanly() {
    let dir = TempDir::new("cluster-supersede");
    let c = Cluster::start(2, &dir, false, &[]).await;
    let api = c.api(0);
    let (id, token) = api.create_agent("twice").await;
    let mut first = trellis_tests::raw_agent::RawAgent::hello(&c.ws_url(0), &token).await;
    api.wait_agent_online(&id).await;
    assert_eq!(c.which_replica(&id).await, Some(0));
    // The same agent connects to replica 1: replica 0 is told and closes its socket.
    let t = Instant::now();
    let _second = trellis_tests::raw_agent::RawAgent::hello(&c.ws_url(1), &token).await;
    let (frames, code) = tokio::time::timeout(Duration::from_secs(5), first.read_until_close())
        .await
        .expect("the first session was not closed");
    let took = t.elapsed();
    println!("the first session (replica 0) closed {took:?} after the second connected to replica 1: {code:?} {frames:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(
        frames.iter().any(|f| f.contains("superseded")),
        "closed as superseded: {frames:?} {code:?}"
    );
    // The agent stays online, on replica 1, and commands reach it there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = api.get(&format!("/api/agents/{id}")).await;
    assert_eq!(v["status"], "online", "{v}");
    assert_eq!(v["replica"], "replica-1", "{v}");
}
