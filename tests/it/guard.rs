//! The in-database guard of guard mode (`migrations/guard/`), at the SQL
//! level and through two guard-mode proxies: the shared/exclusive gate of
//! issue 11. Every promise of `fencepost.advance` has a test here that
//! fails when it breaks, under READ COMMITTED, REPEATABLE READ and
//! SERIALIZABLE:
//! - same-token transactions run concurrently and write nothing to
//!   `fencepost.marks`;
//! - a newer token waits for every older-token transaction in flight (the
//!   drain), bounded by its wait (`ZF005`, naming the holders);
//! - an older-token transaction cannot commit after the advance (`ZF001`,
//!   or `40001` under REPEATABLE READ / SERIALIZABLE);
//! - a stream of same-token writers does not starve the advance;
//! - a guard in a savepoint that rolls back does not leave later writes
//!   unprotected; a token change within a transaction is refused; a newer
//!   token never waits for the gate holding it shared (no lock upgrade);
//! - an installed 0001 guard is upgraded in place.
//!
//! Each test makes its own database and installs the guard with the real
//! `fencepost migrate --guard`; every fact is read from Postgres itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{code, direct, opts, Conf, Section, Server, TempDir, TestDb};
use tokio_postgres::{Client, NoTls};
use wire::pg::guard::GuardFn;

const LEVELS: [&str; 3] = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"];
/// Long enough that a wait this long means "blocked", on a loaded machine.
const BLOCKED: Duration = Duration::from_millis(400);
/// Longer than any unblocked call takes here.
const PATIENCE: Duration = Duration::from_secs(20);

async fn guarded(prefix: &str) -> TestDb {
    let db = TestDb::create(prefix).await;
    let (rc, out, err) = crate::support::run_cli(&["migrate", "--guard", &db.url], &[]);
    assert_eq!(rc, 0, "migrate --guard: {out}{err}");
    // Half of these tests run the extension's guard: the server must have
    // it (`.ci/run` builds and installs deploy/fencepost_guard/).
    assert!(
        out.contains("the fencepost_guard extension is installed"),
        "migrate --guard did not create the fencepost_guard extension \
         (make -C deploy/fencepost_guard install): {out}{err}"
    );
    direct(&db)
        .await
        .batch_execute("CREATE TABLE w (id bigserial PRIMARY KEY, token int NOT NULL)")
        .await
        .expect("table w");
    db
}

fn call(f: GuardFn, resource: &str, token: u64, wait_ms: u32) -> String {
    format!(
        "SELECT {}('{resource}', '{token:020}', {wait_ms})",
        f.name()
    )
}

async fn advance(
    f: GuardFn,
    c: &Client,
    resource: &str,
    token: u64,
) -> Result<(), tokio_postgres::Error> {
    c.batch_execute(&call(f, resource, token, 10_000)).await
}

async fn mark(db: &TestDb, resource: &str) -> Option<u64> {
    direct(db)
        .await
        .query_opt(
            "SELECT token FROM fencepost.marks WHERE resource = $1",
            &[&resource],
        )
        .await
        .expect("read the mark")
        .map(|r| r.get::<_, String>(0).parse().expect("a numeric mark"))
}

/// The mark row's `xmin`: it changes exactly when a row version is written.
async fn mark_version(db: &TestDb, resource: &str) -> String {
    direct(db)
        .await
        .query_one(
            "SELECT xmin::text FROM fencepost.marks WHERE resource = $1",
            &[&resource],
        )
        .await
        .expect("mark row")
        .get(0)
}

