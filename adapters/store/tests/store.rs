//! The stores against real databases: every behavioural test runs on SQLite
//! (a file in a temp dir) and on Postgres (a fresh database per test at
//! `DATABASE_URL`, dropped afterwards, so tests run in parallel). Postgres
//! outages are staged with a small TCP forwarder between the store and the
//! server.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fencepost_store::{AuditQuery, PageQuery, PgStore, SqliteStore, Store, StoreError};
use fencing::{
    AuditRecord, ChainVerifier, Chainer, Kind, LeaseAudit, LeaseConfig, LeaseOp, LeaseOutcome,
    LeaseReason, Protocol, Reason,
};
use sqlx::{Connection, Executor};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// Rebuilds a Postgres URL with another `host:port` and/or database.
fn url_with(url: &str, host_port: Option<&str>, db: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let (before_q, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_q.find('/') {
        Some(i) => (&before_q[..i], &before_q[i + 1..]),
        None => (before_q, ""),
    };
    let (userinfo, hp) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    let mut out = format!(
        "{scheme}://{userinfo}{}/{}",
        host_port.unwrap_or(hp),
        db.unwrap_or(path)
    );
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = RandomState::new().hash_one((std::process::id(), n, Instant::now()));
    format!("{h:016x}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty store location for one test.
struct Fixture {
    backend: Backend,
    url: String,
    pg_db: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

/// An opened store, plus the concrete handle so it can be closed.
struct Opened {
    store: Arc<dyn Store>,
    sqlite: Option<SqliteStore>,
    pg: Option<PgStore>,
}

impl std::ops::Deref for Opened {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

impl Opened {
    async fn close(self) {
        if let Some(s) = &self.sqlite {
            s.close().await;
        }
        if let Some(p) = &self.pg {
            p.close().await;
        }
    }
}

impl Fixture {
    async fn new(backend: Backend) -> Fixture {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}", dir.path().join("fencepost.db").display());
                Fixture {
                    backend,
                    url,
                    pg_db: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin_url = pg_url();
                let db = format!("fp_store_{}", unique_suffix());
                let mut admin = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .expect("connect to DATABASE_URL (is Postgres running?)");
                admin
                    .execute(format!("CREATE DATABASE \"{db}\"").as_str())
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                Fixture {
                    backend,
                    url: url_with(&admin_url, None, Some(&db)),
                    pg_db: Some(db),
                    _dir: None,
                }
            }
        }
    }

    async fn open(&self) -> Opened {
        match self.backend {
            Backend::Sqlite => {
                let s = SqliteStore::open(&self.url)
                    .await
                    .expect("open sqlite store");
                Opened {
                    store: Arc::new(s.clone()),
                    sqlite: Some(s),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let p = PgStore::open(&self.url).expect("open pg store");
                Opened {
                    store: Arc::new(p.clone()),
                    sqlite: None,
                    pg: Some(p),
                }
            }
        }
    }

    async fn open_migrated(&self) -> Opened {
        let s = self.open().await;
        s.migrate().await.expect("migrate");
        s
    }

    /// Runs raw SQL against the store's database, behind the store's back,
    /// to plant rows the API cannot produce.
    async fn raw(&self, sqlite_sql: &str, pg_sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("raw sqlite");
                c.execute(sqlite_sql).await.expect("raw sqlite sql");
                c.close().await.ok();
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("raw pg");
                c.execute(pg_sql).await.expect("raw pg sql");
                c.close().await.ok();
            }
        }
    }

    async fn cleanup(&self) {
        if let Some(db) = &self.pg_db {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&pg_url()).await {
                let _ = admin
                    .execute(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)").as_str())
                    .await;
                admin.close().await.ok();
            }
        }
    }
}

/// Runs a test body on a fresh fixture and drops the fixture's database
/// even when the body panics.
async fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Arc<Fixture>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fx = Arc::new(Fixture::new(backend).await);
    let result = tokio::spawn(body(fx.clone())).await;
    fx.cleanup().await;
    if let Err(e) = result {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task failed: {e}");
    }
}

/// One test function per store for each behavioural test.
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::run(super::Backend::Sqlite, super::$name).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::run(super::Backend::Postgres, super::$name).await
            }
        }
    )*};
}

both!(
    migrate_is_idempotent,
    advance_fence_never_lowers_and_survives_reopen,
    concurrent_advances_end_at_the_max,
    concurrent_acquires_grant_exactly_one,
    expiry_regrant_tokens_increase_across_reopen,
    renew_or_release_by_non_holder_is_refused,
    release_keeps_the_token,
    audit_is_newest_first_and_filters,
    audit_limit_defaults_and_cap,
    audit_chains_round_trip_and_a_batch_shipped_twice_lands_once,
    large_tokens_round_trip_and_compare,
    pages_search_and_digest,
);

fn cfg() -> LeaseConfig {
    LeaseConfig::default()
}

fn acquire(holder: &str, ttl_ms: i64) -> LeaseOp {
    LeaseOp::Acquire {
        holder: holder.into(),
        ttl_ms,
    }
}

