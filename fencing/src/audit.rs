//! The audit record: a refused write (guarantee 5: one per refusal) or a
//! leadership change the elector decided (grant, denial, release, expiry,
//! refused renewal), in one log told apart by [`Kind`].
//!
//! Records carry a statement fingerprint or method and path, never request
//! bodies or SQL literals: the audit log is for operators, and must not
//! become a second copy of the data it protects.

use serde::{Deserialize, Serialize};

use crate::audit_chain::ChainLink;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Postgres,
    /// A lease operation at the elector API.
    Elector,
}

/// What a record is about. The names are the contract's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    RefusedWrite,
    LeaseGranted,
    LeaseDenied,
    LeaseReleased,
    LeaseExpired,
    RenewalRefused,
    /// Successful renewals: recorded only when `[elector] audit_renewals`.
    LeaseRenewed,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::RefusedWrite,
        Kind::LeaseGranted,
        Kind::LeaseDenied,
        Kind::LeaseReleased,
        Kind::LeaseExpired,
        Kind::RenewalRefused,
        Kind::LeaseRenewed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RefusedWrite => "refused_write",
            Kind::LeaseGranted => "lease_granted",
            Kind::LeaseDenied => "lease_denied",
            Kind::LeaseReleased => "lease_released",
            Kind::LeaseExpired => "lease_expired",
            Kind::RenewalRefused => "renewal_refused",
            Kind::LeaseRenewed => "lease_renewed",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
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

/// Why a lease changed hands, or did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseReason {
    /// Granted a lease nobody held (never held, or released).
    Free,
    /// Granted a lease whose previous holder's lease had expired.
    Takeover,
    /// Denied: another holder's lease is live.
    Held,
    /// Denied: free, but inside the lock delay after an expiry.
    LockDelay,
    /// Denied: every token has been issued for the resource.
    Exhausted,
    /// Renewal refused: the caller does not hold a live lease with its token.
    NotHolder,
    /// Released by its holder.
    Released,
    /// Expired: not renewed within its TTL.
    Ttl,
    /// Renewed (or acquired again) by its holder.
    Renewed,
    /// Denied: the caller's identity has no grant for this resource, or
    /// not under this holder name (`[[elector.grants]]`).
    Forbidden,
}

impl LeaseReason {
    pub const ALL: [LeaseReason; 10] = [
        LeaseReason::Free,
        LeaseReason::Takeover,
        LeaseReason::Held,
        LeaseReason::LockDelay,
        LeaseReason::Exhausted,
        LeaseReason::NotHolder,
        LeaseReason::Released,
        LeaseReason::Ttl,
        LeaseReason::Renewed,
        LeaseReason::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseReason::Free => "free",
            LeaseReason::Takeover => "takeover",
            LeaseReason::Held => "held",
            LeaseReason::LockDelay => "lock_delay",
            LeaseReason::Exhausted => "exhausted",
            LeaseReason::NotHolder => "not_holder",
            LeaseReason::Released => "released",
            LeaseReason::Ttl => "ttl",
            LeaseReason::Renewed => "renewed",
            LeaseReason::Forbidden => "forbidden",
        }
    }

    pub fn parse(s: &str) -> Option<LeaseReason> {
        LeaseReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A record's reason: a refused write's or a leadership change's. The two
/// sets of names do not overlap, so the text alone says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditReason {
    Write(Reason),
    Lease(LeaseReason),
}

impl AuditReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditReason::Write(r) => r.as_str(),
            AuditReason::Lease(r) => r.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<AuditReason> {
        Reason::parse(s)
            .map(AuditReason::Write)
            .or_else(|| LeaseReason::parse(s).map(AuditReason::Lease))
    }
}

impl From<Reason> for AuditReason {
    fn from(r: Reason) -> Self {
        AuditReason::Write(r)
    }
}

impl PartialEq<Reason> for AuditReason {
    fn eq(&self, other: &Reason) -> bool {
        *self == AuditReason::Write(*other)
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
            Protocol::Elector => "elector",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "http" => Some(Protocol::Http),
            "postgres" => Some(Protocol::Postgres),
            "elector" => Some(Protocol::Elector),
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

/// One record. `id` is assigned by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: Option<i64>,
    /// Milliseconds since the Unix epoch, by the writing process's clock.
    pub at_ms: i64,
    pub kind: Kind,
    pub resource: Option<String>,
    /// The lease holder a leadership record is about (none for writes).
    pub holder: Option<String>,
    pub protocol: Protocol,
    pub reason: AuditReason,
    pub presented_token: Option<u64>,
    pub current_token: Option<u64>,
    pub client_addr: String,
    pub detail: String,
    /// Who made the call, when the elector knew (a `[[elector.clients]]`
    /// name or a client certificate's name): `None` on refused writes, on
    /// calls to an elector without identities, and on rows written before
    /// identities existed. Chained only when present
    /// ([`crate::audit_chain::record_hash`]), so older rows still verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Its place in its writer's hash chain ([`crate::audit_chain`]): set
    /// by the writer, `None` until then and on rows written before chains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainLink>,
}

impl AuditRecord {
    /// Builds a refused write's record, bounding the client-influenced `detail`.
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
            kind: Kind::RefusedWrite,
            resource: resource.map(str::to_owned),
            holder: None,
            protocol,
            reason: AuditReason::Write(reason),
            presented_token,
            current_token,
            client_addr,
            detail: truncate(detail, MAX_DETAIL).to_owned(),
            identity: None,
            chain: None,
        }
    }
}

/// What the elector knows of one leadership change, for [`AuditRecord::lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAudit<'a> {
    pub kind: Kind,
    pub reason: LeaseReason,
    pub resource: &'a str,
    pub holder: &'a str,
    /// The token the caller presented (renew, release) or was granted.
    pub presented_token: Option<u64>,
    /// The resource's token in the store when decided.
    pub current_token: Option<u64>,
    pub client_addr: String,
    pub detail: &'a str,
    /// The caller's identity, when the elector has identities configured.
    pub identity: Option<&'a str>,
}

impl AuditRecord {
    /// Builds a leadership record, bounding the holder and the detail.
    pub fn lease(at_ms: i64, e: LeaseAudit<'_>) -> Self {
        AuditRecord {
            id: None,
            at_ms,
            kind: e.kind,
            resource: Some(e.resource.to_owned()),
            holder: Some(truncate(e.holder, MAX_DETAIL).to_owned()),
            protocol: Protocol::Elector,
            reason: AuditReason::Lease(e.reason),
            presented_token: e.presented_token,
            current_token: e.current_token,
            client_addr: e.client_addr,
            detail: truncate(e.detail, MAX_DETAIL).to_owned(),
            identity: e.identity.map(|i| truncate(i, MAX_DETAIL).to_owned()),
            chain: None,
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
        for r in LeaseReason::ALL {
            assert_eq!(AuditReason::parse(r.as_str()), Some(AuditReason::Lease(r)));
        }
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Protocol::parse("http"), Some(Protocol::Http));
        assert_eq!(Protocol::parse("elector"), Some(Protocol::Elector));
    }
}
