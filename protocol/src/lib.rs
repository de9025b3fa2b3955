//! Trellis wire protocol: every message exchanged between the control plane (`trellis`)
//! and an agent (`tendril`) over the agent's outbound WebSocket.
//!
//! One JSON text frame carries one message. Messages are internally tagged with
//! `"type"`. Fields added after version 1 carry `#[serde(default)]` so older peers keep
//! working; unknown fields are ignored. See `protocol/README.md` for the full contract.

#![forbid(unsafe_code)]

pub mod commands;
mod messages;

pub use commands::*;
pub use messages::*;

/// The protocol version this build speaks. Bumped on incompatible changes only.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts. Bigger frames are a protocol violation: the
/// receiver closes the connection with close code 1009 (message too big).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest `data` in a single log event. Executors split longer output.
pub const MAX_LOG_CHUNK_BYTES: usize = 64 * 1024;

/// Defaults: how often an agent sends a heartbeat, and how long either side waits for any
/// traffic before it considers the connection dead. The server's `welcome` carries the
/// interval it wants; the timeout is always this many intervals.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 15;
pub const HEARTBEATS_PER_TIMEOUT: u32 = 3;
pub const HEARTBEAT_TIMEOUT_SECS: u64 = HEARTBEAT_INTERVAL_SECS * HEARTBEATS_PER_TIMEOUT as u64;
