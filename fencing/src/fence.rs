//! The fence table: per-resource high-water marks with an atomic
//! compare-and-advance, and the in-flight accounting that makes the drain of
//! guarantee 2 possible.
//!
//! # The rules
//! A write with token `t` on a resource whose mark is `h`:
//! - `t < h`: stale, refused, never forwarded.
//! - `t = h`: admitted at once, provided the mark is *ready* (durable and
//!   drained, see below).
//! - `t > h`: the caller *claims* `t`. From that instant the mark is `t`, so
//!   every older token is refused. The claimant then makes `t` durable through
//!   the [`Persist`] it was given, waits until every write admitted under an
//!   older token has finished (its [`InflightGuard`] dropped), and only then
//!   is it admitted. The mark becomes *ready* and later writes with `t` take
//!   the fast path.
//!
//! Checking a token and then forwarding a write is a race against a newer
//! leader; this module closes it by making admission and in-flight
//! registration one atomic step, and by refusing to admit a newer token
//! while older writes are still out.
//!
//! # The fast path
//! `t = h` with a ready mark is one atomic load and one compare-and-swap on
//! a word packing `[ready:1][generation:31][count:32]`, with no lock, no
//! allocation and no I/O. Every claim bumps the generation, so a write that
//! raced a claim either lands in the old generation (and is waited for by
//! the drain) or fails its CAS and goes the slow way, where it is refused.
//!
//! # The slow path
//! Claims, waits and guards that outlived their generation take a short
//! `std::sync::Mutex`, which is never held across an `.await`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

const READY: u64 = 1 << 63;
const GEN_SHIFT: u32 = 32;
const GEN_MASK: u64 = (1 << 31) - 1;
const COUNT_MASK: u64 = (1 << 32) - 1;

fn generation(word: u64) -> u64 {
    (word >> GEN_SHIFT) & GEN_MASK
}

fn count(word: u64) -> u64 {
    word & COUNT_MASK
}

/// Makes a token durable in the store. Returns the durable mark afterwards,
/// which is above `token` when some other replica has already advanced past
/// it. The fence calls it with no lock held.
pub trait Persist {
    type Error;
    fn persist(&self, token: u64) -> impl Future<Output = Result<u64, Self::Error>> + Send;
}

/// The outcome of [`Slot::admit`].
#[derive(Debug)]
pub enum Verdict {
    /// Forward the write; drop the guard when the upstream has answered.
    Accepted(Admitted),
    /// Refuse: the token is below the mark.
    Stale { current: u64 },
}

/// An admitted write.
#[derive(Debug)]
pub struct Admitted {
    pub guard: InflightGuard,
    /// The mark this write advanced from, if it advanced it.
    pub advanced_from: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    /// Highest token known durable in the store.
    durable: u64,
    /// Writes admitted under an older generation that have not finished.
    older: u64,
    /// The claim currently making the mark durable and draining, if any.
    claimant: Option<u64>,
    next_claim: u64,
}

/// One resource's fence.
#[derive(Debug)]
pub struct Slot {
    mark: AtomicU64,
    current: AtomicU64,
    inner: Mutex<Inner>,
    changed: Notify,
}

/// Marks a write as in flight at the upstream. Dropping it is how the fence
/// learns the write has completed, so hold it until the upstream's answer
/// (or failure) is known.
#[derive(Debug)]
pub struct InflightGuard {
    slot: Arc<Slot>,
    generation: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut word = self.slot.current.load(SeqCst);
        loop {
            if generation(word) != self.generation {
                // A claim moved this write into the drain set.
                let mut inner = self.slot.lock();
                inner.older = inner.older.saturating_sub(1);
                if inner.older == 0 {
                    self.slot.changed.notify_waiters();
                }
                return;
            }
            match self
                .slot
                .current
                .compare_exchange_weak(word, word - 1, SeqCst, SeqCst)
            {
                Ok(_) => return,
                Err(now) => word = now,
            }
        }
    }
}

/// Undoes a claim that did not reach admission (store failed, caller
/// cancelled), so a later writer with the same token can claim again.
struct ClaimGuard<'a> {
    slot: &'a Slot,
    id: u64,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.slot.lock();
        if inner.claimant == Some(self.id) {
            inner.claimant = None;
        }
        drop(inner);
        self.slot.changed.notify_waiters();
    }
}

enum Step {
    Stale(u64),
    Wait,
    Claim { id: u64, from: u64 },
}

