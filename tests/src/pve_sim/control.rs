//! The simulator's own control API under `/_sim` (not part of Proxmox): inspect state
//! and inject faults at runtime.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::state::{Faults, Sim, TaskView, VmView};

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/vms", get(vms))
        .route("/tasks", get(tasks))
        .route("/faults", get(get_faults).post(set_faults))
        .route("/stats", get(stats))
        .with_state(sim)
}

async fn vms(State(sim): State<Arc<Sim>>) -> Json<Vec<VmView>> {
    Json(sim.with(|g| g.vms.values().map(|vm| vm.view()).collect()))
}

async fn tasks(State(sim): State<Arc<Sim>>) -> Json<Vec<TaskView>> {
    Json(sim.with(|g| g.task_views()))
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Json<Faults> {
    Json(sim.with(|g| g.faults.clone()))
}

/// Replaces the whole fault set; `{}` clears every fault.
async fn set_faults(State(sim): State<Arc<Sim>>, Json(f): Json<Faults>) -> Json<Faults> {
    Json(sim.with(|g| {
        g.faults = f;
        g.faults.clone()
    }))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Json<Value> {
    Json(sim.with(|g| {
        json!({
            "requests": g.requests,
            "vms": g.vms.len(),
            "tasks": g.tasks.len(),
            "running_tasks": g.tasks.values().filter(|t| !t.finished).count(),
        })
    }))
}
