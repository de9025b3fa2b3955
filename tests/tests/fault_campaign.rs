//! Fault campaign: the real `trellis`, a real `tendril` (with the real Terraform) and the
//! Proxmox VE API simulator; `tendril` is SIGKILLed at a random point (seeded RNG, the
//! seed is printed) during a `provision`, a `terraform_apply` or a `ping` streaming logs,
//! then restarted. After each run:
//! * the command reaches a terminal status;
//! * its stored events (read from the database) have seqs exactly `1..=lastSeq`, at most
//!   one `finished` (the last), and a ping's `line N` log lines each appear once, in
//!   order, with none missing below the highest one stored — no event lost or stored twice;
//! * a provision killed before it succeeded is retried, and then exactly one VM in
//!   pve-sim carries its Trellis tag (never a second VM);
//! * no Terraform (or its children) is left running in the agent's work dir.
//!
//!
//! A second test SIGKILLs `trellis` at a random point while two pings stream logs and a
//! provision runs, restarts it on the same database, and checks the same, on SQLite and
//! on PostgreSQL.
//!
//! A third restarts PostgreSQL (a server of the test's own, [`PgInstance`]) at random
//! points while pings stream, then stops it for longer than the pool's acquire timeout;
//! a fourth caps SQLite (`TRELLIS_SQLITE_MAX_PAGE_COUNT`) so that it fills up while a ping
//! streams, then lets it grow again. Both check the same, and that API calls meanwhile get
//! a JSON 503/507 that says why within the acquire timeout.
//!
//! `TRELLIS_FAULT_RUNS` (default 15: five of each kind), `TRELLIS_FAULT_CP_RUNS`
//! (default 5) and `TRELLIS_FAULT_PG_RUNS` (default 3) set the number of runs (23 in all by
//! default; 200 with `TRELLIS_FAULT_RUNS=150 TRELLIS_FAULT_CP_RUNS=50`);
//! `TRELLIS_FAULT_SEED` replays a campaign. The figures are printed at the end.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Connection;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::pg_instance::PgInstance;
use trellis_tests::terraform::{params as tf_params, template_repo, terraform_env};

const FAST_SIM: &[&str] = &[
    "--clone-ms",
    "300",
    "--start-ms",
    "200",
    "--agent-boot-ms",
    "600",
    "--exec-ms",
    "50",
];

const PING_LINES: usize = 120;

#[derive(Default, Debug)]
struct Figures {
    runs: u32,
    kills: u32,
    commands: u32,
    terminal: u32,
    events_checked: u64,
    lost: u64,
    duplicated: u64,
    second_vms: u32,
    leftover_terraform: u32,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ping,
    Provision,
    TerraformApply,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The stored events of a command, `(seq, kind, data)` in seq order, from the database.
async fn stored_events(db_url: &str, command_id: &str) -> Vec<(i64, String, String)> {
    let id: uuid::Uuid = command_id.parse().expect("command id is a uuid");
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(db_url)
        .await
        .expect("database");
    let rows: Vec<(i64, String, String)> = sqlx::query_as(&format!(
        "SELECT seq, kind, data FROM command_events WHERE command_id = '{id}' ORDER BY seq"
    ))
    .fetch_all(&mut conn)
    .await
    .expect("events query");
    let _ = conn.close().await;
    rows
}

/// Counts events lost (seq gaps, missing ping lines) and stored twice (a second
/// `finished`, a ping line seen again) for one command.
async fn check_events(db_url: &str, c: &Value, kind: Kind, f: &mut Figures) {
    check_events_of(db_url, c, kind, PING_LINES, f).await;
}

/// [`check_events`] for a ping of `ping_lines` log lines.
async fn check_events_of(db_url: &str, c: &Value, kind: Kind, ping_lines: usize, f: &mut Figures) {
    let id = c["id"].as_str().expect("command id");
    let events = stored_events(db_url, id).await;
    f.events_checked += events.len() as u64;
    let last_seq = c["lastSeq"].as_i64().unwrap_or(0);
    let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
    let want: Vec<i64> = (1..=last_seq).collect();
    if seqs != want {
        let missing = want.iter().filter(|s| !seqs.contains(s)).count() as u64;
        eprintln!("command {id}: stored seqs {seqs:?}, lastSeq {last_seq}");
        f.lost += missing.max(1);
    }
    let finished: Vec<i64> = events
        .iter()
        .filter(|e| e.1 == "finished")
        .map(|e| e.0)
        .collect();
    if finished.len() > 1 {
        eprintln!("command {id}: finished stored at seqs {finished:?}");
        f.duplicated += finished.len() as u64 - 1;
    }
    if finished.first().is_some_and(|&s| s != last_seq) {
        eprintln!("command {id}: events stored after finished");
        f.duplicated += 1;
    }
    if let Kind::Ping = kind {
        // `line 00000001 …` once each, in order, none missing below the last one stored.
        let lines: Vec<usize> = events
            .iter()
            .filter(|e| e.1 == "log")
            .flat_map(|e| {
                e.2.lines()
                    .filter_map(|l| l.strip_prefix("line "))
                    .filter_map(|l| l.get(..8)?.parse().ok())
                    .collect::<Vec<usize>>()
            })
            .collect();
        let mut seen = vec![0u32; ping_lines + 2];
        for &n in &lines {
            if let Some(s) = seen.get_mut(n) {
                *s += 1;
            }
        }
        let dup: u64 = seen.iter().map(|&s| u64::from(s.saturating_sub(1))).sum();
        let top = lines.iter().copied().max().unwrap_or(0);
        let missing = (1..=top).filter(|&n| seen[n] == 0).count() as u64;
        let ordered = lines.windows(2).all(|w| w[0] < w[1]);
        if dup > 0 || missing > 0 || !ordered {
            eprintln!("command {id}: ping lines {lines:?}");
        }
        f.duplicated += dup;
        f.lost += missing;
        if c["status"] == "succeeded" && top != ping_lines {
            eprintln!("command {id}: succeeded with {top} of {ping_lines} lines");
            f.lost += ping_lines.saturating_sub(top) as u64;
        }
    }
}

/// Processes whose working directory or command line is inside `dir` (Terraform and
/// the shells its provisioners run), by scanning `/proc`.
fn processes_in(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().to_string();
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cwd = std::fs::read_link(e.path().join("cwd"))
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        // tendril itself runs with its work dir in the environment only, not cwd/argv.
        if cmdline.contains("tendril") {
            continue;
        }
        if cwd.starts_with(&dir) || cmdline.contains(&dir) {
            out.push((pid, cmdline));
        }
    }
    out
}

