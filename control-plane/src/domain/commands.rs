//! Commands: create (validated, stored before the caller is answered, the agent woken),
//! retry, cancel, pin (keep past the retention period), and waiting for one to end.

use std::time::Duration;

use tokio::sync::broadcast;
use trellis_protocol::{CancelReason, Command, CommandType};

use super::{DomainError, DomainResult};
use crate::broker::fanout::Published;
use crate::broker::Broker;
use crate::db::{CancelOutcome, CommandRow, Db, DbError, NewCommand, NodeRef};
use crate::model::{AgentId, CommandId, CommandStatus};
use crate::time::now_ms;

pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Largest params accepted (the dispatch frame limit is 1 MiB).
pub const MAX_PARAMS_BYTES: usize = 512 * 1024;

pub fn default_timeout(t: CommandType) -> u64 {
    match t {
        CommandType::Ping => 300,
        CommandType::ListTemplates => 60,
        CommandType::Provision => 3600,
        CommandType::TerraformApply | CommandType::TerraformDestroy => 7200,
        CommandType::TerraformPlan => 3600,
        CommandType::VmPower => 900,
        CommandType::Destroy => 1800,
        CommandType::Unknown => 300,
    }
}

/// A command to create.
pub struct CreateCommand {
    pub agent_id: AgentId,
    pub command_type: String,
    pub params: serde_json::Value,
    pub idempotency_key: Option<String>,
    pub timeout_secs: Option<u64>,
    pub created_by: String,
}

/// Checks a request and turns it into the row to store (its id chosen now). `None` with
/// an existing row when the idempotency key names an identical earlier request.
pub async fn prepare(
    db: &Db,
    c: &CreateCommand,
    retry_of: Option<&CommandRow>,
) -> DomainResult<Result<NewCommand, CommandRow>> {
    // The dispatch must fit in one protocol frame with room to spare.
    let size = c.params.to_string().len();
    if size > MAX_PARAMS_BYTES {
        return Err(DomainError::invalid(
            "params_too_large",
            format!("params are {size} bytes; at most {MAX_PARAMS_BYTES} are accepted"),
        ));
    }
    let cmd = Command::parse(&c.command_type, &c.params)?;
    let agent = db
        .get_agent(c.agent_id)
        .await
        .map_err(DomainError::not_found(format_args!("agent {}", c.agent_id)))?;
    let ty = cmd.command_type();
    // Only reject for a missing capability when the agent has told us what it can do.
    if !agent.capabilities.is_empty() && !agent.has_capability(ty) {
        return Err(DomainError::conflict(
            "capability_missing",
            format!("agent {:?} cannot run {ty} commands", agent.name),
        ));
    }
    if let Some(key) = &c.idempotency_key {
        if key.is_empty() || key.len() > 200 {
            return Err(DomainError::invalid(
                "invalid_params",
                "idempotencyKey must be 1–200 characters",
            ));
        }
        if let Some(existing) = db.command_by_idempotency_key(key).await? {
            return same_request(db, existing, c).map(Err);
        }
    }
    let timeout = c.timeout_secs.unwrap_or_else(|| default_timeout(ty));
    if timeout == 0 || timeout > MAX_TIMEOUT_SECS {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("timeoutSecs must be 1–{MAX_TIMEOUT_SECS}"),
        ));
    }
    let id = CommandId::new();
    let mut new = NewCommand {
        id,
        agent_id: c.agent_id,
        command_type: ty,
        // Sensitive Terraform variables are stored encrypted (see `crate::secrets`).
        params: db.secrets().seal_params(ty, &c.params),
        idempotency_key: c.idempotency_key.clone(),
        created_by: c.created_by.clone(),
        deadline_at: now_ms() + (timeout as i64) * 1000,
        attempt: retry_of.map_or(1, |r| r.attempt + 1),
        root_id: retry_of.map_or(id, |r| r.root_id),
        retry_of: retry_of.map(|r| r.id),
        signature: None,
    };
    // Signed now, over exactly what will be stored: a caller that changes it signs again.
    db.sign_new(&mut new).map_err(|e| {
        DomainError::invalid(
            "invalid_params",
            format!("the command cannot be signed: {e}"),
        )
    })?;
    Ok(Ok(new))
}

