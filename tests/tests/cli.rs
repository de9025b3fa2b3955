//! The client CLI (`trellis login|logout|commands|nodes|deploy`) as a user runs it: the
//! built `trellis` binary against a live control plane and a real `tendril` running
//! `ping`s, and Terraform 1.0.3 with the null provider for `deploy plan|apply|destroy`. Each test has its own control plane and its own config directory
//! (`XDG_CONFIG_HOME`), so they run in parallel without sharing credentials.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use trellis_tests::harness::*;

/// The longest any one CLI invocation may take here.
const CLI_LIMIT: Duration = Duration::from_secs(60);

/// `trellis ARGS` with only `cfg` as its config (and home) directory, and `env`.
fn trellis(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(bin("trellis"));
    c.args(args)
        .env_remove("TRELLIS_URL")
        .env_remove("TRELLIS_TOKEN")
        .env("XDG_CONFIG_HOME", cfg)
        .env("HOME", cfg)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs it to its end (within [`CLI_LIMIT`]).
async fn run(mut cmd: tokio::process::Command) -> Output {
    tokio::time::timeout(CLI_LIMIT, cmd.output())
        .await
        .expect("trellis CLI finished in time")
        .expect("run trellis")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn explain(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Environment that points the CLI at `cp` with the bootstrap token.
fn env_for(cp: &ControlPlane) -> Vec<(String, String)> {
    vec![
        ("TRELLIS_URL".into(), cp.url("")),
        ("TRELLIS_TOKEN".into(), ADMIN_TOKEN.into()),
    ]
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_the_token_0600_from_stdin_never_argv_and_logout_removes_it() {
    let (dir, cp, _api) = control_plane(Backend::Sqlite, "cli-login").await;
    let cfg = dir.join("cfg");
    let url = cp.url("");

    // The token goes in on stdin; while login waits for it, its argv has no token.
    let mut login = trellis(&cfg, &["login", "--url", &url, "--token-stdin"], &[]);
    login.stdin(Stdio::piped());
    let mut child = login.spawn().expect("start trellis login");
    let pid = child.id().expect("pid");
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(!text(&argv).contains(ADMIN_TOKEN), "{}", text(&argv));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{ADMIN_TOKEN}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let o = tokio::time::timeout(CLI_LIMIT, child.wait_with_output())
        .await
        .expect("login in time")
        .unwrap();
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert!(text(&o.stdout).contains("as admin"), "{}", explain(&o));

    let file = cfg.join("trellis/credentials.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "credentials file mode {mode:o}");
    let dir_mode = std::fs::metadata(file.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "config dir mode {dir_mode:o}");
    let stored: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(stored, json!({"url": url, "token": ADMIN_TOKEN}));

    // There is no way to give the token in argv.
    let o = run(trellis(
        &cfg,
        &["login", "--url", &url, "--token", ADMIN_TOKEN],
        &[],
    ))
    .await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    // Without --token-stdin and without a terminal, login says what to do.
    let o = run(trellis(&cfg, &["login", "--url", &url], &[])).await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(text(&o.stderr).contains("--token-stdin"), "{}", explain(&o));

    // A wrong token is refused and does not replace the stored credentials.
    let mut wrong = trellis(&cfg, &["login", "--url", &url, "--token-stdin"], &[]);
    wrong.stdin(Stdio::piped());
    let mut child = wrong.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"not-the-admin-token-at-all\n")
        .await
        .unwrap();
    drop(stdin);
    let o = tokio::time::timeout(CLI_LIMIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(
        text(&o.stderr).contains("401 unauthorized"),
        "{}",
        explain(&o)
    );
    let again: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(again, stored);

    // Other commands use the stored credentials.
    let o = run(trellis(&cfg, &["commands", "list"], &[])).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert!(text(&o.stdout).starts_with("ID"), "{}", explain(&o));

    let o = run(trellis(&cfg, &["logout"], &[])).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert!(!file.exists());
    let o = run(trellis(&cfg, &["commands", "list"], &[])).await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(text(&o.stderr).contains("trellis login"), "{}", explain(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_list_show_and_follow_exit_codes() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "cli-commands").await;
    let cfg = dir.join("cfg");
    let env = env_for(&cp);
    let env = pairs(&env);
    let (agent, token) = api.create_agent("cli-agent").await;
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&agent).await;

    // follow of a streaming ping to its end: logs, progress, exit 0.
    let ok = api
        .command(
            &agent,
            "ping",
            json!({"duration_ms": 600, "progress_events": 4, "log_lines": 5}),
        )
        .await;
    let o = run(trellis(&cfg, &["commands", "follow", &ok], &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let out = text(&o.stdout);
    assert!(out.contains("progress 100%"), "{}", explain(&o));
    assert!(
        out.contains(&format!("command {ok} succeeded")),
        "{}",
        explain(&o)
    );
    // Every log line once (plain mode: stdout is a pipe).
    let logs = api.all_logs(&ok).await;
    assert_eq!(logs.len(), 5);
    for l in &logs {
        let line = l["data"].as_str().unwrap().trim_end();
        assert_eq!(out.matches(line).count(), 1, "{line:?} in\n{out}");
    }

    // On a terminal (a pty from util-linux `script`): the progress bar, redrawn in place,
    // and the same exit code.
    let o = run({
        let mut c = tokio::process::Command::new("script");
        c.args([
            "-qec",
            &format!("{} commands follow {ok}", bin("trellis").display()),
            "/dev/null",
        ])
        .env("XDG_CONFIG_HOME", &cfg)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        c
    })
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let tty = text(&o.stdout);
    // The bar's percent (plain mode prints `progress N%` lines instead).
    assert!(
        tty.contains("%") && !tty.contains("progress "),
        "no progress bar: {tty:?}"
    );
    assert!(
        tty.contains("\u{1b}[2K"),
        "the bar is not redrawn in place: {tty:?}"
    );
    assert!(tty.contains(&format!("command {ok} succeeded")), "{tty:?}");

    // --output json: one document with the API's shape.
    let o = run(trellis(
        &cfg,
        &["commands", "list", "--output", "json"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let list: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    let items = list["items"].as_array().expect("items");
    let c = items.iter().find(|c| c["id"] == ok).expect("the ping");
    assert_eq!(c["type"], "ping");
    assert_eq!(c["status"], "succeeded");
    assert_eq!(c["agentId"], agent);
    let o = run(trellis(
        &cfg,
        &["-o", "json", "commands", "show", &ok],
        &env,
    ))
    .await;
    let one: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(one["id"], ok);
    assert!(one["stages"].is_array());
    let o = run(trellis(&cfg, &["commands", "list", "--type", "ping"], &env)).await;
    assert!(text(&o.stdout).contains(&ok), "{}", explain(&o));

    // A failing ping: exit 1 and the error shown.
    let bad = api
        .command(&agent, "ping", json!({"fail_with": "boom from the test"}))
        .await;
    let o = run(trellis(&cfg, &["commands", "follow", &bad], &env)).await;
    assert_eq!(code(&o), 1, "{}", explain(&o));
    assert!(
        text(&o.stdout).contains("boom from the test"),
        "{}",
        explain(&o)
    );
    // With --output json, follow prints the finished command.
    let o = run(trellis(
        &cfg,
        &["commands", "follow", &bad, "-o", "json"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 1, "{}", explain(&o));
    let c: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(c["status"], "failed");

    // A long ping followed, then cancelled through the CLI: follow exits 3.
    let long = api
        .command(
            &agent,
            "ping",
            json!({"duration_ms": 60000, "progress_events": 60}),
        )
        .await;
    let follower = trellis(&cfg, &["commands", "follow", &long], &env)
        .spawn()
        .expect("start follow");
    api.wait_until(Duration::from_secs(20), || {
        let api = api.clone();
        let long = long.clone();
        async move { api.get(&format!("/api/commands/{long}")).await["status"] == "running" }
    })
    .await;
    let started = Instant::now();
    let o = run(trellis(&cfg, &["commands", "cancel", &long], &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let o = tokio::time::timeout(CLI_LIMIT, follower.wait_with_output())
        .await
        .expect("follow ended after the cancel")
        .unwrap();
    assert_eq!(code(&o), 3, "{}", explain(&o));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(text(&o.stdout).contains("cancelled"), "{}", explain(&o));

    // Past its deadline: exit 4.
    let slow = api
        .command_with(json!({"agentId": agent, "type": "ping",
            "params": {"duration_ms": 20000}, "timeoutSecs": 1}))
        .await;
    let o = run(trellis(&cfg, &["commands", "follow", &slow], &env)).await;
    assert_eq!(code(&o), 4, "{}", explain(&o));

    // Retry of the cancelled ping starts a new attempt.
    let o = run(trellis(
        &cfg,
        &["-o", "json", "commands", "retry", &long],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["attempt"], 2);

    // Unknown command: the API's code and message, exit 2.
    let o = run(trellis(
        &cfg,
        &["commands", "follow", "00000000-0000-4000-8000-000000000000"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(text(&o.stderr).contains("404 not_found"), "{}", explain(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_list_api_errors_and_a_refused_token() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "cli-nodes").await;
    let cfg = dir.join("cfg");
    let env = env_for(&cp);
    let env = pairs(&env);

    let templates = api.get("/api/templates").await;
    let template = templates["items"][0]["id"].as_str().unwrap().to_string();
    let node = api
        .post(
            "/api/nodes",
            json!({"name": "cli-node-1", "templateId": template, "application": "web"}),
        )
        .await;
    let node_id = node["node"]["id"].as_str().unwrap().to_string();

    let o = run(trellis(&cfg, &["nodes", "list"], &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let out = text(&o.stdout);
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATUS"),
        "{out}"
    );
    let row = lines.find(|l| l.contains("cli-node-1")).expect("the node");
    assert!(
        row.contains("pending_provision") && row.contains("web"),
        "{row}"
    );
    // Columns line up: STATUS starts where the row's status does.
    assert_eq!(
        header.find("STATUS"),
        row.find("pending_provision"),
        "{out}"
    );

    let o = run(trellis(&cfg, &["nodes", "list", "-o", "json"], &env)).await;
    let list: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(list["items"][0]["id"], node_id.as_str());
    let o = run(trellis(&cfg, &["nodes", "show", &node_id], &env)).await;
    assert!(text(&o.stdout).contains("cli-node-1"), "{}", explain(&o));

    // Created from the CLI (no provision).
    let o = run(trellis(
        &cfg,
        &[
            "nodes",
            "create",
            "--name",
            "cli-node-2",
            "--template",
            &template,
            "-o",
            "json",
        ],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let created: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(created["node"]["name"], "cli-node-2");

    // API errors: the code and message, exit 2.
    let o = run(trellis(&cfg, &["nodes", "power", &node_id, "start"], &env)).await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(
        text(&o.stderr).contains("409 invalid_state"),
        "{}",
        explain(&o)
    );
    let o = run(trellis(
        &cfg,
        &["nodes", "destroy", &node_id, "--confirm", "another-name"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(
        text(&o.stderr).contains("confirmation_mismatch"),
        "{}",
        explain(&o)
    );

    // deploy usage errors: no configuration; a saved plan with a configuration beside it.
    let o = run(trellis(&cfg, &["deploy", "plan", "--agent", "x"], &env)).await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(
        text(&o.stderr).contains("--repo and --version are required"),
        "{}",
        explain(&o)
    );
    let o = run(trellis(
        &cfg,
        &["deploy", "apply", "--plan", &node_id, "--repo", "/r"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(
        text(&o.stderr).contains("cannot be given with it"),
        "{}",
        explain(&o)
    );

    // A refused token: 401 with the hint to log in.
    let wrong = [
        ("TRELLIS_URL", env[0].1),
        ("TRELLIS_TOKEN", "wrong-token-wrong-token"),
    ];
    let o = run(trellis(&cfg, &["nodes", "list"], &wrong)).await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    let err = text(&o.stderr);
    assert!(err.contains("401 unauthorized"), "{err}");
    assert!(err.contains("run `trellis login`"), "{err}");
}

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

/// `trellis ARGS` on a terminal: a pty from util-linux `script`, `input` typed into it.
async fn on_a_terminal(cfg: &Path, args: &str, env: &[(&str, &str)], input: &str) -> Output {
    let mut c = tokio::process::Command::new("script");
    c.args([
        "-qec",
        &format!("{} {args}", bin("trellis").display()),
        "/dev/null",
    ])
    .env_remove("TRELLIS_URL")
    .env_remove("TRELLIS_TOKEN")
    .env("XDG_CONFIG_HOME", cfg)
    .env("HOME", cfg)
    .env("NO_COLOR", "1")
    .envs(env.iter().copied())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = c.spawn().expect("start script");
    let mut stdin = child.stdin.take().expect("stdin");
    // Typed once the prompt is up (script forwards what arrives on its stdin to the pty).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stdin.write_all(input.as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();
    let o = tokio::time::timeout(CLI_LIMIT, async {
        let o = child.wait_with_output().await;
        drop(stdin);
        o
    });
    o.await.expect("trellis on a pty in time").expect("script")
}

/// The id after `command ` on the first line (what `--follow` prints first).
fn first_command_id(o: &Output) -> String {
    let out = text(&o.stdout);
    out.lines()
        .next()
        .and_then(|l| l.strip_prefix("command "))
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no command id: {}", explain(o)))
}

/// `deploy plan` → `deploy apply --plan` → `deploy plan --from` (no changes) → `deploy
/// destroy` (refused without --yes off a terminal, before any plan; with a wrong typed name
/// the destroy plan is shown and left unapplied; with the right one on a pty that plan is
/// applied) → the next plan adds the resource again → `deploy plan --destroy` and `deploy
/// apply --plan` of it → `deploy destroy --yes -o json` from flags. Exit codes follow the
/// outcome (a plan applied twice fails: exit 1), `--output json` prints the API's shapes,
/// the secret variable never shows, and no one-step `terraform_destroy` is ever made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_plan_apply_destroy_with_real_terraform() {
    const SECRET: &str = "cli-pw-s3cr3t";
    let (dir, cp, api) = control_plane(Backend::Sqlite, "cli-deploy").await;
    let cfg = dir.join("cfg");
    let env = env_for(&cp);
    let env = pairs(&env);
    let repo = trellis_tests::git::GitRepo::init(&dir.join("template"));
    repo.write("main.tf", MAIN_TF);
    repo.commit_all("template");
    repo.tag("v1");
    let repo_path = repo.path.to_str().unwrap().to_string();
    let (agent, token) = api.create_agent("cli-tf").await;
    let tf_env = trellis_tests::terraform::terraform_env();
    let tf_env: Vec<(&str, &str)> = tf_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _agent = Agent::start_with(&cp.ws_url(), &token, &dir.join("agent"), &tf_env);
    api.wait_agent_online(&agent).await;
    let pw = format!("db_password={SECRET}");
    let config = [
        "--agent",
        &agent,
        "--repo",
        &repo_path,
        "--version",
        "v1",
        "--var",
        "run=one",
        "--var",
        &pw,
    ];

    // Plan, followed: the changes by action and how to apply them.
    let args = [&["deploy", "plan"][..], &config, &["--follow"]].concat();
    let o = run(trellis(&cfg, &args, &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let plan = first_command_id(&o);
    let out = text(&o.stdout);
    assert!(
        out.contains("Plan: 1 to add, 0 to change, 0 to destroy.")
            && out.contains("Create (1):\n  + null_resource.thing")
            && out.contains(&format!("Apply it: trellis deploy apply --plan {plan}")),
        "{}",
        explain(&o)
    );
    assert!(!out.contains(SECRET) && !text(&o.stderr).contains(SECRET));
    // `commands show` prints the same summary.
    let o = run(trellis(&cfg, &["commands", "show", &plan], &env)).await;
    assert!(
        text(&o.stdout).contains("Create (1):\n  + null_resource.thing"),
        "{}",
        explain(&o)
    );

    // Apply of that saved plan (the agent taken from the plan), JSON: the finished command.
    let o = run(trellis(
        &cfg,
        &["deploy", "apply", "--plan", &plan, "--follow", "-o", "json"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let applied: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(applied["status"], "succeeded", "{applied}");
    assert_eq!(applied["type"], "terraform_apply");
    assert_eq!(applied["params"]["plan_command_id"], plan.as_str());
    assert!(
        applied["result"]["outputs"]["thing_id"]["value"].is_string(),
        "{applied}"
    );
    assert!(text(&o.stderr).contains("1 added"), "{}", explain(&o));
    let apply_id = applied["id"].as_str().unwrap().to_string();

    // A plan is applied once: the second apply fails, and so does the CLI (exit 1).
    let o = run(trellis(
        &cfg,
        &["deploy", "apply", "--plan", &plan, "--follow"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 1, "{}", explain(&o));
    assert!(
        text(&o.stdout).contains("failed: plan_missing"),
        "{}",
        explain(&o)
    );

    // Planned again from the apply (its secret stays on the server): no changes.
    let o = run(trellis(
        &cfg,
        &["deploy", "plan", "--from", &apply_id, "--follow"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let out = text(&o.stdout);
    assert!(
        out.contains("No changes.") && !out.contains("Apply it"),
        "{}",
        explain(&o)
    );

    // Destroy: never without a confirmation, and without a terminal nothing is planned.
    let plans_before = count_of(&api, &agent, "terraform_plan").await;
    let o = run(trellis(
        &cfg,
        &["deploy", "destroy", "--from", &apply_id],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    assert!(text(&o.stderr).contains("needs --yes"), "{}", explain(&o));
    assert_eq!(count_of(&api, &agent, "terraform_plan").await, plans_before);
    // A wrong name: the destroy plan is made and shown, then left unapplied.
    let workspace = format!("{repo_path}#");
    let destroy_args = format!("deploy destroy --from {apply_id}");
    let o = on_a_terminal(&cfg, &destroy_args, &env, "not-the-workspace\n").await;
    assert_eq!(code(&o), 2, "{}", explain(&o));
    let out = text(&o.stdout);
    assert!(
        out.contains("Destroy plan: applying it destroys every resource listed.")
            && out.contains("Plan: 0 to add, 0 to change, 1 to destroy.")
            && out.contains("Destroy (1):")
            && out.contains("  - null_resource.thing")
            && out.contains(&format!("workspace {workspace:?}"))
            && out.contains("does not match")
            && out.contains("left unapplied"),
        "{}",
        explain(&o)
    );
    let unapplied = newest(&api, &agent, "terraform_plan").await;
    assert_eq!(unapplied["params"]["destroy"], true, "{unapplied}");
    assert_eq!(unapplied["result"]["mode"], "destroy", "{unapplied}");
    assert!(
        !applies_of(&api, &agent, unapplied["id"].as_str().unwrap()).await,
        "the refused destroy plan was applied"
    );
    // Typed on a terminal: that plan's apply destroys the resource (the template refuses a
    // `***` password, so the real one came from the server).
    let o = on_a_terminal(&cfg, &destroy_args, &env, &format!("{workspace}\n")).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let out = text(&o.stdout);
    assert!(
        out.contains("  - null_resource.thing") && out.contains("0 added, 0 changed, 1 destroyed"),
        "{}",
        explain(&o)
    );
    assert!(!out.contains(SECRET), "{out}");
    let destroy_plan = newest(&api, &agent, "terraform_plan").await;
    assert_ne!(destroy_plan["id"], unapplied["id"]);
    let destroy_apply = newest(&api, &agent, "terraform_apply").await;
    assert_eq!(
        (
            destroy_apply["status"].as_str(),
            &destroy_apply["params"]["plan_command_id"],
            &destroy_apply["params"]["destroy"]
        ),
        (Some("succeeded"), &destroy_plan["id"], &json!(true)),
        "{destroy_apply}"
    );

    // The next plan (JSON, not followed: the 202 answer) adds the resource again.
    let args = [&["deploy", "plan"][..], &config, &["-o", "json"]].concat();
    let o = run(trellis(&cfg, &args, &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let accepted: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    let next = accepted["commandId"]
        .as_str()
        .expect("commandId")
        .to_string();
    assert!(accepted["status"].is_string(), "{accepted}");
    let done = api.wait_done(&next, CLI_LIMIT).await;
    assert_eq!(
        (
            done["result"]["add"].as_i64(),
            done["result"]["destroy"].as_i64()
        ),
        (Some(1), Some(0)),
        "{done}"
    );

    // Plan and apply in one step; a destroy plan of it, shown, then applied by id.
    let args = [&["deploy", "apply"][..], &config, &["--follow"]].concat();
    let o = run(trellis(&cfg, &args, &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let one_step = first_command_id(&o);
    let o = run(trellis(
        &cfg,
        &[
            "deploy",
            "plan",
            "--destroy",
            "--from",
            &one_step,
            "--follow",
        ],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let preview = first_command_id(&o);
    let out = text(&o.stdout);
    assert!(
        out.contains("Destroy plan: applying it destroys every resource listed.\nPlan: 0 to add, 0 to change, 1 to destroy.")
            && out.contains("Destroy (1):\n  - null_resource.thing")
            && out.contains(&format!("Destroy them: trellis deploy apply --plan {preview}")),
        "{}",
        explain(&o)
    );
    let o = run(trellis(
        &cfg,
        &["deploy", "apply", "--plan", &preview, "--follow"],
        &env,
    ))
    .await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert!(
        text(&o.stdout).contains("0 added, 0 changed, 1 destroyed"),
        "{}",
        explain(&o)
    );

    // Apply again, then destroy from the flags with --yes (and the old --follow), as JSON:
    // one document with the plan and its apply.
    let args = [&["deploy", "apply"][..], &config, &["--follow"]].concat();
    let o = run(trellis(&cfg, &args, &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let args = [
        &["deploy", "destroy"][..],
        &config,
        &["--yes", "--follow", "-o", "json"],
    ]
    .concat();
    let o = run(trellis(&cfg, &args, &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let both: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(both["plan"]["type"], "terraform_plan", "{both}");
    assert_eq!(both["plan"]["result"]["mode"], "destroy", "{both}");
    assert_eq!(both["plan"]["result"]["destroy"], 1, "{both}");
    assert_eq!(both["apply"]["status"], "succeeded", "{both}");
    assert_eq!(
        both["apply"]["params"]["plan_command_id"],
        both["plan"]["id"]
    );
    assert!(
        text(&o.stderr).contains("Destroy (1):") && text(&o.stderr).contains("1 destroyed"),
        "{}",
        explain(&o)
    );
    // Nothing left: a destroy now has nothing to apply (exit 0, apply null).
    let o = run(trellis(&cfg, &args, &env)).await;
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let none: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert!(none["apply"].is_null(), "{none}");
    assert!(
        text(&o.stderr).contains("No objects need to be destroyed"),
        "{}",
        explain(&o)
    );
    // The one-step terraform_destroy stays for the API: the CLI never made one.
    assert_eq!(count_of(&api, &agent, "terraform_destroy").await, 0);
}

/// How many commands of type `ty` the agent has.
async fn count_of(api: &Api, agent: &str, ty: &str) -> usize {
    api.get(&format!(
        "/api/commands?agentId={agent}&type={ty}&limit=200"
    ))
    .await["items"]
        .as_array()
        .map_or(0, Vec::len)
}

/// The agent's newest command of type `ty`, read in full.
async fn newest(api: &Api, agent: &str, ty: &str) -> Value {
    let list = api
        .get(&format!("/api/commands?agentId={agent}&type={ty}&limit=1"))
        .await;
    let id = list["items"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no {ty}: {list}"))
        .to_string();
    api.get(&format!("/api/commands/{id}")).await
}

/// Whether any `terraform_apply` of the agent applies plan `plan`.
async fn applies_of(api: &Api, agent: &str, plan: &str) -> bool {
    api.get(&format!(
        "/api/commands?agentId={agent}&type=terraform_apply&limit=200"
    ))
    .await["items"]
        .as_array()
        .is_some_and(|l| l.iter().any(|c| c["params"]["plan_command_id"] == plan))
}