// ---------------------------------------------------------------- fences

async fn migrate_is_idempotent(fx: Arc<Fixture>) {
    let s = fx.open().await;
    s.migrate().await.expect("first migrate");
    s.migrate().await.expect("second migrate");
    assert_eq!(s.advance_fence("r", 3, 1).await.unwrap(), 3);
    s.ping().await.unwrap();
    drop(s);
    let s = fx.open().await;
    s.migrate().await.expect("migrate after reopen");
    assert_eq!(s.load_fence("r").await.unwrap(), Some(3));
    s.close().await;
}

/// Deterministic pseudo-random u64s (PCG-style LCG), spread over all
/// magnitudes so the text encoding sees 1- to 20-digit values.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let x = self.0 ^ (self.0 >> 29);
        x >> (x % 64)
    }
}

async fn advance_fence_never_lowers_and_survives_reopen(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    let resources = ["a", "b/c", "shard:7", "z"];
    let mut model: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    let mut rng = Lcg(0x5eed);
    for step in 0..240i64 {
        let r = resources[(rng.next() % resources.len() as u64) as usize];
        let t = rng.next();
        let after = s.advance_fence(r, t, step).await.unwrap();
        let entry = model.entry(r).or_insert((t, step));
        if t > entry.0 {
            *entry = (t, step);
        }
        assert_eq!(after, entry.0, "advance({r}, {t}) at step {step}");
        let row = s.get_fence(r).await.unwrap().expect("row exists");
        assert_eq!(
            (row.token, row.updated_at_ms),
            *entry,
            "updated_at moves only on a rise"
        );
    }
    // Equal and lower tokens leave the mark (and its timestamp) alone.
    for (r, (t, at)) in &model {
        assert_eq!(s.advance_fence(r, *t, 10_000).await.unwrap(), *t);
        assert_eq!(s.advance_fence(r, t / 2, 10_001).await.unwrap(), *t);
        assert_eq!(s.get_fence(r).await.unwrap().unwrap().updated_at_ms, *at);
    }
    let listed = s.list_fences().await.unwrap();
    let listed: Vec<(String, u64)> = listed.into_iter().map(|f| (f.resource, f.token)).collect();
    let expected: Vec<(String, u64)> = model
        .iter()
        .map(|(r, (t, _))| (r.to_string(), *t))
        .collect();
    assert_eq!(listed, expected, "listed in resource order");
    assert_eq!(s.load_fence("never").await.unwrap(), None);
    assert_eq!(s.get_fence("never").await.unwrap(), None);

    // Dropped without a graceful close, as a crashed proxy would leave it.
    drop(s);
    let s = fx.open_migrated().await;
    for (r, (t, _)) in &model {
        assert_eq!(
            s.load_fence(r).await.unwrap(),
            Some(*t),
            "{r} survived reopen"
        );
        assert_eq!(s.advance_fence(r, 0, 20_000).await.unwrap(), *t);
    }
    s.close().await;
}

