//! Terraform for the tests: the real Terraform 1.0.3 and the hashicorp/null 2.1.2
//! provider (installed into `.tools/` by `scripts/install-terraform.sh`, run from here
//! when `.tools/terraform.env` is missing), template repositories made with git from
//! `tests/fixtures/terraform`, and the agent's `terraform_apply` executor driven
//! directly with its events recorded.
//!
//! `TENDRIL_TERRAFORM_BIN` / `TENDRIL_TERRAFORM_PLUGIN_DIR` in the environment override
//! the installed tools for the executor tests. Without Terraform the tests fail (they
//! never skip).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tendril::exec::ExecContext;
use tendril::terraform::{TerraformExecutor, TerraformSettings};
use trellis_protocol::{
    CommandError, LogStream, StageState, TemplateSource, TerraformApplyParams, TerraformApplyResult,
};
use uuid::Uuid;

use crate::git::GitRepo;
use crate::harness::repo_root;
use crate::recorder::{self, Recorder, Seen};
use crate::tempdir::TempDir;

/// `.tools/terraform.env` as `(key, value)` pairs — `TENDRIL_TERRAFORM_BIN` and
/// `TENDRIL_TERRAFORM_PLUGIN_DIR`, the environment for a tendril that runs Terraform.
/// Runs `scripts/install-terraform.sh` first when the file is missing.
pub fn terraform_env() -> Vec<(String, String)> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let root = repo_root();
    let file = root.join(".tools/terraform.env");
    {
        let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        if !file.exists() {
            let status = Command::new("bash")
                .arg(root.join("scripts/install-terraform.sh"))
                .stdin(Stdio::null())
                .status()
                .expect("run scripts/install-terraform.sh");
            assert!(
                status.success(),
                "scripts/install-terraform.sh failed ({status}): Terraform 1.0.3 is required"
            );
        }
    }
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Terraform and the plugin dir: from the environment, else from [`terraform_env`].
pub fn terraform_tools() -> (PathBuf, PathBuf) {
    static TOOLS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let from_env = (
                std::env::var_os("TENDRIL_TERRAFORM_BIN"),
                std::env::var_os("TENDRIL_TERRAFORM_PLUGIN_DIR"),
            );
            let found = if let (Some(bin), Some(plugins)) = from_env {
                (PathBuf::from(bin), PathBuf::from(plugins))
            } else {
                let env = terraform_env();
                let get = |key: &str| {
                    env.iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| PathBuf::from(v))
                        .unwrap_or_else(|| panic!("{key} missing from .tools/terraform.env"))
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
            found
        })
        .clone()
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
/// `v1.0.0` (commit `v1`) and "2" on `main` (commit `v2`). Removed on drop.
pub struct TemplateRepo {
    _dir: TempDir,
    pub path: PathBuf,
    pub v1: String,
    pub v2: String,
}

pub fn template_repo() -> TemplateRepo {
    let dir = TempDir::new("tf-repo");
    let path = dir.join("templates");
    copy_dir(&repo_root().join("tests/fixtures/terraform"), &path);
    let version_tf = |v: &str| format!("output \"template_version\" {{\n  value = \"{v}\"\n}}\n");
    let repo = GitRepo::init(&path);
    repo.write("basic/version.tf", &version_tf("1"));
    let v1 = repo.commit_all("templates v1");
    repo.tag_annotated("v1.0.0");
    repo.write("basic/version.tf", &version_tf("2"));
    let v2 = repo.commit_all("templates v2");
    TemplateRepo {
        _dir: dir,
        path,
        v1,
        v2,
    }
}

/// `terraform_apply` params for `path` in `repo` at `version`.
pub fn params(repo: &TemplateRepo, version: &str, path: &str, vars: Value) -> TerraformApplyParams {
    TerraformApplyParams {
        template_source: TemplateSource {
            repo: repo.path.display().to_string(),
            version: version.into(),
            path: Some(path.into()),
        },
        terraform_vars: serde_json::from_value(vars).expect("vars object"),
        meta: Some(json!({"triggered_by": "test"})),
        sensitive_vars: vec![],
        plan_command_id: None,
        plan_sha256: None,
        workspace_key: None,
        destroy: false,
    }
}

