//! Stages `wait_network` and `post_provision`: everything that talks to the QEMU guest
//! agent inside the VM — its IPv4 address, and the commands run through `guest-exec`.
//!
//! Kept together because both depend on the guest having booted with a working agent,
//! and both poll it with backoff under the command's cancel token.

use std::time::{Duration, Instant};

use trellis_protocol::{CommandError, LogStream, StageState};

use super::{build_description, cancelled, secs, sleep_or_cancel, Run};

impl Run<'_> {
    pub(super) async fn wait_network(&mut self, timeout: Duration) -> Result<String, CommandError> {
        let vmid = self.vm.unwrap_or_default();
        let c = self.client();
        let started = Instant::now();
        let deadline = started + timeout;
        let st = c
            .vm_status(&self.node, vmid)
            .await
            .map_err(|e| self.api(e))?;
        if !st.agent {
            return Err(CommandError::new(
                "guest_agent_disabled",
                format!("the QEMU guest agent is not enabled for VM {vmid} (config `agent`)"),
            ));
        }
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        loop {
            let state = match c.guest_interfaces(&self.node, vmid).await {
                Ok(ifaces) => {
                    match crate::proxmox::types::pick_ipv4(&ifaces, self.mac.as_deref()) {
                        Some((ip, iface)) => {
                            self.ip = Some(ip);
                            return Ok(format!("IPv4 {ip} on {iface}"));
                        }
                        None => "the guest reports no usable IPv4 address yet".to_string(),
                    }
                }
                Err(e) if e.message().contains("guest agent is not running") => {
                    "the QEMU guest agent is not running yet (guest booting)".to_string()
                }
                Err(e) if e.message().contains("No QEMU guest agent configured") => {
                    return Err(CommandError::new(
                        "guest_agent_disabled",
                        e.message().to_string(),
                    ));
                }
                Err(e) if e.message().contains("is not running") => {
                    return Err(CommandError::new(
                        "vm_not_running",
                        format!(
                            "VM {vmid} stopped while waiting for its network: {}",
                            e.message()
                        ),
                    ));
                }
                Err(e) if e.is_transient() || e.status() == Some(500) => e.message().to_string(),
                Err(e) => return Err(self.api(e)),
            };
            if state != last {
                self.log(format!("waiting for network: {state}")).await;
                let frac = started.elapsed().as_secs_f32() / timeout.as_secs_f32();
                self.ctx
                    .progress(40.0 + 30.0 * frac.min(1.0), Some(state.clone()))
                    .await;
                last = state;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommandError::new(
                    "network_timeout",
                    format!(
                        "VM {vmid} reported no IPv4 address within {} ({last}); check that qemu-guest-agent is \
                         installed and enabled in the template and that net0's bridge has DHCP",
                        secs(timeout)
                    ),
                )
                .retryable());
            }
            sleep_or_cancel(delay.min(deadline - now), &self.ctx.cancel).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
        }
    }

    pub(super) async fn post_provision(&mut self) -> Result<(), CommandError> {
        let t = &self.p.template;
        let commands: Vec<String> = t
            .pre_provision_commands
            .iter()
            .chain(t.post_provision_commands.iter())
            .filter(|c| !c.trim().is_empty())
            .cloned()
            .collect();
        let skip = if self.p.skip_post_provision {
            Some("skipped: skip_post_provision is set")
        } else if commands.is_empty() {
            Some("skipped: no commands to run")
        } else if self.post_done {
            Some("skipped: the commands already ran in an earlier attempt")
        } else {
            None
        };
        if let Some(reason) = skip {
            self.stage = "post_provision";
            if self.ctx.is_cancelled() {
                return Err(cancelled());
            }
            self.ctx
                .stage(
                    "post_provision",
                    StageState::Skipped,
                    Some(95.0),
                    Some(reason.into()),
                )
                .await;
            self.log(format!("[post_provision] {reason}")).await;
            return Ok(());
        }
        let n = commands.len();
        self.begin(
            "post_provision",
            70.0,
            format!("running {n} command(s) in the guest"),
        )
        .await?;
        for (i, cmd) in commands.iter().enumerate() {
            self.guest_command(i + 1, n, cmd).await?;
            self.ctx
                .progress(
                    70.0 + 25.0 * (i + 1) as f32 / n as f32,
                    Some(format!("{}/{n} commands done", i + 1)),
                )
                .await;
        }
        let vmid = self.vm.unwrap_or_default();
        let desc = build_description(
            self.p.template.description.as_deref(),
            self.ctx.root_command_id,
            true,
        );
        if let Err(e) = self
            .client()
            .update_config(&self.node, vmid, &[("description", desc)])
            .await
        {
            self.log(format!(
                "could not mark the commands as done on VM {vmid}: {e}"
            ))
            .await;
        }
        self.post_done = true;
        self.complete(95.0, format!("{n} command(s) succeeded"))
            .await;
        Ok(())
    }

    pub(super) async fn guest_command(
        &self,
        i: usize,
        n: usize,
        cmd: &str,
    ) -> Result<(), CommandError> {
        let vmid = self.vm.unwrap_or_default();
        let c = self.client();
        let started = Instant::now();
        self.log(format!("[{i}/{n}] $ {cmd}")).await;
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), cmd.to_string()];
        let pid = c
            .guest_exec(&self.node, vmid, &argv)
            .await
            .map_err(|e| self.api(e))?;
        let deadline = started + self.settings.command_timeout;
        let mut delay = Duration::from_millis(150);
        let status = loop {
            let s = c
                .guest_exec_status(&self.node, vmid, pid)
                .await
                .map_err(|e| self.api(e))?;
            if s.exited {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(CommandError::new(
                    "command_timeout",
                    format!(
                        "command {i}/{n} `{cmd}` still running after {}",
                        secs(self.settings.command_timeout)
                    ),
                ));
            }
            sleep_or_cancel(delay, &self.ctx.cancel).await?;
            delay = delay.mul_f32(1.5).min(Duration::from_secs(2));
        };
        if let Some(out) = status.out_data.as_deref().filter(|s| !s.is_empty()) {
            self.ctx.log(LogStream::Stdout, out).await;
        }
        if let Some(err) = status.err_data.as_deref().filter(|s| !s.is_empty()) {
            self.ctx.log(LogStream::Stderr, err).await;
        }
        if status.out_truncated || status.err_truncated {
            self.log("(output truncated by the guest agent)").await;
        }
        let code = status.exitcode.unwrap_or(-1);
        let how = match status.signal {
            Some(sig) => format!("killed by signal {sig}"),
            None => format!("exit code {code}"),
        };
        self.log(format!("[{i}/{n}] {how} ({})", secs(started.elapsed())))
            .await;
        if code != 0 || status.signal.is_some() {
            let last_err = status
                .err_data
                .as_deref()
                .and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty()))
                .map(|l| format!(": {}", l.trim()))
                .unwrap_or_default();
            return Err(CommandError::new(
                "post_provision_failed",
                format!("command {i}/{n} `{cmd}` failed with {how}{last_err}"),
            ));
        }
        Ok(())
    }
}
