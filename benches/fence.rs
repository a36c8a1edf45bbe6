//! Where the nanoseconds of a fencing decision go: the same-token fast
//! path, an advance, a stale refusal, and token parsing/verification.
//! Run: `cargo bench -p fencepost --bench fence`.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use fencing::{FenceTable, Persist, Signer, Slot, TokenPolicy, Verdict};

/// A store that answers at once, so only the fence's own cost is measured.
struct Instant;

impl Persist for Instant {
    type Error = ();
    fn persist(&self, token: u64) -> impl Future<Output = Result<u64, ()>> + Send {
        std::future::ready(Ok(token))
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    // The futures here never pend (the store answers at once, nothing is in
    // flight to drain), so one poll suffices.
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("benchmark future pended"),
    }
}

fn fence(c: &mut Criterion) {
    let table = FenceTable::new();
    table.insert_many((0..10_000).map(|i| (format!("shard/{i}"), 5)));
    let slot = table.insert("orders", 5);

    c.bench_function("same token: table lookup + fast path + guard drop", |b| {
        b.iter(|| {
            let slot = table
                .get(black_box("orders"))
                .unwrap_or_else(|| Arc::new(Slot::new(0)));
            black_box(slot.try_admit_fast(black_box(5)));
        })
    });
    c.bench_function("same token: fast path + guard drop", |b| {
        b.iter(|| black_box(slot.try_admit_fast(black_box(5))))
    });
    c.bench_function("same token: full admit()", |b| {
        b.iter(|| black_box(block_on(slot.admit(black_box(5), &Instant))))
    });
    c.bench_function("stale token refused", |b| {
        b.iter(|| match block_on(slot.admit(black_box(4), &Instant)) {
            Ok(Verdict::Stale { current }) => black_box(current),
            _ => panic!("not stale"),
        })
    });
    let advancing = Arc::new(Slot::new(0));
    let mut next = 0u64;
    c.bench_function("advance to a newer token (instant store)", |b| {
        b.iter(|| {
            next += 1;
            black_box(block_on(advancing.admit(next, &Instant)))
        })
    });
}

fn tokens(c: &mut Criterion) {
    let signer = Signer::from_seed([3; 32]);
    let signed = signer.sign("orders", 42);
    let plain = TokenPolicy::plain();
    let strict = TokenPolicy {
        verifier: Some(signer.verifier()),
        allow_plain: false,
    };
    c.bench_function("parse plain token", |b| {
        b.iter(|| black_box(plain.check(black_box("orders"), black_box("18446744073709551615"))))
    });
    c.bench_function("verify signed token (uncached Ed25519)", |b| {
        b.iter(|| black_box(strict.check(black_box("orders"), black_box(&signed))))
    });
}

criterion_group!(benches, fence, tokens);
criterion_main!(benches);
