//! Cross-replica wake-ups: PostgreSQL `NOTIFY` sent inside the transaction of the change it
//! announces, so a listener hears of a change only once it is committed, and of every
//! committed change (a rolled-back transaction notifies nobody). Notes carry ids, never
//! rows: a listener reads what it needs, so payload size never matters. SQLite has one
//! replica and no notes; its broker wakes itself in process.
//!
//! One payload is `<origin>\n<note>\n<note>…` (at most [`MAX_PAYLOAD`] bytes; more notes
//! take more `pg_notify` calls in the same transaction). `origin` is the sending replica's
//! id (`-` for other processes such as the CLI), so a replica skips what it sent itself:
//! it acted on those in process already.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use trellis_protocol::CancelReason;

use super::DbResult;
use crate::model::{AgentId, CommandId};

/// The one channel every replica listens on.
pub const CHANNEL: &str = "trellis";
/// PostgreSQL refuses payloads of 8 000 bytes or more.
const MAX_PAYLOAD: usize = 7_000;

static ORIGIN: OnceLock<String> = OnceLock::new();

/// Sets this process's replica id, once, at start (tests running several in-process
/// servers keep the first: harmless, since SQLite sends no notes).
pub fn set_origin(replica: &str) {
    let _ = ORIGIN.set(replica.to_string());
}

/// This process's replica id (`-` when it is not a server).
pub fn origin() -> &'static str {
    ORIGIN.get().map(String::as_str).unwrap_or("-")
}

/// Whether another replica may be listening. A server alone in the `replicas` table
/// sends no notes (they would reach only itself, which skips them: a statement per
/// transaction for nothing). Its lease loop looks every 2 s (`peers_seen` /
/// `no_peers_seen`), and notes stop only after no other replica was seen for
/// [`PEERS_GRACE_MS`] (a replica swept while stalled has that long to register again). A
/// replica announces itself with [`Note::Replica`] when it registers, which every listener
/// hears at once, so one that starts later is not missed. Until the loop has looked, and
/// in processes that are not servers (the CLI), notes are sent.
static PEERS: AtomicBool = AtomicBool::new(true);
/// When another replica was last seen (ms since the Unix epoch; 0: never).
static PEERS_SEEN_AT: AtomicU64 = AtomicU64::new(0);
/// How long notes go on after the last sight of another replica (two leases).
const PEERS_GRACE_MS: u64 = 20_000;

/// Another replica exists (or just announced itself): notes are sent.
pub fn peers_seen() {
    PEERS_SEEN_AT.store(crate::time::now_ms().max(0) as u64, Ordering::Relaxed);
    PEERS.store(true, Ordering::Relaxed);
}

/// No other replica is registered: notes stop once none was seen for [`PEERS_GRACE_MS`].
pub fn no_peers_seen() {
    let now = crate::time::now_ms().max(0) as u64;
    if now.saturating_sub(PEERS_SEEN_AT.load(Ordering::Relaxed)) >= PEERS_GRACE_MS {
        PEERS.store(false, Ordering::Relaxed);
    }
}

/// Whether [`notify`] sends anything on `backend` now: a write whose only other statement
/// would be its notes may then run alone, without a transaction.
pub(super) fn sends_notes(backend: super::Backend) -> bool {
    backend == super::Backend::Postgres && peers_listen()
}

fn peers_listen() -> bool {
    origin() == "-" || PEERS.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The agent may have commands to claim (created, retried, a slot freed).
    Wake(AgentId),
    /// The command changed (events stored, status moved): stream subscribers re-read.
    Changed(CommandId),
    /// The agent must be told to stop the command.
    Cancel(AgentId, CommandId, CancelReason),
    /// The agent's credentials or settings changed (rotate, revoke, limit): its session
    /// re-reads them.
    Agent(AgentId),
    /// The agent connected with this session epoch: an older session elsewhere closes.
    Session(AgentId, i64),
    /// A replica registered (its id): the others send notes from now on.
    Replica(String),
}

