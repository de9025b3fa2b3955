//! `terraform_apply` on the agent, with the real Terraform 1.0.3 and the hashicorp/null
//! 2.1.2 provider (installed by `scripts/install-terraform.sh`, run from here when
//! `.tools/terraform.env` is missing), against template repositories made with git in a
//! temporary directory from `tests/fixtures/terraform`.
//!
//! The executor is driven directly: `ExecContext::new` with an mpsc channel whose events
//! the test records with their arrival time.
//!
//! `TENDRIL_TERRAFORM_BIN` / `TENDRIL_TERRAFORM_PLUGIN_DIR` in the environment override
//! the installed tools. Without Terraform these tests fail (they never skip).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tendril::exec::ExecContext;
use tendril::terraform::{TerraformExecutor, TerraformSettings};
use tokio::sync::mpsc;
use trellis_protocol::{
    CancelReason, CommandError, EventBody, LogStream, StageState, TemplateSource,
    TerraformApplyParams, TerraformApplyResult,
};
use uuid::Uuid;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Terraform and the plugin dir: from the environment, else from `.tools/terraform.env`
/// (running the install script first when it is missing).
fn terraform_tools() -> (PathBuf, PathBuf) {
    static TOOLS: Mutex<Option<(PathBuf, PathBuf)>> = Mutex::new(None);
    let mut tools = TOOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tools.as_ref() {
        return t.clone();
    }
    let from_env = (
        std::env::var_os("TENDRIL_TERRAFORM_BIN"),
        std::env::var_os("TENDRIL_TERRAFORM_PLUGIN_DIR"),
    );
    let found = if let (Some(bin), Some(plugins)) = from_env {
        (PathBuf::from(bin), PathBuf::from(plugins))
    } else {
        let root = repo_root();
        let env_file = root.join(".tools/terraform.env");
        if !env_file.exists() {
            let status = std::process::Command::new("bash")
                .arg(root.join("scripts/install-terraform.sh"))
                .stdin(std::process::Stdio::null())
                .status()
                .expect("cannot run scripts/install-terraform.sh");
            assert!(
                status.success(),
                "scripts/install-terraform.sh failed ({status}): Terraform 1.0.3 is required for these tests"
            );
        }
        let text = std::fs::read_to_string(&env_file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", env_file.display()));
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{key} missing from {}", env_file.display()))
        };
        (
            get("TENDRIL_TERRAFORM_BIN"),
            get("TENDRIL_TERRAFORM_PLUGIN_DIR"),
        )
    };
    assert!(
        found.0.is_file(),
        "terraform binary {} not found: run scripts/install-terraform.sh",
        found.0.display()
    );
    *tools = Some(found.clone());
    found
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("trellis-tf-{tag}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Trellis Test",
            "-c",
            "user.email=test@trellis.invalid",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixtures") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture");
        }
    }
}

/// A template repository: the fixtures, with `basic/version.tf` saying "1" at tag
/// `v1.0.0` (commit `v1`) and "2" on `main` (commit `v2`).
struct TemplateRepo {
    _dir: TempDir,
    path: PathBuf,
    v1: String,
    v2: String,
}

fn template_repo() -> TemplateRepo {
    let dir = TempDir::new("repo");
    let path = dir.0.join("templates");
    copy_dir(&repo_root().join("tests/fixtures/terraform"), &path);
    let version_tf = |v: &str| format!("output \"template_version\" {{\n  value = \"{v}\"\n}}\n");
    std::fs::write(path.join("basic/version.tf"), version_tf("1")).expect("write");
    git(&path, &["init", "--quiet", "-b", "main"]);
    git(&path, &["add", "."]);
    git(&path, &["commit", "--quiet", "-m", "templates v1"]);
    git(&path, &["tag", "-a", "v1.0.0", "-m", "v1.0.0"]);
    let v1 = git(&path, &["rev-parse", "HEAD"]);
    std::fs::write(path.join("basic/version.tf"), version_tf("2")).expect("write");
    git(&path, &["commit", "--quiet", "-am", "templates v2"]);
    let v2 = git(&path, &["rev-parse", "HEAD"]);
    TemplateRepo {
        _dir: dir,
        path,
        v1,
        v2,
    }
}

