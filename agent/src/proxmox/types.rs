//! Shapes of the Proxmox VE API answers the agent reads, parsed leniently: Proxmox sends
//! numbers as strings and booleans as `0/1` depending on the call and version, and adds
//! fields freely.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A number given as a JSON number or a numeric string.
pub fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok().map(|f| f.max(0.0) as u64),
        _ => None,
    })
}

/// A boolean given as `true/false`, `0/1` or `"0"/"1"`.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Bool(b)) => b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => matches!(s.trim(), "1" | "true" | "yes" | "on"),
        _ => false,
    })
}

/// A string given as a string or a number (`nextid` answers either).
pub fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// One item of `GET /cluster/resources?type=vm`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterResource {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub vmid: Option<u64>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub template: bool,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub maxcpu: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub maxdisk: Option<u64>,
    #[serde(default)]
    pub lock: Option<String>,
    /// Proxmox tags, `a;b` (absent when the VM has none).
    #[serde(default)]
    pub tags: Option<String>,
}

impl ClusterResource {
    pub fn vmid(&self) -> Option<u32> {
        self.vmid.and_then(|v| u32::try_from(v).ok()).or_else(|| {
            self.id
                .split_once('/')
                .and_then(|(_, n)| n.parse::<u32>().ok())
        })
    }

    pub fn is_qemu(&self) -> bool {
        self.kind == "qemu" || self.id.starts_with("qemu/")
    }
}

/// `GET /nodes/{node}/tasks/{upid}/status`.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskStatus {
    pub status: String,
    #[serde(default)]
    pub exitstatus: Option<String>,
}

impl TaskStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }

    /// `OK` and `WARNINGS: N` are successes; anything else is the error text.
    pub fn failure(&self) -> Option<String> {
        match self.exitstatus.as_deref() {
            Some("OK") => None,
            Some(s) if s.starts_with("WARNINGS") => None,
            Some(s) => Some(s.to_string()),
            None => Some("task ended without an exit status".into()),
        }
    }
}

/// `GET /nodes/{node}/tasks/{upid}/log` items.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskLogLine {
    #[serde(default, deserialize_with = "lenient_u64")]
    pub n: Option<u64>,
    #[serde(default)]
    pub t: String,
}

/// `GET /nodes/{node}/qemu/{vmid}/status/current`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmStatus {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub lock: Option<String>,
    /// Present (1) when the guest agent is enabled in the config.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub agent: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub template: bool,
    /// QEMU's own view (`running`, `paused`, `prelaunch`…), finer than `status`.
    #[serde(default)]
    pub qmpstatus: Option<String>,
}

impl VmStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

/// `GET …/config`: kept as a map (every key is optional and types vary).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct VmConfig(pub BTreeMap<String, Value>);

impl VmConfig {
    /// The key of a cloud-init drive (`ide2: local-lvm:vm-100-cloudinit,media=cdrom`): an
    /// `ide*`, `sata*` or `scsi*` drive whose volume names `cloudinit`.
    pub fn cloudinit_drive(&self) -> Option<&str> {
        self.0.iter().find_map(|(k, v)| {
            let bus = ["ide", "sata", "scsi"].iter().any(|b| {
                k.strip_prefix(b)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
            });
            let volume = v.as_str()?.split(',').next()?;
            (bus && volume.contains("cloudinit")).then_some(k.as_str())
        })
    }

    pub fn get_str(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    pub fn description(&self) -> Option<String> {
        self.get_str("description")
    }

    pub fn lock(&self) -> Option<String> {
        self.get_str("lock")
    }

    pub fn net0(&self) -> Option<Net0> {
        self.get_str("net0").map(|s| Net0::parse(&s))
    }

    /// `agent` is `1` or a property string like `enabled=1,fstrim_cloned_disks=1`.
    pub fn agent_enabled(&self) -> bool {
        self.get_str("agent").is_some_and(|a| property_enabled(&a))
    }
}

pub fn property_enabled(v: &str) -> bool {
    v.split(',')
        .map(str::trim)
        .any(|kv| kv == "1" || kv == "enabled=1" || kv == "enabled=true")
}

pub const NIC_MODELS: [&str; 5] = ["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"];

/// A `net0` property string: `virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net0 {
    pub model: String,
    pub mac: Option<String>,
    pub bridge: Option<String>,
    /// Every other `key=value` option, in order.
    pub rest: Vec<String>,
}

impl Net0 {
    pub fn parse(s: &str) -> Self {
        let mut n = Net0 {
            model: "virtio".into(),
            mac: None,
            bridge: None,
            rest: Vec::new(),
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if NIC_MODELS.contains(&k) {
                n.model = k.into();
                if !v.is_empty() {
                    n.mac = Some(v.into());
                }
            } else if k == "model" {
                n.model = v.into();
            } else if k == "macaddr" {
                n.mac = Some(v.into());
            } else if k == "bridge" {
                n.bridge = Some(v.into());
            } else {
                n.rest.push(part.into());
            }
        }
        n
    }

