//! Running one external program (git, terraform) for a command: its own process group,
//! no stdin, stdout and stderr streamed to the [`LogSink`] as they are written, and a
//! graceful stop on cancel (SIGINT to the whole group, SIGKILL after a grace period).
//!
//! Signals go to the process group so that what terraform started (provider plugins,
//! `local-exec` shells) stops with it. They are sent with the `kill` program: the
//! workspace forbids unsafe code, and a process group needs no more than that.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use trellis_protocol::LogStream;

use super::logs::{LogSink, StreamDecoder};
use crate::exec::ExecContext;

/// How long the pipes are drained after the process exited before whatever still holds
/// them open (a grandchild left running) is killed.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Largest captured stdout (`terraform output -json`).
pub const MAX_CAPTURE_BYTES: usize = 32 * 1024 * 1024;

pub struct ProcSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Keep stdout in memory instead of logging it (for output that may hold sensitive
    /// values, such as `terraform output -json`).
    pub capture_stdout: bool,
    /// The command line shown in the logs instead of the real one (which may carry a
    /// credentialed URL).
    pub shown: Option<String>,
}

impl ProcSpec {
    pub fn new(program: impl Into<PathBuf>, cwd: &Path) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            cwd: cwd.to_path_buf(),
            env: Vec::new(),
            capture_stdout: false,
            shown: None,
        }
    }

    /// Shows `line` in the logs instead of the real command line.
    pub fn shown_as(mut self, line: String) -> Self {
        self.shown = Some(line);
        self
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_string(), v.into()));
        self
    }

    /// The command line as shown in the logs.
    pub fn display(&self) -> String {
        if let Some(shown) = &self.shown {
            return shown.clone();
        }
        let name = self
            .program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.program.display().to_string());
        let mut s = format!("$ {name}");
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

pub struct ProcOutput {
    pub status: ExitStatus,
    /// Captured stdout (only with `capture_stdout`).
    pub stdout: Vec<u8>,
    /// Whether the captured stdout exceeded [`MAX_CAPTURE_BYTES`].
    pub stdout_overflow: bool,
    pub stdout_tail: Vec<String>,
    pub stderr_tail: Vec<String>,
    /// The run was stopped because the command was cancelled.
    pub cancelled: bool,
    /// It did not stop within the grace period and was killed.
    pub killed: bool,
}

impl ProcOutput {
    /// The lines that explain a failure: from the first `Error:` line of the last lines of
    /// stderr (or stdout when stderr said nothing) on, or the last few lines.
    pub fn error_excerpt(&self, max_chars: usize) -> String {
        let lines = if self.stderr_tail.iter().any(|l| !l.trim().is_empty()) {
            &self.stderr_tail
        } else {
            &self.stdout_tail
        };
        let lines: Vec<&str> = lines
            .iter()
            .map(|l| l.trim_end())
            .filter(|l| !l.is_empty())
            .collect();
        let start = lines
            .iter()
            .position(|l| l.starts_with("Error:") || l.starts_with("fatal:"))
            .unwrap_or(lines.len().saturating_sub(8));
        let mut text = lines[start..].join("\n");
        if text.chars().count() > max_chars {
            text = text.chars().take(max_chars).collect::<String>() + "…";
        }
        text
    }
}

