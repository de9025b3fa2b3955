//! The `vm_power` executor: start, shut down, stop or reboot one VM and wait until
//! Proxmox reports the new state.
//!
//! Stages: `request` (the power call, followed by its task to the end) and `wait_state`
//! (`status/current` until the VM is `running` or `stopped`, bounded by `timeout_s`,
//! default 120 s). A task that ended is not a state that was reached: an HA-managed VM,
//! for one, changes state only after its task.
//!
//! * The `node` param is a hint: a VM that is not there is looked up in
//!   `/cluster/resources` (it may have been migrated) and followed.
//! * Nothing to do (start of a running VM, stop or shutdown of a stopped one) succeeds at
//!   once without a task. A reboot of a stopped VM starts it.
//! * `shutdown` is an ACPI / guest-agent request with Proxmox's `timeout` set to
//!   `force_after_s` (else `timeout_s`) and no `forceStop`. A guest that ignores it makes
//!   the task fail at the timeout: with `force_after_s` the VM is then stopped hard and the
//!   result says `forced`; without it the command fails with `shutdown_timeout`.
//! * Cancel is honoured between every call and in every wait.
//!
//! Error codes: `vm_not_found`, `vm_is_template`, `shutdown_timeout`, `reboot_timeout`,
//! `vm_state_timeout` (retryable), `proxmox_task_failed`, `proxmox_task_timeout`, and the
//! client's `proxmox_*` codes.

use std::time::{Duration, Instant};

use trellis_protocol::{
    CommandError, PowerAction, StageState, VmPowerParams, VmPowerResult, VmState,
};

use super::client::{ProxmoxClient, Repeat};
use super::op::{cancelled, Op, TaskEnd, VmLocks};
use super::types::VmStatus;
use super::upid::Upid;
use super::ProxmoxSettings;
use crate::exec::ExecContext;

/// `timeout_s` when the command gives none.
pub const DEFAULT_TIMEOUT_S: u32 = 120;

/// Runs one `vm_power`. `client` is the executor's client for this command, or what is
/// wrong with its settings (reported as the first stage failing).
pub async fn run(
    ctx: &ExecContext,
    settings: &ProxmoxSettings,
    locks: &VmLocks,
    client: Result<ProxmoxClient, CommandError>,
    p: VmPowerParams,
) -> Result<VmPowerResult, CommandError> {
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            ctx.stage(
                "request",
                StageState::Failed,
                Some(0.0),
                Some(e.message.clone()),
            )
            .await;
            return Err(e.at_stage("request"));
        }
    };
    let lock = locks.lock_for(p.vm_id);
    let _guard = tokio::select! {
        g = lock.lock() => g,
        _ = ctx.cancel.cancelled() => return Err(cancelled().at_stage("request")),
    };
    let mut op = Op::new(ctx, client, settings, p.vm_id, &p.node);
    match steps(&mut op, &p).await {
        Ok(r) => Ok(r),
        Err(e) => Err(op.fail(e).await),
    }
}

fn not_found(vmid: u32, node: &str) -> CommandError {
    CommandError::new(
        "vm_not_found",
        format!("VM {vmid} does not exist (not on node {node} nor anywhere else in the cluster)"),
    )
}

/// The state `status/current` reports, as far as power actions go.
fn state_of(st: &VmStatus) -> VmState {
    if st.is_running() {
        VmState::Running
    } else {
        VmState::Stopped
    }
}

/// What the `request` stage does for `action` on a VM that is (not) running: the call to
/// make, or `None` with the reason there is nothing to do.
pub fn plan(action: PowerAction, running: bool) -> Result<PowerAction, &'static str> {
    match (action, running) {
        (PowerAction::Start, true) => Err("already running"),
        (PowerAction::Stop | PowerAction::Shutdown, false) => Err("already stopped"),
        // A reboot needs a running VM; the state it asks for is reached by a start.
        (PowerAction::Reboot, false) => Ok(PowerAction::Start),
        (a, _) => Ok(a),
    }
}

async fn steps(op: &mut Op<'_>, p: &VmPowerParams) -> Result<VmPowerResult, CommandError> {
    let vmid = p.vm_id;
    let timeout_s = p.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S).max(1);
    let target = p.action.target();
    op.begin(
        "request",
        0.0,
        format!("{} VM {vmid} on {}", p.action.as_str(), p.node),
    )
    .await?;
    let st = op.status().await?.ok_or_else(|| not_found(vmid, &p.node))?;
    if st.template {
        return Err(CommandError::new(
            "vm_is_template",
            format!("VM {vmid} is a template; templates cannot be powered on or off"),
        ));
    }
    let mut forced = false;
    match plan(p.action, st.is_running()) {
        Err(why) => {
            op.complete(50.0, format!("VM {vmid} is {why}; nothing to do"))
                .await;
        }
        Ok(action) => {
            if action != p.action {
                op.log(format!(
                    "VM {vmid} is stopped: starting it (a reboot needs a running VM)"
                ))
                .await;
            }
            let mut params: Vec<(&str, String)> = Vec::new();
            let shutdown_s = p.force_after_s.unwrap_or(timeout_s);
            match action {
                PowerAction::Shutdown => params.push(("timeout", shutdown_s.to_string())),
                PowerAction::Reboot => params.push(("timeout", timeout_s.to_string())),
                _ => {}
            }
            let summary = match request(op, action, &params).await? {
                None => format!("VM {vmid} needed no {}", action.as_str()),
                Some(upid) => match op.wait_task(&upid, action.as_str()).await? {
                    TaskEnd::Ok => format!("{} task ended OK", action.as_str()),
                    // Started by someone else between our look and the task.
                    TaskEnd::Failed(err)
                        if action == PowerAction::Start && err.contains("already running") =>
                    {
                        format!("VM {vmid} was started meanwhile")
                    }
                    TaskEnd::Failed(err) => {
                        forced = task_failed(op, p, action, shutdown_s, timeout_s, err).await?;
                        if forced {
                            format!("the guest ignored the shutdown for {shutdown_s} s; stopped it hard")
                        } else {
                            "the shutdown task failed but the VM stopped".to_string()
                        }
                    }
                },
            };
            op.complete(50.0, summary).await;
        }
    }

    op.begin(
        "wait_state",
        50.0,
        format!(
            "waiting up to {timeout_s} s for VM {vmid} to be {}",
            target.as_str()
        ),
    )
    .await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout_s.into());
    let mut delay = Duration::from_millis(100);
    loop {
        let st = op.status().await?.ok_or_else(|| {
            CommandError::new(
                "vm_not_found",
                format!(
                    "VM {vmid} disappeared while waiting for it to be {}",
                    target.as_str()
                ),
            )
        })?;
        if state_of(&st) == target {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CommandError::new(
                "vm_state_timeout",
                format!(
                    "VM {vmid} is still {} {timeout_s} s after the {} request (an HA-managed VM changes state \
                     only when the HA manager acts; check its HA state in Proxmox)",
                    st.status,
                    p.action.as_str()
                ),
            )
            .retryable());
        }
        op.sleep(delay).await?;
        delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
    }
    op.complete(100.0, format!("VM {vmid} is {}", target.as_str()))
        .await;
    Ok(VmPowerResult {
        vm_id: vmid,
        node: op.node.clone(),
        status: target,
        forced,
    })
}

