//! End-to-end tests of the Postgres fencing proxy: the real `fencepost
//! serve` binary between real clients (psql, tokio-postgres) and the
//! machine's Postgres. Every assertion about what landed is made from the
//! table itself, read directly from Postgres, not through the proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{code, direct, opts, Conf, InProc, Section, Served, TempDir, TestDb};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

struct Env {
    _dir: TempDir,
    /// A process where the test needs one (SIGTERM), else in-process.
    server: Served,
    db: TestDb,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Env {
    /// A fresh database with table `t(v int)`, and a proxy in front of it.
    async fn start(prefix: &str) -> Env {
        Env::start_with(prefix, |_, _, pg| pg).await
    }

    /// As `start`, the config shaped by `extra(dir, conf, [[postgres]])`,
    /// which returns the `[[postgres]]` section.
    async fn start_with(
        prefix: &str,
        extra: impl FnOnce(&Path, &mut Conf, Section) -> Section,
    ) -> Env {
        Env::start_as(prefix, false, extra).await
    }

    async fn start_as(
        prefix: &str,
        process: bool,
        extra: impl FnOnce(&Path, &mut Conf, Section) -> Section,
    ) -> Env {
        let db = TestDb::create(prefix).await;
        let direct = direct(&db).await;
        direct
            .batch_execute("CREATE TABLE t (v int)")
            .await
            .expect("create table");
        let dir = TempDir::new(prefix);
        let mut conf = Conf::sqlite(dir.path());
        let admin = conf.admin(Section::new());
        let pg = extra(dir.path(), &mut conf, Section::to("127.0.0.1:5432"));
        let proxy = conf.postgres(pg);
        let server = Served::start(process, dir.path(), conf).await;
        Env {
            _dir: dir,
            server,
            db,
            proxy,
            admin,
        }
    }

    /// The admin API's audit records of `resource` once they mention
    /// `needle` (bounded: 10 s), as JSON text.
    async fn audit_until(&self, resource: &str, needle: &str) -> String {
        let url = format!(
            "http://{}/v1/audit?kind=refused_write&resource={resource}",
            self.admin
        );
        crate::support::eventually(10, || {
            let url = url.clone();
            async move {
                let (status, body) = crate::support::get(&url, None).await;
                (status == 200 && body.contains(needle)).then_some(body)
            }
        })
        .await
        .unwrap_or_else(|| panic!("no audit record of {resource} mentions {needle:?}"))
    }

    fn conninfo(&self, options: Option<&str>) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} dbname={} user=postgres",
            self.proxy.port(),
            self.db.name
        );
        if let Some(o) = options {
            s.push_str(&format!(" options='{o}'"));
        }
        s
    }

    /// A tokio-postgres client through the proxy.
    async fn client(&self, options: Option<&str>) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(options), NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!("connect through the proxy: {e}\n{}", self.server.log_text())
            });
        tokio::spawn(conn);
        client
    }

    /// The table's rows, read from Postgres directly.
    async fn rows(&self) -> Vec<i32> {
        let c = direct(&self.db).await;
        c.query("SELECT v FROM t ORDER BY v", &[])
            .await
            .expect("read table")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default()
}

async fn simple(c: &Client, sql: &str) -> Result<Vec<SimpleQueryMessage>, tokio_postgres::Error> {
    c.simple_query(sql).await
}

#[tokio::test]
async fn stale_write_from_startup_options_is_refused_with_zf001_and_leaves_no_row() {
    let env = Env::start("fp_pg_stale").await;
    let new = env.client(Some(&opts(5, "r"))).await;
    simple(&new, "INSERT INTO t VALUES (5)")
        .await
        .expect("current token admitted");
    let old = env.client(Some(&opts(4, "r"))).await;
    let err = simple(&old, "INSERT INTO t VALUES (4)")
        .await
        .expect_err("stale write must be refused");
    assert_eq!(code(&err), "ZF001", "{err:?}");
    let m = message(&err);
    assert!(
        m.contains("r") && m.contains('4') && m.contains('5'),
        "message names resource, presented and current: {m}"
    );
    // The connection stays usable, and reads need no token.
    let rows = simple(&old, "SELECT count(*) FROM t").await.expect("read");
    assert!(rows
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))));
    assert_eq!(env.rows().await, vec![5]);

    // The refusal is audited with a fingerprint, not the values.
    let audit = env.audit_until("r", "stale").await;
    assert!(audit.contains("postgres"), "{audit}");
    assert!(audit.contains("INSERT INTO t"), "{audit}");
    assert!(!audit.contains("VALUES (4)"), "values leaked: {audit}");
}

