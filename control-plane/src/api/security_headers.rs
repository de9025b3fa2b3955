//! Security headers on every response, UI and API alike.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::Response;

/// The UI is one same-origin bundle (no inline scripts or styles; React sets `style`
/// through the CSSOM, which CSP does not restrict). `img-src data:` is for the inline SVG
/// favicon in index.html.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'";

/// Adds the headers unless a handler set its own.
pub async fn add(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name: HeaderName, value: &'static str| {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    resp
}
