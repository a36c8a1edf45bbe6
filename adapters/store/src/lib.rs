//! The durable store behind the fence table, the elector and the audit log.
//!
//! One trait, two implementations over sqlx: SQLite (embedded default, one
//! file) and Postgres (shared by any number of proxy and elector replicas).
//! The runtime only ever sees `Arc<dyn Store>`.
//!
//! Tokens are unsigned 64-bit, which neither database has; they are stored
//! as 20-digit zero-padded text, which sorts and compares (`MAX`,
//! `GREATEST`) exactly as the numbers do and stays readable to an operator.
//!
//! # Layout
//! - this file: [`Store`], [`StoreError`], the row types and [`open`], which
//!   picks the implementation from the URL;
//! - [`SqliteStore`] (`sqlite.rs`) and [`PgStore`] (`postgres.rs`): the same
//!   statements in two dialects; schemas in `migrations/`;
//! - [`TimedStore`] (`timed.rs`): the one place a call is bounded in time
//!   (`store_timeout`), around whichever store [`open`] picks;
//! - [`guard`]: installs the in-database guard into a protected database.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fencing::{
    AuditReason, AuditRecord, ChainLink, Kind, LeaseConfig, LeaseOp, LeaseOutcome, LeaseRecord,
    Protocol,
};

pub mod guard;
mod listing;
mod postgres;
mod replicas;
mod sqlite;
mod timed;

pub use listing::{Digest, Page, PageQuery, ReplicaMark};
pub use postgres::PgStore;
pub use replicas::{
    Notifications, Renewal, ReplicaRow, TierAdvance, TierAdvanceRow, ACK_CHANNEL, ADVANCE_CHANNEL,
};
pub use sqlite::SqliteStore;
pub use timed::TimedStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time. Decisions that
    /// need it fail closed; it recovers on its own when the store is back.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error.
    #[error("store error: {0}")]
    Failed(String),
    /// The store URL or its settings are wrong.
    #[error("bad store configuration: {0}")]
    Config(String),
    /// A stored row does not decode (hand-edited, or a newer schema).
    #[error("corrupt store row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match e {
            E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => {
                StoreError::Unavailable(e.to_string())
            }
            E::Configuration(_) => StoreError::Config(e.to_string()),
            E::ColumnDecode { .. } | E::Decode(_) => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Failed(e.to_string()),
        }
    }
}

/// A resource's durable high-water mark.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FenceRow {
    pub resource: String,
    pub token: u64,
    pub updated_at_ms: i64,
}

