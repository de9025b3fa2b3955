//! The client CLI: `trellis login|logout|commands|nodes|deploy` talk to a running control
//! plane over its HTTP API (like `gh` or `nomad`), where `trellis agents|admins` work on
//! the database directly. Credentials come from `trellis login` or `TRELLIS_URL` /
//! `TRELLIS_TOKEN`; `--output json` prints the API's JSON for scripts. Exit codes are
//! [`Exit`]'s, so a script can tell a failed command from a broken connection.

mod client;
mod commands;
mod config;
mod deploy;
mod follow;
mod nodes;
mod output;
mod session;

use clap::Subcommand;

pub use output::Output;

/// Flags every client subcommand takes.
#[derive(clap::Args, Clone, Copy)]
pub struct GlobalArgs {
    /// `table` for people, `json` for the API's JSON (one document) for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// The client subcommands, flattened into `trellis`'s own.
#[derive(Subcommand)]
pub enum ClientCmd {
    /// Store the URL and admin token of a control plane for the other client commands.
    Login(session::LoginArgs),
    /// Remove the stored credentials.
    Logout,
    /// Commands run by agents: list, show, follow, cancel, retry.
    Commands {
        #[command(subcommand)]
        command: commands::CommandsCmd,
    },
    /// Nodes (VM records): list, show, create, provision, power, destroy.
    Nodes {
        #[command(subcommand)]
        command: nodes::NodesCmd,
    },
    /// Terraform deployments run by an agent.
    Deploy {
        #[command(subcommand)]
        command: deploy::DeployCmd,
    },
}

/// The process's exit code: what became of the command followed, or that the CLI
/// itself could not do what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done; a followed command `succeeded`.
    Ok = 0,
    /// A followed command `failed`.
    Failed = 1,
    /// Bad usage, an API error, an unreachable control plane.
    Error = 2,
    /// A followed command was `cancelled`.
    Cancelled = 3,
    /// A followed command `timed_out`.
    TimedOut = 4,
}

impl Exit {
    /// The exit code for a command's final status.
    pub fn of_status(status: &str) -> Self {
        match status {
            "succeeded" => Exit::Ok,
            "failed" => Exit::Failed,
            "cancelled" => Exit::Cancelled,
            "timed_out" => Exit::TimedOut,
            _ => Exit::Error,
        }
    }
}

/// Why a client command could not do its work (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("not logged in: run `trellis login` (or set TRELLIS_URL and TRELLIS_TOKEN)")]
    NotLoggedIn,
    #[error("{0}")]
    Config(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The API answered with an error: its status and `{"error": {code, message}}`.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response from the control plane: {0}")]
    Protocol(String),
}

/// Runs a client subcommand and returns the process's exit code. Errors are printed on
/// stderr (a refused token with a hint to log in again).
pub async fn run(cmd: ClientCmd, global: GlobalArgs) -> i32 {
    let out = global.output;
    let r = match cmd {
        ClientCmd::Login(args) => session::login(args, out).await,
        ClientCmd::Logout => session::logout(out),
        ClientCmd::Commands { command } => commands::run(command, out).await,
        ClientCmd::Nodes { command } => nodes::run(command, out).await,
        ClientCmd::Deploy { command } => deploy::run(command, out).await,
    };
    match r {
        Ok(exit) => exit as i32,
        Err(e) => {
            eprintln!("error: {e}");
            if let CliError::Api { status: 401, .. } = e {
                eprintln!(
                    "the token was refused: run `trellis login` (or check TRELLIS_TOKEN/TRELLIS_URL)"
                );
            }
            Exit::Error as i32
        }
    }
}

/// A client for the resolved credentials.
fn connect() -> Result<client::Client, CliError> {
    client::Client::new(&config::resolve()?)
}
