//! `terraform_apply` executor: fetch a Terraform template from git at an exact version
//! into a workspace of its own, write `terraform.tfvars.json`, run `terraform init`,
//! `terraform apply` and `terraform output -json`, and stream what they print.
//!
//! * Stages `fetch_template`, `init`, `apply`, `outputs`, each reported running, then
//!   completed or failed, with the overall percent.
//! * Output is streamed as it is written, in chunks of at most 500 ms / 10 KB, capped per
//!   command ([`logs`]). Values of sensitive variables never leave the agent: they are
//!   masked in every log chunk, error message and output ([`redact`]).
//! * Cancel sends SIGINT to terraform's process group and SIGKILL after a grace period
//!   ([`process`]).
//! * Applies with the same workspace key run one at a time; workspaces past their
//!   retention are removed at the start of each apply ([`workspace`]).
//!
//! Each command gets a fresh workspace (0700, under a 0700 `<work_dir>/terraform`), so
//! Terraform's local state lives and dies with it: templates that manage long-lived
//! resources configure a remote backend. Files holding secrets — the variables file, the
//! state and its backup, `init`'s backend settings — are removed as soon as `outputs`
//! is done (or the run stopped earlier); a workspace left by a killed agent is scrubbed
//! by the next apply.
//!
//! State: when the dispatch carries a state credential (`dispatch.terraform_state`, from
//! a server that keeps Terraform state), the executor writes
//! [`BACKEND_OVERRIDE`] next to the template — Terraform's `http` backend pointed at
//! `/api/terraform/state/<workspace>` of the server the agent dials — so the state
//! outlives the workspace and applies of one workspace are serialised by the server's
//! lock, with no backend block in the template. The credential itself is never written
//! to a file: Terraform reads it from `TF_HTTP_PASSWORD`. A template that configures its
//! own backend keeps it.
//!
//! A template repository URL with credentials is cloned with no
//! credential helper and its credentials removed from `.git/config` right after the
//! clone; it is shown without them in every log line.

pub mod git;
pub mod logs;
pub mod plan;
pub mod process;
pub mod redact;
pub mod settings;
pub mod workspace;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use trellis_protocol::{
    Command, CommandError, PlanMode, StageState, TerraformApplyParams, TerraformApplyResult,
    TerraformDestroyResult, TerraformPlanResult,
};

use crate::exec::ExecContext;
use logs::LogSink;
use process::{ProcOutput, ProcSpec};
use redact::Redactor;
pub use settings::{
    TerraformArgs, TerraformSettings, DEFAULT_LOG_CAP_BYTES, DEFAULT_SIGINT_GRACE,
    DEFAULT_WORKSPACE_RETENTION,
};
use workspace::Workspaces;

/// Runs `terraform_apply`: owns the Terraform settings, the directory its workspaces live
/// in, and which workspace keys and directories are in use. Clones share that state.
#[derive(Debug, Clone)]
pub struct TerraformExecutor {
    settings: Arc<TerraformSettings>,
    /// `<work_dir>/terraform`: one workspace per command below it.
    root: PathBuf,
    workspaces: Arc<Workspaces>,
    /// Where the server keeps Terraform state (`None`: local state in the workspace).
    state: Option<Arc<StateServer>>,
}

/// The server's Terraform state endpoint, as this agent reaches it: at the control plane
/// the agent is connected to when the command builds its backend (see
/// [`crate::exec::ConnectedServer`]), so with several server URLs a command dispatched
/// after a fail-over uses the replica that is up.
#[derive(Debug)]
struct StateServer {
    /// The extra CA the agent trusts for the server (`--server-ca-file`), handed to
    /// Terraform as `SSL_CERT_FILE`.
    ca_file: Option<PathBuf>,
}

/// The generated file that points Terraform at the server's state (an override file, so
/// it replaces nothing but the backend and needs no block in the template).
pub const BACKEND_OVERRIDE: &str = "zz_trellis_backend_override.tf";

/// The state endpoint base of the server at `server_url` (`ws(s)://…/api/agents/connect`
/// → `http(s)://…/api/terraform/state/`); `None` for a URL that is not ws(s).
pub fn state_base_url(server_url: &str) -> Option<String> {
    let mut url = reqwest::Url::parse(server_url.trim()).ok()?;
    let scheme = match url.scheme() {
        "ws" => "http",
        "wss" => "https",
        _ => return None,
    };
    url.set_scheme(scheme).ok()?;
    let path = url.path().trim_end_matches('/').to_string();
    let prefix = path.strip_suffix("/api/agents/connect").unwrap_or("");
    url.set_path(&format!("{prefix}/api/terraform/state/"));
    url.set_query(None);
    url.set_fragment(None);
    Some(url.to_string())
}

/// `s` percent-encoded as one URL path segment (everything but RFC 3986 unreserved).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What one apply uses to reach its state on the server.
struct Backend {
    address: String,
    username: String,
    password: crate::secret::Secret,
    ca_file: Option<PathBuf>,
}

impl Backend {
    /// The override file: addresses only. The user name (the command id) and the
    /// password come from the environment, so a saved plan, which records the backend
    /// settings, is applied with the applying command's own credential.
    fn override_tf(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        format!(
            "# Written by tendril: this apply's state is kept by the Trellis control plane.\n\
             terraform {{\n  backend \"http\" {{\n    address        = {a}\n    \
             lock_address   = {a}\n    unlock_address = {a}\n    lock_method    = \"LOCK\"\n    \
             unlock_method  = \"UNLOCK\"\n  }}\n}}\n",
            a = q(&self.address),
        )
    }

