//! Serves the built UI (`ui/dist`) from the same origin as the API, with `index.html`
//! for client-side routes.

use std::path::{Component, Path};

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::AppState;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_ui.rs"));
}

/// Whether this binary carries the UI (built with the `embed-ui` feature).
pub fn embedded() -> bool {
    !embedded::FILES.is_empty()
}

fn serve_embedded(path: &str) -> Response {
    let find = |p: &str| embedded::FILES.iter().find(|(name, _)| *name == p);
    let (name, bytes, cache) = match find(path).filter(|_| !path.is_empty()) {
        Some((name, bytes)) if name.starts_with("assets/") => {
            (*name, *bytes, "public, max-age=31536000, immutable")
        }
        Some((name, bytes)) => (*name, *bytes, "no-cache"),
        None => match find("index.html") {
            Some((name, bytes)) => (*name, *bytes, "no-cache"),
            None => return (StatusCode::NOT_FOUND, "UI index.html not embedded").into_response(),
        },
    };
    (
        [
            (header::CONTENT_TYPE, content_type(name)),
            (header::CACHE_CONTROL, cache),
        ],
        bytes,
    )
        .into_response()
}

pub async fn serve(State(s): State<AppState>, uri: Uri) -> Response {
    if s.ui_dir.is_none() && embedded() {
        return serve_embedded(uri.path().trim_start_matches('/'));
    }
    let Some(dir) = s.ui_dir.as_deref() else {
        return (
            StatusCode::NOT_FOUND,
            "The UI is not built. Run `npm ci && npm run build` in ui/ (the demo script does this) or pass --ui-dir.",
        )
            .into_response();
    };
    let rel = uri.path().trim_start_matches('/');
    let safe = Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if safe && !rel.is_empty() {
        if let Ok(bytes) = tokio::fs::read(dir.join(rel)).await {
            let cache = if rel.starts_with("assets/") {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            return (
                [
                    (header::CONTENT_TYPE, content_type(rel)),
                    (header::CACHE_CONTROL, cache),
                ],
                bytes,
            )
                .into_response();
        }
    }
    match tokio::fs::read(dir.join("index.html")).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "UI index.html not found").into_response(),
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