fn params(repo: &TemplateRepo, version: &str, path: &str, vars: Value) -> TerraformApplyParams {
    TerraformApplyParams {
        template_source: TemplateSource {
            repo: repo.path.display().to_string(),
            version: version.into(),
            path: Some(path.into()),
        },
        terraform_vars: serde_json::from_value(vars).expect("vars object"),
        meta: Some(json!({"triggered_by": "test"})),
        sensitive_vars: vec![],
        workspace_key: None,
    }
}

struct Agent {
    work: TempDir,
    /// Tests adjust these before the first apply; the executor is made from them then.
    settings: TerraformSettings,
    executor: OnceLock<TerraformExecutor>,
}

impl Agent {
    fn new() -> Self {
        let (binary, plugin_dir) = terraform_tools();
        Self {
            work: TempDir::new("work"),
            settings: TerraformSettings {
                binary,
                plugin_dir: Some(plugin_dir),
                sigint_grace: Duration::from_secs(3),
                ..TerraformSettings::default()
            },
            executor: OnceLock::new(),
        }
    }

    /// One executor for all applies of this agent, so they share the workspace locks.
    fn executor(&self) -> TerraformExecutor {
        self.executor
            .get_or_init(|| TerraformExecutor::new(self.settings.clone(), &self.work.0))
            .clone()
    }

    /// Runs one apply; `on_event` sees each event as it arrives (and may cancel).
    async fn apply_with(
        &self,
        p: TerraformApplyParams,
        mut on_event: impl FnMut(&Seen, &ExecContext),
    ) -> Run {
        let (tx, mut rx) = mpsc::channel(1024);
        let id = Uuid::new_v4();
        let ctx = ExecContext::new(id, id, 1, tx);
        let task_ctx = ctx.clone();
        let executor = self.executor();
        let started = Instant::now();
        let mut task = tokio::spawn(async move { executor.apply(&task_ctx, p).await });
        let mut events = Vec::new();
        let result = loop {
            tokio::select! {
                biased;
                Some(r) = rx.recv() => {
                    let seen = Seen { at: Instant::now(), body: r.body };
                    on_event(&seen, &ctx);
                    events.push(seen);
                }
                res = &mut task => break res.expect("apply task panicked"),
            }
        };
        while let Ok(r) = rx.try_recv() {
            events.push(Seen {
                at: Instant::now(),
                body: r.body,
            });
        }
        Run {
            id,
            started,
            finished: Instant::now(),
            result,
            events,
        }
    }

    async fn apply(&self, p: TerraformApplyParams) -> Run {
        self.apply_with(p, |_, _| {}).await
    }
}

struct Seen {
    at: Instant,
    body: EventBody,
}

struct Run {
    id: Uuid,
    started: Instant,
    finished: Instant,
    result: Result<TerraformApplyResult, CommandError>,
    events: Vec<Seen>,
}

impl Run {
    fn logs(&self, stream: Option<LogStream>) -> String {
        self.events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Log { stream: s, data } if stream.is_none_or(|x| x == *s) => {
                    Some(data.as_str())
                }
                _ => None,
            })
            .collect()
    }

    fn stages(&self) -> Vec<(String, StageState)> {
        self.events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Stage { stage, state, .. } => Some((stage.clone(), *state)),
                _ => None,
            })
            .collect()
    }

    fn stage_time(&self, stage: &str, state: StageState) -> Instant {
        self.events
            .iter()
            .find_map(|e| match &e.body {
                EventBody::Stage {
                    stage: s,
                    state: st,
                    ..
                } if s == stage && *st == state => Some(e.at),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no {stage} {state:?} event"))
    }

    fn ok(&self) -> &TerraformApplyResult {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("apply failed: {e:?}\nlogs:\n{}", self.logs(None)),
        }
    }

    fn err(&self) -> &CommandError {
        match &self.result {
            Ok(r) => panic!("apply succeeded: {r:?}\nlogs:\n{}", self.logs(None)),
            Err(e) => e,
        }
    }
}

fn all_stages_completed() -> Vec<(String, StageState)> {
    ["fetch_template", "init", "apply", "outputs"]
        .iter()
        .flat_map(|s| {
            [
                (s.to_string(), StageState::Running),
                (s.to_string(), StageState::Completed),
            ]
        })
        .collect()
}

const PASSWORD: &str = "hunter2-very-secret";
const EXTRA: &str = "custom-sensitive-value";

