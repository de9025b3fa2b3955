//! Who is calling. Every admin request carries either `Authorization: Bearer <token>` (the
//! bootstrap admin's token or a named admin's, for API clients and the CLI) or the
//! `trellis_session` cookie that `POST /api/session` sets after checking such a token (the
//! browser: no script ever holds the token). `require_admin` resolves the [`Admin`],
//! attaches it to the request, and writes the request's audit row (see [`super::audit`]).
//!
//! Cookies: `HttpOnly; SameSite=Strict; Path=/` (plus `Secure` over TLS), a fixed 12-hour
//! life. Against cross-site request forgery, besides `SameSite=Strict`, a request that
//! authenticates with the cookie and changes something (any method but GET/HEAD) must
//! carry the header `X-Trellis-Request: 1`, which a cross-site form cannot send and a
//! cross-site script cannot add without a CORS preflight (which Trellis never allows).
//! Failed sign-ins and invalid tokens are limited per remote IP ([`FailureLimiter`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::audit::{self, Audit};
use super::types::{ErrorBody, SessionInfo, SignInRequest};
use super::{ApiResult, AppError, AppState, Json};
use crate::domain::admins;

pub use crate::domain::admins::BOOTSTRAP_ADMIN;

pub const SESSION_COOKIE: &str = "trellis_session";
/// The header a cookie-authenticated mutating request must carry.
pub const CSRF_HEADER: &str = "x-trellis-request";
/// Failed authentications per remote IP per window before `429`.
pub const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Remote IPs tracked at most (memory bound); when full, expired entries are dropped and,
/// if none expired, new IPs share one bucket.
const MAX_TRACKED: usize = 10_000;

/// The authenticated admin of a request. Handlers take it as an extractor; it is only
/// present behind `require_admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub name: String,
    /// How the request authenticated.
    pub via: Via,
    /// The session's expiry (cookie only).
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Token,
    Cookie,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Admin>()
            .cloned()
            .ok_or_else(|| AppError::Unauthorized("not signed in".into()))
    }
}

/// The remote address of the connection (set by the server; absent in in-process tests).
pub fn remote_ip(ext: &axum::http::Extensions) -> Option<IpAddr> {
    ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Authentication settings and the failure limiter, shared by all requests.
pub struct AuthState {
    /// Add `Secure` to the cookie (the server speaks TLS).
    pub secure_cookies: bool,
    pub limiter: FailureLimiter,
}

impl AuthState {
    pub fn new(secure_cookies: bool) -> Self {
        Self {
            secure_cookies,
            limiter: FailureLimiter::default(),
        }
    }
}

/// Counts failed authentications per remote IP in fixed one-minute windows, in memory
/// and bounded ([`MAX_TRACKED`] IPs).
#[derive(Default)]
pub struct FailureLimiter {
    map: Mutex<HashMap<Option<IpAddr>, (Instant, u32)>>,
}

impl FailureLimiter {
    /// Whether `ip` has used up its failures for the current window.
    pub fn blocked(&self, ip: Option<IpAddr>) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < FAILURE_WINDOW && *n >= MAX_FAILURES)
    }

    /// Counts a failure; `true` when the limit is now exceeded.
    pub fn fail(&self, ip: Option<IpAddr>) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
        }
        let key = if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            None
        } else {
            ip
        };
        let e = map.entry(key).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        e.1 > MAX_FAILURES
    }
}

fn too_many() -> Response {
    let body = ErrorBody {
        error: super::types::ErrorDetail {
            code: "too_many_requests".into(),
            message: format!(
                "too many failed sign-ins from this address; wait a minute (at most {MAX_FAILURES} a minute)"
            ),
        },
    };
    let mut r = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    r
}

/// The session cookie's value, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == SESSION_COOKIE && !v.is_empty()).then(|| v.to_string())
        })
}

