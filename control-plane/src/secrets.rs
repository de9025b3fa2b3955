//! Sensitive command parameters at rest.
//!
//! The values of sensitive Terraform variables (see
//! [`trellis_protocol::TerraformApplyParams::is_sensitive`]) are stored encrypted in
//! `commands.params`, each replaced by `{"$enc": "v1:<key id>:<base64 nonce|ciphertext>"}`
//! (ChaCha20-Poly1305 from `ring`, a random 96-bit nonce per value, the variable's name as
//! associated data, so a value moved to another variable does not open). They are
//! decrypted only to build the `dispatch` frame for the agent and to make a retry, and
//! stay encrypted until retention deletes the command.
//!
//! Credentials in URLs (`https://user:token@host/…`, anywhere in any command's params —
//! a Terraform `template_source.repo`, a post-provision command) are sealed in place: the
//! password (or a bare token userinfo) becomes `enc1.<key id>.<base64url nonce|ciphertext>`,
//! so the stored string stays a URL whose credential the API's redaction shows as `***`,
//! and the agent receives the original.
//!
//! The 256-bit key comes from `TRELLIS_SECRETS_KEY` (base64; the same on every replica)
//! or from `<data dir>/secrets.key` (base64, 0600), generated on first start.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value};
use sha2::Digest;
use trellis_protocol::{CommandType, TerraformApplyParams};

/// The key file in the data directory.
pub const KEY_FILE: &str = "secrets.key";
/// The environment variable that gives the key (base64 of 32 bytes).
pub const KEY_ENV: &str = "TRELLIS_SECRETS_KEY";
/// The field that marks an encrypted value.
pub const ENC_FIELD: &str = "$enc";
const VERSION: &str = "v1";

/// Why sensitive values could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("variable {var:?} was encrypted with secrets key {stored}, but this control plane's key is {current} (was TRELLIS_SECRETS_KEY or secrets.key changed?)")]
    WrongKey {
        var: String,
        stored: String,
        current: String,
    },
    #[error("variable {var:?} cannot be decrypted: {reason}")]
    Corrupt { var: String, reason: &'static str },
}

/// The control plane's secrets key.
#[derive(Clone)]
pub struct Secrets {
    key: Arc<LessSafeKey>,
    /// HMAC-SHA256 key of Terraform state credentials, derived from the secrets key (so
    /// every replica derives the same credentials and no other key must be kept).
    state_mac: Arc<ring::hmac::Key>,
    /// First 8 hex digits of the key's SHA-256: names the key in errors, never reveals it.
    id: Arc<str>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("id", &self.id).finish()
    }
}

