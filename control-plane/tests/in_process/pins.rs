//! Pinning a command through the API keeps it past the retention period: the reaper's own
//! retention pass deletes an unpinned command of the same age and leaves the pinned one
//! with its events and stages; unpinned again, it goes at the next pass. The pin routes
//! answer like the other command routes (404 JSON for an unknown id, 401 without a
//! token) and each request is an audit row (`command.pin` / `command.unpin`).

use axum::http::StatusCode;
use serde_json::Value;
use trellis::db::{Db, EventBatch};
use trellis::model::{AgentId, CommandId};
use trellis_protocol::{Event, EventBody, LogStream, StageState};

use crate::common::TestApp;

const DAY: i64 = 86_400_000;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One stage event and one log line, so a kept command is seen to keep both.
async fn with_events(db: &Db, agent: AgentId, command: CommandId) {
    let evs = [
        Event {
            command_id: command.0,
            seq: 1,
            ts: 1,
            body: EventBody::Stage {
                stage: "work".into(),
                state: StageState::Completed,
                percent: None,
                message: None,
            },
        },
        Event {
            command_id: command.0,
            seq: 2,
            ts: 2,
            body: EventBody::Log {
                stream: LogStream::Stdout,
                data: "kept output\n".into(),
            },
        },
    ];
    let mut batch = EventBatch::default();
    batch.events.extend(evs.iter().map(|e| (agent, e)));
    db.store_event_batch(&batch).await.unwrap();
}

/// The newest audit rows with `action`, newest first.
async fn audit_rows(t: &TestApp, action: &str) -> Vec<Value> {
    let (st, v) = t
        .call("GET", &format!("/api/audit?action={action}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_pinned_command_survives_the_retention_pass_and_an_unpinned_one_of_its_age_does_not() {
    let t = TestApp::with_config(|c| c.retention_days = 30).await;
    let db = t.app.state.db.clone();
    let agent: AgentId = t
        .agent("keeper")
        .await
        .parse::<uuid::Uuid>()
        .unwrap()
        .into();
    // Two terminal commands that finished 40 days ago, both with events and a stage.
    let old = db
        .seed_terminal_history(agent, 2, now() - 40 * DAY)
        .await
        .unwrap();
    let (kept, dropped) = (old[0], old[1]);
    for c in &old {
        with_events(&db, agent, *c).await;
    }

    let (st, v) = t.call("GET", &format!("/api/commands/{kept}"), None).await;
    assert_eq!((st, &v["pinned"]), (StatusCode::OK, &Value::Bool(false)));
    let (st, v) = t
        .call("PUT", &format!("/api/commands/{kept}/pin"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["id"], kept.to_string());
    assert_eq!(v["pinned"], true);
    assert_eq!(v["status"], "succeeded");
    // Idempotent: a second click answers the same.
    let (st, v) = t
        .call("PUT", &format!("/api/commands/{kept}/pin"), None)
        .await;
    assert_eq!((st, &v["pinned"]), (StatusCode::OK, &Value::Bool(true)));
    // Lists show it too.
    let (_, list) = t.call("GET", "/api/commands?limit=10", None).await;
    let pinned: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["pinned"] == true)
        .collect();
    assert_eq!(pinned.len(), 1, "{list}");
    assert_eq!(pinned[0]["id"], kept.to_string());

    let p = trellis::broker::reaper::retention_pass(&t.app.state.broker)
        .await
        .unwrap();
    assert_eq!((p.commands, p.events, p.stages), (1, 2, 1), "{p:?}");
    let (st, v) = t
        .call("GET", &format!("/api/commands/{dropped}"), None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "the unpinned command of the same age is gone"
    );
    let (st, v) = t.call("GET", &format!("/api/commands/{kept}"), None).await;
    assert_eq!((st, &v["pinned"]), (StatusCode::OK, &Value::Bool(true)));
    assert_eq!(v["stages"].as_array().map(Vec::len), Some(1), "{v}");
    let (_, logs) = t
        .call("GET", &format!("/api/commands/{kept}/logs"), None)
        .await;
    assert_eq!(logs["items"][0]["data"], "kept output\n", "{logs}");

    // Unpinned, it goes at the next pass.
    let (st, v) = t
        .call("DELETE", &format!("/api/commands/{kept}/pin"), None)
        .await;
    assert_eq!((st, &v["pinned"]), (StatusCode::OK, &Value::Bool(false)));
    let p = trellis::broker::reaper::retention_pass(&t.app.state.broker)
        .await
        .unwrap();
    assert_eq!(p.commands, 1);
    let (st, _) = t.call("GET", &format!("/api/commands/{kept}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Each request is one audit row naming the command.
    let pins = audit_rows(&t, "command.pin").await;
    assert_eq!(pins.len(), 2, "{pins:?}");
    for row in &pins {
        assert_eq!(row["action"], "command.pin");
        assert_eq!(row["targetType"], "command");
        assert_eq!(row["targetId"], kept.to_string());
        assert_eq!(row["targetName"], "ping");
        assert_eq!(row["outcome"], "success");
        assert_eq!(row["actor"], "admin");
    }
    let unpins = audit_rows(&t, "command.unpin").await;
    assert_eq!(unpins.len(), 1, "{unpins:?}");
    assert_eq!(unpins[0]["targetId"], kept.to_string());
    assert_eq!(unpins[0]["outcome"], "success");
    t.stop().await;
}

#[tokio::test]
async fn pin_answers_404_for_an_unknown_command_and_401_without_a_token() {
    let t = TestApp::start().await;
    let unknown = CommandId::new();
    for (method, action) in [("PUT", "command.pin"), ("DELETE", "command.unpin")] {
        for id in [unknown.to_string(), "not-an-id".to_string()] {
            let (st, v) = t
                .call(method, &format!("/api/commands/{id}/pin"), None)
                .await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{method} {id}: {v}");
            assert_eq!(v["error"]["code"], "not_found", "{v}");
            assert!(v["error"]["message"].as_str().is_some(), "{v}");
        }
        // Refused requests are audited too, as errors.
        let rows = audit_rows(&t, action).await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|r| r["outcome"] == "error"
            && r["status"] == 404
            && r["errorCode"] == "not_found"));
        assert!(rows.iter().any(|r| r["targetId"] == unknown.to_string()));

        let (st, v) = t
            .call_as(None, method, &format!("/api/commands/{unknown}/pin"), None)
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"]["code"], "unauthorized");
        let (st, _) = t
            .call_as(
                Some("wrong-token-of-some-length"),
                method,
                &format!("/api/commands/{unknown}/pin"),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    t.stop().await;
}