fn set_cookie(secure: bool, secret: &str, max_age_s: i64) -> HeaderValue {
    let v = format!(
        "{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(secure: bool) -> HeaderValue {
    set_cookie(secure, "", 0)
}

enum Credential {
    Token(String),
    Cookie(String),
    /// `?access_token=`, no longer accepted.
    InQuery,
    None,
}

fn credential(req: &Request) -> Credential {
    // A token in the URL ends up in logs, proxies and browser history: refused, even
    // beside a valid header.
    if req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("access_token=")))
    {
        return Credential::InQuery;
    }
    if let Some(t) = crate::auth::bearer(req.headers().get(header::AUTHORIZATION)) {
        return Credential::Token(t.to_string());
    }
    match session_cookie(req.headers()) {
        Some(c) => Credential::Cookie(c),
        None => Credential::None,
    }
}

/// Resolves the admin of a request; `Err` is the response to send (401/403/429).
async fn authenticate(
    s: &AppState,
    cred: Credential,
    mutating: bool,
    csrf_header: bool,
) -> Result<Admin, (Response, bool)> {
    let unauthorized = |msg: &str| AppError::Unauthorized(msg.into()).into_response();
    let cookie = matches!(cred, Credential::Cookie(_));
    let resolved = match cred {
        Credential::Token(t) => admins::authenticate(&s.db, &s.admin_token_hash, &t)
            .await
            .map(|o| {
                o.map(|name| Admin {
                    name,
                    via: Via::Token,
                    expires_at: None,
                })
            }),
        Credential::Cookie(c) => admins::session(&s.db, &c).await.map(|o| {
            o.map(|(name, exp)| Admin {
                name,
                via: Via::Cookie,
                expires_at: Some(exp),
            })
        }),
        Credential::None => {
            return Err((
                unauthorized("not signed in: sign in, or send Authorization: Bearer <admin token>"),
                false,
            ))
        }
        Credential::InQuery => {
            return Err((
                unauthorized(
                    "tokens in the URL (access_token) are not accepted: send Authorization: \
                     Bearer <admin token>, or sign in and use the session cookie",
                ),
                false,
            ))
        }
    };
    match resolved {
        Ok(Some(a)) => {
            if a.via == Via::Cookie && mutating && !csrf_header {
                let body = ErrorBody {
                    error: super::types::ErrorDetail {
                        code: "csrf_header_missing".into(),
                        message: format!(
                            "a request signed in with the session cookie must send the {CSRF_HEADER} header"
                        ),
                    },
                };
                return Err((
                    (StatusCode::FORBIDDEN, axum::Json(body)).into_response(),
                    false,
                ));
            }
            Ok(a)
        }
        Ok(None) => {
            let mut r = unauthorized(if cookie {
                "the session has expired or was signed out: sign in again"
            } else {
                "the admin token is not valid"
            });
            if cookie {
                r.headers_mut()
                    .insert(header::SET_COOKIE, clear_cookie(s.auth.secure_cookies));
            }
            Err((r, true))
        }
        Err(e) => Err((AppError::from(e).into_response(), false)),
    }
}

/// Admin authentication (bearer token or session cookie) and the audit row of every
/// admin request that changes something, and of every failed authentication.
pub async fn require_admin(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let ip = remote_ip(req.extensions());
    let what = audit::describe(&req);
    let cred = credential(&req);
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD);
    let csrf_header = req.headers().contains_key(CSRF_HEADER);
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    match authenticate(&s, cred, mutating, csrf_header).await {
        Ok(admin) => {
            let name = admin.name.clone();
            req.extensions_mut().insert(admin);
            let Some(what) = what else {
                return next.run(req).await;
            };
            // A change runs to its end with its audit row even if the client goes away:
            // hyper drops the request's future on a disconnect, so the handler runs as a
            // task of its own (on the app's tracker, which shutdown waits for) that the
            // request only awaits.
            let state = s.clone();
            let work = async move {
                let resp = next.run(req).await;
                let a = audit::row_for(&name, what, ip, &resp);
                audit::record(&state, a).await;
                resp
            };
            match s.tasks.spawn(work).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::error!(error = %e, %method, %path, "admin request task failed");
                    AppError::Internal(anyhow::anyhow!("the request failed")).into_response()
                }
            }
        }
        Err((resp, invalid)) => {
            if invalid {
                if s.auth.limiter.fail(ip) {
                    return too_many();
                }
                let mut a = Audit::new("anonymous", "auth.failed", &resp, ip);
                a.details = Some(serde_json::json!({
                    "method": method,
                    "path": path,
                }));
                audit::record(&s, a).await;
            }
            resp
        }
    }
}