/// Filter for reading the audit log, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub resource: Option<String>,
    pub since_ms: Option<i64>,
    /// Only records of this kind; all kinds when `None`.
    pub kind: Option<Kind>,
    pub limit: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "sqlite" or "postgres", for logs and `/readyz`.
    fn kind(&self) -> &'static str;

    /// Applies pending migrations (idempotent).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The durable mark of a resource, `None` if never fenced.
    async fn load_fence(&self, resource: &str) -> Result<Option<u64>, StoreError>;

    /// Atomically raises the mark to `max(stored, token)` and returns the
    /// mark afterwards. Durable (committed) when it returns `Ok`.
    async fn advance_fence(
        &self,
        resource: &str,
        token: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError>;

    async fn get_fence(&self, resource: &str) -> Result<Option<FenceRow>, StoreError>;

    /// All marks, ordered by resource.
    async fn list_fences(&self) -> Result<Vec<FenceRow>, StoreError>;

    /// Runs [`fencing::lease::decide`] on the resource's lease row inside one
    /// transaction with the row locked, writes the result and commits before
    /// returning: concurrent callers serialize, and a granted token is
    /// durable before anyone sees it.
    async fn lease_apply(
        &self,
        resource: &str,
        op: &LeaseOp,
        now_ms: i64,
        cfg: &LeaseConfig,
    ) -> Result<LeaseOutcome, StoreError>;

    async fn get_lease(&self, resource: &str) -> Result<Option<LeaseRecord>, StoreError>;

    /// All lease rows (held or not), ordered by resource.
    async fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError>;

    /// One page of the marks matching `p`, ordered by resource, and how
    /// many matched (`listing.rs`). The default filters [`Store::list_fences`].
    async fn page_fences(&self, p: &PageQuery) -> Result<Page<FenceRow>, StoreError> {
        Ok(p.apply(self.list_fences().await?, |r| r.resource.as_str()))
    }

    /// One page of the lease rows matching `p`, like [`Store::page_fences`].
    async fn page_leases(&self, p: &PageQuery) -> Result<Page<LeaseRecord>, StoreError> {
        Ok(p.apply(self.list_leases().await?, |r| r.resource.as_str()))
    }

    /// A few numbers that change whenever a mark or a lease row does: what
    /// the console's event stream polls instead of reading the tables.
    async fn digest(&self) -> Result<Digest, StoreError> {
        let fences = self.list_fences().await?;
        let leases = self.list_leases().await?;
        Ok(Digest {
            fences: fences.len() as i64,
            fences_updated_ms: fences.iter().map(|f| f.updated_at_ms).max().unwrap_or(0),
            leases: leases.len() as i64,
            leases_held: leases.iter().filter(|l| l.holder.is_some()).count() as i64,
            leases_granted_ms: leases.iter().map(|l| l.granted_at_ms).max().unwrap_or(0),
            leases_expiry_sum: leases.iter().map(|l| l.expires_at_ms % 1_000_003).sum(),
        })
    }

    /// Each replica's acknowledged mark of these resources (the tier's
    /// acknowledgements); none where there is no tier.
    async fn replica_marks(&self, _resources: &[String]) -> Result<Vec<ReplicaMark>, StoreError> {
        Ok(Vec::new())
    }

    /// Appends records in one transaction; ids are assigned by the store.
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError>;

    /// Newest first, at most `limit` (capped at 10,000).
    async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// Chained audit records in (chain id, seq) order, `limit` at a time,
    /// after `after`; what `fencepost audit verify` walks.
    async fn audit_chain_page(
        &self,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// How many audit records carry no chain (written before chains).
    async fn audit_unchained(&self) -> Result<u64, StoreError>;

    // The fencing tier (`replicas.rs`): Postgres only. SQLite is one
    // process, so these say "not supported" there and the tier is off.

    /// Whether this store can hold a tier of replicas.
    fn supports_tier(&self) -> bool {
        false
    }

    /// Creates or renews replica `id`'s lease (`expires_at` = the store's
    /// `now()` + `ttl_ms`) and returns, in the same transaction, every
    /// advance numbered above `since` (none on a first join: the replica
    /// loads marks afterwards).
    async fn replica_renew(
        &self,
        _id: &str,
        _addresses: &str,
        _started_at_ms: i64,
        _ttl_ms: i64,
        _since: Option<i64>,
    ) -> Result<Renewal, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// Advances numbered above `since`, in order.
    async fn advances_since(&self, _since: i64) -> Result<Vec<TierAdvanceRow>, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// [`Store::advance_fence`] that also returns the number of the advance
    /// that set the mark, and notifies the tier when it raised it.
    async fn tier_advance(
        &self,
        _resource: &str,
        _token: u64,
        _now_ms: i64,
    ) -> Result<TierAdvance, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// Replica `id` has raised `resource`'s mark to `token` and drained
    /// every older write: records it (never lowering) and notifies.
    async fn replica_ack(&self, _resource: &str, _id: &str, _token: u64) -> Result<(), StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// The replicas, other than `me`, whose lease is live by the store's
    /// clock and which still owe an acknowledgement of advance `seq` to
    /// `token` on `resource`. Empty: the advance may be admitted.
    async fn pending_acks(
        &self,
        _resource: &str,
        _token: u64,
        _seq: i64,
        _me: &str,
    ) -> Result<Vec<String>, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// Every replica row, live or not, with the store's verdict.
    async fn list_replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// Removes replica `id` (a graceful shutdown), so no advance waits for
    /// its lease to expire.
    async fn replica_leave(&self, _id: &str) -> Result<(), StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// Deletes the rows of replicas whose lease expired more than
    /// `retention_ms` ago by the store's clock (killed, never left), with
    /// their acknowledgements, so the tables stay as small as the tier.
    /// Returns how many replicas were removed.
    async fn replica_prune(&self, _retention_ms: i64) -> Result<u64, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }

    /// A session listening for the tier's notifications (advances, acks).
    async fn tier_notifications(&self) -> Result<Box<dyn Notifications>, StoreError> {
        Err(replicas::unsupported(self.kind()))
    }
}