/// The gate locks (`mode`, granted) this backend holds or awaits.
async fn gate_locks(db: &TestDb, pid: i32) -> Vec<(String, bool)> {
    direct(db)
        .await
        .query(
            "SELECT mode, granted FROM pg_locks
              WHERE locktype = 'advisory' AND classid = 1717920355 AND objsubid = 2 AND pid = $1",
            &[&pid],
        )
        .await
        .expect("pg_locks")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Asserts that backend `pid` holds the gate shared, and only that.
async fn assert_gate_shared(db: &TestDb, pid: i32, what: &str) {
    assert_eq!(
        gate_locks(db, pid).await,
        vec![("ShareLock".to_owned(), true)],
        "{what}"
    );
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

async fn begin(c: &Client, level: &str) {
    c.batch_execute(&format!("BEGIN ISOLATION LEVEL {level}"))
        .await
        .expect("begin");
}

/// Starts `sql` on its own task; the handle answers when Postgres does.
fn spawn_sql(
    c: &Arc<Client>,
    sql: String,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    let c = Arc::clone(c);
    tokio::spawn(async move { c.batch_execute(&sql).await })
}

/// True when the task has not finished within [`BLOCKED`].
async fn still_blocked<T>(h: &mut tokio::task::JoinHandle<T>) -> bool {
    tokio::time::timeout(BLOCKED, &mut *h).await.is_err()
}

async fn finish<T>(h: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(PATIENCE, h)
        .await
        .unwrap_or_else(|_| panic!("{what}: still blocked after {PATIENCE:?}"))
        .expect("task")
}

async fn same_token_transactions_run_concurrently_and_write_nothing(f: GuardFn) {
    let db = guarded("fp_gate_same").await;
    let seed = direct(&db).await;
    advance(f, &seed, "r", 5).await.expect("first mark");
    let before = mark_version(&db, "r").await;
    for level in LEVELS {
        let mut open = Vec::new();
        for _ in 0..8 {
            let c = direct(&db).await;
            begin(&c, level).await;
            // Each call must return while the others' transactions are
            // open: a serializing guard would block the second one forever.
            tokio::time::timeout(PATIENCE, async {
                advance(f, &c, "r", 5).await.expect("same-token guard");
                c.batch_execute("INSERT INTO w (token) VALUES (5)")
                    .await
                    .expect("write");
            })
            .await
            .unwrap_or_else(|_| panic!("{level}: a same-token transaction waited for another"));
            open.push(c);
        }
        let shared = direct(&db)
            .await
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                  AND classid = 1717920355 AND mode = 'ShareLock' AND granted
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .expect("pg_locks")
            .get::<_, i64>(0);
        assert_eq!(
            shared, 8,
            "{level}: every transaction holds the gate shared"
        );
        for c in &open {
            c.batch_execute("COMMIT").await.expect("commit");
        }
        assert_eq!(
            mark_version(&db, "r").await,
            before,
            "{level}: a same-token transaction wrote a version of the mark row"
        );
    }
}

async fn a_newer_token_waits_for_every_older_transaction_in_flight(f: GuardFn) {
    let db = guarded("fp_gate_drain").await;
    for (i, level) in LEVELS.into_iter().enumerate() {
        let old = 10 * (i as u64 + 1);
        let new = old + 1;
        advance(f, &direct(&db).await, "r", old)
            .await
            .expect("mark");
        let (h1, h2) = (direct(&db).await, direct(&db).await);
        for h in [&h1, &h2] {
            begin(h, level).await;
            advance(f, h, "r", old).await.expect("old-token guard");
            h.batch_execute(&format!("INSERT INTO w (token) VALUES ({old})"))
                .await
                .expect("old write");
        }
        let a = Arc::new(direct(&db).await);
        begin(&a, level).await;
        let mut adv = spawn_sql(&a, call(f, "r", new, 20_000));
        assert!(
            still_blocked(&mut adv).await,
            "{level}: the advance did not wait"
        );
        h1.batch_execute("COMMIT").await.expect("commit h1");
        assert!(
            still_blocked(&mut adv).await,
            "{level}: the advance went ahead with an older transaction still in flight"
        );
        h2.batch_execute("COMMIT").await.expect("commit h2");
        finish(adv, "the advance")
            .await
            .expect("advance after the drain");
        assert_eq!(mark(&db, "r").await, Some(old), "not committed yet");
        a.batch_execute("COMMIT").await.expect("commit the advance");
        assert_eq!(mark(&db, "r").await, Some(new));
    }
}

/// The advancer holds the gate while an older-token writer's guard comes
/// in: the writer waits, and after the advance commits it fails. Under
/// REPEATABLE READ / SERIALIZABLE its snapshot was taken before the wait,
/// so only the guard's `FOR SHARE` re-read catches the advance (40001);
/// a plain re-read would see the old mark and let it commit.
async fn an_older_token_waiting_on_the_advance_cannot_commit(f: GuardFn) {
    let db = guarded("fp_gate_after").await;
    for (i, level) in LEVELS.into_iter().enumerate() {
        let old = 10 * (i as u64 + 1);
        advance(f, &direct(&db).await, "r", old)
            .await
            .expect("mark");
        let a = direct(&db).await;
        begin(&a, level).await;
        advance(f, &a, "r", old + 1).await.expect("advance");
        let w = Arc::new(direct(&db).await);
        begin(&w, level).await;
        let mut guard = spawn_sql(&w, call(f, "r", old, 20_000));
        assert!(
            still_blocked(&mut guard).await,
            "{level}: an older-token guard went past a held advance"
        );
        a.batch_execute("COMMIT").await.expect("commit the advance");
        let err = finish(guard, "the older guard")
            .await
            .expect_err("an older token after the advance");
        let expected = if level == "READ COMMITTED" {
            "ZF001"
        } else {
            "40001"
        };
        assert_eq!(code(&err), expected, "{level}: {err:?}");
        w.batch_execute("ROLLBACK").await.expect("rollback");
    }
}

/// A writer whose transaction (and, under REPEATABLE READ, snapshot)
/// began before the advance committed, and whose guard comes after it:
/// no wait at all, and still no commit.
async fn an_older_token_whose_snapshot_predates_the_advance_cannot_commit(f: GuardFn) {
    let db = guarded("fp_gate_snap").await;
    for (i, level) in LEVELS.into_iter().enumerate() {
        let old = 10 * (i as u64 + 1);
        advance(f, &direct(&db).await, "r", old)
            .await
            .expect("mark");
        let w = direct(&db).await;
        begin(&w, level).await;
        w.batch_execute("SELECT count(*) FROM w")
            .await
            .expect("snapshot");
        advance(f, &direct(&db).await, "r", old + 1)
            .await
            .expect("advance, autocommit");
        let err = advance(f, &w, "r", old)
            .await
            .expect_err("an older token after the advance");
        let expected = if level == "READ COMMITTED" {
            "ZF001"
        } else {
            "40001"
        };
        assert_eq!(code(&err), expected, "{level}: {err:?}");
        w.batch_execute("ROLLBACK").await.expect("rollback");
    }
}

/// Postgres's lock manager queues a shared request behind a waiting
/// exclusive one, so writers that keep the gate shared without a gap do
/// not keep a newer token out: its advance gets the gate once those in
/// flight when it arrived have ended, well within its wait.
async fn a_stream_of_same_token_writers_does_not_starve_the_advance(f: GuardFn) {
    let db = guarded("fp_gate_starve").await;
    advance(f, &direct(&db).await, "r", 5).await.expect("mark");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..8 {
        let c = direct(&db).await;
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut committed = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    c.batch_execute("BEGIN").await?;
                    advance(f, &c, "r", 5).await?;
                    c.batch_execute("INSERT INTO w (token) VALUES (5); SELECT pg_sleep(0.03)")
                        .await?;
                    c.batch_execute("COMMIT").await
                }
                .await;
                match r {
                    Ok(()) => committed += 1,
                    Err(e) => {
                        let _ = c.batch_execute("ROLLBACK").await;
                        assert_eq!(code(&e), "ZF001", "{e:?}");
                        return committed;
                    }
                }
            }
            committed
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = direct(&db).await;
    a.batch_execute("BEGIN").await.expect("begin");
    let started = Instant::now();
    // 15 s of patience: starved, it would fail with ZF005 after them.
    a.batch_execute(&call(f, "r", 6, 15_000))
        .await
        .expect("the advance got the gate amid continuous same-token writers");
    let took = started.elapsed();
    a.batch_execute("COMMIT").await.expect("commit");
    let refused = tokio::time::timeout(PATIENCE, async {
        let mut n = 0;
        for w in writers {
            let committed = w.await.expect("writer");
            assert!(
                committed > 0,
                "a writer never got through before the advance"
            );
            n += 1;
        }
        n
    })
    .await
    .expect("every older writer was refused after the advance");
    stop.store(true, Ordering::Relaxed);
    assert_eq!(refused, 8);
    assert!(
        took < Duration::from_secs(10),
        "the advance waited {took:?} behind a stream of same-token writers"
    );
    assert_eq!(mark(&db, "r").await, Some(6));
}

/// A guard taken in a savepoint that rolls back is released with it (and
/// so is the memo that lets a repeated call skip the gate): the next call
/// takes the gate again, and the advance must wait for the transaction.
/// Released (RELEASE) or taken at top level first, the gate stays held.
async fn a_guard_in_a_rolled_back_savepoint_is_taken_again(f: GuardFn) {
    let db = guarded("fp_gate_savepoint").await;
    let mut token = 10;
    for level in LEVELS {
        for (name, script) in [
            (
                "rolled back, guarded again",
                "SAVEPOINT s; {g}; ROLLBACK TO s; {g}; INSERT INTO w (token) VALUES (1)",
            ),
            (
                "released",
                "SAVEPOINT s; {g}; INSERT INTO w (token) VALUES (1); RELEASE s",
            ),
            (
                "top level first",
                "{g}; SAVEPOINT s; {g}; ROLLBACK TO s; INSERT INTO w (token) VALUES (1)",
            ),
        ] {
            token += 10;
            advance(f, &direct(&db).await, "r", token)
                .await
                .expect("mark");
            let w = direct(&db).await;
            let w_pid = pid(&w).await;
            begin(&w, level).await;
            for step in script.split("; ") {
                let sql = step.replace("{g}", &call(f, "r", token, 10_000));
                w.batch_execute(&sql).await.expect(&sql);
                if step == "ROLLBACK TO s" && name.starts_with("rolled back") {
                    assert!(
                        gate_locks(&db, w_pid).await.is_empty(),
                        "{level}: the rolled-back savepoint's gate is still held"
                    );
                }
            }
            assert_gate_shared(
                &db,
                w_pid,
                &format!("{level}, {name}: the gate is not held for the transaction's write"),
            )
            .await;
            let a = Arc::new(direct(&db).await);
            a.batch_execute("BEGIN").await.expect("begin");
            let mut adv = spawn_sql(&a, call(f, "r", token + 1, 20_000));
            assert!(
                still_blocked(&mut adv).await,
                "{level}, {name}: the advance did not wait for a guarded transaction"
            );
            w.batch_execute("COMMIT").await.expect("commit");
            finish(adv, "the advance").await.expect("advance");
            a.batch_execute("COMMIT").await.expect("commit the advance");
        }
    }
}

/// The guard takes the gate shared before it reads the mark (0004); a call
/// whose token is newer releases that before it asks for the gate
/// exclusive. Two transactions advancing to the same newer token while an
/// older one holds the gate: while they wait neither holds the gate
/// shared (holding it, each would wait for the other: a deadlock,
/// `40P01`), the first advances once the older one commits and holds the
/// gate exclusive only, and the second goes on when the first commits: it
/// finds the mark its own token (READ COMMITTED), or its snapshot predates
/// the advance (`40001`).
async fn a_newer_token_never_waits_holding_the_gate_shared(f: GuardFn) {
    let db = guarded("fp_gate_no_upgrade").await;
    for (i, level) in LEVELS.into_iter().enumerate() {
        let old = 10 * (i as u64 + 1);
        let new = old + 1;
        advance(f, &direct(&db).await, "r", old)
            .await
            .expect("mark");
        let h = direct(&db).await;
        begin(&h, level).await;
        advance(f, &h, "r", old).await.expect("old-token guard");
        let (a, b) = (Arc::new(direct(&db).await), Arc::new(direct(&db).await));
        let (pa, pb) = (pid(&a).await, pid(&b).await);
        begin(&a, level).await;
        let mut ja = spawn_sql(&a, call(f, "r", new, 20_000));
        assert!(still_blocked(&mut ja).await, "{level}: no drain");
        begin(&b, level).await;
        let mut jb = spawn_sql(&b, call(f, "r", new, 20_000));
        assert!(
            still_blocked(&mut jb).await,
            "{level}: the second advancer did not wait"
        );
        for p in [pa, pb] {
            let locks = gate_locks(&db, p).await;
            assert!(
                !locks
                    .iter()
                    .any(|(mode, granted)| mode == "ShareLock" && *granted),
                "{level}: an advancer waits holding the gate shared: {locks:?}"
            );
        }
        h.batch_execute("COMMIT")
            .await
            .expect("commit the older transaction");
        finish(ja, "the first advance")
            .await
            .expect("first advance");
        assert_eq!(
            gate_locks(&db, pa).await,
            vec![("ExclusiveLock".to_owned(), true)],
            "{level}"
        );
        assert!(
            still_blocked(&mut jb).await,
            "{level}: the second advancer went ahead"
        );
        a.batch_execute("COMMIT").await.expect("commit the advance");
        match finish(jb, "the second advancer").await {
            Ok(()) => b.batch_execute("COMMIT").await.expect("commit"),
            Err(e) => {
                assert_ne!(level, "READ COMMITTED", "{e:?}");
                assert_eq!(code(&e), "40001", "{level}: {e:?}");
                b.batch_execute("ROLLBACK").await.expect("rollback");
            }
        }
        assert_eq!(mark(&db, "r").await, Some(new), "{level}");
    }
}

/// One transaction keeps one token per resource: taking the gate shared
/// for one token and exclusive for another would be a lock upgrade (two
/// such transactions deadlock). The second token is refused at once, not
/// after waiting for the gate (another transaction holds it shared
/// throughout, so an exclusive request would wait, then fail with
/// `ZF005`), and nothing is advanced.
async fn a_token_change_within_a_transaction_is_refused(f: GuardFn) {
    let db = guarded("fp_gate_change").await;
    advance(f, &direct(&db).await, "r", 5).await.expect("mark");
    let other = direct(&db).await;
    other.batch_execute("BEGIN").await.expect("begin");
    advance(f, &other, "r", 5).await.expect("another holder");
    for level in LEVELS {
        let w = direct(&db).await;
        begin(&w, level).await;
        advance(f, &w, "r", 5).await.expect("guard");
        let started = Instant::now();
        let err = w
            .batch_execute(&call(f, "r", 6, 5_000))
            .await
            .expect_err("a second token");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{level}: the second token waited for the gate"
        );
        assert_eq!(code(&err), "ZF001", "{err:?}");
        let msg = err.as_db_error().map(|d| d.message().to_owned());
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains("changed within a transaction")),
            "{msg:?}"
        );
        w.batch_execute("ROLLBACK").await.expect("rollback");
        assert_eq!(mark(&db, "r").await, Some(5));
    }
    other.batch_execute("COMMIT").await.expect("commit");
    // Another resource in the same transaction is independent.
    advance(f, &direct(&db).await, "q", 9)
        .await
        .expect("mark q");
    let w = direct(&db).await;
    w.batch_execute("BEGIN").await.expect("begin");
    advance(f, &w, "r", 5).await.expect("r");
    advance(f, &w, "q", 9).await.expect("q, another resource");
    w.batch_execute("COMMIT").await.expect("commit");
}

