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
//! `TRELLIS_FAULT_RUNS` (default 15: five of each kind) and `TRELLIS_FAULT_CP_RUNS`
//! (default 5) set the number of runs (20 in all by default; 200 with
//! `TRELLIS_FAULT_RUNS=150 TRELLIS_FAULT_CP_RUNS=50`); `TRELLIS_FAULT_SEED` replays a
//! campaign. The figures are printed at the end.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Connection;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
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
        let mut seen = vec![0u32; PING_LINES + 2];
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
        if c["status"] == "succeeded" && top != PING_LINES {
            eprintln!("command {id}: succeeded with {top} of {PING_LINES} lines");
            f.lost += (PING_LINES - top) as u64;
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

fn print_figures(what: &str, seed: u64, f: &Figures, took: Duration) {
    println!(
        "{what} figures: seed {seed}, runs {}, kills {}, commands {} ({} terminal), \
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
    print_figures("tendril fault campaign", seed, &f, started.elapsed());
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
    print_figures(&what, seed, &f, started.elapsed());
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
