//! Rewriting a client's request for the upstream and the upstream's answer
//! for the client, and the call itself.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::body::{self, ProxyBody, RequestBody, UpstreamBody};
use super::problem::{self, Problem};
use fencing::InflightGuard;
use tokio::sync::OwnedSemaphorePermit;

pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// Where requests go: `http://authority` plus an optional base path that is
/// prepended to every request path.
#[derive(Debug, Clone)]
pub struct Upstream {
    authority: Authority,
    host: HeaderValue,
    base: String,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url.parse().map_err(|e| format!("upstream {url:?}: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!("upstream {url:?} must be an http:// URL"));
        }
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
            base: uri.path().trim_end_matches('/').to_owned(),
            authority,
            host,
        })
    }

    fn uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.map_or("/", PathAndQuery::as_str);
        let pq = if self.base.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.base))?
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 7.6.1), including any the `Connection` header names, so a
/// client cannot smuggle connection semantics to the upstream or back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    pub client: UpstreamClient,
    pub upstream: Upstream,
    pub timeout: Duration,
    /// Longest a client may pause mid-upload.
    pub body_stall: Duration,
    pub upstream_errors: metrics::Counter,
}

impl Forwarder {
    /// Sends `req` upstream and streams the answer back. `guard` (writes
    /// only) and `permit` ride along in the response body until the
    /// upstream has finished answering.
    pub async fn run(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        guard: Option<InflightGuard>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let uri = match self.upstream.uri(parts.uri.path_and_query()) {
            Ok(uri) => uri,
            Err(e) => {
                return Problem::new(
                    StatusCode::BAD_REQUEST,
                    problem::BAD_REQUEST,
                    "Bad request target",
                    format!("cannot forward this request target: {e}"),
                )
                .into_response()
            }
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded_for(&mut parts.headers, peer);
        parts
            .headers
            .insert(header::HOST, self.upstream.host.clone());
        let (body, sent) = RequestBody::new(body, self.body_stall);
        let call = self.client.request(Request::from_parts(parts, body));
        // The timeout starts once the request body is out: it bounds how
        // long the upstream thinks, not how long the client uploads.
        let timeout = self.timeout;
        let deadline = async move {
            let _ = sent.await;
            tokio::time::sleep(timeout).await;
        };
        let result = tokio::select! {
            r = call => Some(r),
            () = deadline => None,
        };
        match result {
            Some(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = UpstreamBody::new(body, guard, permit, self.timeout);
                Response::from_parts(parts, ProxyBody::Upstream(body))
            }
            Some(Err(e)) if body::is_stall(&e) => {
                tracing::info!(%peer, "client stalled mid-upload; request abandoned");
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    problem::BAD_REQUEST,
                    "Request body timed out",
                    format!("no request body data arrived for {:?}", self.body_stall),
                )
                .into_response()
            }
            Some(Err(e)) => {
                self.upstream_errors.increment(1);
                tracing::warn!(error = %e, upstream = %self.upstream.authority, "upstream request failed");
                if e.is_connect() {
                    Problem::new(
                        StatusCode::BAD_GATEWAY,
                        problem::UPSTREAM_UNREACHABLE,
                        "Upstream unreachable",
                        format!("cannot connect to the upstream {}", self.upstream.authority),
                    )
                    .into_response()
                } else {
                    Problem::new(
                        StatusCode::BAD_GATEWAY,
                        problem::UPSTREAM_ERROR,
                        "Upstream failed",
                        "the upstream connection failed before a response arrived",
                    )
                    .into_response()
                }
            }
            None => {
                self.upstream_errors.increment(1);
                tracing::warn!(upstream = %self.upstream.authority, ?timeout, "upstream timed out");
                Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    problem::UPSTREAM_TIMEOUT,
                    "Upstream timed out",
                    format!("the upstream sent no response headers within {timeout:?}"),
                )
                .into_response()
            }
        }
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
    fn upstream_base_path_is_prepended() {
        let u = Upstream::parse("http://127.0.0.1:9000/api/").unwrap();
        let pq = PathAndQuery::from_static("/kv/a?x=1");
        assert_eq!(
            u.uri(Some(&pq)).unwrap().to_string(),
            "http://127.0.0.1:9000/api/kv/a?x=1"
        );
        let u = Upstream::parse("http://h:1").unwrap();
        assert_eq!(u.uri(None).unwrap().to_string(), "http://h:1/");
        assert!(Upstream::parse("https://h").is_err());
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    }
}
