//! Rewriting a client's request for the upstream and the upstream's answer
//! for the client, and the call itself.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fencing::{Protocol, ResourceName};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;

use super::body::{Hold, ProxyBody, UpstreamBody};
use super::pool::{ConnectError, Pool};
use super::problem::{self, Problem};
use super::request_body::{self, RequestBody};
use crate::config::Upstream;
use crate::fencer::{Fencer, WriteInfo};
use crate::metrics::WriteCounters;
use wire::http::fencing_headers;

const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 7.6.1), including any the `Connection` header names, so a
/// client cannot smuggle connection semantics to the upstream or back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the few headers
    // there are beats fourteen hashed lookups.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

fn add_forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    let ip = client.ip().to_string();
    let prior: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = if prior.is_empty() {
        ip
    } else {
        format!("{}, {ip}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// The upstream half of a listener.
pub struct Forwarder {
    pub pool: Arc<Pool>,
    pub upstream: Upstream,
    pub timeout: Duration,
    /// Longest a client may pause mid-upload.
    pub body_stall: Duration,
    pub upstream_errors: metrics::Counter,
    /// For the last look at a write's replica lease before it is sent,
    /// and the refusal when it lapsed.
    pub fencer: Arc<Fencer>,
    pub counters: WriteCounters,
}

/// An admitted write's last look before it is sent (see
/// [`Fencer::still_leased`]), and what its refusal names.
pub struct Leased<'a> {
    /// [`crate::fencer::Admission::leased_at`].
    pub at: u64,
    pub token: u64,
    /// The listener's routes: a refusal reads the resource from the
    /// request again (the admission's borrows the request, which is sent
    /// on; an owned copy would cost every write an allocation).
    pub routes: &'a [(String, ResourceName)],
}

type Answer = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>;

/// A request on its way to the upstream, holding its [`Hold`].
///
/// hyper drops a request's future when its client hangs up. For a write
/// that must not release the guard: the upstream may still be applying
/// it, and a newer token's drain has to wait until it is done. So if this
/// is dropped before the answer came, and it holds a guard, it hands the
/// pending answer to a task that waits it out (bounded by `within`) and
/// only then lets the guard go. The common path, an answer that arrives,
/// costs no task at all.
struct Call {
    answer: Option<Pin<Box<dyn Future<Output = Answer> + Send>>>,
    hold: Hold,
    within: Duration,
}

impl Future for Call {
    type Output = (Answer, Hold);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(answer) = this.answer.as_mut() else {
            // Polled after completion: never happens inside `run`.
            return Poll::Pending;
        };
        let out = std::task::ready!(answer.as_mut().poll(cx));
        this.answer = None;
        Poll::Ready((out, std::mem::take(&mut this.hold)))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let (Some(answer), Some(guard)) = (self.answer.take(), self.hold.guard.take()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let permit = self.hold.permit.take();
        let within = self.within;
        rt.spawn(async move {
            let rest = async {
                if let Ok(resp) = answer.await {
                    let mut body = resp.into_body();
                    while let Some(frame) = body.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(within, rest).await;
            drop(guard);
            drop(permit);
        });
    }
}

impl Forwarder {
    /// Sends `req` upstream and streams the answer back. `hold` (the
    /// write's guard and the request's permit) rides along in the
    /// response body until the upstream has finished answering. A write
    /// (`leased`) is sent only if its replica lease still holds once a
    /// connection is in hand, else refused (503).
    pub async fn run(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        hold: Hold,
        leased: Option<Leased<'_>>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let had_body = !body.is_end_stream();
        let uri = match self.upstream.uri(parts.uri.path_and_query()) {
            Ok(uri) => uri,
            Err(e) => {
                return Problem::new(
                    StatusCode::BAD_REQUEST,
                    problem::BAD_REQUEST,
                    "Bad request target",
                    format!("cannot forward this request target: {e}"),
                )
                .response()
            }
        };
        // The client's own target, kept (moved, not copied) for a
        // refusal's audit record.
        let target = std::mem::replace(&mut parts.uri, uri);
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded_for(&mut parts.headers, peer);
        parts
            .headers
            .insert(header::HOST, self.upstream.host().clone());
        let (body, sent) = RequestBody::new(body, self.body_stall);
        let mut sent = Some(sent);
        let mut req = Request::from_parts(parts, body);
        let mut hold = hold;
        // A pooled connection the upstream closed while it sat idle takes
        // the request back unsent; then one new connection is tried.
        let mut fresh = false;
        loop {
            let pooled = if fresh {
                None
            } else {
                self.pool.checkout().await
            };
            let mut sender = match pooled {
                Some(s) => s,
                None => match self.pool.connect().await {
                    Ok(s) => {
                        fresh = true;
                        s
                    }
                    Err(e) => return self.unreachable(&e),
                },
            };
            // The last look before the write leaves (a connect can take
            // long): on this path the request is handed to the
            // connection's task, which writes the head at once.
            if let Some(l) = leased.as_ref().filter(|l| !self.fencer.still_leased(l.at)) {
                // Unused: back on the stack.
                self.pool.checkin(sender);
                let method = req.method().clone();
                let detail = || format!("{method} {}", target.path());
                let info = WriteInfo {
                    protocol: Protocol::Http,
                    client: peer,
                    detail: &detail,
                };
                let refusal = self
                    .fencer
                    .lapsed(
                        &self.counters,
                        hold.guard.take(),
                        fencing_headers(req.headers(), target.path(), l.routes)
                            .resource
                            .ok()
                            .map(|r| r.to_name()),
                        Some(l.token),
                        &info,
                    )
                    .await;
                let mut p = Problem::from_refusal(&refusal);
                if had_body {
                    // Left unread: the connection cannot carry another
                    // request.
                    p = p.header(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return p.response();
            }
            let mut call = Call {
                answer: Some(Box::pin(sender.try_send_request(req))),
                hold,
                within: self.timeout,
            };
            // The timeout starts once the request body is out: it bounds
            // how long the upstream thinks, not how long the client
            // uploads.
            let timeout = self.timeout;
            let deadline = async {
                // A oneshot receiver must not be polled once it has
                // answered, and a retry comes back here.
                if let Some(rx) = sent.as_mut() {
                    let _ = rx.await;
                    sent = None;
                }
                tokio::time::sleep(timeout).await;
            };
            let (answer, back) = tokio::select! {
                r = &mut call => r,
                () = deadline => {
                    // Documented: a 504 lets go of the guard (see the README).
                    drop(std::mem::take(&mut call.hold));
                    drop(call);
                    return self.timed_out();
                }
            };
            hold = back;
            match answer {
                Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    // The proxy never forwards `Upgrade`, so nobody asked:
                    // relaying it would open a tunnel nothing fences.
                    return self.upgraded();
                }
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    // Chunked framing wins over a length (RFC 9112
                    // section 6.3); the length would truncate the body.
                    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                        parts.headers.remove(header::CONTENT_LENGTH);
                    }
                    strip_hop_by_hop(&mut parts.headers);
                    // An upstream that answered before the client's body
                    // was all sent still has the upload on this
                    // connection: pooled, it would make the next request
                    // wait behind the upload. It closes once done instead.
                    let body_sent = sent.as_mut().is_none_or(|rx| rx.try_recv().is_ok());
                    let conn = body_sent.then(|| (sender, Arc::clone(&self.pool)));
                    let body = UpstreamBody::new(body, hold, self.timeout, conn);
                    return Response::from_parts(parts, ProxyBody::Upstream(body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        req = unsent;
                        fresh = true;
                    }
                    _ => return self.failed(peer, e.error()),
                },
            }
        }
    }

    fn unreachable(&self, e: &ConnectError) -> Response<ProxyBody> {
        self.upstream_errors.increment(1);
        tracing::warn!(error = %e, "upstream unreachable");
        Problem::new(
            StatusCode::BAD_GATEWAY,
            problem::UPSTREAM_UNREACHABLE,
            "Upstream unreachable",
            e.detail(self.upstream.authority()),
        )
        .response()
    }

    fn upgraded(&self) -> Response<ProxyBody> {
        self.upstream_errors.increment(1);
        tracing::warn!(upstream = %self.upstream.authority(), "upstream switched protocols unasked");
        Problem::new(
            StatusCode::BAD_GATEWAY,
            problem::UPSTREAM_ERROR,
            "Upstream failed",
            "the upstream switched protocols, which the proxy never asks for",
        )
        .response()
    }

    fn timed_out(&self) -> Response<ProxyBody> {
        self.upstream_errors.increment(1);
        let timeout = self.timeout;
        tracing::warn!(upstream = %self.upstream.authority(), ?timeout, "upstream timed out");
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            problem::UPSTREAM_TIMEOUT,
            "Upstream timed out",
            format!("the upstream sent no response headers within {timeout:?}"),
        )
        .response()
    }

    fn failed(&self, peer: SocketAddr, e: &hyper::Error) -> Response<ProxyBody> {
        if request_body::is_stall(e) {
            tracing::info!(%peer, "client stalled mid-upload; request abandoned");
            return Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                problem::BAD_REQUEST,
                "Request body timed out",
                format!("no request body data arrived for {:?}", self.body_stall),
            )
            .response();
        }
        if request_body::is_client_body(e) {
            tracing::info!(%peer, error = %e, "client's request body failed; request abandoned");
            return Problem::new(
                StatusCode::BAD_REQUEST,
                problem::BAD_REQUEST,
                "Bad request body",
                "the request body is not valid HTTP/1.1 framing (or ended early)",
            )
            .header(header::CONNECTION, HeaderValue::from_static("close"))
            .response();
        }
        self.upstream_errors.increment(1);
        tracing::warn!(error = %e, upstream = %self.upstream.authority(), "upstream request failed");
        Problem::new(
            StatusCode::BAD_GATEWAY,
            problem::UPSTREAM_ERROR,
            "Upstream failed",
            "the upstream connection failed before a response arrived",
        )
        .response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("fencing-token", HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("fencing-token"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
