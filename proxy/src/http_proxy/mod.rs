//! The HTTP fencing proxy: a reverse proxy that asks the [`Fencer`] about
//! every write before the upstream may see it.
//!
//! The proxy itself decides nothing about fencing. It finds the resource and
//! token a request carries, hands them to [`Fencer::decide`] (which also
//! audits and counts refusals), turns a refusal into the contract's problem
//! response, and otherwise forwards the request while holding the
//! decision's in-flight guard until the upstream has answered in full,
//! which is what lets a newer token's drain wait for older writes.
//!
//! Robustness choices, each against a client or upstream that misbehaves:
//! header reads are bounded in time and size (slowloris, header floods),
//! concurrency is bounded (a flood gets quick 503s instead of exhausting
//! memory), the upstream's think time is bounded (504), and bodies are
//! streamed frame by frame in both directions.

mod body;
mod forward;
mod pool;
mod problem;
mod relay;
mod request_body;
mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fencing::{Protocol, ResourceName};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use wire::http::{fencing_headers, WriteMethods};

use self::body::{Hold, ProxyBody};
use self::forward::{Forwarder, Leased};
use self::pool::Pool;
use self::problem::Problem;
use crate::config::{ConfigError, DataPath, HttpProxyConfig, Upstream};
use crate::edge::http1::{conn_limit, MIN_BUF};
use crate::error::Error;
use crate::fencer::{Decision, Fencer, TokenChecker, WriteInfo};
use crate::listener::ConnLimit;
use crate::metrics::WriteCounters;
use crate::shutdown::Shutdown;
use crate::tls::{self, Alpn, ServerTls};
use crate::upstream_tls::{Roots, UpstreamTls, Verify};

pub use self::watch::watch_elector;

/// Idle upstream connections kept; enough for a busy leader's keep-alive
/// reuse without hoarding sockets.
const POOL_MAX_IDLE: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One `[[http]]` listener.
pub struct HttpProxy {
    fencer: Arc<Fencer>,
    checker: TokenChecker,
    counters: WriteCounters,
    writes: WriteMethods,
    /// `(prefix, resource)`, longest prefix first, so the first match is
    /// the most specific.
    routes: Vec<(String, ResourceName)>,
    limit: Arc<Semaphore>,
    /// `max_connections`: one permit per client connection.
    connections: ConnLimit,
    forwarder: Forwarder,
    http1: http1::Builder,
    /// The byte relay's settings and upstream connections.
    relay: RelaySettings,
    upstream: Upstream,
    upstream_timeout: Duration,
    /// The TLS client for an `https://` upstream, shared by every relay
    /// worker's connections.
    upstream_tls: Option<Arc<UpstreamTls>>,
    /// `data_path = "relay"` (the default); else the hyper-based path.
    relay_path: bool,
    /// Relay worker threads (current-thread runtimes); 0 (the default
    /// until the layouts are measured side by side on a quiet machine):
    /// the relay runs on the process's multi-thread runtime.
    workers: usize,
    /// `tls_cert`: clients connect over TLS (and nothing else).
    tls: Option<Arc<ServerTls>>,
}

/// The client-side bounds of the byte relay, from the listener's config.
struct RelaySettings {
    /// The whole head (and, between requests, the idle wait) within this.
    head_timeout: Duration,
    /// Bytes of a request head, at most.
    max_head: usize,
    /// Longest a client may pause mid-upload.
    body_stall: Duration,
}

