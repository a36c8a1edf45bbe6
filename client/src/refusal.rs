//! A fencing proxy's refusal of a write, typed, from either protocol.
//!
//! The HTTP proxy answers with `application/problem+json` and a
//! `urn:fencepost:*` type (`409` stale with `Fencing-Current-Token`, `428`
//! missing, `400` invalid, `403` forged, `503` unavailable); the Postgres
//! proxy with an ErrorResponse whose SQLSTATE is `ZF001`-`ZF005`. Both end
//! up as one [`Refusal`], so a leader branches on [`RefusalKind`] and never
//! on status codes or message text.
//!
//! Everything here is pure (bytes and strings in, a value out), so the
//! parsing is tested without a network.

use std::fmt;
use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::HeaderMap;
use serde::Deserialize;

use crate::token::CURRENT_TOKEN_HEADER;

/// Why a write was refused: the contract's five reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The token is below the resource's high-water mark: a newer leader
    /// exists. Stop writing; this token will never be admitted again.
    Stale,
    /// The write carried no token (or no resource).
    Missing,
    /// The token (or resource name) is malformed.
    Invalid,
    /// The token's signature does not verify, or it is unsigned where
    /// signatures are required.
    Forged,
    /// The proxy could not read or persist its fence state and failed
    /// closed, or (guard mode, `ZF005`) a newer token's transaction waited
    /// `guard_wait` for older ones still in flight. The only retriable
    /// refusal.
    Unavailable,
}

impl RefusalKind {
    /// The contract's word for it (`stale`, `missing`, ...), as the audit
    /// log and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Stale => "stale",
            RefusalKind::Missing => "missing",
            RefusalKind::Invalid => "invalid",
            RefusalKind::Forged => "forged",
            RefusalKind::Unavailable => "unavailable",
        }
    }

    /// The kind a `urn:fencepost:*` problem type names, if it is a refusal.
    pub fn from_problem_type(kind: &str) -> Option<RefusalKind> {
        Some(match kind.strip_prefix("urn:fencepost:")? {
            "stale-token" => RefusalKind::Stale,
            "token-required" | "resource-required" => RefusalKind::Missing,
            "invalid-token" | "invalid-resource" => RefusalKind::Invalid,
            "forged-token" => RefusalKind::Forged,
            "fence-unavailable" => RefusalKind::Unavailable,
            _ => return None,
        })
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which proxy refused, in its own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusedBy {
    /// The HTTP proxy: the status and the problem `type`.
    Http { status: u16, problem_type: String },
    /// The Postgres proxy (or its in-database guard): the SQLSTATE.
    Postgres { sqlstate: String },
}

/// A write a fencing proxy refused. Never forwarded, and (except
/// `missing` and `invalid` over HTTP) audited by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// The resource, when the proxy named it.
    pub resource: Option<String>,
    /// The token number the write presented, when the proxy read one.
    pub presented_token: Option<u64>,
    /// For `stale`: the high-water mark that refused it.
    pub current_token: Option<u64>,
    /// The proxy's explanation, for people.
    pub detail: String,
    /// For `unavailable` over HTTP: the `Retry-After` the proxy asked for.
    pub retry_after: Option<Duration>,
    pub refused_by: RefusedBy,
}

impl Refusal {
    /// Stale: a newer leader exists and this token is finished.
    pub fn is_stale(&self) -> bool {
        self.kind == RefusalKind::Stale
    }

    /// Whether the same write may succeed if retried (only `unavailable`).
    pub fn is_retriable(&self) -> bool {
        self.kind == RefusalKind::Unavailable
    }

    /// Reads an HTTP answer from a fencing proxy. `None` when it is not a
    /// fencing refusal (a success, the upstream's own error, a `502`):
    /// only a `problem+json` body with one of the five refusal types
    /// counts, so an upstream's own `409` is never mistaken for one.
    pub fn from_http(status: u16, headers: &HeaderMap, body: &[u8]) -> Option<Refusal> {
        if !is_problem(headers) {
            return None;
        }
        #[derive(Deserialize)]
        struct Problem {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            detail: Option<String>,
            #[serde(default)]
            title: Option<String>,
            #[serde(default)]
            resource: Option<String>,
            #[serde(default)]
            presented_token: Option<u64>,
            #[serde(default)]
            current_token: Option<u64>,
        }
        let p: Problem = serde_json::from_slice(body).ok()?;
        let kind = RefusalKind::from_problem_type(&p.kind)?;
        let header_u64 = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        Some(Refusal {
            kind,
            resource: p.resource,
            presented_token: p.presented_token,
            current_token: p.current_token.or_else(|| header_u64(CURRENT_TOKEN_HEADER)),
            detail: p.detail.or(p.title).unwrap_or_else(|| p.kind.clone()),
            retry_after: header_u64(RETRY_AFTER).map(Duration::from_secs),
            refused_by: RefusedBy::Http {
                status,
                problem_type: p.kind,
            },
        })
    }

