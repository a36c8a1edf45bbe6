//! `fencepost.toml`, with every setting overridable from the environment
//! (`FENCEPOST_*`, see [`env`]).
//!
//! One file per section: [`log`], [`admin`], [`elector`], [`audit`],
//! [`fencing`], [`cluster`], [`http`] (`[[http]]`) and [`postgres`] (`[[postgres]]`).
//! Values are parsed into their types as the file is read (listen
//! addresses, durations, upstream URLs, write methods, resource names,
//! modes), so a bad value is refused at start-up with its key, and the
//! components that read the config never parse a string again.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod admin;
mod audit;
mod cluster;
mod elector;
mod env;
mod fencing;
mod http;
mod log;
mod postgres;
mod tls;

pub use self::admin::{AdminClient, AdminConfig};
pub use self::audit::AuditConfig;
pub use self::cluster::ClusterConfig;
pub use self::elector::{ElectorClient, ElectorConfig};
pub use self::env::env_help;
pub use self::fencing::FencingConfig;
pub use self::http::{DataPath, HttpProxyConfig, Upstream};
pub use self::log::{LogConfig, LogFormat};
pub use self::postgres::{Enforce, PgEngine, PgProxyConfig, SslMode};
pub use self::tls::ListenerTls;

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
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub http: Vec<HttpProxyConfig>,
    #[serde(default)]
    pub postgres: Vec<PgProxyConfig>,
}