async fn concurrent_advances_end_at_the_max(fx: Arc<Fixture>) {
    let a = fx.open_migrated().await;
    let b = fx.open().await;
    let stores = [a.store.clone(), b.store.clone()];
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = stores[(i % 2) as usize].clone();
        // A permutation of 1..=64 so the highest does not come last.
        let t = (i * 37) % 64 + 1;
        tasks.push(tokio::spawn(async move {
            let after = s.advance_fence("hot", t, i as i64).await.unwrap();
            assert!(
                after >= t,
                "mark {after} below the token {t} it just admitted"
            );
            after
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.load_fence("hot").await.unwrap(), Some(64));
    a.close().await;
    b.close().await;
}

// ---------------------------------------------------------------- leases

async fn concurrent_acquires_grant_exactly_one(fx: Arc<Fixture>) {
    let a = fx.open_migrated().await;
    let b = fx.open().await;
    let stores = [a.store.clone(), b.store.clone()];

    // Round 1: no row yet (racing inserts); round 2: after expiry (racing
    // updates of an existing row).
    for (round, now, expect_token) in [(1, 1_000i64, 1u64), (2, 100_000, 2)] {
        let mut tasks = Vec::new();
        for i in 0..32 {
            let s = stores[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let holder = format!("r{round}-h{i}");
                s.lease_apply("leader", &acquire(&holder, 60_000), now, &cfg())
                    .await
                    .unwrap()
            }));
        }
        let mut granted = Vec::new();
        let mut held = 0;
        for t in tasks {
            match t.await.unwrap() {
                LeaseOutcome::Granted { lease, .. } => granted.push(lease),
                LeaseOutcome::Held { .. } => held += 1,
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
        assert_eq!(
            granted.len(),
            1,
            "round {round}: exactly one grant, got {granted:?}"
        );
        assert_eq!(held, 31);
        let winner = &granted[0];
        assert_eq!(winner.token, expect_token);
        let stored = a.get_lease("leader").await.unwrap().unwrap();
        assert_eq!(&stored, winner, "the stored lease is the winner's");
    }
    a.close().await;
    b.close().await;
}

async fn expiry_regrant_tokens_increase_across_reopen(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    let LeaseOutcome::Granted { lease: a, previous } = s
        .lease_apply("r", &acquire("a", 100), 0, &cfg())
        .await
        .unwrap()
    else {
        panic!("first acquire must grant")
    };
    assert_eq!((a.token, previous), (1, None));
    assert!(matches!(
        s.lease_apply("r", &acquire("b", 100), 50, &cfg())
            .await
            .unwrap(),
        LeaseOutcome::Held { .. }
    ));
    let LeaseOutcome::Granted { lease: b, previous } = s
        .lease_apply("r", &acquire("b", 100), 150, &cfg())
        .await
        .unwrap()
    else {
        panic!("acquire after expiry must grant")
    };
    assert_eq!(b.token, 2);
    assert_eq!(previous, Some(("a".to_owned(), 1)));

    // Restart: the elector must not forget it issued 2.
    drop(s);
    let s = fx.open_migrated().await;
    assert_eq!(s.get_lease("r").await.unwrap().unwrap(), b);
    let LeaseOutcome::Granted { lease: c, .. } = s
        .lease_apply("r", &acquire("c", 100), 400, &cfg())
        .await
        .unwrap()
    else {
        panic!("acquire after expiry must grant")
    };
    assert_eq!(c.token, 3);
    let LeaseOutcome::Reacquired { lease } = s
        .lease_apply("r", &acquire("c", 200), 450, &cfg())
        .await
        .unwrap()
    else {
        panic!("holder acquiring again must reacquire")
    };
    assert_eq!((lease.token, lease.expires_at_ms), (3, 650));
    s.close().await;

    let s = fx.open_migrated().await;
    let LeaseOutcome::Granted { lease: d, .. } = s
        .lease_apply("r", &acquire("d", 100), 10_000, &cfg())
        .await
        .unwrap()
    else {
        panic!("acquire after expiry must grant")
    };
    assert_eq!(d.token, 4);
    s.close().await;
}

async fn renew_or_release_by_non_holder_is_refused(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    s.lease_apply("r", &acquire("a", 1_000), 0, &cfg())
        .await
        .unwrap();
    let cases = [
        LeaseOp::Renew {
            holder: "a".into(),
            token: 2,
            ttl_ms: None,
        },
        LeaseOp::Renew {
            holder: "b".into(),
            token: 1,
            ttl_ms: None,
        },
        LeaseOp::Release {
            holder: "b".into(),
            token: 1,
        },
        LeaseOp::Release {
            holder: "a".into(),
            token: 0,
        },
    ];
    for op in &cases {
        let out = s.lease_apply("r", op, 100, &cfg()).await.unwrap();
        assert!(
            matches!(out, LeaseOutcome::NotHolder { lease: Some(_) }),
            "{op:?} -> {out:?}"
        );
    }
    let nobody = LeaseOp::Renew {
        holder: "a".into(),
        token: 1,
        ttl_ms: None,
    };
    assert_eq!(
        s.lease_apply("other", &nobody, 100, &cfg()).await.unwrap(),
        LeaseOutcome::NotHolder { lease: None }
    );
    assert_eq!(
        s.get_lease("other").await.unwrap(),
        None,
        "a refusal writes nothing"
    );

    let renew = LeaseOp::Renew {
        holder: "a".into(),
        token: 1,
        ttl_ms: None,
    };
    let LeaseOutcome::Renewed { lease } = s.lease_apply("r", &renew, 500, &cfg()).await.unwrap()
    else {
        panic!("holder renew must succeed")
    };
    assert_eq!(lease.expires_at_ms, 1_500);
    assert_eq!(
        s.get_lease("r").await.unwrap().unwrap().expires_at_ms,
        1_500
    );
    // Lost by expiry: renewing now is refused.
    assert!(matches!(
        s.lease_apply("r", &renew, 2_000, &cfg()).await.unwrap(),
        LeaseOutcome::NotHolder { .. }
    ));
    s.close().await;
}

async fn release_keeps_the_token(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    s.lease_apply("r", &acquire("a", 1_000), 0, &cfg())
        .await
        .unwrap();
    let rel = LeaseOp::Release {
        holder: "a".into(),
        token: 1,
    };
    assert!(matches!(
        s.lease_apply("r", &rel, 10, &cfg()).await.unwrap(),
        LeaseOutcome::Released { .. }
    ));
    let row = s.get_lease("r").await.unwrap().unwrap();
    assert_eq!((row.holder.as_deref(), row.token), (None, 1));
    s.lease_apply("q", &acquire("x", 1_000), 0, &cfg())
        .await
        .unwrap();
    let all = s.list_leases().await.unwrap();
    let names: Vec<(&str, Option<&str>)> = all
        .iter()
        .map(|l| (l.resource.as_str(), l.holder.as_deref()))
        .collect();
    assert_eq!(names, [("q", Some("x")), ("r", None)]);

    let LeaseOutcome::Granted { lease, previous } = s
        .lease_apply("r", &acquire("b", 1_000), 11, &cfg())
        .await
        .unwrap()
    else {
        panic!("acquire after release must grant")
    };
    assert_eq!((lease.token, previous), (2, None));
    s.close().await;
}

/// The console's listings: pages and substring search done by the store,
/// the total of what matched, and a digest that moves with every grant,
/// renewal, release and advance.
async fn pages_search_and_digest(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    let empty = s.digest().await.unwrap();
    for (i, r) in ["app/a", "app/b", "jobs/c", "zz"].iter().enumerate() {
        s.advance_fence(r, i as u64 + 1, 100 + i as i64)
            .await
            .unwrap();
        s.lease_apply(r, &acquire("h", 1_000), 0, &cfg())
            .await
            .unwrap();
    }
    let page = |q: Option<&str>, limit: Option<u32>, offset: u64| PageQuery {
        q: q.map(str::to_owned),
        limit,
        offset,
    };
    let cases = [
        (
            page(None, None, 0),
            vec!["app/a", "app/b", "jobs/c", "zz"],
            4,
        ),
        (page(None, Some(2), 1), vec!["app/b", "jobs/c"], 4),
        (page(None, None, 3), vec!["zz"], 4),
        (page(Some("app/"), Some(1), 1), vec!["app/b"], 2),
        (page(Some("bs/c"), None, 0), vec!["jobs/c"], 1),
        // Case-sensitive, and LIKE's wildcards are plain text here.
        (page(Some("APP"), None, 0), vec![], 0),
        (page(Some("%"), None, 0), vec![], 0),
        (page(Some("_"), None, 0), vec![], 0),
        (page(None, Some(10), 10), vec![], 4),
    ];
    for (q, want, total) in cases {
        let f = s.page_fences(&q).await.unwrap();
        let got: Vec<String> = f.rows.iter().map(|r| r.resource.clone()).collect();
        assert_eq!(
            (got, f.total),
            (want.iter().map(|w| w.to_string()).collect(), total),
            "fences {q:?}"
        );
        let l = s.page_leases(&q).await.unwrap();
        let got: Vec<String> = l.rows.iter().map(|r| r.resource.clone()).collect();
        assert_eq!(
            (got, l.total),
            (want.iter().map(|w| w.to_string()).collect(), total),
            "leases {q:?}"
        );
    }
    let d1 = s.digest().await.unwrap();
    assert_ne!(d1, empty);
    assert_eq!((d1.fences, d1.leases), (4, 4));
    // A renewal moves the digest, though no row is added.
    s.lease_apply(
        "zz",
        &LeaseOp::Renew {
            holder: "h".into(),
            token: 1,
            ttl_ms: None,
        },
        500,
        &cfg(),
    )
    .await
    .unwrap();
    let d2 = s.digest().await.unwrap();
    assert_ne!(d2, d1, "a renewal");
    // So does an advance of an existing mark.
    s.advance_fence("zz", 9, 900).await.unwrap();
    let d3 = s.digest().await.unwrap();
    assert_ne!(
        (d3.fences, d3.fences_updated_ms),
        (d2.fences, d2.fences_updated_ms)
    );
    assert_eq!(d3.leases_expiry_sum, d2.leases_expiry_sum);
    // A release empties a holder.
    assert_eq!(d3.leases_held, 4);
    s.lease_apply(
        "zz",
        &LeaseOp::Release {
            holder: "h".into(),
            token: 1,
        },
        600,
        &cfg(),
    )
    .await
    .unwrap();
    assert_eq!(s.digest().await.unwrap().leases_held, 3);
    // A tier's per-replica marks: none without replicas.
    assert!(s
        .replica_marks(&["zz".to_owned()])
        .await
        .unwrap()
        .is_empty());
    s.close().await;
}

// ---------------------------------------------------------------- audit

fn rec(at_ms: i64, resource: Option<&str>, reason: Reason, presented: Option<u64>) -> AuditRecord {
    AuditRecord::new(
        at_ms,
        resource,
        if at_ms % 2 == 0 {
            Protocol::Http
        } else {
            Protocol::Postgres
        },
        reason,
        presented,
        presented.map(|p| p + 1),
        format!("10.0.0.{}:5000", at_ms % 250),
        &format!("POST /orders/{at_ms}"),
    )
}

fn strip_id(mut r: AuditRecord) -> AuditRecord {
    r.id = None;
    r
}

async fn audit_is_newest_first_and_filters(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    let first = vec![
        rec(100, Some("orders"), Reason::Stale, Some(3)),
        rec(50, Some("users"), Reason::Missing, None),
        rec(300, None, Reason::Invalid, None),
    ];
    let second = vec![
        rec(200, Some("orders"), Reason::Forged, Some(9)),
        rec(400, Some("users"), Reason::Unavailable, Some(0)),
    ];
    s.append_audit(&first).await.unwrap();
    s.append_audit(&[]).await.unwrap();
    s.append_audit(&second).await.unwrap();
    let inserted: Vec<AuditRecord> = first.iter().chain(&second).cloned().collect();

    let all = s.query_audit(&AuditQuery::default()).await.unwrap();
    assert_eq!(all.len(), 5);
    let ids: Vec<i64> = all
        .iter()
        .map(|r| r.id.expect("store assigns ids"))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest (highest id) first: {ids:?}"
    );
    let got: Vec<AuditRecord> = all.into_iter().map(strip_id).collect();
    let want: Vec<AuditRecord> = inserted.iter().rev().cloned().collect();
    assert_eq!(got, want, "records round-trip, in insertion order reversed");

    let q = |resource: Option<&str>, since_ms: Option<i64>, limit: u32| AuditQuery {
        resource: resource.map(str::to_owned),
        since_ms,
        kind: None,
        limit,
    };
    let at = |rs: Vec<AuditRecord>| rs.iter().map(|r| r.at_ms).collect::<Vec<_>>();
    assert_eq!(
        at(s.query_audit(&q(Some("orders"), None, 0)).await.unwrap()),
        [200, 100]
    );
    assert_eq!(
        at(s.query_audit(&q(None, Some(200), 0)).await.unwrap()),
        [400, 200, 300]
    );
    assert_eq!(
        at(s.query_audit(&q(Some("users"), Some(100), 0))
            .await
            .unwrap()),
        [400]
    );
    assert_eq!(
        at(s.query_audit(&q(None, None, 2)).await.unwrap()),
        [400, 200]
    );
    assert!(s
        .query_audit(&q(Some("nope"), None, 0))
        .await
        .unwrap()
        .is_empty());

    // A leadership record round-trips with its kind, holder and identity, and the
    // kind filter tells the two apart.
    let granted = AuditRecord::lease(
        500,
        LeaseAudit {
            kind: Kind::LeaseGranted,
            reason: LeaseReason::Takeover,
            resource: "orders",
            holder: "node-b",
            presented_token: None,
            current_token: Some(7),
            client_addr: "10.0.0.9:4000".into(),
            detail: "previous holder node-a (token 6)",
            // The caller's identity round-trips too (its own column).
            identity: Some("sched-b"),
        },
    );
    s.append_audit(std::slice::from_ref(&granted))
        .await
        .unwrap();
    let by_kind = |kind| AuditQuery {
        kind: Some(kind),
        ..AuditQuery::default()
    };
    let leases = s.query_audit(&by_kind(Kind::LeaseGranted)).await.unwrap();
    assert_eq!(
        leases.into_iter().map(strip_id).collect::<Vec<_>>(),
        [granted]
    );
    let writes = s.query_audit(&by_kind(Kind::RefusedWrite)).await.unwrap();
    assert_eq!(at(writes), [400, 200, 300, 50, 100]);
    s.close().await;
}

async fn audit_chains_round_trip_and_a_batch_shipped_twice_lands_once(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    // Rows from before chains, and two writers' chains interleaved.
    s.append_audit(&[rec(1, Some("old"), Reason::Stale, Some(1))])
        .await
        .unwrap();
    let mut a = Chainer::new("aaaa");
    let mut b = Chainer::new("bbbb");
    let link = |c: &mut Chainer, at: i64| {
        let mut r = rec(at, Some("r"), Reason::Stale, Some(at as u64));
        c.link(&mut r);
        r
    };
    let first: Vec<AuditRecord> = (10..13).map(|i| link(&mut a, i)).collect();
    let other: Vec<AuditRecord> = (20..22).map(|i| link(&mut b, i)).collect();
    let rest: Vec<AuditRecord> = (13..15).map(|i| link(&mut a, i)).collect();
    s.append_audit(&first).await.unwrap();
    s.append_audit(&other).await.unwrap();
    // A spooled batch shipped again after a crash: already there, skipped,
    // and the new records of the same batch are still written.
    let again: Vec<AuditRecord> = first.iter().chain(&rest).cloned().collect();
    s.append_audit(&again).await.unwrap();
    assert_eq!(s.audit_unchained().await.unwrap(), 1);

    let mut walked = vec![];
    let mut after: Option<(String, u64)> = None;
    loop {
        let page = s
            .audit_chain_page(after.as_ref().map(|(c, n)| (c.as_str(), *n)), 2)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last().and_then(|r| r.chain.clone()) else {
            break;
        };
        after = Some((last.chain, last.seq));
        walked.extend(page.into_iter().map(strip_id));
    }
    let want: Vec<AuditRecord> = first.iter().chain(&rest).chain(&other).cloned().collect();
    assert_eq!(
        walked, want,
        "each record once, in (chain, seq) order, links intact"
    );
    let mut v = ChainVerifier::new();
    for r in &walked {
        v.push(r).unwrap();
    }
    assert_eq!((v.chains, v.records), (2, 7));
    s.close().await;
}

async fn audit_limit_defaults_and_cap(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    let many: Vec<AuditRecord> = (0..10_050)
        .map(|i| rec(i, Some("r"), Reason::Stale, Some(i as u64)))
        .collect();
    s.append_audit(&many).await.unwrap();
    let q = |limit| AuditQuery {
        limit,
        ..AuditQuery::default()
    };
    let default = s.query_audit(&q(0)).await.unwrap();
    assert_eq!(default.len(), 100, "limit 0 means the default");
    assert_eq!(default[0].at_ms, 10_049);
    assert_eq!(
        s.query_audit(&q(20_000)).await.unwrap().len(),
        10_000,
        "capped"
    );
    assert_eq!(
        s.query_audit(&q(u32::MAX)).await.unwrap().len(),
        10_000,
        "capped"
    );
    assert_eq!(
        s.query_audit(&q(10_050)).await.unwrap().len(),
        10_000,
        "capped"
    );
    s.close().await;
}

// ---------------------------------------------------------------- u64 edges

async fn large_tokens_round_trip_and_compare(fx: Arc<Fixture>) {
    let s = fx.open_migrated().await;
    let half = 1u64 << 63;
    let steps = [
        (9, 9),
        (10, 10), // "9" > "10" as unpadded text; padded it must not be
        (half - 1, half - 1),
        (half, half),
        (u64::MAX, u64::MAX),
        (half, u64::MAX),
        (1, u64::MAX),
        (u64::MAX, u64::MAX),
    ];
    for (i, (t, want)) in steps.into_iter().enumerate() {
        assert_eq!(
            s.advance_fence("big", t, i as i64).await.unwrap(),
            want,
            "advance {t}"
        );
    }
    assert_eq!(s.load_fence("big").await.unwrap(), Some(u64::MAX));
    assert_eq!(
        s.advance_fence("top-first", u64::MAX, 0).await.unwrap(),
        u64::MAX
    );
    assert_eq!(
        s.advance_fence("top-first", half, 1).await.unwrap(),
        u64::MAX
    );
    assert_eq!(s.advance_fence("signbit", half, 0).await.unwrap(), half);
    assert_eq!(s.advance_fence("signbit", half - 1, 1).await.unwrap(), half);

    let audit = AuditRecord::new(
        1,
        Some("big"),
        Protocol::Postgres,
        Reason::Stale,
        Some(half),
        Some(u64::MAX),
        "127.0.0.1:1".into(),
        "UPDATE t SET x = $1",
    );
    s.append_audit(std::slice::from_ref(&audit)).await.unwrap();
    let got = s.query_audit(&AuditQuery::default()).await.unwrap();
    assert_eq!(strip_id(got[0].clone()), audit);

    // A lease one step from the end: the last token is issued, then none.
    fx.raw(
        "INSERT INTO leases (resource, holder, token, granted_at_ms, expires_at_ms, ttl_ms, \
         free_after_ms) VALUES ('end', NULL, '18446744073709551614', 0, 0, 100, 0)",
        "INSERT INTO fencepost_store.leases (resource, holder, token, granted_at_ms, \
         expires_at_ms, ttl_ms, free_after_ms) \
         VALUES ('end', NULL, '18446744073709551614', 0, 0, 100, 0)",
    )
    .await;
    let LeaseOutcome::Granted { lease, .. } = s
        .lease_apply("end", &acquire("a", 100), 10, &cfg())
        .await
        .unwrap()
    else {
        panic!("the last token must still be granted")
    };
    assert_eq!(lease.token, u64::MAX);
    assert_eq!(s.get_lease("end").await.unwrap().unwrap().token, u64::MAX);
    assert_eq!(
        s.lease_apply("end", &acquire("b", 100), 1_000, &cfg())
            .await
            .unwrap(),
        LeaseOutcome::Exhausted
    );
    assert_eq!(s.get_lease("end").await.unwrap().unwrap().token, u64::MAX);
    s.close().await;
}

// ---------------------------------------------------------------- SQLite only

#[tokio::test]
async fn sqlite_open_creates_the_file_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    assert!(!path.exists());
    let url = format!("sqlite://{}", path.display());
    let s = SqliteStore::open(&url).await.unwrap();
    assert!(path.exists(), "open creates the file");
    s.migrate().await.unwrap();
    s.advance_fence("r", 1, 0).await.unwrap();
    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    c.close().await.unwrap();
    s.close().await;
}

