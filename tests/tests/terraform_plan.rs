//! `terraform_plan`, `terraform_apply` of a saved plan and `terraform_destroy`: real
//! `trellis` and `tendril` binaries, the real Terraform 1.0.3 with the null provider,
//! the state kept by trellis (Terraform's `http` backend).
//!
//! * A plan shows 1 to add with the resource's address (and no variable value); applying
//!   that plan creates it; the next plan shows no changes; a destroy removes it, and the
//!   plan after shows 1 to add again.
//! * A destroy and a plan given as `{source_command_id}` run with that command's params,
//!   the sensitive value too (a variable validation refuses the `***` responses show).
//! * A plan made stale by an apply in between is refused (`plan_stale`), and a plan is
//!   applied at most once (`plan_missing`); a plan is applied only on its own agent.
//! * A destroy plan (`destroy: true`, from the last apply) lists the resource to delete
//!   and destroys nothing by itself; applying it destroys exactly that (the next plan adds
//!   it again); a destroy plan made stale by an apply is refused and destroys nothing.
//!
//! Each on SQLite and PostgreSQL.

use std::time::Duration;

use serde_json::{json, Value};
use trellis_tests::git::GitRepo;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::terraform::terraform_env;

const MAIN_TF: &str = r#"
variable "run" {
  type    = string
  default = "same"
}
variable "db_password" {
  type      = string
  sensitive = true
  validation {
    condition     = var.db_password != "***"
    error_message = "The password is the redacted placeholder, not the value."
  }
}
resource "null_resource" "thing" {
  triggers = { run = var.run, pw = var.db_password }
}
output "thing_id" {
  value = null_resource.thing.id
}
"#;

const SECRET: &str = "pw-s3cr3t-value";

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

fn params(repo: &GitRepo, run: &str) -> Value {
    json!({"template_source": {"repo": repo.path.to_str().unwrap(), "version": "v1.0.0"},
           "terraform_vars": {"run": run, "db_password": SECRET},
           "workspace_key": "plans/web"})
}

const WITHIN: Duration = Duration::from_secs(40);

async fn run(api: &Api, agent: &str, ty: &str, params: Value) -> Value {
    let id = api.command(agent, ty, params).await;
    api.wait_done(&id, WITHIN).await
}

/// `(add, change, destroy, [address action])` of a succeeded plan.
fn summary(c: &Value) -> (i64, i64, i64, Vec<String>) {
    assert_eq!(c["status"], "succeeded", "{c}");
    let r = &c["result"];
    let resources = r["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{c}"))
        .iter()
        .map(|x| {
            format!(
                "{} {}",
                x["address"].as_str().unwrap(),
                x["action"].as_str().unwrap()
            )
        })
        .collect();
    (
        r["add"].as_i64().unwrap(),
        r["change"].as_i64().unwrap(),
        r["destroy"].as_i64().unwrap(),
        resources,
    )
}

/// How many state versions the test workspace has.
async fn versions(api: &Api) -> usize {
    api.get("/api/terraform/state/plans%2Fweb/versions").await["items"]
        .as_array()
        .map_or(0, Vec::len)
}

