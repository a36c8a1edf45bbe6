//! The chain's claims, as properties: an intact chain verifies, and any
//! change to any field, any deletion inside a chain, any reordering and any
//! insertion is named; and what it cannot catch (a dropped tail) is shown
//! too, so the docs' limits are tested rather than asserted.

use proptest::prelude::*;

use super::*;
use crate::audit::{AuditReason, Kind, LeaseReason, Protocol, Reason};

fn arb_text() -> impl Strategy<Value = String> {
    // Any text, with the characters most likely to trip an encoding.
    prop_oneof![
        "[a-z0-9/._:-]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(20).collect()),
        Just(String::new()),
    ]
}

fn arb_record() -> impl Strategy<Value = AuditRecord> {
    (
        any::<i64>(),
        0..Kind::ALL.len(),
        proptest::option::of(arb_text()),
        proptest::option::of(arb_text()),
        0..3usize,
        0..(Reason::ALL.len() + LeaseReason::ALL.len()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        arb_text(),
        arb_text(),
        proptest::option::of(arb_text()),
    )
        .prop_map(
            |(
                at_ms,
                kind,
                resource,
                holder,
                proto,
                reason,
                presented,
                current,
                client,
                detail,
                identity,
            )| {
                AuditRecord {
                    id: None,
                    at_ms,
                    kind: Kind::ALL[kind],
                    resource,
                    holder,
                    protocol: [Protocol::Http, Protocol::Postgres, Protocol::Elector][proto],
                    reason: reason_at(reason),
                    presented_token: presented,
                    current_token: current,
                    client_addr: client,
                    detail,
                    identity,
                    chain: None,
                }
            },
        )
}

fn reason_at(i: usize) -> AuditReason {
    match Reason::ALL.get(i) {
        Some(r) => AuditReason::Write(*r),
        None => {
            AuditReason::Lease(LeaseReason::ALL[(i - Reason::ALL.len()) % LeaseReason::ALL.len()])
        }
    }
}

fn reason_index(r: AuditReason) -> usize {
    match r {
        AuditReason::Write(w) => Reason::ALL.iter().position(|x| *x == w).unwrap_or(0),
        AuditReason::Lease(l) => {
            Reason::ALL.len() + LeaseReason::ALL.iter().position(|x| *x == l).unwrap_or(0)
        }
    }
}

/// A chain as its writer makes it, with store ids 1..
fn chained(chain: &str, records: Vec<AuditRecord>, first_id: i64) -> Vec<AuditRecord> {
    let mut c = Chainer::new(chain);
    records
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            c.link(&mut r);
            r.id = Some(first_id + i as i64);
            r
        })
        .collect()
}

/// Reads like `fencepost audit verify` does: ordered by (chain, seq, id),
/// every mismatch in order.
fn verify(records: &[AuditRecord]) -> Vec<Mismatch> {
    let mut sorted: Vec<&AuditRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.chain.as_ref().map(|l| (l.chain.clone(), l.seq)), r.id));
    verify_in_order(sorted)
}

fn verify_in_order<'a>(records: impl IntoIterator<Item = &'a AuditRecord>) -> Vec<Mismatch> {
    let mut v = ChainVerifier::new();
    records
        .into_iter()
        .filter_map(|r| v.push(r).err())
        .collect()
}

/// Changes field `which` of `r` to a different value.
fn mutate(r: &mut AuditRecord, which: usize) {
    fn other(s: &str) -> String {
        format!("{s}x")
    }
    let kinds = Kind::ALL.len();
    let reasons = Reason::ALL.len() + LeaseReason::ALL.len();
    match which {
        0 => r.at_ms = r.at_ms.wrapping_add(1),
        1 => {
            let i = Kind::ALL.iter().position(|k| *k == r.kind).unwrap_or(0);
            r.kind = Kind::ALL[(i + 1) % kinds];
        }
        2 => {
            r.resource = r
                .resource
                .as_deref()
                .map_or(Some(String::new()), |s| Some(other(s)))
        }
        3 => {
            r.holder = if r.holder.is_some() {
                None
            } else {
                Some("h".into())
            }
        }
        4 => {
            r.protocol = match r.protocol {
                Protocol::Http => Protocol::Postgres,
                Protocol::Postgres => Protocol::Elector,
                Protocol::Elector => Protocol::Http,
            }
        }
        5 => r.reason = reason_at((reason_index(r.reason) + 1) % reasons),
        6 => r.presented_token = r.presented_token.map_or(Some(0), |t| t.checked_add(1)),
        7 => r.current_token = r.current_token.map_or(Some(0), |t| t.checked_add(1)),
        8 => r.client_addr = other(&r.client_addr),
        9 => r.detail = other(&r.detail),
        // Present, absent, or another name: each hashes differently.
        10 => {
            r.identity = match r.identity.as_deref() {
                None => Some(String::new()),
                Some("") => None,
                Some(s) => Some(other(s)),
            }
        }
        // The link itself.
        11 => {
            if let Some(l) = &mut r.chain {
                l.seq += 1;
            }
        }
        12 => {
            if let Some(l) = &mut r.chain {
                l.chain = other(&l.chain);
            }
        }
        13 => {
            if let Some(l) = &mut r.chain {
                l.hash = to_hex(&[7; 32]);
            }
        }
        _ => {
            if let Some(l) = &mut r.chain {
                l.prev_hash = to_hex(&[9; 32]);
            }
        }
    }
}

