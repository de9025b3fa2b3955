//! Output of the processes a `terraform_apply` runs, on its way to the session.
//!
//! Bytes from a pipe pass through a [`StreamDecoder`] (UTF-8 decoding that tolerates
//! multi-byte characters split across reads, and redaction of sensitive values that
//! holds back a possible partial secret), then into the one [`LogSink`] of the command,
//! which batches them into chunks: a chunk goes out 500 ms after its first byte or when it
//! reaches 10 KB, whichever comes first, and always before text of another stream, so the
//! chunks keep the order in which the output was read. The sink also caps the total output
//! of a command: past the cap, output is counted and dropped (the process keeps running,
//! its pipes keep being drained) and a `[output truncated …]` marker says so.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use trellis_protocol::LogStream;

use super::redact::Redactor;
use crate::exec::ExecContext;

/// A chunk is shipped at most this long after its first byte…
pub const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// …or as soon as it holds this many bytes.
pub const LOG_FLUSH_BYTES: usize = 10 * 1024;

/// Lines kept per stream for error messages…
const TAIL_LINES: usize = 40;
/// …out of at least this many bytes of the stream's end.
const TAIL_BYTES: usize = 16 * 1024;
/// Longest line kept in a tail.
const TAIL_LINE_CHARS: usize = 1000;

/// Batches, caps and ships the log output of one command.
pub struct LogSink<'a> {
    ctx: &'a ExecContext,
    redactor: Arc<Redactor>,
    pending: String,
    pending_stream: LogStream,
    pending_since: Option<Instant>,
    /// Bytes of stdout/stderr accepted for shipping (pending included).
    accepted: u64,
    cap: u64,
    /// Bytes dropped after the cap was reached.
    dropped: u64,
    truncated: bool,
}

impl<'a> LogSink<'a> {
    pub fn new(ctx: &'a ExecContext, redactor: Arc<Redactor>, cap_bytes: u64) -> Self {
        Self {
            ctx,
            redactor,
            pending: String::new(),
            pending_stream: LogStream::Stdout,
            pending_since: None,
            accepted: 0,
            cap: cap_bytes,
            dropped: 0,
            truncated: false,
        }
    }

    pub fn redactor(&self) -> &Arc<Redactor> {
        &self.redactor
    }

    /// When the pending chunk must be shipped, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + LOG_FLUSH_INTERVAL)
    }

    /// Queues already redacted process output.
    pub async fn push(&mut self, stream: LogStream, mut text: &str) {
        if text.is_empty() {
            return;
        }
        if self.accepted >= self.cap {
            self.drop_output(text.len()).await;
            return;
        }
        let room = (self.cap - self.accepted).min(usize::MAX as u64) as usize;
        let mut over = "";
        if text.len() > room {
            let cut = floor_char_boundary(text, room);
            over = &text[cut..];
            text = &text[..cut];
        }
        self.accepted += text.len() as u64;
        if !self.pending.is_empty() && self.pending_stream != stream {
            self.flush().await;
        }
        while !text.is_empty() {
            let space = LOG_FLUSH_BYTES.saturating_sub(self.pending.len());
            if text.len() < space {
                if self.pending.is_empty() {
                    self.pending_since = Some(Instant::now());
                    self.pending_stream = stream;
                }
                self.pending.push_str(text);
                break;
            }
            let mut cut = floor_char_boundary(text, space);
            if cut == 0 && self.pending.is_empty() {
                // A single character wider than the space left: ship it whole.
                cut = text.chars().next().map_or(text.len(), char::len_utf8);
            }
            self.pending_stream = stream;
            self.pending.push_str(&text[..cut]);
            text = &text[cut..];
            self.flush().await;
        }
        if !over.is_empty() {
            self.drop_output(over.len()).await;
        }
    }

    /// Counts output past the cap; the first time, says so in the log.
    async fn drop_output(&mut self, bytes: usize) {
        if !self.truncated {
            self.truncated = true;
            self.flush().await;
            let cap = human_bytes(self.cap);
            self.system(&format!(
                "[output truncated: the log limit of {cap} for this command was reached; \
                 further output is discarded while the command keeps running]"
            ))
            .await;
        }
        self.dropped += bytes as u64;
    }

    /// Ships the pending chunk now.
    pub async fn flush(&mut self) {
        self.pending_since = None;
        if self.pending.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.pending);
        self.ctx.log(self.pending_stream, &data).await;
    }

    /// An agent message (what is being run, waits, cancel handling), in order with the
    /// process output and redacted like it.
    pub async fn system(&mut self, message: &str) {
        self.flush().await;
        let mut line = self.redactor.redact(message).into_owned();
        if !line.ends_with('\n') {
            line.push('\n');
        }
        self.ctx.log(LogStream::System, &line).await;
    }

    /// Ships what is pending and reports how much output the cap dropped.
    pub async fn finish(&mut self) {
        self.flush().await;
        if self.dropped > 0 {
            let dropped = self.dropped;
            self.dropped = 0;
            self.system(&format!(
                "[output truncated: {dropped} bytes ({}) of output were not shipped]",
                human_bytes(dropped)
            ))
            .await;
        }
    }
}