fn default_store() -> String {
    "sqlite://fencepost.db".into()
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
                env::apply_env(&mut value, &var, rest, &raw)?;
            }
        }
        let config: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: name.into(),
                    message: e.to_string(),
                })?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// What the types cannot say alone: bounds and settings that go
    /// together.
    fn validate(&self) -> Result<(), String> {
        for (i, h) in self.http.iter().enumerate() {
            h.validate(i)?;
        }
        for (i, p) in self.postgres.iter().enumerate() {
            p.validate(i)?;
        }
        if let Some(e) = &self.elector {
            e.validate()?;
            tls::check(
                "elector",
                e.tls_cert.as_deref(),
                e.tls_key.as_deref(),
                e.tls_client_ca.as_deref(),
            )?;
        }
        if let Some(a) = &self.admin {
            tls::check(
                "admin",
                a.tls_cert.as_deref(),
                a.tls_key.as_deref(),
                a.tls_client_ca.as_deref(),
            )?;
        }
        if let Some(a) = &self.admin {
            a.validate()?;
        }
        self.cluster.validate()?;
        self.fencing.validate()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../fencepost.example.toml");
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
        assert_eq!(c.postgres[0].guard_wait, Some(Duration::from_secs(30)));
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
                ("FENCEPOST_POSTGRES_GUARD_WAIT", "250ms"),
            ]),
        )
        .unwrap();
        let p = &c.postgres[0];
        assert_eq!(p.verify_key.as_deref(), Some(Path::new("elector.pub")));
        assert!(p.allow_plain_tokens && p.strict);
        assert_eq!(p.write_functions, vec!["bump".to_string()]);
        assert_eq!(p.upstream.addr(), "127.0.0.1:5432");
        assert_eq!(p.enforce, Enforce::Proxy);
        assert_eq!(p.max_frame_bytes, 65536);
        assert_eq!(p.max_connections, 40);
        assert_eq!(p.startup_timeout, Duration::from_secs(3));
        assert_eq!(p.guard_wait_ms(Duration::from_secs(9)), 250);
        // Defaults: the classifier's own list, the codec's own bound.
        let d = Config::from_parts("[[postgres]]\nupstream = \"db\"\n", "t", env(&[])).unwrap();
        assert!(d.postgres[0].write_functions.iter().any(|f| f == "nextval"));
        assert!(!d.postgres[0].strict);
        assert_eq!(d.postgres[0].max_connections, 2_000);
        assert_eq!(d.postgres[0].startup_timeout, Duration::from_secs(30));
        // guard_wait: the drain timeout unless set, at least 1 ms.
        assert_eq!(d.postgres[0].guard_wait_ms(Duration::from_secs(9)), 9_000);
        assert_eq!(d.postgres[0].guard_wait_ms(Duration::ZERO), 1);
        for bad in [
            "max_connections = 0",
            "startup_timeout = \"0s\"",
            "guard_wait = \"0s\"",
            "guard_wait = \"25days\"",
        ] {
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

    /// `upstream_ca` goes with the modes that read it, and only with
    /// them: a CA file that would be ignored, or a verify mode with
    /// nothing to verify against, stops `serve`.
    #[test]
    fn upstream_tls_keys_that_cannot_work_are_refused() {
        let pg = |keys: &str| {
            Config::from_parts(
                &format!("[[postgres]]\nupstream = \"db\"\n{keys}\n"),
                "t",
                env(&[]),
            )
        };
        for ok in [
            "upstream_sslmode = \"disable\"",
            "upstream_sslmode = \"require\"",
            "upstream_sslmode = \"verify-ca\"\nupstream_ca = \"ca.pem\"",
            "upstream_sslmode = \"verify-full\"\nupstream_ca = \"ca.pem\"",
        ] {
            pg(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("upstream_sslmode = \"verify-full\"", "needs upstream_ca"),
            ("upstream_sslmode = \"verify-ca\"", "needs upstream_ca"),
            (
                "upstream_sslmode = \"require\"\nupstream_ca = \"ca.pem\"",
                "only read with",
            ),
            ("upstream_ca = \"ca.pem\"", "only read with"),
            ("upstream_sslmode = \"prefer\"", "\"prefer\""),
        ] {
            let e = pg(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let http = |upstream: &str| {
            Config::from_parts(
                &format!("[[http]]\nlisten = \"127.0.0.1:1\"\nupstream = \"{upstream}\"\nupstream_ca = \"ca.pem\"\n"),
                "t",
                env(&[]),
            )
        };
        http("https://h:8443").unwrap();
        let e = http("http://h:8080").unwrap_err().to_string();
        assert!(e.contains("upstream_ca") && e.contains("https://"), "{e}");
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

    #[test]
    fn values_are_parsed_into_types_at_load() {
        let c = Config::from_parts(
            "[log]\nformat = \"json\"\n\
             [[http]]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:9/base/\"\n\
             write_methods = [\"put\", \"MKCOL\"]\n\
             routes = [{ prefix = \"/o/\", resource = \"orders\" }]\n\
             [[postgres]]\nupstream = \"postgres://u@db:5444/x\"\nenforce = \"database\"\n",
            "t",
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let h = &c.http[0];
        assert_eq!(h.upstream.addr(), "127.0.0.1:9");
        assert_eq!(h.upstream.as_str(), "http://127.0.0.1:9/base/");
        assert!(h
            .write_methods
            .is_write(&::http::Method::from_bytes(b"MKCOL").unwrap()));
        assert_eq!(h.routes[0].resource.as_str(), "orders");
        assert_eq!(h.watched_resources()[0].as_str(), "orders");
        assert_eq!(c.postgres[0].upstream.addr(), "db:5444");
        assert_eq!(c.postgres[0].enforce, Enforce::Database);
        let d = Config::from_parts("", "t", env(&[])).unwrap();
        assert_eq!(d.log.format, LogFormat::Text);
    }

    /// A bad value is refused at load with its key and the value itself.
    #[test]
    fn bad_typed_values_name_the_key_and_the_value() {
        let http = "[[http]]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://h\"\n";
        for (text, key, value) in [
            ("[log]\nformat = \"xml\"", "format", "\"xml\""),
            (
                "[[postgres]]\nupstream = \"db\"\nenforce = \"dtabase\"",
                "enforce",
                "\"dtabase\"",
            ),
            (
                "[[postgres]]\nupstream = \"http://db\"",
                "upstream",
                "\"http://db\"",
            ),
            (
                "[[http]]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://h/?q\"",
                "upstream",
                "\"http://h/?q\"",
            ),
            (
                &format!("{http}write_methods = [\"P T\"]"),
                "write_methods",
                "P T",
            ),
            (
                &format!("{http}routes = [{{ prefix = \"/a/\", resource = \"a b\" }}]"),
                "resource",
                "\"a b\"",
            ),
            (
                &format!("{http}watch_resources = [\"ok\", \"b@d\"]"),
                "watch_resources",
                "\"b@d\"",
            ),
            (
                "[elector]\nlisten = \"127.0.0.1:1\"\nmin_ttl = \"2s\"\nmax_ttl = \"1s\"",
                "min_ttl",
                "2s",
            ),
            (
                "[elector]\nlisten = \"127.0.0.1:1\"\ndefault_ttl = \"10ms\"",
                "default_ttl",
                "10ms",
            ),
            ("[fencing]\nstore_timeout = \"0s\"", "store_timeout", "zero"),
        ] {
            let e = Config::from_parts(text, "t", env(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(value), "{text}: {e}");
        }
        let e = Config::from_parts("", "t", env(&[("FENCEPOST_POSTGRES_ENFORCE", "both")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("enforce") && e.contains("\"both\""), "{e}");
    }

    #[test]
    fn identities_are_parsed_and_checked_at_load() {
        const H1: &str = "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0";
        const H2: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000002";
        let ok = format!(
            "[elector]\nlisten = \"127.0.0.1:1\"\n\
             [[elector.clients]]\nname = \"a\"\ntoken_hash = \"{H1}\"\n\
             [[elector.clients]]\nname = \"b\"\ntoken_hash = \"{H2}\"\n\
             [[elector.grants]]\nidentities = [\"a\", \"spiffe://prod/a\"]\nprefixes = [\"jobs/\"]\n\
             [admin]\nlisten = \"127.0.0.1:2\"\n\
             [[admin.clients]]\nname = \"grafana\"\ntoken_hash = \"{H1}\"\n\
             [[admin.clients]]\nname = \"ops.example\"\nrole = \"admin\"\n"
        );
        let c = Config::from_parts(&ok, "t", env(&[])).unwrap();
        let e = c.elector.unwrap();
        assert!(e.identities());
        assert_eq!(e.clients[1].name, "b");
        assert_eq!(e.grants[0].holders, vec!["{identity}".to_string()]);
        let a = c.admin.unwrap();
        assert_eq!(a.clients[0].role, crate::edge::access::Role::Read);
        assert!(a.clients[1].token_hash.is_none());
        // From the environment, as TOML.
        let c = Config::from_parts(
            "[elector]\nlisten = \"127.0.0.1:1\"\n",
            "t",
            env(&[(
                "FENCEPOST_ELECTOR_CLIENTS",
                &format!("[{{ name = \"a\", token_hash = \"{H1}\" }}]"),
            )]),
        )
        .unwrap();
        assert_eq!(c.elector.unwrap().clients[0].name, "a");

        let el = "[elector]\nlisten = \"127.0.0.1:1\"\n";
        for (bad, needle) in [
            (
                format!("{el}token = \"s\"\n[[elector.clients]]\nname = \"a\"\ntoken_hash = \"{H1}\"\n"),
                "elector.token cannot be set",
            ),
            (
                format!("{el}[[elector.clients]]\nname = \"a\"\ntoken_hash = \"s3cret\"\n"),
                "sha256:",
            ),
            (
                format!("{el}[[elector.clients]]\nname = \"a\"\ntoken_hash = \"{H1}\"\n[[elector.clients]]\nname = \"a\"\ntoken_hash = \"{H2}\"\n"),
                "elector.clients[1].name",
            ),
            (
                format!("{el}[[elector.clients]]\nname = \"a\"\ntoken_hash = \"{H1}\"\n[[elector.clients]]\nname = \"b\"\ntoken_hash = \"{H1}\"\n"),
                "elector.clients[1].token_hash",
            ),
            (
                format!("{el}[[elector.clients]]\nname = \"\"\ntoken_hash = \"{H1}\"\n"),
                "elector.clients[0].name",
            ),
            (
                format!("{el}[[elector.grants]]\nidentities = [\"a\"]\n"),
                "elector.grants[0] grants no resource",
            ),
            (
                format!("{el}[[elector.grants]]\nidentities = [\"a\"]\nresources = [\"x\"]\nholder = [\"a\"]\n"),
                "holder",
            ),
            (
                format!("[admin]\nlisten = \"127.0.0.1:2\"\ntoken = \"t\"\n[[admin.clients]]\nname = \"g\"\ntoken_hash = \"{H1}\"\n"),
                "admin.token cannot be set",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:2\"\n[[admin.clients]]\nname = \"g\"\nrole = \"root\"\n"
                    .to_owned(),
                "root",
            ),
        ] {
            let e = Config::from_parts(&bad, "t", env(&[])).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
