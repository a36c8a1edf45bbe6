//! The embedded store: one SQLite file for fences, leases and the audit log.
//!
//! SQLite serializes writers on a file lock, so the work here is making sure
//! every writer takes that lock up front (a read-then-write transaction that
//! only upgrades later can lose a race it cannot retry inside WAL) and that
//! a commit is on disk before the caller acts on it.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use fencing::{AuditRecord, LeaseConfig, LeaseOp, LeaseOutcome, LeaseRecord};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::listing::{self, Digest, Page, PageQuery};
use super::{
    audit_from_row, fence_from_row, lease_from_row, token_from_text, token_text, AuditQuery,
    FenceRow, Store, StoreError,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// Long enough to ride out another writer's transaction (they are a few
/// statements each), short enough that a wedged lock holder turns into
/// `Unavailable` rather than a hung request. The default of
/// [`SqliteStore::open`] and the least the runtime uses: it passes its
/// `store_timeout` ([`super::open`]) when that is longer, so this never cuts
/// a call shorter than that.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite caps bound parameters per statement; audit batches are split so a
/// large flush never hits that limit.
const AUDIT_CHUNK: usize = 500;

const DEFAULT_AUDIT_LIMIT: u32 = 100;
const MAX_AUDIT_LIMIT: u32 = 10_000;

/// The SQLite store. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the file a `sqlite://path` URL names.
    ///
    /// WAL lets readers (the admin API, `fencepost audit`) run while the
    /// proxy writes; `synchronous=FULL` is what makes a committed advance or
    /// grant survive power loss, which guarantees 1 and 6 rest on.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_wait(url, BUSY_TIMEOUT).await
    }

    /// As [`SqliteStore::open`], waiting up to `wait` (never less than the
    /// default) for the file lock or a pooled connection.
    pub async fn open_with_wait(url: &str, wait: Duration) -> Result<Self, StoreError> {
        let wait = wait.max(BUSY_TIMEOUT);
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("store URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(wait);
        let pool = SqlitePoolOptions::new()
            .acquire_timeout(wait)
            .connect_with(options)
            .await
            .map_err(classify)?;
        Ok(SqliteStore { pool })
    }

    /// Waits for every connection to close, so a test (or a shutdown) that
    /// reopens the file right after sees no lingering handle.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Maps errors, adding what `From<sqlx::Error>` cannot know about SQLite:
/// a lock that stayed busy past the timeout, or a disk that fails, means
/// the store cannot answer now, not that the request was wrong.
fn classify(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(ref db) => {
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            match primary {
                // BUSY, LOCKED, IOERR, FULL, CANTOPEN
                Some(5 | 6 | 10 | 13 | 14) => StoreError::Unavailable(e.to_string()),
                _ => StoreError::from(e),
            }
        }
        other => StoreError::from(other),
    }
}

fn classify_migrate(e: sqlx::migrate::MigrateError) -> StoreError {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(inner) | M::ExecuteMigration(inner, _) => classify(inner),
        other => StoreError::Failed(format!("migration: {other}")),
    }
}

impl super::Columns for SqliteRow {
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

const SELECT_LEASE: &str = "SELECT resource, holder, token, granted_at_ms, expires_at_ms, \
     ttl_ms, free_after_ms FROM leases WHERE resource = ?1";
const LIST_LEASES: &str = "SELECT resource, holder, token, granted_at_ms, expires_at_ms, \
     ttl_ms, free_after_ms FROM leases ORDER BY resource";

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
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
            sqlx::query_scalar("SELECT token FROM fences WHERE resource = ?1")
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
        // One autocommit statement: it takes the write lock before reading,
        // so two proxies advancing at once serialize and neither can write
        // back a mark it read before the other raised it.
        let after: String = sqlx::query_scalar(
            "INSERT INTO fences (resource, token, updated_at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (resource) DO UPDATE SET \
               token = max(fences.token, excluded.token), \
               updated_at_ms = CASE WHEN excluded.token > fences.token \
                                    THEN excluded.updated_at_ms \
                                    ELSE fences.updated_at_ms END \
             RETURNING token",
        )
        .bind(resource)
        .bind(token_text(token))
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        token_from_text(&after)
    }

    async fn get_fence(&self, resource: &str) -> Result<Option<FenceRow>, StoreError> {
        let row =
            sqlx::query("SELECT resource, token, updated_at_ms FROM fences WHERE resource = ?1")
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
        listing::sqlite_fences(&self.pool, p, classify).await
    }

    async fn page_leases(&self, p: &PageQuery) -> Result<Page<LeaseRecord>, StoreError> {
        listing::sqlite_leases(&self.pool, p, classify).await
    }

    async fn digest(&self) -> Result<Digest, StoreError> {
        listing::sqlite_digest(&self.pool, classify).await
    }

    async fn lease_apply(
        &self,
        resource: &str,
        op: &LeaseOp,
        now_ms: i64,
        cfg: &LeaseConfig,
    ) -> Result<LeaseOutcome, StoreError> {
        // IMMEDIATE takes the write lock at BEGIN (waiting out the busy
        // timeout), so no other connection or process can read the same
        // row and decide concurrently. On any error the dropped transaction
        // is rolled back before its connection is reused.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        let row = sqlx::query(SELECT_LEASE)
            .bind(resource)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let stored = row.as_ref().map(lease_from_row).transpose()?;
        let outcome = fencing::lease::decide(resource, stored.as_ref(), op, now_ms, cfg);
        if let Some(rec) = outcome.to_store() {
            // Insert only when there was no row and update only the row we
            // read: either failing loudly beats silently clobbering a token.
            let sql = if stored.is_some() {
                "UPDATE leases SET holder = ?2, token = ?3, granted_at_ms = ?4, \
                 expires_at_ms = ?5, ttl_ms = ?6, free_after_ms = ?7 WHERE resource = ?1"
            } else {
                "INSERT INTO leases (resource, holder, token, granted_at_ms, expires_at_ms, \
                 ttl_ms, free_after_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
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
                .await
                .map_err(classify)?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Failed(format!(
                    "lease row of {resource:?} changed under the write lock"
                )));
            }
        }
        tx.commit().await.map_err(classify)?;
        Ok(outcome)
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
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        for chunk in records.chunks(AUDIT_CHUNK) {
            let mut qb = super::audit_insert::<Sqlite>(chunk);
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
        let mut qb = super::audit_chain_page::<Sqlite>(after, limit.clamp(1, MAX_AUDIT_LIMIT));
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
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(super::AUDIT_COLUMNS);
        qb.push(" WHERE 1 = 1");
        super::audit_filters(&mut qb, q);
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.pool).await.map_err(classify)?;
        rows.iter().map(audit_from_row).collect()
    }
}
