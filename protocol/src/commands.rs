//! Command types with their typed params and results. The control plane validates params
//! with [`Command::parse`] before persisting a command; the agent parses them again
//! before running it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kinds of command an agent can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandType {
    Ping,
    Provision,
    ListTemplates,
    TerraformApply,
    /// `terraform plan` saved on the agent, applied later by a `terraform_apply` with
    /// `plan_command_id`.
    TerraformPlan,
    /// `terraform destroy` of a configuration's resources.
    TerraformDestroy,
    /// Start, shut down, stop or reboot a VM Trellis made.
    VmPower,
    /// Stop and delete a VM Trellis made (refused for a VM without the expected tag).
    Destroy,
    /// A type this build does not know (sent by a newer peer). Never sent.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl CommandType {
    pub const ALL: [CommandType; 8] = [
        Self::Ping,
        Self::Provision,
        Self::ListTemplates,
        Self::TerraformApply,
        Self::TerraformPlan,
        Self::TerraformDestroy,
        Self::VmPower,
        Self::Destroy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::Provision => "provision",
            Self::ListTemplates => "list_templates",
            Self::TerraformApply => "terraform_apply",
            Self::TerraformPlan => "terraform_plan",
            Self::TerraformDestroy => "terraform_destroy",
            Self::VmPower => "vm_power",
            Self::Destroy => "destroy",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The stages this command reports, in order (empty when it has none).
    pub fn stages(self) -> &'static [&'static str] {
        match self {
            Self::Provision => &PROVISION_STAGES,
            Self::TerraformApply => &TERRAFORM_STAGES,
            Self::TerraformPlan => &TERRAFORM_PLAN_STAGES,
            Self::TerraformDestroy => &TERRAFORM_DESTROY_STAGES,
            Self::VmPower => &VM_POWER_STAGES,
            Self::Destroy => &DESTROY_STAGES,
            _ => &[],
        }
    }

    /// The Terraform commands: params [`TerraformApplyParams`], a state workspace, a
    /// state credential in their dispatch.
    pub fn is_terraform(self) -> bool {
        matches!(
            self,
            Self::TerraformApply | Self::TerraformPlan | Self::TerraformDestroy
        )
    }
}

impl std::fmt::Display for CommandType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const PROVISION_STAGES: [&str; 6] = [
    "clone_template",
    "configure_vm",
    "start_vm",
    "wait_network",
    "post_provision",
    "register",
];

pub const TERRAFORM_STAGES: [&str; 4] = ["fetch_template", "init", "apply", "outputs"];

/// `plan`: `terraform plan -out`; `show`: the summary read from the saved plan.
pub const TERRAFORM_PLAN_STAGES: [&str; 4] = ["fetch_template", "init", "plan", "show"];

pub const TERRAFORM_DESTROY_STAGES: [&str; 3] = ["fetch_template", "init", "destroy"];

/// `request`: the power task is accepted by Proxmox; `wait_state`: the VM reached the new
/// state (a task that was accepted is not a state that was reached).
pub const VM_POWER_STAGES: [&str; 2] = ["request", "wait_state"];

/// `check_tag`: the VM carries the expected tag (or is already gone); `stop_vm`: stopped
/// if it ran; `delete_vm`: deleted with its disks and job/HA references; `confirm_gone`:
/// the inventory no longer lists it.
pub const DESTROY_STAGES: [&str; 4] = ["check_tag", "stop_vm", "delete_vm", "confirm_gone"];

/// The line Trellis writes into the description of every VM it makes:
/// `trellis-command=<root command id of the provision>`. Destroy refuses a VM without it.
pub const VM_TAG_PREFIX: &str = "trellis-command=";

/// The tag of the VM a provision with this root command id made.
pub fn vm_tag(root_command_id: uuid::Uuid) -> String {
    format!("{VM_TAG_PREFIX}{root_command_id}")
}

/// The Proxmox `tags` entry (letters, digits, `-` only, so it shows in
/// `/cluster/resources` without a per-VM call) of the VM a provision made.
pub fn proxmox_tag(root_command_id: uuid::Uuid) -> String {
    format!("trellis-{root_command_id}")
}

/// The Trellis tag (`trellis-command=<id>`) for a Proxmox `tags` list (`a;b` or `a,b`),
/// if one of its entries is a Trellis tag.
pub fn tag_from_proxmox_tags(tags: &str) -> Option<String> {
    tags.split([';', ',', ' '])
        .filter_map(|t| t.trim().strip_prefix("trellis-"))
        .find_map(|id| id.parse::<uuid::Uuid>().ok())
        .map(vm_tag)
}

/// A command with its typed params.
// Parsed once per command and not kept in bulk: the size of the provision variant is fine.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Ping(PingParams),
    Provision(ProvisionParams),
    ListTemplates(ListTemplatesParams),
    TerraformApply(TerraformApplyParams),
    TerraformPlan(TerraformApplyParams),
    TerraformDestroy(TerraformApplyParams),
    VmPower(VmPowerParams),
    Destroy(DestroyParams),
}

impl Command {
    /// Parses and validates params for a command type given as a string.
    pub fn parse(command_type: &str, params: &serde_json::Value) -> Result<Self, CommandError> {
        let ty = CommandType::parse(command_type).ok_or_else(|| {
            CommandError::new(
                "unsupported_command",
                format!(
                    "unknown command type {command_type:?}; expected one of ping, provision, list_templates, terraform_apply, terraform_plan, terraform_destroy, vm_power, destroy"
                ),
            )
        })?;
        let params = if params.is_null() {
            &serde_json::Value::Object(Default::default())
        } else {
            params
        };
        fn typed<T: serde::de::DeserializeOwned>(
            ty: CommandType,
            v: &serde_json::Value,
        ) -> Result<T, CommandError> {
            T::deserialize(v).map_err(|e| {
                CommandError::new("invalid_params", format!("invalid {ty} params: {e}"))
            })
        }
        let cmd = match ty {
            CommandType::Ping => Self::Ping(typed(ty, params)?),
            CommandType::Provision => Self::Provision(typed(ty, params)?),
            CommandType::ListTemplates => Self::ListTemplates(typed(ty, params)?),
            CommandType::TerraformApply => Self::TerraformApply(typed(ty, params)?),
            CommandType::TerraformPlan => Self::TerraformPlan(typed(ty, params)?),
            CommandType::TerraformDestroy => Self::TerraformDestroy(typed(ty, params)?),
            CommandType::VmPower => Self::VmPower(typed(ty, params)?),
            CommandType::Destroy => Self::Destroy(typed(ty, params)?),
            CommandType::Unknown => unreachable!("parse never yields Unknown"),
        };
        cmd.validate()?;
        Ok(cmd)
    }

