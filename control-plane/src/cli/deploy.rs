//! `trellis deploy plan|apply|destroy`: Terraform commands on an agent.
//!
//! * `plan` submits a `terraform_plan` (the plan file stays on the agent) and, followed,
//!   prints the resource changes grouped by action; `--destroy` makes it a destroy plan,
//!   which lists what would be destroyed;
//! * `apply` submits a `terraform_apply`: `--plan ID` applies exactly that saved plan (the
//!   control plane fills in its configuration and hash; a destroy plan destroys what it
//!   listed), else plan and apply in one step;
//! * `destroy` makes a destroy plan and prints it, asks for the workspace name on a
//!   terminal (or takes `--yes`), then applies exactly that plan and follows it to the
//!   end. The one-step `terraform_destroy` stays in the API for automation.
//!
//! The configuration comes from `--repo`/`--version`/`--path` and the variables from
//! `--var-file` (a JSON object) and `--var k=v` (strings, later ones win) — or, for `plan`
//! and `destroy`, `--from ID` takes all of it from an earlier Terraform command, sensitive
//! values included, without them ever reaching this machine (`source_command_id`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::client::{segment, Client};
use super::commands::follow_new;
use super::follow::watch;
use super::{connect, output, CliError, Exit, Output};

#[derive(clap::Subcommand)]
pub enum DeployCmd {
    /// Plan a Terraform configuration on an agent: the plan is kept there, to be applied
    /// with `deploy apply --plan ID`; with `--follow`, the changes are printed by action.
    Plan(Box<PlanArgs>),
    /// Apply a saved plan (`--plan ID`), or plan and apply a configuration in one step.
    Apply(Box<ApplyArgs>),
    /// Destroy every resource in a configuration's Terraform state: a destroy plan is made
    /// and shown, then applied once the workspace name is typed on a terminal (or with
    /// `--yes`); followed to the end.
    Destroy(Box<DestroyArgs>),
}

/// The Terraform configuration: where it comes from and its variables.
#[derive(clap::Args, Default)]
pub struct ConfigArgs {
    /// Git URL, `file://` URL or local path (on the agent) of the repository.
    #[arg(long)]
    repo: Option<String>,
    /// Tag, branch or commit.
    #[arg(long)]
    version: Option<String>,
    /// Folder of the configuration inside the repository.
    #[arg(long)]
    path: Option<String>,
    /// A variable `NAME=VALUE` (a string; repeatable; over `--var-file`).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// A JSON object of variables (typed values: numbers, lists, maps).
    #[arg(long)]
    var_file: Option<PathBuf>,
    /// A variable whose value must never be shown (repeatable; names containing
    /// password, secret, token, private_key or api_key are always treated so).
    #[arg(long = "sensitive", value_name = "NAME")]
    sensitive: Vec<String>,
    /// The Terraform state workspace (default: the repository and path). Commands with the
    /// same workspace share its state and never run at once.
    #[arg(long)]
    workspace_key: Option<String>,
}

/// How the command is submitted and watched.
#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Seconds before the command times out (the server's default when unset).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Submitting twice with the same key starts one command.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the command to its end (exit code as `commands follow`; with `--output json`
    /// the finished command is printed).
    #[arg(long)]
    follow: bool,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// The agent (its id) that runs Terraform (default with `--from`: that command's).
    #[arg(long)]
    agent: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
    /// Plan with the configuration and variables of this earlier Terraform command
    /// (instead of `--repo`, `--version`, … ; its sensitive values stay on the server).
    #[arg(long, value_name = "COMMAND_ID")]
    from: Option<String>,
    /// A destroy plan: what destroying every resource in the workspace's state would
    /// delete; `deploy apply --plan ID` then destroys exactly that.
    #[arg(long)]
    destroy: bool,
    #[command(flatten)]
    submit: SubmitArgs,
}

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The agent (its id) that runs Terraform (default with `--plan`: the plan's).
    #[arg(long)]
    agent: Option<String>,
    /// Apply exactly this saved plan (a succeeded `deploy plan`'s command id) instead of
    /// planning anew; refused if the workspace's state changed since (`plan_stale`).
    #[arg(long, value_name = "COMMAND_ID")]
    plan: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    submit: SubmitArgs,
}

