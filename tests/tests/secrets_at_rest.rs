//! Sensitive Terraform variables at rest, against the real `trellis` binary and a raw
//! agent, on SQLite and PostgreSQL: the stored row never holds a sensitive value in clear
//! (queued, after the end, and for a retry), the agent receives the real values in its
//! dispatch, the generated key file is 0600, the values stay encrypted after the command
//! ends so a retry still works, and a control plane with another key fails the command
//! at dispatch with `secrets_undecryptable` (never sent, no panic) and refuses its retry
//! with `409 secrets_undecryptable`.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::Connection;
use trellis_tests::db::Backend;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::raw_agent::RawAgent;

/// The stored `commands.params` of `id`, as text, read straight from the database.
async fn stored_params(db_url: &str, id: &str) -> String {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(db_url).await.unwrap();
    let text: String = sqlx::query_scalar("SELECT params FROM commands WHERE id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    text
}

async fn agent(cp: &ControlPlane, token: &str) -> RawAgent {
    let mut ws = RawAgent::connect(&cp.ws_url(), token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "secrets", "hostname": "secrets",
        "capabilities": ["terraform_apply", "ping"], "max_concurrency": 1}),
    )
    .await;
    ws.read_until("welcome").await;
    ws
}

/// Reads frames until the dispatch of `cid`; returns it parsed.
async fn dispatch_of(ws: &mut RawAgent, cid: &str) -> Value {
    loop {
        let t = ws.read_until("\"dispatch\"").await;
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["command_id"] == cid {
            return v;
        }
    }
}

/// Accepts and fails `cid` (retryable) from the agent.
async fn fail(ws: &mut RawAgent, api: &Api, cid: &str) {
    ws.send(json!({"type": "accept", "command_id": cid})).await;
    ws.send(
        json!({"type": "events", "events": [{"command_id": cid, "seq": 1, "ts": 1,
        "kind": "finished", "status": "failed", "result": null,
        "error": {"code": "apply_failed", "message": "boom", "retryable": true}}]}),
    )
    .await;
    let c = api.wait_done(cid, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "failed", "{c}");
}

async fn retry(api: &Api, cid: &str) -> (u16, Value) {
    api.call(
        reqwest::Method::POST,
        &format!("/api/commands/{cid}/retry"),
        None,
    )
    .await
}

fn assert_sealed(what: &str, stored: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!stored.contains(s), "{what}: plaintext {s:?} in {stored}");
    }
    let v: Value = serde_json::from_str(stored).unwrap();
    let vars = &v["terraform_vars"];
    for k in ["db_password", "extra"] {
        let enc = vars[k]["$enc"].as_str().unwrap_or_default();
        assert!(
            enc.starts_with("v1:"),
            "{what}: {k} not encrypted: {stored}"
        );
    }
    assert_eq!(
        vars["region"], "eu-west",
        "{what}: non-sensitive values stay readable"
    );
}