    pub fn command_type(&self) -> CommandType {
        match self {
            Self::Ping(_) => CommandType::Ping,
            Self::Provision(_) => CommandType::Provision,
            Self::ListTemplates(_) => CommandType::ListTemplates,
            Self::TerraformApply(_) => CommandType::TerraformApply,
            Self::TerraformPlan(_) => CommandType::TerraformPlan,
            Self::TerraformDestroy(_) => CommandType::TerraformDestroy,
            Self::VmPower(_) => CommandType::VmPower,
            Self::Destroy(_) => CommandType::Destroy,
        }
    }

    fn validate(&self) -> Result<(), CommandError> {
        match self {
            Self::Ping(p) => p.validate(),
            Self::Provision(p) => p.validate(),
            Self::ListTemplates(_) => Ok(()),
            Self::TerraformApply(p) => {
                if p.destroy && p.plan_command_id.is_none() {
                    return Err(invalid(
                        "terraform_apply takes destroy only with the plan_command_id of a destroy plan (the control plane copies it from the plan): make the plan with terraform_plan {destroy: true}",
                    ));
                }
                p.validate()
            }
            Self::TerraformPlan(p) | Self::TerraformDestroy(p) => {
                if p.plan_command_id.is_some() || p.plan_sha256.is_some() {
                    return Err(invalid(
                        "plan_command_id and plan_sha256 belong to terraform_apply only",
                    ));
                }
                if p.destroy && matches!(self, Self::TerraformDestroy(_)) {
                    return Err(invalid(
                        "destroy belongs to terraform_plan (a destroy plan, to approve and apply): terraform_destroy destroys without it",
                    ));
                }
                p.validate()
            }
            Self::VmPower(p) => p.validate(),
            Self::Destroy(p) => p.validate(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> CommandError {
    CommandError::new("invalid_params", msg)
}

/// The error of a failed command, and of params rejected before anything ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandError {
    /// Stable machine-readable code, e.g. `proxmox_error`, `agent_lost_command`.
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
    /// The stage that failed, when the command has stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl CommandError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
            stage: None,
            details: None,
        }
    }

    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    pub fn at_stage(mut self, stage: impl Into<String>) -> Self {
        self.stage = Some(stage.into());
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CommandError {}

// ---------------------------------------------------------------------------------------
// ping

/// Diagnostic command. `{}` answers at once; the optional fields make it emit progress and
/// log events over a duration so tests and benchmarks can exercise streaming.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PingParams {
    /// Total time to spend, spread over the events (at most one day).
    #[serde(default)]
    #[schemars(range(max = 86_400_000))]
    pub duration_ms: u64,
    /// Number of progress events to emit (at most 100000).
    #[serde(default)]
    #[schemars(range(max = 100_000))]
    pub progress_events: u32,
    /// Number of log lines to emit (at most 1000000; lines × bytes at most 256 MiB).
    #[serde(default)]
    #[schemars(range(max = 1_000_000))]
    pub log_lines: u32,
    /// Bytes per log line (default 80; 1–16384).
    #[serde(default)]
    #[schemars(range(min = 1, max = 16_384))]
    pub log_line_bytes: Option<u32>,
    /// End `failed` with this message instead of succeeding.
    #[serde(default)]
    pub fail_with: Option<String>,
}

/// Most log lines one `ping` may ask for.
pub const MAX_PING_LOG_LINES: u32 = 1_000_000;
/// Longest log line one `ping` may ask for, in bytes.
pub const MAX_PING_LOG_LINE_BYTES: u32 = 16 * 1024;
/// Most log bytes one `ping` may ask for in all (`log_lines × log_line_bytes`).
pub const MAX_PING_LOG_BYTES: u64 = 256 * 1024 * 1024;

impl PingParams {
    fn validate(&self) -> Result<(), CommandError> {
        if self.duration_ms > 24 * 3600 * 1000 {
            return Err(invalid("duration_ms must be at most one day"));
        }
        if self.progress_events > 100_000 || self.log_lines > MAX_PING_LOG_LINES {
            return Err(invalid(format!(
                "progress_events must be ≤ 100000 and log_lines ≤ {MAX_PING_LOG_LINES}"
            )));
        }
        if self
            .log_line_bytes
            .is_some_and(|b| b == 0 || b > MAX_PING_LOG_LINE_BYTES)
        {
            return Err(invalid(format!(
                "log_line_bytes must be between 1 and {MAX_PING_LOG_LINE_BYTES}"
            )));
        }
        let total = u64::from(self.log_lines) * u64::from(self.log_line_bytes.unwrap_or(80));
        if total > MAX_PING_LOG_BYTES {
            return Err(invalid(format!(
                "log_lines × log_line_bytes is {total} bytes; at most {MAX_PING_LOG_BYTES} (256 MiB)"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PingResult {
    /// Always true.
    pub pong: bool,
    /// The agent's host.
    pub hostname: String,
    /// The agent's version.
    pub agent_version: String,
    /// Progress and log events sent before the `finished` event.
    pub events_sent: u64,
}

// ---------------------------------------------------------------------------------------
// provision

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProvisionParams {
    /// VM name; must be a valid DNS name (labels of letters, digits and hyphens, not
    /// starting or ending with a hyphen; at most 63 bytes), as Proxmox requires.
    #[schemars(
        length(min = 1, max = 63),
        regex(
            pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
        )
    )]
    pub name: String,
    /// What to clone and how to size it.
    pub template: ProvisionTemplate,
    /// Proxmox node to create the VM on (default: the template's node).
    #[serde(default)]
    pub target_node: Option<String>,
    /// Lowest VMID to allocate (default 100; at least 100).
    #[serde(default)]
    #[schemars(range(min = 100))]
    pub min_vm_id: Option<u32>,
    /// Skip the `post_provision` stage (its commands).
    #[serde(default)]
    pub skip_post_provision: bool,
    /// Keep a half-built VM on failure instead of destroying it.
    #[serde(default)]
    pub keep_on_failure: bool,
    /// Seconds to wait for the guest agent to report an IPv4 (default 300).
    #[serde(default)]
    pub network_timeout_secs: Option<u64>,
    /// The Proxmox clone options (storage, full clone, disk size, VMID, cloud-init, VLAN,
    /// pool, tags, start at boot). Absent or `{}`: Proxmox's defaults. Added in the
    /// fleet-operations release; an agent that predates it ignores the object, so the
    /// control plane sends non-empty options only to agents that report the
    /// `clone_options` feature in their facts (`facts.provision_features`).
    #[serde(default, skip_serializing_if = "CloneOptions::is_empty")]
    pub clone_options: CloneOptions,
}

/// The feature name an agent lists in `facts.provision_features` when it applies
/// [`CloneOptions`].
pub const CLONE_OPTIONS_FEATURE: &str = "clone_options";

/// Proxmox clone and cloud-init options of a provision. Every field is optional; each is
/// validated by [`CloneOptions::validate`], whose errors carry `details.field` (the field
/// name below) so a client can point at the setting that is wrong.
///
/// Unknown fields are ignored (not refused): a newer control plane may send options this
/// agent does not know, and must not make it reject the whole provision. The control
/// plane's API refuses unknown fields in its own request types.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloneOptions {
    /// Target storage of the clone's disks (a Proxmox storage id). Implies a full clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9\-_.]*$"), length(max = 64))]
    pub storage: Option<String>,
    /// `true`: full clone (copies the disks); `false`: linked clone. Default: linked,
    /// or full when `storage` or another target node is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<bool>,
    /// Grow the boot disk to this many GiB after the clone (never shrinks: a size below
    /// the template's disk fails the `configure_vm` stage with `details.field = disk_size_gib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub disk_size_gib: Option<u32>,
    /// An explicit VMID for the new VM (100–999999999); taken → `vmid_taken` error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 999_999_999))]
    pub vm_id: Option<u32>,
    /// Cloud-init user (`ciuser`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_-]*$"), length(max = 32))]
    pub ci_user: Option<String>,
    /// SSH public keys for cloud-init (`sshkeys`), one per entry, OpenSSH format
    /// (`ssh-ed25519 AAAA… comment`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Cloud-init IP configuration of net0 (`ipconfig0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_config: Option<IpConfig>,
    /// VLAN tag of net0 (1–4094).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub vlan_tag: Option<u16>,
    /// Resource pool to add the VM to (`pool` on clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9\-_.]+$"), length(max = 64))]
    pub pool: Option<String>,
    /// Proxmox tags (`[a-z0-9_][a-z0-9_+.-]*`), merged with Trellis's own tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Start the VM when its Proxmox node boots (`onboot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onboot: Option<bool>,
}

/// Cloud-init IP configuration: DHCP, or a static IPv4 address with its prefix and a
/// gateway. Unknown fields are ignored, as in [`CloneOptions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum IpConfig {
    Dhcp,
    Static {
        /// IPv4 address with prefix length, e.g. `10.0.0.5/24`.
        address: String,
        /// IPv4 gateway inside that network, e.g. `10.0.0.1`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<String>,
    },
}

impl IpConfig {
    /// The `ipconfig0` value: `ip=dhcp` or `ip=10.0.0.5/24,gw=10.0.0.1`.
    pub fn render(&self) -> String {
        match self {
            Self::Dhcp => "ip=dhcp".into(),
            Self::Static { address, gateway } => match gateway {
                Some(g) => format!("ip={address},gw={g}"),
                None => format!("ip={address}"),
            },
        }
    }
}

/// An `invalid_params` error about one clone option, with `details.field`.
fn invalid_field(field: &str, msg: impl Into<String>) -> CommandError {
    invalid(msg).with_details(serde_json::json!({ "field": field }))
}

/// A Proxmox storage or pool id (`pve-storage-id`: a letter, then letters, digits, `-`,
/// `_`, `.`).
fn valid_proxmox_id(s: &str, first_letter: bool) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && (!first_letter || s.as_bytes()[0].is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A Proxmox tag (`[a-z0-9_][a-z0-9_+.-]*`, compared case-insensitively).
pub fn valid_proxmox_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'-' | b'+' | b'.'))
        })
}

