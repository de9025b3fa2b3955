//! The Proxmox executor's settings, and the `PROXMOX_*` flags and environment variables
//! they come from.
//!
//! The executor declares its own command-line surface ([`ProxmoxArgs`], flattened into the
//! agent's CLI) so that `tendril --help` lists every variable, while the agent's config
//! depends on the executor and never the other way round.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// Connection settings read from `PROXMOX_*` environment variables.
#[derive(Debug, Clone)]
pub struct ProxmoxSettings {
    pub url: String,
    pub token_id: String,
    pub token_secret: Secret,
    pub tls_fingerprint: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub insecure_tls: bool,
    /// Per HTTP request (`PROXMOX_TIMEOUT_SECS`, default 30). Long work is always an
    /// async task polled by UPID, so requests themselves stay short.
    pub request_timeout: Duration,
    /// How long one Proxmox task (clone, start, stop, destroy) may run
    /// (`PROXMOX_TASK_TIMEOUT_SECS`, default 1800: full clones of big disks are slow).
    pub task_timeout: Duration,
    /// How long one guest command may run (`PROXMOX_COMMAND_TIMEOUT_SECS`, default 1800).
    pub command_timeout: Duration,
    /// Clones running at once from this agent (`PROXMOX_MAX_PARALLEL_CLONES`, default 2):
    /// parallel clones on one storage run into storage lock timeouts.
    pub max_parallel_clones: usize,
}

impl ProxmoxSettings {
    /// Settings with defaults for everything but the connection.
    pub fn new(
        url: impl Into<String>,
        token_id: impl Into<String>,
        token_secret: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            token_id: token_id.into(),
            token_secret: Secret::new(token_secret),
            tls_fingerprint: None,
            ca_file: None,
            insecure_tls: false,
            request_timeout: Duration::from_secs(30),
            task_timeout: Duration::from_secs(1800),
            command_timeout: Duration::from_secs(1800),
            max_parallel_clones: 2,
        }
    }
}

/// The Proxmox connection as given on the command line or in the environment. Values are
/// taken as text and checked in [`ProxmoxArgs::into_settings`], so that an empty variable
/// means "unset" exactly as before and errors name the variable.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Proxmox VE (provision, list_templates)")]
pub struct ProxmoxArgs {
    /// Proxmox VE API URL, e.g. `https://pve.example:8006`. Unset: no Proxmox commands.
    #[arg(long = "proxmox-url", env = "PROXMOX_URL", value_name = "URL")]
    pub url: Option<String>,
    /// API token id, `USER@REALM!TOKENID`.
    #[arg(long = "proxmox-token-id", env = "PROXMOX_TOKEN_ID", value_name = "ID")]
    pub token_id: Option<String>,
    /// API token secret (a UUID).
    #[arg(
        long = "proxmox-token-secret",
        env = "PROXMOX_TOKEN_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub token_secret: Option<Secret>,
    /// SHA-256 fingerprint of the server certificate to pin (`AA:BB:…`).
    #[arg(
        long = "proxmox-tls-fingerprint",
        env = "PROXMOX_TLS_FINGERPRINT",
        value_name = "SHA256"
    )]
    pub tls_fingerprint: Option<String>,
    /// CA certificate (PEM) that signed the Proxmox server certificate.
    #[arg(long = "proxmox-ca-file", env = "PROXMOX_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<std::ffi::OsString>,
    /// `1` or `true`: accept any server certificate (testing only).
    #[arg(
        long = "proxmox-insecure-tls",
        env = "PROXMOX_INSECURE_TLS",
        value_name = "1|true"
    )]
    pub insecure_tls: Option<String>,
    /// Seconds one HTTP request may take [default: 30].
    #[arg(
        long = "proxmox-timeout-secs",
        env = "PROXMOX_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub timeout_secs: Option<String>,
    /// Seconds one Proxmox task (clone, start, stop, destroy) may take [default: 1800].
    #[arg(
        long = "proxmox-task-timeout-secs",
        env = "PROXMOX_TASK_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub task_timeout_secs: Option<String>,
    /// Seconds one command in the guest may take [default: 1800].
    #[arg(
        long = "proxmox-command-timeout-secs",
        env = "PROXMOX_COMMAND_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub command_timeout_secs: Option<String>,
    /// Clones running at once from this agent [default: 2].
    #[arg(
        long = "proxmox-max-parallel-clones",
        env = "PROXMOX_MAX_PARALLEL_CLONES",
        value_name = "N"
    )]
    pub max_parallel_clones: Option<String>,
}

