//! The `destroy` executor: stop and delete a VM Trellis made, and confirm it is gone.
//!
//! Stages: `check_tag` (the VM's description carries the exact `expected_tag` line, and
//! the VM is not protected), `stop_vm` (hard stop if it runs, until `status/current` says
//! `stopped`), `delete_vm` (`DELETE` with `purge=1` and `destroy-unreferenced-disks=1`,
//! task followed to its end), `confirm_gone` (`/cluster/resources` no longer lists it).
//!
//! * **Never deletes a VM Trellis did not make**: VMIDs are reused, so the VMID alone
//!   proves nothing; a VM without the tag line fails with `vm_tag_mismatch`
//!   (not retryable). A VM that moved to another node is followed, and its tag is checked
//!   again there before the delete.
//! * **Idempotent**: a VM that is already gone succeeds with `already_gone` (every stage
//!   skipped), and every step looks before it acts, so running the command again after a
//!   crash at any point finishes the job (the control plane re-runs a destroy the agent
//!   lost).
//! * Cancel is honoured between every call and in every wait; Proxmox tasks already
//!   started run on.
//!
//! Error codes: `vm_tag_mismatch`, `vm_protected`, `vm_locked` (retryable),
//! `vm_state_timeout` (retryable), `destroy_unconfirmed` (retryable),
//! `proxmox_task_failed`, `proxmox_task_timeout`, and the client's `proxmox_*` codes.

use std::time::{Duration, Instant};

use trellis_protocol::{CommandError, DestroyParams, DestroyResult, StageState, DESTROY_STAGES};

use super::client::{ProxmoxClient, Repeat};
use super::op::{cancelled, Op, TaskEnd, VmLocks};
use super::types::VmConfig;
use super::ProxmoxSettings;
use crate::exec::ExecContext;

/// How long `stop_vm` waits for `stopped` and `confirm_gone` for the VM to leave the list.
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one `destroy`. `client` is the executor's client for this command, or what is
/// wrong with its settings (reported as the first stage failing).
pub async fn run(
    ctx: &ExecContext,
    settings: &ProxmoxSettings,
    locks: &VmLocks,
    client: Result<ProxmoxClient, CommandError>,
    p: DestroyParams,
) -> Result<DestroyResult, CommandError> {
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            ctx.stage(
                "check_tag",
                StageState::Failed,
                Some(0.0),
                Some(e.message.clone()),
            )
            .await;
            return Err(e.at_stage("check_tag"));
        }
    };
    let lock = locks.lock_for(p.vm_id);
    let _guard = tokio::select! {
        g = lock.lock() => g,
        _ = ctx.cancel.cancelled() => return Err(cancelled().at_stage("check_tag")),
    };
    let mut op = Op::new(ctx, client, settings, p.vm_id, &p.node);
    match steps(&mut op, &p).await {
        Ok(r) => Ok(r),
        Err(e) => Err(op.fail(e).await),
    }
}

/// Whether a description carries `tag` as a line of its own.
pub fn carries_tag(description: Option<&str>, tag: &str) -> bool {
    let tag = tag.trim();
    !tag.is_empty() && description.is_some_and(|d| d.lines().any(|l| l.trim() == tag))
}

/// Why Trellis must not delete the VM with this config, if it must not.
pub fn refusal(vmid: u32, cfg: &VmConfig, expected_tag: &str) -> Option<CommandError> {
    if !carries_tag(cfg.description().as_deref(), expected_tag) {
        return Some(CommandError::new(
            "vm_tag_mismatch",
            format!(
                "VM {vmid} does not carry the tag {expected_tag:?} in its description, so Trellis did not make \
                 it (or its VMID was reused); it is left alone. Delete it in Proxmox if it really must go, \
                 then forget the node."
            ),
        ));
    }
    if cfg
        .get_str("protection")
        .is_some_and(|v| crate::proxmox::types::property_enabled(&v))
    {
        return Some(CommandError::new(
            "vm_protected",
            format!(
                "VM {vmid} has protection enabled in Proxmox (Options → Protection), which forbids deleting it; \
                 turn protection off and destroy again"
            ),
        ));
    }
    None
}

/// Where the VM is found, or that it is gone.
enum Found {
    Gone,
    Here,
}