#[tokio::test]
async fn applies_variables_returns_outputs_and_never_leaks_sensitive_values() {
    let repo = template_repo();
    let agent = Agent::new();
    let mut p = params(
        &repo,
        "v1.0.0",
        "basic",
        json!({"name": "world", "count_n": 21, "db_password": PASSWORD, "extra": EXTRA}),
    );
    p.sensitive_vars = vec!["extra".into()];
    let run = agent.apply(p).await;
    let result = run.ok();

    assert_eq!(result.resolved_commit.as_deref(), Some(repo.v1.as_str()));
    let o = &result.outputs;
    assert_eq!(o["greeting"]["value"], json!("hello world"), "{o}");
    assert_eq!(o["doubled"]["value"], json!(42), "{o}");
    assert_eq!(o["template_version"]["value"], json!("1"), "{o}");
    assert_eq!(o["secret_out"]["sensitive"], json!(true), "{o}");
    assert_eq!(o["secret_out"]["value"], Value::Null, "{o}");
    assert_eq!(o["leak"]["value"], json!("leak-***"), "{o}");
    assert_eq!(run.stages(), all_stages_completed());

    let stdout = run.logs(Some(LogStream::Stdout));
    let stderr = run.logs(Some(LogStream::Stderr));
    let system = run.logs(Some(LogStream::System));
    assert!(stdout.contains("hello world"), "{stdout}");
    assert!(stdout.contains("pw=***"), "{stdout}");
    assert!(stdout.contains("Apply complete!"), "{stdout}");
    assert!(
        stdout.contains("extra=***") || stderr.contains("extra=***"),
        "{stdout}\n{stderr}"
    );
    assert!(system.contains("$ terraform init"), "{system}");
    assert!(
        system.contains("$ terraform apply -auto-approve"),
        "{system}"
    );

    // No event and no result carries a sensitive value in any form.
    for secret in [PASSWORD, EXTRA, "s-world"] {
        for e in &run.events {
            let text = serde_json::to_string(&e.body).expect("event json");
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        let text = serde_json::to_string(result).expect("result json");
        assert!(!text.contains(secret), "{secret} leaked in result {text}");
    }
    // The variables file with the clear values is not left in the workspace.
    let ws = agent.work.0.join("terraform").join(run.id.to_string());
    assert!(ws.is_dir());
    assert!(!ws.join("src/basic/terraform.tfvars.json").exists());
}

#[tokio::test]
async fn fetches_exactly_the_requested_version() {
    let repo = template_repo();
    let agent = Agent::new();
    let vars = json!({"name": "v", "db_password": PASSWORD});
    for (version, want, commit) in [
        ("main".to_string(), "2", &repo.v2),
        (repo.v1[..10].to_string(), "1", &repo.v1),
        (repo.v2.clone(), "2", &repo.v2),
    ] {
        let run = agent
            .apply(params(&repo, &version, "basic", vars.clone()))
            .await;
        let r = run.ok();
        assert_eq!(
            r.outputs["template_version"]["value"],
            json!(want),
            "{version}"
        );
        assert_eq!(r.resolved_commit.as_ref(), Some(commit), "{version}");
    }
}

#[tokio::test]
async fn logs_stream_while_terraform_runs() {
    let repo = template_repo();
    let agent = Agent::new();
    let run = agent
        .apply(params(&repo, "v1.0.0", "slow", json!({"ticks": 6})))
        .await;
    run.ok();
    let ticks: Vec<(Instant, &str)> = run
        .events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Log {
                stream: LogStream::Stdout,
                data,
            } if data.contains("tick ") => Some((e.at, data.as_str())),
            _ => None,
        })
        .collect();
    let all: String = ticks.iter().map(|t| t.1).collect();
    for i in 1..=6 {
        assert!(
            all.contains(&format!("tick {i}")),
            "tick {i} missing: {all}"
        );
    }
    // The ticks come in several chunks spread over the ~3 s the provisioner runs, not all
    // at the end.
    assert!(
        ticks.len() >= 3,
        "ticks arrived in {} chunk(s)",
        ticks.len()
    );
    let spread = ticks.last().map(|t| t.0).unwrap_or(run.started) - ticks[0].0;
    assert!(
        spread >= Duration::from_millis(1500),
        "ticks arrived within {spread:?}"
    );
    let apply_done = run.stage_time("apply", StageState::Completed);
    assert!(
        apply_done - ticks[0].0 >= Duration::from_millis(1500),
        "first tick arrived only {:?} before apply completed",
        apply_done - ticks[0].0
    );
    // Every chunk is within the batching size.
    for e in &run.events {
        if let EventBody::Log { data, .. } = &e.body {
            assert!(data.len() <= 10 * 1024, "chunk of {} bytes", data.len());
        }
    }
}