    /// Renders it back, keeping the MAC (so the guest's NIC and DHCP lease stay).
    pub fn render(&self) -> String {
        let mut parts = vec![match &self.mac {
            Some(m) => format!("{}={m}", self.model),
            None => self.model.clone(),
        }];
        if let Some(b) = &self.bridge {
            parts.push(format!("bridge={b}"));
        }
        parts.extend(self.rest.iter().cloned());
        parts.join(",")
    }
}

/// `GET …/agent/network-get-interfaces` → `data.result[]`.
#[derive(Debug, Clone, Deserialize)]
pub struct GuestInterfaces {
    #[serde(default)]
    pub result: Vec<GuestInterface>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GuestInterface {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<GuestIp>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GuestIp {
    #[serde(rename = "ip-address", default)]
    pub address: String,
    #[serde(rename = "ip-address-type", default)]
    pub kind: String,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub prefix: Option<u64>,
}

/// Interface names of container and virtual bridges inside the guest, whose addresses are
/// not how anyone reaches the VM.
const VIRTUAL_IFACE_PREFIXES: [&str; 9] = [
    "docker", "br-", "veth", "cni", "flannel", "virbr", "lxcbr", "podman", "cali",
];

/// A global unicast IPv4 address that is not loopback, link-local, unspecified,
/// multicast or broadcast.
pub fn is_usable_ipv4(ip: Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast())
}

/// The VM's address: a usable IPv4 on the interface whose MAC matches `net0` when there
/// is one; otherwise the first usable IPv4 on a non-virtual interface; otherwise on any
/// interface except `lo`. Returns the address and the interface name.
pub fn pick_ipv4(ifaces: &[GuestInterface], net0_mac: Option<&str>) -> Option<(Ipv4Addr, String)> {
    let usable = |iface: &GuestInterface| -> Option<Ipv4Addr> {
        iface
            .ip_addresses
            .iter()
            .filter(|a| a.kind.eq_ignore_ascii_case("ipv4"))
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .find(|ip| is_usable_ipv4(*ip))
    };
    let candidates = || ifaces.iter().filter(|i| i.name != "lo");
    if let Some(mac) = net0_mac {
        let hit = candidates().find(|i| {
            i.hardware_address
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(mac))
        });
        if let Some(i) = hit {
            if let Some(ip) = usable(i) {
                return Some((ip, i.name.clone()));
            }
        }
    }
    let is_virtual =
        |i: &GuestInterface| VIRTUAL_IFACE_PREFIXES.iter().any(|p| i.name.starts_with(p));
    candidates()
        .filter(|i| !is_virtual(i))
        .chain(candidates().filter(|i| is_virtual(i)))
        .find_map(|i| usable(i).map(|ip| (ip, i.name.clone())))
}

/// `GET …/agent/exec-status?pid=`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecStatus {
    #[serde(default, deserialize_with = "lenient_bool")]
    pub exited: bool,
    #[serde(default)]
    pub exitcode: Option<i64>,
    #[serde(default)]
    pub signal: Option<i64>,
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
    #[serde(rename = "out-truncated", default, deserialize_with = "lenient_bool")]
    pub out_truncated: bool,
    #[serde(rename = "err-truncated", default, deserialize_with = "lenient_bool")]
    pub err_truncated: bool,
}

