//! The shared store: the same schema on Postgres, for any number of proxy
//! and elector replicas.
//!
//! Everything lives in the `fencepost_store` schema, selected through
//! `search_path` at connect time, so neither our tables nor sqlx's
//! `_sqlx_migrations` can collide with tables of the same name the user
//! keeps in the same database. The pool connects lazily and gives up fast:
//! a proxy must start, and refuse writes promptly (guarantee 4), while its
//! store is down, and pick the store up again on its own when it returns.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use fencing::{AuditRecord, LeaseConfig, LeaseOp, LeaseOutcome, LeaseRecord};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};

use super::listing::{self, Digest, Page, PageQuery, ReplicaMark};
use super::{
    audit_from_row, fence_from_row, lease_from_row, token_from_text, token_text, AuditQuery,
    FenceRow, Notifications, Renewal, ReplicaRow, Store, StoreError, TierAdvance, TierAdvanceRow,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The schema holding every fencepost table.
pub const SCHEMA: &str = "fencepost_store";

/// How long a call waits for a connection, at least. With the store down
/// every fenced write waits this long before it is refused, so it is
/// short. The runtime opens the store with its `store_timeout` when that
/// is longer ([`super::open`]) and bounds whole calls there
/// ([`super::TimedStore`]): a fixed bound here would silently cap a longer
/// `store_timeout`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Enough for the elector and a few proxies' fence advances at once without
/// making each replica a heavy Postgres client.
const MAX_CONNECTIONS: u32 = 10;

/// First grants racing on a missing row: the loser sees a unique violation
/// and retries, and then finds the winner's row. More than a couple of
/// rounds means something else is wrong.
const LEASE_ATTEMPTS: u32 = 5;

const AUDIT_CHUNK: usize = 1_000;
const DEFAULT_AUDIT_LIMIT: u32 = 100;
const MAX_AUDIT_LIMIT: u32 = 10_000;

/// The Postgres store. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Builds the pool without connecting; the first call connects.
    ///
    /// `synchronous_commit` is forced on for our sessions: a database tuned
    /// with it off would otherwise acknowledge an advance or a grant that a
    /// crash can still take back, breaking guarantees 1 and 6.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_wait(url, ACQUIRE_TIMEOUT)
    }

    /// As [`PgStore::open`], waiting up to `wait` (never less than the
    /// default) for a pooled connection: a connect, or the health check of
    /// an idle one.
    pub fn open_with_wait(url: &str, wait: Duration) -> Result<Self, StoreError> {
        let wait = wait.max(ACQUIRE_TIMEOUT);
        // The pool spawns its maintenance tasks on the current runtime; say
        // so instead of panicking when there is none.
        tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Config("the Postgres store must be opened inside a tokio runtime".into())
        })?;
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("store URL: {e}")))?
            .options([("search_path", SCHEMA), ("synchronous_commit", "on")]);
        if options.get_application_name().is_none() {
            options = options.application_name("fencepost");
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(wait)
            .connect_lazy_with(options);
        Ok(PgStore { pool })
    }

    /// Waits for every connection to close, for a clean shutdown (and so a
    /// test can drop its database).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Maps errors, adding what `From<sqlx::Error>` cannot know about Postgres:
/// a server shutting down, starting up, out of connections or out of disk,
/// or a lost connection, is the store being unavailable, not a failed
/// request.
pub(crate) fn classify(e: sqlx::Error) -> StoreError {
    let unavailable = match sqlstate(&e) {
        Some(code) => {
            code.starts_with("08") // connection exception
                || code.starts_with("53") // insufficient resources
                || matches!(code.as_str(), "57P01" | "57P02" | "57P03" | "57014" | "55P03")
        }
        None => false,
    };
    if unavailable {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::from(e)
    }
}

fn classify_migrate(e: sqlx::migrate::MigrateError) -> StoreError {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(inner) | M::ExecuteMigration(inner, _) => classify(inner),
        other => StoreError::Failed(format!("migration: {other}")),
    }
}

/// A lease transaction's failure: worth running again, or final.
enum TxError {
    Retry(sqlx::Error),
    Fatal(StoreError),
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> Self {
        match sqlstate(&e).as_deref() {
            // unique violation (racing first grants), serialization failure,
            // deadlock: the transaction was rolled back and can simply rerun.
            Some("23505" | "40001" | "40P01") => TxError::Retry(e),
            _ => TxError::Fatal(classify(e)),
        }
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Fatal(e)
    }
}