/// The advance waits at most its bound; then `ZF005` names the backends
/// that held the gate, nothing is advanced, and the caller's own
/// `lock_timeout` is back in force after a successful advance.
async fn the_drain_is_bounded_and_names_who_held_it(f: GuardFn) {
    let db = guarded("fp_gate_wait").await;
    advance(f, &direct(&db).await, "r", 5).await.expect("mark");
    let h = direct(&db).await;
    let h_pid = pid(&h).await;
    h.batch_execute("SET application_name = 'old-leader-7'; BEGIN")
        .await
        .expect("begin");
    advance(f, &h, "r", 5).await.expect("old guard");
    let a = direct(&db).await;
    a.batch_execute("BEGIN").await.expect("begin");
    let started = Instant::now();
    let err = a
        .batch_execute(&call(f, "r", 6, 300))
        .await
        .expect_err("past its wait");
    let took = started.elapsed();
    assert_eq!(code(&err), "ZF005", "{err:?}");
    let msg = err.as_db_error().map(|d| d.message().to_owned()).unwrap();
    assert!(msg.contains(&format!("pid {h_pid}")), "{msg}");
    assert!(msg.contains("old-leader-7"), "{msg}");
    assert!(msg.contains("idle in transaction"), "{msg}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    a.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(
        mark(&db, "r").await,
        Some(5),
        "a timed-out advance advanced"
    );
    h.batch_execute("COMMIT").await.expect("commit");
    a.batch_execute("SET lock_timeout = '7s'; BEGIN")
        .await
        .expect("begin");
    a.batch_execute(&call(f, "r", 6, 300))
        .await
        .expect("advance");
    let lt: String = a
        .query_one("SHOW lock_timeout", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(lt, "7s", "the guard left its own lock_timeout behind");
    a.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(mark(&db, "r").await, Some(6));
}

/// A role that may not read `fencepost.marks` gets Postgres's `42501`
/// from the guard, even when its token is the mark (the extension's C
/// check reads the mark without the executor, so it checks the privilege
/// itself); granted `SELECT`, the same call passes.
async fn a_role_that_may_not_read_the_marks_is_refused(f: GuardFn) {
    let db = guarded("fp_gate_acl").await;
    let c = direct(&db).await;
    advance(f, &c, "r", 5).await.expect("mark");
    let role = format!("{}_noread", db.name);
    c.batch_execute(&format!(
        "CREATE ROLE {role}; GRANT USAGE ON SCHEMA fencepost TO {role}"
    ))
    .await
    .expect("a role without SELECT on the marks");
    c.batch_execute(&format!("SET ROLE {role}; BEGIN"))
        .await
        .expect("set role");
    let err = advance(f, &c, "r", 5)
        .await
        .expect_err("no SELECT on fencepost.marks");
    assert_eq!(code(&err), "42501", "{err:?}");
    c.batch_execute("ROLLBACK; RESET ROLE")
        .await
        .expect("reset");
    c.batch_execute(&format!(
        "GRANT SELECT ON fencepost.marks TO {role}; SET ROLE {role}"
    ))
    .await
    .expect("grant");
    advance(f, &c, "r", 5)
        .await
        .expect("with SELECT, the mark's own token passes");
    c.batch_execute(&format!(
        "RESET ROLE; DROP OWNED BY {role}; DROP ROLE {role}"
    ))
    .await
    .expect("drop the role");
}

/// Every test listed, once for each guard function: the PL/pgSQL
/// `fencepost.advance` and the `fencepost_guard` extension's
/// `fencepost.advance_fast`, which must keep every one of its promises
/// (the SQL-level tests above, and the failovers through two proxies
/// below, whose proxies then have `guard_extension = true`).
macro_rules! for_each_guard {
    ($($name:ident),* $(,)?) => {
        mod plpgsql {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::GuardFn::Sql).await
                }
            )*
        }
        mod extension {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::GuardFn::Extension).await
                }
            )*
        }
    };
}

for_each_guard!(
    same_token_transactions_run_concurrently_and_write_nothing,
    a_newer_token_waits_for_every_older_transaction_in_flight,
    an_older_token_waiting_on_the_advance_cannot_commit,
    an_older_token_whose_snapshot_predates_the_advance_cannot_commit,
    a_stream_of_same_token_writers_does_not_starve_the_advance,
    a_guard_in_a_rolled_back_savepoint_is_taken_again,
    a_newer_token_never_waits_holding_the_gate_shared,
    a_token_change_within_a_transaction_is_refused,
    the_drain_is_bounded_and_names_who_held_it,
    a_role_that_may_not_read_the_marks_is_refused,
    failovers_through_two_proxies_read_committed,
    failovers_through_two_proxies_repeatable_read,
    failovers_through_two_proxies_serializable,
);

/// A database whose guard an older fencepost installed (0001: the row-lock
/// upsert) is upgraded in place by `migrate --guard`: the marks stay, and
/// the two-argument `advance` an older proxy calls gets the gate.
#[tokio::test]
async fn migrate_upgrades_an_installed_guard_in_place() {
    let db = TestDb::create("fp_gate_upgrade").await;
    let d = direct(&db).await;
    d.batch_execute(include_str!("../../migrations/guard/0001_guard.sql"))
        .await
        .expect("the 0001 guard");
    d.batch_execute("SELECT fencepost.advance('r', '00000000000000000007')")
        .await
        .expect("old mark");
    let (rc, out, err) = crate::support::run_cli(&["migrate", "--guard", &db.url], &[]);
    assert_eq!(rc, 0, "migrate --guard: {out}{err}");
    assert_eq!(mark(&db, "r").await, Some(7), "the upgrade lost the mark");
    let fast: bool = d
        .query_one(
            "SELECT to_regprocedure('fencepost.advance_fast(text,text,integer)') IS NOT NULL",
            &[],
        )
        .await
        .expect("advance_fast")
        .get(0);
    assert!(fast, "the upgrade did not create the extension: {out}");
    // Again: nothing to create or update, and it says so.
    let (rc, out, err) = crate::support::run_cli(&["migrate", "--guard", &db.url], &[]);
    assert_eq!(rc, 0, "migrate --guard again: {out}{err}");
    assert!(
        out.contains("the fencepost_guard extension is installed"),
        "{out}{err}"
    );
    let version = mark_version(&db, "r").await;
    let (c1, c2) = (direct(&db).await, direct(&db).await);
    for c in [&c1, &c2] {
        c.batch_execute("BEGIN").await.expect("begin");
        tokio::time::timeout(
            PATIENCE,
            c.batch_execute("SELECT fencepost.advance('r', '00000000000000000007')"),
        )
        .await
        .expect("an older proxy's same-token calls no longer serialize")
        .expect("two-argument guard");
    }
    let a = Arc::new(direct(&db).await);
    a.batch_execute("BEGIN").await.expect("begin");
    let mut adv = spawn_sql(
        &a,
        "SELECT fencepost.advance('r', '00000000000000000008')".into(),
    );
    assert!(
        still_blocked(&mut adv).await,
        "the two-argument advance did not drain"
    );
    for c in [&c1, &c2] {
        c.batch_execute("COMMIT").await.expect("commit");
    }
    finish(adv, "the advance").await.expect("advance");
    a.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(mark(&db, "r").await, Some(8));
    assert_ne!(mark_version(&db, "r").await, version);
    let stale = c1
        .batch_execute("SELECT fencepost.advance('r', '00000000000000000007')")
        .await
        .expect_err("stale");
    assert_eq!(code(&stale), "ZF001");
}

