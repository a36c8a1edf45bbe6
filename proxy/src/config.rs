//! `fencepost.toml`, with every setting overridable from the environment.
//!
//! Environment variables are `FENCEPOST_<SECTION>_<KEY>` (or
//! `FENCEPOST_<KEY>` for top-level keys); for the list sections `[[http]]`
//! and `[[postgres]]`, `FENCEPOST_HTTP_<KEY>` sets the first entry and
//! `FENCEPOST_HTTP_<N>_<KEY>` entry N. Values are read as TOML when they
//! parse (numbers, booleans, arrays) and as strings otherwise. The complete
//! list is [`ENV_KEYS`]; `fencepost serve --help` prints it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// `(section, key)` of every setting that has an environment variable.
/// Section "" is the top level.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("", "store"),
    ("log", "format"),
    ("log", "level"),
    ("admin", "listen"),
    ("admin", "token"),
    ("admin", "resource_labels"),
    ("elector", "listen"),
    ("elector", "signing_key"),
    ("elector", "default_ttl"),
    ("elector", "min_ttl"),
    ("elector", "max_ttl"),
    ("elector", "lock_delay"),
    ("elector", "token"),
    ("audit", "batch_size"),
    ("audit", "flush_interval"),
    ("audit", "queue_capacity"),
    ("fencing", "drain_timeout"),
    ("fencing", "store_timeout"),
    ("fencing", "token_cache_size"),
    ("http", "listen"),
    ("http", "upstream"),
    ("http", "verify_key"),
    ("http", "allow_plain_tokens"),
    ("http", "write_methods"),
    ("http", "routes"),
    ("http", "max_connections"),
    ("http", "max_concurrent_requests"),
    ("http", "max_header_bytes"),
    ("http", "upstream_timeout"),
    ("http", "header_read_timeout"),
    ("http", "idle_timeout"),
    ("http", "elector_watch"),
    ("http", "elector_token"),
    ("http", "watch_resources"),
    ("postgres", "listen"),
    ("postgres", "upstream"),
    ("postgres", "enforce"),
    ("postgres", "verify_key"),
    ("postgres", "allow_plain_tokens"),
    ("postgres", "strict"),
    ("postgres", "write_functions"),
    ("postgres", "max_frame_bytes"),
    ("postgres", "max_connections"),
    ("postgres", "startup_timeout"),
    ("postgres", "tls_cert"),
    ("postgres", "tls_key"),
];

const LIST_SECTIONS: &[&str] = &["http", "postgres"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `sqlite://path` (embedded, default `sqlite://fencepost.db`) or
    /// `postgres://...` (shared by replicas).
    #[serde(default = "default_store")]
    pub store: String,
    #[serde(default)]
    pub log: LogConfig,
    pub admin: Option<AdminConfig>,
    pub elector: Option<ElectorConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub fencing: FencingConfig,
    #[serde(default)]
    pub http: Vec<HttpProxyConfig>,
    #[serde(default)]
    pub postgres: Vec<PgProxyConfig>,
}

fn default_store() -> String {
    "sqlite://fencepost.db".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "text" or "json".
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter, e.g. "info" or "fencepost=debug". `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Records written per store transaction, at most.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Longest a record waits before its batch is written.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Records buffered in memory while the store is slow or down; past
    /// this, records are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            batch_size: default_batch(),
            flush_interval: default_flush(),
            queue_capacity: default_queue(),
        }
    }
}

fn default_batch() -> usize {
    256
}
fn default_flush() -> Duration {
    Duration::from_millis(200)
}
fn default_queue() -> usize {
    65_536
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FencingConfig {
    /// Longest a newer token's first write waits for older writes to
    /// finish at the upstream; past it the newer write gets 503.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Longest any store call waits before failing closed: fence decisions
    /// (503), lease operations (503), API reads. The whole bound: nothing
    /// beneath it cuts a call shorter.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Verified signed tokens kept, so signatures are checked once.
    #[serde(default = "default_token_cache")]
    pub token_cache_size: u64,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            drain_timeout: default_drain(),
            store_timeout: default_store_timeout(),
            token_cache_size: default_token_cache(),
        }
    }
}

fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_token_cache() -> u64 {
    100_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub prefix: String,
    pub resource: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProxyConfig {
    pub listen: SocketAddr,
    /// Base URL of the service behind the proxy, `http://host:port`.
    pub upstream: String,
    /// Public key file: when set, tokens must be signed by the elector.
    pub verify_key: Option<PathBuf>,
    /// Accept plain decimal tokens even though `verify_key` is set.
    #[serde(default)]
    pub allow_plain_tokens: bool,
    #[serde(default = "default_write_methods")]
    pub write_methods: Vec<String>,
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
    #[serde(default)]
    pub watch_resources: Vec<String>,
}

