//! `[[http]]`: one HTTP fencing proxy listener, its upstream, and how it
//! finds a write's resource.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fencing::ResourceName;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use serde::{Deserialize, Deserializer};
use wire::http::WriteMethods;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProxyConfig {
    pub listen: SocketAddr,
    /// Base URL of the service behind the proxy, `http://host:port` or
    /// `https://host:port`.
    pub upstream: Upstream,
    /// PEM file of the CA certificates an `https://` upstream's
    /// certificate must chain to; unset, the system's store.
    pub upstream_ca: Option<PathBuf>,
    /// Public key file: when set, tokens must be signed by the elector.
    pub verify_key: Option<PathBuf>,
    /// Accept plain decimal tokens even though `verify_key` is set.
    #[serde(default)]
    pub allow_plain_tokens: bool,
    /// Methods that are writes (default POST, PUT, PATCH, DELETE; unknown
    /// and non-safe methods are writes anyway).
    #[serde(default, deserialize_with = "write_methods")]
    pub write_methods: WriteMethods,
    /// Path prefixes that name their resource; `Fencing-Resource` wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Client connections open at once; past it a new connection gets a
    /// `503` (`Retry-After`) and is closed.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// Requests being handled at once, over all connections; past it a
    /// request gets a `503`.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Longest the upstream may take to send response headers.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Longest a client may take to send its request headers (slowloris).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Idle keep-alive connections from clients are closed after this.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Elector base URL to watch: each grant fences the old leader at once.
    pub elector_watch: Option<String>,
    /// Bearer token for `elector_watch`, when the elector has one. Without
    /// it the watch would be refused (401) and grants would fence only on
    /// the new leader's first write. Defaults to `[elector] token` when
    /// this process runs the elector too.
    pub elector_token: Option<String>,
    /// Resources to watch on `elector_watch` (default: the routes').
    #[serde(default, deserialize_with = "resource_names")]
    pub watch_resources: Vec<ResourceName>,
    /// How requests are proxied: the byte relay, or the hyper-based path
    /// it replaced (kept for one release, to fall back to).
    #[serde(default)]
    pub data_path: DataPath,
    /// Relay threads, each a current-thread runtime with its own accept
    /// and upstream connections; 0 (the default) runs the relay on the
    /// process's shared multi-thread runtime.
    #[serde(default)]
    pub workers: usize,
    /// PEM certificate chain: when set (with `tls_key`), this listener
    /// speaks TLS only. Reloaded on SIGHUP and when the file changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a
    /// certificate that chains to one of them (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
}

/// The proxied data path of an `[[http]]` listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// Heads parsed once and relayed as bytes (`http_proxy::relay`).
    #[default]
    Relay,
    /// hyper's server and client, with a `HeaderMap` per message.
    Hyper,
}

/// A path prefix that names the resource of the requests under it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub prefix: String,
    #[serde(deserialize_with = "resource_name")]
    pub resource: ResourceName,
}