#[derive(clap::Args)]
pub struct DestroyArgs {
    /// The agent (its id) that runs Terraform (default with `--from`: that command's).
    #[arg(long)]
    agent: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
    /// Destroy with the configuration and variables of this earlier Terraform command
    /// (e.g. the workspace's last apply; its sensitive values stay on the server).
    #[arg(long, value_name = "COMMAND_ID")]
    from: Option<String>,
    /// Do not ask: apply the destroy plan without typing the workspace name (needed when
    /// stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Seconds before each of the two commands (the plan, its apply) times out (the
    /// server's default when unset).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Submitting twice with the same key makes one plan and one apply of it (the apply
    /// gets the key with `-apply` appended).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Accepted for scripts written for the one-step destroy: a destroy is always followed.
    #[arg(long, hide = true)]
    follow: bool,
}

pub async fn run(cmd: DeployCmd, out: Output) -> Result<Exit, CliError> {
    match cmd {
        DeployCmd::Plan(a) => plan(*a, out).await,
        DeployCmd::Apply(a) => apply(*a, out).await,
        DeployCmd::Destroy(a) => destroy(*a, out).await,
    }
}

async fn plan(a: PlanArgs, out: Output) -> Result<Exit, CliError> {
    let client = connect()?;
    let (agent, mut params, _) = configured(&client, a.agent, &a.config, a.from.as_deref()).await?;
    if a.destroy {
        params["destroy"] = true.into();
    }
    let r = submit(&client, &agent, "terraform_plan", params, &a.submit).await?;
    let id = command_id(&r)?;
    if !a.submit.follow {
        return Ok(accepted(&r, &id, out));
    }
    let exit = follow_new(&client, &id, out).await?;
    if out == Output::Table && exit == Exit::Ok {
        let c = client.get(&format!("/api/commands/{id}")).await?;
        println!("\n{}", plan_summary(&c["result"]));
        if has_changes(&c["result"]) {
            if is_destroy_plan(&c["result"]) {
                println!("\nDestroy them: trellis deploy apply --plan {id}");
            } else {
                println!("\nApply it: trellis deploy apply --plan {id}");
            }
        }
    }
    Ok(exit)
}

async fn apply(a: ApplyArgs, out: Output) -> Result<Exit, CliError> {
    let client = connect()?;
    let (agent, params) = match &a.plan {
        Some(plan) => {
            if !a.config.is_empty() {
                return Err(CliError::Usage(
                    "--plan applies the plan's own configuration: --repo, --version, --path, \
                     --var, --var-file, --sensitive and --workspace-key cannot be given with it"
                        .into(),
                ));
            }
            let plan = segment(plan)?;
            let agent = match a.agent {
                Some(agent) => agent,
                None => agent_of(&client.get(&format!("/api/commands/{plan}")).await?)?,
            };
            (agent, json!({ "plan_command_id": plan }))
        }
        None => {
            let agent = a
                .agent
                .ok_or_else(|| CliError::Usage("--agent is required (or --plan)".into()))?;
            (agent, a.config.params()?)
        }
    };
    let r = submit(&client, &agent, "terraform_apply", params, &a.submit).await?;
    let id = command_id(&r)?;
    if a.submit.follow {
        return follow_new(&client, &id, out).await;
    }
    Ok(accepted(&r, &id, out))
}

