//! A small HTTP client for the command-line tools that talk to a running
//! elector or admin API.
//!
//! It exists so every CLI behaves the same way on the network: a bounded
//! timeout (a shell script must not hang on a dead elector), the bearer
//! token attached when one is configured, and server errors reported by
//! their problem+json `detail` (written for people) rather than as a raw
//! status line or body.

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;

/// A base URL plus the settings every request shares.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

/// A non-success answer, decoded from problem+json when it is one.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    /// The human-readable explanation: the problem's `detail`, else its
    /// `title`, else the status line and raw body.
    pub detail: String,
}

impl Problem {
    pub fn into_error(self) -> Error {
        Error::Remote(self.detail)
    }
}

impl ApiClient {
    /// `base_url` is `http://host:port` or `https://host:port` (a
    /// trailing `/` is fine). Over https the server's certificate is
    /// checked against the system's CAs and the file `SSL_CERT_FILE`
    /// names, if set (reqwest with rustls and `rustls-native-certs`).
    pub fn new(base_url: &str, bearer: Option<&str>, timeout: Duration) -> Result<Self, Error> {
        let base = base_url.trim().trim_end_matches('/');
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::Usage(format!(
                "{base_url:?} is not an http:// or https:// URL"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::Remote(format!("cannot build an HTTP client: {e}")))?;
        Ok(ApiClient {
            http,
            base: base.to_owned(),
            bearer: bearer.filter(|t| !t.is_empty()).map(str::to_owned),
        })
    }

    fn with_auth(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.bearer {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A GET of `path` (which starts with `/`).
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.with_auth(self.http.get(format!("{}{path}", self.base)))
    }

    /// A POST of `body` as JSON to `path`.
    pub fn post_json(&self, path: &str, body: &Value) -> RequestBuilder {
        self.with_auth(self.http.post(format!("{}{path}", self.base)).json(body))
    }

    /// Sends `req`; a network failure or timeout becomes [`Error::Remote`]
    /// naming the server. Any HTTP status is returned as a response.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response, Error> {
        req.send().await.map_err(|e| {
            let what = if e.is_timeout() {
                "did not answer in time".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                e.to_string()
            };
            Error::Remote(format!("{}: {what}", self.base))
        })
    }
}

/// Reads a non-success response into a [`Problem`].
pub async fn read_problem(resp: Response) -> Problem {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let pick = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
    let detail = pick("detail").or_else(|| pick("title")).unwrap_or_else(|| {
        let snippet: String = text.chars().take(200).collect();
        format!("{status} {}", snippet.trim()).trim().to_owned()
    });
    Problem { status, detail }
}

/// Decodes a success response's JSON body.
pub async fn read_json<T: DeserializeOwned>(resp: Response) -> Result<T, Error> {
    resp.json::<T>()
        .await
        .map_err(|e| Error::Remote(format!("unreadable answer: {e}")))
}
