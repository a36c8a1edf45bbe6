//! The decision service both proxies call: resource and token in, verdict
//! out, with the store I/O, token verification cache, audit and metrics
//! around the pure core's [`fencing::Slot::admit`].
//!
//! Refusals are audited here, in one place, so no protocol front-end can
//! forget one (guarantee 5), and the store is consulted here, so every
//! front-end fails closed the same way (guarantee 4).

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fencing::{
    Admitted, AuditRecord, FenceTable, Persist, Protocol, Reason, Slot, TokenPolicy,
    TokenRejection, Verdict,
};
use store::{Store, StoreError};

use crate::audit_sink::AuditSink;
use crate::metrics::{WriteCounters, MARK};

/// Why a write was refused, with everything a protocol needs to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub resource: Option<String>,
    pub presented: Option<u64>,
    pub current: Option<u64>,
    /// A sentence for the client.
    pub message: String,
}

#[derive(Debug)]
pub enum Decision {
    /// Forward; drop the guard when the upstream has finished the write.
    Admit(Admitted),
    Refuse(Refusal),
}

/// Settings the decision path needs. (The store bounds its own calls by
/// `store_timeout`: see [`store::open`].)
#[derive(Debug, Clone, Copy)]
pub struct FencerOptions {
    pub drain_timeout: Duration,
    pub resource_labels: bool,
}

/// Shared by every listener of a process: one fence table, one store.
pub struct Fencer {
    table: FenceTable,
    store: Arc<dyn Store>,
    audit: AuditSink,
    opts: FencerOptions,
}

/// Verifies tokens for one listener (each may have its own key), caching
/// verified signed tokens so a leader's steady stream of writes pays for
/// the Ed25519 check once.
#[derive(Clone)]
pub struct TokenChecker {
    policy: TokenPolicy,
    /// Keyed by a hash of (resource, token text); the value repeats both so
    /// a hash collision can never turn into an accepted token.
    cache: Option<moka::sync::Cache<u64, Arc<Verified>>>,
    hasher: ahash::RandomState,
}

impl TokenChecker {
    pub fn new(policy: TokenPolicy, cache_size: u64) -> Self {
        let cache = (policy.verifier.is_some() && cache_size > 0)
            .then(|| moka::sync::Cache::new(cache_size));
        TokenChecker {
            policy,
            cache,
            hasher: ahash::RandomState::new(),
        }
    }

    pub fn plain() -> Self {
        Self::new(TokenPolicy::plain(), 0)
    }

    pub fn check(&self, resource: &str, raw: &str) -> Result<u64, TokenRejection> {
        let Some(cache) = &self.cache else {
            return self.policy.check(resource, raw);
        };
        if !raw.contains('.') {
            // Plain tokens are cheap to parse; only signatures are cached.
            return self.policy.check(resource, raw);
        }
        let mut h = self.hasher.build_hasher();
        resource.hash(&mut h);
        raw.hash(&mut h);
        let key = h.finish();
        if let Some(hit) = cache.get(&key) {
            if &*hit.0 == resource && &*hit.1 == raw {
                return Ok(hit.2);
            }
        }
        let n = self.policy.check(resource, raw)?;
        cache.insert(key, Arc::new((resource.into(), raw.into(), n)));
        Ok(n)
    }
}

/// A verified token: resource, token text and its number.
type Verified = (Box<str>, Box<str>, u64);

/// What the caller knows about the write, for refusals and the audit log.
pub struct WriteInfo<'a> {
    pub protocol: Protocol,
    pub client: SocketAddr,
    /// Method and path, or a statement fingerprint. Built only on refusal.
    /// `Sync` so a protocol task holding it across the decision stays `Send`.
    pub detail: &'a (dyn Fn() -> String + Sync),
}

struct StorePersist<'a> {
    store: &'a dyn Store,
    resource: &'a str,
}