async fn steps(op: &mut Op<'_>, p: &DestroyParams) -> Result<DestroyResult, CommandError> {
    let vmid = p.vm_id;
    if op.ctx.is_cancelled() {
        return Err(cancelled());
    }
    if op.relocate().await?.is_none() {
        return Ok(already_gone(op, 0).await);
    }

    op.begin(
        "check_tag",
        0.0,
        format!("checking that VM {vmid} on {} is one Trellis made", op.node),
    )
    .await?;
    if let Found::Gone = check_tag(op, &p.expected_tag).await? {
        op.complete(25.0, format!("VM {vmid} is already gone"))
            .await;
        return Ok(already_gone(op, 1).await);
    }
    op.complete(25.0, format!("VM {vmid} carries {}", p.expected_tag))
        .await;

    let Some(st) = op.status().await? else {
        return Ok(already_gone(op, 1).await);
    };
    if st.is_running() {
        op.begin("stop_vm", 25.0, format!("stopping VM {vmid}"))
            .await?;
        if let Found::Gone = stop(op).await? {
            op.complete(50.0, format!("VM {vmid} is already gone"))
                .await;
            return Ok(already_gone(op, 2).await);
        }
        op.complete(50.0, format!("VM {vmid} is stopped")).await;
    } else {
        op.skip("stop_vm", 50.0, format!("VM {vmid} is not running"))
            .await;
    }

    op.begin(
        "delete_vm",
        50.0,
        format!("deleting VM {vmid} with its disks, jobs and HA entry"),
    )
    .await?;
    delete(op, &p.expected_tag).await?;
    op.complete(75.0, format!("VM {vmid} deleted")).await;

    op.begin(
        "confirm_gone",
        75.0,
        "waiting until the cluster no longer lists the VM",
    )
    .await?;
    let deadline = Instant::now() + STATE_TIMEOUT;
    while op.find_in_cluster().await?.is_some() {
        if Instant::now() >= deadline {
            return Err(CommandError::new(
                "destroy_unconfirmed",
                format!(
                    "VM {vmid} is still listed by the cluster {} s after its delete task ended",
                    STATE_TIMEOUT.as_secs()
                ),
            )
            .retryable());
        }
        op.sleep(Duration::from_millis(300)).await?;
    }
    op.complete(100.0, format!("VM {vmid} is gone")).await;
    Ok(DestroyResult {
        vm_id: vmid,
        node: op.node.clone(),
        already_gone: false,
    })
}

/// The result for a VM that is gone, with the stages from `from` on reported skipped.
async fn already_gone(op: &mut Op<'_>, from: usize) -> DestroyResult {
    for (i, stage) in DESTROY_STAGES.iter().enumerate().skip(from) {
        op.skip(
            stage,
            25.0 * (i + 1) as f32,
            format!("VM {} is already gone", op.vmid),
        )
        .await;
    }
    DestroyResult {
        vm_id: op.vmid,
        node: op.node.clone(),
        already_gone: true,
    }
}

/// Reads the config (following a migrated VM) and refuses a VM without the tag.
async fn check_tag(op: &mut Op<'_>, expected_tag: &str) -> Result<Found, CommandError> {
    for attempt in 1..=2 {
        match op.client.vm_config(&op.node, op.vmid).await {
            Ok(cfg) => {
                return match refusal(op.vmid, &cfg, expected_tag) {
                    Some(e) => Err(e),
                    None => Ok(Found::Here),
                };
            }
            Err(e) if e.is_missing() && attempt == 1 => {
                if op.relocate().await?.is_none() {
                    return Ok(Found::Gone);
                }
            }
            Err(e) if e.is_missing() => return Ok(Found::Gone),
            Err(e) => return Err(op.api(&e)),
        }
    }
    Ok(Found::Gone)
}