/// Validates and stores a command (group-committed with concurrent ones), then wakes the
/// agent's session. The command is committed before this returns.
pub async fn create(db: &Db, broker: &Broker, mut c: CreateCommand) -> DomainResult<CommandRow> {
    fill_from_plan(db, &mut c).await?;
    fill_from_source(db, &mut c).await?;
    let new = match prepare(db, &c, None).await? {
        Ok(new) => new,
        Err(existing) => return Ok(existing),
    };
    let mut row = CommandRow::queued(&new, 0);
    row.created_at = match broker.insert_command(new).await {
        Ok(at) => at,
        // Lost a race on the idempotency key: answer with the winner.
        Err(DbError::Conflict(msg)) => {
            let key = c.idempotency_key.as_deref().unwrap_or_default();
            return match db.command_by_idempotency_key(key).await? {
                Some(existing) => same_request(db, existing, &c),
                None => Err(DbError::Conflict(msg).into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    broker.wake(c.agent_id);
    Ok(row)
}

/// A `terraform_apply` of a saved plan (`{"plan_command_id": …}`) gets the plan's
/// source, variables and workspace, and the plan file's hash from its result, so that
/// what the agent checks is part of the signed command and the apply acts on the plan's
/// state workspace. The plan must be a succeeded `terraform_plan` of the same agent (the
/// file is kept there). Only `meta` may be given alongside.
async fn fill_from_plan(db: &Db, c: &mut CreateCommand) -> DomainResult<()> {
    if c.command_type != CommandType::TerraformApply.as_str() {
        return Ok(());
    }
    let Some(given) = c.params.as_object() else {
        return Ok(());
    };
    let Some(plan_ref) = given.get("plan_command_id") else {
        return Ok(());
    };
    if let Some(k) = given
        .keys()
        .find(|k| !matches!(k.as_str(), "plan_command_id" | "plan_sha256" | "meta"))
    {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("{k:?} cannot be given with plan_command_id: the apply uses the plan's"),
        ));
    }
    let plan_id: CommandId = plan_ref
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            DomainError::invalid("invalid_params", "plan_command_id must be a command id")
        })?;
    let plan = db
        .get_command(plan_id)
        .await
        .map_err(DomainError::not_found(format_args!("command {plan_id}")))?;
    if plan.command_type != CommandType::TerraformPlan {
        return Err(DomainError::conflict(
            "plan_invalid",
            format!(
                "command {plan_id} is a {}, not a terraform_plan",
                plan.command_type
            ),
        ));
    }
    if plan.status != CommandStatus::Succeeded {
        return Err(DomainError::conflict(
            "plan_invalid",
            format!("terraform_plan {plan_id} is {}, not succeeded", plan.status),
        ));
    }
    if plan.agent_id != c.agent_id {
        return Err(DomainError::conflict(
            "plan_invalid",
            format!(
                "terraform_plan {plan_id} ran on agent {}: its plan file is kept there",
                plan.agent_id
            ),
        ));
    }
    let hash = plan
        .result
        .as_ref()
        .and_then(|r| r.get("plan_sha256"))
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| {
            DomainError::conflict(
                "plan_invalid",
                format!("terraform_plan {plan_id} has no plan_sha256 in its result"),
            )
        })?
        .to_string();
    if given
        .get("plan_sha256")
        .is_some_and(|h| h.as_str() != Some(hash.as_str()))
    {
        return Err(DomainError::conflict(
            "plan_invalid",
            format!("plan_sha256 is not the hash terraform_plan {plan_id} recorded"),
        ));
    }
    let meta = given.get("meta").cloned();
    let mut params = db
        .secrets()
        .open_params(plan.command_type, &plan.params)
        .map_err(|e| {
            DomainError::conflict(
                "plan_invalid",
                format!("the params of terraform_plan {plan_id} cannot be decrypted: {e}"),
            )
        })?;
    let Some(obj) = params.as_object_mut() else {
        return Err(DomainError::conflict(
            "plan_invalid",
            format!("terraform_plan {plan_id} has no params object"),
        ));
    };
    // A destroy plan is applied as one (its `destroy` copied with the rest), and only if
    // the agent made one: an agent that predates destroy plans ignores `destroy` and
    // saves a normal plan, which must not be approved as a destroy (nor the reverse).
    let asked = obj.get("destroy") == Some(&serde_json::Value::Bool(true));
    let made = plan
        .result
        .as_ref()
        .and_then(|r| r.get("mode"))
        .and_then(serde_json::Value::as_str)
        == Some("destroy");
    if asked != made {
        return Err(DomainError::conflict(
            "plan_invalid",
            if asked {
                format!(
                    "terraform_plan {plan_id} was asked for a destroy plan, but its agent made a normal plan (a tendril without destroy plans): it is not applied"
                )
            } else {
                format!("terraform_plan {plan_id} made a destroy plan it was not asked for: it is not applied")
            },
        ));
    }
    obj.insert("plan_command_id".into(), plan_id.to_string().into());
    obj.insert("plan_sha256".into(), hash.into());
    if let Some(meta) = meta {
        obj.insert("meta".into(), meta);
    }
    c.params = params;
    Ok(())
}

