//! The one place a store call is bounded in time.
//!
//! A store that accepts connections but stops answering (a hung host, a
//! partition without resets) must not hold a decision, a lease request or
//! an API read forever: each call here fails with
//! [`StoreError::Unavailable`] once `store_timeout` has passed, and the
//! caller fails closed. The backends themselves add no call deadline of
//! their own, so a `store_timeout` larger than their defaults is honoured
//! rather than silently capped; their driver-level waits (a pool
//! connection, a SQLite lock) are opened with the same bound by
//! [`super::open`].
//!
//! A call cut off this way has an unknown outcome, which is safe: the mark
//! and the tokens only ever go up, and audit records are appended by id.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use fencing::{AuditRecord, LeaseConfig, LeaseOp, LeaseOutcome, LeaseRecord};

use super::{
    AuditQuery, FenceRow, Notifications, Renewal, ReplicaRow, Store, StoreError, TierAdvance,
    TierAdvanceRow,
};
use super::{Digest, Page, PageQuery, ReplicaMark};

/// Audit flushes can carry thousands of records after an outage and are
/// off the write path, so they get at least this long.
pub const MIN_AUDIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A [`Store`] whose every call answers within a bound.
#[derive(Debug)]
pub struct TimedStore<S> {
    inner: S,
    /// Every call but audit appends and migrations.
    call: Duration,
    /// Audit appends: the larger of `call` and [`MIN_AUDIT_TIMEOUT`].
    audit: Duration,
}

impl<S: Store> TimedStore<S> {
    /// Bounds `inner`'s calls by `timeout` (`store_timeout`).
    pub fn new(inner: S, timeout: Duration) -> Self {
        TimedStore {
            inner,
            call: timeout,
            audit: timeout.max(MIN_AUDIT_TIMEOUT),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The bound of an ordinary call.
    pub fn timeout(&self) -> Duration {
        self.call
    }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer from the store within {limit:?}"
        )))
    })
}

