//! `[[postgres]]`: one Postgres fencing proxy listener and its server.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgProxyConfig {
    #[serde(default = "default_pg_listen")]
    pub listen: SocketAddr,
    /// The server every session is relayed to.
    pub upstream: PgUpstream,
    #[serde(default)]
    pub enforce: Enforce,
    /// Guard mode: longest the first transaction with a newer token waits
    /// in the database for the older-token transactions still in flight
    /// (through any proxy) before failing with `ZF005`. Unset: `[fencing]
    /// drain_timeout` (see [`PgProxyConfig::guard_wait_ms`]).
    #[serde(default, with = "humantime_serde::option")]
    pub guard_wait: Option<Duration>,
    /// Guard mode: call `fencepost.advance_fast` of the `fencepost_guard`
    /// extension (`deploy/fencepost_guard/`) instead of
    /// `fencepost.advance`: the same guarantees and errors, with the
    /// same-token check in C, about half its cost to the server. The
    /// extension must be created in the protected database (`fencepost
    /// migrate --guard` does it when the server has it); without it every
    /// guarded write fails (`42883`), none is admitted unguarded.
    #[serde(default)]
    pub guard_extension: bool,
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
    /// PEM certificate chain: when set (with `tls_key`), clients must
    /// ask for TLS (SSLRequest) before their startup packet; a plaintext
    /// startup is refused (`28000`). Reloaded on SIGHUP and on change.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when set, every client must present a
    /// certificate that chains to one of them (`sslcert`/`sslkey`).
    pub tls_client_ca: Option<PathBuf>,
    /// Session threads, each a current-thread runtime running the sessions
    /// the listener hands it; 0 runs the sessions on the process's shared
    /// multi-thread runtime. Unset: one per CPU (see
    /// [`PgProxyConfig::workers`]).
    #[serde(default, rename = "workers")]
    pub workers_set: Option<usize>,
    /// How the session threads run their sessions (see [`PgEngine`]).
    #[serde(default)]
    pub engine: PgEngine,
    /// TLS towards the upstream server, as libpq's `sslmode` names it.
    #[serde(default)]
    pub upstream_sslmode: SslMode,
    /// PEM CA certificates the server's certificate must chain to
    /// (`verify-ca`, `verify-full`).
    pub upstream_ca: Option<PathBuf>,
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

/// `guard_wait` goes to the guard as an SQL `integer` of milliseconds.
const GUARD_WAIT_MAX_MS: u128 = i32::MAX as u128;

impl PgProxyConfig {
    /// `guard_wait` in milliseconds, as the guard takes it: the configured
    /// value, else `drain` (the `[fencing] drain_timeout`), clamped to what
    /// the guard's `integer` holds and to at least 1 ms (0 would mean no
    /// bound to Postgres's `lock_timeout`).
    pub fn guard_wait_ms(&self, drain: Duration) -> u32 {
        let ms = self.guard_wait.unwrap_or(drain).as_millis();
        u32::try_from(ms.clamp(1, GUARD_WAIT_MAX_MS)).unwrap_or(i32::MAX.unsigned_abs())
    }

    /// Session threads: `workers` as set, else one per CPU, except on a
    /// replica of a fencing tier (`tiered`), where the default stays 0.
    /// The default by measurement (BENCHMARKS.md, "Postgres at one
    /// client"): on its own thread a session's wake-ups stay on that
    /// thread and a statement costs about 1,600 instructions less than on
    /// the shared multi-thread runtime, where they moved between its
    /// threads. Not on a tier yet: the tier's fault-injection campaigns
    /// (benches/results/checker_tier_campaign.md) ran on the shared
    /// runtime, and the HTTP relay's threads once admitted a stale write
    /// on a replica resuming from a pause (docs/config.md, `[[http]]
    /// workers`); the threads are the default there once a campaign has
    /// run on them.
    pub fn workers(&self, tiered: bool) -> usize {
        self.workers_set.unwrap_or_else(|| {
            if tiered {
                0
            } else {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }
        })
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
        // Below this no ordinary statement fits; the startup packet has
        // its own bound.
        if self.max_frame_bytes < 1024 {
            return Err(format!(
                "postgres[{i}].max_frame_bytes must be at least 1024, not {}",
                self.max_frame_bytes
            ));
        }
        if self.max_connections == 0 {
            return Err(format!("postgres[{i}].max_connections must be at least 1"));
        }
        if self.startup_timeout.is_zero() {
            return Err(format!("postgres[{i}].startup_timeout must be above zero"));
        }
        if let Some(w) = self.guard_wait {
            if w.is_zero() || w.as_millis() > GUARD_WAIT_MAX_MS {
                return Err(format!(
                    "postgres[{i}].guard_wait must be above zero and at most {GUARD_WAIT_MAX_MS} ms, not {w:?}"
                ));
            }
        }
        let mode = self.upstream_sslmode;
        match (mode, &self.upstream_ca) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "postgres[{i}].upstream_sslmode = \"{mode}\" needs upstream_ca, a PEM file of the CA certificates the server's certificate must chain to"
                ))
            }
            // libpq would quietly verify with a CA file under `require`;
            // here the mode says what is checked, so a CA file that would
            // not be read is an error rather than a false sense of safety.
            (SslMode::Disable | SslMode::Require, Some(_)) => {
                return Err(format!(
                    "postgres[{i}].upstream_ca is only read with upstream_sslmode = \"verify-ca\" or \"verify-full\", not \"{mode}\""
                ))
            }
            _ => {}
        }
        super::tls::check(
            &format!("postgres[{i}]"),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
    }
}