/// Decodes and redacts one output stream of one process.
pub struct StreamDecoder {
    pub stream: LogStream,
    /// Bytes of an incomplete UTF-8 sequence at the end of the last read.
    utf8_carry: Vec<u8>,
    /// Decoded text held back because it may be the start of a secret.
    held: String,
    /// The current incomplete line (redacted, bounded), for the line observer.
    line: String,
    /// The last [`TAIL_BYTES`] to twice that of the stream (redacted), for error messages.
    tail: String,
}

impl StreamDecoder {
    pub fn new(stream: LogStream) -> Self {
        Self {
            stream,
            utf8_carry: Vec::new(),
            held: String::new(),
            line: String::new(),
            tail: String::new(),
        }
    }

    /// Decodes a read; returns the redacted text that may be shipped now and calls
    /// `on_line` for each completed line.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        redactor: &Redactor,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> String {
        let mut text = std::mem::take(&mut self.held);
        decode_utf8(&mut self.utf8_carry, bytes, &mut text, false);
        let mut out = match redactor.redact(&text) {
            std::borrow::Cow::Borrowed(_) => text,
            std::borrow::Cow::Owned(r) => r,
        };
        let safe = redactor.safe_prefix_len(&out);
        self.held = out[safe..].to_string();
        out.truncate(safe);
        self.observe(&out, on_line);
        out
    }

    /// The end of the stream: everything still held back, redacted.
    pub fn finish(
        &mut self,
        redactor: &Redactor,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> String {
        let mut text = std::mem::take(&mut self.held);
        decode_utf8(&mut self.utf8_carry, &[], &mut text, true);
        let out = redactor.redact(&text).into_owned();
        self.observe(&out, on_line);
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            on_line(&line);
        }
        out
    }

    /// The last lines of the stream (redacted, long lines shortened), oldest first.
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<&str> = self.tail.lines().collect();
        if lines.len() > TAIL_LINES {
            lines.drain(..lines.len() - TAIL_LINES);
        }
        lines
            .into_iter()
            .map(|l| {
                if l.len() > TAIL_LINE_CHARS {
                    format!("{}…", &l[..floor_char_boundary(l, TAIL_LINE_CHARS)])
                } else {
                    l.to_string()
                }
            })
            .collect()
    }

    fn observe(&mut self, text: &str, on_line: &mut dyn FnMut(&str)) {
        self.tail.push_str(text);
        if self.tail.len() > 2 * TAIL_BYTES {
            let cut = floor_char_boundary(&self.tail, self.tail.len() - TAIL_BYTES);
            self.tail.drain(..cut);
        }
        let mut rest = text;
        while let Some(nl) = rest.find('\n') {
            let piece = &rest[..nl];
            rest = &rest[nl + 1..];
            if self.line.is_empty() {
                on_line(piece.strip_suffix('\r').unwrap_or(piece));
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.push_str(piece);
                on_line(line.strip_suffix('\r').unwrap_or(&line));
            }
        }
        if self.line.len() < TAIL_LINE_CHARS * 4 {
            self.line.push_str(rest);
        }
    }
}

