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
//!
//! Admission is not the end of it: a write is forwarded some time after it
//! was admitted, and if the lease lapsed in between, the rest of the tier
//! may have advanced without this replica. So the lease also remembers
//! when its last lapse ended ([`ReplicaLease::held_since`]), and a write is
//! forwarded only if the lease has held without a break since the instant
//! it was admitted at.

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
    /// When the last lapse ended: the instant a renewal was confirmed at
    /// or after the deadline it extended (the first join counts). Nothing
    /// admitted before it may be forwarded after it: while the lease was
    /// out, the tier may have advanced without this replica, and the
    /// renewal that caught up raised the marks but cannot recall an
    /// admission already made.
    resumed: AtomicU64,
}

impl ReplicaLease {
    pub fn new() -> Self {
        Self::default()
    }

    /// A renewal sent at `sent_ns` was confirmed by the store at `now_ns`.
    /// Never moves the deadline back (an older, slower renewal confirming
    /// late). One caller at a time (the renewal loop).
    pub fn confirmed(&self, sent_ns: u64, ttl_ns: u64, now_ns: u64) {
        if now_ns >= self.until.load(Ordering::SeqCst) {
            // The lease was out (or never in) until now. Stored before the
            // deadline moves: see `held_since`.
            self.resumed.fetch_max(now_ns, Ordering::SeqCst);
        }
        self.until
            .fetch_max(admit_until(sent_ns, ttl_ns), Ordering::SeqCst);
    }

    /// Whether a write may be admitted at `now_ns`.
    pub fn admits(&self, now_ns: u64) -> bool {
        now_ns < self.until.load(Ordering::SeqCst)
    }

    /// Whether the lease has held without a break from `at_ns` (an instant
    /// at which [`ReplicaLease::admits`] was true) to `now_ns`: a write
    /// admitted at `at_ns` may still be forwarded. False once the lease has
    /// lapsed since, whether or not a renewal has confirmed it again.
    pub fn held_since(&self, at_ns: u64, now_ns: u64) -> bool {
        // The deadline first: a confirmation that ended a lapse stored
        // `resumed` before it extended the deadline, so a deadline seen
        // extended comes with the lapse it ended.
        now_ns < self.until.load(Ordering::SeqCst) && self.resumed.load(Ordering::SeqCst) <= at_ns
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
        lease.confirmed(10 * S, 5 * S, 10 * S);
        // Store expiry is at least 15 s; margin 0.5 s.
        assert!(lease.admits(10 * S));
        assert!(lease.admits(14 * S + S / 2 - 1));
        assert!(!lease.admits(14 * S + S / 2));
        assert!(!lease.admits(15 * S));
    }

    #[test]
    fn a_late_confirmation_of_an_older_renewal_never_shortens_it() {
        let lease = ReplicaLease::new();
        lease.confirmed(20 * S, 5 * S, 20 * S);
        lease.confirmed(10 * S, 5 * S, 21 * S);
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
    fn an_admission_holds_while_the_lease_is_renewed_in_time() {
        let lease = ReplicaLease::new();
        lease.confirmed(0, 5 * S, S / 10);
        let at = S;
        // Renewed every third of the TTL, each before the deadline.
        lease.confirmed(S, 5 * S, S + S / 10);
        lease.confirmed(3 * S, 5 * S, 3 * S + S / 10);
        assert!(
            lease.held_since(at, 6 * S),
            "a long stall, the lease never out"
        );
        assert!(
            !lease.held_since(at, 8 * S),
            "past the deadline: lapsed now"
        );
    }

    #[test]
    fn a_lapse_since_the_admission_is_not_undone_by_a_renewal() {
        let lease = ReplicaLease::new();
        lease.confirmed(0, 5 * S, S / 10);
        let at = S;
        assert!(lease.held_since(at, 2 * S));
        // Deadline 4.5 s; the next renewal is confirmed at 7 s (sent at
        // 6.9 s: the store was cut, or the process paused).
        assert!(!lease.held_since(at, 5 * S), "lapsed");
        lease.confirmed(6 * S + 9 * S / 10, 5 * S, 7 * S);
        assert!(lease.admits(7 * S), "admits again");
        assert!(
            !lease.held_since(at, 7 * S),
            "the admission from before the lapse may not be forwarded"
        );
        assert!(
            lease.held_since(7 * S, 8 * S),
            "one admitted after the lapse may"
        );
    }

    #[test]
    fn a_late_answer_that_does_not_extend_the_lease_ends_no_lapse() {
        let lease = ReplicaLease::new();
        lease.confirmed(0, 5 * S, 0);
        // Sent at 1 s, answered at 9 s: its deadline (5.5 s) is past.
        lease.confirmed(S, 5 * S, 9 * S);
        assert!(!lease.admits(9 * S));
        assert!(!lease.held_since(S, 9 * S));
    }

    #[test]
    fn revoked_admits_nothing() {
        let lease = ReplicaLease::new();
        lease.confirmed(0, 5 * S, 0);
        lease.revoke();
        assert!(!lease.admits(1));
    }
}
