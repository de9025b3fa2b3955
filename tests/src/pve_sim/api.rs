//! The `/api2/json` handlers: the subset of the Proxmox VE API the agent uses, with the
//! envelope, error shapes, status codes and timing of the real thing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::state::{
    run_guest_command, Effect, GuestExec, Inner, Job, Sim, Vm, MAX_SIM_WAIT, NIC_MODELS,
};

type SimState = State<Arc<Sim>>;

// ---------------------------------------------------------------------------------------
// errors and envelope

/// An error in Proxmox's shape: `{"data": null, "message": "…\n", "errors"?: {…}}` with
/// the message also in the HTTP reason phrase.
#[derive(Debug, Clone)]
pub struct PveError {
    pub status: StatusCode,
    pub message: String,
    pub errors: BTreeMap<String, String>,
}

/// Marker left on error responses so the legacy-errors layer can strip `message`.
#[derive(Debug, Clone)]
struct ErrorMarker(BTreeMap<String, String>);

impl PveError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
            errors: BTreeMap::new(),
        }
    }

    /// 500: nearly every runtime error.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// 400 "Parameter verification failed." with per-parameter errors.
    pub fn params(errors: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: "Parameter verification failed.".into(),
            errors: errors.into_iter().collect(),
        }
    }

    pub fn param(name: &str, msg: impl Into<String>) -> Self {
        Self::params([(name.to_string(), msg.into())])
    }
}

/// Sets a custom HTTP/1 reason phrase (only printable ASCII survives).
pub fn with_reason(mut resp: Response, reason: &str) -> Response {
    let clean: String = reason
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii() && (*c == ' ' || *c == '\t' || c.is_ascii_graphic()))
        .collect();
    if let Ok(r) = hyper::ext::ReasonPhrase::try_from(clean.trim().to_string()) {
        resp.extensions_mut().insert(r);
    }
    resp
}

impl IntoResponse for PveError {
    fn into_response(self) -> Response {
        let mut body = json!({"data": null, "message": format!("{}\n", self.message)});
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(ErrorMarker(self.errors));
        with_reason(resp, &self.message)
    }
}

fn data(v: impl serde::Serialize) -> Json<Value> {
    Json(json!({ "data": v }))
}

type ApiResult = Result<Json<Value>, PveError>;

// ---------------------------------------------------------------------------------------
// parameters: query string plus form-encoded or JSON body, repeated keys kept

#[derive(Debug, Default)]
pub struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn int(&self, key: &str) -> Result<Option<i64>, PveError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| {
                PveError::param(key, format!("type check ('integer') failed - got '{v}'"))
            }),
        }
    }

    fn boolean(&self, key: &str) -> Result<bool, PveError> {
        match self.get(key) {
            None => Ok(false),
            Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
            Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
            Some(v) => Err(PveError::param(
                key,
                format!("type check ('boolean') failed - got '{v}'"),
            )),
        }
    }
}

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = PveError;

    async fn from_request(req: Request, state: &S) -> Result<Self, PveError> {
        let mut out: Vec<(String, String)> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| PveError::new(400, format!("unable to read request body: {e}")))?;
        if body.is_empty() {
            return Ok(Params(out));
        }
        if is_json {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| PveError::new(400, format!("unable to parse JSON body: {e}")))?;
            let Value::Object(map) = v else {
                return Err(PveError::new(400, "JSON body must be an object"));
            };
            for (k, v) in map {
                let mut push = |v: &Value| {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Bool(b) => if *b { "1" } else { "0" }.into(),
                        other => other.to_string(),
                    };
                    out.push((k.clone(), s));
                };
                match &v {
                    Value::Array(items) => items.iter().for_each(&mut push),
                    Value::Null => {}
                    other => push(other),
                }
            }
        } else {
            out.extend(form_urlencoded::parse(&body).into_owned());
        }
        Ok(Params(out))
    }
}

fn parse_vmid(s: &str) -> Result<u32, PveError> {
    match s.parse::<u32>() {
        Ok(v) if (100..=999_999_999).contains(&v) => Ok(v),
        Ok(_) => Err(PveError::param(
            "vmid",
            "value must have a minimum value of 100",
        )),
        Err(_) => Err(PveError::param(
            "vmid",
            format!("type check ('integer') failed - got '{s}'"),
        )),
    }
}

fn check_node(g: &Inner, node: &str) -> Result<(), PveError> {
    if g.nodes.iter().any(|n| n == node) {
        Ok(())
    } else {
        Err(PveError::runtime(format!(
            "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
        )))
    }
}

