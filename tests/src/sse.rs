//! The control plane's server-sent event stream of a command
//! (`GET /api/commands/{id}/events`): fetched whole, or followed live, and parsed into
//! [`SseEvent`]s.

use serde_json::Value;

use crate::harness::Api;

/// One event: its `id:` (the event's seq; `None` for `status` and `end`), `event:` and
/// `data:` (several data lines joined with `\n`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<i64>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    /// `data` as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_default()
    }
}

/// Parses one event block (the text between blank lines); `None` for a block with no
/// field (a comment such as a keep-alive).
fn parse_block(block: &str) -> Option<SseEvent> {
    let mut ev = SseEvent::default();
    let mut data: Vec<&str> = Vec::new();
    let mut any = false;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => {
                let seq = value
                    .parse()
                    .unwrap_or_else(|_| panic!("event id {value:?} is not a seq"));
                ev.id = Some(seq);
            }
            "event" => ev.event = value.to_string(),
            "data" => data.push(value),
            _ => continue,
        }
        any = true;
    }
    ev.data = data.join("\n");
    any.then_some(ev)
}

/// Parses a whole stream's text.
pub fn parse(text: &str) -> Vec<SseEvent> {
    text.split("\n\n").filter_map(parse_block).collect()
}

/// The seqs (`id:`) of the events, in order.
pub fn ids(events: &[SseEvent]) -> Vec<i64> {
    events.iter().filter_map(|e| e.id).collect()
}

fn request(api: &Api, command_id: &str) -> reqwest::RequestBuilder {
    api.http
        .get(format!("{}/api/commands/{command_id}/events", api.base))
        .bearer_auth(&api.token)
}

/// The whole event stream of a command (which must be finished, or the call waits until
/// it is), as text; resumed after `last_event_id` when given.
pub async fn fetch_text(api: &Api, command_id: &str, last_event_id: Option<i64>) -> String {
    let mut req = request(api, command_id);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    req.send()
        .await
        .expect("events request")
        .text()
        .await
        .expect("events body")
}

/// A live event stream, parsed as it arrives.
pub struct SseStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl SseStream {
    /// Subscribes to a command's events.
    pub async fn subscribe(api: &Api, command_id: &str) -> Self {
        let resp = request(api, command_id)
            .send()
            .await
            .expect("events request");
        assert!(resp.status().is_success(), "events: {}", resp.status());
        Self {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next event; `None` once the server has closed the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                if let Some(ev) = parse_block(&String::from_utf8_lossy(&block)) {
                    return Some(ev);
                }
            }
            let chunk = self.resp.chunk().await.expect("events stream")?;
            self.buf.extend_from_slice(&chunk);
        }
    }
}