#[tokio::test]
async fn reads_pass_without_token_and_writes_without_one_get_zf002() {
    let env = Env::start("fp_pg_notoken").await;
    let c = env.client(None).await;
    simple(&c, "SELECT * FROM t").await.expect("plain read");
    simple(&c, "SHOW search_path").await.expect("show");
    simple(&c, "EXPLAIN DELETE FROM t").await.expect("explain");
    simple(&c, "BEGIN; SELECT 1; COMMIT")
        .await
        .expect("txn control");
    let err = simple(&c, "INSERT INTO t VALUES (1)").await.unwrap_err();
    assert_eq!(code(&err), "ZF002", "{err:?}");
    let err = simple(&c, "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "ZF002", "writable CTE is a write: {err:?}");
    let err = simple(&c, "SELECT * FROM t FOR UPDATE").await.unwrap_err();
    assert_eq!(code(&err), "ZF002", "{err:?}");
    // A malformed token is ZF003.
    let bad = env
        .client(Some("-c fencing.token=abc -c fencing.resource=r"))
        .await;
    let err = simple(&bad, "INSERT INTO t VALUES (1)").await.unwrap_err();
    assert_eq!(code(&err), "ZF003", "{err:?}");
    assert!(env.rows().await.is_empty());
}

#[tokio::test]
async fn set_fencing_token_and_reset() {
    let env = Env::start("fp_pg_set").await;
    let leader = env.client(Some(&opts(7, "r"))).await;
    simple(&leader, "INSERT INTO t VALUES (7)")
        .await
        .expect("token 7");

    let c = env.client(None).await;
    simple(&c, "SET fencing.resource = 'r'").await.expect("set");
    simple(&c, "SET fencing.token = '6'").await.expect("set");
    let err = simple(&c, "INSERT INTO t VALUES (6)").await.unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    simple(&c, "SET fencing.token = 8").await.expect("set");
    simple(&c, "INSERT INTO t VALUES (8)")
        .await
        .expect("token 8 admitted");
    // Now 7 is stale for the first leader.
    let err = simple(&leader, "INSERT INTO t VALUES (70)")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    // RESET returns to the startup value (none here): no token.
    simple(&c, "RESET fencing.token").await.expect("reset");
    let err = simple(&c, "INSERT INTO t VALUES (9)").await.unwrap_err();
    assert_eq!(code(&err), "ZF002", "{err:?}");
    // SET LOCAL ends with its transaction.
    simple(
        &c,
        "BEGIN; SET LOCAL fencing.token = '8'; INSERT INTO t VALUES (80); COMMIT",
    )
    .await
    .expect("SET LOCAL inside the block");
    let err = simple(&c, "INSERT INTO t VALUES (81)").await.unwrap_err();
    assert_eq!(
        code(&err),
        "ZF002",
        "SET LOCAL must not outlive the block: {err:?}"
    );
    // A SET in a block that rolls back is undone.
    simple(&c, "BEGIN; SET fencing.token = '8'; ROLLBACK")
        .await
        .expect("rolled back SET");
    let err = simple(&c, "INSERT INTO t VALUES (82)").await.unwrap_err();
    assert_eq!(code(&err), "ZF002", "{err:?}");
    assert_eq!(env.rows().await, vec![7, 8, 80]);
}

#[tokio::test]
async fn comment_token_wins_for_its_statement() {
    let env = Env::start("fp_pg_comment").await;
    let c = env.client(Some(&opts(10, "r"))).await;
    simple(&c, "INSERT INTO t VALUES (10)")
        .await
        .expect("session token");
    // The comment's older token wins over the session's current one.
    let err = simple(
        &c,
        "/* fencing.token=9 fencing.resource=r */ INSERT INTO t VALUES (9)",
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    // Only for that statement.
    simple(&c, "INSERT INTO t VALUES (11)")
        .await
        .expect("session token again");
    // A comment carries a token where the session has none.
    let bare = env.client(None).await;
    simple(
        &bare,
        "/* fencing.token=10 fencing.resource=r */ INSERT INTO t VALUES (12)",
    )
    .await
    .expect("comment token");
    assert_eq!(env.rows().await, vec![10, 11, 12]);
}

#[tokio::test]
async fn transaction_fenced_midway_is_rolled_back() {
    let env = Env::start("fp_pg_txn").await;
    let old = env.client(Some(&opts(1, "r"))).await;
    simple(&old, "BEGIN").await.expect("begin");
    simple(&old, "INSERT INTO t VALUES (1)")
        .await
        .expect("first write");

    // A newer leader writes meanwhile; it does not wait for the old
    // leader's idle block (whose rows are not committed).
    let new = env.client(Some(&opts(2, "r"))).await;
    tokio::time::timeout(
        Duration::from_secs(2),
        simple(&new, "INSERT INTO t VALUES (2)"),
    )
    .await
    .expect("the newer write does not wait for the old block")
    .expect("newer write admitted");

    // The old leader's next write in the block is refused, and the block
    // is aborted as Postgres aborts one.
    let err = simple(&old, "INSERT INTO t VALUES (11)").await.unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    let err = simple(&old, "SELECT 1").await.unwrap_err();
    assert_eq!(
        code(&err),
        "25P02",
        "block must be in failed state: {err:?}"
    );
    simple(&old, "ROLLBACK").await.expect("rollback");
    assert_eq!(env.rows().await, vec![2]);
}

#[tokio::test]
async fn commit_of_a_stale_block_answers_zf001_and_rolls_back() {
    let env = Env::start("fp_pg_commit").await;
    let old = env.client(Some(&opts(1, "r"))).await;
    simple(&old, "BEGIN; INSERT INTO t VALUES (1)")
        .await
        .expect("block");

    let new = env.client(Some(&opts(2, "r"))).await;
    simple(&new, "INSERT INTO t VALUES (2)")
        .await
        .expect("newer write admitted");

    let err = simple(&old, "COMMIT").await.unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    // The block is over (rolled back), the session is usable.
    simple(&old, "SELECT 1").await.expect("idle again");
    assert_eq!(env.rows().await, vec![2]);

    // A block whose token is still current commits normally.
    simple(&new, "BEGIN; INSERT INTO t VALUES (3)")
        .await
        .expect("block");
    simple(&new, "COMMIT").await.expect("current block commits");
    assert_eq!(env.rows().await, vec![2, 3]);
}

#[tokio::test]
async fn extended_protocol_is_fenced_at_execute() {
    let env = Env::start("fp_pg_ext").await;
    let new = env.client(Some(&opts(3, "r"))).await;
    new.execute("INSERT INTO t VALUES ($1)", &[&3i32])
        .await
        .expect("prepared insert with current token");
    let old = env.client(Some(&opts(2, "r"))).await;
    let stmt = old
        .prepare("INSERT INTO t VALUES ($1)")
        .await
        .expect("prepare is not a write");
    let err = old.execute(&stmt, &[&2i32]).await.unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    // The session is in sync after the refusal: reads still work.
    let n: i64 = old
        .query_one("SELECT count(*) FROM t WHERE v > $1", &[&0i32])
        .await
        .expect("read after refusal")
        .get(0);
    assert_eq!(n, 1);
    // Inside a transaction the refusal aborts the block.
    old.batch_execute("BEGIN").await.expect("begin");
    let err = old.execute(&stmt, &[&22i32]).await.unwrap_err();
    assert_eq!(code(&err), "ZF001", "{err:?}");
    let err = old.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&err), "25P02", "{err:?}");
    old.batch_execute("ROLLBACK").await.expect("rollback");
    new.execute(
        &new.prepare("INSERT INTO t VALUES ($1)")
            .await
            .expect("prepare"),
        &[&33i32],
    )
    .await
    .expect("current leader still writes");
    assert_eq!(env.rows().await, vec![3, 33]);
}

