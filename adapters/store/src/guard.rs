//! Installing the in-database guard of `enforce = "database"`
//! (`fencepost migrate --guard URL`). The SQL is in `migrations/guard/`; the
//! call the proxy runs in a write's transaction is `fencepost-wire`'s
//! `pg::guard::call`.

use sqlx::Connection;

use crate::StoreError;

/// The guard's schema, table and functions, every migration in order;
/// every statement is idempotent, so running them all again upgrades an
/// installed guard in place (`0002` replaces the row-lock `advance` of
/// `0001` with the shared/exclusive gate, keeping `fencepost.marks`;
/// `0003` gives the gate a cheaper same-token path, `0004` makes that
/// path cheaper still).
pub const GUARD_SQL: &str = concat!(
    include_str!("../../../migrations/guard/0001_guard.sql"),
    "\n",
    include_str!("../../../migrations/guard/0002_gate.sql"),
    "\n",
    include_str!("../../../migrations/guard/0003_fast_path.sql"),
    "\n",
    include_str!("../../../migrations/guard/0004_cheaper_gate.sql"),
);

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
