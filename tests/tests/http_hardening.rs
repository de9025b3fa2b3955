//! HTTP server hardening against the real binary: security headers on every response,
//! a header-read timeout (slowloris, idle keep-alive) that spares WebSocket sessions and
//! event streams, and a connection cap.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::db::{Backend, TestDb};
use trellis_tests::harness::*;
use trellis_tests::raw_agent::RawAgent;
use trellis_tests::tempdir::TempDir;

async fn start(tag: &str, env: &[(&str, &str)]) -> (TempDir, ControlPlane) {
    let dir = TempDir::new(tag);
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let cp = ControlPlane::start_with(db, &dir, "127.0.0.1:0", env).await;
    (dir, cp)
}

/// Reads until the server closes the connection; returns when (None: still open after
/// `within`).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_headers_on_ui_and_api() {
    let ui = repo_root().join("ui/dist");
    let ui = ui.to_string_lossy().to_string();
    let (_dir, cp) = start("headers", &[("TRELLIS_UI_DIR", ui.as_str())]).await;
    let http = reqwest::Client::new();
    let authed = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN_TOKEN);
    let responses = [
        ("/healthz", http.get(cp.url("/healthz"))),
        ("/api/nodes", authed(http.get(cp.url("/api/nodes")))),
        ("/api/nodes (401)", http.get(cp.url("/api/nodes"))),
        ("/api/nope (404)", authed(http.get(cp.url("/api/nope")))),
        ("/ (UI)", http.get(cp.url("/"))),
        ("/commands/x (UI route)", http.get(cp.url("/commands/x"))),
    ];
    for (what, req) in responses {
        let resp = req.send().await.unwrap();
        let h = resp.headers();
        let get = |n: &str| {
            h.get(n)
                .unwrap_or_else(|| panic!("{what}: no {n} header ({})", resp.status()))
                .to_str()
                .unwrap()
                .to_string()
        };
        let csp = get("content-security-policy");
        assert!(csp.starts_with("default-src 'self';"), "{what}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
        assert_eq!(get("x-content-type-options"), "nosniff", "{what}");
        assert_eq!(get("referrer-policy"), "no-referrer", "{what}");
        assert_eq!(get("x-frame-options"), "DENY", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_closes_slow_and_idle_clients_but_not_sessions() {
    let (_dir, cp) = start(
        "slowloris",
        &[
            ("TRELLIS_HEADER_READ_TIMEOUT_SECS", "1"),
            // Agents heartbeat every 10 s: far longer than the waits below.
            ("TRELLIS_HEARTBEAT_TIMEOUT_SECS", "30"),
        ],
    )
    .await;
    let api = cp.api();

    // Slowloris: half a header, then nothing.
    let mut slow = TcpStream::connect(&cp.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(8))
        .await
        .expect("a client stalling inside its header is disconnected");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );

    // A client that connects and never sends anything.
    let mut silent = TcpStream::connect(&cp.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(8))
        .await
        .is_some());

    // Idle keep-alive: one request answered, then the connection is closed.
    let mut idle = TcpStream::connect(&cp.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut idle, Duration::from_secs(8))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(took < Duration::from_secs(4), "{took:?}");

    // An agent session and an event stream stay open well past the timeout.
    let (agent_id, token) = api.create_agent("long-lived").await;
    let mut agent = RawAgent::hello(&cp.ws_url(), &token).await;
    let cid = api
        .command(&agent_id, "ping", json!({"duration_ms": 1}))
        .await;
    // The session is idle now (the ping is dispatched to it; the test never answers).
    let events = reqwest::Client::new()
        .get(cp.url(&format!("/api/commands/{cid}/events")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut body = events.bytes_stream();
    let until = Instant::now() + Duration::from_secs(3);
    while let Ok(chunk) = tokio::time::timeout_at(until.into(), body.next()).await {
        assert!(
            matches!(chunk, Some(Ok(_))),
            "the event stream ended after {:?}: {chunk:?}",
            Instant::now() + Duration::from_secs(3) - until
        );
    }
    let v = api.get(&format!("/api/agents/{agent_id}")).await;
    assert_eq!(v["status"], "online", "{v}");
    // The session still carries frames both ways.
    agent.send(json!({"type": "heartbeat", "running": 0})).await;
    agent
        .try_send_text(json!({"type": "heartbeat", "running": 0}).to_string())
        .await
        .expect("the agent's WebSocket is still open");
    let v = api.get(&format!("/api/agents/{agent_id}")).await;
    assert_eq!(v["status"], "online", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_holds_new_clients_until_one_closes() {
    let (_dir, cp) = start(
        "conncap",
        &[
            ("TRELLIS_MAX_CONNECTIONS", "2"),
            ("TRELLIS_HEADER_READ_TIMEOUT_SECS", "60"),
        ],
    )
    .await;
    let healthz = || async {
        // A fresh client each time: no pooled connection to reuse.
        reqwest::Client::new()
            .get(cp.url("/healthz"))
            .timeout(Duration::from_millis(1500))
            .send()
            .await
    };
    assert_eq!(healthz().await.unwrap().status(), 200);
    // Wait until that client's connection is gone from the server too.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let a = TcpStream::connect(&cp.addr).await.unwrap();
    let b = TcpStream::connect(&cp.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = healthz().await;
    assert!(
        refused.is_err(),
        "a third connection was served over a cap of 2: {refused:?}"
    );
    drop(a);
    let started = Instant::now();
    let resp = loop {
        match healthz().await {
            Ok(r) => break r,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "no request served after a connection closed: {e}"
            ),
        }
    };
    assert_eq!(resp.status(), 200);
    drop(b);
}

/// `?access_token=` is refused everywhere, even beside a valid header; the error says
/// what to use instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_query_string_is_refused() {
    let (_dir, cp) = start("querytoken", &[]).await;
    let api = cp.api();
    let (agent_id, _) = api.create_agent("q").await;
    let cid = api
        .command(&agent_id, "ping", json!({"duration_ms": 1}))
        .await;
    let http = reqwest::Client::new();
    for (path, with_header) in [
        (
            format!("/api/commands/{cid}/events?access_token={ADMIN_TOKEN}"),
            false,
        ),
        (
            format!("/api/commands/{cid}/events?access_token={ADMIN_TOKEN}"),
            true,
        ),
        (format!("/api/nodes?access_token={ADMIN_TOKEN}"), false),
        (
            format!("/api/commands/{cid}?x=1&access_token={ADMIN_TOKEN}"),
            true,
        ),
    ] {
        let mut req = http.get(cp.url(&path));
        if with_header {
            req = req.bearer_auth(ADMIN_TOKEN);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path} (header: {with_header})");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("Authorization") && msg.contains("session cookie"),
            "{msg}"
        );
    }
    // The header alone still works.
    let resp = http
        .get(cp.url(&format!("/api/commands/{cid}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// With no admin token configured, the generated one goes to `<data dir>/admin-token`
/// (0600), works, and appears in neither stdout nor stderr; the SQLite database and its
/// WAL files are 0600, and a database left readable by others is narrowed on start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_admin_token_in_private_file_and_private_database() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("tokenfile");
    let data = dir.path().join("state");
    std::fs::create_dir(&data).unwrap();
    let db_file = data.join("trellis.db");
    let run = |n: u32| {
        let out = dir.path().join(format!("stdout-{n}"));
        let err = dir.path().join(format!("stderr-{n}"));
        let child = std::process::Command::new(bin("trellis"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(format!("sqlite://{}", db_file.display()))
            .env_remove("TRELLIS_ADMIN_TOKEN")
            .env_remove("TRELLIS_DATA_DIR")
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        (child, out, err)
    };
    let wait_addr = |err: &std::path::Path| {
        let err = err.to_path_buf();
        async move {
            let started = Instant::now();
            loop {
                let text = std::fs::read_to_string(&err).unwrap_or_default();
                if let Some(addr) = text
                    .lines()
                    .find(|l| l.contains("trellis listening"))
                    .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
                {
                    return addr.to_string();
                }
                assert!(started.elapsed() < Duration::from_secs(30), "{text}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    let (mut child, out, err) = run(1);
    let addr = wait_addr(&err).await;
    let token_file = data.join("admin-token");
    assert_eq!(mode(&token_file), 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.len() >= 16, "{token:?}");
    let status = reqwest::Client::new()
        .get(format!("http://{addr}/api/nodes"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let logs = std::fs::read_to_string(&err).unwrap() + &std::fs::read_to_string(&out).unwrap();
    assert!(!logs.contains(&token), "the token was printed:\n{logs}");
    assert!(
        logs.contains(&token_file.display().to_string()),
        "the log names the file:\n{logs}"
    );
    assert_eq!(mode(&db_file), 0o600);
    for suffix in ["-wal", "-shm"] {
        let p = data.join(format!("trellis.db{suffix}"));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    // A database left readable by others is narrowed; the stored token is kept.
    std::fs::set_permissions(&db_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (mut child, _out, err) = run(2);
    let addr = wait_addr(&err).await;
    assert_eq!(mode(&db_file), 0o600);
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap().trim(),
        token,
        "no new token on restart"
    );
    let status = reqwest::Client::new()
        .get(format!("http://{addr}/api/nodes"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// A credentialed repository URL is shown as `user:***@` in every command response
/// (single, list, target, a retry's answer) while the agent still receives the real URL,
/// also for the retry, which copies the stored params.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_redacted_in_responses_but_dispatched_intact() {
    const SECRET: &str = "s3cr3t-t0ken";
    let (_dir, cp) = start("urlcreds", &[]).await;
    let api = cp.api();
    let (agent_id, token) = api.create_agent("tf").await;
    let repo = format!("https://deploy:{SECRET}@git.example.com/infra/app.git");
    let params = json!({
        "template_source": {"repo": repo, "version": "main"},
        "terraform_vars": {"mirror": format!("https://{SECRET}@mirror.example.com/x")},
        "sensitive_vars": [],
        "meta": {"triggered_by": "test", "reason": null}
    });
    let first = api.command(&agent_id, "terraform_apply", params).await;
    let shown = "https://deploy:***@git.example.com/infra/app.git";
    let check = |what: &str, v: &serde_json::Value| {
        let text = v.to_string();
        assert!(
            !text.contains(SECRET),
            "{what} shows the credential: {text}"
        );
    };
    let one = api.get(&format!("/api/commands/{first}")).await;
    check("GET /api/commands/{id}", &one);
    assert_eq!(one["params"]["template_source"]["repo"], shown, "{one}");
    assert_eq!(
        one["params"]["terraform_vars"]["mirror"],
        "https://***@mirror.example.com/x"
    );
    // The target is the state workspace, named without the URL's credentials.
    assert_eq!(
        one["target"]["workspace"], "https://git.example.com/infra/app.git#",
        "{one}"
    );
    let list = api.get(&format!("/api/commands?agentId={agent_id}")).await;
    check("GET /api/commands", &list);

    // Cancelled while queued, then retried: the retry's answers are redacted too.
    let (s, cancelled) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{first}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, 202, "{cancelled}");
    check("cancel", &cancelled);
    let (s, retry) = api
        .call(
            reqwest::Method::POST,
            &format!("/api/commands/{first}/retry"),
            None,
        )
        .await;
    assert_eq!(s, 202, "{retry}");
    check("retry", &retry);
    let second = retry["commandId"].as_str().unwrap().to_string();
    let again = api.get(&format!("/api/commands/{second}")).await;
    check("the retry", &again);
    assert_eq!(again["params"]["template_source"]["repo"], shown);

    // The agent gets the real URL (the retry copied the stored params).
    let mut ws = RawAgent::connect(&cp.ws_url(), &token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "tf", "hostname": "tf", "capabilities": ["terraform_apply"],
        "max_concurrency": 1}),
    )
    .await;
    let dispatch = ws.read_until("\"dispatch\"").await;
    assert!(dispatch.contains(&second), "{dispatch}");
    assert!(
        dispatch.contains(&repo),
        "the agent needs the real URL: {dispatch}"
    );
}

/// The same server over TLS: requests are served with the security headers, and a
/// client that stalls inside its header after the handshake is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_with_the_same_limits() {
    let dir = TempDir::new("tlslimits");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let db = TestDb::create(Backend::Sqlite, &dir).await;
    let (c, k) = (
        cert_pem.to_string_lossy().to_string(),
        key_pem.to_string_lossy().to_string(),
    );
    let cp = ControlPlane::start_with(
        db,
        dir.path(),
        "127.0.0.1:0",
        &[
            ("TRELLIS_TLS_CERT", c.as_str()),
            ("TRELLIS_TLS_KEY", k.as_str()),
            ("TRELLIS_HEADER_READ_TIMEOUT_SECS", "1"),
        ],
    )
    .await;
    let port = cp.addr.rsplit(':').next().unwrap().to_string();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let resp = http
        .get(format!("https://localhost:{port}/api/nodes"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");

    // Slowloris after a completed handshake.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(&cp.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a stalled TLS client was never disconnected"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