impl ProxmoxArgs {
    /// `Ok(None)` when `PROXMOX_URL` is unset.
    pub fn into_settings(self) -> anyhow::Result<Option<ProxmoxSettings>> {
        let Some(url) = self.url else {
            return Ok(None);
        };
        let token_id = self
            .token_id
            .ok_or_else(|| anyhow::anyhow!("PROXMOX_URL is set but PROXMOX_TOKEN_ID is not"))?;
        let token_secret = self
            .token_secret
            .ok_or_else(|| anyhow::anyhow!("PROXMOX_URL is set but PROXMOX_TOKEN_SECRET is not"))?;
        super::client::validate_token_id(&token_id).map_err(|e| anyhow::anyhow!(e))?;
        let secs = |name: &str, value: Option<String>, default: u64| -> anyhow::Result<Duration> {
            match value {
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .map(Duration::from_secs)
                    .ok_or_else(|| {
                        anyhow::anyhow!("{name} must be a positive number of seconds, got {v:?}")
                    }),
                None => Ok(Duration::from_secs(default)),
            }
        };
        let mut s = ProxmoxSettings::new(url, token_id, String::new());
        s.token_secret = token_secret;
        s.tls_fingerprint = self.tls_fingerprint.filter(|f| !f.trim().is_empty());
        if let Some(fp) = &s.tls_fingerprint {
            super::tls::parse_fingerprint(fp).map_err(|e| anyhow::anyhow!(e))?;
        }
        s.ca_file = self.ca_file.filter(|v| !v.is_empty()).map(Into::into);
        s.insecure_tls = self.insecure_tls.is_some_and(|v| v == "1" || v == "true");
        s.request_timeout = secs("PROXMOX_TIMEOUT_SECS", self.timeout_secs, 30)?;
        s.task_timeout = secs("PROXMOX_TASK_TIMEOUT_SECS", self.task_timeout_secs, 1800)?;
        s.command_timeout = secs(
            "PROXMOX_COMMAND_TIMEOUT_SECS",
            self.command_timeout_secs,
            1800,
        )?;
        if let Some(v) = self.max_parallel_clones {
            s.max_parallel_clones = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    anyhow::anyhow!("PROXMOX_MAX_PARALLEL_CLONES must be ≥ 1, got {v:?}")
                })?;
        }
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> ProxmoxArgs {
        ProxmoxArgs {
            url: Some(url.into()),
            token_id: Some("root@pam!trellis".into()),
            token_secret: Some("s3cret".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_checks() {
        assert!(ProxmoxArgs::default().into_settings().unwrap().is_none());
        let s = args("https://pve:8006").into_settings().unwrap().unwrap();
        assert_eq!(s.request_timeout, Duration::from_secs(30));
        assert_eq!(s.max_parallel_clones, 2);
        assert!(!s.insecure_tls);
        assert_eq!(s.token_secret.expose(), "s3cret");

        let mut a = args("https://pve:8006");
        a.insecure_tls = Some("true".into());
        a.tls_fingerprint = Some("  ".into());
        a.ca_file = Some("".into());
        let s = a.into_settings().unwrap().unwrap();
        assert!(s.insecure_tls && s.tls_fingerprint.is_none() && s.ca_file.is_none());

        let mut a = args("https://pve:8006");
        a.timeout_secs = Some("0".into());
        let e = a.into_settings().unwrap_err().to_string();
        assert!(e.contains("PROXMOX_TIMEOUT_SECS"), "{e}");

        let mut a = args("https://pve:8006");
        a.token_secret = None;
        let e = a.into_settings().unwrap_err().to_string();
        assert!(e.contains("PROXMOX_TOKEN_SECRET is not"), "{e}");
    }
}