/// Stops the VM hard and waits for `stopped`.
async fn stop(op: &mut Op<'_>) -> Result<Found, CommandError> {
    let vmid = op.vmid;
    for attempt in 1..=2 {
        match op.client.power(&op.node, vmid, "stop", Repeat::Safe).await {
            Ok(upid) => {
                op.log(format!("stop task {upid}")).await;
                op.wait_task_ok(&upid, "stop").await?;
                break;
            }
            Err(e) if e.message().contains("not running") => break,
            // Moved (followed once) or gone.
            Err(e) if e.is_missing() && attempt == 1 => {
                if op.relocate().await?.is_none() {
                    return Ok(Found::Gone);
                }
            }
            Err(e) => return Err(op.api(&e)),
        }
    }
    let deadline = Instant::now() + STATE_TIMEOUT;
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(st) = op.status().await? else {
            return Ok(Found::Gone);
        };
        if !st.is_running() {
            return Ok(Found::Here);
        }
        if Instant::now() >= deadline {
            return Err(CommandError::new(
                "vm_state_timeout",
                format!(
                    "VM {vmid} is still {} {} s after its stop task ended",
                    st.status,
                    STATE_TIMEOUT.as_secs()
                ),
            )
            .retryable());
        }
        op.sleep(delay).await?;
        delay = delay.mul_f32(1.5).min(Duration::from_secs(1));
    }
}

/// Deletes the VM and follows the task; a VM that is already gone is fine.
async fn delete(op: &mut Op<'_>, expected_tag: &str) -> Result<(), CommandError> {
    let vmid = op.vmid;
    let deadline = Instant::now() + op.settings.task_timeout;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        if op.ctx.is_cancelled() {
            return Err(cancelled());
        }
        let again = match op.client.delete_vm(&op.node, vmid).await {
            Ok(upid) => {
                op.log(format!("destroy task {upid}")).await;
                match op.wait_task(&upid, "destroy").await? {
                    TaskEnd::Ok => return Ok(()),
                    TaskEnd::Failed(err) if err.contains("does not exist") => return Ok(()),
                    TaskEnd::Failed(err) if retry_delete(&err) => err,
                    TaskEnd::Failed(err) => {
                        return Err(CommandError::new(
                            "proxmox_task_failed",
                            format!("Proxmox destroy task for VM {vmid} failed: {err}"),
                        ))
                    }
                }
            }
            Err(e) if e.is_missing() => {
                // Gone, or moved: a VM found elsewhere is checked again before deleting.
                if op.relocate().await?.is_none() {
                    return Ok(());
                }
                match check_tag(op, expected_tag).await? {
                    Found::Gone => return Ok(()),
                    Found::Here => e.message().to_string(),
                }
            }
            Err(e) if retry_delete(e.message()) => e.message().to_string(),
            Err(e) => return Err(op.api(&e)),
        };
        if Instant::now() >= deadline || attempt >= 20 {
            return Err(CommandError::new(
                "vm_locked",
                format!("VM {vmid} could not be deleted: {again}"),
            )
            .retryable());
        }
        op.log(format!(
            "delete of VM {vmid} refused ({again}); trying again"
        ))
        .await;
        // Started meanwhile (by a user or HA): stop it again.
        if again.contains("is running") {
            if let Found::Gone = stop(op).await? {
                return Ok(());
            }
        } else {
            op.sleep(Duration::from_millis(500).saturating_mul(attempt.min(6)))
                .await?;
        }
    }
}

/// A delete refusal that passes: the VM runs again, or a task holds its lock.
fn retry_delete(err: &str) -> bool {
    err.contains("is running") || err.contains("VM is locked") || err.contains("can't lock file")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> VmConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_the_exact_tag_line_counts() {
        let tag = "trellis-command=00000000-0000-0000-0000-000000000001";
        assert!(carries_tag(Some(&format!("web\n\n{tag}")), tag));
        assert!(carries_tag(
            Some(&format!("  {tag}  \ntrellis-post-provision=done")),
            tag
        ));
        assert!(!carries_tag(Some(&format!("{tag}0")), tag));
        assert!(!carries_tag(Some(&format!("see {tag}")), tag));
        assert!(!carries_tag(None, tag));
        assert!(!carries_tag(Some(""), ""));
    }

    #[test]
    fn refuses_untagged_and_protected_vms() {
        let tag = "trellis-command=00000000-0000-0000-0000-000000000001";
        let ok = cfg(json!({"description": format!("x\n{tag}")}));
        assert!(refusal(101, &ok, tag).is_none());
        let e = refusal(101, &cfg(json!({"description": "someone else's"})), tag).unwrap();
        assert_eq!(e.code, "vm_tag_mismatch");
        assert!(!e.retryable);
        let e = refusal(101, &cfg(json!({"description": tag, "protection": 1})), tag).unwrap();
        assert_eq!(e.code, "vm_protected");
        assert!(refusal(101, &cfg(json!({"description": tag, "protection": 0})), tag).is_none());
    }
}
