//! Fenced writes through the Postgres proxy: the token in a connection's
//! startup `options`, and refusals (`ZF001`-`ZF004`) read from the
//! driver's errors.
//!
//! A token in the startup options fences every statement of that
//! connection, for its whole life: open connections (or a pool) per lease
//! term and close them when the term ends. Connections that outlive terms
//! (a long-lived pool) fence per statement instead, with
//! [`Fencing::sql_comment`](crate::Fencing::sql_comment) prefixed to the
//! SQL, or per session with [`Fencing::set_statements`](crate::Fencing::set_statements).
//!
//! Options are appended to any already set; a later `-c` of the same
//! setting wins, in Postgres and in the proxy alike.

#[cfg(any(feature = "tokio-postgres", feature = "sqlx"))]
use crate::{Fencing, Refusal};

/// Adds `-c fencing.token=T -c fencing.resource=R` to a
/// `tokio_postgres::Config`'s options.
///
/// ```no_run
/// # async fn f(fencing: fencepost_client::Fencing) -> Result<(), Box<dyn std::error::Error>> {
/// let mut config: tokio_postgres::Config = "host=127.0.0.1 port=6432 user=app dbname=app".parse()?;
/// fencepost_client::pg::fence_tokio_postgres(&mut config, &fencing);
/// let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
/// tokio::spawn(conn);
/// if let Err(e) = client.execute("UPDATE accounts SET balance = 90 WHERE id = 1", &[]).await {
///     match fencepost_client::pg::refusal_tokio_postgres(&e) {
///         Some(r) if r.is_stale() => eprintln!("a newer leader exists: {r}"),
///         _ => return Err(e.into()),
///     }
/// }
/// # Ok(()) }
/// ```
#[cfg(feature = "tokio-postgres")]
pub fn fence_tokio_postgres<'a>(
    config: &'a mut tokio_postgres::Config,
    fencing: &Fencing,
) -> &'a mut tokio_postgres::Config {
    let options = match config.get_options().map(str::trim) {
        Some(o) if !o.is_empty() => format!("{o} {}", fencing.pg_options()),
        _ => fencing.pg_options(),
    };
    config.options(options)
}

/// The refusal in a `tokio_postgres::Error`, if a fencing proxy refused.
#[cfg(feature = "tokio-postgres")]
pub fn refusal_tokio_postgres(e: &tokio_postgres::Error) -> Option<Refusal> {
    let db = e.as_db_error()?;
    Refusal::from_sqlstate(db.code().code(), db.message())
}

/// Adds `-c fencing.token=T -c fencing.resource=R` to sqlx's
/// `PgConnectOptions`.
///
/// ```no_run
/// # async fn f(fencing: fencepost_client::Fencing) -> Result<(), Box<dyn std::error::Error>> {
/// use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
/// let opts: PgConnectOptions = "postgres://app@127.0.0.1:6432/app".parse()?;
/// let opts = fencepost_client::pg::fence_sqlx(opts, &fencing);
/// let pool = PgPoolOptions::new().connect_with(opts).await?; // one pool per lease term
/// if let Err(e) = sqlx::query("UPDATE accounts SET balance = 90").execute(&pool).await {
///     if let Some(r) = fencepost_client::pg::refusal_sqlx(&e) {
///         eprintln!("refused: {r}");
///     }
/// }
/// # Ok(()) }
/// ```
#[cfg(feature = "sqlx")]
pub fn fence_sqlx(
    options: sqlx::postgres::PgConnectOptions,
    fencing: &Fencing,
) -> sqlx::postgres::PgConnectOptions {
    options.options([
        ("fencing.token", fencing.token().as_str()),
        ("fencing.resource", fencing.resource()),
    ])
}

/// The refusal in a `sqlx::Error`, if a fencing proxy refused.
#[cfg(feature = "sqlx")]
pub fn refusal_sqlx(e: &sqlx::Error) -> Option<Refusal> {
    let db = e.as_database_error()?;
    Refusal::from_sqlstate(db.code()?.as_ref(), db.message())
}

#[cfg(test)]
mod tests {
    #[cfg(feature = "tokio-postgres")]
    #[test]
    fn tokio_postgres_options_are_appended() {
        let f = crate::Fencing::new("orders", "5").unwrap();
        let mut c = tokio_postgres::Config::new();
        super::fence_tokio_postgres(&mut c, &f);
        assert_eq!(
            c.get_options(),
            Some("-c fencing.token=5 -c fencing.resource=orders")
        );
        let mut c: tokio_postgres::Config = "options='-c search_path=app'".parse().unwrap();
        super::fence_tokio_postgres(&mut c, &f);
        assert_eq!(
            c.get_options(),
            Some("-c search_path=app -c fencing.token=5 -c fencing.resource=orders")
        );
    }

    #[cfg(feature = "sqlx")]
    #[test]
    fn sqlx_options_are_appended() {
        let f = crate::Fencing::new("orders", "5.sig").unwrap();
        let o = sqlx::postgres::PgConnectOptions::new().options([("search_path", "app")]);
        let o = super::fence_sqlx(o, &f);
        assert_eq!(
            o.get_options(),
            Some("-c search_path=app -c fencing.token=5.sig -c fencing.resource=orders")
        );
    }
}
