//! The simulator's model of a small Proxmox VE cluster: VMs, tasks (UPIDs that run for a
//! while and finish lazily when time has passed), guest agents and injected faults.
//!
//! All state sits behind one mutex; handlers take it, let time advance
//! ([`Inner::advance`]) and act. Nothing awaits while holding it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A VM or template present when the simulator starts.
#[derive(Debug, Clone)]
pub struct SeedVm {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub template: bool,
    pub memory_mib: u64,
    pub cores: u32,
    pub disk_gib: u64,
    pub running: bool,
}

impl SeedVm {
    fn new(
        vmid: u32,
        node: &str,
        name: &str,
        template: bool,
        memory_mib: u64,
        cores: u32,
        disk_gib: u64,
    ) -> Self {
        Self {
            vmid,
            node: node.into(),
            name: name.into(),
            template,
            memory_mib,
            cores,
            disk_gib,
            running: !template,
        }
    }
}

/// The default cluster: two nodes, three templates and one ordinary running VM (so the
/// first free VMID is 101 and `list_templates` has something to filter out).
pub fn default_seeds() -> Vec<SeedVm> {
    vec![
        SeedVm::new(100, "pve1", "legacy-db", false, 8192, 4, 64),
        SeedVm::new(9000, "pve1", "debian-12-cloud", true, 2048, 2, 10),
        SeedVm::new(9001, "pve1", "ubuntu-24.04-cloud", true, 2048, 2, 20),
        SeedVm::new(9002, "pve2", "rocky-9-cloud", true, 4096, 2, 20),
    ]
}

/// How the simulator behaves. Durations are what the real thing would take, shortened.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Full token id, `USER@REALM!TOKENID`.
    pub token_id: String,
    pub token_secret: String,
    /// Proxmox delays failed authentications by 3 s; tests shorten it.
    pub auth_fail_delay: Duration,
    pub clone_ms: u64,
    pub start_ms: u64,
    pub stop_ms: u64,
    /// How long a guest that honours the ACPI power button takes to power off.
    pub shutdown_ms: u64,
    pub destroy_ms: u64,
    /// How long one second of a Proxmox `timeout` parameter (shutdown, stop, reboot) and
    /// of the 10 s config-lock wait lasts in the simulator: `timeout=60` waits
    /// `60 * sim_second_ms` ms. A cooperating guest needs `shutdown_ms / sim_second_ms`
    /// Proxmox seconds to power off, so a shorter `timeout` runs into it.
    pub sim_second_ms: u64,
    /// Time from the end of the start task until the guest agent answers.
    pub agent_boot_ms: u64,
    /// How long a guest command runs (plus any `sleep` in it).
    pub exec_ms: u64,
    /// Answer errors like servers before 2025-01: no `message` in the body, the text
    /// only in the HTTP reason phrase.
    pub legacy_errors: bool,
    pub seeds: Vec<SeedVm>,
    /// Bridges that exist on every node.
    pub bridges: Vec<String>,
    /// Storages that exist (for `storage` on a full clone).
    pub storages: Vec<String>,
    /// Resource pools that exist (for `pool` on a clone).
    pub pools: Vec<String>,
    pub faults: Faults,
}

/// Longest a simulated task or guest command runs, whatever the flags say.
pub const MAX_SIM_WAIT: Duration = Duration::from_secs(86_400);

pub const DEFAULT_TOKEN_ID: &str = "root@pam!trellis";
pub const DEFAULT_TOKEN_SECRET: &str = "5e1f5b3c-7d0a-4a43-9f3e-2b8c1d0e6a77";

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            token_id: DEFAULT_TOKEN_ID.into(),
            token_secret: DEFAULT_TOKEN_SECRET.into(),
            auth_fail_delay: Duration::from_secs(3),
            clone_ms: 1500,
            start_ms: 1000,
            stop_ms: 400,
            shutdown_ms: 150,
            destroy_ms: 400,
            sim_second_ms: 50,
            agent_boot_ms: 4000,
            exec_ms: 100,
            legacy_errors: false,
            seeds: default_seeds(),
            bridges: vec!["vmbr0".into(), "vmbr1".into()],
            storages: vec!["local".into(), "local-lvm".into(), "fast-ssd".into()],
            pools: vec!["web".into(), "db".into()],
            faults: Faults::default(),
        }
    }
}