/// Runs one psql command (`-c`) against `conninfo`, stopping at the first
/// error with verbose messages (the SQLSTATE in them): its exit status and
/// its standard error.
fn psql(conninfo: &str, command: &str) -> (i32, String) {
    let out = Command::new("psql")
        .arg(conninfo)
        .args(crate::support::PSQL_STRICT)
        .args(["-c", command])
        .output()
        .expect("run psql");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn psql_with_token_in_connection_string() {
    let env = Env::start("fp_pg_psql").await;
    let (st, err) = psql(
        &env.conninfo(Some(&opts(5, "r"))),
        "INSERT INTO t VALUES (5)",
    );
    assert_eq!(st, 0, "{err}");
    let (st, err) = psql(
        &env.conninfo(Some(&opts(4, "r"))),
        "INSERT INTO t VALUES (4)",
    );
    assert_ne!(st, 0);
    assert!(err.contains("ZF001"), "{err}");
    let (st, err) = psql(&env.conninfo(None), "SELECT * FROM t");
    assert_eq!(st, 0, "{err}");
    assert_eq!(env.rows().await, vec![5]);
}

/// A fast-path function call (libpq's large-object calls, here psql's
/// `\lo_import`, several calls in one session) is a write: a current
/// token's calls run, a stale token's first call is refused with `ZF001`
/// and no large object is left of it.
#[tokio::test]
async fn a_stale_fast_path_call_is_refused_with_zf001() {
    let env = Env::start("fp_pg_fastpath").await;
    let dir = TempDir::new("fp_pg_fastpath_file");
    let file = dir.path().join("object");
    std::fs::write(&file, b"a large object").expect("write the file");
    let import = |token: u64| {
        psql(
            &env.conninfo(Some(&opts(token, "r"))),
            &format!("\\lo_import {}", file.display()),
        )
    };
    let objects = || async {
        let n: i64 = direct(&env.db)
            .await
            .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
            .await
            .expect("count large objects")
            .get(0);
        n
    };
    let (st, err) = import(5);
    assert_eq!(st, 0, "the current token's import: {err}");
    assert_eq!(objects().await, 1);
    let (st, err) = import(4);
    assert_ne!(st, 0, "a stale token's import ran");
    assert!(err.contains("ZF001"), "{err}");
    assert_eq!(objects().await, 1, "a stale token's import left an object");
}

/// A v3 startup packet for `user` and `database`.
fn startup_packet(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(3u32 << 16).to_be_bytes());
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

#[tokio::test]
async fn garbage_costs_one_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start("fp_pg_garbage").await;
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0, 0, 0, 2][..],
        &[0xff; 64][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(env.proxy)
            .await
            .expect("connect");
        s.write_all(junk).await.expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    }
    // A message with a length below 4 after a good startup: the client
    // gets a protocol-violation error and the connection ends.
    let mut s = tokio::net::TcpStream::connect(env.proxy)
        .await
        .expect("connect");
    s.write_all(&startup_packet("postgres", &env.db.name))
        .await
        .expect("startup");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    // Trust auth: read up to the first ReadyForQuery.
    while !got.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("server answers startup")
            .expect("read");
        assert!(n > 0, "closed during startup");
        got.extend_from_slice(&chunk[..n]);
    }
    s.write_all(&[b'Q', 0, 0, 0, 2]).await.expect("write");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("connection closed")
        .expect("read");
    assert_eq!(
        rest.first(),
        Some(&b'E'),
        "an ErrorResponse first: {rest:?}"
    );
    assert!(rest.windows(5).any(|w| w == b"08P01"), "{rest:?}");

    // The process survived every one of them.
    let c = env.client(None).await;
    simple(&c, "SELECT 1").await.expect("still serving");
    let c = env.client(Some(&opts(1, "r"))).await;
    simple(&c, "INSERT INTO t VALUES (1)").await.expect("write");
    assert_eq!(env.rows().await, vec![1]);
}

#[tokio::test]
async fn vanished_client_mid_transaction_is_rolled_back_not_left_open() {
    let env = Env::start("fp_pg_vanish").await;
    let old = env.client(Some(&opts(1, "r"))).await;
    // The old block holds a lock every INSERT must wait for.
    simple(
        &old,
        "BEGIN; INSERT INTO t VALUES (1); LOCK TABLE t IN SHARE ROW EXCLUSIVE MODE",
    )
    .await
    .expect("block");
    let new = env.client(Some(&opts(2, "r"))).await;
    let newer = tokio::spawn(async move {
        new.simple_query("INSERT INTO t VALUES (2)")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!newer.is_finished(), "the lock holds the newer write");
    // The old leader dies with its block open: the proxy must close its
    // server connection so Postgres rolls the block back.
    drop(old);
    tokio::time::timeout(Duration::from_secs(5), newer)
        .await
        .expect("the old block was rolled back, releasing its lock")
        .expect("task")
        .expect("newer write");
    assert_eq!(env.rows().await, vec![2]);
}

#[tokio::test]
async fn cancel_request_reaches_the_server() {
    let env = Env::start("fp_pg_cancel").await;
    let c = env.client(None).await;
    let cancel = c.cancel_token();
    let sleeper =
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel
        .cancel_query(NoTls)
        .await
        .expect("cancel through the proxy");
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time")
        .expect("task")
        .expect_err("the query was cancelled");
    assert_eq!(code(&err), "57014", "{err:?}");
}

#[tokio::test]
async fn copy_in_is_a_write() {
    use futures_util::SinkExt;
    let env = Env::start("fp_pg_copy").await;
    let c = env.client(None).await;
    let err = match c.copy_in::<_, bytes::Bytes>("COPY t FROM STDIN").await {
        Ok(_) => panic!("COPY FROM without a token must be refused"),
        Err(e) => e,
    };
    assert_eq!(code(&err), "ZF002", "{err:?}");
    let c = env.client(Some(&opts(1, "r"))).await;
    let mut sink = Box::pin(c.copy_in("COPY t FROM STDIN").await.expect("copy admitted"));
    sink.send(bytes::Bytes::from_static(b"41\n42\n"))
        .await
        .expect("send");
    let n = sink.as_mut().finish().await.expect("finish");
    assert_eq!(n, 2);
    assert_eq!(env.rows().await, vec![41, 42]);
}

#[tokio::test]
async fn pipelined_statements_get_their_own_verdicts() {
    let env = Env::start("fp_pg_pipeline").await;
    let leader = env.client(Some(&opts(5, "r"))).await;
    simple(&leader, "SELECT 1").await.expect("connect");
    let stmt = leader
        .prepare("INSERT INTO t VALUES ($1)")
        .await
        .expect("prepare");
    // tokio-postgres pipelines concurrent queries on one connection.
    let futs = (0..20).map(|i| {
        let (leader, stmt) = (&leader, &stmt);
        async move { leader.execute(stmt, &[&i]).await }
    });
    for r in futures_util::future::join_all(futs).await {
        r.expect("pipelined write admitted");
    }
    let old = env.client(Some(&opts(4, "r"))).await;
    let ostmt = old
        .prepare("INSERT INTO t VALUES ($1)")
        .await
        .expect("prepare");
    let futs = (100..110).map(|i| {
        let (old, ostmt) = (&old, &ostmt);
        async move { old.execute(ostmt, &[&i]).await }
    });
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(code(&r.expect_err("stale")), "ZF001");
    }
    assert_eq!(env.rows().await, (0..20).collect::<Vec<i32>>());
}