/// The SSH public key types OpenSSH accepts in `authorized_keys`.
const SSH_KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// Checks one OpenSSH public key line: `TYPE BASE64 [comment]`, one line, the base64
/// blob decoding to a key of that type.
pub fn validate_ssh_key(key: &str) -> Result<(), String> {
    let key = key.trim();
    if key.contains(['\n', '\r']) {
        return Err("one key per entry (no line breaks)".into());
    }
    let mut parts = key.split_whitespace();
    let (Some(ty), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(
            "expected \"TYPE BASE64 [comment]\", e.g. \"ssh-ed25519 AAAA… me@host\"".into(),
        );
    };
    if !SSH_KEY_TYPES.contains(&ty) {
        return Err(format!(
            "key type {ty:?} is not an SSH public key type (a private key or a fingerprint?)"
        ));
    }
    let decoded = base64_decode(blob).ok_or("the key is not valid base64")?;
    // The blob starts with the key type as an SSH string: u32 length, then the name.
    let ok = decoded.len() > 4 && {
        let n = u32::from_be_bytes([decoded[0], decoded[1], decoded[2], decoded[3]]) as usize;
        decoded.get(4..4 + n) == Some(ty.as_bytes())
    };
    if !ok {
        return Err(format!("the key data does not hold a {ty} key"));
    }
    Ok(())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn parse_ipv4_cidr(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| (1..=32).contains(p))?;
    Some((ip, prefix))
}