/// Faults to inject. Set at start by flags or replaced at runtime with
/// `POST /_sim/faults` (the whole object; missing fields mean "no fault").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The next clone task ends with this error (consumed).
    pub fail_next_clone: Option<String>,
    /// The next start task ends with this error (consumed).
    pub fail_next_start: Option<String>,
    /// Guest agents never answer ("QEMU guest agent is not running").
    pub agent_never_up: bool,
    /// Answer the next `count` API requests (whose path contains `path_contains`, when
    /// set) with this status and an empty body, like a failing proxy hop.
    pub burst: Option<Burst>,
    /// Delay every API response by this many milliseconds.
    pub slow_ms: u64,
    /// The next N clone requests find their `newid` just taken by someone else
    /// ("unable to create VM N: config file already exists"); the sim creates that
    /// foreign VM.
    pub steal_next_ids: u32,
    /// Every API request is denied (403), like a privilege-separated token without ACLs.
    pub forbidden: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Burst {
    pub count: u32,
    #[serde(default = "default_burst_status")]
    pub status: u16,
    #[serde(default)]
    pub path_contains: Option<String>,
}

fn default_burst_status() -> u16 {
    596
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub template: bool,
    pub memory_mib: u64,
    pub cores: u32,
    pub disk_bytes: u64,
    pub net0: Option<String>,
    /// The raw `agent` property, e.g. `1` or `enabled=1,fstrim_cloned_disks=1`.
    pub agent: Option<String>,
    pub description: Option<String>,
    pub lock: Option<String>,
    pub running: bool,
    pub booted_at: Option<Instant>,
    /// Other config keys (cloud-init and such), kept verbatim.
    pub extra: BTreeMap<String, String>,
    pub execs: HashMap<u32, GuestExec>,
    /// The VM config was written by "someone else" (fault `steal_next_ids`).
    pub foreign: bool,
    pub generation: u64,
    /// `protection: 1` in the config: destroy is refused.
    pub protection: bool,
    /// The guest ignores shutdown requests (the ACPI power button and its agent's
    /// `guest-shutdown`), like a hung or ACPI-less OS. Set with `POST /_sim/vms/N/flags`.
    pub ignore_acpi: bool,
    /// Storage of its disks.
    pub storage: String,
    /// Resource pool it belongs to.
    pub pool: Option<String>,
}

impl Vm {
    pub fn agent_enabled(&self) -> bool {
        self.agent.as_deref().is_some_and(property_enabled)
    }

    /// MAC of net0 (`virtio=BC:24:11:…`), if any.
    pub fn net0_mac(&self) -> Option<String> {
        let net0 = self.net0.as_deref()?;
        net0.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (NIC_MODELS.contains(&k) || k == "macaddr").then(|| v.to_string())
        })
    }

    pub fn net0_bridge(&self) -> Option<String> {
        let net0 = self.net0.as_deref()?;
        net0.split(',')
            .find_map(|kv| kv.strip_prefix("bridge=").map(str::to_string))
    }

    pub fn guest_ipv4(&self) -> String {
        format!("10.20.{}.{}", (self.vmid >> 8) & 0xff, self.vmid & 0xff)
    }

    pub fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(format!("{}:{}:{}", self.vmid, self.name, self.generation));
        hex::encode(&h.finalize()[..20])
    }

    pub fn view(&self) -> VmView {
        VmView {
            vmid: self.vmid,
            node: self.node.clone(),
            name: self.name.clone(),
            template: self.template,
            status: if self.running { "running" } else { "stopped" }.into(),
            lock: self.lock.clone(),
            memory: self.memory_mib,
            cores: self.cores,
            net0: self.net0.clone(),
            agent: self.agent.clone(),
            description: self.description.clone(),
            foreign: self.foreign,
            tags: self.tags().map(str::to_string),
            protection: self.protection,
            ignore_acpi: self.ignore_acpi,
            disk_bytes: self.disk_bytes,
            storage: self.storage.clone(),
            pool: self.pool.clone(),
            config: self.extra.clone(),
        }
    }

    /// The `tags` property (`a;b`), when set and not empty.
    pub fn tags(&self) -> Option<&str> {
        self.extra
            .get("tags")
            .map(String::as_str)
            .filter(|t| !t.is_empty())
    }

    pub fn status(&self) -> &'static str {
        if self.running {
            "running"
        } else {
            "stopped"
        }
    }

    /// Seconds since the VM booted (0 when stopped).
    pub fn uptime(&self) -> u64 {
        self.booted_at
            .filter(|_| self.running)
            .map(|b| b.elapsed().as_secs())
            .unwrap_or(0)
    }
}

