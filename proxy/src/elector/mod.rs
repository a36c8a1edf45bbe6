//! The elector: grants leases over HTTP and issues fencing tokens.
//!
//! Every decision is [`fencing::lease::decide`], run by the store inside one
//! locked transaction ([`store::Store::lease_apply`]) that commits before
//! the answer leaves: concurrent candidates serialize on the store, and a
//! token is durable before anyone sees it (guarantee 6). Nothing here keeps
//! lease state that a decision depends on, so any number of electors may
//! share one Postgres store, and a crash loses nothing.
//!
//! What this process does keep in memory is what it has *announced*: the
//! last token and holder per resource, so that the watch stream
//! (`GET /v1/leases/{resource}/watch`) reports each grant, renewal, release
//! and expiry once and in token order, and so the expiry watcher knows when
//! to look. That view is rebuilt from the store at start and refreshed from
//! it every second, which also picks up grants made by other replicas.
//!
//! - [`api`]: the HTTP endpoints, problem+json errors, bearer auth,
//!   identities and grants.
//! - [`watch`]: the Server-Sent Events stream and the expiry watcher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fencing::{
    AuditRecord, Kind, LeaseAudit, LeaseConfig, LeaseReason, LeaseRecord, Signer, Verifier,
};
use serde::Serialize;
use store::Store;
use tokio::sync::{broadcast, watch as watch_chan, Notify};

use crate::audit_sink::AuditSink;
use crate::config::{ElectorClient, ElectorConfig};
use crate::edge::access::Grant;
use crate::error::Error;
use crate::shutdown::Shutdown;

mod api;
mod watch;

/// Largest request body the API reads. Lease requests are a few dozen
/// bytes; the cap keeps a client from making the elector buffer megabytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Events buffered per watch subscriber before it counts as lagging (and is
/// re-synchronized from the store).
const EVENT_BUFFER: usize = 1024;

/// What the elector is configured with.
#[derive(Clone)]
pub struct ElectorSettings {
    pub lease: LeaseConfig,
    /// TTL of an acquire that names none.
    pub default_ttl: Duration,
    /// Signs tokens when set (see `fencing::signing`).
    pub signer: Option<Signer>,
    /// Bearer token every endpoint requires, when set.
    pub auth_token: Option<String>,
    /// Identities and grants, when configured: every call then needs an
    /// identity, and every lease call a grant (`api.rs` `authorize`).
    pub access: Option<Arc<ElectorAccess>>,
    /// Audit successful renewals too (`lease_renewed`).
    pub audit_renewals: bool,
    /// Label the transitions metric by resource (`[admin] resource_labels`).
    pub resource_labels: bool,
}

impl ElectorSettings {
    /// Settings from the `[elector]` section (already validated at load),
    /// reading the signing key file.
    pub fn from_config(cfg: &ElectorConfig) -> Result<Self, Error> {
        let signer = match &cfg.signing_key {
            Some(path) => Some(read_signer(path)?),
            None => None,
        };
        Ok(ElectorSettings {
            lease: LeaseConfig {
                min_ttl_ms: duration_ms(cfg.min_ttl),
                max_ttl_ms: duration_ms(cfg.max_ttl),
                lock_delay_ms: duration_ms(cfg.lock_delay),
            },
            default_ttl: cfg.default_ttl,
            signer,
            auth_token: cfg.token.clone(),
            access: cfg.identities().then(|| {
                Arc::new(ElectorAccess {
                    clients: cfg.clients.clone(),
                    grants: cfg.grants.clone(),
                })
            }),
            audit_renewals: cfg.audit_renewals,
            resource_labels: true,
        })
    }
}

/// `[[elector.clients]]` and `[[elector.grants]]`, as loaded.
#[derive(Debug, Clone)]
pub struct ElectorAccess {
    pub clients: Vec<ElectorClient>,
    pub grants: Vec<Grant>,
}

fn read_signer(path: &std::path::Path) -> Result<Signer, Error> {
    let key_err = |message: String| Error::Key {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| key_err(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Anyone who can read this file can mint tokens; say so, but do not
        // refuse to start (containers often mount secrets 0644).
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "signing key file is readable by other users; chmod 600 it");
            }
        }
    }
    Signer::from_text(&text).map_err(|e| key_err(e.to_string()))
}

