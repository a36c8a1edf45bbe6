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
mod engine;
mod fence;
mod gate;
mod readbuf;
mod refusal;
mod server;
mod session;
mod startup;
mod state;
mod vars;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fencing::Protocol;
use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use wire::pg::Classifier;

use self::engine::{Engines, Load};

use crate::config::{ConfigError, Enforce, PgEngine, PgProxyConfig, SslMode};
use crate::error::Error;
use crate::fencer::{Fencer, TokenChecker};
use crate::listener::{self, ConnLimit, ConnPermit};
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
    /// The function the guard calls: `fencepost.advance`, or the
    /// `fencepost_guard` extension's `fencepost.advance_fast` with
    /// `guard_extension = true`.
    guard_fn: wire::pg::guard::GuardFn,
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
    /// `workers`: session threads, each a current-thread runtime running
    /// the connections this listener's accept loop hands it; 0 runs the
    /// sessions on the process's runtime.
    workers: usize,
    /// The session threads are epoll engines (`engine.rs`), not
    /// current-thread runtimes: `engine = "epoll"`, and nothing the
    /// engine does not speak (TLS on either side, a tier's last look).
    epoll: bool,
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
        let workers = cfg.workers(fencer.tiered());
        let epoll = cfg.engine == PgEngine::Epoll
            && tls.is_none()
            && upstream_tls.is_none()
            && !fencer.tiered();
        Ok(Arc::new(PgProxy {
            epoll,
            upstream_tls,
            upstream_sslmode: cfg.upstream_sslmode,
            guard_wait_ms: cfg.guard_wait_ms(fencer.drain_timeout()),
            guard_fn: if cfg.guard_extension {
                wire::pg::guard::GuardFn::Extension
            } else {
                wire::pg::guard::GuardFn::Sql
            },
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
            workers,
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
        if self.workers == 0 {
            self.serve_on(listener, &shutdown, drain).await;
            return Ok(());
        }
        if self.epoll {
            return self.serve_engines(listener, shutdown, drain).await;
        }
        self.serve_workers(listener, shutdown, drain).await
    }

    /// Sessions on `listener`, on the runtime this runs on.
    async fn serve_on(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: &Shutdown,
        drain: Duration,
    ) {
        let name = Protocol::Postgres.as_str();
        let open = listener::serve(name, listener, shutdown, &self.limit, |stream, peer| {
            session::run(Arc::clone(self), stream, peer, shutdown.clone())
        })
        .await;
        // Each session has seen the shutdown too: idle ones close at once.
        open.drain(Some(drain)).await;
    }

    /// `workers` threads, each a current-thread runtime running the
    /// sessions handed to it: a session lives on one thread, so the
    /// wake-up for a client's statement and the one for the server's
    /// answer both land on the thread that polls the session, with no work
    /// stealing and no hand-off between threads. On the shared
    /// multi-thread runtime a session's wake-ups moved between its two
    /// threads: at one client (`pgbench -S -M simple`) its second thread
    /// slept and woke 0.17-0.25 times per statement besides the first
    /// one's 1.1-1.5, where a worker thread does 1.96 (two per statement,
    /// PgBouncer's count, on one thread); see BENCHMARKS.md.
    ///
    /// This task accepts (with the listener's limit, as `serve_on` does)
    /// and hands each connection to the worker with the fewest sessions,
    /// so sessions spread evenly over the threads whatever order clients
    /// come in; a worker holds its sessions, drains them at shutdown and
    /// ends when this task stops handing it any. The fencer, its store
    /// and the connection limit are shared with the process's runtime as
    /// before.
    async fn serve_workers(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        drain: Duration,
    ) -> std::io::Result<()> {
        let mut workers = Vec::with_capacity(self.workers);
        let mut done = Vec::with_capacity(self.workers);
        for i in 0..self.workers {
            let (tx, rx) = mpsc::unbounded_channel();
            let (this, shutdown) = (Arc::clone(&self), shutdown.clone());
            let (ended, end) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("pg-proxy-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(this.worker(rx, shutdown, drain)),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a Postgres proxy worker")
                        }
                    }
                    drop(ended);
                })?;
            workers.push(Worker {
                tx,
                load: Arc::new(AtomicUsize::new(0)),
            });
            done.push(end);
        }
        while let Some((stream, peer, permit)) =
            listener::next_connection(&listener, &shutdown, &self.limit).await
        {
            // Off this runtime's reactor, onto the worker's.
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot hand a connection to a worker");
                    continue;
                }
            };
            let mut handoff = (stream, peer, permit);
            // A worker that could not start (or has ended) gives the
            // connection back and is passed over from then on.
            while let Some(at) =
                (0..workers.len()).min_by_key(|&i| workers[i].load.load(Ordering::Relaxed))
            {
                let w = &workers[at];
                match w
                    .tx
                    .send((handoff.0, handoff.1, handoff.2, Load::on(&w.load)))
                {
                    Ok(()) => break,
                    Err(back) => {
                        let (stream, peer, permit, _) = back.0;
                        handoff = (stream, peer, permit);
                        tracing::error!(
                            "a Postgres proxy worker has ended; its share goes to the others"
                        );
                        workers.swap_remove(at);
                    }
                }
            }
            if workers.is_empty() {
                tracing::error!("no Postgres proxy worker is running; the listener stops");
                break;
            }
        }
        // New clients are refused by the kernel from here; each worker
        // drains what it has once its channel is closed.
        drop(listener);
        drop(workers);
        for end in done {
            let _ = end.await;
        }
        Ok(())
    }

    /// `workers` epoll engines (`engine.rs`). This task accepts (with the
    /// listener's limit) and runs each connection's startup exchange on
    /// the process's runtime, then hands the open session to the engine
    /// with the fewest sessions. At shutdown the engines close their idle
    /// sessions at once and give busy ones up to `drain`; a startup still
    /// under way gets the same bound, and a session it opens is closed
    /// as it would have been.
    async fn serve_engines(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        drain: Duration,
    ) -> std::io::Result<()> {
        let engines = Engines::start(self.workers, &tokio::runtime::Handle::current(), drain)?;
        let mut startups = JoinSet::new();
        while let Some((stream, peer, permit)) =
            listener::next_connection(&listener, &shutdown, &self.limit).await
        {
            while startups.try_join_next().is_some() {}
            let Some((inbox, load)) = engines.pick() else {
                break;
            };
            let (this, shutdown) = (Arc::clone(&self), shutdown.clone());
            startups.spawn(async move {
                let Some(open) = Box::pin(session::open(&this, stream, peer)).await else {
                    return;
                };
                match engine::opened(Arc::clone(&this), open, peer, permit, load) {
                    Ok(opened) => {
                        if inbox.send(engine::Msg::Open(opened)).is_err() {
                            tracing::debug!(%peer, "session opened after its engine ended; closed");
                        }
                    }
                    // Not plain TCP on both sides: a task, as on a
                    // worker thread.
                    Err(Some(task)) => {
                        let (open, permit) = *task;
                        session::run_open(this, open, peer, shutdown).await;
                        drop(permit);
                    }
                    Err(None) => {}
                }
            });
        }
        drop(listener);
        engines.tell(|| engine::Msg::Shutdown);
        listener::Connections::new(Protocol::Postgres.as_str(), startups)
            .drain(Some(drain))
            .await;
        engines.tell(|| engine::Msg::NoMore);
        engines.join().await;
        Ok(())
    }

    /// One worker thread's sessions, until the acceptor stops handing it
    /// connections; then they are drained as `serve_on` drains its own.
    async fn worker(
        self: Arc<Self>,
        mut handed: mpsc::UnboundedReceiver<Handoff>,
        shutdown: Shutdown,
        drain: Duration,
    ) {
        let mut open = JoinSet::new();
        loop {
            tokio::select! {
                next = handed.recv() => {
                    let Some((stream, peer, permit, held)) = next else {
                        break;
                    };
                    match TcpStream::from_std(stream) {
                        // `map`, not an async block: see `listener::serve`.
                        Ok(stream) => {
                            open.spawn(
                                session::run(Arc::clone(&self), stream, peer, shutdown.clone())
                                    .map(move |()| drop((permit, held))),
                            );
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "a Postgres proxy worker cannot take a connection"),
                    }
                }
                Some(_) = open.join_next(), if !open.is_empty() => {}
            }
        }
        listener::Connections::new(Protocol::Postgres.as_str(), open)
            .drain(Some(drain))
            .await;
    }
}

/// A connection on its way to a worker thread: the socket (off the
/// acceptor's reactor), the peer, its share of `max_connections` and of
/// the worker's load.
type Handoff = (std::net::TcpStream, SocketAddr, ConnPermit, Load);

/// A worker's way in: its channel and how many sessions it holds.
struct Worker {
    tx: mpsc::UnboundedSender<Handoff>,
    load: Arc<AtomicUsize>,
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
