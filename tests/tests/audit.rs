//! Named admins, the audit log and cookie sign-in, end to end: the real `trellis` binary
//! (its `admins` CLI on the same database), a real `tendril` and the Proxmox VE API
//! simulator. A named admin's name is `createdBy` on its commands and the actor of its
//! audit rows; a revoked admin's token is refused; the session cookie works like the
//! token, carries `HttpOnly` and `SameSite=Strict`, ends at sign-out and at expiry.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Connection;
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;

const FAST: &[&str] = &[
    "--clone-ms",
    "200",
    "--start-ms",
    "100",
    "--stop-ms",
    "100",
    "--destroy-ms",
    "200",
    "--agent-boot-ms",
    "200",
    "--exec-ms",
    "50",
];

/// Runs `trellis <args> --database-url <db>`; returns stdout.
fn cli(cp: &ControlPlane, args: &[&str]) -> String {
    // In the control plane's directory: its data dir, where the credentials key is.
    let out = std::process::Command::new(bin("trellis"))
        .args(args)
        .args(["--database-url", &cp.db_url])
        .current_dir(&cp.dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run trellis");
    assert!(
        out.status.success(),
        "trellis {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn create_admin(cp: &ControlPlane, name: &str) -> String {
    let out = cli(cp, &["admins", "create", name]);
    out.lines()
        .find_map(|l| l.strip_prefix("token:"))
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|| panic!("no token in {out}"))
}

async fn audit(api: &Api, query: &str) -> Vec<Value> {
    api.get(&format!("/api/audit?{query}")).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn named_admin_actions(backend: Backend) {
    let s = proxmox_stack(backend, "audit-named", FAST, &[]).await;
    let token = create_admin(&s.cp, "alice");
    assert!(token.starts_with("trl_admin_"), "{token}");
    let alice = Api {
        token: token.clone(),
        ..s.api.clone()
    };
    assert_eq!(alice.get("/api/session").await["name"], "alice");

    // templates
    let t = alice
        .post(
            "/api/templates",
            json!({"name": "audit-t", "memory": 1024, "cores": 1, "proxmoxTemplateId": 9000,
                   "networkBridge": "vmbr0"}),
        )
        .await;
    let tid = t["id"].as_str().unwrap().to_string();
    let (st, _) = alice
        .call(
            Method::PUT,
            &format!("/api/templates/{tid}"),
            Some(
                json!({"name": "audit-t2", "memory": 1024, "cores": 2, "proxmoxTemplateId": 9000,
                        "networkBridge": "vmbr0"}),
            ),
        )
        .await;
    assert_eq!(st, 200);

    // node create + provision, power, destroy
    let v = alice
        .post(
            "/api/nodes",
            json!({"name": "aud-1", "templateId": tid, "provision": {"agentId": s.agent_id}}),
        )
        .await;
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let c = alice
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["createdBy"], "alice", "{c}");
    let v = alice
        .post(
            &format!("/api/nodes/{node}/power"),
            json!({"action": "stop"}),
        )
        .await;
    let c = alice
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(c["createdBy"], "alice", "{c}");
    let v = alice
        .post(
            &format!("/api/nodes/{node}/destroy"),
            json!({"confirmName": "aud-1"}),
        )
        .await;
    let c = alice
        .wait_done(v["commandId"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["createdBy"], "alice");

    // a second node: provision it, fail the provision by cancelling, retry it
    let v = alice
        .post("/api/nodes", json!({"name": "aud-2", "templateId": tid}))
        .await;
    let node2 = v["node"]["id"].as_str().unwrap().to_string();
    let (st, v) = alice
        .call(
            Method::PUT,
            &format!("/api/nodes/{node2}"),
            Some(json!({"application": "shop"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let forgotten = alice
        .post("/api/nodes", json!({"name": "aud-3", "templateId": tid}))
        .await["node"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    alice
        .post(&format!("/api/nodes/{forgotten}/forget"), json!({}))
        .await;
    let (st, _) = alice
        .call(Method::DELETE, &format!("/api/nodes/{node2}"), None)
        .await;
    assert_eq!(st, 204);

    // a direct command, cancelled and retried
    let cid = alice
        .command(
            &s.agent_id,
            "ping",
            json!({"duration_ms": 60000, "log_lines": 10}),
        )
        .await;
    alice
        .call(Method::POST, &format!("/api/commands/{cid}/cancel"), None)
        .await;
    let c = alice.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "cancelled", "{c}");
    assert_eq!(c["createdBy"], "alice");
    let r = alice
        .post(&format!("/api/commands/{cid}/retry"), json!({}))
        .await;
    let retry = r["commandId"].as_str().unwrap().to_string();
    let c = alice.get(&format!("/api/commands/{retry}")).await;
    assert_eq!(c["createdBy"], "alice", "{c}");
    alice
        .call(Method::POST, &format!("/api/commands/{retry}/cancel"), None)
        .await;

    // agents
    let (aid, _) = alice.create_agent("audit-agent").await;
    alice
        .post(&format!("/api/agents/{aid}/rotate-token"), json!({}))
        .await;
    let (st, _) = alice
        .call(Method::DELETE, &format!("/api/agents/{aid}"), None)
        .await;
    assert!(st < 300, "{st}");
    // (the template of a kept node record cannot be deleted: use another)
    let spare = alice
        .post(
            "/api/templates",
            json!({"name": "audit-spare", "memory": 1024, "cores": 1}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, _) = alice
        .call(Method::DELETE, &format!("/api/templates/{spare}"), None)
        .await;
    assert_eq!(st, 204);

    // a failed sign-in, a wrong token, an action refused
    let http = reqwest::Client::new();
    let r = http
        .post(s.cp.url("/api/session"))
        .json(&json!({"token": "trl_admin_wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let bad = Api {
        token: "trl_admin_nope".into(),
        ..s.api.clone()
    };
    let (st, _) = bad
        .call(Method::POST, "/api/templates", Some(json!({})))
        .await;
    assert_eq!(st, 401);
    let (st, _) = alice
        .call(
            Method::POST,
            &format!("/api/nodes/{node}/power"),
            Some(json!({"action": "start"})),
        )
        .await;
    assert_eq!(st, 409, "a destroyed node has no VM to power");

    let rows = audit(&s.api, "actor=alice&limit=500").await;
    let actions: BTreeSet<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    for a in [
        "template.create",
        "template.update",
        "template.delete",
        "node.create",
        "node.update",
        "node.delete",
        "node.power",
        "node.destroy",
        "node.forget",
        "command.create",
        "command.cancel",
        "command.retry",
        "agent.create",
        "agent.rotate_token",
        "agent.revoke",
    ] {
        assert!(actions.contains(a), "no {a} in {actions:?}");
    }
    assert!(rows.iter().all(|r| r["actor"] == "alice"));
    // targets: ids from the path or the handler, names where the handler knows them
    let create = rows
        .iter()
        .find(|r| r["action"] == "node.create" && r["targetName"] == "aud-1")
        .expect("node.create of aud-1");
    assert_eq!(create["targetId"], json!(node));
    assert_eq!(create["targetType"], "node");
    assert_eq!(create["outcome"], "success");
    assert_eq!(create["status"], 201);
    assert_eq!(create["remoteAddr"], "127.0.0.1");
    assert!(create["details"]["commandId"].is_string(), "{create}");
    let power = rows
        .iter()
        .filter(|r| r["action"] == "node.power")
        .collect::<Vec<_>>();
    assert!(power
        .iter()
        .any(|r| r["outcome"] == "success" && r["targetName"] == "aud-1"));
    let refused = power
        .iter()
        .find(|r| r["outcome"] == "error")
        .expect("the refused power action");
    assert_eq!(refused["status"], 409);
    assert_eq!(refused["errorCode"], "invalid_state");
    // no secrets: the rotated token and request bodies are not stored
    let text = serde_json::to_string(&rows).unwrap();
    assert!(!text.contains("trl_agent_") && !text.contains(&token));

    let failed = audit(&s.api, "actor=anonymous").await;
    assert!(failed
        .iter()
        .any(|r| r["action"] == "auth.sign_in" && r["status"] == 401));
    // the later bad bearer token in the same minute is counted, not written again: at
    // most one row per address per window (and one when the limit is reached)
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(!serde_json::to_string(&failed)
        .unwrap()
        .contains("trl_admin_nope"));

    // revoked: the token stops working
    cli(&s.cp, &["admins", "revoke", "alice"]);
    let (st, v) = alice.call(Method::GET, "/api/nodes", None).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    let list = cli(&s.cp, &["admins", "list"]);
    assert!(list.contains("alice") && list.contains("revoked"), "{list}");
    // names are unique, also after revocation; the bootstrap name is reserved
    let out = std::process::Command::new(bin("trellis"))
        .args(["admins", "create", "admin", "--database-url", &s.cp.db_url])
        .current_dir(&s.cp.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

on_both_backends!(named_admin_actions_are_audited, named_admin_actions);

fn cookie_of(r: &reqwest::Response) -> (String, String) {
    let set = r
        .headers()
        .get("set-cookie")
        .expect("set-cookie")
        .to_str()
        .unwrap()
        .to_string();
    let pair = set.split(';').next().unwrap().trim().to_string();
    (pair, set)
}

async fn with_cookie(
    cp: &ControlPlane,
    method: Method,
    path: &str,
    cookie: &str,
    csrf: bool,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, cp.url(path))
        .header("cookie", cookie);
    if csrf {
        req = req.header("x-trellis-request", "1");
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        st,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn session_flow(backend: Backend) {
    let (_dir, cp, api) = control_plane(backend, "audit-session").await;
    let http = reqwest::Client::new();
    let r = http
        .post(cp.url("/api/session"))
        .json(&json!({"token": api.token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (cookie, set) = cookie_of(&r);
    assert!(cookie.starts_with("trellis_session="), "{set}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(flag), "{flag} missing in {set}");
    }
    assert!(!set.contains("Secure"), "no TLS here: {set}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["name"], "admin");
    assert!(!body.to_string().contains(&api.token));

    let (st, v) = with_cookie(&cp, Method::GET, "/api/session", &cookie, false, None).await;
    assert_eq!(
        (st, v["name"].clone(), v["via"].clone()),
        (200, json!("admin"), json!("cookie"))
    );
    // a mutating request with the cookie needs the CSRF header
    let tpl = json!({"name": "cookie-t", "memory": 1024, "cores": 1});
    let (st, v) = with_cookie(
        &cp,
        Method::POST,
        "/api/templates",
        &cookie,
        false,
        Some(tpl.clone()),
    )
    .await;
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["code"], "csrf_header_missing");
    let (st, v) = with_cookie(
        &cp,
        Method::POST,
        "/api/templates",
        &cookie,
        true,
        Some(tpl),
    )
    .await;
    assert_eq!(st, 201, "{v}");

    // SSE with the cookie (EventSource sends same-origin cookies)
    let (aid, _) = api.create_agent("sse-agent").await;
    let cid = api.command(&aid, "ping", json!({})).await;
    let r = http
        .get(cp.url(&format!("/api/commands/{cid}/events")))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(r);

    // sign out ends the session
    let (st, _) = with_cookie(&cp, Method::DELETE, "/api/session", &cookie, true, None).await;
    assert_eq!(st, 204);
    let (st, v) = with_cookie(&cp, Method::GET, "/api/nodes", &cookie, false, None).await;
    assert_eq!((st, &v["error"]["code"]), (401, &json!("session_expired")));

    // an expired session is refused
    let r = http
        .post(cp.url("/api/session"))
        .json(&json!({"token": api.token}))
        .send()
        .await
        .unwrap();
    let (cookie, _) = cookie_of(&r);
    let (st, _) = with_cookie(&cp, Method::GET, "/api/nodes", &cookie, false, None).await;
    assert_eq!(st, 200);
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&cp.db_url).await.unwrap();
    sqlx::query("UPDATE admin_sessions SET expires_at = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    // a tab polling with the expired cookie: neither counted toward the limit nor audited
    for _ in 0..15 {
        let (st, v) = with_cookie(&cp, Method::GET, "/api/nodes", &cookie, false, None).await;
        assert_eq!((st, &v["error"]["code"]), (401, &json!("session_expired")));
    }

    let rows = audit(&api, "action=auth.").await;
    let kinds: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("auth.sign_in".into(), "success".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("auth.sign_out".into(), "success".into())),
        "{kinds:?}"
    );
    assert!(
        !kinds.iter().any(|(a, _)| a == "auth.failed"),
        "cookie misses are not failed authentications: {kinds:?}"
    );

    // a session signed in before the address gets limited
    let r = http
        .post(cp.url("/api/session"))
        .json(&json!({"token": api.token}))
        .send()
        .await
        .unwrap();
    let (live, _) = cookie_of(&r);
    // failed authentications are limited per address: the 11th within a minute is 429
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = http
            .post(cp.url("/api/session"))
            .json(&json!({"token": "wrong"}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert_eq!(&statuses[10..], &[429; 2], "{statuses:?}");
    // even the right token, while limited
    let r = http
        .post(cp.url("/api/session"))
        .json(&json!({"token": api.token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_requests");
    // a bearer token is refused before it is checked (the address learns nothing)...
    let (st, v) = api.call(Method::GET, "/api/nodes", None).await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (429, &json!("too_many_requests"))
    );
    let (st, _) = api.call(Method::GET, "/api/nodes?x=1", None).await;
    assert_eq!(st, 429);
    // ...a live session goes on working
    let (st, _) = with_cookie(&cp, Method::GET, "/api/nodes", &live, false, None).await;
    assert_eq!(st, 200);
    // one row for the window's first failure and one when the limit was reached
    let (st, page) = with_cookie(
        &cp,
        Method::GET,
        "/api/audit?actor=anonymous",
        &live,
        false,
        None,
    )
    .await;
    assert_eq!(st, 200);
    let rows: Vec<(String, String)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("auth.limited".to_string(), "error".to_string()),
            ("auth.sign_in".to_string(), "error".to_string())
        ],
        "{page}"
    );
    assert_eq!(page["items"][0]["details"]["failures"], 10, "{page}");
}

/// A bootstrap admin's session ends when trellis restarts with another bootstrap token;
/// a named admin's session does not depend on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_bootstrap_token_ends_its_sessions() {
    let (_dir, mut cp, api) = control_plane(Backend::Sqlite, "audit-bootstrap").await;
    let alice = create_admin(&cp, "alice");
    let session_url = cp.url("/api/session");
    let sign_in = |token: String| {
        let url = session_url.clone();
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({"token": token}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            cookie_of(&r).0
        }
    };
    let old = sign_in(api.token.clone()).await;
    let named = sign_in(alice).await;
    let (st, _) = with_cookie(&cp, Method::GET, "/api/nodes", &old, false, None).await;
    assert_eq!(st, 200);

    // the same token again: the session survives a restart
    cp.restart().await;
    let (st, _) = with_cookie(&cp, Method::GET, "/api/nodes", &old, false, None).await;
    assert_eq!(st, 200);

    let new_token = "a-new-bootstrap-token-0123456789";
    cp.restart_with(&[("TRELLIS_ADMIN_TOKEN", new_token)]).await;
    let (st, v) = with_cookie(&cp, Method::GET, "/api/nodes", &old, false, None).await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (401, &json!("session_expired")),
        "{v}"
    );
    let (st, v) = with_cookie(&cp, Method::GET, "/api/session", &named, false, None).await;
    assert_eq!((st, &v["name"]), (200, &json!("alice")), "{v}");
    let fresh = sign_in(new_token.to_string()).await;
    let (st, v) = with_cookie(&cp, Method::GET, "/api/session", &fresh, false, None).await;
    assert_eq!((st, &v["name"]), (200, &json!("admin")), "{v}");
}

on_both_backends!(session_cookie_flow, session_flow);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_paging_and_filters() {
    let (_dir, cp, api) = control_plane(Backend::Sqlite, "audit-paging").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let t = api
            .post(
                "/api/templates",
                json!({"name": format!("page-{i}"), "memory": 1024, "cores": 1}),
            )
            .await;
        ids.push(t["id"].as_str().unwrap().to_string());
    }
    for _ in 0..3 {
        let (st, _) = api
            .call(
                Method::POST,
                "/api/templates",
                Some(json!({"name": "x", "memory": 1, "cores": 1})),
            )
            .await;
        assert_eq!(st, 400);
    }
    // reads are not audited
    api.get("/api/templates").await;

    let mut seen = Vec::new();
    let mut path = "/api/audit?limit=3&action=template.".to_string();
    loop {
        let page = api.get(&path).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().cloned());
        match page["nextBefore"].as_str() {
            Some(n) => path = format!("/api/audit?limit=3&action=template.&before={n}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
    let distinct: BTreeSet<&str> = seen.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), 10);
    let ats: Vec<i64> = seen.iter().map(|r| r["atMs"].as_i64().unwrap()).collect();
    assert!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {ats:?}"
    );

    let errors = audit(&api, "outcome=error").await;
    assert_eq!(errors.len(), 3);
    assert!(errors.iter().all(|r| r["status"] == 400
        && r["errorCode"] == "invalid_params"
        && r["actor"] == "admin"));
    let one = audit(&api, &format!("targetId={}", ids[2])).await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["targetName"], "page-2");
    assert_eq!(audit(&api, "actor=nobody").await.len(), 0);
    assert_eq!(audit(&api, "action=node.").await.len(), 0);
    let first = *ats.last().unwrap();
    assert_eq!(audit(&api, &format!("until={first}")).await.len(), 0);
    assert_eq!(audit(&api, &format!("since={first}")).await.len(), 10);
    let (st, v) = api
        .call(Method::GET, "/api/audit?outcome=maybe", None)
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, _) = api.call(Method::GET, "/api/audit?before=zzz", None).await;
    assert_eq!(st, 400);
    let (st, _) = api.call(Method::GET, "/api/audit?limit=0", None).await;
    assert_eq!(st, 400);
    drop(cp);
}

/// Polls `GET /api/nodes?batchId=` until every node has `status`.
async fn wait_batch_status(api: &Api, batch: &str, status: &str) -> Vec<Value> {
    let t = std::time::Instant::now();
    loop {
        let nodes = api.get(&format!("/api/nodes?batchId={batch}")).await["items"]
            .as_array()
            .unwrap()
            .clone();
        if !nodes.is_empty() && nodes.iter().all(|n| n["status"] == status) {
            return nodes;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not all {status}: {nodes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bulk request's audit outcome says what became of its nodes (`error` when every node
/// was refused, `partial` when some were), and a client that disconnects right after
/// sending a bulk stop neither stops it half-way nor loses its audit row: the database's
/// write lock (held by the test) keeps the handler waiting on its first write until the
/// client has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_outcomes_and_client_disconnect() {
    use sqlx::Connection;
    use tokio::io::AsyncWriteExt;
    let s = proxmox_stack(Backend::Sqlite, "audit-bulk", FAST, &[]).await;
    let api = &s.api;
    let t = api
        .post(
            "/api/templates",
            json!({"name": "bulk-audit", "memory": 1024, "cores": 1,
                   "proxmoxTemplateId": 9000, "networkBridge": "vmbr0"}),
        )
        .await;
    let (st, b) = api
        .call(
            Method::POST,
            "/api/nodes/batches",
            Some(
                json!({"count": 3, "namePattern": "bk-{n}", "templateId": t["id"],
                        "provision": {"agentId": s.agent_id}}),
            ),
        )
        .await;
    assert_eq!(st, 202, "{b}");
    let batch = b["batchId"].as_str().unwrap().to_string();
    let ids: Vec<String> = b["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nodeId"].as_str().unwrap().to_string())
        .collect();
    wait_batch_status(api, &batch, "running").await;

    // every node refused (none failed to provision): answered 200, audited as an error
    let (st, v) = api
        .call(
            Method::POST,
            "/api/nodes/bulk",
            Some(json!({"nodeIds": ids, "action": "retry"})),
        )
        .await;
    assert_eq!((st, v["failed"].as_u64()), (200, Some(3)), "{v}");
    let rows = audit(api, "action=node.bulk_action").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0]["outcome"].as_str(), rows[0]["status"].as_i64()),
        (Some("error"), Some(200)),
        "{}",
        rows[0]
    );

    // bulk stop of the three and an unknown node, sent by a client that goes away
    let mut all = ids.clone();
    all.push("no-such-node".into());
    let body = json!({"nodeIds": all, "action": "stop"}).to_string();
    let lock = {
        let mut c = sqlx::SqliteConnection::connect(&s.cp.db_url).await.unwrap();
        sqlx::raw_sql("BEGIN EXCLUSIVE")
            .execute(&mut c)
            .await
            .unwrap();
        c
    };
    let mut tcp = tokio::net::TcpStream::connect(&s.cp.addr).await.unwrap();
    let req = format!(
        "POST /api/nodes/bulk HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        s.cp.addr,
        api.token,
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut lock = lock;
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();

    // all three stop, and the request has its audit row with every node's result
    wait_batch_status(api, &batch, "stopped").await;
    let t0 = std::time::Instant::now();
    let row = loop {
        let rows = audit(api, "action=node.bulk_action").await;
        if rows.len() == 2 {
            break rows[0].clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(row["outcome"], "partial", "{row}");
    assert_eq!(row["details"]["action"], "stop", "{row}");
    let results = row["details"]["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "{row}");
    assert_eq!(
        results
            .iter()
            .filter(|r| r["commandId"].is_string())
            .count(),
        3,
        "{row}"
    );
    assert_eq!(
        audit(api, "outcome=partial").await.len(),
        1,
        "the outcome filter knows partial"
    );
}

/// Deleting or forgetting a node, deleting a template and cancelling a command name their
/// target in the audit row (read before it is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_name_their_target() {
    let (_dir, cp, api) = control_plane(Backend::Sqlite, "audit-removals").await;
    let t = api
        .post(
            "/api/templates",
            json!({"name": "doomed-template", "memory": 1024, "cores": 1}),
        )
        .await;
    let tid = t["id"].as_str().unwrap().to_string();
    let mut nodes = Vec::new();
    for name in ["doomed-node", "forgotten-node"] {
        let v = api
            .post("/api/nodes", json!({"name": name, "templateId": tid}))
            .await;
        nodes.push(v["node"]["id"].as_str().unwrap().to_string());
    }
    let (st, v) = api
        .call(Method::DELETE, &format!("/api/nodes/{}", nodes[0]), None)
        .await;
    assert_eq!(st, 204, "{v}");
    let (st, v) = api
        .call(
            Method::POST,
            &format!("/api/nodes/{}/forget", nodes[1]),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api
        .call(Method::DELETE, &format!("/api/templates/{tid}"), None)
        .await;
    assert_eq!(st, 204, "{v}");
    let (aid, _) = api.create_agent("offline-agent").await;
    let cid = api.command(&aid, "ping", json!({})).await;
    let (st, v) = api
        .call(Method::POST, &format!("/api/commands/{cid}/cancel"), None)
        .await;
    assert_eq!(st, 202, "{v}");

    for (action, id, name) in [
        ("node.delete", nodes[0].as_str(), "doomed-node"),
        ("node.forget", nodes[1].as_str(), "forgotten-node"),
        ("template.delete", tid.as_str(), "doomed-template"),
        ("command.cancel", cid.as_str(), "ping"),
    ] {
        let rows = audit(&api, &format!("action={action}")).await;
        assert_eq!(rows.len(), 1, "{action}: {rows:?}");
        assert_eq!(
            (rows[0]["targetId"].as_str(), rows[0]["targetName"].as_str()),
            (Some(id), Some(name)),
            "{action}: {}",
            rows[0]
        );
    }
    drop(cp);
}

/// The `trellis admins` and `trellis agents` CLI write audit rows as `cli:<os user>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_operations_are_audited() {
    let (_dir, cp, api) = control_plane(Backend::Sqlite, "audit-cli").await;
    let run = |args: &[&str]| {
        std::process::Command::new(bin("trellis"))
            .args(args)
            .args(["--database-url", &cp.db_url])
            .current_dir(&cp.dir)
            .env("RUST_LOG", "warn")
            .env("USER", "carol")
            .output()
            .expect("run trellis")
    };
    assert!(run(&["admins", "create", "dave"]).status.success());
    assert!(run(&["admins", "revoke", "dave"]).status.success());
    assert!(!run(&["admins", "revoke", "nobody"]).status.success());
    let out = run(&["agents", "create", "cli-agent"]);
    assert!(out.status.success());
    let out = String::from_utf8(out.stdout).unwrap();
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("agent id:"))
        .unwrap()
        .trim()
        .to_string();
    assert!(run(&["agents", "rotate-token", &id]).status.success());
    assert!(run(&["agents", "revoke", &id]).status.success());

    let rows = audit(&api, "actor=cli:carol").await;
    let got: Vec<(String, String, String, String)> = rows
        .iter()
        .rev()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["targetId"].as_str().unwrap_or_default().to_string(),
                r["targetName"].as_str().unwrap_or_default().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let row = |a: &str, id: &str, n: &str, o: &str| (a.into(), id.into(), n.into(), o.into());
    assert_eq!(
        got,
        vec![
            row("admin.create", "dave", "dave", "success"),
            row("admin.revoke", "dave", "dave", "success"),
            row("admin.revoke", "nobody", "nobody", "error"),
            row("agent.create", &id, "cli-agent", "success"),
            row("agent.rotate_token", &id, "cli-agent", "success"),
            row("agent.revoke", &id, "cli-agent", "success"),
        ]
    );
    assert_eq!(rows[3]["errorCode"], "not_found", "{}", rows[3]);
    // the one-time tokens are not in the log
    assert!(!serde_json::to_string(&rows).unwrap().contains("trl_"));
    drop(cp);
}

/// Behind a TLS-terminating proxy (`--public-url https://…`) the session cookie is
/// `Secure` although trellis speaks plain HTTP; a URL that is not http(s) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_https_url_makes_cookies_secure() {
    let dir = TempDir::new("audit-public-url");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start_with(
        db,
        &dir,
        "127.0.0.1:0",
        &[("TRELLIS_PUBLIC_URL", "https://trellis.example.com/")],
    )
    .await;
    let r = reqwest::Client::new()
        .post(cp.url("/api/session"))
        .json(&json!({"token": cp.api().token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, set) = cookie_of(&r);
    assert!(set.contains("; Secure"), "{set}");
    let out = std::process::Command::new(bin("trellis"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &cp.db_url,
        ])
        .args(["--public-url", "ftp://trellis.example.com"])
        .env("TRELLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("https://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads an SSE response until it ends; `Err` if it is still open after `within`.
async fn ends_within(mut r: reqwest::Response, within: Duration) -> Result<Duration, ()> {
    let t = std::time::Instant::now();
    loop {
        match tokio::time::timeout_at((t + within).into(), r.chunk()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(_) => return Ok(t.elapsed()),
            Err(_) => return Err(()),
        }
    }
}

/// An open event stream ends once its session is signed out or its admin revoked
/// (re-checked every second here, 30 s by default); a valid one stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_with_their_session() {
    let dir = TempDir::new("audit-sse-recheck");
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start_with(
        db,
        &dir,
        "127.0.0.1:0",
        &[("TRELLIS_STREAM_RECHECK_SECS", "1")],
    )
    .await;
    let api = cp.api();
    let erin = create_admin(&cp, "erin");
    // a command of an agent that never connects: its stream stays open
    let (aid, _) = api.create_agent("never-online").await;
    let cid = api.command(&aid, "ping", json!({})).await;
    let http = reqwest::Client::new();
    let r = http
        .post(cp.url("/api/session"))
        .json(&json!({"token": api.token}))
        .send()
        .await
        .unwrap();
    let (cookie, _) = cookie_of(&r);
    let events = cp.url(&format!("/api/commands/{cid}/events"));
    let open = |req: reqwest::RequestBuilder| async move {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        r
    };
    let by_cookie = open(http.get(&events).header("cookie", &cookie)).await;
    let by_erin = open(http.get(&events).bearer_auth(&erin)).await;
    let by_admin = open(http.get(&events).bearer_auth(&api.token)).await;

    let (st, _) = with_cookie(&cp, Method::DELETE, "/api/session", &cookie, true, None).await;
    assert_eq!(st, 204);
    cli(&cp, &["admins", "revoke", "erin"]);
    let (a, b) = tokio::join!(
        ends_within(by_cookie, Duration::from_secs(5)),
        ends_within(by_erin, Duration::from_secs(5))
    );
    assert!(a.is_ok(), "the signed-out session's stream is still open");
    assert!(b.is_ok(), "the revoked admin's stream is still open");
    assert!(
        ends_within(by_admin, Duration::from_millis(2500))
            .await
            .is_err(),
        "a valid stream ended"
    );
}
