//! Agent configuration: the command line and environment (`tendril --help` lists every
//! variable), secrets hidden from `Debug`.
//!
//! The executors declare their own settings and flags ([`ProxmoxArgs`],
//! [`TerraformArgs`]); this module gathers them into one CLI and one [`AgentConfig`], and
//! is the only place that knows them all. Executors never import it.

use std::path::PathBuf;

use clap::Parser;

use crate::proxmox::{ProxmoxArgs, ProxmoxSettings};
use crate::secret::Secret;
use crate::terraform::{TerraformArgs, TerraformSettings};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The `tendril` command line; every option can also be set by its environment variable.
#[derive(Parser, Debug)]
#[command(
    name = "tendril",
    version,
    about = "Trellis agent: dials the control plane and runs Proxmox and Terraform commands"
)]
pub struct Cli {
    /// Log lines as text (no colours unless stderr is a terminal) or JSON (for log shippers).
    #[arg(long, env = "TENDRIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Control plane agent endpoint, `wss://…/api/agents/connect` (`ws://` only to a
    /// loopback host, unless --insecure-plaintext). Several control plane replicas (or load
    /// balancers): comma-separated, or the flag repeated; tendril holds one session at a
    /// time and moves to the next URL after a failed connect or a lost session (with the
    /// usual jittered backoff). One URL of a load balancer in front of the replicas is
    /// enough.
    #[arg(
        long = "server",
        env = "TENDRIL_SERVER_URL",
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        required = true
    )]
    pub server: Vec<String>,
    /// Allow `ws://` (no TLS) to a host that is not loopback. The token and every
    /// dispatched command (Terraform secrets included) then travel in clear, and anyone on
    /// the path can make this agent run commands: use only on a network you trust.
    #[arg(
        long,
        env = "TENDRIL_INSECURE_PLAINTEXT",
        value_name = "true|false",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub insecure_plaintext: bool,
    /// This agent's token (from `trellis agents create` or the UI).
    #[arg(long, env = "TENDRIL_TOKEN", hide_env_values = true)]
    pub token: Secret,
    /// Where the journal and command workspaces live.
    #[arg(long, env = "TENDRIL_WORK_DIR", default_value = "./tendril-work")]
    pub work_dir: PathBuf,
    /// How many commands run at once.
    #[arg(long, env = "TENDRIL_MAX_CONCURRENCY", default_value_t = 4)]
    pub max_concurrency: u32,
    /// Extra CA certificate (PEM) to trust for a `wss://` control plane.
    #[arg(long, env = "TENDRIL_SERVER_CA_FILE")]
    pub server_ca_file: Option<PathBuf>,
    /// The control plane's dispatch-signing public key(s), base64, comma-separated (from
    /// the trellis log line "dispatch signing key" or the registration command). Pins
    /// them, replacing `<work dir>/server-keys`; without it the first key the control
    /// plane advertises is pinned (trust on first use). Once pinned, unsigned commands and
    /// commands signed by another key are refused (`signature_invalid`). Give the old and
    /// the new key during a key rotation.
    #[arg(long, env = "TENDRIL_SERVER_PUBLIC_KEY", value_delimiter = ',')]
    pub server_public_key: Vec<String>,
    /// Name reported to the control plane (default: the machine's hostname).
    #[arg(long, env = "TENDRIL_HOSTNAME")]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub proxmox: ProxmoxArgs,
    #[command(flatten)]
    pub terraform: TerraformArgs,
}