async fn sensitive_params_are_encrypted_at_rest(backend: Backend) {
    let (_dir, mut cp, api) = control_plane(backend, "secrets").await;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let nested = format!("nested-{}", uuid::Uuid::new_v4().simple());
    let git_token = format!("glpat-{}", uuid::Uuid::new_v4().simple());
    let secrets = [password.as_str(), nested.as_str(), git_token.as_str()];
    let repo = format!("https://deploy:{git_token}@git.example.com/infra.git");

    // The key was generated on first start, beside the database, owner-only.
    let key_file = cp.dir.join("secrets.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key_file.display());
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .unwrap()
            .len(),
        32
    );
    assert!(!cp.log().contains(key.trim()), "the key is never logged");

    let (agent_id, token) = api.create_agent("tf").await;
    let params = json!({
        "template_source": {"repo": repo, "version": "main"},
        "terraform_vars": {"db_password": password, "extra": {"inner": nested}, "region": "eu-west"},
        "sensitive_vars": ["extra"],
    });
    let body = json!({"agentId": agent_id, "type": "terraform_apply", "params": params,
                      "idempotencyKey": "secrets-1"});
    let first = api.command_with(body.clone()).await;

    // Queued: the row holds ciphertext only; the API shows ***.
    let queued = stored_params(&cp.db_url, &first).await;
    assert_sealed("queued", &queued, &secrets);
    let shown = api.get(&format!("/api/commands/{first}")).await;
    assert_eq!(shown["params"]["terraform_vars"]["db_password"], "***");
    assert_eq!(shown["params"]["terraform_vars"]["extra"], "***");
    assert_eq!(
        shown["params"]["template_source"]["repo"],
        "https://deploy:***@git.example.com/infra.git"
    );
    let listed = api.get(&format!("/api/commands?agentId={agent_id}")).await;
    for (what, v) in [("single", &shown), ("list", &listed)] {
        let text = v.to_string();
        assert!(
            !text.contains(&password) && !text.contains(&nested) && !text.contains("$enc"),
            "{what}: {text}"
        );
    }
    // The same idempotent request answers with the same command (compared decrypted);
    // other secret values are another request.
    assert_eq!(api.command_with(body.clone()).await, first);
    let mut changed = body.clone();
    changed["params"]["terraform_vars"]["db_password"] = json!("something-else");
    let (s, v) = api
        .call(reqwest::Method::POST, "/api/commands", Some(changed))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{v}"
    );

    // The agent receives the real values.
    let mut ws = agent(&cp, &token).await;
    let d = dispatch_of(&mut ws, &first).await;
    assert_eq!(
        d["params"]["terraform_vars"]["db_password"],
        password.as_str(),
        "{d}"
    );
    assert_eq!(
        d["params"]["terraform_vars"]["extra"],
        json!({"inner": nested}),
        "{d}"
    );
    assert_eq!(d["params"]["terraform_vars"]["region"], "eu-west");
    assert_eq!(d["params"]["template_source"]["repo"], repo.as_str(), "{d}");
    fail(&mut ws, &api, &first).await;

    // Ended: still encrypted (kept until retention), never in clear.
    let ended = stored_params(&cp.db_url, &first).await;
    assert_sealed("ended", &ended, &secrets);
    assert_eq!(ended, queued, "the row is not rewritten");

    // A retry is sealed again with fresh nonces and dispatches the real values.
    let (s, r) = retry(&api, &first).await;
    assert_eq!(s, 202, "{r}");
    let second = r["commandId"].as_str().unwrap().to_string();
    assert!(!r.to_string().contains(&password), "{r}");
    let retried = stored_params(&cp.db_url, &second).await;
    assert_sealed("retry", &retried, &secrets);
    let enc = |t: &str| {
        let v: Value = serde_json::from_str(t).unwrap();
        v["terraform_vars"]["db_password"]["$enc"].clone()
    };
    assert_ne!(enc(&retried), enc(&queued), "a fresh nonce per value");
    let d = dispatch_of(&mut ws, &second).await;
    assert_eq!(
        d["params"]["terraform_vars"]["db_password"],
        password.as_str(),
        "{d}"
    );
    assert_eq!(
        d["params"]["terraform_vars"]["extra"],
        json!({"inner": nested})
    );
    fail(&mut ws, &api, &second).await;
    drop(ws);
    api.wait_until(Duration::from_secs(10), || async {
        api.get(&format!("/api/agents/{agent_id}")).await["status"] == "offline"
    })
    .await;

    // One more, queued while the agent is away; then the control plane comes back with
    // another key.
    let third = api
        .command(&agent_id, "terraform_apply", params.clone())
        .await;
    let other = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    cp.restart_with(&[("TRELLIS_SECRETS_KEY", other.as_str())])
        .await;
    let api = cp.api();

    // Its retry is refused with a clear reason.
    let (s, v) = retry(&api, &second).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "secrets_undecryptable", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("submit the command again"), "{msg}");
    assert!(!msg.contains(&password), "{msg}");

    // At dispatch: the command fails, is never sent, and the agent's slot goes on to the
    // next command.
    let mut ws = agent(&cp, &token).await;
    let c = api.wait_done(&third, Duration::from_secs(10)).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["code"], "secrets_undecryptable", "{c}");
    let msg = c["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("TRELLIS_SECRETS_KEY or secrets.key changed") && msg.contains("was not sent"),
        "{msg}"
    );
    let ping = api.command(&agent_id, "ping", json!({})).await;
    let started = Instant::now();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("frame");
        let t = m.to_text().unwrap_or_default().to_string();
        assert!(
            !t.contains(&third),
            "the undecryptable command was sent: {t}"
        );
        assert!(!t.contains(&password), "{t}");
        if t.contains("\"dispatch\"") && t.contains(&ping) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let log = cp.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("secrets_undecryptable") || log.contains("cannot decrypt"),
        "{log}"
    );
    drop(ws);

    // Back with the key file's key: the retry works again.
    cp.restart_with(&[]).await;
    let (s, r) = retry(&cp.api(), &second).await;
    assert_eq!(s, 202, "{r}");

    // A row an earlier version stored in clear is encrypted at the next start (once).
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&cp.db_url).await.unwrap();
    sqlx::query("UPDATE commands SET params = $1 WHERE id = $2")
        .bind(params.to_string())
        .bind(&third)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM settings WHERE key = 'secrets_sealed_v2'")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert!(stored_params(&cp.db_url, &third).await.contains(&password));
    cp.restart_with(&[]).await;
    assert_sealed("legacy", &stored_params(&cp.db_url, &third).await, &secrets);
    assert!(
        cp.log().contains("encrypted the sensitive values"),
        "{}",
        cp.log()
    );
}
on_both_backends!(encrypted_at_rest, sensitive_params_are_encrypted_at_rest);

/// A malformed `TRELLIS_SECRETS_KEY` stops the control plane at start with a clear error.
#[tokio::test]
async fn malformed_env_key_is_refused_at_start() {
    let dir = trellis_tests::tempdir::TempDir::new("badkey");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin("trellis"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db])
            .env("TRELLIS_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TRELLIS_SECRETS_KEY", "not-a-key")
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .output(),
    )
    .await
    .expect("trellis exits")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TRELLIS_SECRETS_KEY"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.path().join("secrets.key").exists());
}
