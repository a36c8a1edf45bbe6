//! A replica's lease in the fencing tier, as arithmetic on its own
//! monotonic clock: no I/O, no clock reads (the caller passes instants as
//! nanoseconds since an origin of its choosing).
//!
//! The store sets a replica's expiry to its own `now() + ttl` when it
//! processes a renewal, which is after the replica sent it. So if the
//! replica stops admitting at `sent + ttl - margin` by its own clock, it
//! stops before the store (and so every other replica) may treat it as
//! gone, provided the two clocks' rates differ by less than the margin over
//! one TTL. The margin is a fixed share of the TTL ([`DRIFT_SHARE`], far
//! above any real clock-rate drift) with a floor ([`MIN_MARGIN_NS`]) that
//! also absorbs scheduling jitter on a short TTL.

use std::sync::atomic::{AtomicU64, Ordering};

/// A tenth of the TTL: real clock-rate drift is parts per million.
pub const DRIFT_SHARE: u64 = 10;
/// At least 50 ms of margin.
pub const MIN_MARGIN_NS: u64 = 50_000_000;

/// How long before the store-side expiry a replica stops admitting.
pub fn margin_ns(ttl_ns: u64) -> u64 {
    (ttl_ns / DRIFT_SHARE).max(MIN_MARGIN_NS).min(ttl_ns / 2)
}

/// The last instant (exclusive) at which a replica may admit a write, for
/// a renewal sent at `sent_ns` and confirmed.
pub fn admit_until(sent_ns: u64, ttl_ns: u64) -> u64 {
    sent_ns.saturating_add(ttl_ns.saturating_sub(margin_ns(ttl_ns)))
}

/// A replica's admission deadline: lock-free, read on every write.
#[derive(Debug, Default)]
pub struct ReplicaLease {
    /// Exclusive deadline in the caller's nanoseconds; 0 = never joined or
    /// left, so nothing is admitted.
    until: AtomicU64,
}

impl ReplicaLease {
    pub fn new() -> Self {
        Self::default()
    }

    /// A renewal sent at `sent_ns` was confirmed by the store. Never moves
    /// the deadline back (an older, slower renewal confirming late).
    pub fn confirmed(&self, sent_ns: u64, ttl_ns: u64) {
        self.until
            .fetch_max(admit_until(sent_ns, ttl_ns), Ordering::SeqCst);
    }

    /// Whether a write may be admitted at `now_ns`.
    pub fn admits(&self, now_ns: u64) -> bool {
        now_ns < self.until.load(Ordering::SeqCst)
    }

    /// The deadline, for status pages (0 when never confirmed).
    pub fn until(&self) -> u64 {
        self.until.load(Ordering::SeqCst)
    }

    /// Stops admitting for good (leaving the tier on shutdown).
    pub fn revoke(&self) {
        self.until.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn admits_until_the_margin_before_the_store_expiry() {
        let lease = ReplicaLease::new();
        assert!(!lease.admits(0), "nothing before the first confirmation");
        lease.confirmed(10 * S, 5 * S);
        // Store expiry is at least 15 s; margin 0.5 s.
        assert!(lease.admits(10 * S));
        assert!(lease.admits(14 * S + S / 2 - 1));
        assert!(!lease.admits(14 * S + S / 2));
        assert!(!lease.admits(15 * S));
    }

    #[test]
    fn a_late_confirmation_of_an_older_renewal_never_shortens_it() {
        let lease = ReplicaLease::new();
        lease.confirmed(20 * S, 5 * S);
        lease.confirmed(10 * S, 5 * S);
        assert!(lease.admits(24 * S));
    }

    #[test]
    fn the_margin_has_a_floor_and_never_eats_half_the_ttl() {
        assert_eq!(margin_ns(100 * S), 10 * S);
        assert_eq!(margin_ns(S), MIN_MARGIN_NS.max(S / 10));
        assert_eq!(margin_ns(60_000_000), 30_000_000);
        assert!(admit_until(0, 60_000_000) > 0);
    }

    #[test]
    fn revoked_admits_nothing() {
        let lease = ReplicaLease::new();
        lease.confirmed(0, 5 * S);
        lease.revoke();
        assert!(!lease.admits(1));
    }
}
