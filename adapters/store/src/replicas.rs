//! The fencing tier's tables on Postgres: replica leases, the numbered
//! advance log (`fences.seq`) and the acknowledgements (schema in
//! `migrations/postgres/0002_replicas.sql`; the protocol in the proxy's
//! `cluster` module and `docs/replicas.md`).
//!
//! Every expiry is decided by the store's clock (`now()`), never by a
//! replica's: replicas only ever compare their own monotonic clock with
//! their own send instants.

use async_trait::async_trait;
use sqlx::postgres::PgListener;
use sqlx::Row;

use super::postgres::{classify, PgStore};
use super::{token_from_text, token_text, StoreError};

/// The channel an advance is announced on (payload: the resource).
pub const ADVANCE_CHANNEL: &str = "fencepost_advance";
/// The channel an acknowledgement is announced on (payload: the resource).
pub const ACK_CHANNEL: &str = "fencepost_ack";

pub(crate) fn unsupported(kind: &str) -> StoreError {
    StoreError::Config(format!(
        "the {kind} store holds one process: a tier of replicas needs a Postgres store"
    ))
}

/// One advance of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierAdvanceRow {
    pub resource: String,
    pub token: u64,
    pub seq: i64,
}

/// What a renewal learnt.
#[derive(Debug, Clone, Default)]
pub struct Renewal {
    /// Advances above `since`, in order (none on a first join).
    pub advances: Vec<TierAdvanceRow>,
    /// Where the replica's cursor stands afterwards.
    pub cursor: i64,
    /// Replicas whose lease is live by the store's clock, this one included.
    pub live: u64,
}

/// The mark after [`super::Store::tier_advance`] and the number of the
/// advance that set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierAdvance {
    pub mark: u64,
    pub seq: i64,
}

/// A replica as `GET /v1/replicas` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaRow {
    pub id: String,
    pub addresses: String,
    pub started_at_ms: i64,
    pub renewed_at_ms: i64,
    pub expires_at_ms: i64,
    /// By the store's clock at the time of the query.
    pub live: bool,
}

/// A session receiving the tier's notifications.
#[async_trait]
pub trait Notifications: Send {
    /// The next notification's channel ([`ADVANCE_CHANNEL`] or
    /// [`ACK_CHANNEL`]). An error means the session was lost: notifications
    /// sent meanwhile are gone, so the caller re-reads the tables.
    async fn recv(&mut self) -> Result<String, StoreError>;
}

struct PgNotifications(PgListener);

#[async_trait]
impl Notifications for PgNotifications {
    async fn recv(&mut self) -> Result<String, StoreError> {
        // `try_recv` reports a lost connection (None) instead of
        // reconnecting silently, so the caller knows to catch up.
        match self.0.try_recv().await.map_err(classify)? {
            Some(n) => Ok(n.channel().to_owned()),
            None => Err(StoreError::Unavailable(
                "the notification session was lost".into(),
            )),
        }
    }
}

fn advance_from_row(row: &sqlx::postgres::PgRow) -> Result<TierAdvanceRow, StoreError> {
    let token: String = row.try_get("token").map_err(classify)?;
    Ok(TierAdvanceRow {
        resource: row.try_get("resource").map_err(classify)?,
        token: token_from_text(&token)?,
        seq: row.try_get("seq").map_err(classify)?,
    })
}

const ADVANCES_SINCE: &str = "SELECT resource, token, seq FROM fences WHERE seq > $1 ORDER BY seq";

