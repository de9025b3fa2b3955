//! `trellis commands follow`: a command's live stages, progress and logs from its event
//! stream (`GET /api/commands/{id}/events`), to its end. A progress bar when stdout is a
//! terminal, plain lines otherwise. A dropped stream is resumed after the last event seen
//! (`Last-Event-ID`), so nothing is shown twice or lost. The exit code is the command's
//! final status, read back from the API once the stream says `end`.

use std::io::IsTerminal;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::client::{segment, Client};
use super::{output, CliError, Exit, Output};

/// Reconnections in a row without a single new event before giving up.
const MAX_RECONNECTS: u32 = 10;

/// Follows command `id` to its end and returns the exit code of its final status.
pub async fn follow(client: &Client, id: &str, out: Output) -> Result<Exit, CliError> {
    let c = watch(client, id, out).await?;
    if out == Output::Json {
        output::json(&c);
    }
    Ok(Exit::of_status(c["status"].as_str().unwrap_or_default()))
}

/// Follows command `id` to its end, as [`follow`] shows it but without printing the
/// finished command as JSON, and returns it (for a caller that goes on, e.g. `deploy
/// destroy` from its plan to the apply).
pub async fn watch(client: &Client, id: &str, out: Output) -> Result<Value, CliError> {
    let id = segment(id)?;
    let mut view = View::new(out);
    let mut last_seq = 0i64;
    let mut failures = 0u32;
    loop {
        let resp = match client.events(id, last_seq).await {
            Ok(r) => r,
            Err(e @ CliError::Unreachable { .. }) if failures < MAX_RECONNECTS => {
                failures += 1;
                view.note(&format!("{e}; retrying"));
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
            Err(e) => {
                view.clear();
                return Err(e);
            }
        };
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream();
        let mut ended = false;
        'stream: while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for ev in parser.push(&chunk) {
                if let Some(seq) = ev.id {
                    last_seq = last_seq.max(seq);
                    failures = 0;
                }
                let data: Value = serde_json::from_str(&ev.data).unwrap_or_default();
                match ev.event.as_str() {
                    "end" => {
                        ended = true;
                        break 'stream;
                    }
                    "status" => view.status(&data),
                    "log" => view.log(&data),
                    "stage" => view.stage(&data),
                    "progress" => view.progress(&data),
                    _ => {}
                }
            }
        }
        if ended {
            break;
        }
        // The stream ended early (a restart, a proxy, a token that stopped working):
        // resume; a refused token then shows as the API's 401.
        failures += 1;
        if failures > MAX_RECONNECTS {
            view.clear();
            return Err(CliError::Protocol(format!(
                "the event stream of {id} kept ending before the command did"
            )));
        }
        tokio::time::sleep(backoff(failures)).await;
    }
    let c = client.get(&format!("/api/commands/{id}")).await?;
    view.done(&c);
    Ok(c)
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250 * u64::from(failures.min(8)))
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    id: Option<i64>,
    event: String,
    data: String,
}

/// Splits the bytes of an event stream into events, across chunk boundaries.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = find_blank_line(&self.buf) {
            let block: Vec<u8> = self.buf.drain(..end.0 + end.1).collect();
            let text = String::from_utf8_lossy(&block[..end.0]);
            let mut ev = SseEvent::default();
            let mut data = Vec::new();
            let mut any = false;
            for line in text.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => ev.id = value.trim().parse().ok(),
                    "event" => ev.event = value.to_string(),
                    "data" => data.push(value.to_string()),
                    _ => continue,
                }
                any = true;
            }
            if any {
                ev.data = data.join("\n");
                events.push(ev);
            }
        }
        events
    }
}

/// Where the first event ends: (its length, the blank line's length).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// How the events are shown.
enum View {
    /// A progress bar on the terminal; log and stage lines printed above it.
    Bar(ProgressBar),
    /// One line per change, for pipes and files.
    Plain {
        status: String,
        percent: Option<i64>,
    },
    /// Nothing live on stdout (logs go to stderr); the final command as JSON.
    Json,
}

