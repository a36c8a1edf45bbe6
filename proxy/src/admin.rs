//! The admin API: `/metrics`, `/healthz`, `/readyz`, `/v1/fences`,
//! `/v1/leases`, `/v1/audit`, `/v1/replicas`, `/v1/events`, and the console
//! (`/ui`, `console/`). With a token configured, everything but `/healthz`
//! and the console's static assets needs `Authorization: Bearer <token>`
//! (liveness probes rarely carry secrets, `/healthz` reveals nothing, and
//! the assets hold no data: the page asks for the token and sends it with
//! every data request).
//!
//! With `[[admin.clients]]` instead of the one token, each caller is an
//! identity (a client token, or a client certificate's name) with a role:
//! `read` may GET and HEAD (dashboards, the console), `admin` may also use
//! every other method. The check is by method, ahead of routing, so a
//! dashboard's credential can never be used for a write, whatever write
//! endpoints the API grows.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fencing::{AuditRecord, Kind};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use store::{AuditQuery, Page, PageQuery, Store, StoreError};

use crate::cluster::Tier;
use crate::config::{AdminClient, Upstream};
use crate::console;
use crate::edge::access::{self, Caller, Identity, Role};
use crate::edge::peer::PeerCertificate;
use crate::edge::problem::{self, Problem};
use crate::edge::{bearer, http1};
use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn Store>,
    pub prometheus: PrometheusHandle,
    pub token: Option<String>,
    /// `[[admin.clients]]`: when not empty, identities and roles decide
    /// instead of `token`.
    pub clients: Arc<[AdminClient]>,
    /// HTTP upstreams, checked by `/readyz`.
    pub upstreams: Vec<Upstream>,
    /// This process's replica of the fencing tier, if it is one.
    pub tier: Option<Arc<Tier>>,
    /// Ends the console's event streams, which would otherwise hold the
    /// drain open.
    pub shutdown: Shutdown,
}

pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .route("/v1/fences", get(list_fences))
        .route("/v1/fences/{*resource}", get(get_fence))
        .route("/v1/leases", get(list_leases))
        .route("/v1/audit", get(audit))
        .route("/v1/replicas", get(replicas))
        .route("/v1/events", get(console::events::stream))
        // `layer`, not `route_layer`: the check also runs ahead of a 405,
        // so a method a role may not use is refused as such.
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(console::assets::router())
        .merge(protected)
        .fallback(|| async {
            Problem::plain(
                StatusCode::NOT_FOUND,
                problem::NOT_FOUND,
                "no such endpoint",
            )
        })
        .with_state(state)
}

pub async fn serve(
    state: AdminState,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<crate::tls::ServerTls>>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    http1::serve_api("admin", listener, tls, router(state), shutdown, || {}).await
}

async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if !state.clients.is_empty() {
        let peer = req.extensions().get::<PeerCertificate>();
        let role = match access::identify(
            req.headers(),
            peer,
            state
                .clients
                .iter()
                .filter_map(|c| Some((c.name.as_str(), c.token_hash.as_ref()?))),
        ) {
            Caller::Known(id) => role_of(&state.clients, &id).map(|r| (id, r)),
            Caller::UnknownToken => {
                return bearer::unauthorized("the bearer token is not one of this admin API's clients")
                    .into_response()
            }
            Caller::Anonymous => {
                return bearer::unauthorized(
                    "this endpoint needs a client token (Authorization: Bearer <token>) or a client certificate",
                )
                .into_response()
            }
        };
        let allowed = match &role {
            Some((_, Role::Admin)) => true,
            Some((_, Role::Read)) => matches!(*req.method(), Method::GET | Method::HEAD),
            None => false,
        };
        if !allowed {
            return forbidden(&role, req.method(), req.uri().path(), peer);
        }
        return next.run(req).await;
    }
    if let Some(expected) = &state.token {
        if !bearer::matches(req.headers(), expected) {
            return bearer::unauthorized("this endpoint needs Authorization: Bearer <admin token>")
                .into_response();
        }
    }
    next.run(req).await
}

