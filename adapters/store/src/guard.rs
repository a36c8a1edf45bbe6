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

/// What [`install`] did about the `fencepost_guard` extension
/// (`deploy/fencepost_guard/`: the same-token check in C, which a proxy
/// calls with `[[postgres]] guard_extension = true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// Created now or before: `fencepost.advance_fast` exists.
    Installed,
    /// The server does not have it (`pg_available_extensions`).
    Unavailable,
    /// The server has it, but creating it (or updating it to the
    /// server's version) failed (a C extension needs a superuser): the
    /// server's message.
    Refused(String),
}

/// Installs (or re-installs) the guard into the database at `url`, in one
/// transaction, so a failed install leaves nothing half made. Then, when
/// the server has the `fencepost_guard` extension, creates it or updates
/// it to the installed version (in a savepoint: a role that may not
/// create it keeps the guard it installed).
pub async fn install(url: &str) -> Result<Extension, StoreError> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(GUARD_SQL).execute(&mut *tx).await?;
    // The version the server has, and the one this database has (if any).
    let versions: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT default_version, installed_version FROM pg_available_extensions
          WHERE name = 'fencepost_guard'",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let extension = match versions {
        None => Extension::Unavailable,
        Some((server, Some(here))) if server == here => Extension::Installed,
        Some((_, here)) => {
            // Not created yet, or created by an older fencepost: create
            // it, or update it to the server's version.
            let sql = if here.is_none() {
                "CREATE EXTENSION IF NOT EXISTS fencepost_guard"
            } else {
                "ALTER EXTENSION fencepost_guard UPDATE"
            };
            let mut sp = tx.begin().await?;
            match sqlx::raw_sql(sql).execute(&mut *sp).await {
                Ok(_) => {
                    sp.commit().await?;
                    Extension::Installed
                }
                Err(e) => {
                    sp.rollback().await?;
                    Extension::Refused(e.to_string())
                }
            }
        }
    };
    tx.commit().await?;
    conn.close().await?;
    Ok(extension)
}