/// `migrate --guard` run as a role that may create the schema but not a C
/// extension: the guard is installed all the same (the extension is
/// created in a savepoint after it), the extension is not, and the output
/// says why.
#[tokio::test]
async fn migrate_as_a_role_that_may_not_create_the_extension_installs_the_guard() {
    let db = TestDb::create("fp_gate_ext_refused").await;
    let role = format!("{}_owner", db.name);
    let d = direct(&db).await;
    d.batch_execute(&format!(
        "CREATE ROLE {role}; GRANT CREATE ON DATABASE {} TO {role}",
        db.name
    ))
    .await
    .expect("a role that may create schemas");
    // The startup option makes the superuser's connection act as the role.
    let url = format!("{}?options=-c%20role%3D{role}", db.url);
    let (rc, out, err) = crate::support::run_cli(&["migrate", "--guard", &url], &[]);
    assert_eq!(rc, 0, "migrate --guard: {out}{err}");
    assert!(
        out.contains("installed the fencepost guard")
            && out.contains("creating or updating it failed")
            && out.contains("permission denied"),
        "{out}{err}"
    );
    let (owner, fast): (String, bool) = d
        .query_one(
            "SELECT nspowner::regrole::text,
                    to_regprocedure('fencepost.advance_fast(text,text,integer)') IS NOT NULL
               FROM pg_namespace WHERE nspname = 'fencepost'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("the guard's schema");
    assert_eq!(owner, role, "the guard was not installed as the role");
    assert!(!fast, "the extension was created without a superuser");
    advance(GuardFn::Sql, &d, "r", 5)
        .await
        .expect("the installed guard works");
    d.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .expect("drop the role");
}

// ------------------------------------------------- through two guard proxies

/// Two `fencepost serve` processes with separate SQLite stores (neither
/// knows what the other admitted), both in guard mode in front of one
/// database, with a history table: ids in INSERT order and a commit stamp
/// from a deferred trigger.
struct TwoProxies {
    db: TestDb,
    _dirs: Vec<TempDir>,
    _servers: Vec<Server>,
    proxies: Vec<std::net::SocketAddr>,
}

impl TwoProxies {
    async fn start(prefix: &str) -> TwoProxies {
        TwoProxies::start_with(prefix, GuardFn::Sql).await
    }

    /// Proxies whose guard call is `f` (`guard_extension`).
    async fn start_with(prefix: &str, f: GuardFn) -> TwoProxies {
        let db = guarded(prefix).await;
        direct(&db)
            .await
            .batch_execute(
                "CREATE TABLE h (id bigserial PRIMARY KEY, token int NOT NULL, committed bigint);
                 CREATE SEQUENCE commits;
                 CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   UPDATE h SET committed = nextval('commits') WHERE id = NEW.id;
                   RETURN NULL;
                 END $$;
                 CREATE CONSTRAINT TRIGGER stamp AFTER INSERT ON h
                   DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stamp();",
            )
            .await
            .expect("history table");
        let (mut dirs, mut servers, mut proxies) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..2 {
            // Processes with stores of their own: neither learns the
            // other's tokens.
            let dir = TempDir::new(&format!("{prefix}_{i}"));
            let mut conf = Conf::sqlite(dir.path());
            let listen = conf.postgres(
                Section::to("127.0.0.1:5432")
                    .set("enforce", "database")
                    .set("guard_wait", "15s")
                    .set("guard_extension", f == GuardFn::Extension),
            );
            servers.push(Server::run(dir.path(), conf).await);
            dirs.push(dir);
            proxies.push(listen);
        }
        TwoProxies {
            db,
            _dirs: dirs,
            _servers: servers,
            proxies,
        }
    }

    async fn client(&self, i: usize, token: u64, level: &str) -> Client {
        let conninfo = format!(
            "host=127.0.0.1 port={} dbname={} user=postgres options='{}'",
            self.proxies[i % self.proxies.len()].port(),
            self.db.name,
            opts(token, "h")
        );
        let (c, conn) = tokio_postgres::connect(&conninfo, NoTls)
            .await
            .expect("connect through a proxy");
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "SET default_transaction_isolation = '{}'",
            level.to_lowercase()
        ))
        .await
        .expect("isolation level");
        c
    }
}

/// In both orders, INSERT (id) and COMMIT (stamp), tokens never go down.
async fn assert_tokens_never_go_down(db: &TestDb) -> usize {
    let rows: Vec<(i64, i32, Option<i64>)> = direct(db)
        .await
        .query("SELECT id, token, committed FROM h ORDER BY id", &[])
        .await
        .expect("history")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(!rows.is_empty(), "no write landed at all");
    for order in ["insert", "commit"] {
        let mut sorted = rows.clone();
        if order == "commit" {
            sorted.sort_by_key(|r| r.2);
        }
        let mut highest = 0;
        for (id, token, committed) in &sorted {
            assert!(
                *token >= highest,
                "by {order}: row {id} with token {token} (commit #{committed:?}) after a write with token {highest}"
            );
            highest = *token;
        }
    }
    rows.len()
}

/// Same-token transactions through two proxies hold the gate together:
/// neither waits for the other's open block.
#[tokio::test]
async fn same_token_blocks_through_two_proxies_do_not_wait_for_each_other() {
    let env = TwoProxies::start("fp_gate_two_same").await;
    // The first transaction of a token advances the mark and holds the
    // gate exclusive to its end; after it, the token's transactions share.
    env.client(0, 3, "READ COMMITTED")
        .await
        .batch_execute("INSERT INTO h (token) VALUES (3)")
        .await
        .expect("first write of token 3");
    for level in LEVELS {
        let (a, b) = (env.client(0, 3, level).await, env.client(1, 3, level).await);
        for c in [&a, &b] {
            tokio::time::timeout(PATIENCE, async {
                c.batch_execute("BEGIN").await.expect("begin");
                c.batch_execute("INSERT INTO h (token) VALUES (3)")
                    .await
                    .expect("write");
            })
            .await
            .unwrap_or_else(|_| panic!("{level}: a same-token block waited for the other"));
        }
        for c in [&a, &b] {
            c.batch_execute("COMMIT").await.expect("commit");
        }
    }
    assert_eq!(assert_tokens_never_go_down(&env.db).await, 7);
}

