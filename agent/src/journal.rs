//! The agent's local journal: an append-only file of JSON lines recording which command
//! ids were accepted, every event produced, and which events the control plane
//! acknowledged. On start it is replayed so that unacknowledged events are re-sent after
//! an agent restart and a command id is never run twice; then it is compacted.
//!
//! Accepting a command and a command's final event are fsynced before they are
//! acknowledged to the server; other events are flushed per batch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trellis_protocol::{Event, EventBody};
use uuid::Uuid;

/// How many accepted command ids are remembered to refuse a second run.
const REMEMBER_IDS: usize = 50_000;
/// Rewrite the journal when it grows past this and nothing is pending.
const COMPACT_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
enum Record {
    Accepted {
        id: Uuid,
        /// Set once the command's final event was acknowledged.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        done: bool,
    },
    Event(Event),
    Acked {
        id: Uuid,
        seq: u64,
    },
}

/// Per-command state that outlives a connection.
#[derive(Debug, Default)]
pub struct Pending {
    pub next_seq: u64,
    pub unacked: VecDeque<Event>,
    pub finished: bool,
}

/// What the journal held when it was opened.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Commands with events not yet acknowledged (including finished ones).
    pub pending: HashMap<Uuid, Pending>,
    /// Accepted commands that never finished: they were running when the agent stopped
    /// and cannot be resumed. They are not reported as active, so the control plane
    /// marks them `agent_lost_command`.
    pub interrupted: Vec<Uuid>,
}

pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    seen: HashSet<Uuid>,
    seen_order: VecDeque<Uuid>,
    done: HashSet<Uuid>,
    written: u64,
    dirty: bool,
}

impl Journal {
    /// Opens (creating if needed), replays and compacts the journal in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Replayed)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("journal.jsonl");
        let mut seen_order = VecDeque::new();
        let mut pending: HashMap<Uuid, Pending> = HashMap::new();
        let mut acked: HashMap<Uuid, u64> = HashMap::new();
        let mut finished: HashSet<Uuid> = HashSet::new();
        let mut done: HashSet<Uuid> = HashSet::new();
        if path.exists() {
            let reader = BufReader::new(File::open(&path)?);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                // A torn last line (crash mid-write) is ignored; everything before it counts.
                let Ok(rec) = serde_json::from_str::<Record>(&line) else {
                    continue;
                };
                match rec {
                    Record::Accepted { id, done: false } => seen_order.push_back(id),
                    Record::Accepted { id, done: true } => {
                        done.insert(id);
                    }
                    Record::Event(ev) => {
                        let p = pending.entry(ev.command_id).or_default();
                        p.next_seq = p.next_seq.max(ev.seq);
                        if matches!(ev.body, EventBody::Finished(_)) {
                            finished.insert(ev.command_id);
                        }
                        p.unacked.push_back(ev);
                    }
                    Record::Acked { id, seq } => {
                        let a = acked.entry(id).or_default();
                        *a = (*a).max(seq);
                    }
                }
            }
        }
        for (id, p) in pending.iter_mut() {
            let upto = acked.get(id).copied().unwrap_or(0);
            p.unacked.retain(|e| e.seq > upto);
            p.finished = finished.contains(id);
        }
        let mut seen = HashSet::new();
        seen_order.retain(|id| seen.insert(*id));
        while seen_order.len() > REMEMBER_IDS {
            if let Some(old) = seen_order.pop_front() {
                seen.remove(&old);
                done.remove(&old);
            }
        }
        let interrupted: Vec<Uuid> = seen_order
            .iter()
            .filter(|id| !finished.contains(id) && !done.contains(id))
            .copied()
            .collect();
        // Interrupted commands stay remembered (never run twice) but are not pending:
        // their unacked events are still re-sent so the log is complete.
        pending.retain(|_, p| !p.unacked.is_empty());

        let mut journal = Self {
            out: BufWriter::new(File::create(path.with_extension("tmp"))?),
            path,
            seen,
            seen_order,
            done,
            written: 0,
            dirty: false,
        };
        journal.rewrite(&pending)?;
        Ok((
            journal,
            Replayed {
                pending,
                interrupted,
            },
        ))
    }

    /// Rewrites the file with only what is still needed, atomically.
    fn rewrite(&mut self, pending: &HashMap<Uuid, Pending>) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut out = BufWriter::new(File::create(&tmp)?);
        let mut written = 0u64;
        for id in &self.seen_order {
            let done = self.done.contains(id);
            written += write_record(
                &mut out,
                &Record::Accepted {
                    id: *id,
                    done: false,
                },
            )?;
            if done {
                written += write_record(&mut out, &Record::Accepted { id: *id, done })?;
            }
        }
        for p in pending.values() {
            for ev in &p.unacked {
                written += write_record(&mut out, &Record::Event(ev.clone()))?;
            }
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        drop(out);
        std::fs::rename(&tmp, &self.path)?;
        let file = OpenOptions::new().append(true).open(&self.path)?;
        self.out = BufWriter::with_capacity(256 * 1024, file);
        self.written = written;
        Ok(())
    }

    /// Compacts when the file is large and nothing is pending (cheap then).
    pub fn maybe_compact(&mut self, pending: &HashMap<Uuid, Pending>) -> anyhow::Result<()> {
        if self.written > COMPACT_BYTES && pending.values().all(|p| p.unacked.is_empty()) {
            self.rewrite(&HashMap::new())?;
        }
        Ok(())
    }

    pub fn has_seen(&self, id: &Uuid) -> bool {
        self.seen.contains(id)
    }

    /// Records that a command was accepted, durably.
    pub fn accept(&mut self, id: Uuid) -> anyhow::Result<()> {
        if self.seen.insert(id) {
            self.seen_order.push_back(id);
        }
        self.written += write_record(&mut self.out, &Record::Accepted { id, done: false })?;
        self.sync()
    }

    /// Records that a command's final event was acknowledged: nothing more to send.
    pub fn done(&mut self, id: Uuid) -> anyhow::Result<()> {
        self.done.insert(id);
        self.written += write_record(&mut self.out, &Record::Accepted { id, done: true })?;
        self.dirty = true;
        Ok(())
    }

    pub fn event(&mut self, ev: &Event) -> anyhow::Result<()> {
        self.written += write_record_event(&mut self.out, ev)?;
        self.dirty = true;
        Ok(())
    }

    pub fn acked(&mut self, id: Uuid, seq: u64) -> anyhow::Result<()> {
        self.written += write_record(&mut self.out, &Record::Acked { id, seq })?;
        self.dirty = true;
        Ok(())
    }

    /// Flushes buffered records to the OS (survives an agent crash).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if self.dirty {
            self.out.flush()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Flushes and fsyncs (survives a machine crash).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        self.dirty = false;
        self.out.get_ref().sync_data()?;
        Ok(())
    }
}

