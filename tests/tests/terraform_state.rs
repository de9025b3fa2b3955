//! Terraform state kept by trellis: real `trellis` and `tendril` binaries, the real
//! Terraform 1.0.3 with the null provider, Terraform's `http` backend pointed (by the
//! agent's generated override file) at `/api/terraform/state/{workspace}`.
//!
//! * Applying twice keeps the resource: the second apply changes nothing.
//! * Two applies of one workspace on two agents are serialised by the state lock.
//! * The state is not stored in clear.
//! * The state endpoints refuse missing, wrong, expired and other-workspace credentials.
//!
//! Each on SQLite and PostgreSQL. And, on SQLite: an agent given several server URLs keeps
//! the state on the server it is connected to.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;
use trellis_tests::git::GitRepo;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::raw_agent::RawAgent;
use trellis_tests::terraform::terraform_env;

const MAIN_TF: &str = r#"
variable "run" {
  type    = string
  default = "same"
}
variable "marker" {
  type = string
}
resource "null_resource" "thing" {
  triggers = { run = var.run }
  provisioner "local-exec" {
    command = "sleep 2"
  }
}
output "thing_id" {
  value = null_resource.thing.id
}
output "marker" {
  value = var.marker
}
"#;

fn template(dir: &std::path::Path) -> GitRepo {
    let repo = GitRepo::init(&dir.join("template"));
    repo.write("main.tf", MAIN_TF);
    repo.commit_all("template");
    repo.tag("v1.0.0");
    repo
}

async fn start_agent(
    api: &Api,
    cp: &ControlPlane,
    dir: &std::path::Path,
    name: &str,
) -> (String, Agent) {
    let (agent_id, token) = api.create_agent(name).await;
    let env = terraform_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let agent = Agent::start_with(&cp.ws_url(), &token, &dir.join(name), &env);
    api.wait_agent_online(&agent_id).await;
    (agent_id, agent)
}

fn params(repo: &GitRepo, workspace: &str, run: &str, marker: &str) -> Value {
    json!({"template_source": {"repo": repo.path.to_str().unwrap(), "version": "v1.0.0"},
           "terraform_vars": {"run": run, "marker": marker},
           "workspace_key": workspace})
}

fn log_text(logs: &[Value]) -> String {
    logs.iter()
        .filter_map(|l| l["data"].as_str())
        .collect::<Vec<_>>()
        .join("")
}

/// Every stored state, as the table holds it, read straight from the database.
async fn raw_states(db_url: &str) -> Vec<String> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(db_url).await.unwrap();
    let rows: Vec<String> = sqlx::query_scalar("SELECT state FROM terraform_state_versions")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    rows
}

fn state_path(workspace: &str) -> String {
    let enc: String = workspace
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/api/terraform/state/{enc}")
}

async fn a_second_apply_finds_the_state_and_changes_nothing(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "tf-state").await;
    let repo = template(&dir);
    let (agent_id, _agent) = start_agent(&api, &cp, &dir, "tf-a").await;
    let marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
    let ws = "prod/web";

    let first = api
        .command(
            &agent_id,
            "terraform_apply",
            params(&repo, ws, "same", &marker),
        )
        .await;
    let c1 = api.wait_done(&first, Duration::from_secs(50)).await;
    assert_eq!(c1["status"], "succeeded", "{c1}");
    let id1 = c1["result"]["outputs"]["thing_id"]["value"].clone();
    assert!(id1.is_string(), "{c1}");
    let logs1 = log_text(&api.all_logs(&first).await);
    assert!(logs1.contains("1 added"), "{logs1}");

    let second = api
        .command(
            &agent_id,
            "terraform_apply",
            params(&repo, ws, "same", &marker),
        )
        .await;
    let c2 = api.wait_done(&second, Duration::from_secs(50)).await;
    assert_eq!(c2["status"], "succeeded", "{c2}");
    let logs2 = log_text(&api.all_logs(&second).await);
    assert!(
        logs2.contains("No changes") || logs2.contains("0 added"),
        "the second apply did something: {logs2}"
    );
    assert_eq!(
        c2["result"]["outputs"]["thing_id"]["value"], id1,
        "null_resource recreated: {c2}"
    );
    assert!(logs2.contains("state kept by Trellis"), "{logs2}");

    // Listed, with its versions; the admin can read the state itself.
    let list = api.get("/api/terraform/workspaces").await;
    let item = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workspace"] == ws)
        .unwrap_or_else(|| panic!("{list}"))
        .clone();
    assert!(item["versions"].as_i64().unwrap() >= 1, "{item}");
    assert!(item["lockedBy"].is_null(), "lock left behind: {item}");
    let versions = api.get(&format!("{}/versions", state_path(ws))).await;
    let items = versions["items"].as_array().unwrap();
    assert_eq!(items.len() as i64, item["versions"].as_i64().unwrap());
    // Newest first; the first apply wrote the first version.
    assert_eq!(items.last().unwrap()["commandId"], first, "{versions}");
    let state = api.get(&state_path(ws)).await;
    assert!(state.to_string().contains(&marker), "{state}");

    // Not in clear in the database: the marker (an output, so in the state) is nowhere.
    let stored = raw_states(&cp.db_url).await;
    assert!(!stored.is_empty());
    for s in &stored {
        assert!(s.starts_with("v1:"), "{s}");
        assert!(!s.contains(&marker), "state stored in clear: {s}");
        assert!(!s.contains("null_resource"), "state stored in clear: {s}");
    }
}