#[tokio::test]
async fn graceful_shutdown_closes_idle_sessions_promptly() {
    let mut env = Env::start_as("fp_pg_shutdown", true, |_, _, pg| pg).await;
    let c = env.client(Some(&opts(1, "r"))).await;
    simple(&c, "INSERT INTO t VALUES (1)").await.expect("write");
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let st = env.server.process().terminate();
        (env, st)
    })
    .await
    .expect("terminate");
    let (env, st) = status;
    assert!(st.is_some_and(|s| s.success()), "clean exit: {st:?}");
    // Idle sessions do not hold shutdown for the whole timeout (10s).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let err = simple(&c, "SELECT 1").await.expect_err("session closed");
    assert!(c.is_closed() || err.as_db_error().is_some(), "{err:?}");
    assert_eq!(env.rows().await, vec![1]);
}

/// Guarantee 2 from the table's own history: writers with ever newer
/// tokens take over one after another while the older ones keep writing,
/// in autocommit and in blocks. Every row gets its id from a sequence when
/// the server runs the INSERT, and a commit stamp from a deferred trigger
/// when its transaction commits. If every older write has finished before
/// the first write of a newer token is forwarded (drain), none is forwarded
/// after (fencing), and no block commits once its token is stale, both
/// orders sort the rows by token.
#[tokio::test]
async fn failovers_under_load_never_land_a_stale_write_after_a_newer_one() {
    let env = Env::start("fp_pg_failover").await;
    let writers = failover_campaign(&env.db, &[env.proxy.port()], Duration::ZERO).await;
    let mut refused = 0;
    for w in &writers {
        assert!(
            w.ok > 0 || w.token < WRITERS,
            "the newest writer must get through"
        );
        refused += w.stale;
    }
    assert!(refused > 0, "older writers kept writing and were fenced");
    assert_no_stale_write_after_a_newer_one(&env.db).await;
}

/// `workers = 2`: sessions on the listener's own current-thread runtimes,
/// handed over by the accepting task, answer and fence: the failover
/// campaign's writers (their sessions spread over both threads, each
/// failover's drain waiting across them) land no stale write after a newer
/// one, and a stale write on any session is refused.
#[tokio::test]
async fn session_threads_serve_and_fence() {
    serves_and_fences_with_workers("fp_pg_workers", 2).await;
}

/// `workers = 0`: the same on the process's shared runtime.
#[tokio::test]
async fn sessions_on_the_shared_runtime_serve_and_fence() {
    serves_and_fences_with_workers("fp_pg_shared_rt", 0).await;
}

async fn serves_and_fences_with_workers(prefix: &str, workers: i64) {
    let env = Env::start_with(prefix, |_, _, pg| pg.set("workers", workers)).await;
    let writers = failover_campaign(&env.db, &[env.proxy.port()], Duration::ZERO).await;
    assert!(
        writers.iter().map(|w| w.stale).sum::<u32>() > 0,
        "older writers kept writing and were fenced"
    );
    assert_no_stale_write_after_a_newer_one(&env.db).await;
    let mut old = Vec::new();
    for _ in 0..4 {
        old.push(env.client(Some(&opts(1, "w"))).await);
    }
    let new = env.client(Some(&opts(2, "w"))).await;
    simple(&new, "INSERT INTO t VALUES (2)")
        .await
        .expect("current token admitted");
    for c in &old {
        let err = simple(c, "INSERT INTO t VALUES (1)")
            .await
            .expect_err("stale write must be refused");
        assert_eq!(code(&err), "ZF001", "{err:?}");
    }
    assert_eq!(env.rows().await, vec![2]);
}

/// With `workers`, SIGTERM still closes idle sessions at once (each
/// worker drains its own) and the process exits cleanly.
#[tokio::test]
async fn session_threads_shut_down_promptly() {
    let mut env = Env::start_as("fp_pg_workers_down", true, |_, _, pg| pg.set("workers", 2)).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = env.client(Some(&opts(1, "r"))).await;
        simple(&c, &format!("INSERT INTO t VALUES ({i})"))
            .await
            .expect("write");
        clients.push(c);
    }
    let started = std::time::Instant::now();
    let (env, st) = tokio::task::spawn_blocking(move || {
        let st = env.server.process().terminate();
        (env, st)
    })
    .await
    .expect("terminate");
    assert!(st.is_some_and(|s| s.success()), "clean exit: {st:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for c in &clients {
        let err = simple(c, "SELECT 1").await.expect_err("session closed");
        assert!(c.is_closed() || err.as_db_error().is_some(), "{err:?}");
    }
    assert_eq!(env.rows().await, vec![0, 1, 2]);
}

/// Guarantee 2's drain, forced: an older token's write is still running at
/// the server when a newer token's first write arrives. The newer write
/// must not be forwarded until the older one has finished, so the older
/// row gets the lower id.
#[tokio::test]
async fn newer_token_waits_for_older_write_still_running() {
    let env = Env::start("fp_pg_drain").await;
    direct(&env.db)
        .await
        .batch_execute("CREATE TABLE d (id bigserial PRIMARY KEY, token int NOT NULL)")
        .await
        .expect("table");
    let old = env.client(Some(&opts(1, "d"))).await;
    let new = env.client(Some(&opts(2, "d"))).await;
    // The old write takes its id only after sleeping.
    let slow = tokio::spawn(async move {
        old.simple_query("INSERT INTO d (token) SELECT 1 FROM pg_sleep(0.6)")
            .await
            .map(|_| ())
    });
    newer_write_waits_for(&env, &new, slow, "the older write").await;
}

/// Token 2's write on `new`, sent while `older` (token 1's statement,
/// which writes its row of `d` after sleeping 0.6 s) runs: it must wait at
/// least 300 ms, the older statement must have been admitted, and the
/// older row must get the lower id.
async fn newer_write_waits_for(
    env: &Env,
    new: &Client,
    older: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    what: &str,
) {
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = std::time::Instant::now();
    simple(new, "INSERT INTO d (token) VALUES (2)")
        .await
        .expect("newer write");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the newer write did not wait for {what} ({:?})",
        started.elapsed()
    );
    older
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{what} was not admitted before the newer token: {e}"));
    let tokens: Vec<i32> = direct(&env.db)
        .await
        .query("SELECT token FROM d ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tokens, vec![1, 2]);
}