fn write_record(out: &mut BufWriter<File>, rec: &Record) -> anyhow::Result<u64> {
    let mut line = serde_json::to_vec(rec)?;
    line.push(b'\n');
    out.write_all(&line)?;
    Ok(line.len() as u64)
}

fn write_record_event(out: &mut BufWriter<File>, ev: &Event) -> anyhow::Result<u64> {
    #[derive(Serialize)]
    struct EventRef<'a> {
        r: &'static str,
        #[serde(flatten)]
        ev: &'a Event,
    }
    let mut line = serde_json::to_vec(&EventRef { r: "event", ev })?;
    line.push(b'\n');
    out.write_all(&line)?;
    Ok(line.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_protocol::{FinalStatus, LogStream, Outcome};

    fn ev(id: Uuid, seq: u64, body: EventBody) -> Event {
        Event {
            command_id: id,
            seq,
            ts: 0,
            body,
        }
    }

    #[test]
    fn replay_keeps_unacked_and_finds_interrupted() {
        let dir = std::env::temp_dir().join(format!("tendril-journal-{}", Uuid::new_v4()));
        let done = Uuid::new_v4();
        let cut = Uuid::new_v4();
        let quiet = Uuid::new_v4();
        {
            let (mut j, r) = Journal::open(&dir).unwrap();
            assert!(r.pending.is_empty());
            for id in [done, cut, quiet] {
                j.accept(id).unwrap();
            }
            let log = |s: &str| EventBody::Log {
                stream: LogStream::Stdout,
                data: s.into(),
            };
            j.event(&ev(done, 1, log("a"))).unwrap();
            j.event(&ev(
                done,
                2,
                EventBody::Finished(Outcome {
                    status: FinalStatus::Succeeded,
                    result: None,
                    error: None,
                }),
            ))
            .unwrap();
            j.acked(done, 1).unwrap();
            j.event(&ev(cut, 1, log("b"))).unwrap();
            j.event(&ev(cut, 2, log("c"))).unwrap();
            j.acked(cut, 2).unwrap();
            j.sync().unwrap();
            // a torn line at the end is ignored
            use std::io::Write;
            j.out.write_all(b"{\"r\":\"event\",\"comm").unwrap();
            j.sync().unwrap();
        }
        let (j, r) = Journal::open(&dir).unwrap();
        assert!(j.has_seen(&done) && j.has_seen(&cut) && j.has_seen(&quiet));
        let p = &r.pending[&done];
        assert!(p.finished);
        assert_eq!(p.unacked.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
        assert!(
            !r.pending.contains_key(&cut),
            "all of cut's events were acked"
        );
        let mut interrupted = r.interrupted.clone();
        interrupted.sort();
        let mut expect = vec![cut, quiet];
        expect.sort();
        assert_eq!(interrupted, expect);
        // compaction kept the needed state: reopening gives the same answer
        drop(j);
        let (_, r2) = Journal::open(&dir).unwrap();
        assert_eq!(r2.pending[&done].unacked.len(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
