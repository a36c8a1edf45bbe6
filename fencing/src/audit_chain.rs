//! Tamper evidence for the audit log: every record a writer process
//! produces is chained to that writer's previous record by a SHA-256 hash.
//!
//! A writer (one audit writer task per process) picks a random *chain id*
//! when it starts and numbers its records 1, 2, 3, ... in the order it
//! writes them. Record `n`'s hash covers a canonical encoding of every
//! field the record carries (not the store's `id`, which the store assigns)
//! plus its chain id, its sequence number and record `n - 1`'s hash (32
//! zero bytes for record 1). The link travels with the record: into the
//! store, or into the local spool and later into the store, so batching
//! and spooling change when a record lands, never its chain.
//!
//! [`ChainVerifier`] reads records ordered by (chain, seq) and names the
//! first one that does not match: its own hash does not cover its fields
//! (an edited row), its sequence number skips (a deleted row) or repeats
//! (an inserted row), or its `prev_hash` is not its predecessor's hash (a
//! row replaced along with its own hash).
//!
//! What it does not catch, by construction: whoever can write the store
//! and knows the encoding can drop a chain's newest records, drop a whole
//! chain, or rewrite a chain's tail with recomputed hashes. The chain
//! proves that stored records were not edited, removed or reordered
//! *inside* what survives; it is not a signature.

use sha2::{Digest, Sha256};

use crate::audit::AuditRecord;

/// Domain separation: a hash over another structure never collides with
/// an audit record's, and a future encoding gets a new tag.
const TAG: &[u8] = b"fencepost-audit-v1";
/// The encoding of a record that carries an identity: v1's fields, then
/// the identity. A record without one is hashed as v1 exactly, so every
/// row written before identities existed (and every record that has none,
/// such as a refused write) verifies as it always did; a different tag,
/// not an optional field appended to v1, so that the two encodings cannot
/// be confused even in principle.
const TAG_V2: &[u8] = b"fencepost-audit-v2";

/// A record's place in its writer's chain. Hashes are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainLink {
    /// The writer's chain id (random per writer process).
    pub chain: String,
    /// 1 for a chain's first record, then one more per record.
    pub seq: u64,
    /// The previous record's `hash` (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 over the record's canonical encoding and `prev_hash`.
    pub hash: String,
}

/// The `prev_hash` of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// The hash of `rec` at (`chain`, `seq`) after `prev`. `rec.id` and
/// `rec.chain` are not covered (the store assigns the one, the other is
/// what this computes).
pub fn record_hash(rec: &AuditRecord, chain: &str, seq: u64, prev: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(if rec.identity.is_some() { TAG_V2 } else { TAG });
    field(&mut h, chain.as_bytes());
    h.update(seq.to_be_bytes());
    h.update(rec.at_ms.to_be_bytes());
    field(&mut h, rec.kind.as_str().as_bytes());
    opt_field(&mut h, rec.resource.as_deref().map(str::as_bytes));
    opt_field(&mut h, rec.holder.as_deref().map(str::as_bytes));
    field(&mut h, rec.protocol.as_str().as_bytes());
    field(&mut h, rec.reason.as_str().as_bytes());
    opt_token(&mut h, rec.presented_token);
    opt_token(&mut h, rec.current_token);
    field(&mut h, rec.client_addr.as_bytes());
    field(&mut h, rec.detail.as_bytes());
    if let Some(identity) = &rec.identity {
        field(&mut h, identity.as_bytes());
    }
    h.update(prev);
    h.finalize().into()
}

/// Length-prefixed, so no two different field lists encode the same.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

fn opt_field(h: &mut Sha256, bytes: Option<&[u8]>) {
    match bytes {
        None => h.update([0u8]),
        Some(b) => {
            h.update([1u8]);
            field(h, b);
        }
    }
}

fn opt_token(h: &mut Sha256, t: Option<u64>) {
    match t {
        None => h.update([0u8]),
        Some(t) => {
            h.update([1u8]);
            h.update(t.to_be_bytes());
        }
    }
}

pub fn to_hex(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Strict: exactly 64 lowercase hex digits, as [`to_hex`] writes them.
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// One writer's chain head: links each record it is given to the one
/// before. The writer owns it; nothing else appends to its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chainer {
    chain: String,
    seq: u64,
    head: [u8; 32],
}