async fn plan_apply_then_destroy(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "tf-plan").await;
    let repo = template(&dir);
    let (agent, _a) = start_agent(&api, &cp, &dir, "tf-a").await;
    let started = std::time::Instant::now();

    let plan = run(&api, &agent, "terraform_plan", params(&repo, "one")).await;
    assert_eq!(
        summary(&plan),
        (1, 0, 0, vec!["null_resource.thing create".to_string()])
    );
    let sha = plan["result"]["plan_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{plan}");
    assert!(!plan.to_string().contains(SECRET), "{plan}");
    let stages: Vec<_> = plan["stages"]
        .as_array()
        .map(|s| s.iter().map(|s| s["name"].clone()).collect())
        .unwrap_or_default();
    if !stages.is_empty() {
        assert_eq!(stages, ["fetch_template", "init", "plan", "show"], "{plan}");
    }

    // The apply carries the plan's hash (signed with it) and applies that plan.
    let apply_id = api
        .command(
            &agent,
            "terraform_apply",
            json!({"plan_command_id": plan["id"]}),
        )
        .await;
    let apply = api.wait_done(&apply_id, WITHIN).await;
    assert_eq!(apply["status"], "succeeded", "{apply}");
    assert_eq!(apply["params"]["plan_sha256"], sha, "{apply}");
    assert!(
        apply["result"]["outputs"]["thing_id"]["value"].is_string(),
        "{apply}"
    );
    let logs: String = api
        .all_logs(&apply_id)
        .await
        .iter()
        .filter_map(|l| l["data"].as_str().map(str::to_string))
        .collect();
    assert!(logs.contains("1 added"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");

    let again = run(&api, &agent, "terraform_plan", params(&repo, "one")).await;
    assert_eq!(summary(&again), (0, 0, 0, vec![]));

    // Destroyed from the apply of the plan: its params (the secret too, opened from
    // storage), without plan_command_id, and the meta given.
    let destroy = run(
        &api,
        &agent,
        "terraform_destroy",
        json!({"source_command_id": apply_id, "meta": {"reason": "tear down"}}),
    )
    .await;
    assert_eq!(destroy["status"], "succeeded", "{destroy}");
    let p = &destroy["params"];
    assert_eq!(p["workspace_key"], "plans/web", "{destroy}");
    assert_eq!(p["terraform_vars"]["db_password"], "***", "{destroy}");
    assert_eq!(p["meta"]["reason"], "tear down", "{destroy}");
    assert!(
        p.get("plan_command_id").is_none() && p.get("plan_sha256").is_none(),
        "{destroy}"
    );
    assert_eq!(destroy["target"]["workspace"], "plans/web", "{destroy}");

    let after = run(
        &api,
        &agent,
        "terraform_plan",
        json!({"source_command_id": destroy["id"]}),
    )
    .await;
    assert_eq!(
        summary(&after),
        (1, 0, 0, vec!["null_resource.thing create".to_string()])
    );
    eprintln!(
        "plan, apply, plan, destroy, plan in {:?}",
        started.elapsed()
    );
}

async fn a_destroy_plan_is_reviewed_then_applied(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "tf-destroy-plan").await;
    let repo = template(&dir);
    let (agent, _a) = start_agent(&api, &cp, &dir, "tf-a").await;
    let started = std::time::Instant::now();

    let applied = run(&api, &agent, "terraform_apply", params(&repo, "one")).await;
    assert_eq!(applied["status"], "succeeded", "{applied}");
    let before = versions(&api).await;

    // The preview: from the last apply (its secret opened on the server), with destroy.
    let plan = run(
        &api,
        &agent,
        "terraform_plan",
        json!({"source_command_id": applied["id"], "destroy": true}),
    )
    .await;
    assert_eq!(
        summary(&plan),
        (0, 0, 1, vec!["null_resource.thing delete".to_string()])
    );
    assert_eq!(plan["result"]["mode"], "destroy", "{plan}");
    assert_eq!(plan["params"]["destroy"], true, "{plan}");
    assert_eq!(plan["params"]["terraform_vars"]["db_password"], "***");
    assert!(!plan.to_string().contains(SECRET), "{plan}");
    let plan_log: String = api
        .all_logs(plan["id"].as_str().unwrap())
        .await
        .iter()
        .filter_map(|l| l["data"].as_str().map(str::to_string))
        .collect();
    assert!(
        plan_log.contains("null_resource.thing will be destroyed"),
        "{plan_log}"
    );
    // A preview destroys nothing: the state is as it was, and a normal plan has no changes.
    assert_eq!(versions(&api).await, before);
    let normal = run(&api, &agent, "terraform_plan", params(&repo, "one")).await;
    assert_eq!(summary(&normal), (0, 0, 0, vec![]));

    // Approved: the apply of that plan destroys exactly the resource it listed.
    let apply_id = api
        .command(
            &agent,
            "terraform_apply",
            json!({"plan_command_id": plan["id"]}),
        )
        .await;
    let apply = api.wait_done(&apply_id, WITHIN).await;
    assert_eq!(apply["status"], "succeeded", "{apply}");
    assert_eq!(apply["params"]["destroy"], true, "{apply}");
    assert_eq!(
        apply["params"]["plan_sha256"], plan["result"]["plan_sha256"],
        "{apply}"
    );
    let logs: String = api
        .all_logs(&apply_id)
        .await
        .iter()
        .filter_map(|l| l["data"].as_str().map(str::to_string))
        .collect();
    assert!(
        logs.contains("null_resource.thing: Destruction complete")
            && logs.contains("0 added, 0 changed, 1 destroyed"),
        "{logs}"
    );
    assert!(!logs.contains(SECRET), "{logs}");
    assert!(versions(&api).await > before, "no new state version");

    // Gone: planning from that apply (a normal plan: its `destroy` is not copied) adds it.
    let after = run(
        &api,
        &agent,
        "terraform_plan",
        json!({"source_command_id": apply_id}),
    )
    .await;
    assert_eq!(
        summary(&after),
        (1, 0, 0, vec!["null_resource.thing create".to_string()])
    );
    assert!(after["params"].get("destroy").is_none(), "{after}");
    assert_eq!(after["result"]["mode"], "normal", "{after}");

    // Nothing left to destroy: an empty destroy plan.
    let empty = run(
        &api,
        &agent,
        "terraform_plan",
        json!({"source_command_id": apply_id, "destroy": true}),
    )
    .await;
    assert_eq!(summary(&empty), (0, 0, 0, vec![]));
    assert_eq!(empty["result"]["mode"], "destroy", "{empty}");

    // `destroy` is for terraform_plan, as a bool.
    for (ty, body) in [
        (
            "terraform_destroy",
            json!({"source_command_id": apply_id, "destroy": true}),
        ),
        (
            "terraform_plan",
            json!({"source_command_id": apply_id, "destroy": "yes"}),
        ),
        ("terraform_apply", {
            let mut p = params(&repo, "one");
            p["destroy"] = true.into();
            p
        }),
    ] {
        let (s, b) = api
            .call(
                reqwest::Method::POST,
                "/api/commands",
                Some(json!({"agentId": agent, "type": ty, "params": body})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("invalid_params")),
            "{ty} {body} → {b}"
        );
    }
    eprintln!(
        "apply, destroy plan, plan, apply of the destroy plan, plan, plan in {:?}",
        started.elapsed()
    );
}