impl PgStore {
    pub(crate) async fn pg_replica_renew(
        &self,
        id: &str,
        addresses: &str,
        started_at_ms: i64,
        ttl_ms: i64,
        since: Option<i64>,
    ) -> Result<Renewal, StoreError> {
        let mut tx = self.pool().begin().await.map_err(classify)?;
        let joined: i64 = sqlx::query_scalar(
            "INSERT INTO replicas (id, addresses, started_at_ms, joined_seq, renewed_at, expires_at) \
             VALUES ($1, $2, $3, (SELECT seq FROM advance_seq WHERE id = 1), now(), \
                     now() + $4 * interval '1 millisecond') \
             ON CONFLICT (id) DO UPDATE SET addresses = EXCLUDED.addresses, \
               renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at \
             RETURNING joined_seq",
        )
        .bind(id)
        .bind(addresses)
        .bind(started_at_ms)
        .bind(ttl_ms as f64)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        let (advances, cursor) = match since {
            None => (Vec::new(), joined),
            Some(since) => {
                let rows = sqlx::query(ADVANCES_SINCE)
                    .bind(since)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(classify)?;
                let advances = rows
                    .iter()
                    .map(advance_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let cursor = advances.last().map_or(since, |a| a.seq.max(since));
                (advances, cursor)
            }
        };
        let live: i64 =
            sqlx::query_scalar("SELECT count(*) FROM replicas WHERE expires_at > now()")
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(Renewal {
            advances,
            cursor,
            live: u64::try_from(live).unwrap_or(0),
        })
    }

    pub(crate) async fn pg_advances_since(
        &self,
        since: i64,
    ) -> Result<Vec<TierAdvanceRow>, StoreError> {
        let rows = sqlx::query(ADVANCES_SINCE)
            .bind(since)
            .fetch_all(self.pool())
            .await
            .map_err(classify)?;
        rows.iter().map(advance_from_row).collect()
    }

    /// Raises the mark under the advance_seq row lock, so advances commit
    /// in the order of their numbers. A mark already at or above `token`
    /// is answered from one read, without the lock.
    pub(crate) async fn pg_tier_advance(
        &self,
        resource: &str,
        token: u64,
        now_ms: i64,
    ) -> Result<TierAdvance, StoreError> {
        let current = sqlx::query("SELECT token, seq FROM fences WHERE resource = $1")
            .bind(resource)
            .fetch_optional(self.pool())
            .await
            .map_err(classify)?;
        if let Some(row) = current {
            let mark: String = row.try_get("token").map_err(classify)?;
            let mark = token_from_text(&mark)?;
            if mark >= token {
                return Ok(TierAdvance {
                    mark,
                    seq: row.try_get("seq").map_err(classify)?,
                });
            }
        }
        let mut conn = self.pool().acquire().await.map_err(classify)?;
        advance_in(&mut conn, resource, token, now_ms).await
    }
}

/// The numbered advance inside the caller's transaction: takes the
/// advance_seq row lock (held to commit, so advances commit in number
/// order), raises the mark, and NOTIFYs (delivered at commit) if it rose.
/// A bare connection works too: the statement is then its own
/// transaction.
/// Used by [`PgStore::pg_tier_advance`] and by a lease grant (fence at
/// grant: the tier learns of the new token before its holder can write).
pub(crate) async fn advance_in(
    tx: &mut sqlx::PgConnection,
    resource: &str,
    token: u64,
    now_ms: i64,
) -> Result<TierAdvance, StoreError> {
    // One statement, one round trip: the advance_seq row lock is taken
    // first (the insert reads its number), so every advancer holds it
    // before touching `fences` and the insert of a missing row cannot race
    // another one; the NOTIFY is sent only if the mark rose.
    let row = sqlx::query(
        "WITH s AS (UPDATE advance_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq), \
         up AS (INSERT INTO fences (resource, token, updated_at_ms, seq) \
                SELECT $1, $2, $3, s.seq FROM s \
                ON CONFLICT (resource) DO UPDATE SET \
                  token = GREATEST(fences.token, EXCLUDED.token), \
                  updated_at_ms = CASE WHEN EXCLUDED.token > fences.token \
                                       THEN EXCLUDED.updated_at_ms ELSE fences.updated_at_ms END, \
                  seq = CASE WHEN EXCLUDED.token > fences.token \
                             THEN EXCLUDED.seq ELSE fences.seq END \
                RETURNING token, seq) \
         SELECT up.token, up.seq, \
           (SELECT count(*) FROM (SELECT pg_notify($4, $1) WHERE up.seq = s.seq) n) AS notified \
         FROM up, s",
    )
    .bind(resource)
    .bind(token_text(token))
    .bind(now_ms)
    .bind(ADVANCE_CHANNEL)
    .fetch_one(&mut *tx)
    .await
    .map_err(classify)?;
    let mark: String = row.try_get("token").map_err(classify)?;
    let mark = token_from_text(&mark)?;
    let set_by: i64 = row.try_get("seq").map_err(classify)?;
    Ok(TierAdvance { mark, seq: set_by })
}

impl PgStore {
    pub(crate) async fn pg_replica_ack(
        &self,
        resource: &str,
        id: &str,
        token: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "WITH a AS ( \
               INSERT INTO acks (resource, replica_id, token) VALUES ($1, $2, $3) \
               ON CONFLICT (resource, replica_id) DO UPDATE \
                 SET token = GREATEST(acks.token, EXCLUDED.token) RETURNING 1) \
             SELECT pg_notify($4, $1) FROM a",
        )
        .bind(resource)
        .bind(id)
        .bind(token_text(token))
        .bind(ACK_CHANNEL)
        .execute(self.pool())
        .await
        .map_err(classify)?;
        Ok(())
    }

