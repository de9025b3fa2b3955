//! `trellis deploy apply`: a `terraform_apply` command on an agent, with the variables
//! from `--var-file` (a JSON object) and `--var k=v` (strings, later ones win). `plan`
//! and `destroy` are not in the API yet: they say so and exit 2 rather than pretend.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::commands::follow_new;
use super::{connect, output, CliError, Exit, Output};

#[derive(clap::Subcommand)]
pub enum DeployCmd {
    /// Apply a Terraform configuration from a git repository on an agent.
    Apply(Box<ApplyArgs>),
    /// Not available yet (no plan-only command in the API); exits 2.
    Plan {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// Not available yet (no Terraform destroy command in the API); exits 2.
    Destroy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The agent (its id) that runs Terraform.
    #[arg(long)]
    agent: String,
    /// Git URL, `file://` URL or local path (on the agent) of the repository.
    #[arg(long)]
    repo: String,
    /// Tag, branch or commit.
    #[arg(long)]
    version: String,
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
    /// Applies with the same key never run at once on the agent (default: repo and path).
    #[arg(long)]
    workspace_key: Option<String>,
    /// Seconds before the command times out (the server's default when unset).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Submitting twice with the same key starts one command.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the apply to its end (exit code as `commands follow`).
    #[arg(long)]
    follow: bool,
}

pub async fn run(cmd: DeployCmd, out: Output) -> Result<Exit, CliError> {
    let a = match cmd {
        DeployCmd::Apply(a) => *a,
        DeployCmd::Plan { .. } | DeployCmd::Destroy { .. } => {
            eprintln!(
                "error: `trellis deploy plan` and `trellis deploy destroy` are not available yet: \
                 the API has no Terraform plan or destroy command. Only `deploy apply` is."
            );
            return Ok(Exit::Error);
        }
    };
    let vars = variables(a.var_file.as_deref(), &a.vars)?;
    let mut source = json!({ "repo": a.repo, "version": a.version });
    if let Some(p) = a.path {
        source["path"] = p.into();
    }
    let mut params = json!({
        "template_source": source,
        "terraform_vars": vars,
        "sensitive_vars": a.sensitive,
    });
    if let Some(k) = a.workspace_key {
        params["workspace_key"] = k.into();
    }
    let mut body = json!({ "agentId": a.agent, "type": "terraform_apply", "params": params });
    if let Some(t) = a.timeout_secs {
        body["timeoutSecs"] = t.into();
    }
    if let Some(k) = a.idempotency_key {
        body["idempotencyKey"] = k.into();
    }
    let client = connect()?;
    let r = client.post("/api/commands", &body).await?;
    let id = r["commandId"].as_str().unwrap_or_default().to_string();
    if a.follow {
        return follow_new(&client, &id, out).await;
    }
    if out == Output::Json {
        output::json(&r);
    } else {
        println!(
            "command {id} {}  (trellis commands follow {id})",
            output::cell(&r["status"])
        );
    }
    Ok(Exit::Ok)
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
}