/// Appends the UTF-8 text in `carry ++ input` to `out`, replacing invalid sequences with
/// U+FFFD. An incomplete sequence at the very end stays in `carry` unless `last`.
pub fn decode_utf8(carry: &mut Vec<u8>, input: &[u8], out: &mut String, last: bool) {
    let mut buf = std::mem::take(carry);
    buf.extend_from_slice(input);
    let mut rest: &[u8] = &buf;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                if let Ok(s) = std::str::from_utf8(valid) {
                    out.push_str(s);
                }
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    None if last => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    *carry = rest.to_vec();
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

pub fn human_bytes(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if n >= MIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> (
        ExecContext,
        tokio::sync::mpsc::Receiver<crate::exec::Report>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1000);
        let id = uuid::Uuid::new_v4();
        (ExecContext::new(id, id, 1, tx), rx)
    }

    fn drain(
        rx: &mut tokio::sync::mpsc::Receiver<crate::exec::Report>,
    ) -> Vec<(LogStream, String)> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            if let trellis_protocol::EventBody::Log { stream, data } = r.body {
                out.push((stream, data));
            }
        }
        out
    }

    #[tokio::test]
    async fn sink_batches_by_size_and_time_in_stream_order() {
        let (ctx, mut rx) = ctx();
        let mut sink = LogSink::new(&ctx, Arc::new(Redactor::default()), 1 << 30);
        sink.push(LogStream::Stdout, &"a".repeat(25 * 1024)).await;
        let sent = drain(&mut rx);
        assert_eq!(sent.len(), 2);
        assert!(sent
            .iter()
            .all(|(s, d)| *s == LogStream::Stdout && d.len() == LOG_FLUSH_BYTES));
        let deadline = sink.deadline().expect("5 KiB pending");
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            left <= LOG_FLUSH_INTERVAL && left > LOG_FLUSH_INTERVAL / 2,
            "{left:?}"
        );
        sink.push(LogStream::Stdout, "b").await;
        assert_eq!(
            sink.deadline(),
            Some(deadline),
            "the first byte sets the deadline"
        );
        sink.push(LogStream::Stderr, "err").await;
        sink.push(LogStream::Stdout, "out").await;
        sink.system("note").await;
        let sent = drain(&mut rx);
        let kinds: Vec<_> = sent.iter().map(|(s, d)| (*s, d.len())).collect();
        assert_eq!(
            kinds,
            [
                (LogStream::Stdout, 5 * 1024 + 1),
                (LogStream::Stderr, 3),
                (LogStream::Stdout, 3),
                (LogStream::System, 5)
            ]
        );
    }

    #[tokio::test]
    async fn sink_caps_output_with_a_marker() {
        let (ctx, mut rx) = ctx();
        let mut sink = LogSink::new(&ctx, Arc::new(Redactor::default()), 100);
        sink.push(LogStream::Stdout, &"x".repeat(60)).await;
        sink.push(LogStream::Stderr, &"y".repeat(60)).await;
        sink.push(LogStream::Stdout, &"z".repeat(1000)).await;
        sink.finish().await;
        let sent = drain(&mut rx);
        let shipped: usize = sent
            .iter()
            .filter(|(s, _)| *s != LogStream::System)
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(shipped, 100);
        let system: Vec<&str> = sent
            .iter()
            .filter(|(s, _)| *s == LogStream::System)
            .map(|(_, d)| d.as_str())
            .collect();
        assert_eq!(system.len(), 2, "{system:?}");
        assert!(system[0].starts_with("[output truncated: the log limit of 100 B"));
        assert!(
            system[1].starts_with("[output truncated: 1020 bytes"),
            "{system:?}"
        );
    }

    #[test]
    fn utf8_split_across_reads() {
        let bytes = "héllo ✓".as_bytes();
        let mut carry = Vec::new();
        let mut out = String::new();
        for b in bytes {
            decode_utf8(&mut carry, std::slice::from_ref(b), &mut out, false);
        }
        assert_eq!(out, "héllo ✓");
        assert!(carry.is_empty());
        decode_utf8(&mut carry, b"a\xffb\xe2\x9c", &mut out, false);
        assert_eq!(out, "héllo ✓a\u{fffd}b");
        assert_eq!(carry, b"\xe2\x9c");
        decode_utf8(&mut carry, b"", &mut out, true);
        assert!(out.ends_with("b\u{fffd}"));
    }

    #[test]
    fn decoder_redacts_a_secret_split_across_reads_and_keeps_a_tail() {
        let mut r = Redactor::default();
        r.add_value(&json!("hunter22"));
        let mut d = StreamDecoder::new(LogStream::Stdout);
        let mut lines = Vec::new();
        let mut shipped = String::new();
        for piece in ["pass", "word: hun", "ter", "22\nnext line\npartial"] {
            shipped += &d.feed(piece.as_bytes(), &r, &mut |l| lines.push(l.to_string()));
        }
        shipped += &d.finish(&r, &mut |l| lines.push(l.to_string()));
        assert_eq!(shipped, "password: ***\nnext line\npartial");
        assert_eq!(lines, ["password: ***", "next line", "partial"]);
        assert_eq!(d.tail(), ["password: ***", "next line", "partial"]);
    }
}