#[tokio::test]
async fn failing_apply_reports_terraforms_error() {
    let repo = template_repo();
    let agent = Agent::new();
    let run = agent
        .apply(params(&repo, "v1.0.0", "fail", json!({})))
        .await;
    let e = run.err();
    assert_eq!(e.code, "terraform_failed", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("apply"), "{e:?}");
    assert!(e.message.contains("Error:"), "{e:?}");
    assert!(e.message.contains("exit status 3"), "{e:?}");
    let logs = run.logs(None);
    assert!(logs.contains("boom-marker-7731"), "{logs}");
    assert!(logs.contains("about to fail"), "{logs}");
    let stages = run.stages();
    assert_eq!(
        stages.last(),
        Some(&("apply".to_string(), StageState::Failed)),
        "{stages:?}"
    );
}

fn processes_matching(marker: &str, work_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        // A zombie has an empty cmdline and is gone for our purposes.
        if cmdline.contains(marker) || (!cmdline.is_empty() && cwd.starts_with(work_dir)) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

#[tokio::test]
async fn cancel_stops_terraform_and_everything_it_started() {
    let repo = template_repo();
    let agent = Agent::new();
    let marker = format!("{}.{}", 600 + rand_u16() % 300, rand_u16());
    let mut cancelled_at = None;
    let run = agent
        .apply_with(
            params(&repo, "v1.0.0", "cancel", json!({"sleep_for": marker})),
            |seen, ctx| {
                if let EventBody::Log { data, .. } = &seen.body {
                    if data.contains("(local-exec): started\n") && cancelled_at.is_none() {
                        cancelled_at = Some(Instant::now());
                        ctx.request_cancel(CancelReason::Cancelled);
                    }
                }
            },
        )
        .await;
    let cancelled_at = cancelled_at.expect("the provisioner never started");
    let e = run.err();
    assert_eq!(e.code, "cancelled", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("apply"), "{e:?}");
    assert!(
        run.finished - cancelled_at < Duration::from_secs(8),
        "stopping took {:?}",
        run.finished - cancelled_at
    );
    assert!(
        run.logs(Some(LogStream::System)).contains("SIGINT"),
        "{}",
        run.logs(None)
    );
    assert!(!run.logs(None).contains("(local-exec): finished"));
    // Terraform, its provider and the provisioner's shell and sleep are all gone.
    let left = processes_matching(&marker, &agent.work.0);
    assert!(left.is_empty(), "still running: {left:?}");
}

/// Terraform stops its provisioners itself on SIGINT; a `terraform` that ignores SIGINT
/// (a stand-in script here) is killed with its whole process group after the grace period.
#[tokio::test]
async fn cancel_kills_after_the_grace_period_when_sigint_is_ignored() {
    let repo = template_repo();
    let mut agent = Agent::new();
    let marker = format!("{}.{}", 600 + rand_u16() % 300, rand_u16());
    agent.settings.binary = fake_terraform(
        &agent,
        &format!("trap '' INT; echo started; sleep {marker}; echo finished"),
    );
    agent.settings.sigint_grace = Duration::from_millis(1500);
    let mut cancelled_at = None;
    let run = agent
        .apply_with(params(&repo, "v1.0.0", "basic", json!({})), |seen, ctx| {
            if let EventBody::Log { data, .. } = &seen.body {
                if data.contains("started\n") && cancelled_at.is_none() {
                    cancelled_at = Some(Instant::now());
                    ctx.request_cancel(CancelReason::TimedOut);
                }
            }
        })
        .await;
    let cancelled_at = cancelled_at.expect("the stand-in never started");
    let e = run.err();
    assert_eq!(e.code, "cancelled", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("apply"), "{e:?}");
    assert!(e.message.contains("killed"), "{e:?}");
    let took = run.finished - cancelled_at;
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "stopping took {took:?}"
    );
    assert!(run
        .logs(Some(LogStream::System))
        .contains("sending SIGKILL"));
    assert!(!run.logs(Some(LogStream::Stdout)).contains("finished"));
    let left = processes_matching(&marker, &agent.work.0);
    assert!(left.is_empty(), "still running: {left:?}");
}

