//! `terraform_apply` on the agent with the real Terraform 1.0.3 and the hashicorp/null
//! provider, against template repositories made with git from `tests/fixtures/terraform`:
//! variables in, outputs out, sensitive values never in an event or the result, the
//! exact template version fetched, and clear errors (Terraform's own, unknown version,
//! repository or path, invalid params, missing binary).
//!
//! The executor is driven directly (no control plane), its events recorded with their
//! arrival time; the tools, template repository and recorder are in
//! `trellis_tests::terraform`. Without Terraform these tests fail (they never skip).

use serde_json::{json, Value};
use trellis_protocol::{LogStream, StageState};
use trellis_tests::terraform::*;

const PASSWORD: &str = "hunter2-very-secret";
const EXTRA: &str = "custom-sensitive-value";

#[tokio::test]
async fn applies_variables_returns_outputs_and_never_leaks_sensitive_values() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let mut p = params(
        &repo,
        "v1.0.0",
        "basic",
        json!({"name": "world", "count_n": 21, "db_password": PASSWORD, "extra": EXTRA}),
    );
    p.sensitive_vars = vec!["extra".into()];
    let run = agent.apply(p).await;
    let result = run.ok();

    assert_eq!(result.resolved_commit.as_deref(), Some(repo.v1.as_str()));
    let o = &result.outputs;
    assert_eq!(o["greeting"]["value"], json!("hello world"), "{o}");
    assert_eq!(o["doubled"]["value"], json!(42), "{o}");
    assert_eq!(o["template_version"]["value"], json!("1"), "{o}");
    assert_eq!(o["secret_out"]["sensitive"], json!(true), "{o}");
    assert_eq!(o["secret_out"]["value"], Value::Null, "{o}");
    assert_eq!(o["leak"]["value"], json!("leak-***"), "{o}");
    assert_eq!(run.stages(), all_stages_completed());

    let stdout = run.logs(Some(LogStream::Stdout));
    let stderr = run.logs(Some(LogStream::Stderr));
    let system = run.logs(Some(LogStream::System));
    assert!(stdout.contains("hello world"), "{stdout}");
    assert!(stdout.contains("pw=***"), "{stdout}");
    assert!(stdout.contains("Apply complete!"), "{stdout}");
    assert!(
        stdout.contains("extra=***") || stderr.contains("extra=***"),
        "{stdout}\n{stderr}"
    );
    assert!(system.contains("$ terraform init"), "{system}");
    assert!(
        system.contains("$ terraform apply -auto-approve"),
        "{system}"
    );

    // No event and no result carries a sensitive value in any form.
    for secret in [PASSWORD, EXTRA, "s-world"] {
        for e in &run.events {
            let text = serde_json::to_string(&e.body).expect("event json");
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        let text = serde_json::to_string(result).expect("result json");
        assert!(!text.contains(secret), "{secret} leaked in result {text}");
    }
    // The variables file with the clear values is not left in the workspace.
    let ws = agent.work.join("terraform").join(run.id.to_string());
    assert!(ws.is_dir());
    assert!(!ws.join("src/basic/terraform.tfvars.json").exists());
}

#[tokio::test]
async fn fetches_exactly_the_requested_version() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let vars = json!({"name": "v", "db_password": PASSWORD});
    for (version, want, commit) in [
        ("main".to_string(), "2", &repo.v2),
        (repo.v1[..10].to_string(), "1", &repo.v1),
        (repo.v2.clone(), "2", &repo.v2),
    ] {
        let run = agent
            .apply(params(&repo, &version, "basic", vars.clone()))
            .await;
        let r = run.ok();
        assert_eq!(
            r.outputs["template_version"]["value"],
            json!(want),
            "{version}"
        );
        assert_eq!(r.resolved_commit.as_ref(), Some(commit), "{version}");
    }
}

#[tokio::test]
async fn failing_apply_reports_terraforms_error() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let run = agent
        .apply(params(&repo, "v1.0.0", "fail", json!({})))
        .await;
    let e = run.err();
    assert_eq!(e.code, "terraform_failed", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("apply"), "{e:?}");
    assert!(e.message.contains("Error:"), "{e:?}");
    assert!(e.message.contains("exit status 3"), "{e:?}");
    let logs = run.logs(None);
    assert!(logs.contains("boom-marker-7731"), "{logs}");
    assert!(logs.contains("about to fail"), "{logs}");
    let stages = run.stages();
    assert_eq!(
        stages.last(),
        Some(&("apply".to_string(), StageState::Failed)),
        "{stages:?}"
    );
}

#[tokio::test]
async fn unknown_version_or_repository_is_a_clear_error() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let run = agent
        .apply(params(&repo, "v9.9.9", "basic", json!({})))
        .await;
    let e = run.err();
    assert_eq!(e.code, "template_version_not_found", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("fetch_template"));
    assert!(e.message.contains("\"v9.9.9\""), "{e:?}");
    assert_eq!(
        run.stages(),
        [
            ("fetch_template".to_string(), StageState::Running),
            ("fetch_template".to_string(), StageState::Failed)
        ]
    );

    let mut p = params(&repo, "v1.0.0", "basic", json!({}));
    p.template_source.repo = "/nonexistent/trellis-templates.git".into();
    let run = agent.apply(p).await;
    let e = run.err();
    assert_eq!(e.code, "template_fetch_failed", "{e:?}");
    assert!(
        e.message.contains("/nonexistent/trellis-templates.git"),
        "{e:?}"
    );
    assert!(e.message.contains("does not exist"), "{e:?}");

    let run = agent
        .apply(params(&repo, "v1.0.0", "no/such/dir", json!({})))
        .await;
    assert_eq!(run.err().code, "template_path_not_found");

    // Params that fail validation stop before anything runs (no event at all).
    let run = agent
        .apply(params(
            &repo,
            "--upload-pack=touch /tmp/x",
            "basic",
            json!({}),
        ))
        .await;
    assert_eq!(run.err().code, "invalid_params");
    assert!(run.events.is_empty());
}

#[tokio::test]
async fn missing_terraform_binary_is_a_clear_error() {
    let repo = template_repo();
    let mut agent = TerraformAgent::new();
    agent.settings.binary = "/nonexistent/bin/terraform".into();
    let run = agent
        .apply(params(&repo, "v1.0.0", "basic", json!({})))
        .await;
    let e = run.err();
    assert_eq!(e.code, "terraform_unavailable", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("init"));
    assert!(e.message.contains("/nonexistent/bin/terraform"), "{e:?}");
}
