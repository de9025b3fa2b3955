//! `terraform_apply` workspaces on the agent: ones past their retention removed before
//! any apply (and nothing the agent did not make), and applies with the same workspace
//! key run one at a time.
//!
//! The executor is driven directly (no control plane), its events recorded with their
//! arrival time; the tools, template repository and recorder are in
//! `trellis_tests::terraform`. Without Terraform these tests fail (they never skip).

use std::time::Duration;

use serde_json::json;
use trellis_protocol::{LogStream, StageState};
use trellis_tests::terraform::*;
use uuid::Uuid;

#[tokio::test]
async fn workspaces_past_their_retention_are_removed() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let root = agent.work.join("terraform");
    let old = root.join(Uuid::new_v4().to_string());
    let recent = root.join(Uuid::new_v4().to_string());
    let foreign = root.join("not-a-workspace");
    for d in [&old, &recent, &foreign] {
        std::fs::create_dir_all(d.join("src")).expect("mkdir");
    }
    for d in [&old, &foreign] {
        let status = std::process::Command::new("touch")
            .args(["-d", "8 days ago"])
            .arg(d)
            .status()
            .expect("touch");
        assert!(status.success());
    }
    // Any apply cleans up first, even one that then fails.
    let run = agent
        .apply(params(&repo, "v9.9.9", "basic", json!({})))
        .await;
    assert_eq!(run.err().code, "template_version_not_found");
    assert!(!old.exists(), "expired workspace kept");
    assert!(recent.exists(), "recent workspace removed");
    assert!(
        foreign.exists(),
        "a directory the agent did not make was removed"
    );
    assert!(run
        .logs(Some(LogStream::System))
        .contains("removed 1 terraform workspace"));
}

#[tokio::test]
async fn applies_with_the_same_workspace_key_run_one_at_a_time() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let p = params(&repo, "v1.0.0", "slow", json!({"ticks": 3}));
    let (a, b) = tokio::join!(agent.apply(p.clone()), agent.apply(p));
    a.ok();
    b.ok();
    // From its first stage to its end, one run never overlaps the other.
    let span = |r: &Run| {
        (
            r.stage_time("fetch_template", StageState::Running),
            r.finished,
        )
    };
    let (a_span, b_span) = (span(&a), span(&b));
    let (first, second) = if a_span.0 <= b_span.0 {
        (a_span, b_span)
    } else {
        (b_span, a_span)
    };
    assert!(
        second.0 >= first.1 - Duration::from_millis(50),
        "runs overlapped: second started {:?} before the first ended",
        first.1 - second.0
    );
    let waited = if a_span.0 <= b_span.0 { &b } else { &a };
    assert!(
        waited
            .logs(Some(LogStream::System))
            .contains("waiting for another terraform_apply"),
        "{}",
        waited.logs(None)
    );
}