impl Secrets {
    fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            bytes.len() == 32,
            "a secrets key is 32 bytes (base64: 44 characters), not {}",
            bytes.len()
        );
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .map_err(|_| anyhow::anyhow!("invalid secrets key"))?;
        let id = hex::encode(&sha2::Sha256::digest(bytes)[..4]);
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            STATE_MAC_LABEL,
        );
        Ok(Self {
            key: Arc::new(LessSafeKey::new(key)),
            state_mac: Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                derived.as_ref(),
            )),
            id: id.into(),
        })
    }

    /// A key given as base64 of 32 bytes.
    pub fn from_base64(s: &str) -> anyhow::Result<Self> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|_| anyhow::anyhow!("a secrets key must be base64 (of 32 bytes)"))?;
        Self::from_bytes(&bytes)
    }

    /// A new random key held in memory only (an in-memory database's, and tests').
    pub fn ephemeral() -> Self {
        Self::from_bytes(&random_key()).expect("32 bytes")
    }

    /// The key's id (first 8 hex digits of its SHA-256).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key from `env` (the value of `TRELLIS_SECRETS_KEY`) if given, else from
    /// `<data_dir>/secrets.key`, which is created (0600) on first start.
    pub fn load(env: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        if let Some(v) = env.filter(|v| !v.trim().is_empty()) {
            let s = Self::from_base64(v).map_err(|e| anyhow::anyhow!("{KEY_ENV}: {e}"))?;
            tracing::info!(key_id = %s.id, "secrets key from {KEY_ENV}");
            return Ok(s);
        }
        let path = data_dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let s = Self::from_base64(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                tracing::info!(key_id = %s.id, path = %path.display(), "secrets key loaded");
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = random_key();
                crate::data_dir::write_private(
                    &path,
                    format!("{}\n", B64.encode(bytes)).as_bytes(),
                )
                .map_err(|e| {
                    anyhow::anyhow!("cannot write the secrets key to {}: {e}", path.display())
                })?;
                let s = Self::from_bytes(&bytes)?;
                tracing::info!(key_id = %s.id, path = %path.display(), "generated the secrets key (back it up: encrypted command parameters cannot be read without it)");
                Ok(s)
            }
            Err(e) => Err(anyhow::anyhow!(
                "cannot read the secrets key {}: {e}",
                path.display()
            )),
        }
    }

    /// `nonce | ciphertext` of `plain` with `aad`.
    fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .expect("ChaCha20-Poly1305 seals any length used here");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// `plain` (a Terraform state) sealed for storage under `aad` (its workspace name,
    /// so a state copied to another workspace's row does not open):
    /// `v1:<key id>:<base64 nonce|ciphertext>`.
    pub fn seal_blob(&self, aad: &str, plain: &[u8]) -> String {
        let aad = blob_aad(aad);
        format!(
            "{VERSION}:{}:{}",
            self.id,
            B64.encode(self.seal_bytes(&aad, plain))
        )
    }

    /// Opens what [`Secrets::seal_blob`] sealed with the same `aad`.
    pub fn open_blob(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, SecretError> {
        let what = format!("terraform state of {aad}");
        self.open_stored(&what, &blob_aad(aad), sealed, ':', &B64)
    }

    /// The Terraform state credential of `command` for `workspace`: HMAC-SHA256 over both
    /// (length-prefixed) under a key derived from the secrets key, base64url. Derived, not
    /// stored: the control plane computes it again to check a request, and it is only
    /// honoured while its command is live (see `domain::terraform_state`).
    pub fn state_credential(&self, command: uuid::Uuid, workspace: &str) -> String {
        B64URL.encode(ring::hmac::sign(
            &self.state_mac,
            &credential_input(command, workspace),
        ))
    }

    /// Whether `given` is [`Secrets::state_credential`] of `command` and `workspace`
    /// (compared in constant time).
    pub fn check_state_credential(
        &self,
        command: uuid::Uuid,
        workspace: &str,
        given: &str,
    ) -> bool {
        let Ok(tag) = B64URL.decode(given.trim()) else {
            return false;
        };
        ring::hmac::verify(&self.state_mac, &credential_input(command, workspace), &tag).is_ok()
    }

    /// A URL credential (password, or a bare-token userinfo) sealed into URL-safe text.
    fn seal_url_part(&self, part: &str) -> String {
        let data = B64URL.encode(self.seal_bytes(URL_AAD, part.as_bytes()));
        format!("{URL_MARK}{}.{data}", self.id)
    }

    fn open_url_part(&self, sealed: &str) -> Result<String, SecretError> {
        const WHAT: &str = "URL credentials";
        let plain = self.open_stored(WHAT, URL_AAD, &sealed[URL_MARK.len()..], '.', &B64URL)?;
        String::from_utf8(plain).map_err(|_| SecretError::Corrupt {
            var: WHAT.into(),
            reason: "not UTF-8",
        })
    }

    /// `s` with the credential of every `scheme://userinfo@host` in it sealed (`None`
    /// when there is none). `again`: a credential that already looks sealed is sealed
    /// again (a new command's value is the user's, whatever it looks like); otherwise
    /// it is taken as sealed (rows stored earlier).
    fn seal_urls_in(&self, s: &str, again: bool) -> Option<String> {
        map_userinfo(s, |userinfo| {
            let (user, secret) = match userinfo.split_once(':') {
                Some((user, pass)) if !user.is_empty() => (Some(user), pass),
                _ => (None, userinfo),
            };
            if secret.is_empty() || (!again && secret.starts_with(URL_MARK)) {
                return Ok(None);
            }
            let sealed = self.seal_url_part(secret);
            Ok(Some(match user {
                Some(u) => format!("{u}:{sealed}"),
                None => sealed,
            }))
        })
        .ok()
        .flatten()
    }

    /// `s` with every sealed URL credential opened (`None` when there is none).
    fn open_urls_in(&self, s: &str) -> Result<Option<String>, SecretError> {
        // Split exactly as `seal_urls_in` does: a user name may itself start with the mark.
        map_userinfo(s, |userinfo| match userinfo.split_once(':') {
            Some((user, pass)) if !user.is_empty() => match pass.starts_with(URL_MARK) {
                true => Ok(Some(format!("{user}:{}", self.open_url_part(pass)?))),
                false => Ok(None),
            },
            _ if userinfo.starts_with(URL_MARK) => self.open_url_part(userinfo).map(Some),
            _ => Ok(None),
        })
    }

    /// Every string value in `v` through `f` (keys are left alone).
    fn each_string(
        v: &mut Value,
        f: &mut impl FnMut(&str) -> Result<Option<String>, SecretError>,
    ) -> Result<bool, SecretError> {
        Ok(match v {
            Value::String(s) => match f(s)? {
                Some(new) => {
                    *s = new;
                    true
                }
                None => false,
            },
            Value::Array(items) => {
                let mut changed = false;
                for i in items {
                    changed |= Self::each_string(i, f)?;
                }
                changed
            }
            Value::Object(map) => {
                let mut changed = false;
                for (_, i) in map.iter_mut() {
                    changed |= Self::each_string(i, f)?;
                }
                changed
            }
            _ => false,
        })
    }

    /// Seals the URL credentials in `v` (see `seal_urls_in`); true if any was sealed.
    fn seal_urls(&self, v: &mut Value, again: bool) -> bool {
        Self::each_string(v, &mut |s| Ok(self.seal_urls_in(s, again))).unwrap_or(false)
    }

    fn seal_value(&self, var: &str, v: &Value) -> Value {
        let plain = serde_json::to_vec(v).expect("a JSON value serializes");
        let out = self.seal_bytes(var.as_bytes(), &plain);
        let mut m = Map::new();
        m.insert(
            ENC_FIELD.into(),
            Value::String(format!("{VERSION}:{}:{}", self.id, B64.encode(out))),
        );
        Value::Object(m)
    }

    fn open_value(&self, var: &str, s: &str) -> Result<Value, SecretError> {
        let plain = self.open_stored(var, var.as_bytes(), s, ':', &B64)?;
        serde_json::from_slice(&plain).map_err(|_| SecretError::Corrupt {
            var: var.to_string(),
            reason: "not JSON",
        })
    }

    /// Opens `<version>:<key id>:<base64 nonce|ciphertext>` (`sep` between the parts, the
    /// version omitted when `sep` is `.`: the URL form after its mark) sealed with `aad`;
    /// `what` names it in errors. The inverse of [`Secrets::seal_bytes`] and the text
    /// forms around it.
    fn open_stored(
        &self,
        what: &str,
        aad: &[u8],
        sealed: &str,
        sep: char,
        b64: &base64::engine::GeneralPurpose,
    ) -> Result<Vec<u8>, SecretError> {
        let corrupt = |reason| SecretError::Corrupt {
            var: what.to_string(),
            reason,
        };
        let (kid, data) = if sep == ':' {
            let mut parts = sealed.splitn(3, ':');
            let (Some(VERSION), Some(kid), Some(data)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(corrupt("unknown format"));
            };
            (kid, data)
        } else {
            sealed.split_once(sep).ok_or(corrupt("unknown format"))?
        };
        if kid != &*self.id {
            return Err(SecretError::WrongKey {
                var: what.to_string(),
                stored: kid.to_string(),
                current: self.id.to_string(),
            });
        }
        let mut raw = b64.decode(data).map_err(|_| corrupt("not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(corrupt("too short"));
        }
        let mut ct = raw.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&raw).map_err(|_| corrupt("bad nonce"))?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut ct)
            .map_err(|_| corrupt("authentication failed (tampered, or another key)"))?;
        Ok(plain.to_vec())
    }

    /// `params` of a command of type `ty` as stored: every sensitive Terraform variable's
    /// value encrypted. Other commands' params are returned unchanged.
    pub fn seal_params(&self, ty: CommandType, params: &Value) -> Value {
        let mut out = params.clone();
        self.seal_urls(&mut out, true);
        let Some(p) = tf_params(ty, params) else {
            return out;
        };
        if let Some(vars) = out.get_mut("terraform_vars").and_then(Value::as_object_mut) {
            for (k, v) in vars.iter_mut() {
                if p.is_sensitive(k) {
                    *v = self.seal_value(k, v);
                }
            }
        }
        out
    }

    /// `params` stored before encryption existed with their sensitive values encrypted
    /// (values already encrypted are kept); `None` when nothing was in clear.
    pub fn seal_in_clear(&self, ty: CommandType, params: &Value) -> Option<Value> {
        let mut out = params.clone();
        let mut changed = self.seal_urls(&mut out, false);
        let Some(p) = tf_params(ty, params) else {
            return changed.then_some(out);
        };
        if let Some(vars) = out.get_mut("terraform_vars").and_then(Value::as_object_mut) {
            for (k, v) in vars.iter_mut() {
                if p.is_sensitive(k) && sealed(v).is_none() {
                    *v = self.seal_value(k, v);
                    changed = true;
                }
            }
        }
        changed.then_some(out)
    }

    /// Stored `params` with every encrypted value decrypted (values stored before
    /// encryption existed pass unchanged).
    pub fn open_params(&self, ty: CommandType, params: &Value) -> Result<Value, SecretError> {
        let mut out = params.clone();
        if let Some(p) = tf_params(ty, params) {
            if let Some(vars) = out.get_mut("terraform_vars").and_then(Value::as_object_mut) {
                for (k, v) in vars.iter_mut() {
                    if !p.is_sensitive(k) {
                        continue;
                    }
                    if let Some(s) = sealed(v) {
                        let opened = self.open_value(k, s)?;
                        *v = opened;
                    }
                }
            }
        }
        // After the variables: a sensitive value was URL-sealed before it was sealed whole.
        Self::each_string(&mut out, &mut |s| self.open_urls_in(s))?;
        Ok(out)
    }
}