// ---------------------------------------------------------------- Postgres only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_live_in_their_own_schema() {
    run(Backend::Postgres, |fx: Arc<Fixture>| async move {
        // The user already has tables with our names in `public`.
        fx.raw(
            "",
            "CREATE TABLE public.fences (id int); CREATE TABLE public._sqlx_migrations (x int)",
        )
        .await;
        let s = fx.open_migrated().await;
        s.migrate().await.unwrap();
        assert_eq!(s.advance_fence("r", 7, 0).await.unwrap(), 7);
        let mut c = sqlx::PgConnection::connect(&fx.url).await.unwrap();
        let placed: Vec<(String, String)> = sqlx::query_as(
            "SELECT table_schema::text, table_name::text FROM information_schema.tables \
             WHERE table_schema IN ('public', 'fencepost_store') ORDER BY 1, 2",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        let placed: Vec<(&str, &str)> = placed
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            placed,
            [
                ("fencepost_store", "_sqlx_migrations"),
                ("fencepost_store", "acks"),
                ("fencepost_store", "advance_seq"),
                ("fencepost_store", "audit"),
                ("fencepost_store", "fences"),
                ("fencepost_store", "leases"),
                ("fencepost_store", "replicas"),
                ("public", "_sqlx_migrations"),
                ("public", "fences"),
            ]
        );
        let user_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM public.fences")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(user_rows, 0, "the user's table is untouched");
        c.close().await.ok();
        s.close().await;
    })
    .await;
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>, started: Instant) {
    let took = started.elapsed();
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "{what}: {r:?}"
    );
    assert!(took < Duration::from_secs(7), "{what} took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_unavailable_in_bounded_time() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = url_with(
        &pg_url(),
        Some(&format!("127.0.0.1:{port}")),
        Some("nowhere"),
    );
    let s = PgStore::open(&url).expect("opening does not connect");
    let t = Instant::now();
    assert_unavailable("migrate", s.migrate().await, t);
    let t = Instant::now();
    assert_unavailable("ping", s.ping().await, t);
    let t = Instant::now();
    assert_unavailable("load_fence", s.load_fence("r").await, t);
    let t = Instant::now();
    assert_unavailable("advance_fence", s.advance_fence("r", 1, 0).await, t);
    let t = Instant::now();
    assert_unavailable(
        "lease_apply",
        s.lease_apply("r", &acquire("a", 1_000), 0, &cfg()).await,
        t,
    );
    let t = Instant::now();
    assert_unavailable(
        "append_audit",
        s.append_audit(&[rec(1, None, Reason::Stale, None)]).await,
        t,
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Relay both ways.
    Forward,
    /// Listener gone, every connection dropped: Postgres is down.
    Cut,
    /// Accept and hold connections without relaying: a hung server.
    Stall,
}