/// The destroy plan, shown; the typed confirmation; the apply of that plan, followed. With
/// `--output json` one document at the end: `{"plan": Command, "apply": Command|null}`
/// (`apply` null when nothing was applied), the plan and the prompt on stderr.
async fn destroy(a: DestroyArgs, out: Output) -> Result<Exit, CliError> {
    let client = connect()?;
    let (agent, mut params, workspace) =
        configured(&client, a.agent, &a.config, a.from.as_deref()).await?;
    // Checked before anything is submitted: without a terminal there is nobody to ask.
    if !a.yes && !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "deploy destroy needs --yes when stdin is not a terminal (nothing was planned or destroyed)"
                .into(),
        ));
    }
    params["destroy"] = true.into();
    let submit_args = |suffix: &str| SubmitArgs {
        timeout_secs: a.timeout_secs,
        idempotency_key: a.idempotency_key.as_ref().map(|k| format!("{k}{suffix}")),
        follow: true,
    };
    let r = submit(&client, &agent, "terraform_plan", params, &submit_args("")).await?;
    let plan_id = command_id(&r)?;
    if out == Output::Table {
        println!("destroy plan {plan_id}");
    }
    let plan = watch(&client, &plan_id, out).await?;
    let done = |apply: Option<&Value>| {
        if out == Output::Json {
            output::json(&json!({ "plan": plan, "apply": apply }));
        }
    };
    if plan["status"] != "succeeded" {
        done(None);
        return Ok(Exit::of_status(plan["status"].as_str().unwrap_or_default()));
    }
    let summary = plan_summary(&plan["result"]);
    let show = |s: &str| match out {
        Output::Table => println!("{s}"),
        Output::Json => eprintln!("{s}"),
    };
    show(&format!("\n{summary}\n"));
    if !has_changes(&plan["result"]) {
        done(None);
        return Ok(Exit::Ok);
    }
    // The workspace the control plane says the plan acts on.
    let workspace = plan["target"]["workspace"]
        .as_str()
        .map_or(workspace, str::to_string);
    if !a.yes {
        confirm_destroy(&workspace, &plan_id)?;
    }
    let agent = agent_of(&plan)?;
    let r = submit(
        &client,
        &agent,
        "terraform_apply",
        json!({ "plan_command_id": plan_id }),
        &submit_args("-apply"),
    )
    .await?;
    let apply_id = command_id(&r)?;
    if out == Output::Table {
        println!("apply of the destroy plan: command {apply_id}");
    }
    let apply = watch(&client, &apply_id, out).await?;
    done(Some(&apply));
    Ok(Exit::of_status(
        apply["status"].as_str().unwrap_or_default(),
    ))
}

/// The agent, params and state workspace of a plan or destroy: from the flags, or from
/// the command `--from` names (`source_command_id`; its workspace from its target).
async fn configured(
    client: &Client,
    agent: Option<String>,
    config: &ConfigArgs,
    from: Option<&str>,
) -> Result<(String, Value, String), CliError> {
    match from {
        Some(from) => {
            if !config.is_empty() {
                return Err(CliError::Usage(
                    "--from takes the configuration of that command: --repo, --version, --path, \
                     --var, --var-file, --sensitive and --workspace-key cannot be given with it"
                        .into(),
                ));
            }
            let from = segment(from)?;
            let source = client.get(&format!("/api/commands/{from}")).await?;
            let workspace = source["target"]["workspace"]
                .as_str()
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "command {from} is a {}, not a Terraform command",
                        output::cell(&source["type"])
                    ))
                })?
                .to_string();
            let agent = match agent {
                Some(a) => a,
                None => agent_of(&source)?,
            };
            Ok((agent, json!({ "source_command_id": from }), workspace))
        }
        None => {
            let agent =
                agent.ok_or_else(|| CliError::Usage("--agent is required (or --from)".into()))?;
            let params = config.params()?;
            let workspace = workspace_of(&params);
            Ok((agent, params, workspace))
        }
    }
}

impl ConfigArgs {
    fn is_empty(&self) -> bool {
        self.repo.is_none()
            && self.version.is_none()
            && self.path.is_none()
            && self.vars.is_empty()
            && self.var_file.is_none()
            && self.sensitive.is_empty()
            && self.workspace_key.is_none()
    }

    /// The config snapshot (`terraform_apply`/`terraform_plan`/`terraform_destroy` params).
    fn params(&self) -> Result<Value, CliError> {
        let (Some(repo), Some(version)) = (&self.repo, &self.version) else {
            return Err(CliError::Usage(
                "--repo and --version are required (or --from/--plan)".into(),
            ));
        };
        let vars = variables(self.var_file.as_deref(), &self.vars)?;
        let mut source = json!({ "repo": repo, "version": version });
        if let Some(p) = &self.path {
            source["path"] = p.clone().into();
        }
        let mut params = json!({
            "template_source": source,
            "terraform_vars": vars,
            "sensitive_vars": self.sensitive,
        });
        if let Some(k) = &self.workspace_key {
            params["workspace_key"] = k.clone().into();
        }
        Ok(params)
    }
}

