//! The real `tendril` binary and its transport rule: plain `ws://` only to a loopback
//! host. A `ws://` URL to any other host is refused at start, before any connection,
//! with one line saying why and how to allow it; `--insecure-plaintext` (or
//! `TENDRIL_INSECURE_PLAINTEXT=true`) lets it dial anyway (a listener on a non-loopback
//! address of this machine sees the upgrade request, token in clear — the reason for
//! the rule); loopback `ws://` (what every other test uses) dials without the flag. The
//! work dir is made 0700.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use trellis_tests::harness::bin;
use trellis_tests::tempdir::TempDir;

const TOKEN: &str = "transport-test-token-42";

fn tendril(server: &str, work: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(bin("tendril"));
    cmd.args(["--server", server, "--token", TOKEN, "--hostname", "t"])
        .arg("--work-dir")
        .arg(work)
        .args(extra)
        .env_remove("TENDRIL_INSECURE_PLAINTEXT")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start tendril")
}

/// Waits (at most `within`) for the process to exit; its status and stderr.
fn wait_exit(mut child: Child, within: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tendril still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// This machine's address on its default route, when it has one that is not loopback.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// The first request bytes a connection to `listener` brings, within `within`.
async fn first_request(listener: &TcpListener, within: Duration) -> Option<String> {
    let (mut sock, _) = tokio::time::timeout(within, listener.accept())
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn plain_ws_to_a_remote_host_is_refused_at_start() {
    let work = TempDir::new("transport");
    // Refused before any connection: for a name (never resolved) and for an address
    // where something listens.
    let ip = non_loopback_ip();
    let listener = match ip {
        Some(ip) => Some(TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap()),
        None => None,
    };
    let mut urls = vec!["ws://trellis.invalid:8080/api/agents/connect".to_string()];
    if let Some(l) = &listener {
        urls.push(format!(
            "ws://{}/api/agents/connect",
            l.local_addr().unwrap()
        ));
    }
    for url in &urls {
        let started = Instant::now();
        let (status, stderr) = wait_exit(
            tendril(url, &work.join("a"), &[], &[]),
            Duration::from_secs(10),
        );
        assert!(!status.success(), "{url}: {status}\n{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line, not {lines:?}");
        let line = lines[0];
        for part in [
            "refusing ws://",
            "not loopback",
            "in clear",
            "wss://",
            "--insecure-plaintext",
        ] {
            assert!(line.contains(part), "{part:?} missing: {line}");
        }
        assert!(!line.contains(TOKEN), "{line}");
        assert!(started.elapsed() < Duration::from_secs(5), "slow refusal");
    }
    if let Some(l) = &listener {
        assert!(
            first_request(l, Duration::from_millis(300)).await.is_none(),
            "a refused agent connected anyway"
        );
    }
}

#[tokio::test]
async fn insecure_plaintext_lets_it_dial_a_remote_host() {
    let work = TempDir::new("transport");
    // A name that never resolves: the agent gets past the check and tries to connect.
    let dir = work.join("flag");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = tendril(
        "ws://trellis.invalid:8080/api/agents/connect",
        &dir,
        &["--insecure-plaintext"],
        &[],
    );
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            match std::io::Read::read(&mut stderr, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
            if all.contains("cannot connect to control plane") {
                break;
            }
        }
        all
    });
    let log = reader.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("--insecure-plaintext"), "no warning:\n{log}");
    assert!(log.contains("cannot connect to control plane"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700,
        "work dir not made private"
    );

    // The environment variable does the same; on a non-loopback address of this
    // machine the listener sees the upgrade request with the token in clear.
    if let Some(ip) = non_loopback_ip() {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let url = format!("ws://{}/api/agents/connect", listener.local_addr().unwrap());
        let mut child = tendril(
            &url,
            &work.join("env"),
            &[],
            &[("TENDRIL_INSECURE_PLAINTEXT", "true")],
        );
        let req = first_request(&listener, Duration::from_secs(15)).await;
        let _ = child.kill();
        let _ = child.wait();
        let req = req.expect("the agent did not dial");
        assert!(req.starts_with("GET /api/agents/connect"), "{req}");
        assert!(req.contains(TOKEN), "{req}");
    }
}

#[tokio::test]
async fn plain_ws_to_loopback_needs_no_flag() {
    let work = TempDir::new("transport");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("ws://{host}:{port}/api/agents/connect");
        let mut child = tendril(&url, &work.join(host), &[], &[]);
        let req = first_request(&listener, Duration::from_secs(15)).await;
        let _ = child.kill();
        let _ = child.wait();
        let req = req.unwrap_or_else(|| panic!("{url}: the agent did not dial"));
        assert!(req.starts_with("GET /api/agents/connect"), "{req}");
    }
}
