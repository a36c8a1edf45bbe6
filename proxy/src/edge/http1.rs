//! The one HTTP/1.1 serve loop, for the HTTP fencing proxy and for the
//! admin and elector APIs.
//!
//! Every connection is hyper's HTTP/1.1 server connection, behind the
//! shared accept loop and its connection bound ([`crate::listener`]); a
//! client over the bound is answered with a 503 problem (after its request
//! head, which HTTP clients expect) and closed. On shutdown each open
//! connection finishes the request it is serving and then closes, as
//! hyper's graceful shutdown does; the caller decides how long to wait.
//!
//! Why not `axum::serve` for the APIs: it reads request heads with no
//! deadline and accepts without bound, so one slowloris client per file
//! descriptor could exhaust the process. Here the builder carries a
//! header-read timeout (which also closes keep-alive connections idle that
//! long) and the listener a connection bound, for the APIs as for the
//! proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::peer::PeerCertificate;
use super::problem::{self, Problem};
use crate::listener::{self, ConnLimit, Connections};
use crate::shutdown::Shutdown;
use crate::tls::ServerTls;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where an HTTP request head ends: HTTP clients read an answer only after
/// they have sent it.
pub const HEAD_END: &[u8] = b"\r\n\r\n";

/// A client of an API must send its request head (or its next one, on a
/// keep-alive connection) within this; on a TLS listener, also its
/// handshake.
pub const API_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections per API listener. Operators and proxies' watch
/// streams need a handful; a flood gets 503s.
const API_MAX_CONNECTIONS: usize = 1024;
/// Bound on an API request head.
const API_MAX_HEAD_BYTES: usize = 16 * 1024;
/// hyper refuses a read buffer smaller than this (it asserts).
pub const MIN_BUF: usize = 8 * 1024;

/// The connection bound of an HTTP listener: over it, a client is told
/// `503` (`urn:fencepost:overloaded`, `Retry-After: 1`) with `detail`.
pub fn conn_limit(
    protocol: &'static str,
    listen: SocketAddr,
    max: usize,
    detail: &str,
) -> ConnLimit {
    ConnLimit::new(protocol, listen, max, overloaded(detail), Some(HEAD_END))
}

/// The whole answer to an HTTP client over a listener's bound, written by
/// the accept loop itself (no hyper connection exists for it): the 503
/// problem with `Connection: close`.
fn overloaded(detail: &str) -> Bytes {
    let p = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        problem::OVERLOADED,
        "Too many connections",
        detail,
    )
    .retry_after(1);
    let mut out = Vec::new();
    problem_bytes(&p, true, false, &mut out);
    out.into()
}

/// Appends `p` as a whole HTTP/1.1 response to `out`, for a server that
/// writes its answers as bytes (the accept loop, the proxy's byte relay):
/// the status line, `content-type`, the problem's own headers,
/// `connection: close` when `close`, the length and (unless `head_only`,
/// the answer to a `HEAD`) the JSON body.
pub fn problem_bytes(p: &Problem, close: bool, head_only: bool, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let body = p.body();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\n",
        p.status.as_u16(),
        p.status.canonical_reason().unwrap_or("Error"),
        problem::PROBLEM_JSON
    );
    for (name, value) in p.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "content-length: {}\r\n\r\n", body.len());
    if !head_only {
        out.extend_from_slice(&body);
    }
}

/// The address of the client an API request came from (an extension set
/// by [`serve_api`]; absent when a router is served some other way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Serves `service(peer)` on every connection `listener` admits under
/// `limit`, with `http`'s settings, until `shutdown`. With `tls`, each
/// connection is a TLS handshake first ([`ServerTls::accept_http`]: a
/// plaintext request gets a 400) and every request carries the client
/// certificate's [`PeerCertificate`] in its extensions when the listener
/// verifies clients. Returns the connections still open, each already told
/// to finish its request and close; the caller drains them.
///
/// Two accept loops rather than one over an either-stream: the plaintext
/// one is exactly what it was before TLS existed (same stream type, same
/// future), and only TLS connections pay for a boxed stream.
#[allow(clippy::too_many_arguments)]
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: TcpListener,
    shutdown: &Shutdown,
    limit: &ConnLimit,
    http: &http1::Builder,
    tls: Option<&Arc<ServerTls>>,
    service: F,
) -> Connections
where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some(tls) = tls else {
        return listener::serve(name, listener, shutdown, limit, |stream, peer| {
            let conn = http.serve_connection(TokioIo::new(stream), service(peer));
            drive(name, conn, shutdown.clone(), peer)
        })
        .await;
    };
    let service = Arc::new(service);
    listener::serve(name, listener, shutdown, limit, |stream, peer| {
        let (tls, http, service, shutdown) = (
            Arc::clone(tls),
            http.clone(),
            Arc::clone(&service),
            shutdown.clone(),
        );
        // Boxed: the handshake's state is large and short-lived.
        Box::pin(async move {
            let Some((stream, who)) = tls.accept_http(stream, peer).await else {
                return;
            };
            let service = WithPeer {
                inner: (*service)(peer),
                peer: who,
            };
            let conn = http.serve_connection(TokioIo::new(stream), service);
            drive(name, conn, shutdown, peer).await;
        })
    })
    .await
}

/// One HTTP/1.1 connection until it ends; on shutdown, the request in
/// flight (if any) is finished and the connection closed.
async fn drive<I, S, B>(
    name: &'static str,
    conn: http1::Connection<I, S>,
    shutdown: Shutdown,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.wait() => {
            // Finish the request in flight, if any, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, %peer, listener = name, "HTTP connection ended with an error");
    }
}

/// A connection's service, with the client certificate's names put into
/// each request's extensions (for the authorization that reads them).
struct WithPeer<S> {
    inner: S,
    peer: Option<PeerCertificate>,
}

impl<S, B> Service<Request<B>> for WithPeer<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<B>) -> S::Future {
        if let Some(p) = &self.peer {
            req.extensions_mut().insert(p.clone());
        }
        self.inner.call(req)
    }
}

/// Serves an API's router on `listener` until `shutdown`, over TLS when
/// `tls` is given; then calls `closing` (to end long-lived streams, which
/// never end on their own) and waits for the requests in flight to finish.
pub async fn serve_api(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    app: Router,
    shutdown: Shutdown,
    closing: impl FnOnce(),
) -> std::io::Result<()> {
    let limit = conn_limit(
        name,
        listener.local_addr()?,
        API_MAX_CONNECTIONS,
        "this API is at its connection bound; retry shortly",
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(API_HEAD_TIMEOUT)
        .max_buf_size(API_MAX_HEAD_BYTES.max(MIN_BUF))
        .keep_alive(true);
    // The peer rides in each request's extensions ([`ClientAddr`]), for
    // the elector's audit records. Layering per connection copies the
    // router's route table; an API's few routes make that cheap.
    let open = serve(
        name,
        listener,
        &shutdown,
        &limit,
        &http,
        tls.as_ref(),
        move |peer| TowerToHyperService::new(app.clone().layer(axum::Extension(ClientAddr(peer)))),
    )
    .await;
    closing();
    open.drain(None).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overloaded_answer_is_a_whole_http_response() {
        let raw = overloaded("full");
        let text = std::str::from_utf8(&raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        for line in [
            "content-type: application/problem+json",
            "retry-after: 1",
            "connection: close",
            &format!("content-length: {}", body.len()),
        ] {
            assert!(head.lines().any(|l| l == line), "{line} in {head}");
        }
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["type"], problem::OVERLOADED);
        assert_eq!(body["status"], 503);
        assert_eq!(body["detail"], "full");
    }
}
