//! The control plane's data directory: where files that must stay private live (the
//! generated admin token). By default the directory of the SQLite database, else
//! `--data-dir`, else the working directory.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file a generated bootstrap admin token is written to.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Marker: this installation's credential hashes are keyed (see `crate::auth`).
pub const CREDENTIALS_KEYED_FILE: &str = "credentials.keyed";

/// The SQLite database file of `url` (`sqlite://FILE`, `sqlite:FILE`, query stripped);
/// `None` for PostgreSQL and in-memory databases.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.contains(":memory:")).then(|| PathBuf::from(path))
}

/// The data directory: `configured`, else the SQLite file's directory, else `.`.
pub fn resolve(configured: Option<&Path>, database_url: &str) -> PathBuf {
    if let Some(d) = configured {
        return d.to_path_buf();
    }
    sqlite_file(database_url)
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Writes `contents` to `path` readable by the owner only (0600, also when the file
/// existed with a wider mode), creating the directory (0700) if needed.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Makes the SQLite database of `url` owner-only before it is opened: a new file is
/// created 0600 (SQLite gives its `-wal` and `-shm` files the database file's mode), an
/// existing one readable by others is narrowed to 0600 with its `-wal`/`-shm`.
pub fn private_sqlite_file(url: &str) -> std::io::Result<()> {
    let Some(file) = sqlite_file(url) else {
        return Ok(());
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
    {
        Ok(f) => return f.set_permissions(std::fs::Permissions::from_mode(0o600)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        // Let SQLite report a directory that does not exist, in its own words.
        Err(_) => return Ok(()),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.clone().into_os_string();
        name.push(suffix);
        let path = PathBuf::from(name);
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                tracing::warn!(path = %path.display(), "database file was readable by others; now 0600");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_file_of_urls() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/trellis/t.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/trellis/t.db"))
        );
        assert_eq!(
            sqlite_file("sqlite://trellis.db"),
            Some(PathBuf::from("trellis.db"))
        );
        assert_eq!(sqlite_file("sqlite:t.db"), Some(PathBuf::from("t.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://x@h/db"), None);
        assert_eq!(
            resolve(None, "sqlite:///var/lib/trellis/t.db"),
            PathBuf::from("/var/lib/trellis")
        );
        assert_eq!(resolve(None, "sqlite://trellis.db"), PathBuf::from("."));
        assert_eq!(resolve(None, "postgres://x@h/db"), PathBuf::from("."));
        assert_eq!(
            resolve(Some(Path::new("/d")), "sqlite:///x/t.db"),
            PathBuf::from("/d")
        );
    }
}