/// `1`, `enabled=1,…` → true.
pub fn property_enabled(v: &str) -> bool {
    v.split(',')
        .any(|kv| kv == "1" || kv == "enabled=1" || kv == "enabled=true")
}

pub const NIC_MODELS: [&str; 5] = ["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"];

/// What `GET /_sim/vms` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmView {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub template: bool,
    pub status: String,
    pub lock: Option<String>,
    pub memory: u64,
    pub cores: u32,
    pub net0: Option<String>,
    pub agent: Option<String>,
    pub description: Option<String>,
    pub foreign: bool,
    /// `tags` as Proxmox stores them (`a;b`, lower-case, sorted), when set.
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub protection: bool,
    #[serde(default)]
    pub ignore_acpi: bool,
    /// Size of its boot disk (scsi0), in bytes.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Storage of its disks.
    #[serde(default)]
    pub storage: String,
    /// Resource pool it belongs to.
    #[serde(default)]
    pub pool: Option<String>,
    /// Other config keys as Proxmox stores them (`ciuser`, `sshkeys`, `ipconfig0`,
    /// `onboot`, `tags`, …).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// One API request that changed something, as the simulator received it (after form or
/// JSON decoding): what `GET /_sim/requests` shows, so tests can assert the exact
/// parameters a client sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub params: Vec<(String, String)>,
}

/// At most this many requests are kept (the oldest are dropped).
pub const MAX_RECORDED_REQUESTS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct GuestExec {
    pub ends_at: Instant,
    pub exitcode: i32,
    pub out: String,
    pub err: String,
}

#[derive(Debug, Clone)]
pub enum Effect {
    None,
    CloneDone {
        newid: u32,
    },
    Started {
        vmid: u32,
    },
    Stopped {
        vmid: u32,
    },
    /// Shut down and started again: still running, with a fresh boot.
    Rebooted {
        vmid: u32,
    },
    Destroyed {
        vmid: u32,
    },
}

/// A lifecycle job. Like qemu-server's workers it takes the VM's config lock
/// (`/var/lock/qemu-server/lock-N.conf`), so it begins only when the job before it on
/// that VM has ended (giving up after 10 Proxmox seconds), and it decides what to do from
/// the VM's state at that moment, not at the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Start,
    Stop { timeout_s: Option<u64> },
    Shutdown { timeout_s: Option<u64>, force: bool },
    Reboot { timeout_s: Option<u64> },
    Destroy { purge: bool, unreferenced: bool },
}

/// What a job does once it has begun.
struct Plan {
    duration: Duration,
    outcome: Result<(), String>,
    warnings: u32,
    effect: Effect,
    log: Vec<String>,
}

impl Plan {
    fn ok(duration: Duration, effect: Effect, log: Vec<String>) -> Self {
        Self {
            duration,
            outcome: Ok(()),
            warnings: 0,
            effect,
            log,
        }
    }

    fn fail(duration: Duration, err: String) -> Self {
        Self {
            duration,
            outcome: Err(err),
            warnings: 0,
            effect: Effect::None,
            log: vec![],
        }
    }
}

/// Proxmox's default `timeout` for shutdown and stop (seconds).
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 60;
/// How long a worker waits for a VM's config lock (seconds).
pub const CONFIG_LOCK_WAIT_S: u64 = 10;
/// How long a job that has nothing to do (or fails a precondition) runs.
const QUICK: Duration = Duration::from_millis(30);