/// A TCP relay to Postgres that a test can cut or stall and restore.
struct Forwarder {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    parked: Arc<Mutex<Vec<TcpStream>>>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Arc<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = Arc::new(Forwarder {
            addr: listener.local_addr().unwrap(),
            target,
            mode: watch::channel(Mode::Forward).0,
            parked: Arc::default(),
            accept: Mutex::new(None),
        });
        f.spawn_accept(listener);
        f
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let mut rx = self.mode.subscribe();
        let target = self.target;
        let parked = self.parked.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let mode = *rx.borrow();
                        match mode {
                            Mode::Forward => {
                                tokio::spawn(relay(client, target, rx.clone(), parked.clone()));
                            }
                            Mode::Stall => parked.lock().unwrap().push(client),
                            Mode::Cut => return,
                        }
                    }
                    changed = rx.changed() => {
                        if changed.is_err() || *rx.borrow() == Mode::Cut {
                            return;
                        }
                    }
                }
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    async fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
        match mode {
            Mode::Cut => {
                let task = self.accept.lock().unwrap().take();
                if let Some(task) = task {
                    task.await.unwrap();
                }
                self.parked.lock().unwrap().clear();
            }
            Mode::Stall => {}
            Mode::Forward => {
                self.parked.lock().unwrap().clear();
                let running = self.accept.lock().unwrap().is_some();
                if !running {
                    let listener = TcpListener::bind(self.addr)
                        .await
                        .expect("rebind forwarder");
                    self.spawn_accept(listener);
                }
            }
        }
        // Let relays see the change before the test goes on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mut rx: watch::Receiver<Mode>,
    parked: Arc<Mutex<Vec<TcpStream>>>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let stop = async {
        loop {
            let m = *rx.borrow_and_update();
            if m != Mode::Forward {
                return m;
            }
            if rx.changed().await.is_err() {
                return Mode::Cut;
            }
        }
    };
    let stopped = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => None,
        m = stop => Some(m),
    };
    if stopped == Some(Mode::Stall) {
        let mut p = parked.lock().unwrap();
        p.push(client);
        p.push(server);
    }
    // Otherwise both sockets drop here: the connection is gone.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_recovers_after_an_outage_without_reopening() {
    run(Backend::Postgres, |fx: Arc<Fixture>| async move {
        let opts = sqlx::postgres::PgConnectOptions::from_str(&fx.url).unwrap();
        let target: SocketAddr = tokio::net::lookup_host((opts.get_host(), opts.get_port()))
            .await
            .unwrap()
            .next()
            .unwrap();
        let fwd = Forwarder::start(target).await;
        let url = url_with(&fx.url, Some(&fwd.addr.to_string()), None);
        let s = PgStore::open(&url).unwrap();
        s.migrate().await.unwrap();
        assert_eq!(s.advance_fence("r", 5, 0).await.unwrap(), 5);
        let LeaseOutcome::Granted { lease, .. } = s
            .lease_apply("r", &acquire("a", 3_600_000), 0, &cfg())
            .await
            .unwrap()
        else {
            panic!("grant")
        };
        let renew = LeaseOp::Renew {
            holder: "a".into(),
            token: lease.token,
            ttl_ms: None,
        };

        for outage in [Mode::Cut, Mode::Stall, Mode::Cut] {
            fwd.set(outage).await;
            let t = Instant::now();
            assert_unavailable("load_fence", s.load_fence("r").await, t);
            let t = Instant::now();
            assert_unavailable("advance_fence", s.advance_fence("r", 6, 1).await, t);
            let t = Instant::now();
            assert_unavailable(
                "lease_apply",
                s.lease_apply("r", &renew, 1, &cfg()).await,
                t,
            );
            let t = Instant::now();
            assert_unavailable("ping", s.ping().await, t);

            fwd.set(Mode::Forward).await;
            // The same store instance works again: its pool reconnects.
            s.ping()
                .await
                .unwrap_or_else(|e| panic!("after {outage:?}: {e}"));
            let mark = s.load_fence("r").await.unwrap().unwrap();
            assert!(
                mark == 5 || mark == 6,
                "an unanswered advance may or may not have landed"
            );
            assert_eq!(s.advance_fence("r", 6, 2).await.unwrap(), 6);
            assert!(matches!(
                s.lease_apply("r", &renew, 2, &cfg()).await.unwrap(),
                LeaseOutcome::Renewed { .. }
            ));
        }
        s.close().await;
    })
    .await;
}

