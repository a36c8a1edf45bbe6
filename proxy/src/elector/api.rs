//! The elector's HTTP endpoints.
//!
//! Resource names may contain `/`, so everything under `/v1/leases/` is one
//! wildcard route and the action (`acquire`, `renew`, `release`, `watch`)
//! is split off the end here. The raw (undecoded) path is used: the name
//! alphabet needs no percent-encoding, so an encoded byte can only be an
//! invalid name, never a way to smuggle a `/` past the split. The one
//! cost: `GET` of a resource whose last segment is itself an action word
//! (`jobs/watch`) means the action, not the lease; such a lease is still
//! acquired, renewed and released normally and listed by `GET /v1/leases`.
//!
//! Every error is `application/problem+json` (RFC 9457) with a
//! `urn:fencepost:*` type, including axum's own extractor rejections, so a
//! client never has to parse two error formats.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use fencing::token::Presented;
use fencing::{Kind, LeaseAudit, LeaseOp, LeaseOutcome, LeaseReason, LeaseRecord, ResourceName};
use serde::{Deserialize, Serialize};
use store::StoreError;

use super::{duration_ms, now_ms, rfc3339_ms, Elector, Source, MAX_BODY_BYTES};
use crate::admin::{page_response, PageParams};
use crate::edge::access::{self, Caller, Identity};
use crate::edge::bearer;
use crate::edge::http1::ClientAddr;
use crate::edge::peer::PeerCertificate;
use crate::edge::problem::{self, Problem};

const PREFIX: &str = "/v1/leases/";
/// Longest holder name, in characters.
const MAX_HOLDER_CHARS: usize = 256;

pub(super) fn router(el: Arc<Elector>) -> Router {
    Router::new()
        .route("/v1/leases", get(list).fallback(only_get))
        .route(
            "/v1/leases/{*rest}",
            get(get_dispatch).post(post_dispatch).fallback(wrong_method),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&el),
            authenticate,
        ))
        .with_state(el)
}

// ---------------------------------------------------------------- problems

fn bad_request(kind: &'static str, title: &'static str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, kind, title, detail)
}

/// A store that failed or did not answer within `store_timeout`: 503, and
/// nothing granted (no token is issued without the store).
fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Unavailable(m) => {
            tracing::warn!(error = %m, "elector: store unavailable; refusing");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                problem::STORE_UNAVAILABLE,
                "Store unavailable",
                "the lease store cannot be reached; no lease is granted without it",
            )
        }
        other => {
            tracing::error!(error = %other, "elector: store error; refusing");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                problem::STORE_ERROR,
                "Store error",
                format!("the lease store failed: {other}"),
            )
        }
    }
    .retry_after(1)
}

/// Runs one lease operation in the store at the elector's own clock, and
/// returns that instant with the outcome so responses are judged by it.
async fn apply(
    el: &Elector,
    resource: &ResourceName,
    op: &LeaseOp,
) -> Result<(LeaseOutcome, i64), Problem> {
    let now = now_ms();
    let outcome = el
        .store
        .lease_apply(resource.as_str(), op, now, &el.settings.lease)
        .await
        .map_err(store_problem)?;
    Ok((outcome, now))
}

fn json_rejection(r: JsonRejection) -> Problem {
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            problem::BODY_TOO_LARGE,
            "Request body too large",
            format!(
                "request bodies are limited to {} KiB",
                MAX_BODY_BYTES / 1024
            ),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            problem::UNSUPPORTED_MEDIA_TYPE,
            "Expected JSON",
            "send the body as JSON with Content-Type: application/json",
        ),
        // Syntax errors (400) and shape errors (axum says 422): both are a
        // malformed request from the client's side.
        _ => bad_request(
            problem::INVALID_BODY,
            "Malformed request body",
            r.body_text(),
        ),
    }
}

// ------------------------------------------------------------------- auth

