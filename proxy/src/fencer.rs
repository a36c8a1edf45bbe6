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
    AuditRecord, FenceInput, FenceTable, Field, InflightGuard, InputError, Persist, Presented,
    Protocol, Reason, ResourceName, ResourceRef, Slot, TokenPolicy, TokenRejection, Verdict,
};
use store::{Store, StoreError};

use crate::audit_sink::AuditSink;
use crate::cluster::Tier;
use crate::metrics::{WriteCounters, ADVANCE_SECONDS, MARK};

/// Why a write was refused, with everything a protocol needs to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// The input a `missing` or `invalid` refusal is about.
    pub field: Option<Field>,
    pub resource: Option<ResourceName>,
    pub presented: Option<u64>,
    pub current: Option<u64>,
    /// A sentence for the client.
    pub message: String,
}

/// An admitted write: what it was admitted for, and the guard that holds
/// newer tokens' drains until the write is over.
#[derive(Debug)]
pub struct Admission<'a> {
    /// Forward; drop the guard when the upstream has finished the write.
    pub guard: InflightGuard,
    pub resource: ResourceRef<'a>,
    /// The token's number, verified.
    pub token: u64,
    /// When it was admitted, on the tier's clock (0 without a tier): what
    /// [`Fencer::still_leased`] is asked with just before the write goes
    /// upstream.
    pub leased_at: u64,
}

#[derive(Debug)]
pub enum Decision<'a> {
    Admit(Admission<'a>),
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
    /// The fencing tier this process is a replica of, if any.
    tier: Option<Arc<Tier>>,
}

/// Verifies tokens for one listener (each may have its own key), caching
/// verified signed tokens so a leader's steady stream of writes pays for
/// the Ed25519 check once.
#[derive(Clone)]
pub struct TokenChecker {
    policy: TokenPolicy,
    /// Keyed by a hash of (resource, number, signature); the value repeats
    /// them so a hash collision can never turn into an accepted token.
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

    /// Parses and verifies a token as text (`n` or `n.signature`).
    pub fn check(&self, resource: &str, raw: &str) -> Result<u64, TokenRejection> {
        self.verify(resource, Presented::parse(raw)?)
    }

    /// The number to fence `resource` with, for a token already parsed.
    pub fn verify(&self, resource: &str, presented: Presented) -> Result<u64, TokenRejection> {
        let (Some(cache), Presented::Signed { n, sig }) = (&self.cache, presented) else {
            // Plain tokens are cheap to check; only signatures are cached.
            return self.policy.verify(resource, presented);
        };
        let mut h = self.hasher.build_hasher();
        resource.hash(&mut h);
        n.hash(&mut h);
        sig.hash(&mut h);
        let key = h.finish();
        if let Some(hit) = cache.get(&key) {
            if &*hit.resource == resource && hit.n == n && hit.sig == sig {
                return Ok(n);
            }
        }
        let n = self.policy.verify(resource, presented)?;
        cache.insert(
            key,
            Arc::new(Verified {
                resource: resource.into(),
                n,
                sig,
            }),
        );
        Ok(n)
    }
}

/// A verified signed token: the entry repeats what its key hashes, so a
/// hash collision can never turn into an accepted token.
struct Verified {
    resource: Box<str>,
    n: u64,
    sig: [u8; fencing::signing::SIGNATURE_LEN],
}

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
    tier: Option<&'a Tier>,
    resource: &'a str,
}

