//! The fence under adversarial schedules.
//!
//! The property test drives many writers with random tokens, random store
//! latency and failures and random time at the upstream through a
//! single-threaded executor, so proptest can shrink a failing interleaving.
//! The stress test does the same on real threads. Both check, at every
//! admission, the guarantees the proxies rely on:
//! - the mark never decreases;
//! - no token below the highest forwarded one is ever forwarded;
//! - a newer token is forwarded only once every older write has completed
//!   (drain), and only once it is durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

/// Records what "the upstream" saw and what the store holds.
#[derive(Default)]
struct World {
    durable: AtomicU64,
    state: Mutex<WorldState>,
}

#[derive(Default)]
struct WorldState {
    inflight: BTreeMap<u64, usize>,
    max_forwarded: Option<u64>,
    forwarded: usize,
    refused: usize,
    violations: Vec<String>,
}

struct TestStore {
    world: Arc<World>,
    yields: usize,
    fail: bool,
}

#[derive(Debug)]
struct Down;

impl Persist for TestStore {
    type Error = Down;
    fn persist(&self, token: u64) -> impl Future<Output = Result<u64, Down>> + Send {
        let world = Arc::clone(&self.world);
        let (yields, fail) = (self.yields, self.fail);
        async move {
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            if fail {
                return Err(Down);
            }
            Ok(world.durable.fetch_max(token, Ordering::SeqCst).max(token))
        }
    }
}

fn on_forward(world: &World, token: u64) {
    let mut s = world.state.lock().unwrap();
    if let Some((&lowest, _)) = s.inflight.iter().next() {
        if lowest < token {
            s.violations
                .push(format!("{token} forwarded while {lowest} still in flight"));
        }
    }
    if let Some(max) = s.max_forwarded {
        if token < max {
            s.violations.push(format!("{token} forwarded after {max}"));
        }
    }
    if world.durable.load(Ordering::SeqCst) < token {
        s.violations
            .push(format!("{token} forwarded before it was durable"));
    }
    s.max_forwarded = Some(s.max_forwarded.map_or(token, |m| m.max(token)));
    *s.inflight.entry(token).or_default() += 1;
    s.forwarded += 1;
}

fn on_complete(world: &World, token: u64) {
    let mut s = world.state.lock().unwrap();
    if let Some(n) = s.inflight.get_mut(&token) {
        *n -= 1;
        if *n == 0 {
            s.inflight.remove(&token);
        }
    }
}

#[derive(Debug, Clone)]
struct Op {
    token: u64,
    start_yields: usize,
    persist_yields: usize,
    persist_fails: bool,
    hold_yields: usize,
}

fn op() -> impl Strategy<Value = Op> {
    (
        0u64..12,
        0usize..6,
        0usize..4,
        prop::bool::weighted(0.1),
        0usize..6,
    )
        .prop_map(
            |(token, start_yields, persist_yields, persist_fails, hold_yields)| Op {
                token,
                start_yields,
                persist_yields,
                persist_fails,
                hold_yields,
            },
        )
}

async fn writer(slot: Arc<Slot>, world: Arc<World>, op: Op) {
    for _ in 0..op.start_yields {
        tokio::task::yield_now().await;
    }
    let store = TestStore {
        world: Arc::clone(&world),
        yields: op.persist_yields,
        fail: op.persist_fails,
    };
    let before = slot.mark();
    match slot.admit(op.token, &store).await {
        Ok(Verdict::Accepted(a)) => {
            on_forward(&world, op.token);
            for _ in 0..op.hold_yields {
                tokio::task::yield_now().await;
            }
            on_complete(&world, op.token);
            drop(a.guard);
        }
        Ok(Verdict::Stale { current }) => {
            let mut s = world.state.lock().unwrap();
            s.refused += 1;
            if current <= op.token {
                s.violations
                    .push(format!("{} refused as stale against {current}", op.token));
            }
        }
        Err(Down) => {}
    }
    if slot.mark() < before {
        world
            .state
            .lock()
            .unwrap()
            .violations
            .push("mark decreased".into());
    }
}