/// Guarantee 2's drain over a COMMIT: an older token's block has written
/// and its COMMIT is still running at the server (a deferred trigger sleeps
/// at commit, then writes a row) when a newer token's first write arrives.
/// The COMMIT is admitted again on the session's held fence slot (the
/// block wrote under the session's steady write only) and counts as a
/// write in flight, so the newer write waits for it: the commit's row gets
/// the lower id.
#[tokio::test]
async fn newer_token_waits_for_older_commit_still_running() {
    let env = Env::start("fp_pg_drain_commit").await;
    direct(&env.db)
        .await
        .batch_execute(
            "CREATE TABLE d (id bigserial PRIMARY KEY, token int NOT NULL);
             CREATE TABLE w (v int);
             CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(0.6); INSERT INTO d (token) VALUES (1); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON w
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
        )
        .await
        .expect("schema");
    let old = env.client(Some(&opts(1, "d"))).await;
    let new = env.client(Some(&opts(2, "d"))).await;
    simple(&old, "BEGIN; INSERT INTO w VALUES (1)")
        .await
        .expect("the older block's write");
    let slow = tokio::spawn(async move { old.simple_query("COMMIT").await.map(|_| ()) });
    newer_write_waits_for(&env, &new, slow, "the older COMMIT").await;
}

/// Signed tokens through `[[postgres]] verify_key`: the elector's genuine
/// token in the startup options is admitted, a forged one (number raised,
/// signature kept) gets ZF003 and an audit record saying "forged", and so
/// does a plain number when plain tokens are not allowed.
#[tokio::test]
async fn signed_tokens_in_startup_options_are_verified() {
    let mut el = None;
    let env = Env::start_with("fp_pg_signed", |dir, conf, pg| {
        let key = dir.join("elector");
        let (code, _, err) =
            crate::support::run_cli(&["keygen", "--out", &key.display().to_string()], &[]);
        assert_eq!(code, 0, "keygen: {err}");
        el =
            Some(conf.elector(Section::new().set("signing_key", format!("{}.key", key.display()))));
        pg.set("verify_key", format!("{}.pub", key.display()))
    })
    .await;
    let el = el.expect("elector address");
    let resp = reqwest::Client::new()
        .post(format!("http://{el}/v1/leases/signed/acquire"))
        .json(&serde_json::json!({ "holder": "a", "ttl_ms": 60_000 }))
        .send()
        .await
        .expect("elector reachable");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    let token = body["token"].as_str().expect("token").to_owned();
    let (n, sig) = token.split_once('.').expect("signed token");

    let good = env
        .client(Some(&format!(
            "-c fencing.token={token} -c fencing.resource=signed"
        )))
        .await;
    simple(&good, "INSERT INTO t VALUES (1)")
        .await
        .expect("genuine signed token admitted");

    let raised: u64 = n.parse::<u64>().expect("number") + 1;
    let forged = env
        .client(Some(&format!(
            "-c fencing.token={raised}.{sig} -c fencing.resource=signed"
        )))
        .await;
    let err = simple(&forged, "INSERT INTO t VALUES (2)")
        .await
        .expect_err("forged token refused");
    assert_eq!(code(&err), "ZF003", "{err:?}");

    let plain = env.client(Some(&opts(raised + 10, "signed"))).await;
    let err = simple(&plain, "INSERT INTO t VALUES (3)")
        .await
        .expect_err("unsigned token refused");
    assert_eq!(code(&err), "ZF003", "{err:?}");
    assert_eq!(env.rows().await, vec![1]);

    let audit = env.audit_until("signed", "forged").await;
    assert!(audit.contains("postgres"), "{audit}");
}

/// `strict = true`: inside a read-write block even a SELECT is a write,
/// so it needs a current token; outside a block, and in a READ ONLY
/// block, reads stay free.
#[tokio::test]
async fn strict_mode_makes_a_select_inside_begin_a_write() {
    let env = Env::start_with("fp_pg_strict", |_, _, pg| pg.set("strict", true)).await;
    let c = env.client(None).await;
    simple(&c, "SELECT * FROM t")
        .await
        .expect("autocommit read");
    simple(&c, "BEGIN READ ONLY; SELECT * FROM t; COMMIT")
        .await
        .expect("read-only block");
    let err = simple(&c, "BEGIN; SELECT * FROM t")
        .await
        .expect_err("SELECT in a block is a write in strict mode");
    assert_eq!(code(&err), "ZF002", "{err:?}");
    simple(&c, "ROLLBACK").await.expect("rollback");
    simple(&c, "BEGIN").await.expect("begin");
    let err = simple(&c, "SELECT 1")
        .await
        .expect_err("a later SELECT in the block too");
    assert_eq!(code(&err), "ZF002", "{err:?}");
    simple(&c, "ROLLBACK").await.expect("rollback");

    let leader = env.client(Some(&opts(3, "s"))).await;
    simple(
        &leader,
        "BEGIN; SELECT * FROM t; INSERT INTO t VALUES (3); COMMIT",
    )
    .await
    .expect("current token");
    let old = env.client(Some(&opts(2, "s"))).await;
    simple(&old, "BEGIN").await.expect("begin");
    let err = simple(&old, "SELECT * FROM t")
        .await
        .expect_err("stale read in a block");
    assert_eq!(code(&err), "ZF001", "{err:?}");
    simple(&old, "ROLLBACK").await.expect("rollback");
    simple(&old, "SELECT * FROM t")
        .await
        .expect("autocommit read");
    assert_eq!(env.rows().await, vec![3]);
}

/// `fencepost migrate --guard URL`, twice (it is idempotent).
fn install_guard(db: &TestDb) {
    for _ in 0..2 {
        let (code, out, err) = crate::support::run_cli(&["migrate", "--guard", &db.url], &[]);
        assert_eq!(code, 0, "migrate --guard: {out}{err}");
    }
}

/// The shape of a simple query's answer, to compare with Postgres's own.
fn shape(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .map(|m| match m {
            SimpleQueryMessage::Row(r) => format!("row {:?}", r.get(0)),
            SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
            _ => "other".to_string(),
        })
        .collect()
}

async fn guard_mark(db: &TestDb, resource: &str) -> Option<String> {
    direct(db)
        .await
        .query_opt(
            "SELECT token FROM fencepost.marks WHERE resource = $1",
            &[&resource],
        )
        .await
        .expect("read guard marks")
        .map(|r| r.get(0))
}