    /// Whether an HTTP answer could be a refusal, judged by its head alone:
    /// the statuses the contract uses and a `problem+json` body. Lets a
    /// client read the body only when it has to.
    pub fn may_be_http_refusal(status: u16, headers: &HeaderMap) -> bool {
        matches!(status, 400 | 403 | 409 | 428 | 503) && is_problem(headers)
    }

    /// Reads a Postgres error from a fencing proxy: `ZF001` stale, `ZF002`
    /// missing, `ZF003` invalid or forged (the message tells them apart),
    /// `ZF004` unavailable, and the guard's `ZF005` (its drain timed out:
    /// retry) unavailable too. `None` for any other SQLSTATE.
    pub fn from_sqlstate(sqlstate: &str, message: &str) -> Option<Refusal> {
        let kind = match sqlstate {
            "ZF001" => RefusalKind::Stale,
            "ZF002" => RefusalKind::Missing,
            "ZF003" => invalid_or_forged(message),
            "ZF004" | "ZF005" => RefusalKind::Unavailable,
            _ => return None,
        };
        Some(Refusal {
            kind,
            resource: word_after(message, "resource ", is_resource_char)
                .map(|r| r.trim_end_matches([':', '.']).to_owned())
                .filter(|r| !r.is_empty()),
            presented_token: number_after(message, "presented "),
            current_token: number_after(message, "current "),
            detail: message.to_owned(),
            retry_after: None,
            refused_by: RefusedBy::Postgres {
                sqlstate: sqlstate.to_owned(),
            },
        })
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "write refused ({}", self.kind)?;
        match &self.refused_by {
            RefusedBy::Http { status, .. } => write!(f, ", HTTP {status}")?,
            RefusedBy::Postgres { sqlstate } => write!(f, ", SQLSTATE {sqlstate}")?,
        }
        write!(f, "): {}", self.detail)
    }
}

impl std::error::Error for Refusal {}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/problem+json")
        })
}

/// `ZF003` is both reasons. The proxy words an unreadable token "invalid
/// ..." and a bad or missing signature "... signature does not verify" /
/// "unsigned token refused"; anything unrecognized stays `Invalid`, the
/// reason that does not accuse anyone.
fn invalid_or_forged(message: &str) -> RefusalKind {
    let m = message.to_ascii_lowercase();
    if m.contains("invalid") {
        RefusalKind::Invalid
    } else if m.contains("signature") || m.contains("unsigned") || m.contains("forged") {
        RefusalKind::Forged
    } else {
        RefusalKind::Invalid
    }
}

fn is_resource_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
}