fn default_write_methods() -> Vec<String> {
    ["POST", "PUT", "PATCH", "DELETE"]
        .map(String::from)
        .to_vec()
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
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgProxyConfig {
    #[serde(default = "default_pg_listen")]
    pub listen: SocketAddr,
    pub upstream: String,
    /// "proxy" (fence in fencepost) or "database" (also in a guard inside
    /// the protected database).
    #[serde(default = "default_enforce")]
    pub enforce: String,
    /// Public key file: when set, tokens must be signed by the elector.
    pub verify_key: Option<PathBuf>,
    /// Accept plain decimal tokens even though `verify_key` is set.
    #[serde(default)]
    pub allow_plain_tokens: bool,
    /// Count every statement inside a read-write transaction block as a
    /// write, so a leader's reads that feed its writes are fenced too.
    #[serde(default)]
    pub strict: bool,
    /// Functions whose call makes even a SELECT a write (matched by their
    /// last name component, case-insensitively). Replaces the default list.
    #[serde(default = "default_write_functions")]
    pub write_functions: Vec<String>,
    /// Largest message accepted from a client or the server; a bigger one
    /// costs that connection (a protocol violation error).
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Client connections open at once (each is one server connection
    /// once started); past it a new client gets `FATAL 53300
    /// too_many_connections` and is closed, as Postgres answers.
    #[serde(default = "default_pg_max_connections")]
    pub max_connections: usize,
    /// Longest a client may take from connecting to a complete startup
    /// packet (TLS handshake included); then it is closed.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// PEM certificate chain offered to clients that ask for TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

fn default_write_functions() -> Vec<String> {
    wire::pg::DEFAULT_WRITE_FUNCTIONS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}
fn default_max_frame_bytes() -> usize {
    wire::pg::frame::DEFAULT_MAX_FRAME
}
/// Above any sensible server `max_connections` (Postgres's default is
/// 100), so the server's own limit is what normally refuses first.
fn default_pg_max_connections() -> usize {
    2_000
}
/// Postgres's `authentication_timeout` is a minute; a proxy in front need
/// not be more patient with a silent socket.
fn default_startup_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_pg_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_enforce() -> String {
    "proxy".into()
}

impl Config {
    /// Reads `path` (if given) and applies the environment on top.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_string()),
        };
        Self::from_parts(&text, &name, std::env::vars())
    }

    /// Parses config text and overlays `FENCEPOST_*` variables from `env`.
    pub fn from_parts(
        text: &str,
        name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: name.into(),
                    message: e.to_string(),
                })?;
        for (var, raw) in env {
            if let Some(rest) = var.strip_prefix("FENCEPOST_") {
                apply_env(&mut value, &var, rest, &raw)?;
            }
        }
        let config: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: name.into(),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, h) in self.http.iter().enumerate() {
            if !(h.upstream.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "http[{i}].upstream {:?} must be an http:// URL",
                    h.upstream
                )));
            }
            for r in &h.routes {
                fencing::ResourceName::new(&r.resource).map_err(|e| {
                    ConfigError::Invalid(format!("http[{i}] route {:?}: {e}", r.prefix))
                })?;
            }
            wire::http::WriteMethods::from_names(&h.write_methods)
                .map_err(|e| ConfigError::Invalid(format!("http[{i}].write_methods: {e}")))?;
            if h.max_concurrent_requests == 0 {
                return Err(ConfigError::Invalid(format!(
                    "http[{i}].max_concurrent_requests must be at least 1"
                )));
            }
            if h.max_connections == 0 {
                return Err(ConfigError::Invalid(format!(
                    "http[{i}].max_connections must be at least 1"
                )));
            }
        }
        for (i, p) in self.postgres.iter().enumerate() {
            if p.enforce != "proxy" && p.enforce != "database" {
                return Err(ConfigError::Invalid(format!(
                    "postgres[{i}].enforce must be \"proxy\" or \"database\", not {:?}",
                    p.enforce
                )));
            }
            // Below this no ordinary statement fits; the startup packet has
            // its own bound.
            if p.max_frame_bytes < 1024 {
                return Err(ConfigError::Invalid(format!(
                    "postgres[{i}].max_frame_bytes must be at least 1024, not {}",
                    p.max_frame_bytes
                )));
            }
            if p.max_connections == 0 {
                return Err(ConfigError::Invalid(format!(
                    "postgres[{i}].max_connections must be at least 1"
                )));
            }
            if p.startup_timeout.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "postgres[{i}].startup_timeout must be above zero"
                )));
            }
            if p.tls_cert.is_some() != p.tls_key.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "postgres[{i}]: tls_cert and tls_key go together"
                )));
            }
        }
        if self.log.format != "text" && self.log.format != "json" {
            return Err(ConfigError::Invalid(format!(
                "log.format must be \"text\" or \"json\", not {:?}",
                self.log.format
            )));
        }
        Ok(())
    }
}

