//! Pages of the fence and lease tables, searched in the database: what an
//! operator's console reads when there are thousands of resources (it
//! shows one page and never loads the whole table into a browser or the
//! admin process), and the cheap digest it polls to learn that something
//! changed.
//!
//! The SQL is the same for both backends but for the substring function
//! (`instr` in SQLite, `strpos` in Postgres), so each is one builder here.

use sqlx::{PgPool, QueryBuilder, Row, SqlitePool};

use super::{fence_from_row, lease_from_row, FenceRow, StoreError};
use fencing::LeaseRecord;

/// Which rows of a listing, ordered by resource: those whose name contains
/// `q` (case-sensitive, as names are), `offset` of them skipped, at most
/// `limit` (all when `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageQuery {
    pub q: Option<String>,
    pub limit: Option<u32>,
    pub offset: u64,
}

/// One page and how many rows matched in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub total: u64,
}

impl PageQuery {
    /// The page of `rows` (already ordered by resource) this query selects:
    /// the fallback for stores without SQL of their own.
    pub fn apply<T>(&self, rows: Vec<T>, name: impl Fn(&T) -> &str) -> Page<T> {
        let q = self.q.as_deref().unwrap_or("");
        let matched: Vec<T> = rows.into_iter().filter(|r| name(r).contains(q)).collect();
        let total = matched.len() as u64;
        let skip = usize::try_from(self.offset).unwrap_or(usize::MAX);
        let take = self
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        Page {
            rows: matched.into_iter().skip(skip).take(take).collect(),
            total,
        }
    }

    fn q(&self) -> &str {
        self.q.as_deref().unwrap_or("")
    }

    fn offset(&self) -> i64 {
        i64::try_from(self.offset).unwrap_or(i64::MAX)
    }
}

/// What changed in the fence and lease tables since the last look, in a
/// few integers: a grant, a release, a renewal or an advance changes at
/// least one of them. Compared for equality only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Digest {
    pub fences: i64,
    pub fences_updated_ms: i64,
    pub leases: i64,
    /// Leases with a holder (a release clears it).
    pub leases_held: i64,
    pub leases_granted_ms: i64,
    /// The expiries folded into one number (a renewal moves one).
    pub leases_expiry_sum: i64,
}

/// Expiries are summed modulo this prime so the sum cannot overflow
/// whatever the number of leases.
const FOLD: i64 = 1_000_003;

const FENCE_COLUMNS: &str = "SELECT resource, token, updated_at_ms FROM fences";
const LEASE_COLUMNS: &str = "SELECT resource, holder, token, granted_at_ms, expires_at_ms, \
     ttl_ms, free_after_ms FROM leases";

fn digest_sql() -> String {
    format!(
        "SELECT (SELECT count(*) FROM fences) AS f, \
                (SELECT coalesce(max(updated_at_ms), 0) FROM fences) AS fu, \
                (SELECT count(*) FROM leases) AS l, \
                (SELECT count(holder) FROM leases) AS lh, \
                (SELECT coalesce(max(granted_at_ms), 0) FROM leases) AS lg, \
                (SELECT coalesce(sum(expires_at_ms % {FOLD}), 0) FROM leases) AS le"
    )
}

/// What differs between the two backends' listing SQL.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The position of a substring, 0 when absent (1 for the empty one).
    fn search(self) -> &'static str {
        match self {
            Dialect::Sqlite => "instr",
            Dialect::Postgres => "strpos",
        }
    }
}

/// `select` filtered by `p.q`, and, for a page, ordered, limited and
/// offset.
fn filtered<'a, DB: sqlx::Database>(
    select: &str,
    dialect: Dialect,
    p: &'a PageQuery,
    page: bool,
) -> QueryBuilder<'a, DB>
where
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut qb = QueryBuilder::new(select);
    qb.push(" WHERE ")
        .push(dialect.search())
        .push("(resource, ")
        .push_bind(p.q())
        .push(") > 0");
    if page {
        qb.push(" ORDER BY resource");
        if let Some(limit) = p.limit {
            qb.push(" LIMIT ").push_bind(i64::from(limit));
        } else if dialect == Dialect::Sqlite {
            // SQLite takes OFFSET only after a LIMIT; -1 is none.
            qb.push(" LIMIT -1");
        }
        qb.push(" OFFSET ").push_bind(p.offset());
    }
    qb
}

fn count(total: i64) -> u64 {
    u64::try_from(total).unwrap_or(0)
}