/// A stand-in `terraform`: `apply` runs `apply_script`, `output` prints `{}`, the rest
/// only say what they are.
fn fake_terraform(agent: &Agent, apply_script: &str) -> PathBuf {
    let path = agent.work.0.join("fake-terraform");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  apply) {apply_script} ;;\n  output) echo '{{}}' ;;\n  \
             *) echo \"fake terraform $1\" ;;\nesac\n"
        ),
    )
    .expect("write fake terraform");
    let status = std::process::Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()
        .expect("chmod");
    assert!(status.success());
    path
}

#[tokio::test]
async fn unknown_version_or_repository_is_a_clear_error() {
    let repo = template_repo();
    let agent = Agent::new();
    let run = agent
        .apply(params(&repo, "v9.9.9", "basic", json!({})))
        .await;
    let e = run.err();
    assert_eq!(e.code, "template_version_not_found", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("fetch_template"));
    assert!(e.message.contains("\"v9.9.9\""), "{e:?}");
    assert_eq!(
        run.stages(),
        [
            ("fetch_template".to_string(), StageState::Running),
            ("fetch_template".to_string(), StageState::Failed)
        ]
    );

    let mut p = params(&repo, "v1.0.0", "basic", json!({}));
    p.template_source.repo = "/nonexistent/trellis-templates.git".into();
    let run = agent.apply(p).await;
    let e = run.err();
    assert_eq!(e.code, "template_fetch_failed", "{e:?}");
    assert!(
        e.message.contains("/nonexistent/trellis-templates.git"),
        "{e:?}"
    );
    assert!(e.message.contains("does not exist"), "{e:?}");

    let run = agent
        .apply(params(&repo, "v1.0.0", "no/such/dir", json!({})))
        .await;
    assert_eq!(run.err().code, "template_path_not_found");

    // Params that fail validation stop before anything runs (no event at all).
    let run = agent
        .apply(params(
            &repo,
            "--upload-pack=touch /tmp/x",
            "basic",
            json!({}),
        ))
        .await;
    assert_eq!(run.err().code, "invalid_params");
    assert!(run.events.is_empty());
}

#[tokio::test]
async fn missing_terraform_binary_is_a_clear_error() {
    let repo = template_repo();
    let mut agent = Agent::new();
    agent.settings.binary = "/nonexistent/bin/terraform".into();
    let run = agent
        .apply(params(&repo, "v1.0.0", "basic", json!({})))
        .await;
    let e = run.err();
    assert_eq!(e.code, "terraform_unavailable", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("init"));
    assert!(e.message.contains("/nonexistent/bin/terraform"), "{e:?}");
}

#[tokio::test]
async fn workspaces_past_their_retention_are_removed() {
    let repo = template_repo();
    let agent = Agent::new();
    let root = agent.work.0.join("terraform");
    let old = root.join(Uuid::new_v4().to_string());
    let recent = root.join(Uuid::new_v4().to_string());
    let foreign = root.join("not-a-workspace");
    for d in [&old, &recent, &foreign] {
        std::fs::create_dir_all(d.join("src")).expect("mkdir");
    }
    for d in [&old, &foreign] {
        let status = std::process::Command::new("touch")
            .args(["-d", "8 days ago"])
            .arg(d)
            .status()
            .expect("touch");
        assert!(status.success());
    }
    // Any apply cleans up first, even one that then fails.
    let run = agent
        .apply(params(&repo, "v9.9.9", "basic", json!({})))
        .await;
    assert_eq!(run.err().code, "template_version_not_found");
    assert!(!old.exists(), "expired workspace kept");
    assert!(recent.exists(), "recent workspace removed");
    assert!(
        foreign.exists(),
        "a directory the agent did not make was removed"
    );
    assert!(run
        .logs(Some(LogStream::System))
        .contains("removed 1 terraform workspace"));
}