/// A `terraform_plan` or `terraform_destroy` of `{"source_command_id": …}` gets the
/// template source, variables (sensitive ones too, opened from storage) and workspace of
/// that earlier Terraform command, so a workspace can be planned again or destroyed from
/// its last apply without the caller knowing (or re-typing) the secret values that every
/// response shows as `***`. The source may have run on any agent (the state is kept by
/// the control plane). Only `meta` (and, for a plan, `destroy`: a destroy plan) may be
/// given alongside; the source's own `destroy` is not copied.
async fn fill_from_source(db: &Db, c: &mut CreateCommand) -> DomainResult<()> {
    if c.command_type != CommandType::TerraformPlan.as_str()
        && c.command_type != CommandType::TerraformDestroy.as_str()
    {
        return Ok(());
    }
    let Some(given) = c.params.as_object() else {
        return Ok(());
    };
    let Some(source_ref) = given.get("source_command_id") else {
        return Ok(());
    };
    if let Some(k) = given
        .keys()
        .find(|k| !matches!(k.as_str(), "source_command_id" | "meta" | "destroy"))
    {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("{k:?} cannot be given with source_command_id: the source command's are used"),
        ));
    }
    let source_id: CommandId = source_ref
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            DomainError::invalid("invalid_params", "source_command_id must be a command id")
        })?;
    let source = db
        .get_command(source_id)
        .await
        .map_err(DomainError::not_found(format_args!("command {source_id}")))?;
    if !source.command_type.is_terraform() {
        return Err(DomainError::conflict(
            "source_invalid",
            format!(
                "command {source_id} is a {}, not a Terraform command",
                source.command_type
            ),
        ));
    }
    let meta = given.get("meta").cloned();
    // Checked here (not only by the protocol's parse) because the source's params replace
    // what was given: a `destroy` that is not a bool would otherwise be dropped unseen.
    let destroy = match given.get("destroy") {
        None => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(DomainError::invalid(
                "invalid_params",
                "destroy must be true or false",
            ))
        }
    };
    let mut params = db
        .secrets()
        .open_params(source.command_type, &source.params)
        .map_err(|e| {
            DomainError::conflict(
                "secrets_undecryptable",
                format!("the params of command {source_id} cannot be decrypted: {e}"),
            )
        })?;
    let Some(obj) = params.as_object_mut() else {
        return Err(DomainError::conflict(
            "source_invalid",
            format!("command {source_id} has no params object"),
        ));
    };
    // An apply of a saved plan names the plan; the new command plans or destroys afresh,
    // a destroy plan only when asked now (not because the source was one).
    obj.remove("plan_command_id");
    obj.remove("plan_sha256");
    obj.remove("meta");
    obj.remove("destroy");
    if let Some(meta) = meta {
        obj.insert("meta".into(), meta);
    }
    if destroy == Some(true) {
        // Refused for a terraform_destroy by the protocol's checks in `prepare`.
        obj.insert("destroy".into(), true.into());
    }
    c.params = params;
    Ok(())
}