/// The tier's tables stay as small as the tier: a replica whose lease
/// expired longer ago than the retention is pruned with its acks (and an
/// ack whose replica row is gone goes too); a live one, and one expired
/// more recently, keep theirs; a pruned replica that renews again is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_prunes_long_expired_replicas_and_their_acks() {
    run(Backend::Postgres, |fx: Arc<Fixture>| async move {
        let s = fx.open_migrated().await;
        s.replica_renew("live", "a", 0, 60_000, None).await.unwrap();
        s.replica_renew("gone", "b", 0, 1, None).await.unwrap();
        s.replica_renew("recent", "c", 0, 1, None).await.unwrap();
        for id in ["live", "gone", "recent", "orphan"] {
            s.replica_ack("r", id, 5).await.unwrap();
            s.replica_ack("q", id, 6).await.unwrap();
        }
        let mut c = sqlx::PgConnection::connect(&fx.url).await.unwrap();
        // "gone" expired an hour ago, "recent" a moment ago.
        sqlx::query(
            "UPDATE fencepost_store.replicas SET expires_at = now() - interval '1 hour' \
             WHERE id = 'gone'",
        )
        .execute(&mut c)
        .await
        .unwrap();
        assert_eq!(s.replica_prune(60_000).await.unwrap(), 1);
        let left: Vec<String> =
            sqlx::query_scalar("SELECT id FROM fencepost_store.replicas ORDER BY id")
                .fetch_all(&mut c)
                .await
                .unwrap();
        assert_eq!(left, ["live", "recent"]);
        let acks: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT replica_id FROM fencepost_store.acks ORDER BY 1")
                .fetch_all(&mut c)
                .await
                .unwrap();
        assert_eq!(acks, ["live", "recent"]);
        // Nothing more to prune; a pruned replica that renews is back.
        assert_eq!(s.replica_prune(60_000).await.unwrap(), 0);
        s.replica_renew("gone", "b", 0, 60_000, Some(0))
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM fencepost_store.replicas")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 3);
        c.close().await.ok();
        s.close().await;
    })
    .await;
}