/// Runs a program to its end, streaming its output. `on_stdout_line` sees each complete
/// stdout line (redacted) and may return an overall percent to report as progress.
/// Returns `Err` only when the program could not be started.
pub async fn run(
    ctx: &ExecContext,
    sink: &mut LogSink<'_>,
    spec: ProcSpec,
    grace: Duration,
    on_stdout_line: &mut (dyn FnMut(&str) -> Option<f32> + Send),
) -> std::io::Result<ProcOutput> {
    sink.system(&spec.display()).await;
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut group = GroupGuard(child.id());
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other("child pipes missing"));
    };
    let redactor = sink.redactor().clone();
    let mut out_dec = StreamDecoder::new(LogStream::Stdout);
    let mut err_dec = StreamDecoder::new(LogStream::Stderr);
    let mut out_buf = vec![0u8; 64 * 1024];
    let mut err_buf = vec![0u8; 64 * 1024];
    let mut captured = Vec::new();
    let mut overflow = false;
    let (mut out_done, mut err_done) = (false, false);
    let mut status: Option<ExitStatus> = None;
    let mut interrupted = false;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let mut drain_until: Option<Instant> = None;
    let far = || Instant::now() + Duration::from_secs(86_400);
    let mut progress: Vec<f32> = Vec::new();

    loop {
        if out_done && err_done && status.is_some() {
            break;
        }
        let flush_at = sink.deadline();
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled(), if !interrupted && status.is_none() => {
                interrupted = true;
                kill_at = Some(Instant::now() + grace);
                sink.system(&format!(
                    "cancel requested: sending SIGINT to {} (process group {}); SIGKILL in {}",
                    spec.program.display(),
                    group.0.unwrap_or_default(),
                    fmt_duration(grace),
                )).await;
                group.signal("INT").await;
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(far)),
                if kill_at.is_some() && !killed && status.is_none() => {
                killed = true;
                sink.system(&format!(
                    "{} did not exit within {} of SIGINT; sending SIGKILL",
                    spec.program.display(),
                    fmt_duration(grace),
                )).await;
                group.signal("KILL").await;
                let _ = child.start_kill();
            }
            r = stdout.read(&mut out_buf), if !out_done => {
                let text = match r {
                    Ok(n) if n > 0 => {
                        if spec.capture_stdout {
                            capture(&mut captured, &out_buf[..n], &mut overflow);
                            String::new()
                        } else {
                            out_dec.feed(&out_buf[..n], &redactor, &mut |l| {
                                progress.extend(on_stdout_line(l));
                            })
                        }
                    }
                    _ => {
                        out_done = true;
                        out_dec.finish(&redactor, &mut |l| progress.extend(on_stdout_line(l)))
                    }
                };
                sink.push(LogStream::Stdout, &text).await;
                for p in progress.drain(..) {
                    sink.flush().await;
                    ctx.progress(p, None).await;
                }
            }
            r = stderr.read(&mut err_buf), if !err_done => {
                let text = match r {
                    Ok(n) if n > 0 => err_dec.feed(&err_buf[..n], &redactor, &mut |_| {}),
                    _ => {
                        err_done = true;
                        err_dec.finish(&redactor, &mut |_| {})
                    }
                };
                sink.push(LogStream::Stderr, &text).await;
            }
            r = child.wait(), if status.is_none() => {
                status = Some(r?);
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(far)), if flush_at.is_some() => {
                sink.flush().await;
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(far)), if drain_until.is_some() => {
                sink.system(&format!(
                    "{} exited but its output is still held open by another process; stopping it",
                    spec.program.display(),
                )).await;
                group.signal("KILL").await;
                if !out_done {
                    sink.push(LogStream::Stdout, &out_dec.finish(&redactor, &mut |_| {})).await;
                }
                if !err_done {
                    sink.push(LogStream::Stderr, &err_dec.finish(&redactor, &mut |_| {})).await;
                }
                break;
            }
        }
        // Under a steady stream the read branches win every round; honour the timer here.
        if sink.deadline().is_some_and(|d| d <= Instant::now()) {
            sink.flush().await;
        }
    }
    sink.flush().await;
    group.0 = None;
    let Some(status) = status else {
        return Err(std::io::Error::other("process status missing"));
    };
    Ok(ProcOutput {
        status,
        stdout: captured,
        stdout_overflow: overflow,
        stdout_tail: out_dec.tail(),
        stderr_tail: err_dec.tail(),
        cancelled: interrupted,
        killed,
    })
}