#[derive(Debug, Clone)]
pub struct Task {
    pub upid: String,
    pub node: String,
    pub kind: String,
    pub id: String,
    pub user: String,
    pub pid: u32,
    pub pstart: u32,
    pub starttime: u64,
    pub ends_at: Instant,
    /// `Ok(())` → `OK` (or `WARNINGS: N`), `Err(text)` → that exit status.
    pub outcome: Result<(), String>,
    /// Warnings the worker printed (`warn`); a successful task then ends `WARNINGS: N`.
    pub warnings: u32,
    pub effect: Effect,
    pub log: Vec<String>,
    pub finished: bool,
    /// A lifecycle job on a VM (holds its config lock once begun).
    pub job: Option<(u32, Job)>,
    /// False while a job waits for the config lock; `ends_at`, `outcome` and `effect`
    /// are decided when it begins.
    pub begun: bool,
    /// A waiting job gives up at this instant.
    pub lock_deadline: Instant,
    seq: u64,
}

impl Task {
    pub fn exitstatus(&self) -> Option<String> {
        self.finished.then(|| match &self.outcome {
            Ok(()) if self.warnings > 0 => format!("WARNINGS: {}", self.warnings),
            Ok(()) => "OK".to_string(),
            Err(e) => e.clone(),
        })
    }

    fn job_vmid(&self) -> Option<u32> {
        self.job.as_ref().map(|(v, _)| *v)
    }
}

/// `GET /_sim/tasks` item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub upid: String,
    pub kind: String,
    pub id: String,
    pub status: String,
    pub exitstatus: Option<String>,
}

pub struct Inner {
    pub vms: BTreeMap<u32, Vm>,
    pub tasks: HashMap<String, Task>,
    pub faults: Faults,
    pub nodes: Vec<String>,
    next_pid: u32,
    next_exec_pid: u32,
    mac_counter: u32,
    next_seq: u64,
    pub requests: u64,
    /// The latest clone, config and resize requests (see [`RecordedRequest`]).
    pub recorded: std::collections::VecDeque<RecordedRequest>,
    /// Storages and pools that exist.
    pub storages: Vec<String>,
    pub pools: Vec<String>,
    /// The timings of [`SimConfig`] (copied so jobs can plan inside [`Inner::advance`]).
    pub timing: Timing,
}

/// The durations jobs need, from [`SimConfig`].
#[derive(Debug, Clone)]
pub struct Timing {
    pub start_ms: u64,
    pub stop_ms: u64,
    pub shutdown_ms: u64,
    pub destroy_ms: u64,
    pub sim_second_ms: u64,
    pub bridges: Vec<String>,
}

impl Timing {
    /// `s` Proxmox seconds in simulator time.
    pub fn secs(&self, s: u64) -> Duration {
        Duration::from_millis(s.saturating_mul(self.sim_second_ms)).min(MAX_SIM_WAIT)
    }
}

