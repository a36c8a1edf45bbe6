//! Fencing at grant time: follow the elector's watch stream and raise the
//! mark as soon as a new lease is granted.
//!
//! Without this, the old leader stays admissible until the new leader's
//! first write reaches this proxy; with it, the window closes when the
//! grant is announced. It is an accelerator, not the safety net: if the
//! stream is down, the write path still fences on the new token's first
//! write, so failures here are logged and retried, never fatal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fencing::ResourceName;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::fencer::{Fencer, TokenChecker};
use crate::shutdown::Shutdown;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A stream that stayed up this long was healthy: start backing off anew.
const HEALTHY: Duration = Duration::from_secs(10);
/// A silent stream is re-opened after this; re-subscribing is cheap and
/// replays `current`, so a half-open connection cannot hide grants.
const READ_IDLE: Duration = Duration::from_secs(60);
/// Longest one event may take to fence (store write plus drain).
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// An event larger than this is not from a sane elector.
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Watches `resources` on the elector at `elector_url` until `shutdown`.
pub async fn watch_elector(
    fencer: Arc<Fencer>,
    checker: TokenChecker,
    elector_url: String,
    bearer: Option<String>,
    resources: Vec<ResourceName>,
    shutdown: Shutdown,
) {
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(READ_IDLE)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "elector watch: cannot build an HTTP client; grants will fence on first write only");
            return;
        }
    };
    let base = elector_url.trim_end_matches('/').to_owned();
    let mut resources = resources;
    resources.sort();
    resources.dedup();
    let mut tasks = JoinSet::new();
    for resource in resources {
        let w = Watch {
            fencer: Arc::clone(&fencer),
            checker: checker.clone(),
            client: client.clone(),
            // Unencoded even when the name holds '/': the elector splits the
            // action off the end of the raw path, and the name alphabet
            // needs no escaping.
            url: format!("{base}/v1/leases/{resource}/watch"),
            bearer: bearer.clone(),
            resource: resource.as_str().to_owned(),
        };
        tasks.spawn(w.run(shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

struct Watch {
    fencer: Arc<Fencer>,
    checker: TokenChecker,
    client: reqwest::Client,
    url: String,
    /// The elector API's bearer token, when it has one.
    bearer: Option<String>,
    resource: String,
}

impl Watch {
    async fn run(self, shutdown: Shutdown) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                r = self.stream_once() => r,
                () = shutdown.wait() => return,
            };
            match ended {
                Ok(()) => {
                    tracing::info!(resource = %self.resource, "elector watch stream ended; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(resource = %self.resource, url = %self.url, error = %e, "elector watch failed; retrying")
                }
            }
            if started.elapsed() >= HEALTHY {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn stream_once(&self) -> Result<(), String> {
        let mut req = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(token) = &self.bearer {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(
                "elector answered 401: set elector_token on this [[http]] proxy to the elector's bearer token"
                    .into(),
            );
        }
        if !resp.status().is_success() {
            return Err(format!("elector answered {}", resp.status()));
        }
        tracing::info!(resource = %self.resource, "watching the elector for grants");
        let mut stream = resp.bytes_stream();
        let mut parser = SseParser::default();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            for event in parser.push(&chunk)? {
                self.on_event(&event).await;
            }
        }
        Ok(())
    }

    async fn on_event(&self, event: &SseEvent) {
        if event.name != "current" && event.name != "granted" {
            return;
        }
        let data: LeaseEvent = match serde_json::from_str(&event.data) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(resource = %self.resource, error = %e, "elector watch: unreadable event data");
                return;
            }
        };
        if data.resource.as_deref().is_some_and(|r| r != self.resource) {
            return;
        }
        let raw = match (data.token, data.token_value) {
            (Some(TokenField::Text(t)), _) => t,
            (Some(TokenField::Number(n)), _) | (None, Some(n)) => n.to_string(),
            (None, None) => return, // `current` with no lease held
        };
        // A grant is only trusted as far as this listener trusts tokens: a
        // forged event must not fence real leaders out.
        let token = match self.checker.check(&self.resource, &raw) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(resource = %self.resource, error = %e, "elector watch: token refused, not fencing");
                return;
            }
        };
        match tokio::time::timeout(FENCE_TIMEOUT, self.fencer.fence_to(&self.resource, token)).await
        {
            Ok(Ok(mark)) => {
                tracing::info!(resource = %self.resource, token, mark, event = %event.name, "fenced at grant")
            }
            Ok(Err(e)) => {
                tracing::error!(resource = %self.resource, token, error = %e, "fence at grant failed; the new token fences on its first write")
            }
            Err(_) => {
                tracing::warn!(resource = %self.resource, token, "fence at grant still draining older writes; the new token's first write finishes it")
            }
        }
    }
}

#[derive(Deserialize)]
struct LeaseEvent {
    resource: Option<String>,
    token: Option<TokenField>,
    token_value: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Number(u64),
}

#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    name: String,
    data: String,
}

/// Incremental Server-Sent Events parser (the subset an elector sends:
/// `event:` and `data:` fields, comments, `\n` or `\r\n` line ends).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    name: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + nl;
            let line = &self.buf[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            if let Some(ev) = self.line(&line) {
                events.push(ev);
            }
        }
        self.buf.drain(..start);
        if self.buf.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err("event larger than 64 KiB".into());
        }
        Ok(events)
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let name = std::mem::take(&mut self.name);
            let data = std::mem::take(&mut self.data);
            let had = std::mem::replace(&mut self.has_data, false);
            return had.then(|| SseEvent {
                name: if name.is_empty() {
                    "message".into()
                } else {
                    name
                },
                data,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = SseParser::default();
        let mut all = Vec::new();
        let text = ": hello\r\nevent: granted\r\ndata: {\"token\":\"7\"}\r\n\r\nevent: expired\ndata: {}\n\n";
        for chunk in text.as_bytes().chunks(5) {
            all.extend(p.push(chunk).unwrap());
        }
        assert_eq!(
            all,
            vec![
                SseEvent {
                    name: "granted".into(),
                    data: "{\"token\":\"7\"}".into()
                },
                SseEvent {
                    name: "expired".into(),
                    data: "{}".into()
                },
            ]
        );
    }

    #[test]
    fn token_field_takes_text_or_number() {
        let e: LeaseEvent = serde_json::from_str(r#"{"type":"granted","resource":"r","holder":"a","token":"5.abc","token_value":5,"expires_at":"x","expires_at_ms":1,"ttl_ms":2}"#).unwrap();
        assert!(matches!(e.token, Some(TokenField::Text(ref t)) if t == "5.abc"));
        let e: LeaseEvent = serde_json::from_str(r#"{"token":9}"#).unwrap();
        assert!(matches!(e.token, Some(TokenField::Number(9))));
    }

    #[test]
    fn oversized_events_are_refused() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.push(&big).is_err());
    }
}