impl Note {
    fn write(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = match self {
            Note::Wake(a) => write!(out, "w {a}"),
            Note::Changed(c) => write!(out, "c {c}"),
            Note::Cancel(a, c, r) => write!(
                out,
                "x {a} {c} {}",
                match r {
                    CancelReason::Cancelled => "cancelled",
                    CancelReason::TimedOut => "timed_out",
                    CancelReason::AgentShutdown => "agent_shutdown",
                }
            ),
            Note::Agent(a) => write!(out, "a {a}"),
            Note::Session(a, e) => write!(out, "s {a} {e}"),
            Note::Replica(r) => write!(out, "r {r}"),
        };
    }

    fn parse(line: &str) -> Option<Self> {
        let mut it = line.split(' ');
        let kind = it.next()?;
        let mut next = || it.next().map(str::to_string);
        Some(match kind {
            "w" => Note::Wake(next()?.parse().ok()?),
            "c" => Note::Changed(next()?.parse().ok()?),
            "x" => {
                let a = next()?.parse().ok()?;
                let c = next()?.parse().ok()?;
                let r = match next()?.as_str() {
                    "cancelled" => CancelReason::Cancelled,
                    "timed_out" => CancelReason::TimedOut,
                    "agent_shutdown" => CancelReason::AgentShutdown,
                    _ => return None,
                };
                Note::Cancel(a, c, r)
            }
            "a" => Note::Agent(next()?.parse().ok()?),
            "s" => Note::Session(next()?.parse().ok()?, next()?.parse().ok()?),
            "r" => Note::Replica(next()?),
            _ => return None,
        })
    }
}

/// The payloads that carry `notes` from `origin`, each under [`MAX_PAYLOAD`] bytes.
pub fn payloads(origin: &str, notes: &[Note]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::with_capacity(256);
    let mut line = String::with_capacity(96);
    for n in notes {
        line.clear();
        n.write(&mut line);
        if cur.is_empty() {
            cur.push_str(origin);
        } else if cur.len() + 1 + line.len() > MAX_PAYLOAD {
            out.push(std::mem::take(&mut cur));
            cur.push_str(origin);
        }
        cur.push('\n');
        cur.push_str(&line);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The origin and notes of a payload; lines this version does not know are skipped (a
/// newer replica during a rolling upgrade).
pub fn parse(payload: &str) -> (&str, Vec<Note>) {
    let mut lines = payload.split('\n');
    let origin = lines.next().unwrap_or("-");
    (origin, lines.filter_map(Note::parse).collect())
}

/// Sends `notes` on `conn`, inside the caller's transaction (delivered at its commit).
/// Nothing on SQLite.
pub(super) async fn notify(conn: &mut sqlx::AnyConnection, notes: &[Note]) -> DbResult<()> {
    // A replica's announcement goes out even when it believes itself alone.
    let announces = notes.iter().any(|n| matches!(n, Note::Replica(_)));
    if notes.is_empty() || conn.backend_name() != "PostgreSQL" || !(peers_listen() || announces) {
        return Ok(());
    }
    for p in payloads(origin(), notes) {
        // `pg_notify` returns `void`, which the `Any` driver cannot decode: select a
        // constant over it instead (the function is volatile, so it is always called).
        sqlx::query("SELECT 1 FROM (SELECT pg_notify($1, $2)) AS n")
            .bind(CHANNEL)
            .bind(p)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_split_under_the_payload_limit() {
        let a = AgentId::new();
        let c = CommandId::new();
        let notes = vec![
            Note::Wake(a),
            Note::Changed(c),
            Note::Cancel(a, c, CancelReason::TimedOut),
            Note::Agent(a),
            Note::Session(a, 42),
            Note::Replica("r-1".into()),
        ];
        let p = payloads("r1", &notes);
        assert_eq!(p.len(), 1);
        let (origin, back) = parse(&p[0]);
        assert_eq!(origin, "r1");
        assert_eq!(back, notes);

        let many: Vec<Note> = (0..1000).map(|_| Note::Changed(CommandId::new())).collect();
        let p = payloads("r1", &many);
        assert!(p.len() > 1);
        assert!(p.iter().all(|s| s.len() < MAX_PAYLOAD));
        let back: Vec<Note> = p.iter().flat_map(|s| parse(s).1).collect();
        assert_eq!(back, many, "every note arrives, in order");
        assert!(payloads("r1", &[]).is_empty());
        assert_eq!(
            parse("r2\nz what\nw nope").1,
            vec![],
            "unknown lines are skipped"
        );
    }
}
