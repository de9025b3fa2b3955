//! Handler tests through `Router::oneshot`: auth, the error format, validation, and the
//! node/command operations that need no agent.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::TestApp;

fn error_code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

#[tokio::test]
async fn every_admin_route_needs_the_token_and_errors_are_json() {
    let t = TestApp::start().await;
    for path in [
        "/api/agents",
        "/api/commands",
        "/api/templates",
        "/api/nodes",
    ] {
        let (st, v) = t.call_as(None, "GET", path, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(error_code(&v), "unauthorized");
        let (st, _) = t
            .call_as(Some("wrong-token-of-some-length"), "GET", path, None)
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (st, v) = t.call("GET", "/api/nope", None).await;
    assert_eq!((st, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    // Unauthenticated health and contract.
    let (st, _) = t.call_as(None, "GET", "/healthz", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = t.call_as(None, "GET", "/api/openapi.json", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["openapi"], "3.1.0");
    t.stop().await;
}

#[tokio::test]
async fn bad_bodies_and_queries_get_a_400_with_the_error_shape() {
    let t = TestApp::start().await;
    let (st, v) = t
        .call(
            "POST",
            "/api/templates",
            Some(json!({"name": "x", "memory": "lots"})),
        )
        .await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let (st, v) = t
        .call(
            "POST",
            "/api/templates",
            Some(json!({"name": "x", "memory": 1, "cores": 1})),
        )
        .await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_params")
    );
    let (st, v) = t.call("GET", "/api/commands?limit=abc", None).await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let (st, v) = t.call("GET", "/api/commands?status=bogus", None).await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let (st, v) = t.call("GET", "/api/commands/not-a-uuid", None).await;
    assert_eq!((st, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    t.stop().await;
}

#[tokio::test]
async fn templates_round_trip_and_a_used_one_cannot_be_deleted() {
    let t = TestApp::start().await;
    let (st, tpl) = t
        .call(
            "POST",
            "/api/templates",
            Some(
                json!({"name": "  web  ", "memory": 2048, "cores": 2, "proxmoxTemplateId": 9000,
                        "networkBridge": "", "postProvisionCommands": ["hostname"]}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{tpl}");
    assert_eq!(tpl["name"], "web", "trimmed");
    assert_eq!(tpl["networkBridge"], Value::Null, "empty is absent");
    let id = tpl["id"].as_str().unwrap();
    let (st, node) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": "web-1", "templateId": id})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{node}");
    assert_eq!(node["node"]["memory"], 2048, "size from the template");
    assert_eq!(node["node"]["status"], "pending_provision");
    let (st, v) = t
        .call("DELETE", &format!("/api/templates/{id}"), None)
        .await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::CONFLICT, "template_in_use")
    );
    let node_id = node["node"]["id"].as_str().unwrap();
    let (st, _) = t
        .call("DELETE", &format!("/api/nodes/{node_id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = t
        .call("DELETE", &format!("/api/templates/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = t.call("GET", &format!("/api/templates/{id}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    t.stop().await;
}

#[tokio::test]
async fn provisioning_on_an_offline_agent_is_refused_and_leaves_the_node_as_it_was() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-1").await;
    let tpl = t.mapped_template().await;
    let (st, v) = t
        .call(
            "POST",
            "/api/nodes",
            Some(json!({"name": "db-1", "templateId": tpl})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let node = v["node"]["id"].as_str().unwrap().to_string();
    let (st, v) = t
        .call(
            "POST",
            &format!("/api/nodes/{node}/provision"),
            Some(json!({"agentId": agent})),
        )
        .await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::CONFLICT, "agent_offline")
    );
    let (_, n) = t.call("GET", &format!("/api/nodes/{node}"), None).await;
    assert_eq!(n["status"], "pending_provision");
    assert_eq!(n["lastCommandId"], Value::Null);
    let (st, v) = t
        .call(
            "POST",
            &format!("/api/nodes/{node}/provision"),
            Some(json!({"agentId": "nope"})),
        )
        .await;
    assert_eq!((st, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    t.stop().await;
}

#[tokio::test]
async fn a_queued_command_can_be_cancelled_once_and_retried_once() {
    let t = TestApp::start().await;
    let agent = t.agent("pve-2").await;
    let (st, v) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {}, "idempotencyKey": "k1"})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "queued");
    let id = v["commandId"].as_str().unwrap().to_string();
    // The same key and request answers with the same command; another request is a conflict.
    let (_, again) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {}, "idempotencyKey": "k1"})),
        )
        .await;
    assert_eq!(again["commandId"], id.as_str());
    let (st, v) = t
        .call(
            "POST",
            "/api/commands",
            Some(json!({"agentId": agent, "type": "ping", "params": {"duration_ms": 5}, "idempotencyKey": "k1"})),
        )
        .await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::CONFLICT, "idempotency_conflict")
    );

    let (st, v) = t
        .call("POST", &format!("/api/commands/{id}/cancel"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(v["status"], "cancelled");
    let (st, v) = t
        .call("POST", &format!("/api/commands/{id}/cancel"), None)
        .await;
    assert_eq!(
        (st, error_code(&v)),
        (StatusCode::CONFLICT, "already_finished")
    );

    let (st, r1) = t
        .call("POST", &format!("/api/commands/{id}/retry"), None)
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{r1}");
    assert_eq!(r1["attempt"], 2);
    let (_, r2) = t
        .call("POST", &format!("/api/commands/{id}/retry"), None)
        .await;
    assert_eq!(
        r1["commandId"], r2["commandId"],
        "a double-clicked retry makes one attempt"
    );
    let new = r1["commandId"].as_str().unwrap();
    let (_, c) = t.call("GET", &format!("/api/commands/{new}"), None).await;
    assert_eq!(c["retryOf"], id.as_str());
    assert_eq!(c["rootCommandId"], id.as_str());

    let (_, list) = t
        .call(
            "GET",
            &format!("/api/commands?agentId={agent}&limit=1"),
            None,
        )
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["nextBefore"].is_string(), "a full page has a cursor");
    let cursor = list["nextBefore"].as_str().unwrap();
    let (_, page2) = t
        .call(
            "GET",
            &format!("/api/commands?agentId={agent}&limit=5&before={cursor}"),
            None,
        )
        .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2["nextBefore"], Value::Null);
    t.stop().await;
}

#[tokio::test]
async fn metrics_are_served_with_status_counts() {
    let t = TestApp::start().await;
    let (st, body) = t.call_as(None, "GET", "/metrics", None).await;
    assert_eq!(st, StatusCode::OK);
    let text = body.as_str().unwrap();
    assert!(
        text.contains("trellis_commands{status=\"queued\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE trellis_command_duration_seconds histogram"),
        "{text}"
    );
    t.stop().await;
}
