//! `trellis nodes list|show|create|provision|power|destroy`. Actions that start a command
//! print its id; `--follow` follows it to its end (exit code as `commands follow`).

use std::io::IsTerminal;

use serde_json::{json, Map, Value};

use super::client::{query, segment, Client};
use super::commands::follow_new;
use super::{connect, output, CliError, Exit, Output};

#[derive(clap::Subcommand)]
pub enum NodesCmd {
    /// Nodes with their status and any command running on them.
    List {
        /// Only the nodes of this bulk provision.
        #[arg(long)]
        batch: Option<String>,
    },
    /// One node.
    Show { id: String },
    /// Create a node record, optionally provisioning it at once (all or nothing).
    Create {
        #[arg(long)]
        name: String,
        /// The Trellis template's id.
        #[arg(long)]
        template: String,
        /// MiB (default: the template's).
        #[arg(long)]
        memory: Option<i64>,
        #[arg(long)]
        cores: Option<i64>,
        #[arg(long)]
        application: Option<String>,
        /// Provision it on this hypervisor (agent id) right away.
        #[arg(long)]
        provision_on: Option<String>,
        #[command(flatten)]
        provision: ProvisionArgs,
        /// Allow a name another live node has.
        #[arg(long)]
        force: bool,
    },
    /// Provision a node's VM on a hypervisor.
    Provision {
        id: String,
        /// The hypervisor (agent id).
        #[arg(long)]
        agent: String,
        #[command(flatten)]
        provision: ProvisionArgs,
    },
    /// Start, shut down, stop or reboot a node's VM.
    Power {
        id: String,
        action: PowerAction,
        /// Seconds Proxmox may take.
        #[arg(long)]
        timeout_s: Option<u32>,
        /// For `shutdown`: a hard stop after this many seconds.
        #[arg(long)]
        force_after_s: Option<u32>,
        #[command(flatten)]
        follow: FollowArg,
    },
    /// Destroy a node's VM (the record is kept as `destroyed`).
    Destroy {
        id: String,
        /// The node's name, to confirm (asked for on a terminal when not given).
        #[arg(long)]
        confirm: Option<String>,
        #[command(flatten)]
        follow: FollowArg,
    },
}

#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// The Proxmox node to clone on (default: the template's).
    #[arg(long)]
    target_node: Option<String>,
    /// Keep a VM that failed half-way, for inspection.
    #[arg(long)]
    keep_on_failure: bool,
    #[command(flatten)]
    follow: FollowArg,
}

#[derive(clap::Args)]
pub struct FollowArg {
    /// Follow the command started to its end (exit code as `commands follow`; with
    /// `--output json` the finished command is printed).
    #[arg(long)]
    follow: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PowerAction {
    Start,
    Shutdown,
    Stop,
    Reboot,
}

impl PowerAction {
    fn as_str(self) -> &'static str {
        match self {
            PowerAction::Start => "start",
            PowerAction::Shutdown => "shutdown",
            PowerAction::Stop => "stop",
            PowerAction::Reboot => "reboot",
        }
    }
}

