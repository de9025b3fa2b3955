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

/// Mode bits (permissions) of a path.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

const GIT_USER: &str = "deploy-bot";
const GIT_TOKEN: &str = "glpat-Xq9-very-secret-token";
const DB_PASSWORD: &str = "hunter2-very-secret";

/// A template fetched over HTTP from a repository that needs a password, given in the
/// URL (`http://user:token@host/…`), with sensitive variables: the apply works and
/// returns its outputs, and afterwards the workspace (0700, under a 0700 root; the
/// variables file 0600 while it exists) keeps neither the URL's credentials (not in
/// `.git/config`, not anywhere in the clone) nor the state or variables files, and no
/// event shows the credentials.
#[tokio::test]
async fn credentialed_template_leaves_no_secret_in_a_private_workspace() {
    let repo = template_repo();
    let bare = trellis_tests::tempdir::TempDir::new("tf-bare");
    let server = trellis_tests::git::GitHttpServer::start(
        &repo.path,
        &bare.join("templates.git"),
        GIT_USER,
        GIT_TOKEN,
    )
    .await;
    let agent = TerraformAgent::new();
    let mut p = params(
        &repo,
        "v1.0.0",
        "basic",
        json!({"name": "world", "count_n": 2, "db_password": DB_PASSWORD}),
    );
    p.template_source.repo = server.url(&format!("{GIT_USER}:{GIT_TOKEN}"), "templates.git");
    let root = agent.work.join("terraform");
    // While `apply` runs: the workspace is private and the variables file 0600.
    let seen_modes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let modes = seen_modes.clone();
    let root_seen = root.clone();
    let run = agent
        .apply_with(p, move |seen, ctx| {
            if matches!(&seen.body, trellis_protocol::EventBody::Stage { stage, state: StageState::Running, .. } if stage == "apply")
            {
                let ws = root_seen.join(ctx.command_id.to_string());
                modes.lock().unwrap().push((
                    mode(&root_seen),
                    mode(&ws),
                    mode(&ws.join("src/basic/terraform.tfvars.json")),
                ));
            }
        })
        .await;
    let result = run.ok();
    assert_eq!(result.resolved_commit.as_deref(), Some(repo.v1.as_str()));
    assert_eq!(result.outputs["greeting"]["value"], json!("hello world"));
    assert_eq!(result.outputs["doubled"]["value"], json!(4));
    assert_eq!(result.outputs["template_version"]["value"], json!("1"));
    assert_eq!(run.stages(), all_stages_completed());
    assert_eq!(
        *seen_modes.lock().unwrap(),
        [(0o700, 0o700, 0o600)],
        "terraform root, workspace and variables file modes during apply"
    );
    // The server required the password and got it (the clone did not go around it).
    let requests = server.requests.lock().unwrap().clone();
    assert!(requests.iter().any(|(_, ok)| *ok), "{requests:?}");
    assert!(requests.iter().any(|(_, ok)| !*ok), "{requests:?}");

    let ws = root.join(run.id.to_string());
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&ws), 0o700);
    let config = std::fs::read_to_string(ws.join("src/.git/config")).expect(".git/config");
    assert!(
        config.contains(&format!("url = http://{}/templates.git", server.addr)),
        "{config}"
    );
    for secret in [GIT_TOKEN, &format!("{GIT_USER}:"), DB_PASSWORD, "s-world"] {
        let found = files_containing(&ws, secret);
        assert!(found.is_empty(), "{secret:?} left in {found:?}");
    }
    let tpl = ws.join("src/basic");
    for gone in [
        "terraform.tfstate",
        "terraform.tfstate.backup",
        "terraform.tfvars.json",
        ".terraform/terraform.tfstate",
    ] {
        assert!(!tpl.join(gone).exists(), "{gone} kept");
    }
    // What the run needed is still there: the template and the provider.
    assert!(tpl.join("main.tf").exists() || tpl.join("versions.tf").exists());
    assert!(tpl.join(".terraform").is_dir());
    let system = run.logs(Some(LogStream::System));
    assert!(
        system.contains("removed terraform.tfvars.json, terraform.tfstate"),
        "{system}"
    );
    assert!(
        system.contains(&format!("-- http://***@{}/templates.git", server.addr)),
        "{system}"
    );
    for e in &run.events {
        let text = serde_json::to_string(&e.body).expect("event json");
        for secret in [GIT_TOKEN, GIT_USER, DB_PASSWORD] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}

/// A failing apply removes the state and variables too, and an apply finds and scrubs
/// the secret files a killed agent left in an earlier (recent) workspace.
#[tokio::test]
async fn failed_or_interrupted_applies_leave_no_state_behind() {
    let repo = template_repo();
    let agent = TerraformAgent::new();
    let run = agent
        .apply(params(&repo, "v1.0.0", "fail", json!({})))
        .await;
    assert_eq!(run.err().code, "terraform_failed");
    let tpl = agent
        .work
        .join("terraform")
        .join(run.id.to_string())
        .join("src/fail");
    assert!(tpl.is_dir());
    for gone in ["terraform.tfstate", "terraform.tfvars.json"] {
        assert!(!tpl.join(gone).exists(), "{gone} kept after a failed apply");
    }

    // The workspace of an apply whose agent was killed while Terraform ran: it marked
    // where its secrets are, and never got to remove them.
    let ws = agent
        .work
        .join("terraform")
        .join(Uuid::new_v4().to_string());
    let dir = ws.join("src/envs/prod");
    std::fs::create_dir_all(dir.join(".terraform")).unwrap();
    std::fs::create_dir_all(dir.join("terraform.tfstate.d/staging")).unwrap();
    for f in [
        "terraform.tfstate",
        "terraform.tfstate.backup",
        "terraform.tfvars.json",
        ".terraform/terraform.tfstate",
        "terraform.tfstate.d/staging/terraform.tfstate",
    ] {
        std::fs::write(dir.join(f), DB_PASSWORD).unwrap();
    }
    std::fs::write(dir.join("main.tf"), "# template\n").unwrap();
    std::fs::write(ws.join(".trellis-secrets-in"), "src/envs/prod").unwrap();
    // A mark pointing outside its workspace is ignored (and dropped).
    let other = agent
        .work
        .join("terraform")
        .join(Uuid::new_v4().to_string());
    std::fs::create_dir_all(&other).unwrap();
    let outside = agent.work.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("terraform.tfstate"), "keep").unwrap();
    std::fs::write(other.join(".trellis-secrets-in"), "../../outside").unwrap();

    let run = agent
        .apply(params(
            &repo,
            "v1.0.0",
            "basic",
            json!({"name": "n", "db_password": DB_PASSWORD}),
        ))
        .await;
    run.ok();
    assert!(
        files_containing(&ws, DB_PASSWORD).is_empty(),
        "{:?}",
        files_containing(&ws, DB_PASSWORD)
    );
    assert!(
        dir.join("main.tf").exists(),
        "the template itself was removed"
    );
    assert!(!ws.join(".trellis-secrets-in").exists());
    assert!(
        outside.join("terraform.tfstate").exists(),
        "followed a mark out of its workspace"
    );
    assert!(!other.join(".trellis-secrets-in").exists());
}
