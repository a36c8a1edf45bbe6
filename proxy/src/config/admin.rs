//! `[admin]`: the admin API (`/metrics`, `/healthz`, `/readyz`,
//! `/v1/fences`, `/v1/audit`).

use std::net::SocketAddr;

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
}

fn yes() -> bool {
    true
}