/// Milliseconds in `d`, saturating (config durations can be absurd).
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The elector's clock in ms since the epoch. Only this clock ever decides
/// expiry; a clock before 1970 reads as 0 rather than panicking.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds. Clamped to the range the formatter can
/// print (years 1970-9999): an operator may configure a huge max_ttl, and a
/// format error must not turn into a panic.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    const LAST_MS: i64 = 253_402_300_799_999;
    let ms = u64::try_from(ms.clamp(0, LAST_MS)).unwrap_or(0);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Kinds of watch events, as they appear in `event:` and `"type"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EventKind {
    Current,
    Granted,
    Renewed,
    Released,
    Expired,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Current => "current",
            EventKind::Granted => "granted",
            EventKind::Renewed => "renewed",
            EventKind::Released => "released",
            EventKind::Expired => "expired",
        }
    }
}

/// One watch event. For `granted` and `current`, `token` is the full token
/// a holder would present (signed when signing is on), so a proxy that
/// requires signatures can fence with it; otherwise it is the decimal.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LeaseEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub resource: String,
    pub holder: Option<String>,
    pub token: String,
    pub token_value: u64,
    pub expires_at: String,
    pub expires_at_ms: i64,
    pub ttl_ms: i64,
}

/// What this process has announced about one resource.
#[derive(Debug, Clone)]
struct Known {
    /// Highest token announced (0: none yet; real tokens start at 1).
    token: u64,
    /// Holder of that token while its lease is believed running; `None`
    /// once its release or expiry has been announced.
    holder: Option<String>,
    /// When the announced token was granted (for the tenure metric).
    granted_at_ms: i64,
    expires_at_ms: i64,
    ttl_ms: i64,
}

/// Where a lease record handed to [`Elector::observe`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// This process granted it (`Granted`).
    Granted,
    /// This process renewed it (`Renewed` or `Reacquired`): its expiry is
    /// authoritative even if shorter than the one known.
    Renewed,
    /// This process released it.
    Released,
    /// A read of the store: may be older than what was already announced.
    Store,
    /// The first read at start-up: recorded without announcing anything,
    /// since earlier processes announced it already.
    Initial,
}

/// The elector service.
pub struct Elector {
    store: Arc<dyn Store>,
    settings: ElectorSettings,
    /// The process's audit log, where every leadership change is recorded.
    audit: AuditSink,
    verifier: Option<Verifier>,
    events: broadcast::Sender<LeaseEvent>,
    known: Mutex<HashMap<String, Known>>,
    /// Wakes the expiry watcher when a new expiry may be earlier than the
    /// one it sleeps towards.
    wake: Notify,
    /// Set on shutdown so watch streams end and graceful shutdown can
    /// finish (SSE responses never end on their own).
    closing: watch_chan::Sender<bool>,
}

impl Elector {
    /// `store` bounds its own calls (`store_timeout`, see
    /// [`store::open`]): a store that does not answer must not hold
    /// candidates (and their sockets) forever, and failing closed is safe
    /// because nothing is granted without the store.
    pub fn new(store: Arc<dyn Store>, settings: ElectorSettings, audit: AuditSink) -> Arc<Elector> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (closing, _) = watch_chan::channel(false);
        // There from the start, so an alert on them has a series to read.
        metrics::counter!(crate::metrics::RENEWALS_REFUSED).increment(0);
        metrics::gauge!(crate::metrics::LEASES_HELD).set(0.0);
        Arc::new(Elector {
            store,
            audit,
            verifier: settings.signer.as_ref().map(Signer::verifier),
            settings,
            events,
            known: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            closing,
        })
    }

    /// Every lease event this process announces (grants included), for
    /// fence at grant in the same process.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LeaseEvent> {
        self.events.subscribe()
    }

    /// The HTTP API (without the expiry watcher; [`Elector::serve`] runs both).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(Arc::clone(self))
    }

    /// Serves the API on `listener` until `shutdown`, with the expiry
    /// watcher alongside. On shutdown, watch streams end and in-flight
    /// requests finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<Arc<crate::tls::ServerTls>>,
        shutdown: Shutdown,
    ) -> std::io::Result<()> {
        let watcher = tokio::spawn(watch::expiry_watcher(Arc::clone(&self), shutdown.clone()));
        let app = self.router();
        // Watch streams end when `closing` is set; the server then waits
        // only for ordinary requests.
        let result = crate::edge::http1::serve_api("elector", listener, tls, app, shutdown, || {
            self.closing.send_replace(true);
        })
        .await;
        // Also on a listener error: the stream must not outlive the server.
        self.closing.send_replace(true);
        watcher.abort();
        let _ = watcher.await;
        result
    }

    /// The token string a holder is given for `n`: signed when signing is on.
    fn token_string(&self, resource: &str, n: u64) -> String {
        match &self.settings.signer {
            Some(s) => s.sign(resource, n),
            None => n.to_string(),
        }
    }

    fn event(
        &self,
        kind: EventKind,
        resource: &str,
        holder: Option<String>,
        token: u64,
        expires_at_ms: i64,
        ttl_ms: i64,
    ) -> LeaseEvent {
        let token_text = match kind {
            EventKind::Granted | EventKind::Current => self.token_string(resource, token),
            _ => token.to_string(),
        };
        LeaseEvent {
            kind,
            resource: resource.to_owned(),
            holder,
            token: token_text,
            token_value: token,
            expires_at: rfc3339_ms(expires_at_ms),
            expires_at_ms,
            ttl_ms,
        }
    }

    /// The `current` event for a stored row (holder null unless live).
    fn current_event(&self, rec: &LeaseRecord, now: i64) -> LeaseEvent {
        self.event(
            EventKind::Current,
            &rec.resource,
            rec.live_holder(now).map(str::to_owned),
            rec.token,
            rec.expires_at_ms,
            rec.ttl_ms,
        )
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        // The map is only ever updated whole-entry, so a panic elsewhere
        // cannot leave it half-written: recovering from poison is sound.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Merges what is now known about a lease into the announced view and
    /// broadcasts what changed. Events are sent under the lock, so they go
    /// out in token order even when request tasks finish out of order.
    fn observe(&self, rec: &LeaseRecord, source: Source, now: i64) {
        let mut map = self.known();
        let fresh = !map.contains_key(&rec.resource);
        let k = map.entry(rec.resource.clone()).or_insert(Known {
            token: 0,
            holder: None,
            granted_at_ms: 0,
            expires_at_ms: 0,
            ttl_ms: 0,
        });
        let mut out = Vec::new();
        if source == Source::Initial && fresh {
            *k = Known {
                token: rec.token,
                holder: rec.live_holder(now).map(str::to_owned),
                granted_at_ms: rec.granted_at_ms,
                expires_at_ms: rec.expires_at_ms,
                ttl_ms: rec.ttl_ms,
            };
        } else if rec.token > k.token {
            // A new token: the lease it replaced ended first.
            if let Some(old) = k.holder.take() {
                let kind = if k.expires_at_ms <= rec.granted_at_ms {
                    EventKind::Expired
                } else {
                    EventKind::Released
                };
                self.count_end(
                    kind,
                    &rec.resource,
                    &old,
                    k.token,
                    k.granted_at_ms,
                    k.expires_at_ms,
                );
                out.push(self.event(
                    kind,
                    &rec.resource,
                    Some(old),
                    k.token,
                    k.expires_at_ms,
                    k.ttl_ms,
                ));
            }
            *k = Known {
                token: rec.token,
                holder: rec.holder.clone(),
                granted_at_ms: rec.granted_at_ms,
                expires_at_ms: rec.expires_at_ms,
                ttl_ms: rec.ttl_ms,
            };
            self.count_transition(&rec.resource);
            out.push(self.event(
                EventKind::Granted,
                &rec.resource,
                rec.holder.clone(),
                rec.token,
                rec.expires_at_ms,
                rec.ttl_ms,
            ));
        } else if rec.token == k.token {
            match (&rec.holder, k.holder.clone()) {
                (None, Some(old)) => {
                    k.holder = None;
                    k.expires_at_ms = rec.expires_at_ms;
                    self.count_end(
                        EventKind::Released,
                        &rec.resource,
                        &old,
                        k.token,
                        k.granted_at_ms,
                        now,
                    );
                    out.push(self.event(
                        EventKind::Released,
                        &rec.resource,
                        Some(old),
                        k.token,
                        rec.expires_at_ms,
                        rec.ttl_ms,
                    ));
                }
                (Some(h), Some(_)) => {
                    let renewed = match source {
                        Source::Renewed => true,
                        Source::Store => rec.expires_at_ms > k.expires_at_ms,
                        _ => false,
                    };
                    if renewed {
                        k.expires_at_ms = rec.expires_at_ms;
                        k.ttl_ms = rec.ttl_ms;
                        out.push(self.event(
                            EventKind::Renewed,
                            &rec.resource,
                            Some(h.clone()),
                            k.token,
                            rec.expires_at_ms,
                            rec.ttl_ms,
                        ));
                    }
                }
                // Already announced as ended, or never held: nothing new.
                _ => {}
            }
        }
        let watch_expiry = k.holder.is_some();
        if !out.is_empty() {
            set_held(&map);
        }
        for ev in out {
            // No subscribers is fine: events are a courtesy, the store is the truth.
            let _ = self.events.send(ev);
        }
        drop(map);
        if watch_expiry {
            self.wake.notify_one();
        }
    }

    /// Announces the expiry of `resource`'s lease if, after the store's
    /// current row (`row`) is merged, it is still the one known and its
    /// expiry has passed. Counted once: the holder is cleared as it is
    /// announced.
    fn expire_if_due(&self, resource: &str, row: Option<&LeaseRecord>, now: i64) {
        if let Some(r) = row {
            self.observe(r, Source::Store, now);
        }
        let mut map = self.known();
        let Some(k) = map.get_mut(resource) else {
            return;
        };
        if k.expires_at_ms > now {
            return;
        }
        let ended = match row {
            // A different (older) token in the store than announced means
            // the store lost the announced lease (restored from a backup):
            // it is not running any more either.
            Some(r) => r.token != k.token || r.live_holder(now).is_none(),
            // The row is gone (deleted by hand): nobody holds it any more.
            None => true,
        };
        if !ended {
            return;
        }
        if let Some(old) = k.holder.take() {
            self.count_end(
                EventKind::Expired,
                resource,
                &old,
                k.token,
                k.granted_at_ms,
                k.expires_at_ms,
            );
            let ev = self.event(
                EventKind::Expired,
                resource,
                Some(old),
                k.token,
                k.expires_at_ms,
                k.ttl_ms,
            );
            set_held(&map);
            let _ = self.events.send(ev);
        }
    }

    /// Resources whose announced lease has passed its expiry, and the
    /// earliest expiry still ahead.
    fn due(&self, now: i64) -> (Vec<String>, Option<i64>) {
        let map = self.known();
        let mut due = Vec::new();
        let mut next: Option<i64> = None;
        for (resource, k) in map.iter() {
            if k.holder.is_none() {
                continue;
            }
            if k.expires_at_ms <= now {
                due.push(resource.clone());
            } else {
                next = Some(next.map_or(k.expires_at_ms, |n| n.min(k.expires_at_ms)));
            }
        }
        (due, next)
    }

    /// Metrics, logs and the audit record of a lease that ended without
    /// this process releasing it (releases are counted and audited where
    /// they are decided). Each elector process that shares a store and sees
    /// the expiry records it, so N electors may write N records of one.
    fn count_end(
        &self,
        kind: EventKind,
        resource: &str,
        holder: &str,
        token: u64,
        granted_at: i64,
        ended_at: i64,
    ) {
        let tenure_ms = ended_at.saturating_sub(granted_at).max(0);
        metrics::histogram!(crate::metrics::TENURE_SECONDS).record(tenure_ms as f64 / 1000.0);
        let expired_at = ended_at;
        if kind == EventKind::Expired {
            metrics::counter!(crate::metrics::EXPIRIES).increment(1);
            tracing::info!(resource, holder, token, "lease expired");
            let detail = format!("not renewed before {}", rfc3339_ms(expired_at));
            self.record(LeaseAudit {
                kind: Kind::LeaseExpired,
                reason: LeaseReason::Ttl,
                resource,
                holder,
                presented_token: None,
                current_token: Some(token),
                client_addr: String::new(),
                detail: &detail,
                identity: None,
            });
        }
    }

    /// A new token: one leadership transition on `resource`.
    fn count_transition(&self, resource: &str) {
        if self.settings.resource_labels {
            metrics::counter!(crate::metrics::TRANSITIONS, "resource" => resource.to_owned())
                .increment(1);
        } else {
            metrics::counter!(crate::metrics::TRANSITIONS).increment(1);
        }
    }

    /// Queues one leadership record in the process's audit log.
    pub(crate) fn record(&self, e: LeaseAudit<'_>) {
        self.audit.record(AuditRecord::lease(now_ms(), e));
    }
}

/// The leases-held gauge, from the announced view.
fn set_held(map: &HashMap<String, Known>) {
    let held = map.values().filter(|k| k.holder.is_some()).count();
    metrics::gauge!(crate::metrics::LEASES_HELD).set(held as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_with_millis_and_never_panic() {
        assert_eq!(rfc3339_ms(1_500), "1970-01-01T00:00:01.500Z");
        assert_eq!(rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn durations_saturate() {
        assert_eq!(duration_ms(Duration::from_secs(2)), 2000);
        assert_eq!(duration_ms(Duration::MAX), i64::MAX);
    }
}
