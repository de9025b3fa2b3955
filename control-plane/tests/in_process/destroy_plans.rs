//! Destroy plans in the control plane: `terraform_plan {source_command_id, destroy: true}`
//! takes the source's configuration (its secret too) and asks for a destroy plan; the apply
//! of that plan carries `destroy` in its signed params, and is refused when the agent made
//! a normal plan instead (a tendril that predates destroy plans ignores the field), or a
//! destroy plan it was not asked for. The real runs with Terraform are in
//! tests/tests/terraform_plan.rs; here the agent is a protocol session whose results are
//! chosen, to reach the cases a current tendril never produces.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::{FakeAgent, TestApp};
use crate::session::{acked, dispatched, event};

/// Accepts the next dispatch, finishes it with `outcome`, and returns it.
async fn finish_next(a: &mut FakeAgent, outcome: Value) -> trellis_protocol::Dispatch {
    let d = dispatched(a).await;
    let id = d.command_id.to_string();
    a.send(json!({"type": "accept", "command_id": id}));
    let mut fin = json!({"kind": "finished"});
    fin.as_object_mut()
        .unwrap()
        .extend(outcome.as_object().unwrap().clone());
    a.send(json!({"type": "events", "events": [event(&id, 1, fin)]}));
    acked(a, 1).await;
    d
}

async fn create(t: &TestApp, agent: &str, ty: &str, params: Value) -> (StatusCode, Value) {
    t.call(
        "POST",
        "/api/commands",
        Some(json!({"agentId": agent, "type": ty, "params": params})),
    )
    .await
}

async fn created(t: &TestApp, agent: &str, ty: &str, params: Value) -> String {
    let (st, v) = create(t, agent, ty, params).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    v["commandId"].as_str().unwrap().to_string()
}

fn plan_result(mode: Option<&str>, action: &str) -> Value {
    let mut r = json!({"add": 0, "change": 0, "destroy": 1,
        "resources": [{"address": "null_resource.thing", "action": action}],
        "plan_sha256": "ab".repeat(32)});
    if let Some(m) = mode {
        r["mode"] = m.into();
    }
    json!({"status": "succeeded", "result": r})
}

#[tokio::test]
async fn a_destroy_plan_is_applied_as_one_and_only_if_the_agent_made_one() {
    let t = TestApp::start().await;
    let agent = t.agent("tf-1").await;
    let mut a = FakeAgent::connect(
        &t,
        &agent,
        &["terraform_apply", "terraform_plan", "terraform_destroy"],
    )
    .await;

    let applied = created(
        &t,
        &agent,
        "terraform_apply",
        json!({"template_source": {"repo": "/srv/r", "version": "v1"},
               "terraform_vars": {"db_password": "pw-1"}, "workspace_key": "web"}),
    )
    .await;
    finish_next(
        &mut a,
        json!({"status": "succeeded", "result": {"outputs": {}}}),
    )
    .await;

    // The destroy plan gets the apply's configuration and secret, and `destroy`.
    let plan = created(
        &t,
        &agent,
        "terraform_plan",
        json!({"source_command_id": applied, "destroy": true, "meta": {"reason": "r"}}),
    )
    .await;
    let d = finish_next(&mut a, plan_result(Some("destroy"), "delete")).await;
    assert_eq!(d.command_type, "terraform_plan");
    assert_eq!(d.params["destroy"], json!(true), "{}", d.params);
    assert_eq!(d.params["terraform_vars"]["db_password"], "pw-1");
    assert_eq!(d.params["workspace_key"], "web");
    assert_eq!(d.params["meta"]["reason"], "r");

    // Its apply says it is a destroy, in the signed params the agent gets.
    let apply = created(
        &t,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": plan}),
    )
    .await;
    let d = finish_next(
        &mut a,
        json!({"status": "succeeded", "result": {"outputs": {}}}),
    )
    .await;
    assert_eq!(d.command_id.to_string(), apply);
    assert_eq!(d.params["destroy"], json!(true), "{}", d.params);
    assert_eq!(d.params["plan_command_id"], plan.as_str());
    assert!(d.signature.is_some());
    let (_, shown) = t.call("GET", &format!("/api/commands/{apply}"), None).await;
    assert_eq!(shown["params"]["destroy"], json!(true), "{shown}");

    // Planning again from that apply is a normal plan: the source's `destroy` is not copied.
    let replan = created(
        &t,
        &agent,
        "terraform_plan",
        json!({"source_command_id": apply}),
    )
    .await;
    let d = finish_next(&mut a, plan_result(None, "create")).await;
    assert_eq!(d.command_id.to_string(), replan);
    assert!(d.params.get("destroy").is_none(), "{}", d.params);
    assert!(d.params.get("plan_command_id").is_none(), "{}", d.params);

    // An agent that ignored `destroy` made a normal plan: not applied as a destroy.
    let old = created(
        &t,
        &agent,
        "terraform_plan",
        json!({"source_command_id": applied, "destroy": true}),
    )
    .await;
    finish_next(&mut a, plan_result(None, "create")).await;
    let (st, v) = create(
        &t,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": old}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "plan_invalid", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("made a normal plan"),
        "{v}"
    );
    // Nor a destroy plan nobody asked for, as a normal apply.
    let unasked = created(
        &t,
        &agent,
        "terraform_plan",
        json!({"source_command_id": applied}),
    )
    .await;
    finish_next(&mut a, plan_result(Some("destroy"), "delete")).await;
    let (st, v) = create(
        &t,
        &agent,
        "terraform_apply",
        json!({"plan_command_id": unasked}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "plan_invalid", "{v}");

    // `destroy` is for plans, a bool, and on an apply only through a destroy plan.
    for (ty, params) in [
        (
            "terraform_destroy",
            json!({"source_command_id": applied, "destroy": true}),
        ),
        (
            "terraform_plan",
            json!({"source_command_id": applied, "destroy": "yes"}),
        ),
        (
            "terraform_apply",
            json!({"template_source": {"repo": "/srv/r", "version": "v1"}, "destroy": true}),
        ),
        (
            "terraform_destroy",
            json!({"template_source": {"repo": "/srv/r", "version": "v1"}, "destroy": true}),
        ),
    ] {
        let (st, v) = create(&t, &agent, ty, params.clone()).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_params")),
            "{ty} {params} → {v}"
        );
    }
    t.stop().await;
}
