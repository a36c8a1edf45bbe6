//! End-to-end tests of what the Postgres fencing proxy must relay as
//! Postgres itself would: password authentication (cleartext, MD5,
//! SCRAM-SHA-256) against a private cluster, and COPY out, notices and
//! notifications against the machine's Postgres, for tokio-postgres and
//! psql alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{code, free_port, opts, Conf, Section, Served, TempDir, TestDb};
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{AsyncMessage, Client, NoTls};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Upper bound on any one client operation (connect, statement, psql run).
const STEP: Duration = Duration::from_secs(20);

/// A private Postgres cluster, run as the `postgres` user in a temp dir
/// under /tmp; stopped (immediate) and removed on drop, also on panic.
struct Cluster {
    dir: PathBuf,
    port: u16,
    started: bool,
}

impl Cluster {
    /// initdb with password auth on TCP, `hba` as the whole pg_hba.conf,
    /// then start on a free port with its socket in the cluster's dir.
    fn start(hba: &str) -> Cluster {
        let dir = PathBuf::from(format!(
            "/tmp/fp-pgc-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let mut c = Cluster {
            dir,
            port: free_port(),
            started: false,
        };
        run_ok(Command::new("chown").arg("postgres:postgres").arg(&c.dir));
        run_ok(as_postgres("initdb").args([
            "-D",
            &c.data(),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-U",
            "postgres",
        ]));
        // pg_hba.conf: the first matching line wins; local (socket) stays
        // trust for the test's own setup connection.
        std::fs::write(c.dir.join("data/pg_hba.conf"), hba).expect("write pg_hba.conf");
        let log = c.dir.join("server.log");
        run_ok(as_postgres("pg_ctl").args([
            "-D",
            &c.data(),
            "-l",
            &log.display().to_string(),
            "-t",
            "60",
            "-o",
            &format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c log_connections=on",
                c.port,
                c.dir.display()
            ),
            "-w",
            "start",
        ]));
        c.started = true;
        c
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A superuser connection over the Unix socket (trust), not through
    /// the proxy.
    async fn admin(&self) -> Client {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        );
        let (c, conn) = tokio::time::timeout(STEP, tokio_postgres::connect(&conninfo, NoTls))
            .await
            .expect("connect to the private cluster in time")
            .expect("connect to the private cluster over its socket");
        tokio::spawn(conn);
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let _ = as_postgres("pg_ctl")
                .args(["-D", &self.data(), "-m", "immediate", "-t", "30", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Postgres server binary run as the `postgres` user (initdb refuses
/// root).
fn as_postgres(tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/{tool}"));
    c.current_dir("/tmp");
    c
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fencepost server (in-process) with one `[[postgres]]` proxy in front
/// of `upstream`, and an admin API.
async fn proxy_for(dir: &Path, upstream: SocketAddr) -> (Served, SocketAddr) {
    let mut conf = Conf::sqlite(dir);
    conf.admin(Section::new());
    let proxy = conf.postgres(Section::to(upstream.to_string()));
    (Served::start(false, dir, conf).await, proxy)
}

/// Runs psql with `conninfo` and `-c` commands, bounded; returns (exit
/// code, stdout, stderr).
async fn psql(conninfo: &str, password: Option<&str>, commands: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.arg(conninfo)
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGPASSFILE", "/dev/null")
        .env_remove("PGPASSWORD")
        .kill_on_drop(true);
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = tokio::time::timeout(STEP, cmd.output())
        .await
        .expect("psql finished in time")
        .expect("run psql");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Connects with tokio-postgres and hands the connection's asynchronous
/// messages (notices, notifications) to the returned channel.
async fn connect_with_messages(
    conninfo: &str,
) -> Result<(Client, UnboundedReceiver<AsyncMessage>), tokio_postgres::Error> {
    let (client, mut conn) = tokio::time::timeout(STEP, tokio_postgres::connect(conninfo, NoTls))
        .await
        .expect("connect (or refusal) in time")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    Ok((client, rx))
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    connect_with_messages(conninfo).await.map(|(c, _)| c)
}

async fn next_message(rx: &mut UnboundedReceiver<AsyncMessage>, what: &str) -> AsyncMessage {
    tokio::time::timeout(STEP, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {STEP:?}"))
        .unwrap_or_else(|| panic!("connection ended before the {what}"))
}

#[tokio::test]
async fn password_md5_and_scram_authentication_pass_through() {
    let cluster = Cluster::start(
        "local all all trust\n\
         host all u_md5 127.0.0.1/32 md5\n\
         host all u_plain 127.0.0.1/32 password\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    );
    let admin = cluster.admin().await;
    admin
        .batch_execute(
            "CREATE ROLE u_scram LOGIN PASSWORD 'pw-scram';
             SET password_encryption = 'md5';
             CREATE ROLE u_md5 LOGIN PASSWORD 'pw-md5';
             RESET password_encryption;
             CREATE ROLE u_plain LOGIN PASSWORD 'pw-plain';
             CREATE TABLE t (who text, v int);
             GRANT SELECT, INSERT ON t TO u_scram, u_md5, u_plain;
             SELECT pg_reload_conf();",
        )
        .await
        .expect("roles and table");
    // The server really holds an MD5 verifier for u_md5 (else it would
    // answer the md5 line with SCRAM) and SCRAM for the others.
    let verifiers: Vec<(String, String)> = admin
        .query(
            "SELECT rolname::text, rolpassword FROM pg_authid \
             WHERE rolname IN ('u_scram', 'u_md5', 'u_plain') ORDER BY rolname",
            &[],
        )
        .await
        .expect("read verifiers")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kinds: Vec<(&str, &str)> = verifiers
        .iter()
        .map(|(n, v)| {
            let kind = if v.starts_with("SCRAM-SHA-256$") {
                "scram"
            } else if v.starts_with("md5") && v.len() == 35 {
                "md5"
            } else {
                "other"
            };
            (n.as_str(), kind)
        })
        .collect();
    assert_eq!(
        kinds,
        vec![("u_md5", "md5"), ("u_plain", "scram"), ("u_scram", "scram")],
        "{verifiers:?}"
    );

    let dir = TempDir::new("fp-pgc-auth");
    let (server, proxy) = proxy_for(dir.path(), cluster.addr()).await;
    let conninfo = |user: &str, password: &str, o: Option<&str>| {
        let mut s = format!(
            "host=127.0.0.1 port={} dbname=postgres user={user} password={password} connect_timeout=10",
            proxy.port()
        );
        if let Some(o) = o {
            s.push_str(&format!(" options='{o}'"));
        }
        s
    };

    let roles = [
        ("u_scram", "pw-scram", "scram-sha-256"),
        ("u_md5", "pw-md5", "md5"),
        ("u_plain", "pw-plain", "password"),
    ];
    for (user, password, method) in roles {
        let resource = format!("r_{user}");

        // tokio-postgres: the right password logs in; a fenced write with
        // a token lands, one without is refused by the proxy.
        let c = connect(&conninfo(user, password, Some(&opts(1, &resource))))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{user} ({method}) through the proxy: {e:?}\n{}\n{}",
                    server.log_text(),
                    cluster.log_text()
                )
            });
        let me: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("whoami")
            .get(0);
        assert_eq!(me, user);
        c.simple_query(&format!("INSERT INTO t VALUES ('{user}', 1)"))
            .await
            .unwrap_or_else(|e| panic!("{user}: fenced write with token 1: {e:?}"));
        let bare = connect(&conninfo(user, password, None))
            .await
            .expect("log in without a token");
        let err = bare
            .simple_query(&format!("INSERT INTO t VALUES ('{user}', 0)"))
            .await
            .expect_err("a write without a token is refused");
        assert_eq!(code(&err), "ZF002", "{user}: {err:?}");

        // Wrong password: the server's own refusal, relayed.
        let err = match connect(&conninfo(user, "wrong", None)).await {
            Ok(_) => panic!("{user} ({method}) logged in with a wrong password"),
            Err(e) => e,
        };
        assert_eq!(code(&err), "28P01", "{user} ({method}): {err:?}");
        let db = err.as_db_error().expect("server error");
        assert_eq!(db.severity(), "FATAL");
        assert_eq!(
            db.message(),
            format!("password authentication failed for user \"{user}\""),
        );

        // psql, password from PGPASSWORD.
        let psql_conn = format!(
            "host=127.0.0.1 port={} dbname=postgres user={user} options='{}'",
            proxy.port(),
            opts(2, &resource)
        );
        let (st, out, err) = psql(
            &psql_conn,
            Some(password),
            &[
                "SELECT current_user",
                &format!("INSERT INTO t VALUES ('{user}', 2)"),
            ],
        )
        .await;
        assert_eq!(st, 0, "psql as {user} ({method}): {out}\n{err}");
        assert!(out.contains(user) && out.contains("INSERT 0 1"), "{out}");
        let (st, out, err) = psql(&psql_conn, Some("wrong"), &["SELECT 1"]).await;
        assert_eq!(st, 2, "psql with a wrong password: {out}\n{err}");
        assert!(
            err.contains(&format!(
                "FATAL:  password authentication failed for user \"{user}\""
            )),
            "{err}"
        );
        // A token older than the one admitted is stale for this resource.
        let (st, _, err) = psql(
            &format!(
                "host=127.0.0.1 port={} dbname=postgres user={user} options='{}'",
                proxy.port(),
                opts(1, &resource)
            ),
            Some(password),
            &[
                "\\set VERBOSITY verbose",
                &format!("INSERT INTO t VALUES ('{user}', 3)"),
            ],
        )
        .await;
        assert_ne!(st, 0, "a stale write through psql must fail");
        assert!(err.contains("ERROR:  ZF001"), "{err}");
    }

    // The server says which method authenticated each login.
    let log = cluster.log_text();
    for (user, _, method) in roles {
        assert!(
            log.contains(&format!(
                "connection authenticated: identity=\"{user}\" method={method}"
            )),
            "{user} not authenticated by {method}:\n{log}"
        );
        // Both refusals (tokio-postgres, psql) were the server's own.
        let refused = format!("FATAL:  password authentication failed for user \"{user}\"");
        assert_eq!(
            log.matches(&refused).count(),
            2,
            "{user}: server-side refusals:\n{log}"
        );
    }

    let rows: Vec<(String, i32)> = admin
        .query("SELECT who, v FROM t ORDER BY who, v", &[])
        .await
        .expect("read table")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(String, i32)> = ["u_md5", "u_plain", "u_scram"]
        .iter()
        .flat_map(|u| [(u.to_string(), 1), (u.to_string(), 2)])
        .collect();
    assert_eq!(rows, want);
}

#[tokio::test]
async fn copy_out_notices_and_notifications_pass_through() {
    let db = TestDb::create("fp_clients").await;
    let (direct, conn) = tokio_postgres::connect(&db.url, NoTls)
        .await
        .expect("connect directly");
    tokio::spawn(conn);
    direct
        .batch_execute(
            "CREATE TABLE t (v int, s text);
             INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 5000) g;
             INSERT INTO t VALUES (5001, E'tab\\there'), (5002, NULL);",
        )
        .await
        .expect("create table");
    let mut expected: String = (1..=5000).map(|g| format!("{g}\trow {g}\n")).collect();
    expected.push_str("5001\ttab\\there\n5002\t\\N\n");

    let dir = TempDir::new("fp-pgc-copy");
    let (server, proxy) = proxy_for(dir.path(), "127.0.0.1:5432".parse().unwrap()).await;
    let conninfo = |o: Option<&str>| {
        let mut s = format!(
            "host=127.0.0.1 port={} dbname={} user=postgres connect_timeout=10",
            proxy.port(),
            db.name
        );
        if let Some(o) = o {
            s.push_str(&format!(" options='{o}'"));
        }
        s
    };

    // COPY out is a read: no token needed, every byte relayed.
    let (c, mut messages) = connect_with_messages(&conninfo(None))
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {e}\n{}", server.log_text()));
    let copied = tokio::time::timeout(STEP, async {
        let stream = c.copy_out("COPY t TO STDOUT").await.expect("copy out");
        let chunks: Vec<bytes::Bytes> = stream
            .map(|r| r.expect("copy data"))
            .collect::<Vec<_>>()
            .await;
        chunks.concat()
    })
    .await
    .expect("COPY out finished in time");
    assert_eq!(String::from_utf8(copied).expect("utf-8"), expected);
    // The session is in sync afterwards.
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("read after COPY")
        .get(0);
    assert_eq!(n, 5002);
    let (st, out, err) = psql(&conninfo(None), None, &["COPY t TO STDOUT"]).await;
    assert_eq!(st, 0, "{err}");
    assert_eq!(out, expected, "psql COPY TO STDOUT");

    // A notice raised by a (fenced) DO block reaches the client.
    let notice_sql = "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$";
    let err = c
        .batch_execute(notice_sql)
        .await
        .expect_err("DO is a write");
    assert_eq!(code(&err), "ZF002", "{err:?}");
    assert!(
        messages.try_recv().is_err(),
        "a refused DO raised nothing upstream"
    );
    let (w, mut w_messages) = connect_with_messages(&conninfo(Some(&opts(1, "r"))))
        .await
        .expect("connect with token");
    w.batch_execute(notice_sql)
        .await
        .expect("DO with a token is admitted");
    match next_message(&mut w_messages, "notice").await {
        AsyncMessage::Notice(n) => {
            assert_eq!(n.severity(), "NOTICE");
            assert_eq!(n.code().code(), "00000");
            assert_eq!(n.message(), "hello 42");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
    let (st, _, err) = psql(&conninfo(Some(&opts(1, "r"))), None, &[notice_sql]).await;
    assert_eq!(st, 0, "{err}");
    assert!(err.contains("NOTICE:  hello 42"), "psql stderr: {err}");

    // LISTEN on one proxied connection, NOTIFY from another: the
    // notification arrives at the idle listener with its payload intact.
    let payload = "héllo, wörld 'quoted' & \\ 42";
    let notify_sql = format!("NOTIFY fp_chan, '{}'", payload.replace('\'', "''"));
    let (listener, mut l_messages) = connect_with_messages(&conninfo(None))
        .await
        .expect("listener connects");
    listener
        .batch_execute("LISTEN fp_chan")
        .await
        .expect("LISTEN is a read");
    let notifier_pid: i32 = w
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("notifier pid")
        .get(0);
    w.batch_execute(&notify_sql).await.expect("NOTIFY");
    match next_message(&mut l_messages, "notification").await {
        AsyncMessage::Notification(n) => {
            assert_eq!(n.channel(), "fp_chan");
            assert_eq!(n.payload(), payload);
            assert_eq!(n.process_id(), notifier_pid);
        }
        other => panic!("expected a notification, got {other:?}"),
    }
    // From psql too, which the listener also hears.
    let (st, out, err) = psql(
        &conninfo(Some(&opts(1, "r"))),
        None,
        &["LISTEN fp_chan", &notify_sql],
    )
    .await;
    assert_eq!(st, 0, "{err}");
    assert!(
        out.contains(&format!(
            "Asynchronous notification \"fp_chan\" with payload \"{payload}\" received"
        )),
        "psql: {out}\n{err}"
    );
    match next_message(&mut l_messages, "second notification").await {
        AsyncMessage::Notification(n) => {
            assert_eq!(n.channel(), "fp_chan");
            assert_eq!(n.payload(), payload);
            assert_ne!(n.process_id(), notifier_pid);
        }
        other => panic!("expected a notification, got {other:?}"),
    }
    // The listener's session still answers.
    let one: i32 = listener
        .query_one("SELECT 1", &[])
        .await
        .expect("listener still usable")
        .get(0);
    assert_eq!(one, 1);
}