/// The `terraform_apply` executor of one agent, with a work dir of its own.
pub struct TerraformAgent {
    pub work: TempDir,
    /// Tests adjust these before the first apply; the executor is made from them then.
    pub settings: TerraformSettings,
    executor: OnceLock<TerraformExecutor>,
}

impl Default for TerraformAgent {
    fn default() -> Self {
        Self::new()
    }
}

impl TerraformAgent {
    pub fn new() -> Self {
        let (binary, plugin_dir) = terraform_tools();
        Self {
            work: TempDir::new("tf-work"),
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
            .get_or_init(|| TerraformExecutor::new(self.settings.clone(), &self.work))
            .clone()
    }

    /// Runs one apply; `on_event` sees each event as it arrives (and may cancel).
    pub async fn apply_with(
        &self,
        p: TerraformApplyParams,
        on_event: impl FnMut(&Seen, &ExecContext),
    ) -> Run {
        let mut rec = Recorder::new(None);
        let id = rec.ctx.command_id;
        let executor = self.executor();
        let started = Instant::now();
        let result = rec
            .run_with(|ctx| async move { executor.apply(&ctx, p).await }, on_event)
            .await;
        Run {
            id,
            started,
            finished: Instant::now(),
            result,
            events: rec.into_events(),
        }
    }

    pub async fn apply(&self, p: TerraformApplyParams) -> Run {
        self.apply_with(p, |_, _| {}).await
    }

    /// A stand-in `terraform` in the work dir: `apply` runs `apply_script`, `output`
    /// prints `{}`, the rest only say what they are.
    pub fn fake_terraform(&self, apply_script: &str) -> PathBuf {
        let path = self.work.join("fake-terraform");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\ncase \"$1\" in\n  apply) {apply_script} ;;\n  output) echo '{{}}' ;;\n  \
                 *) echo \"fake terraform $1\" ;;\nesac\n"
            ),
        )
        .expect("write fake terraform");
        let status = Command::new("chmod")
            .arg("+x")
            .arg(&path)
            .status()
            .expect("chmod");
        assert!(status.success());
        path
    }
}

/// One finished apply.
pub struct Run {
    pub id: Uuid,
    pub started: Instant,
    pub finished: Instant,
    pub result: Result<TerraformApplyResult, CommandError>,
    pub events: Vec<Seen>,
}

impl Run {
    /// Log text of one stream, or of all.
    pub fn logs(&self, stream: Option<LogStream>) -> String {
        recorder::logs(&self.events, stream)
    }

    pub fn stages(&self) -> Vec<(String, StageState)> {
        recorder::stages(&self.events)
    }

    pub fn stage_time(&self, stage: &str, state: StageState) -> Instant {
        recorder::stage_time(&self.events, stage, state)
    }

    pub fn ok(&self) -> &TerraformApplyResult {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("apply failed: {e:?}\nlogs:\n{}", self.logs(None)),
        }
    }

    pub fn err(&self) -> &CommandError {
        match &self.result {
            Ok(r) => panic!("apply succeeded: {r:?}\nlogs:\n{}", self.logs(None)),
            Err(e) => e,
        }
    }
}

/// Every stage of a successful apply, running then completed.
pub fn all_stages_completed() -> Vec<(String, StageState)> {
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

/// Live processes whose command line contains `marker` or whose working directory is
/// under `work_dir`.
pub fn processes_matching(marker: &str, work_dir: &Path) -> Vec<String> {
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

/// A `sleep` argument unlikely to match any other process: `6xx.yyyyy` seconds.
pub fn unique_sleep_marker() -> String {
    format!("{}.{}", 600 + rand_u16() % 300, rand_u16())
}

fn rand_u16() -> u16 {
    (Uuid::new_v4().as_u128() & 0xffff) as u16
}