impl HttpProxy {
    pub fn new(
        cfg: &HttpProxyConfig,
        fencer: Arc<Fencer>,
        checker: TokenChecker,
    ) -> Result<Arc<Self>, Error> {
        let upstream = cfg.upstream.clone();
        let mut routes: Vec<(String, ResourceName)> = cfg
            .routes
            .iter()
            .map(|r| (r.prefix.clone(), r.resource.clone()))
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));

        let upstream_tls = upstream_tls(cfg)?;
        let pool = Pool::new(
            upstream.addr(),
            cfg.upstream_timeout,
            POOL_MAX_IDLE,
            POOL_IDLE_TIMEOUT,
            upstream_tls.clone(),
        );

        let mut http1 = http1::Builder::new();
        // hyper also runs the header-read timer while a keep-alive
        // connection sits idle between requests, so it doubles as the idle
        // timeout: the shorter of the two settings wins.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout.min(cfg.idle_timeout))
            .max_header_size(cfg.max_header_bytes.max(1024))
            // hyper asserts a read buffer of at least MIN_BUF, so a tiny
            // `max_header_bytes` is raised to it rather than crashing at
            // start-up; otherwise the buffer follows `max_header_bytes`, so
            // an idle connection's memory stays bounded by what a header
            // may take.
            .max_buf_size(cfg.max_header_bytes.max(MIN_BUF))
            .keep_alive(true);

        // The handshake shares the head's deadline: a client that is slow
        // to say hello is as slow as one slow to send its head.
        let tls = tls::for_listener(
            Protocol::Http.as_str(),
            cfg.listen,
            cfg.tls(),
            Alpn::Http1,
            cfg.header_read_timeout.min(cfg.idle_timeout),
        )?;
        let counters = WriteCounters::new(Protocol::Http);
        let forwarder = Forwarder {
            pool,
            upstream: upstream.clone(),
            timeout: cfg.upstream_timeout,
            body_stall: cfg.idle_timeout,
            upstream_errors: counters.upstream_errors.clone(),
            fencer: Arc::clone(&fencer),
            counters: counters.clone(),
        };
        Ok(Arc::new(HttpProxy {
            tls,
            fencer,
            checker,
            counters: counters.clone(),
            writes: cfg.write_methods.clone(),
            routes,
            // Semaphore::new panics past MAX_PERMITS.
            limit: Arc::new(Semaphore::new(
                cfg.max_concurrent_requests.clamp(1, Semaphore::MAX_PERMITS),
            )),
            // A status line beats a silent close: clients and load
            // balancers then know the proxy is alive but full.
            connections: conn_limit(
                Protocol::Http.as_str(),
                cfg.listen,
                cfg.max_connections,
                "the proxy is at its max_connections bound; retry shortly",
            ),
            relay: RelaySettings {
                head_timeout: cfg.header_read_timeout.min(cfg.idle_timeout),
                max_head: cfg.max_header_bytes.max(1024),
                body_stall: cfg.idle_timeout,
            },
            upstream: upstream.clone(),
            upstream_timeout: cfg.upstream_timeout,
            upstream_tls,
            relay_path: cfg.data_path == DataPath::Relay,
            workers: cfg.workers,
            forwarder,
            http1,
        }))
    }

    /// This listener's TLS, when it has `tls_cert`.
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// Accepts until `shutdown` fires, then waits (at most `drain`) for the
    /// requests already in flight to be answered.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        drain: Duration,
    ) -> std::io::Result<()> {
        if self.relay_path {
            if self.workers == 0 {
                let upstreams = Arc::new(self.upstreams());
                self.relay_on(listener, upstreams, &shutdown, drain).await;
                return Ok(());
            }
            return self.relay_workers(listener, shutdown, drain).await;
        }
        let this = Arc::clone(&self);
        let open = crate::edge::http1::serve(
            Protocol::Http.as_str(),
            listener,
            &shutdown,
            &self.connections,
            &self.http1,
            self.tls.as_ref(),
            move |peer| {
                let this = Arc::clone(&this);
                service_fn(move |req| {
                    let this = Arc::clone(&this);
                    async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
                })
            },
        )
        .await;
        open.drain(Some(drain)).await;
        Ok(())
    }

    /// A new (empty) set of upstream connections for one relay worker.
    fn upstreams(&self) -> relay::Upstreams {
        relay::Upstreams::new(
            self.upstream.addr(),
            self.upstream_timeout,
            POOL_MAX_IDLE,
            POOL_IDLE_TIMEOUT,
            self.upstream_tls.clone(),
        )
    }

    /// The byte relay on `listener`, on the runtime this runs on.
    async fn relay_on(
        self: &Arc<Self>,
        listener: TcpListener,
        upstreams: Arc<relay::Upstreams>,
        shutdown: &Shutdown,
        drain: Duration,
    ) {
        let name = Protocol::Http.as_str();
        let open = match &self.tls {
            // Plain TCP: the relay on the accepted socket itself.
            None => {
                crate::listener::serve(
                    name,
                    listener,
                    shutdown,
                    &self.connections,
                    |stream, peer| {
                        relay::serve_connection(
                            Arc::clone(self),
                            Arc::clone(&upstreams),
                            stream,
                            peer,
                            shutdown.clone(),
                        )
                    },
                )
                .await
            }
            // TLS: the handshake first, in this worker's task, then the
            // relay over the (boxed) TLS stream; the worker keeps its own
            // listener and its upstream sockets, as over plain TCP.
            Some(tls) => {
                crate::listener::serve(
                    name,
                    listener,
                    shutdown,
                    &self.connections,
                    |stream, peer| {
                        let (this, upstreams, tls, shutdown) = (
                            Arc::clone(self),
                            Arc::clone(&upstreams),
                            Arc::clone(tls),
                            shutdown.clone(),
                        );
                        Box::pin(async move {
                            if let Some((stream, _)) = tls.accept_http(stream, peer).await {
                                relay::serve_connection(this, upstreams, stream, peer, shutdown)
                                    .await;
                            }
                        })
                    },
                )
                .await
            }
        };
        open.drain(Some(drain)).await;
    }

    /// `workers` threads, each a current-thread runtime accepting on its
    /// own copy of the listening socket (the kernel hands each new
    /// connection to one of them) with its own upstream connections: a
    /// connection lives on one thread, with no work stealing, no
    /// cross-thread wake-ups and an uncontended pool. Measured against the
    /// multi-thread runtime in BENCHMARKS.md ("Runtime layout").
    async fn relay_workers(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        drain: Duration,
    ) -> std::io::Result<()> {
        let listener = listener.into_std()?;
        let mut done = Vec::with_capacity(self.workers);
        for i in 0..self.workers {
            let own = listener.try_clone()?;
            own.set_nonblocking(true)?;
            let this = Arc::clone(&self);
            let shutdown = shutdown.clone();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("http-relay-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match rt {
                        Ok(rt) => rt.block_on(async move {
                            match TcpListener::from_std(own) {
                                Ok(l) => {
                                    let upstreams = Arc::new(this.upstreams());
                                    this.relay_on(l, upstreams, &shutdown, drain).await;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "HTTP relay worker cannot listen")
                                }
                            }
                        }),
                        Err(e) => tracing::error!(error = %e, "cannot start an HTTP relay worker"),
                    }
                    drop(tx);
                })?;
            done.push(rx);
        }
        drop(listener);
        for rx in done {
            let _ = rx.await;
        }
        Ok(())
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let resp = self.route(req, peer).await;
        self.counters.latency.record(start.elapsed());
        resp
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                problem::OVERLOADED,
                "Too many requests in flight",
                "the proxy is at its max_concurrent_requests bound; retry shortly",
            )
            .retry_after(1)
            .response();
        };
        if let Err(p) = check_request(&req) {
            return p.response();
        }
        // A body on a read would reach the upstream unfenced: a request
        // with a body is fenced whatever its method.
        let has_body = !req.body().is_end_stream();
        if !self.writes.is_write(req.method()) && !has_body {
            let hold = Hold {
                guard: None,
                permit: Some(permit),
            };
            return self.forwarder.run(req, peer, hold, None).await;
        }

        let input = fencing_headers(req.headers(), req.uri().path(), &self.routes);
        let (method, path) = (req.method(), req.uri().path());
        let detail = || format!("{method} {path}");
        let info = WriteInfo {
            protocol: Protocol::Http,
            client: peer,
            detail: &detail,
        };
        let decision = self
            .fencer
            .decide(&self.checker, &self.counters, &input, &info)
            .await;
        match decision {
            Decision::Admit(admitted) => {
                // A client hanging up cannot release the guard while the
                // upstream is still working on the write: see `Call`.
                let hold = Hold {
                    guard: Some(admitted.guard),
                    permit: Some(permit),
                };
                let leased = Leased {
                    at: admitted.leased_at,
                    token: admitted.token,
                    routes: &self.routes,
                };
                self.forwarder.run(req, peer, hold, Some(leased)).await
            }
            Decision::Refuse(refusal) => {
                let mut p = Problem::for_headers(&refusal, &input);
                if has_body {
                    // The body is left unread, so the connection cannot
                    // carry another request; say so rather than close it
                    // under a client that would reuse it.
                    p = p.header(header::CONNECTION, HeaderValue::from_static("close"));
                }
                p.response()
            }
        }
    }
}