/// Opens the store a URL names: `sqlite://path` (created if missing) or
/// `postgres://...`, every call bounded by `timeout` (`store_timeout`, see
/// [`TimedStore`]). The backend's own waits (for a pooled connection, for
/// SQLite's file lock) get the same bound, so none of them cuts a call
/// short of it. Does not connect eagerly to Postgres, so a proxy can start
/// (and fail closed) while its store is down.
pub async fn open(url: &str, timeout: Duration) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        let inner = SqliteStore::open_with_wait(url, timeout).await?;
        Ok(Arc::new(TimedStore::new(inner, timeout)))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let inner = PgStore::open_with_wait(url, timeout)?;
        Ok(Arc::new(TimedStore::new(inner, timeout)))
    } else {
        Err(StoreError::Config(format!(
            "store URL {url:?} must start with sqlite:// or postgres://"
        )))
    }
}

/// The text form of a token in both stores.
pub fn token_text(token: u64) -> String {
    format!("{token:020}")
}

/// Parses the stored text form back.
pub fn token_from_text(text: &str) -> Result<u64, StoreError> {
    fencing::token::parse_decimal(text)
        .map_err(|e| StoreError::Corrupt(format!("token {text:?}: {e}")))
}

/// Column access the two backends share, so each row decoder below is
/// written once. Each backend maps its own driver errors.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
}

fn opt_token_text(t: Option<u64>) -> Option<String> {
    t.map(token_text)
}

fn opt_token_from_text(t: Option<String>) -> Result<Option<u64>, StoreError> {
    t.as_deref().map(token_from_text).transpose()
}

pub(crate) fn fence_from_row(row: &impl Columns) -> Result<FenceRow, StoreError> {
    Ok(FenceRow {
        resource: row.text("resource")?,
        token: token_from_text(&row.text("token")?)?,
        updated_at_ms: row.int("updated_at_ms")?,
    })
}

pub(crate) fn lease_from_row(row: &impl Columns) -> Result<LeaseRecord, StoreError> {
    Ok(LeaseRecord {
        resource: row.text("resource")?,
        holder: row.opt_text("holder")?,
        token: token_from_text(&row.text("token")?)?,
        granted_at_ms: row.int("granted_at_ms")?,
        expires_at_ms: row.int("expires_at_ms")?,
        ttl_ms: row.int("ttl_ms")?,
        free_after_ms: row.int("free_after_ms")?,
    })
}

pub(crate) fn audit_from_row(row: &impl Columns) -> Result<AuditRecord, StoreError> {
    let protocol = row.text("protocol")?;
    let reason = row.text("reason")?;
    let kind = row.text("kind")?;
    Ok(AuditRecord {
        id: Some(row.int("id")?),
        at_ms: row.int("at_ms")?,
        kind: Kind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("audit kind {kind:?}")))?,
        resource: row.opt_text("resource")?,
        holder: row.opt_text("holder")?,
        protocol: Protocol::parse(&protocol)
            .ok_or_else(|| StoreError::Corrupt(format!("audit protocol {protocol:?}")))?,
        reason: AuditReason::parse(&reason)
            .ok_or_else(|| StoreError::Corrupt(format!("audit reason {reason:?}")))?,
        presented_token: opt_token_from_text(row.opt_text("presented_token")?)?,
        current_token: opt_token_from_text(row.opt_text("current_token")?)?,
        client_addr: row.text("client_addr")?,
        detail: row.text("detail")?,
        identity: row.opt_text("identity")?,
        chain: chain_from_row(row)?,
    })
}

