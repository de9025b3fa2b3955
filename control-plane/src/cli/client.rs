//! The HTTP client of the CLI: bearer-token requests to the control plane's API, its JSON
//! error bodies turned into [`CliError::Api`], and the raw response of the event stream.

use std::time::Duration;

use serde_json::Value;

use super::config::Credentials;
use super::CliError;

/// How long an ordinary request may take (a `?wait=` read is bounded by the server).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A silent event stream is dead after this: the server sends a keep-alive every 15 s.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(45);

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(creds: &Credentials) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("trellis-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(STREAM_READ_TIMEOUT)
            .build()
            .map_err(|e| CliError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: creds.url.clone(),
            token: creds.token.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// Sends a request and returns its JSON body (`Null` for an empty one, e.g. `204`).
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let resp = rb
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let resp = check(resp).await?;
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::Protocol(format!("{e}")))
    }

    /// `GET /api/commands/{id}/events` after `seq`: the streaming response, checked.
    pub async fn events(&self, id: &str, after: i64) -> Result<reqwest::Response, CliError> {
        let resp = self
            .request(reqwest::Method::GET, &format!("/api/commands/{id}/events"))
            .header("accept", "text/event-stream")
            .header("last-event-id", after.to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        check(resp).await
    }

    pub fn unreachable(&self, e: reqwest::Error) -> CliError {
        CliError::Unreachable {
            url: self.base.clone(),
            reason: error_chain(&e),
        }
    }
}

/// A 2xx response as is; anything else as the API's `{"error": {code, message}}`
/// (or the status alone when the body is not that).
async fn check(resp: reqwest::Response) -> Result<reqwest::Response, CliError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let field = |k: &str| body["error"][k].as_str().map(str::to_string);
    Err(CliError::Api {
        status: status.as_u16(),
        code: field("code").unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_lowercase()
                .replace(' ', "_")
        }),
        message: field("message").unwrap_or_else(|| status.to_string()),
    })
}

/// An error with its causes (reqwest's own message says little: "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A path segment from the command line: ids are UUIDs, so anything that would change
/// the path (`/`, `?`, `#`, `%`, spaces) is refused rather than escaped.
pub fn segment(id: &str) -> Result<&str, CliError> {
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(id)
    } else {
        Err(CliError::Usage(format!("{id:?} is not an id")))
    }
}

/// `k=v&…` with each value percent-encoded (query strings of list filters).
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_queries() {
        assert!(segment("0b6c-41_a.b").is_ok());
        assert!(segment("../x").is_err());
        assert!(segment("").is_err());
        assert_eq!(
            query(&[
                ("status", Some("failed".into())),
                ("x", None),
                ("b", Some("a b&".into()))
            ]),
            "?status=failed&b=a%20b%26"
        );
        assert_eq!(query(&[("x", None)]), "");
    }
}