pub(crate) async fn sqlite_fences(
    pool: &SqlitePool,
    p: &PageQuery,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Page<FenceRow>, StoreError> {
    let rows = filtered(FENCE_COLUMNS, Dialect::Sqlite, p, true)
        .build()
        .fetch_all(pool)
        .await
        .map_err(classify)?;
    let total: i64 = filtered("SELECT count(*) FROM fences", Dialect::Sqlite, p, false)
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .map_err(classify)?;
    Ok(Page {
        rows: rows.iter().map(fence_from_row).collect::<Result<_, _>>()?,
        total: count(total),
    })
}

pub(crate) async fn sqlite_leases(
    pool: &SqlitePool,
    p: &PageQuery,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Page<LeaseRecord>, StoreError> {
    let rows = filtered(LEASE_COLUMNS, Dialect::Sqlite, p, true)
        .build()
        .fetch_all(pool)
        .await
        .map_err(classify)?;
    let total: i64 = filtered("SELECT count(*) FROM leases", Dialect::Sqlite, p, false)
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .map_err(classify)?;
    Ok(Page {
        rows: rows.iter().map(lease_from_row).collect::<Result<_, _>>()?,
        total: count(total),
    })
}

pub(crate) async fn pg_fences(
    pool: &PgPool,
    p: &PageQuery,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Page<FenceRow>, StoreError> {
    let rows = filtered(FENCE_COLUMNS, Dialect::Postgres, p, true)
        .build()
        .fetch_all(pool)
        .await
        .map_err(classify)?;
    let total: i64 = filtered("SELECT count(*) FROM fences", Dialect::Postgres, p, false)
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .map_err(classify)?;
    Ok(Page {
        rows: rows.iter().map(fence_from_row).collect::<Result<_, _>>()?,
        total: count(total),
    })
}

pub(crate) async fn pg_leases(
    pool: &PgPool,
    p: &PageQuery,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Page<LeaseRecord>, StoreError> {
    let rows = filtered(LEASE_COLUMNS, Dialect::Postgres, p, true)
        .build()
        .fetch_all(pool)
        .await
        .map_err(classify)?;
    let total: i64 = filtered("SELECT count(*) FROM leases", Dialect::Postgres, p, false)
        .build_query_scalar()
        .fetch_one(pool)
        .await
        .map_err(classify)?;
    Ok(Page {
        rows: rows.iter().map(lease_from_row).collect::<Result<_, _>>()?,
        total: count(total),
    })
}

pub(crate) async fn sqlite_digest(
    pool: &SqlitePool,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Digest, StoreError> {
    let row = sqlx::query(&digest_sql())
        .fetch_one(pool)
        .await
        .map_err(classify)?;
    Ok(Digest {
        fences: row.try_get("f").map_err(classify)?,
        fences_updated_ms: row.try_get("fu").map_err(classify)?,
        leases: row.try_get("l").map_err(classify)?,
        leases_held: row.try_get("lh").map_err(classify)?,
        leases_granted_ms: row.try_get("lg").map_err(classify)?,
        leases_expiry_sum: row.try_get("le").map_err(classify)?,
    })
}

pub(crate) async fn pg_digest(
    pool: &PgPool,
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Digest, StoreError> {
    // Postgres sums bigints into numeric: cast back (the fold keeps it small).
    let sql = digest_sql().replace(
        &format!("sum(expires_at_ms % {FOLD}), 0)"),
        &format!("sum(expires_at_ms % {FOLD}), 0)::bigint"),
    );
    let row = sqlx::query(&sql).fetch_one(pool).await.map_err(classify)?;
    Ok(Digest {
        fences: row.try_get("f").map_err(classify)?,
        fences_updated_ms: row.try_get("fu").map_err(classify)?,
        leases: row.try_get("l").map_err(classify)?,
        leases_held: row.try_get("lh").map_err(classify)?,
        leases_granted_ms: row.try_get("lg").map_err(classify)?,
        leases_expiry_sum: row.try_get("le").map_err(classify)?,
    })
}

/// A replica's acknowledged mark of one resource (the tier's `acks`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaMark {
    pub resource: String,
    pub replica: String,
    pub token: u64,
}

pub(crate) async fn pg_replica_marks(
    pool: &PgPool,
    resources: &[String],
    classify: fn(sqlx::Error) -> StoreError,
) -> Result<Vec<ReplicaMark>, StoreError> {
    let rows = sqlx::query(
        "SELECT resource, replica_id, token FROM acks WHERE resource = ANY($1) \
         ORDER BY resource, replica_id",
    )
    .bind(resources)
    .fetch_all(pool)
    .await
    .map_err(classify)?;
    rows.iter()
        .map(|r| {
            let token: String = r.try_get("token").map_err(classify)?;
            Ok(ReplicaMark {
                resource: r.try_get("resource").map_err(classify)?,
                replica: r.try_get("replica_id").map_err(classify)?,
                token: super::token_from_text(&token)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_pages_and_searches_like_the_sql() {
        let rows: Vec<String> = (0..10).map(|i| format!("r{i:02}")).collect();
        let p = PageQuery {
            q: Some("0".into()),
            limit: Some(3),
            offset: 1,
        };
        let page = p.apply(rows.clone(), |s| s.as_str());
        // Every one of r00..r09 contains a "0".
        assert_eq!(page.total, 10);
        assert_eq!(page.rows, vec!["r01", "r02", "r03"]);
        let all = PageQuery::default().apply(rows, |s| s.as_str());
        assert_eq!((all.total, all.rows.len()), (10, 10));
    }
}
