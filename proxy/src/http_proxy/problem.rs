//! RFC 9457 problem responses, and the one mapping from a fencing
//! [`Refusal`] to the status, type and headers the contract promises.
//!
//! Clients (and the end-to-end tests) branch on `type`, so every refusal
//! path goes through [`Problem::from_refusal`]; nothing else builds a
//! fencing error response by hand.

use bytes::Bytes;
use fencing::Reason;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use super::body::ProxyBody;
use crate::fencer::Refusal;

/// The header that tells a stale writer which token now holds the fence.
pub const CURRENT_TOKEN: &str = "fencing-current-token";

pub const STALE: &str = "urn:fencepost:stale-token";
pub const TOKEN_REQUIRED: &str = "urn:fencepost:token-required";
pub const RESOURCE_REQUIRED: &str = "urn:fencepost:resource-required";
pub const INVALID_TOKEN: &str = "urn:fencepost:invalid-token";
pub const INVALID_RESOURCE: &str = "urn:fencepost:invalid-resource";
pub const FORGED: &str = "urn:fencepost:forged-token";
pub const UNAVAILABLE: &str = "urn:fencepost:fence-unavailable";
pub const UPSTREAM_UNREACHABLE: &str = "urn:fencepost:upstream-unreachable";
pub const UPSTREAM_ERROR: &str = "urn:fencepost:upstream-error";
pub const UPSTREAM_TIMEOUT: &str = "urn:fencepost:upstream-timeout";
pub const OVERLOADED: &str = "urn:fencepost:overloaded";
pub const BAD_REQUEST: &str = "urn:fencepost:bad-request";

#[derive(Debug, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presented_token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_token: Option<u64>,
    /// Seconds; becomes a `Retry-After` header, not a body field.
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            kind,
            title,
            status: status.as_u16(),
            detail: detail.into(),
            resource: None,
            presented_token: None,
            current_token: None,
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// `resource_invalid` tells an invalid resource name apart from an
    /// invalid token: the fencer reports both as `invalid`, but a client
    /// fixing its request needs to know which header to fix.
    pub fn from_refusal(r: &Refusal, token_given: bool, resource_invalid: bool) -> Self {
        let (status, kind, title) = match r.reason {
            Reason::Stale => (StatusCode::CONFLICT, STALE, "Stale fencing token"),
            Reason::Missing if !token_given => (
                StatusCode::PRECONDITION_REQUIRED,
                TOKEN_REQUIRED,
                "Fencing token required",
            ),
            Reason::Missing => (
                StatusCode::PRECONDITION_REQUIRED,
                RESOURCE_REQUIRED,
                "Fencing resource required",
            ),
            Reason::Invalid if resource_invalid => (
                StatusCode::BAD_REQUEST,
                INVALID_RESOURCE,
                "Invalid fencing resource",
            ),
            Reason::Invalid => (
                StatusCode::BAD_REQUEST,
                INVALID_TOKEN,
                "Invalid fencing token",
            ),
            Reason::Forged => (StatusCode::FORBIDDEN, FORGED, "Forged fencing token"),
            Reason::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                UNAVAILABLE,
                "Fence state unavailable",
            ),
        };
        let mut p = Problem::new(status, kind, title, r.message.clone());
        p.resource = r.resource.clone();
        p.presented_token = r.presented;
        p.current_token = r.current;
        if r.reason == Reason::Unavailable {
            p = p.retry_after(1);
        }
        p
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
        *resp.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.kind == STALE {
            if let Some(current) = self.current_token {
                h.insert(CURRENT_TOKEN, HeaderValue::from(current));
            }
        }
        if let Some(s) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(reason: Reason) -> Refusal {
        Refusal {
            reason,
            resource: Some("orders".into()),
            presented: Some(3),
            current: Some(7),
            message: "m".into(),
        }
    }

    #[test]
    fn stale_carries_header_and_fields() {
        let resp = Problem::from_refusal(&refusal(Reason::Stale), true, false).into_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[CURRENT_TOKEN], "7");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/problem+json");
    }

    #[test]
    fn reasons_map_to_contract_codes() {
        let cases = [
            (Reason::Missing, false, false, 428, TOKEN_REQUIRED),
            (Reason::Missing, true, false, 428, RESOURCE_REQUIRED),
            (Reason::Invalid, true, false, 400, INVALID_TOKEN),
            (Reason::Invalid, true, true, 400, INVALID_RESOURCE),
            (Reason::Forged, true, false, 403, FORGED),
            (Reason::Unavailable, true, false, 503, UNAVAILABLE),
        ];
        for (reason, token, bad_res, status, kind) in cases {
            let p = Problem::from_refusal(&refusal(reason), token, bad_res);
            assert_eq!((p.status, p.kind), (status, kind), "{reason:?}");
        }
    }
}
