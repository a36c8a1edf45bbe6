//! RFC 9457 problem responses: the one error shape every HTTP listener of
//! fencepost answers with (HTTP proxy, elector, admin API, and the
//! over-the-bound refusal the accept loop writes itself), and the one
//! `urn:fencepost:` namespace of their `type`s.
//!
//! Clients branch on `type`, so the URIs are listed here once and every
//! builder takes one of them. A body is `type`, `title`, `status`,
//! `detail`, then any extra members (`resource`, `current_token`, ...) in
//! the order they were added; headers (`Retry-After`, `Allow`,
//! `WWW-Authenticate`, `Fencing-Current-Token`) travel beside it.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// The media type of every problem.
pub const PROBLEM_JSON: &str = "application/problem+json";

// The HTTP proxy's refusals (the fencing contract).
pub const STALE: &str = "urn:fencepost:stale-token";
pub const TOKEN_REQUIRED: &str = "urn:fencepost:token-required";
pub const RESOURCE_REQUIRED: &str = "urn:fencepost:resource-required";
pub const INVALID_TOKEN: &str = "urn:fencepost:invalid-token";
pub const INVALID_RESOURCE: &str = "urn:fencepost:invalid-resource";
pub const FORGED: &str = "urn:fencepost:forged-token";
pub const UNAVAILABLE: &str = "urn:fencepost:fence-unavailable";
// The HTTP proxy's own failures and bounds.
pub const UPSTREAM_UNREACHABLE: &str = "urn:fencepost:upstream-unreachable";
pub const UPSTREAM_ERROR: &str = "urn:fencepost:upstream-error";
pub const UPSTREAM_TIMEOUT: &str = "urn:fencepost:upstream-timeout";
pub const OVERLOADED: &str = "urn:fencepost:overloaded";
pub const BAD_REQUEST: &str = "urn:fencepost:bad-request";
// The APIs (elector and admin).
pub const NOT_FOUND: &str = "urn:fencepost:not-found";
pub const METHOD_NOT_ALLOWED: &str = "urn:fencepost:method-not-allowed";
pub const UNAUTHORIZED: &str = "urn:fencepost:unauthorized";
/// A known identity asking for what its grants (elector) or role (admin)
/// do not allow.
pub const FORBIDDEN: &str = "urn:fencepost:forbidden";
pub const STORE_UNAVAILABLE: &str = "urn:fencepost:store-unavailable";
pub const STORE_ERROR: &str = "urn:fencepost:store-error";
pub const BAD_QUERY: &str = "urn:fencepost:bad-query";
pub const NO_FENCE: &str = "urn:fencepost:no-fence";
pub const INTERNAL: &str = "urn:fencepost:internal";
// The elector's lease API.
pub const BODY_TOO_LARGE: &str = "urn:fencepost:body-too-large";
pub const UNSUPPORTED_MEDIA_TYPE: &str = "urn:fencepost:unsupported-media-type";
pub const INVALID_BODY: &str = "urn:fencepost:invalid-body";
pub const INVALID_HOLDER: &str = "urn:fencepost:invalid-holder";
pub const INVALID_TTL: &str = "urn:fencepost:invalid-ttl";
pub const NOT_HOLDER: &str = "urn:fencepost:not-holder";
pub const LEASE_HELD: &str = "urn:fencepost:lease-held";
pub const LEASE_LOST: &str = "urn:fencepost:lease-lost";
pub const LOCK_DELAY: &str = "urn:fencepost:lock-delay";
pub const TOKENS_EXHAUSTED: &str = "urn:fencepost:tokens-exhausted";
pub const NO_LEASE: &str = "urn:fencepost:no-lease";

