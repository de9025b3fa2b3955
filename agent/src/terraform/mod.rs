//! `terraform_apply` executor.
//! (Interface only; the executor lands with the Terraform issue.)

use trellis_protocol::{CommandError, TerraformApplyParams, TerraformApplyResult};

use crate::exec::ExecContext;

#[derive(Debug, Clone)]
pub struct TerraformSettings {
    /// `TENDRIL_TERRAFORM_BIN` (default `terraform` on `PATH`).
    pub binary: std::path::PathBuf,
    /// `TENDRIL_TERRAFORM_PLUGIN_DIR`: passed as `-plugin-dir` to `terraform init`.
    pub plugin_dir: Option<std::path::PathBuf>,
}

impl TerraformSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            binary: std::env::var_os("TENDRIL_TERRAFORM_BIN")
                .map(Into::into)
                .unwrap_or_else(|| "terraform".into()),
            plugin_dir: std::env::var_os("TENDRIL_TERRAFORM_PLUGIN_DIR").map(Into::into),
        })
    }
}

pub async fn apply(
    _ctx: &ExecContext,
    _p: TerraformApplyParams,
) -> Result<TerraformApplyResult, CommandError> {
    Err(CommandError::new(
        "unsupported_command",
        "this agent build has no Terraform executor",
    ))
}
