//! The HTTP contract: every request and response body of the API as a serde type. The
//! OpenAPI document (`GET /api/openapi.json`, checked in as `docs/openapi.json`) is
//! generated from these, and the UI's TypeScript types are generated from that document,
//! so a change here that the UI does not follow fails its build.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::db::{AgentRow, CommandRow, NodeRow, StageRow, TemplateRow};
use crate::model::{
    AgentId, AgentStatus, CommandId, CommandStatus, NodeId, NodeStatus, TemplateId,
};
use crate::time::{opt_rfc3339, rfc3339};

/// Every error: a stable machine-readable `code` and a message safe to show.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// e.g. `not_found`, `invalid_params`, `agent_offline`, `already_provisioning`.
    pub code: String,
    pub message: String,
}

// ---------------------------------------------------------------------------------------
// agents

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub status: AgentStatus,
    /// RFC 3339.
    pub last_heartbeat: Option<String>,
    pub connected_at: Option<String>,
    pub version: Option<String>,
    pub hostname: Option<String>,
    /// Command types the agent can run (`ping`, `provision`, `list_templates`, `terraform_apply`, `terraform_plan`, `terraform_destroy`, `vm_power`, `destroy`).
    pub capabilities: Vec<String>,
    /// What the agent reported about its host (e.g. `proxmox_nodes`).
    pub facts: Value,
    pub max_concurrency: i64,
    pub created_at: String,
    /// The replica holding the agent's session (the last one, while it lives): its name.
    pub replica: Option<String>,
    /// That replica's id (`GET /api/cluster/replicas`).
    pub replica_id: Option<String>,
}

impl From<&AgentRow> for Agent {
    fn from(a: &AgentRow) -> Self {
        Self {
            id: a.id,
            name: a.name.clone(),
            status: a.status,
            last_heartbeat: opt_rfc3339(a.last_heartbeat),
            connected_at: opt_rfc3339(a.connected_at),
            version: a.version.clone(),
            hostname: a.hostname.clone(),
            capabilities: a.capabilities.clone(),
            facts: a.facts.clone(),
            max_concurrency: a.max_concurrency,
            created_at: rfc3339(a.created_at),
            replica: a.replica.as_ref().map(|(_, name)| name.clone()),
            replica_id: a.replica.as_ref().map(|(id, _)| id.clone()),
        }
    }
}