/// The state workspace params name, as the control plane derives it (protocol crate).
fn workspace_of(params: &Value) -> String {
    serde_json::from_value::<trellis_protocol::TerraformApplyParams>(params.clone())
        .map(|p| p.state_workspace())
        .unwrap_or_default()
}

fn agent_of(command: &Value) -> Result<String, CliError> {
    command["agentId"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::Protocol("the command has no agentId".into()))
}

async fn submit(
    client: &Client,
    agent: &str,
    ty: &str,
    params: Value,
    s: &SubmitArgs,
) -> Result<Value, CliError> {
    let mut body = json!({ "agentId": agent, "type": ty, "params": params });
    if let Some(t) = s.timeout_secs {
        body["timeoutSecs"] = t.into();
    }
    if let Some(k) = &s.idempotency_key {
        body["idempotencyKey"] = k.clone().into();
    }
    client.post("/api/commands", &body).await
}

fn command_id(r: &Value) -> Result<String, CliError> {
    r["commandId"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| CliError::Protocol("the response has no commandId".into()))
}

/// The 202 answer of a command not followed.
fn accepted(r: &Value, id: &str, out: Output) -> Exit {
    if out == Output::Json {
        output::json(r);
    } else {
        println!(
            "command {id} {}  (trellis commands follow {id})",
            output::cell(&r["status"])
        );
    }
    Exit::Ok
}

/// Asks for the workspace name on the terminal before the destroy plan is applied.
fn confirm_destroy(workspace: &str, plan_id: &str) -> Result<(), CliError> {
    eprint!(
        "Destroy the resources listed above, in the Terraform state of workspace {workspace:?}? \
         Type the workspace name to confirm: "
    );
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("cannot read the confirmation: {e}")))?;
    if line.trim() != workspace {
        return Err(CliError::Usage(format!(
            "the name does not match the workspace: nothing was destroyed (destroy plan {plan_id} \
             is left unapplied; the agent deletes it after 24 hours)"
        )));
    }
    Ok(())
}

/// Resource changes by action, in Terraform's order, with its symbols and headings.
const ACTIONS: [(&str, &str, &str); 5] = [
    ("create", "+", "Create"),
    ("update", "~", "Update in place"),
    ("replace", "-/+", "Replace (destroy, then create)"),
    ("delete", "-", "Destroy"),
    ("read", "<=", "Read (data sources)"),
];

fn count(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or(0)
}

/// Whether a plan's result is a destroy plan (`mode: destroy`).
pub fn is_destroy_plan(result: &Value) -> bool {
    result["mode"] == "destroy"
}

/// Whether a plan's result changes anything (data-source reads alone do not).
pub fn has_changes(result: &Value) -> bool {
    count(result, "add") + count(result, "change") + count(result, "destroy") > 0
        || result["resources"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["action"] != "read"))
}

/// A `terraform_plan` result for people: Terraform's "Plan:" line (or "No changes."), then
/// the resource addresses grouped by action; a destroy plan says it is one first.
pub fn plan_summary(result: &Value) -> String {
    let destroy = is_destroy_plan(result);
    if !has_changes(result) {
        return if destroy {
            "Destroy plan: no changes. No objects need to be destroyed.".into()
        } else {
            "No changes. The infrastructure matches the configuration.".into()
        };
    }
    let mut out = String::new();
    if destroy {
        out.push_str("Destroy plan: applying it destroys every resource listed.\n");
    }
    out += &format!(
        "Plan: {} to add, {} to change, {} to destroy.",
        count(result, "add"),
        count(result, "change"),
        count(result, "destroy")
    );
    let resources = result["resources"].as_array().cloned().unwrap_or_default();
    for (action, symbol, title) in ACTIONS {
        let mut addrs: Vec<&str> = resources
            .iter()
            .filter(|r| r["action"] == action)
            .filter_map(|r| r["address"].as_str())
            .collect();
        if addrs.is_empty() {
            continue;
        }
        addrs.sort_unstable();
        out.push_str(&format!("\n\n{title} ({}):", addrs.len()));
        for a in addrs {
            out.push_str(&format!("\n  {symbol} {a}"));
        }
    }
    out
}