fn word_after<'a>(text: &'a str, key: &str, ok: fn(char) -> bool) -> Option<&'a str> {
    let start = text.find(key)? + key.len();
    let rest = &text[start..];
    let end = rest.find(|c: char| !ok(c)).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    word_after(text, key, |c| c.is_ascii_digit())?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn problem_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h
    }

    #[test]
    fn stale_from_http() {
        let mut h = problem_headers();
        h.insert(CURRENT_TOKEN_HEADER, HeaderValue::from_static("7"));
        let body =
            br#"{"type":"urn:fencepost:stale-token","title":"Stale fencing token","status":409,
            "detail":"stale fencing token for resource orders: presented 3, current 7",
            "resource":"orders","presented_token":3,"current_token":7}"#;
        let r = Refusal::from_http(409, &h, body).unwrap();
        assert_eq!(r.kind, RefusalKind::Stale);
        assert_eq!(r.resource.as_deref(), Some("orders"));
        assert_eq!((r.presented_token, r.current_token), (Some(3), Some(7)));
        assert!(r.is_stale() && !r.is_retriable());
        assert!(Refusal::may_be_http_refusal(409, &h));
    }

    #[test]
    fn current_token_falls_back_to_the_header() {
        let mut h = problem_headers();
        h.insert(CURRENT_TOKEN_HEADER, HeaderValue::from_static("11"));
        let r = Refusal::from_http(409, &h, br#"{"type":"urn:fencepost:stale-token"}"#).unwrap();
        assert_eq!(r.current_token, Some(11));
        assert_eq!(r.detail, "urn:fencepost:stale-token");
    }

    #[test]
    fn every_http_type_maps() {
        let cases = [
            (428, "token-required", RefusalKind::Missing),
            (428, "resource-required", RefusalKind::Missing),
            (400, "invalid-token", RefusalKind::Invalid),
            (400, "invalid-resource", RefusalKind::Invalid),
            (403, "forged-token", RefusalKind::Forged),
            (503, "fence-unavailable", RefusalKind::Unavailable),
        ];
        for (status, t, kind) in cases {
            let mut h = problem_headers();
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            let body = format!(r#"{{"type":"urn:fencepost:{t}","detail":"d"}}"#);
            let r = Refusal::from_http(status, &h, body.as_bytes()).unwrap();
            assert_eq!(r.kind, kind, "{t}");
            assert_eq!(r.retry_after, Some(Duration::from_secs(1)));
            assert_eq!(
                r.refused_by,
                RefusedBy::Http {
                    status,
                    problem_type: format!("urn:fencepost:{t}")
                }
            );
        }
    }

    #[test]
    fn other_answers_are_not_refusals() {
        let h = problem_headers();
        for body in [
            &br#"{"type":"urn:fencepost:upstream-unreachable"}"#[..],
            br#"{"type":"urn:fencepost:overloaded"}"#,
            br#"{"type":"about:blank"}"#,
            br#"not json"#,
            br#"{}"#,
        ] {
            assert_eq!(Refusal::from_http(409, &h, body), None);
        }
        // The right type without a problem content type: the upstream's.
        let plain = HeaderMap::new();
        assert_eq!(
            Refusal::from_http(409, &plain, br#"{"type":"urn:fencepost:stale-token"}"#),
            None
        );
        assert!(!Refusal::may_be_http_refusal(409, &plain));
        assert!(!Refusal::may_be_http_refusal(502, &h));
    }

    #[test]
    fn sqlstates_map() {
        let r = Refusal::from_sqlstate(
            "ZF001",
            "stale fencing token for resource shard/1: presented 4, current 9",
        )
        .unwrap();
        assert_eq!(r.kind, RefusalKind::Stale);
        assert_eq!(r.resource.as_deref(), Some("shard/1"));
        assert_eq!((r.presented_token, r.current_token), (Some(4), Some(9)));
        let guard = Refusal::from_sqlstate(
            "ZF001",
            "stale fencing token for resource orders: presented 2, current 5 (refused by the database guard)",
        )
        .unwrap();
        assert_eq!(
            (guard.presented_token, guard.current_token),
            (Some(2), Some(5))
        );
        assert_eq!(guard.resource.as_deref(), Some("orders"));

        let kind = |code, msg| Refusal::from_sqlstate(code, msg).map(|r| r.kind);
        assert_eq!(
            kind("ZF002", "this write carries no fencing token"),
            Some(RefusalKind::Missing)
        );
        assert_eq!(
            kind("ZF003", "invalid token: token must be decimal digits"),
            Some(RefusalKind::Invalid)
        );
        assert_eq!(
            kind(
                "ZF003",
                "invalid token: token signature is not valid base64url of an Ed25519 signature"
            ),
            Some(RefusalKind::Invalid)
        );
        assert_eq!(
            kind("ZF003", "token signature does not verify for this resource"),
            Some(RefusalKind::Forged)
        );
        assert_eq!(
            kind(
                "ZF003",
                "unsigned token refused: this proxy requires tokens signed by the elector"
            ),
            Some(RefusalKind::Forged)
        );
        assert_eq!(
            kind("ZF004", "fence state unavailable, write refused: x"),
            Some(RefusalKind::Unavailable)
        );
        assert_eq!(kind("23505", "duplicate key"), None);
        assert_eq!(
            kind("ZF005", "fencepost guard: token 7 for resource r waited 5000 ms for older transactions to end; held by: pid 1 (application_name 'a', state idle in transaction, transaction started x)"),
            Some(RefusalKind::Unavailable)
        );
        assert_eq!(kind("ZF006", "future code"), None);
    }

    #[test]
    fn odd_messages_do_not_panic() {
        for m in [
            "",
            "resource ",
            "presented ",
            "current x",
            "résource ü presented 1",
        ] {
            let _ = Refusal::from_sqlstate("ZF001", m);
        }
    }
}