/// Many concurrent writers, failovers to ever newer tokens through
/// alternating proxies while older writers keep going, in autocommit
/// (simple and extended) and in multi-statement blocks: no stale
/// transaction commits after a newer one, in INSERT or in COMMIT order,
/// and the refusals come from the database (the proxies' stores never
/// learn each other's tokens).
async fn failovers_through_two_proxies(level: &'static str, f: GuardFn) {
    let prefix = format!(
        "fp_gate_two_{}{}",
        &level[..4].to_lowercase(),
        if f == GuardFn::Extension { "_c" } else { "" }
    );
    let env = TwoProxies::start_with(&prefix, f).await;
    const EPOCHS: u64 = 5;
    const PER_EPOCH: u64 = 4;
    let env = Arc::new(env);
    let mut tasks = Vec::new();
    for token in 1..=EPOCHS {
        for n in 0..PER_EPOCH {
            let env = Arc::clone(&env);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300 * token)).await;
                // All of one token's writers through one proxy, the next
                // token's through the other: the older writers' proxy
                // does not learn the newer token, so only the database
                // can refuse them.
                let c = env.client(token as usize, token, level).await;
                let stmt = c
                    .prepare("INSERT INTO h (token) VALUES ($1)")
                    .await
                    .expect("prepare");
                let t = token as i32;
                let (mut ok, mut refused, mut by_guard) = (0u32, 0u32, 0u32);
                let until = Instant::now() + Duration::from_millis(900);
                let mut i = n;
                while Instant::now() < until {
                    i += 1;
                    let r = match i % 3 {
                        0 => c
                            .simple_query(&format!("INSERT INTO h (token) VALUES ({t})"))
                            .await
                            .map(|_| ()),
                        1 => c.execute(&stmt, &[&t]).await.map(|_| ()),
                        _ => {
                            let block = async {
                                c.batch_execute("BEGIN").await?;
                                c.execute(&stmt, &[&t]).await?;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                c.batch_execute(&format!("INSERT INTO h (token) VALUES ({t})"))
                                    .await?;
                                c.execute(&stmt, &[&t]).await?;
                                c.batch_execute("COMMIT").await
                            };
                            let r = block.await;
                            let _ = c.batch_execute("ROLLBACK").await;
                            r
                        }
                    };
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) if code(&e) == "ZF001" || code(&e) == "40001" => {
                            refused += 1;
                            let guard = e
                                .as_db_error()
                                .is_some_and(|d| d.message().contains("database guard"));
                            if guard || code(&e) == "40001" {
                                by_guard += 1;
                            }
                        }
                        Err(e) => panic!("{level}, token {token}: unexpected error {e:?}"),
                    }
                }
                (token, ok, refused, by_guard)
            }));
        }
    }
    let (mut refused, mut by_guard, mut newest_ok) = (0, 0, 0);
    for t in tasks {
        let (token, ok, r, g) = t.await.expect("writer");
        if token == EPOCHS {
            newest_ok += ok;
        }
        refused += r;
        by_guard += g;
    }
    assert!(
        newest_ok > 0,
        "{level}: the newest leader never got through"
    );
    assert!(refused > 0, "{level}: no older writer was fenced");
    assert!(
        by_guard > 0,
        "{level}: no refusal came from the database, so the test did not exercise the guard"
    );
    let landed = assert_tokens_never_go_down(&env.db).await;
    assert_eq!(mark(&env.db, "h").await, Some(EPOCHS), "{level}");
    println!("{level}: {landed} rows landed, {refused} refused ({by_guard} by the database)");
}

async fn failovers_through_two_proxies_read_committed(f: GuardFn) {
    failovers_through_two_proxies("READ COMMITTED", f).await;
}

async fn failovers_through_two_proxies_repeatable_read(f: GuardFn) {
    failovers_through_two_proxies("REPEATABLE READ", f).await;
}

async fn failovers_through_two_proxies_serializable(f: GuardFn) {
    failovers_through_two_proxies("SERIALIZABLE", f).await;
}

// ------------------------------ the guard before a transaction's first write

/// Calls of `fencepost.advance` the session has not reported yet, as
/// Postgres counts them (`track_functions = 'pl'`): within one transaction
/// block nothing is reported, so differences count the block's calls.
async fn guard_calls(c: &Client) -> i64 {
    calls_of(c, GuardFn::Sql).await
}

/// Calls of `f` as [`guard_calls`] counts them (`track_functions = 'all'`
/// for the extension's C function).
async fn calls_of(c: &Client, f: GuardFn) -> i64 {
    // A simple query: an extended one's statement would be closed after
    // it by a message the client does not wait for, and a write sent
    // while that is in flight is guarded (the proxy cannot yet know the
    // block it runs in).
    let rows = c
        .simple_query(&format!(
            "SELECT coalesce(pg_stat_get_xact_function_calls(
                           '{}(text,text,integer)'::regprocedure), 0)",
            f.name()
        ))
        .await
        .expect("guard calls");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// A client of proxy 0 with token 3, the mark already at 3 (so the gate is
/// taken shared), counting its own guard calls.
async fn counted_client(env: &TwoProxies, level: &str) -> (Client, i32) {
    let c = env.client(0, 3, level).await;
    c.batch_execute("INSERT INTO h (token) VALUES (3); SET track_functions = 'pl'")
        .await
        .expect("first write of token 3");
    let p = pid(&c).await;
    (c, p)
}

/// One write of token 3, a simple query or (`extended`) the prepared
/// `insert`, after which the session `p` holds the gate shared.
async fn write_holding_the_gate(
    env: &TwoProxies,
    c: &Client,
    p: i32,
    insert: &tokio_postgres::Statement,
    extended: bool,
    level: &str,
) {
    if extended {
        c.execute(insert, &[&3i32]).await.expect("write");
    } else {
        c.batch_execute("INSERT INTO h (token) VALUES (3)")
            .await
            .expect("write");
    }
    assert_gate_shared(
        &env.db,
        p,
        &format!("{level}, extended {extended}: a write without the gate held shared"),
    )
    .await;
}

/// A proxy with `guard_extension = true` guards a write with the
/// extension's `fencepost.advance_fast`, never `fencepost.advance` (which
/// the C function calls for what it hands on, as Postgres does not count:
/// a call through fmgr, not the executor), and the write holds the gate.
#[tokio::test]
async fn an_extension_proxys_same_token_guard_stays_in_c() {
    let env = TwoProxies::start_with("fp_gate_ext_calls", GuardFn::Extension).await;
    for level in LEVELS {
        let (c, p) = counted_client(&env, level).await;
        c.batch_execute("SET track_functions = 'all'")
            .await
            .expect("track C functions");
        let insert = c
            .prepare("INSERT INTO h (token) VALUES ($1)")
            .await
            .expect("prepare");
        for extended in [false, true] {
            c.batch_execute("BEGIN").await.expect("begin");
            let before = (
                calls_of(&c, GuardFn::Extension).await,
                calls_of(&c, GuardFn::Sql).await,
            );
            write_holding_the_gate(&env, &c, p, &insert, extended, level).await;
            let after = (
                calls_of(&c, GuardFn::Extension).await,
                calls_of(&c, GuardFn::Sql).await,
            );
            assert_eq!(
                (after.0 - before.0, after.1 - before.1),
                (1, 0),
                "{level}, extended {extended}: (advance_fast, advance) calls"
            );
            c.batch_execute("COMMIT").await.expect("commit");
        }
    }
}

/// The proxy guards a transaction before its first write, not before each:
/// a read-only block takes no gate and calls no guard; the block's first
/// write (simple or extended protocol) takes the gate shared, and its
/// later writes and its COMMIT call the guard no more.
#[tokio::test]
async fn the_guard_is_taken_before_a_transactions_first_write_only() {
    let env = TwoProxies::start("fp_gate_first").await;
    for level in LEVELS {
        let (c, p) = counted_client(&env, level).await;
        c.batch_execute("BEGIN").await.expect("begin");
        let before = guard_calls(&c).await;
        c.batch_execute("SELECT count(*) FROM h")
            .await
            .expect("read");
        c.query("SELECT count(*) FROM h", &[]).await.expect("read");
        assert!(
            gate_locks(&env.db, p).await.is_empty(),
            "{level}: a read-only transaction took the gate"
        );
        assert_eq!(
            guard_calls(&c).await - before,
            0,
            "{level}: a read called the guard"
        );
        c.batch_execute("COMMIT").await.expect("commit");

        let insert = c
            .prepare("INSERT INTO h (token) VALUES ($1)")
            .await
            .expect("prepare");
        for extended in [false, true] {
            c.batch_execute("BEGIN").await.expect("begin");
            let before = guard_calls(&c).await;
            for _ in 0..3 {
                write_holding_the_gate(&env, &c, p, &insert, extended, level).await;
            }
            assert_eq!(
                guard_calls(&c).await - before,
                1,
                "{level}, extended {extended}: the guard ran more than once"
            );
            c.batch_execute("COMMIT").await.expect("commit");
        }
    }
    assert_tokens_never_go_down(&env.db).await;
}