    fn env(&self, mut spec: ProcSpec) -> ProcSpec {
        spec = spec
            .env("TF_HTTP_USERNAME", &self.username)
            .env("TF_HTTP_PASSWORD", self.password.expose());
        if let Some(ca) = &self.ca_file {
            spec = spec.env("SSL_CERT_FILE", ca.display().to_string());
        }
        spec
    }
}

/// Whether a `.tf` file in `dir` declares a backend of its own (a line starting with
/// `backend "` or a `cloud` block), in which case Trellis does not impose its own.
async fn declares_backend(dir: &Path) -> bool {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return false;
    };
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".tf") || name == BACKEND_OVERRIDE {
            continue;
        }
        let Ok(text) = tokio::fs::read_to_string(e.path()).await else {
            continue;
        };
        let found = text.lines().any(|l| {
            let l = l.trim_start();
            l.strip_prefix("backend")
                .is_some_and(|r| r.trim_start().starts_with('"'))
                || l.strip_prefix("cloud")
                    .is_some_and(|r| r.trim_start().starts_with('{'))
        });
        if found {
            return true;
        }
    }
    false
}

impl TerraformExecutor {
    /// An executor keeping its workspaces under `<work_dir>/terraform`.
    /// Processes a previous (killed) tendril's runs left in the workspaces are killed.
    pub fn new(settings: TerraformSettings, work_dir: &Path) -> Self {
        let root = work_dir.join("terraform");
        process::kill_orphans(&root, &settings.binary);
        Self {
            settings: Arc::new(settings),
            root,
            workspaces: Default::default(),
            state: None,
        }
    }

    /// This executor keeping the state of applies whose dispatch carries a state
    /// credential on the server the agent is connected to (see [`state_base_url`]).
    pub fn with_state_backend(mut self, ca_file: Option<PathBuf>) -> Self {
        self.state = Some(Arc::new(StateServer { ca_file }));
        self
    }

    /// The `http` backend of a command whose dispatch carried a state credential, at the
    /// state endpoint of the control plane the agent is connected to now; `None` keeps the
    /// state local to the workspace.
    fn backend(&self, ctx: &ExecContext, workspace_key: &str) -> Option<Backend> {
        let server = self.state.as_ref()?;
        let password = ctx.terraform_state.as_ref()?;
        let base = state_base_url(&ctx.server.get()?)?;
        Some(Backend {
            address: format!("{base}{}", path_segment(workspace_key)),
            username: ctx.command_id.to_string(),
            password: password.clone(),
            ca_file: server.ca_file.clone(),
        })
    }

    pub fn settings(&self) -> &TerraformSettings {
        &self.settings
    }

    /// `terraform_apply`: plans and applies, or applies the saved plan of
    /// `p.plan_command_id`.
    pub async fn apply(
        &self,
        ctx: &ExecContext,
        p: TerraformApplyParams,
    ) -> Result<TerraformApplyResult, CommandError> {
        match execute(self, ctx, p, Op::Apply).await? {
            Outcome::Applied(r) => Ok(r),
            _ => Err(CommandError::new(
                "internal",
                "apply ended without its result",
            )),
        }
    }

    /// `terraform_plan`: saves a plan on this agent and summarises it.
    pub async fn plan(
        &self,
        ctx: &ExecContext,
        p: TerraformApplyParams,
    ) -> Result<TerraformPlanResult, CommandError> {
        match execute(self, ctx, p, Op::Plan).await? {
            Outcome::Planned(r) => Ok(r),
            _ => Err(CommandError::new(
                "internal",
                "plan ended without its result",
            )),
        }
    }

    /// `terraform_destroy`: destroys every resource of the configuration's state.
    pub async fn destroy(
        &self,
        ctx: &ExecContext,
        p: TerraformApplyParams,
    ) -> Result<TerraformDestroyResult, CommandError> {
        match execute(self, ctx, p, Op::Destroy).await? {
            Outcome::Destroyed(r) => Ok(r),
            _ => Err(CommandError::new(
                "internal",
                "destroy ended without its result",
            )),
        }
    }
}

/// What a Terraform command does after `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Apply,
    Plan,
    Destroy,
}

impl Op {
    /// The command type whose params it runs.
    fn command_type(self) -> &'static str {
        match self {
            Op::Apply => "terraform_apply",
            Op::Plan => "terraform_plan",
            Op::Destroy => "terraform_destroy",
        }
    }

    /// The stages it reports with the overall percent at the start of each (and 100 at
    /// the end).
    fn stages(self) -> &'static [(&'static str, f32)] {
        match self {
            Op::Apply => &[
                ("fetch_template", 0.0),
                ("init", 10.0),
                ("apply", 30.0),
                ("outputs", 90.0),
            ],
            Op::Plan => &[
                ("fetch_template", 0.0),
                ("init", 10.0),
                ("plan", 30.0),
                ("show", 90.0),
            ],
            Op::Destroy => &[("fetch_template", 0.0), ("init", 10.0), ("destroy", 30.0)],
        }
    }
}

enum Outcome {
    Applied(TerraformApplyResult),
    Planned(TerraformPlanResult),
    Destroyed(TerraformDestroyResult),
}

/// The percent range of `stage` (the stage names are unique to a command type, or at the
/// same place in each).
fn stage_percent(stage: &str) -> (f32, f32) {
    let list = [Op::Apply, Op::Plan, Op::Destroy]
        .into_iter()
        .map(Op::stages)
        .find(|l| l.iter().any(|(s, _)| *s == stage))
        .unwrap_or(Op::Apply.stages());
    let i = list.iter().position(|(s, _)| *s == stage).unwrap_or(0);
    let start = list[i].1;
    let end = list.get(i + 1).map_or(100.0, |s| s.1);
    (start, end)
}