#[async_trait]
impl<S: Store> Store for TimedStore<S> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// Not bounded: a migration on a healthy store may take as long as it
    /// takes, and a store that cannot be reached already fails at the
    /// driver's connection wait.
    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        bounded(self.call, self.inner.ping()).await
    }

    async fn load_fence(&self, resource: &str) -> Result<Option<u64>, StoreError> {
        bounded(self.call, self.inner.load_fence(resource)).await
    }

    async fn advance_fence(
        &self,
        resource: &str,
        token: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        bounded(self.call, self.inner.advance_fence(resource, token, now_ms)).await
    }

    async fn get_fence(&self, resource: &str) -> Result<Option<FenceRow>, StoreError> {
        bounded(self.call, self.inner.get_fence(resource)).await
    }

    async fn list_fences(&self) -> Result<Vec<FenceRow>, StoreError> {
        bounded(self.call, self.inner.list_fences()).await
    }

    async fn page_fences(&self, p: &PageQuery) -> Result<Page<FenceRow>, StoreError> {
        bounded(self.call, self.inner.page_fences(p)).await
    }

    async fn page_leases(&self, p: &PageQuery) -> Result<Page<LeaseRecord>, StoreError> {
        bounded(self.call, self.inner.page_leases(p)).await
    }

    async fn digest(&self) -> Result<Digest, StoreError> {
        bounded(self.call, self.inner.digest()).await
    }

    async fn replica_marks(&self, resources: &[String]) -> Result<Vec<ReplicaMark>, StoreError> {
        bounded(self.call, self.inner.replica_marks(resources)).await
    }

    async fn lease_apply(
        &self,
        resource: &str,
        op: &LeaseOp,
        now_ms: i64,
        cfg: &LeaseConfig,
    ) -> Result<LeaseOutcome, StoreError> {
        bounded(self.call, self.inner.lease_apply(resource, op, now_ms, cfg)).await
    }

    async fn get_lease(&self, resource: &str) -> Result<Option<LeaseRecord>, StoreError> {
        bounded(self.call, self.inner.get_lease(resource)).await
    }

    async fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        bounded(self.call, self.inner.list_leases()).await
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        bounded(self.audit, self.inner.append_audit(records)).await
    }

    async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        bounded(self.call, self.inner.query_audit(q)).await
    }

    async fn audit_chain_page(
        &self,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        bounded(self.audit, self.inner.audit_chain_page(after, limit)).await
    }

    async fn audit_unchained(&self) -> Result<u64, StoreError> {
        bounded(self.audit, self.inner.audit_unchained()).await
    }

    fn supports_tier(&self) -> bool {
        self.inner.supports_tier()
    }

    async fn replica_renew(
        &self,
        id: &str,
        addresses: &str,
        started_at_ms: i64,
        ttl_ms: i64,
        since: Option<i64>,
    ) -> Result<Renewal, StoreError> {
        bounded(
            self.call,
            self.inner
                .replica_renew(id, addresses, started_at_ms, ttl_ms, since),
        )
        .await
    }

    async fn advances_since(&self, since: i64) -> Result<Vec<TierAdvanceRow>, StoreError> {
        bounded(self.call, self.inner.advances_since(since)).await
    }

    async fn tier_advance(
        &self,
        resource: &str,
        token: u64,
        now_ms: i64,
    ) -> Result<TierAdvance, StoreError> {
        bounded(self.call, self.inner.tier_advance(resource, token, now_ms)).await
    }

    async fn replica_ack(&self, resource: &str, id: &str, token: u64) -> Result<(), StoreError> {
        bounded(self.call, self.inner.replica_ack(resource, id, token)).await
    }

    async fn pending_acks(
        &self,
        resource: &str,
        token: u64,
        seq: i64,
        me: &str,
    ) -> Result<Vec<String>, StoreError> {
        bounded(self.call, self.inner.pending_acks(resource, token, seq, me)).await
    }

    async fn list_replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        bounded(self.call, self.inner.list_replicas()).await
    }

    async fn replica_leave(&self, id: &str) -> Result<(), StoreError> {
        bounded(self.call, self.inner.replica_leave(id)).await
    }

    async fn replica_prune(&self, retention_ms: i64) -> Result<u64, StoreError> {
        bounded(self.call, self.inner.replica_prune(retention_ms)).await
    }

    async fn tier_notifications(&self) -> Result<Box<dyn Notifications>, StoreError> {
        bounded(self.call, self.inner.tier_notifications()).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::time::Instant;

    use super::*;

    /// Answers every call after `delay`.
    struct Slow {
        delay: Duration,
        calls: AtomicU64,
    }

    impl Slow {
        async fn wait(&self) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
        }
    }

    #[async_trait]
    impl Store for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        async fn migrate(&self) -> Result<(), StoreError> {
            self.wait().await;
            Ok(())
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.wait().await;
            Ok(())
        }
        async fn load_fence(&self, _: &str) -> Result<Option<u64>, StoreError> {
            self.wait().await;
            Ok(Some(7))
        }
        async fn advance_fence(&self, _: &str, token: u64, _: i64) -> Result<u64, StoreError> {
            self.wait().await;
            Ok(token)
        }
        async fn get_fence(&self, _: &str) -> Result<Option<FenceRow>, StoreError> {
            self.wait().await;
            Ok(None)
        }
        async fn list_fences(&self) -> Result<Vec<FenceRow>, StoreError> {
            self.wait().await;
            Ok(vec![])
        }
        async fn lease_apply(
            &self,
            _: &str,
            _: &LeaseOp,
            _: i64,
            _: &LeaseConfig,
        ) -> Result<LeaseOutcome, StoreError> {
            self.wait().await;
            Ok(LeaseOutcome::Exhausted)
        }
        async fn get_lease(&self, _: &str) -> Result<Option<LeaseRecord>, StoreError> {
            self.wait().await;
            Ok(None)
        }
        async fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
            self.wait().await;
            Ok(vec![])
        }
        async fn append_audit(&self, _: &[AuditRecord]) -> Result<(), StoreError> {
            self.wait().await;
            Ok(())
        }
        async fn query_audit(&self, _: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
            self.wait().await;
            Ok(vec![])
        }
        async fn audit_chain_page(
            &self,
            _: Option<(&str, u64)>,
            _: u32,
        ) -> Result<Vec<AuditRecord>, StoreError> {
            self.wait().await;
            Ok(vec![])
        }
        async fn audit_unchained(&self) -> Result<u64, StoreError> {
            self.wait().await;
            Ok(0)
        }
    }

    fn slow(delay_ms: u64) -> Slow {
        Slow {
            delay: Duration::from_millis(delay_ms),
            calls: AtomicU64::new(0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_slower_than_the_bound_is_unavailable_at_the_bound() {
        let s = TimedStore::new(slow(6_000), Duration::from_secs(2));
        let t = Instant::now();
        let e = s.load_fence("r").await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("2s"), "{e}");
        assert_eq!(t.elapsed().as_secs(), 2);
        assert!(matches!(
            s.advance_fence("r", 3, 0).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            s.list_leases().await,
            Err(StoreError::Unavailable(_))
        ));
    }

    /// The bound is the configured one, whatever its size: nothing below
    /// caps a long `store_timeout`.
    #[tokio::test(start_paused = true)]
    async fn a_bound_above_the_delay_lets_the_call_answer() {
        let s = TimedStore::new(slow(6_000), Duration::from_secs(8));
        assert_eq!(s.load_fence("r").await.unwrap(), Some(7));
        assert_eq!(s.advance_fence("r", 9, 0).await.unwrap(), 9);
        assert!(s.ping().await.is_ok());
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn audit_appends_get_at_least_the_audit_bound_and_migrations_none() {
        let s = TimedStore::new(slow(20_000), Duration::from_secs(2));
        assert!(s.append_audit(&[]).await.is_ok());
        assert!(s.migrate().await.is_ok());
        let s = TimedStore::new(slow(40_000), Duration::from_secs(2));
        assert!(matches!(
            s.append_audit(&[]).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