impl View {
    fn new(out: Output) -> Self {
        match out {
            Output::Json => View::Json,
            Output::Table if std::io::stdout().is_terminal() => {
                let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stdout());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed_precise} [{bar:30}] {pos:>3}% {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
                View::Bar(bar)
            }
            Output::Table => View::Plain {
                status: String::new(),
                percent: None,
            },
        }
    }

    fn line(&self, s: &str) {
        match self {
            View::Bar(b) => b.println(s),
            View::Plain { .. } => println!("{s}"),
            View::Json => eprintln!("{s}"),
        }
    }

    fn note(&self, s: &str) {
        match self {
            View::Bar(b) => b.suspend(|| eprintln!("{s}")),
            _ => eprintln!("{s}"),
        }
    }

    fn status(&mut self, c: &Value) {
        let status = c["status"].as_str().unwrap_or_default().to_string();
        match self {
            View::Bar(b) => {
                if let Some(p) = c["percent"].as_f64() {
                    b.set_position(p.clamp(0.0, 100.0) as u64);
                }
                let stage = c["stage"].as_str().unwrap_or_default();
                b.set_message(format!("{status} {stage}").trim_end().to_string());
            }
            View::Plain { status: last, .. } => {
                if *last != status {
                    println!("status {status}");
                    *last = status;
                }
            }
            View::Json => {}
        }
    }

    fn log(&self, e: &Value) {
        let data = e["data"].as_str().unwrap_or_default();
        let data = data.strip_suffix('\n').unwrap_or(data);
        match self {
            View::Plain { .. } if e["stream"] == "stderr" => eprintln!("{data}"),
            View::Json => eprintln!("{data}"),
            _ => self.line(data),
        }
    }

    fn stage(&mut self, e: &Value) {
        let name = e["stage"].as_str().unwrap_or("?");
        let state = e["state"].as_str().unwrap_or("?");
        let message = e["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        if let View::Bar(b) = self {
            if state == "running" {
                b.set_message(format!("running {name}"));
            }
        }
        self.line(&format!("stage {name} {state}{message}"));
    }

    fn progress(&mut self, e: &Value) {
        let Some(p) = e["percent"].as_f64() else {
            return;
        };
        let pct = p.clamp(0.0, 100.0).round() as i64;
        match self {
            View::Bar(b) => {
                b.set_position(pct as u64);
                if let Some(m) = e["message"].as_str() {
                    b.set_message(m.to_string());
                }
            }
            View::Plain { percent, .. } => {
                // One line per whole percent, not per event.
                if *percent != Some(pct) {
                    *percent = Some(pct);
                    let msg = e["message"]
                        .as_str()
                        .or(e["stage"].as_str())
                        .map(|m| format!(" {m}"))
                        .unwrap_or_default();
                    println!("progress {pct}%{msg}");
                }
            }
            View::Json => {}
        }
    }

    fn clear(&self) {
        if let View::Bar(b) = self {
            b.finish_and_clear();
        }
    }

    /// The summary line of the finished command (none for JSON: the caller prints it).
    fn done(&self, c: &Value) {
        self.clear();
        if let View::Json = self {
            return;
        }
        let status = output::cell(&c["status"]);
        let mut line = format!("command {} {status}", output::cell(&c["id"]));
        if let Some(code) = c["error"]["code"].as_str() {
            let msg = c["error"]["message"].as_str().unwrap_or_default();
            line.push_str(&format!(": {code}: {msg}"));
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: status\ndata: {\"status\":").is_empty());
        let evs =
            p.push(b"\"running\"}\n\n: keep-alive\n\nid: 3\nevent: log\ndata: a\ndata: b\n\nid");
        assert_eq!(
            evs,
            vec![
                SseEvent {
                    id: None,
                    event: "status".into(),
                    data: "{\"status\":\"running\"}".into()
                },
                SseEvent {
                    id: Some(3),
                    event: "log".into(),
                    data: "a\nb".into()
                },
            ]
        );
        let evs = p.push(b": 4\r\nevent: end\r\ndata: {}\r\n\r\n");
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].id, Some(4));
        assert_eq!(evs[0].event, "end");
    }

    #[test]
    fn exit_codes_follow_the_status() {
        assert_eq!(Exit::of_status("succeeded") as i32, 0);
        assert_eq!(Exit::of_status("failed") as i32, 1);
        assert_eq!(Exit::of_status("running") as i32, 2);
        assert_eq!(Exit::of_status("cancelled") as i32, 3);
        assert_eq!(Exit::of_status("timed_out") as i32, 4);
    }
}
