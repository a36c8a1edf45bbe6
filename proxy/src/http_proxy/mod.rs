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
mod problem;
mod watch;

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::http::WriteMethods;
use fencing::Protocol;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::body::ProxyBody;
use self::forward::{Forwarder, Upstream};
use self::problem::Problem;
use crate::config::{ConfigError, HttpProxyConfig};
use crate::error::Error;
use crate::fencer::{Decision, Fencer, TokenChecker, WriteInfo};
use crate::listener::next_connection;
use crate::metrics::WriteCounters;
use crate::shutdown::Shutdown;

pub use self::watch::watch_elector;

const TOKEN_HEADER: &str = "fencing-token";
const RESOURCE_HEADER: &str = "fencing-resource";

/// hyper refuses a read buffer smaller than this (it asserts), so a tiny
/// `max_header_bytes` is raised to it rather than crashing at start-up.
/// The read buffer follows `max_header_bytes` so that an idle connection's
/// memory stays bounded by what a header may take.
const MIN_BUF: usize = 8 * 1024;

/// Idle upstream connections kept per host; enough for a busy leader's
/// keep-alive reuse without hoarding sockets.
const POOL_IDLE_PER_HOST: usize = 256;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One `[[http]]` listener.
pub struct HttpProxy {
    fencer: Arc<Fencer>,
    checker: TokenChecker,
    counters: WriteCounters,
    writes: WriteMethods,
    /// `(prefix, resource)`, longest prefix first, so the first match is
    /// the most specific.
    routes: Vec<(String, String)>,
    limit: Arc<Semaphore>,
    forwarder: Forwarder,
    http1: http1::Builder,
}

impl HttpProxy {
    pub fn new(
        cfg: &HttpProxyConfig,
        fencer: Arc<Fencer>,
        checker: TokenChecker,
    ) -> Result<Arc<Self>, Error> {
        let invalid = |m: String| Error::Config(ConfigError::Invalid(m));
        let upstream = Upstream::parse(&cfg.upstream).map_err(invalid)?;
        let writes = WriteMethods::from_names(&cfg.write_methods)
            .map_err(|e| invalid(format!("http.write_methods: {e}")))?;
        let mut routes: Vec<(String, String)> = cfg
            .routes
            .iter()
            .map(|r| (r.prefix.clone(), r.resource.clone()))
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.upstream_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .build(connector);

        let mut http1 = http1::Builder::new();
        // hyper also runs the header-read timer while a keep-alive
        // connection sits idle between requests, so it doubles as the idle
        // timeout: the shorter of the two settings wins.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout.min(cfg.idle_timeout))
            .max_header_size(cfg.max_header_bytes.max(1024))
            .max_buf_size(cfg.max_header_bytes.max(MIN_BUF))
            .keep_alive(true);

        let counters = WriteCounters::new(Protocol::Http);
        Ok(Arc::new(HttpProxy {
            fencer,
            checker,
            counters: counters.clone(),
            writes,
            routes,
            // Semaphore::new panics past MAX_PERMITS.
            limit: Arc::new(Semaphore::new(
                cfg.max_concurrent_requests.clamp(1, Semaphore::MAX_PERMITS),
            )),
            forwarder: Forwarder {
                client,
                upstream,
                timeout: cfg.upstream_timeout,
                body_stall: cfg.idle_timeout,
                upstream_errors: counters.upstream_errors,
            },
            http1,
        }))
    }