/// Every request: with identities configured, who is calling (a client
/// token, or a client certificate the TLS layer verified), put into the
/// request for the handlers; else the one shared token, if set. Reads
/// need an identity too; which leases it may touch is decided per call
/// ([`authorize`]).
async fn authenticate(State(el): State<Arc<Elector>>, mut req: Request, next: Next) -> Response {
    if let Some(acc) = &el.settings.access {
        let caller = access::identify(
            req.headers(),
            req.extensions().get::<PeerCertificate>(),
            acc.clients.iter().map(|c| (c.name.as_str(), &c.token_hash)),
        );
        match caller {
            Caller::Known(id) => {
                req.extensions_mut().insert(id);
            }
            Caller::UnknownToken => {
                return bearer::unauthorized("the bearer token is not one of this elector's clients")
                    .into_response()
            }
            Caller::Anonymous => {
                return bearer::unauthorized(
                    "this elector requires a client token (Authorization: Bearer <token>) or a client certificate",
                )
                .into_response()
            }
        }
    } else if let Some(expected) = &el.settings.auth_token {
        if !bearer::matches(req.headers(), expected) {
            return bearer::unauthorized("this elector requires Authorization: Bearer <token>")
                .into_response();
        }
    }
    next.run(req).await
}

/// Who made a lease call, as its audit records name it.
struct Who {
    addr: String,
    /// The caller's identity (identities configured only).
    identity: Option<Identity>,
    /// The name the audit records for it, once [`authorize`] has picked it.
    name: Option<String>,
}

/// Whether the caller may `action` `resource` as `holder`: always without
/// identities; with them, only inside a grant. A refusal is audited
/// (`lease_denied`, reason `forbidden`, with the identity) before its 403
/// is answered.
fn authorize(
    el: &Elector,
    who: &mut Who,
    action: &str,
    resource: &ResourceName,
    holder: &str,
    presented_token: Option<u64>,
) -> Result<(), Problem> {
    let (Some(acc), Some(id)) = (&el.settings.access, &who.identity) else {
        return Ok(());
    };
    let denial = match access::authorize(&acc.grants, id, resource.as_str(), holder) {
        Ok(name) => {
            who.name = Some(name);
            return Ok(());
        }
        Err(d) => d,
    };
    let why = match denial.refused {
        access::Refused::Resource => format!("no grant of {:?} covers {resource}", denial.identity),
        access::Refused::Holder => format!(
            "{:?} may not use the holder name {holder:?} on {resource}",
            denial.identity
        ),
    };
    let detail = format!("{action} refused: {why}");
    tracing::warn!(
        identity = %denial.identity,
        resource = %resource,
        holder,
        action,
        refused = denial.refused.as_str(),
        client = %who.addr,
        "elector: call outside the caller's grants refused"
    );
    el.record(LeaseAudit {
        kind: Kind::LeaseDenied,
        reason: LeaseReason::Forbidden,
        resource: resource.as_str(),
        holder,
        presented_token,
        current_token: None,
        client_addr: who.addr.clone(),
        detail: &detail,
        identity: Some(&denial.identity),
    });
    Err(Problem::new(
        StatusCode::FORBIDDEN,
        problem::FORBIDDEN,
        "Forbidden",
        format!("{why}; see [[elector.grants]]"),
    )
    .with("identity", denial.identity)
    .with("action", action)
    .with("resource", resource.as_str())
    .with("holder", holder)
    .with("refused", denial.refused.as_str()))
}

// ------------------------------------------------------------- routing

async fn not_found(uri: Uri) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        problem::NOT_FOUND,
        "Not found",
        format!("no endpoint at {}", uri.path()),
    )
}

fn method_not_allowed(method: &Method, allow: &'static str) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        problem::METHOD_NOT_ALLOWED,
        "Method not allowed",
        format!("{method} is not allowed here; use {allow}"),
    )
    .header(header::ALLOW, HeaderValue::from_static(allow))
}

async fn only_get(method: Method) -> Problem {
    method_not_allowed(&method, "GET")
}

async fn wrong_method(method: Method, uri: Uri) -> Problem {
    match split_action(rest_of(&uri)) {
        (_, Some("watch")) | (_, None) => method_not_allowed(&method, "GET"),
        _ => method_not_allowed(&method, "POST"),
    }
}

/// The path after `/v1/leases/`, still percent-encoded.
fn rest_of(uri: &Uri) -> &str {
    uri.path().strip_prefix(PREFIX).unwrap_or("")
}