pub async fn run(cmd: NodesCmd, out: Output) -> Result<Exit, CliError> {
    let client = connect()?;
    match cmd {
        NodesCmd::List { batch } => {
            let list = client
                .get(&format!("/api/nodes{}", query(&[("batchId", batch)])))
                .await?;
            if out == Output::Json {
                output::json(&list);
                return Ok(Exit::Ok);
            }
            let items = list["items"].as_array().cloned().unwrap_or_default();
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|n| {
                    let p = &n["progress"];
                    let progress = if p.is_object() {
                        format!(
                            "{} {}",
                            output::cell(&p["commandType"]),
                            output::stage_percent(&p["stage"], &p["percent"])
                        )
                    } else {
                        "-".into()
                    };
                    vec![
                        output::cell(&n["id"]),
                        output::cell(&n["name"]),
                        output::cell(&n["status"]),
                        output::cell(&n["vmId"]),
                        output::cell(&n["ipAddress"]),
                        output::cell(&n["application"]),
                        progress,
                    ]
                })
                .collect();
            println!(
                "{}",
                output::table(
                    &[
                        "ID",
                        "NAME",
                        "STATUS",
                        "VMID",
                        "IP",
                        "APPLICATION",
                        "PROGRESS"
                    ],
                    &rows
                )
            );
            Ok(Exit::Ok)
        }
        NodesCmd::Show { id } => {
            let n = client.get(&format!("/api/nodes/{}", segment(&id)?)).await?;
            if out == Output::Json {
                output::json(&n);
            } else {
                let keys = [
                    ("id", "id"),
                    ("name", "name"),
                    ("status", "status"),
                    ("application", "application"),
                    ("template", "templateId"),
                    ("memory", "memory"),
                    ("cores", "cores"),
                    ("vm id", "vmId"),
                    ("vm node", "vmNode"),
                    ("hypervisor", "hypervisorId"),
                    ("ip address", "ipAddress"),
                    ("last command", "lastCommandId"),
                    ("error", "error"),
                    ("created", "createdAt"),
                    ("updated", "updatedAt"),
                ];
                let pairs: Vec<(&str, String)> = keys
                    .iter()
                    .map(|(k, f)| (*k, output::cell(&n[*f])))
                    .collect();
                println!("{}", output::fields(&pairs));
            }
            Ok(Exit::Ok)
        }
        NodesCmd::Create {
            name,
            template,
            memory,
            cores,
            application,
            provision_on,
            provision,
            force,
        } => {
            let mut body = Map::new();
            body.insert("name".into(), name.into());
            body.insert("templateId".into(), template.into());
            if let Some(m) = memory {
                body.insert("memory".into(), m.into());
            }
            if let Some(c) = cores {
                body.insert("cores".into(), c.into());
            }
            if let Some(a) = application {
                body.insert("application".into(), a.into());
            }
            if force {
                body.insert("force".into(), true.into());
            }
            let follow = provision.follow.follow;
            if let Some(agent) = provision_on {
                body.insert("provision".into(), provision_body(agent, &provision));
            } else if follow || provision.target_node.is_some() || provision.keep_on_failure {
                return Err(CliError::Usage(
                    "--follow, --target-node and --keep-on-failure need --provision-on".into(),
                ));
            }
            let r = client.post("/api/nodes", &Value::Object(body)).await?;
            started(&client, &r, follow, out).await
        }
        NodesCmd::Provision {
            id,
            agent,
            provision,
        } => {
            let body = provision_body(agent, &provision);
            let r = client
                .post(&format!("/api/nodes/{}/provision", segment(&id)?), &body)
                .await?;
            started(&client, &r, provision.follow.follow, out).await
        }
        NodesCmd::Power {
            id,
            action,
            timeout_s,
            force_after_s,
            follow,
        } => {
            let mut body = json!({ "action": action.as_str() });
            if let Some(t) = timeout_s {
                body["timeoutS"] = t.into();
            }
            if let Some(t) = force_after_s {
                body["forceAfterS"] = t.into();
            }
            let r = client
                .post(&format!("/api/nodes/{}/power", segment(&id)?), &body)
                .await?;
            started(&client, &r, follow.follow, out).await
        }
        NodesCmd::Destroy {
            id,
            confirm,
            follow,
        } => {
            let id = segment(&id)?;
            let confirm = match confirm {
                Some(c) => c,
                None => ask_name(&client, id).await?,
            };
            let r = client
                .post(
                    &format!("/api/nodes/{id}/destroy"),
                    &json!({ "confirmName": confirm }),
                )
                .await?;
            started(&client, &r, follow.follow, out).await
        }
    }
}

fn provision_body(agent: String, p: &ProvisionArgs) -> Value {
    let mut body = json!({ "agentId": agent });
    if let Some(t) = &p.target_node {
        body["targetNode"] = t.clone().into();
    }
    if p.keep_on_failure {
        body["keepOnFailure"] = true.into();
    }
    body
}

/// The answer of an action that may have started a command (`{node, commandId?}`):
/// printed, or its command followed.
async fn started(client: &Client, r: &Value, follow: bool, out: Output) -> Result<Exit, CliError> {
    let node = if r["node"].is_object() { &r["node"] } else { r };
    let command = r["commandId"].as_str().unwrap_or_default();
    if follow && !command.is_empty() {
        if out == Output::Table {
            println!(
                "node {} ({}) {}",
                output::cell(&node["name"]),
                output::cell(&node["id"]),
                output::cell(&node["status"])
            );
        }
        return follow_new(client, command, out).await;
    }
    if out == Output::Json {
        output::json(r);
        return Ok(Exit::Ok);
    }
    println!(
        "node {} ({}) {}",
        output::cell(&node["name"]),
        output::cell(&node["id"]),
        output::cell(&node["status"])
    );
    if !command.is_empty() {
        println!("command {command}  (trellis commands follow {command})");
    }
    Ok(Exit::Ok)
}

/// Asks for the node's name on the terminal, as the UI does before a destroy.
async fn ask_name(client: &Client, id: &str) -> Result<String, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "destroy needs --confirm <the node's name> when stdin is not a terminal".into(),
        ));
    }
    let n = client.get(&format!("/api/nodes/{id}")).await?;
    let name = output::cell(&n["name"]);
    eprint!("Destroy the VM of node {name}? Type its name to confirm: ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("cannot read the confirmation: {e}")))?;
    Ok(line.trim().to_string())
}