impl Persist for StorePersist<'_> {
    type Error = StoreError;
    async fn persist(&self, token: u64) -> Result<u64, StoreError> {
        match self.tier {
            // Durable, and the rest of the tier raised and drained.
            Some(tier) => tier.advance(self.resource, token).await,
            None => {
                self.store
                    .advance_fence(self.resource, token, now_ms())
                    .await
            }
        }
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
            tier: None,
        }
    }

    /// Makes this fencer a replica of `tier`: advances wait for the tier,
    /// and nothing is admitted while the replica's lease is unconfirmed.
    pub fn with_tier(mut self, tier: Arc<Tier>) -> Self {
        self.tier = Some(tier);
        self
    }

    /// Whether this process is a replica of a tier (and so whether
    /// [`Fencer::still_leased`] can ever say no).
    pub fn tiered(&self) -> bool {
        self.tier.is_some()
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

    /// Decides one write from what it presents.
    pub async fn decide<'a>(
        &self,
        checker: &TokenChecker,
        counters: &WriteCounters,
        input: &FenceInput<'a>,
        info: &WriteInfo<'_>,
    ) -> Decision<'a> {
        let decided = match self.inputs(checker, input) {
            Ok((resource, token)) => self.admit(resource, token).await,
            Err(r) => Err(r),
        };
        self.conclude(counters, decided, info).await
    }

    /// Decides again a write admitted before with this verified number (a
    /// transaction block's write, at its COMMIT).
    pub async fn decide_again<'a>(
        &self,
        counters: &WriteCounters,
        resource: ResourceRef<'a>,
        token: u64,
        info: &WriteInfo<'_>,
    ) -> Decision<'a> {
        let decided = self.admit(resource, token).await;
        self.conclude(counters, decided, info).await
    }

    /// A session's steady state: a write presenting what the session's
    /// last admitted write presented (so its token verifies to `token`,
    /// verification being a function of the two), on the slot the session
    /// kept from that decision (slots are never replaced in the table).
    /// One CAS; `None` when the fast path does not apply (the mark moved,
    /// a drain is on, this replica is fenced), and the caller decides in
    /// full with [`Fencer::decide`].
    pub fn admit_held<'a>(
        &self,
        counters: &WriteCounters,
        slot: &Arc<Slot>,
        resource: ResourceRef<'a>,
        token: u64,
    ) -> Option<Admission<'a>> {
        let leased_at = match self.tier.as_deref() {
            Some(t) => t.stamp()?,
            None => 0,
        };
        let guard = slot.try_admit_fast(token)?;
        counters.accepted();
        Some(Admission {
            guard,
            resource,
            token,
            leased_at,
        })
    }

    /// The last look at an admitted write, taken immediately before its
    /// first byte is written to the upstream: whether this replica's lease
    /// has held without a break since the write was admitted at `leased_at`
    /// ([`Admission::leased_at`]). Always true off a tier; on one, one
    /// clock read and two atomic loads, no allocation.
    ///
    /// False means the write must not be forwarded: while the lease was
    /// out, the rest of the tier may have advanced without waiting for
    /// this replica (that is what a lease is for), so a write admitted
    /// before could land after a newer token's. Also after the lease was
    /// renewed: the renewal raised the marks it learnt, but cannot recall
    /// an admission already made. Refuse it with [`Fencer::lapsed`].
    ///
    /// What this narrows, and what it cannot close: a pause or stall
    /// between admission and this look (a SIGSTOP, a GC-like pause, an
    /// upstream slow to accept the connection, a full socket) is caught,
    /// however long. A pause between this look and the write system call
    /// (a few instructions, no system call between them), or of a process
    /// whose bytes are already written (sitting in socket buffers, or at
    /// an upstream that applies them late) is not: no check inside the
    /// proxy can see past its own write. For Postgres, guard mode
    /// (`enforce = "database"`) closes it: the check runs in the write's
    /// own transaction, atomic with the write.
    #[inline]
    pub fn still_leased(&self, leased_at: u64) -> bool {
        self.tier.as_deref().is_none_or(|t| t.held_since(leased_at))
    }

    /// After an admitted write's bytes have left for the upstream: when
    /// the replica lease lapsed at some instant since the admission, the
    /// process was held between its last look ([`Fencer::still_leased`])
    /// and the end of the write (a pause, a starved scheduler), which is
    /// the residue the look cannot close (docs/replicas.md,
    /// "Assumptions"). Nothing can be undone then; what this does is make
    /// it visible: `fencepost_writes_sent_after_lapse_total` and a warning
    /// naming the write, so an operator (and the tier checker, which reads
    /// the replicas' logs) can tell that residue from a fault in the
    /// protocol. The warning may also fire for a write that left just
    /// before the lapse but whose system call returned after it: it errs
    /// on the side of saying so. Off a tier, nothing (one branch).
    #[inline]
    pub fn note_sent(
        &self,
        leased_at: u64,
        protocol: &'static str,
        resource: Option<&str>,
        token: Option<u64>,
    ) {
        if self.still_leased(leased_at) {
            return;
        }
        metrics::counter!(crate::metrics::SENT_AFTER_LAPSE, "protocol" => protocol).increment(1);
        tracing::warn!(
            protocol,
            resource = resource.unwrap_or("-"),
            token = token.unwrap_or(0),
            "write sent after this replica's lease lapsed: the process was held between its \
             last look at the lease and the write, so the tier may have advanced without \
             waiting for it (docs/replicas.md, Assumptions)"
        );
    }

    /// Refuses a write that [`Fencer::still_leased`] stopped after its
    /// admission: `guard` (its in-flight hold, if the caller still has it)
    /// goes first, since the write never reaches the upstream and no drain
    /// need wait for it; then the refusal is counted and audited as
    /// `unavailable`, like every other ([`Fencer::refused`]). Resolves once
    /// the record is durable; answer the refusal (503 / ZF004) after.
    pub async fn lapsed(
        &self,
        counters: &WriteCounters,
        guard: Option<InflightGuard>,
        resource: Option<ResourceName>,
        token: Option<u64>,
        info: &WriteInfo<'_>,
    ) -> Refusal {
        drop(guard);
        let refusal = Refusal {
            reason: Reason::Unavailable,
            field: None,
            resource,
            presented: token,
            current: None,
            message: "fence state unavailable, write refused: this replica's lease in the \
                      fencing tier lapsed after the write was admitted and before it reached \
                      the upstream; retry"
                .into(),
        };
        self.refused(counters, &refusal, info).await;
        refusal
    }

    /// Counts an admission, or audits a refusal and waits until its record
    /// is durable: a refusal is answered only after that.
    async fn conclude<'a>(
        &self,
        counters: &WriteCounters,
        decided: Result<(Admission<'a>, bool), Refusal>,
        info: &WriteInfo<'_>,
    ) -> Decision<'a> {
        match decided {
            Ok((admission, advanced)) => {
                counters.accepted();
                if advanced {
                    self.publish_mark(admission.resource.as_str());
                }
                Decision::Admit(admission)
            }
            Err(refusal) => {
                self.refused(counters, &refusal, info).await;
                Decision::Refuse(refusal)
            }
        }
    }

    /// Every refusal, the proxies' and the database guard's, is audited,
    /// counted and logged here, once. The returned future resolves when
    /// its audit record is durable (store or spool); the refusal must not
    /// be answered before (guarantee 5).
    pub fn refused(
        &self,
        counters: &WriteCounters,
        refusal: &Refusal,
        info: &WriteInfo<'_>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        counters.refused(refusal.reason);
        let durable = self.audit.durable(AuditRecord::new(
            now_ms(),
            refusal.resource.as_ref().map(ResourceName::as_str),
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
            resource = refusal.resource.as_ref().map_or("", ResourceName::as_str),
            presented = refusal.presented,
            current = refusal.current,
            client = %info.client,
            "write refused"
        );
        durable
    }

    /// The resource and the verified number, or why the inputs cannot be
    /// decided on: a missing token first, then the resource, then the
    /// token's form and signature.
    fn inputs<'a>(
        &self,
        checker: &TokenChecker,
        input: &FenceInput<'a>,
    ) -> Result<(ResourceRef<'a>, u64), Refusal> {
        let refuse =
            |reason, field, resource: Option<ResourceRef<'_>>, presented, message| Refusal {
                reason,
                field: Some(field),
                resource: resource.map(|r| r.to_name()),
                presented,
                current: None,
                message,
            };
        let presented = match &input.token {
            Err(InputError::Missing) => {
                return Err(refuse(
                    Reason::Missing,
                    Field::Token,
                    input.resource.as_ref().ok().copied(),
                    None,
                    "this write carries no fencing token".into(),
                ))
            }
            t => t,
        };
        let resource = match &input.resource {
            Ok(r) => *r,
            Err(InputError::Missing) => {
                return Err(refuse(
                    Reason::Missing,
                    Field::Resource,
                    None,
                    None,
                    "this write names no fencing resource".into(),
                ))
            }
            Err(e) => {
                return Err(refuse(
                    Reason::Invalid,
                    Field::Resource,
                    None,
                    None,
                    format!("invalid resource: {e}"),
                ))
            }
        };
        let presented = match presented {
            Ok(p) => *p,
            Err(e) => {
                return Err(refuse(
                    Reason::Invalid,
                    Field::Token,
                    Some(resource),
                    None,
                    format!("invalid token: {e}"),
                ))
            }
        };
        let n = checker.verify(resource.as_str(), presented).map_err(|e| {
            let reason = if e.is_forged() {
                Reason::Forged
            } else {
                Reason::Invalid
            };
            refuse(
                reason,
                Field::Token,
                Some(resource),
                e.presented(),
                e.to_string(),
            )
        })?;
        Ok((resource, n))
    }

    /// The fence's verdict on a verified number; `true` with an admission
    /// that advanced the mark.
    async fn admit<'a>(
        &self,
        resource: ResourceRef<'a>,
        presented: u64,
    ) -> Result<(Admission<'a>, bool), Refusal> {
        let refuse = |reason, current, message| Refusal {
            reason,
            field: None,
            resource: Some(resource.to_name()),
            presented: Some(presented),
            current,
            message,
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            refuse(
                Reason::Unavailable,
                None,
                format!("fence state unavailable, write refused: {e}"),
            )
        };
        let tier = self.tier.as_deref();
        let self_fenced =
            || unavailable(&"this replica cannot confirm its lease in the fencing tier");
        // When the lease last held, for the last look before forwarding.
        let stamp = || match tier {
            Some(t) => t.stamp().ok_or_else(self_fenced),
            None => Ok(0),
        };
        let leased_at = stamp()?;
        let name = resource.as_str();
        let slot = self.slot(name).await.map_err(|e| unavailable(&e))?;
        let admission = |guard, leased_at| Admission {
            guard,
            resource,
            token: presented,
            leased_at,
        };
        // The steady state (the leader's token is the mark) needs no timer,
        // no store and no lock: one CAS.
        if let Some(guard) = slot.try_admit_fast(presented) {
            return Ok((admission(guard, leased_at), false));
        }
        let persist = StorePersist {
            store: &*self.store,
            tier,
            resource: name,
        };
        // On a tier an advance may also wait for a silent replica's lease
        // to run out.
        let bound = self.opts.drain_timeout + tier.map_or(Duration::ZERO, |t| t.ttl());
        let started = std::time::Instant::now();
        let verdict = tokio::time::timeout(bound, slot.admit(presented, &persist))
            .await
            .map_err(|_| unavailable(&"older writes did not finish within the drain timeout"))?
            .map_err(|e| unavailable(&e))?;
        match verdict {
            Verdict::Accepted(a) => {
                metrics::histogram!(ADVANCE_SECONDS).record(started.elapsed().as_secs_f64());
                // The wait may have outlasted this replica's own lease.
                let leased_at = stamp()?;
                Ok((admission(a.guard, leased_at), a.advanced_from.is_some()))
            }
            Verdict::Stale { current } => Err(refuse(
                Reason::Stale,
                Some(current),
                format!(
                    "stale fencing token for resource {name}: presented {presented}, current {current}"
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
            tier: self.tier.as_deref(),
            resource,
        };
        let mark = slot.fence_to(token, &persist).await?;
        self.publish_mark(resource);
        Ok(mark)
    }

    pub fn publish_mark(&self, resource: &str) {
        if !self.opts.resource_labels {
            return;
        }
        if let Some(slot) = self.table.get(resource) {
            metrics::gauge!(MARK, "resource" => resource.to_owned()).set(slot.mark() as f64);
        }
    }
}
