//! Tokens. Agent and admin tokens are 256-bit random secrets; only their SHA-256 is
//! stored (a slow password hash adds nothing for secrets with this much entropy), and
//! comparisons are constant-time.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new random token with a recognisable prefix (`trl_agent_…`, `trl_admin_…`).
pub fn generate(kind: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "trl_{kind}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time comparison of a presented token against a stored hash.
pub fn verify(token: &str, stored_hash: &str) -> bool {
    let presented = hash(token);
    presented.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&axum::http::HeaderValue>) -> Option<&str> {
    let v = header?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_verify() {
        let t = generate("agent");
        assert!(t.starts_with("trl_agent_") && t.len() > 40);
        let h = hash(&t);
        assert!(verify(&t, &h));
        assert!(!verify("trl_agent_wrong", &h));
        assert_ne!(generate("agent"), t);
    }

    #[test]
    fn parses_bearer() {
        let v = axum::http::HeaderValue::from_static("Bearer abc");
        assert_eq!(bearer(Some(&v)), Some("abc"));
        let v = axum::http::HeaderValue::from_static("Basic abc");
        assert_eq!(bearer(Some(&v)), None);
        assert_eq!(bearer(None), None);
    }
}