/// A row's chain link. A row with a chain id always yields a link, even a
/// damaged one (a missing hash reads as empty, a negative seq as 0), so
/// that `audit verify` names it as a mismatch instead of failing to read.
fn chain_from_row(row: &impl Columns) -> Result<Option<ChainLink>, StoreError> {
    let Some(chain) = row.opt_text("chain_id")? else {
        return Ok(None);
    };
    Ok(Some(ChainLink {
        chain,
        seq: row
            .opt_int("seq")?
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0),
        prev_hash: row.opt_text("prev_hash")?.unwrap_or_default(),
        hash: row.opt_text("hash")?.unwrap_or_default(),
    }))
}

/// The columns every audit read selects, in both backends.
pub(crate) const AUDIT_COLUMNS: &str =
    "SELECT id, at_ms, kind, resource, holder, protocol, reason, \
     presented_token, current_token, client_addr, detail, identity, \
     chain_id, seq, prev_hash, hash FROM audit";

/// The filters of an audit read, the same SQL for both backends (after a
/// `WHERE` that is always true).
pub(crate) fn audit_filters<'a, DB>(qb: &mut sqlx::QueryBuilder<'a, DB>, q: &'a AuditQuery)
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(resource) = &q.resource {
        qb.push(" AND resource = ").push_bind(resource.as_str());
    }
    if let Some(since) = q.since_ms {
        qb.push(" AND at_ms >= ").push_bind(since);
    }
    if let Some(kind) = q.kind {
        qb.push(" AND kind = ").push_bind(kind.as_str());
    }
}

/// One multi-row INSERT of audit records, the same SQL for both backends.
pub(crate) fn audit_insert<'a, DB>(chunk: &'a [AuditRecord]) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = sqlx::QueryBuilder::new(
        "INSERT INTO audit (at_ms, kind, resource, holder, protocol, reason, \
         presented_token, current_token, client_addr, detail, identity, \
         chain_id, seq, prev_hash, hash) ",
    );
    qb.push_values(chunk, |mut b, r| {
        b.push_bind(r.at_ms)
            .push_bind(r.kind.as_str())
            .push_bind(r.resource.as_deref())
            .push_bind(r.holder.as_deref())
            .push_bind(r.protocol.as_str())
            .push_bind(r.reason.as_str())
            .push_bind(opt_token_text(r.presented_token))
            .push_bind(opt_token_text(r.current_token))
            .push_bind(r.client_addr.as_str())
            .push_bind(r.detail.as_str())
            .push_bind(r.identity.as_deref())
            .push_bind(r.chain.as_ref().map(|l| l.chain.as_str()))
            .push_bind(r.chain.as_ref().map(|l| l.seq as i64))
            .push_bind(r.chain.as_ref().map(|l| l.prev_hash.as_str()))
            .push_bind(r.chain.as_ref().map(|l| l.hash.as_str()));
    });
    // A batch shipped from the spool a second time (a crash between its
    // commit and its removal from the spool) is already stored: skip it.
    qb.push(" ON CONFLICT (chain_id, seq) DO NOTHING");
    qb
}

/// One page of chained audit records in (chain, seq) order, after the
/// given (chain, seq), for `audit verify`; the same SQL for both backends.
pub(crate) fn audit_chain_page<'a, DB>(
    after: Option<(&'a str, u64)>,
    limit: u32,
) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = sqlx::QueryBuilder::new(AUDIT_COLUMNS);
    qb.push(" WHERE chain_id IS NOT NULL");
    if let Some((chain, seq)) = after {
        qb.push(" AND (chain_id > ")
            .push_bind(chain)
            .push(" OR (chain_id = ")
            .push_bind(chain)
            .push(" AND seq > ")
            .push_bind(seq as i64)
            .push("))");
    }
    qb.push(" ORDER BY chain_id, seq, id LIMIT ")
        .push_bind(i64::from(limit));
    qb
}
