//! Frames on the agent WebSocket: what the agent sends ([`AgentMessage`]) and what the
//! control plane sends ([`ServerMessage`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{CommandError, CommandType, MAX_FRAME_BYTES};

/// Agent → control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message after the upgrade. Nothing else is accepted before it.
    Hello(Hello),
    /// The agent accepted a dispatched command and will run it (or is already running it).
    Accept { command_id: Uuid },
    /// Progress, stage, log and result events, in per-command `seq` order.
    Events { events: Vec<Event> },
    /// Liveness; any frame counts, but an idle agent sends this every heartbeat interval.
    Heartbeat {
        #[serde(default)]
        running: u32,
    },
    /// The agent could not understand something the server sent.
    Error(ProtocolError),
    /// Every VM the agent's hypervisor has (templates left out), from one list call: sent
    /// on connect, every inventory interval, and right after a command that touched a VM.
    /// Sent only to a server whose `welcome.features` lists `"inventory"`
    /// ([`FEATURE_INVENTORY`]); not acknowledged.
    Inventory(Inventory),
}

/// `welcome.features` entry: the server takes [`AgentMessage::Inventory`].
pub const FEATURE_INVENTORY: &str = "inventory";

/// A snapshot of the VMs an agent's hypervisor (cluster) has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Inventory {
    /// Every VM but templates.
    pub vms: Vec<InventoryVm>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InventoryVm {
    /// Proxmox VMID.
    pub vm_id: u32,
    /// The Proxmox node it is on.
    pub node: String,
    /// The VM's name (empty when Proxmox has none).
    #[serde(default)]
    pub name: String,
    /// `running`, `stopped`, or what Proxmox reported (`paused`, `unknown`…).
    pub status: String,
    /// Addresses known without a per-VM call (often none).
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    /// The Trellis tag (`trellis-command=<id>`) when the VM carries one.
    #[serde(default)]
    pub tag: Option<String>,
}

