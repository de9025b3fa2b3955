//! Speaking the agent protocol by hand over the agent WebSocket: for tests that must
//! send exactly the frames a misbehaving, racing or silent agent would, and for the
//! benchmark's simulated agents.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the agent WebSocket at `ws_url` with `token` as the bearer token (TCP_NODELAY
/// on); says nothing yet. Fails when the server refuses the upgrade (a bad token).
pub async fn connect(ws_url: &str, token: &str) -> Result<Ws, tungstenite::Error> {
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, None, true, None).await?;
    Ok(ws)
}

/// A connected agent session driven frame by frame.
pub struct RawAgent {
    pub ws: Ws,
}

impl RawAgent {
    /// Connects with `token`, says hello (protocol 1, capability `ping`, one at a time)
    /// and waits for the welcome.
    pub async fn hello(ws_url: &str, token: &str) -> Self {
        let mut a = Self::connect(ws_url, token).await;
        a.send(
            json!({"type": "hello", "protocol_version": 1, "agent_version": "raw",
               "hostname": "raw", "capabilities": ["ping"], "max_concurrency": 1}),
        )
        .await;
        let welcome = a.recv(Duration::from_secs(10)).await;
        assert!(
            welcome.to_text().unwrap().contains("welcome"),
            "{welcome:?}"
        );
        a
    }

    /// Connects with `token` without saying anything.
    pub async fn connect(ws_url: &str, token: &str) -> Self {
        Self {
            ws: connect(ws_url, token).await.expect("connect"),
        }
    }

    /// Sends one JSON frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    /// Sends one text frame as it is.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::text(text.into()))
            .await
            .expect("send frame");
    }

    /// Sends one text frame; the error (the server may already have closed) is returned.
    pub async fn try_send_text(
        &mut self,
        text: impl Into<String>,
    ) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::text(text.into())).await
    }

    /// The next frame, which must come within `within`.
    pub async fn recv(&mut self, within: Duration) -> Message {
        tokio::time::timeout(within, self.ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("frame")
    }

    /// Reads frames until a text frame contains `needle`; returns it.
    pub async fn read_until(&mut self, needle: &str) -> String {
        loop {
            let m = self.recv(Duration::from_secs(10)).await;
            if let Ok(t) = m.to_text() {
                if t.contains(needle) {
                    return t.to_string();
                }
            }
        }
    }

    /// Reads frames until the server closes; returns the texts and the close code.
    pub async fn read_until_close(&mut self) -> (Vec<String>, Option<u16>) {
        let mut texts = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => texts.push(t.to_string()),
                Ok(Some(Ok(Message::Close(f)))) => return (texts, f.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => return (texts, None),
                Err(_) => panic!("server did not close the connection"),
            }
        }
    }

    /// The next JSON frame, or `Err(close code)` when the server closed.
    pub async fn next_frame(&mut self, within: Duration) -> Result<Value, Option<u16>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("nothing from the server within {within:?}"),
                Ok(None) | Ok(Some(Err(_))) => return Err(None),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Ok(serde_json::from_str(t.as_str()).unwrap())
                }
                Ok(Some(Ok(Message::Close(f)))) => return Err(f.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Reads until `cid` is acked up to `seq`; panics on a close or an error frame.
    pub async fn wait_ack(&mut self, cid: &str, seq: u64) {
        loop {
            match self.next_frame(Duration::from_secs(20)).await {
                Ok(v) if acked(&v, cid).is_some_and(|s| s >= seq) => return,
                Ok(v) if v["type"] == "error" => panic!("healthy agent got an error: {v}"),
                Ok(_) => {}
                Err(code) => panic!("healthy agent was disconnected ({code:?})"),
            }
        }
    }

    /// Still open: a heartbeat is answered.
    pub async fn assert_open(&mut self) {
        self.send(json!({"type": "heartbeat", "running": 0})).await;
        loop {
            match self.next_frame(Duration::from_secs(10)).await {
                Ok(v) if v["type"] == "heartbeat_ack" => return,
                Ok(v) if v["type"] == "error" => panic!("unexpected error: {v}"),
                Ok(_) => {}
                Err(code) => panic!("session closed ({code:?})"),
            }
        }
    }
}

/// The highest seq of `cid` an `acks` frame acknowledges.
pub fn acked(v: &Value, cid: &str) -> Option<u64> {
    (v["type"] == "acks").then_some(())?;
    v["acks"]
        .as_array()?
        .iter()
        .filter(|a| a["command_id"] == cid)
        .filter_map(|a| a["seq"].as_u64())
        .max()
}