impl Chainer {
    /// A new chain named `chain`; its first record gets seq 1.
    pub fn new(chain: impl Into<String>) -> Chainer {
        Chainer {
            chain: chain.into(),
            seq: 0,
            head: GENESIS,
        }
    }

    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Sets `rec.chain` to the next link of this chain.
    pub fn link(&mut self, rec: &mut AuditRecord) {
        let seq = self.seq + 1;
        let hash = record_hash(rec, &self.chain, seq, &self.head);
        rec.chain = Some(ChainLink {
            chain: self.chain.clone(),
            seq,
            prev_hash: to_hex(&self.head),
            hash: to_hex(&hash),
        });
        self.seq = seq;
        self.head = hash;
    }
}

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The stored hash does not cover the stored fields: the record (or
    /// its chain id, seq or prev_hash) was changed after it was written.
    #[error("hash mismatch: stored {stored}, the record's fields hash to {computed}")]
    HashMismatch { stored: String, computed: String },
    /// Records are missing before this one.
    #[error("gap in sequence: expected seq {expected}, found {found}")]
    Gap { expected: u64, found: u64 },
    /// A second record with the same (chain, seq), or one out of order.
    #[error("seq {found} again or out of order after seq {last}")]
    Duplicate { last: u64, found: u64 },
    /// The record's own hash holds, but it does not follow the record
    /// before it: one of the two was replaced along with its hash.
    #[error("broken link: prev_hash {stored} is not the previous record's hash {expected}")]
    BrokenLink { stored: String, expected: String },
}

/// The first record of a chain that does not match, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record id {} (chain {chain}, seq {seq}): {problem}", id.map_or("?".to_string(), |i| i.to_string()))]
pub struct Mismatch {
    pub id: Option<i64>,
    pub chain: String,
    pub seq: u64,
    pub problem: Problem,
}

/// Checks chained records fed in (chain, seq) order, one at a time, so a
/// log of any size is verified in constant memory.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    last: Option<(String, u64, [u8; 32])>,
    /// Chains seen.
    pub chains: u64,
    /// Chained records seen.
    pub records: u64,
}

impl ChainVerifier {
    pub fn new() -> ChainVerifier {
        ChainVerifier::default()
    }

    /// Checks the next record. Records without a link are skipped (the
    /// caller counts them as unchained). After a mismatch the verifier
    /// carries on from this record, so one edit is reported once.
    pub fn push(&mut self, rec: &AuditRecord) -> Result<(), Mismatch> {
        let Some(link) = &rec.chain else {
            return Ok(());
        };
        self.records += 1;
        let fail = |problem| Mismatch {
            id: rec.id,
            chain: link.chain.clone(),
            seq: link.seq,
            problem,
        };
        let (expected_seq, expected_prev) = match &self.last {
            Some((chain, seq, hash)) if *chain == link.chain => (seq + 1, *hash),
            _ => {
                self.chains += 1;
                (1, GENESIS)
            }
        };
        let stored_hash = from_hex(&link.hash);
        let stored_prev = from_hex(&link.prev_hash);
        let computed = stored_prev.map(|p| record_hash(rec, &link.chain, link.seq, &p));
        // Carry on from this record whatever it holds.
        self.last = Some((link.chain.clone(), link.seq, stored_hash.unwrap_or(GENESIS)));
        match (computed, stored_hash) {
            (Some(c), Some(s)) if c == s => {}
            (c, _) => {
                return Err(fail(Problem::HashMismatch {
                    stored: link.hash.clone(),
                    computed: c.map_or_else(
                        || format!("nothing (prev_hash {:?} is not a hash)", link.prev_hash),
                        |c| to_hex(&c),
                    ),
                }))
            }
        }
        if link.seq < expected_seq {
            return Err(fail(Problem::Duplicate {
                last: expected_seq - 1,
                found: link.seq,
            }));
        }
        if link.seq > expected_seq {
            return Err(fail(Problem::Gap {
                expected: expected_seq,
                found: link.seq,
            }));
        }
        if stored_prev != Some(expected_prev) {
            return Err(fail(Problem::BrokenLink {
                stored: link.prev_hash.clone(),
                expected: to_hex(&expected_prev),
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
