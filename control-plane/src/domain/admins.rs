//! Admin identities: the bootstrap admin (the token configured or generated at first
//! start, named [`BOOTSTRAP_ADMIN`]) and named admins (`trellis admins create NAME`), each
//! with its own token of which only the SHA-256 is stored; and browser sessions, which
//! exchange an admin token for a random session secret (stored hashed) with a fixed
//! lifetime of [`SESSION_TTL_MS`].

use super::{DomainError, DomainResult};
use crate::db::{AdminRow, Db, DbError};
use crate::time::now_ms;

/// The name the bootstrap admin acts as (`createdBy`, audit actor).
pub const BOOTSTRAP_ADMIN: &str = "admin";
/// Names that cannot be given to a named admin.
const RESERVED: &[&str] = &[
    BOOTSTRAP_ADMIN,
    "bootstrap",
    "anonymous",
    "system",
    "trellis",
];
/// A session lasts 12 hours from sign-in (fixed, not sliding: no write per request).
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// How stale `last_used_at` may get before a request refreshes it.
const TOUCH_EVERY_MS: i64 = 60_000;

/// 1–64 characters: letters, digits, `.`, `_`, `-`, `@`; starting with a letter or digit.
pub fn validate_name(name: &str) -> DomainResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if !ok {
        return Err(DomainError::invalid(
            "invalid_params",
            "an admin name is 1–64 characters: letters, digits, '.', '_', '-', '@', starting with a letter or digit",
        ));
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(DomainError::invalid(
            "invalid_params",
            format!("{name:?} is reserved"),
        ));
    }
    Ok(())
}

/// Creates a named admin; returns it and its token (shown once, never stored).
pub async fn create(db: &Db, name: &str) -> DomainResult<(AdminRow, String)> {
    validate_name(name)?;
    let token = crate::auth::generate("admin");
    let row = db
        .insert_admin(name, &crate::auth::hash(&token))
        .await
        .map_err(|e| match e {
            DbError::Conflict(m) => DomainError::conflict("name_taken", m),
            e => e.into(),
        })?;
    Ok((row, token))
}

/// Revokes a named admin: its token stops working and its sessions end at once.
pub async fn revoke(db: &Db, name: &str) -> DomainResult<()> {
    if name == BOOTSTRAP_ADMIN {
        return Err(DomainError::invalid(
            "invalid_params",
            "the bootstrap admin cannot be revoked; set a new --admin-token instead",
        ));
    }
    db.revoke_admin(name)
        .await
        .map_err(DomainError::not_found(format_args!("admin {name:?}")))
}

/// The admin a bearer token belongs to: the bootstrap admin or a live named admin.
pub async fn authenticate(
    db: &Db,
    bootstrap_hash: &str,
    token: &str,
) -> DomainResult<Option<String>> {
    if crate::auth::verify(token, bootstrap_hash) {
        return Ok(Some(BOOTSTRAP_ADMIN.into()));
    }
    // The lookup is by the token's hash (an index); a wrong token reveals nothing.
    let Some(a) = db.admin_by_token_hash(&crate::auth::hash(token)).await? else {
        return Ok(None);
    };
    let now = now_ms();
    if a.last_used_at.is_none_or(|t| now - t > TOUCH_EVERY_MS) {
        if let Err(e) = db.touch_admin(&a.name, now).await {
            tracing::warn!(error = %e, "cannot note the admin token's use");
        }
    }
    Ok(Some(a.name))
}

/// What a bootstrap admin's session stores of the bootstrap token (the SHA-256 of its
/// hash): a session only lasts as long as the token it signed in with.
fn bootstrap_fingerprint(bootstrap_hash: &str) -> String {
    crate::auth::hash(bootstrap_hash)
}

/// A new session for `admin`: the secret for the cookie and its expiry (ms).
/// `bootstrap_hash` is the current bootstrap token's hash.
pub async fn start_session(
    db: &Db,
    admin: &str,
    bootstrap_hash: &str,
) -> DomainResult<(String, i64)> {
    let secret = crate::auth::generate("session");
    let expires_at = now_ms() + SESSION_TTL_MS;
    let fp = (admin == BOOTSTRAP_ADMIN).then(|| bootstrap_fingerprint(bootstrap_hash));
    db.insert_session(
        &crate::auth::hash(&secret),
        admin,
        expires_at,
        fp.as_deref(),
    )
    .await?;
    Ok((secret, expires_at))
}

/// The admin of a live session, and when it expires. A bootstrap admin's session ends
/// when the bootstrap token changes (`bootstrap_hash` is the current one's hash).
pub async fn session(
    db: &Db,
    secret: &str,
    bootstrap_hash: &str,
) -> DomainResult<Option<(String, i64)>> {
    Ok(db
        .session(
            &crate::auth::hash(secret),
            BOOTSTRAP_ADMIN,
            &bootstrap_fingerprint(bootstrap_hash),
        )
        .await?
        .map(|s| (s.admin_name, s.expires_at)))
}

pub async fn end_session(db: &Db, secret: &str) -> DomainResult<()> {
    Ok(db.delete_session(&crate::auth::hash(secret)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["alice", "bob.smith", "ops-1", "a@example.org", "X_9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "admin",
            "Admin",
            "anonymous",
            "a b",
            "node:1",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