/// The role `[[admin.clients]]` gives `id`: a token client its own
/// entry's; a certificate the highest of the entries without a token that
/// name it. `None`: a certificate no entry names.
fn role_of(clients: &[AdminClient], id: &Identity) -> Option<Role> {
    match id {
        Identity::Client(name) => clients
            .iter()
            .find(|c| c.token_hash.is_some() && c.name == *name)
            .map(|c| c.role),
        Identity::Certificate(_) => clients
            .iter()
            .filter(|c| c.token_hash.is_none() && id.is(&c.name))
            .map(|c| c.role)
            .max(),
    }
}

/// 403 for a known caller whose role does not allow the call.
fn forbidden(
    role: &Option<(Identity, Role)>,
    method: &Method,
    path: &str,
    peer: Option<&PeerCertificate>,
) -> Response {
    let (name, detail) = match role {
        Some((id, r)) => (
            id.name().to_owned(),
            format!(
                "{:?} has the {} role, which may not {method} {path}",
                id.name(),
                r.as_str()
            ),
        ),
        None => {
            let name = peer
                .and_then(|p| p.names.first().cloned())
                .unwrap_or_default();
            (
                name.clone(),
                format!("the client certificate {name:?} is not one of [[admin.clients]]"),
            )
        }
    };
    tracing::warn!(identity = %name, %method, path, "admin API: call outside the caller's role refused");
    Problem::new(
        StatusCode::FORBIDDEN,
        problem::FORBIDDEN,
        "Forbidden",
        detail,
    )
    .with("identity", name)
    .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = state.prometheus.render();
    crate::metrics::latency::render(&mut body);
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

pub(crate) fn store_error(e: StoreError) -> Response {
    Problem::plain(
        StatusCode::SERVICE_UNAVAILABLE,
        problem::STORE_UNAVAILABLE,
        e.to_string(),
    )
    .into_response()
}

/// The fencing tier as the store sees it (every replica row, live or
/// not), and which one answers. A SQLite store has no tier: an empty list.
async fn replicas(State(state): State<AdminState>) -> Response {
    let rows = if state.store.supports_tier() {
        match state.store.list_replicas().await {
            Ok(rows) => rows,
            Err(e) => return store_error(e),
        }
    } else {
        Vec::new()
    };
    let live = rows.iter().filter(|r| r.live).count();
    let me = state.tier.as_ref().map(|t| {
        json!({
            "id": t.id(),
            "admitting": t.admits(),
            "replica_ttl_ms": u64::try_from(t.ttl().as_millis()).unwrap_or(u64::MAX),
        })
    });
    Json(json!({
        "store": state.store.kind(),
        "live": live,
        "self": me,
        "replicas": rows,
    }))
    .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let store = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    let store_ok = matches!(store, Ok(Ok(())));
    let mut upstreams = serde_json::Map::new();
    let mut all_up = true;
    for upstream in &state.upstreams {
        let up = upstream_reachable(upstream).await;
        all_up &= up;
        upstreams.insert(upstream.as_str().to_owned(), Value::Bool(up));
    }
    // A self-fenced replica refuses every write: not ready for them.
    let admitting = state.tier.as_ref().is_none_or(|t| t.admits());
    let ready = store_ok && all_up && admitting;
    let mut body = json!({
        "ready": ready,
        "store": { "kind": state.store.kind(), "reachable": store_ok },
        "upstreams": upstreams,
    });
    if let Some(t) = &state.tier {
        body["replica"] = json!({ "id": t.id(), "admitting": admitting });
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// A TCP connect to the upstream's host and port: enough to know it is
/// there without sending it requests it would have to handle.
async fn upstream_reachable(upstream: &Upstream) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(upstream.addr())
        )
        .await,
        Ok(Ok(_))
    )
}

fn fence_json(row: &store::FenceRow) -> Value {
    json!({
        "resource": row.resource,
        "token": row.token,
        "updated_at": format_ms(row.updated_at_ms),
        "updated_at_ms": row.updated_at_ms,
    })
}

