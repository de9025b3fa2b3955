//! The simulator's own control API under `/_sim` (not part of Proxmox): inspect state
//! and inject faults at runtime, and act on VMs "behind the client's back" (power, delete,
//! flags), at once and without a task.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::state::{Faults, RecordedRequest, Sim, TaskView, VmView};

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/vms", get(vms))
        .route("/vms/{vmid}", delete(remove_vm))
        .route("/vms/{vmid}/power", post(set_power))
        .route("/vms/{vmid}/flags", post(set_flags))
        .route("/tasks", get(tasks))
        .route("/requests", get(requests).delete(clear_requests))
        .route("/faults", get(get_faults).post(set_faults))
        .route("/stats", get(stats))
        .with_state(sim)
}

async fn vms(State(sim): State<Arc<Sim>>) -> Json<Vec<VmView>> {
    Json(sim.with(|g| g.vms.values().map(|vm| vm.view()).collect()))
}

#[derive(Debug, Deserialize)]
struct RequestFilter {
    path_contains: Option<String>,
}

/// `GET /_sim/requests[?path_contains=…]`: the clone, config and resize requests received
/// (oldest first, at most 10 000), each `{method, path, params: [[key, value], …]}` with
/// the parameters as decoded from the form or JSON body.
async fn requests(
    State(sim): State<Arc<Sim>>,
    axum::extract::Query(f): axum::extract::Query<RequestFilter>,
) -> Json<Vec<RecordedRequest>> {
    Json(sim.with(|g| {
        g.recorded
            .iter()
            .filter(|r| {
                f.path_contains
                    .as_deref()
                    .is_none_or(|p| r.path.contains(p))
            })
            .cloned()
            .collect()
    }))
}

/// `DELETE /_sim/requests`: forget the recorded requests.
async fn clear_requests(State(sim): State<Arc<Sim>>) -> StatusCode {
    sim.with(|g| g.recorded.clear());
    StatusCode::NO_CONTENT
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

fn no_vm(vmid: u32) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no VM {vmid}")})),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Power {
    running: bool,
}

/// `POST /_sim/vms/{vmid}/power` `{"running": bool}`: the VM is on or off at once (someone
/// used the console, the guest powered itself off, …). Powering on resets the uptime.
async fn set_power(
    State(sim): State<Arc<Sim>>,
    Path(vmid): Path<u32>,
    Json(p): Json<Power>,
) -> Response {
    sim.with(|g| {
        let Some(vm) = g.vms.get_mut(&vmid) else {
            return no_vm(vmid);
        };
        if vm.template && p.running {
            return (
                StatusCode::CONFLICT,
                Json(json!({"error": format!("VM {vmid} is a template")})),
            )
                .into_response();
        }
        if vm.running != p.running {
            vm.running = p.running;
            vm.booted_at = p.running.then(std::time::Instant::now);
            vm.execs.clear();
        }
        Json(vm.view()).into_response()
    })
}

/// `DELETE /_sim/vms/{vmid}`: the VM is gone at once (deleted by hand).
async fn remove_vm(State(sim): State<Arc<Sim>>, Path(vmid): Path<u32>) -> Response {
    sim.with(|g| match g.vms.remove(&vmid) {
        Some(vm) => Json(vm.view()).into_response(),
        None => no_vm(vmid),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Flags {
    ignore_acpi: Option<bool>,
    protection: Option<bool>,
    /// Whether the VM has a cloud-init drive (`ide2: …-cloudinit`); clones inherit it.
    cloudinit: Option<bool>,
}

/// `POST /_sim/vms/{vmid}/flags` `{"ignore_acpi"?: bool, "protection"?: bool,
/// "cloudinit"?: bool}`; missing fields keep their value.
async fn set_flags(
    State(sim): State<Arc<Sim>>,
    Path(vmid): Path<u32>,
    Json(f): Json<Flags>,
) -> Response {
    sim.with(|g| {
        let Some(vm) = g.vms.get_mut(&vmid) else {
            return no_vm(vmid);
        };
        if let Some(b) = f.ignore_acpi {
            vm.ignore_acpi = b;
        }
        if let Some(b) = f.protection {
            if vm.protection != b {
                vm.protection = b;
                vm.generation += 1;
            }
        }
        if let Some(b) = f.cloudinit {
            vm.extra.retain(|_, v| !v.contains("-cloudinit"));
            if b {
                vm.extra.insert(
                    "ide2".into(),
                    format!("local-lvm:vm-{vmid}-cloudinit,media=cdrom"),
                );
            }
            vm.generation += 1;
        }
        Json(vm.view()).into_response()
    })
}
