//! Credential hashes are keyed with `<data dir>/credentials.key` (0600), which lives
//! outside the database: a row planted in the database with a plain SHA-256 token hash (an
//! admin, the bootstrap token's hash) authenticates nothing. Hashes an earlier version
//! stored unkeyed are converted once, at the first start without the `credentials.keyed`
//! marker; a hash planted after that is never converted. The `trellis admins|agents`
//! commands hash with the same key.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;
use sha2::Digest;
use sqlx::Connection;
use trellis_tests::harness::*;

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

async fn sql(db_url: &str, statement: &str, binds: &[&str]) {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(db_url).await.unwrap();
    let mut q = sqlx::query(statement);
    for b in binds {
        q = q.bind(*b);
    }
    q.execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

async fn status_with(cp: &ControlPlane, token: &str) -> u16 {
    reqwest::Client::new()
        .get(cp.url("/api/nodes"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn cli(cp: &ControlPlane, args: &[&str]) -> String {
    let out = std::process::Command::new(bin("trellis"))
        .args(args)
        .args(["--database-url", &cp.db_url])
        .current_dir(&cp.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_credential_hashes_authenticate_nothing() {
    let (dir, mut cp, api) = control_plane(Backend::Sqlite, "cred-keyed").await;
    let key = dir.join("credentials.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(dir.join("credentials.keyed").exists());

    // A named admin made by the CLI (same key) works; its stored hash is keyed.
    let out = cli(&cp, &["admins", "create", "alice"]);
    let alice = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(status_with(&cp, &alice).await, 200);

    // An admin planted with a plain SHA-256 of a token of the attacker's choosing: refused.
    let planted = "trl_admin_planted-by-someone-with-database-access";
    sql(
        &cp.db_url,
        "INSERT INTO admins (id, name, token_hash, created_at) VALUES ('x', 'mallory', $1, 0)",
        &[&sha256_hex(planted)],
    )
    .await;
    assert_eq!(status_with(&cp, planted).await, 401);
    // Nor does a planted bootstrap hash (it is read at start).
    sql(
        &cp.db_url,
        "INSERT INTO settings (key, value) VALUES ('admin_token_hash', $1)",
        &[&sha256_hex(planted)],
    )
    .await;
    cp.restart_with(&[("TRELLIS_ADMIN_TOKEN", "")]).await;
    assert_eq!(status_with(&cp, planted).await, 401);
    assert_eq!(status_with(&cp, &alice).await, 200);
    cp.restart_with(&[]).await;

    // An installation upgraded from before keying: its hashes are plain SHA-256 and the
    // marker is absent; the first start converts them once, so old tokens keep working.
    sql(
        &cp.db_url,
        "UPDATE admins SET token_hash = $1 WHERE name = 'alice'",
        &[&sha256_hex(&alice)],
    )
    .await;
    let (agent_id, agent_token) = api.create_agent("legacy").await;
    sql(
        &cp.db_url,
        "UPDATE agents SET token_hash = $1 WHERE id = $2",
        &[&sha256_hex(&agent_token), &agent_id],
    )
    .await;
    std::fs::remove_file(dir.join("credentials.keyed")).unwrap();
    cp.restart_with(&[]).await;
    assert!(
        cp.log().contains("keyed the credential hashes"),
        "{}",
        cp.log()
    );
    assert!(dir.join("credentials.keyed").exists());
    assert_eq!(status_with(&cp, &alice).await, 200);
    let api = cp.api();
    let _agent = Agent::start(&cp.ws_url(), &agent_token, &dir.join("work"));
    api.wait_agent_online(&agent_id).await;
    let c = api.command(&agent_id, "ping", json!({})).await;
    assert_eq!(
        api.wait_done(&c, Duration::from_secs(20)).await["status"],
        "succeeded"
    );

    // After that, a planted plain hash stays planted: never converted, never accepted.
    sql(
        &cp.db_url,
        "UPDATE admins SET token_hash = $1 WHERE name = 'mallory'",
        &[&sha256_hex(planted)],
    )
    .await;
    cp.restart_with(&[]).await;
    assert_eq!(status_with(&cp, planted).await, 401);
    assert_eq!(status_with(&cp, &alice).await, 200);
}
