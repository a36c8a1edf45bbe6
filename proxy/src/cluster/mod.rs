//! One fencing tier: every `fencepost serve` running a proxy on the same
//! Postgres store is a replica of it, and guarantees 1, 2, 4 and 5 hold
//! across all of them (docs/replicas.md; the protocol after Chubby's
//! invalidate-before-write and Gray and Cheriton's leases).
//!
//! # The protocol
//! - **Lease.** Each replica renews a row in `replicas` every third of
//!   `replica_ttl`; the store sets its expiry by its own clock. The replica
//!   admits writes only while its monotonic clock is before the send
//!   instant of its last confirmed renewal plus the TTL less a margin
//!   ([`fencing::replica`]): it stops before the tier may treat it as
//!   gone. Stopped ("self-fenced"), every write gets 503 / ZF004; reads
//!   pass; the next successful renewal readmits.
//! - **Same token.** Local: the fence table's ready slot, one CAS. No store
//!   round trip, no message.
//! - **Advance.** The first local write with a token above the local mark
//!   claims it ([`fencing::Slot::admit`]) and its [`Persist`] is
//!   [`Tier::advance`]: compare-and-advance in the store under a numbered
//!   advance (`fences.seq`) with a NOTIFY, then wait until every other
//!   replica whose lease is live by the store's clock has acknowledged the
//!   token (or joined after the advance), re-checking on every ack
//!   notification and on a short poll. The fence slot then drains the
//!   advancer's own older writes before admitting.
//! - **Learning of advances.** On a notification, and on every renewal (in
//!   the renewal's own transaction), a replica reads the advances numbered
//!   above its cursor, raises each local mark at once (older tokens are
//!   refused from then on), waits for its own older writes to finish and
//!   acknowledges. The tables are the truth: a lost notification costs at
//!   most one renewal period, never safety, because an advancer waits for
//!   the ack, not the notification.
//!
//! Why this is safe: when an advancer admits token t, every replica live in
//! the store either acknowledged t, so it refuses older tokens and its
//! older writes have finished, or its lease expired by the store's clock,
//! so it stopped admitting before that (by its own clock, with the
//! margin), and it must renew, which returns the advance, before it admits
//! again. A replica that joined after the advance loads the mark from the
//! store.
//!
//! Between admission and forwarding there is a last look: every proxy
//! calls [`Fencer::still_leased`] with the instant the write was admitted
//! at, immediately before the write's first byte goes upstream, and a write
//! whose replica lease lapsed at any moment since is refused there instead
//! (503 / ZF004). What remains is a pause *after* that look, between it and
//! the write system call, or of bytes already written: see the README.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fencing::ReplicaLease;
use store::{Store, StoreError, TierAdvanceRow, ACK_CHANNEL, ADVANCE_CHANNEL};
use tokio::sync::Notify;

use crate::fencer::{now_ms, Fencer};
use crate::metrics::{REPLICAS_LIVE, SELF_FENCED};
use crate::shutdown::Shutdown;

/// How often an advancer re-reads the acks when no notification comes.
const ACK_POLL: Duration = Duration::from_millis(100);
/// Retry bound for a failing renewal or ack.
const MAX_RETRY: Duration = Duration::from_millis(250);
/// A replica whose lease expired this many TTLs ago (killed, never left)
/// is deleted from the store with its acks, so the tables stay as small
/// as the tier; until then `GET /v1/replicas` shows it as not live.
pub const PRUNE_AFTER_TTLS: u32 = 10;
/// Every this many renewals (about `PRUNE_AFTER_TTLS` TTLs) a replica
/// prunes: one statement, cheap, but no need to run it every renewal.
const PRUNE_EVERY: u32 = 3 * PRUNE_AFTER_TTLS;

/// This process's membership of the tier.
pub struct Tier {
    id: String,
    addresses: String,
    started_at_ms: i64,
    store: Arc<dyn Store>,
    ttl: Duration,
    origin: Instant,
    lease: ReplicaLease,
    /// Woken by every ack notification.
    acks: Notify,
    /// Wakes the catch-up task (an advance of our own, a notification).
    poke: Notify,
    /// The highest advance number applied; `None` before the first join.
    cursor: Mutex<Option<i64>>,
    live: AtomicU64,
    admitting: AtomicBool,
}