/// Sign in: exchange an admin token for a session cookie (`HttpOnly`, `SameSite=Strict`,
/// 12 hours). At most 10 failed sign-ins a minute per remote address (then `429`).
#[utoipa::path(post, path = "/api/session", tag = "session", request_body = SignInRequest, security(()),
    responses((status = 200, description = "Signed in; the `trellis_session` cookie is set", body = SessionInfo),
        (status = 400, body = ErrorBody),
        (status = 401, description = "The token is not valid", body = ErrorBody),
        (status = 429, description = "Too many failed sign-ins from this address", body = ErrorBody)))]
pub async fn sign_in(
    State(s): State<AppState>,
    ext: axum::http::Extensions,
    Json(b): Json<SignInRequest>,
) -> Response {
    let ip = remote_ip(&ext);
    if s.auth.limiter.blocked(ip) {
        return too_many();
    }
    let who = match admins::authenticate(&s.db, &s.admin_token_hash, b.token.trim()).await {
        Ok(w) => w,
        Err(e) => return AppError::from(e).into_response(),
    };
    let Some(name) = who else {
        let resp = AppError::Unauthorized("the admin token is not valid".into()).into_response();
        let resp = if s.auth.limiter.fail(ip) {
            too_many()
        } else {
            resp
        };
        let a = Audit::new("anonymous", "auth.sign_in", &resp, ip);
        audit::record(&s, a).await;
        return resp;
    };
    let (secret, expires_at) = match admins::start_session(&s.db, &name).await {
        Ok(x) => x,
        Err(e) => return AppError::from(e).into_response(),
    };
    let mut resp = Json(SessionInfo {
        name: name.clone(),
        via: "cookie".into(),
        expires_at: Some(expires_at),
    })
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(
            s.auth.secure_cookies,
            &secret,
            admins::SESSION_TTL_MS / 1000,
        ),
    );
    let a = Audit::new(&name, "auth.sign_in", &resp, ip);
    audit::record(&s, a).await;
    resp
}

/// Who is signed in (by the session cookie or the bearer token); `401` if nobody.
#[utoipa::path(get, path = "/api/session", tag = "session",
    responses((status = 200, body = SessionInfo), (status = 401, body = ErrorBody)))]
pub async fn who(admin: Admin) -> ApiResult<Json<SessionInfo>> {
    Ok(Json(SessionInfo {
        name: admin.name,
        via: match admin.via {
            Via::Token => "token",
            Via::Cookie => "cookie",
        }
        .into(),
        expires_at: admin.expires_at,
    }))
}

/// Sign out: ends the session and clears the cookie (`204` also without a session).
#[utoipa::path(delete, path = "/api/session", tag = "session", security(()),
    responses((status = 204, description = "Signed out")))]
pub async fn sign_out(
    State(s): State<AppState>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(c) = session_cookie(&headers) {
        if let Some((name, _)) = admins::session(&s.db, &c).await? {
            admins::end_session(&s.db, &c).await?;
            let mut resp = StatusCode::NO_CONTENT.into_response();
            resp.headers_mut()
                .insert(header::SET_COOKIE, clear_cookie(s.auth.secure_cookies));
            let a = Audit::new(&name, "auth.sign_out", &resp, remote_ip(&ext));
            audit::record(&s, a).await;
            return Ok(resp);
        }
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(s.auth.secure_cookies));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_blocks_after_max_failures() {
        let l = FailureLimiter::default();
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..MAX_FAILURES {
            assert!(!l.fail(ip));
        }
        assert!(l.blocked(ip));
        assert!(l.fail(ip));
        assert!(!l.blocked(Some(IpAddr::from([10, 0, 0, 2]))));
    }

    #[test]
    fn reads_the_session_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; trellis_session=xyz; c=d"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("xyz"));
        assert!(set_cookie(true, "s", 10)
            .to_str()
            .unwrap()
            .contains("; Secure"));
        let plain = set_cookie(false, "s", 10);
        let plain = plain.to_str().unwrap();
        assert!(
            plain.contains("HttpOnly")
                && plain.contains("SameSite=Strict")
                && !plain.contains("Secure")
        );
    }
}
