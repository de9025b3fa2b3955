//! Scratch directories that remove themselves.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A fresh directory under the system temp dir (`trellis-{tag}-{uuid}`), removed with
/// everything in it when dropped. It derefs to its [`Path`], so `dir.join("agent")` and
/// `&dir` (as `&Path`) work directly.
///
/// When the test is panicking the directory is kept (and its path printed): the logs of
/// the `trellis` and `tendril` processes the harness started live there.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("trellis-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed: keeping {} for inspection",
                self.path.display()
            );
            return;
        }
        // A process that is still stopping may create a file while the tree is removed;
        // try again briefly.
        for _ in 0..10 {
            match std::fs::remove_dir_all(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return,
            }
        }
        eprintln!("could not remove {}", self.path.display());
    }
}
