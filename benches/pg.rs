//! Where the nanoseconds of the Postgres proxy's per-message work go:
//! frame decoding of an extended-protocol batch, statement classification
//! (cache hit and miss), and token verification (cached and uncached).
//! Run: `cargo bench -p fencepost --bench pg`.
//!
//! The cached path is the proxy's own `TokenChecker` (the cache in front
//! of `TokenPolicy::check`), imported from the `fencepost` library.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use fencepost::TokenChecker;
use fencing::{Presented, Signer, TokenPolicy};
use wire::pg::frame::{split_frame, Frame};
use wire::pg::{Classifier, ClientMsg};

const MAX_FRAME: usize = 256 << 20;

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

/// What libpq sends for one `pgbench -M extended` statement: Parse (unnamed),
/// Bind (two text parameters), Describe portal, Execute, Sync.
fn extended_batch() -> BytesMut {
    let mut out = BytesMut::new();
    let mut body = BytesMut::new();
    cstr(&mut body, "");
    cstr(
        &mut body,
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    );
    body.put_i16(0);
    out.put_slice(Frame::new(b'P', &body).raw());

    let mut body = BytesMut::new();
    cstr(&mut body, "");
    cstr(&mut body, "");
    body.put_i16(0); // parameter formats: all text
    body.put_i16(2);
    for p in ["-4021", "731944"] {
        body.put_i32(p.len() as i32);
        body.put_slice(p.as_bytes());
    }
    body.put_i16(0); // result formats: all text
    out.put_slice(Frame::new(b'B', &body).raw());

    let mut body = BytesMut::new();
    body.put_u8(b'P');
    cstr(&mut body, "");
    out.put_slice(Frame::new(b'D', &body).raw());

    let mut body = BytesMut::new();
    cstr(&mut body, "");
    body.put_u32(0);
    out.put_slice(Frame::new(b'E', &body).raw());

    out.put_slice(Frame::new(b'S', &[]).raw());
    out
}

/// One `pgbench -M simple` statement: a Query message.
fn simple_query() -> BytesMut {
    let mut body = BytesMut::new();
    cstr(
        &mut body,
        "UPDATE pgbench_accounts SET abalance = abalance + -4021 WHERE aid = 731944;",
    );
    BytesMut::from(Frame::new(b'Q', &body).raw().as_ref())
}

/// Cuts every frame off the buffer and decodes it as the session does;
/// returns a checksum so nothing is optimized away.
fn decode_all(mut buf: BytesMut) -> usize {
    let mut n = 0;
    while let Some(frame) = split_frame(&mut buf, MAX_FRAME).expect("valid frame") {
        n += match frame.client().expect("valid message") {
            ClientMsg::Query(q) => q.len(),
            ClientMsg::Parse { name, query } => name.len() + query.len(),
            ClientMsg::Bind { portal, statement } => 1 + portal.len() + statement.len(),
            ClientMsg::Execute { max_rows, .. } => 2 + max_rows as usize,
            ClientMsg::Sync => 3,
            _ => 4,
        };
    }
    n
}

fn frames(c: &mut Criterion) {
    let batch = extended_batch();
    let query = simple_query();
    c.bench_function(
        "frame: copy Parse/Bind/Describe/Execute/Sync batch into a buffer",
        |b| b.iter(|| black_box(BytesMut::from(black_box(&batch[..])))),
    );
    c.bench_function(
        "frame: split + decode Parse/Bind/Describe/Execute/Sync",
        |b| {
            b.iter_batched(
                || batch.clone(),
                |buf| black_box(decode_all(buf)),
                BatchSize::SmallInput,
            )
        },
    );
    c.bench_function("frame: split + decode one Query", |b| {
        b.iter_batched(
            || query.clone(),
            |buf| black_box(decode_all(buf)),
            BatchSize::SmallInput,
        )
    });
}

const TPCB: &[&str] = &[
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
];

fn classify(c: &mut Criterion) {
    let fns = wire::pg::classify::DEFAULT_WRITE_FUNCTIONS;
    let classifier = Classifier::new(fns, 16 << 20);
    for t in TPCB {
        classifier.classify(t);
    }
    c.bench_function("classify cached: SELECT (cache hit)", |b| {
        b.iter(|| black_box(classifier.classify(black_box(TPCB[1]))))
    });
    c.bench_function("classify cached: INSERT pgbench_history (cache hit)", |b| {
        b.iter(|| black_box(classifier.classify(black_box(TPCB[4]))))
    });

    // A miss: every iteration sees a text the cache has not seen (a literal
    // differs, as with `-M simple`), so it pays the parse, the tree walk and
    // the insert. The cache is kept small so it evicts as it would under a
    // stream of one-off statements.
    let small = Classifier::new(fns, 256 << 10);
    let selects: Vec<String> = (0..200_000)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"))
        .collect();
    let updates: Vec<String> = (0..200_000)
        .map(|i| {
            format!("UPDATE pgbench_accounts SET abalance = abalance + -4021 WHERE aid = {i};")
        })
        .collect();
    let mut i = 0usize;
    c.bench_function("classify uncached: SELECT (parse + walk + insert)", |b| {
        b.iter(|| {
            i = (i + 1) % selects.len();
            black_box(small.classify(black_box(&selects[i])))
        })
    });
    let mut i = 0usize;
    c.bench_function("classify uncached: UPDATE (parse + walk + insert)", |b| {
        b.iter(|| {
            i = (i + 1) % updates.len();
            black_box(small.classify(black_box(&updates[i])))
        })
    });
}

fn tokens(c: &mut Criterion) {
    let signer = Signer::from_seed([7; 32]);
    let signed = signer.sign("bench", 42);
    let strict = TokenPolicy {
        verifier: Some(signer.verifier()),
        allow_plain: false,
    };
    let plain = TokenPolicy::plain();
    c.bench_function("token uncached: plain number (TokenPolicy::check)", |b| {
        b.iter(|| black_box(plain.check(black_box("bench"), black_box("42"))))
    });
    c.bench_function(
        "token uncached: signed, Ed25519 (TokenPolicy::check)",
        |b| b.iter(|| black_box(strict.check(black_box("bench"), black_box(&signed)))),
    );
    let cached = TokenChecker::new(strict, 100_000);
    assert_eq!(cached.check("bench", &signed), Ok(42));
    c.bench_function("token cached: signed, moka hit (TokenChecker)", |b| {
        b.iter(|| black_box(cached.check(black_box("bench"), black_box(&signed))))
    });
    // The Postgres session parses its token once, when it is set; each
    // write then verifies the parsed token.
    let parsed = Presented::parse(&signed).unwrap();
    c.bench_function(
        "token cached: signed, parsed once, moka hit (TokenChecker::verify)",
        |b| b.iter(|| black_box(cached.verify(black_box("bench"), black_box(parsed)))),
    );
}

criterion_group!(benches, frames, classify, tokens);
criterion_main!(benches);
