//! Fetching the template at exactly the requested version with the git CLI.
//!
//! Clone (no checkout), resolve the version as a tag, then a branch, then a commit id,
//! and check out that commit detached. Every argument that comes from the params follows
//! `--` or `--end-of-options`; git runs without a shell, without a terminal to prompt on,
//! and only over the file, git, http(s) and ssh transports (never `ext::`).

use std::path::{Path, PathBuf};

use trellis_protocol::CommandError;

use super::logs::LogSink;
use super::process::{self, ProcSpec};
use super::{cancelled_error, TerraformSettings};
use crate::exec::ExecContext;

pub struct Fetched {
    /// The full commit id the version resolved to.
    pub commit: String,
    /// The checked-out template directory (`path` inside the clone).
    pub dir: PathBuf,
}

const STAGE: &str = "fetch_template";

/// Where a git source lives, normalised for `git clone`.
pub fn clone_source(repo: &str) -> String {
    if repo.contains("://") {
        return repo.to_string();
    }
    let p = Path::new(repo);
    if p.is_relative() && p.exists() {
        if let Ok(abs) = std::path::absolute(p) {
            return abs.display().to_string();
        }
    }
    repo.to_string()
}

fn git_spec(settings: &TerraformSettings, cwd: &Path) -> ProcSpec {
    let mut spec = ProcSpec::new(&settings.git_binary, cwd)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GCM_INTERACTIVE", "never");
    if std::env::var_os("GIT_SSH_COMMAND").is_none() {
        spec = spec.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    spec
}

pub async fn fetch(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    repo: &str,
    version: &str,
    subdir: Option<&str>,
    workspace: &Path,
) -> Result<Fetched, CommandError> {
    let clone_dir = workspace.join("src");
    let source = clone_source(repo);
    let shown = sink.redactor().redact(&display_repo(repo)).into_owned();

    let credentialed = !url_credentials(repo).is_empty();
    let mut spec = git_spec(settings, workspace);
    if credentialed {
        // The URL's credentials must not be handed to a credential helper to keep.
        spec = spec.arg("-c").arg("credential.helper=");
    }
    let spec = spec
        .arg("clone")
        .arg("--no-checkout")
        .arg("--quiet")
        .arg("--")
        .arg(&source)
        .arg(&clone_dir)
        .shown_as(format!(
            "$ git clone --no-checkout --quiet -- {shown} {}",
            clone_dir.display()
        ));
    let out = run_git(ctx, sink, settings, spec).await;
    // Whatever happened, the clone's config must not keep the credentials.
    if credentialed && clone_dir.join(".git").is_dir() {
        strip_remote_credentials(sink, settings, &clone_dir, repo).await?;
    }
    let out = out?;
    if !out.status.success() {
        return Err(CommandError::new(
            "template_fetch_failed",
            format!(
                "cannot clone template repository {shown}: {}",
                out.error_excerpt(1500)
            ),
        )
        .at_stage(STAGE));
    }

    let Some(commit) = resolve(ctx, settings, &clone_dir, version).await? else {
        return Err(CommandError::new(
            "template_version_not_found",
            format!(
                "version {version:?} not found in template repository {shown}: \
                 no tag, branch or commit of that name"
            ),
        )
        .at_stage(STAGE));
    };
    sink.system(&format!("version {version} is commit {commit}"))
        .await;

    let spec = git_spec(settings, &clone_dir)
        .arg("-c")
        .arg("advice.detachedHead=false")
        .arg("checkout")
        .arg("--quiet")
        .arg("--detach")
        .arg(&commit)
        .arg("--");
    let out = run_git(ctx, sink, settings, spec).await?;
    if !out.status.success() {
        return Err(CommandError::new(
            "template_fetch_failed",
            format!("cannot check out {commit}: {}", out.error_excerpt(1500)),
        )
        .at_stage(STAGE));
    }

    let dir = template_dir(&clone_dir, subdir, version)?;
    Ok(Fetched { commit, dir })
}

/// Sets `origin`'s URL to `repo` without its user info, right after the clone: git
/// writes the URL it cloned from into `.git/config`, credentials and all, and the
/// workspace outlives the command. Everything after the clone is local. Runs even when
/// the command is being cancelled (it takes milliseconds); if the credentials cannot be
/// removed, the clone is.
async fn strip_remote_credentials(
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    clone_dir: &Path,
    repo: &str,
) -> Result<(), CommandError> {
    let clean = without_credentials(repo);
    let set = tokio::process::Command::new(&settings.git_binary)
        .current_dir(clone_dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["config", "--local", "--replace-all", "remote.origin.url"])
        .arg(&clean)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await;
    let userinfo = url_credentials(repo).pop().unwrap_or_default();
    let config = clone_dir.join(".git/config");
    let clean_config = tokio::fs::read_to_string(&config)
        .await
        .is_ok_and(|text| !text.contains(&format!("{userinfo}@")));
    if set.is_ok_and(|s| s.success()) && clean_config {
        sink.system("removed the credentials from the clone's remote URL")
            .await;
        return Ok(());
    }
    let _ = tokio::fs::remove_dir_all(clone_dir).await;
    Err(CommandError::new(
        "template_fetch_failed",
        "cannot remove the credentials from the cloned repository's configuration; \
         the clone was deleted",
    )
    .at_stage(STAGE))
}

async fn run_git(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    settings: &TerraformSettings,
    spec: ProcSpec,
) -> Result<process::ProcOutput, CommandError> {
    let program = spec.program.display().to_string();
    let out = process::run(ctx, sink, spec, settings.sigint_grace, &mut |_| None)
        .await
        .map_err(|e| {
            CommandError::new(
                "git_unavailable",
                format!("cannot run git ({program}): {e}; install git or set TENDRIL_GIT_BIN"),
            )
            .at_stage(STAGE)
        })?;
    if out.cancelled || ctx.is_cancelled() {
        return Err(cancelled_error(STAGE, &out));
    }
    Ok(out)
}

/// The full commit id of `version`: a tag, else a branch of the origin, else a commit id
/// (4 to 64 hex digits). `None` when it names none of them.
async fn resolve(
    ctx: &ExecContext,
    settings: &TerraformSettings,
    clone_dir: &Path,
    version: &str,
) -> Result<Option<String>, CommandError> {
    let mut candidates = vec![
        format!("refs/tags/{version}"),
        format!("refs/remotes/origin/{version}"),
    ];
    if (4..=64).contains(&version.len()) && version.bytes().all(|b| b.is_ascii_hexdigit()) {
        candidates.push(version.to_string());
    }
    for candidate in candidates {
        let mut cmd = tokio::process::Command::new(&settings.git_binary);
        cmd.current_dir(clone_dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
            .arg(format!("{candidate}^{{commit}}"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::select! {
            out = cmd.output() => out,
            _ = ctx.cancel.cancelled() => {
                return Err(CommandError::new("cancelled", "cancelled while resolving the version")
                    .at_stage(STAGE));
            }
        };
        let out = out.map_err(|e| {
            CommandError::new("git_unavailable", format!("cannot run git: {e}")).at_stage(STAGE)
        })?;
        let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !sha.is_empty() {
            return Ok(Some(sha));
        }
    }
    Ok(None)
}

/// The template directory inside the clone; it must stay inside the clone (no symlink
/// out of it) and hold Terraform files.
fn template_dir(
    clone_dir: &Path,
    subdir: Option<&str>,
    version: &str,
) -> Result<PathBuf, CommandError> {
    let sub = subdir.unwrap_or("").trim_matches('/');
    let shown = if sub.is_empty() { "." } else { sub };
    let not_found = || {
        CommandError::new(
            "template_path_not_found",
            format!("template path {shown:?} does not exist at version {version}"),
        )
        .at_stage(STAGE)
    };
    let root = clone_dir.canonicalize().map_err(|_| not_found())?;
    let dir = root.join(sub).canonicalize().map_err(|_| not_found())?;
    if !dir.starts_with(&root) {
        return Err(CommandError::new(
            "invalid_params",
            format!("template path {shown:?} leads outside the repository"),
        )
        .at_stage(STAGE));
    }
    if !dir.is_dir() {
        return Err(not_found());
    }
    let has_tf = std::fs::read_dir(&dir)
        .map_err(|_| not_found())?
        .flatten()
        .any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".tf") || name.ends_with(".tf.json")
        });
    if !has_tf {
        return Err(CommandError::new(
            "template_invalid",
            format!("template path {shown:?} at version {version} has no .tf files"),
        )
        .at_stage(STAGE));
    }
    Ok(dir)
}

/// A repository for messages: a URL without its user info (credentials).
pub fn display_repo(repo: &str) -> String {
    if let Some((scheme, rest)) = repo.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://***@{host}{path}");
        }
    }
    repo.to_string()
}