fn capture(buf: &mut Vec<u8>, data: &[u8], overflow: &mut bool) {
    let room = MAX_CAPTURE_BYTES.saturating_sub(buf.len());
    if data.len() > room {
        *overflow = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_millis() != 0 || secs == 0 {
        format!("{}ms", d.as_millis())
    } else if (secs / 86_400) * 86_400 == secs {
        format!("{}d", secs / 86_400)
    } else if (secs / 3600) * 3600 == secs {
        format!("{}h", secs / 3600)
    } else {
        format!("{secs}s")
    }
}

/// The process group of a running child (its pid, as it leads the group). Dropped while
/// the child still runs — the command's future was dropped — it kills the whole group.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    async fn signal(&self, sig: &str) {
        let Some(pgid) = self.0 else { return };
        let r = tokio::process::Command::new("kill")
            .args(["-s", sig, "--", &format!("-{pgid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if let Err(e) = r {
            tracing::warn!(pgid, sig, error = %e, "cannot run kill");
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pgid}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Kills what a previous tendril's Terraform runs left behind when that tendril died
/// without ending them (SIGKILL, crash): processes working inside `root` (the workspaces)
/// whose process group is a Terraform run's — its leader is gone (the provider plugins
/// and provisioner shells outlive a Terraform that lost its pipes) or is `terraform`
/// itself. Called once when the executor is made, before any run of this process.
/// Linux only (reads `/proc`); returns how many processes were killed.
pub(crate) fn kill_orphans(root: &Path, terraform: &Path) -> usize {
    let Ok(root) = root.canonicalize() else {
        return 0;
    };
    let terraform = terraform
        .canonicalize()
        .unwrap_or_else(|_| terraform.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = std::process::id();
    let mut victims = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else {
            continue;
        };
        if !cwd.starts_with(&root) {
            continue;
        }
        let Some((pgrp, sid)) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                // `pid (comm) state ppid pgrp session …`; comm may hold spaces.
                let mut f = s.get(s.rfind(')')? + 1..)?.split_whitespace().skip(2);
                Some((
                    f.next()?.parse::<u32>().ok()?,
                    f.next()?.parse::<u32>().ok()?,
                ))
            })
        else {
            continue;
        };
        if pgrp == sid {
            continue; // a login or terminal session's own group, not one we started
        }
        // The group's leader: gone (or a zombie, whose exe cannot be read), or Terraform.
        let leader_exe = std::fs::read_link(format!("/proc/{pgrp}/exe"));
        if leader_exe.is_err() || leader_exe.is_ok_and(|exe| exe == terraform) {
            victims.push((pid, pgrp, cwd));
        }
    }
    // Decide first, then kill: a killed leader stays in /proc as a zombie for a moment.
    let mut killed = 0;
    for (pid, pgrp, cwd) in victims {
        let ok = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            tracing::warn!(
                pid,
                pgid = pgrp,
                cwd = %cwd.display(),
                "killed a process a previous run of tendril left in a Terraform workspace"
            );
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_duration(Duration::from_secs(10)), "10s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn orphans_of_a_dead_run_are_killed_and_nothing_else() {
        use std::os::unix::process::CommandExt;
        let root = std::env::temp_dir().join(format!("tendril-orphans-{}", uuid::Uuid::new_v4()));
        let ws = root.join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        // A run whose group leader died and left a child behind, as Terraform leaves its
        // provider plugin when tendril is SIGKILLed.
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .current_dir(&ws)
            .process_group(0)
            .output()
            .unwrap();
        let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        // A process of someone else's in the same directory, leading its own group.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&ws)
            .process_group(0)
            .spawn()
            .unwrap();
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        assert!(alive(orphan));
        assert_eq!(kill_orphans(&root, Path::new("/nonexistent/terraform")), 1);
        let t = std::time::Instant::now();
        while alive(orphan) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(orphan), "the orphan is killed");
        assert!(
            other.try_wait().unwrap().is_none(),
            "a live group's process is left alone"
        );
        let _ = other.kill();
        let _ = other.wait();
        let _ = std::fs::remove_dir_all(&root);
    }
}
