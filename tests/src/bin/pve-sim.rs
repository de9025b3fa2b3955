//! `pve-sim`: the Proxmox VE API simulator. See `trellis_tests::pve_sim` for what it
//! serves. Prints `pve-sim listening on ADDR` as its first line (and, with `--tls`,
//! `pve-sim tls fingerprint AA:BB:…`), then serves until SIGINT/SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use trellis_tests::pve_sim::{self, Burst, Faults, Sim, SimConfig};

#[derive(Parser, Debug)]
#[command(name = "pve-sim", about = "Proxmox VE API simulator for Trellis tests")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8006")]
    listen: String,
    /// API token id the simulator accepts (`USER@REALM!TOKENID`).
    #[arg(long, default_value = pve_sim::DEFAULT_TOKEN_ID)]
    token_id: String,
    /// API token secret the simulator accepts.
    #[arg(long, default_value = pve_sim::DEFAULT_TOKEN_SECRET)]
    token_secret: String,
    /// Delay before answering a failed authentication (Proxmox: 3000).
    #[arg(long, default_value_t = 3000)]
    auth_fail_delay_ms: u64,
    /// How long a (linked) clone task runs; full clones take three times as long.
    #[arg(long, default_value_t = 1500)]
    clone_ms: u64,
    #[arg(long, default_value_t = 1000)]
    start_ms: u64,
    #[arg(long, default_value_t = 400)]
    stop_ms: u64,
    #[arg(long, default_value_t = 400)]
    destroy_ms: u64,
    /// Time after boot until the guest agent answers.
    #[arg(long, default_value_t = 4000)]
    agent_boot_ms: u64,
    /// How long a guest command runs.
    #[arg(long, default_value_t = 100)]
    exec_ms: u64,
    /// Error bodies without `message` (pre-2025 servers): text only in the reason phrase.
    #[arg(long)]
    legacy_errors: bool,
    /// Serve HTTPS with a certificate generated at start (prints its fingerprint).
    #[arg(long)]
    tls: bool,
    /// With --tls: write the cluster CA certificate (PEM) to this file.
    #[arg(long)]
    tls_ca_out: Option<PathBuf>,
    /// Fault: the next clone task fails with this message.
    #[arg(long)]
    fault_fail_next_clone: Option<String>,
    /// Fault: the next start task fails with this message.
    #[arg(long)]
    fault_fail_next_start: Option<String>,
    /// Fault: guest agents never come up.
    #[arg(long)]
    fault_agent_never_up: bool,
    /// Fault: answer the next N API requests with --fault-burst-status.
    #[arg(long, default_value_t = 0)]
    fault_burst: u32,
    #[arg(long, default_value_t = 596)]
    fault_burst_status: u16,
    /// Fault: only requests whose path contains this count toward the burst.
    #[arg(long)]
    fault_burst_path: Option<String>,
    /// Fault: delay every API response by this many ms.
    #[arg(long, default_value_t = 0)]
    fault_slow_ms: u64,
    /// Fault: the next N clones find their VMID just taken by someone else.
    #[arg(long, default_value_t = 0)]
    fault_steal_ids: u32,
    /// Fault: deny every API request with 403.
    #[arg(long)]
    fault_forbidden: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let config = SimConfig {
        token_id: a.token_id,
        token_secret: a.token_secret,
        auth_fail_delay: Duration::from_millis(a.auth_fail_delay_ms),
        clone_ms: a.clone_ms,
        start_ms: a.start_ms,
        stop_ms: a.stop_ms,
        destroy_ms: a.destroy_ms,
        agent_boot_ms: a.agent_boot_ms,
        exec_ms: a.exec_ms,
        legacy_errors: a.legacy_errors,
        faults: Faults {
            fail_next_clone: a.fault_fail_next_clone,
            fail_next_start: a.fault_fail_next_start,
            agent_never_up: a.fault_agent_never_up,
            burst: (a.fault_burst > 0).then_some(Burst {
                count: a.fault_burst,
                status: a.fault_burst_status,
                path_contains: a.fault_burst_path,
            }),
            slow_ms: a.fault_slow_ms,
            steal_next_ids: a.fault_steal_ids,
            forbidden: a.fault_forbidden,
        },
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    let addr = listener.local_addr()?;
    let tls = if a.tls {
        Some(pve_sim::tls::generate(&["localhost", "pve1", "127.0.0.1"])?)
    } else {
        None
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "pve-sim listening on {addr}")?;
        if let Some(t) = &tls {
            if let Some(path) = &a.tls_ca_out {
                std::fs::write(path, &t.ca_pem)?;
            }
            writeln!(out, "pve-sim tls fingerprint {}", t.fingerprint)?;
        }
        writeln!(
            out,
            "pve-sim api {}://{addr}/api2/json token {}",
            if a.tls { "https" } else { "http" },
            config.token_id
        )?;
        out.flush()?;
    }
    let sim = Arc::new(Sim::new(config));
    let shutdown = async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    };
    pve_sim::serve(listener, sim, tls.as_ref(), shutdown).await?;
    Ok(())
}
