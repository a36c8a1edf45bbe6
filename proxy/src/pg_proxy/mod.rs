//! The Postgres fencing proxy: a wire-protocol relay that asks the
//! [`Fencer`] about every write before the server may run it.
//!
//! Like the HTTP proxy it decides nothing about fencing itself. It finds the
//! resource and token a statement carries (startup options, `SET`, a leading
//! comment), parsed once into typed inputs, hands them to
//! [`Fencer::decide`] (which audits and counts refusals, the database
//! guard's too), and either forwards the statement while holding the
//! decision's in-flight guard until the server has finished with it, or
//! makes the server fail in its place (see `session.rs` for why the
//! refusal goes through the server instead of being answered here, and
//! for the layout of this module).
//!
//! Everything that needs no decision (authentication, results, COPY data,
//! notices) passes through byte for byte, so any client and any
//! authentication method works as it does against Postgres itself.

mod client;
mod fence;
mod readbuf;
mod refusal;
mod server;
mod session;
mod startup;
mod state;
mod vars;

use std::sync::Arc;
use std::time::Duration;

use fencing::Protocol;
use tokio::net::TcpListener;
use wire::pg::Classifier;

use crate::config::{ConfigError, Enforce, PgProxyConfig, SslMode};
use crate::error::Error;
use crate::fencer::{Fencer, TokenChecker};
use crate::listener::{self, ConnLimit};
use crate::metrics::WriteCounters;
use crate::shutdown::Shutdown;
use crate::tls::{self, Alpn, ServerTls};
use crate::upstream_tls::{Roots, UpstreamTls, Verify};

/// Connecting to the upstream server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a vanished client's last statements may take at the server
/// before the proxy stops waiting for them (their guards are held meanwhile,
/// so a newer token's drain waits for them, as it must).
const ORPHAN_WAIT: Duration = Duration::from_secs(30);
/// Bound on the classification cache, in (estimated) resident bytes. Apps
/// using the extended protocol repeat a small set of texts; the simple
/// protocol with inlined literals makes every text new, and then this
/// bound is what keeps memory flat.
const CLASSIFY_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// One `[[postgres]]` listener.
pub struct PgProxy {
    fencer: Arc<Fencer>,
    checker: TokenChecker,
    counters: WriteCounters,
    classifier: Classifier,
    /// `host:port` of the one server every session is relayed to.
    upstream: String,
    /// Largest message accepted from either side.
    max_frame: usize,
    /// How long a client may take to send its startup packet
    /// (`startup_timeout`).
    startup_timeout: Duration,
    /// `max_connections`: one permit per client connection.
    limit: ConnLimit,
    /// Every statement in a read-write transaction block is a write.
    strict: bool,
    /// `enforce = "database"`: admitted writes also run the in-database
    /// guard in their own transaction.
    guard: bool,
    /// `guard_wait` in milliseconds, passed to every guard call: how long
    /// a newer token's first transaction waits in the database for the
    /// older ones (`ZF005` past it).
    guard_wait_ms: u32,
    /// `guard_wait_ms` as the prepared guard statement's text parameter.
    guard_wait_text: Box<str>,
    /// Set when `tls_cert`/`tls_key` are configured: SSLRequest is then
    /// answered `S` and the session upgraded; a plaintext startup is
    /// refused.
    tls: Option<Arc<ServerTls>>,
    /// `upstream_sslmode` other than `disable`: every server connection
    /// (cancel requests' too) starts with SSLRequest and goes on in TLS.
    upstream_tls: Option<UpstreamTls>,
    upstream_sslmode: SslMode,
}

impl PgProxy {
    pub fn new(
        cfg: &PgProxyConfig,
        fencer: Arc<Fencer>,
        checker: TokenChecker,
    ) -> Result<Arc<Self>, Error> {
        // The handshake happens inside the startup exchange, so it has
        // the startup's deadline too.
        let tls = tls::for_listener(
            Protocol::Postgres.as_str(),
            cfg.listen,
            cfg.tls(),
            Alpn::Postgres,
            cfg.startup_timeout,
        )?;
        let upstream_tls = upstream_tls(cfg).map_err(|m| {
            Error::Config(ConfigError::Invalid(format!("postgres upstream TLS: {m}")))
        })?;
        Ok(Arc::new(PgProxy {
            upstream_tls,
            upstream_sslmode: cfg.upstream_sslmode,
            guard_wait_ms: cfg.guard_wait_ms(fencer.drain_timeout()),
            guard_wait_text: cfg
                .guard_wait_ms(fencer.drain_timeout())
                .to_string()
                .into_boxed_str(),
            fencer,
            checker,
            counters: WriteCounters::new(Protocol::Postgres),
            classifier: Classifier::new(&cfg.write_functions, CLASSIFY_CACHE_BYTES),
            upstream: cfg.upstream.addr().to_owned(),
            max_frame: cfg.max_frame_bytes,
            startup_timeout: cfg.startup_timeout,
            limit: ConnLimit::new(
                Protocol::Postgres.as_str(),
                cfg.listen,
                cfg.max_connections,
                // What Postgres itself says past its max_connections.
                wire::pg::frame::error_response(
                    "FATAL",
                    "53300",
                    "sorry, too many clients already (fencepost: the proxy is at its max_connections)",
                ),
                // At once: libpq and the drivers read an ErrorResponse
                // wherever the startup exchange expects an answer.
                None,
            ),
            strict: cfg.strict,
            guard: cfg.enforce == Enforce::Database,
            tls,
        }))
    }

    /// This listener's TLS, when it has `tls_cert`.
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// Accepts until `shutdown` fires; then idle sessions are closed as
    /// Postgres closes them on a fast shutdown, busy ones get up to `drain`
    /// to finish what they started.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        drain: Duration,
    ) -> std::io::Result<()> {
        let name = Protocol::Postgres.as_str();
        let open = listener::serve(name, listener, &shutdown, &self.limit, |stream, peer| {
            session::run(Arc::clone(&self), stream, peer, shutdown.clone())
        })
        .await;
        // Each session has seen the shutdown too: idle ones close at once.
        open.drain(Some(drain)).await;
        Ok(())
    }
}

/// The TLS client towards the server for `upstream_sslmode`; `None` for
/// `disable`. ALPN offers `postgresql`, as libpq 17 does: Postgres 17
/// refuses any other protocol, and servers before it ignore the offer.
fn upstream_tls(cfg: &PgProxyConfig) -> Result<Option<UpstreamTls>, String> {
    let verify = match cfg.upstream_sslmode {
        SslMode::Disable => return Ok(None),
        SslMode::Require => Verify::Nothing,
        SslMode::VerifyCa => Verify::Chain,
        SslMode::VerifyFull => Verify::Full,
    };
    // Validation has made sure verify-* have a CA file; `require` reads
    // none.
    let roots = cfg
        .upstream_ca
        .as_deref()
        .map_or(Roots::System, Roots::File);
    UpstreamTls::new(cfg.upstream.host(), verify, roots, &[&b"postgresql"[..]]).map(Some)
}
