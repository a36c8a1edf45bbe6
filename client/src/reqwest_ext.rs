//! Fenced writes with `reqwest`: attach the token to a request, and turn
//! the HTTP proxy's refusals into [`Error::Refused`].
//!
//! Two ways, pick one:
//! - per request: `.fencing(lease.fencing())` on any `RequestBuilder`,
//!   then `.send_fenced()` instead of `.send()`;
//! - a [`FencedClient`] that reads the current token itself for every
//!   request and refuses to send (`Error::NotLeading`) while there is none.

use std::future::Future;

use reqwest::{IntoUrl, Method, RequestBuilder, Response, ResponseBuilderExt};

use crate::{Error, Fencing, Refusal, TokenSource};

/// Fencing for `reqwest::RequestBuilder`.
pub trait RequestBuilderExt: Sized {
    /// Sets `Fencing-Token` and `Fencing-Resource`.
    fn fencing(self, fencing: &Fencing) -> RequestBuilder;

    /// Sends, and answers a fencing refusal with `Err(Error::Refused)`.
    /// Any other answer (the upstream's, whatever its status) is `Ok`.
    fn send_fenced(self) -> impl Future<Output = Result<Response, Error>> + Send;
}

impl RequestBuilderExt for RequestBuilder {
    fn fencing(self, fencing: &Fencing) -> RequestBuilder {
        let [(n1, v1), (n2, v2)] = fencing.headers();
        self.header(n1, v1).header(n2, v2)
    }

    // Spelled out rather than `async fn` so the future is `Send` for
    // callers who spawn it.
    #[allow(clippy::manual_async_fn)]
    fn send_fenced(self) -> impl Future<Output = Result<Response, Error>> + Send {
        async move { check_response(self.send().await.map_err(Error::Http)?).await }
    }
}

/// Turns an HTTP proxy's refusal into `Err(Error::Refused)` and passes
/// any other response through. Reads the body only for a response that
/// looks like a refusal (a refusal status with a `problem+json` body); if
/// it then turns out to be the upstream's own problem, the response is
/// handed back whole (status, headers, URL and the body, now in memory).
pub async fn check_response(resp: Response) -> Result<Response, Error> {
    let status = resp.status();
    if !Refusal::may_be_http_refusal(status.as_u16(), resp.headers()) {
        return Ok(resp);
    }
    let version = resp.version();
    let headers = resp.headers().clone();
    let url = resp.url().clone();
    let body = resp.bytes().await.map_err(Error::Http)?;
    if let Some(r) = Refusal::from_http(status.as_u16(), &headers, &body) {
        return Err(r.into());
    }
    let mut rebuilt = http::Response::builder()
        .status(status)
        .version(version)
        .url(url);
    if let Some(h) = rebuilt.headers_mut() {
        *h = headers;
    }
    rebuilt
        .body(body)
        .map(Response::from)
        .map_err(|e| Error::InvalidArgument(format!("cannot rebuild the response: {e}")))
}

/// A `reqwest::Client` that attaches the current token to every request.
///
/// ```no_run
/// use fencepost_client::{FencedClient, LeaseKeeper, RequestBuilderExt};
/// # async fn f() -> Result<(), fencepost_client::Error> {
/// let keeper = LeaseKeeper::builder("http://127.0.0.1:7070", "orders", "w1").start()?;
/// let http = FencedClient::new(reqwest::Client::new(), &keeper);
/// let _lease = keeper.leading().await?;
/// match http.put("http://127.0.0.1:8080/orders/1")?.body("x").send_fenced().await {
///     Ok(resp) => println!("upstream answered {}", resp.status()),
///     Err(e) if e.refusal().is_some_and(|r| r.is_stale()) => println!("a newer leader exists"),
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct FencedClient {
    http: reqwest::Client,
    source: TokenSource,
}

impl FencedClient {
    /// Fences with whatever `source` holds when each request is built: a
    /// `&LeaseKeeper`, a `Lease` (one term) or a fixed `Fencing`.
    pub fn new(http: reqwest::Client, source: impl Into<TokenSource>) -> FencedClient {
        FencedClient {
            http,
            source: source.into(),
        }
    }

    /// The token a request built now would carry.
    pub fn fencing(&self) -> Result<Fencing, Error> {
        self.source.current()
    }

    /// A request with the current token attached, or `Error::NotLeading`
    /// (nothing is sent). Send it with `send_fenced()` for typed refusals.
    pub fn request(&self, method: Method, url: impl IntoUrl) -> Result<RequestBuilder, Error> {
        let f = self.source.current()?;
        Ok(self.http.request(method, url).fencing(&f))
    }

    pub fn get(&self, url: impl IntoUrl) -> Result<RequestBuilder, Error> {
        self.request(Method::GET, url)
    }

    pub fn post(&self, url: impl IntoUrl) -> Result<RequestBuilder, Error> {
        self.request(Method::POST, url)
    }

    pub fn put(&self, url: impl IntoUrl) -> Result<RequestBuilder, Error> {
        self.request(Method::PUT, url)
    }

    pub fn patch(&self, url: impl IntoUrl) -> Result<RequestBuilder, Error> {
        self.request(Method::PATCH, url)
    }

    pub fn delete(&self, url: impl IntoUrl) -> Result<RequestBuilder, Error> {
        self.request(Method::DELETE, url)
    }

    /// The underlying client, for requests that need no token.
    pub fn inner(&self) -> &reqwest::Client {
        &self.http
    }
}
