//! Credentials bind live sessions: a token rotated or an agent revoked by the CLI — another
//! process, writing only to the database — closes the live session within one heartbeat
//! interval (`token_rotated` / `revoked`), through the credential version each session
//! compares once per interval; no clock is involved. The new token connects.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::raw_agent::RawAgent;

/// A heartbeat timeout of 3 s: agents are told to heartbeat every second, and sessions
/// check their credentials as often.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

async fn hello(cp: &ControlPlane, token: &str) -> RawAgent {
    let mut ws = RawAgent::connect(&cp.ws_url(), token).await;
    ws.send(json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "cred", "hostname": "cred", "capabilities": ["ping"], "max_concurrency": 1}))
        .await;
    let w = ws.read_until("welcome").await;
    let w: Value = serde_json::from_str(&w).unwrap();
    assert_eq!(w["heartbeat_interval_secs"], 1, "{w}");
    ws
}

/// Heartbeats every 200 ms (so the session is never idle) until the server closes;
/// returns the error codes it sent and how long after `since` the close came.
async fn until_closed(ws: &mut RawAgent, since: Instant) -> (Vec<String>, Duration) {
    let mut codes = Vec::new();
    loop {
        let _ = ws
            .try_send_text(json!({"type": "heartbeat", "running": 0}).to_string())
            .await;
        match tokio::time::timeout(Duration::from_millis(200), ws.ws.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "error" {
                    codes.push(v["code"].as_str().unwrap_or_default().to_string());
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                return (codes, since.elapsed())
            }
            Ok(Some(Ok(_))) => {}
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "the session was never closed"
        );
    }
}

/// Runs the real `trellis` CLI against the database; returns its stdout.
fn cli(cp: &ControlPlane, args: &[&str]) -> String {
    // In the control plane's directory: its data dir, where the credentials key is.
    let out = std::process::Command::new(bin("trellis"))
        .args(args)
        .args(["--database-url", &cp.db_url])
        .current_dir(&cp.dir)
        .output()
        .expect("run trellis");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn cli_rotate_and_revoke_close_live_sessions(backend: Backend) {
    let dir = TempDir::new("cred");
    let db = TestDb::create(backend, &dir).await;
    let cp = ControlPlane::start_with(
        db,
        &dir,
        "127.0.0.1:0",
        &[("TRELLIS_HEARTBEAT_TIMEOUT_SECS", "3")],
    )
    .await;
    let api = cp.api();
    let (id, token) = api.create_agent("rotating").await;
    let mut ws = hello(&cp, &token).await;
    // Let a credential check or two pass: an unchanged version keeps the session.
    tokio::time::sleep(2 * HEARTBEAT_INTERVAL).await;

    let since = Instant::now();
    let out = cli(&cp, &["agents", "rotate-token", &id]);
    let cli_took = since.elapsed();
    let new_token = out
        .lines()
        .find_map(|l| l.strip_prefix("new token: "))
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .to_string();
    let (codes, took) = until_closed(&mut ws, since).await;
    assert_eq!(codes, vec!["token_rotated".to_string()]);
    let after_cli = took.saturating_sub(cli_took);
    println!(
        "{backend:?}: rotation by the CLI closed the session {after_cli:?} after the CLI returned"
    );
    // Within one heartbeat interval (plus the 500 ms reaper tick it rounds to and slack).
    assert!(
        after_cli <= HEARTBEAT_INTERVAL + Duration::from_millis(1000),
        "{after_cli:?}"
    );
    assert!(trellis_tests::raw_agent::connect(&cp.ws_url(), &token)
        .await
        .is_err());
    let mut ws = hello(&cp, &new_token).await;
    tokio::time::sleep(2 * HEARTBEAT_INTERVAL).await;
    api.wait_agent_online(&id).await;

    let since = Instant::now();
    cli(&cp, &["agents", "revoke", &id]);
    let cli_took = since.elapsed();
    let (codes, took) = until_closed(&mut ws, since).await;
    assert_eq!(codes, vec!["revoked".to_string()]);
    let after_cli = took.saturating_sub(cli_took);
    assert!(
        after_cli <= HEARTBEAT_INTERVAL + Duration::from_millis(1000),
        "{after_cli:?}"
    );
    assert!(trellis_tests::raw_agent::connect(&cp.ws_url(), &new_token)
        .await
        .is_err());
}
on_both_backends!(
    cli_rotate_and_revoke_close_live_sessions_,
    cli_rotate_and_revoke_close_live_sessions
);
