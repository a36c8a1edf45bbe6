//! The elector's lease API (`/v1/leases/{resource}/acquire|renew|release`)
//! as typed calls. [`LeaseKeeper`](crate::LeaseKeeper) is built on it; use
//! it directly only for a loop of your own.

use std::sync::Arc;
use std::time::Duration;

use http::header::RETRY_AFTER;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::token::validate_resource;
use crate::{Error, Fencing, FencingToken};

/// Per-request timeout when none is set: long enough for an elector that
/// waits on a slow store (it gives up after 5 s and answers 503).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for one elector.
#[derive(Clone)]
pub struct ElectorClient {
    http: reqwest::Client,
    base: Arc<str>,
    bearer: Option<Arc<str>>,
    timeout: Duration,
}

/// What acquire and renew return: the lease as the elector granted it.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The token and its resource, ready to attach to writes.
    pub fencing: Fencing,
    pub holder: String,
    /// The TTL the elector granted (from its receipt of the request).
    pub ttl: Duration,
    /// The expiry by the elector's clock (RFC 3339), for people and logs;
    /// never compare it with the local clock.
    pub expires_at: String,
}

#[derive(Deserialize)]
struct GrantBody {
    token: String,
    ttl_ms: u64,
    #[serde(default)]
    expires_at: String,
}

impl ElectorClient {
    /// A client for the elector at `base_url` (`http://host:port` or
    /// `https://host:port`; over https the system's CAs and `SSL_CERT_FILE`
    /// are trusted). For a client certificate or another trust store, pass
    /// a client with [`ElectorClient::with_http_client`].
    pub fn new(base_url: &str) -> Result<ElectorClient, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("cannot build an HTTP client: {e}")))?;
        ElectorClient::with_http_client(base_url, http)
    }

    /// As [`new`](Self::new), with your own `reqwest::Client` (TLS roots,
    /// client certificates, proxies).
    pub fn with_http_client(base_url: &str, http: reqwest::Client) -> Result<ElectorClient, Error> {
        let base = base_url.trim().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::InvalidArgument(format!(
                "elector URL {base_url:?} must start with http:// or https://"
            )));
        }
        Ok(ElectorClient {
            http,
            base: Arc::from(base),
            bearer: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The bearer token the elector requires, if any (`[elector] token`).
    pub fn bearer_token(mut self, token: impl Into<String>) -> ElectorClient {
        let t: String = token.into();
        self.bearer = (!t.is_empty()).then(|| Arc::from(t));
        self
    }

    /// How long one call may take before it counts as unanswered.
    pub fn timeout(mut self, timeout: Duration) -> ElectorClient {
        self.timeout = timeout;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Asks for the lease. `Err(LeaseHeld)` while another holder's lease is
    /// live. The current holder asking again gets its own token back.
    pub async fn acquire(
        &self,
        resource: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Grant, Error> {
        validate_resource(resource)?;
        let body = json!({ "holder": holder, "ttl_ms": ttl_ms(ttl)? });
        let resp = self.post(resource, "acquire", &body).await?;
        self.grant(resource, holder, resp).await
    }

    /// Extends the lease `token` holds, for `ttl` (default: the TTL it was
    /// acquired with). `Err(LeaseLost)` when it is gone: stop writing.
    pub async fn renew(
        &self,
        resource: &str,
        holder: &str,
        token: &FencingToken,
        ttl: Option<Duration>,
    ) -> Result<Grant, Error> {
        validate_resource(resource)?;
        let mut body = json!({ "holder": holder, "token": token.as_str() });
        if let Some(t) = ttl {
            body["ttl_ms"] = Value::from(ttl_ms(t)?);
        }
        let resp = self.post(resource, "renew", &body).await?;
        self.grant(resource, holder, resp).await
    }

    /// Gives the lease up so the next candidate need not wait for its
    /// expiry. `Err(LeaseLost)` if this holder no longer had it.
    pub async fn release(
        &self,
        resource: &str,
        holder: &str,
        token: &FencingToken,
    ) -> Result<(), Error> {
        validate_resource(resource)?;
        let body = json!({ "holder": holder, "token": token.as_str() });
        let resp = self.post(resource, "release", &body).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(problem(resp).await)
    }

    async fn post(
        &self,
        resource: &str,
        action: &str,
        body: &Value,
    ) -> Result<reqwest::Response, Error> {
        // The resource alphabet is URL-safe, `/` included.
        let url = format!("{}/v1/leases/{resource}/{action}", self.base);
        let mut req = self.http.post(&url).json(body).timeout(self.timeout);
        if let Some(t) = &self.bearer {
            req = req.bearer_auth(t);
        }
        req.send().await.map_err(|e| unreachable(&self.base, &e))
    }

    async fn grant(
        &self,
        resource: &str,
        holder: &str,
        resp: reqwest::Response,
    ) -> Result<Grant, Error> {
        if !resp.status().is_success() {
            return Err(problem(resp).await);
        }
        let status = resp.status().as_u16();
        let g: GrantBody = resp.json().await.map_err(|e| Error::Elector {
            status,
            problem_type: None,
            detail: format!("unreadable grant: {e}"),
        })?;
        Ok(Grant {
            fencing: Fencing::new(resource, &g.token)?,
            holder: holder.to_owned(),
            ttl: Duration::from_millis(g.ttl_ms),
            expires_at: g.expires_at,
        })
    }
}

fn ttl_ms(d: Duration) -> Result<u64, Error> {
    u64::try_from(d.as_millis())
        .map_err(|_| Error::InvalidArgument(format!("ttl {d:?} is too long")))
}

fn unreachable(base: &str, e: &reqwest::Error) -> Error {
    let message = if e.is_timeout() {
        "did not answer in time".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        e.to_string()
    };
    Error::Unreachable {
        url: base.to_owned(),
        message,
    }
}

/// A non-success answer, typed by its problem `type`.
async fn problem(resp: reqwest::Response) -> Error {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
    let kind = field("type");
    let detail = field("detail")
        .or_else(|| field("title"))
        .unwrap_or_else(|| {
            let snippet: String = text.chars().take(200).collect();
            format!("HTTP {status} {}", snippet.trim())
                .trim()
                .to_owned()
        });
    match (status, kind.as_deref()) {
        (409, Some("urn:fencepost:lease-held" | "urn:fencepost:lock-delay")) => Error::LeaseHeld {
            holder: field("holder"),
            retry_after,
            detail,
        },
        (409, Some("urn:fencepost:lease-lost" | "urn:fencepost:not-holder")) => {
            Error::LeaseLost { detail }
        }
        _ => Error::Elector {
            status,
            problem_type: kind,
            detail,
        },
    }
}
