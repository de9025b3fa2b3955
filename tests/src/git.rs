//! Git repositories made for a test (Terraform template sources), and a git server over
//! HTTP that requires a password ([`GitHttpServer`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

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

/// A git server over HTTP (git's "dumb" protocol: the files of a bare repository) that
/// answers only requests with HTTP basic auth `user:password`, as a private Git host
/// does. Stops when dropped.
pub struct GitHttpServer {
    pub addr: SocketAddr,
    /// Every request: its path, and whether it carried the right credentials.
    pub requests: Arc<Mutex<Vec<(String, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GitHttpServer {
    /// Serves a bare clone of `source` (made, with `git update-server-info`, at
    /// `bare_dir`) on 127.0.0.1 as `/<name>.git`.
    pub async fn start(source: &Path, bare_dir: &Path, user: &str, password: &str) -> Self {
        use base64::Engine as _;
        let out = Command::new("git")
            .args(["clone", "--bare", "--quiet", "--no-local"])
            .arg(source)
            .arg(bare_dir)
            .output()
            .expect("git clone --bare");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        git(bare_dir, &["update-server-info"]);
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let requests: Arc<Mutex<Vec<(String, bool)>>> = Default::default();
        let root = bare_dir.to_path_buf();
        let seen = requests.clone();
        let handler = move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let root = root.clone();
            let expected = expected.clone();
            let seen = seen.clone();
            async move { serve_file(&root, &expected, &seen, uri.path(), &headers).await }
        };
        let app = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind git server");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    /// `http://user:password@127.0.0.1:port/<path>`.
    pub fn url(&self, userinfo: &str, path: &str) -> String {
        format!("http://{userinfo}@{}/{path}", self.addr)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_file(
    root: &Path,
    expected_auth: &str,
    seen: &Mutex<Vec<(String, bool)>>,
    path: &str,
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(expected_auth);
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path.to_string(), authorized));
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"git\"")],
            "authentication required",
        )
            .into_response();
    }
    // `/<anything>.git/<file>`: the file inside the bare repository.
    let rel = path
        .trim_start_matches('/')
        .split_once(".git/")
        .map(|(_, f)| f)
        .unwrap_or_default();
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(root.join(rel)).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
