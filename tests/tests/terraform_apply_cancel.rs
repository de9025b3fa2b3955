//! Cancelling `terraform_apply`: SIGINT stops Terraform and everything it started
//! (provider, provisioner shell, its children), and a `terraform` that ignores SIGINT is
//! killed with its process group after the grace period.
//!
//! The executor is driven directly (no control plane), its events recorded with their
//! arrival time; the tools, template repository and recorder are in
//! `trellis_tests::terraform`. Without Terraform these tests fail (they never skip).

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_protocol::{CancelReason, EventBody, LogStream};
use trellis_tests::terraform::*;

#[tokio::test]
async fn cancel_stops_terraform_and_everything_it_started() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let marker = unique_sleep_marker();
    let mut cancelled_at = None;
    let run = agent
        .apply_with(
            params(&repo, "v1.0.0", "cancel", json!({"sleep_for": marker})),
            |seen, ctx| {
                if let EventBody::Log { data, .. } = &seen.body {
                    if data.contains("(local-exec): started\n") && cancelled_at.is_none() {
                        cancelled_at = Some(Instant::now());
                        ctx.request_cancel(CancelReason::Cancelled);
                    }
                }
            },
        )
        .await;
    let cancelled_at = cancelled_at.expect("the provisioner never started");
    let e = run.err();
    assert_eq!(e.code, "cancelled", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("apply"), "{e:?}");
    assert!(
        run.finished - cancelled_at < Duration::from_secs(8),
        "stopping took {:?}",
        run.finished - cancelled_at
    );
    assert!(
        run.logs(Some(LogStream::System)).contains("SIGINT"),
        "{}",
        run.logs(None)
    );
    assert!(!run.logs(None).contains("(local-exec): finished"));
    // Terraform, its provider and the provisioner's shell and sleep are all gone.
    let left = processes_matching(&marker, &agent.work);
    assert!(left.is_empty(), "still running: {left:?}");
}

/// Terraform stops its provisioners itself on SIGINT; a `terraform` that ignores SIGINT
/// (a stand-in script here) is killed with its whole process group after the grace period.
#[tokio::test]
async fn cancel_kills_after_the_grace_period_when_sigint_is_ignored() {
    let repo = template_repo();
    let mut agent = TerraformAgent::new();
    let marker = unique_sleep_marker();
    agent.settings.binary = agent.fake_terraform(&format!(
        "trap '' INT; echo started; sleep {marker}; echo finished"
    ));
    agent.settings.sigint_grace = Duration::from_millis(1500);
    let mut cancelled_at = None;
    let run = agent
        .apply_with(params(&repo, "v1.0.0", "basic", json!({})), |seen, ctx| {
            if let EventBody::Log { data, .. } = &seen.body {
                if data.contains("started\n") && cancelled_at.is_none() {
                    cancelled_at = Some(Instant::now());
                    ctx.request_cancel(CancelReason::TimedOut);
                }
            }
        })
        .await;
    let cancelled_at = cancelled_at.expect("the stand-in never started");
    let e = run.err();
    assert_eq!(e.code, "cancelled", "{e:?}");
    assert_eq!(e.stage.as_deref(), Some("apply"), "{e:?}");
    assert!(e.message.contains("killed"), "{e:?}");
    let took = run.finished - cancelled_at;
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "stopping took {took:?}"
    );
    assert!(run
        .logs(Some(LogStream::System))
        .contains("sending SIGKILL"));
    assert!(!run.logs(Some(LogStream::Stdout)).contains("finished"));
    let left = processes_matching(&marker, &agent.work);
    assert!(left.is_empty(), "still running: {left:?}");
}