/// One problem response, built on the error path only (never per admitted
/// request), so its few allocations cost nothing that matters.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    /// One of the `urn:fencepost:` constants above.
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Extension members, in the order added.
    members: Vec<(&'static str, Value)>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            kind,
            title,
            detail: detail.into(),
            members: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Titled with the status's reason phrase ("Not Found"), as the admin
    /// API words its errors.
    pub fn plain(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(
            status,
            kind,
            status.canonical_reason().unwrap_or("error"),
            detail,
        )
    }

    /// Adds (or replaces) an extension member of the body.
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        let value = value.into();
        match self.members.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.members.push((key, value)),
        }
        self
    }

    /// Adds an extension member when there is one to add.
    pub fn with_some(self, key: &'static str, value: Option<impl Into<Value>>) -> Self {
        match value {
            Some(v) => self.with(key, v),
            None => self,
        }
    }

    /// Sets a response header (replacing one of the same name).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value));
        self
    }

    /// `Retry-After`, in seconds.
    pub fn retry_after(self, seconds: u32) -> Self {
        self.header(RETRY_AFTER, HeaderValue::from(seconds))
    }

    /// The headers set so far (besides `Content-Type`).
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.headers.iter().map(|(n, v)| (n, v))
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        // Serializing strings, numbers and JSON values into a Vec cannot
        // fail; "{}" keeps even that impossibility well-formed.
        Bytes::from(serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec()))
    }

    /// The whole response, with whatever body type the server speaks
    /// (axum's, the proxy's own).
    pub fn response<B: From<Bytes>>(self) -> Response<B> {
        let mut resp = Response::new(B::from(self.body()));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (name, value) in self.headers {
            h.insert(name, value);
        }
        resp
    }
}

impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(4 + self.members.len()))?;
        map.serialize_entry("type", self.kind)?;
        map.serialize_entry("title", self.title)?;
        map.serialize_entry("status", &self.status.as_u16())?;
        map.serialize_entry("detail", &self.detail)?;
        for (k, v) in &self.members {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl axum::response::IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        self.response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_standard_members_first_then_extensions_in_order() {
        let p = Problem::new(StatusCode::CONFLICT, STALE, "Stale fencing token", "m")
            .with("resource", "orders")
            .with_some("presented_token", Some(3u64))
            .with_some("current_token", None::<u64>)
            .with("resource", "orders2");
        let text = String::from_utf8(p.body().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"urn:fencepost:stale-token","title":"Stale fencing token","status":409,"detail":"m","resource":"orders2","presented_token":3}"#
        );
    }

    #[test]
    fn response_carries_status_media_type_and_headers() {
        let resp: Response<Bytes> =
            Problem::plain(StatusCode::SERVICE_UNAVAILABLE, STORE_UNAVAILABLE, "down")
                .retry_after(1)
                .retry_after(2)
                .response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        let body: Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(body["title"], "Service Unavailable");
        assert_eq!(body["status"], 503);
    }

    #[test]
    fn every_type_is_in_the_one_namespace() {
        for t in [
            STALE,
            TOKEN_REQUIRED,
            RESOURCE_REQUIRED,
            INVALID_TOKEN,
            INVALID_RESOURCE,
            FORGED,
            UNAVAILABLE,
            UPSTREAM_UNREACHABLE,
            UPSTREAM_ERROR,
            UPSTREAM_TIMEOUT,
            OVERLOADED,
            BAD_REQUEST,
            NOT_FOUND,
            METHOD_NOT_ALLOWED,
            UNAUTHORIZED,
            STORE_UNAVAILABLE,
            STORE_ERROR,
            BAD_QUERY,
            NO_FENCE,
            INTERNAL,
            BODY_TOO_LARGE,
            UNSUPPORTED_MEDIA_TYPE,
            INVALID_BODY,
            INVALID_HOLDER,
            INVALID_TTL,
            NOT_HOLDER,
            LEASE_HELD,
            LEASE_LOST,
            LOCK_DELAY,
            TOKENS_EXHAUSTED,
            NO_LEASE,
        ] {
            let rest = t.strip_prefix("urn:fencepost:").unwrap();
            assert!(
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{t}"
            );
        }
    }
}
