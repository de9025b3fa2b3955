//! Trellis control plane: HTTP API for the UI, the agent WebSocket broker and
//! persistence. `serve` takes a bound listener and a shutdown token, so tests start the
//! server exactly as production does.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod broker;
pub mod data_dir;
pub mod db;
pub mod domain;
pub mod http_server;
pub mod metrics;
pub mod model;
pub mod secrets;
pub mod server;
pub mod signing;
pub mod time;
mod tls;

pub use server::{serve, ServeConfig};
