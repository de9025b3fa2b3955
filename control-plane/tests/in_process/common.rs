//! Helpers: an in-memory control plane, JSON requests through the router, and an agent
//! connected through channels instead of a socket.

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Message;
use axum::http::{Request, StatusCode};
use futures_util::SinkExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use trellis::server::App;
use trellis::ServeConfig;
use trellis_protocol::{ServerMessage, PROTOCOL_VERSION};

pub const ADMIN: &str = "in-process-admin-token";

pub struct TestApp {
    pub app: App,
    pub shutdown: CancellationToken,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::with_heartbeat_timeout(Duration::from_secs(45)).await
    }

    pub async fn with_heartbeat_timeout(heartbeat_timeout: Duration) -> Self {
        Self::with_config(|c| c.heartbeat_timeout = heartbeat_timeout).await
    }

    /// Started with the test defaults (in-memory SQLite, the `ADMIN` token, a 45 s
    /// heartbeat timeout, retention off) changed by `edit`.
    pub async fn with_config(edit: impl FnOnce(&mut ServeConfig)) -> Self {
        let shutdown = CancellationToken::new();
        let mut config = ServeConfig {
            database_url: "sqlite::memory:".into(),
            admin_token: Some(ADMIN.into()),
            heartbeat_timeout: Duration::from_secs(45),
            ..Default::default()
        };
        edit(&mut config);
        let app = App::start(&config, shutdown.clone()).await.expect("start");
        Self { app, shutdown }
    }

    /// Sends a request as the admin; returns the status and the JSON body (`Null` if empty).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some(ADMIN), method, path, body).await
    }

    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let res = self.app.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, json)
    }

    /// Registers an agent through the API and returns its id.
    pub async fn agent(&self, name: &str) -> String {
        let (st, v) = self
            .call("POST", "/api/agents", Some(json!({"name": name})))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["agent"]["id"].as_str().unwrap().to_string()
    }

    /// The id of a seeded template mapped to a Proxmox template.
    pub async fn mapped_template(&self) -> String {
        let (_, v) = self.call("GET", "/api/templates", None).await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| !t["proxmoxTemplateId"].is_null())
            .expect("a mapped seed template")["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.app.stop().await;
    }
}

/// An agent session served by the real session task over channels.
pub struct FakeAgent {
    pub to_server: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    pub from_server: mpsc::Receiver<Message>,
}

impl FakeAgent {
    /// Starts the session task for `agent_id` and says hello with `capabilities`.
    pub async fn connect(t: &TestApp, agent_id: &str, capabilities: &[&str]) -> Self {
        Self::connect_with(t, agent_id, capabilities, json!({})).await
    }

    /// As [`FakeAgent::connect`], with extra `hello` fields (e.g. `interrupted_commands`).
    pub async fn connect_with(
        t: &TestApp,
        agent_id: &str,
        capabilities: &[&str],
        extra: Value,
    ) -> Self {
        let agent = t
            .app
            .state
            .db
            .get_agent(agent_id.parse().unwrap())
            .await
            .unwrap();
        let (to_server, rx) = mpsc::unbounded_channel();
        let (tx, from_server) = mpsc::channel(1024);
        let sink = tokio_util::sync::PollSender::new(tx)
            .sink_map_err(|_| axum::Error::new("test receiver dropped"));
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        tokio::spawn(trellis::broker::session::serve(
            t.app.state.broker.clone(),
            agent,
            trellis::broker::session::Conn::new(Box::pin(sink), stream),
        ));
        let mut a = Self {
            to_server,
            from_server,
        };
        let mut hello = json!({
            "type": "hello", "protocol_version": PROTOCOL_VERSION, "agent_version": "test",
            "hostname": "test-host", "capabilities": capabilities, "max_concurrency": 4,
        });
        if let Some(extra) = extra.as_object() {
            hello.as_object_mut().unwrap().extend(extra.clone());
        }
        a.send(hello);
        match a.recv().await {
            ServerMessage::Welcome { .. } => {}
            other => panic!("expected welcome, got {other:?}"),
        }
        a
    }

    pub fn send(&self, v: Value) {
        self.to_server
            .send(Ok(Message::Text(v.to_string().into())))
            .expect("session alive");
    }

    /// The next frame: a server message, or a panic on close / 10 s of silence.
    pub async fn recv(&mut self) -> ServerMessage {
        match self.recv_frame().await {
            Message::Text(t) => ServerMessage::decode(t.as_str()).expect("valid frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn recv_frame(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.from_server.recv())
            .await
            .expect("a frame within 10 s")
            .expect("session still open")
    }
}

/// A scratch PostgreSQL database (on `TRELLIS_TEST_POSTGRES`, default the local server),
/// dropped by [`PgDatabase::drop`].
pub struct PgDatabase {
    pub url: String,
    admin: sqlx::PgConnection,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let base = std::env::var("TRELLIS_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("trellis_ip_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
            .await
            .expect("PostgreSQL on 127.0.0.1:5432");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        Self {
            url: format!("{base}/{name}"),
            admin,
            name,
        }
    }

    pub async fn drop(mut self) {
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&mut self.admin)
            .await
            .unwrap();
    }
}