/// `repo` without the user info of its URL (`https://user:token@host/x` becomes
/// `https://host/x`); anything else unchanged.
pub fn without_credentials(repo: &str) -> String {
    if let Some((scheme, rest)) = repo.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((_, host)) = authority.rsplit_once('@') {
            return format!("{scheme}://{host}{path}");
        }
    }
    repo.to_string()
}

/// The user info of a URL (`user:password@` or `token@`), to be redacted wherever git
/// echoes it.
pub fn url_credentials(repo: &str) -> Vec<String> {
    let Some((_, rest)) = repo.split_once("://") else {
        return Vec::new();
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Vec::new();
    };
    let mut parts: Vec<String> = userinfo.split(':').map(str::to_string).collect();
    parts.push(userinfo.to_string());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            display_repo("https://bob:s3cret@git.example/x/y.git"),
            "https://***@git.example/x/y.git"
        );
        assert_eq!(display_repo("/srv/repo"), "/srv/repo");
        assert_eq!(
            without_credentials("https://bob:s3cret@git.example/x/y.git"),
            "https://git.example/x/y.git"
        );
        assert_eq!(
            without_credentials("ssh://git@git.example:22/x"),
            "ssh://git.example:22/x"
        );
        assert_eq!(without_credentials("/srv/repo"), "/srv/repo");
        assert_eq!(
            url_credentials("https://bob:s3cret@git.example/x"),
            ["bob", "s3cret", "bob:s3cret"]
        );
        assert_eq!(
            url_credentials("https://ghp_abc123@git.example/x"),
            ["ghp_abc123", "ghp_abc123"]
        );
        assert!(url_credentials("https://git.example/x").is_empty());
        assert!(url_credentials("/srv/x").is_empty());
    }
}