/// In a transaction block, a simple query's guard runs as the session's
/// prepared guard statement with a Sync of its own, ahead of the client's
/// Query (the server neither parses nor plans the call): the statement
/// shows in `pg_prepared_statements` of a session that never used the
/// extended protocol. The guard's refusal is the client's error (`ZF001`
/// from the database guard), not the aborted block's `25P02` that the
/// client's statement then meets, and the block stays failed until the
/// client ends it. Outside a block (where a Sync would commit the guard
/// alone first), and in the Query that begins one, the guard is prepended
/// to the text as before, and an autocommit refusal is the same `ZF001`.
#[tokio::test]
async fn a_simple_query_in_a_block_runs_the_prepared_guard_ahead_of_it() {
    let env = TwoProxies::start("fp_gate_simple_ahead").await;
    for (i, level) in LEVELS.iter().enumerate() {
        let old = 10 + 2 * i as u64;
        let c = env.client(0, old, level).await;
        // Autocommit: prepended to the text, nothing prepared.
        c.simple_query(&format!("INSERT INTO h (token) VALUES ({old})"))
            .await
            .expect("autocommit write");
        assert_eq!(
            guard_statements(&c).await.len(),
            0,
            "{level}: prepared outside a block"
        );
        // The Query that begins the block: the server has not said it is
        // in one, so the guard is prepended. The block's next write is
        // guarded again (the proxy does not know the first guard ran in
        // the block), now as the prepared statement.
        let insert = format!("INSERT INTO h (token) VALUES ({old})");
        for (sql, prepared, why) in [
            (
                format!("BEGIN; {insert}"),
                0,
                "before the server said the block had begun",
            ),
            (insert.clone(), 1, "not for a write in the block"),
        ] {
            c.simple_query(&sql).await.expect(&sql);
            assert_eq!(
                guard_statements(&c).await.len(),
                prepared,
                "{level}: {sql}: the guard statement prepared {why}"
            );
        }
        c.simple_query("COMMIT").await.expect("commit");

        newer_leader_then_begin(&env, &c, old, level).await;
        let err = c
            .simple_query(&format!("INSERT INTO h (token) VALUES ({old})"))
            .await
            .expect_err("a stale write in a block landed");
        let refused_by_guard = err
            .as_db_error()
            .is_some_and(|d| d.message().contains("database guard"));
        assert!(
            (code(&err) == "ZF001" && refused_by_guard) || code(&err) == "40001",
            "{level}: not the guard's refusal: {err:?}"
        );
        let after = c
            .simple_query("SELECT 1")
            .await
            .expect_err("the block went on after the refusal");
        assert_eq!(code(&after), "25P02", "{level}: {after:?}");
        c.simple_query("ROLLBACK").await.expect("rollback");
        let err = c
            .simple_query(&format!("INSERT INTO h (token) VALUES ({old})"))
            .await
            .expect_err("a stale autocommit write landed");
        assert_eq!(code(&err), "ZF001", "{level}: {err:?}");
    }
    assert_tokens_never_go_down(&env.db).await;
}

/// A newer token's write through the other proxy, which the first never
/// hears of (only the database can refuse the old one now); then `c`, a
/// client of the first with token `old`, begins a block.
async fn newer_leader_then_begin(env: &TwoProxies, c: &Client, old: u64, level: &str) {
    let newer = env.client(1, old + 1, level).await;
    newer
        .simple_query(&format!("INSERT INTO h (token) VALUES ({})", old + 1))
        .await
        .expect("the newer leader's write");
    c.simple_query("BEGIN").await.expect("begin");
}

/// A client that pipelines Queries behind a write whose guard goes ahead
/// of it (on the epoll engine, without a Sync of its own): the next Query
/// waits in the proxy until the guard has answered. When the guard
/// refuses, the server skips everything up to the Sync the proxy then
/// sends, so a Query sent on before that would be lost and the client
/// would wait for its answer forever; here it gets the aborted block's
/// `25P02`, and a same-token pipeline runs whole.
#[tokio::test]
async fn a_query_pipelined_behind_a_guard_that_went_ahead_waits_for_it() {
    let env = TwoProxies::start("fp_gate_pipelined").await;
    for (i, level) in LEVELS.iter().enumerate() {
        let old = 10 + 2 * i as u64;
        let c = env.client(0, old, level).await;
        let insert = format!("INSERT INTO h (token) VALUES ({old})");
        c.simple_query("BEGIN").await.expect("begin");
        // Both futures polled together: tokio-postgres sends the second
        // Query before the first is answered.
        let (a, b) = tokio::join!(c.simple_query(&insert), c.simple_query("SELECT 1"));
        a.expect("a same-token write in a pipeline");
        b.expect("the Query pipelined behind it");
        assert_eq!(
            guard_statements(&c).await.len(),
            1,
            "{level}: the guard did not go ahead as the prepared statement"
        );
        c.simple_query("COMMIT").await.expect("commit");

        newer_leader_then_begin(&env, &c, old, level).await;
        let pipelined = tokio::time::timeout(PATIENCE, async {
            tokio::join!(c.simple_query(&insert), c.simple_query("SELECT 1"))
        })
        .await
        .expect("a Query pipelined behind a refused guard was never answered");
        let err = pipelined.0.expect_err("a stale write in a block landed");
        assert!(
            code(&err) == "ZF001" || code(&err) == "40001",
            "{level}: not the guard's refusal: {err:?}"
        );
        let after = pipelined
            .1
            .expect_err("the block went on after the refusal");
        assert_eq!(code(&after), "25P02", "{level}: {after:?}");
        c.simple_query("ROLLBACK").await.expect("rollback");
        c.simple_query("SELECT 1")
            .await
            .expect("the session after the rollback");
    }
    assert_tokens_never_go_down(&env.db).await;
}

/// A write after `ROLLBACK TO SAVEPOINT` is guarded again: the gate taken
/// inside the savepoint was released by the rollback, and the write must
/// hold it (a newer token's advance then waits for the transaction).
#[tokio::test]
async fn a_write_after_rollback_to_a_savepoint_is_guarded_again() {
    let env = TwoProxies::start("fp_gate_rollback_to").await;
    let mut token = 3;
    for level in LEVELS {
        let c = env.client(0, token, level).await;
        c.batch_execute(&format!("INSERT INTO h (token) VALUES ({token})"))
            .await
            .expect("first write of the token");
        let p = pid(&c).await;
        c.batch_execute("BEGIN; SAVEPOINT s").await.expect("begin");
        let insert = format!("INSERT INTO h (token) VALUES ({token})");
        c.batch_execute(&insert)
            .await
            .expect("write in the savepoint");
        c.batch_execute("ROLLBACK TO s").await.expect("rollback to");
        assert!(
            gate_locks(&env.db, p).await.is_empty(),
            "{level}: the rolled-back savepoint's gate is still held"
        );
        c.execute(&insert, &[])
            .await
            .expect("write after rollback to");
        assert_gate_shared(
            &env.db,
            p,
            &format!("{level}: a write after ROLLBACK TO without the gate"),
        )
        .await;
        let a = Arc::new(direct(&env.db).await);
        a.batch_execute("BEGIN").await.expect("begin");
        let mut adv = spawn_sql(&a, call(GuardFn::Sql, "h", token + 1, 20_000));
        assert!(
            still_blocked(&mut adv).await,
            "{level}: the advance did not wait for the guarded transaction"
        );
        c.batch_execute("COMMIT").await.expect("commit");
        finish(adv, "the advance").await.expect("advance");
        a.batch_execute("COMMIT").await.expect("commit the advance");
        token += 2;
    }
    assert_tokens_never_go_down(&env.db).await;
}

/// `COMMIT AND CHAIN` starts a new transaction in the same block status:
/// its first write takes the gate again.
#[tokio::test]
async fn a_write_after_commit_and_chain_is_guarded_again() {
    let env = TwoProxies::start("fp_gate_chain").await;
    for level in LEVELS {
        let (c, p) = counted_client(&env, level).await;
        c.batch_execute("BEGIN").await.expect("begin");
        c.batch_execute("INSERT INTO h (token) VALUES (3)")
            .await
            .expect("write");
        c.batch_execute("COMMIT AND CHAIN").await.expect("chain");
        assert!(gate_locks(&env.db, p).await.is_empty(), "{level}");
        let before = guard_calls(&c).await;
        c.batch_execute("INSERT INTO h (token) VALUES (3)")
            .await
            .expect("write in the chained transaction");
        assert_gate_shared(
            &env.db,
            p,
            &format!("{level}: a write in the chained transaction without the gate"),
        )
        .await;
        assert_eq!(guard_calls(&c).await - before, 1, "{level}");
        c.batch_execute("COMMIT").await.expect("commit");
    }
}

/// A token change within a transaction block is still refused by the
/// database (`ZF001`) after the first write took the gate with the old one.
#[tokio::test]
async fn a_token_change_within_a_block_through_the_proxy_is_refused() {
    let env = TwoProxies::start("fp_gate_change_proxy").await;
    let mut token = 3;
    for level in LEVELS {
        let c = env.client(0, token, level).await;
        c.batch_execute("BEGIN").await.expect("begin");
        c.batch_execute(&format!("INSERT INTO h (token) VALUES ({token})"))
            .await
            .expect("write with the first token");
        c.batch_execute(&format!("SET fencing.token = '{}'", token + 1))
            .await
            .expect("a newer token");
        let err = c
            .execute("INSERT INTO h (token) VALUES ($1)", &[&(token as i32 + 1)])
            .await
            .expect_err("a second token in one transaction");
        assert_eq!(code(&err), "ZF001", "{level}: {err:?}");
        assert!(
            err.as_db_error()
                .is_some_and(|d| d.message().contains("changed within a transaction")),
            "{level}: {err:?}"
        );
        c.batch_execute("ROLLBACK").await.expect("rollback");
        token += 2;
    }
}