pub struct Sim {
    pub config: SimConfig,
    inner: Mutex<Inner>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Self {
        let mut nodes: Vec<String> = vec!["pve1".into(), "pve2".into()];
        let mut inner = Inner {
            vms: BTreeMap::new(),
            tasks: HashMap::new(),
            faults: config.faults.clone(),
            nodes: Vec::new(),
            next_pid: 0x0001_a2b0,
            next_exec_pid: 1000,
            mac_counter: 0,
            next_seq: 0,
            requests: 0,
            recorded: Default::default(),
            storages: config.storages.clone(),
            pools: config.pools.clone(),
            timing: Timing {
                start_ms: config.start_ms,
                stop_ms: config.stop_ms,
                shutdown_ms: config.shutdown_ms,
                destroy_ms: config.destroy_ms,
                sim_second_ms: config.sim_second_ms,
                bridges: config.bridges.clone(),
            },
        };
        let now = Instant::now();
        for s in &config.seeds {
            if !nodes.contains(&s.node) {
                nodes.push(s.node.clone());
            }
            let mac = inner.new_mac(s.vmid);
            inner.vms.insert(
                s.vmid,
                Vm {
                    vmid: s.vmid,
                    node: s.node.clone(),
                    name: s.name.clone(),
                    template: s.template,
                    memory_mib: s.memory_mib,
                    cores: s.cores,
                    disk_bytes: s.disk_gib << 30,
                    net0: Some(format!("virtio={mac},bridge=vmbr0,firewall=1")),
                    agent: Some("1".into()),
                    description: None,
                    lock: None,
                    running: s.running,
                    booted_at: s
                        .running
                        .then(|| now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)),
                    extra: BTreeMap::from([
                        ("ostype".into(), "l26".into()),
                        ("ipconfig0".into(), "ip=dhcp".into()),
                        // a cloud-init drive (flag `cloudinit: false` removes it)
                        (
                            "ide2".into(),
                            format!("local-lvm:vm-{}-cloudinit,media=cdrom", s.vmid),
                        ),
                    ]),
                    execs: HashMap::new(),
                    foreign: false,
                    generation: 0,
                    protection: false,
                    ignore_acpi: false,
                    storage: "local-lvm".into(),
                    pool: None,
                },
            );
        }
        inner.nodes = nodes;
        Self {
            config,
            inner: Mutex::new(inner),
        }
    }

    /// Runs `f` on the state after letting time advance (finishing due tasks).
    pub fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.advance(Instant::now());
        f(&mut g)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    /// Keeps a request for `GET /_sim/requests`.
    pub fn record(&mut self, method: &str, path: &str, params: &[(String, String)]) {
        if self.recorded.len() >= MAX_RECORDED_REQUESTS {
            self.recorded.pop_front();
        }
        self.recorded.push_back(RecordedRequest {
            method: method.into(),
            path: path.into(),
            params: params.to_vec(),
        });
    }

    /// Lets time run up to `now`: finishes every task whose time has come and begins the
    /// jobs waiting for a VM's config lock, in the order these things happen.
    pub fn advance(&mut self, now: Instant) {
        loop {
            let next = self
                .tasks
                .values()
                .filter(|t| !t.finished)
                .filter_map(|t| {
                    let at = if t.begun { t.ends_at } else { t.lock_deadline };
                    (at <= now).then(|| (at, t.seq, t.upid.clone()))
                })
                .min();
            let Some((at, _, upid)) = next else { break };
            if self.tasks[&upid].begun {
                self.finish(&upid);
                if let Some(vmid) = self.tasks[&upid].job_vmid() {
                    self.begin_next_waiter(vmid, at);
                }
            } else if let Some(t) = self.tasks.get_mut(&upid) {
                let vmid = t.job_vmid().unwrap_or_default();
                t.ends_at = at;
                t.begun = true;
                t.outcome = Err(format!(
                    "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"
                ));
                t.effect = Effect::None;
                self.finish(&upid);
            }
        }
    }

    /// Ends a begun task and applies its effect.
    fn finish(&mut self, upid: &str) {
        let Some(task) = self.tasks.get_mut(upid) else {
            return;
        };
        task.finished = true;
        let ok = task.outcome.is_ok();
        match &task.outcome {
            Ok(()) if task.warnings > 0 => {
                task.log.push(format!("TASK WARNINGS: {}", task.warnings))
            }
            Ok(()) => task.log.push("TASK OK".into()),
            Err(e) => task.log.push(format!("TASK ERROR: {e}")),
        }
        let effect = task.effect.clone();
        let ends_at = task.ends_at;
        match effect {
            Effect::None => {}
            Effect::CloneDone { newid } => {
                if ok {
                    if let Some(vm) = self.vms.get_mut(&newid) {
                        vm.lock = None;
                        vm.generation += 1;
                    }
                } else {
                    // qemu-server removes the half-created VM when a clone fails.
                    self.vms.remove(&newid);
                }
            }
            Effect::Started { vmid } | Effect::Rebooted { vmid } => {
                if let (true, Some(vm)) = (ok, self.vms.get_mut(&vmid)) {
                    vm.running = true;
                    vm.booted_at = Some(ends_at);
                    vm.execs.clear();
                }
            }
            Effect::Stopped { vmid } => {
                if let (true, Some(vm)) = (ok, self.vms.get_mut(&vmid)) {
                    vm.running = false;
                    vm.booted_at = None;
                    vm.execs.clear();
                }
            }
            Effect::Destroyed { vmid } => {
                if ok {
                    self.vms.remove(&vmid);
                }
            }
        }
    }

    /// The job holding `vmid`'s config lock, if any.
    fn lock_holder(&self, vmid: u32) -> Option<&Task> {
        self.tasks
            .values()
            .find(|t| !t.finished && t.begun && t.job_vmid() == Some(vmid))
    }

    fn begin_next_waiter(&mut self, vmid: u32, at: Instant) {
        if self.lock_holder(vmid).is_some() {
            return;
        }
        let next = self
            .tasks
            .values()
            .filter(|t| !t.finished && !t.begun && t.job_vmid() == Some(vmid))
            .min_by_key(|t| t.seq)
            .map(|t| t.upid.clone());
        if let Some(upid) = next {
            self.begin(&upid, at);
        }
    }

    /// Begins a waiting job at `at`: decides from the VM's state what it does.
    fn begin(&mut self, upid: &str, at: Instant) {
        let Some((node, (vmid, job))) = self
            .tasks
            .get(upid)
            .and_then(|t| Some((t.node.clone(), t.job.clone()?)))
        else {
            return;
        };
        let plan = self.plan(&node, vmid, &job);
        if let Some(t) = self.tasks.get_mut(upid) {
            t.begun = true;
            t.ends_at = at + plan.duration.min(MAX_SIM_WAIT);
            t.outcome = plan.outcome;
            t.warnings = plan.warnings;
            t.effect = plan.effect;
            t.log.extend(plan.log);
        }
    }

    /// What `job` does to `vmid` given the state right now (qemu-server's worker logic).
    fn plan(&mut self, node: &str, vmid: u32, job: &Job) -> Plan {
        let tm = self.timing.clone();
        let ms = Duration::from_millis;
        let vm = match self.vms.get_mut(&vmid) {
            Some(vm) if vm.node == node => vm,
            _ => return Plan::fail(QUICK, config_missing(node, vmid)),
        };
        let locked = vm.lock.clone().map(|l| format!("VM is locked ({l})"));
        match job {
            Job::Start => {
                if vm.template {
                    return Plan::fail(QUICK, "you can't start a vm if it's a template".into());
                }
                if let Some(e) = locked {
                    return Plan::fail(QUICK, e);
                }
                if vm.running {
                    return Plan::fail(QUICK, format!("VM {vmid} already running"));
                }
                let bridge = vm.net0_bridge();
                let mut plan = Plan::ok(
                    ms(tm.start_ms),
                    Effect::Started { vmid },
                    vec!["generating cloud-init ISO".to_string()],
                );
                if let Some(m) = self.faults.fail_next_start.take() {
                    plan.outcome = Err(m);
                } else if let Some(b) = bridge.filter(|b| !tm.bridges.contains(b)) {
                    plan.outcome = Err(format!("bridge '{b}' does not exist"));
                }
                plan
            }
            // A stopped VM: nothing to do, and no lock check (qemu-server returns first).
            Job::Stop { .. } | Job::Shutdown { .. } | Job::Reboot { .. } if !vm.running => {
                Plan::ok(QUICK, Effect::None, vec![])
            }
            Job::Stop { .. } | Job::Shutdown { .. } | Job::Reboot { .. } if locked.is_some() => {
                Plan::fail(QUICK, locked.unwrap_or_default())
            }
            Job::Stop { .. } => Plan::ok(ms(tm.stop_ms), Effect::Stopped { vmid }, vec![]),
            Job::Shutdown { timeout_s, force } => {
                let timeout = tm.secs(timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S));
                let takes = ms(tm.shutdown_ms);
                if !vm.ignore_acpi && takes <= timeout {
                    return Plan::ok(takes, Effect::Stopped { vmid }, vec![]);
                }
                if *force {
                    let mut p = Plan::ok(
                        timeout + ms(tm.stop_ms),
                        Effect::Stopped { vmid },
                        vec!["VM still running - terminating now with SIGTERM".into()],
                    );
                    p.warnings = 1;
                    p
                } else {
                    Plan::fail(timeout, "VM quit/powerdown failed - got timeout".into())
                }
            }
            Job::Reboot { timeout_s } => {
                let timeout = tm.secs(timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S));
                let takes = ms(tm.shutdown_ms);
                if !vm.ignore_acpi && takes <= timeout {
                    Plan::ok(takes + ms(tm.start_ms), Effect::Rebooted { vmid }, vec![])
                } else {
                    Plan::fail(timeout, "VM quit/powerdown failed - got timeout".into())
                }
            }
            Job::Destroy {
                purge,
                unreferenced,
            } => {
                if vm.protection {
                    return Plan::fail(
                        QUICK,
                        format!("can't remove VM {vmid} - protection mode enabled"),
                    );
                }
                if vm.running {
                    return Plan::fail(QUICK, format!("VM {vmid} is running - destroy failed"));
                }
                if let Some(e) = locked {
                    return Plan::fail(QUICK, e);
                }
                vm.lock = Some("destroyed".into());
                let mut log = vec![format!(
                    "  Logical volume \"vm-{vmid}-disk-0\" successfully removed."
                )];
                if *unreferenced {
                    log.push(format!(
                        "  Logical volume \"vm-{vmid}-cloudinit\" successfully removed."
                    ));
                }
                if *purge {
                    log.push(format!("purging VM {vmid} from related configurations.."));
                }
                Plan::ok(ms(tm.destroy_ms), Effect::Destroyed { vmid }, log)
            }
        }
    }

    /// Starts a lifecycle job on `vmid` and returns its UPID. It begins at once when no
    /// other job holds the VM's config lock, else when that one ends (or fails after
    /// [`CONFIG_LOCK_WAIT_S`]).
    pub fn spawn_job(
        &mut self,
        node: &str,
        kind: &str,
        vmid: u32,
        user: &str,
        job: Job,
        log: Vec<String>,
    ) -> String {
        let busy = self
            .tasks
            .values()
            .any(|t| !t.finished && t.job_vmid() == Some(vmid));
        let upid = self.spawn_task(
            node,
            kind,
            &vmid.to_string(),
            user,
            Duration::ZERO,
            Ok(()),
            Effect::None,
            log,
        );
        let deadline = Instant::now() + self.timing.secs(CONFIG_LOCK_WAIT_S);
        if let Some(t) = self.tasks.get_mut(&upid) {
            t.job = Some((vmid, job));
            t.begun = false;
            t.lock_deadline = deadline;
            t.ends_at = deadline;
        }
        if !busy {
            self.begin(&upid, Instant::now());
        }
        upid
    }

    /// Aborts the unfinished tasks of `kind` on `vmid` (like `overrule-shutdown`);
    /// returns their UPIDs.
    pub fn abort_tasks(&mut self, kind: &str, vmid: u32) -> Vec<String> {
        let now = Instant::now();
        let mut victims: Vec<(u64, String)> = self
            .tasks
            .values()
            .filter(|t| !t.finished && t.kind == kind && t.job_vmid() == Some(vmid))
            .map(|t| (t.seq, t.upid.clone()))
            .collect();
        victims.sort();
        for (_, upid) in &victims {
            if let Some(t) = self.tasks.get_mut(upid) {
                t.begun = true;
                t.ends_at = now;
                t.outcome = Err("received interrupt".into());
                t.warnings = 0;
                t.effect = Effect::None;
            }
            self.finish(upid);
        }
        self.begin_next_waiter(vmid, now);
        victims.into_iter().map(|(_, u)| u).collect()
    }

    /// A MAC in Proxmox's OUI (BC:24:11), unique within this simulator.
    pub fn new_mac(&mut self, vmid: u32) -> String {
        self.mac_counter += 1;
        let x =
            (vmid.wrapping_mul(2654435761) ^ self.mac_counter.wrapping_mul(40503)) & 0x00ff_ffff;
        format!(
            "BC:24:11:{:02X}:{:02X}:{:02X}",
            (x >> 16) & 0xff,
            (x >> 8) & 0xff,
            x & 0xff
        )
    }

    /// Starts a task and returns its UPID.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_task(
        &mut self,
        node: &str,
        kind: &str,
        id: &str,
        user: &str,
        duration: Duration,
        outcome: Result<(), String>,
        effect: Effect,
        log: Vec<String>,
    ) -> String {
        self.next_pid += 7;
        self.next_seq += 1;
        let pid = self.next_pid;
        let pstart = 0x0254_a1c3u32.wrapping_add(pid);
        let starttime = unix_now();
        let upid =
            format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
        self.tasks.insert(
            upid.clone(),
            Task {
                upid: upid.clone(),
                node: node.into(),
                kind: kind.into(),
                id: id.into(),
                user: user.into(),
                pid,
                pstart,
                starttime,
                ends_at: Instant::now() + duration.min(MAX_SIM_WAIT),
                outcome,
                warnings: 0,
                effect,
                log,
                finished: false,
                job: None,
                begun: true,
                lock_deadline: Instant::now(),
                seq: self.next_seq,
            },
        );
        upid
    }

    pub fn next_exec_pid(&mut self) -> u32 {
        self.next_exec_pid += 1;
        self.next_exec_pid
    }

    /// The VM `vmid` if it lives on `node`, else Proxmox's "does not exist" error text.
    pub fn vm_on(&self, node: &str, vmid: u32) -> Result<&Vm, String> {
        match self.vms.get(&vmid) {
            Some(vm) if vm.node == node => Ok(vm),
            _ => Err(config_missing(node, vmid)),
        }
    }

    pub fn vm_on_mut(&mut self, node: &str, vmid: u32) -> Result<&mut Vm, String> {
        match self.vms.get_mut(&vmid) {
            Some(vm) if vm.node == node => Ok(vm),
            _ => Err(config_missing(node, vmid)),
        }
    }

    pub fn task_views(&self) -> Vec<TaskView> {
        let mut v: Vec<_> = self
            .tasks
            .values()
            .map(|t| TaskView {
                upid: t.upid.clone(),
                kind: t.kind.clone(),
                id: t.id.clone(),
                status: if t.finished { "stopped" } else { "running" }.into(),
                exitstatus: t.exitstatus(),
            })
            .collect();
        v.sort_by(|a, b| a.upid.cmp(&b.upid));
        v
    }
}

