//! Which executor runs which command. [`Executors`] is built once per agent from its
//! config and owns every executor with its settings and state; the session hands it each
//! parsed command with that command's [`ExecContext`].
//!
//! Kept out of [`crate::exec`] so that the executors depend on the context module and this
//! module depends on the executors, with no cycle between them.

use trellis_protocol::{Command, CommandError, CommandType};

use crate::config::AgentConfig;
use crate::exec::{self, ExecContext, PingExecutor};
use crate::proxmox::{self, ProxmoxExecutor};
use crate::terraform::TerraformExecutor;

#[derive(Debug, Clone)]
pub struct Executors {
    pub ping: PingExecutor,
    /// `None` when Proxmox is not configured.
    pub proxmox: Option<ProxmoxExecutor>,
    pub terraform: TerraformExecutor,
}

impl Executors {
    pub fn from_config(config: &AgentConfig) -> Self {
        Self {
            ping: PingExecutor::new(config.hostname.clone()),
            proxmox: config.proxmox.clone().map(ProxmoxExecutor::new),
            terraform: TerraformExecutor::new(config.terraform.clone(), &config.work_dir)
                .with_state_backend(config.server_ca_file.clone()),
        }
    }

    /// The command types this agent can run now.
    pub fn capabilities(&self) -> Vec<CommandType> {
        let mut caps = vec![CommandType::Ping];
        if terraform_available(&self.terraform.settings().binary) {
            caps.push(CommandType::TerraformApply);
            caps.push(CommandType::TerraformPlan);
            caps.push(CommandType::TerraformDestroy);
        }
        if self.proxmox.is_some() {
            caps.push(CommandType::Provision);
            caps.push(CommandType::ListTemplates);
            caps.push(CommandType::VmPower);
            caps.push(CommandType::Destroy);
        }
        caps
    }

    /// Runs one parsed command to its end and reports the `finished` event.
    pub async fn run(&self, ctx: ExecContext, command: Command) {
        let result = self.execute(&ctx, command).await;
        exec::finish(&ctx, result).await;
    }

    async fn execute(
        &self,
        ctx: &ExecContext,
        command: Command,
    ) -> Result<serde_json::Value, CommandError> {
        fn json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, CommandError> {
            serde_json::to_value(v).map_err(|e| CommandError::new("internal", e.to_string()))
        }
        let proxmox = || self.proxmox.as_ref().ok_or_else(proxmox::not_configured);
        match command {
            Command::Ping(p) => json(self.ping.run(ctx, p).await?),
            Command::ListTemplates(p) => json(proxmox()?.list_templates(ctx, p).await?),
            Command::Provision(p) => json(proxmox()?.provision(ctx, p).await?),
            Command::TerraformApply(p) => json(self.terraform.apply(ctx, p).await?),
            Command::TerraformPlan(p) => json(self.terraform.plan(ctx, p).await?),
            Command::TerraformDestroy(p) => json(self.terraform.destroy(ctx, p).await?),
            Command::VmPower(p) => json(proxmox()?.vm_power(ctx, p).await?),
            Command::Destroy(p) => json(proxmox()?.destroy(ctx, p).await?),
        }
    }
}

/// Whether the configured terraform binary exists (a path, or a name on `PATH`).
fn terraform_available(bin: &std::path::Path) -> bool {
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terraform::TerraformSettings;
    use trellis_protocol::{EventBody, FinalStatus};
    use uuid::Uuid;

    #[tokio::test]
    async fn without_proxmox_only_ping_is_offered_and_proxmox_commands_fail_clearly() {
        let executors = Executors {
            ping: PingExecutor::new("h"),
            proxmox: None,
            terraform: TerraformExecutor::new(
                TerraformSettings {
                    binary: "/nonexistent/terraform".into(),
                    ..Default::default()
                },
                &std::env::temp_dir(),
            ),
        };
        assert_eq!(executors.capabilities(), vec![CommandType::Ping]);
        let (tx, mut rx) = tokio::sync::mpsc::channel(10);
        let id = Uuid::new_v4();
        let command = Command::parse("list_templates", &serde_json::json!({})).unwrap();
        executors
            .run(ExecContext::new(id, id, 1, tx), command)
            .await;
        let Some(EventBody::Finished(outcome)) = rx.recv().await.map(|r| r.body) else {
            panic!("expected the finished event");
        };
        assert_eq!(outcome.status, FinalStatus::Failed);
        assert_eq!(outcome.error.unwrap().code, "proxmox_not_configured");
    }

    #[test]
    fn with_proxmox_the_lifecycle_commands_are_offered() {
        let executors = Executors {
            ping: PingExecutor::new("h"),
            proxmox: Some(ProxmoxExecutor::new(proxmox::ProxmoxSettings::new(
                "https://pve.example:8006",
                "root@pam!trellis",
                "00000000-0000-0000-0000-000000000000",
            ))),
            terraform: TerraformExecutor::new(
                TerraformSettings {
                    binary: "/nonexistent/terraform".into(),
                    ..Default::default()
                },
                &std::env::temp_dir(),
            ),
        };
        assert_eq!(
            executors.capabilities(),
            vec![
                CommandType::Ping,
                CommandType::Provision,
                CommandType::ListTemplates,
                CommandType::VmPower,
                CommandType::Destroy
            ]
        );
    }
}
