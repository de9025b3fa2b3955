//! Property tests of the paging and resume parameters the network reaches: `after`,
//! `limit`, `before` (keyset cursors), `wait`, filters and the SSE `Last-Event-ID`
//! header, as arbitrary query strings through the real router (`Router::oneshot`) on a
//! command with stored events. Every answer is 2xx or 4xx (never 5xx), every 4xx has the
//! JSON error body `{error: {code, message}}`, a stream of a finished command ends, and
//! no code of the control plane panics (a panic hook counts panics located in
//! `control-plane/src`, spawned tasks included).
//!
//! `PROPTEST_CASES` sets the case count (default 512; `PROPTEST_CASES=1000000` for the
//! long run).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::common::{FakeAgent, TestApp, ADMIN};
use crate::session::{acked, dispatched, event};

static PANICS: AtomicUsize = AtomicUsize::new(0);
static OK: AtomicUsize = AtomicUsize::new(0);
static CLIENT_ERRORS: AtomicUsize = AtomicUsize::new(0);
static STREAMS: AtomicUsize = AtomicUsize::new(0);

fn count_product_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().contains("control-plane/src"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

const KEYS: &[&str] = &[
    "after", "limit", "before", "cursor", "wait", "agentId", "status", "type", "actor", "action",
    "targetId", "outcome", "since", "until", "batchId", "x",
];

const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "10000",
    "10001",
    "1000",
    "1001",
    "500",
    "501",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "18446744073709551616",
    "1e99",
    "-0",
    "0.5",
    "NaN",
    "inf",
    "-inf",
    "",
    "abc",
    "%00",
    "%FF",
    "%E2%82%AC",
    "1%2C2",
    "00000000-0000-0000-0000-000000000000",
    "running",
    "succeeded",
    "ping",
    "node.",
    "success",
    // keyset cursors: `<ms>:<id>` shapes, broken and odd
    "1700000000000",
    "1700000000000:00000000-0000-0000-0000-000000000000",
    ":",
    "1:",
    ":x",
    "a:b",
    "1700000000000:",
    "-1:-1",
    "9223372036854775807:zzz",
];

/// Percent-encodes every byte but ASCII letters and digits.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(VALUES).prop_map(str::to_owned),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| encode(&f.to_string())),
        2 => any::<String>().prop_map(|s| encode(&s)),
        1 => proptest::collection::vec(any::<u8>(), 0..24)
            .prop_map(|b| b.iter().map(|c| format!("%{c:02X}")).collect()),
    ]
}

fn query() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            prop_oneof![
                5 => proptest::sample::select(KEYS).prop_map(str::to_owned),
                1 => any::<String>().prop_map(|s| encode(&s)),
            ],
            value(),
        ),
        0..5,
    )
    .prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

#[derive(Debug, Clone)]
struct Case {
    path: usize,
    query: String,
    last_event_id: Option<String>,
}

fn case(paths: usize) -> impl Strategy<Value = Case> {
    (
        0..paths,
        query(),
        proptest::option::of(prop_oneof![
            2 => any::<i64>().prop_map(|n| n.to_string()),
            1 => proptest::sample::select(VALUES).prop_map(str::to_owned),
            1 => "[ -~]{0,24}",
        ]),
    )
        .prop_map(|(path, query, last_event_id)| Case {
            path,
            query,
            last_event_id,
        })
}

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

async fn one(t: &TestApp, path: &str, c: &Case) -> Result<(), TestCaseError> {
    let uri = if c.query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", c.query)
    };
    let mut req = Request::builder()
        .method("GET")
        .uri(&uri)
        .header("authorization", format!("Bearer {ADMIN}"));
    if let Some(id) = &c.last_event_id {
        req = req.header("last-event-id", id.as_str());
    }
    let Ok(req) = req.body(Body::empty()) else {
        return Ok(()); // not a request a client could send
    };
    let res = t.app.router.clone().oneshot(req).await.expect("infallible");
    let status = res.status().as_u16();
    let sse = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    // A stream of a finished command ends after its backlog and `end`.
    let body = tokio::time::timeout(Duration::from_secs(10), res.into_body().collect())
        .await
        .map_err(|_| TestCaseError::fail(format!("{uri}: body did not end")))?
        .map_err(|e| TestCaseError::fail(format!("{uri}: body error {e}")))?
        .to_bytes();
    prop_assert!(
        status < 500,
        "{uri} → {status}: {:?}",
        String::from_utf8_lossy(&body)
    );
    if status >= 400 {
        CLIENT_ERRORS.fetch_add(1, Ordering::Relaxed);
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| TestCaseError::fail(format!("{uri} → {status}: body not JSON")))?;
        prop_assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{uri} → {status}: {v}"
        );
    } else if sse {
        STREAMS.fetch_add(1, Ordering::Relaxed);
        let text = String::from_utf8_lossy(&body);
        prop_assert!(
            text.contains("event: end"),
            "{uri}: stream without end: {text}"
        );
    } else {
        OK.fetch_add(1, Ordering::Relaxed);
        prop_assert!(
            serde_json::from_slice::<Value>(&body).is_ok(),
            "{uri}: not JSON"
        );
    }
    Ok(())
}

#[test]
fn paging_and_resume_parameters_never_give_5xx_or_panic() {
    count_product_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (t, id) = rt.block_on(async {
        let t = TestApp::start().await;
        let agent = t.agent("fuzzed").await;
        let mut a = FakeAgent::connect(&t, &agent, &["ping"]).await;
        let (_, v) = t
            .call(
                "POST",
                "/api/commands",
                Some(json!({"agentId": agent, "type": "ping", "params": {}})),
            )
            .await;
        let id = v["commandId"].as_str().unwrap().to_string();
        dispatched(&mut a).await;
        a.send(json!({"type": "accept", "command_id": id}));
        let mut events: Vec<Value> = (1..=20)
            .map(|seq| {
                event(
                    &id,
                    seq,
                    json!({"kind": "log", "stream": "stdout", "data": format!("line {seq}\n")}),
                )
            })
            .collect();
        events.push(event(
            &id,
            21,
            json!({"kind": "finished", "status": "succeeded", "result": {"pong": true}}),
        ));
        a.send(json!({"type": "events", "events": events}));
        acked(&mut a, 21).await;
        (t, id)
    });
    let paths = [
        "/api/commands".to_string(),
        format!("/api/commands/{id}"),
        format!("/api/commands/{id}/logs"),
        format!("/api/commands/{id}/events"),
        "/api/commands/not-a-uuid/logs".to_string(),
        "/api/commands/00000000-0000-0000-0000-000000000000/events".to_string(),
        "/api/audit".to_string(),
        "/api/nodes".to_string(),
        "/api/agents".to_string(),
    ];
    let mut runner = TestRunner::new(config(512));
    let result = runner.run(&case(paths.len()), |c| {
        rt.block_on(one(&t, &paths[c.path], &c))
    });
    // Let spawned stream tasks finish before counting panics.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    rt.block_on(t.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
    let (ok, bad, streams) = (
        OK.load(Ordering::Relaxed),
        CLIENT_ERRORS.load(Ordering::Relaxed),
        STREAMS.load(Ordering::Relaxed),
    );
    println!("query properties: {ok} JSON 2xx, {streams} event streams, {bad} 4xx, 0 5xx");
    assert!(
        ok > 0 && bad > 0 && streams > 0,
        "every kind of answer was reached"
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "control-plane code panicked"
    );
}