async fn execute(
    exec: &TerraformExecutor,
    ctx: &ExecContext,
    p: TerraformApplyParams,
    op: Op,
) -> Result<Outcome, CommandError> {
    let req = Request::validate(&p, op)?;
    let settings = exec.settings();
    let mut redactor = Redactor::for_params(&p);
    for credential in git::url_credentials(&p.template_source.repo) {
        redactor.add(&credential);
    }
    if let Some(c) = &ctx.terraform_state {
        redactor.add(c.expose());
    }
    let redactor = Arc::new(redactor);
    let mut sink = LogSink::new(ctx, redactor.clone(), settings.log_cap_bytes);

    let result = run(exec, ctx, &mut sink, &p, &req, op).await;
    sink.finish().await;
    result.map_err(|mut e| {
        e.message = redactor.redact(&e.message).into_owned();
        e
    })
}

/// The params after the agent's own checks.
struct Request {
    repo: String,
    version: String,
    path: Option<String>,
    key: String,
}

impl Request {
    fn validate(p: &TerraformApplyParams, op: Op) -> Result<Self, CommandError> {
        // The protocol's checks first (the same the control plane ran).
        let json = serde_json::to_value(p)
            .map_err(|e| CommandError::new("invalid_params", format!("invalid params: {e}")))?;
        Command::parse(op.command_type(), &json)?;
        let invalid = |m: String| Err(CommandError::new("invalid_params", m));
        let s = &p.template_source;
        let repo = s.repo.trim().to_string();
        if repo.starts_with('-') || repo.chars().any(char::is_control) {
            return invalid(format!(
                "template_source.repo {repo:?} is not a git URL or path"
            ));
        }
        if let Some((transport, _)) = repo.split_once("::") {
            if !transport.contains('/') {
                return invalid(format!(
                    "template_source.repo: the git transport {transport:?} is not allowed; \
                     use a path, file://, https://, ssh:// or git:// URL"
                ));
            }
        }
        let version = s.version.trim().to_string();
        let ref_ok = version.len() <= 255
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-+".contains(&b))
            && !version.starts_with(['-', '/', '.'])
            && !version.ends_with(['/', '.'])
            && !version.contains("//")
            && !version.contains("..")
            && !version.ends_with(".lock");
        if !ref_ok {
            return invalid(format!(
                "template_source.version {version:?} is not a tag, branch or commit id"
            ));
        }
        let path = match s.path.as_deref().map(|p| p.trim().trim_matches('/')) {
            None | Some("") | Some(".") => None,
            Some(p) if p.contains('\0') || p.split('/').any(|c| c == "..") => {
                return invalid(
                    "template_source.path must be a relative path inside the repository".into(),
                )
            }
            Some(p) => Some(p.to_string()),
        };
        // The state workspace, which the control plane derives the same way.
        let key = p.state_workspace();
        Ok(Self {
            repo,
            version,
            path,
            key,
        })
    }
}

async fn run(
    exec: &TerraformExecutor,
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    p: &TerraformApplyParams,
    req: &Request,
    op: Op,
) -> Result<Outcome, CommandError> {
    let settings = exec.settings();
    let root = &exec.root;
    workspace::create_private_dir(root).await.map_err(|e| {
        CommandError::new(
            "workspace_error",
            format!("cannot create {}: {e}", root.display()),
        )
        .retryable()
    })?;
    let removed = exec
        .workspaces
        .remove_expired(root, settings.workspace_retention)
        .await;
    if removed > 0 {
        sink.system(&format!(
            "removed {removed} terraform workspace(s) unused for more than {}",
            process::fmt_duration(settings.workspace_retention)
        ))
        .await;
    }

    let _key = exec.workspaces.lock_key(ctx, sink, &req.key).await?;
    let saved_plan = match (&p.plan_command_id, &p.plan_sha256) {
        (Some(id), Some(sha)) if op == Op::Apply => Some((*id, sha.as_str())),
        _ => None,
    };
    let ws = match saved_plan {
        // The plan's own workspace, where its initialised template and plan file are.
        Some((plan_id, _)) => exec.workspaces.open(root, plan_id).await.ok_or_else(|| {
            CommandError::new(
                "plan_missing",
                format!(
                    "the plan saved by terraform_plan {plan_id} is not on this agent (its workspace is gone)"
                ),
            )
            .at_stage("fetch_template")
        })?,
        None => exec.workspaces.create(root, ctx.command_id).await?,
    };
    sink.system(&format!("workspace {}", ws.dir.display()))
        .await;
    let backend = exec.backend(ctx, &req.key);
    let result = match saved_plan {
        Some((plan_id, sha)) => {
            run_saved_plan(ctx, sink, settings, &ws, backend, plan_id, sha, p.destroy).await
        }
        None => run_in_workspace(ctx, sink, settings, p, req, &ws, backend, op).await,
    };
    ws.touch().await;
    result
}