/// A reused idempotency key must name the same request; anything else is a client bug.
/// The stored params are compared decrypted (a value that does not decrypt differs).
fn same_request(db: &Db, existing: CommandRow, c: &CreateCommand) -> DomainResult<CommandRow> {
    if existing.agent_id == c.agent_id
        && existing.command_type.as_str() == c.command_type
        && db
            .secrets()
            .open_params(existing.command_type, &existing.params)
            .is_ok_and(|p| p == c.params)
    {
        Ok(existing)
    } else {
        Err(DomainError::conflict(
            "idempotency_conflict",
            format!(
                "idempotency key already used for a different request (command {})",
                existing.id
            ),
        ))
    }
}

/// A command with the node it acts on.
pub async fn get_with_target(
    db: &Db,
    id: CommandId,
) -> DomainResult<(CommandRow, Option<NodeRef>)> {
    db.get_command_with_target(id)
        .await
        .map_err(DomainError::not_found(format_args!("command {id}")))
}

pub async fn get(db: &Db, id: CommandId) -> DomainResult<CommandRow> {
    db.get_command(id)
        .await
        .map_err(DomainError::not_found(format_args!("command {id}")))
}

/// Retries a failed, cancelled or timed-out command as a new attempt. The new command
/// and the node it takes over are stored in one transaction; a repeated retry of the
/// same command (a double click) answers with the attempt already made.
pub async fn retry(
    db: &Db,
    broker: &Broker,
    actor: &str,
    id: CommandId,
) -> DomainResult<CommandRow> {
    let old = get(db, id).await?;
    if matches!(
        old.command_type,
        CommandType::VmPower | CommandType::Destroy
    ) {
        return Err(DomainError::conflict(
            "not_retryable",
            format!(
                "a {} command acts on a node's VM: run the action again from the node, which checks its state first",
                old.command_type
            ),
        ));
    }
    if !old.is_terminal() || old.status == CommandStatus::Succeeded {
        return Err(DomainError::conflict(
            "not_retryable",
            format!(
                "only failed, cancelled or timed-out commands can be retried; this one is {}",
                old.status
            ),
        ));
    }
    // The retry is sealed again with a fresh nonce per value.
    let params = db
        .secrets()
        .open_params(old.command_type, &old.params)
        .map_err(|e| {
            DomainError::conflict(
                "secrets_undecryptable",
                format!("the command's sensitive values cannot be decrypted ({e}); submit the command again with its values"),
            )
        })?;
    // Only a row that still matches the signature it was stored with is copied: a retry
    // is signed anew, so copying an altered row would sign what an attacker wrote.
    let signature = db.command_signature(old.id).await?;
    db.verify_stored(
        &crate::db::Signed {
            id: old.id,
            agent_id: old.agent_id,
            command_type: old.command_type,
            params: &old.params,
            deadline_at: old.deadline_at,
            attempt: old.attempt,
            root_id: old.root_id,
        },
        signature.as_deref(),
    )
    .map_err(|e| {
        DomainError::conflict(
            "signature_invalid",
            format!("the stored command does not match the signature it was stored with ({e}), so it is not copied into a retry; submit the command again"),
        )
    })?;
    let req = CreateCommand {
        agent_id: old.agent_id,
        command_type: old.command_type.as_str().to_string(),
        params,
        idempotency_key: Some(format!("retry:{}", old.id)),
        timeout_secs: None,
        created_by: actor.to_string(),
    };
    let new = match prepare(db, &req, Some(&old)).await? {
        Ok(new) => new,
        Err(existing) => return Ok(existing),
    };
    let mut row = CommandRow::queued(&new, 0);
    // A node's provision (made by the node endpoints) is retried only for that node.
    let node_required =
        old.command_type == CommandType::Provision && db.command_node(old.id).await?.is_some();
    row.created_at = match db.insert_retry(&new, old.id, node_required).await {
        Ok(at) => at,
        Err(DbError::NodeMoved) => {
            return Err(DomainError::conflict(
                "not_retryable",
                "the node this provision was for has moved on (provisioned again, forgotten or deleted); provision it from the node",
            ))
        }
        Err(DbError::Conflict(_)) => {
            let key = req.idempotency_key.as_deref().unwrap_or_default();
            return match db.command_by_idempotency_key(key).await? {
                Some(existing) => Ok(existing),
                None => Err(DomainError::conflict(
                    "conflict",
                    "the retry could not be stored",
                )),
            };
        }
        Err(e) => return Err(e.into()),
    };
    broker.wake(old.agent_id);
    Ok(row)
}

