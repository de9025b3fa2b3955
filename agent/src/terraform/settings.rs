//! The Terraform executor's settings, and the `TENDRIL_TERRAFORM_*` / `TENDRIL_GIT_BIN`
//! flags and environment variables they come from.
//!
//! Declared here, next to the executor that uses them, and flattened into the agent's CLI
//! so that `tendril --help` lists them; the agent's config depends on this module, never
//! the other way round.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Default cap on the log output of one command.
pub const DEFAULT_LOG_CAP_BYTES: u64 = 50 * 1024 * 1024;
/// Default time a workspace is kept after its command last used it.
pub const DEFAULT_WORKSPACE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default time terraform gets to stop after SIGINT before it is killed.
pub const DEFAULT_SIGINT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TerraformSettings {
    /// `TENDRIL_TERRAFORM_BIN` (default `terraform` on `PATH`).
    pub binary: PathBuf,
    /// `TENDRIL_TERRAFORM_PLUGIN_DIR`: passed as `-plugin-dir` to `terraform init`, which
    /// then installs providers from there only (no registry access).
    pub plugin_dir: Option<PathBuf>,
    /// `TENDRIL_GIT_BIN` (default `git` on `PATH`).
    pub git_binary: PathBuf,
    /// `TENDRIL_TERRAFORM_LOG_CAP_BYTES`: most stdout/stderr shipped per command
    /// (default 50 MiB); the rest is dropped with a `[output truncated …]` marker.
    pub log_cap_bytes: u64,
    /// `TENDRIL_TERRAFORM_RETENTION_SECS`: workspaces unused for longer are removed
    /// (default 7 days).
    pub workspace_retention: Duration,
    /// `TENDRIL_TERRAFORM_SIGINT_GRACE_MS`: time between SIGINT and SIGKILL on cancel
    /// (default 10 s).
    pub sigint_grace: Duration,
}

impl Default for TerraformSettings {
    fn default() -> Self {
        Self {
            binary: "terraform".into(),
            plugin_dir: None,
            git_binary: "git".into(),
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
            workspace_retention: DEFAULT_WORKSPACE_RETENTION,
            sigint_grace: DEFAULT_SIGINT_GRACE,
        }
    }
}

/// The Terraform settings as given on the command line or in the environment. Values are
/// taken as text and checked in [`TerraformArgs::into_settings`], so an empty variable
/// means "unset" and errors name the variable, as they always did.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Terraform (terraform_apply)")]
pub struct TerraformArgs {
    /// Terraform binary [default: `terraform` on PATH].
    #[arg(
        long = "terraform-bin",
        env = "TENDRIL_TERRAFORM_BIN",
        value_name = "PATH"
    )]
    pub binary: Option<OsString>,
    /// Install providers from this directory only (`terraform init -plugin-dir`).
    #[arg(
        long = "terraform-plugin-dir",
        env = "TENDRIL_TERRAFORM_PLUGIN_DIR",
        value_name = "DIR"
    )]
    pub plugin_dir: Option<OsString>,
    /// git binary for fetching templates [default: `git` on PATH].
    #[arg(long = "git-bin", env = "TENDRIL_GIT_BIN", value_name = "PATH")]
    pub git_binary: Option<OsString>,
    /// Most stdout/stderr bytes shipped per command [default: 52428800].
    #[arg(
        long = "terraform-log-cap-bytes",
        env = "TENDRIL_TERRAFORM_LOG_CAP_BYTES",
        value_name = "BYTES"
    )]
    pub log_cap_bytes: Option<String>,
    /// Seconds an unused workspace is kept [default: 604800].
    #[arg(
        long = "terraform-retention-secs",
        env = "TENDRIL_TERRAFORM_RETENTION_SECS",
        value_name = "SECS"
    )]
    pub retention_secs: Option<String>,
    /// Milliseconds between SIGINT and SIGKILL on cancel [default: 10000].
    #[arg(
        long = "terraform-sigint-grace-ms",
        env = "TENDRIL_TERRAFORM_SIGINT_GRACE_MS",
        value_name = "MS"
    )]
    pub sigint_grace_ms: Option<String>,
}

impl TerraformArgs {
    /// The settings, defaults filled in; an empty value counts as unset.
    pub fn into_settings(self) -> anyhow::Result<TerraformSettings> {
        fn num(name: &str, value: Option<String>) -> anyhow::Result<Option<u64>> {
            match value {
                Some(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("{name} must be a whole number, got {v:?}")),
                _ => Ok(None),
            }
        }
        fn path(value: Option<OsString>) -> Option<PathBuf> {
            value.filter(|v| !v.is_empty()).map(Into::into)
        }
        let d = TerraformSettings::default();
        Ok(TerraformSettings {
            binary: path(self.binary).unwrap_or(d.binary),
            plugin_dir: path(self.plugin_dir),
            git_binary: path(self.git_binary).unwrap_or(d.git_binary),
            log_cap_bytes: num("TENDRIL_TERRAFORM_LOG_CAP_BYTES", self.log_cap_bytes)?
                .unwrap_or(d.log_cap_bytes),
            workspace_retention: num("TENDRIL_TERRAFORM_RETENTION_SECS", self.retention_secs)?
                .map(Duration::from_secs)
                .unwrap_or(d.workspace_retention),
            sigint_grace: num("TENDRIL_TERRAFORM_SIGINT_GRACE_MS", self.sigint_grace_ms)?
                .map(Duration::from_millis)
                .unwrap_or(d.sigint_grace),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_means_default_and_numbers_are_checked() {
        let s = TerraformArgs {
            binary: Some("".into()),
            plugin_dir: Some("/p".into()),
            log_cap_bytes: Some(" ".into()),
            sigint_grace_ms: Some("1500".into()),
            ..Default::default()
        }
        .into_settings()
        .unwrap();
        assert_eq!(s.binary, PathBuf::from("terraform"));
        assert_eq!(s.plugin_dir, Some(PathBuf::from("/p")));
        assert_eq!(s.log_cap_bytes, DEFAULT_LOG_CAP_BYTES);
        assert_eq!(s.sigint_grace, Duration::from_millis(1500));
        let e = TerraformArgs {
            retention_secs: Some("a week".into()),
            ..Default::default()
        }
        .into_settings()
        .unwrap_err();
        assert!(
            e.to_string().contains("TENDRIL_TERRAFORM_RETENTION_SECS"),
            "{e}"
        );
    }
}
