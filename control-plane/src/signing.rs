//! The control plane's Ed25519 dispatch-signing key (see `trellis_protocol::signing`):
//! from `TRELLIS_SIGNING_KEY` (base64 PKCS#8, for several replicas sharing one key), else
//! `<data dir>/signing.key` (0600), generated there on first start.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use trellis_protocol::signing::SigningKey;

/// The key file in the data directory: the base64 of a PKCS#8 (v2) Ed25519 key.
pub const SIGNING_KEY_FILE: &str = "signing.key";
/// Environment variable with the key's base64 PKCS#8 (takes precedence over the file).
pub const SIGNING_KEY_ENV: &str = "TRELLIS_SIGNING_KEY";

/// Loads or creates the signing key. `persist: false` (an in-memory database without a
/// data directory) makes a key for this process only.
pub fn load(from_env: Option<&str>, data_dir: &Path, persist: bool) -> anyhow::Result<SigningKey> {
    if let Some(text) = from_env.filter(|t| !t.trim().is_empty()) {
        return SigningKey::from_base64(text)
            .map_err(|e| anyhow::anyhow!("{SIGNING_KEY_ENV} is not a usable signing key: {e}"));
    }
    if !persist {
        let (key, _) = SigningKey::generate().map_err(anyhow::Error::msg)?;
        return Ok(key);
    }
    let path = data_dir.join(SIGNING_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                tracing::warn!(path = %path.display(), "signing key was readable by others; now 0600");
            }
            SigningKey::from_base64(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a usable signing key: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, der) = SigningKey::generate().map_err(anyhow::Error::msg)?;
            let text = format!("{}\n", SigningKey::pkcs8_to_base64(&der));
            crate::data_dir::write_private(&path, text.as_bytes()).map_err(|e| {
                anyhow::anyhow!("cannot write the signing key to {}: {e}", path.display())
            })?;
            tracing::info!(path = %path.display(), key_id = key.key_id(), "generated the dispatch signing key");
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}
