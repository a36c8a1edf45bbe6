//! `[admin]`: the admin API (`/metrics`, `/healthz`, `/readyz`,
//! `/v1/fences`, `/v1/audit`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token required on every admin endpoint but `/healthz`.
    pub token: Option<String>,
    /// Label per-resource metrics with the resource name. Turn off when
    /// resources are many (one time series each).
    #[serde(default = "yes")]
    pub resource_labels: bool,
    /// PEM certificate chain: when set (with `tls_key`), this listener
    /// speaks TLS only. Reloaded on SIGHUP and when the file changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a
    /// certificate that chains to one of them (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
}

impl AdminConfig {
    /// The TLS files, when this listener serves TLS.
    pub fn tls(&self) -> Option<super::ListenerTls> {
        super::ListenerTls::from_keys(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
    }
}

fn yes() -> bool {
    true
}
