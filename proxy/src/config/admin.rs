//! `[admin]`: the admin API (`/metrics`, `/healthz`, `/readyz`,
//! `/v1/fences`, `/v1/audit`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::edge::access::{self, Role, TokenHash};

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
    /// `[[admin.clients]]`: identities and their roles. With any, every
    /// endpoint but `/healthz` and the console's assets needs one, and
    /// only `admin` identities may use a method other than GET or HEAD.
    #[serde(default)]
    pub clients: Vec<AdminClient>,
}

/// One `[[admin.clients]]` entry: a token client (with `token_hash`) or a
/// client certificate's name (without).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminClient {
    pub name: String,
    /// `sha256:<hex>` of its bearer token; absent for a certificate name.
    pub token_hash: Option<TokenHash>,
    /// `read` (the default: dashboards) or `admin`.
    #[serde(default = "read")]
    pub role: Role,
}

fn read() -> Role {
    Role::Read
}

impl AdminConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.token.is_some() && !self.clients.is_empty() {
            return Err(
                "admin.token cannot be set with [[admin.clients]]: give the dashboards and \
                 operators clients of their own (fencepost keygen client-token --role read)"
                    .into(),
            );
        }
        for (i, c) in self.clients.iter().enumerate() {
            let at = format!("admin.clients[{i}]");
            access::check_name(&format!("{at}.name"), &c.name)?;
            let same = |o: &AdminClient| {
                o.name == c.name && o.token_hash.is_some() == c.token_hash.is_some()
            };
            if let Some(j) = self.clients[..i].iter().position(same) {
                return Err(format!(
                    "{at}.name {:?} is also admin.clients[{j}]'s name",
                    c.name
                ));
            }
            if let Some(j) = self.clients[..i]
                .iter()
                .position(|o| o.token_hash.is_some() && o.token_hash == c.token_hash)
            {
                return Err(format!(
                    "{at}.token_hash is also admin.clients[{j}]'s: make each client its own token"
                ));
            }
        }
        Ok(())
    }

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
