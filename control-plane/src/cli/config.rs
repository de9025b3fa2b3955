//! Where the client CLI finds the control plane and its token: the credentials file
//! `trellis login` writes (`$XDG_CONFIG_HOME/trellis/credentials.json`, else
//! `~/.config/trellis/credentials.json`, readable by its owner only), overridden by
//! `TRELLIS_URL` / `TRELLIS_TOKEN` so scripts and CI need no file at all.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::CliError;

/// A control plane's URL and the admin token used on it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub token: String,
}

/// The token is a secret: never in `Debug` output (error reports, logs).
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("url", &self.url)
            .field("token", &"***")
            .finish()
    }
}

/// `$XDG_CONFIG_HOME/trellis/credentials.json` (an absolute `XDG_CONFIG_HOME` only, as
/// the XDG spec says), else `$HOME/.config/trellis/credentials.json`.
pub fn credentials_path() -> Result<PathBuf, CliError> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(p) => p,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|h| h.join(".config"))
            .ok_or_else(|| {
                CliError::Config("neither XDG_CONFIG_HOME nor HOME is set to a directory".into())
            })?,
    };
    Ok(base.join("trellis").join("credentials.json"))
}

/// The stored credentials, `None` when there is no file.
pub fn load() -> Result<Option<Credentials>, CliError> {
    let path = credentials_path()?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            CliError::Config(format!(
                "{} is not a credentials file ({e}): run `trellis login` again",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::Config(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Writes the credentials file with mode 0600 (its directory 0700): to a new file beside
/// it, then renamed over it, so a reader never sees half a file and an older file's
/// wider mode is not kept.
pub fn save(creds: &Credentials) -> Result<PathBuf, CliError> {
    let path = credentials_path()?;
    let dir = path.parent().expect("credentials path has a directory");
    let io = |what: &str, e: std::io::Error| CliError::Config(format!("cannot {what}: {e}"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(&format!("create {}", dir.display()), e))?;
    let tmp = dir.join(format!(".credentials.json.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The umask can only narrow the mode; make it exactly 0600 anyway.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut text = serde_json::to_vec_pretty(creds).map_err(std::io::Error::other)?;
        text.push(b'\n');
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(&format!("write {}", path.display()), e)
    })?;
    Ok(path)
}

/// Removes the credentials file; `Ok(None)` when there was none.
pub fn remove() -> Result<Option<PathBuf>, CliError> {
    let path = credentials_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::Config(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
    }
}

/// The credentials a command uses: `TRELLIS_URL` and `TRELLIS_TOKEN` (each on its own)
/// over the stored file.
pub fn resolve() -> Result<Credentials, CliError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (env_url, env_token) = (env("TRELLIS_URL"), env("TRELLIS_TOKEN"));
    let stored = if env_url.is_some() && env_token.is_some() {
        None
    } else {
        load()?
    };
    let url = env_url.or_else(|| stored.as_ref().map(|c| c.url.clone()));
    let token = env_token.or_else(|| stored.map(|c| c.token));
    match (url, token) {
        (Some(url), Some(token)) => Ok(Credentials {
            url: normalize_url(&url)?,
            token: token.trim().to_string(),
        }),
        _ => Err(CliError::NotLoggedIn),
    }
}

/// An absolute `http://` or `https://` URL without its trailing `/`.
pub fn normalize_url(raw: &str) -> Result<String, CliError> {
    let u = raw.trim().trim_end_matches('/');
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| CliError::Usage(format!("{raw:?} must start with https:// or http://")))?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(CliError::Usage(format!("{raw:?} is not a URL with a host")));
    }
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        assert_eq!(
            normalize_url(" https://t.example.com/ ").unwrap(),
            "https://t.example.com"
        );
        assert!(normalize_url("t.example.com").is_err());
        assert!(normalize_url("http://").is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let c = Credentials {
            url: "http://x".into(),
            token: "secret-token".into(),
        };
        assert!(!format!("{c:?}").contains("secret-token"));
    }
}