async fn concurrent_applies_of_one_workspace_are_serialised_by_the_lock(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "tf-state-lock").await;
    let repo = template(&dir);
    let (a, _agent_a) = start_agent(&api, &cp, &dir, "tf-a").await;
    let (b, _agent_b) = start_agent(&api, &cp, &dir, "tf-b").await;
    let ws = "shared";

    let started = Instant::now();
    let ca = api
        .command(&a, "terraform_apply", params(&repo, ws, "a", "m"))
        .await;
    let cb = api
        .command(&b, "terraform_apply", params(&repo, ws, "b", "m"))
        .await;
    let done_a = api.wait_done(&ca, Duration::from_secs(55)).await;
    let done_b = api.wait_done(&cb, Duration::from_secs(55)).await;
    assert_eq!(done_a["status"], "succeeded", "{done_a}");
    assert_eq!(done_b["status"], "succeeded", "{done_b}");
    eprintln!("both applies done in {:?}", started.elapsed());

    // One waited for the other's lock.
    let log = cp.log();
    assert!(
        log.contains("waiting for the terraform state lock"),
        "no apply waited: {log}"
    );

    // The versions, oldest first: one command's, then the other's, never interleaved,
    // with Terraform's serial increasing and one lineage.
    let v = api.get(&format!("{}/versions", state_path(ws))).await;
    let mut items = v["items"].as_array().unwrap().clone();
    items.reverse();
    assert!(items.len() >= 2, "{v}");
    let writers: Vec<&str> = items
        .iter()
        .map(|i| i["commandId"].as_str().unwrap())
        .collect();
    let mut runs = writers.clone();
    runs.dedup();
    assert_eq!(runs.len(), 2, "interleaved or missing writers: {writers:?}");
    let serials: Vec<i64> = items
        .iter()
        .map(|i| i["serial"].as_i64().unwrap())
        .collect();
    assert!(
        serials.windows(2).all(|w| w[0] < w[1]),
        "serials not increasing: {serials:?}"
    );
    let lineages: std::collections::BTreeSet<&str> = items
        .iter()
        .map(|i| i["lineage"].as_str().unwrap())
        .collect();
    assert_eq!(lineages.len(), 1, "{v}");
    // The second writer replaced the first writer's resource: its plan saw that state.
    let later = if runs[1] == ca { &ca } else { &cb };
    let logs = log_text(&api.all_logs(later).await);
    assert!(logs.contains("1 added, 0 changed, 1 destroyed"), "{logs}");
}

/// A raw agent that takes `terraform_apply` commands without running them, so the test
/// holds a live command and its credential.
async fn raw_agent(cp: &ControlPlane, token: &str) -> RawAgent {
    let mut ws = RawAgent::connect(&cp.ws_url(), token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "raw", "hostname": "raw",
        "capabilities": ["terraform_apply"], "max_concurrency": 4}),
    )
    .await;
    let welcome = ws.read_until("welcome").await;
    assert!(welcome.contains("terraform_state"), "{welcome}");
    ws
}

async fn dispatch_of(ws: &mut RawAgent, cid: &str) -> Value {
    loop {
        let t = ws.read_until("\"dispatch\"").await;
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["command_id"] == cid {
            ws.send(json!({"type": "accept", "command_id": cid})).await;
            return v;
        }
    }
}