/// `terraform_apply` of a saved plan, in the plan's workspace: the plan file is checked
/// against the signed hash (and a destroy plan against the signed `destroy`, so an apply
/// approved as one thing never runs the other), applied once and removed whatever the
/// outcome. Terraform itself reads from the file whether it destroys.
// The stages' inputs, each from a different owner (executor, dispatch, request, workspace).
#[allow(clippy::too_many_arguments)]
async fn run_saved_plan(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    ws: &workspace::Workspace,
    backend: Option<Backend>,
    plan_id: uuid::Uuid,
    sha: &str,
    destroy: bool,
) -> Result<Outcome, CommandError> {
    begin(
        ctx,
        sink,
        "fetch_template",
        format!("using the plan saved by terraform_plan {plan_id}"),
    )
    .await?;
    let saved = plan::SavedPlan::open(&ws.dir, plan_id, sha)
        .await
        .and_then(|s| {
            if (s.mode == PlanMode::Destroy) == destroy {
                return Ok(s);
            }
            let (made, asked) = if destroy {
                ("a normal plan", "a destroy")
            } else {
                ("a destroy plan", "a normal apply")
            };
            Err(CommandError::new(
                "plan_invalid",
                format!(
                    "terraform_plan {plan_id} saved {made}, but this apply was approved as {asked}: it is not applied"
                ),
            ))
        });
    let saved = end(ctx, sink, "fetch_template", saved, |s| {
        let what = match s.mode {
            PlanMode::Destroy => "destroy plan",
            PlanMode::Normal => "plan",
        };
        format!("{what} {} of commit {}", &s.sha256[..12], s.commit)
    })
    .await?;
    if let Err(e) = ws.secrets_in(&saved.dir).await {
        return Err(CommandError::new(
            "workspace_error",
            format!("cannot write to workspace {}: {e}", ws.dir.display()),
        )
        .retryable());
    }
    // The plan records its backend; Trellis's only if the plan was made with it.
    let backend = backend.filter(|_| saved.dir.join(BACKEND_OVERRIDE).is_file());
    let result = async {
        init(ctx, sink, settings, &saved.dir, backend.as_ref(), None).await?;
        let now = pull_state(ctx, sink, settings, &saved.dir, backend.as_ref()).await;
        if now.as_ref().is_ok_and(|now| *now != saved.state) {
            saved.discard().await;
            begin(ctx, sink, "apply", "terraform apply".into()).await?;
            let stale = CommandError::new(
                "plan_stale",
                format!(
                    "the plan saved by terraform_plan {plan_id} is stale: the state changed since it was made; plan again"
                ),
            );
            end(ctx, sink, "apply", Err::<(), _>(stale), |_| String::new()).await?;
        }
        now?;
        let spec = with_backend(tf_spec(settings, &saved.dir), backend.as_ref())
            .arg("apply")
            .arg("-input=false")
            .arg("-no-color")
            .arg(plan::PLAN_FILE);
        let applied = apply_stage(ctx, sink, settings, &saved.dir, spec).await;
        // Applied or refused, the plan is not applied twice.
        saved.discard().await;
        applied.map_err(|mut e| {
            if e.message.contains("Saved plan is stale") {
                e.code = "plan_stale".into();
                e.message = format!(
                    "the plan saved by terraform_plan {plan_id} is stale: the state changed since it was made; plan again\n{}",
                    e.message
                );
            }
            e
        })?;
        outputs_stage(ctx, sink, settings, &saved.dir, backend.as_ref()).await
    }
    .await;
    scrub(ctx, sink, ws, &saved.dir).await;
    Ok(Outcome::Applied(TerraformApplyResult {
        outputs: result?,
        resolved_commit: Some(saved.commit.clone()),
    }))
}

/// Removes the files holding secrets from `dir` (see [`workspace::SECRET_FILES`]).
async fn scrub(ctx: &ExecContext, sink: &mut LogSink<'_>, ws: &workspace::Workspace, dir: &Path) {
    let (removed, errors) = workspace::remove_secret_files(dir).await;
    if errors.is_empty() {
        ws.secrets_removed().await;
        if !removed.is_empty() {
            sink.system(&format!(
                "removed {} from the workspace (they hold secrets)",
                removed.join(", ")
            ))
            .await;
        }
    } else {
        tracing::warn!(command_id = %ctx.command_id, ?errors, "cannot remove secret files from the terraform workspace");
        sink.system(&format!(
            "could not remove files holding secrets: {}",
            errors.join("; ")
        ))
        .await;
    }
}