/// `q`, `limit` and `offset` of a listing (`/v1/fences`, `/v1/leases`).
/// Without them a listing is whole, as it always was.
#[derive(Deserialize)]
pub struct PageParams {
    q: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// The longest search string taken: longer than any resource name.
const MAX_Q: usize = 1024;

impl PageParams {
    pub fn parse(&self) -> Result<PageQuery, String> {
        let limit = match self.limit.as_deref().map(str::parse::<u32>) {
            None => None,
            Some(Ok(n)) if (1..=10_000).contains(&n) => Some(n),
            Some(_) => return Err("limit must be 1 to 10000".into()),
        };
        let offset = match self.offset.as_deref().map(str::parse::<u64>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => return Err("offset must be a whole number".into()),
        };
        let q = self.q.clone().filter(|q| !q.is_empty());
        if q.as_ref().is_some_and(|q| q.len() > MAX_Q) {
            return Err(format!("q is longer than {MAX_Q} bytes"));
        }
        Ok(PageQuery { q, limit, offset })
    }
}

/// The header that carries how many rows matched in all, so a listing's
/// body stays the plain array it always was.
pub const TOTAL_HEADER: &str = "x-total-count";

/// A page as JSON, with its total in [`TOTAL_HEADER`].
pub fn page_response<T>(page: &Page<T>, row: impl Fn(&T) -> Value) -> Response {
    let mut resp = Json(Value::Array(page.rows.iter().map(row).collect())).into_response();
    resp.headers_mut()
        .insert(TOTAL_HEADER, HeaderValue::from(page.total));
    resp
}

async fn list_fences(State(state): State<AdminState>, Query(p): Query<PageParams>) -> Response {
    let q = match p.parse() {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    let page = match state.store.page_fences(&q).await {
        Ok(page) => page,
        Err(e) => return store_error(e),
    };
    if !state.store.supports_tier() {
        return page_response(&page, fence_json);
    }
    // A shared store: each replica's own acknowledged mark, per resource.
    let names: Vec<String> = page.rows.iter().map(|r| r.resource.clone()).collect();
    let marks = match state.store.replica_marks(&names).await {
        Ok(m) => m,
        Err(e) => return store_error(e),
    };
    page_response(&page, |row| {
        let mut v = fence_json(row);
        let per: serde_json::Map<String, Value> = marks
            .iter()
            .filter(|m| m.resource == row.resource)
            .map(|m| (m.replica.clone(), Value::from(m.token)))
            .collect();
        v["replicas"] = Value::Object(per);
        v
    })
}

/// A lease as the admin API shows it: the elector's view (the token
/// number, never a signed token) and the time left when it was read.
pub fn lease_json(rec: &fencing::LeaseRecord, now_ms: i64) -> Value {
    let holder = rec.live_holder(now_ms);
    json!({
        "resource": rec.resource,
        "holder": holder,
        "live": holder.is_some(),
        "token": rec.token.to_string(),
        "granted_at": format_ms(rec.granted_at_ms),
        "expires_at": format_ms(rec.expires_at_ms),
        "expires_at_ms": rec.expires_at_ms,
        "ttl_ms": rec.ttl_ms,
        "time_left_ms": if holder.is_some() { (rec.expires_at_ms - now_ms).max(0) } else { 0 },
    })
}

async fn list_leases(State(state): State<AdminState>, Query(p): Query<PageParams>) -> Response {
    let q = match p.parse() {
        Ok(q) => q,
        Err(e) => return bad_query(e),
    };
    match state.store.page_leases(&q).await {
        Ok(page) => {
            let now = crate::fencer::now_ms();
            page_response(&page, |r| lease_json(r, now))
        }
        Err(e) => store_error(e),
    }
}

async fn get_fence(State(state): State<AdminState>, Path(resource): Path<String>) -> Response {
    if let Err(e) = fencing::resource::validate(&resource) {
        return invalid_resource(e);
    }
    match state.store.get_fence(&resource).await {
        Ok(Some(row)) => Json(fence_json(&row)).into_response(),
        Ok(None) => Problem::plain(
            StatusCode::NOT_FOUND,
            problem::NO_FENCE,
            format!("no write has been fenced for resource {resource}"),
        )
        .into_response(),
        Err(e) => store_error(e),
    }
}

fn invalid_resource(e: fencing::ResourceError) -> Response {
    Problem::plain(
        StatusCode::BAD_REQUEST,
        problem::INVALID_RESOURCE,
        e.to_string(),
    )
    .into_response()
}

fn bad_query(detail: impl Into<String>) -> Response {
    Problem::plain(StatusCode::BAD_REQUEST, problem::BAD_QUERY, detail).into_response()
}

pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses `since`: RFC 3339, a duration ago ("1h"), or milliseconds since
/// the epoch.
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .map_err(|e| e.to_string());
    }
    humantime::parse_duration(s)
        .map(|d| now_ms - d.as_millis() as i64)
        .map_err(|_| format!("since={s:?} is neither an RFC 3339 time, a duration like 1h, nor epoch milliseconds"))
}