fn env_value(raw: &str) -> toml::Value {
    // Read as a TOML value when it is one (`true`, `5`, `["a"]`), so lists
    // and numbers work; anything else is a plain string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn apply_env(root: &mut toml::Table, var: &str, rest: &str, raw: &str) -> Result<(), ConfigError> {
    let lower = rest.to_ascii_lowercase();
    for (section, key) in ENV_KEYS {
        let value = || {
            let v = env_value(raw);
            // Addresses, URLs and paths stay strings even if they look numeric.
            match v {
                toml::Value::String(_)
                | toml::Value::Boolean(_)
                | toml::Value::Integer(_)
                | toml::Value::Array(_) => v,
                _ => toml::Value::String(raw.into()),
            }
        };
        if section.is_empty() {
            if lower == *key {
                root.insert((*key).into(), value());
                return Ok(());
            }
            continue;
        }
        let Some(after) = lower.strip_prefix(&format!("{section}_")) else {
            continue;
        };
        if LIST_SECTIONS.contains(section) {
            let (index, k) = match after.split_once('_') {
                Some((n, k)) if n.bytes().all(|b| b.is_ascii_digit()) => (
                    n.parse::<usize>().map_err(|e| ConfigError::Env {
                        var: var.into(),
                        message: e.to_string(),
                    })?,
                    k,
                ),
                _ => (0, after),
            };
            if k != *key {
                continue;
            }
            let list = root
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Array(vec![]));
            let toml::Value::Array(items) = list else {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("[{section}] must be a list"),
                });
            };
            while items.len() <= index {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if let toml::Value::Table(t) = &mut items[index] {
                let v = value();
                // Addresses look like floats to TOML ("127.0.0.1" does not,
                // but be strict anyway): listen/upstream are always strings.
                let v = if matches!(
                    k,
                    "listen"
                        | "upstream"
                        | "verify_key"
                        | "elector_watch"
                        | "elector_token"
                        | "tls_cert"
                        | "tls_key"
                ) {
                    toml::Value::String(raw.into())
                } else {
                    v
                };
                t.insert(k.to_string(), v);
            }
            return Ok(());
        }
        if after == *key {
            let table = root
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = table else {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("[{section}] must be a table"),
                });
            };
            let v = if matches!(*key, "listen" | "token" | "signing_key") {
                toml::Value::String(raw.into())
            } else {
                value()
            };
            t.insert(key.to_string(), v);
            return Ok(());
        }
    }
    // Unknown FENCEPOST_ variables are also used by the CLI (FENCEPOST_ADMIN_URL,
    // FENCEPOST_ELECTOR_URL...), so they are not an error here.
    Ok(())
}