    /// Accepts until `shutdown` fires, then waits (at most `drain`) for the
    /// requests already in flight to be answered.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
        drain: Duration,
    ) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        while let Some((stream, peer)) = next_connection(&listener, &shutdown).await {
            let this = Arc::clone(&self);
            let service = service_fn(move |req| {
                let this = Arc::clone(&this);
                async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
            });
            let conn = self.http1.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "client connection ended with an error");
                }
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(drain) => {
                tracing::warn!(?drain, "HTTP proxy: requests still in flight after the shutdown timeout");
            }
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
        self.counters.latency.record(start.elapsed().as_secs_f64());
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
            .into_response();
        };
        if !self.writes.is_write(req.method()) {
            return self.forwarder.run(req, peer, None, Some(permit)).await;
        }

        let token = header_text(req.headers(), TOKEN_HEADER);
        let resource = header_text(req.headers(), RESOURCE_HEADER).or_else(|| {
            let path = req.uri().path();
            self.routes
                .iter()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .map(|(_, r)| HeaderText::Ok(Cow::Borrowed(r.as_str())))
        });
        let (method, path) = (req.method(), req.uri().path());
        let detail = || format!("{method} {path}");
        let info = WriteInfo {
            protocol: Protocol::Http,
            client: peer,
            detail: &detail,
        };
        let decision = self
            .fencer
            .decide(
                &self.checker,
                &self.counters,
                resource.as_ref().map(HeaderText::as_str),
                token.as_ref().map(HeaderText::as_str),
                &info,
            )
            .await;
        match decision {
            Decision::Admit(admitted) => {
                // Its own task, so a client hanging up cannot cancel the
                // write halfway and release the guard while the upstream
                // is still working on it.
                let this = Arc::clone(self);
                let task = tokio::spawn(async move {
                    this.forwarder
                        .run(req, peer, Some(admitted.guard), Some(permit))
                        .await
                });
                match task.await {
                    Ok(resp) => resp,
                    Err(e) => {
                        tracing::error!(error = %e, "forwarding task failed");
                        Problem::new(
                            StatusCode::BAD_GATEWAY,
                            problem::UPSTREAM_ERROR,
                            "Upstream failed",
                            "the request could not be forwarded",
                        )
                        .into_response()
                    }
                }
            }
            Decision::Refuse(refusal) => {
                let resource_invalid = resource
                    .as_ref()
                    .is_some_and(|r| fencing::resource::validate(r.as_str()).is_err());
                let mut p = Problem::from_refusal(&refusal, token.is_some(), resource_invalid);
                if refusal.reason == fencing::Reason::Invalid {
                    if let Some(why) = [(&resource, "Fencing-Resource"), (&token, "Fencing-Token")]
                        .into_iter()
                        .find_map(|(h, name)| h.as_ref().and_then(|h| h.problem(name)))
                    {
                        p.detail = why;
                    }
                }
                p.into_response()
            }
        }
    }
}

/// A fencing header as the fencer should see it. A header sent twice or
/// with bytes outside visible ASCII is passed on in a form that can never
/// validate, so the fencer refuses and audits it like any invalid value
/// instead of the proxy guessing which copy was meant.
enum HeaderText<'a> {
    Ok(Cow<'a, str>),
    Repeated(String),
    NotText(String),
}

impl HeaderText<'_> {
    fn as_str(&self) -> &str {
        match self {
            HeaderText::Ok(s) => s,
            HeaderText::Repeated(s) | HeaderText::NotText(s) => s,
        }
    }

    fn problem(&self, name: &str) -> Option<String> {
        match self {
            HeaderText::Ok(_) => None,
            HeaderText::Repeated(_) => Some(format!("{name} appears more than once")),
            HeaderText::NotText(_) => Some(format!("{name} is not visible ASCII text")),
        }
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<HeaderText<'a>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        // ',' is in neither the token nor the resource alphabet.
        let all: Vec<Cow<'_, str>> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        return Some(HeaderText::Repeated(all.join(",")));
    }
    Some(match first.to_str() {
        Ok(s) => HeaderText::Ok(Cow::Borrowed(s)),
        // The replacement character keeps it invalid whatever the bytes.
        Err(_) => HeaderText::NotText(format!(
            "\u{fffd}{}",
            String::from_utf8_lossy(first.as_bytes())
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn repeated_and_binary_headers_never_validate() {
        let mut h = HeaderMap::new();
        h.append(TOKEN_HEADER, HeaderValue::from_static("5"));
        h.append(TOKEN_HEADER, HeaderValue::from_static("5"));
        let t = header_text(&h, TOKEN_HEADER).unwrap();
        assert!(fencing::TokenPolicy::plain()
            .check("r", t.as_str())
            .is_err());
        assert!(t.problem("Fencing-Token").is_some());

        let mut h = HeaderMap::new();
        h.insert(
            RESOURCE_HEADER,
            HeaderValue::from_bytes(b"ord\xffers").unwrap(),
        );
        let r = header_text(&h, RESOURCE_HEADER).unwrap();
        assert!(fencing::resource::validate(r.as_str()).is_err());

        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static(" 7 "));
        let t = header_text(&h, TOKEN_HEADER).unwrap();
        assert_eq!(fencing::TokenPolicy::plain().check("r", t.as_str()), Ok(7));
        assert!(header_text(&h, RESOURCE_HEADER).is_none());
    }
}