// The stages' inputs, each from a different owner (executor, dispatch, request, workspace).
#[allow(clippy::too_many_arguments)]
async fn run_in_workspace(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    p: &TerraformApplyParams,
    req: &Request,
    ws: &workspace::Workspace,
    backend: Option<Backend>,
    op: Op,
) -> Result<Outcome, CommandError> {
    // fetch_template
    let shown_repo = sink
        .redactor()
        .redact(&git::display_repo(&req.repo))
        .into_owned();
    begin(
        ctx,
        sink,
        "fetch_template",
        format!("fetching {shown_repo} at {}", req.version),
    )
    .await?;
    let fetched = git::fetch(
        ctx,
        sink,
        settings,
        &req.repo,
        &req.version,
        req.path.as_deref(),
        &ws.dir,
    )
    .await;
    let fetched = end(ctx, sink, "fetch_template", fetched, |f| {
        format!("commit {}", f.commit)
    })
    .await?;
    if let Err(e) = ws.secrets_in(&fetched.dir).await {
        return Err(CommandError::new(
            "workspace_error",
            format!("cannot write to workspace {}: {e}", ws.dir.display()),
        )
        .retryable());
    }
    let backend = match backend {
        Some(b) if declares_backend(&fetched.dir).await => {
            sink.system(&format!(
                "the template configures its own backend: its state is not kept by Trellis (workspace {:?})",
                req.key
            ))
            .await;
            drop(b);
            None
        }
        Some(b) => {
            let path = fetched.dir.join(BACKEND_OVERRIDE);
            if let Err(e) = tokio::fs::write(&path, b.override_tf()).await {
                return Err(CommandError::new(
                    "workspace_error",
                    format!("cannot write {}: {e}", path.display()),
                )
                .retryable());
            }
            sink.system(&format!(
                "state kept by Trellis: workspace {:?} at {}",
                req.key, b.address
            ))
            .await;
            Some(b)
        }
        None => None,
    };
    let dir = &fetched.dir;
    let backend = backend.as_ref();
    let commit = Some(fetched.commit.clone());
    let result = async {
        init(ctx, sink, settings, dir, backend, Some(&p.terraform_vars)).await?;
        let spec = with_backend(tf_spec(settings, dir), backend);
        match op {
            Op::Apply => {
                let spec = spec
                    .arg("apply")
                    .arg("-auto-approve")
                    .arg("-input=false")
                    .arg("-no-color");
                apply_stage(ctx, sink, settings, dir, spec).await?;
                let outputs = outputs_stage(ctx, sink, settings, dir, backend).await?;
                Ok(Outcome::Applied(TerraformApplyResult {
                    outputs,
                    resolved_commit: commit,
                }))
            }
            Op::Plan => {
                let mode = if p.destroy {
                    PlanMode::Destroy
                } else {
                    PlanMode::Normal
                };
                plan_stages(ctx, sink, settings, ws, dir, backend, commit, mode).await
            }
            Op::Destroy => {
                begin(ctx, sink, "destroy", "terraform destroy".into()).await?;
                let spec = spec
                    .arg("destroy")
                    .arg("-auto-approve")
                    .arg("-input=false")
                    .arg("-no-color");
                let destroyed =
                    run_terraform(ctx, sink, settings, "destroy", spec, &mut |_| None).await;
                workspace::restrict_secret_files(dir).await;
                end(ctx, sink, "destroy", destroyed, |_| "destroyed".into()).await?;
                ctx.progress(100.0, Some("destroyed".into())).await;
                Ok(Outcome::Destroyed(TerraformDestroyResult {
                    resolved_commit: commit,
                }))
            }
        }
    }
    .await;
    // The variables file holds the sensitive values in clear, the state every resource
    // attribute and sensitive output: none of them stays once the last stage is done (or
    // the run stopped earlier). What the logs need was streamed already. A saved plan
    // stays (it is the plan's purpose) until applied or expired.
    scrub(ctx, sink, ws, dir).await;
    result
}

/// `plan` and `show` of a `terraform_plan`: the plan file saved and recorded, then
/// summarised from `terraform show -json`. A destroy plan (`-destroy`) is recorded as
/// one, and its apply deletes what it lists.
// The stages' inputs, each from a different owner (executor, dispatch, request, workspace).
#[allow(clippy::too_many_arguments)]
async fn plan_stages(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    ws: &workspace::Workspace,
    dir: &Path,
    backend: Option<&Backend>,
    commit: Option<String>,
    mode: PlanMode,
) -> Result<Outcome, CommandError> {
    let destroy = mode == PlanMode::Destroy;
    let label = if destroy {
        "terraform plan -destroy"
    } else {
        "terraform plan"
    };
    begin(ctx, sink, "plan", label.into()).await?;
    let mut spec = with_backend(tf_spec(settings, dir), backend)
        .arg("plan")
        .arg("-input=false")
        .arg("-no-color")
        .arg("-lock=true");
    if destroy {
        spec = spec.arg("-destroy");
    }
    let spec = spec.arg(format!("-out={}", plan::PLAN_FILE));
    let planned = async {
        run_terraform(ctx, sink, settings, "plan", spec, &mut |_| None).await?;
        let state = pull_state(ctx, sink, settings, dir, backend).await?;
        plan::record(
            &ws.dir,
            dir,
            commit.as_deref().unwrap_or_default(),
            state,
            mode,
        )
        .await
        .map_err(|e| {
            CommandError::new(
                "workspace_error",
                format!("cannot record the plan file in {}: {e}", dir.display()),
            )
        })
    }
    .await;
    workspace::restrict_secret_files(dir).await;
    let sha = end(ctx, sink, "plan", planned, |sha| {
        let what = if destroy { "destroy plan" } else { "plan" };
        format!("saved {what} {}", &sha[..12])
    })
    .await?;

    begin(ctx, sink, "show", "terraform show -json".into()).await?;
    let shown = async {
        // `show` reads the state through the backend too.
        let mut spec = with_backend(tf_spec(settings, dir), backend)
            .arg("show")
            .arg("-json")
            .arg(plan::PLAN_FILE);
        spec.capture_stdout = true;
        let out = run_terraform(ctx, sink, settings, "show", spec, &mut |_| None).await?;
        if out.stdout_overflow {
            return Err(CommandError::new(
                "terraform_failed",
                format!(
                    "terraform show -json printed more than {} bytes",
                    process::MAX_CAPTURE_BYTES
                ),
            ));
        }
        let show: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            CommandError::new(
                "terraform_failed",
                format!("terraform show -json printed invalid JSON: {e}"),
            )
        })?;
        Ok(plan::summary(&show, sha, commit, mode))
    }
    .await;
    let summary = end(ctx, sink, "show", shown, |s| {
        format!(
            "{} to add, {} to change, {} to destroy",
            s.add, s.change, s.destroy
        )
    })
    .await?;
    ctx.progress(100.0, Some("planned".into())).await;
    Ok(Outcome::Planned(summary))
}

/// The lineage and serial of the current state (`terraform state pull`, not logged: it
/// prints the whole state).
async fn pull_state(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    dir: &Path,
    backend: Option<&Backend>,
) -> Result<Option<plan::StateMeta>, CommandError> {
    let mut spec = with_backend(tf_spec(settings, dir), backend)
        .arg("state")
        .arg("pull");
    spec.capture_stdout = true;
    let out = run_terraform(ctx, sink, settings, "state pull", spec, &mut |_| None).await?;
    Ok(plan::StateMeta::of_pulled(&out.stdout))
}