// ------------------------- several statements in one Query (a hole, closed)

/// A backend of this test's database waiting for the gate exclusive: a
/// newer token's advance has arrived and waits for the transactions
/// holding the gate shared. (`pg_locks` shows every database's locks, and
/// tests running in parallel take the same gate keys in theirs.)
async fn wait_for_an_advance_to_queue(db: &TestDb) {
    let probe = direct(db).await;
    let queued = async {
        loop {
            let n: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_locks
                      WHERE locktype = 'advisory' AND classid = 1717920355 AND objsubid = 2
                        AND mode = 'ExclusiveLock' AND NOT granted
                        AND database = (SELECT oid FROM pg_database
                                         WHERE datname = current_database())",
                    &[],
                )
                .await
                .expect("pg_locks")
                .get(0);
            if n > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, queued)
        .await
        .expect("the newer token's advance never queued for the gate");
}

/// What the old leader's one Query does around its transaction boundary:
/// `{t}` is its (stale) token. `WAIT` takes the gate shared by hand, which
/// Postgres grants only after the newer leader's advance has committed (its
/// exclusive request queued first): the later write then surely runs after
/// the advance, in the new transaction the boundary opened.
const WAIT: &str = "SELECT pg_advisory_xact_lock_shared(1717920355, hashtext('h'))";

/// A backend of this test's database waiting for the test's own advisory
/// lock [`HOLD_KEY`].
async fn wait_for_a_holder(db: &TestDb) {
    let probe = direct(db).await;
    let waiting = async {
        loop {
            let n: i64 = probe
                .query_one(
                    &format!(
                        "SELECT count(*) FROM pg_locks
                          WHERE locktype = 'advisory' AND classid = 0 AND objid = {HOLD_KEY}
                            AND objsubid = 1 AND NOT granted
                            AND database = (SELECT oid FROM pg_database
                                             WHERE datname = current_database())"
                    ),
                    &[],
                )
                .await
                .expect("pg_locks")
                .get(0);
            if n > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the old leader's Query never reached its hold");
}

/// An advisory lock the test holds while the old leader's Query, in the
/// middle of its first transaction, waits for it (`{hold}` in the Query).
const HOLD_KEY: i64 = 4242;

/// The old leader (token `t`, proxy 0, which never learns `t + 1`) holds
/// the gate shared in an open transaction (`setup`, or the start of its
/// Query up to `{hold}`, where it waits for the test); the new leader
/// (token `t + 1`, proxy 1) queues its advance behind it; then the old
/// leader's one Query ends that transaction and writes again in a new one.
/// The guard in front of the Query runs in the old transaction (or is
/// undone by its `ROLLBACK TO`), so only a guard before the later write
/// keeps it from committing: it must fail (`ZF001`, or `40001` under
/// REPEATABLE READ / SERIALIZABLE), and no row of `t` may land after
/// `t + 1`.
async fn a_boundary_inside_one_query(prefix: &str, setup: &str, query: &str) {
    let env = TwoProxies::start(prefix).await;
    let holder = direct(&env.db).await;
    let mut t = 3u64;
    for level in LEVELS {
        let old = Arc::new(env.client(0, t, level).await);
        old.batch_execute(&format!("INSERT INTO h (token) VALUES ({t})"))
            .await
            .expect("first write of the old token");
        old.batch_execute(&setup.replace("{t}", &t.to_string()))
            .await
            .expect("the old leader's open transaction");
        let sent = query.replace("{t}", &t.to_string()).replace(
            "{hold}",
            &format!("SELECT pg_advisory_xact_lock({HOLD_KEY})"),
        );
        let holds = query.contains("{hold}");
        holder
            .execute("SELECT pg_advisory_lock($1)", &[&HOLD_KEY])
            .await
            .expect("hold");
        let mut running = None;
        if holds {
            running = Some(spawn_sql(&old, sent.clone()));
            wait_for_a_holder(&env.db).await;
        }
        let new = Arc::new(env.client(1, t + 1, level).await);
        let newer = spawn_sql(&new, format!("INSERT INTO h (token) VALUES ({})", t + 1));
        wait_for_an_advance_to_queue(&env.db).await;
        let running = running.unwrap_or_else(|| spawn_sql(&old, sent.clone()));
        holder
            .execute("SELECT pg_advisory_unlock($1)", &[&HOLD_KEY])
            .await
            .expect("release");
        let r = finish(running, &format!("{level}: {sent}")).await;
        finish(newer, "the newer leader's write")
            .await
            .unwrap_or_else(|e| panic!("{level}: the newer leader's write failed: {e:?}"));
        let e = r.expect_err(&format!(
            "{level}: {sent}: a stale write in the Query's new transaction was not refused"
        ));
        assert!(
            ["ZF001", "40001"].contains(&code(&e).as_str()),
            "{level}: {sent}: {e:?}"
        );
        let _ = old.batch_execute("ROLLBACK").await;
        assert_eq!(mark(&env.db, "h").await, Some(t + 1), "{level}");
        t += 2;
    }
    assert_tokens_never_go_down(&env.db).await;
}

#[tokio::test]
async fn a_write_after_commit_and_begin_in_one_query_is_guarded() {
    a_boundary_inside_one_query(
        "fp_gate_q_commit_begin",
        "BEGIN; INSERT INTO h (token) VALUES ({t})",
        &format!("COMMIT; BEGIN; {WAIT}; INSERT INTO h (token) VALUES ({{t}}); COMMIT"),
    )
    .await;
}

#[tokio::test]
async fn a_write_after_rollback_to_in_one_query_is_guarded() {
    a_boundary_inside_one_query(
        "fp_gate_q_rollback_to",
        "BEGIN; SAVEPOINT s; INSERT INTO h (token) VALUES ({t})",
        &format!("ROLLBACK TO s; {WAIT}; INSERT INTO h (token) VALUES ({{t}}); COMMIT"),
    )
    .await;
}

/// Outside a block: the Query's first write holds the gate in the implicit
/// transaction until its `COMMIT`; the write after it runs in a new one.
#[tokio::test]
async fn a_write_after_commit_in_an_implicit_transaction_is_guarded() {
    a_boundary_inside_one_query(
        "fp_gate_q_implicit",
        "SELECT 1",
        &format!(
            "INSERT INTO h (token) VALUES ({{t}}); {{hold}}; COMMIT; {WAIT}; INSERT INTO h (token) VALUES ({{t}})"
        ),
    )
    .await;
}

/// The old leader's answers, row by row and completion by completion.
fn answers(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    use tokio_postgres::SimpleQueryMessage as M;
    msgs.iter()
        .map(|m| match m {
            M::Row(r) => format!("row {:?}", r.get(0)),
            M::CommandComplete(n) => format!("complete {n}"),
            _ => "other".to_string(),
        })
        .collect()
}

/// A guard inserted in the middle of a Query takes the gate in the new
/// transaction, and the client sees what Postgres alone answers: the same
/// rows and completions, the same error position in its own text, with
/// strings, dollar quotes and comments that hold semicolons and `COMMIT`.
#[tokio::test]
async fn a_guard_inside_a_query_is_in_the_new_transaction_and_hidden() {
    let env = TwoProxies::start("fp_gate_q_hidden").await;
    let alone = direct(&env.db).await;
    for level in LEVELS {
        let c = env.client(0, 3, level).await;
        alone
            .batch_execute(&format!(
                "SET default_transaction_isolation = '{}'",
                level.to_lowercase()
            ))
            .await
            .expect("isolation level");
        let p = pid(&c).await;
        let q = "INSERT INTO h (token) VALUES (3) RETURNING token; \
                 SELECT 'a; COMMIT; b' /* ; ROLLBACK; */ ; COMMIT; -- ; BEGIN;\n\
                 BEGIN; SELECT $x$ ; END; $x$; \
                 INSERT INTO h (token) VALUES (3) RETURNING token; SELECT 42";
        let through = c.simple_query(q).await.expect("through the proxy");
        assert_gate_shared(
            &env.db,
            p,
            &format!("{level}: the write after COMMIT; BEGIN runs without the gate"),
        )
        .await;
        c.batch_execute("COMMIT").await.expect("commit");
        let direct_answers = alone.simple_query(q).await.expect("without the proxy");
        alone.batch_execute("COMMIT").await.expect("commit");
        assert_eq!(answers(&through), answers(&direct_answers), "{level}");

        let bad = "COMMIT; BEGIN; INSERT INTO h (token) VALUES (3); SELECT 'é', nosuch FROM h";
        let pos =
            |e: tokio_postgres::Error| format!("{:?}", e.as_db_error().and_then(|d| d.position()));
        let through = pos(c.batch_execute(bad).await.expect_err("unknown column"));
        let _ = c.batch_execute("ROLLBACK").await;
        let by_itself = pos(alone.batch_execute(bad).await.expect_err("unknown column"));
        let _ = alone.batch_execute("ROLLBACK").await;
        assert!(by_itself.contains("Original"), "{by_itself}");
        assert_eq!(through, by_itself, "{level}");
    }
}

/// A Query in another client encoding that is not UTF-8 cannot be split
/// into its statements reliably: guard mode refuses it whole (`0A000`)
/// when it holds a `;`, and nothing of it runs; one without a `;` is one
/// statement and is guarded in front as usual.
#[tokio::test]
async fn a_query_not_in_utf8_with_several_statements_is_refused_whole() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let env = TwoProxies::start("fp_gate_q_latin1").await;
    let psql = |sql: &[u8]| {
        let conninfo = format!(
            "host=127.0.0.1 port={} dbname={} user=postgres options='{}'",
            env.proxies[0].port(),
            env.db.name,
            opts(3, "h")
        );
        let mut cmd = tokio::process::Command::new("psql");
        cmd.env("PGCLIENTENCODING", "LATIN1")
            .arg(conninfo)
            .args(crate::support::PSQL_STRICT)
            .arg("-c")
            .arg(OsString::from_vec(sql.to_vec()));
        async move {
            let out = cmd.output().await.expect("run psql");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (st, err) = psql(b"INSERT INTO h (token) VALUES (3) /* caf\xe9 */").await;
    assert_eq!(st, 0, "one statement in LATIN1: {err}");
    let (st, err) = psql(
        b"INSERT INTO h (token) VALUES (3); COMMIT; INSERT INTO h (token) VALUES (3) /* caf\xe9 */",
    )
    .await;
    assert_ne!(st, 0, "several statements in LATIN1 ran");
    assert!(err.contains("0A000"), "{err}");
    assert!(err.contains("not valid UTF-8"), "{err}");
    let rows: i64 = direct(&env.db)
        .await
        .query_one("SELECT count(*) FROM h", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1, "a statement of the refused query ran");
}

/// A fast-path function call (libpq's large-object calls, here psql's
/// `\lo_import`) cannot carry the guard in its transaction: the proxy
/// fences it alone, and must not file a guard call it never sent. Filed,
/// it made the block look as if it held the gate, and the block's next
/// write ran without the guard.
#[tokio::test]
async fn a_write_after_a_fast_path_call_in_a_block_is_guarded() {
    let env = TwoProxies::start("fp_gate_fastpath").await;
    let dir = TempDir::new("fp_gate_fastpath_file");
    let file = dir.path().join("object");
    std::fs::write(&file, b"a large object").expect("write the file");
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={} user=postgres options='{}'",
        env.proxies[0].port(),
        env.db.name,
        opts(3, "h")
    );
    let script = format!(
        "BEGIN;\n\\lo_import {}\nINSERT INTO h (token) VALUES (3);\n\
         SELECT 'gate ' || count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid = 1717920355 AND objsubid = 2 AND pid = pg_backend_pid() AND granted;\n\
         COMMIT;\n",
        file.display()
    );
    // A file: `-c` takes SQL or one backslash command, not both.
    let script_file = dir.path().join("script.sql");
    std::fs::write(&script_file, script).expect("write the script");
    let mut cmd = tokio::process::Command::new("psql");
    cmd.arg(conninfo)
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&script_file)
        .kill_on_drop(true);
    let out = cmd.output().await.expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l == "gate 1"),
        "the write after the fast-path calls ran without the gate: {stdout}{stderr}"
    );
}