/// Guard mode: every admitted write runs `fencepost.advance` in its own
/// transaction (simple, extended, in a block), the client sees exactly
/// what Postgres alone would have answered, and when the database's mark
/// is ahead of the proxy's (another proxy admitted a newer token) the
/// write fails with ZF001 raised by Postgres itself and leaves no row.
#[tokio::test]
async fn guard_mode_fences_in_the_database_and_hides_the_guard() {
    let env = Env::start_with("fp_pg_guard", |_, _, pg| pg.set("enforce", "database")).await;
    install_guard(&env.db);
    let c = env.client(Some(&opts(5, "g"))).await;
    let through = simple(&c, "INSERT INTO t VALUES (1) RETURNING v; SELECT 42")
        .await
        .expect("guarded write");
    let alone = direct(&env.db)
        .await
        .simple_query("INSERT INTO t VALUES (1) RETURNING v; SELECT 42")
        .await
        .expect("same write without the proxy");
    assert_eq!(shape(&through), shape(&alone), "the guard's answer leaked");
    // An error position in the client's text ignores the prepended guard.
    let bad = "INSERT INTO t VALUES (1,,2)";
    let pos =
        |e: tokio_postgres::Error| format!("{:?}", e.as_db_error().and_then(|d| d.position()));
    let through = simple(&c, bad).await.expect_err("syntax error");
    let alone = direct(&env.db)
        .await
        .simple_query(bad)
        .await
        .expect_err("syntax error");
    let alone = pos(alone);
    assert!(alone.contains("Original"), "{alone}");
    assert_eq!(pos(through), alone);
    let rows = c
        .query("INSERT INTO t VALUES ($1) RETURNING v", &[&2i32])
        .await
        .expect("extended guarded write");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 2);
    let stmt = c
        .prepare("INSERT INTO t VALUES ($1)")
        .await
        .expect("prepare");
    simple(&c, "BEGIN").await.expect("begin");
    assert_eq!(c.execute(&stmt, &[&3i32]).await.expect("in block"), 1);
    assert_eq!(c.execute(&stmt, &[&4i32]).await.expect("in block"), 1);
    simple(&c, "COMMIT").await.expect("commit");
    assert_eq!(
        guard_mark(&env.db, "g").await.as_deref(),
        Some("00000000000000000005")
    );

    // Another proxy (simulated) has admitted token 9 in the database.
    direct(&env.db)
        .await
        .batch_execute("UPDATE fencepost.marks SET token = '00000000000000000009'")
        .await
        .expect("raise the guard mark");
    let err = simple(&c, "INSERT INTO t VALUES (50)")
        .await
        .expect_err("stale by the guard");
    assert_eq!(code(&err), "ZF001", "{err:?}");
    let m = message(&err);
    assert!(m.contains("g") && m.contains('5') && m.contains('9'), "{m}");
    let err = c
        .execute(&stmt, &[&51i32])
        .await
        .expect_err("extended, stale by the guard");
    assert_eq!(code(&err), "ZF001", "{err:?}");
    let err = simple(&c, "BEGIN; INSERT INTO t VALUES (53); COMMIT")
        .await
        .expect_err("a whole block in one Query");
    assert_eq!(code(&err), "ZF001", "{err:?}");
    simple(&c, "ROLLBACK").await.expect("rollback");
    simple(&c, "BEGIN").await.expect("begin");
    let err = c.execute(&stmt, &[&52i32]).await.expect_err("in a block");
    assert_eq!(code(&err), "ZF001", "{err:?}");
    simple(&c, "ROLLBACK").await.expect("rollback");
    simple(&c, "SELECT 1").await.expect("session still usable");
    // The guard's refusals are audited too (the proxy had admitted them).
    let url = format!(
        "http://{}/v1/audit?kind=refused_write&resource=g",
        env.admin
    );
    let audit = crate::support::eventually(10, || {
        let url = url.clone();
        async move {
            let (status, body) = crate::support::get(&url, None).await;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let n = v.as_array().map_or(0, |a| a.len());
            (status == 200 && n >= 4).then_some(v)
        }
    })
    .await
    .expect("four audit records of the guard's refusals");
    let first = &audit[0];
    assert_eq!(first["reason"], "stale", "{audit}");
    assert_eq!(first["protocol"], "postgres", "{audit}");
    assert_eq!(first["current_token"], 9, "{audit}");
    assert_eq!(first["presented_token"], 5, "{audit}");
    assert!(
        first["detail"]
            .as_str()
            .is_some_and(|d| d.contains("INSERT")),
        "{audit}"
    );

    let newer = env.client(Some(&opts(10, "g"))).await;
    simple(&newer, "INSERT INTO t VALUES (10)")
        .await
        .expect("newer token");
    assert_eq!(
        guard_mark(&env.db, "g").await.as_deref(),
        Some("00000000000000000010")
    );
    let mut expect = vec![1, 1, 2, 3, 4, 10];
    expect.sort();
    assert_eq!(env.rows().await, expect);
}

/// Guarantee 3: two fencepost servers with separate SQLite
/// stores (so neither knows what the other admitted) in front of one
/// database, in guard mode. Writers with ever newer tokens take over
/// through alternating proxies while older ones keep writing, in
/// autocommit and in blocks. Rows get their id when the INSERT runs and a
/// commit stamp from a deferred trigger at COMMIT: in both orders the
/// tokens never go down, because the guard's row lock serializes the
/// transactions of the resource and a stale one fails in Postgres.
#[tokio::test]
async fn two_guard_proxies_never_commit_a_stale_transaction_after_a_newer_one() {
    let env = Env::start_with("fp_pg_guard2", |_, _, pg| pg.set("enforce", "database")).await;
    install_guard(&env.db);
    let dir2 = TempDir::new("fp_pg_guard2b");
    let mut conf2 = Conf::sqlite(dir2.path());
    let proxy2 = conf2.postgres(Section::to("127.0.0.1:5432").set("enforce", "database"));
    let _server2 = InProc::start(conf2).await;
    // Even tokens through the second proxy, odd ones through the first;
    // a pause inside each block lets a newer token overtake it.
    let writers = failover_campaign(
        &env.db,
        &[proxy2.port(), env.proxy.port()],
        Duration::from_millis(5),
    )
    .await;
    let (mut refused, mut refused_by_guard) = (0, 0);
    for w in &writers {
        assert!(
            w.ok > 0 || w.token < WRITERS,
            "the newest writer must get through"
        );
        refused += w.stale;
        refused_by_guard += w.by_guard;
    }
    assert!(refused > 0, "older writers kept writing and were fenced");
    assert!(
        refused_by_guard > 0,
        "no refusal came from the database guard, so the test did not exercise it"
    );
    assert_no_stale_write_after_a_newer_one(&env.db).await;
    assert_eq!(
        guard_mark(&env.db, "h").await.as_deref(),
        Some(format!("{WRITERS:020}").as_str())
    );
}

