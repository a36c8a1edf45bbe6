//! `[elector]`: the lease API and its TTL bounds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::edge::access::{self, Grant, TokenHash};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectorConfig {
    pub listen: SocketAddr,
    /// Secret key file from `fencepost keygen`: tokens are then signed.
    pub signing_key: Option<PathBuf>,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub default_ttl: Duration,
    #[serde(default = "default_min_ttl", with = "humantime_serde")]
    pub min_ttl: Duration,
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// After a lease expires, no new grant for this long.
    #[serde(default, with = "humantime_serde")]
    pub lock_delay: Duration,
    /// Bearer token required on the elector API, if set.
    pub token: Option<String>,
    /// Also audit successful renewals (`lease_renewed`). Off by default: a
    /// holder renews every third of its TTL, which would flood the log.
    #[serde(default)]
    pub audit_renewals: bool,
    /// PEM certificate chain: when set (with `tls_key`), this listener
    /// speaks TLS only. Reloaded on SIGHUP and when the file changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a
    /// certificate that chains to one of them (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// `[[elector.clients]]`: callers known by a bearer token of their
    /// own, stored as its hash. With clients or grants configured, every
    /// call needs an identity and every lease call a grant; without
    /// either, the elector is as open (or as `token`-guarded) as before.
    #[serde(default)]
    pub clients: Vec<ElectorClient>,
    /// `[[elector.grants]]`: which identities (client names, certificate
    /// names) may take which resources under which holder names.
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// One `[[elector.clients]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectorClient {
    /// The identity: what grants name and the audit records.
    pub name: String,
    /// `sha256:<hex>` of the client's token (`fencepost keygen client-token`).
    pub token_hash: TokenHash,
}

fn default_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_min_ttl() -> Duration {
    Duration::from_millis(100)
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl ElectorConfig {
    /// The TLS files, when this listener serves TLS.
    pub fn tls(&self) -> Option<super::ListenerTls> {
        super::ListenerTls::from_keys(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        let fmt = humantime::format_duration;
        // Compared in whole milliseconds, the unit leases are decided in.
        let (min, max, default) = (
            self.min_ttl.as_millis(),
            self.max_ttl.as_millis(),
            self.default_ttl.as_millis(),
        );
        if min < 1 {
            return Err("elector.min_ttl must be at least 1ms".into());
        }
        if min > max {
            return Err(format!(
                "elector.min_ttl ({}) is above elector.max_ttl ({})",
                fmt(self.min_ttl),
                fmt(self.max_ttl)
            ));
        }
        if default < min || default > max {
            // Otherwise every acquire that names no TTL would be refused.
            return Err(format!(
                "elector.default_ttl ({}) must lie between min_ttl ({}) and max_ttl ({})",
                fmt(self.default_ttl),
                fmt(self.min_ttl),
                fmt(self.max_ttl)
            ));
        }
        if self.token.as_deref().is_some_and(str::is_empty) {
            return Err("elector.token is empty; remove it or set a secret".into());
        }
        if self.token.is_some() && self.identities() {
            // One shared secret beside per-client identities would let its
            // holder act as anyone, which is what identities are for.
            return Err(
                "elector.token cannot be set with [[elector.clients]] or [[elector.grants]]: \
                 give each caller a client of its own (fencepost keygen client-token)"
                    .into(),
            );
        }
        for (i, c) in self.clients.iter().enumerate() {
            let at = format!("elector.clients[{i}]");
            access::check_name(&format!("{at}.name"), &c.name)?;
            if let Some(j) = self.clients[..i].iter().position(|o| o.name == c.name) {
                return Err(format!(
                    "{at}.name {:?} is also elector.clients[{j}]'s name",
                    c.name
                ));
            }
            if let Some(j) = self.clients[..i]
                .iter()
                .position(|o| o.token_hash == c.token_hash)
            {
                return Err(format!(
                    "{at}.token_hash is also elector.clients[{j}]'s: two clients with one token \
                     cannot be told apart; make each its own token"
                ));
            }
        }
        for (i, g) in self.grants.iter().enumerate() {
            g.validate(&format!("elector.grants[{i}]"))?;
        }
        Ok(())
    }

    /// Whether calls are authorized by identity (clients or grants set).
    pub fn identities(&self) -> bool {
        !self.clients.is_empty() || !self.grants.is_empty()
    }
}