// ------------------------------------------------- the prepared guard statement

/// The prepared guard statements of this session, as Postgres lists them.
async fn guard_statements(c: &Client) -> Vec<String> {
    c.simple_query(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'fencepost%' ORDER BY name",
    )
    .await
    .expect("pg_prepared_statements")
    .iter()
    .filter_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
    .collect()
}

/// A block whose first write goes in the extended protocol: it must hold
/// the gate shared after that write, and commit.
async fn extended_block(env: &TwoProxies, c: &Client, p: i32, what: &str) {
    let insert = c
        .prepare("INSERT INTO h (token) VALUES ($1)")
        .await
        .expect("prepare");
    c.batch_execute("BEGIN").await.expect("begin");
    c.execute(&insert, &[&3i32])
        .await
        .unwrap_or_else(|e| panic!("{what}: the guarded write failed: {e}"));
    assert_gate_shared(&env.db, p, &format!("{what}: a write without the gate")).await;
    c.batch_execute("COMMIT").await.expect("commit");
}

/// In the extended protocol the guard is one prepared statement per server
/// session, parsed once and then only bound and executed; whatever the
/// client does to prepared statements, every transaction is still guarded
/// and the client's own statements are its own: `DISCARD ALL`,
/// `DEALLOCATE ALL` and `DEALLOCATE` of the guard's name (it is parsed
/// again), an SQL `PREPARE` under the guard's name (the client gets the
/// name, the guard moves to the next), and a drop the proxy cannot see (a
/// `DEALLOCATE` inside a `DO` block: the server's 26000 fails that one
/// write, and the session falls back to one-shot guard calls; so it does
/// when the write was a simple query in a block, whose guard goes ahead as
/// the prepared statement).
#[tokio::test]
async fn the_prepared_guard_statement_survives_what_the_client_does_to_it() {
    let env = TwoProxies::start("fp_gate_prepared").await;
    let (c, p) = counted_client(&env, "READ COMMITTED").await;
    for round in 0..3 {
        extended_block(&env, &c, p, &format!("round {round}")).await;
    }
    assert_eq!(guard_statements(&c).await, vec!["fencepost_guard_1"]);

    for drop in [
        "DISCARD ALL",
        "DEALLOCATE ALL",
        "DEALLOCATE fencepost_guard_1",
    ] {
        c.batch_execute(drop).await.expect(drop);
        assert!(guard_statements(&c).await.is_empty(), "{drop}");
        extended_block(&env, &c, p, drop).await;
        extended_block(&env, &c, p, drop).await;
        assert_eq!(
            guard_statements(&c).await,
            vec!["fencepost_guard_1"],
            "after {drop}"
        );
    }

    // The client takes the guard's name for a statement of its own.
    c.batch_execute("PREPARE fencepost_guard_1 AS SELECT 42")
        .await
        .expect("the client's PREPARE of the guard's name");
    extended_block(&env, &c, p, "after the client took the name").await;
    assert_eq!(
        guard_statements(&c).await,
        vec!["fencepost_guard_1", "fencepost_guard_2"]
    );
    let own = c
        .simple_query("EXECUTE fencepost_guard_1")
        .await
        .expect("the client's own statement");
    assert!(
        own.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))),
        "the client's statement of that name is its own"
    );

    // Dropped where the proxy cannot see it.
    c.batch_execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
        .await
        .expect("a DEALLOCATE in a DO block");
    let insert = c
        .prepare("INSERT INTO h (token) VALUES ($1)")
        .await
        .expect("prepare");
    let lost = c
        .execute(&insert, &[&3i32])
        .await
        .expect_err("a Bind of the lost guard statement");
    assert_eq!(code(&lost), "26000", "{lost}");
    for round in 0..2 {
        extended_block(&env, &c, p, &format!("one-shot guard {round}")).await;
    }
    assert!(guard_statements(&c).await.is_empty());

    // The same loss under a simple query in a block, whose guard goes
    // ahead as the prepared statement: the server's 26000 is the
    // client's error (not the aborted block's 25P02), and the session
    // goes on with guards prepended to its text.
    let (c, p) = counted_client(&env, "READ COMMITTED").await;
    let insert = "INSERT INTO h (token) VALUES (3)";
    c.batch_execute(&format!("BEGIN; {insert}; {insert}; COMMIT"))
        .await
        .expect("a block");
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(insert).await.expect("a write in a block");
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(guard_statements(&c).await, vec!["fencepost_guard_1"]);
    c.batch_execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
        .await
        .expect("a DEALLOCATE in a DO block");
    c.batch_execute("BEGIN").await.expect("begin");
    let lost = c
        .batch_execute(insert)
        .await
        .expect_err("a Bind of the lost guard statement");
    assert_eq!(code(&lost), "26000", "{lost}");
    c.batch_execute("ROLLBACK").await.expect("rollback");
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute(insert)
        .await
        .expect("a write, the guard prepended");
    assert_gate_shared(&env.db, p, "a write without the gate after the loss").await;
    c.batch_execute("COMMIT").await.expect("commit");
    assert!(guard_statements(&c).await.is_empty());
    assert_tokens_never_go_down(&env.db).await;
}
