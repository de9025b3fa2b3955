//! Starts the real `pve-sim` binary for a test and talks to its control API.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::state::{Faults, TaskView, VmView};

/// A running `pve-sim` process, killed on drop.
pub struct SimProcess {
    child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `http://…` or `https://…` (no `/api2/json`).
    pub url: String,
    /// With `--tls`: the leaf certificate's SHA-256 fingerprint.
    pub fingerprint: Option<String>,
    /// With `--tls`: the cluster CA (PEM), also written to `ca_file`.
    pub ca_file: Option<std::path::PathBuf>,
    http: reqwest::Client,
}

impl SimProcess {
    /// Starts `bin` with `--listen 127.0.0.1:0` and `args`, and waits for it to print its
    /// address (and, with `--tls`, its fingerprint).
    pub async fn start(bin: &str, args: &[&str]) -> anyhow::Result<Self> {
        let tls = args.contains(&"--tls");
        let ca_file = tls
            .then(|| std::env::temp_dir().join(format!("pve-sim-ca-{}.pem", uuid::Uuid::new_v4())));
        let mut cmd = Command::new(bin);
        cmd.arg("--listen").arg("127.0.0.1:0").args(args);
        if let Some(ca) = &ca_file {
            cmd.arg("--tls-ca-out").arg(ca);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        let mut fingerprint = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while addr.is_none() || (tls && fingerprint.is_none()) {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .context("pve-sim did not print its address in time")??
                .context("pve-sim exited before printing its address")?;
            if let Some(a) = line.strip_prefix("pve-sim listening on ") {
                addr = Some(a.trim().to_string());
            } else if let Some(f) = line.strip_prefix("pve-sim tls fingerprint ") {
                fingerprint = Some(f.trim().to_string());
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = addr.context("no address")?;
        let url = format!("{}://{addr}", if tls { "https" } else { "http" });
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            child,
            addr,
            url,
            fingerprint,
            ca_file,
            http,
        })
    }

    async fn control<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .http
            .get(format!("{}/_sim/{path}", self.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn vms(&self) -> anyhow::Result<Vec<VmView>> {
        self.control("vms").await
    }

    /// VMs that are neither templates nor seeded nor foreign, i.e. made by the agent.
    pub async fn created_vms(&self) -> anyhow::Result<Vec<VmView>> {
        Ok(self
            .vms()
            .await?
            .into_iter()
            .filter(|v| !v.template && !v.foreign && v.vmid != 100)
            .collect())
    }

    /// The clone, config and resize requests the simulator received whose path contains
    /// `path_contains` (see `GET /_sim/requests`).
    pub async fn requests(
        &self,
        path_contains: &str,
    ) -> anyhow::Result<Vec<super::RecordedRequest>> {
        Ok(self
            .http
            .get(format!("{}/_sim/requests", self.url))
            .query(&[("path_contains", path_contains)])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn tasks(&self) -> anyhow::Result<Vec<TaskView>> {
        self.control("tasks").await
    }

    pub async fn faults(&self) -> anyhow::Result<Faults> {
        self.control("faults").await
    }

    pub async fn stats(&self) -> anyhow::Result<serde_json::Value> {
        self.control("stats").await
    }

    pub async fn set_faults(&self, faults: &Faults) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_sim/faults", self.url))
            .json(faults)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Starts or stops a VM at once, behind the back of whoever manages it.
    pub async fn set_running(&self, vmid: u32, running: bool) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_sim/vms/{vmid}/power", self.url))
            .json(&serde_json::json!({ "running": running }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Deletes a VM at once, behind the back of whoever manages it.
    pub async fn delete_vm(&self, vmid: u32) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/_sim/vms/{vmid}", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Sets per-VM flags (`ignore_acpi`, `protection`).
    pub async fn set_flags(&self, vmid: u32, flags: serde_json::Value) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_sim/vms/{vmid}/flags", self.url))
            .json(&flags)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Calls the Proxmox API itself with the default token (`PUT`/`POST` form bodies).
    pub async fn pve(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> anyhow::Result<serde_json::Value> {
        Ok(self
            .http
            .request(method, format!("{}/api2/json{path}", self.url))
            .header(
                "authorization",
                format!(
                    "PVEAPIToken={}={}",
                    super::DEFAULT_TOKEN_ID,
                    super::DEFAULT_TOKEN_SECRET
                ),
            )
            .form(form)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if let Some(ca) = &self.ca_file {
            let _ = std::fs::remove_file(ca);
        }
    }
}