/// Splits `name/action` when the last segment is an action.
fn split_action(rest: &str) -> (&str, Option<&str>) {
    match rest.rsplit_once('/') {
        Some((name, action @ ("acquire" | "renew" | "release" | "watch"))) => (name, Some(action)),
        _ => (rest, None),
    }
}

fn resource_name(raw: &str) -> Result<ResourceName, Problem> {
    ResourceName::new(raw).map_err(|e| {
        bad_request(
            problem::INVALID_RESOURCE,
            "Invalid resource name",
            e.to_string(),
        )
        .with("resource", raw)
    })
}

async fn get_dispatch(State(el): State<Arc<Elector>>, method: Method, uri: Uri) -> Response {
    match split_action(rest_of(&uri)) {
        (name, Some("watch")) => match resource_name(name) {
            Ok(r) => watch(el, r).await,
            Err(p) => p.into_response(),
        },
        (_, Some(_)) => method_not_allowed(&method, "POST").into_response(),
        (name, None) => match resource_name(name) {
            Ok(r) => show(&el, &r).await.into_response(),
            Err(p) => p.into_response(),
        },
    }
}

async fn post_dispatch(
    State(el): State<Arc<Elector>>,
    client: Option<Extension<ClientAddr>>,
    identity: Option<Extension<Identity>>,
    method: Method,
    uri: Uri,
    body: Result<Json<LeaseBody>, JsonRejection>,
) -> Response {
    let (name, action) = split_action(rest_of(&uri));
    let action = match action {
        Some("watch") => return method_not_allowed(&method, "GET").into_response(),
        Some(a) => a,
        None => {
            return Problem::new(
                StatusCode::NOT_FOUND,
                problem::NOT_FOUND,
                "Not found",
                "POST to /v1/leases/{resource}/acquire, /renew or /release",
            )
            .into_response()
        }
    };
    // The name first: a bad URL is the more basic mistake.
    let resource = match resource_name(name) {
        Ok(r) => r,
        Err(p) => return p.into_response(),
    };
    let body = match body {
        Ok(Json(b)) => b,
        Err(r) => return json_rejection(r).into_response(),
    };
    let who = Who {
        addr: client
            .map(|Extension(ClientAddr(a))| a.to_string())
            .unwrap_or_default(),
        identity: identity.map(|Extension(id)| id),
        name: None,
    };
    let result = match action {
        "acquire" => acquire(&el, &resource, body, who).await,
        "renew" => renew(&el, &resource, body, who).await,
        _ => release(&el, &resource, body, who).await,
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/leases/{resource}/watch`: the current lease, then every change.
async fn watch(el: Arc<Elector>, resource: ResourceName) -> Response {
    // Subscribe before reading the current row, so nothing committed in
    // between is missed (at worst it is seen twice).
    let rx = el.events.subscribe();
    let current = match el.store.get_lease(resource.as_str()).await {
        Ok(c) => c,
        Err(e) => return store_problem(e).into_response(),
    };
    super::watch::stream(el, resource, current, rx)
}

// ---------------------------------------------------------------- bodies

/// The request body of acquire, renew and release. Unknown fields are
/// refused: a misspelt `ttl` silently falling back to the default TTL is
/// the kind of surprise a lease API must not have.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    holder: String,
    #[serde(default)]
    token: Option<TokenField>,
    #[serde(default)]
    ttl_ms: Option<serde_json::Number>,
}

/// Tokens are strings on the wire; a bare number is accepted too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Number(u64),
}

fn holder_name(h: &str) -> Result<(), Problem> {
    let n = h.chars().count();
    if n == 0 || n > MAX_HOLDER_CHARS || h.chars().any(char::is_control) {
        return Err(bad_request(
            problem::INVALID_HOLDER,
            "Invalid holder name",
            format!("holder must be 1-{MAX_HOLDER_CHARS} printable characters"),
        ));
    }
    Ok(())
}

/// `ttl_ms` as i64; values past i64 saturate so they are refused as out of
/// range by `decide`, with the allowed range in the message.
fn ttl_ms(n: Option<&serde_json::Number>) -> Result<Option<i64>, Problem> {
    let Some(n) = n else { return Ok(None) };
    if let Some(v) = n.as_i64() {
        return Ok(Some(v));
    }
    if n.as_u64().is_some() {
        return Ok(Some(i64::MAX));
    }
    Err(bad_request(
        problem::INVALID_BODY,
        "Malformed request body",
        "ttl_ms must be a whole number of milliseconds",
    ))
}

/// The number in a presented token. A signed token must carry this
/// elector's signature for this resource; a plain number is accepted (the
/// holder name and the store's token are what decide).
fn presented_token(
    el: &Elector,
    resource: &ResourceName,
    t: Option<&TokenField>,
) -> Result<u64, Problem> {
    let raw = match t {
        None => {
            return Err(bad_request(
                problem::INVALID_BODY,
                "Malformed request body",
                "missing field `token`",
            ))
        }
        Some(TokenField::Number(n)) => return Ok(*n),
        Some(TokenField::Text(s)) => s,
    };
    let presented = Presented::parse(raw)
        .map_err(|e| bad_request(problem::INVALID_TOKEN, "Invalid token", e.to_string()))?;
    if let (Presented::Signed { n, sig }, Some(v)) = (presented, &el.verifier) {
        if !v.verify(resource.as_str(), n, &sig) {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                problem::NOT_HOLDER,
                "Not the holder",
                format!("token {n} is not one this elector signed for {resource}"),
            )
            .with("resource", resource.as_str()));
        }
    }
    Ok(presented.value())
}

// ------------------------------------------------------------- responses

/// What a holder gets back from acquire and renew: its own token only.
#[derive(Serialize)]
struct Grant<'a> {
    resource: &'a str,
    holder: &'a str,
    token: String,
    expires_at: String,
    expires_at_ms: i64,
    ttl_ms: i64,
}

/// A lease as `GET` shows it: the token number without signature, so
/// reading the lease table does not hand out a usable signed token.
#[derive(Serialize)]
struct View {
    resource: String,
    holder: Option<String>,
    token: String,
    expires_at: String,
    expires_at_ms: i64,
    ttl_ms: i64,
    live: bool,
}

fn view(rec: &LeaseRecord, now: i64) -> View {
    let holder = rec.live_holder(now).map(str::to_owned);
    View {
        resource: rec.resource.clone(),
        live: holder.is_some(),
        holder,
        token: rec.token.to_string(),
        expires_at: rfc3339_ms(rec.expires_at_ms),
        expires_at_ms: rec.expires_at_ms,
        ttl_ms: rec.ttl_ms,
    }
}

fn grant_response(el: &Elector, lease: &LeaseRecord, holder: &str) -> Response {
    Json(Grant {
        resource: &lease.resource,
        holder,
        token: el.token_string(&lease.resource, lease.token),
        expires_at: rfc3339_ms(lease.expires_at_ms),
        expires_at_ms: lease.expires_at_ms,
        ttl_ms: lease.ttl_ms,
    })
    .into_response()
}

/// 409 naming the live holder and its expiry, never its token.
fn held(lease: &LeaseRecord, now: i64) -> Problem {
    let holder = lease.live_holder(now).unwrap_or_default().to_owned();
    Problem::new(
        StatusCode::CONFLICT,
        problem::LEASE_HELD,
        "Lease held by another holder",
        format!(
            "{} is held by {holder:?} until {}",
            lease.resource,
            rfc3339_ms(lease.expires_at_ms)
        ),
    )
    .with("resource", lease.resource.as_str())
    .with("holder", holder)
    .with("expires_at", rfc3339_ms(lease.expires_at_ms))
    .with("expires_at_ms", lease.expires_at_ms)
}

/// Anything `decide` may answer that the calling operation cannot produce.
/// A server bug, not the client's: the one place a 500 is honest.
fn unexpected(outcome: &LeaseOutcome) -> Problem {
    tracing::error!(?outcome, "elector: unexpected lease outcome");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        problem::INTERNAL,
        "Internal error",
        "unexpected lease outcome",
    )
}

fn outcome_problem(outcome: &LeaseOutcome, resource: &ResourceName, now: i64) -> Problem {
    match outcome {
        LeaseOutcome::Held { lease } => held(lease, now),
        LeaseOutcome::LockDelay { until_ms, lease } => {
            let wait_ms = until_ms.saturating_sub(now).max(0);
            let secs = (wait_ms + 999) / 1000;
            let retry = HeaderValue::from_str(&secs.max(1).to_string())
                .unwrap_or(HeaderValue::from_static("1"));
            Problem::new(
                StatusCode::CONFLICT,
                problem::LOCK_DELAY,
                "Lease in lock delay",
                format!(
                    "the lease on {} expired; no new grant before {} (lock delay)",
                    lease.resource,
                    rfc3339_ms(*until_ms)
                ),
            )
            .with("resource", lease.resource.as_str())
            .with("holder", serde_json::Value::Null)
            .with("free_at", rfc3339_ms(*until_ms))
            .with("free_at_ms", *until_ms)
            .header(header::RETRY_AFTER, retry)
        }
        LeaseOutcome::BadTtl {
            ttl_ms,
            min_ms,
            max_ms,
        } => bad_request(
            problem::INVALID_TTL,
            "TTL out of range",
            format!("ttl_ms {ttl_ms} is outside the allowed {min_ms}..={max_ms}"),
        )
        .with("min_ttl_ms", *min_ms)
        .with("max_ttl_ms", *max_ms),
        LeaseOutcome::Exhausted => Problem::new(
            StatusCode::CONFLICT,
            problem::TOKENS_EXHAUSTED,
            "Tokens exhausted",
            format!("every token has been issued for {resource}; use another resource name"),
        ),
        other => unexpected(other),
    }
}

// ------------------------------------------------------------------ audit

/// The audit record of an acquire: a grant, a denial, or (with
/// `audit_renewals`) the holder acquiring again. Requests the store never
/// decided (bad TTL, store down) change no leadership and are not recorded.
fn audit_acquire(
    el: &Elector,
    resource: &ResourceName,
    holder: &str,
    outcome: &LeaseOutcome,
    now: i64,
    who: &Who,
) {
    let (kind, reason, current, detail) = match outcome {
        LeaseOutcome::Granted { lease, previous } => {
            let (reason, detail) = match previous {
                Some((prev, t)) => (
                    LeaseReason::Takeover,
                    format!(
                        "previous holder {prev:?} (token {t}) had expired; ttl {} ms",
                        lease.ttl_ms
                    ),
                ),
                None => (LeaseReason::Free, format!("ttl {} ms", lease.ttl_ms)),
            };
            (Kind::LeaseGranted, reason, lease.token, detail)
        }
        LeaseOutcome::Reacquired { lease } if el.settings.audit_renewals => (
            Kind::LeaseRenewed,
            LeaseReason::Renewed,
            lease.token,
            format!(
                "acquired again by its holder; expires {}",
                rfc3339_ms(lease.expires_at_ms)
            ),
        ),
        LeaseOutcome::Held { lease } => (
            Kind::LeaseDenied,
            LeaseReason::Held,
            lease.token,
            format!(
                "held by {:?} until {}",
                lease.live_holder(now).unwrap_or_default(),
                rfc3339_ms(lease.expires_at_ms)
            ),
        ),
        LeaseOutcome::LockDelay { until_ms, lease } => (
            Kind::LeaseDenied,
            LeaseReason::LockDelay,
            lease.token,
            format!("lock delay until {}", rfc3339_ms(*until_ms)),
        ),
        LeaseOutcome::Exhausted => (
            Kind::LeaseDenied,
            LeaseReason::Exhausted,
            u64::MAX,
            "every token has been issued".to_owned(),
        ),
        _ => return,
    };
    el.record(LeaseAudit {
        kind,
        reason,
        resource: resource.as_str(),
        holder,
        presented_token: None,
        current_token: Some(current),
        client_addr: who.addr.clone(),
        detail: &detail,
        identity: who.name.as_deref(),
    });
}

/// The audit record of a renewal: refused always, renewed only with
/// `audit_renewals`.
fn audit_renew(
    el: &Elector,
    resource: &ResourceName,
    holder: &str,
    token: u64,
    outcome: &LeaseOutcome,
    now: i64,
    who: &Who,
) {
    let (kind, reason, current, detail) = match outcome {
        LeaseOutcome::Renewed { lease } if el.settings.audit_renewals => (
            Kind::LeaseRenewed,
            LeaseReason::Renewed,
            Some(lease.token),
            format!("expires {}", rfc3339_ms(lease.expires_at_ms)),
        ),
        LeaseOutcome::NotHolder { lease } => {
            let detail = match lease
                .as_ref()
                .and_then(|l| l.live_holder(now).map(|h| (h, l)))
            {
                Some((h, l)) => format!("held by {h:?} until {}", rfc3339_ms(l.expires_at_ms)),
                None => "no live lease with this token".to_owned(),
            };
            (
                Kind::RenewalRefused,
                LeaseReason::NotHolder,
                lease.as_ref().map(|l| l.token),
                detail,
            )
        }
        _ => return,
    };
    el.record(LeaseAudit {
        kind,
        reason,
        resource: resource.as_str(),
        holder,
        presented_token: Some(token),
        current_token: current,
        client_addr: who.addr.clone(),
        detail: &detail,
        identity: who.name.as_deref(),
    });
}

// -------------------------------------------------------------- handlers

async fn acquire(
    el: &Elector,
    resource: &ResourceName,
    body: LeaseBody,
    mut who: Who,
) -> Result<Response, Problem> {
    holder_name(&body.holder)?;
    if body.token.is_some() {
        return Err(bad_request(
            problem::INVALID_BODY,
            "Malformed request body",
            "acquire takes no token; renew does",
        ));
    }
    let ttl = ttl_ms(body.ttl_ms.as_ref())?.unwrap_or_else(|| duration_ms(el.settings.default_ttl));
    authorize(el, &mut who, "acquire", resource, &body.holder, None)?;
    let op = LeaseOp::Acquire {
        holder: body.holder,
        ttl_ms: ttl,
    };
    let received = std::time::Instant::now();
    let (outcome, now) = apply(el, resource, &op).await?;
    if matches!(outcome, LeaseOutcome::Granted { .. }) {
        metrics::histogram!(crate::metrics::ACQUISITION_SECONDS)
            .record(received.elapsed().as_secs_f64());
    }
    audit_acquire(el, resource, op.holder(), &outcome, now, &who);
    match &outcome {
        LeaseOutcome::Granted { lease, previous } => {
            metrics::counter!(crate::metrics::GRANTS).increment(1);
            tracing::info!(
                resource = %resource,
                holder = op.holder(),
                token = lease.token,
                ttl_ms = lease.ttl_ms,
                previous_holder = previous.as_ref().map(|p| p.0.as_str()),
                "lease granted"
            );
            el.observe(lease, Source::Granted, now);
            Ok(grant_response(el, lease, op.holder()))
        }
        LeaseOutcome::Reacquired { lease } => {
            metrics::counter!(crate::metrics::RENEWALS).increment(1);
            tracing::debug!(resource = %resource, holder = op.holder(), token = lease.token, "lease re-acquired by its holder");
            el.observe(lease, Source::Renewed, now);
            Ok(grant_response(el, lease, op.holder()))
        }
        other => Err(outcome_problem(other, resource, now)),
    }
}

async fn renew(
    el: &Elector,
    resource: &ResourceName,
    body: LeaseBody,
    mut who: Who,
) -> Result<Response, Problem> {
    holder_name(&body.holder)?;
    let token = presented_token(el, resource, body.token.as_ref())?;
    let renew_ttl = ttl_ms(body.ttl_ms.as_ref())?;
    authorize(el, &mut who, "renew", resource, &body.holder, Some(token))?;
    let op = LeaseOp::Renew {
        holder: body.holder,
        token,
        ttl_ms: renew_ttl,
    };
    let (outcome, now) = apply(el, resource, &op).await?;
    audit_renew(el, resource, op.holder(), token, &outcome, now, &who);
    match &outcome {
        LeaseOutcome::Renewed { lease } => {
            metrics::counter!(crate::metrics::RENEWALS).increment(1);
            tracing::debug!(resource = %resource, holder = op.holder(), token, "lease renewed");
            el.observe(lease, Source::Renewed, now);
            Ok(grant_response(el, lease, op.holder()))
        }
        LeaseOutcome::NotHolder { lease } => {
            metrics::counter!(crate::metrics::RENEWALS_REFUSED).increment(1);
            let mut p = Problem::new(
                StatusCode::CONFLICT,
                problem::LEASE_LOST,
                "Lease lost",
                format!(
                    "{:?} does not hold a live lease on {resource} with token {token}; stop writing",
                    op.holder()
                ),
            )
            .with("resource", resource.as_str());
            if let Some(l) = lease {
                if let Some(h) = l.live_holder(now) {
                    p = p
                        .with("holder", h)
                        .with("expires_at", rfc3339_ms(l.expires_at_ms))
                        .with("expires_at_ms", l.expires_at_ms);
                }
            }
            Err(p)
        }
        other => Err(outcome_problem(other, resource, now)),
    }
}

async fn release(
    el: &Elector,
    resource: &ResourceName,
    body: LeaseBody,
    mut who: Who,
) -> Result<Response, Problem> {
    holder_name(&body.holder)?;
    let token = presented_token(el, resource, body.token.as_ref())?;
    if body.ttl_ms.is_some() {
        return Err(bad_request(
            problem::INVALID_BODY,
            "Malformed request body",
            "release takes no ttl_ms",
        ));
    }
    authorize(el, &mut who, "release", resource, &body.holder, Some(token))?;
    let op = LeaseOp::Release {
        holder: body.holder,
        token,
    };
    let (outcome, now) = apply(el, resource, &op).await?;
    match &outcome {
        LeaseOutcome::Released { lease } => {
            el.record(LeaseAudit {
                kind: Kind::LeaseReleased,
                reason: LeaseReason::Released,
                resource: resource.as_str(),
                holder: op.holder(),
                presented_token: Some(token),
                current_token: Some(lease.token),
                client_addr: who.addr.clone(),
                detail: "released by its holder",
                identity: who.name.as_deref(),
            });
            metrics::counter!(crate::metrics::RELEASES).increment(1);
            tracing::info!(resource = %resource, holder = op.holder(), token, "lease released");
            el.observe(lease, Source::Released, now);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        LeaseOutcome::NotHolder { .. } => Err(Problem::new(
            StatusCode::CONFLICT,
            problem::NOT_HOLDER,
            "Not the holder",
            format!(
                "{:?} does not hold the lease on {resource} with token {token}",
                op.holder()
            ),
        )
        .with("resource", resource.as_str())),
        other => Err(outcome_problem(other, resource, now)),
    }
}

async fn show(el: &Elector, resource: &ResourceName) -> Result<Response, Problem> {
    let rec = el
        .store
        .get_lease(resource.as_str())
        .await
        .map_err(store_problem)?;
    match rec {
        Some(rec) => Ok(Json(view(&rec, now_ms())).into_response()),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            problem::NO_LEASE,
            "No lease",
            format!("no lease has ever been granted for {resource}"),
        )
        .with("resource", resource.as_str())),
    }
}

/// `GET /v1/leases`: every lease, or one page of them (`q`, `limit`,
/// `offset`, as the admin API's listings take them), the number matched
/// in `X-Total-Count`.
async fn list(
    State(el): State<Arc<Elector>>,
    Query(p): Query<PageParams>,
) -> Result<Response, Problem> {
    let q = p
        .parse()
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, problem::BAD_QUERY, "Bad query", e))?;
    let page = el.store.page_leases(&q).await.map_err(store_problem)?;
    let now = now_ms();
    Ok(page_response(&page, |r| {
        serde_json::to_value(view(r, now)).unwrap_or_default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_split_off_the_end_only() {
        assert_eq!(split_action("orders/acquire"), ("orders", Some("acquire")));
        assert_eq!(split_action("a/b/c/watch"), ("a/b/c", Some("watch")));
        assert_eq!(split_action("a/b"), ("a/b", None));
        assert_eq!(split_action("acquire"), ("acquire", None));
        assert_eq!(
            split_action("x/acquire/renew"),
            ("x/acquire", Some("renew"))
        );
    }

    #[test]
    fn holder_names() {
        assert!(holder_name("host-1:4242").is_ok());
        assert!(holder_name("ünïcode ok").is_ok());
        assert!(holder_name("").is_err());
        assert!(holder_name("a\nb").is_err());
        assert!(holder_name(&"x".repeat(257)).is_err());
        assert!(holder_name(&"x".repeat(256)).is_ok());
    }
}