/// Cancels a command: a queued one ends at once; a running one is stopped on its agent
/// and ends when the agent reports. `already_finished` when it had ended.
pub async fn cancel(db: &Db, broker: &Broker, id: CommandId) -> DomainResult<CommandRow> {
    get(db, id).await?;
    let (c, outcome) = db.request_cancel(id).await?;
    match outcome {
        CancelOutcome::Requested => broker.cancel(c.agent_id, id, CancelReason::Cancelled),
        CancelOutcome::Cancelled => broker.wake(c.agent_id),
        CancelOutcome::AlreadyFinished => {
            return Err(DomainError::conflict(
                "already_finished",
                format!("command already {}", c.status),
            ))
        }
    }
    broker.fanout.publish(&id, Published::Status);
    Ok(c)
}

/// Pins a command (the retention pass keeps it however old it gets) or unpins it (it goes
/// at the first pass after it is past the period again). Any status may be pinned: a
/// running command pinned now is kept once it ends. Setting the state it already has is
/// not an error, so a repeated click answers the same.
pub async fn set_pinned(db: &Db, id: CommandId, pinned: bool) -> DomainResult<CommandRow> {
    db.set_pinned(id, pinned)
        .await
        .map_err(DomainError::not_found(format_args!("command {id}")))?;
    get(db, id).await
}

/// Waits until the command is terminal or `timeout` passes; returns its latest state.
pub async fn wait_terminal(
    db: &Db,
    broker: &Broker,
    id: CommandId,
    timeout: Duration,
) -> DomainResult<CommandRow> {
    Ok(wait_terminal_with_target(db, broker, id, timeout).await?.0)
}

/// [`wait_terminal`] with the node the command acts on (read in the same statement).
pub async fn wait_terminal_with_target(
    db: &Db,
    broker: &Broker,
    id: CommandId,
    timeout: Duration,
) -> DomainResult<(CommandRow, Option<NodeRef>)> {
    let mut sub = broker.fanout.subscribe(id);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let c = get_with_target(db, id).await?;
        if c.0.is_terminal() {
            return Ok(c);
        }
        // Re-read on a status change, on lag, and at least once a second (a missed
        // notification costs at most that).
        let until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        loop {
            match tokio::time::timeout_at(until, sub.recv()).await {
                Ok(Ok(Published::Status)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    break
                }
                Ok(Ok(Published::Event { .. })) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    sub = broker.fanout.subscribe(id);
                    break;
                }
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return get_with_target(db, id).await;
        }
    }
}
