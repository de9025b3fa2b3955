//! pve-sim: a Proxmox VE API simulator for tests and demos.
//!
//! It serves the `/api2/json` subset the agent uses with Proxmox's envelope, error shapes
//! and timing: UPIDs that run for a while, `lock: clone` until a clone ends, a guest agent
//! that answers only some time after boot, VMID collisions, and fault injection. The
//! non-Proxmox control API under `/_sim` lets tests inspect VMs and inject faults at
//! runtime:
//!
//! * `GET /_sim/vms`, `GET /_sim/tasks`, `GET /_sim/stats`
//! * `GET /_sim/faults`, `POST /_sim/faults` with a [`Faults`] object (replaces all faults)
//! * `POST /_sim/vms/{vmid}/power` with `{"running": true|false}`: on or off at once, no
//!   task (409 for a template)
//! * `DELETE /_sim/vms/{vmid}`: the VM is gone at once
//! * `POST /_sim/vms/{vmid}/flags` with `{"ignore_acpi"?: bool, "protection"?: bool,
//!   "cloudinit"?: bool}` (every seeded VM has a cloud-init drive, `ide2`; clones inherit it):
//!   a guest that ignores shutdown requests (its shutdown tasks run into their `timeout`),
//!   and `protection: 1` (destroy refused)
//!
//! These answer 404 `{"error": "no VM N"}` for an unknown VMID and otherwise the VM as
//! [`VmView`] (which also shows `tags`, `protection` and `ignore_acpi`).
//!
//! Lifecycle calls follow qemu-server: power and destroy return a UPID at once and the
//! state changes when the task ends; jobs on one VM run one after the other (the config
//! lock, 10 Proxmox seconds of waiting, then "can't lock file …"); Proxmox seconds in
//! `timeout` parameters last [`SimConfig::sim_second_ms`] each.
//!
//! The binary is `pve-sim` (`tests/src/bin/pve-sim.rs`); [`process::SimProcess`] starts
//! it from tests.

mod api;
mod control;
pub mod exec_harness;
pub mod process;
mod state;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

pub use api::PveError;
pub use state::{
    default_seeds, Burst, Faults, RecordedRequest, SeedVm, Sim, SimConfig, TaskView, VmView,
    CONFIG_LOCK_WAIT_S, DEFAULT_STOP_TIMEOUT_S, DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET,
};
pub use tls::TlsMaterial;

/// The whole app: `/api2/json/…`, `/_sim/…`, and 501 for everything else.
pub fn app(sim: Arc<Sim>) -> Router {
    Router::new()
        .nest("/api2/json", api::router(sim.clone()))
        .nest("/_sim", control::router(sim))
        .fallback(api::not_implemented)
}

/// Serves the simulator on an already bound listener until `shutdown` resolves. With
/// `tls`, connections are HTTPS.
pub async fn serve(
    listener: TcpListener,
    sim: Arc<Sim>,
    tls: Option<&TlsMaterial>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(sim);
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(t) => {
            let listener = tls::TlsListener::new(listener, t.server_config.clone())?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
