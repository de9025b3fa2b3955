//! Who is calling. Every admin request carries either `Authorization: Bearer <token>` (the
//! bootstrap admin's token or a named admin's, for API clients and the CLI) or the
//! `trellis_session` cookie that `POST /api/session` sets after checking such a token (the
//! browser: no script ever holds the token). `require_admin` resolves the [`Admin`],
//! attaches it to the request, and writes the request's audit row (see [`super::audit`]).
//!
//! Cookies: `HttpOnly; SameSite=Strict; Path=/` (plus `Secure` over TLS or with an
//! `https://` `--public-url`), a fixed 12-hour
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

/// How often a long-lived stream (SSE) checks that the session or token it opened with
/// still works.
pub const STREAM_RECHECK: Duration = Duration::from_secs(30);

/// Authentication settings and the failure limiter, shared by all requests.
pub struct AuthState {
    /// Add `Secure` to the cookie (the server speaks TLS, or its public URL is https).
    pub secure_cookies: bool,
    pub limiter: FailureLimiter,
    /// How often an SSE stream re-checks its credential ([`STREAM_RECHECK`]).
    pub stream_recheck: Duration,
}

impl AuthState {
    pub fn new(secure_cookies: bool) -> Self {
        Self {
            secure_cookies,
            limiter: FailureLimiter::default(),
            stream_recheck: STREAM_RECHECK,
        }
    }
}

/// The credential a long-lived stream was opened with, to check again while it runs: a
/// signed-out or expired session, a revoked admin or a replaced bootstrap token ends it.
pub struct StreamAuth(Credential);

impl StreamAuth {
    pub fn of(headers: &HeaderMap, uri: &axum::http::Uri) -> Self {
        Self(credential_parts(headers, uri))
    }

    /// Whether the credential still authenticates (one indexed read). A storage error
    /// counts as valid: a database hiccup must not cut every stream.
    pub async fn still_valid(&self, s: &AppState) -> bool {
        let r = match &self.0 {
            Credential::Token(t) => admins::authenticate(&s.db, &s.admin_token_hash, t)
                .await
                .map(|o| o.is_some()),
            Credential::Cookie(c) => admins::session(&s.db, c, &s.admin_token_hash)
                .await
                .map(|o| o.is_some()),
            Credential::InQuery | Credential::None => Ok(false),
        };
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot re-check a stream's credential");
            true
        })
    }

    /// Returns once the credential no longer works, checking every `every`.
    pub async fn ended(&self, s: &AppState, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if !self.still_valid(s).await {
                return;
            }
        }
    }
}

/// Counts failed authentications per remote address in fixed one-minute windows, in
/// memory and bounded ([`MAX_TRACKED`] keys). IPv6 addresses count per /64 (one host
/// usually has a whole /64), IPv4-mapped IPv6 as the IPv4 address.
pub struct FailureLimiter {
    map: Mutex<HashMap<Option<IpAddr>, (Instant, u32)>>,
    /// Failures allowed per address and window ([`MAX_FAILURES`] unless configured).
    limit: u32,
}

impl Default for FailureLimiter {
    fn default() -> Self {
        Self::new(MAX_FAILURES)
    }
}

/// What one counted failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The first failure of the address's window: the one that gets an audit row.
    pub first: bool,
    /// This failure used up the window's allowance (later ones are refused with 429).
    pub limit_reached: bool,
    /// Past the allowance already (a request that raced the check): answer 429.
    pub over: bool,
    /// The allowance.
    pub limit: u32,
}

/// The limiter's key of an address.
pub fn limiter_key(ip: Option<IpAddr>) -> Option<IpAddr> {
    ip.map(|ip| match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    })
}