/// Control plane → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to a valid hello.
    Welcome {
        /// The version the server chose: the newest one both sides speak.
        protocol_version: u32,
        /// The agent's id (the one its token belongs to).
        agent_id: Uuid,
        /// This connection's id (for logs).
        session_id: Uuid,
        /// How often the agent sends a heartbeat; three intervals without any frame is a
        /// dead connection.
        heartbeat_interval_secs: u64,
        /// Optional frames this server takes (v2: `"inventory"`, see [`FEATURE_INVENTORY`]);
        /// absent from older servers, so an agent sends them only when listed.
        #[serde(default)]
        features: Vec<String>,
        /// Seconds between inventory reports the server asks for (default 30).
        #[serde(default)]
        inventory_interval_secs: Option<u64>,
        /// The key that signs this server's `dispatch` and `cancel` frames (features list
        /// `"signed_dispatch"`). An agent pins it (given at registration, or trust on
        /// first use) and refuses frames not signed by a pinned key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signing_key: Option<crate::ServerSigningKey>,
    },
    /// Run a command. Re-sent after a reconnect until the agent accepts it; the agent
    /// never runs the same `command_id` twice.
    Dispatch(Dispatch),
    /// Stop a running command (user cancel or deadline).
    Cancel {
        command_id: Uuid,
        /// `cancelled` (a user cancelled it) or `timed_out` (its deadline passed; the server
        /// has already ended it as timed out).
        reason: CancelReason,
        /// Ed25519 signature over the frame's canonical bytes (see `signing`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<crate::FrameSignature>,
    },
    /// Events up to and including `seq` for this command are durable; drop them from the outbox.
    Acks { acks: Vec<EventAck> },
    /// Answer to a heartbeat.
    HeartbeatAck,
    /// Something the agent sent was rejected. Fatal errors are followed by a close.
    Error(ProtocolError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Hello {
    /// The newest protocol version the agent speaks.
    #[schemars(range(min = 1))]
    pub protocol_version: u32,
    /// The oldest protocol version the agent speaks (absent: only `protocol_version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_protocol_version: Option<u32>,
    /// The agent's own version (free-form, shown to admins).
    pub agent_version: String,
    /// The host the agent runs on.
    pub hostname: String,
    /// The command types the agent can run; the server dispatches only these.
    #[serde(default)]
    pub capabilities: Vec<CommandType>,
    /// How many commands the agent runs at once. It can only lower the limit the admin
    /// set for this agent (the smaller of the two applies).
    #[serde(default = "default_concurrency")]
    pub max_concurrency: u32,
    /// Commands the agent knows and has not finished reporting: still running, or
    /// finished with events not yet acknowledged. A command the server believes is
    /// running on this agent but which is absent here is lost (`agent_lost_command`).
    #[serde(default)]
    pub active_commands: Vec<Uuid>,
    /// Commands the agent accepted earlier but can no longer run or report (it restarted
    /// while they ran). The server marks them `agent_lost_command` instead of re-sending.
    #[serde(default)]
    pub interrupted_commands: Vec<Uuid>,
    /// Facts about the hypervisor the agent manages (e.g. Proxmox nodes), free-form.
    #[serde(default)]
    pub facts: serde_json::Value,
}

fn default_concurrency() -> u32 {
    4
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Dispatch {
    /// This attempt's id; the agent never runs the same id twice.
    pub command_id: Uuid,
    /// The command type as a string so that an agent can reject types it does not know
    /// with a typed error instead of failing to parse the frame.
    pub command_type: String,
    /// The command type's params (see `commands.schema.json`).
    pub params: serde_json::Value,
    /// Unix milliseconds after which the command is timed out by the server.
    #[serde(default)]
    pub deadline_ms: Option<i64>,
    /// 1 for the first attempt, 2.. for retries.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub attempt: u32,
    /// The first attempt's id; equal to `command_id` for a first attempt. Executors use it
    /// to make retries idempotent (e.g. a VM tagged with it is found, not created again).
    #[serde(default)]
    pub root_command_id: Option<Uuid>,
    /// Ed25519 signature over the frame's canonical bytes, which include the exact bytes
    /// of `params` as sent (see `signing`). Absent from servers without
    /// `"signed_dispatch"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::FrameSignature>,
    /// `terraform_apply` on a server whose `welcome.features` lists `"terraform_state"`:
    /// the password of the command's Terraform state credential (HTTP Basic, user name =
    /// `command_id`) for `/api/terraform/state/{workspace}`. Valid only for that command's
    /// workspace and only while the command is not finished. Not covered by `signature`: it
    /// is derived at send time (HMAC under the server's key) and grants nothing beyond
    /// the signed command's own workspace, so a forged one can only fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terraform_state: Option<String>,
}

/// `welcome.features` entry: the server keeps `terraform_apply` state (Terraform's `http`
/// backend under `/api/terraform/state/`) and sends `dispatch.terraform_state`.
pub const FEATURE_TERRAFORM_STATE: &str = "terraform_state";

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    Cancelled,
    TimedOut,
    /// Used by the agent itself when it stops: running commands end `failed` with
    /// `agent_shutdown` (retryable) instead of being left to be found lost. Never on the
    /// wire.
    #[schemars(skip)]
    AgentShutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EventAck {
    pub command_id: Uuid,
    /// Every event `1..=seq` of the command is durable (the contiguous prefix).
    #[schemars(range(min = 1))]
    pub seq: u64,
}

/// One event of one command. `seq` starts at 1 and increases by one per event of that
/// command; the server stores each `(command_id, seq)` once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub command_id: Uuid,
    /// 1 for the command's first event, then one more per event.
    #[schemars(range(min = 1))]
    pub seq: u64,
    /// Unix milliseconds when the agent produced the event.
    pub ts: i64,
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// Checks the rules an event must follow on its own (`seq` ≥ 1, log `data` at most
    /// [`crate::MAX_LOG_CHUNK_BYTES`], percent a number in 0–100, a stage name of 1–64
    /// printable bytes, messages at most [`crate::MAX_EVENT_MESSAGE_BYTES`]). Rules that
    /// need the command's history (nothing after `finished`) are the receiver's.
    pub fn validate(&self) -> Result<(), String> {
        if self.seq == 0 {
            return Err("seq starts at 1".into());
        }
        let percent_ok = |p: f64| p.is_finite() && (0.0..=100.0).contains(&p);
        let message_ok = |m: &Option<String>| {
            m.as_ref()
                .is_none_or(|m| m.len() <= crate::MAX_EVENT_MESSAGE_BYTES)
        };
        match &self.body {
            EventBody::Log { data, .. } if data.len() > crate::MAX_LOG_CHUNK_BYTES => Err(format!(
                "log data is {} bytes; at most {} per event",
                data.len(),
                crate::MAX_LOG_CHUNK_BYTES
            )),
            EventBody::Stage {
                stage,
                percent,
                message,
                ..
            } => {
                if stage.is_empty()
                    || stage.len() > crate::MAX_STAGE_NAME_BYTES
                    || stage.chars().any(char::is_control)
                {
                    return Err(format!(
                        "stage name must be 1–{} printable bytes",
                        crate::MAX_STAGE_NAME_BYTES
                    ));
                }
                if percent.is_some_and(|p| !percent_ok(p)) {
                    return Err("percent must be between 0 and 100".into());
                }
                if !message_ok(message) {
                    return Err(format!(
                        "message is longer than {} bytes",
                        crate::MAX_EVENT_MESSAGE_BYTES
                    ));
                }
                Ok(())
            }
            EventBody::Progress { percent, message } => {
                if !percent_ok(*percent) {
                    return Err("percent must be between 0 and 100".into());
                }
                if !message_ok(message) {
                    return Err(format!(
                        "message is longer than {} bytes",
                        crate::MAX_EVENT_MESSAGE_BYTES
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A stage started, finished, failed or was skipped.
    Stage {
        /// The stage name: 1–64 printable bytes (the schema's length counts characters).
        #[schemars(length(min = 1, max = 64))]
        stage: String,
        state: StageState,
        /// Overall percent, 0–100.
        #[serde(default)]
        #[schemars(range(min = 0, max = 100))]
        percent: Option<f64>,
        /// At most 4 KiB (4096 bytes).
        #[serde(default)]
        #[schemars(length(max = 4096))]
        message: Option<String>,
    },
    /// Overall progress without a stage change.
    Progress {
        /// Overall percent, 0–100.
        #[schemars(range(min = 0, max = 100))]
        percent: f64,
        /// At most 4 KiB (4096 bytes).
        #[serde(default)]
        #[schemars(length(max = 4096))]
        message: Option<String>,
    },
    /// A chunk of output.
    Log {
        stream: LogStream,
        /// At most 64 KiB (65536 bytes); longer output is split over several events.
        #[schemars(length(max = 65536))]
        data: String,
    },
    /// The last event of a command.
    Finished(Outcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    Running,
    Completed,
    Failed,
    Skipped,
}

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    System,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::System => "system",
        }
    }
}

/// How a command ended, as the agent saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Outcome {
    pub status: FinalStatus,
    /// The command type's result (see `commands.schema.json`); with `succeeded`.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Why it did not succeed; with `failed` (and optionally `cancelled`/`timed_out`).
    #[serde(default)]
    pub error: Option<CommandError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

/// A typed protocol-level error (not a command failure). Fatal errors are followed by a
/// close (see [`ProtocolErrorCode::is_fatal`]); an `error` an agent sends is only logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtocolError {
    pub code: ProtocolErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// The command an `invalid_event` or `unknown_command` is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
    /// The event an `invalid_event` is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl ProtocolError {
    pub fn new(code: ProtocolErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            command_id: None,
            seq: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolErrorCode {
    /// Fatal (close 1002): unparseable JSON, unknown `type` or event `kind`, a binary frame.
    MalformedMessage,
    /// Fatal (close 1002): no `hello` first (or none within 10 s), or a second `hello`.
    UnexpectedMessage,
    /// Fatal (close 1008): no protocol version both sides speak; the message names both
    /// ranges.
    UnsupportedProtocolVersion,
    /// Fatal (close 1009): a frame over 1 MiB.
    FrameTooLarge,
    /// Fatal: the token is missing or unknown.
    Unauthorized,
    /// Fatal: a newer connection of the same agent replaced this one; do not fight it.
    Superseded,
    /// Fatal: the agent was revoked; its token will never work again.
    Revoked,
    /// Fatal (v2): the agent's token was replaced; reconnect with the new one.
    TokenRotated,
    /// Not fatal (v2): an event broke a per-event rule (seq 0, size, percent, stage name,
    /// after `finished`); `command_id` and `seq` say which. Its seq is stored as a `system`
    /// log line "event <seq> rejected: <reason>" and acked (seq 0: neither).
    InvalidEvent,
    /// Not fatal (v2): an event or accept for a command that is not dispatched to this
    /// agent; not stored, not acked: drop it.
    UnknownCommand,
    /// Fatal (close 1009): an event whose stored form is over 64 KiB (`MAX_EVENT_BYTES`),
    /// e.g. a `finished` with a huge result. Its seq is stored in its place (a `finished`
    /// as `failed` with error `event_too_large`) and acked before the close.
    EventTooLarge,
    /// Fatal (close 1008): a command's log passed the server's per-command limit; the
    /// command ends `failed` with error `log_limit` and is cancelled on the agent. Later
    /// log events of that command are acked but their data is not kept.
    LogLimit,
    /// Not fatal, agent → server: a `cancel` was unsigned or its signature did not verify
    /// with a pinned key; it was ignored (`command_id` names it). A refused `dispatch` is
    /// reported as the command's `finished` `failed` with error code `signature_invalid`.
    SignatureInvalid,
    /// Fatal: the server had trouble (storage); reconnect with backoff.
    Internal,
    /// A code this build does not know (sent by a newer peer): treated as not fatal.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl ProtocolErrorCode {
    /// Whether the sender closes the connection after this error.
    pub fn is_fatal(self) -> bool {
        !matches!(
            self,
            Self::InvalidEvent | Self::UnknownCommand | Self::SignatureInvalid | Self::Unknown
        )
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl DecodeError {
    pub fn to_protocol_error(&self) -> ProtocolError {
        ProtocolError::new(
            match self {
                Self::TooLarge(_) => ProtocolErrorCode::FrameTooLarge,
                Self::Malformed(_) => ProtocolErrorCode::MalformedMessage,
            },
            self.to_string(),
        )
    }
}

fn decode<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, DecodeError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(text.len()));
    }
    Ok(serde_json::from_str(text)?)
}

impl AgentMessage {
    /// Parses one text frame, enforcing the size limit before parsing.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("agent messages always serialize")
    }
}

impl ServerMessage {
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_tolerates_unknown_fields() {
        let text = r#"{"type":"hello","protocol_version":1,"agent_version":"0.1.0",
            "hostname":"pve1","capabilities":["ping","provision","future_thing"],
            "max_concurrency":8,"brand_new_field":true}"#;
        let msg = AgentMessage::decode(text).unwrap();
        let AgentMessage::Hello(h) = &msg else {
            panic!("not a hello")
        };
        assert_eq!(h.max_concurrency, 8);
        assert_eq!(
            h.capabilities,
            vec![
                CommandType::Ping,
                CommandType::Provision,
                CommandType::Unknown
            ]
        );
        assert!(h.active_commands.is_empty());
        let again = AgentMessage::decode(&msg.encode()).unwrap();
        assert_eq!(again, msg);
    }

    #[test]
    fn events_flatten_body() {
        let id = Uuid::nil();
        let msg = AgentMessage::Events {
            events: vec![Event {
                command_id: id,
                seq: 3,
                ts: 1,
                body: EventBody::Log {
                    stream: LogStream::Stderr,
                    data: "boom\n".into(),
                },
            }],
        };
        let text = msg.encode();
        assert!(text.contains(r#""kind":"log""#), "{text}");
        assert!(text.contains(r#""stream":"stderr""#), "{text}");
        assert_eq!(AgentMessage::decode(&text).unwrap(), msg);
    }

    #[test]
    fn malformed_and_oversized_frames_are_typed_errors() {
        let err = AgentMessage::decode(r#"{"type":"nope"}"#).unwrap_err();
        assert_eq!(
            err.to_protocol_error().code,
            ProtocolErrorCode::MalformedMessage
        );
        let err = AgentMessage::decode("{not json").unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)));
        let big = "x".repeat(MAX_FRAME_BYTES + 1);
        let err = AgentMessage::decode(&big).unwrap_err();
        assert_eq!(
            err.to_protocol_error().code,
            ProtocolErrorCode::FrameTooLarge
        );
    }

    #[test]
    fn unknown_error_codes_fall_back() {
        let msg = ServerMessage::decode(r#"{"type":"error","code":"something_new","message":"x"}"#)
            .unwrap();
        assert!(matches!(
            msg,
            ServerMessage::Error(ProtocolError {
                code: ProtocolErrorCode::Unknown,
                ..
            })
        ));
    }
}
