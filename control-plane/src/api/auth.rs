//! Who is calling: the admin identity that `require_admin` attaches to every admin
//! request, for handlers (`createdBy` on commands) and the audit log.

use axum::http::request::Parts;

use super::AppError;

/// The name of the bootstrap admin (the token configured or generated at first start).
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// The authenticated admin of a request. Handlers take it as an extractor; it is only
/// present behind `require_admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub name: String,
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
