//! `trellis commands list|show|follow|cancel|retry`.

use serde_json::{json, Value};

use super::client::{query, segment, Client};
use super::{connect, follow, output, CliError, Exit, Output};

#[derive(clap::Subcommand)]
pub enum CommandsCmd {
    /// Commands, newest first.
    List {
        /// Only this agent's (its id).
        #[arg(long)]
        agent: Option<String>,
        /// Only this status (queued, dispatched, running, succeeded, failed, cancelled, timed_out).
        #[arg(long)]
        status: Option<String>,
        /// Only this type (ping, provision, terraform_apply, …).
        #[arg(long = "type")]
        command_type: Option<String>,
        /// At most this many (the server's default when unset).
        #[arg(long)]
        limit: Option<u32>,
        /// The next page: the `nextBefore` of the previous one.
        #[arg(long)]
        before: Option<String>,
    },
    /// One command with its stages.
    Show { id: String },
    /// Live stages, progress and logs to the command's end; the exit code is its outcome
    /// (0 succeeded, 1 failed, 3 cancelled, 4 timed out, 2 could not follow).
    Follow { id: String },
    /// Cancel a queued or running command.
    Cancel {
        id: String,
        /// Then follow it to its end.
        #[arg(long)]
        follow: bool,
    },
    /// Run a failed, cancelled or timed-out command again, as a new attempt.
    Retry {
        id: String,
        /// Then follow the new attempt to its end.
        #[arg(long)]
        follow: bool,
    },
}

pub async fn run(cmd: CommandsCmd, out: Output) -> Result<Exit, CliError> {
    let client = connect()?;
    match cmd {
        CommandsCmd::List {
            agent,
            status,
            command_type,
            limit,
            before,
        } => {
            let q = query(&[
                ("agentId", agent),
                ("status", status),
                ("type", command_type),
                ("limit", limit.map(|l| l.to_string())),
                ("before", before),
            ]);
            let list = client.get(&format!("/api/commands{q}")).await?;
            if out == Output::Json {
                output::json(&list);
                return Ok(Exit::Ok);
            }
            let items = list["items"].as_array().cloned().unwrap_or_default();
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|c| {
                    vec![
                        output::cell(&c["id"]),
                        output::cell(&c["type"]),
                        output::cell(&c["status"]),
                        output::stage_percent(&c["stage"], &c["percent"]),
                        output::cell(&c["agentId"]),
                        output::cell(&c["createdBy"]),
                        output::cell(&c["createdAt"]),
                    ]
                })
                .collect();
            println!(
                "{}",
                output::table(
                    &["ID", "TYPE", "STATUS", "STAGE", "AGENT", "BY", "CREATED"],
                    &rows
                )
            );
            if let Some(next) = list["nextBefore"].as_str() {
                eprintln!("(more: --before {next})");
            }
            Ok(Exit::Ok)
        }
        CommandsCmd::Show { id } => {
            let c = client
                .get(&format!("/api/commands/{}", segment(&id)?))
                .await?;
            if out == Output::Json {
                output::json(&c);
            } else {
                print_command(&c);
            }
            Ok(Exit::Ok)
        }
        CommandsCmd::Follow { id } => follow::follow(&client, &id, out).await,
        CommandsCmd::Cancel { id, follow } => {
            let id = segment(&id)?;
            let c = client
                .post(&format!("/api/commands/{id}/cancel"), &json!({}))
                .await?;
            if follow {
                return follow::follow(&client, id, out).await;
            }
            if out == Output::Json {
                output::json(&c);
            } else {
                println!(
                    "cancel requested for {id} (status {})",
                    output::cell(&c["status"])
                );
            }
            Ok(Exit::Ok)
        }
        CommandsCmd::Retry { id, follow } => {
            let r = client
                .post(
                    &format!("/api/commands/{}/retry", segment(&id)?),
                    &json!({}),
                )
                .await?;
            let new_id = r["commandId"].as_str().unwrap_or_default().to_string();
            if follow {
                return follow_new(&client, &new_id, out).await;
            }
            if out == Output::Json {
                output::json(&r);
            } else {
                println!("command {new_id} (attempt {})", output::cell(&r["attempt"]));
            }
            Ok(Exit::Ok)
        }
    }
}

/// Follows a command the server just answered with (its id must be there).
pub async fn follow_new(client: &Client, id: &str, out: Output) -> Result<Exit, CliError> {
    if id.is_empty() {
        return Err(CliError::Protocol("the response has no commandId".into()));
    }
    if out == Output::Table {
        println!("command {id}");
    }
    follow::follow(client, id, out).await
}

fn print_command(c: &Value) {
    let error = match c["error"]["code"].as_str() {
        Some(code) => format!(
            "{code}: {}",
            c["error"]["message"].as_str().unwrap_or_default()
        ),
        None => "-".into(),
    };
    let result = match &c["result"] {
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    println!(
        "{}",
        output::fields(&[
            ("id", output::cell(&c["id"])),
            ("type", output::cell(&c["type"])),
            ("status", output::cell(&c["status"])),
            ("stage", output::stage_percent(&c["stage"], &c["percent"])),
            ("agent", output::cell(&c["agentId"])),
            ("attempt", output::cell(&c["attempt"])),
            ("retry of", output::cell(&c["retryOf"])),
            ("created by", output::cell(&c["createdBy"])),
            ("created", output::cell(&c["createdAt"])),
            ("started", output::cell(&c["startedAt"])),
            ("finished", output::cell(&c["finishedAt"])),
            ("deadline", output::cell(&c["deadlineAt"])),
            ("error", error),
            ("result", result),
        ])
    );
    let stages = c["stages"].as_array().cloned().unwrap_or_default();
    if !stages.is_empty() {
        let rows: Vec<Vec<String>> = stages
            .iter()
            .map(|s| {
                vec![
                    output::cell(&s["name"]),
                    output::cell(&s["state"]),
                    output::cell(&s["startedAt"]),
                    output::cell(&s["finishedAt"]),
                    output::cell(&s["message"]),
                ]
            })
            .collect();
        println!();
        println!(
            "{}",
            output::table(&["STAGE", "STATE", "STARTED", "FINISHED", "MESSAGE"], &rows)
        );
    }
    // A plan's changes, by action (as `deploy plan --follow` prints them).
    if c["type"] == "terraform_plan" && c["result"].is_object() {
        println!();
        println!("{}", super::deploy::plan_summary(&c["result"]));
    }
}
