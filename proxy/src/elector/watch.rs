//! Lease events: the Server-Sent Events stream and the expiry watcher.
//! Neither knows HTTP errors: the API (`api.rs`) answers those, and every
//! store call here is bounded by the store itself (`store_timeout`).
//!
//! A proxy subscribed to `GET /v1/leases/{resource}/watch` learns of a new
//! grant as soon as it is committed, so it can fence the old leader before
//! the new one writes anything. Expiries have no request that causes them,
//! so a background task notices them: it sleeps until the earliest expiry
//! this process knows of, checks the store (another replica may have
//! renewed the lease), and announces what really ended.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use fencing::{LeaseRecord, ResourceName};
use futures_util::stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch as watch_chan};

use super::{now_ms, Elector, LeaseEvent, Source};
use crate::shutdown::Shutdown;

/// Comment lines keep idle streams alive through proxies and load
/// balancers, and let a client notice a dead elector.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How often the store's lease table is re-read: picks up grants and
/// renewals made by other elector replicas sharing the store.
const SCAN_INTERVAL_MS: i64 = 1000;

/// Pause before re-checking expiries after the store failed to answer.
const RETRY_MS: i64 = 1000;

fn sse_event(ev: &LeaseEvent) -> Event {
    let data = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    Event::default().event(ev.kind.as_str()).data(data)
}

struct WatchState {
    el: Arc<Elector>,
    resource: ResourceName,
    first: Option<LeaseEvent>,
    rx: broadcast::Receiver<LeaseEvent>,
    closing: watch_chan::Receiver<bool>,
}

/// The event stream of `GET /v1/leases/{resource}/watch`: `current` (the
/// row read after subscribing `rx`) first, then every event for
/// `resource`, until the elector closes.
pub(super) fn stream(
    el: Arc<Elector>,
    resource: ResourceName,
    current: Option<LeaseRecord>,
    rx: broadcast::Receiver<LeaseEvent>,
) -> Response {
    let closing = el.closing.subscribe();
    let first = current.map(|rec| el.current_event(&rec, now_ms()));
    let state = WatchState {
        el,
        resource,
        first,
        rx,
        closing,
    };
    let events = stream::unfold(state, |mut st| async move {
        if let Some(ev) = st.first.take() {
            return Some((Ok::<_, Infallible>(sse_event(&ev)), st));
        }
        loop {
            if *st.closing.borrow() {
                return None;
            }
            tokio::select! {
                _ = st.closing.changed() => return None,
                got = st.rx.recv() => match got {
                    Ok(ev) if ev.resource == st.resource.as_str() => {
                        return Some((Ok(sse_event(&ev)), st));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        // Too slow to keep up: re-synchronize from the store
                        // rather than silently skip a grant.
                        tracing::warn!(resource = %st.resource, missed, "watch subscriber lagged; resending current lease");
                        if let Ok(Some(rec)) = st.el.store.get_lease(st.resource.as_str()).await {
                            let ev = st.el.current_event(&rec, now_ms());
                            return Some((Ok(sse_event(&ev)), st));
                        }
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// Announces expiries (and grants by other replicas) until `shutdown`.
pub(super) async fn expiry_watcher(el: Arc<Elector>, shutdown: Shutdown) {
    let mut loaded = false;
    let mut next_scan = 0i64;
    let mut retry_at = 0i64;
    let mut store_down = false;
    loop {
        if shutdown.is_fired() {
            return;
        }
        if now_ms() >= next_scan {
            match el.store.list_leases().await {
                Ok(rows) => {
                    let now = now_ms();
                    let source = if loaded {
                        Source::Store
                    } else {
                        Source::Initial
                    };
                    for row in &rows {
                        el.observe(row, source, now);
                    }
                    loaded = true;
                    if store_down {
                        tracing::info!("elector: store reachable again; expiry watcher resumed");
                        store_down = false;
                    }
                }
                Err(_) => store_down = true,
            }
            next_scan = now_ms().saturating_add(SCAN_INTERVAL_MS);
        }
        let now = now_ms();
        if now >= retry_at {
            let (due, _) = el.due(now);
            for resource in due {
                match el.store.get_lease(&resource).await {
                    Ok(row) => el.expire_if_due(&resource, row.as_ref(), now_ms()),
                    Err(_) => {
                        // Cannot tell an expiry from a renewal elsewhere;
                        // try again shortly. Nothing can be granted while
                        // the store is down, so waiting is safe.
                        store_down = true;
                        retry_at = now_ms().saturating_add(RETRY_MS);
                        break;
                    }
                }
            }
        }
        let now = now_ms();
        let (due, next_expiry) = el.due(now);
        let mut wake_at = next_scan;
        if let Some(t) = next_expiry {
            wake_at = wake_at.min(t);
        }
        if !due.is_empty() {
            wake_at = wake_at.min(retry_at);
        }
        let wait =
            u64::try_from(wake_at.saturating_sub(now).clamp(0, SCAN_INTERVAL_MS)).unwrap_or(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = el.wake.notified() => {}
            _ = shutdown.wait() => return,
        }
    }
}
