//! The pure fencing core of fencepost.
//!
//! Everything here is deterministic and does no I/O: the runtime (`proxy`)
//! feeds it requests, the clock and the results of store calls, and it answers
//! with verdicts. That is what lets the property tests drive it through
//! millions of interleavings, and why both proxies (HTTP and Postgres) call
//! the same [`fence::Slot::admit`] rather than each carrying its own copy of
//! the rules.
//!
//! - [`resource`]: validated resource names.
//! - [`token`]: parsing presented tokens, plain and signed.
//! - [`input`]: a write's resource and token as typed values (or typed
//!   reasons why not), parsed once by each protocol's front end.
//! - [`signing`]: Ed25519 signing and verification of tokens.
//! - [`fence`]: the per-resource high-water mark, compare-and-advance and the
//!   in-flight accounting behind the drain of guarantee 2.
//! - [`lease`]: the elector's lease state machine.
//! - [`replica`]: a tier replica's admission deadline from its lease renewals.
//! - [`audit`]: the shape of an audit record: a refused write or a
//!   leadership change.
//! - [`audit_chain`]: the hash chain that makes edits to the audit log
//!   evident, and its verifier.

#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_chain;
pub mod fence;
pub mod input;
pub mod lease;
pub mod replica;
pub mod resource;
pub mod signing;
pub mod token;

pub use audit::{AuditReason, AuditRecord, Kind, LeaseAudit, LeaseReason, Protocol, Reason};
pub use audit_chain::{ChainLink, ChainVerifier, Chainer, Mismatch, Problem};
pub use fence::{Admitted, FenceTable, InflightGuard, Persist, Slot, Verdict};
pub use input::{FenceInput, Field, InputError};
pub use lease::{LeaseConfig, LeaseOp, LeaseOutcome, LeaseRecord};
pub use replica::ReplicaLease;
pub use resource::{ResourceError, ResourceName, ResourceRef};
pub use signing::{KeyError, Signer, Verifier};
pub use token::{Presented, TokenError, TokenPolicy, TokenRejection};