/// The variables: the file's object, then each `NAME=VALUE` over it.
fn variables(
    file: Option<&std::path::Path>,
    pairs: &[String],
) -> Result<BTreeMap<String, Value>, CliError> {
    let mut vars = BTreeMap::new();
    if let Some(f) = file {
        let text = std::fs::read(f)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", f.display())))?;
        vars = serde_json::from_slice(&text).map_err(|e| {
            CliError::Usage(format!(
                "{} must be a JSON object of variables: {e}",
                f.display()
            ))
        })?;
    }
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| CliError::Usage(format!("--var {p:?} is not NAME=VALUE")))?;
        vars.insert(k.trim().to_string(), Value::String(v.to_string()));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_from_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("trellis-cli-vars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vars.json");
        std::fs::write(&f, r#"{"count": 2, "name": "a"}"#).unwrap();
        let v = variables(Some(&f), &["name=b=c".into(), "region=eu".into()]).unwrap();
        assert_eq!(v["count"], json!(2));
        assert_eq!(v["name"], json!("b=c"));
        assert_eq!(v["region"], json!("eu"));
        assert!(variables(None, &["novalue".into()]).is_err());
        assert!(variables(None, &["=x".into()]).is_err());
        std::fs::write(&f, "[1]").unwrap();
        assert!(variables(Some(&f), &[]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plan_summary_groups_by_action() {
        let r = json!({"add": 2, "change": 1, "destroy": 1, "resources": [
            {"address": "null_resource.b", "action": "create"},
            {"address": "null_resource.db", "action": "replace"},
            {"address": "null_resource.a", "action": "create"},
            {"address": "null_resource.cfg", "action": "update"}]});
        assert_eq!(
            plan_summary(&r),
            "Plan: 2 to add, 1 to change, 1 to destroy.\n\n\
             Create (2):\n  + null_resource.a\n  + null_resource.b\n\n\
             Update in place (1):\n  ~ null_resource.cfg\n\n\
             Replace (destroy, then create) (1):\n  -/+ null_resource.db"
        );
        let none = json!({"add": 0, "change": 0, "destroy": 0, "resources": []});
        assert!(!has_changes(&none));
        assert!(plan_summary(&none).starts_with("No changes."));
        let reads = json!({"add": 0, "change": 0, "destroy": 0,
                           "resources": [{"address": "data.x.y", "action": "read"}]});
        assert!(!has_changes(&reads));
        let destroy = json!({"add": 0, "change": 0, "destroy": 2, "mode": "destroy", "resources": [
            {"address": "null_resource.b", "action": "delete"},
            {"address": "null_resource.a", "action": "delete"}]});
        assert_eq!(
            plan_summary(&destroy),
            "Destroy plan: applying it destroys every resource listed.\n\
             Plan: 0 to add, 0 to change, 2 to destroy.\n\n\
             Destroy (2):\n  - null_resource.a\n  - null_resource.b"
        );
        let nothing =
            json!({"add": 0, "change": 0, "destroy": 0, "mode": "destroy", "resources": []});
        assert!(plan_summary(&nothing).starts_with("Destroy plan: no changes."));
    }

    #[test]
    fn the_workspace_is_the_control_planes() {
        let c = ConfigArgs {
            repo: Some("https://u:tok@git.example/r.git".into()),
            version: Some("v1".into()),
            path: Some("envs/prod/".into()),
            ..ConfigArgs::default()
        };
        assert_eq!(
            workspace_of(&c.params().unwrap()),
            "https://git.example/r.git#envs/prod"
        );
        let k = ConfigArgs {
            workspace_key: Some("web".into()),
            ..c
        };
        assert_eq!(workspace_of(&k.params().unwrap()), "web");
        assert!(ConfigArgs::default().params().is_err());
        assert!(ConfigArgs::default().is_empty());
    }
}
