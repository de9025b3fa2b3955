//! Many nodes at once. A bulk provision creates up to [`MAX_BATCH`] nodes named from a
//! pattern (`web-{n}`) and stores them with their provision commands in one transaction;
//! the agent's concurrency limit (`agents.max_concurrency`, enforced by the dispatcher)
//! bounds how many run at a time. A bulk action runs a power action, destroy, or a retry
//! of a failed provision on each of a set of nodes, reusing the single-node operations;
//! one node's refusal does not stop the others.
//!
//! Naming: `{n}` counts from 1 and skips names already taken by a node (compared ignoring
//! ASCII case), so `web-{n}` × 3 with `web-1` present makes `web-2`, `web-3`, `web-4`.
//! A pattern without `{n}` (count 1 only) names one node and is refused if taken, by the
//! single-node rule ([`super::nodes::check_name_free`], `duplicate_name`, no force). A
//! `destroyed` node's name counts as free, as for a single node; the database's
//! live-name index refuses a name another request took meanwhile (`duplicate_name`).
//!
//! Per-node clone options: an explicit VMID and a static IP address are start values —
//! the node with index `i` (0-based, in name order) gets VMID `vmId + i` and address
//! `address + i` in the same network (prefix and gateway unchanged), so no two nodes of a
//! batch ask for the same VMID or address. A batch whose last VMID would pass 999999999,
//! or whose addresses would leave the subnet, hit its network or broadcast address, or
//! hit the gateway, is refused as a whole with 400 `invalid_params` naming the field.

use std::collections::HashSet;

use trellis_protocol::{CommandType, PowerAction};

use super::nodes::{
    check_name_free, duplicate_name, plan_provision, validate_name, validate_size, Provision,
};
use super::{DomainError, DomainResult};
use crate::broker::Broker;
use crate::db::{BatchNode, Db, NodeRow};
use crate::model::{CommandId, NodeId, NodeStatus, TemplateId};

/// The most nodes one bulk provision creates.
pub const MAX_BATCH: u32 = 50;
/// The most nodes one bulk action names.
pub const MAX_BULK_NODES: usize = 200;
const PLACEHOLDER: &str = "{n}";

pub struct BulkProvision {
    pub count: u32,
    pub name_pattern: String,
    pub template_id: String,
    pub memory: Option<i64>,
    pub cores: Option<i64>,
    pub application: Option<String>,
    pub provision: Provision,
}

/// A node of a started batch.
pub struct BatchMember {
    pub node_id: NodeId,
    pub name: String,
    pub command_id: CommandId,
}

pub struct BatchStarted {
    pub batch_id: String,
    pub nodes: Vec<BatchMember>,
}

/// Checks a count and pattern without looking at existing names; returns the literal
/// text before and after `{n}` (`None` when there is no `{n}`).
fn check_pattern(count: u32, pattern: &str) -> DomainResult<Option<(&str, &str)>> {
    if !(1..=MAX_BATCH).contains(&count) {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("count must be between 1 and {MAX_BATCH}"),
        ));
    }
    match pattern.matches(PLACEHOLDER).count() {
        0 if count == 1 => Ok(None),
        0 => Err(DomainError::invalid(
            "invalid_params",
            "namePattern must contain {n} when count is more than 1 (e.g. \"web-{n}\")",
        )),
        1 => {
            let (head, tail) = pattern.split_once(PLACEHOLDER).unwrap_or((pattern, ""));
            Ok(Some((head, tail)))
        }
        _ => Err(DomainError::invalid(
            "invalid_params",
            "namePattern may contain {n} only once",
        )),
    }
}