pub fn config_missing(node: &str, vmid: u32) -> String {
    format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
}

/// Runs a guest command the way a tiny shell would: `a && b && c` of `echo TEXT`,
/// `echo TEXT >&2`, `exit N`, `true`, `false`, `sleep SECS`, `hostname`; anything else
/// succeeds silently. Returns (exit code, stdout, stderr, extra run time).
pub fn run_guest_command(argv: &[String], hostname: &str) -> (i32, String, String, Duration) {
    let script = match argv {
        [sh, flag, script] if sh.ends_with("sh") && flag == "-c" => script.clone(),
        _ => argv.join(" "),
    };
    let (mut out, mut err, mut extra) = (String::new(), String::new(), Duration::ZERO);
    for part in script.split("&&").map(str::trim) {
        let code = if part == "true" || part.is_empty() {
            0
        } else if part == "false" {
            1
        } else if part == "hostname" {
            out.push_str(hostname);
            out.push('\n');
            0
        } else if let Some(n) = part.strip_prefix("exit") {
            return (n.trim().parse().unwrap_or(0), out, err, extra);
        } else if let Some(s) = part.strip_prefix("sleep ") {
            let secs = s.trim().parse::<f64>().unwrap_or(0.0);
            if secs.is_finite() {
                extra += Duration::from_secs_f64(secs.clamp(0.0, 3600.0));
            }
            0
        } else if let Some(text) = part.strip_prefix("echo ") {
            let (text, to_err) = match text
                .strip_suffix(">&2")
                .or_else(|| text.strip_suffix("1>&2"))
            {
                Some(t) => (t.trim_end(), true),
                None => (text, false),
            };
            let text = text.trim_matches(|c| c == '"' || c == '\'');
            let target = if to_err { &mut err } else { &mut out };
            target.push_str(text);
            target.push('\n');
            0
        } else {
            0
        };
        if code != 0 {
            return (code, out, err, extra);
        }
    }
    (0, out, err, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_shell() {
        let argv = |s: &str| vec!["/bin/sh".to_string(), "-c".to_string(), s.to_string()];
        let (c, o, e, _) = run_guest_command(&argv("echo hi && echo oops >&2 && exit 3"), "h");
        assert_eq!((c, o.as_str(), e.as_str()), (3, "hi\n", "oops\n"));
        let (c, _, _, _) = run_guest_command(&argv("true && false && echo never"), "h");
        assert_eq!(c, 1);
    }
}