impl Slot {
    /// A slot whose mark `token` is already durable (loaded from the store).
    pub fn new(token: u64) -> Slot {
        Slot {
            mark: AtomicU64::new(token),
            current: AtomicU64::new(READY),
            inner: Mutex::new(Inner {
                durable: token,
                older: 0,
                claimant: None,
                next_claim: 0,
            }),
            changed: Notify::new(),
        }
    }

    /// The high-water mark: the highest token admitted or claimed.
    pub fn mark(&self) -> u64 {
        self.mark.load(SeqCst)
    }

    /// Writes currently in flight (current and draining).
    pub fn inflight(&self) -> u64 {
        let inner = self.lock();
        count(self.current.load(SeqCst)) + inner.older
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections below cannot panic midway, so a poisoned lock
        // still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hot path: `token` equals a ready mark. No lock, no allocation.
    pub fn try_admit_fast(self: &Arc<Self>, token: u64) -> Option<InflightGuard> {
        let mut word = self.current.load(SeqCst);
        loop {
            if word & READY == 0 || self.mark.load(SeqCst) != token {
                return None;
            }
            if count(word) == COUNT_MASK {
                return None;
            }
            match self
                .current
                .compare_exchange_weak(word, word + 1, SeqCst, SeqCst)
            {
                Ok(_) => {
                    // A claim stores its new mark *before* it swaps the
                    // generation, and the swap and this CAS are ordered on
                    // the same word: either our count landed in the old
                    // generation (and the claimant drains it) or the CAS
                    // failed and we retry into the slow path.
                    return Some(InflightGuard {
                        slot: Arc::clone(self),
                        generation: generation(word),
                    });
                }
                Err(now) => word = now,
            }
        }
    }

    /// Moves the mark to `to` and the current generation's writes into the
    /// drain set. Caller holds the lock.
    fn raise(&self, inner: &mut Inner, to: u64) {
        self.mark.store(to, SeqCst);
        let next = ((generation(self.current.load(SeqCst)) + 1) & GEN_MASK) << GEN_SHIFT;
        let old = self.current.swap(next, SeqCst);
        inner.older += count(old);
        // Wake a superseded claimant so it answers "stale" now, not after
        // the drain it was waiting for.
        self.changed.notify_waiters();
    }

    /// Decides a write with `token`, making a new mark durable through
    /// `store` first. Cancel-safe: dropping the future at any await leaves
    /// the slot consistent and lets another writer claim.
    pub async fn admit<P: Persist>(
        self: &Arc<Self>,
        token: u64,
        store: &P,
    ) -> Result<Verdict, P::Error> {
        loop {
            if let Some(guard) = self.try_admit_fast(token) {
                return Ok(Verdict::Accepted(Admitted {
                    guard,
                    advanced_from: None,
                }));
            }
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            let step = {
                let mut inner = self.lock();
                let mark = self.mark.load(SeqCst);
                if token < mark {
                    Step::Stale(mark)
                } else if token > mark {
                    self.raise(&mut inner, token);
                    inner.next_claim += 1;
                    let id = inner.next_claim;
                    inner.claimant = Some(id);
                    Step::Claim { id, from: mark }
                } else if self.current.load(SeqCst) & READY != 0 {
                    continue; // became ready meanwhile: fast path again
                } else if inner.claimant.is_some() {
                    Step::Wait
                } else {
                    // A previous claimant failed or gave up; take over.
                    inner.next_claim += 1;
                    let id = inner.next_claim;
                    inner.claimant = Some(id);
                    Step::Claim { id, from: mark }
                }
            };
            match step {
                Step::Stale(current) => return Ok(Verdict::Stale { current }),
                Step::Wait => changed.await,
                Step::Claim { id, from } => {
                    return self.finish_claim(token, id, from, store).await;
                }
            }
        }
    }

    async fn finish_claim<P: Persist>(
        self: &Arc<Self>,
        token: u64,
        id: u64,
        from: u64,
        store: &P,
    ) -> Result<Verdict, P::Error> {
        let _claim = ClaimGuard { slot: self, id };
        let durable = store.persist(token).await?;
        {
            let mut inner = self.lock();
            inner.durable = inner.durable.max(durable);
            if durable > self.mark.load(SeqCst) {
                // Another replica is ahead of us: adopt its mark.
                self.raise(&mut inner, durable);
            }
        }
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            {
                let mut inner = self.lock();
                let mark = self.mark.load(SeqCst);
                if mark != token || inner.claimant != Some(id) {
                    return Ok(Verdict::Stale { current: mark });
                }
                if inner.older == 0 && inner.durable >= token {
                    inner.claimant = None;
                    let gen = generation(self.current.load(SeqCst));
                    // Nobody else touches `current` while it is not ready.
                    self.current.store(READY | (gen << GEN_SHIFT) | 1, SeqCst);
                    drop(inner);
                    self.changed.notify_waiters();
                    let advanced_from = (from < token).then_some(from);
                    return Ok(Verdict::Accepted(Admitted {
                        guard: InflightGuard {
                            slot: Arc::clone(self),
                            generation: gen,
                        },
                        advanced_from,
                    }));
                }
            }
            changed.await;
        }
    }