/// Runs pgbench through the proxy with the token in PGOPTIONS; returns
/// (success, stdout + stderr).
async fn pgbench(env: &Env, token: u64, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("pgbench");
    cmd.args(args)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", env.proxy.port().to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", &env.db.name)
        .env(
            "PGOPTIONS",
            format!("-c fencing.token={token} -c fencing.resource=bench"),
        );
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("pgbench task")
        .expect("pgbench runs (is postgresql-client installed?)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// pgbench, a real libpq client, through the real binary: initialization
/// (DDL, COPY, VACUUM) and the TPC-B-like script in the simple, extended
/// and prepared protocols, four clients each, with no failed transaction;
/// then an older token's run fails with ZF001.
#[tokio::test]
async fn pgbench_runs_through_the_proxy_in_every_protocol_mode() {
    let env = Env::start("fp_pg_bench").await;
    let (ok, out) = pgbench(&env, 5, &["-i", "-q"]).await;
    assert!(ok, "pgbench -i failed:\n{out}\n{}", env.server.log_text());
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out) = pgbench(&env, 5, &["-M", mode, "-c", "4", "-t", "200", "-n"]).await;
        assert!(ok, "pgbench -M {mode} failed:\n{out}");
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "-M {mode}:\n{out}"
        );
        assert!(
            out.contains("number of failed transactions: 0 "),
            "-M {mode}:\n{out}"
        );
    }
    let (ok, out) = pgbench(&env, 4, &["-M", "prepared", "-c", "1", "-t", "5", "-n"]).await;
    assert!(!ok, "a stale pgbench run must fail:\n{out}");
    assert!(out.contains("ZF001") || out.contains("stale"), "{out}");
    let history: i64 = direct(&env.db)
        .await
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .expect("history")
        .get(0);
    assert_eq!(history, 3 * 800, "the stale run left rows behind");
}

/// sqlx, with its cached named prepared statements (extended protocol):
/// the token from the connect options' startup `options`; a current token
/// writes, the same prepared statement with an older token gets ZF001 and
/// leaves no row, and the connection stays usable.
#[tokio::test]
async fn sqlx_prepared_statements_are_fenced() {
    use sqlx::postgres::PgConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let env = Env::start("fp_pg_sqlx").await;
    let port = env.proxy.port();
    let db = env.db.name.clone();
    let connect = |token: u64| {
        let opts = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("postgres")
            .database(&db)
            .options([
                ("fencing.token", token.to_string()),
                ("fencing.resource", "sq".to_string()),
            ]);
        async move { opts.connect().await }
    };
    let mut new = connect(5).await.expect("sqlx connects through the proxy");
    for v in [1i32, 2, 3] {
        sqlx::query("INSERT INTO t VALUES ($1)")
            .bind(v)
            .execute(&mut new)
            .await
            .expect("prepared write with the current token");
    }
    let mut old = connect(4).await.expect("connect");
    let err = sqlx::query("INSERT INTO t VALUES ($1)")
        .bind(40i32)
        .execute(&mut old)
        .await
        .expect_err("stale prepared write");
    let code = err
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("ZF001"), "{err:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mut old)
        .await
        .expect("reads still pass");
    assert_eq!(n, 3);
    let mut tx = new.begin().await.expect("begin");
    sqlx::query("INSERT INTO t VALUES ($1)")
        .bind(4i32)
        .execute(&mut *tx)
        .await
        .expect("write in a transaction");
    tx.commit().await.expect("commit");
    assert_eq!(env.rows().await, vec![1, 2, 3, 4]);
}

/// psycopg 3 from PyPI (installed here when missing; CI installs it in
/// .ci/run): a stale write raises an error whose SQLSTATE is ZF001 and
/// lands nothing, a current one commits.
#[tokio::test]
async fn psycopg_sees_zf001_for_a_stale_write() {
    let env = Env::start("fp_pg_psycopg").await;
    let have = Command::new("python3")
        .args(["-c", "import psycopg"])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "psycopg[binary]"])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "psycopg is required and `python3 -m pip install 'psycopg[binary]'` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let script = r#"
import sys, psycopg
base = sys.argv[1]
with psycopg.connect(base + " options='-c fencing.token=5 -c fencing.resource=py'") as new:
    new.execute("INSERT INTO t VALUES (%s)", (5,))
    new.commit()
old = psycopg.connect(base + " options='-c fencing.token=4 -c fencing.resource=py'")
try:
    old.execute("INSERT INTO t VALUES (%s)", (4,))
    old.commit()
    print("stale write was accepted")
    sys.exit(1)
except psycopg.Error as e:
    print("sqlstate", e.sqlstate)
    old.rollback()
    sys.exit(0 if e.sqlstate == "ZF001" else 1)
"#;
    let base = format!(
        "host=127.0.0.1 port={} dbname={} user=postgres",
        env.proxy.port(),
        env.db.name
    );
    let out = Command::new("python3")
        .args(["-c", script, &base])
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "psycopg script failed:\n{text}");
    assert!(text.contains("sqlstate ZF001"), "{text}");
    assert_eq!(env.rows().await, vec![5]);
}

/// TLS: with `tls_cert`/`tls_key` (a self-signed certificate made here),
/// psql with `sslmode=require` gets an encrypted session through which
/// fencing works as over plain TCP; a client that does not ask for TLS is
/// refused (`28000`), as by a Postgres with only `hostssl` lines.
#[tokio::test]
async fn psql_over_tls_with_sslmode_require() {
    let env = Env::start_with("fp_pg_tls", |dir, _, pg| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
        pg.set("tls_cert", cert.display().to_string())
            .set("tls_key", key.display().to_string())
    })
    .await;
    let run = |conninfo: String, sql: &str| {
        let out = Command::new("psql")
            .arg(conninfo)
            .args(crate::support::PSQL_STRICT)
            .args(["-c", sql])
            .output()
            .expect("run psql");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let tls = |o: Option<&str>| format!("{} sslmode=require", env.conninfo(o));
    let (st, out) = run(tls(None), "\\conninfo");
    assert_eq!(st, 0, "{out}\n{}", env.server.log_text());
    assert!(out.contains("SSL connection"), "not encrypted: {out}");
    let (st, out) = run(tls(Some(&opts(5, "r"))), "INSERT INTO t VALUES (5)");
    assert_eq!(st, 0, "{out}");
    let (st, out) = run(tls(Some(&opts(4, "r"))), "INSERT INTO t VALUES (4)");
    assert_ne!(st, 0);
    assert!(out.contains("ZF001"), "{out}");
    let plain = format!("{} sslmode=disable", env.conninfo(None));
    let (st, out) = run(plain, "SELECT count(*) FROM t");
    assert_ne!(st, 0, "plaintext must be refused: {out}");
    assert!(out.contains("TLS connections only"), "{out}");
    assert_eq!(env.rows().await, vec![5]);
}

