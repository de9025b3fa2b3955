//! Failure isolation in the event writer, on SQLite and PostgreSQL, with raw agents: a bad
//! agent's events in the same write window as two healthy agents' never cost the healthy
//! ones their connection or their acks.
//!
//! The shared window is made certain by holding the database's write lock from the test
//! while the three agents send: the writer's first transaction waits for the lock, and
//! every frame that arrives meanwhile goes into its next batch together.

use std::time::Duration;

use serde_json::{json, Value};
use trellis_tests::harness::*;
use trellis_tests::on_both_backends;
use trellis_tests::raw_agent::{acked, RawAgent};

/// A v2 agent with a `ping` command dispatched and accepted: `(session, command id)`.
/// An agent whose id puts it on the same event writer as every other agent made here. On
/// PostgreSQL the writers are sharded by agent id (`Broker::shard`: the id modulo the
/// number of writers, a divisor of 16), and these tests need the agents' frames to be able
/// to share one batch; ids ≡ 0 (mod 16) share a writer whatever the count. (SQLite has
/// one writer.)
async fn agent_on_shared_writer(api: &Api, name: &str) -> (String, String) {
    for _ in 0..2000 {
        let (id, token) = api.create_agent(name).await;
        if id.parse::<uuid::Uuid>().unwrap().as_u128() % 16 == 0 {
            return (id, token);
        }
        api.call(reqwest::Method::DELETE, &format!("/api/agents/{id}"), None)
            .await;
    }
    panic!("no agent id on the shared writer in 2000 tries");
}

async fn agent_running(cp: &ControlPlane, api: &Api, name: &str) -> (RawAgent, String) {
    let (id, token) = agent_on_shared_writer(api, name).await;
    let mut ws = RawAgent::connect(&cp.ws_url(), &token).await;
    ws.send(
        json!({"type": "hello", "protocol_version": 2, "min_protocol_version": 1,
        "agent_version": "iso", "hostname": name, "capabilities": ["ping"], "max_concurrency": 4}),
    )
    .await;
    assert_eq!(
        ws.next_frame(Duration::from_secs(10)).await.unwrap()["type"],
        "welcome"
    );
    let cid = api.command(&id, "ping", json!({})).await;
    loop {
        let v = ws.next_frame(Duration::from_secs(10)).await.unwrap();
        if v["type"] == "dispatch" && v["command_id"] == cid {
            break;
        }
    }
    ws.send(json!({"type": "accept", "command_id": cid})).await;
    (ws, cid)
}

fn events(evs: Vec<Value>) -> Value {
    json!({"type": "events", "events": evs})
}

fn log(cid: &str, seq: u64, data: &str) -> Value {
    json!({"command_id": cid, "seq": seq, "ts": 1, "kind": "log", "stream": "stdout", "data": data})
}

fn finished(cid: &str, seq: u64) -> Value {
    json!({"command_id": cid, "seq": seq, "ts": 1, "kind": "finished", "status": "succeeded",
           "result": {"pong": true}})
}

/// The database's write lock, held by the test (see the module doc).
enum Lock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Lock {
    async fn take(db_url: &str) -> Self {
        use sqlx::Connection;
        if db_url.starts_with("sqlite:") {
            let mut c = sqlx::SqliteConnection::connect(db_url).await.unwrap();
            sqlx::raw_sql("BEGIN EXCLUSIVE")
                .execute(&mut c)
                .await
                .unwrap();
            Self::Sqlite(c)
        } else {
            let mut c = sqlx::PgConnection::connect(db_url).await.unwrap();
            sqlx::raw_sql("BEGIN; LOCK TABLE command_events IN EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .unwrap();
            Self::Postgres(c)
        }
    }

    async fn release(self) {
        match self {
            Self::Sqlite(mut c) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
            }
            Self::Postgres(mut c) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
            }
        }
    }
}