/// The env var names, for `--help`.
pub fn env_help() -> String {
    let mut out =
        String::from("Environment variables (each overrides the config key beside it):\n");
    for (section, key) in ENV_KEYS {
        let name = if section.is_empty() {
            format!("FENCEPOST_{}", key.to_ascii_uppercase())
        } else if LIST_SECTIONS.contains(section) {
            format!(
                "FENCEPOST_{}_[N_]{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )
        } else {
            format!(
                "FENCEPOST_{}_{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )
        };
        let path = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        out.push_str(&format!("  {name:<44} {path}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../fencepost.example.toml");
        let c = Config::from_parts(text, "example", env(&[])).unwrap();
        assert!(c.elector.is_some());
        assert!(!c.http.is_empty());
        // The commented [[postgres]] block is valid once uncommented.
        let at = text.find("# [[postgres]]").unwrap();
        let mut uncommented = text[..at].to_string();
        for line in text[at..].lines() {
            uncommented.push_str(line.strip_prefix("# ").unwrap_or(line));
            uncommented.push('\n');
        }
        let c = Config::from_parts(&uncommented, "example", env(&[])).unwrap();
        assert_eq!(c.postgres.len(), 1);
        assert!(c.postgres[0].tls_cert.is_some());
    }

    #[test]
    fn env_overrides_file_and_fills_lists() {
        let c = Config::from_parts(
            "store = \"sqlite://a.db\"\n[admin]\nlisten = \"127.0.0.1:1\"\n",
            "t",
            env(&[
                ("FENCEPOST_STORE", "sqlite://b.db"),
                ("FENCEPOST_ADMIN_TOKEN", "s3cret"),
                ("FENCEPOST_HTTP_LISTEN", "127.0.0.1:8080"),
                ("FENCEPOST_HTTP_UPSTREAM", "http://127.0.0.1:9000"),
                ("FENCEPOST_HTTP_1_LISTEN", "127.0.0.1:8081"),
                ("FENCEPOST_HTTP_1_UPSTREAM", "http://127.0.0.1:9001"),
                ("FENCEPOST_HTTP_1_MAX_CONCURRENT_REQUESTS", "7"),
                ("FENCEPOST_HTTP_1_MAX_CONNECTIONS", "9"),
                ("FENCEPOST_FENCING_DRAIN_TIMEOUT", "5s"),
                ("FENCEPOST_ADMIN_URL", "ignored by config"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store, "sqlite://b.db");
        assert_eq!(c.admin.unwrap().token.as_deref(), Some("s3cret"));
        assert_eq!(c.http.len(), 2);
        assert_eq!(c.http[1].max_concurrent_requests, 7);
        assert_eq!(c.http[1].max_connections, 9);
        assert_eq!(c.http[0].max_connections, 10_000);
        assert_eq!(c.fencing.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn postgres_keys_from_file_and_env() {
        let c = Config::from_parts(
            "[[postgres]]\nupstream = \"127.0.0.1:5432\"\n",
            "t",
            env(&[
                ("FENCEPOST_POSTGRES_VERIFY_KEY", "elector.pub"),
                ("FENCEPOST_POSTGRES_ALLOW_PLAIN_TOKENS", "true"),
                ("FENCEPOST_POSTGRES_STRICT", "true"),
                ("FENCEPOST_POSTGRES_WRITE_FUNCTIONS", "[\"bump\"]"),
                ("FENCEPOST_POSTGRES_MAX_FRAME_BYTES", "65536"),
                ("FENCEPOST_POSTGRES_MAX_CONNECTIONS", "40"),
                ("FENCEPOST_POSTGRES_STARTUP_TIMEOUT", "3s"),
            ]),
        )
        .unwrap();
        let p = &c.postgres[0];
        assert_eq!(p.verify_key.as_deref(), Some(Path::new("elector.pub")));
        assert!(p.allow_plain_tokens && p.strict);
        assert_eq!(p.write_functions, vec!["bump".to_string()]);
        assert_eq!(p.max_frame_bytes, 65536);
        assert_eq!(p.max_connections, 40);
        assert_eq!(p.startup_timeout, Duration::from_secs(3));
        // Defaults: the classifier's own list, the codec's own bound.
        let d = Config::from_parts("[[postgres]]\nupstream = \"db\"\n", "t", env(&[])).unwrap();
        assert!(d.postgres[0].write_functions.iter().any(|f| f == "nextval"));
        assert!(!d.postgres[0].strict);
        assert_eq!(d.postgres[0].max_connections, 2_000);
        assert_eq!(d.postgres[0].startup_timeout, Duration::from_secs(30));
        for bad in ["max_connections = 0", "startup_timeout = \"0s\""] {
            let e = Config::from_parts(
                &format!("[[postgres]]\nupstream = \"db\"\n{bad}\n"),
                "t",
                env(&[]),
            )
            .unwrap_err();
            assert!(
                e.to_string().contains(bad.split(' ').next().unwrap()),
                "{e}"
            );
        }
        let e = Config::from_parts(
            "[[postgres]]\nupstream = \"db\"\ntls_cert = \"c.pem\"\n",
            "t",
            env(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tls_key"), "{e}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = Config::from_parts("nope = 1", "t", env(&[])).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = Config::from_parts(
            "[[http]]\nlisten=\"127.0.0.1:1\"\nupstream=\"ftp://x\"",
            "t",
            env(&[]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = Config::from_parts("", "t", env(&[("FENCEPOST_ELECTOR_LISTEN", "not an addr")]))
            .unwrap_err();
        assert!(
            e.to_string().contains("elector") || e.to_string().contains("address"),
            "{e}"
        );
    }
}
