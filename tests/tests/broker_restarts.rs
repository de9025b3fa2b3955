//! Processes that die or are stopped mid-command, with the real `trellis` and `tendril`:
//! an agent killed (the command fails, retryable) or sent SIGTERM (it ends its commands
//! cleanly), and the control plane killed or sent SIGTERM while events stream (nothing
//! is lost once it is back), on SQLite and PostgreSQL.

use std::time::Duration;

use serde_json::json;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;

async fn agent_killed_mid_command(backend: Backend) {
    let (dir, cp, api) = control_plane(backend, "agentkill").await;
    let (id, token) = api.create_agent("crashy").await;
    let mut agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command(&id, "ping", json!({"log_lines": 60, "duration_ms": 6000}))
        .await;
    api.wait_last_seq(&cid, 5).await;
    agent.kill();
    agent.restart();
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "agent_lost_command");
    assert_eq!(c["error"]["retryable"], true);
    let logs = api.all_logs(&cid).await;
    let n = logs.len();
    assert!(n >= 5, "events before the kill are kept");
    assert_lines_once(&logs, n);
    // the restarted agent keeps working
    api.wait_agent_online(&id).await;
    let again = api.command(&id, "ping", json!({})).await;
    assert_eq!(
        api.wait_done(&again, Duration::from_secs(20)).await["status"],
        "succeeded"
    );
}
on_both_backends!(agent_sigkill, agent_killed_mid_command);

async fn control_plane_restart_loses_nothing(backend: Backend) {
    restart_mid_stream(backend, false).await;
}
on_both_backends!(trellis_restart, control_plane_restart_loses_nothing);

async fn control_plane_sigterm_is_prompt_and_loses_nothing(backend: Backend) {
    restart_mid_stream(backend, true).await;
}
on_both_backends!(
    trellis_sigterm,
    control_plane_sigterm_is_prompt_and_loses_nothing
);

async fn restart_mid_stream(backend: Backend, graceful: bool) {
    let (dir, mut cp, api) = control_plane(backend, "cprestart").await;
    let (id, token) = api.create_agent("steady").await;
    let _agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command(&id, "ping", json!({"log_lines": 150, "duration_ms": 4500}))
        .await;
    api.wait_last_seq(&cid, 20).await;
    if graceful {
        // SIGTERM: sessions close, the writer drains what they sent, and it is quick
        let (status, took) = cp.terminate();
        assert!(status.success(), "trellis exits 0 on SIGTERM: {status:?}");
        assert!(took < Duration::from_secs(5), "graceful stop took {took:?}");
    } else {
        cp.kill();
    }
    // events keep being produced (and journaled) while the control plane is down
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cp.restart().await;
    let api = cp.api();
    let c = api.wait_done(&cid, Duration::from_secs(60)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_lines_once(&api.all_logs(&cid).await, 150);
    assert_eq!(c["lastSeq"], 151, "150 logs + finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_ends_running_commands_cleanly() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "sigterm").await;
    let (id, token) = api.create_agent("polite").await;
    let mut agent = Agent::start(&cp.ws_url(), &token, &dir.join("agent"));
    api.wait_agent_online(&id).await;
    let cid = api
        .command(&id, "ping", json!({"log_lines": 100, "duration_ms": 20000}))
        .await;
    api.wait_last_seq(&cid, 2).await;
    let status = agent.terminate();
    assert!(status.success(), "tendril exits 0 on SIGTERM: {status:?}");
    let c = api.wait_done(&cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "agent_shutdown");
    assert_eq!(c["error"]["retryable"], true);
}