async fn template_id(api: &Api) -> String {
    let t = api.get("/api/templates").await;
    t["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().starts_with("Debian 12"))
        .map(|t| t["id"].as_str().unwrap().to_string())
        .expect("seeded template")
}

fn has_tag(tags: Option<&str>, tag: &str) -> bool {
    tags.is_some_and(|t| t.split([';', ',']).any(|x| x.trim() == tag))
}

struct Stack {
    agent: Agent,
    cp: ControlPlane,
    sim: trellis_tests::pve_sim::process::SimProcess,
    api: Api,
    agent_id: String,
    work: std::path::PathBuf,
    tid: String,
    _dir: TempDir,
}

/// trellis (on `backend`), pve-sim and one tendril with Terraform, the agent online.
async fn stack(tag: &str, backend: Backend) -> Stack {
    let dir = TempDir::new(tag);
    let db = TestDb::create(backend, &dir).await;
    let cp = ControlPlane::start(db, &dir).await;
    let api = cp.api();
    let sim = trellis_tests::pve_sim::process::SimProcess::start(
        bin("pve-sim").to_str().unwrap(),
        FAST_SIM,
    )
    .await
    .expect("pve-sim");
    let (agent_id, token) = api.create_agent("fault-lab").await;
    let mut env: Vec<(String, String)> = terraform_env();
    env.extend([
        ("PROXMOX_URL".to_string(), sim.url.clone()),
        (
            "PROXMOX_TOKEN_ID".to_string(),
            trellis_tests::pve_sim::DEFAULT_TOKEN_ID.to_string(),
        ),
        (
            "PROXMOX_TOKEN_SECRET".to_string(),
            trellis_tests::pve_sim::DEFAULT_TOKEN_SECRET.to_string(),
        ),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let work = dir.join("agent");
    let agent = Agent::start_with(&cp.ws_url(), &token, &work, &env);
    api.wait_agent_online(&agent_id).await;
    let tid = template_id(&api).await;
    Stack {
        agent,
        cp,
        sim,
        api,
        agent_id,
        work,
        tid,
        _dir: dir,
    }
}

fn seed_and_rng(runs_var: &str, default_runs: u64, what: &str) -> (u64, u32, rand::rngs::StdRng) {
    let runs = env_u64(runs_var).unwrap_or(default_runs) as u32;
    let seed = env_u64("TRELLIS_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!(
        "{what}: seed {seed} (TRELLIS_FAULT_SEED={seed} replays it), {runs} runs ({runs_var})"
    );
    (seed, runs, rand::rngs::StdRng::seed_from_u64(seed))
}

/// Starts a provision of a new node; returns `(node id, command id)`.
async fn start_provision(s: &Stack, name: &str) -> (String, String) {
    let v = s
        .api
        .post("/api/nodes", json!({"name": name, "templateId": s.tid}))
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    // Right after a kill the old session may still count as online when we look, then
    // drop before the new one is in: a provision is refused (409 agent_offline) then.
    let started = Instant::now();
    let v = loop {
        let (st, v) = s
            .api
            .call(
                reqwest::Method::POST,
                &format!("/api/nodes/{node}/provision"),
                Some(json!({"agentId": s.agent_id})),
            )
            .await;
        if st == 409 && v["error"]["code"] == "agent_offline" && started.elapsed().as_secs() < 30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert!(st < 300, "provision → {st}: {v}");
        break v;
    };
    (node, v["commandId"].as_str().unwrap().to_string())
}

/// The VMs in pve-sim carrying the Trellis tag of the provision `root`.
async fn tagged_vms(s: &Stack, root: &str) -> Vec<u32> {
    let tag = trellis_protocol::proxmox_tag(root.parse().unwrap());
    s.sim
        .created_vms()
        .await
        .unwrap()
        .iter()
        .filter(|v| has_tag(v.tags.as_deref(), &tag))
        .map(|v| v.vmid)
        .collect()
}

/// Prints the figures (`fault`: what `kills` counts, e.g. "kills", "restarts") and
/// asserts that nothing was lost or stored twice.
fn print_figures(what: &str, seed: Option<u64>, fault: &str, f: &Figures, took: Duration) {
    let seed = seed.map_or_else(|| "none (no random choices)".to_string(), |s| s.to_string());
    println!(
        "{what} figures: seed {seed}, runs {}, {fault} {}, commands {} ({} terminal), \
         events checked {}, lost {}, duplicated {}, second VMs {}, leftover terraform processes {} \
         ({:.1} s)",
        f.runs,
        f.kills,
        f.commands,
        f.terminal,
        f.events_checked,
        f.lost,
        f.duplicated,
        f.second_vms,
        f.leftover_terraform,
        took.as_secs_f64()
    );
    assert_eq!(f.lost, 0, "{f:?}");
    assert_eq!(f.duplicated, 0, "{f:?}");
    assert_eq!(f.second_vms, 0, "{f:?}");
    assert_eq!(f.leftover_terraform, 0, "{f:?}");
    assert_eq!(f.terminal, f.commands, "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_tendril_at_random_points() {
    let started = Instant::now();
    let (seed, runs, mut rng) = seed_and_rng("TRELLIS_FAULT_RUNS", 15, "tendril fault campaign");
    let mut s = stack("fault-tendril", Backend::Sqlite).await;
    let repo = template_repo();
    let (api, agent_id, work) = (s.api.clone(), s.agent_id.clone(), s.work.clone());
    let mut f = Figures::default();
    for run in 0..runs {
        let kind = match run % 3 {
            0 => Kind::Ping,
            1 => Kind::Provision,
            _ => Kind::TerraformApply,
        };
        api.wait_agent_online(&agent_id).await;
        let (cid, node, kill_after) = match kind {
            Kind::Ping => {
                let cid = api
                    .command(
                        &agent_id,
                        "ping",
                        json!({"log_lines": PING_LINES, "duration_ms": 2500}),
                    )
                    .await;
                (cid, None, rng.random_range(50..3000))
            }
            Kind::Provision => {
                let (node, cid) = start_provision(&s, &format!("fault-{seed:x}-{run}")).await;
                (cid, Some(node), rng.random_range(50..2500))
            }
            Kind::TerraformApply => {
                let p = tf_params(&repo, "v1.0.0", "slow", json!({"ticks": 6}));
                let cid = api
                    .command(
                        &agent_id,
                        "terraform_apply",
                        serde_json::to_value(p).unwrap(),
                    )
                    .await;
                (cid, None, rng.random_range(100..4500))
            }
        };
        f.runs += 1;
        f.commands += 1;
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        let before = api.get(&format!("/api/commands/{cid}")).await;
        s.agent.kill(); // SIGKILL
        f.kills += 1;
        s.agent.restart();
        let c = api.wait_done(&cid, Duration::from_secs(90)).await;
        println!(
            "run {run}: {kind:?} killed after {kill_after} ms (was {} at seq {}) → {} {}",
            before["status"].as_str().unwrap_or("?"),
            before["lastSeq"],
            c["status"].as_str().unwrap_or("?"),
            c["error"]["code"].as_str().unwrap_or(""),
        );
        f.terminal += 1;
        check_events(&s.cp.db_url, &c, kind, &mut f).await;

        if let (Kind::Provision, Some(node)) = (kind, &node) {
            let mut last = c.clone();
            if c["status"] != "succeeded" {
                assert_eq!(c["error"]["retryable"], true, "{c}");
                api.wait_agent_online(&agent_id).await;
                let v = api
                    .post(&format!("/api/commands/{cid}/retry"), json!({}))
                    .await;
                let retry = v["commandId"].as_str().unwrap().to_string();
                f.commands += 1;
                last = api.wait_done(&retry, Duration::from_secs(90)).await;
                f.terminal += 1;
                check_events(&s.cp.db_url, &last, kind, &mut f).await;
                assert_eq!(last["status"], "succeeded", "the retry provisions: {last}");
            }
            let tagged = tagged_vms(&s, &cid).await;
            if tagged.len() != 1 {
                eprintln!("node {node}: VMs tagged for {cid}: {tagged:?}");
            }
            assert!(!tagged.is_empty(), "the provisioned VM carries its tag");
            f.second_vms += tagged.len().saturating_sub(1) as u32;
            let n = api.get(&format!("/api/nodes/{node}")).await;
            assert_eq!(n["status"], "running", "{n} after {last}");
        }
        if let Kind::TerraformApply = kind {
            // Terraform lost its agent: it must not keep running (give it 10 s to notice).
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut left = processes_in(&work);
            while !left.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                left = processes_in(&work);
            }
            if !left.is_empty() {
                eprintln!("run {run}: left running: {left:?}");
                f.leftover_terraform += left.len() as u32;
            }
        }
    }
    drop(s);
    print_figures(
        "tendril fault campaign",
        Some(seed),
        "kills",
        &f,
        started.elapsed(),
    );
}

/// SIGKILL of trellis at a random point while two pings stream logs and a provision
/// runs, then a restart on the same address and database: the agent reconnects, re-sends
/// what was not acknowledged, and every command ends with nothing lost or stored twice.
async fn sigkill_trellis_under_load(backend: Backend) {
    let started = Instant::now();
    let what = format!("trellis fault campaign ({backend:?})");
    let (seed, runs, mut rng) = seed_and_rng("TRELLIS_FAULT_CP_RUNS", 5, &what);
    let mut s = stack("fault-trellis", backend).await;
    let mut f = Figures::default();
    for run in 0..runs {
        s.api.wait_agent_online(&s.agent_id).await;
        let mut pings = Vec::new();
        for _ in 0..2 {
            pings.push(
                s.api
                    .command(
                        &s.agent_id,
                        "ping",
                        json!({"log_lines": PING_LINES, "duration_ms": 2500}),
                    )
                    .await,
            );
        }
        let (node, prov) = start_provision(&s, &format!("cpfault-{seed:x}-{run}")).await;
        f.runs += 1;
        f.commands += 3;
        let kill_after = rng.random_range(50..3000);
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        s.cp.kill(); // SIGKILL
        f.kills += 1;
        // Down for a moment while the agent keeps working and journaling.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
        s.cp.restart().await;
        s.api = s.cp.api();
        let mut summary = Vec::new();
        for cid in &pings {
            let c = s.api.wait_done(cid, Duration::from_secs(90)).await;
            f.terminal += 1;
            summary.push(c["status"].as_str().unwrap_or("?").to_string());
            assert_eq!(c["status"], "succeeded", "the agent kept running it: {c}");
            check_events(&s.cp.db_url, &c, Kind::Ping, &mut f).await;
        }
        let c = s.api.wait_done(&prov, Duration::from_secs(90)).await;
        f.terminal += 1;
        summary.push(c["status"].as_str().unwrap_or("?").to_string());
        check_events(&s.cp.db_url, &c, Kind::Provision, &mut f).await;
        assert_eq!(c["status"], "succeeded", "{c}");
        let tagged = tagged_vms(&s, &prov).await;
        if tagged.len() != 1 {
            eprintln!("node {node}: VMs tagged for {prov}: {tagged:?}");
        }
        assert!(!tagged.is_empty(), "the provisioned VM carries its tag");
        f.second_vms += tagged.len().saturating_sub(1) as u32;
        println!("run {run}: trellis killed after {kill_after} ms → {summary:?}");
    }
    drop(s);
    print_figures(&what, Some(seed), "kills", &f, started.elapsed());
}
on_both_backends!(trellis_sigkill, sigkill_trellis_under_load);

/// Found by the campaign: tendril killed while the VM's start task runs; the retry finds
/// the VM (stopped still), asks for another start, and that task fails with "already
/// running" once the first one ends. The retry must take the running VM, not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provision_killed_during_start_vm_retries_to_its_running_vm() {
    let mut s = proxmox_stack(
        Backend::Sqlite,
        "fault-start",
        &[
            "--clone-ms",
            "200",
            "--start-ms",
            "2500",
            "--agent-boot-ms",
            "300",
        ],
        &[],
    )
    .await;
    let tid = template_id(&s.api).await;
    let api = s.api.clone();
    let v = api
        .post(
            "/api/nodes",
            json!({"name": "start-kill", "templateId": tid}),
        )
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let v = api
        .post(
            &format!("/api/nodes/{node}/provision"),
            json!({"agentId": s.agent_id}),
        )
        .await;
    let cid = v["commandId"].as_str().unwrap().to_string();
    api.wait_until(Duration::from_secs(30), || async {
        let c = api.get(&format!("/api/commands/{cid}")).await;
        c["stages"].as_array().is_some_and(|st| {
            st.iter()
                .any(|x| x["name"] == "start_vm" && x["state"] == "running")
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.agent.kill();
    s.agent.restart();
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["error"]["code"], "agent_lost_command", "{c}");
    api.wait_agent_online(&s.agent_id).await;
    let v = api
        .post(&format!("/api/commands/{cid}/retry"), json!({}))
        .await;
    let retry = v["commandId"].as_str().unwrap().to_string();
    let c = api.wait_done(&retry, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let tag = trellis_protocol::proxmox_tag(cid.parse().unwrap());
    let vms: Vec<u32> = s
        .sim
        .created_vms()
        .await
        .unwrap()
        .iter()
        .filter(|v| has_tag(v.tags.as_deref(), &tag))
        .map(|v| v.vmid)
        .collect();
    assert_eq!(vms.len(), 1, "{vms:?}");
}

/// The pool's acquire timeout in trellis (`Db::connect`): no API call may wait longer for
/// the database, give or take the time to answer.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// One API call made while PostgreSQL was down.
#[derive(Debug)]
struct Probe {
    what: &'static str,
    status: u16,
    body: Value,
    took: Duration,
    /// When it was answered, relative to the stop.
    answered: Duration,
}

/// Calls `/readyz`, reads a command and submits one, over and over, until `stop` says
/// so; returns every answer. A ping submitted successfully is returned in `created` (it
/// must reach a terminal status like the others).
async fn probe_outage(
    api: Api,
    agent_id: String,
    read: String,
    down_at: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<Probe>, Vec<String>) {
    let mut probes = Vec::new();
    let mut created = Vec::new();
    while !*stop.borrow() {
        for what in ["readyz", "get_command", "post_command"] {
            let t = Instant::now();
            let (status, body) = match what {
                "readyz" => {
                    let r = api
                        .http
                        .get(format!("{}/readyz", api.base))
                        .send()
                        .await
                        .expect("readyz answers (no hang, no reset)");
                    let st = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    (
                        st,
                        serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    )
                }
                "get_command" => {
                    api.call(reqwest::Method::GET, &format!("/api/commands/{read}"), None)
                        .await
                }
                _ => {
                    let (st, v) = api
                        .call(
                            reqwest::Method::POST,
                            "/api/commands",
                            Some(json!({"agentId": agent_id, "type": "ping",
                                "params": {"log_lines": 3}})),
                        )
                        .await;
                    if st < 300 {
                        created.push(v["commandId"].as_str().expect("commandId").to_string());
                    }
                    (st, v)
                }
            };
            probes.push(Probe {
                what,
                status,
                body,
                took: t.elapsed(),
                answered: down_at.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (probes, created)
}

/// PostgreSQL restarted at a random point (stopped for 1–3 s with `pg_ctl stop -m fast`,
/// then started again on the same port and data) while two pings stream logs through a
/// real tendril, on a PostgreSQL server of the test's own ([`PgInstance`]; the shared one
/// on 5432 is never stopped). Checks: trellis keeps running (no exit, no panic); every
/// command ends `succeeded`, with seqs `1..=lastSeq` and each ping line once; API calls
/// during the outage answer within the acquire timeout, with a 5xx JSON error
/// (`database_unavailable`) or, once the database is back, success; a `/readyz` answered
/// while the database is down says 503; and the commands of earlier runs are unchanged.
///
/// `TRELLIS_FAULT_PG_RUNS` (default 3) sets the number of restarts; `TRELLIS_FAULT_SEED`
/// replays a campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load() {
    let started = Instant::now();
    let what = "PostgreSQL restart campaign";
    let (seed, runs, mut rng) = seed_and_rng("TRELLIS_FAULT_PG_RUNS", 3, what);
    let pg = PgInstance::start("fault-pg");
    let dir = TempDir::new("fault-pg-cp");
    let mut cp = ControlPlane::start(TestDb::existing(&pg.url()), &dir).await;
    let api = Api {
        // A hang shows up as a failed test, not a stuck one.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        ..cp.api()
    };
    let (agent_id, token) = api.create_agent("pg-lab").await;
    let agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&agent_id).await;
    let mut f = Figures::default();
    // Terminal commands of earlier runs: (command, as it was read then).
    let mut done_before: Vec<Value> = Vec::new();
    let (mut calls, mut refused, mut readyz_down, mut slowest) = (0u32, 0u32, 0u32, Duration::ZERO);
    for run in 0..runs {
        api.wait_agent_online(&agent_id).await;
        let mut cmds = Vec::new();
        for _ in 0..2 {
            cmds.push(
                api.command(
                    &agent_id,
                    "ping",
                    json!({"log_lines": PING_LINES, "duration_ms": 2500}),
                )
                .await,
            );
        }
        f.runs += 1;
        f.commands += 2;
        let stop_after = rng.random_range(50..2500);
        let down_for = Duration::from_millis(rng.random_range(1000..3000));
        tokio::time::sleep(Duration::from_millis(stop_after)).await;
        pg.stop_fast();
        let down_at = Instant::now();
        f.kills += 1;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let prober = tokio::spawn(probe_outage(
            api.clone(),
            agent_id.clone(),
            cmds[0].clone(),
            down_at,
            stop_rx,
        ));
        tokio::time::sleep(down_for).await;
        // Before the start: the server may accept connections before `pg_ctl` returns.
        let up_at = down_at.elapsed();
        pg.start_again();
        let _ = stop_tx.send(true);
        let (probes, created) = prober.await.expect("prober");
        for p in &probes {
            calls += 1;
            slowest = slowest.max(p.took);
            assert!(
                p.took < ACQUIRE_TIMEOUT + Duration::from_secs(3),
                "run {run}: {} took {:?} during the outage: {p:?}",
                p.what,
                p.took
            );
            if p.status >= 300 {
                refused += 1;
                assert!(
                    p.status >= 500 && p.body["error"]["code"].is_string(),
                    "run {run}: {} during the outage answered {} without a JSON error: {p:?}",
                    p.what,
                    p.status
                );
                if p.status == 503 {
                    assert_eq!(p.body["error"]["code"], "database_unavailable", "{p:?}");
                }
            }
            // Answered before the database was back: it cannot have been ready.
            if p.what == "readyz" && p.answered < up_at {
                assert_eq!(p.status, 503, "run {run}: readyz while down: {p:?}");
            }
            if p.what == "readyz" && p.status == 503 {
                readyz_down += 1;
            }
        }
        f.commands += created.len() as u32;
        cmds.extend(created);
        assert!(cp.is_running(), "trellis exited:\n{}", cp.log());
        let mut summary = Vec::new();
        for cid in &cmds {
            let c = api.wait_done(cid, Duration::from_secs(60)).await;
            f.terminal += 1;
            summary.push(c["status"].as_str().unwrap_or("?").to_string());
            assert_eq!(c["status"], "succeeded", "the agent kept running it: {c}");
            let lines = c["params"]["log_lines"]
                .as_u64()
                .unwrap_or(PING_LINES as u64);
            check_events_of(&cp.db_url, &c, Kind::Ping, lines as usize, &mut f).await;
            done_before.push(c);
        }
        // Everything acknowledged before this run is still there, as it was.
        for before in &done_before {
            let id = before["id"].as_str().unwrap();
            let now = api.get(&format!("/api/commands/{id}")).await;
            assert_eq!(now["status"], before["status"], "{id}");
            assert_eq!(now["lastSeq"], before["lastSeq"], "{id}");
        }
        let answered: Vec<String> = probes
            .iter()
            .map(|p| format!("{}:{}", p.what, p.status))
            .collect();
        println!(
            "run {run}: PostgreSQL stopped after {stop_after} ms for {} ms; calls while down {answered:?} → {summary:?}",
            down_for.as_millis()
        );
    }

    // A longer outage than the pool's acquire timeout: calls cannot wait it out, so they
    // must fail, with a JSON 503, after no longer than the acquire timeout.
    pg.stop_fast();
    let down_at = Instant::now();
    f.kills += 1;
    let read_path = format!("/api/commands/{}", done_before[0]["id"].as_str().unwrap());
    let ready_url = format!("{}/readyz", api.base);
    let (((st, v), post_took), ((st_get, v_get), get_took), (ready, ready_took)) = tokio::join!(
        timed(api.call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": agent_id, "type": "ping", "params": {}})),
        )),
        timed(api.call(reqwest::Method::GET, &read_path, None)),
        timed(api.http.get(&ready_url).send()),
    );
    let st_ready = ready.expect("readyz answers").status().as_u16();
    let long_down = down_at.elapsed();
    pg.start_again();
    println!(
        "long outage ({} ms): POST /api/commands → {st} in {} ms {v}; GET → {st_get} in {} ms; \
         /readyz → {st_ready} in {} ms",
        long_down.as_millis(),
        post_took.as_millis(),
        get_took.as_millis(),
        ready_took.as_millis()
    );
    for (what, st, v, took) in [
        ("POST /api/commands", st, &v, post_took),
        ("GET /api/commands/{id}", st_get, &v_get, get_took),
    ] {
        assert_eq!(st, 503, "{what} while the database is down: {v}");
        assert_eq!(v["error"]["code"], "database_unavailable", "{what}: {v}");
        assert!(
            took < ACQUIRE_TIMEOUT + Duration::from_secs(3),
            "{what} took {took:?}"
        );
        calls += 1;
        refused += 1;
        slowest = slowest.max(took);
    }
    assert_eq!(st_ready, 503);
    assert!(
        ready_took < Duration::from_secs(4),
        "readyz took {ready_took:?}"
    );
    readyz_down += 1;
    api.wait_until(Duration::from_secs(20), || async {
        api.http
            .get(format!("{}/readyz", api.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    for before in &done_before {
        let id = before["id"].as_str().unwrap();
        let now = api.get(&format!("/api/commands/{id}")).await;
        assert_eq!(now["status"], before["status"], "{id}");
        assert_eq!(now["lastSeq"], before["lastSeq"], "{id}");
    }
    // And the agent works again.
    api.wait_agent_online(&agent_id).await;
    let cid = api
        .command(&agent_id, "ping", json!({"log_lines": PING_LINES}))
        .await;
    f.commands += 1;
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    f.terminal += 1;
    assert_eq!(c["status"], "succeeded", "{c}");
    check_events(&cp.db_url, &c, Kind::Ping, &mut f).await;

    assert!(cp.is_running(), "trellis exited:\n{}", cp.log());
    let log = cp.log();
    assert!(!log.contains("panicked"), "trellis panicked:\n{log}");
    drop(agent);
    drop(cp);
    drop(pg);
    println!(
        "{what}: API calls during outages {calls} ({refused} refused with a JSON 5xx, \
         /readyz unhealthy {readyz_down} times), slowest {} ms",
        slowest.as_millis()
    );
    let _ = refused;
    print_figures(what, Some(seed), "restarts", &f, started.elapsed());
}

/// Log lines of the ping that fills the database, and their size: 1.2 MB in all, far more
/// than the room left ([`FULL_SLACK_PAGES`]).
const FULL_LINES: usize = 3000;
const FULL_LINE_BYTES: u32 = 400;
/// Pages the capped database may grow by (4 KiB each).
const FULL_SLACK_PAGES: i64 = 48;

/// SQLite that cannot grow (`TRELLIS_SQLITE_MAX_PAGE_COUNT`, a test knob of trellis, set
/// just above the database's size) while a ping streams 1.2 MB of logs: the event writer
/// cannot store the events, so it acks none of them and the agent keeps them; new commands
/// are refused with 507 `database_full` (a JSON message that says so); trellis keeps
/// running. Then space returns (trellis restarted without the cap): the agent re-sends,
/// the ping succeeds with every line once, and the commands stored before are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_then_space_returns() {
    let started = Instant::now();
    let dir = TempDir::new("fault-full");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let mut cp = ControlPlane::start(db, &dir).await;
    let api = cp.api();
    let (agent_id, token) = api.create_agent("full-lab").await;
    let agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&agent_id).await;
    let mut f = Figures::default();
    // Acknowledged before the database fills.
    let first = api
        .command(&agent_id, "ping", json!({"log_lines": 20}))
        .await;
    let first = api.wait_done(&first, Duration::from_secs(30)).await;
    assert_eq!(first["status"], "succeeded", "{first}");

    let pages = page_count(&cp.db_url).await;
    let cap = (pages + FULL_SLACK_PAGES).to_string();
    cp.restart_with(&[("TRELLIS_SQLITE_MAX_PAGE_COUNT", &cap)])
        .await;
    f.kills += 1;
    let api = cp.api();
    api.wait_agent_online(&agent_id).await;
    let big = api
        .command(
            &agent_id,
            "ping",
            json!({"log_lines": FULL_LINES, "log_line_bytes": FULL_LINE_BYTES,
                "duration_ms": 3000}),
        )
        .await;
    f.commands += 1;

    // Full: the writer cannot store the ping's events, and new commands are refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut small = Vec::new();
    let refused = loop {
        let (st, v) = api
            .call(
                reqwest::Method::POST,
                "/api/commands",
                Some(json!({"agentId": agent_id, "type": "ping", "params": {"log_lines": 2}})),
            )
            .await;
        if st < 300 {
            // There was room for this one: it must complete like the others.
            small.push(v["commandId"].as_str().expect("commandId").to_string());
        } else {
            break (st, v);
        }
        assert!(
            Instant::now() < deadline,
            "the database never filled up (cap {cap} pages):\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.0, 507, "POST /api/commands when full: {refused:?}");
    assert_eq!(refused.1["error"]["code"], "database_full", "{refused:?}");
    let msg = refused.1["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("full"), "the message says so: {msg:?}");
    assert!(
        !msg.contains("SQL") && !msg.contains("code:"),
        "no SQL text: {msg:?}"
    );
    f.commands += small.len() as u32;
    // The writer refused the ping's events (nothing acked), more than once: the agent
    // reconnected and sent them again.
    let writer_refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("event batch failed") && l.contains("disk is full"))
            .count()
    };
    api.wait_until(Duration::from_secs(30), || async {
        writer_refusals(&cp.log()) >= 2
    })
    .await;
    // Reads still work; the ping is not done (its events wait on the agent).
    let during = api.get(&format!("/api/commands/{big}")).await;
    let seq_full = during["lastSeq"].as_i64().unwrap_or(0);
    assert!(cp.is_running(), "trellis exited when full:\n{}", cp.log());
    let log = cp.log();
    assert!(!log.contains("panicked"), "trellis panicked:\n{log}");
    let refusals = writer_refusals(&log);
    let full_for = started.elapsed();

    // Space returns.
    cp.restart().await;
    f.kills += 1;
    let api = cp.api();
    let c = api.wait_done(&big, Duration::from_secs(60)).await;
    f.terminal += 1;
    assert_eq!(c["status"], "succeeded", "{c}");
    check_events_of(&cp.db_url, &c, Kind::Ping, FULL_LINES, &mut f).await;
    for cid in &small {
        let c = api.wait_done(cid, Duration::from_secs(60)).await;
        f.terminal += 1;
        assert_eq!(c["status"], "succeeded", "{c}");
        check_events_of(&cp.db_url, &c, Kind::Ping, 2, &mut f).await;
    }
    let now = api
        .get(&format!("/api/commands/{}", first["id"].as_str().unwrap()))
        .await;
    assert_eq!(now["status"], first["status"]);
    assert_eq!(now["lastSeq"], first["lastSeq"]);
    check_events_of(&cp.db_url, &now, Kind::Ping, 20, &mut f).await;
    f.runs = 1;
    println!(
        "SQLite full: cap {cap} pages (was {pages}); full at seq {seq_full} of the ping's {} events; \
         {} small commands fitted first; refused with {} {:?}; the writer refused {refusals} \
         batches in the first {:.1} s",
        c["lastSeq"],
        small.len(),
        refused.0,
        msg,
        full_for.as_secs_f64()
    );
    drop(agent);
    drop(cp);
    print_figures("SQLite full", None, "restarts", &f, started.elapsed());
}

/// `fut`'s output and how long it took.
async fn timed<F: std::future::Future>(fut: F) -> (F::Output, Duration) {
    let t = Instant::now();
    let out = fut.await;
    (out, t.elapsed())
}

/// The database's size in pages (`PRAGMA page_count`).
async fn page_count(db_url: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(db_url)
        .await
        .expect("database");
    let (n,): (i64,) = sqlx::query_as("PRAGMA page_count")
        .fetch_one(&mut conn)
        .await
        .expect("page_count");
    let _ = conn.close().await;
    n
}