/// Runs SQL on the control plane's database from outside (fault injection).
async fn exec(db_url: &str, sql: &str) {
    use sqlx::Connection;
    if db_url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(db_url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(db_url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    }
}

/// Two healthy agents and `bad` send in one window; returns the healthy sessions and
/// their commands after checking they were acked.
async fn healthy_pair(cp: &ControlPlane, api: &Api) -> [(RawAgent, String); 2] {
    [
        agent_running(cp, api, "healthy-1").await,
        agent_running(cp, api, "healthy-2").await,
    ]
}

/// "A stage name with `\u0000` makes PostgreSQL reject the shared transaction": now such a
/// stage is an `invalid_event` in place, NUL elsewhere (log data, messages, an outcome's
/// error and result) is stored as U+FFFD, and two healthy agents writing in the same window
/// are stored, acked and stay connected.
async fn nul_strings_never_fail_the_shared_batch(backend: Backend) {
    let (_dir, cp, api) = control_plane(backend, "iso-nul").await;
    let (mut bad, bad_cid) = agent_running(&cp, &api, "bad").await;
    let [(mut h1, c1), (mut h2, c2)] = healthy_pair(&cp, &api).await;

    let lock = Lock::take(&cp.db_url).await;
    h1.send(events(vec![log(&c1, 1, "warm-up\n")])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    bad.send(events(vec![
        log(&bad_cid, 1, "out\u{0}put\n"),
        json!({"command_id": bad_cid, "seq": 2, "ts": 1, "kind": "stage", "stage": "st\u{0}age", "state": "running"}),
        json!({"command_id": bad_cid, "seq": 3, "ts": 1, "kind": "progress", "percent": 50.0, "message": "half\u{0}way"}),
        json!({"command_id": bad_cid, "seq": 4, "ts": 1, "kind": "finished", "status": "failed",
               "result": {"k\u{0}ey": "v\u{0}alue"},
               "error": {"code": "boom\u{0}", "message": "it\u{0}failed", "retryable": false, "stage": "s\u{0}"}}),
    ]))
    .await;
    h1.send(events(vec![log(&c1, 2, "h1 two\n"), finished(&c1, 3)]))
        .await;
    h2.send(events(vec![log(&c2, 1, "h2 one\n"), finished(&c2, 2)]))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.release().await;

    h1.wait_ack(&c1, 3).await;
    h2.wait_ack(&c2, 2).await;
    // The bad agent: `invalid_event` for the stage (not fatal), everything acked.
    let mut got_invalid = false;
    loop {
        let v = bad
            .next_frame(Duration::from_secs(20))
            .await
            .expect("bad agent stays connected");
        if v["type"] == "error" {
            assert_eq!(v["code"], "invalid_event", "{v}");
            assert_eq!(v["seq"], 2, "{v}");
            got_invalid = true;
        }
        if acked(&v, &bad_cid).is_some_and(|s| s >= 4) {
            break;
        }
    }
    assert!(got_invalid);
    for ws in [&mut bad, &mut h1, &mut h2] {
        ws.assert_open().await;
    }
    assert_eq!(
        api.get(&format!("/api/commands/{c1}")).await["status"],
        "succeeded"
    );
    assert_eq!(
        api.get(&format!("/api/commands/{c2}")).await["status"],
        "succeeded"
    );
    let c = api.get(&format!("/api/commands/{bad_cid}")).await;
    assert_eq!(c["status"], "failed", "{c}");
    assert_eq!(c["error"]["message"], "it\u{FFFD}failed", "{c}");
    assert_eq!(c["error"]["code"], "boom\u{FFFD}", "{c}");
    assert_eq!(c["result"]["k\u{FFFD}ey"], "v\u{FFFD}alue", "{c}");
    let logs = api.all_logs(&bad_cid).await;
    assert_eq!(logs[0]["data"], "out\u{FFFD}put\n", "{logs:?}");
    assert_eq!(logs[1]["stream"], "system", "{logs:?}");
    assert!(logs[1]["data"]
        .as_str()
        .unwrap()
        .starts_with("event 2 rejected: stage name"));
    assert_eq!(api.all_logs(&c1).await.len(), 2);
    assert_eq!(api.all_logs(&c2).await.len(), 1);
}
on_both_backends!(
    nul_strings_never_fail_the_shared_batch_,
    nul_strings_never_fail_the_shared_batch
);

/// An event that passes every check but that the database still refuses (here a trigger
/// the test installs, standing for any constraint the checks missed): the shared batch is
/// retried frame by frame, the healthy agents' events commit and are acked and they stay
/// connected; the bad agent's refused event takes its seq as a `system` line (acked, so it
/// is not re-sent forever), its good event is stored, and it gets a fatal `invalid_event`.
async fn refused_event_closes_only_its_session(backend: Backend) {
    let (_dir, cp, api) = control_plane(backend, "iso-refused").await;
    let (mut bad, bad_cid) = agent_running(&cp, &api, "bad").await;
    let [(mut h1, c1), (mut h2, c2)] = healthy_pair(&cp, &api).await;
    if backend == Backend::Sqlite {
        exec(
            &cp.db_url,
            "CREATE TRIGGER poison BEFORE INSERT ON command_events \
            WHEN NEW.data LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
        )
        .await;
    } else {
        exec(&cp.db_url, "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN \
            IF NEW.data LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END \
            $$ LANGUAGE plpgsql; \
            CREATE TRIGGER poison BEFORE INSERT ON command_events FOR EACH ROW EXECUTE FUNCTION poison()").await;
    }

    let lock = Lock::take(&cp.db_url).await;
    h1.send(events(vec![log(&c1, 1, "warm-up\n")])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    bad.send(events(vec![
        log(&bad_cid, 1, "fine\n"),
        log(&bad_cid, 2, "poison\n"),
    ]))
    .await;
    h1.send(events(vec![log(&c1, 2, "h1 two\n"), finished(&c1, 3)]))
        .await;
    h2.send(events(vec![log(&c2, 1, "h2 one\n"), finished(&c2, 2)]))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.release().await;

    h1.wait_ack(&c1, 3).await;
    h2.wait_ack(&c2, 2).await;
    let mut frames = Vec::new();
    let close = loop {
        match bad.next_frame(Duration::from_secs(20)).await {
            Ok(v) => frames.push(v),
            Err(code) => break code,
        }
    };
    assert!(
        frames.iter().any(|v| acked(v, &bad_cid) == Some(2)),
        "the refused seq is acked (as its system line): {frames:?}"
    );
    let err = frames
        .iter()
        .find(|v| v["type"] == "error")
        .unwrap_or_else(|| panic!("an error before the close: {frames:?}"));
    assert_eq!(err["code"], "invalid_event", "{err}");
    assert_eq!(err["command_id"], bad_cid.as_str(), "{err}");
    assert_eq!(err["seq"], 2, "{err}");
    assert_eq!(close, Some(1008), "{frames:?}");
    for ws in [&mut h1, &mut h2] {
        ws.assert_open().await;
    }
    assert_eq!(
        api.get(&format!("/api/commands/{c1}")).await["status"],
        "succeeded"
    );
    assert_eq!(
        api.get(&format!("/api/commands/{c2}")).await["status"],
        "succeeded"
    );
    let logs = api.all_logs(&bad_cid).await;
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_eq!(logs[0]["data"], "fine\n");
    assert_eq!(logs[1]["stream"], "system");
    assert!(logs[1]["data"]
        .as_str()
        .unwrap()
        .starts_with("event 2 rejected"));
    // The three frames were written in one batch, which the database refused.
    let log = cp.log();
    let line = log
        .lines()
        .find(|l| l.contains("writing it frame by frame"))
        .unwrap_or_else(|| panic!("no isolation in the log: {log}"));
    let ops: usize = line
        .split("ops=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        ops >= 3,
        "the bad frame shared its batch with the healthy ones: {line}"
    );
}
on_both_backends!(
    refused_event_closes_only_its_session_,
    refused_event_closes_only_its_session
);
