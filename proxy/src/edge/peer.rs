//! Who is at the other end of a connection, as the TLS layer proved it.
//!
//! The TLS acceptor (mutual TLS, `tls_client_ca`) puts a [`PeerCertificate`]
//! into every request's extensions on that connection; the elector's and
//! the admin API's authorization read it from there. Keeping the type here,
//! apart from both, lets the transport and the policy change separately.

/// The names a verified client certificate carries: its subject common name
/// first (if any), then its DNS and URI subject alternative names, in
/// certificate order. Present only when the certificate chained to the
/// listener's `tls_client_ca`; absent on plaintext and on TLS without client
/// certificates.
// Built by the TLS acceptor and read by the elector's authorization, which
// land separately; until both do, parts of it have no caller.
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub names: Vec<String>,
}

#[allow(dead_code)]
impl PeerCertificate {
    /// Whether `identity` is one of the certificate's names (exact,
    /// case-sensitive for URIs, ASCII case-insensitive for DNS names and
    /// the common name, as a DNS name would be compared).
    pub fn is(&self, identity: &str) -> bool {
        self.names.iter().any(|n| {
            if n.contains("://") {
                n == identity
            } else {
                n.eq_ignore_ascii_case(identity)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_as_their_kind_does() {
        let p = PeerCertificate {
            names: vec!["Scheduler-A".into(), "spiffe://prod/ns/sched/sa/a".into()],
        };
        assert!(p.is("scheduler-a"));
        assert!(p.is("spiffe://prod/ns/sched/sa/a"));
        assert!(!p.is("spiffe://PROD/ns/sched/sa/a"));
        assert!(!p.is("scheduler-b"));
    }
}
