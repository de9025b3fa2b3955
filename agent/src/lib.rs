//! Tendril: the Trellis agent. It dials the control plane over an outbound WebSocket,
//! receives typed commands, runs them with an executor per command type, and reports
//! every stage, log line and result back with per-command sequence numbers. Events are
//! journaled locally until the control plane acknowledges them, so nothing is lost across
//! a disconnect or an agent restart.

#![forbid(unsafe_code)]

pub mod config;
pub mod dispatch;
pub mod exec;
pub mod journal;
pub mod proxmox;
pub mod secret;
pub mod session;
pub mod terraform;
pub mod trust;

pub use config::AgentConfig;
pub use secret::Secret;