const FIELDS: usize = 15;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_intact_log_verifies(
        a in proptest::collection::vec(arb_record(), 0..12),
        b in proptest::collection::vec(arb_record(), 0..12),
        unchained in proptest::collection::vec(arb_record(), 0..4),
    ) {
        let mut log = chained("aaaa", a.clone(), 1);
        log.extend(chained("bbbb", b.clone(), 100));
        log.extend(unchained.into_iter().enumerate().map(|(i, mut r)| { r.id = Some(200 + i as i64); r }));
        prop_assert_eq!(verify(&log), vec![]);
        let mut v = ChainVerifier::new();
        let mut sorted = log.clone();
        sorted.sort_by_key(|r| (r.chain.as_ref().map(|l| (l.chain.clone(), l.seq)), r.id));
        for r in &sorted {
            prop_assert!(v.push(r).is_ok());
        }
        prop_assert_eq!(v.records, (a.len() + b.len()) as u64);
        prop_assert_eq!(v.chains, u64::from(!a.is_empty()) + u64::from(!b.is_empty()));
    }

    #[test]
    fn any_changed_field_is_named(
        recs in proptest::collection::vec(arb_record(), 1..12),
        at in any::<prop::sample::Index>(),
        which in 0..FIELDS,
    ) {
        let mut log = chained("c0ffee", recs, 1);
        let i = at.index(log.len());
        let before = log[i].clone();
        mutate(&mut log[i], which);
        prop_assume!(log[i] != before);
        let found = verify(&log);
        prop_assert!(!found.is_empty(), "a change to field {} of record {} went unnoticed", which, i);
        // The edited record is named; first, unless its chain id changed
        // (it then sorts as a chain of its own, and the gap it left in its
        // own chain may be named before it).
        prop_assert!(found.iter().any(|m| m.id == Some(i as i64 + 1)));
        if which != 12 {
            prop_assert_eq!(found[0].id, Some(i as i64 + 1));
        }
    }

    #[test]
    fn a_deleted_record_inside_a_chain_is_a_gap(
        recs in proptest::collection::vec(arb_record(), 2..12),
        at in any::<prop::sample::Index>(),
    ) {
        let mut log = chained("c", recs, 1);
        let i = at.index(log.len() - 1);
        log.remove(i);
        let found = verify(&log);
        prop_assert_eq!(found.len(), 1);
        prop_assert_eq!(&found[0].problem, &Problem::Gap { expected: i as u64 + 1, found: i as u64 + 2 });
        prop_assert_eq!(found[0].id, Some(i as i64 + 2));
    }

    #[test]
    fn swapped_contents_are_named(
        recs in proptest::collection::vec(arb_record(), 2..12),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let mut log = chained("c", recs, 1);
        let (i, j) = (a.index(log.len()), b.index(log.len()));
        prop_assume!(i != j);
        // Two rows trade contents but keep their links: the order the log
        // tells is no longer the order written.
        let (li, lj) = (log[i].chain.clone(), log[j].chain.clone());
        prop_assume!(AuditRecord { id: None, chain: None, ..log[i].clone() } != AuditRecord { id: None, chain: None, ..log[j].clone() });
        log.swap(i, j);
        log[i].chain = li;
        log[j].chain = lj;
        log[i].id = Some(i as i64 + 1);
        log[j].id = Some(j as i64 + 1);
        let found = verify(&log);
        prop_assert!(!found.is_empty());
        prop_assert_eq!(found[0].id, Some(i.min(j) as i64 + 1));
    }

    #[test]
    fn records_fed_out_of_order_are_named(
        recs in proptest::collection::vec(arb_record(), 2..12),
        a in any::<prop::sample::Index>(),
    ) {
        let mut log = chained("c", recs, 1);
        let i = a.index(log.len() - 1);
        log.swap(i, i + 1);
        prop_assert!(!verify_in_order(&log).is_empty());
    }

    #[test]
    fn an_inserted_record_is_named(
        recs in proptest::collection::vec(arb_record(), 1..12),
        forged in arb_record(),
        at in any::<prop::sample::Index>(),
        seq_shift in 0..3u64,
    ) {
        let mut log = chained("c", recs, 1);
        let k = at.index(log.len());
        // The strongest forgery short of rewriting the tail: a record
        // whose own hash is right, linked to its predecessor, taking the
        // place of record k (or one near it).
        let prev = if k == 0 { GENESIS } else { from_hex(&log[k - 1].chain.as_ref().unwrap().hash).unwrap() };
        let seq = k as u64 + 1 + seq_shift.min((log.len() - k - 1) as u64);
        let mut f = forged;
        let hash = record_hash(&f, "c", seq, &prev);
        f.chain = Some(ChainLink { chain: "c".into(), seq, prev_hash: to_hex(&prev), hash: to_hex(&hash) });
        f.id = Some(1000);
        log.push(f);
        prop_assert!(!verify(&log).is_empty());
    }
}

