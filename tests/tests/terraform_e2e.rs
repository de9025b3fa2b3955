//! `terraform_apply` end to end: the admin API → trellis → a real tendril running the real
//! Terraform 1.0.3 with the null provider → logs streamed live over SSE → result stored.

use std::time::{Duration, Instant};

use serde_json::json;
use trellis_tests::git::GitRepo;
use trellis_tests::harness::*;
use trellis_tests::sse::SseStream;
use trellis_tests::terraform::terraform_env;

const MAIN_TF: &str = r#"
variable "greeting" {
  type = string
}
# Not marked sensitive in Terraform (so Terraform prints it): the agent must redact it
# because of its name.
variable "api_token" {
  type = string
}
resource "null_resource" "steps" {
  triggers = { greeting = var.greeting }
  provisioner "local-exec" {
    command = "for i in 1 2 3 4 5 6; do echo \"step $i of 6: ${var.greeting}\"; sleep 0.5; done"
  }
}
resource "null_resource" "leak" {
  provisioner "local-exec" {
    command = "echo \"token=${var.api_token}\""
  }
}
output "greeting" {
  value = "${var.greeting}, world"
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_streams_logs_live_and_stores_outputs() {
    let (dir, cp, api) = control_plane(Backend::Sqlite, "tf-e2e").await;
    let repo = GitRepo::init(&dir.join("template"));
    repo.write("main.tf", MAIN_TF);
    repo.commit_all("template");
    repo.tag("v1.0.0");

    let (agent_id, token) = api.create_agent("tf-host").await;
    let env = terraform_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _agent = Agent::start_with(&cp.ws_url(), &token, &dir.join("agent"), &env);
    api.wait_agent_online(&agent_id).await;

    let secret = "hunter2-very-secret";
    let cid = api
        .command(
            &agent_id,
            "terraform_apply",
            json!({"template_source": {"repo": repo.path.to_str().unwrap(), "version": "v1.0.0"},
                   "terraform_vars": {"greeting": "hello", "api_token": secret},
                   "meta": {"triggered_by": "test", "reason": "e2e"}}),
        )
        .await;

    // Follow the live SSE stream and note when each "step" line arrives.
    let started = Instant::now();
    let mut events = SseStream::subscribe(&api, &cid).await;
    let mut arrivals: Vec<(String, Duration)> = Vec::new();
    let mut stages = Vec::new();
    let mut finished_at = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(120), events.next())
        .await
        .expect("stream stalled")
    {
        let v = ev.json();
        match ev.event.as_str() {
            "log" => {
                for line in v["data"]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .filter(|l| l.contains("step "))
                {
                    arrivals.push((line.to_string(), started.elapsed()));
                }
            }
            "stage" => stages.push((
                v["stage"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
            )),
            "finished" => {
                finished_at = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    let finished_at = finished_at.expect("finished event");
    let c = api.wait_done(&cid, Duration::from_secs(30)).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(
        c["result"]["outputs"]["greeting"]["value"], "hello, world",
        "{c}"
    );

    // Lines arrived while terraform was still running, spread out, not all at the end.
    let steps: Vec<_> = arrivals
        .iter()
        .filter(|(l, _)| l.contains("of 6"))
        .collect();
    assert!(steps.len() >= 6, "{arrivals:?}");
    let first = steps.first().unwrap().1;
    let last = steps.last().unwrap().1;
    assert!(
        last - first >= Duration::from_millis(1500),
        "lines arrived together: {arrivals:?}"
    );
    assert!(
        finished_at - first >= Duration::from_millis(1500),
        "first line only at the end: {arrivals:?} finished {finished_at:?}"
    );

    // Every stage reported, in order.
    let completed: Vec<&str> = stages
        .iter()
        .filter(|(_, s)| s == "completed")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(completed, ["fetch_template", "init", "apply", "outputs"]);

    // The sensitive value appears nowhere: not in logs, not in the command as the API shows it.
    let logs = api.all_logs(&cid).await;
    assert!(!logs.is_empty());
    let all = serde_json::to_string(&logs).unwrap() + &c.to_string();
    assert!(!all.contains(secret), "secret leaked");
    assert!(
        all.contains("token="),
        "the line with the secret was logged, redacted: {all}"
    );
    assert_eq!(c["params"]["terraform_vars"]["api_token"], "***");
    assert_eq!(c["params"]["terraform_vars"]["greeting"], "hello");
}