fn run_schedule(initial: u64, ops: Vec<Op>) -> WorldState {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let world = Arc::new(World::default());
    world.durable.store(initial, Ordering::SeqCst);
    let slot = Arc::new(Slot::new(initial));
    rt.block_on(async {
        let mut handles = vec![];
        for op in ops {
            handles.push(tokio::spawn(writer(
                Arc::clone(&slot),
                Arc::clone(&world),
                op,
            )));
        }
        // A monitor samples the mark between every scheduling step.
        let monitor = {
            let slot = Arc::clone(&slot);
            let world = Arc::clone(&world);
            tokio::spawn(async move {
                let mut last = slot.mark();
                for _ in 0..10_000 {
                    let m = slot.mark();
                    if m < last {
                        world
                            .state
                            .lock()
                            .unwrap()
                            .violations
                            .push(format!("mark went {last} -> {m}"));
                    }
                    last = m;
                    tokio::task::yield_now().await;
                }
            })
        };
        for h in handles {
            h.await.unwrap();
        }
        monitor.abort();
    });
    assert_eq!(slot.inflight(), 0, "guards leaked");
    let state = std::mem::take(&mut *world.state.lock().unwrap());
    state
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_never_admit_stale_or_skip_the_drain(
        initial in 0u64..4,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let n = ops.len();
        let s = run_schedule(initial, ops);
        prop_assert!(s.violations.is_empty(), "{:?}", s.violations);
        prop_assert!(s.forwarded + s.refused <= n);
    }
}