/// What the state-credential key is derived with (HMAC of the secrets key over it).
const STATE_MAC_LABEL: &[u8] = b"trellis terraform state credential key v1";

/// Associated data of a sealed Terraform state: a label and the workspace name.
fn blob_aad(workspace: &str) -> Vec<u8> {
    let mut aad = b"trellis-terraform-state-v1\0".to_vec();
    aad.extend_from_slice(workspace.as_bytes());
    aad
}

/// The bytes a state credential authenticates: the command id and the workspace name.
fn credential_input(command: uuid::Uuid, workspace: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + workspace.len());
    out.extend_from_slice(command.as_bytes());
    out.extend_from_slice(&(workspace.len() as u64).to_be_bytes());
    out.extend_from_slice(workspace.as_bytes());
    out
}

/// The prefix of a sealed URL credential (then `<key id>.<base64url>`).
const URL_MARK: &str = "enc1.";
/// Associated data of sealed URL credentials.
const URL_AAD: &[u8] = b"trellis-url-credentials";
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `s` with the userinfo of every `scheme://userinfo@host` replaced by what `f` returns
/// for it (`None`: unchanged); `None` when nothing changed. The authority ends where the
/// API's redaction says it does (`crate::api::redact::url_credentials`).
fn map_userinfo(
    s: &str,
    mut f: impl FnMut(&str) -> Result<Option<String>, SecretError>,
) -> Result<Option<String>, SecretError> {
    if !s.contains("://") || !s.contains('@') {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len() + 64);
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => match f(&authority[..at])? {
                Some(new) => {
                    changed = true;
                    out.push_str(&new);
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            },
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

/// The ciphertext of a sealed value.
fn sealed(v: &Value) -> Option<&str> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get(ENC_FIELD)?.as_str(),
        _ => None,
    }
}

