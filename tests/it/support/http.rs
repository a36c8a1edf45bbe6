//! HTTP as the tests speak it: one client, and responses reduced to what
//! the tests look at.

use std::time::Duration;

use serde_json::Value;

/// A client for the servers under test: no proxy from the environment,
/// and a bound that only a broken test reaches.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// An HTTP response reduced to what the tests look at.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    /// `text` as JSON, `Null` when it is not.
    pub body: Value,
}

impl Resp {
    /// The problem+json `type`, or "".
    pub fn problem_type(&self) -> String {
        self.body["type"].as_str().unwrap_or("").to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `req`; panics if it reaches nobody.
pub async fn send(req: reqwest::RequestBuilder) -> Resp {
    let r = req.send().await.expect("request reaches the server");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Event streams never end; their head is all a test needs.
    let text = if content_type.starts_with("text/event-stream") {
        String::new()
    } else {
        r.text().await.unwrap_or_default()
    };
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        content_type,
        headers,
        text,
        body,
    }
}