impl FailureLimiter {
    /// A limiter allowing `limit` (at least 1) failures per address a minute.
    pub fn new(limit: u32) -> Self {
        Self {
            map: Mutex::default(),
            limit: limit.max(1),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Whether `ip` has used up its failures for the current window.
    pub fn blocked(&self, ip: Option<IpAddr>) -> bool {
        let ip = limiter_key(ip);
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < FAILURE_WINDOW && *n >= self.limit)
    }

    /// Counts a failure of `ip`.
    pub fn fail(&self, ip: Option<IpAddr>) -> Failure {
        let ip = limiter_key(ip);
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
        Failure {
            limit: self.limit,
            first: e.1 == 1,
            limit_reached: e.1 == self.limit,
            over: e.1 > self.limit,
        }
    }
}

/// Audit rows of a counted failure: the window's first failure gets `first_action`
/// (`auth.failed`, `auth.sign_in`), the one that uses up the allowance `auth.limited`
/// with the count; the others are only counted (at most two rows per address a minute).
fn failure_rows(
    f: Failure,
    first_action: &str,
    resp: &Response,
    ip: Option<IpAddr>,
    details: serde_json::Value,
) -> Vec<Audit> {
    let mut rows = Vec::new();
    if f.first {
        let mut a = Audit::new("anonymous", first_action, resp, ip);
        a.details = Some(details.clone());
        rows.push(a);
    }
    if f.limit_reached {
        let mut a = Audit::new("anonymous", "auth.limited", &too_many(), ip);
        let mut d = details;
        if let Some(o) = d.as_object_mut() {
            o.insert("failures".into(), f.limit.into());
            o.insert("windowSeconds".into(), FAILURE_WINDOW.as_secs().into());
        }
        a.details = Some(d);
        rows.push(a);
    }
    rows
}

async fn record_all(s: &AppState, rows: Vec<Audit>) {
    for a in rows {
        audit::record(s, a).await;
    }
}

pub(crate) fn too_many() -> Response {
    let body = ErrorBody {
        error: super::types::ErrorDetail {
            code: "too_many_requests".into(),
            message: "too many failed sign-ins from this address; wait a minute".into(),
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
    credential_parts(req.headers(), req.uri())
}

fn credential_parts(headers: &HeaderMap, uri: &axum::http::Uri) -> Credential {
    // A token in the URL ends up in logs, proxies and browser history: refused, even
    // beside a valid header.
    if uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("access_token=")))
    {
        return Credential::InQuery;
    }
    if let Some(t) = crate::auth::bearer(headers.get(header::AUTHORIZATION)) {
        return Credential::Token(t.to_string());
    }
    match session_cookie(headers) {
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
        Credential::Cookie(c) => admins::session(&s.db, &c, &s.admin_token_hash)
            .await
            .map(|o| {
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
        // A session cookie that no longer works is not an attack on a token (its secret
        // is 256 random bits): tabs polling after expiry must not lock their own
        // sign-in, so it is neither counted nor audited.
        Ok(None) if cookie => {
            let body = ErrorBody {
                error: super::types::ErrorDetail {
                    code: "session_expired".into(),
                    message: "the session has expired or was signed out: sign in again".into(),
                },
            };
            let mut r = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
            r.headers_mut()
                .insert(header::SET_COOKIE, clear_cookie(s.auth.secure_cookies));
            Err((r, false))
        }
        Ok(None) => Err((unauthorized("the admin token is not valid"), true)),
        Err(e) => Err((AppError::from(e).into_response(), false)),
    }
}

/// Admin authentication (bearer token or session cookie) and the audit row of every
/// admin request that changes something, and of every failed authentication.
pub async fn require_admin(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let ip = remote_ip(req.extensions());
    let what = audit::describe(&req);
    let cred = credential(&req);
    // A limited address learns nothing about a token (and costs no lookup): refused
    // before it is checked. Session cookies are not limited (see `authenticate`).
    if matches!(cred, Credential::Token(_)) && s.auth.limiter.blocked(ip) {
        return too_many();
    }
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
                let f = s.auth.limiter.fail(ip);
                let details = serde_json::json!({ "method": method, "path": path });
                record_all(&s, failure_rows(f, "auth.failed", &resp, ip, details)).await;
                if f.over {
                    return too_many();
                }
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
        let f = s.auth.limiter.fail(ip);
        let details = serde_json::json!({ "method": "POST", "path": "/api/session" });
        record_all(&s, failure_rows(f, "auth.sign_in", &resp, ip, details)).await;
        return if f.over { too_many() } else { resp };
    };
    let (secret, expires_at) = match admins::start_session(&s.db, &name, &s.admin_token_hash).await
    {
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
        if let Some((name, _)) = admins::session(&s.db, &c, &s.admin_token_hash).await? {
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
        for i in 1..=MAX_FAILURES {
            let f = l.fail(ip);
            assert_eq!(
                f,
                Failure {
                    first: i == 1,
                    limit_reached: i == MAX_FAILURES,
                    over: false,
                    limit: MAX_FAILURES
                }
            );
        }
        assert!(l.blocked(ip));
        assert!(l.fail(ip).over);
        assert!(!l.blocked(Some(IpAddr::from([10, 0, 0, 2]))));
    }

    #[test]
    fn limiter_limit_is_configurable() {
        let l = FailureLimiter::new(3);
        let ip = Some(IpAddr::from([10, 0, 0, 9]));
        assert!(!l.fail(ip).limit_reached && !l.fail(ip).limit_reached);
        assert!(l.fail(ip).limit_reached);
        assert!(l.blocked(ip));
    }

    #[test]
    fn limiter_keys_ipv6_by_64() {
        let l = FailureLimiter::default();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        for i in 0..MAX_FAILURES {
            // one /64, however many addresses it rotates through
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 10).parse().unwrap();
            l.fail(Some(ip));
        }
        assert!(l.blocked(Some(a)) && l.blocked(Some(b)));
        assert!(!l.blocked(Some(other)));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(limiter_key(Some(mapped)), Some(IpAddr::from([10, 1, 2, 3])));
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