fn tf_params(ty: CommandType, params: &Value) -> Option<TerraformApplyParams> {
    if !ty.is_terraform() {
        return None;
    }
    TerraformApplyParams::deserialize(params).ok()
}

use serde::Deserialize;

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    SystemRandom::new()
        .fill(&mut k)
        .expect("the system random source works");
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params() -> Value {
        json!({
            "template_source": {"repo": "file:///r", "version": "main"},
            "terraform_vars": {"db_password": "hunter2", "extra": {"a": 1}, "region": "eu"},
            "sensitive_vars": ["extra"],
        })
    }

    #[test]
    fn url_credentials_are_sealed_in_place_and_open_again() {
        let s = Secrets::ephemeral();
        let p = json!({
            "template_source": {"repo": "https://deploy:tok-123@git.example/r.git", "version": "main"},
            "terraform_vars": {"db_password": "x https://ghp_bare@h/y", "region": "https://public/x"},
            "post": ["git clone https://u:p%40ss@h:8443/a.git https://t0k@h2/b", "no url"],
        });
        for ty in [CommandType::TerraformApply, CommandType::Provision] {
            let sealed = s.seal_params(ty, &p);
            let text = sealed.to_string();
            for secret in ["tok-123", "ghp_bare", "p%40ss", "t0k"] {
                assert!(!text.contains(secret), "{ty}: {secret} in {text}");
            }
            // Still URLs whose credential the API's redaction hides; users stay visible.
            let repo = sealed["template_source"]["repo"].as_str().unwrap();
            assert!(repo.starts_with("https://deploy:enc1."), "{repo}");
            assert!(repo.ends_with("@git.example/r.git"), "{repo}");
            assert_eq!(
                crate::api::redact::url_credentials(repo),
                "https://deploy:***@git.example/r.git"
            );
            assert_eq!(sealed["terraform_vars"]["region"], "https://public/x");
            assert_eq!(s.open_params(ty, &sealed).unwrap(), p, "{ty}");
            // Sealing sealed params changes nothing; a fresh nonce each time.
            assert_eq!(s.seal_in_clear(ty, &sealed), None);
            assert_ne!(s.seal_params(ty, &p), sealed);
            // Another key does not open them.
            let other = Secrets::ephemeral();
            assert!(matches!(
                other.open_params(ty, &sealed),
                Err(SecretError::WrongKey { .. })
            ));
        }
        // A user's credential that looks sealed is still the user's: sealed and given back.
        let odd = json!({"repo": "https://enc1.deadbeef.AAAA@h/r", "b": "https://u:enc1.x@h/",
            "c": "https://enc1.bot:pw@h/", "d": "https://:bare@[::1]:8443/x"});
        let sealed = s.seal_params(CommandType::Ping, &odd);
        assert_eq!(s.open_params(CommandType::Ping, &sealed).unwrap(), odd);
        // Stored in clear by an earlier version: sealed by seal_in_clear.
        let old = json!({"repo": "https://a:b@h/r"});
        let again = s.seal_in_clear(CommandType::Ping, &old).unwrap();
        assert!(!again.to_string().contains(":b@"), "{again}");
        assert_eq!(s.open_params(CommandType::Ping, &again).unwrap(), old);
        let bot = json!({"repo": "https://enc1.bot:pw@h/r"});
        let again = s.seal_in_clear(CommandType::Ping, &bot).unwrap();
        assert!(!again.to_string().contains(":pw@"), "{again}");
        assert_eq!(s.open_params(CommandType::Ping, &again).unwrap(), bot);
    }

    #[test]
    fn sealed_values_hide_the_plaintext_and_open_again() {
        let s = Secrets::ephemeral();
        let p = params();
        let sealed = s.seal_params(CommandType::TerraformApply, &p);
        let text = sealed.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(sealed["terraform_vars"]["region"], json!("eu"));
        assert!(sealed["terraform_vars"]["extra"][ENC_FIELD].is_string());
        // A fresh nonce each time.
        assert_ne!(sealed, s.seal_params(CommandType::TerraformApply, &p));
        assert_eq!(
            s.open_params(CommandType::TerraformApply, &sealed).unwrap(),
            p
        );
        // Values stored in clear before encryption existed are sealed once.
        let again = s.seal_in_clear(CommandType::TerraformApply, &p).unwrap();
        assert!(!again.to_string().contains("hunter2"));
        assert_eq!(
            s.open_params(CommandType::TerraformApply, &again).unwrap(),
            p
        );
        assert_eq!(s.seal_in_clear(CommandType::TerraformApply, &again), None);
        // Other commands are untouched.
        let ping = json!({"db_password": "x"});
        assert_eq!(s.seal_params(CommandType::Ping, &ping), ping);
    }

    #[test]
    fn a_wrong_key_or_a_tampered_value_is_an_error() {
        let s = Secrets::ephemeral();
        let sealed = s.seal_params(CommandType::TerraformApply, &params());
        let other = Secrets::ephemeral();
        let e = other
            .open_params(CommandType::TerraformApply, &sealed)
            .unwrap_err();
        assert!(matches!(e, SecretError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains(s.id()), "{e}");
        // A value moved to another sensitive variable does not open (name is the AAD).
        let mut moved = sealed.clone();
        moved["terraform_vars"]["extra"] = sealed["terraform_vars"]["db_password"].clone();
        let e = s
            .open_params(CommandType::TerraformApply, &moved)
            .unwrap_err();
        assert!(matches!(e, SecretError::Corrupt { .. }), "{e}");
        let mut bad = sealed.clone();
        bad["terraform_vars"]["db_password"] = json!({ENC_FIELD: format!("v1:{}:AAAA", s.id())});
        assert!(s.open_params(CommandType::TerraformApply, &bad).is_err());
    }

    #[test]
    fn blobs_open_only_with_their_workspace_and_credentials_check_both() {
        let s = Secrets::ephemeral();
        let state = br#"{"version":4,"resources":[{"id":"secret-42"}]}"#;
        let sealed = s.seal_blob("prod", state);
        assert!(!sealed.contains("secret-42"));
        assert_eq!(s.open_blob("prod", &sealed).unwrap(), state);
        assert!(s.open_blob("staging", &sealed).is_err());
        assert!(matches!(
            Secrets::ephemeral().open_blob("prod", &sealed),
            Err(SecretError::WrongKey { .. })
        ));
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let c = s.state_credential(a, "prod");
        assert_eq!(c, s.state_credential(a, "prod"), "deterministic");
        assert!(s.check_state_credential(a, "prod", &c));
        assert!(!s.check_state_credential(b, "prod", &c));
        assert!(!s.check_state_credential(a, "prod2", &c));
        assert!(!s.check_state_credential(a, "prod", "not base64!"));
        assert!(!Secrets::ephemeral().check_state_credential(a, "prod", &c));
    }

    #[test]
    fn keys_load_from_env_or_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("trellis-secrets-{}", uuid::Uuid::new_v4()));
        let a = Secrets::load(None, &dir).unwrap();
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Secrets::load(None, &dir).unwrap();
        assert_eq!(a.id(), b.id(), "the file's key is reused");
        let env = B64.encode([7u8; 32]);
        assert_ne!(Secrets::load(Some(&env), &dir).unwrap().id(), a.id());
        assert!(Secrets::load(Some("short"), &dir).is_err());
        std::fs::write(dir.join(KEY_FILE), "garbage").unwrap();
        assert!(Secrets::load(None, &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