#[test]
fn stale_token_is_refused_with_the_current_mark() {
    let s = run_schedule(
        0,
        vec![
            Op {
                token: 5,
                start_yields: 0,
                persist_yields: 0,
                persist_fails: false,
                hold_yields: 0,
            },
            Op {
                token: 3,
                start_yields: 3,
                persist_yields: 0,
                persist_fails: false,
                hold_yields: 0,
            },
        ],
    );
    assert_eq!((s.forwarded, s.refused), (1, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn newer_token_waits_for_older_writes_to_complete() {
    let world = Arc::new(World::default());
    let slot = Arc::new(Slot::new(1));
    let store = TestStore {
        world: Arc::clone(&world),
        yields: 0,
        fail: false,
    };
    let Verdict::Accepted(old) = slot.admit(1, &store).await.unwrap() else {
        panic!("token 1 refused")
    };
    let newer = tokio::spawn({
        let slot = Arc::clone(&slot);
        let world = Arc::clone(&world);
        async move {
            let store = TestStore {
                world,
                yields: 0,
                fail: false,
            };
            slot.admit(2, &store)
                .await
                .map(|v| matches!(v, Verdict::Accepted(_)))
        }
    });
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        !newer.is_finished(),
        "token 2 admitted while a token-1 write was in flight"
    );
    // Token 1 is refused from the moment 2 claimed the mark.
    assert!(matches!(
        slot.admit(1, &store).await.unwrap(),
        Verdict::Stale { current: 2 }
    ));
    drop(old.guard);
    assert!(
        newer.await.unwrap().unwrap(),
        "token 2 never admitted after the drain"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn failed_or_cancelled_claims_can_be_retried() {
    let world = Arc::new(World::default());
    let slot = Arc::new(Slot::new(0));
    let failing = TestStore {
        world: Arc::clone(&world),
        yields: 0,
        fail: true,
    };
    assert!(
        slot.admit(4, &failing).await.is_err(),
        "store down must fail"
    );
    // Fail closed: the claim stands, older tokens are refused.
    assert!(matches!(
        slot.admit(3, &failing).await.unwrap(),
        Verdict::Stale { current: 4 }
    ));
    // Cancel a claimant mid-persist.
    let slow = TestStore {
        world: Arc::clone(&world),
        yields: 1000,
        fail: false,
    };
    let fut = slot.admit(4, &slow);
    let _ = tokio::time::timeout(std::time::Duration::from_millis(1), fut).await;
    let ok = TestStore {
        world: Arc::clone(&world),
        yields: 0,
        fail: false,
    };
    assert!(matches!(
        slot.admit(4, &ok).await.unwrap(),
        Verdict::Accepted(_)
    ));
    assert_eq!(world.durable.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_ahead_of_us_makes_the_token_stale() {
    let world = Arc::new(World::default());
    world.durable.store(9, Ordering::SeqCst); // another replica got to 9
    let slot = Arc::new(Slot::new(2));
    let store = TestStore {
        world,
        yields: 0,
        fail: false,
    };
    assert!(matches!(
        slot.admit(5, &store).await.unwrap(),
        Verdict::Stale { current: 9 }
    ));
    assert_eq!(slot.mark(), 9);
    assert!(matches!(
        slot.admit(9, &store).await.unwrap(),
        Verdict::Accepted(_)
    ));
}

#[test]
fn fast_path_counts_and_releases() {
    let slot = Arc::new(Slot::new(7));
    let guards: Vec<_> = (0..100).map(|_| slot.try_admit_fast(7).unwrap()).collect();
    assert_eq!(slot.inflight(), 100);
    assert!(slot.try_admit_fast(6).is_none());
    assert!(slot.try_admit_fast(8).is_none());
    drop(guards);
    assert_eq!(slot.inflight(), 0);
}

/// Real threads, real contention: writers hammer one slot while tokens
/// advance under them.
#[test]
fn threads_racing_failovers_keep_every_guarantee() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let world = Arc::new(World::default());
    let slot = Arc::new(Slot::new(0));
    let leader = Arc::new(AtomicU64::new(1));
    rt.block_on(async {
        let mut tasks = vec![];
        for w in 0..16u64 {
            let (slot, world, leader) =
                (Arc::clone(&slot), Arc::clone(&world), Arc::clone(&leader));
            tasks.push(tokio::spawn(async move {
                for i in 0..2_000u64 {
                    if w == 0 && i % 100 == 0 {
                        leader.fetch_add(1, Ordering::SeqCst);
                    }
                    // Writers see leadership late, as paused leaders do.
                    let token = leader.load(Ordering::SeqCst).saturating_sub((i + w) % 3);
                    let store = TestStore {
                        world: Arc::clone(&world),
                        yields: (i % 3) as usize,
                        fail: i % 97 == 0,
                    };
                    if let Ok(Verdict::Accepted(a)) = slot.admit(token, &store).await {
                        on_forward(&world, token);
                        if i % 5 == 0 {
                            tokio::task::yield_now().await;
                        }
                        on_complete(&world, token);
                        drop(a.guard);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let s = world.state.lock().unwrap();
    assert!(
        s.violations.is_empty(),
        "{:?}",
        &s.violations[..s.violations.len().min(5)]
    );
    assert!(
        s.forwarded > 1000,
        "too few writes admitted to mean anything: {}",
        s.forwarded
    );
    assert_eq!(slot.inflight(), 0);
}

#[test]
fn table_inserts_once_and_finds_by_str() {
    let t = FenceTable::new();
    let a = t.insert("orders", 3);
    let b = t.insert("orders", 99);
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(t.get("orders").unwrap().mark(), 3);
    t.insert_many([("a".to_string(), 1), ("orders".to_string(), 50)]);
    assert_eq!(t.get("orders").unwrap().mark(), 3);
    assert_eq!(t.len(), 2);
}

/// A remote advance (another replica made the token durable) refuses older
/// tokens at once, and `drained_below` waits for the older writes already
/// out; the first local write with the new token still claims it.
#[tokio::test]
async fn a_remote_raise_refuses_older_tokens_and_drains_them() {
    let world = Arc::new(World::default());
    let store = TestStore {
        world: Arc::clone(&world),
        yields: 0,
        fail: false,
    };
    let slot = Arc::new(Slot::new(4));
    let old = slot.try_admit_fast(4).expect("ready mark admits");
    assert!(slot.raise_to(6));
    assert!(!slot.raise_to(5), "never lowers");
    assert_eq!(slot.mark(), 6);
    assert!(slot.try_admit_fast(4).is_none());
    assert!(matches!(
        slot.admit(4, &store).await,
        Ok(Verdict::Stale { current: 6 })
    ));
    let drained = tokio::spawn({
        let slot = Arc::clone(&slot);
        async move { slot.drained_below(6).await }
    });
    tokio::task::yield_now().await;
    assert!(!drained.is_finished(), "the token-4 write is still out");
    drop(old);
    tokio::time::timeout(std::time::Duration::from_secs(5), drained)
        .await
        .expect("drained once the old write finished")
        .expect("join");
    // Not ready yet: the first local write with 6 goes through persist.
    assert!(slot.try_admit_fast(6).is_none());
    match slot.admit(6, &store).await {
        Ok(Verdict::Accepted(a)) => assert_eq!(a.advanced_from, None),
        other => panic!("expected admission, got {other:?}"),
    }
    assert_eq!(
        world.durable.load(Ordering::SeqCst),
        6,
        "persist was called"
    );
    assert!(slot.try_admit_fast(6).is_some(), "ready afterwards");
}