async fn state_requests_need_the_commands_own_live_credential(backend: Backend) {
    let (_dir, cp, api) = control_plane(backend, "tf-state-auth").await;
    let (agent_id, token) = api.create_agent("raw").await;
    let mut ws = raw_agent(&cp, &token).await;
    let p = |key: &str| {
        json!({"template_source": {"repo": "/nowhere", "version": "v1"},
               "workspace_key": key})
    };
    let cid = api.command(&agent_id, "terraform_apply", p("team-a")).await;
    let d = dispatch_of(&mut ws, &cid).await;
    let cred = d["terraform_state"]
        .as_str()
        .expect("a credential")
        .to_string();
    let other = api.command(&agent_id, "terraform_apply", p("team-b")).await;
    let d_other = dispatch_of(&mut ws, &other).await;
    let other_cred = d_other["terraform_state"].as_str().unwrap().to_string();
    assert_ne!(cred, other_cred);

    let http = reqwest::Client::new();
    let url = |ws: &str| cp.url(&state_path(ws));
    let lock = reqwest::Method::from_bytes(b"LOCK").unwrap();
    let unlock = reqwest::Method::from_bytes(b"UNLOCK").unwrap();
    let check = |r: reqwest::Response, want: u16, code: &'static str| async move {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, want, "{text}");
        if !code.is_empty() {
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
            assert_eq!(v["error"]["code"], code, "{v}");
        }
        text
    };

    // No state yet: 204 for the command's own credential.
    let r = http
        .get(url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .send()
        .await
        .unwrap();
    check(r, 204, "").await;
    // Nothing, a wrong password, an unknown command, another command's credential.
    check(
        http.get(url("team-a")).send().await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    let r = http
        .get(url("team-a"))
        .basic_auth(&cid, Some("AAAA"))
        .send()
        .await
        .unwrap();
    check(r, 401, "unauthorized").await;
    let r = http
        .get(url("team-a"))
        .basic_auth(uuid::Uuid::new_v4(), Some(&cred))
        .send()
        .await
        .unwrap();
    check(r, 401, "unauthorized").await;
    let r = http
        .get(url("team-a"))
        .basic_auth(&other, Some(&cred))
        .send()
        .await
        .unwrap();
    check(r, 401, "unauthorized").await;
    // A valid credential for another workspace: 403, for reads, writes and locks.
    let r = http
        .get(url("team-b"))
        .basic_auth(&cid, Some(&cred))
        .send()
        .await
        .unwrap();
    check(r, 403, "forbidden").await;
    let r = http
        .post(url("team-b"))
        .basic_auth(&cid, Some(&cred))
        .body(r#"{"version":4,"serial":1}"#)
        .send()
        .await
        .unwrap();
    check(r, 403, "forbidden").await;
    let r = http
        .request(lock.clone(), url("team-b"))
        .basic_auth(&cid, Some(&cred))
        .body(r#"{"ID":"x"}"#)
        .send()
        .await
        .unwrap();
    check(r, 403, "forbidden").await;

    // Malformed requests: JSON errors, never a 5xx.
    let r = http
        .delete(url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .send()
        .await
        .unwrap();
    check(r, 405, "method_not_allowed").await;
    let r = http
        .post(url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .body("not json")
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_state").await;
    let r = http
        .request(lock.clone(), url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .body(r#"{"Who":"no id"}"#)
        .send()
        .await
        .unwrap();
    check(r, 400, "invalid_state").await;
    let r = http
        .get(cp.url("/api/terraform/state/team-a/versions"))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    check(r, 404, "not_found").await;

    // The protocol itself with the right credential: lock, write under the lock id, a
    // write without it by another lock id is refused, unlock, read back.
    let info = r#"{"ID":"lock-1","Operation":"OperationTypeApply","Who":"test"}"#;
    let r = http
        .request(lock.clone(), url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .body(info)
        .send()
        .await
        .unwrap();
    check(r, 200, "").await;
    let state =
        r#"{"version":4,"serial":1,"lineage":"l-1","outputs":{"x":{"value":"secret-output-7"}}}"#;
    let r = http
        .post(format!("{}?ID=lock-2", url("team-a")))
        .basic_auth(&cid, Some(&cred))
        .body(state)
        .send()
        .await
        .unwrap();
    let held = check(r, 423, "").await;
    assert!(held.contains("lock-1"), "the holder's lock info: {held}");
    let r = http
        .post(format!("{}?ID=lock-1", url("team-a")))
        .basic_auth(&cid, Some(&cred))
        .body(state)
        .send()
        .await
        .unwrap();
    check(r, 200, "").await;
    let r = http
        .request(unlock.clone(), url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .body(info)
        .send()
        .await
        .unwrap();
    check(r, 200, "").await;
    let r = http
        .get(url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .send()
        .await
        .unwrap();
    assert_eq!(check(r, 200, "").await, state);
    for s in raw_states(&cp.db_url).await {
        assert!(!s.contains("secret-output-7"), "{s}");
    }

    // Admins: a bearer token reads, but cannot write; the session cookie is not taken.
    let r = http
        .get(url("team-a"))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(check(r, 200, "").await, state);
    let r = http
        .post(url("team-a"))
        .bearer_auth(&api.token)
        .body(state)
        .send()
        .await
        .unwrap();
    check(r, 403, "forbidden").await;
    let r = http
        .get(url("team-a"))
        .header("cookie", "trellis_session=whatever")
        .header("x-trellis-request", "1")
        .send()
        .await
        .unwrap();
    check(r, 401, "unauthorized").await;

    // A LOCK on a workspace another live command holds waits for it to be released.
    let third = api.command(&agent_id, "terraform_apply", p("team-a")).await;
    let third_cred = dispatch_of(&mut ws, &third).await["terraform_state"]
        .as_str()
        .unwrap()
        .to_string();
    let lock_as = |who: String, cred: String, id: &'static str| {
        let (http, url, lock) = (http.clone(), url("team-a"), lock.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http
                .request(lock, url)
                .basic_auth(who, Some(cred))
                .body(format!(r#"{{"ID":"{id}","Who":"test"}}"#))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.text().await.unwrap(),
                started.elapsed(),
            )
        })
    };
    let (status, _, _) = lock_as(cid.clone(), cred.clone(), "lock-3").await.unwrap();
    assert_eq!(status, 200);
    let waiting = lock_as(third.clone(), third_cred.clone(), "lock-c");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "the second LOCK did not wait");
    let r = http
        .request(unlock.clone(), url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .body(r#"{"ID":"lock-3"}"#)
        .send()
        .await
        .unwrap();
    check(r, 200, "").await;
    let (status, body, waited) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting LOCK got the lock once released")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    // Now the first command waits for the third's lock, and ends while it waits.
    let waiting = lock_as(cid.clone(), cred.clone(), "lock-4");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the LOCK did not wait");

    // Once the command has finished, its credential has expired.
    ws.send(
        json!({"type": "events", "events": [{"command_id": cid, "seq": 1, "ts": 1,
        "kind": "finished", "status": "succeeded", "result": {"outputs": {}}, "error": null}]}),
    )
    .await;
    let c = api.wait_done(&cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a waiter whose command ended stops waiting")
        .unwrap();
    assert_eq!(status, 401, "{body}");
    let r = http
        .get(url("team-a"))
        .basic_auth(&cid, Some(&cred))
        .send()
        .await
        .unwrap();
    let text = check(r, 401, "unauthorized").await;
    assert!(text.contains("expired"), "{text}");
}

on_both_backends!(
    second_apply,
    a_second_apply_finds_the_state_and_changes_nothing
);
on_both_backends!(
    concurrent_applies,
    concurrent_applies_of_one_workspace_are_serialised_by_the_lock
);
on_both_backends!(
    credentials,
    state_requests_need_the_commands_own_live_credential
);

/// With several server URLs, the state goes to the server of the agent's current session:
/// the first URL is dead (a closed port), so the agent runs on the second, and Terraform's
/// backend must point there too, not at the first URL configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_server_urls_the_state_goes_to_the_connected_one() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "tf-state-urls").await;
    let repo = template(&dir);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/api/agents/connect", l.local_addr().unwrap())
    };
    let (agent_id, token) = api.create_agent("tf-urls").await;
    let env = terraform_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let agent = Agent::start_with(
        &format!("{dead},{}", cp.ws_url()),
        &token,
        &dir.join("tf-urls"),
        &env,
    );
    api.wait_agent_online(&agent_id).await;
    let marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
    let ws = "urls";
    let cid = api
        .command(
            &agent_id,
            "terraform_apply",
            params(&repo, ws, "same", &marker),
        )
        .await;
    let done = api.wait_done(&cid, Duration::from_secs(50)).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", agent.log());
    let state = api.get(&state_path(ws)).await;
    assert!(state.to_string().contains(&marker), "{state}");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("connected to control plane") && l.contains(&cp.ws_url())),
        "{log}"
    );
}
