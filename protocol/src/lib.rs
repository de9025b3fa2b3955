//! Trellis wire protocol: every message exchanged between the control plane (`trellis`)
//! and an agent (`tendril`) over the agent's outbound WebSocket.
//!
//! One JSON text frame carries one message. Messages are internally tagged with
//! `"type"`. Fields added after version 1 carry `#[serde(default)]` so older peers keep
//! working; unknown fields are ignored. See `protocol/README.md` for the full contract.

#![forbid(unsafe_code)]

pub mod commands;
mod messages;
pub mod schema;
pub mod signing;

pub use commands::*;
pub use messages::*;
pub use signing::{FrameSignature, ServerSigningKey, FEATURE_SIGNED_DISPATCH};

/// The newest protocol version this build speaks. `hello` carries the range an agent
/// speaks (`min_protocol_version`..=`protocol_version`); `welcome` names the version the
/// server chose. Version 2 added `min_protocol_version`, `welcome.features`, `inventory`,
/// non-fatal `invalid_event`/`unknown_command` errors and `token_rotated`; a version-1
/// agent simply never sends or expects those.
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this build still speaks (the control plane serves agents of
/// at least the current and the previous version).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Longest stage name, in bytes.
pub const MAX_STAGE_NAME_BYTES: usize = 64;

/// Longest stage or progress `message`, in bytes.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4 * 1024;

/// Largest frame either side accepts. Bigger frames are a protocol violation: the
/// receiver closes the connection with close code 1009 (message too big).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest `data` in a single log event. Executors split longer output.
pub const MAX_LOG_CHUNK_BYTES: usize = 64 * 1024;

/// Largest stored form of any one event (a log event's `data`, or the JSON of any other
/// event's body, e.g. a `finished` with its result). A bigger one is `event_too_large`.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Defaults: how often an agent sends a heartbeat, and how long either side waits for any
/// traffic before it considers the connection dead. The server's `welcome` carries the
/// interval it wants; the timeout is always this many intervals.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 15;
pub const HEARTBEATS_PER_TIMEOUT: u32 = 3;
pub const HEARTBEAT_TIMEOUT_SECS: u64 = HEARTBEAT_INTERVAL_SECS * HEARTBEATS_PER_TIMEOUT as u64;