/// A DNS name as Proxmox's `dns-name` format wants it.
fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `tags` the way Proxmox stores them (`PVE::GuestHelpers::get_unique_tags` with the
/// default tag style): split at `;`, `,` or spaces, lower-cased, sorted, de-duplicated,
/// joined with `;`. Each tag must match `[a-z0-9_][a-z0-9_+.-]*`.
pub fn normalize_tags(raw: &str) -> Result<String, String> {
    let mut tags: Vec<String> = Vec::new();
    for t in raw.split([';', ',', ' ']).filter(|t| !t.is_empty()) {
        let ok = t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'-' | b'+' | b'.'))
        });
        if !ok {
            return Err(format!("invalid format - invalid tag '{t}'"));
        }
        tags.push(t.to_ascii_lowercase());
    }
    tags.sort();
    tags.dedup();
    Ok(tags.join(";"))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn check_unlocked(vm: &Vm) -> Result<(), PveError> {
    match &vm.lock {
        Some(l) => Err(PveError::runtime(format!("VM is locked ({l})"))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// middleware

/// `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`; anything else is a delayed
/// 401 with an empty body.
pub async fn auth(State(sim): SimState, req: Request, next: Next) -> Response {
    let expected = format!(
        "PVEAPIToken={}={}",
        sim.config.token_id, sim.config.token_secret
    );
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if given == Some(expected.as_str()) {
        return next.run(req).await;
    }
    tokio::time::sleep(sim.config.auth_fail_delay).await;
    let resp = (StatusCode::UNAUTHORIZED, Body::empty()).into_response();
    with_reason(resp, "Authentication failed!")
}

/// Injected faults that act on whole requests: slowness, 5xx bursts, 403.
pub async fn faults(State(sim): SimState, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let (slow, burst, forbidden) = sim.with(|g| {
        g.requests += 1;
        let mut burst = None;
        if let Some(b) = &mut g.faults.burst {
            let matches = b.path_contains.as_deref().is_none_or(|p| path.contains(p));
            if matches && b.count > 0 {
                b.count -= 1;
                burst = Some(b.status);
            }
            if b.count == 0 {
                g.faults.burst = None;
            }
        }
        (g.faults.slow_ms, burst, g.faults.forbidden)
    });
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    if let Some(status) = burst {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let reason = match status {
            595 => "No route to host",
            596 => "Connection timed out",
            597 => "Connection error",
            _ => "proxy error",
        };
        return with_reason((code, Body::empty()).into_response(), reason);
    }
    if forbidden {
        return PveError::new(403, "Permission check failed (/vms, VM.Audit)").into_response();
    }
    next.run(req).await
}

/// Old servers: no `message` in error bodies, only the reason phrase.
pub async fn legacy_errors(State(sim): SimState, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if !sim.config.legacy_errors {
        return resp;
    }
    let Some(ErrorMarker(errors)) = resp.extensions().get::<ErrorMarker>().cloned() else {
        return resp;
    };
    let (mut parts, _) = resp.into_parts();
    let mut body = json!({"data": null});
    if !errors.is_empty() {
        body["errors"] = json!(errors);
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, Body::from(bytes))
}

pub async fn not_implemented(req: Request) -> Response {
    let path = req
        .uri()
        .path()
        .strip_prefix("/api2/json")
        .unwrap_or(req.uri().path())
        .to_string();
    PveError::new(
        501,
        format!("Method '{} {}' not implemented", req.method(), path),
    )
    .into_response()
}

// ---------------------------------------------------------------------------------------
// routes

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/nodes", get(nodes))
        .route("/cluster/resources", get(cluster_resources))
        .route("/cluster/nextid", get(next_id))
        .route("/nodes/{node}/qemu", get(node_qemu))
        .route("/nodes/{node}/qemu/{vmid}", get(vm_index).delete(destroy))
        .route("/nodes/{node}/qemu/{vmid}/clone", post(clone_vm))
        .route(
            "/nodes/{node}/qemu/{vmid}/config",
            get(get_config).post(post_config).put(put_config),
        )
        .route(
            "/nodes/{node}/qemu/{vmid}/status/current",
            get(status_current),
        )
        .route("/nodes/{node}/qemu/{vmid}/resize", put(resize))
        .route("/nodes/{node}/qemu/{vmid}/status/{action}", post(power))
        .route(
            "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces",
            get(guest_interfaces),
        )
        .route("/nodes/{node}/qemu/{vmid}/agent/exec", post(guest_exec))
        .route(
            "/nodes/{node}/qemu/{vmid}/agent/exec-status",
            get(guest_exec_status),
        )
        .route("/nodes/{node}/tasks/{upid}/status", get(task_status))
        .route("/nodes/{node}/tasks/{upid}/log", get(task_log))
        .fallback(not_implemented)
        .method_not_allowed_fallback(not_implemented)
        .layer(axum::middleware::from_fn_with_state(sim.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(sim.clone(), faults))
        .layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            legacy_errors,
        ))
        .with_state(sim)
}

async fn version() -> Json<Value> {
    data(json!({"version": "9.0.3", "release": "9.0", "repoid": "pve-sim"}))
}

async fn nodes(State(sim): SimState) -> Json<Value> {
    let nodes = sim.with(|g| g.nodes.clone());
    data(
        nodes
            .iter()
            .map(|n| json!({"node": n, "status": "online", "type": "node", "maxcpu": 16, "maxmem": 68719476736u64}))
            .collect::<Vec<_>>(),
    )
}

async fn cluster_resources(State(sim): SimState, p: Params) -> ApiResult {
    let ty = p.get("type").map(str::to_string);
    if let Some(t) = &ty {
        if !["vm", "storage", "node", "sdn"].contains(&t.as_str()) {
            return Err(PveError::param(
                "type",
                format!(
                    "value '{t}' does not have a value in the enumeration 'vm, storage, node, sdn'"
                ),
            ));
        }
    }
    let items = sim.with(|g| {
        let mut items = Vec::new();
        if ty.as_deref().is_none_or(|t| t == "vm") {
            for vm in g.vms.values() {
                if vm.lock.as_deref() == Some("clone") {
                    // A VM being created shows up with almost nothing known yet.
                    items.push(json!({"id": format!("qemu/{}", vm.vmid), "type": "qemu",
                        "vmid": vm.vmid, "node": vm.node, "status": "unknown"}));
                    continue;
                }
                let mut item = json!({
                    "id": format!("qemu/{}", vm.vmid), "type": "qemu", "vmid": vm.vmid,
                    "node": vm.node, "name": vm.name,
                    "status": vm.status(),
                    "template": u8::from(vm.template),
                    "maxmem": vm.memory_mib * 1024 * 1024, "maxcpu": vm.cores,
                    "maxdisk": vm.disk_bytes, "mem": if vm.running { vm.memory_mib * 1024 * 512 } else { 0 },
                    "disk": 0, "cpu": 0, "uptime": vm.uptime(), "netin": 0, "netout": 0,
                    "diskread": 0, "diskwrite": 0,
                });
                if let Some(l) = &vm.lock {
                    item["lock"] = json!(l);
                }
                if let Some(t) = vm.tags() {
                    item["tags"] = json!(t);
                }
                items.push(item);
            }
        }
        if ty.as_deref().is_none_or(|t| t == "node") {
            for n in &g.nodes {
                items.push(json!({"id": format!("node/{n}"), "type": "node", "node": n,
                    "status": "online", "maxcpu": 16, "maxmem": 68719476736u64}));
            }
        }
        items
    });
    Ok(data(items))
}

async fn next_id(State(sim): SimState, p: Params) -> ApiResult {
    let wanted = p.int("vmid")?;
    sim.with(|g| match wanted {
        Some(v) => {
            let v = u32::try_from(v)
                .ok()
                .filter(|v| (100..=999_999_999).contains(v))
                .ok_or_else(|| PveError::param("vmid", "value must have a minimum value of 100"))?;
            if g.vms.contains_key(&v) {
                Err(PveError::param("vmid", format!("VM {v} already exists")))
            } else {
                Ok(data(v.to_string()))
            }
        }
        None => {
            let free = (100u32..1_000_000).find(|id| !g.vms.contains_key(id));
            match free {
                Some(id) => Ok(data(id.to_string())),
                None => Err(PveError::runtime(
                    "unable to get any free VMID in range [100, 1000000]",
                )),
            }
        }
    })
}

async fn node_qemu(State(sim): SimState, Path(node): Path<String>) -> ApiResult {
    sim.with(|g| {
        check_node(g, &node)?;
        let items: Vec<Value> = g
            .vms
            .values()
            .filter(|vm| vm.node == node)
            .map(|vm| {
                let mut item = json!({
                    "vmid": vm.vmid, "name": vm.name, "status": vm.status(),
                    "cpus": vm.cores, "maxmem": vm.memory_mib * 1024 * 1024,
                    "maxdisk": vm.disk_bytes, "uptime": vm.uptime(),
                    "mem": if vm.running { vm.memory_mib * 1024 * 512 } else { 0 },
                    "cpu": 0, "disk": 0, "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
                });
                if vm.running {
                    item["pid"] = json!(4000 + vm.vmid);
                }
                if vm.template {
                    item["template"] = json!(1);
                }
                if let Some(t) = vm.tags() {
                    item["tags"] = json!(t);
                }
                if let Some(l) = &vm.lock {
                    item["lock"] = json!(l);
                }
                item
            })
            .collect();
        Ok(data(items))
    })
}

async fn vm_index(State(sim): SimState, Path((node, vmid)): Path<(String, String)>) -> ApiResult {
    let vmid = parse_vmid(&vmid)?;
    sim.with(|g| {
        g.vm_on(&node, vmid).map_err(PveError::runtime)?;
        Ok(data(
            ["agent", "clone", "config", "status", "termproxy"]
                .iter()
                .map(|s| json!({"subdir": s}))
                .collect::<Vec<_>>(),
        ))
    })
}

async fn clone_vm(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    let src = parse_vmid(&vmid)?;
    let Some(newid) = p.int("newid")? else {
        return Err(PveError::param(
            "newid",
            "property is missing and it is not optional",
        ));
    };
    let newid = u32::try_from(newid)
        .ok()
        .filter(|v| (100..=999_999_999).contains(v))
        .ok_or_else(|| PveError::param("newid", "value must have a minimum value of 100"))?;
    let name = p.get("name").map(str::to_string);
    if let Some(n) = &name {
        if !valid_dns_name(n) {
            return Err(PveError::param(
                "name",
                "value does not look like a valid DNS name",
            ));
        }
    }
    let description = p.get("description").map(str::to_string);
    if description.as_ref().is_some_and(|d| d.len() > 8192) {
        return Err(PveError::param(
            "description",
            "value may only be 8192 characters long",
        ));
    }
    let full = p.boolean("full")?;
    if (p.get("storage").is_some() || p.get("format").is_some()) && !full {
        return Err(PveError::param(
            "storage",
            "option can only be used with full clone",
        ));
    }
    let target = p.get("target").map(str::to_string);
    let storage = p.get("storage").map(str::to_string);
    let pool = p.get("pool").map(str::to_string);
    let cfg = sim.config.clone();
    sim.with(|g| {
        g.record("POST", &format!("/nodes/{node}/qemu/{vmid}/clone"), &p.0);
        check_node(g, &node)?;
        if let Some(st) = &storage {
            if !g.storages.contains(st) {
                return Err(PveError::runtime(format!("storage '{st}' does not exist")));
            }
        }
        if let Some(pl) = &pool {
            if !g.pools.contains(pl) {
                return Err(PveError::runtime(format!("pool '{pl}' does not exist")));
            }
        }
        if let Some(t) = &target {
            if !g.nodes.contains(t) {
                return Err(PveError::param(
                    "target",
                    format!("no such cluster node '{t}'"),
                ));
            }
        }
        let source = g.vm_on(&node, src).map_err(PveError::runtime)?.clone();
        if let Some(l) = &source.lock {
            return Err(PveError::runtime(format!("VM is locked ({l})")));
        }
        if !source.template && source.running && !full {
            return Err(PveError::runtime(
                "Linked clone feature is not supported for a running VM (use full clone)",
            ));
        }
        if g.faults.steal_next_ids > 0 && !g.vms.contains_key(&newid) {
            g.faults.steal_next_ids -= 1;
            let mac = g.new_mac(newid);
            let mut foreign = source.clone();
            foreign.vmid = newid;
            foreign.name = format!("foreign-{newid}");
            foreign.template = false;
            foreign.foreign = true;
            foreign.description = Some("created by another tool".into());
            foreign.net0 = Some(format!("virtio={mac},bridge=vmbr0"));
            foreign.execs.clear();
            g.vms.insert(newid, foreign);
            return Err(PveError::runtime(format!(
                "unable to create VM {newid}: config file already exists"
            )));
        }
        if let Some(existing) = g.vms.get(&newid) {
            return Err(PveError::runtime(format!(
                "VM {newid} already exists on node '{}'",
                existing.node
            )));
        }
        let mac = g.new_mac(newid);
        let model = source
            .net0
            .as_deref()
            .and_then(|n| n.split(',').next())
            .and_then(|m| m.split('=').next())
            .filter(|m| NIC_MODELS.contains(m))
            .unwrap_or("virtio")
            .to_string();
        let bridge = source_bridge(&source);
        let vm = Vm {
            vmid: newid,
            node: target.clone().unwrap_or_else(|| node.clone()),
            name: name
                .clone()
                .unwrap_or_else(|| format!("Copy-of-VM-{}", source.name)),
            template: false,
            memory_mib: source.memory_mib,
            cores: source.cores,
            disk_bytes: source.disk_bytes,
            net0: Some(format!("{model}={mac},bridge={bridge},firewall=1")),
            agent: source.agent.clone(),
            description: description.clone().or(source.description.clone()),
            lock: Some("clone".into()),
            running: false,
            booted_at: None,
            // The clone gets its own cloud-init drive if the source has one.
            extra: source
                .extra
                .iter()
                .map(|(k, v)| {
                    let v = if v.contains("-cloudinit") {
                        format!("local-lvm:vm-{newid}-cloudinit,media=cdrom")
                    } else {
                        v.clone()
                    };
                    (k.clone(), v)
                })
                .collect(),
            execs: Default::default(),
            foreign: false,
            generation: 0,
            protection: false,
            ignore_acpi: source.ignore_acpi,
            storage: if full {
                storage.clone().unwrap_or_else(|| source.storage.clone())
            } else {
                source.storage.clone()
            },
            pool: pool.clone(),
        };
        g.vms.insert(newid, vm);
        let outcome = match g.faults.fail_next_clone.take() {
            Some(msg) => Err(msg),
            None => Ok(()),
        };
        let mut log = vec![format!(
            "create {} clone of drive scsi0 ({}:base-{src}-disk-0)",
            if full { "full" } else { "linked" },
            source.storage
        )];
        log.push(format!("  Logical volume \"vm-{newid}-disk-0\" created."));
        let ms = if full {
            cfg.clone_ms.saturating_mul(3)
        } else {
            cfg.clone_ms
        };
        let upid = g.spawn_task(
            &node,
            "qmclone",
            &src.to_string(),
            &cfg.token_id,
            Duration::from_millis(ms),
            outcome,
            Effect::CloneDone { newid },
            log,
        );
        Ok(data(upid))
    })
}

fn source_bridge(vm: &Vm) -> String {
    vm.net0_bridge().unwrap_or_else(|| "vmbr0".into())
}

fn config_json(vm: &Vm) -> Value {
    let mut c = json!({
        "name": vm.name,
        "memory": vm.memory_mib.to_string(),
        "cores": vm.cores,
        "sockets": 1,
        "ostype": "l26",
        "scsihw": "virtio-scsi-single",
        "boot": "order=scsi0;net0",
        "scsi0": format!("{}:vm-{}-disk-0,iothread=1,size={}G", vm.storage, vm.vmid, vm.disk_bytes >> 30),
        "smbios1": format!("uuid=6f1b8c2e-0000-4000-8000-{:012x}", vm.vmid),
        "vmgenid": format!("c0ffee00-0000-4000-8000-{:012x}", vm.vmid),
        "meta": "creation-qemu=9.0.2,ctime=1732000000",
        "digest": vm.digest(),
    });
    for (k, v) in &vm.extra {
        c[k] = json!(v);
    }
    if let Some(n) = &vm.net0 {
        c["net0"] = json!(n);
    }
    if let Some(a) = &vm.agent {
        c["agent"] = json!(a);
    }
    if let Some(d) = &vm.description {
        c["description"] = json!(d);
    }
    if let Some(l) = &vm.lock {
        c["lock"] = json!(l);
    }
    if vm.template {
        c["template"] = json!(1);
    }
    if vm.protection {
        c["protection"] = json!(1);
    }
    c
}

async fn get_config(State(sim): SimState, Path((node, vmid)): Path<(String, String)>) -> ApiResult {
    let vmid = parse_vmid(&vmid)?;
    sim.with(|g| {
        let vm = g.vm_on(&node, vmid).map_err(PveError::runtime)?;
        Ok(data(config_json(vm)))
    })
}

const CONFIG_KEYS: [&str; 15] = [
    "protection",
    "memory",
    "cores",
    "sockets",
    "net0",
    "description",
    "agent",
    "name",
    "ipconfig0",
    "ciuser",
    "sshkeys",
    "tags",
    "onboot",
    "delete",
    "digest",
];

/// `sshkeys` as Proxmox checks it: the value must be URL-encoded (`pve_verify_urlencoded`:
/// only `-%a-zA-Z0-9_.!~*'()`), and each decoded non-empty line an SSH public key.
pub fn check_sshkeys(raw: &str) -> Result<String, String> {
    let ok = raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-%_.!~*'()".contains(&b));
    if !ok {
        return Err(format!("invalid urlencoded string: {raw}"));
    }
    let decoded: String = percent_decode(raw).ok_or("invalid urlencoded string")?;
    for line in decoded.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut parts = line.split_whitespace();
        let ty = parts.next().unwrap_or("");
        let blob = parts.next().unwrap_or("");
        if !(ty.starts_with("ssh-") || ty.starts_with("ecdsa-") || ty.starts_with("sk-"))
            || blob.is_empty()
        {
            return Err(format!("SSH public key validation error: {line}"));
        }
    }
    Ok(decoded)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `ipconfig0`: `ip=dhcp` or `ip=A.B.C.D/N[,gw=A.B.C.D]` (IPv6 parts allowed).
fn valid_ipconfig(v: &str) -> bool {
    v.split(',').all(|kv| match kv.split_once('=') {
        Some(("ip", "dhcp")) => true,
        Some(("ip", cidr)) => cidr.split_once('/').is_some_and(|(a, n)| {
            a.parse::<std::net::Ipv4Addr>().is_ok() && n.parse::<u8>().is_ok_and(|n| n <= 32)
        }),
        Some(("gw", a)) => a.parse::<std::net::Ipv4Addr>().is_ok(),
        Some(("ip6", _)) | Some(("gw6", _)) => true,
        _ => false,
    })
}

/// `PUT /nodes/{node}/qemu/{vmid}/resize` `disk`, `size` (`+NG` grows by, `NG` grows to;
/// shrinking is refused) → UPID of a `resize` task (PVE 8).
async fn resize(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    let id = parse_vmid(&vmid)?;
    check_known(&p, &["disk", "size", "digest", "skiplock"])?;
    let Some(disk) = p.get("disk") else {
        return Err(PveError::param(
            "disk",
            "property is missing and it is not optional",
        ));
    };
    let Some(size) = p.get("size") else {
        return Err(PveError::param(
            "size",
            "property is missing and it is not optional",
        ));
    };
    let (grow, num) = match size.strip_prefix('+') {
        Some(n) => (true, n),
        None => (false, size),
    };
    let bytes = num
        .strip_suffix('G')
        .and_then(|n| n.parse::<u64>().ok())
        .map(|g| g << 30)
        .or_else(|| {
            num.strip_suffix('M')
                .and_then(|n| n.parse::<u64>().ok())
                .map(|m| m << 20)
        })
        .ok_or_else(|| {
            PveError::param(
                "size",
                format!("value '{size}' does not match the regex pattern"),
            )
        })?;
    let user = sim.config.token_id.clone();
    sim.with(|g| {
        g.record("PUT", &format!("/nodes/{node}/qemu/{vmid}/resize"), &p.0);
        let vm = g.vm_on_mut(&node, id).map_err(PveError::runtime)?;
        check_unlocked(vm)?;
        if disk != "scsi0" {
            return Err(PveError::param(
                "disk",
                format!("disk '{disk}' does not exist"),
            ));
        }
        let new = if grow { vm.disk_bytes + bytes } else { bytes };
        if new < vm.disk_bytes {
            return Err(PveError::runtime("shrinking disks is not supported"));
        }
        vm.disk_bytes = new;
        vm.generation += 1;
        let upid = g.spawn_task(
            &node,
            "resize",
            &vmid,
            &user,
            Duration::from_millis(50),
            Ok(()),
            Effect::None,
            vec![format!(
                "  Size of logical volume changed to {} GiB.",
                new >> 30
            )],
        );
        Ok(data(upid))
    })
}

/// Validates and applies a config update (shared by the async POST and the sync PUT).
fn update_config(sim: &Sim, node: &str, vmid: &str, p: &Params) -> Result<(), PveError> {
    let vmid = parse_vmid(vmid)?;
    let mut errors = BTreeMap::new();
    for (k, _) in &p.0 {
        if !CONFIG_KEYS.contains(&k.as_str()) && k != "node" && k != "vmid" {
            errors.insert(
                k.clone(),
                "property is not defined in schema and the schema does not allow additional properties".to_string(),
            );
        }
    }
    let memory = match p.get("memory") {
        None => None,
        Some(m) => {
            let v = m.strip_prefix("current=").unwrap_or(m);
            match v.parse::<u64>() {
                Ok(v) if v >= 16 => Some(v),
                Ok(_) => {
                    errors.insert(
                        "memory".into(),
                        "value must have a minimum value of 16".into(),
                    );
                    None
                }
                Err(_) => {
                    errors.insert(
                        "memory".into(),
                        format!("type check ('integer') failed - got '{m}'"),
                    );
                    None
                }
            }
        }
    };
    let cores = match p.int("cores") {
        Ok(Some(c)) if (1..=1024).contains(&c) => Some(c as u32),
        Ok(Some(_)) => {
            errors.insert(
                "cores".into(),
                "value must have a minimum value of 1".into(),
            );
            None
        }
        Ok(None) => None,
        Err(e) => {
            errors.extend(e.errors);
            None
        }
    };
    let net0 = p.get("net0").map(str::to_string);
    if let Some(n) = &net0 {
        let first = n.split(',').next().unwrap_or("");
        let model = first.split('=').next().unwrap_or("");
        let model_ok = NIC_MODELS.contains(&model) || first.starts_with("model=");
        let mac_ok = first
            .split_once('=')
            .filter(|(k, _)| NIC_MODELS.contains(k))
            .is_none_or(|(_, mac)| valid_mac(mac));
        if !model_ok || !mac_ok || !n.split(',').any(|kv| kv.starts_with("bridge=")) {
            errors.insert(
                "net0".into(),
                format!("unable to parse network options '{n}'"),
            );
        }
    }
    if let Some(a) = p.get("agent") {
        let ok = a.split(',').all(|kv| {
            matches!(kv, "0" | "1")
                || kv.starts_with("enabled=")
                || kv.starts_with("fstrim_cloned_disks=")
                || kv.starts_with("type=")
        });
        if !ok {
            errors.insert(
                "agent".into(),
                format!("unable to parse agent options '{a}'"),
            );
        }
    }
    if let Some(n) = p.get("name") {
        if !valid_dns_name(n) {
            errors.insert(
                "name".into(),
                "value does not look like a valid DNS name".into(),
            );
        }
    }
    let tags = p.get("tags").map(normalize_tags).transpose();
    let tags = match tags {
        Ok(t) => t,
        Err(e) => {
            errors.insert("tags".into(), e);
            None
        }
    };
    let protection = match p.boolean("protection") {
        Ok(b) => p.get("protection").map(|_| b),
        Err(e) => {
            errors.extend(e.errors);
            None
        }
    };
    if p.get("description").is_some_and(|d| d.len() > 8192) {
        errors.insert(
            "description".into(),
            "value may only be 8192 characters long".into(),
        );
    }
    if let Some(k) = p.get("sshkeys") {
        if let Err(e) = check_sshkeys(k) {
            errors.insert("sshkeys".into(), e);
        }
    }
    if let Some(ip) = p.get("ipconfig0") {
        if !valid_ipconfig(ip) {
            errors.insert(
                "ipconfig0".into(),
                format!("invalid format - unable to parse ip config '{ip}'"),
            );
        }
    }
    if let Some(u) = p.get("ciuser") {
        if u.is_empty() || u.contains([' ', ':', '/']) {
            errors.insert("ciuser".into(), format!("invalid user name '{u}'"));
        }
    }
    if let Err(e) = p.boolean("onboot") {
        errors.extend(e.errors);
    }
    if let Some(n) = p.get("net0") {
        for kv in n.split(',') {
            if let Some(t) = kv.strip_prefix("tag=") {
                if !t.parse::<u16>().is_ok_and(|t| (1..=4094).contains(&t)) {
                    errors.insert(
                        "net0".into(),
                        format!("invalid format - tag: value must be 1-4094 - got '{t}'"),
                    );
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(PveError::params(errors));
    }
    sim.with(|g| {
        let mac_seed = g.new_mac(vmid);
        let vm = g.vm_on_mut(node, vmid).map_err(PveError::runtime)?;
        check_unlocked(vm)?;
        if let Some(d) = p.get("digest") {
            if d != vm.digest() {
                return Err(PveError::runtime(
                    "detected modified configuration - file changed by other user? Try again.",
                ));
            }
        }
        if let Some(m) = memory {
            vm.memory_mib = m;
        }
        if let Some(c) = cores {
            vm.cores = c;
        }
        if let Some(n) = net0 {
            // Without a MAC, Proxmox generates a new one.
            let mut parts: Vec<String> = n.split(',').map(str::to_string).collect();
            if let Some(first) = parts.first_mut() {
                if NIC_MODELS.contains(&first.as_str()) {
                    *first = format!("{first}={mac_seed}");
                }
            }
            vm.net0 = Some(parts.join(","));
        }
        if let Some(a) = p.get("agent") {
            vm.agent = Some(a.to_string());
        }
        if let Some(d) = p.get("description") {
            vm.description = Some(d.to_string());
        }
        if let Some(n) = p.get("name") {
            vm.name = n.to_string();
        }
        for key in ["ipconfig0", "ciuser", "sshkeys", "onboot", "sockets"] {
            if let Some(v) = p.get(key) {
                vm.extra.insert(key.into(), v.into());
            }
        }
        match tags {
            Some(t) if t.is_empty() => {
                vm.extra.remove("tags");
            }
            Some(t) => {
                vm.extra.insert("tags".into(), t);
            }
            None => {}
        }
        if let Some(b) = protection {
            vm.protection = b;
        }
        if let Some(del) = p.get("delete") {
            for key in del.split([',', ';', ' ']).filter(|k| !k.is_empty()) {
                match key {
                    "description" => vm.description = None,
                    "agent" => vm.agent = None,
                    "net0" => vm.net0 = None,
                    "protection" => vm.protection = false,
                    other => {
                        vm.extra.remove(other);
                    }
                }
            }
        }
        vm.generation += 1;
        Ok(())
    })
}

async fn post_config(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    sim.with(|g| g.record("POST", &format!("/nodes/{node}/qemu/{vmid}/config"), &p.0));
    update_config(&sim, &node, &vmid, &p)?;
    let user = sim.config.token_id.clone();
    let upid = sim.with(|g| {
        g.spawn_task(
            &node,
            "qmconfig",
            &vmid,
            &user,
            Duration::from_millis(50),
            Ok(()),
            Effect::None,
            vec![],
        )
    });
    Ok(data(upid))
}

async fn put_config(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    sim.with(|g| g.record("PUT", &format!("/nodes/{node}/qemu/{vmid}/config"), &p.0));
    update_config(&sim, &node, &vmid, &p)?;
    Ok(data(Value::Null))
}

async fn status_current(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
) -> ApiResult {
    let vmid = parse_vmid(&vmid)?;
    sim.with(|g| {
        let vm = g.vm_on(&node, vmid).map_err(PveError::runtime)?;
        let mut s = json!({
            "vmid": vm.vmid, "name": vm.name,
            "status": vm.status(), "qmpstatus": vm.status(),
            "cpus": vm.cores, "maxmem": vm.memory_mib * 1024 * 1024,
            "maxdisk": vm.disk_bytes, "uptime": vm.uptime(), "ha": {"managed": 0},
            "mem": if vm.running { vm.memory_mib * 1024 * 512 } else { 0 },
            "cpu": 0, "disk": 0, "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
        });
        if vm.running {
            s["pid"] = json!(4000 + vm.vmid);
            s["running-machine"] = json!("pc-i440fx-9.0+pve0");
            s["running-qemu"] = json!("9.0.2");
        }
        if let Some(t) = vm.tags() {
            s["tags"] = json!(t);
        }
        if vm.agent_enabled() {
            s["agent"] = json!(1);
        }
        if let Some(l) = &vm.lock {
            s["lock"] = json!(l);
        }
        if vm.template {
            s["template"] = json!(1);
        }
        Ok(data(s))
    })
}

/// Rejects parameters an endpoint does not know, like Proxmox's schema check
/// (`additionalProperties => 0`).
fn check_known(p: &Params, known: &[&str]) -> Result<(), PveError> {
    let errors: BTreeMap<String, String> = p
        .0
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()) && k != "node" && k != "vmid")
        .map(|(k, _)| {
            (
                k.clone(),
                "property is not defined in schema and the schema does not allow additional properties"
                    .to_string(),
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PveError::params(errors))
    }
}

/// Options only `root@pam` itself may set (an API token, even root's, may not).
fn root_only(sim: &Sim, p: &Params, keys: &[&str]) -> Result<(), PveError> {
    if sim.config.token_id == "root@pam" {
        return Ok(());
    }
    for key in keys {
        if p.boolean(key)? {
            return Err(PveError::param(key, "Only root may use this option."));
        }
    }
    Ok(())
}

/// `timeout` in seconds, at least 0.
fn timeout_param(p: &Params) -> Result<Option<u64>, PveError> {
    match p.int("timeout")? {
        Some(t) if t < 0 => Err(PveError::param(
            "timeout",
            "value must have a minimum value of 0",
        )),
        t => Ok(t.map(|t| t as u64)),
    }
}

const START_PARAMS: [&str; 11] = [
    "skiplock",
    "stateuri",
    "migratedfrom",
    "migration_type",
    "migration_network",
    "machine",
    "force-cpu",
    "targetstorage",
    "timeout",
    "with-conntrack-state",
    "nets-host-mtu",
];

/// `POST …/status/{start,stop,shutdown,reboot}` → UPID. The request checks what
/// Proxmox checks before forking its worker (and, for start, what Proxmox clients see
/// as "already running"/"locked"); the rest is decided by the job when it begins (see
/// [`Job`]), and the VM's state changes when the task ends.
async fn power(
    State(sim): SimState,
    Path((node, vmid, action)): Path<(String, String, String)>,
    p: Params,
) -> ApiResult {
    let id = parse_vmid(&vmid)?;
    let user = sim.config.token_id.clone();
    let (kind, job) = match action.as_str() {
        "start" => {
            check_known(&p, &START_PARAMS)?;
            root_only(&sim, &p, &["skiplock"])?;
            timeout_param(&p)?;
            ("qmstart", Job::Start)
        }
        "stop" => {
            check_known(
                &p,
                &[
                    "skiplock",
                    "migratedfrom",
                    "timeout",
                    "keepActive",
                    "overrule-shutdown",
                ],
            )?;
            root_only(&sim, &p, &["skiplock", "keepActive"])?;
            p.boolean("overrule-shutdown")?;
            let timeout_s = timeout_param(&p)?;
            ("qmstop", Job::Stop { timeout_s })
        }
        "shutdown" => {
            check_known(&p, &["skiplock", "timeout", "forceStop", "keepActive"])?;
            root_only(&sim, &p, &["skiplock", "keepActive"])?;
            let timeout_s = timeout_param(&p)?;
            let force = p.boolean("forceStop")?;
            ("qmshutdown", Job::Shutdown { timeout_s, force })
        }
        "reboot" => {
            check_known(&p, &["timeout"])?;
            let timeout_s = timeout_param(&p)?;
            ("qmreboot", Job::Reboot { timeout_s })
        }
        _ => {
            return Err(PveError::new(
                501,
                format!("Method 'POST /nodes/{node}/qemu/{vmid}/status/{action}' not implemented"),
            ))
        }
    };
    let overrule = p.boolean("overrule-shutdown")?;
    sim.with(|g| {
        let vm = g.vm_on(&node, id).map_err(PveError::runtime)?;
        match &job {
            Job::Start => {
                if vm.template {
                    return Err(PveError::runtime("you can't start a vm if it's a template"));
                }
                check_unlocked(vm)?;
                if vm.running {
                    return Err(PveError::runtime(format!("VM {id} already running")));
                }
            }
            Job::Reboot { .. } if !vm.running => {
                return Err(PveError::runtime(format!("VM {id} not running")));
            }
            _ => {}
        }
        let mut log = Vec::new();
        if overrule {
            let aborted = g.abort_tasks("qmshutdown", id);
            if !aborted.is_empty() {
                log.push(format!(
                    "overruled qmshutdown tasks: {}",
                    aborted.join(", ")
                ));
            }
        }
        if matches!(job, Job::Shutdown { .. }) && g.vm_on(&node, id).is_ok_and(|v| v.running) {
            log.push(format!("shutdown VM {id}"));
        }
        Ok(data(g.spawn_job(&node, kind, id, &user, job, log)))
    })
}

/// Checks shared by the guest agent calls; returns the running VM.
fn guest_ready(sim: &Sim, g: &Inner, node: &str, vmid: u32) -> Result<Vm, PveError> {
    let vm = g.vm_on(node, vmid).map_err(PveError::runtime)?;
    if !vm.agent_enabled() {
        return Err(PveError::runtime("No QEMU guest agent configured"));
    }
    if !vm.running {
        return Err(PveError::runtime(format!("VM {vmid} is not running")));
    }
    let up = vm
        .booted_at
        .is_some_and(|b| b.elapsed() >= Duration::from_millis(sim.config.agent_boot_ms));
    if !up || g.faults.agent_never_up {
        return Err(PveError::runtime("QEMU guest agent is not running"));
    }
    Ok(vm.clone())
}

async fn guest_interfaces(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
) -> ApiResult {
    let vmid = parse_vmid(&vmid)?;
    sim.with(|g| {
        let vm = guest_ready(&sim, g, &node, vmid)?;
        let mac = vm
            .net0_mac()
            .unwrap_or_else(|| "BC:24:11:00:00:01".into())
            .to_ascii_lowercase();
        let stats = json!({"rx-bytes": 52311, "rx-dropped": 0, "rx-errs": 0, "rx-packets": 612,
            "tx-bytes": 40321, "tx-dropped": 0, "tx-errs": 0, "tx-packets": 411});
        // EUI-64 link-local from the MAC's last three bytes (hex digits only, so slicing
        // stays on char boundaries whatever the config holds).
        let digits: String = mac.chars().filter(char::is_ascii_hexdigit).collect();
        let padded = format!("{digits:0>12}");
        let tail = &padded[padded.len() - 6..];
        let link_local = format!("fe80::be24:11ff:fe{}:{}", &tail[..2], &tail[2..]);
        let result = json!([
            {"name": "lo", "hardware-address": "00:00:00:00:00:00",
             "ip-addresses": [
                {"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
                {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}],
             "statistics": stats},
            {"name": "docker0", "hardware-address": "02:42:8e:1a:7c:01",
             "ip-addresses": [
                {"ip-address": "172.17.0.1", "ip-address-type": "ipv4", "prefix": 16}],
             "statistics": stats},
            {"name": "ens18", "hardware-address": mac,
             "ip-addresses": [
                {"ip-address": link_local,
                 "ip-address-type": "ipv6", "prefix": 64},
                {"ip-address": vm.guest_ipv4(), "ip-address-type": "ipv4", "prefix": 16}],
             "statistics": stats}
        ]);
        Ok(data(json!({"result": result})))
    })
}

async fn guest_exec(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    let vmid = parse_vmid(&vmid)?;
    let argv = p.all("command");
    if argv.is_empty() {
        return Err(PveError::param(
            "command",
            "property is missing and it is not optional",
        ));
    }
    sim.with(|g| {
        let vm = guest_ready(&sim, g, &node, vmid)?;
        let (code, out, err, extra) = run_guest_command(&argv, &vm.name);
        let pid = g.next_exec_pid();
        let ends_at = std::time::Instant::now()
            + (Duration::from_millis(sim.config.exec_ms) + extra).min(MAX_SIM_WAIT);
        if let Ok(vm) = g.vm_on_mut(&node, vmid) {
            vm.execs.insert(
                pid,
                GuestExec {
                    ends_at,
                    exitcode: code,
                    out,
                    err,
                },
            );
        }
        Ok(data(json!({"pid": pid})))
    })
}

async fn guest_exec_status(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    let vmid = parse_vmid(&vmid)?;
    let Some(pid) = p.int("pid")? else {
        return Err(PveError::param(
            "pid",
            "property is missing and it is not optional",
        ));
    };
    sim.with(|g| {
        guest_ready(&sim, g, &node, vmid)?;
        let vm = g.vm_on_mut(&node, vmid).map_err(PveError::runtime)?;
        let pid = u32::try_from(pid).unwrap_or(0);
        let Some(exec) = vm.execs.get(&pid).cloned() else {
            return Err(PveError::runtime("Agent error: Invalid parameter 'pid'"));
        };
        if exec.ends_at > std::time::Instant::now() {
            return Ok(data(json!({"exited": 0})));
        }
        // Like qemu-ga, a finished process is reported once and then forgotten.
        vm.execs.remove(&pid);
        let mut s = json!({"exited": 1, "exitcode": exec.exitcode});
        if !exec.out.is_empty() {
            s["out-data"] = json!(exec.out);
        }
        if !exec.err.is_empty() {
            s["err-data"] = json!(exec.err);
        }
        Ok(data(s))
    })
}

/// `DELETE /nodes/{node}/qemu/{vmid}` → UPID (`qmdestroy`). Refuses a protected or
/// running VM at once (like qemu-server's early checks), checks again and for a `lock`
/// when the job begins, holds `lock: destroyed` while it runs, and removes the VM when
/// it ends.
async fn destroy(
    State(sim): SimState,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    let id = parse_vmid(&vmid)?;
    check_known(&p, &["skiplock", "purge", "destroy-unreferenced-disks"])?;
    root_only(&sim, &p, &["skiplock"])?;
    let purge = p.boolean("purge")?;
    let unreferenced = p.boolean("destroy-unreferenced-disks")?;
    let user = sim.config.token_id.clone();
    sim.with(|g| {
        let vm = g.vm_on(&node, id).map_err(PveError::runtime)?;
        if vm.protection {
            return Err(PveError::runtime(format!(
                "can't remove VM {id} - protection mode enabled"
            )));
        }
        if vm.running {
            return Err(PveError::runtime(format!(
                "VM {id} is running - destroy failed"
            )));
        }
        let job = Job::Destroy {
            purge,
            unreferenced,
        };
        Ok(data(g.spawn_job(
            &node,
            "qmdestroy",
            id,
            &user,
            job,
            vec![],
        )))
    })
}

async fn task_status(
    State(sim): SimState,
    Path((node, upid)): Path<(String, String)>,
) -> ApiResult {
    sim.with(|g| {
        let Some(t) = g.tasks.get(&upid).filter(|t| t.node == node) else {
            if !upid.starts_with("UPID:") {
                return Err(PveError::param("upid", "unable to parse worker upid"));
            }
            return Err(PveError::runtime(format!("no such task '{upid}'")));
        };
        let mut s = json!({
            "upid": t.upid, "node": t.node, "pid": t.pid, "pstart": t.pstart,
            "starttime": t.starttime, "type": t.kind, "id": t.id, "user": t.user,
            "status": if t.finished { "stopped" } else { "running" },
        });
        if let Some(e) = t.exitstatus() {
            s["exitstatus"] = json!(e);
        }
        Ok(data(s))
    })
}

async fn task_log(
    State(sim): SimState,
    Path((node, upid)): Path<(String, String)>,
    p: Params,
) -> Result<Json<Value>, PveError> {
    let start = p.int("start")?.unwrap_or(0).max(0) as usize;
    let limit = p.int("limit")?.unwrap_or(50).max(0) as usize;
    sim.with(|g| {
        let Some(t) = g.tasks.get(&upid).filter(|t| t.node == node) else {
            return Err(PveError::runtime(format!("no such task '{upid}'")));
        };
        let lines: Vec<Value> = t
            .log
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, l)| json!({"n": i + 1, "t": l}))
            .collect();
        Ok(Json(json!({"data": lines, "total": t.log.len()})))
    })
}