pub fn audit_json(r: &AuditRecord) -> Value {
    json!({
        "id": r.id,
        "at": format_ms(r.at_ms),
        "kind": r.kind,
        "resource": r.resource,
        "protocol": r.protocol,
        "holder": r.holder,
        "reason": r.reason,
        "presented_token": r.presented_token,
        "current_token": r.current_token,
        "client_addr": r.client_addr,
        "detail": r.detail,
        "identity": r.identity,
        "chain": r.chain.as_ref().map(|l| &l.chain),
        "seq": r.chain.as_ref().map(|l| l.seq),
        "prev_hash": r.chain.as_ref().map(|l| &l.prev_hash),
        "hash": r.chain.as_ref().map(|l| &l.hash),
    })
}

#[derive(Deserialize)]
struct AuditParams {
    resource: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    kind: Option<String>,
}

/// A `kind` filter as the API and the CLI take it: one kind's name, or
/// `all` (or nothing) for every kind.
pub fn parse_kind(s: Option<&str>) -> Result<Option<Kind>, String> {
    match s {
        None | Some("all") | Some("") => Ok(None),
        Some(k) => Kind::parse(k).map(Some).ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            format!("kind={k:?} is not one of all, {}", names.join(", "))
        }),
    }
}

async fn audit(State(state): State<AdminState>, Query(p): Query<AuditParams>) -> Response {
    let limit = match p.limit.as_deref().map(str::parse::<u32>) {
        None => 100,
        Some(Ok(n)) if (1..=10_000).contains(&n) => n,
        Some(_) => return bad_query("limit must be 1 to 10000"),
    };
    let since_ms = match p
        .since
        .as_deref()
        .map(|s| parse_since(s, crate::fencer::now_ms()))
    {
        None => None,
        Some(Ok(ms)) => Some(ms),
        Some(Err(e)) => return bad_query(e),
    };
    if let Some(r) = &p.resource {
        if let Err(e) = fencing::resource::validate(r) {
            return invalid_resource(e);
        }
    }
    let kind = match parse_kind(p.kind.as_deref()) {
        Ok(k) => k,
        Err(e) => return bad_query(e),
    };
    let q = AuditQuery {
        resource: p.resource,
        since_ms,
        kind,
        limit,
    };
    match state.store.query_audit(&q).await {
        Ok(rows) => Json(Value::Array(rows.iter().map(audit_json).collect())).into_response(),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod role_tests {
    use super::*;
    use crate::edge::access::TokenHash;

    fn entry(name: &str, token: Option<&str>, role: Role) -> AdminClient {
        AdminClient {
            name: name.into(),
            token_hash: token.map(TokenHash::of),
            role,
        }
    }

    /// A token client has its own entry's role; a certificate the highest
    /// of the token-less entries naming it, never a token entry's of the
    /// same name (a certificate must not borrow a token client's role).
    #[test]
    fn roles_of_token_clients_and_certificates() {
        let clients = [
            entry("grafana", Some("t1"), Role::Read),
            entry("ops", Some("t2"), Role::Admin),
            entry("ops.example.com", None, Role::Read),
            entry("spiffe://prod/ops", None, Role::Admin),
        ];
        let client = |n: &str| Identity::Client(n.into());
        let cert = |names: &[&str]| {
            Identity::Certificate(PeerCertificate {
                names: names.iter().map(|n| n.to_string()).collect(),
            })
        };
        assert_eq!(role_of(&clients, &client("grafana")), Some(Role::Read));
        assert_eq!(role_of(&clients, &client("ops")), Some(Role::Admin));
        assert_eq!(role_of(&clients, &client("ops.example.com")), None);
        assert_eq!(
            role_of(&clients, &cert(&["OPS.example.com"])),
            Some(Role::Read)
        );
        assert_eq!(
            role_of(&clients, &cert(&["ops.example.com", "spiffe://prod/ops"])),
            Some(Role::Admin)
        );
        assert_eq!(role_of(&clients, &cert(&["ops"])), None);
        assert_eq!(role_of(&clients, &cert(&["intruder"])), None);
    }
}