fn default_max_concurrent() -> usize {
    10_000
}
fn default_http_max_connections() -> usize {
    10_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

impl HttpProxyConfig {
    /// The resources to follow on `elector_watch`: `watch_resources`, or
    /// else the routes'.
    pub fn watched_resources(&self) -> Vec<ResourceName> {
        if self.watch_resources.is_empty() {
            self.routes.iter().map(|r| r.resource.clone()).collect()
        } else {
            self.watch_resources.clone()
        }
    }

    /// The TLS files, when this listener serves TLS.
    pub fn tls(&self) -> Option<super::ListenerTls> {
        super::ListenerTls::from_keys(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
    }

    /// What the types cannot say; `i` is the listener's index.
    pub(super) fn validate(&self, i: usize) -> Result<(), String> {
        if self.max_concurrent_requests == 0 {
            return Err(format!(
                "http[{i}].max_concurrent_requests must be at least 1"
            ));
        }
        if self.max_connections == 0 {
            return Err(format!("http[{i}].max_connections must be at least 1"));
        }
        if self.upstream_ca.is_some() && !self.upstream.is_tls() {
            // Surely a forgotten `https://`: say so rather than send in
            // plain text what the operator meant to protect.
            return Err(format!(
                "http[{i}].upstream_ca is set, but the upstream {} is not an https:// URL",
                self.upstream
            ));
        }
        super::tls::check(
            &format!("http[{i}]"),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
    }
}

fn write_methods<'de, D: Deserializer<'de>>(d: D) -> Result<WriteMethods, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    WriteMethods::from_names(&names)
        .map_err(|e| serde::de::Error::custom(format!("write_methods {names:?}: {e}")))
}

fn resource_name<'de, D: Deserializer<'de>>(d: D) -> Result<ResourceName, D::Error> {
    let s = String::deserialize(d)?;
    ResourceName::new(&s).map_err(|e| serde::de::Error::custom(format!("resource {s:?}: {e}")))
}

fn resource_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ResourceName>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            ResourceName::new(s)
                .map_err(|e| serde::de::Error::custom(format!("resource {s:?}: {e}")))
        })
        .collect()
}

/// Where an HTTP proxy sends requests: `http://authority` or
/// `https://authority` plus an optional base path prepended to every
/// request path. Parsed once, at load; the proxy only reads it.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// As configured, for logs and `/readyz`.
    url: String,
    /// `https://`: connections are TLS, the host name checked against
    /// the certificate.
    tls: bool,
    authority: Authority,
    host: HeaderValue,
    base: String,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url.parse().map_err(|e| format!("upstream {url:?}: {e}"))?;
        let tls = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => false,
            Some(s) if *s == Scheme::HTTPS => true,
            _ => {
                return Err(format!(
                    "upstream {url:?} must be an http:// or https:// URL"
                ))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream {url:?} has no host"))?;
        if uri.query().is_some() {
            return Err(format!("upstream {url:?} must not carry a query"));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("upstream {url:?}: {e}"))?;
        Ok(Upstream {
            url: url.to_owned(),
            tls,
            base: uri.path().trim_end_matches('/').to_owned(),
            authority,
            host,
        })
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Whether the upstream is `https://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The `Host` header requests carry upstream.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The base path prepended to every request path (no trailing `/`;
    /// empty for none).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `host:port` to connect to (port 80, or 443 for `https://`, when
    /// the URL has none).
    pub fn addr(&self) -> String {
        let host = self.authority.host();
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.tls { 443 } else { 80 });
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    /// The request target as the upstream gets it: origin-form, the base
    /// path prepended. (The host travels in the `Host` header.)
    pub fn uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.map_or("/", PathAndQuery::as_str);
        let pq = if self.base.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.base))?
        };
        Ok(Uri::from(pq))
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Upstream::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_base_path_is_prepended() {
        let u = Upstream::parse("http://127.0.0.1:9000/api/").unwrap();
        let pq = PathAndQuery::from_static("/kv/a?x=1");
        assert_eq!(u.uri(Some(&pq)).unwrap().to_string(), "/api/kv/a?x=1");
        assert_eq!(u.addr(), "127.0.0.1:9000");
        assert_eq!(u.as_str(), "http://127.0.0.1:9000/api/");
        let u = Upstream::parse("http://h:1").unwrap();
        assert_eq!(u.uri(None).unwrap().to_string(), "/");
        assert_eq!(u.host(), "h:1");
        assert_eq!(Upstream::parse("http://[::1]").unwrap().addr(), "[::1]:80");
        let u = Upstream::parse("https://h.example/api").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.addr(), "h.example:443");
        assert_eq!(u.host(), "h.example");
        assert!(!Upstream::parse("http://h").unwrap().is_tls());
        assert!(Upstream::parse("ftp://h").is_err());
        assert!(Upstream::parse("http://h/?q=1").is_err());
        assert!(Upstream::parse("/only/a/path").is_err());
    }
}