#[tokio::test]
async fn applies_with_the_same_workspace_key_run_one_at_a_time() {
    let repo = template_repo();
    let agent = Agent::new();
    let p = params(&repo, "v1.0.0", "slow", json!({"ticks": 3}));
    let (a, b) = tokio::join!(agent.apply(p.clone()), agent.apply(p));
    a.ok();
    b.ok();
    // From its first stage to its end, one run never overlaps the other.
    let span = |r: &Run| {
        (
            r.stage_time("fetch_template", StageState::Running),
            r.finished,
        )
    };
    let (a_span, b_span) = (span(&a), span(&b));
    let (first, second) = if a_span.0 <= b_span.0 {
        (a_span, b_span)
    } else {
        (b_span, a_span)
    };
    assert!(
        second.0 >= first.1 - Duration::from_millis(50),
        "runs overlapped: second started {:?} before the first ended",
        first.1 - second.0
    );
    let waited = if a_span.0 <= b_span.0 { &b } else { &a };
    assert!(
        waited
            .logs(Some(LogStream::System))
            .contains("waiting for another terraform_apply"),
        "{}",
        waited.logs(None)
    );
}

#[tokio::test]
async fn runaway_output_is_capped_and_drained() {
    let repo = template_repo();
    let mut agent = Agent::new();
    agent.settings.log_cap_bytes = 64 * 1024;
    let run = agent
        .apply(params(&repo, "v1.0.0", "spew", json!({"bytes": 3_000_000})))
        .await;
    // The process kept running to its end although most output was dropped.
    run.ok();
    let shipped: usize = run
        .events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Log {
                stream: LogStream::Stdout | LogStream::Stderr,
                data,
            } => Some(data.len()),
            _ => None,
        })
        .sum();
    assert!(shipped <= 64 * 1024, "shipped {shipped} bytes");
    let system = run.logs(Some(LogStream::System));
    assert!(system.contains("[output truncated"), "{system}");
    assert!(system.contains("bytes ("), "{system}");
}

/// Throughput of the log path, measured two ways. Run with
/// `cargo test -p trellis-tests --release --test terraform_apply throughput -- --ignored --nocapture`.
///
/// With real Terraform the provisioner's output passes through Terraform's own UI first,
/// which is the bottleneck (about 1 MB/s on a small VM, with or without the agent).
#[tokio::test]
#[ignore = "measurement"]
async fn log_throughput_real_terraform() {
    let repo = template_repo();
    let mut agent = Agent::new();
    agent.settings.log_cap_bytes = 1 << 40;
    let bytes = 10_000_000u64;
    let run = agent
        .apply(params(&repo, "v1.0.0", "spew", json!({"bytes": bytes})))
        .await;
    run.ok();
    report_throughput("real terraform local-exec", &run, bytes);
}

/// The agent's own path (pipes, decoding, redaction, batching, channel) with a producer
/// that is not the bottleneck: a stand-in `terraform` whose `apply` prints 50 MB at once.
#[tokio::test]
#[ignore = "measurement"]
async fn log_throughput_agent_pipeline() {
    let repo = template_repo();
    let mut agent = Agent::new();
    let bytes = 50_000_000u64;
    agent.settings.binary = fake_terraform(
        &agent,
        &format!("head -c {bytes} /dev/zero | tr '\\000' a | fold -w 99"),
    );
    agent.settings.log_cap_bytes = 1 << 40;
    // A sensitive value, so redaction is part of the measured path.
    let run = agent
        .apply(params(
            &repo,
            "v1.0.0",
            "spew",
            json!({"bytes": bytes, "api_token": "not-in-the-output"}),
        ))
        .await;
    run.ok();
    report_throughput("agent pipeline (fast producer)", &run, bytes);
}

fn report_throughput(what: &str, run: &Run, at_least: u64) {
    let (mut shipped, mut chunks) = (0usize, 0usize);
    for e in &run.events {
        if let EventBody::Log {
            stream: LogStream::Stdout,
            data,
        } = &e.body
        {
            shipped += data.len();
            chunks += 1;
        }
    }
    let apply = run.stage_time("apply", StageState::Completed)
        - run.stage_time("apply", StageState::Running);
    let mb = shipped as f64 / 1e6;
    println!(
        "log throughput, {what}: {mb:.1} MB in {chunks} chunks during apply in {:.2}s = {:.1} MB/s",
        apply.as_secs_f64(),
        mb / apply.as_secs_f64()
    );
    assert!(shipped as u64 >= at_least, "shipped only {shipped} bytes");
}

fn rand_u16() -> u16 {
    (Uuid::new_v4().as_u128() & 0xffff) as u16
}