/// One running replica of the control plane (several share one PostgreSQL).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
    /// When it last renewed its lease (every 2 s; dead after 10 s without).
    pub heartbeat_at: String,
    /// Stopping: not ready, takes no new agent sessions.
    pub draining: bool,
    /// Runs the cluster-wide housekeeping (deadlines, retention, stale agents).
    pub leader: bool,
    /// Agents whose session it holds.
    pub agents_online: i64,
    /// Whether this is the replica that answered.
    pub this: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplicaList {
    pub items: Vec<Replica>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<Agent>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateAgentRequest {
    /// 1–64 letters, digits, `-`, `_`, `.` or spaces; unique among live agents.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._ -]+$")]
    pub name: String,
    /// 1–1024 (default 4).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1024)]
    pub max_concurrency: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateAgentRequest {
    /// 1–1024: how many commands the agent runs at once (its own setting can only lower it).
    #[schema(minimum = 1, maximum = 1024)]
    pub max_concurrency: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedAgent {
    pub agent: Agent,
    /// The agent's token, shown only this once (only its hash is stored).
    pub token: String,
    /// The control plane's dispatch-signing public key (Ed25519, base64): give it to the
    /// agent as `--server-public-key` so it pins it instead of trusting its first server.
    #[serde(rename = "serverPublicKey")]
    pub server_public_key: String,
    /// The URL trellis is reached at (`--public-url`), for the install one-liner
    /// (`curl -fsSL <publicUrl>/install/tendril.sh | sh -s -- --server <publicUrl>`); null
    /// when not configured (a browser then uses the address it reached trellis at).
    #[serde(rename = "publicUrl")]
    pub public_url: Option<String>,
}

/// How to install an agent on a host (`GET /api/agents/install`): what the install line
/// needs besides the agent's token, which is never part of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallInfo {
    /// The URL trellis is reached at (`--public-url`); null when not configured (a browser
    /// then uses the address it reached trellis at).
    pub public_url: Option<String>,
    /// The control plane's dispatch-signing public key (Ed25519, base64), pinned by the
    /// install line's `--server-public-key`.
    pub server_public_key: String,
    /// The install one-liner for `publicUrl` (no token: the script asks for it, or reads
    /// `TENDRIL_TOKEN`); null without a public URL.
    pub install_command: Option<String>,
}

/// What `GET /api/agents/self` tells an agent's token holder about its agent.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentSelf {
    pub id: AgentId,
    pub name: String,
    /// `online` once trellis has the agent's session.
    pub status: AgentStatus,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    /// The new token, shown only this once; the old one stops working.
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxmoxTemplate {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    /// MiB.
    pub memory: u64,
    pub cores: u32,
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentTemplates {
    pub templates: Vec<ProxmoxTemplate>,
    /// The `list_templates` command that fetched them.
    pub command_id: CommandId,
}

// ---------------------------------------------------------------------------------------
// commands

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    pub name: String,
    /// `pending`, `running`, `completed`, `failed` or `skipped`.
    pub state: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub message: Option<String>,
}

impl From<&StageRow> for Stage {
    fn from(s: &StageRow) -> Self {
        Self {
            name: s.name.clone(),
            state: s.state.clone(),
            started_at: opt_rfc3339(s.started_at),
            finished_at: opt_rfc3339(s.finished_at),
            message: s.message.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    pub id: CommandId,
    pub agent_id: AgentId,
    /// `ping`, `provision`, `list_templates`, `terraform_apply`, `terraform_plan`, `terraform_destroy`, `vm_power` or `destroy`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// The command's parameters; sensitive Terraform variables read `***`.
    pub params: Value,
    pub status: CommandStatus,
    pub stage: Option<String>,
    pub percent: Option<f64>,
    pub result: Option<Value>,
    /// `{code, message, retryable?, stage?, details?}` when it failed.
    pub error: Option<Value>,
    pub attempt: i64,
    pub root_command_id: CommandId,
    pub retry_of: Option<CommandId>,
    pub idempotency_key: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub dispatched_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub deadline_at: String,
    pub cancel_requested: bool,
    /// Kept past the retention period (`--retention-days`) until unpinned
    /// (`PUT`/`DELETE /api/commands/{id}/pin`).
    pub pinned: bool,
    /// The seq of the last stored event.
    pub last_seq: i64,
    /// The planned and reported stages (on single-command reads only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<Stage>>,
    /// What the command acts on (node, VM, Terraform workspace), on list and single reads
    /// (not on SSE `status` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<CommandTarget>,
}

/// What a command acts on, so lists can tell commands of one type apart.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandTarget {
    /// The node it was started for (provision, power, destroy and their retries).
    pub node_id: Option<NodeId>,
    /// That node's name; null when the node has been deleted since.
    pub node_name: Option<String>,
    /// The Proxmox VMID acted on (power, destroy) or built (provision, once known).
    pub vm_id: Option<i64>,
    /// The Proxmox node (host) of that VM.
    pub proxmox_node: Option<String>,
    /// `terraform_apply`, `terraform_plan`, `terraform_destroy`: the Terraform state
    /// workspace (`workspace_key`, else `<repo>#<path>` without the URL's credentials), the
    /// name `/api/terraform/workspaces` lists.
    pub workspace: Option<String>,
    /// The same commands: the template version (tag, branch or commit) asked for.
    pub version: Option<String>,
}

impl CommandTarget {
    /// From the command's params and outcome, and the node it was started for.
    pub fn of(c: &CommandRow, node: Option<&crate::db::NodeRef>) -> Option<Self> {
        use trellis_protocol::CommandType;
        let num = |v: Option<&Value>| v.and_then(Value::as_i64);
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let p = &c.params;
        let mut t = Self {
            node_id: node.map(|n| n.id),
            node_name: node.and_then(|n| n.name.clone()),
            ..Self::default()
        };
        match c.command_type {
            CommandType::VmPower | CommandType::Destroy => {
                t.vm_id = num(p.get("vm_id"));
                t.proxmox_node = text(p.get("node"));
            }
            CommandType::Provision => {
                // The VM built, or the half-built one named in the error's details.
                let details = c.error.as_ref().and_then(|e| e.get("details"));
                let from = c.result.as_ref().or(details);
                t.vm_id = num(from.and_then(|r| r.get("vm_id")));
                t.proxmox_node =
                    text(from.and_then(|r| r.get("node"))).or_else(|| text(p.get("target_node")));
            }
            CommandType::TerraformApply
            | CommandType::TerraformPlan
            | CommandType::TerraformDestroy => {
                // The state workspace itself (the name `/api/terraform/state/{workspace}`
                // and `/api/terraform/workspaces` use), and the template version apart.
                t.workspace = crate::domain::terraform_state::workspace_of(p);
                t.version = p
                    .get("template_source")
                    .and_then(|s| text(s.get("version")));
            }
            _ => {}
        }
        let empty = t.node_id.is_none() && t.vm_id.is_none() && t.workspace.is_none();
        (!empty).then_some(t)
    }
}

impl Command {
    pub fn new(c: &CommandRow, stages: Option<&[StageRow]>) -> Self {
        Self {
            id: c.id,
            agent_id: c.agent_id,
            command_type: c.command_type.as_str().to_string(),
            params: redacted(redact_params(c)),
            status: c.status,
            stage: c.stage.clone(),
            percent: c.percent,
            result: c.result.clone().map(redacted),
            error: c.error.clone().map(redacted),
            attempt: c.attempt,
            root_command_id: c.root_id,
            retry_of: c.retry_of,
            idempotency_key: c.idempotency_key.clone(),
            created_by: c.created_by.clone(),
            created_at: rfc3339(c.created_at),
            dispatched_at: opt_rfc3339(c.dispatched_at),
            started_at: opt_rfc3339(c.started_at),
            finished_at: opt_rfc3339(c.finished_at),
            deadline_at: rfc3339(c.deadline_at),
            cancel_requested: c.cancel_requested,
            pinned: c.pinned,
            last_seq: c.last_seq,
            stages: stages.map(|s| s.iter().map(Stage::from).collect()),
            target: None,
        }
    }

    /// The same with `target` filled (list and single reads).
    pub fn with_target(mut self, c: &CommandRow, node: Option<&crate::db::NodeRef>) -> Self {
        self.target = CommandTarget::of(c, node);
        self
    }
}

/// `v` with the credentials of every URL in it replaced (see [`crate::api::redact`]).
fn redacted(mut v: Value) -> Value {
    crate::api::redact::json(&mut v);
    v
}

/// Sensitive Terraform variables are stored (the agent needs them) but never shown.
fn redact_params(c: &CommandRow) -> Value {
    use trellis_protocol::Command as C;
    if !c.command_type.is_terraform() {
        return c.params.clone();
    }
    let (Ok(C::TerraformApply(p)) | Ok(C::TerraformPlan(p)) | Ok(C::TerraformDestroy(p))) =
        C::parse(c.command_type.as_str(), &c.params)
    else {
        return c.params.clone();
    };
    let mut out = c.params.clone();
    if let Some(vars) = out.get_mut("terraform_vars").and_then(Value::as_object_mut) {
        for (k, v) in vars.iter_mut() {
            if p.is_sensitive(k) {
                *v = Value::String("***".into());
            }
        }
    }
    out
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandList {
    pub items: Vec<Command>,
    /// Cursor for the next (older) page: pass it as `before`; absent on the last page.
    pub next_before: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCommandRequest {
    pub agent_id: String,
    /// `ping`, `provision`, `list_templates`, `terraform_apply`, `terraform_plan`, `terraform_destroy`, `vm_power` or `destroy`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// The command's parameters (see `protocol/README.md`).
    #[serde(default)]
    pub params: Value,
    /// 1–200 characters: the same key with the same request answers with the same command.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    pub idempotency_key: Option<String>,
    /// 1–604800 (default per type).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 604800)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandAccepted {
    pub command_id: CommandId,
    pub status: CommandStatus,
    /// On a retry: the new attempt's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct CommandListQuery {
    pub agent_id: Option<String>,
    pub status: Option<String>,
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub command_type: Option<String>,
    /// 1–1000 (default 100).
    pub limit: Option<i64>,
    /// `nextBefore` of the previous page, or Unix milliseconds.
    pub before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandGetQuery {
    /// Long-poll: wait up to this many seconds (at most 60) for the command to end.
    pub wait: Option<f64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Log lines after this seq (default 0).
    pub after: Option<i64>,
    /// 1–10000 (default 1000).
    pub limit: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this seq (`Last-Event-ID` takes precedence).
    pub after: Option<i64>,
}

/// One Server-Sent Event of `GET /api/commands/{id}/events`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SseFrame {
    /// `status` (data: the Command without stages; sent first and on every status change),
    /// `log`, `stage`, `progress`, `finished` (data: the event with `seq`, `ts`, `kind`),
    /// or `end` (the command is terminal and everything was sent).
    #[schema(pattern = "^(status|log|stage|progress|finished|end)$")]
    pub event: String,
    /// JSON text.
    pub data: String,
    /// The event's seq (absent on `status` and `end`): resume with `Last-Event-ID`.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub seq: i64,
    /// Unix milliseconds.
    pub ts: i64,
    /// `stdout`, `stderr` or `system`.
    pub stream: Option<String>,
    pub data: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogPage {
    pub items: Vec<LogLine>,
    /// The seq of the last line returned (the `after` of the next page) — not the command's
    /// last event seq: events of other kinds have seqs too.
    pub last_seq: i64,
    /// The command ended and every line was returned.
    pub done: bool,
}

// ---------------------------------------------------------------------------------------
// templates

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    pub id: TemplateId,
    pub name: String,
    pub description: Option<String>,
    pub memory: i64,
    pub cores: i64,
    pub proxmox_template_id: Option<i64>,
    pub proxmox_node: Option<String>,
    pub network_bridge: Option<String>,
    pub pre_provision_commands: Vec<String>,
    pub post_provision_commands: Vec<String>,
    /// Defaults for the clone options of nodes provisioned from it.
    pub clone_defaults: Option<CloneOptions>,
    pub system: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&TemplateRow> for Template {
    fn from(t: &TemplateRow) -> Self {
        Self {
            id: t.id,
            name: t.fields.name.clone(),
            description: t.fields.description.clone(),
            memory: t.fields.memory,
            cores: t.fields.cores,
            proxmox_template_id: t.fields.proxmox_template_id,
            proxmox_node: t.fields.proxmox_node.clone(),
            network_bridge: t.fields.network_bridge.clone(),
            pre_provision_commands: t.fields.pre_provision_commands.clone(),
            post_provision_commands: t.fields.post_provision_commands.clone(),
            clone_defaults: t.fields.clone_defaults.as_ref().map(Into::into),
            system: t.system,
            created_at: rfc3339(t.created_at),
            updated_at: rfc3339(t.updated_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub items: Vec<Template>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateRequest {
    /// 1–100 characters.
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// MiB.
    #[schema(minimum = 16, maximum = 4194304)]
    pub memory: i64,
    #[schema(minimum = 1, maximum = 512)]
    pub cores: i64,
    /// The Proxmox template's VMID (100–999999999).
    #[serde(default)]
    #[schema(minimum = 100, maximum = 999999999)]
    pub proxmox_template_id: Option<i64>,
    #[serde(default)]
    pub proxmox_node: Option<String>,
    /// A bridge name: letters, digits and `_`.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_]*$")]
    pub network_bridge: Option<String>,
    #[serde(default)]
    pub pre_provision_commands: Vec<String>,
    #[serde(default)]
    pub post_provision_commands: Vec<String>,
    /// Defaults for the clone options of nodes provisioned from it (e.g. `ciUser`).
    #[serde(default)]
    pub clone_defaults: Option<CloneOptions>,
}

impl From<TemplateRequest> for crate::db::TemplateFields {
    fn from(b: TemplateRequest) -> Self {
        Self {
            name: b.name,
            description: b.description,
            memory: b.memory,
            cores: b.cores,
            proxmox_template_id: b.proxmox_template_id,
            proxmox_node: b.proxmox_node,
            network_bridge: b.network_bridge,
            pre_provision_commands: b.pre_provision_commands,
            post_provision_commands: b.post_provision_commands,
            clone_defaults: b.clone_defaults.map(Into::into),
        }
    }
}

// ---------------------------------------------------------------------------------------
// nodes

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: NodeId,
    pub application: Option<String>,
    pub name: String,
    pub template_id: Option<TemplateId>,
    pub memory: i64,
    pub cores: i64,
    pub vm_id: Option<i64>,
    pub hypervisor_id: Option<AgentId>,
    pub ip_address: Option<String>,
    pub status: NodeStatus,
    pub last_command_id: Option<CommandId>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// The Proxmox node its VM is on.
    pub vm_node: Option<String>,
    /// When the hypervisor's inventory last showed its VM (RFC 3339).
    pub observed_at: Option<String>,
    /// In the nodes list: the stage and percent of the command running on the node
    /// (provisioning, destroying, a power action); null when none runs.
    #[serde(default)]
    pub progress: Option<NodeProgress>,
}

impl From<&NodeRow> for Node {
    fn from(n: &NodeRow) -> Self {
        Self {
            id: n.id,
            application: n.application.clone(),
            name: n.name.clone(),
            template_id: n.template_id,
            memory: n.memory,
            cores: n.cores,
            vm_id: n.vm_id,
            hypervisor_id: n.hypervisor_id,
            ip_address: n.ip_address.clone(),
            status: n.status,
            last_command_id: n.last_command_id,
            error: n.error.clone(),
            created_at: rfc3339(n.created_at),
            updated_at: rfc3339(n.updated_at),
            vm_node: n.vm_node.clone(),
            observed_at: opt_rfc3339(n.observed_at),
            progress: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    pub items: Vec<Node>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionRequest {
    /// The hypervisor (agent) to provision on.
    pub agent_id: String,
    /// The Proxmox node of that hypervisor's cluster (default: the template's).
    #[serde(default)]
    pub target_node: Option<String>,
    /// Keep a VM that failed half-way for inspection instead of deleting it.
    #[serde(default)]
    pub keep_on_failure: bool,
    /// Proxmox clone options; absent fields take the template's `cloneDefaults`.
    #[serde(default)]
    pub clone_options: Option<CloneOptions>,
}

/// Proxmox clone and cloud-init options of a provision (all optional). Invalid values are
/// refused with 400 `invalid_params` naming the field; when Proxmox rejects one later,
/// the command's `error.details.field` names it (`storage`, `disk_size_gib`, `vm_id`, …).
/// In a provision request an absent field takes the template's default and a given one
/// overrides it; `""` (storage, ciUser, pool), `0` (diskSizeGib, vlanTag) and `[]`
/// (sshKeys, tags) clear the default, and `full: false` without a storage drops the
/// default storage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneOptions {
    /// Target storage of the disks (implies a full clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 64)]
    pub storage: Option<String>,
    /// Full (copied disks) or linked clone; default linked (full with `storage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<bool>,
    /// Grow the boot disk to this size (GiB) after the clone; never shrinks (`0` in a
    /// provision: no resize, whatever the template's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 65536)]
    pub disk_size_gib: Option<u32>,
    /// Explicit VMID (default: the next free one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 100, maximum = 999999999)]
    pub vm_id: Option<u32>,
    /// Cloud-init user; also the user of the UI's "Copy SSH command".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 32)]
    pub ci_user: Option<String>,
    /// OpenSSH public keys, one per entry (`[]` in a provision: none, whatever the
    /// template's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_config: Option<IpConfig>,
    /// VLAN tag of the first network interface (`0` in a provision: untagged, whatever the
    /// template's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 4094)]
    pub vlan_tag: Option<u16>,
    /// Resource pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 64)]
    pub pool: Option<String>,
    /// Proxmox tags, added to Trellis's own (`[]` in a provision: none of the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Start at boot of the Proxmox node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onboot: Option<bool>,
}

/// Cloud-init IP configuration of the first interface.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum IpConfig {
    Dhcp,
    Static {
        /// IPv4 with prefix, e.g. `10.0.0.5/24`.
        address: String,
        /// IPv4 gateway in that network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<String>,
    },
}

impl From<CloneOptions> for trellis_protocol::CloneOptions {
    fn from(o: CloneOptions) -> Self {
        Self {
            storage: o.storage,
            full: o.full,
            disk_size_gib: o.disk_size_gib,
            vm_id: o.vm_id,
            ci_user: o.ci_user,
            ssh_keys: o.ssh_keys.unwrap_or_default(),
            ip_config: o.ip_config.map(|i| match i {
                IpConfig::Dhcp => trellis_protocol::IpConfig::Dhcp,
                IpConfig::Static { address, gateway } => {
                    trellis_protocol::IpConfig::Static { address, gateway }
                }
            }),
            vlan_tag: o.vlan_tag,
            pool: o.pool,
            tags: o.tags.unwrap_or_default(),
            onboot: o.onboot,
        }
    }
}

impl From<&trellis_protocol::CloneOptions> for CloneOptions {
    fn from(o: &trellis_protocol::CloneOptions) -> Self {
        let o = o.clone();
        Self {
            storage: o.storage,
            full: o.full,
            disk_size_gib: o.disk_size_gib,
            vm_id: o.vm_id,
            ci_user: o.ci_user,
            ssh_keys: (!o.ssh_keys.is_empty()).then_some(o.ssh_keys),
            ip_config: o.ip_config.map(|i| match i {
                trellis_protocol::IpConfig::Dhcp => IpConfig::Dhcp,
                trellis_protocol::IpConfig::Static { address, gateway } => {
                    IpConfig::Static { address, gateway }
                }
            }),
            vlan_tag: o.vlan_tag,
            pool: o.pool,
            tags: (!o.tags.is_empty()).then_some(o.tags),
            onboot: o.onboot,
        }
    }
}

/// Import a VM of a hypervisor's inventory (one Trellis does not track) as a node.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportNodeRequest {
    /// The hypervisor whose inventory shows the VM.
    pub agent_id: String,
    #[schema(minimum = 100, maximum = 999999999)]
    pub vm_id: i64,
    /// The node's name (default: the VM's).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub application: Option<String>,
    /// Import even if another node has this name.
    #[serde(default)]
    pub force: bool,
}

/// `start`, `shutdown` (ACPI / guest agent), `stop` (hard power-off) or `reboot`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Start,
    Shutdown,
    Stop,
    Reboot,
}

impl From<PowerAction> for trellis_protocol::PowerAction {
    fn from(a: PowerAction) -> Self {
        match a {
            PowerAction::Start => Self::Start,
            PowerAction::Shutdown => Self::Shutdown,
            PowerAction::Stop => Self::Stop,
            PowerAction::Reboot => Self::Reboot,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PowerRequest {
    pub action: PowerAction,
    /// Seconds to wait for the new state (default 120).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_s: Option<u32>,
    /// `shutdown` only: power the VM off if the guest has not stopped after this many seconds.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub force_after_s: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestroyRequest {
    /// The node's name, typed by the admin to confirm.
    pub confirm_name: String,
}

/// A VM of a hypervisor's latest inventory.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentVm {
    pub vm_id: i64,
    /// The Proxmox node.
    pub node: String,
    pub name: String,
    /// What Proxmox reports (`running`, `stopped`, …).
    pub status: String,
    /// The Trellis tag (`trellis-command=<id>`) when the VM carries one.
    pub tag: Option<String>,
    pub ip_addresses: Vec<String>,
    pub seen_at: String,
    /// The node tracking this VM; null for a VM Trellis does not track (with a tag:
    /// made by Trellis and forgotten or left over — adopt or clean it up).
    pub node_id: Option<NodeId>,
}

impl From<&crate::db::AgentVmRow> for AgentVm {
    fn from(v: &crate::db::AgentVmRow) -> Self {
        Self {
            vm_id: v.vm_id,
            node: v.node.clone(),
            name: v.name.clone(),
            status: v.status.clone(),
            tag: v.tag.clone(),
            ip_addresses: v.ip_addresses.clone(),
            seen_at: rfc3339(v.seen_at),
            node_id: v.tracked_by,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentVmList {
    pub items: Vec<AgentVm>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateNodeRequest {
    /// A valid VM (DNS) name.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
    )]
    pub name: String,
    #[schema(format = Uuid)]
    pub template_id: String,
    /// MiB (default: the template's).
    #[serde(default)]
    #[schema(minimum = 16, maximum = 4194304)]
    pub memory: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 512)]
    pub cores: Option<i64>,
    #[serde(default)]
    pub application: Option<String>,
    /// Provision at once on this hypervisor.
    #[serde(default)]
    pub provision: Option<ProvisionRequest>,
    /// Create the node even if another node (not destroyed) has this name; without it a
    /// taken name is refused with 409 `duplicate_name`.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateNodeRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub template_id: Option<String>,
    #[serde(default)]
    pub memory: Option<i64>,
    #[serde(default)]
    pub cores: Option<i64>,
    /// `""` clears it.
    #[serde(default)]
    pub application: Option<String>,
    /// `running` or `stopped`, on a node that has a VM.
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeWithCommand {
    pub node: Node,
    /// The provision command, when one was started.
    pub command_id: Option<CommandId>,
}

// ---------------------------------------------------------------------------------------
// many nodes at once

/// How far the command running on a node has got.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeProgress {
    /// `provision`, `vm_power` or `destroy`.
    pub command_type: String,
    pub command_status: CommandStatus,
    /// The stage running now (e.g. `configure_vm`).
    pub stage: Option<String>,
    /// 0–100.
    pub percent: Option<f64>,
    /// 1 for the first attempt, 2 for its first retry, …
    pub attempt: i64,
}

impl From<&crate::db::NodeProgress> for NodeProgress {
    fn from(p: &crate::db::NodeProgress) -> Self {
        Self {
            command_type: p.command_type.as_str().to_string(),
            command_status: p.command_status,
            stage: p.stage.clone(),
            percent: p.percent,
            attempt: p.attempt,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct NodeListQuery {
    /// Only the nodes of this bulk provision.
    pub batch_id: Option<String>,
}

/// Create `count` nodes named from `namePattern` and provision them all on one hypervisor.
/// `{n}` counts from 1 and skips names already taken (ignoring case): `web-{n}` × 3 with
/// `web-1` present makes `web-2`, `web-3`, `web-4`. Without `{n}` (count 1 only) the
/// pattern is the name, refused with 409 `duplicate_name` if a node (not destroyed) has it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkProvisionRequest {
    #[schema(minimum = 1, maximum = 50)]
    pub count: u32,
    /// e.g. `web-{n}`; must contain `{n}` when `count` > 1.
    #[schema(min_length = 1, max_length = 66)]
    pub name_pattern: String,
    #[schema(format = Uuid)]
    pub template_id: String,
    /// MiB for each node (default: the template's).
    #[serde(default)]
    #[schema(minimum = 16, maximum = 4194304)]
    pub memory: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 512)]
    pub cores: Option<i64>,
    #[serde(default)]
    pub application: Option<String>,
    /// The hypervisor and options, as for one node.
    pub provision: ProvisionRequest,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchMember {
    pub node_id: NodeId,
    pub name: String,
    /// Its provision command.
    pub command_id: CommandId,
}

/// A started bulk provision; follow it with `GET /api/nodes?batchId=…`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchStarted {
    pub batch_id: String,
    pub nodes: Vec<BatchMember>,
}

/// What a bulk action does to each node: a power action, destroy, or `retry` (provision a
/// node whose provision failed again, as a new attempt).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BulkNodeAction {
    Start,
    Shutdown,
    Stop,
    Reboot,
    Destroy,
    Retry,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkActionRequest {
    /// 1–200 node ids (a repeated id counts once).
    #[schema(min_items = 1, max_items = 200)]
    pub node_ids: Vec<String>,
    pub action: BulkNodeAction,
    /// `destroy` only: the names of the nodes, typed or confirmed by the admin; a node
    /// whose name is missing is not destroyed (`confirmation_mismatch`).
    #[serde(default)]
    pub confirm_names: Vec<String>,
}

/// One node's result: its command, or why it was refused.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkNodeResult {
    /// As given in the request.
    pub node_id: String,
    /// Null for an unknown node.
    pub name: Option<String>,
    pub command_id: Option<CommandId>,
    pub error: Option<ErrorDetail>,
}

/// Per-node results, in the order of the request; one node's refusal does not stop the
/// others.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkActionResults {
    pub results: Vec<BulkNodeResult>,
    pub succeeded: usize,
    pub failed: usize,
}

// ---- Admins, sessions and the audit log ----

/// `POST /api/session`: an admin token to exchange for a session cookie.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SignInRequest {
    pub token: String,
}

/// Who is signed in.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The admin's name (`admin` for the bootstrap token).
    pub name: String,
    /// `cookie` (a browser session) or `token` (a bearer token).
    pub via: String,
    /// When the session ends (Unix milliseconds); none for a bearer token.
    pub expires_at: Option<i64>,
}

/// A named admin (never its token).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminInfo {
    pub name: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl From<&crate::db::AdminRow> for AdminInfo {
    fn from(a: &crate::db::AdminRow) -> Self {
        Self {
            name: a.name.clone(),
            created_at: rfc3339(a.created_at),
            last_used_at: opt_rfc3339(a.last_used_at),
            revoked_at: opt_rfc3339(a.revoked_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminList {
    pub items: Vec<AdminInfo>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateAdminRequest {
    /// 1–64 characters: letters, digits, `.`, `_`, `-`, `@`.
    pub name: String,
}

/// A new admin and its token, shown only in this answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminCreated {
    pub admin: AdminInfo,
    pub token: String,
}

/// One audited action.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub id: String,
    /// When (RFC 3339).
    pub at: String,
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// The admin's name, or `anonymous` for failed authentication.
    pub actor: String,
    /// A stable dotted name: `node.power`, `command.cancel`, `agent.rotate_token`,
    /// `auth.sign_in`, `auth.failed`, …
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub target_name: Option<String>,
    /// `success`, `error`, or `partial` (a bulk request some of whose nodes were refused;
    /// `error` when all were).
    pub outcome: String,
    /// The HTTP status answered.
    pub status: i64,
    pub error_code: Option<String>,
    pub remote_addr: Option<String>,
    /// What the handler added: the command started, per-node results of a bulk request…
    pub details: Option<Value>,
}

impl From<crate::db::AuditRow> for AuditEntry {
    fn from(a: crate::db::AuditRow) -> Self {
        Self {
            id: a.id,
            at: rfc3339(a.at),
            at_ms: a.at,
            actor: a.actor,
            action: a.action,
            target_type: a.target_type,
            target_id: a.target_id,
            target_name: a.target_name,
            outcome: a.outcome,
            status: a.status,
            error_code: a.error_code,
            remote_addr: a.remote_addr,
            details: a.details,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditList {
    pub items: Vec<AuditEntry>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Exact admin name.
    pub actor: Option<String>,
    /// Action prefix (`node.` matches `node.power`).
    pub action: Option<String>,
    pub target_id: Option<String>,
    /// `success`, `partial` or `error`.
    pub outcome: Option<String>,
    /// From this time on (Unix milliseconds, inclusive).
    pub since: Option<i64>,
    /// Before this time (Unix milliseconds, exclusive).
    pub until: Option<i64>,
    /// 1–500 (default 50).
    pub limit: Option<u32>,
    /// `nextBefore` of the previous page, or Unix milliseconds.
    pub before: Option<String>,
}