async fn a_stale_plan_is_refused(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "tf-plan-stale").await;
    let repo = template(&dir);
    let (agent, _a) = start_agent(&api, &cp, &dir, "tf-a").await;
    let (other, _b) = start_agent(&api, &cp, &dir, "tf-b").await;
    let started = std::time::Instant::now();

    let plan = run(&api, &agent, "terraform_plan", params(&repo, "one")).await;
    assert_eq!(summary(&plan).0, 1);

    // Only on the agent that keeps the file.
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": other, "type": "terraform_apply",
                        "params": {"plan_command_id": plan["id"]}})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "plan_invalid", "{body}");

    // `source_command_id` alone (with meta), of a Terraform command.
    for (body, status, code) in [
        (
            json!({"source_command_id": plan["id"], "workspace_key": "x"}),
            400,
            "invalid_params",
        ),
        (
            json!({"source_command_id": "not-an-id"}),
            400,
            "invalid_params",
        ),
        (
            json!({"source_command_id": uuid::Uuid::new_v4().to_string()}),
            404,
            "not_found",
        ),
    ] {
        let (s, b) = api
            .call(
                reqwest::Method::POST,
                "/api/commands",
                Some(json!({"agentId": other, "type": "terraform_destroy", "params": body})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{body} → {b}"
        );
    }
    let ping = api.command(&agent, "ping", json!({})).await;
    let (s, b) = api
        .call(
            reqwest::Method::POST,
            "/api/commands",
            Some(json!({"agentId": agent, "type": "terraform_plan",
                        "params": {"source_command_id": ping}})),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("source_invalid")),
        "{b}"
    );

    // The state changes after the plan was made.
    let plain = run(&api, &agent, "terraform_apply", params(&repo, "two")).await;
    assert_eq!(plain["status"], "succeeded", "{plain}");

    let stale = run(
        &api,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": plan["id"]}),
    )
    .await;
    assert_eq!(stale["status"], "failed", "{stale}");
    assert_eq!(stale["error"]["code"], "plan_stale", "{stale}");

    // A plan is applied at most once, stale or not.
    let twice = run(
        &api,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": plan["id"]}),
    )
    .await;
    assert_eq!(twice["status"], "failed", "{twice}");
    assert_eq!(twice["error"]["code"], "plan_missing", "{twice}");

    // The state is the plain apply's: planning it again changes nothing.
    let check = run(&api, &agent, "terraform_plan", params(&repo, "two")).await;
    assert_eq!(summary(&check), (0, 0, 0, vec![]));

    // The same over an existing state (Terraform's own check applies there too).
    let plan2 = run(&api, &agent, "terraform_plan", params(&repo, "three")).await;
    assert_eq!(
        summary(&plan2),
        (1, 0, 1, vec!["null_resource.thing replace".to_string()])
    );
    let plain = run(&api, &agent, "terraform_apply", params(&repo, "four")).await;
    assert_eq!(plain["status"], "succeeded", "{plain}");
    let stale = run(
        &api,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": plan2["id"]}),
    )
    .await;
    assert_eq!(stale["error"]["code"], "plan_stale", "{stale}");

    // A destroy plan is refused the same way once the state moved, and destroys nothing.
    let destroy_plan = run(
        &api,
        &agent,
        "terraform_plan",
        json!({"source_command_id": plain["id"], "destroy": true}),
    )
    .await;
    assert_eq!(
        summary(&destroy_plan),
        (0, 0, 1, vec!["null_resource.thing delete".to_string()])
    );
    let moved = run(&api, &agent, "terraform_apply", params(&repo, "five")).await;
    assert_eq!(moved["status"], "succeeded", "{moved}");
    let stale = run(
        &api,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": destroy_plan["id"]}),
    )
    .await;
    assert_eq!(stale["status"], "failed", "{stale}");
    assert_eq!(stale["error"]["code"], "plan_stale", "{stale}");
    assert_eq!(stale["params"]["destroy"], true, "{stale}");
    let check = run(&api, &agent, "terraform_plan", params(&repo, "five")).await;
    assert_eq!(
        summary(&check),
        (0, 0, 0, vec![]),
        "the stale destroy plan destroyed something"
    );
    eprintln!("stale plan test in {:?}", started.elapsed());
}

on_both_backends!(plan_apply_destroy, plan_apply_then_destroy);
on_both_backends!(stale_plan, a_stale_plan_is_refused);
on_both_backends!(destroy_plan, a_destroy_plan_is_reviewed_then_applied);
