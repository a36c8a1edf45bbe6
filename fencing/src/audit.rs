//! The audit record of a refused write (guarantee 5: one per refusal).
//!
//! Records carry a statement fingerprint or method and path, never request
//! bodies or SQL literals: the audit log is for operators, and must not
//! become a second copy of the data it protects.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Postgres,
}

/// Why a write was refused. The names are the contract's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Stale,
    Missing,
    Invalid,
    Forged,
    Unavailable,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "http" => Some(Protocol::Http),
            "postgres" => Some(Protocol::Postgres),
            _ => None,
        }
    }
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Stale,
        Reason::Missing,
        Reason::Invalid,
        Reason::Forged,
        Reason::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Stale => "stale",
            Reason::Missing => "missing",
            Reason::Invalid => "invalid",
            Reason::Forged => "forged",
            Reason::Unavailable => "unavailable",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Longest `detail` kept; a longer one is cut at a character boundary.
pub const MAX_DETAIL: usize = 512;

/// One refused write. `id` is assigned by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: Option<i64>,
    /// Milliseconds since the Unix epoch, by the proxy's clock.
    pub at_ms: i64,
    pub resource: Option<String>,
    pub protocol: Protocol,
    pub reason: Reason,
    pub presented_token: Option<u64>,
    pub current_token: Option<u64>,
    pub client_addr: String,
    pub detail: String,
}

impl AuditRecord {
    /// Builds a record, bounding the client-influenced `detail`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        at_ms: i64,
        resource: Option<&str>,
        protocol: Protocol,
        reason: Reason,
        presented_token: Option<u64>,
        current_token: Option<u64>,
        client_addr: String,
        detail: &str,
    ) -> Self {
        AuditRecord {
            id: None,
            at_ms,
            resource: resource.map(str::to_owned),
            protocol,
            reason,
            presented_token,
            current_token,
            client_addr,
            detail: truncate(detail, MAX_DETAIL).to_owned(),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(400);
        let r = AuditRecord::new(
            0,
            None,
            Protocol::Http,
            Reason::Invalid,
            None,
            None,
            String::new(),
            &long,
        );
        assert!(r.detail.len() <= MAX_DETAIL);
        assert!(long.starts_with(&r.detail));
    }

    #[test]
    fn names_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Protocol::parse("http"), Some(Protocol::Http));
    }
}