fn with_backend(spec: ProcSpec, backend: Option<&Backend>) -> ProcSpec {
    match backend {
        Some(b) => b.env(spec),
        None => spec,
    }
}

/// The `init` stage; writes the variables file first when given `vars` (not for a
/// saved plan, which holds its variables).
async fn init(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    dir: &Path,
    backend: Option<&Backend>,
    vars: Option<&std::collections::BTreeMap<String, Value>>,
) -> Result<(), CommandError> {
    begin(ctx, sink, "init", "terraform init".into()).await?;
    let init = async {
        if let Some(vars) = vars {
            write_tfvars(dir, vars).await?;
        }
        let mut spec = with_backend(tf_spec(settings, dir), backend)
            .arg("init")
            .arg("-input=false")
            .arg("-no-color");
        if let Some(plugins) = &settings.plugin_dir {
            if !plugins.is_dir() {
                return Err(CommandError::new(
                    "terraform_unavailable",
                    format!(
                        "the Terraform plugin directory {} (TENDRIL_TERRAFORM_PLUGIN_DIR) does not exist",
                        plugins.display()
                    ),
                ));
            }
            spec = spec.arg("-plugin-dir").arg(plugins);
        }
        run_terraform(ctx, sink, settings, "init", spec, &mut |_| None).await
    }
    .await;
    end(ctx, sink, "init", init, |_| "initialized".into()).await?;
    Ok(())
}

/// The `apply` stage running `spec` (`terraform apply …`).
async fn apply_stage(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    dir: &Path,
    spec: ProcSpec,
) -> Result<(), CommandError> {
    begin(ctx, sink, "apply", "terraform apply".into()).await?;
    let (start, stop) = stage_percent("apply");
    let mut progress = ApplyProgress::new(start, stop);
    let applied = run_terraform(ctx, sink, settings, "apply", spec, &mut |l| {
        progress.observe(l)
    })
    .await;
    // The state is written with Terraform's default permissions: narrow them until it
    // is removed after `outputs`.
    workspace::restrict_secret_files(dir).await;
    end(ctx, sink, "apply", applied, |_| progress.summary()).await?;
    Ok(())
}

