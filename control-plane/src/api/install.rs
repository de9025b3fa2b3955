//! Installing an agent from the control plane itself: `GET /install/tendril.sh` (a POSIX
//! sh script embedded in this binary), `GET /install/tendril` (the tendril binary trellis
//! was shipped with), `GET /install/tendril.service` (the systemd unit the script
//! installs), and `GET /api/agents/self`, with which the script — holding only the agent
//! token, not an admin's — learns when its agent is online and what it is called.
//!
//! The install routes need no authentication: they hand out nothing secret (the token is
//! the installer's to bring), and a Proxmox host must be able to fetch them with curl.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::types::{AgentSelf, ErrorBody};
use super::{AppError, AppState, Json};

/// The install script, served as-is.
pub const INSTALL_SCRIPT: &str = include_str!("../../../packaging/install-tendril.sh");

/// The systemd unit of the agent (the same file the tendril .deb ships).
pub const TENDRIL_UNIT: &str = include_str!("../../../packaging/tendril.service");

/// The routes of this module (no authentication).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/install/tendril.sh", get(script))
        .route("/install/tendril.service", get(unit))
        .route("/install/tendril", get(binary))
        .route("/api/agents/self", get(agent_self))
}

/// The agent binary to serve: the configured path, else a `tendril` file beside the
/// running trellis executable (how the release archive and `target/` lay them out).
pub fn default_agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("tendril"))
}

/// The install one-liner for a control plane reached at `public_url`: the token is not
/// part of it (the script asks for it on the terminal, or takes `TENDRIL_TOKEN` from the
/// environment), so it does not land in shell history.
pub fn one_liner(public_url: &str, server_public_key: Option<&str>) -> String {
    let base = public_url.trim_end_matches('/');
    let mut cmd = format!("curl -fsSL {base}/install/tendril.sh | sh -s -- --server {base}");
    if let Some(k) = server_public_key.filter(|k| !k.is_empty()) {
        cmd.push_str(&format!(" --server-public-key {k}"));
    }
    if needs_insecure_plaintext(base) {
        cmd.push_str(" --insecure-plaintext");
    }
    cmd
}

/// Whether an agent reaching `base` would speak plain `ws://` to a host that is not
/// loopback (tendril refuses that without `--insecure-plaintext`).
fn needs_insecure_plaintext(base: &str) -> bool {
    let Some(rest) = base.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    !(host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INSTALL_SCRIPT,
    )
        .into_response()
}

async fn unit() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        TENDRIL_UNIT,
    )
        .into_response()
}

/// Read size of the binary stream: large enough to keep a LAN busy, small enough that
/// a few concurrent downloads cost little memory.
const CHUNK: usize = 256 * 1024;

/// Streams the agent binary (never read into memory whole: a debug build is >100 MiB).
async fn binary(State(s): State<AppState>) -> Response {
    let Some(path) = s.agent_binary.as_deref() else {
        return missing_binary(None);
    };
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the agent binary");
            return missing_binary(Some(path));
        }
    };
    let len = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return missing_binary(Some(path)),
    };
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        match f.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok::<_, std::io::Error>(buf.freeze()), f)),
            Err(e) => Some((Err(e), f)),
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"tendril\"".to_string(),
            ),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn missing_binary(path: Option<&Path>) -> Response {
    let where_ = path.map_or_else(
        || "none is configured".to_string(),
        |p| format!("{} does not exist or cannot be read", p.display()),
    );
    AppError::NotFound(format!(
        "this trellis has no tendril binary to hand out ({where_}); put one beside the trellis \
         executable or pass --agent-binary (TRELLIS_AGENT_BINARY)"
    ))
    .into_response()
}

/// The calling agent (by its token): its name and whether trellis has it online. For the
/// install script, which waits for its agent to connect and holds no admin token. No admin
/// authentication: the agent token goes in `Authorization: Bearer`.
#[utoipa::path(get, path = "/api/agents/self", tag = "agents",
    security(()),
    responses((status = 200, body = AgentSelf),
        (status = 401, description = "Missing, unknown or revoked agent token", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address", body = ErrorBody)))]
pub async fn agent_self(
    State(s): State<AppState>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
) -> Response {
    let ip = super::auth::remote_ip(&ext);
    // Counted with admin token failures: this is a token oracle like any other.
    if s.auth.limiter.blocked(ip) {
        return super::auth::too_many();
    }
    let Some(token) = crate::auth::bearer(headers.get(header::AUTHORIZATION)) else {
        return AppError::Unauthorized("missing agent token".into()).into_response();
    };
    match s.db.agent_by_token_hash(&crate::auth::hash(token)).await {
        Ok(Some((agent, stored))) if crate::auth::verify(token, &stored) => Json(AgentSelf {
            id: agent.id,
            name: agent.name,
            status: agent.status,
        })
        .into_response(),
        Ok(_) => {
            if s.auth.limiter.fail(ip).over {
                return super::auth::too_many();
            }
            AppError::Unauthorized("unknown or revoked agent token".into()).into_response()
        }
        Err(e) => AppError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_liner_carries_no_token_and_flags_plaintext() {
        let c = one_liner("https://t.example.com/", Some("KEY"));
        assert_eq!(
            c,
            "curl -fsSL https://t.example.com/install/tendril.sh | sh -s -- \
             --server https://t.example.com --server-public-key KEY"
        );
        assert!(one_liner("http://10.0.0.5:8080", None).ends_with(" --insecure-plaintext"));
        assert!(!one_liner("http://127.0.0.1:8080", None).contains("insecure"));
        assert!(!one_liner("http://localhost:8080", None).contains("insecure"));
        assert!(!one_liner("http://[::1]:8080", None).contains("insecure"));
    }

    #[test]
    fn the_script_and_unit_are_embedded() {
        assert!(INSTALL_SCRIPT.starts_with("#!/bin/sh"));
        assert!(TENDRIL_UNIT.contains("ExecStart=/usr/bin/tendril"));
    }
}
