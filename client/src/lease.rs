//! One term of leadership: the token it was granted, how long it is safe
//! to write with by the local clock, and the cancellation that fires when
//! it ends.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::{Fencing, FencingToken};

/// A lease this process holds, for one term. Cheap to clone; every clone
/// sees the same loss.
///
/// Writes carry [`fencing`](Self::fencing). Work stops when
/// [`lost`](Self::lost) completes (or [`cancellation_token`](Self::cancellation_token)
/// fires): the keeper fires it *before* the lease could have expired at
/// the elector, so by the time another holder is granted the lease, this
/// one has been told to stop. Writes already on the wire at that moment
/// are what the fencing proxies are for.
#[derive(Clone)]
pub struct Lease(Arc<Inner>);

struct Inner {
    fencing: Fencing,
    holder: String,
    ttl: Duration,
    requested_at: Instant,
    valid_until: Mutex<Instant>,
    lost: CancellationToken,
    loss: OnceLock<Loss>,
}

/// When and why a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// The instant (local monotonic clock) the keeper fired the loss.
    pub at: Instant,
    pub reason: LossReason,
}

/// Why a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossReason {
    /// The elector refused a renewal: another holder has (or may be
    /// granted) the lease. The elector's words.
    Refused(String),
    /// No renewal was confirmed before the lease could have expired at
    /// the elector: measured on the local monotonic clock from when the
    /// last confirmed request was *sent*, minus the safety margin. The
    /// elector was unreachable, slow, or this process was paused.
    Unconfirmed,
    /// The keeper was shut down; the lease is being released.
    ShutDown,
    /// The elector refused in a way retrying will not fix (the bearer
    /// token was revoked, the grants changed).
    Failed(String),
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::Refused(d) => write!(f, "renewal refused: {d}"),
            LossReason::Unconfirmed => {
                f.write_str("no renewal confirmed before the lease could have expired")
            }
            LossReason::ShutDown => f.write_str("shut down"),
            LossReason::Failed(d) => write!(f, "elector error: {d}"),
        }
    }
}

impl Lease {
    pub(crate) fn new(
        fencing: Fencing,
        holder: String,
        ttl: Duration,
        requested_at: Instant,
        valid_until: Instant,
    ) -> Lease {
        Lease(Arc::new(Inner {
            fencing,
            holder,
            ttl,
            requested_at,
            valid_until: Mutex::new(valid_until),
            lost: CancellationToken::new(),
            loss: OnceLock::new(),
        }))
    }

    /// Token and resource, to attach to writes.
    pub fn fencing(&self) -> &Fencing {
        &self.0.fencing
    }

    pub fn token(&self) -> &FencingToken {
        self.0.fencing.token()
    }

    pub fn resource(&self) -> &str {
        self.0.fencing.resource()
    }

    pub fn holder(&self) -> &str {
        &self.0.holder
    }

    /// The TTL the elector granted.
    pub fn ttl(&self) -> Duration {
        self.0.ttl
    }

    /// When the acquire that won this term was sent: the elector granted
    /// it no earlier than this.
    pub fn requested_at(&self) -> Instant {
        self.0.requested_at
    }

    /// Until when, by the local monotonic clock, the keeper considers the
    /// lease safe: the last confirmed request's send time plus the TTL,
    /// minus the safety margin. Moves forward with each renewal.
    pub fn valid_until(&self) -> Instant {
        *self
            .0
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn extend(&self, until: Instant) {
        let mut v = self
            .0
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if until > *v {
            *v = until;
        }
    }

    /// Whether the loss has fired.
    pub fn is_lost(&self) -> bool {
        self.0.lost.is_cancelled()
    }

    /// When and why the lease ended, once it has.
    pub fn loss(&self) -> Option<Loss> {
        self.0.loss.get().cloned()
    }

    /// Completes when the lease is lost (or the keeper shuts down).
    ///
    /// ```no_run
    /// # async fn f(lease: fencepost_client::Lease) {
    /// tokio::select! {
    ///     loss = lease.lost() => eprintln!("stopping: {}", loss.reason),
    ///     _ = do_work(&lease) => {}
    /// }
    /// # }
    /// # async fn do_work(_: &fencepost_client::Lease) {}
    /// ```
    pub async fn lost(&self) -> Loss {
        self.0.lost.cancelled().await;
        self.loss().unwrap_or(Loss {
            at: Instant::now(),
            reason: LossReason::ShutDown,
        })
    }

    /// A token cancelled when the lease is lost, to hand to code that
    /// takes a [`CancellationToken`]. Cancelling it yourself does not end
    /// the lease.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.0.lost.child_token()
    }

    /// Records why, then fires: whoever wakes on the cancellation finds
    /// the reason already there. Only the first call counts.
    pub(crate) fn end(&self, reason: LossReason) {
        if self
            .0
            .loss
            .set(Loss {
                at: Instant::now(),
                reason,
            })
            .is_ok()
        {
            self.0.lost.cancel();
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("resource", &self.resource())
            .field("token", &self.token().as_str())
            .field("holder", &self.holder())
            .field("ttl", &self.ttl())
            .field("lost", &self.is_lost())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loss_is_recorded_before_it_fires_and_only_once() {
        let now = Instant::now();
        let l = Lease::new(
            Fencing::new("r", "1").unwrap(),
            "h".into(),
            Duration::from_secs(1),
            now,
            now + Duration::from_millis(900),
        );
        let child = l.cancellation_token();
        child.cancel();
        assert!(!l.is_lost(), "a user's cancel does not end the lease");
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.lost().await })
        };
        l.end(LossReason::Unconfirmed);
        l.end(LossReason::ShutDown);
        let loss = waiter.await.unwrap();
        assert_eq!(loss.reason, LossReason::Unconfirmed);
        assert!(l.is_lost());
        l.extend(now);
        assert_eq!(l.valid_until(), now + Duration::from_millis(900));
        l.extend(now + Duration::from_secs(5));
        assert_eq!(l.valid_until(), now + Duration::from_secs(5));
    }
}