/// The `outputs` stage: `terraform output -json`, sensitive outputs redacted.
async fn outputs_stage(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    dir: &Path,
    backend: Option<&Backend>,
) -> Result<Value, CommandError> {
    begin(ctx, sink, "outputs", "terraform output -json".into()).await?;
    let outputs = async {
        let mut spec = with_backend(tf_spec(settings, dir), backend)
            .arg("output")
            .arg("-json");
        spec.capture_stdout = true;
        let out = run_terraform(ctx, sink, settings, "outputs", spec, &mut |_| None).await?;
        if out.stdout_overflow {
            return Err(CommandError::new(
                "terraform_failed",
                format!(
                    "terraform output -json printed more than {} bytes",
                    process::MAX_CAPTURE_BYTES
                ),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let text = if text.trim().is_empty() { "{}" } else { &text };
        let mut outputs: Value = serde_json::from_str(text).map_err(|e| {
            CommandError::new(
                "terraform_failed",
                format!("terraform output -json printed invalid JSON: {e}"),
            )
        })?;
        redact_outputs(&mut outputs, sink.redactor());
        Ok(outputs)
    }
    .await;
    let outputs = end(ctx, sink, "outputs", outputs, |o| {
        format!("{} output(s)", o.as_object().map_or(0, |m| m.len()))
    })
    .await?;
    ctx.progress(100.0, Some("applied".into())).await;
    Ok(outputs)
}

pub(crate) const TFVARS: &str = "terraform.tfvars.json";

async fn write_tfvars(
    dir: &std::path::Path,
    vars: &std::collections::BTreeMap<String, Value>,
) -> Result<(), CommandError> {
    let body = serde_json::to_vec_pretty(vars)
        .map_err(|e| CommandError::new("internal", format!("cannot encode variables: {e}")))?;
    let path = dir.join(TFVARS);
    let write = async {
        let mut opts = tokio::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true).mode(0o600);
        let mut f = opts.open(&path).await?;
        tokio::io::AsyncWriteExt::write_all(&mut f, &body).await?;
        tokio::io::AsyncWriteExt::flush(&mut f).await
    };
    write.await.map_err(|e| {
        CommandError::new(
            "workspace_error",
            format!("cannot write {}: {e}", path.display()),
        )
        .retryable()
    })
}

fn tf_spec(settings: &TerraformSettings, dir: &std::path::Path) -> ProcSpec {
    ProcSpec::new(&settings.binary, dir)
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .env("CHECKPOINT_DISABLE", "1")
}

async fn run_terraform(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    stage: &str,
    spec: ProcSpec,
    on_line: &mut (dyn FnMut(&str) -> Option<f32> + Send),
) -> Result<ProcOutput, CommandError> {
    let binary = spec.program.display().to_string();
    let subcommand = spec
        .args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = process::run(ctx, sink, spec, settings.sigint_grace, on_line)
        .await
        .map_err(|e| {
            CommandError::new(
                "terraform_unavailable",
                format!(
                    "cannot run terraform ({binary}): {e}; install it or set TENDRIL_TERRAFORM_BIN"
                ),
            )
        })?;
    if out.cancelled || ctx.is_cancelled() {
        return Err(cancelled_error(stage, &out));
    }
    if !out.status.success() {
        let excerpt = out.error_excerpt(3000);
        let status = out.status.code().map_or_else(
            || "killed by a signal".to_string(),
            |c| format!("exit status {c}"),
        );
        return Err(CommandError::new(
            "terraform_failed",
            if excerpt.is_empty() {
                format!("terraform {subcommand} failed ({status})")
            } else {
                format!("terraform {subcommand} failed ({status}):\n{excerpt}")
            },
        ));
    }
    Ok(out)
}

/// The error for a run stopped by cancel; the runner turns it into `cancelled` or
/// `timed_out`.
pub(crate) fn cancelled_error(stage: &str, out: &ProcOutput) -> CommandError {
    let how = if out.killed {
        "killed after the SIGINT grace period"
    } else if out.cancelled {
        "stopped by SIGINT"
    } else {
        "cancelled"
    };
    CommandError::new("cancelled", format!("{stage} {how}")).at_stage(stage)
}

async fn begin(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    stage: &str,
    message: String,
) -> Result<(), CommandError> {
    sink.flush().await;
    if ctx.is_cancelled() {
        return Err(
            CommandError::new("cancelled", format!("cancelled before {stage}")).at_stage(stage),
        );
    }
    let (start, _) = stage_percent(stage);
    ctx.stage(stage, StageState::Running, Some(start), Some(message))
        .await;
    Ok(())
}

async fn end<T>(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    stage: &str,
    result: Result<T, CommandError>,
    ok_message: impl FnOnce(&T) -> String,
) -> Result<T, CommandError> {
    sink.flush().await;
    let (_, stop) = stage_percent(stage);
    match result {
        Ok(v) => {
            let msg = ok_message(&v);
            ctx.stage(stage, StageState::Completed, Some(stop), Some(msg))
                .await;
            Ok(v)
        }
        Err(e) => {
            let e = e.at_stage(stage);
            let first_line = sink
                .redactor()
                .redact(e.message.lines().next().unwrap_or_default())
                .into_owned();
            let (start, _) = stage_percent(stage);
            ctx.stage(stage, StageState::Failed, Some(start), Some(first_line))
                .await;
            Err(e)
        }
    }
}

/// Sensitive outputs lose their value; every other string is redacted like the logs.
fn redact_outputs(outputs: &mut Value, redactor: &Redactor) {
    if let Some(map) = outputs.as_object_mut() {
        for out in map.values_mut() {
            let Some(o) = out.as_object_mut() else {
                continue;
            };
            if o.get("sensitive").and_then(Value::as_bool) == Some(true) {
                o.insert("value".into(), Value::Null);
                o.insert("redacted".into(), Value::Bool(true));
            }
        }
    }
    redactor.redact_json(outputs);
}

/// Overall percent during `apply`, from the plan summary and the resources completed.
struct ApplyProgress {
    start: f32,
    stop: f32,
    total: Option<u32>,
    done: u32,
}

impl ApplyProgress {
    fn new(start: f32, stop: f32) -> Self {
        Self {
            start,
            stop,
            total: None,
            done: 0,
        }
    }

    fn observe(&mut self, line: &str) -> Option<f32> {
        if let Some(rest) = line.strip_prefix("Plan: ") {
            // "Plan: 2 to add, 1 to change, 0 to destroy."
            let total = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse::<u32>().ok())
                .sum();
            self.total = Some(total);
            return None;
        }
        let complete = [
            ": Creation complete after",
            ": Modifications complete after",
            ": Destruction complete after",
        ]
        .iter()
        .any(|m| line.contains(m));
        let total = self.total?;
        if !complete || total == 0 {
            return None;
        }
        self.done = (self.done + 1).min(total);
        Some(self.start + (self.stop - self.start) * self.done as f32 / total as f32)
    }

    fn summary(&self) -> String {
        match self.total {
            Some(t) => format!("{} of {t} resource change(s) applied", self.done),
            None => "applied".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use trellis_protocol::TemplateSource;

    fn params(repo: &str, version: &str, path: Option<&str>) -> TerraformApplyParams {
        TerraformApplyParams {
            template_source: TemplateSource {
                repo: repo.into(),
                version: version.into(),
                path: path.map(Into::into),
            },
            terraform_vars: Default::default(),
            meta: None,
            sensitive_vars: vec![],
            plan_command_id: None,
            plan_sha256: None,
            workspace_key: None,
            destroy: false,
        }
    }

    #[test]
    fn validation_rejects_bad_sources_before_anything_runs() {
        for (repo, version, path) in [
            ("", "v1", None),
            ("/r", "", None),
            ("/r", "--upload-pack=x", None),
            ("/r", "v1 v2", None),
            ("/r", "HEAD~1", None),
            ("/r", "a..b", None),
            ("/r", "v1", Some("../x")),
            ("/r", "v1", Some("/etc")),
            ("-oProxyCommand=x", "v1", None),
            ("ext::sh -c touch% /tmp/x", "v1", None),
        ] {
            let e = Request::validate(&params(repo, version, path), Op::Apply)
                .err()
                .unwrap_or_else(|| panic!("{repo:?} {version:?} {path:?} accepted"));
            assert_eq!(e.code, "invalid_params", "{e}");
        }
        let mut p = params("/r", "v1", None);
        p.terraform_vars.insert("1bad".into(), json!(1));
        assert!(Request::validate(&p, Op::Apply).is_err());
    }

    #[test]
    fn default_workspace_key_is_repo_and_path() {
        let r = Request::validate(
            &params("/srv/r", "release/1.2", Some("envs/prod/")),
            Op::Plan,
        )
        .unwrap();
        assert_eq!(r.key, "/srv/r#envs/prod");
        assert_eq!(r.path.as_deref(), Some("envs/prod"));
        let r = Request::validate(&params("https://h/x.git", "0123abcd", Some(".")), Op::Apply)
            .unwrap();
        assert_eq!(r.key, "https://h/x.git#");
        let mut p = params("/srv/r", "v1", None);
        p.workspace_key = Some("prod".into());
        assert_eq!(Request::validate(&p, Op::Destroy).unwrap().key, "prod");
    }

    #[test]
    fn the_state_backend_points_at_the_server_and_keeps_the_password_out_of_the_file() {
        assert_eq!(
            state_base_url("ws://127.0.0.1:8080/api/agents/connect").as_deref(),
            Some("http://127.0.0.1:8080/api/terraform/state/")
        );
        assert_eq!(
            state_base_url("wss://cp.example/trellis/api/agents/connect?x=1").as_deref(),
            Some("https://cp.example/trellis/api/terraform/state/")
        );
        assert_eq!(state_base_url("https://cp.example/"), None);
        assert_eq!(path_segment("/srv/r#envs/prod"), "%2Fsrv%2Fr%23envs%2Fprod");
        assert_eq!(path_segment("prod-1_a.b~"), "prod-1_a.b~");
        let b = Backend {
            address: "http://h/api/terraform/state/a%24%7Bx%7D".into(),
            username: "0b5c6d6e-0000-4000-8000-000000000001".into(),
            password: crate::secret::Secret::new("pw-123"),
            ca_file: None,
        };
        let tf = b.override_tf();
        assert!(tf.contains("backend \"http\""), "{tf}");
        assert!(tf.contains("lock_method    = \"LOCK\""), "{tf}");
        assert!(!tf.contains("0b5c6d6e"), "{tf}");
        assert!(!tf.contains("pw-123"), "{tf}");
        let spec = b.env(ProcSpec::new("terraform", Path::new("/")));
        assert!(spec
            .env
            .contains(&("TF_HTTP_PASSWORD".to_string(), "pw-123".to_string())));
        assert!(spec.env.contains(&(
            "TF_HTTP_USERNAME".to_string(),
            "0b5c6d6e-0000-4000-8000-000000000001".to_string()
        )));
    }

    #[test]
    fn the_state_backend_follows_the_server_the_agent_is_connected_to() {
        let dir = std::env::temp_dir().join(format!("tendril-state-{}", uuid::Uuid::new_v4()));
        let exec =
            TerraformExecutor::new(TerraformSettings::default(), &dir).with_state_backend(None);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let id = uuid::Uuid::new_v4();
        let connected = crate::exec::ConnectedServer::default();
        let ctx = ExecContext::new(id, id, 1, tx)
            .with_terraform_state(Some("pw".into()))
            .with_server(connected.clone());
        // Not connected yet: no server to keep the state.
        assert!(exec.backend(&ctx, "prod").is_none());
        connected.set("ws://127.0.0.1:7001/api/agents/connect");
        let first = exec.backend(&ctx, "prod").expect("backend");
        assert_eq!(
            first.address,
            "http://127.0.0.1:7001/api/terraform/state/prod"
        );
        assert_eq!(first.username, id.to_string());
        // After a fail-over to another URL, a backend built now uses that one.
        connected.set("wss://cp2.example/x/api/agents/connect");
        assert_eq!(
            exec.backend(&ctx, "prod").expect("backend").address,
            "https://cp2.example/x/api/terraform/state/prod"
        );
        // No credential in the dispatch: local state.
        let plain =
            ExecContext::new(id, id, 1, tokio::sync::mpsc::channel(1).0).with_server(connected);
        assert!(exec.backend(&plain, "prod").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_template_with_its_own_backend_is_recognised() {
        let dir = std::env::temp_dir().join(format!("tendril-backend-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.tf"), "resource \"null_resource\" \"a\" {}\n").unwrap();
        std::fs::write(
            dir.join(BACKEND_OVERRIDE),
            "terraform {\n  backend \"http\" {}\n}\n",
        )
        .unwrap();
        assert!(
            !declares_backend(&dir).await,
            "our own override does not count"
        );
        std::fs::write(
            dir.join("backend.tf"),
            "terraform {\n  backend   \"s3\" {\n  }\n}\n",
        )
        .unwrap();
        assert!(declares_backend(&dir).await);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apply_progress_follows_plan_and_completions() {
        let mut p = ApplyProgress::new(30.0, 90.0);
        assert_eq!(p.observe("null_resource.a: Creating..."), None);
        assert_eq!(
            p.observe("Plan: 2 to add, 1 to change, 1 to destroy."),
            None
        );
        assert_eq!(
            p.observe("null_resource.a: Creation complete after 0s [id=1]"),
            Some(45.0)
        );
        assert_eq!(
            p.observe("null_resource.b: Modifications complete after 1s"),
            Some(60.0)
        );
        assert_eq!(p.summary(), "2 of 4 resource change(s) applied");
    }

    #[test]
    fn sensitive_outputs_are_redacted() {
        let mut r = Redactor::default();
        r.add("hunter22");
        let mut o = json!({
            "pw": {"sensitive": true, "type": "string", "value": "whatever"},
            "echo": {"sensitive": false, "type": "string", "value": "x hunter22"},
            "n": {"sensitive": false, "type": "number", "value": 3}
        });
        redact_outputs(&mut o, &r);
        assert_eq!(o["pw"]["value"], Value::Null);
        assert_eq!(o["pw"]["redacted"], json!(true));
        assert_eq!(o["echo"]["value"], json!("x ***"));
        assert_eq!(o["n"]["value"], json!(3));
    }
}