    /// The live replicas (by the store's clock) other than `me` that
    /// joined before advance `seq` and have not acknowledged `token`.
    ///
    /// Every other replica row is locked `FOR SHARE` first, expired or not,
    /// so a renewal still in flight (its UPDATE done, its COMMIT not yet) is
    /// waited for and its new expiry seen. Without the lock an advancer
    /// could read the old, lapsed expiry, skip that replica, and admit,
    /// while the renewal, whose read of the advances ran before this
    /// advance committed, confirmed a lease with the old mark: that replica
    /// then forwarded an older token after the newer one (found by the
    /// tier checker, seed 3000119, with a delayed store link). With the
    /// lock the advancer either sees the renewal's new expiry (and waits
    /// for the ack) or ran before the renewal's UPDATE, and so before its
    /// read of the advances, which then returns this one. The locking
    /// select is a `MATERIALIZED` CTE: as a plain subquery the planner
    /// pushes the expiry filter into it, the lapsed row is filtered out
    /// before it is locked, and nothing waits (tried on Postgres 15).
    pub(crate) async fn pg_pending_acks(
        &self,
        resource: &str,
        token: u64,
        seq: i64,
        me: &str,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "WITH r AS MATERIALIZED (SELECT id, expires_at, joined_seq FROM replicas \
                                     WHERE id <> $4 FOR SHARE) \
             SELECT r.id FROM r \
             WHERE r.expires_at > now() AND r.joined_seq < $3 \
               AND NOT EXISTS (SELECT 1 FROM acks a WHERE a.resource = $1 \
                                 AND a.replica_id = r.id AND a.token >= $2) \
             ORDER BY r.id",
        )
        .bind(resource)
        .bind(token_text(token))
        .bind(seq)
        .bind(me)
        .fetch_all(self.pool())
        .await
        .map_err(classify)
    }

    pub(crate) async fn pg_list_replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, addresses, started_at_ms, \
               (extract(epoch FROM renewed_at) * 1000)::bigint AS renewed_at_ms, \
               (extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms, \
               expires_at > now() AS live \
             FROM replicas ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaRow {
                    id: r.try_get("id").map_err(classify)?,
                    addresses: r.try_get("addresses").map_err(classify)?,
                    started_at_ms: r.try_get("started_at_ms").map_err(classify)?,
                    renewed_at_ms: r.try_get("renewed_at_ms").map_err(classify)?,
                    expires_at_ms: r.try_get("expires_at_ms").map_err(classify)?,
                    live: r.try_get("live").map_err(classify)?,
                })
            })
            .collect()
    }

    pub(crate) async fn pg_replica_leave(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await.map_err(classify)?;
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        sqlx::query("DELETE FROM acks WHERE replica_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        // Wake advancers waiting on this replica.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(ACK_CHANNEL)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    /// One statement: the long-expired replicas and their acks, and any
    /// ack left by a replica whose row is gone (an ack written late by a
    /// pruned replica that woke up). Safe for
    /// a replica that was only paused that long: its next renewal inserts
    /// its row again with a fresh `joined_seq`, exactly as a new replica
    /// joins, and it reads the advances above its own cursor before it
    /// admits again; an advancer never waits for an expired lease anyway.
    pub(crate) async fn pg_replica_prune(&self, retention_ms: i64) -> Result<u64, StoreError> {
        let gone: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM replicas \
                           WHERE expires_at < now() - $1 * interval '1 millisecond' \
                           RETURNING id), \
                  acks_gone AS (DELETE FROM acks WHERE replica_id IN (SELECT id FROM gone) \
                                OR NOT EXISTS (SELECT 1 FROM replicas r \
                                               WHERE r.id = acks.replica_id)) \
             SELECT count(*) FROM gone",
        )
        .bind(retention_ms as f64)
        .fetch_one(self.pool())
        .await
        .map_err(classify)?;
        Ok(u64::try_from(gone).unwrap_or(0))
    }

    pub(crate) async fn pg_tier_notifications(&self) -> Result<Box<dyn Notifications>, StoreError> {
        let mut listener = PgListener::connect_with(self.pool())
            .await
            .map_err(classify)?;
        listener
            .listen_all([ADVANCE_CHANNEL, ACK_CHANNEL])
            .await
            .map_err(classify)?;
        Ok(Box::new(PgNotifications(listener)))
    }
}