#[test]
fn the_newest_records_of_a_chain_can_be_dropped_unnoticed() {
    // The documented limit: the chain proves what survives, not that
    // nothing came after it.
    let recs = (0..5)
        .map(|i| {
            AuditRecord::new(
                i,
                Some("r"),
                Protocol::Http,
                Reason::Stale,
                Some(1),
                Some(2),
                "c".into(),
                "PUT /",
            )
        })
        .collect();
    let mut log = chained("c", recs, 1);
    log.pop();
    assert_eq!(verify(&log), vec![]);
}

#[test]
fn the_encoding_is_pinned() {
    // A stored chain must verify with every later build: if this changes,
    // the encoding changed and needs a new TAG, not a new expected value.
    // The expected hash was computed by a separate implementation of the
    // encoding documented in docs/store.md (Python's hashlib and
    // struct.pack, big-endian, u64 length prefixes).
    let r = AuditRecord::new(
        1_700_000_000_000,
        Some("orders"),
        Protocol::Http,
        Reason::Stale,
        Some(3),
        Some(4),
        "127.0.0.1:5000".into(),
        "PUT /orders/1",
    );
    let h = record_hash(&r, "0123456789abcdef", 1, &GENESIS);
    assert_eq!(
        to_hex(&h),
        "e44d978ecd75672bf6fe22d81d5cb5d248297200d860688e3b2070e305d13698"
    );
    assert_eq!(from_hex(&to_hex(&h)), Some(h));
    assert_eq!(from_hex(&to_hex(&h).to_uppercase()), None);
    assert_eq!(from_hex("00"), None);
}

#[test]
fn the_encoding_with_an_identity_is_pinned() {
    // v2: v1's fields, then the identity, under its own tag. Computed by
    // the same separate implementation as above (docs/store.md).
    let r = AuditRecord::lease(
        1_700_000_000_000,
        crate::audit::LeaseAudit {
            kind: Kind::LeaseDenied,
            reason: LeaseReason::Forbidden,
            resource: "orders",
            holder: "sched-b",
            presented_token: None,
            current_token: None,
            client_addr: "127.0.0.1:5000".into(),
            detail: "acquire: no grant covers orders",
            identity: Some("sched-a"),
        },
    );
    let h = record_hash(&r, "0123456789abcdef", 1, &GENESIS);
    assert_eq!(
        to_hex(&h),
        "797b1e133f31d446c755eb068b72a9cd08056eef8623d82fc915c0e5abc72297"
    );
    // Without the identity it is a v1 record: a different hash.
    let v1 = AuditRecord {
        identity: None,
        ..r.clone()
    };
    assert_ne!(record_hash(&v1, "0123456789abcdef", 1, &GENESIS), h);
}