impl Tier {
    /// A replica of the tier on `store`, with a fresh id. `addresses`
    /// describes its listeners for `GET /v1/replicas`.
    pub fn new(store: Arc<dyn Store>, ttl: Duration, addresses: String) -> Self {
        let id = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        );
        Tier {
            id,
            addresses,
            started_at_ms: now_ms(),
            store,
            ttl,
            origin: Instant::now(),
            lease: ReplicaLease::new(),
            acks: Notify::new(),
            poke: Notify::new(),
            cursor: Mutex::new(None),
            live: AtomicU64::new(0),
            admitting: AtomicBool::new(false),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether this replica may admit a write now: its lease, confirmed by
    /// the store, cannot have expired there yet. One clock read.
    pub fn admits(&self) -> bool {
        self.stamp().is_some()
    }

    /// The instant now on this replica's clock if its lease holds now, for
    /// an admission to record: [`Tier::held_since`] later tells whether
    /// the lease lapsed after it. One clock read.
    pub fn stamp(&self) -> Option<u64> {
        let now = self.now_ns();
        self.lease.admits(now).then_some(now)
    }

    /// Whether the lease has held without a break since `at` (a
    /// [`Tier::stamp`]): a write admitted then may still be forwarded.
    /// False once it lapsed since, renewed or not (see
    /// [`fencing::ReplicaLease::held_since`]). One clock read.
    pub fn held_since(&self, at: u64) -> bool {
        self.lease.held_since(at, self.now_ns())
    }

    /// Live replicas at the last renewal, this one included.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// The [`fencing::Persist`] of a claim on a tier: makes `token`
    /// durable and waits until the rest of the tier has raised its mark and
    /// drained below it. Returns the mark afterwards (above `token` when
    /// another replica advanced further: the claim is then stale).
    pub async fn advance(&self, resource: &str, token: u64) -> Result<u64, StoreError> {
        let adv = self.store.tier_advance(resource, token, now_ms()).await?;
        if adv.mark != token {
            return Ok(adv.mark);
        }
        // Our own catch-up acknowledges it too (for other replicas' first
        // writes with this token), without waiting for the notification.
        self.poke.notify_one();
        loop {
            let mut acked = std::pin::pin!(self.acks.notified());
            acked.as_mut().enable();
            let pending = self
                .store
                .pending_acks(resource, token, adv.seq, &self.id)
                .await?;
            if pending.is_empty() {
                return Ok(token);
            }
            tracing::debug!(resource, token, ?pending, "advance waiting for replicas");
            tokio::select! {
                _ = acked => {}
                _ = tokio::time::sleep(ACK_POLL) => {}
            }
        }
    }

    /// Raises the local marks of `advances` (in order) and starts their
    /// acknowledgements. Synchronous: a renewal applies the advances it
    /// returned before it extends the lease.
    fn apply(self: &Arc<Self>, fencer: &Fencer, advances: Vec<TierAdvanceRow>, cursor: i64) {
        let mut at = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        for a in advances {
            if at.is_some_and(|c| a.seq <= c) {
                continue;
            }
            // Inserting first closes the race with a concurrent first load
            // of the slot: whichever lands, the mark ends at least `token`.
            let slot = fencer.table().insert(&a.resource, a.token);
            slot.raise_to(a.token);
            fencer.publish_mark(&a.resource);
            let tier = Arc::clone(self);
            tokio::spawn(async move {
                slot.drained_below(a.token).await;
                let mut backoff = Duration::from_millis(10);
                loop {
                    match tier.store.replica_ack(&a.resource, &tier.id, a.token).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(resource = a.resource, token = a.token, error = %e, "acknowledging an advance failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_RETRY);
                        }
                    }
                }
            });
            *at = Some(a.seq);
        }
        *at = Some(at.map_or(cursor, |c| c.max(cursor)));
    }

