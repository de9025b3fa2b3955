//! `trellis login` and `trellis logout`. The token is read from stdin or a prompt with
//! echo off, never from the command line, where `ps` and shell history would keep it.

use std::io::{IsTerminal, Read};

use serde_json::json;

use super::client::Client;
use super::config::{self, Credentials};
use super::{output, CliError, Exit, Output};

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The control plane's URL (default: `TRELLIS_URL`, the stored one, or
    /// http://127.0.0.1:8080).
    #[arg(long)]
    url: Option<String>,
    /// Read the token from stdin (the first line) instead of prompting for it.
    #[arg(long)]
    token_stdin: bool,
}

pub async fn login(args: LoginArgs, out: Output) -> Result<Exit, CliError> {
    let url = match args.url {
        Some(u) => u,
        None => std::env::var("TRELLIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .or_else(|| config::load().ok().flatten().map(|c| c.url))
            .unwrap_or_else(|| "http://127.0.0.1:8080".into()),
    };
    let url = config::normalize_url(&url)?;
    let token = read_token(args.token_stdin, &url)?;
    let creds = Credentials { url, token };
    // Checked before it is stored: a typo must not replace working credentials.
    let who = Client::new(&creds)?.get("/api/session").await?;
    let path = config::save(&creds)?;
    match out {
        Output::Json => output::json(&json!({
            "url": creds.url,
            "session": who,
            "credentialsFile": path,
        })),
        Output::Table => println!(
            "Logged in to {} as {} (credentials in {})",
            creds.url,
            output::cell(&who["name"]),
            path.display()
        ),
    }
    Ok(Exit::Ok)
}

/// The token from stdin (`--token-stdin`), else from a prompt on the terminal.
fn read_token(from_stdin: bool, url: &str) -> Result<String, CliError> {
    let token = if from_stdin {
        let mut s = String::new();
        std::io::stdin()
            .take(64 * 1024)
            .read_to_string(&mut s)
            .map_err(|e| CliError::Usage(format!("cannot read the token from stdin: {e}")))?;
        s.lines().next().unwrap_or_default().trim().to_string()
    } else if std::io::stdin().is_terminal() {
        let term = console::Term::stderr();
        eprint!("Admin token for {url}: ");
        term.read_secure_line()
            .map_err(|e| CliError::Usage(format!("cannot read the token: {e}")))?
            .trim()
            .to_string()
    } else {
        return Err(CliError::Usage(
            "stdin is not a terminal: pass the token on stdin with --token-stdin".into(),
        ));
    };
    if token.is_empty() {
        return Err(CliError::Usage("the token is empty".into()));
    }
    Ok(token)
}

pub fn logout(out: Output) -> Result<Exit, CliError> {
    let removed = config::remove()?;
    match out {
        Output::Json => output::json(&json!({ "removed": removed })),
        Output::Table => match removed {
            Some(p) => println!("Logged out (removed {})", p.display()),
            None => println!("Not logged in (no stored credentials)"),
        },
    }
    Ok(Exit::Ok)
}
