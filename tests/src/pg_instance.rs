//! A private PostgreSQL server for tests that stop or restart it: `initdb` into a fresh
//! directory and `pg_ctl` on a free port, from the installed server binaries
//! (`/usr/lib/postgresql/<newest>/bin`, or `TRELLIS_TEST_PG_BIN`). The machine's own
//! PostgreSQL (5432, which the other tests share) is never touched: stopping it would fail
//! every other test running at the same time.
//!
//! PostgreSQL refuses to run as root; when the tests run as root, `initdb`, `pg_ctl` and
//! the server run as the `postgres` user (`runuser`), in a directory it owns.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::tempdir::TempDir;

/// A PostgreSQL server of its own on `127.0.0.1:port`, trust auth, user `postgres`. It can
/// be stopped and started again on the same port and data; dropping it stops it
/// (immediately) and removes its directory.
#[derive(Debug)]
pub struct PgInstance {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    /// Removed last, after the server stopped.
    dir: TempDir,
}

impl PgInstance {
    /// `initdb` and start a new server on a free port (`tag` names its directory).
    pub fn start(tag: &str) -> Self {
        let bin = pg_bin_dir();
        let dir = TempDir::new(tag);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("pg data dir");
        if as_root() {
            // Owned by postgres, who must reach it: the temp dir itself is root's 0755.
            let pg = postgres_ids();
            for p in [dir.path(), data.as_path()] {
                std::os::unix::fs::chown(p, Some(pg.0), Some(pg.1)).expect("chown pg dir");
            }
        }
        let port = free_port();
        let pg = Self {
            log: dir.join("postgres.log"),
            bin,
            data,
            port,
            dir,
        };
        let out = pg.run(
            "initdb",
            &[
                "-D",
                &pg.data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_again();
        pg
    }

    /// The URL of the database `postgres` on this server.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) on the same port and data; waits until it accepts
    /// connections (`pg_ctl -w`).
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        let out = self.run(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "30",
                "-D",
                &self.data.to_string_lossy(),
                "-l",
                &self.log.to_string_lossy(),
                "-o",
                &opts,
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops the server with `-m fast` (clients are disconnected, what was committed is
    /// kept) and waits until it is down.
    pub fn stop_fast(&self) {
        self.stop("fast");
    }

    fn stop(&self, mode: &str) -> bool {
        self.run(
            "pg_ctl",
            &[
                "stop",
                "-w",
                "-t",
                "30",
                "-m",
                mode,
                "-D",
                &self.data.to_string_lossy(),
            ],
        )
        .status
        .success()
    }

    /// The server's log (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs one of the server binaries, as `postgres` when we are root.
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            // Its own working directory: postgres may not be allowed into ours.
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }
}

impl Drop for PgInstance {
    fn drop(&mut self) {
        // Already stopped is fine; the directory goes with `dir`.
        let _ = self.stop("immediate");
    }
}

/// `TRELLIS_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` with `initdb`.
fn pg_bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TRELLIS_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).expect(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (set TRELLIS_TEST_PG_BIN)",
    )
}

fn as_root() -> bool {
    // The effective uid, without libc: /proc/self/status `Uid: real effective …`.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id postgres");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("running as root needs a `postgres` user to run PostgreSQL as")
    };
    (id("-u"), id("-g"))
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}
