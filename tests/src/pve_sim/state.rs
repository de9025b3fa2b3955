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
    pub destroy_ms: u64,
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
            destroy_ms: 400,
            agent_boot_ms: 4000,
            exec_ms: 100,
            legacy_errors: false,
            seeds: default_seeds(),
            bridges: vec!["vmbr0".into(), "vmbr1".into()],
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
        }
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
}

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
    CloneDone { newid: u32 },
    Started { vmid: u32 },
    Stopped { vmid: u32 },
    Destroyed { vmid: u32 },
}

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
    /// `Ok(())` → `OK`, `Err(text)` → that exit status.
    pub outcome: Result<(), String>,
    pub effect: Effect,
    pub log: Vec<String>,
    pub finished: bool,
}

impl Task {
    pub fn exitstatus(&self) -> Option<String> {
        self.finished.then(|| match &self.outcome {
            Ok(()) => "OK".to_string(),
            Err(e) => e.clone(),
        })
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
    pub requests: u64,
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
            requests: 0,
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
                    ]),
                    execs: HashMap::new(),
                    foreign: false,
                    generation: 0,
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
    /// Finishes every task whose time has come, in the order they end.
    pub fn advance(&mut self, now: Instant) {
        let mut due: Vec<(Instant, String)> = self
            .tasks
            .values()
            .filter(|t| !t.finished && t.ends_at <= now)
            .map(|t| (t.ends_at, t.upid.clone()))
            .collect();
        due.sort();
        for (_, upid) in due {
            let Some(task) = self.tasks.get_mut(&upid) else {
                continue;
            };
            task.finished = true;
            let ok = task.outcome.is_ok();
            match &task.outcome {
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
                Effect::Started { vmid } => {
                    if let (true, Some(vm)) = (ok, self.vms.get_mut(&vmid)) {
                        vm.running = true;
                        vm.booted_at = Some(ends_at);
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
                effect,
                log,
                finished: false,
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