impl Cli {
    /// Checks the values and fills in the defaults that need a look at the machine.
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        let server_urls: Vec<String> = self
            .server
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if server_urls.is_empty() {
            anyhow::bail!(
                "--server needs at least one ws:// or wss:// URL ending in /api/agents/connect"
            );
        }
        for url in &server_urls {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                anyhow::bail!(
                    "--server must be a ws:// or wss:// URL ending in /api/agents/connect (got {url})"
                );
            }
            check_transport(url, self.insecure_plaintext)?;
        }
        let hostname = self.hostname.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        });
        let server_public_keys = self
            .server_public_key
            .iter()
            .filter(|k| !k.trim().is_empty())
            .map(|k| {
                trellis_protocol::signing::PublicKey::from_base64(k)
                    .map_err(|e| anyhow::anyhow!("--server-public-key: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(AgentConfig {
            server_public_keys,
            server_urls,
            insecure_plaintext: self.insecure_plaintext,
            token: self.token,
            work_dir: self.work_dir,
            max_concurrency: self.max_concurrency.max(1),
            hostname,
            server_ca_file: self.server_ca_file,
            proxmox: self.proxmox.into_settings()?,
            terraform: self.terraform.into_settings()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `ws://` or `wss://…/api/agents/connect`: one or more (never empty), tried in turn.
    pub server_urls: Vec<String>,
    /// `ws://` to a host that is not loopback was allowed (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    pub token: Secret,
    pub work_dir: PathBuf,
    pub max_concurrency: u32,
    pub hostname: String,
    /// Extra CA certificate (PEM) to trust for `wss://` besides the web PKI roots.
    pub server_ca_file: Option<PathBuf>,
    /// Control plane signing keys to pin (`--server-public-key`); empty: keep the pinned
    /// ones, or trust the first advertised key.
    pub server_public_keys: Vec<trellis_protocol::signing::PublicKey>,
    /// `None` when Proxmox is not configured: the agent then does not advertise
    /// `provision` or `list_templates`.
    pub proxmox: Option<ProxmoxSettings>,
    pub terraform: TerraformSettings,
}

/// Refuses `ws://` to a host that is not loopback unless `insecure_plaintext`: over plain
/// WebSocket the agent's token and every dispatched command (Terraform secrets, and a
/// `terraform_apply` is code execution on this host) can be read and forged by anyone on
/// the path. `wss://` is always accepted; so is `ws://` to 127.0.0.0/8, `::1` or
/// `localhost` (a control plane on the same host, or a local TLS-terminating proxy).
pub fn check_transport(server_url: &str, insecure_plaintext: bool) -> anyhow::Result<()> {
    let Some(rest) = server_url.strip_prefix("ws://") else {
        return Ok(());
    };
    if insecure_plaintext {
        return Ok(());
    }
    let host = url_host(rest);
    if is_loopback_host(&host) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing ws://{host}: plain ws:// to a host that is not loopback would send the agent \
         token and every command in clear; use wss://, or pass --insecure-plaintext \
         (TENDRIL_INSECURE_PLAINTEXT=true) to allow it on a trusted network"
    )
}

/// The host of a URL after its `scheme://`: without user info, port and path; an IPv6
/// literal without its brackets.
fn url_host(after_scheme: &str) -> String {
    let authority = after_scheme
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.to_ascii_lowercase()
}

/// 127.0.0.0/8, `::1` (also as an IPv4-mapped 127.x), or the name `localhost`. Other
/// names are not resolved: a name that points at 127.0.0.1 today may not tomorrow.
fn is_loopback_host(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host == "localhost" {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(std::net::IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// Creates `dir` (and its parents) if missing and makes it 0700: the work dir holds the
/// journal and Terraform workspaces (templates, plans, secrets while a command runs).
/// An existing directory with wider permissions is narrowed, and said so.
pub fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create work dir {}: {e}", dir.display()))?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            anyhow::anyhow!("cannot make work dir {} private (0700): {e}", dir.display())
        })?;
        tracing::info!(dir = %dir.display(), from = format!("{mode:o}"), "work dir made 0700");
    }
    Ok(())
}

/// The TLS connector for `wss://` URLs: the web PKI roots plus an optional extra CA
/// (`TENDRIL_SERVER_CA_FILE`), for control planes behind a private CA.
pub fn tls_connector(config: &AgentConfig) -> anyhow::Result<Option<tokio_tungstenite::Connector>> {
    let Some(ca) = &config.server_ca_file else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let pem = std::fs::read(ca)
        .map_err(|e| anyhow::anyhow!("cannot read server CA file {}: {e}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_tungstenite::Connector::Rustls(
        std::sync::Arc::new(tls),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_lists_every_environment_variable() {
        let help = Cli::command().render_long_help().to_string();
        for var in [
            "TENDRIL_SERVER_URL",
            "TENDRIL_TOKEN",
            "TENDRIL_WORK_DIR",
            "TENDRIL_MAX_CONCURRENCY",
            "TENDRIL_SERVER_CA_FILE",
            "TENDRIL_HOSTNAME",
            "TENDRIL_INSECURE_PLAINTEXT",
            "PROXMOX_URL",
            "PROXMOX_TOKEN_ID",
            "PROXMOX_TOKEN_SECRET",
            "PROXMOX_TLS_FINGERPRINT",
            "PROXMOX_CA_FILE",
            "PROXMOX_INSECURE_TLS",
            "PROXMOX_TIMEOUT_SECS",
            "PROXMOX_TASK_TIMEOUT_SECS",
            "PROXMOX_COMMAND_TIMEOUT_SECS",
            "PROXMOX_MAX_PARALLEL_CLONES",
            "TENDRIL_TERRAFORM_BIN",
            "TENDRIL_TERRAFORM_PLUGIN_DIR",
            "TENDRIL_GIT_BIN",
            "TENDRIL_TERRAFORM_LOG_CAP_BYTES",
            "TENDRIL_TERRAFORM_RETENTION_SECS",
            "TENDRIL_TERRAFORM_SIGINT_GRACE_MS",
        ] {
            assert!(
                help.contains(&format!("env: {var}")),
                "{var} missing from --help:\n{help}"
            );
        }
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_build_the_config_and_secrets_stay_hidden() {
        let cli = Cli::try_parse_from([
            "tendril",
            "--server",
            "ws://127.0.0.1:9/api/agents/connect",
            "--token",
            "agent-token-value",
            "--hostname",
            "h1",
            "--proxmox-url",
            "https://pve:8006",
            "--proxmox-token-id",
            "root@pam!trellis",
            "--proxmox-token-secret",
            "pve-secret-value",
            "--terraform-sigint-grace-ms",
            "250",
        ])
        .unwrap();
        let config = cli.into_config().unwrap();
        assert_eq!(config.token.expose(), "agent-token-value");
        let proxmox = config.proxmox.as_ref().unwrap();
        assert_eq!(proxmox.token_secret.expose(), "pve-secret-value");
        assert_eq!(
            config.terraform.sigint_grace,
            std::time::Duration::from_millis(250)
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("agent-token-value") && !shown.contains("pve-secret-value"),
            "{shown}"
        );

        let bad = Cli::try_parse_from(["tendril", "--server", "http://x", "--token", "t"])
            .unwrap()
            .into_config();
        assert!(bad.is_err());
    }

    #[test]
    fn several_servers_comma_separated_or_repeated_each_checked() {
        let parse = |args: &[&str]| {
            let mut all = vec!["tendril", "--token", "t"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().into_config()
        };
        let a = "ws://127.0.0.1:1/api/agents/connect";
        let b = "wss://cp2.example/api/agents/connect";
        let comma = parse(&["--server", &format!("{a}, {b},")]).unwrap();
        assert_eq!(comma.server_urls, vec![a.to_string(), b.to_string()]);
        let repeated = parse(&["--server", a, "--server", b]).unwrap();
        assert_eq!(repeated.server_urls, comma.server_urls);
        // Every URL goes through the same checks.
        let e = parse(&["--server", &format!("{a},ws://10.0.0.5/api/agents/connect")])
            .expect_err("plain ws:// to another host")
            .to_string();
        assert!(e.contains("--insecure-plaintext"), "{e}");
        assert!(parse(&["--server", &format!("{a},http://x/")]).is_err());
        assert!(parse(&["--server", " , "]).is_err());
        assert!(Cli::try_parse_from(["tendril", "--token", "t"]).is_err());
    }

    #[test]
    fn plain_ws_only_to_loopback_unless_allowed() {
        let parse = |url: &str, flag: Option<&str>| {
            let mut args = vec!["tendril", "--server", url, "--token", "t"];
            if let Some(f) = flag {
                args.push(f);
            }
            Cli::try_parse_from(args).unwrap().into_config()
        };
        for ok in [
            "ws://127.0.0.1:8080/api/agents/connect",
            "ws://127.9.8.7/api/agents/connect",
            "ws://[::1]:8080/api/agents/connect",
            "ws://[::ffff:127.0.0.1]:1/api/agents/connect",
            "ws://localhost:8080/api/agents/connect",
            "ws://LocalHost./api/agents/connect",
            "wss://trellis.example/api/agents/connect",
            "wss://10.0.0.5:8443/api/agents/connect",
        ] {
            assert!(parse(ok, None).is_ok(), "{ok} refused");
        }
        for refused in [
            "ws://10.0.0.5:8080/api/agents/connect",
            "ws://trellis.example/api/agents/connect",
            "ws://localhost.evil.example/api/agents/connect",
            "ws://127.0.0.1.nip.io/api/agents/connect",
            "ws://[2001:db8::1]:8080/api/agents/connect",
            "ws://127.0.0.1@10.0.0.5/api/agents/connect",
            "ws://0.0.0.0:8080/api/agents/connect",
        ] {
            let e = parse(refused, None).expect_err(refused).to_string();
            assert!(
                e.contains("--insecure-plaintext") && e.contains("wss://") && !e.contains('\n'),
                "{e}"
            );
            let config = parse(refused, Some("--insecure-plaintext")).expect(refused);
            assert!(config.insecure_plaintext);
        }
        assert!(parse("ws://10.0.0.5/x", Some("--insecure-plaintext=false")).is_err());
    }
}