/// Where the fence is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Enforce {
    /// In fencepost only.
    #[default]
    Proxy,
    /// Also in a guard inside the protected database, called in each
    /// admitted write's own transaction.
    Database,
}

impl TryFrom<String> for Enforce {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "proxy" => Ok(Enforce::Proxy),
            "database" => Ok(Enforce::Database),
            _ => Err(format!(
                "enforce must be \"proxy\" or \"database\", not {s:?}"
            )),
        }
    }
}

/// How the session threads (`workers`) run their sessions.
///
/// `epoll`, the default: each thread runs an epoll loop of its own in
/// which every session is a state machine, stepped when one of its
/// sockets is ready; the statements whose decision waits (a newer token's
/// drain, a store write), the audit and the startup exchange run on the
/// process's runtime, and the session goes on when they are done. A
/// statement costs a third fewer instructions than as a tokio task, an
/// idle connection 2.2 KiB against 7.7 (BENCHMARKS.md, "The epoll
/// engine"). Sessions that use TLS on either side, and a
/// listener of a fencing tier, run as tokio tasks whatever this says: the
/// engine speaks plain TCP only, and the tier's last look before each
/// write system call is the tasks' (`docs/replicas.md`).
///
/// `tokio`: every session a task on its thread's current-thread runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgEngine {
    #[default]
    Epoll,
    Tokio,
}

/// TLS towards the upstream server: libpq's `sslmode` values that mean
/// something for a proxy (`prefer` and `allow` would fall back to plain
/// text silently; a proxy's operator says which one it is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SslMode {
    /// Plain text.
    #[default]
    Disable,
    /// Encrypted; the server's certificate is not checked.
    Require,
    /// Encrypted; the certificate chains to `upstream_ca`.
    VerifyCa,
    /// Encrypted; the certificate chains to `upstream_ca` and names the
    /// upstream's host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for SslMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "disable" => Ok(SslMode::Disable),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            _ => Err(format!(
                "upstream_sslmode must be \"disable\", \"require\", \"verify-ca\" or \"verify-full\", not {s:?}"
            )),
        }
    }
}

/// The Postgres server behind a proxy, as `host:port` (the port defaults
/// to 5432). A `postgres://` URL is accepted for its host and port only:
/// credentials and database come from each client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgUpstream(String);

impl PgUpstream {
    pub fn parse(s: &str) -> Result<PgUpstream, String> {
        let s = s.trim();
        let hostport = match s.split_once("://") {
            Some((scheme, rest)) if scheme == "postgres" || scheme == "postgresql" => {
                let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                rest.split(['/', '?']).next().unwrap_or(rest)
            }
            Some(_) => {
                return Err(format!(
                    "upstream {s:?} is neither host:port nor a postgres:// URL"
                ))
            }
            None => s,
        };
        if hostport.is_empty() {
            return Err(format!("upstream {s:?}: empty address"));
        }
        if hostport.parse::<SocketAddr>().is_ok() {
            return Ok(PgUpstream(hostport.to_owned()));
        }
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(PgUpstream(hostport.to_owned()))
            }
            _ if !hostport.contains(':') => Ok(PgUpstream(format!("{hostport}:5432"))),
            _ if hostport.starts_with('[') && hostport.ends_with(']') => {
                Ok(PgUpstream(format!("{hostport}:5432")))
            }
            _ => Err(format!("upstream {hostport:?} is not host:port")),
        }
    }

    /// `host:port`, as `TcpStream::connect` takes it.
    pub fn addr(&self) -> &str {
        &self.0
    }

    /// The host alone (an IPv6 address in brackets), the name TLS checks.
    pub fn host(&self) -> &str {
        self.0.rsplit_once(':').map_or(&self.0, |(h, _)| h)
    }
}

impl fmt::Display for PgUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PgUpstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PgUpstream::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Result<String, String> {
        PgUpstream::parse(s).map(|u| u.addr().to_owned())
    }

    #[test]
    fn upstream_forms() {
        assert_eq!(addr("127.0.0.1:5432").unwrap(), "127.0.0.1:5432");
        assert_eq!(addr("db").unwrap(), "db:5432");
        assert_eq!(addr("db:6000").unwrap(), "db:6000");
        assert_eq!(addr("[::1]:5433").unwrap(), "[::1]:5433");
        assert_eq!(addr("[::1]").unwrap(), "[::1]:5432");
        assert_eq!(
            addr("postgres://u:p@db:5444/x?sslmode=disable").unwrap(),
            "db:5444"
        );
        assert!(addr("http://db").is_err());
        assert!(addr("db:notaport").is_err());
        assert!(addr("").is_err());
    }

    #[test]
    fn upstream_hosts() {
        let host = |s: &str| PgUpstream::parse(s).unwrap().host().to_owned();
        assert_eq!(host("db.example:5433"), "db.example");
        assert_eq!(host("db"), "db");
        assert_eq!(host("[::1]:5433"), "[::1]");
        assert_eq!(host("127.0.0.1:5432"), "127.0.0.1");
    }

    #[test]
    fn sslmodes() {
        for m in ["disable", "require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::try_from(m.to_owned()).unwrap().as_str(), m);
        }
        let e = SslMode::try_from("prefer".to_owned()).unwrap_err();
        assert!(e.contains("\"prefer\""), "{e}");
    }

    #[test]
    fn enforce_modes() {
        assert_eq!(Enforce::try_from("proxy".to_owned()), Ok(Enforce::Proxy));
        assert_eq!(
            Enforce::try_from("database".to_owned()),
            Ok(Enforce::Database)
        );
        let e = Enforce::try_from("dtabase".to_owned()).unwrap_err();
        assert!(e.contains("enforce") && e.contains("\"dtabase\""), "{e}");
    }
}