/// The TLS client of an `https://` upstream: its certificate checked
/// against `upstream_ca`, or the system's store, and the URL's host;
/// HTTP/1.1 offered by ALPN (both data paths speak only that). `None` for
/// `http://`.
fn upstream_tls(cfg: &HttpProxyConfig) -> Result<Option<Arc<UpstreamTls>>, Error> {
    if !cfg.upstream.is_tls() {
        return Ok(None);
    }
    let roots = cfg
        .upstream_ca
        .as_deref()
        .map_or(Roots::System, Roots::File);
    let host = cfg.upstream.authority().host();
    UpstreamTls::new(host, Verify::Full, roots, &[&b"http/1.1"[..]])
        .map(|t| Some(Arc::new(t)))
        .map_err(|m| {
            Error::Config(ConfigError::Invalid(format!(
                "http upstream {}: {m}",
                cfg.upstream
            )))
        })
}

/// What RFC 9112 makes an error and hyper lets through, refused before
/// anything is decided or forwarded: CONNECT (a tunnel nobody fences), a
/// missing (HTTP/1.1) or repeated `Host`, and a `Connection` header naming
/// a fencing or framing header (the token would be stripped on the way
/// to the upstream).
fn check_request(req: &Request<Incoming>) -> Result<(), Problem> {
    let bad = |detail: &str| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            problem::BAD_REQUEST,
            "Bad request",
            detail,
        )
        .header(header::CONNECTION, HeaderValue::from_static("close"))
    };
    if req.method() == Method::CONNECT {
        return Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            problem::BAD_REQUEST,
            "Method not allowed",
            "CONNECT is not proxied",
        )
        .header(header::CONNECTION, HeaderValue::from_static("close")));
    }
    match req.headers().get_all(header::HOST).iter().count() {
        0 if req.version() != Version::HTTP_10 => {
            return Err(bad("an HTTP/1.1 request needs a Host header"))
        }
        0 | 1 => {}
        _ => return Err(bad("the request has more than one Host header")),
    }
    for value in req.headers().get_all(header::CONNECTION) {
        if let Some(name) = wire::http1::head::connection_names_protected(value.as_bytes()) {
            return Err(bad(&format!(
                "Connection names {name}, which the proxy must forward"
            )));
        }
    }
    Ok(())
}