impl CloneOptions {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks every option; the error's `details.field` names the one at fault.
    pub fn validate(&self) -> Result<(), CommandError> {
        if let Some(s) = &self.storage {
            if !valid_proxmox_id(s, true) {
                return Err(invalid_field(
                    "storage",
                    format!("storage {s:?} is not a Proxmox storage id (a letter, then letters, digits, '-', '_', '.')"),
                ));
            }
            if self.full == Some(false) {
                return Err(invalid_field(
                    "storage",
                    "a target storage needs a full clone (a linked clone stays on the template's storage)",
                ));
            }
        }
        if let Some(g) = self.disk_size_gib {
            if !(1..=65_536).contains(&g) {
                return Err(invalid_field(
                    "disk_size_gib",
                    "disk_size_gib must be between 1 and 65536 GiB",
                ));
            }
        }
        if let Some(v) = self.vm_id {
            if !(100..=999_999_999).contains(&v) {
                return Err(invalid_field(
                    "vm_id",
                    "vm_id must be a Proxmox VMID between 100 and 999999999",
                ));
            }
        }
        if let Some(u) = &self.ci_user {
            let ok = !u.is_empty()
                && u.len() <= 32
                && (u.as_bytes()[0].is_ascii_lowercase() || u.as_bytes()[0] == b'_')
                && u.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok {
                return Err(invalid_field(
                    "ci_user",
                    format!("ci_user {u:?} is not a Linux user name (lower-case letters, digits, '_', '-'; at most 32)"),
                ));
            }
        }
        if self.ssh_keys.len() > 32 {
            return Err(invalid_field("ssh_keys", "at most 32 SSH keys"));
        }
        for (i, k) in self.ssh_keys.iter().enumerate() {
            validate_ssh_key(k).map_err(|m| {
                invalid_field(
                    "ssh_keys",
                    format!("ssh_keys[{i}] is not an SSH public key: {m}"),
                )
            })?;
        }
        if let Some(IpConfig::Static { address, gateway }) = &self.ip_config {
            let Some((ip, prefix)) = parse_ipv4_cidr(address) else {
                return Err(invalid_field(
                    "ip_config",
                    format!("ip_config.address {address:?} must be an IPv4 address with a prefix, e.g. 10.0.0.5/24"),
                ));
            };
            if let Some(g) = gateway {
                let Ok(gw) = g.parse::<std::net::Ipv4Addr>() else {
                    return Err(invalid_field(
                        "ip_config",
                        format!("ip_config.gateway {g:?} is not an IPv4 address"),
                    ));
                };
                let mask = if prefix == 32 {
                    u32::MAX
                } else {
                    !(u32::MAX >> prefix)
                };
                if u32::from(gw) & mask != u32::from(ip) & mask || gw == ip {
                    return Err(invalid_field(
                        "ip_config",
                        format!(
                            "ip_config.gateway {g} is not another address in {address}'s network"
                        ),
                    ));
                }
            }
        }
        if let Some(t) = self.vlan_tag {
            if !(1..=4094).contains(&t) {
                return Err(invalid_field(
                    "vlan_tag",
                    "vlan_tag must be between 1 and 4094",
                ));
            }
        }
        if let Some(p) = &self.pool {
            if !valid_proxmox_id(p, false) {
                return Err(invalid_field(
                    "pool",
                    format!("pool {p:?} is not a Proxmox pool id (letters, digits, '-', '_', '.')"),
                ));
            }
        }
        if self.tags.len() > 32 {
            return Err(invalid_field("tags", "at most 32 tags"));
        }
        for t in &self.tags {
            if !valid_proxmox_tag(t) {
                return Err(invalid_field(
                    "tags",
                    format!("tags entry {t:?} is not a Proxmox tag (letters, digits, '_', then also '-', '+', '.')"),
                ));
            }
            if t.to_ascii_lowercase().starts_with("trellis-") && tag_from_proxmox_tags(t).is_some()
            {
                return Err(invalid_field(
                    "tags",
                    format!("tags entry {t:?} looks like a Trellis command tag, which Trellis sets itself"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the clone copies the disks.
    pub fn full_clone(&self, other_node: bool) -> bool {
        self.full.unwrap_or(self.storage.is_some() || other_node)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProvisionTemplate {
    /// Template kind: `"clone"` (clone a Proxmox template; what the UI sends, and the
    /// original design's name) or its older spelling `"proxmox"`.
    #[serde(rename = "type", default = "clone_kind")]
    #[schemars(extend("enum" = ["clone", "proxmox"]))]
    pub kind: String,
    /// Proxmox VMID of the template (100–999999999). Required: a command without it is
    /// rejected with `invalid_params`.
    #[serde(default)]
    #[schemars(range(min = 100, max = 999_999_999))]
    pub template_id: Option<u32>,
    /// The Proxmox node the template is on (default: found by VMID).
    #[serde(default)]
    pub template_node: Option<String>,
    /// Memory in MiB (16–4194304).
    #[schemars(range(min = 16, max = 4_194_304))]
    pub memory: u32,
    /// CPU cores (1–512).
    #[schemars(range(min = 1, max = 512))]
    pub cores: u32,
    /// VM description (the Trellis tag line is added to it).
    #[serde(default)]
    pub description: Option<String>,
    /// Bridge of the first network interface (letters, digits, `_`).
    #[serde(default)]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_]+$"))]
    pub network_bridge: Option<String>,
    /// Commands run before the VM is configured.
    #[serde(default)]
    pub pre_provision_commands: Vec<String>,
    /// Commands run in the `post_provision` stage.
    #[serde(default)]
    pub post_provision_commands: Vec<String>,
}

fn clone_kind() -> String {
    "clone".into()
}

/// The template kinds `provision` accepts (the same thing: clone a Proxmox template).
pub const PROVISION_TEMPLATE_KINDS: [&str; 2] = ["clone", "proxmox"];

/// Checks a VM name the way Proxmox does (a DNS name: labels of letters, digits and
/// hyphens, not starting or ending with a hyphen).
pub fn validate_vm_name(name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "name {name:?} is not a valid VM name: use letters, digits and hyphens (max 63), not starting or ending with a hyphen"
        )))
    }
}

pub const MIN_MEMORY_MB: u32 = 16;
pub const MAX_MEMORY_MB: u32 = 4 * 1024 * 1024;
pub const MAX_CORES: u32 = 512;

impl ProvisionParams {
    fn validate(&self) -> Result<(), CommandError> {
        validate_vm_name(&self.name)?;
        let t = &self.template;
        if !PROVISION_TEMPLATE_KINDS.contains(&t.kind.as_str()) {
            return Err(invalid(format!(
                "template.type {:?} is not supported; use \"clone\"",
                t.kind
            )));
        }
        let Some(id) = t.template_id else {
            return Err(invalid(
                "template.template_id is required: map the template to a Proxmox template VMID first",
            ));
        };
        if !(100..=999_999_999).contains(&id) {
            return Err(invalid(
                "template.template_id must be a Proxmox VMID (≥ 100)",
            ));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&t.memory) {
            return Err(invalid(format!(
                "template.memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB"
            )));
        }
        if !(1..=MAX_CORES).contains(&t.cores) {
            return Err(invalid(format!(
                "template.cores must be between 1 and {MAX_CORES}"
            )));
        }
        if let Some(b) = &t.network_bridge {
            if b.is_empty() || !b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
                return Err(invalid(format!(
                    "network_bridge {b:?} is not a bridge name"
                )));
            }
        }
        if self.min_vm_id.is_some_and(|v| v < 100) {
            return Err(invalid("min_vm_id must be ≥ 100"));
        }
        self.clone_options.validate()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionStatus {
    Completed,
    Partial,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProvisionResult {
    /// The new VM's VMID.
    pub vm_id: u32,
    /// The Proxmox node it is on.
    pub node: String,
    /// Its IPv4 address, when the guest agent reported one.
    pub ip_address: Option<String>,
    /// Its name.
    pub name: String,
    /// `completed`, or `partial` (the VM is up and kept; post-provision failed).
    pub status: ProvisionStatus,
    /// The stages that completed, in order.
    pub stages_completed: Vec<String>,
    /// With `status: partial`: why (the VM is up and kept, its post-provision commands
    /// failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
}

// ---------------------------------------------------------------------------------------
// vm_power and destroy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Start,
    /// ACPI / guest-agent shutdown; falls back to `stop` only with `force_after_s`.
    Shutdown,
    /// Hard power-off.
    Stop,
    Reboot,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Shutdown => "shutdown",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
        }
    }

    /// The state the VM is in when the action is done.
    pub fn target(self) -> VmState {
        match self {
            Self::Start | Self::Reboot => VmState::Running,
            Self::Shutdown | Self::Stop => VmState::Stopped,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Stopped,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmPowerParams {
    /// Proxmox VMID (100–999999999).
    #[schemars(range(min = 100, max = 999_999_999))]
    pub vm_id: u32,
    /// The Proxmox node the VM is on (looked up again if it moved).
    #[schemars(length(min = 1))]
    pub node: String,
    pub action: PowerAction,
    /// Seconds to wait for the new state (default 120; 1–3600).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_s: Option<u32>,
    /// `shutdown` only: after this many seconds without the guest stopping, power it off
    /// (1–3600).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub force_after_s: Option<u32>,
}

impl VmPowerParams {
    fn validate(&self) -> Result<(), CommandError> {
        if !(100..=999_999_999).contains(&self.vm_id) {
            return Err(invalid("vm_id must be a Proxmox VMID (≥ 100)"));
        }
        if self.node.trim().is_empty() {
            return Err(invalid("node is required"));
        }
        if self.timeout_s.is_some_and(|t| !(1..=3600).contains(&t)) {
            return Err(invalid("timeout_s must be 1–3600"));
        }
        if self.force_after_s.is_some() && self.action != PowerAction::Shutdown {
            return Err(invalid("force_after_s applies to shutdown only"));
        }
        if self.force_after_s.is_some_and(|t| !(1..=3600).contains(&t)) {
            return Err(invalid("force_after_s must be 1–3600"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmPowerResult {
    pub vm_id: u32,
    /// The node the VM is on now.
    pub node: String,
    /// The state Proxmox reports at the end.
    pub status: VmState,
    /// A shutdown that ran out of time was turned into a stop (`force_after_s`).
    #[serde(default)]
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DestroyParams {
    /// Proxmox VMID (100–999999999).
    #[schemars(range(min = 100, max = 999_999_999))]
    pub vm_id: u32,
    /// The Proxmox node the VM is on.
    #[schemars(length(min = 1))]
    pub node: String,
    /// The VM's description must carry this line (`trellis-command=<id>`, see [`vm_tag`]);
    /// a VM without it is never deleted.
    #[schemars(regex(pattern = r"^trellis-command="))]
    pub expected_tag: String,
}

impl DestroyParams {
    fn validate(&self) -> Result<(), CommandError> {
        if !(100..=999_999_999).contains(&self.vm_id) {
            return Err(invalid("vm_id must be a Proxmox VMID (≥ 100)"));
        }
        if self.node.trim().is_empty() {
            return Err(invalid("node is required"));
        }
        if !self.expected_tag.starts_with(VM_TAG_PREFIX) {
            return Err(invalid(format!(
                "expected_tag must start with {VM_TAG_PREFIX:?}"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DestroyResult {
    pub vm_id: u32,
    pub node: String,
    /// The VM was already gone (deleted outside Trellis, or by an earlier attempt).
    #[serde(default)]
    pub already_gone: bool,
}

// ---------------------------------------------------------------------------------------
// list_templates

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListTemplatesParams {
    /// Only templates on this Proxmox node.
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProxmoxTemplate {
    /// The template's VMID.
    pub vmid: u32,
    pub name: String,
    /// The Proxmox node it is on.
    pub node: String,
    /// Memory in MiB.
    pub memory: u64,
    pub cores: u32,
    /// Size of its disks, when known.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListTemplatesResult {
    pub templates: Vec<ProxmoxTemplate>,
}

// ---------------------------------------------------------------------------------------
// terraform_apply

/// The config snapshot the UI builds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TerraformApplyParams {
    /// Where the Terraform configuration comes from.
    pub template_source: TemplateSource,
    /// Terraform variables (names: letters, digits, `_`, `-`, not starting with a digit).
    #[serde(default)]
    pub terraform_vars: BTreeMap<String, serde_json::Value>,
    /// Free-form data the UI keeps with the command; not used by the agent.
    #[serde(default)]
    pub meta: Option<serde_json::Value>,
    /// Variable names whose values must never appear in logs or results (in addition to
    /// names containing `password`, `secret` or `token`).
    #[serde(default)]
    pub sensitive_vars: Vec<String>,
    /// Commands with the same key never run at the same time on one agent (default: the
    /// repo and path).
    #[serde(default)]
    pub workspace_key: Option<String>,
    /// `terraform_apply` only: apply exactly the plan this `terraform_plan` command saved
    /// on the same agent, instead of planning anew. The control plane fills in the plan's
    /// source, variables and workspace, and `plan_sha256`, when the apply is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_command_id: Option<uuid::Uuid>,
    /// The SHA-256 (hex) of the saved plan file, copied from the plan command's result:
    /// the agent applies the file only if it still has this hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// `terraform_plan`: plan the destruction of every resource in the workspace's state
    /// (`terraform plan -destroy`); a `terraform_apply` of that plan destroys exactly
    /// those resources. The control plane copies it into such an apply (where it only
    /// says what the plan is). Not allowed on `terraform_destroy`, nor on a
    /// `terraform_apply` without `plan_command_id`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub destroy: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TemplateSource {
    /// Git URL, `file://` URL or local path of a git repository.
    #[schemars(length(min = 1))]
    pub repo: String,
    /// Tag, branch or commit (not starting with `-`, no `..`).
    #[schemars(length(min = 1))]
    pub version: String,
    /// Folder of the configuration inside the repository (relative, no `..`).
    #[serde(default)]
    pub path: Option<String>,
}

impl TerraformApplyParams {
    fn validate(&self) -> Result<(), CommandError> {
        match (&self.plan_command_id, &self.plan_sha256) {
            (None, None) => {}
            (Some(_), Some(h))
                if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {}
            (Some(_), Some(_)) => {
                return Err(invalid("plan_sha256 must be 64 hexadecimal digits"))
            }
            _ => {
                return Err(invalid(
                    "plan_command_id and plan_sha256 are given together (the control plane copies the hash from the plan's result)",
                ))
            }
        }
        let s = &self.template_source;
        if s.repo.trim().is_empty() {
            return Err(invalid("template_source.repo is required"));
        }
        if s.version.trim().is_empty() {
            return Err(invalid("template_source.version is required"));
        }
        if s.version.starts_with('-') || s.version.contains("..") {
            return Err(invalid("template_source.version is not a valid git ref"));
        }
        if let Some(p) = &s.path {
            if p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(invalid(
                    "template_source.path must be a relative path inside the repository",
                ));
            }
        }
        for name in self.terraform_vars.keys() {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && !name.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(invalid(format!(
                    "terraform_vars key {name:?} is not a valid Terraform variable name"
                )));
            }
        }
        Ok(())
    }

    /// The Terraform state workspace of this apply (and its agent-side lock key): the
    /// trimmed `workspace_key` if given, else `<repo>#<path>` with any credentials
    /// (`user:pass@`) removed from the repo URL and the path without surrounding `/` (`.`
    /// or none: empty). The version is not part of it: a newer version of a template
    /// manages the same resources. The control plane and the agent both derive it from
    /// the params, so a state credential names it implicitly.
    pub fn state_workspace(&self) -> String {
        if let Some(k) = self.workspace_key.as_deref().map(str::trim) {
            if !k.is_empty() {
                return k.to_string();
            }
        }
        let s = &self.template_source;
        let path = match s.path.as_deref().map(|p| p.trim().trim_matches('/')) {
            None | Some(".") => "",
            Some(p) => p,
        };
        format!("{}#{path}", without_userinfo(s.repo.trim()))
    }

    /// Whether a variable's value must be redacted.
    pub fn is_sensitive(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        self.sensitive_vars.iter().any(|s| s == name)
            || ["password", "secret", "token", "private_key", "api_key"]
                .iter()
                .any(|p| lower.contains(p))
    }
}

/// `url` without the `userinfo@` of its authority (`scheme://user:pass@host/…`).
fn without_userinfo(url: &str) -> String {
    let Some(i) = url.find("://") else {
        return url.to_string();
    };
    let (head, tail) = url.split_at(i + 3);
    let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
    match tail[..end].rfind('@') {
        Some(at) => format!("{head}{}", &tail[at + 1..]),
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TerraformApplyResult {
    /// `terraform output -json`, with sensitive outputs redacted.
    pub outputs: serde_json::Value,
    /// The commit the version resolved to.
    #[serde(default)]
    pub resolved_commit: Option<String>,
}

/// `terraform_plan`'s result: what the saved plan would do, by resource address and
/// action only — never an attribute value, so nothing sensitive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TerraformPlanResult {
    /// Resources to create (a replacement counts here and in `destroy`).
    pub add: u32,
    /// Resources to update in place.
    pub change: u32,
    /// Resources to delete.
    pub destroy: u32,
    /// Every resource the plan changes (no-ops left out), in Terraform's order.
    pub resources: Vec<PlannedResource>,
    /// SHA-256 (hex) of the plan file kept on the agent for `terraform_apply`'s
    /// `plan_command_id`.
    pub plan_sha256: String,
    /// The commit the version resolved to.
    #[serde(default)]
    pub resolved_commit: Option<String>,
    /// `destroy` for a destroy plan (params `destroy: true`): every resource listed is
    /// deleted when it is applied. Absent from agents that predate destroy plans, which
    /// made a normal plan whatever the params said.
    #[serde(default)]
    pub mode: PlanMode,
}

/// Terraform's planning mode of a saved plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanMode {
    /// `terraform plan`: make the infrastructure match the configuration.
    #[default]
    Normal,
    /// `terraform plan -destroy`: delete every resource in the state.
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedResource {
    /// The resource address, e.g. `null_resource.example[0]`.
    pub address: String,
    /// `create`, `update`, `delete`, `replace` or `read`.
    pub action: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TerraformDestroyResult {
    /// The commit the version resolved to.
    #[serde(default)]
    pub resolved_commit: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn state_workspace_is_the_key_or_repo_and_path_without_credentials() {
        let p = |repo: &str, path: Option<&str>, key: Option<&str>| TerraformApplyParams {
            template_source: TemplateSource {
                repo: repo.into(),
                version: "v1".into(),
                path: path.map(Into::into),
            },
            terraform_vars: Default::default(),
            meta: None,
            sensitive_vars: vec![],
            workspace_key: key.map(Into::into),
            plan_command_id: None,
            plan_sha256: None,
            destroy: false,
        };
        assert_eq!(
            p("/srv/r", Some("envs/prod/"), None).state_workspace(),
            "/srv/r#envs/prod"
        );
        assert_eq!(p(" /srv/r ", Some("."), None).state_workspace(), "/srv/r#");
        assert_eq!(
            p("https://u:tok@git.example/r.git", None, None).state_workspace(),
            "https://git.example/r.git#"
        );
        assert_eq!(
            p("https://tok@h/a@b", Some("x"), None).state_workspace(),
            "https://h/a@b#x"
        );
        assert_eq!(p("/r", None, Some(" prod ")).state_workspace(), "prod");
        assert_eq!(p("/r", None, Some("  ")).state_workspace(), "/r#");
    }

    #[test]
    fn ping_accepts_empty_params_and_null() {
        assert_eq!(
            Command::parse("ping", &json!({})).unwrap(),
            Command::Ping(PingParams::default())
        );
        assert!(Command::parse("ping", &serde_json::Value::Null).is_ok());
        let e = Command::parse("ping", &json!({"bogus": 1})).unwrap_err();
        assert_eq!(e.code, "invalid_params");
    }

    #[test]
    fn clone_options_from_a_newer_control_plane_are_accepted() {
        // fields this agent does not know, in clone_options and in its ip_config
        let p = json!({"name": "web-1", "template": {"type": "proxmox", "template_id": 9000,
            "memory": 2048, "cores": 2},
            "clone_options": {"storage": "local", "cpu_type": "host", "numa": true,
                "ip_config": {"mode": "static", "address": "10.0.0.5/24",
                    "gateway": "10.0.0.1", "ipv6": "auto"}}});
        let Command::Provision(p) = Command::parse("provision", &p).expect("accepted") else {
            panic!("not a provision");
        };
        assert_eq!(p.clone_options.storage.as_deref(), Some("local"));
        assert_eq!(
            p.clone_options.ip_config,
            Some(IpConfig::Static {
                address: "10.0.0.5/24".into(),
                gateway: Some("10.0.0.1".into())
            })
        );
        let dhcp = json!({"mode": "dhcp", "ipv6": "auto"});
        assert_eq!(
            serde_json::from_value::<IpConfig>(dhcp).unwrap(),
            IpConfig::Dhcp
        );
    }

    #[test]
    fn unknown_type_is_typed_error() {
        let e = Command::parse("reboot_everything", &json!({})).unwrap_err();
        assert_eq!(e.code, "unsupported_command");
    }

    #[test]
    fn provision_validation() {
        let good = json!({"name": "web-1", "template": {"type": "proxmox", "template_id": 9000,
            "memory": 2048, "cores": 2}});
        assert!(Command::parse("provision", &good).is_ok());
        for (field, value, needle) in [
            ("name", json!("bad name"), "not a valid VM name"),
            ("name", json!("-x"), "not a valid VM name"),
        ] {
            let mut p = good.clone();
            p[field] = value;
            let e = Command::parse("provision", &p).unwrap_err();
            assert!(e.message.contains(needle), "{e}");
        }
        let mut p = good.clone();
        p["template"]["memory"] = json!(1);
        assert!(Command::parse("provision", &p)
            .unwrap_err()
            .message
            .contains("memory"));
        let mut p = good.clone();
        p["template"]["cores"] = json!(0);
        assert!(Command::parse("provision", &p)
            .unwrap_err()
            .message
            .contains("cores"));
        let mut p = good;
        p["template"].as_object_mut().unwrap().remove("template_id");
        assert!(Command::parse("provision", &p)
            .unwrap_err()
            .message
            .contains("template_id"));
    }

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMB4SHSfaWJ3pZ1r1Xp0mL0Q0VQ1xGz3WJ2yq3b2k1bA me@host";

    #[test]
    fn clone_options_validation_names_the_field() {
        let base = json!({"name": "web-1", "template": {"type": "clone", "template_id": 9000,
            "memory": 2048, "cores": 2}});
        let mut good = base.clone();
        good["clone_options"] = json!({"storage": "fast-ssd", "disk_size_gib": 40, "vm_id": 4242,
            "ci_user": "deploy", "ssh_keys": [ED25519], "vlan_tag": 42, "pool": "web",
            "tags": ["prod", "web"], "onboot": true,
            "ip_config": {"mode": "static", "address": "10.0.0.5/24", "gateway": "10.0.0.1"}});
        let Command::Provision(p) = Command::parse("provision", &good).unwrap() else {
            panic!()
        };
        assert!(
            p.clone_options.full_clone(false),
            "a storage implies a full clone"
        );
        assert_eq!(
            p.clone_options.ip_config.as_ref().unwrap().render(),
            "ip=10.0.0.5/24,gw=10.0.0.1"
        );
        assert_eq!(IpConfig::Dhcp.render(), "ip=dhcp");
        // Round trip: options survive serialisation, and empty options are left out.
        let again = serde_json::to_value(&p).unwrap();
        assert_eq!(again["clone_options"]["pool"], "web");
        let Command::Provision(plain) = Command::parse("provision", &base).unwrap() else {
            panic!()
        };
        assert!(serde_json::to_value(&plain)
            .unwrap()
            .get("clone_options")
            .is_none());

        for (opts, field) in [
            (json!({"storage": "-bad"}), "storage"),
            (json!({"storage": "local", "full": false}), "storage"),
            (json!({"disk_size_gib": 0}), "disk_size_gib"),
            (json!({"vm_id": 99}), "vm_id"),
            (json!({"ci_user": "Root User"}), "ci_user"),
            (json!({"ssh_keys": ["not a key"]}), "ssh_keys"),
            (json!({"ssh_keys": ["ssh-ed25519 AAAA!!"]}), "ssh_keys"),
            (
                json!({"ssh_keys": ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIMB4SHSfaWJ3pZ1r1Xp0mL0Q0VQ1xGz3WJ2yq3b2k1bA"]}),
                "ssh_keys",
            ),
            (
                json!({"ip_config": {"mode": "static", "address": "10.0.0.5"}}),
                "ip_config",
            ),
            (
                json!({"ip_config": {"mode": "static", "address": "10.0.0.5/24", "gateway": "10.0.1.1"}}),
                "ip_config",
            ),
            (json!({"vlan_tag": 4095}), "vlan_tag"),
            (json!({"vlan_tag": 0}), "vlan_tag"),
            (json!({"pool": "a b"}), "pool"),
            (json!({"tags": ["-x"]}), "tags"),
            (
                json!({"tags": [format!("trellis-{}", uuid::Uuid::nil())]}),
                "tags",
            ),
        ] {
            let mut p = base.clone();
            p["clone_options"] = opts.clone();
            let e = Command::parse("provision", &p).unwrap_err();
            assert_eq!(e.code, "invalid_params", "{opts}");
            assert_eq!(e.details.as_ref().unwrap()["field"], field, "{opts}: {e}");
            assert!(e.message.contains(field.split('_').next().unwrap()), "{e}");
        }
        // an option this agent does not know is ignored (a newer control plane's)
        let mut p = base;
        p["clone_options"] = json!({"bogus": 1});
        assert!(Command::parse("provision", &p).is_ok());
    }

    #[test]
    fn terraform_validation_and_sensitivity() {
        let good = json!({"template_source": {"repo": "/tmp/repo", "version": "v1"},
            "terraform_vars": {"name": "x", "db_password": "hunter2"}, "sensitive_vars": ["name"]});
        let Command::TerraformApply(p) = Command::parse("terraform_apply", &good).unwrap() else {
            panic!()
        };
        assert!(p.is_sensitive("db_password"));
        assert!(p.is_sensitive("name"));
        assert!(!p.is_sensitive("region"));
        let bad = json!({"template_source": {"repo": "", "version": "v1"}});
        assert!(Command::parse("terraform_apply", &bad).is_err());
        let bad = json!({"template_source": {"repo": "r", "version": "v1", "path": "../etc"}});
        assert!(Command::parse("terraform_apply", &bad).is_err());
        let bad = json!({"template_source": {"repo": "r", "version": "--upload-pack=x"}});
        assert!(Command::parse("terraform_apply", &bad).is_err());
    }

    #[test]
    fn destroy_plans_are_terraform_plans_and_their_applies() {
        let src = json!({"repo": "/tmp/repo", "version": "v1"});
        let plan = json!({"template_source": src, "destroy": true});
        let Command::TerraformPlan(p) = Command::parse("terraform_plan", &plan).unwrap() else {
            panic!()
        };
        assert!(p.destroy);
        // Only a destroy plan says so: a normal plan's params serialise as before.
        let normal = json!({"template_source": src});
        let Command::TerraformPlan(n) = Command::parse("terraform_plan", &normal).unwrap() else {
            panic!()
        };
        assert!(!n.destroy);
        assert!(serde_json::to_value(&n).unwrap().get("destroy").is_none());
        assert_eq!(serde_json::to_value(&p).unwrap()["destroy"], json!(true));
        let e = Command::parse(
            "terraform_plan",
            &json!({"template_source": src, "destroy": "yes"}),
        )
        .unwrap_err();
        assert_eq!(e.code, "invalid_params", "{e}");
        // terraform_destroy destroys anyway; an apply says destroy only for a destroy plan.
        let e = Command::parse("terraform_destroy", &plan).unwrap_err();
        assert!(e.message.contains("belongs to terraform_plan"), "{e}");
        let e = Command::parse("terraform_apply", &plan).unwrap_err();
        assert!(e.message.contains("plan_command_id"), "{e}");
        let apply = json!({"template_source": src, "destroy": true,
            "plan_command_id": uuid::Uuid::nil(), "plan_sha256": "a".repeat(64)});
        assert!(Command::parse("terraform_apply", &apply).is_ok());
        // A plan result from an agent that predates destroy plans is a normal plan.
        let r: TerraformPlanResult = serde_json::from_value(json!({"add": 0, "change": 0,
            "destroy": 0, "resources": [], "plan_sha256": "ab"}))
        .unwrap();
        assert_eq!(r.mode, PlanMode::Normal);
        assert_eq!(
            serde_json::to_value(PlanMode::Destroy).unwrap(),
            json!("destroy")
        );
    }
}
