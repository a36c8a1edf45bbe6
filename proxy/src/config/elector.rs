//! `[elector]`: the lease API and its TTL bounds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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
        Ok(())
    }
}