    /// Another replica of the tier made `token` durable: raise the mark to
    /// it now, so every older token is refused from this instant, without
    /// a store call (the store already holds it). Not *ready*: the first
    /// local write with `token` still claims it, and its [`Persist`] waits
    /// for the rest of the tier. Returns whether the mark moved.
    pub fn raise_to(&self, token: u64) -> bool {
        let mut inner = self.lock();
        inner.durable = inner.durable.max(token);
        if token > self.mark.load(SeqCst) {
            self.raise(&mut inner, token);
            true
        } else {
            false
        }
    }

    /// Resolves once no write with a token below `token` is in flight
    /// here: the mark is at least `token` and every write admitted under an
    /// older generation has finished. (Writes of the current generation
    /// carry the mark itself.) Call after [`Slot::raise_to`].
    pub async fn drained_below(&self, token: u64) {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            {
                let inner = self.lock();
                if self.mark.load(SeqCst) >= token && inner.older == 0 {
                    return;
                }
            }
            changed.await;
        }
    }

    /// Raises the mark to `token` without a write (a grant seen on the
    /// elector's watch stream), so the old leader is refused before the new
    /// one writes anything. Returns the mark afterwards.
    pub async fn fence_to<P: Persist>(
        self: &Arc<Self>,
        token: u64,
        store: &P,
    ) -> Result<u64, P::Error> {
        match self.admit(token, store).await? {
            Verdict::Accepted(_guard) => Ok(token),
            Verdict::Stale { current } => Ok(current),
        }
    }
}

type Map = HashMap<Box<str>, Arc<Slot>, ahash::RandomState>;

/// All fences of one process, keyed by resource name.
///
/// Lookups are lock-free reads of an immutable map; adding a resource copies
/// the map. Resources are created rarely and looked up on every write, so
/// this trades a copy per new resource for a lock-free hot path.
pub struct FenceTable {
    map: ArcSwap<Map>,
    insert: Mutex<()>,
}

impl Default for FenceTable {
    fn default() -> Self {
        FenceTable {
            map: ArcSwap::from_pointee(Map::default()),
            insert: Mutex::new(()),
        }
    }
}

impl FenceTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot of a resource this process already knows.
    pub fn get(&self, resource: &str) -> Option<Arc<Slot>> {
        self.map.load().get(resource).cloned()
    }

    /// Adds a resource whose durable mark was just read from the store. If
    /// another task added it meanwhile, that slot wins (its mark can only be
    /// at least as fresh).
    pub fn insert(&self, resource: &str, durable: u64) -> Arc<Slot> {
        let _g = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.map.load();
        if let Some(slot) = map.get(resource) {
            return Arc::clone(slot);
        }
        let slot = Arc::new(Slot::new(durable));
        let mut next: Map = (**map).clone();
        next.insert(resource.into(), Arc::clone(&slot));
        self.map.store(Arc::new(next));
        slot
    }

    /// Adds many resources at once (startup), one copy of the map in all.
    pub fn insert_many(&self, marks: impl IntoIterator<Item = (String, u64)>) {
        let _g = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: Map = (**self.map.load()).clone();
        for (resource, mark) in marks {
            next.entry(resource.into_boxed_str())
                .or_insert_with(|| Arc::new(Slot::new(mark)));
        }
        self.map.store(Arc::new(next));
    }

    /// Every known resource and its mark.
    pub fn marks(&self) -> Vec<(String, u64)> {
        self.map
            .load()
            .iter()
            .map(|(k, v)| (k.to_string(), v.mark()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