/// The `count` names a pattern makes, skipping those in `taken` (lower-case). Every name
/// is checked to be a valid VM name.
pub fn expand_names(
    count: u32,
    pattern: &str,
    taken: &HashSet<String>,
) -> DomainResult<Vec<String>> {
    let Some((head, tail)) = check_pattern(count, pattern)? else {
        validate_name(pattern)?;
        if taken.contains(&pattern.to_ascii_lowercase()) {
            return Err(duplicate_name(pattern, None));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let mut names = Vec::with_capacity(count as usize);
    let mut n: u64 = 0;
    while names.len() < count as usize {
        n += 1;
        let name = format!("{head}{n}{tail}");
        if taken.contains(&name.to_ascii_lowercase()) {
            continue;
        }
        validate_name(&name).map_err(|e| match e {
            DomainError::Invalid { message, .. } => DomainError::invalid(
                "invalid_params",
                format!("namePattern makes {name:?}: {message}"),
            ),
            e => e,
        })?;
        names.push(name);
    }
    Ok(names)
}

/// Creates `count` nodes and starts their provisions: one transaction for all of them.
pub async fn bulk_provision(
    db: &Db,
    broker: &Broker,
    actor: &str,
    b: BulkProvision,
) -> DomainResult<BatchStarted> {
    let pattern = b.name_pattern.trim().to_string();
    let split = check_pattern(b.count, &pattern)?;
    let tid: TemplateId = b
        .template_id
        .parse()
        .map_err(|_| DomainError::invalid("invalid_params", "templateId is not a template id"))?;
    let t = super::templates::get(db, tid).await?;
    let memory = b.memory.unwrap_or(t.fields.memory);
    let cores = b.cores.unwrap_or(t.fields.cores);
    validate_size(memory, cores)?;
    if split.is_none() {
        validate_name(&pattern)?;
        check_name_free(db, &pattern, false).await?;
    }
    let prefix = split.map_or(pattern.as_str(), |(head, _)| head);
    let taken: HashSet<String> = db
        .node_names_with_prefix(prefix)
        .await?
        .into_iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let names = expand_names(b.count, &pattern, &taken)?;
    let application = b.application.filter(|a| !a.trim().is_empty());
    let mut nodes = Vec::with_capacity(names.len());
    for (index, name) in names.into_iter().enumerate() {
        // The node as it will be stored, so the single-node checks and params apply.
        let now = crate::time::now_ms();
        let row = NodeRow {
            id: NodeId::new(),
            application: application.clone(),
            name,
            template_id: Some(tid),
            memory,
            cores,
            vm_id: None,
            hypervisor_id: None,
            ip_address: None,
            status: NodeStatus::PendingProvision,
            last_command_id: None,
            error: None,
            created_at: now,
            updated_at: now,
            vm_tag: None,
            vm_node: None,
            observed_at: None,
        };
        let mut command = plan_provision(db, actor, &row, b.provision.clone()).await?;
        per_node_clone_options(&mut command.params, index as u32)?;
        // Its params changed after `prepare` signed them.
        db.sign_new(&mut command).map_err(|e| {
            DomainError::invalid(
                "invalid_params",
                format!("the command cannot be signed: {e}"),
            )
        })?;
        nodes.push(BatchNode {
            id: row.id,
            name: row.name,
            application: row.application,
            template_id: tid,
            memory,
            cores,
            command,
        });
    }
    let agent = nodes[0].command.agent_id;
    let batch_id = uuid::Uuid::new_v4().to_string();
    // A name taken meanwhile is `DbError::NameTaken`: 409 `duplicate_name`.
    db.insert_node_batch(&batch_id, agent, &nodes).await?;
    broker.wake(agent);
    tracing::info!(batch = %batch_id, nodes = nodes.len(), %actor, "bulk provision started");
    Ok(BatchStarted {
        batch_id,
        nodes: nodes
            .into_iter()
            .map(|n| BatchMember {
                node_id: n.id,
                name: n.name,
                command_id: n.command.id,
            })
            .collect(),
    })
}

/// The highest VMID Proxmox accepts.
const MAX_VMID: u32 = 999_999_999;

/// Gives the node with 0-based `index` of a batch its own VMID and static address: the
/// planned params' explicit `vm_id` plus `index`, and the static `address` plus `index`
/// in its network (see the module doc). Index 0 keeps the values as they are.
fn per_node_clone_options(params: &mut serde_json::Value, index: u32) -> DomainResult<()> {
    let Some(raw) = params.get("clone_options") else {
        return Ok(());
    };
    let mut o: trellis_protocol::CloneOptions = serde_json::from_value(raw.clone())
        .map_err(|e| DomainError::invalid("invalid_params", format!("cloneOptions: {e}")))?;
    if let Some(vm_id) = o.vm_id {
        o.vm_id = Some(nth_vm_id(vm_id, index)?);
    }
    if let Some(trellis_protocol::IpConfig::Static { address, gateway }) = &mut o.ip_config {
        *address = nth_address(address, gateway.as_deref(), index)?;
    }
    params["clone_options"] = serde_json::to_value(&o)
        .map_err(|e| DomainError::invalid("invalid_params", e.to_string()))?;
    Ok(())
}

fn nth_vm_id(start: u32, index: u32) -> DomainResult<u32> {
    start
        .checked_add(index)
        .filter(|v| *v <= MAX_VMID)
        .ok_or_else(|| {
            DomainError::invalid(
                "invalid_params",
                format!(
                    "cloneOptions.vmId: node {} of the batch would get VMID {} (the start value {start} plus {index}), above the highest VMID {MAX_VMID}; choose a lower start value",
                    index + 1,
                    u64::from(start) + u64::from(index)
                ),
            )
        })
}

/// `address` (`a.b.c.d/prefix`) plus `index`, in the same network: not its network or
/// broadcast address (for prefixes up to /30) and not the gateway.
fn nth_address(address: &str, gateway: Option<&str>, index: u32) -> DomainResult<String> {
    let bad = |msg: String| {
        DomainError::invalid(
            "invalid_params",
            format!("cloneOptions.ipConfig.address: {msg}"),
        )
    };
    let (ip, prefix) = address
        .split_once('/')
        .and_then(|(ip, p)| {
            Some((
                ip.parse::<std::net::Ipv4Addr>().ok()?,
                p.parse::<u32>().ok()?,
            ))
        })
        .filter(|(_, p)| *p <= 32)
        .ok_or_else(|| {
            bad(format!(
                "{address:?} is not an IPv4 address with a prefix length"
            ))
        })?;
    if index == 0 {
        return Ok(address.to_string());
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    let start = u32::from(ip);
    let network = start & mask;
    let broadcast = network | !mask;
    let node = index + 1;
    let next = start
        .checked_add(index)
        .filter(|n| n & mask == network)
        .ok_or_else(|| {
            bad(format!(
                "node {node} of the batch would get an address outside {}/{prefix}; start lower or use a larger subnet",
                std::net::Ipv4Addr::from(network)
            ))
        })?;
    let next_ip = std::net::Ipv4Addr::from(next);
    if prefix <= 30 && (next == network || next == broadcast) {
        return Err(bad(format!(
            "node {node} of the batch would get {next_ip}, the broadcast address of {}/{prefix}; start lower or use a larger subnet",
            std::net::Ipv4Addr::from(network)
        )));
    }
    if gateway.and_then(|g| g.parse::<std::net::Ipv4Addr>().ok()) == Some(next_ip) {
        return Err(bad(format!(
            "node {node} of the batch would get {next_ip}, the gateway's address; choose a start address whose range does not include the gateway"
        )));
    }
    Ok(format!("{next_ip}/{prefix}"))
}

/// What a bulk action does to each node.
#[derive(Debug, Clone, Copy)]
pub enum BulkAction {
    Power(PowerAction),
    Destroy,
    /// Provision a failed node again (a new attempt of its failed provision).
    Retry,
}

/// One node's result of a bulk action.
pub struct BulkOutcome {
    /// The id as given.
    pub node_id: String,
    pub name: Option<String>,
    pub result: DomainResult<CommandId>,
}

/// Runs `action` on each node (in the order given, duplicates once). Destroy needs each
/// node's name in `confirm_names`. Errors are per node; only a malformed request fails
/// as a whole.
pub async fn bulk_action(
    db: &Db,
    broker: &Broker,
    actor: &str,
    node_ids: &[String],
    action: BulkAction,
    confirm_names: &[String],
) -> DomainResult<Vec<BulkOutcome>> {
    if node_ids.is_empty() || node_ids.len() > MAX_BULK_NODES {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("nodeIds must name 1 to {MAX_BULK_NODES} nodes"),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(node_ids.len());
    for raw in node_ids {
        if !seen.insert(raw.as_str()) {
            continue;
        }
        let (name, result) = match raw.parse::<NodeId>() {
            Err(_) => (
                None,
                Err(DomainError::NotFound(format!("node {raw:?} not found"))),
            ),
            Ok(id) => match super::nodes::get(db, id).await {
                Err(e) => (None, Err(e)),
                Ok(n) => {
                    let r = act_on(db, broker, actor, &n, action, confirm_names).await;
                    (Some(n.name), r)
                }
            },
        };
        out.push(BulkOutcome {
            node_id: raw.clone(),
            name,
            result,
        });
    }
    Ok(out)
}

async fn act_on(
    db: &Db,
    broker: &Broker,
    actor: &str,
    n: &NodeRow,
    action: BulkAction,
    confirm_names: &[String],
) -> DomainResult<CommandId> {
    match action {
        BulkAction::Power(action) => {
            let p = super::nodes::Power {
                action,
                timeout_s: None,
                force_after_s: None,
            };
            Ok(super::nodes::power(db, broker, actor, n.id, p).await?.1.id)
        }
        BulkAction::Destroy => {
            // Confirmed by name, like the single-node destroy.
            let confirm = if confirm_names.iter().any(|c| c == &n.name) {
                n.name.as_str()
            } else {
                ""
            };
            Ok(super::nodes::destroy(db, broker, actor, n.id, confirm)
                .await?
                .1
                .id)
        }
        BulkAction::Retry => {
            let failed_provision = match (n.status, n.vm_id, n.last_command_id) {
                (NodeStatus::Failed, None, Some(c)) => {
                    let c = super::commands::get(db, c).await?;
                    (c.command_type == CommandType::Provision).then_some(c.id)
                }
                _ => None,
            };
            let Some(c) = failed_provision else {
                return Err(DomainError::conflict(
                    "not_retryable",
                    format!(
                        "node {:?} is {}: only a node whose provision failed can be retried",
                        n.name, n.status
                    ),
                ));
            };
            Ok(super::commands::retry(db, broker, actor, c).await?.id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_ascii_lowercase()).collect()
    }

    #[test]
    fn names_count_from_one_and_skip_taken_ones() {
        let names = expand_names(3, "web-{n}", &taken(&["WEB-1", "web-3"])).unwrap();
        assert_eq!(names, ["web-2", "web-4", "web-5"]);
        let names = expand_names(2, "{n}.db.lab", &taken(&[])).unwrap();
        assert_eq!(names, ["1.db.lab", "2.db.lab"]);
    }

    #[test]
    fn bad_counts_and_patterns_are_refused() {
        let none = taken(&[]);
        for (count, pattern) in [
            (0, "web-{n}"),
            (51, "web-{n}"),
            (2, "web"),
            (2, "web-{n}-{n}"),
            (2, "web_{n}"),
            (2, "-{n}"),
            (1, ""),
        ] {
            let e = expand_names(count, pattern, &none).unwrap_err();
            assert!(
                matches!(e, DomainError::Invalid { .. }),
                "{count} {pattern:?}: {e:?}"
            );
        }
        // 63 characters at most per label, checked on the names made.
        let long = format!("{}{{n}}", "a".repeat(62));
        assert!(expand_names(9, &long, &none).is_ok());
        assert!(expand_names(10, &long, &none).is_err());
    }

    #[test]
    fn explicit_vmid_and_static_address_count_up_per_node() {
        let mut params = serde_json::json!({ "name": "web-1", "clone_options": {
            "vm_id": 500, "ip_config": { "mode": "static", "address": "10.0.0.10/24", "gateway": "10.0.0.1" }
        }});
        let original = params.clone();
        per_node_clone_options(&mut params, 0).unwrap();
        assert_eq!(params, original);
        per_node_clone_options(&mut params, 3).unwrap();
        let o = &params["clone_options"];
        assert_eq!(o["vm_id"], 503);
        assert_eq!(o["ip_config"]["address"], "10.0.0.13/24");
        assert_eq!(o["ip_config"]["gateway"], "10.0.0.1");
        // without clone options nothing changes
        let mut plain = serde_json::json!({ "name": "x" });
        per_node_clone_options(&mut plain, 5).unwrap();
        assert_eq!(plain, serde_json::json!({ "name": "x" }));
    }

    #[test]
    fn per_node_values_that_leave_their_range_are_refused() {
        assert_eq!(nth_vm_id(999_999_998, 1).unwrap(), 999_999_999);
        assert!(nth_vm_id(999_999_998, 2).is_err());
        assert!(nth_vm_id(u32::MAX, 1).is_err());
        // .254 is the last host of a /24; .255 its broadcast
        assert_eq!(
            nth_address("10.0.0.250/24", None, 4).unwrap(),
            "10.0.0.254/24"
        );
        let e = nth_address("10.0.0.250/24", None, 5).unwrap_err();
        assert!(e.to_string().contains("broadcast"), "{e}");
        let e = nth_address("10.0.0.250/24", None, 6).unwrap_err();
        assert!(e.to_string().contains("outside 10.0.0.0/24"), "{e}");
        assert!(
            e.to_string().starts_with("cloneOptions.ipConfig.address"),
            "{e}"
        );
        // the gateway inside the range
        let e = nth_address("10.0.0.10/24", Some("10.0.0.12"), 2).unwrap_err();
        assert!(e.to_string().contains("gateway"), "{e}");
        assert_eq!(
            nth_address("10.0.0.10/24", Some("10.0.0.12"), 1).unwrap(),
            "10.0.0.11/24"
        );
        // a /32 holds one address; a /31 two (no network/broadcast, RFC 3021)
        assert!(nth_address("10.0.0.10/32", None, 1).is_err());
        assert_eq!(
            nth_address("10.0.0.10/31", None, 1).unwrap(),
            "10.0.0.11/31"
        );
        assert!(nth_address("255.255.255.255/0", None, 1).is_err());
    }

    #[test]
    fn a_literal_name_is_one_node_and_must_be_free() {
        assert_eq!(expand_names(1, "db", &taken(&[])).unwrap(), ["db"]);
        let e = expand_names(1, "db", &taken(&["DB"])).unwrap_err();
        assert!(matches!(
            e,
            DomainError::Conflict {
                code: "duplicate_name",
                ..
            }
        ));
    }
}