/// Regression (tier checker, seed 3000119): an advancer must not skip a
/// replica whose renewal is in flight. The replica's lease has lapsed; its
/// renewal has run its UPDATE (a new expiry) but not yet committed (a slow
/// store link). `pending_acks` must wait for that commit and see the new
/// expiry, so the advance waits for the replica's acknowledgement, instead
/// of reading the old, lapsed expiry and leaving the replica out while it
/// confirms a lease without having seen the advance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pending_acks_wait_for_a_renewal_in_flight() {
    run(Backend::Postgres, |fx: Arc<Fixture>| async move {
        let s = fx.open_migrated().await;
        s.replica_renew("r1", "a", 0, 300, None).await.unwrap();
        let adv = s.tier_advance("res", 2, 0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(s
            .pending_acks("res", 2, adv.seq, "adv")
            .await
            .unwrap()
            .is_empty());
        let mut c = sqlx::PgConnection::connect(&fx.url).await.unwrap();
        let mut renewal = c.begin().await.unwrap();
        sqlx::query(
            "UPDATE fencepost_store.replicas SET renewed_at = now(), \
             expires_at = now() + interval '60 seconds' WHERE id = 'r1'",
        )
        .execute(&mut *renewal)
        .await
        .unwrap();
        let store = s.store.clone();
        let seq = adv.seq;
        let pending =
            tokio::spawn(async move { store.pending_acks("res", 2, seq, "adv").await.unwrap() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        renewal.commit().await.unwrap();
        assert_eq!(pending.await.unwrap(), ["r1"]);
        c.close().await.ok();
        s.close().await;
    })
    .await;
}
