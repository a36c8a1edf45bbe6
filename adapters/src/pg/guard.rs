//! The in-database guard of `enforce = "database"`: its installation
//! (`fencepost migrate --guard URL`) and the statement the proxy runs in a
//! write's own transaction. The SQL is in `migrations/guard/`.

use sqlx::Connection;

use crate::store::StoreError;

/// The guard's schema, table and function; every statement is idempotent.
pub const GUARD_SQL: &str = include_str!("../../../migrations/guard/0001_guard.sql");

/// Arbitrary key of the advisory lock that keeps two concurrent installs
/// from racing on `CREATE ... IF NOT EXISTS` (which is not atomic).
const INSTALL_LOCK: i64 = 0x6665_6e63_6570_6f73; // "fencepos"

/// Installs (or re-installs) the guard into the database at `url`, in one
/// transaction, so a failed install leaves nothing half made.
pub async fn install(url: &str) -> Result<(), StoreError> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(GUARD_SQL).execute(&mut *tx).await?;
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

/// The guard call for one admitted write. `resource` has already been
/// validated as a resource name (`[A-Za-z0-9._:/-]`), so it needs no
/// escaping beyond quotes; the token is a number.
pub fn call(resource: &str, token: u64) -> String {
    format!(
        "SELECT fencepost.advance('{}', '{token:020}')",
        resource.replace('\'', "''")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn call_pads_and_quotes() {
        assert_eq!(
            super::call("orders", 5),
            "SELECT fencepost.advance('orders', '00000000000000000005')"
        );
        assert!(super::call("a'b", u64::MAX).contains("'a''b', '18446744073709551615'"));
    }
}