/// `max_frame_bytes`: a message above it costs that one connection, with
/// a protocol-violation error; other sessions go on.
#[tokio::test]
async fn messages_above_max_frame_bytes_cost_one_connection() {
    let env = Env::start_with("fp_pg_maxframe", |_, _, pg| pg.set("max_frame_bytes", 4096)).await;
    let other = env.client(None).await;
    let c = env.client(None).await;
    let big = format!("SELECT '{}'", "x".repeat(8192));
    let err = simple(&c, &big).await.expect_err("too big");
    assert!(
        code(&err) == "08P01" || c.is_closed(),
        "expected a protocol violation: {err:?}"
    );
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "connection ended"
    );
    simple(&other, "SELECT 1")
        .await
        .expect("other sessions unaffected");
}

/// pgbench in guard mode: initialization (its VACUUM cannot share a
/// transaction, so the proxy alone fences it) and every protocol mode run
/// with the guard hidden from pgbench; once the database's mark is ahead
/// (another proxy admitted a newer token), the guard itself fails the run.
#[tokio::test]
async fn pgbench_in_guard_mode() {
    let env = Env::start_with("fp_pg_benchguard", |_, _, pg| pg.set("enforce", "database")).await;
    install_guard(&env.db);
    let (ok, out) = pgbench(&env, 5, &["-i", "-q"]).await;
    assert!(ok, "pgbench -i failed:\n{out}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out) = pgbench(&env, 5, &["-M", mode, "-c", "4", "-t", "100", "-n"]).await;
        assert!(ok, "pgbench -M {mode} failed:\n{out}");
        assert!(
            out.contains("number of failed transactions: 0 "),
            "-M {mode}:\n{out}"
        );
    }
    assert_eq!(
        guard_mark(&env.db, "bench").await.as_deref(),
        Some("00000000000000000005")
    );
    direct(&env.db)
        .await
        .batch_execute("UPDATE fencepost.marks SET token = '00000000000000000009'")
        .await
        .expect("raise the guard mark");
    let (ok, out) = pgbench(&env, 5, &["-M", "extended", "-c", "1", "-t", "5", "-n"]).await;
    assert!(!ok, "a run stale in the database must fail:\n{out}");
    assert!(out.contains("database guard"), "{out}");
    let history: i64 = direct(&env.db)
        .await
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .expect("history")
        .get(0);
    assert_eq!(history, 3 * 400, "the stale run left rows behind");
}

/// Writers in a failover campaign.
const WRITERS: u64 = 6;

/// What one writer of [`failover_campaign`] saw.
struct Writer {
    token: u64,
    ok: u32,
    /// Refused with ZF001.
    stale: u32,
    /// Of those, refused by the database guard.
    by_guard: u32,
}

/// The failover campaign, on a fresh history table `h`: writers with ever
/// newer tokens 1..=WRITERS take over one after another (150 ms apart)
/// while the older ones keep writing for 600 ms each, in autocommit in the
/// simple and the extended protocol and in blocks of two writes
/// (`pause_in_block` between them). Writer `token` goes through proxy
/// `ports[token % ports.len()]`. Every row gets its id from a sequence
/// when the server runs the INSERT, and a commit stamp from a deferred
/// trigger when its transaction commits
/// (see [`assert_no_stale_write_after_a_newer_one`]).
async fn failover_campaign(db: &TestDb, ports: &[u16], pause_in_block: Duration) -> Vec<Writer> {
    direct(db)
        .await
        .batch_execute(
            "CREATE TABLE h (id bigserial PRIMARY KEY, token int NOT NULL, committed bigint);
             CREATE SEQUENCE commits;
             -- A deferred trigger runs at COMMIT: it stamps commit order.
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
    let mut tasks = Vec::new();
    for token in 1..=WRITERS {
        let port = ports[token as usize % ports.len()];
        let conninfo = format!(
            "host=127.0.0.1 port={port} dbname={} user=postgres options='{}'",
            db.name,
            opts(token, "h")
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150 * token)).await;
            let (c, conn) = tokio_postgres::connect(&conninfo, NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let stmt = c
                .prepare("INSERT INTO h (token) VALUES ($1)")
                .await
                .expect("prepare");
            let mut w = Writer {
                token,
                ok: 0,
                stale: 0,
                by_guard: 0,
            };
            let until = std::time::Instant::now() + Duration::from_millis(600);
            let mut i = 0u32;
            while std::time::Instant::now() < until {
                i += 1;
                // Rotate through autocommit in the simple and the
                // extended protocol, and blocks of two writes.
                let r = match i % 3 {
                    0 => c
                        .simple_query(&format!("INSERT INTO h (token) VALUES ({token})"))
                        .await
                        .map(|_| ()),
                    1 => c.execute(&stmt, &[&(token as i32)]).await.map(|_| ()),
                    _ => {
                        let block = async {
                            c.batch_execute("BEGIN").await?;
                            c.execute(&stmt, &[&(token as i32)]).await?;
                            if !pause_in_block.is_zero() {
                                tokio::time::sleep(pause_in_block).await;
                            }
                            c.execute(&stmt, &[&(token as i32)]).await?;
                            c.batch_execute("COMMIT").await
                        };
                        let r = block.await;
                        // A refused write leaves the block failed; a
                        // refused COMMIT has already ended it.
                        let _ = c.batch_execute("ROLLBACK").await;
                        r
                    }
                };
                match r {
                    Ok(()) => w.ok += 1,
                    Err(e) if code(&e) == "ZF001" => {
                        w.stale += 1;
                        if message(&e).contains("database guard") {
                            w.by_guard += 1;
                        }
                    }
                    Err(e) => panic!("token {token}: unexpected error {e:?}"),
                }
            }
            w
        }));
    }
    let mut writers = Vec::new();
    for t in tasks {
        writers.push(t.await.expect("writer"));
    }
    writers
}

/// Reads the history table `h` (one row per landed write, with its token
/// and commit order) and fails if any write landed, in insertion order or
/// in commit order, after a write with a newer token.
async fn assert_no_stale_write_after_a_newer_one(db: &TestDb) {
    let rows: Vec<(i64, i32, Option<i64>)> = direct(db)
        .await
        .query("SELECT id, token, committed FROM h ORDER BY id", &[])
        .await
        .expect("history")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(!rows.is_empty(), "no write landed at all");
    let mut highest = 0;
    for (id, token, _) in &rows {
        assert!(
            *token >= highest,
            "row {id} with token {token} was written after a write with token {highest}"
        );
        highest = *token;
    }
    let mut by_commit = rows.clone();
    by_commit.sort_by_key(|r| r.2);
    let mut highest = 0;
    for (id, token, committed) in &by_commit {
        assert!(
            *token >= highest,
            "row {id} with token {token} committed (#{committed:?}) after a write with token {highest}"
        );
        highest = *token;
    }
}
