//! `GET /v1/events`: what changed, as Server-Sent Events, for the console.
//!
//! The stream polls the store once per second rather than listening to
//! this process: the fences, leases and audit records a console shows are
//! written by every proxy and elector sharing the store, not only by this
//! one, and the store is the one place they all meet. Each poll costs one
//! audit read (the newest records, by the primary key) and one
//! [`store::Digest`] (counts and maxima over the fence and lease tables);
//! only what changed is sent:
//!
//! - `hello` once: the poll interval and the server's clock;
//! - `audit`: the records newer than the last one sent, oldest first
//!   (`more: true` when there were more than one poll takes: re-read);
//! - `fences`, `leases`: a table changed; the page re-reads its page;
//! - `store`: the store stopped or started answering.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{json, Value};
use store::{AuditQuery, Digest};

use crate::admin::{audit_json, store_error, AdminState};

/// How often the store is read for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// The most audit records one poll sends; more means the page re-reads.
const AUDIT_BATCH: u32 = 200;

/// Comment lines keep an idle stream alive through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

struct Poller {
    state: AdminState,
    last_id: i64,
    digest: Digest,
    store_ok: bool,
    tick: tokio::time::Interval,
    pending: VecDeque<Event>,
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

impl Poller {
    /// One look at the store; queues an event per change.
    async fn poll(&mut self) {
        let q = AuditQuery {
            limit: AUDIT_BATCH,
            ..AuditQuery::default()
        };
        let audit = self.state.store.query_audit(&q).await;
        let digest = self.state.store.digest().await;
        let ok = audit.is_ok() && digest.is_ok();
        if ok != self.store_ok {
            self.store_ok = ok;
            self.pending
                .push_back(event("store", &json!({ "reachable": ok })));
        }
        if let Ok(rows) = audit {
            let more = rows.len() == AUDIT_BATCH as usize
                && rows
                    .last()
                    .and_then(|r| r.id)
                    .is_some_and(|id| id > self.last_id + 1);
            let fresh: Vec<Value> = rows
                .iter()
                .rev()
                .filter(|r| r.id.is_some_and(|id| id > self.last_id))
                .map(audit_json)
                .collect();
            if let Some(newest) = rows.first().and_then(|r| r.id) {
                self.last_id = self.last_id.max(newest);
            }
            if !fresh.is_empty() {
                self.pending
                    .push_back(event("audit", &json!({ "records": fresh, "more": more })));
            }
        }
        if let Ok(d) = digest {
            let fences_changed = (d.fences, d.fences_updated_ms)
                != (self.digest.fences, self.digest.fences_updated_ms);
            let leases_changed = (
                d.leases,
                d.leases_held,
                d.leases_granted_ms,
                d.leases_expiry_sum,
            ) != (
                self.digest.leases,
                self.digest.leases_held,
                self.digest.leases_granted_ms,
                self.digest.leases_expiry_sum,
            );
            self.digest = d;
            if fences_changed {
                self.pending.push_back(event("fences", &json!(d)));
            }
            if leases_changed {
                self.pending.push_back(event("leases", &json!(d)));
            }
        }
    }
}

pub async fn stream(State(state): State<AdminState>) -> Response {
    // Where the stream starts: what the page has just read needs no event.
    let newest = AuditQuery {
        limit: 1,
        ..AuditQuery::default()
    };
    let last_id = match state.store.query_audit(&newest).await {
        Ok(rows) => rows.first().and_then(|r| r.id).unwrap_or(0),
        Err(e) => return store_error(e),
    };
    let digest = match state.store.digest().await {
        Ok(d) => d,
        Err(e) => return store_error(e),
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: skip it, the state was just read.
    tick.reset();
    let hello = json!({
        "poll_ms": POLL.as_millis() as u64,
        "now_ms": crate::fencer::now_ms(),
    });
    let poller = Poller {
        state,
        last_id,
        digest,
        store_ok: true,
        tick,
        pending: VecDeque::from([event("hello", &hello)]),
    };
    let events = stream::unfold(poller, |mut p| async move {
        loop {
            if let Some(ev) = p.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), p));
            }
            let shutdown = p.state.shutdown.clone();
            tokio::select! {
                _ = shutdown.wait() => return None,
                _ = p.tick.tick() => {}
            }
            p.poll().await;
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}