/// Sends the power call; `None` when Proxmox says there is nothing to do. Follows the VM
/// once when it is no longer on the node we knew.
async fn request(
    op: &mut Op<'_>,
    action: PowerAction,
    params: &[(&str, String)],
) -> Result<Option<Upid>, CommandError> {
    let name = action.as_str();
    // Stop is safe to repeat; a second start/shutdown/reboot after an unknown outcome
    // would be a second request.
    let repeat = if action == PowerAction::Stop {
        Repeat::Safe
    } else {
        Repeat::Unsafe
    };
    for attempt in 1..=2 {
        if op.ctx.is_cancelled() {
            return Err(cancelled());
        }
        match op
            .client
            .power_with(&op.node, op.vmid, name, params, repeat)
            .await
        {
            Ok(upid) => {
                op.log(format!("{name} task {upid}")).await;
                return Ok(Some(upid));
            }
            Err(e) if action == PowerAction::Start && e.message().contains("already running") => {
                return Ok(None)
            }
            Err(e)
                if matches!(action, PowerAction::Stop | PowerAction::Shutdown)
                    && e.message().contains("not running") =>
            {
                return Ok(None)
            }
            Err(e) if e.is_missing() && attempt == 1 => {
                if op.relocate().await?.is_none() {
                    return Err(not_found(op.vmid, &op.node));
                }
            }
            Err(e) => return Err(op.api(&e)),
        }
    }
    Err(not_found(op.vmid, &op.node))
}

/// A power task failed with `err`. For a shutdown the guest ignored, stops the VM when
/// `force_after_s` allows (returns `true`: forced); every other case is an error.
async fn task_failed(
    op: &mut Op<'_>,
    p: &VmPowerParams,
    action: PowerAction,
    shutdown_s: u32,
    timeout_s: u32,
    err: String,
) -> Result<bool, CommandError> {
    let vmid = op.vmid;
    let lower = err.to_ascii_lowercase();
    let timed_out = lower.contains("timeout") || lower.contains("timed out");
    let locked = lower.contains("locked") || lower.contains("can't lock");
    if action == PowerAction::Shutdown && !locked {
        let st = op.status().await?.ok_or_else(|| not_found(vmid, &p.node))?;
        if !st.is_running() {
            // It stopped after all (e.g. right at the timeout).
            return Ok(false);
        }
        let Some(force) = p.force_after_s else {
            return Err(CommandError::new(
                "shutdown_timeout",
                format!(
                    "the guest did not shut down within {shutdown_s} s (no ACPI or guest agent?); use Stop, or \
                     shutdown with force_after_s (Proxmox: {err})"
                ),
            ));
        };
        op.log(format!(
            "the guest did not shut down within {force} s ({err}); stopping VM {vmid} hard"
        ))
        .await;
        if let Some(upid) = request(op, PowerAction::Stop, &[]).await? {
            op.wait_task_ok(&upid, "stop").await?;
        }
        return Ok(true);
    }
    if action == PowerAction::Reboot && timed_out {
        return Err(CommandError::new(
            "reboot_timeout",
            format!(
                "the guest did not shut down for the reboot within {timeout_s} s (no ACPI or guest agent?); \
                 use Stop and Start instead (Proxmox: {err})"
            ),
        ));
    }
    Err(CommandError::new(
        "proxmox_task_failed",
        format!(
            "Proxmox {} task for VM {vmid} failed: {err}",
            action.as_str()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_skips_what_is_done_and_starts_a_stopped_vm_for_reboot() {
        use PowerAction::*;
        assert_eq!(plan(Start, true), Err("already running"));
        assert_eq!(plan(Start, false), Ok(Start));
        assert_eq!(plan(Stop, false), Err("already stopped"));
        assert_eq!(plan(Shutdown, false), Err("already stopped"));
        assert_eq!(plan(Shutdown, true), Ok(Shutdown));
        assert_eq!(plan(Reboot, true), Ok(Reboot));
        assert_eq!(plan(Reboot, false), Ok(Start));
    }
}
