//! Git repositories made for a test (Terraform template sources).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs git in `dir` with a fixed identity, `main` as the default branch and no
/// signing; panics on failure, returns stdout (trimmed).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Trellis Test",
            "-c",
            "user.email=test@trellis.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository with a work tree at `path` (branch `main`).
#[derive(Debug, Clone)]
pub struct GitRepo {
    pub path: PathBuf,
}

impl GitRepo {
    /// `git init` in `path` (created if missing).
    pub fn init(path: &Path) -> Self {
        std::fs::create_dir_all(path).expect("create repo dir");
        git(path, &["init", "--quiet", "-b", "main"]);
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Writes `contents` to `file` (relative to the work tree, parents created).
    pub fn write(&self, file: &str, contents: &str) {
        let p = self.path.join(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create dir");
        }
        std::fs::write(p, contents).expect("write file");
    }

    /// Stages everything and commits; returns the new commit's id.
    pub fn commit_all(&self, message: &str) -> String {
        git(&self.path, &["add", "--all"]);
        git(&self.path, &["commit", "--quiet", "-m", message]);
        git(&self.path, &["rev-parse", "HEAD"])
    }

    /// A lightweight tag on `HEAD`.
    pub fn tag(&self, name: &str) {
        git(&self.path, &["tag", name]);
    }

    /// An annotated tag on `HEAD` (message = name).
    pub fn tag_annotated(&self, name: &str) {
        git(&self.path, &["tag", "-a", name, "-m", name]);
    }
}