impl Persist for StorePersist<'_> {
    type Error = StoreError;
    async fn persist(&self, token: u64) -> Result<u64, StoreError> {
        self.store
            .advance_fence(self.resource, token, now_ms())
            .await
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Fencer {
    /// `store` must bound its calls (the runtime's is opened with
    /// `store_timeout` by [`store::open`]): every store call of a
    /// decision then fails closed in time (guarantee 4).
    pub fn new(store: Arc<dyn Store>, audit: AuditSink, opts: FencerOptions) -> Self {
        Fencer {
            table: FenceTable::new(),
            store,
            audit,
            opts,
        }
    }

    pub fn table(&self) -> &FenceTable {
        &self.table
    }

    /// `[fencing] drain_timeout`: also guard mode's default `guard_wait`.
    pub fn drain_timeout(&self) -> Duration {
        self.opts.drain_timeout
    }

    /// The resource's slot, loading its durable mark on first sight. Fails
    /// closed: without the stored mark we cannot know what is stale.
    pub async fn slot(&self, resource: &str) -> Result<Arc<Slot>, StoreError> {
        if let Some(slot) = self.table.get(resource) {
            return Ok(slot);
        }
        let loaded = self.store.load_fence(resource).await?;
        Ok(self.table.insert(resource, loaded.unwrap_or(0)))
    }

    /// Decides one write. Refusals are audited and counted here.
    pub async fn decide(
        &self,
        checker: &TokenChecker,
        counters: &WriteCounters,
        resource: Option<&str>,
        token: Option<&str>,
        info: &WriteInfo<'_>,
    ) -> Decision {
        let refusal = match self.try_decide(checker, resource, token).await {
            Ok(admitted) => {
                counters.accepted();
                if admitted.advanced_from.is_some() {
                    if let Some(r) = resource {
                        self.publish_mark(r);
                    }
                }
                return Decision::Admit(admitted);
            }
            Err(r) => r,
        };
        counters.refused(refusal.reason);
        self.audit.record(AuditRecord::new(
            now_ms(),
            refusal.resource.as_deref(),
            info.protocol,
            refusal.reason,
            refusal.presented,
            refusal.current,
            info.client.to_string(),
            &(info.detail)(),
        ));
        tracing::info!(
            protocol = info.protocol.as_str(),
            reason = refusal.reason.as_str(),
            resource = refusal.resource.as_deref().unwrap_or(""),
            presented = refusal.presented,
            current = refusal.current,
            client = %info.client,
            "write refused"
        );
        Decision::Refuse(refusal)
    }

    async fn try_decide(
        &self,
        checker: &TokenChecker,
        resource: Option<&str>,
        token: Option<&str>,
    ) -> Result<Admitted, Refusal> {
        let refuse =
            |reason, resource: Option<&str>, presented, current, message: String| Refusal {
                reason,
                resource: resource.map(str::to_owned),
                presented,
                current,
                message,
            };
        let Some(raw) = token else {
            return Err(refuse(
                Reason::Missing,
                resource.filter(|r| fencing::resource::validate(r).is_ok()),
                None,
                None,
                "this write carries no fencing token".into(),
            ));
        };
        let Some(resource) = resource else {
            return Err(refuse(
                Reason::Missing,
                None,
                None,
                None,
                "this write names no fencing resource".into(),
            ));
        };
        if let Err(e) = fencing::resource::validate(resource) {
            return Err(refuse(
                Reason::Invalid,
                None,
                None,
                None,
                format!("invalid resource: {e}"),
            ));
        }
        let presented = checker.check(resource, raw).map_err(|e| {
            let reason = if e.is_forged() {
                Reason::Forged
            } else {
                Reason::Invalid
            };
            refuse(reason, Some(resource), e.presented(), None, e.to_string())
        })?;
        let unavailable = |e: &dyn std::fmt::Display| {
            refuse(
                Reason::Unavailable,
                Some(resource),
                Some(presented),
                None,
                format!("fence state unavailable, write refused: {e}"),
            )
        };
        let slot = self.slot(resource).await.map_err(|e| unavailable(&e))?;
        // The steady state (the leader's token is the mark) needs no timer,
        // no store and no lock: one CAS.
        if let Some(guard) = slot.try_admit_fast(presented) {
            return Ok(Admitted {
                guard,
                advanced_from: None,
            });
        }
        let persist = StorePersist {
            store: &*self.store,
            resource,
        };
        let verdict =
            tokio::time::timeout(self.opts.drain_timeout, slot.admit(presented, &persist))
                .await
                .map_err(|_| unavailable(&"older writes did not finish within the drain timeout"))?
                .map_err(|e| unavailable(&e))?;
        match verdict {
            Verdict::Accepted(a) => Ok(a),
            Verdict::Stale { current } => Err(refuse(
                Reason::Stale,
                Some(resource),
                Some(presented),
                Some(current),
                format!(
                    "stale fencing token for resource {resource}: presented {presented}, current {current}"
                ),
            )),
        }
    }

    /// Raises a resource's mark without a write: the elector granted a new
    /// lease, so the old leader is fenced before the new one writes.
    pub async fn fence_to(&self, resource: &str, token: u64) -> Result<u64, StoreError> {
        let slot = self.slot(resource).await?;
        let persist = StorePersist {
            store: &*self.store,
            resource,
        };
        let mark = slot.fence_to(token, &persist).await?;
        self.publish_mark(resource);
        Ok(mark)
    }

    fn publish_mark(&self, resource: &str) {
        if !self.opts.resource_labels {
            return;
        }
        if let Some(slot) = self.table.get(resource) {
            metrics::gauge!(MARK, "resource" => resource.to_owned()).set(slot.mark() as f64);
        }
    }
}