    /// One renewal: on success the lease is extended from its send instant.
    async fn renew(self: &Arc<Self>, fencer: &Fencer) -> Result<(), StoreError> {
        let since = *self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let sent = self.now_ns();
        let r = self
            .store
            .replica_renew(
                &self.id,
                &self.addresses,
                self.started_at_ms,
                i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX),
                since,
            )
            .await?;
        self.apply(fencer, r.advances, r.cursor);
        let ttl_ns = u64::try_from(self.ttl.as_nanos()).unwrap_or(u64::MAX);
        self.lease.confirmed(sent, ttl_ns, self.now_ns());
        self.live.store(r.live, Ordering::Relaxed);
        metrics::gauge!(REPLICAS_LIVE).set(r.live as f64);
        Ok(())
    }

    /// The first renewal, in the foreground at start-up, so a healthy
    /// replica admits from its first request. Failure is not fatal: the
    /// background loop keeps trying and writes get 503 meanwhile.
    pub async fn join(self: &Arc<Self>, fencer: &Fencer) {
        // Present from the start on a replica, so alerts see a zero.
        metrics::counter!(SELF_FENCED).increment(0);
        for protocol in ["http", "postgres"] {
            metrics::counter!(crate::metrics::SENT_AFTER_LAPSE, "protocol" => protocol)
                .increment(0);
        }
        metrics::gauge!(REPLICAS_LIVE).set(0.0);
        if let Err(e) = self.renew(fencer).await {
            tracing::warn!(replica = self.id, error = %e, "could not join the fencing tier yet; writes are refused until it can");
        }
        self.observe();
    }

    /// Notes the moment admission stops or resumes (logs, the metric).
    fn observe(&self) {
        let now = self.admits();
        let was = self.admitting.swap(now, Ordering::SeqCst);
        if was && !now {
            metrics::counter!(SELF_FENCED).increment(1);
            tracing::error!(
                replica = self.id,
                "replica lease unconfirmed: refusing every write until the store confirms it again"
            );
        } else if !was && now {
            tracing::info!(
                replica = self.id,
                live = self.live(),
                "replica lease confirmed: admitting writes"
            );
        }
    }

    async fn catch_up(self: &Arc<Self>, fencer: &Fencer) -> Result<(), StoreError> {
        let Some(since) = *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Ok(());
        };
        let advances = self.store.advances_since(since).await?;
        let cursor = advances.last().map_or(since, |a| a.seq);
        self.apply(fencer, advances, cursor);
        Ok(())
    }

    /// Deletes replicas expired more than [`PRUNE_AFTER_TTLS`] TTLs ago,
    /// with their acks. Safe at any time (see the store's
    /// `replica_prune`): an expired lease is never waited for, and a
    /// pruned replica that wakes up rejoins like a new one.
    async fn prune(&self) {
        let retention = self.ttl * PRUNE_AFTER_TTLS;
        let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match self.store.replica_prune(ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                pruned = n,
                ?retention,
                "removed long-expired replicas from the tier's tables"
            ),
            Err(e) => {
                tracing::debug!(error = %e, "pruning expired replicas failed; the next renewal round retries")
            }
        }
    }

    /// Leaves the tier (graceful shutdown): stop admitting, then delete the
    /// row so no advance waits for this lease to expire.
    pub async fn leave(&self) {
        self.lease.revoke();
        if let Err(e) = self.store.replica_leave(&self.id).await {
            tracing::warn!(replica = self.id, error = %e, "could not leave the tier; its lease expires on its own");
        }
    }
}

/// Runs the replica: the renewal loop and the notification session, until
/// shutdown.
pub async fn run(tier: Arc<Tier>, fencer: Arc<Fencer>, shutdown: Shutdown) {
    tokio::join!(
        renew_loop(Arc::clone(&tier), Arc::clone(&fencer), shutdown.clone()),
        listen_loop(tier, fencer, shutdown),
    );
}

async fn renew_loop(tier: Arc<Tier>, fencer: Arc<Fencer>, shutdown: Shutdown) {
    let period = tier.ttl / 3;
    let retry = (tier.ttl / 10).min(MAX_RETRY);
    let mut renewals = 0u32;
    loop {
        renewals = renewals.wrapping_add(1);
        if renewals % PRUNE_EVERY == 1 {
            // Its own task: a slow store must never delay a renewal.
            let t = Arc::clone(&tier);
            tokio::spawn(async move { t.prune().await });
        }
        let wait = match tier.renew(&fencer).await {
            // A renewal that answered too late to extend the lease (a
            // stalled store) is followed at once by another.
            Ok(()) if tier.admits() => period,
            Ok(()) => retry,
            Err(e) => {
                tracing::warn!(replica = tier.id, error = %e, "replica lease renewal failed");
                retry
            }
        };
        tier.observe();
        // Wake up at the deadline too, so self-fencing is logged on time.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait() => return,
        }
    }
}

async fn listen_loop(tier: Arc<Tier>, fencer: Arc<Fencer>, shutdown: Shutdown) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match tier.store.tier_notifications().await {
            Ok(mut session) => {
                backoff = Duration::from_millis(50);
                // Whatever was announced before we listened is in the tables.
                let _ = tier.catch_up(&fencer).await;
                loop {
                    tokio::select! {
                        n = session.recv() => match n {
                            Ok(channel) if channel == ADVANCE_CHANNEL => {
                                if let Err(e) = tier.catch_up(&fencer).await {
                                    tracing::warn!(error = %e, "reading the tier's advances failed");
                                }
                            }
                            Ok(channel) if channel == ACK_CHANNEL => tier.acks.notify_waiters(),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "tier notification session lost; reconnecting");
                                break;
                            }
                        },
                        _ = tier.poke.notified() => {
                            if let Err(e) = tier.catch_up(&fencer).await {
                                tracing::warn!(error = %e, "reading the tier's advances failed");
                            }
                        }
                        _ = shutdown.wait() => return,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for the tier's notifications; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fencepost".into())
}