/// `POST …/agent/exec` → `{pid}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecStarted {
    #[serde(deserialize_with = "lenient_u64")]
    pub pid: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cloudinit_drive() {
        let cfg = |v: serde_json::Value| VmConfig(serde_json::from_value(v).unwrap());
        let with = cfg(serde_json::json!({
            "scsi0": "local-lvm:vm-101-disk-0,size=10G",
            "ide2": "local-lvm:vm-101-cloudinit,media=cdrom",
        }));
        assert_eq!(with.cloudinit_drive(), Some("ide2"));
        let sata = cfg(serde_json::json!({"sata1": "ceph:vm-7-cloudinit,media=cdrom"}));
        assert_eq!(sata.cloudinit_drive(), Some("sata1"));
        let without = cfg(serde_json::json!({
            "scsi0": "local-lvm:vm-101-disk-0,size=10G",
            "ide2": "none,media=cdrom",
            "description": "cloudinit mentioned here is not a drive",
            "scsihw": "virtio-scsi-cloudinit",
        }));
        assert_eq!(without.cloudinit_drive(), None);
    }

    /// The answer of a real PVE 8 guest agent, abridged: `lo`, a docker bridge, then the
    /// NIC with its IPv6 link-local before the IPv4.
    const IFACES: &str = r#"{"result":[
      {"name":"lo","hardware-address":"00:00:00:00:00:00","ip-addresses":[
        {"ip-address":"127.0.0.1","ip-address-type":"ipv4","prefix":8},
        {"ip-address":"::1","ip-address-type":"ipv6","prefix":128}],
       "statistics":{"rx-bytes":100,"rx-dropped":0}},
      {"name":"docker0","hardware-address":"02:42:8e:1a:7c:01","ip-addresses":[
        {"ip-address":"172.17.0.1","ip-address-type":"ipv4","prefix":16}]},
      {"name":"ens18","hardware-address":"bc:24:11:5e:77:01","ip-addresses":[
        {"ip-address":"fe80::be24:11ff:fe5e:7701","ip-address-type":"ipv6","prefix":64},
        {"ip-address":"169.254.10.1","ip-address-type":"ipv4","prefix":16},
        {"ip-address":"10.20.0.101","ip-address-type":"ipv4","prefix":16}]}]}"#;

    #[test]
    fn picks_ipv4_on_net0_mac() {
        let ifs: GuestInterfaces = serde_json::from_str(IFACES).unwrap();
        let (ip, name) = pick_ipv4(&ifs.result, Some("BC:24:11:5E:77:01")).unwrap();
        assert_eq!(ip.to_string(), "10.20.0.101");
        assert_eq!(name, "ens18");
    }

    #[test]
    fn without_mac_skips_lo_link_local_and_bridges() {
        let ifs: GuestInterfaces = serde_json::from_str(IFACES).unwrap();
        let (ip, _) = pick_ipv4(&ifs.result, None).unwrap();
        assert_eq!(ip.to_string(), "10.20.0.101");
        // A MAC that matches nothing falls back the same way.
        let (ip, _) = pick_ipv4(&ifs.result, Some("00:11:22:33:44:55")).unwrap();
        assert_eq!(ip.to_string(), "10.20.0.101");
    }

    #[test]
    fn only_loopback_and_link_local_is_none() {
        let ifs: GuestInterfaces = serde_json::from_str(
            r#"{"result":[{"name":"lo","ip-addresses":[{"ip-address":"127.0.0.1","ip-address-type":"ipv4"}]},
            {"name":"eth0","ip-addresses":[{"ip-address":"fe80::1","ip-address-type":"ipv6"},
            {"ip-address":"169.254.3.4","ip-address-type":"ipv4"}]},
            {"name":"eth1"}]}"#,
        )
        .unwrap();
        assert_eq!(pick_ipv4(&ifs.result, None), None);
        assert!(pick_ipv4(&[], None).is_none());
    }

    #[test]
    fn net0_round_trip_keeps_mac() {
        let mut n = Net0::parse("virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1,tag=20");
        assert_eq!(n.mac.as_deref(), Some("BC:24:11:AA:BB:CC"));
        assert_eq!(n.bridge.as_deref(), Some("vmbr0"));
        n.bridge = Some("vmbr1".into());
        assert_eq!(
            n.render(),
            "virtio=BC:24:11:AA:BB:CC,bridge=vmbr1,firewall=1,tag=20"
        );
        let m = Net0::parse("model=e1000,macaddr=aa:bb:cc:dd:ee:ff,bridge=vmbr2");
        assert_eq!(m.render(), "e1000=aa:bb:cc:dd:ee:ff,bridge=vmbr2");
    }

    #[test]
    fn lenient_fields() {
        let r: Vec<ClusterResource> = serde_json::from_str(
            r#"[{"id":"qemu/9000","type":"qemu","vmid":9000,"node":"pve1","name":"t","template":1,
                 "maxmem":2147483648,"maxcpu":2,"maxdisk":"10737418240"},
                {"id":"qemu/101","type":"qemu","vmid":101,"node":"pve1","status":"unknown"},
                {"id":"lxc/102","type":"lxc","vmid":"102","template":0}]"#,
        )
        .unwrap();
        assert!(r[0].template && r[0].is_qemu());
        assert_eq!(r[0].maxdisk, Some(10 << 30));
        assert!(!r[1].template && r[1].name.is_none());
        assert_eq!(r[2].vmid(), Some(102));
        assert!(!r[2].is_qemu());
        let e: ExecStatus =
            serde_json::from_str(r#"{"exited":1,"exitcode":3,"out-data":"hi\n"}"#).unwrap();
        assert!(e.exited && e.exitcode == Some(3));
        let e: ExecStatus = serde_json::from_str(r#"{"exited":false}"#).unwrap();
        assert!(!e.exited);
        let s: VmStatus =
            serde_json::from_str(r#"{"status":"running","agent":1,"lock":"clone"}"#).unwrap();
        assert!(s.agent && s.is_running() && s.lock.as_deref() == Some("clone"));
        let t: TaskStatus =
            serde_json::from_str(r#"{"status":"stopped","exitstatus":"WARNINGS: 2"}"#).unwrap();
        assert_eq!(t.failure(), None);
        let t: TaskStatus = serde_json::from_str(
            r#"{"status":"stopped","exitstatus":"clone failed: storage full"}"#,
        )
        .unwrap();
        assert_eq!(t.failure().as_deref(), Some("clone failed: storage full"));
    }
}
