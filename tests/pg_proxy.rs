//! End-to-end tests of the Postgres fencing proxy: the real `fencepost
//! serve` binary between real clients (psql, tokio-postgres) and the
//! machine's Postgres. Every assertion about what landed is made from the
//! table itself, read directly from Postgres, not through the proxy.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::{free_addr, wait_port, Server, TempDir, TestDb};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

struct Env {
    _dir: TempDir,
    server: Server,
    db: TestDb,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Env {
    /// A fresh database with table `t(v int)`, and a proxy in front of it.
    async fn start(prefix: &str) -> Env {
        let db = TestDb::create(prefix).await;
        let direct = direct(&db).await;
        direct
            .batch_execute("CREATE TABLE t (v int)")
            .await
            .expect("create table");
        let dir = TempDir::new(prefix);
        let proxy = free_addr();
        let admin = free_addr();
        let config = format!(
            r#"store = "sqlite://{}/fencepost.db"
[admin]
listen = "{admin}"
[[postgres]]
listen = "{proxy}"
upstream = "127.0.0.1:5432"
"#,
            dir.path().display()
        );
        let server = Server::start(dir.path(), &config);
        wait_port(proxy).await;
        Env {
            _dir: dir,
            server,
            db,
            proxy,
            admin,
        }
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

async fn direct(db: &TestDb) -> Client {
    let (c, conn) = tokio_postgres::connect(&db.url, NoTls)
        .await
        .expect("connect directly");
    tokio::spawn(conn);
    c
}

fn opts(token: u64, resource: &str) -> String {
    format!("-c fencing.token={token} -c fencing.resource={resource}")
}

/// The SQLSTATE of a failed statement.
fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a server error: {e}"))
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
    let url = format!("http://{}/v1/audit?resource=r", env.admin);
    let audit = support::eventually(10, || {
        let url = url.clone();
        async move {
            let (status, body) = support::get(&url, None).await;
            (status == 200 && body.contains("stale")).then_some(body)
        }
    })
    .await
    .expect("audit record of the refusal");
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

#[tokio::test]
async fn psql_with_token_in_connection_string() {
    let env = Env::start("fp_pg_psql").await;
    let run = |conninfo: String, sql: &'static str| {
        let out = Command::new("psql")
            .arg(conninfo)
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "VERBOSITY=verbose",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (st, err) = run(
        env.conninfo(Some(&opts(5, "r"))),
        "INSERT INTO t VALUES (5)",
    );
    assert_eq!(st, 0, "{err}");
    let (st, err) = run(
        env.conninfo(Some(&opts(4, "r"))),
        "INSERT INTO t VALUES (4)",
    );
    assert_ne!(st, 0);
    assert!(err.contains("ZF001"), "{err}");
    let (st, err) = run(env.conninfo(None), "SELECT * FROM t");
    assert_eq!(st, 0, "{err}");
    assert_eq!(env.rows().await, vec![5]);
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
    let mut env = Env::start("fp_pg_shutdown").await;
    let c = env.client(Some(&opts(1, "r"))).await;
    simple(&c, "INSERT INTO t VALUES (1)").await.expect("write");
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let st = env.server.terminate();
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

#[test]
fn guard_mode_refuses_to_start_rather_than_run_weaker() {
    let dir = TempDir::new("fp_pg_guard");
    let config = dir.path().join("fencepost.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"sqlite://{}/fencepost.db\"\n[[postgres]]\nlisten = \"{}\"\nupstream = \"127.0.0.1:5432\"\nenforce = \"database\"\n",
            dir.path().display(),
            free_addr()
        ),
    )
    .expect("write config");
    let out = Command::new(support::bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enforce"), "{err}");
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
    direct(&env.db)
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
    const WRITERS: u64 = 6;
    let mut tasks = Vec::new();
    for token in 1..=WRITERS {
        let conninfo = env.conninfo(Some(&opts(token, "h")));
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
            let (mut ok, mut stale) = (0u32, 0u32);
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
                    Ok(()) => ok += 1,
                    Err(e) if code(&e) == "ZF001" => stale += 1,
                    Err(e) => panic!("token {token}: unexpected error {e:?}"),
                }
            }
            (token, ok, stale)
        }));
    }
    let mut refused = 0;
    for t in tasks {
        let (token, ok, stale) = t.await.expect("writer");
        assert!(
            ok > 0 || token < WRITERS,
            "the newest writer must get through"
        );
        refused += stale;
    }
    assert!(refused > 0, "older writers kept writing and were fenced");
    let rows: Vec<(i64, i32, i64)> = direct(&env.db)
        .await
        .query("SELECT id, token, committed FROM h ORDER BY id", &[])
        .await
        .expect("history")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(!rows.is_empty());
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
            "row {id} with token {token} committed (#{committed}) after a write with token {highest}"
        );
        highest = *token;
    }
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
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = std::time::Instant::now();
    simple(&new, "INSERT INTO d (token) VALUES (2)")
        .await
        .expect("newer write");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the newer write did not wait for the older one ({:?})",
        started.elapsed()
    );
    slow.await
        .expect("task")
        .expect("older write admitted before the newer token");
    let rows: Vec<(i64, i32)> = direct(&env.db)
        .await
        .query("SELECT id, token FROM d ORDER BY id", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2]);
}