impl super::Columns for PgRow {
    fn text(&self, col: &str) -> Result<String, StoreError> {
        self.try_get(col).map_err(classify)
    }

    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        self.try_get(col).map_err(classify)
    }

    fn int(&self, col: &str) -> Result<i64, StoreError> {
        self.try_get(col).map_err(classify)
    }

    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(col).map_err(classify)
    }
}

const SELECT_LEASE_FOR_UPDATE: &str = "SELECT resource, holder, token, granted_at_ms, \
     expires_at_ms, ttl_ms, free_after_ms FROM leases WHERE resource = $1 FOR UPDATE";
const SELECT_LEASE: &str = "SELECT resource, holder, token, granted_at_ms, expires_at_ms, \
     ttl_ms, free_after_ms FROM leases WHERE resource = $1";
const LIST_LEASES: &str = "SELECT resource, holder, token, granted_at_ms, expires_at_ms, \
     ttl_ms, free_after_ms FROM leases ORDER BY resource";

impl PgStore {
    /// One attempt at [`Store::lease_apply`]. `FOR UPDATE` serializes
    /// callers on an existing row; for a missing row there is nothing to
    /// lock, so racing first grants are left to the primary key: the loser
    /// fails its INSERT, is rolled back, and retries to find the row.
    async fn lease_once(
        &self,
        resource: &str,
        op: &LeaseOp,
        now_ms: i64,
        cfg: &LeaseConfig,
    ) -> Result<LeaseOutcome, TxError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(SELECT_LEASE_FOR_UPDATE)
            .bind(resource)
            .fetch_optional(&mut *tx)
            .await?;
        let stored = row.as_ref().map(lease_from_row).transpose()?;
        let outcome = fencing::lease::decide(resource, stored.as_ref(), op, now_ms, cfg);
        if let Some(rec) = outcome.to_store() {
            let sql = if stored.is_some() {
                "UPDATE leases SET holder = $2, token = $3, granted_at_ms = $4, \
                 expires_at_ms = $5, ttl_ms = $6, free_after_ms = $7 WHERE resource = $1"
            } else {
                "INSERT INTO leases (resource, holder, token, granted_at_ms, expires_at_ms, \
                 ttl_ms, free_after_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            };
            let done = sqlx::query(sql)
                .bind(resource)
                .bind(rec.holder.as_deref())
                .bind(token_text(rec.token))
                .bind(rec.granted_at_ms)
                .bind(rec.expires_at_ms)
                .bind(rec.ttl_ms)
                .bind(rec.free_after_ms)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(TxError::Fatal(StoreError::Failed(format!(
                    "lease row of {resource:?} changed under its row lock"
                ))));
            }
            // Fence at grant: the new token is an advance of the mark in
            // the same transaction, so every proxy replica of the tier
            // learns of it (and refuses the old leader) before the new
            // holder, who learns its token only after this commits, can
            // write.
            if let LeaseOutcome::Granted { lease, .. } = &outcome {
                super::replicas::advance_in(&mut tx, resource, lease.token, now_ms).await?;
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }
}

#[async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // Look before creating: CREATE SCHEMA IF NOT EXISTS still demands
        // CREATE on the database, which a role given a ready-made schema
        // may lack.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(SCHEMA)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        if !exists {
            let created = sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
                .execute(&self.pool)
                .await;
            match created {
                Ok(_) => {}
                // Another replica created it between our look and our create.
                Err(e) if matches!(sqlstate(&e).as_deref(), Some("23505" | "42P06")) => {}
                Err(e) => return Err(classify(e)),
            }
        }
        MIGRATOR.run(&self.pool).await.map_err(classify_migrate)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn load_fence(&self, resource: &str) -> Result<Option<u64>, StoreError> {
        let token: Option<String> =
            sqlx::query_scalar("SELECT token FROM fences WHERE resource = $1")
                .bind(resource)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        token.as_deref().map(token_from_text).transpose()
    }

    async fn advance_fence(
        &self,
        resource: &str,
        token: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        // Numbered and announced like every advance, so a tier of replicas
        // learns of it whoever made it (see `replicas.rs`).
        Ok(self.pg_tier_advance(resource, token, now_ms).await?.mark)
    }

    async fn get_fence(&self, resource: &str) -> Result<Option<FenceRow>, StoreError> {
        let row =
            sqlx::query("SELECT resource, token, updated_at_ms FROM fences WHERE resource = $1")
                .bind(resource)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        row.as_ref().map(fence_from_row).transpose()
    }

    async fn list_fences(&self) -> Result<Vec<FenceRow>, StoreError> {
        let rows =
            sqlx::query("SELECT resource, token, updated_at_ms FROM fences ORDER BY resource")
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        rows.iter().map(fence_from_row).collect()
    }

    async fn page_fences(&self, p: &PageQuery) -> Result<Page<FenceRow>, StoreError> {
        listing::pg_fences(self.pool(), p, classify).await
    }

    async fn page_leases(&self, p: &PageQuery) -> Result<Page<LeaseRecord>, StoreError> {
        listing::pg_leases(self.pool(), p, classify).await
    }

    async fn digest(&self) -> Result<Digest, StoreError> {
        listing::pg_digest(self.pool(), classify).await
    }

    async fn replica_marks(&self, resources: &[String]) -> Result<Vec<ReplicaMark>, StoreError> {
        listing::pg_replica_marks(self.pool(), resources, classify).await
    }

    async fn lease_apply(
        &self,
        resource: &str,
        op: &LeaseOp,
        now_ms: i64,
        cfg: &LeaseConfig,
    ) -> Result<LeaseOutcome, StoreError> {
        let mut attempt = 1;
        loop {
            match self.lease_once(resource, op, now_ms, cfg).await {
                Ok(outcome) => return Ok(outcome),
                Err(TxError::Retry(e)) if attempt >= LEASE_ATTEMPTS => return Err(classify(e)),
                Err(TxError::Retry(e)) => {
                    tracing::debug!(resource, attempt, error = %e, "lease transaction retried");
                    attempt += 1;
                }
                Err(TxError::Fatal(e)) => return Err(e),
            }
        }
    }

    async fn get_lease(&self, resource: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let row = sqlx::query(SELECT_LEASE)
            .bind(resource)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        row.as_ref().map(lease_from_row).transpose()
    }

    async fn list_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let rows = sqlx::query(LIST_LEASES)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        for chunk in records.chunks(AUDIT_CHUNK) {
            let mut qb = super::audit_insert::<Postgres>(chunk);
            qb.build().execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    async fn audit_chain_page(
        &self,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut qb = super::audit_chain_page::<Postgres>(after, limit.clamp(1, MAX_AUDIT_LIMIT));
        let rows = qb.build().fetch_all(&self.pool).await.map_err(classify)?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_unchained(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit WHERE chain_id IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(classify)?;
        Ok(n.max(0) as u64)
    }

    async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = match q.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n.min(MAX_AUDIT_LIMIT),
        };
        let mut qb: QueryBuilder<'_, Postgres> = QueryBuilder::new(super::AUDIT_COLUMNS);
        qb.push(" WHERE TRUE");
        super::audit_filters(&mut qb, q);
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.pool).await.map_err(classify)?;
        rows.iter().map(audit_from_row).collect()
    }

    fn supports_tier(&self) -> bool {
        true
    }

    async fn replica_renew(
        &self,
        id: &str,
        addresses: &str,
        started_at_ms: i64,
        ttl_ms: i64,
        since: Option<i64>,
    ) -> Result<Renewal, StoreError> {
        self.pg_replica_renew(id, addresses, started_at_ms, ttl_ms, since)
            .await
    }

    async fn advances_since(&self, since: i64) -> Result<Vec<TierAdvanceRow>, StoreError> {
        self.pg_advances_since(since).await
    }

    async fn tier_advance(
        &self,
        resource: &str,
        token: u64,
        now_ms: i64,
    ) -> Result<TierAdvance, StoreError> {
        self.pg_tier_advance(resource, token, now_ms).await
    }

    async fn replica_ack(&self, resource: &str, id: &str, token: u64) -> Result<(), StoreError> {
        self.pg_replica_ack(resource, id, token).await
    }

    async fn pending_acks(
        &self,
        resource: &str,
        token: u64,
        seq: i64,
        me: &str,
    ) -> Result<Vec<String>, StoreError> {
        self.pg_pending_acks(resource, token, seq, me).await
    }

    async fn list_replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        self.pg_list_replicas().await
    }

    async fn replica_leave(&self, id: &str) -> Result<(), StoreError> {
        self.pg_replica_leave(id).await
    }

    async fn replica_prune(&self, retention_ms: i64) -> Result<u64, StoreError> {
        self.pg_replica_prune(retention_ms).await
    }

    async fn tier_notifications(&self) -> Result<Box<dyn Notifications>, StoreError> {
        self.pg_tier_notifications().await
    }
}
