//! The one mapping from a fencing [`Refusal`] to the status, type and
//! headers the contract promises, on the shared [`Problem`] type.
//!
//! Clients (and the end-to-end tests) branch on `type`, so every refusal
//! path goes through [`Problem::from_refusal`]; nothing else builds a
//! fencing error response by hand.

use fencing::input::FenceInput;
use fencing::{Field, Reason, ResourceName};
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use wire::http::header_problem;

pub use crate::edge::problem::{
    Problem, BAD_REQUEST, OVERLOADED, UPSTREAM_ERROR, UPSTREAM_TIMEOUT, UPSTREAM_UNREACHABLE,
};
use crate::edge::problem::{
    FORGED, INVALID_RESOURCE, INVALID_TOKEN, RESOURCE_REQUIRED, STALE, TOKEN_REQUIRED, UNAVAILABLE,
};
use crate::fencer::Refusal;

/// The header that tells a stale writer which token now holds the fence.
pub const CURRENT_TOKEN: &str = "fencing-current-token";

impl Problem {
    /// [`Problem::from_refusal`] for a refusal of the HTTP proxy, whose
    /// detail names the header at fault when the header itself was (sent
    /// twice, not text, contradicting its route), so the client knows
    /// what to fix.
    pub fn for_headers(r: &Refusal, input: &FenceInput<'_>) -> Self {
        let mut p = Problem::from_refusal(r);
        let header_error = match r.field {
            Some(Field::Resource) => input
                .resource
                .as_ref()
                .err()
                .map(|e| (e, "Fencing-Resource")),
            Some(Field::Token) => input.token.as_ref().err().map(|e| (e, "Fencing-Token")),
            None => None,
        };
        if let Some(why) = header_error.and_then(|(e, name)| header_problem(e, name)) {
            p.detail = why;
        }
        p
    }

    /// A `missing` or `invalid` refusal names its field, so a client
    /// fixing its request knows which header to fix.
    pub fn from_refusal(r: &Refusal) -> Self {
        let resource_field = r.field == Some(Field::Resource);
        let (status, kind, title) = match r.reason {
            Reason::Stale => (StatusCode::CONFLICT, STALE, "Stale fencing token"),
            Reason::Missing if !resource_field => (
                StatusCode::PRECONDITION_REQUIRED,
                TOKEN_REQUIRED,
                "Fencing token required",
            ),
            Reason::Missing => (
                StatusCode::PRECONDITION_REQUIRED,
                RESOURCE_REQUIRED,
                "Fencing resource required",
            ),
            Reason::Invalid if resource_field => (
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
        let mut p = Problem::new(status, kind, title, r.message.clone())
            .with_some("resource", r.resource.as_ref().map(ResourceName::to_string))
            .with_some("presented_token", r.presented)
            .with_some("current_token", r.current);
        if r.reason == Reason::Stale {
            if let Some(current) = r.current {
                p = p.header(
                    HeaderName::from_static(CURRENT_TOKEN),
                    HeaderValue::from(current),
                );
            }
        }
        if r.reason == Reason::Unavailable {
            p = p.retry_after(1);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::header::CONTENT_TYPE;
    use http::Response;

    use super::*;

    fn refusal(reason: Reason, field: Option<Field>) -> Refusal {
        Refusal {
            reason,
            field,
            resource: Some(ResourceName::new("orders").unwrap()),
            presented: Some(3),
            current: Some(7),
            message: "m".into(),
        }
    }

    #[test]
    fn stale_carries_header_and_fields() {
        let resp: Response<Bytes> = Problem::from_refusal(&refusal(Reason::Stale, None)).response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[CURRENT_TOKEN], "7");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/problem+json");
        let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(body["resource"], "orders");
        assert_eq!(body["presented_token"], 3);
        assert_eq!(body["current_token"], 7);
    }

    #[test]
    fn reasons_map_to_contract_codes() {
        let cases = [
            (Reason::Missing, Some(Field::Token), 428, TOKEN_REQUIRED),
            (
                Reason::Missing,
                Some(Field::Resource),
                428,
                RESOURCE_REQUIRED,
            ),
            (Reason::Invalid, Some(Field::Token), 400, INVALID_TOKEN),
            (
                Reason::Invalid,
                Some(Field::Resource),
                400,
                INVALID_RESOURCE,
            ),
            (Reason::Forged, Some(Field::Token), 403, FORGED),
            (Reason::Unavailable, None, 503, UNAVAILABLE),
        ];
        for (reason, field, status, kind) in cases {
            let p = Problem::from_refusal(&refusal(reason, field));
            assert_eq!((p.status.as_u16(), p.kind), (status, kind), "{reason:?}");
        }
    }
}
