//! TLS from fencepost to its upstreams, end to end: an `https://` HTTP
//! upstream on both data paths, and `upstream_sslmode` towards a
//! Postgres that speaks only TLS (the machine's Postgres behind a TLS
//! front, `support::tls_front::PgTlsFront`, since its own configuration is not
//! the tests' to change), with real clients (reqwest, tokio-postgres).
//! What must be refused (an untrusted CA, a certificate for another
//! name, a server that will not do TLS) is refused, and says why.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::support::tls_front::{Leaf, PgTlsFront, SslAnswer, TestCa};
use crate::support::{
    client, code, direct, opts, send, Conf, Resp, Section, Served, TempDir, TestDb, Upstream,
};

const DATA_PATHS: [&str; 2] = ["relay", "hyper"];

// ------------------------------------------------------------- HTTP upstream

/// A proxy in front of `up` at `url`, trusting `ca_file` (or the
/// system's store).
async fn https_proxy(
    dir: &TempDir,
    url: String,
    ca_file: Option<&std::path::Path>,
    data_path: &str,
) -> (Served, SocketAddr) {
    let mut conf = Conf::sqlite(dir.path());
    let mut http = Section::to(url).set("data_path", data_path);
    if let Some(ca) = ca_file {
        http = http.set("upstream_ca", ca.display().to_string());
    }
    let proxy = conf.http(http);
    (Served::start(false, dir.path(), conf).await, proxy)
}

fn put(url: &str, token: &str, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
    client()
        .put(url)
        .header("fencing-token", token)
        .header("fencing-resource", "r")
        .body(body)
}

/// An `https://` upstream gets the admitted writes and reads, never the
/// stale one, and over one TLS connection: pooled and reused as a plain
/// one is (session tickets the server sends after the handshake do not
/// make an idle connection look used). A large upload goes through the
/// session read by read.
#[tokio::test]
async fn an_https_upstream_is_fenced_and_its_connections_reused_on_both_data_paths() {
    let ca = TestCa::new("fencepost test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    for data_path in DATA_PATHS {
        let dir = TempDir::new("fp-https-up");
        let up = Upstream::start_tls(leaf.acceptor(&[&b"http/1.1"[..]])).await;
        let ca_file = ca.write(dir.path(), "ca.pem");
        let url = format!("https://127.0.0.1:{}/base", up.addr.port());
        let (_server, proxy) = https_proxy(&dir, url, Some(ca_file.as_path()), data_path).await;
        let url = format!("http://{proxy}/kv/a");

        for _ in 0..3 {
            let r = send(put(&url, "5", "x")).await;
            assert_eq!(r.status, 200, "{data_path}: {r:?}");
            assert_eq!(r.text, "ok");
        }
        let r = send(put(&url, "4", "stale")).await;
        assert_eq!(r.status, 409, "{data_path}: {r:?}");
        assert_eq!(r.problem_type(), "urn:fencepost:stale-token");
        let r = send(client().get(&url)).await;
        assert_eq!((r.status, r.text.as_str()), (200, "ok"), "{data_path}");
        let big = vec![b'b'; 4 << 20];
        let r = send(put(&url, "5", big)).await;
        assert_eq!(r.status, 200, "{data_path}: large upload: {r:?}");

        let arrivals = up.arrivals();
        let seen: Vec<(&str, Option<&str>, &str)> = arrivals
            .iter()
            .map(|a| (a.method.as_str(), a.token.as_deref(), a.path.as_str()))
            .collect();
        assert_eq!(seen.len(), 5, "{data_path}: {seen:?}");
        assert!(
            seen.iter()
                .all(|(_, t, p)| *t != Some("4") && *p == "/base/kv/a"),
            "{data_path}: the stale write reached the upstream, or the path is wrong: {seen:?}"
        );
        assert_eq!(
            up.conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{data_path}: sequential requests should reuse one TLS connection"
        );
    }
}

/// The upstream's certificate is checked: one from a CA the proxy does
/// not trust (`upstream_ca` another CA's, or unset, so the system's
/// store), or one for another name, gets the client a `502` whose detail
/// says what failed, and the request never reaches the upstream.
#[tokio::test]
async fn an_https_upstream_with_an_untrusted_or_misnamed_certificate_is_a_502() {
    let ca = TestCa::new("fencepost test CA");
    let other = TestCa::new("someone else's CA");
    let cases: [(&str, Leaf, bool, &str); 3] = [
        (
            "signed by another CA",
            other.leaf(&["localhost", "127.0.0.1"]),
            true,
            "UnknownIssuer",
        ),
        (
            "for another name",
            ca.leaf(&["db.example"]),
            true,
            "not valid for name",
        ),
        (
            "trusted by no system CA",
            ca.leaf(&["localhost", "127.0.0.1"]),
            false,
            "UnknownIssuer",
        ),
    ];
    for (what, leaf, trust_ca, why) in &cases {
        for data_path in DATA_PATHS {
            let dir = TempDir::new("fp-https-bad");
            let up = Upstream::start_tls(leaf.acceptor(&[&b"http/1.1"[..]])).await;
            let ca_file = ca.write(dir.path(), "ca.pem");
            let url = format!("https://127.0.0.1:{}", up.addr.port());
            let ca_file = trust_ca.then_some(ca_file.as_path());
            let (_server, proxy) = https_proxy(&dir, url, ca_file, data_path).await;
            let r: Resp = send(put(&format!("http://{proxy}/kv/a"), "1", "x")).await;
            assert_eq!(r.status, 502, "{what}, {data_path}: {r:?}");
            assert_eq!(
                r.problem_type(),
                "urn:fencepost:upstream-unreachable",
                "{what}, {data_path}"
            );
            let detail = r.body["detail"].as_str().unwrap_or("");
            assert!(
                detail.contains("TLS handshake") && detail.contains(why),
                "{what}, {data_path}: the detail should say why: {detail:?}"
            );
            assert!(
                up.arrivals().is_empty(),
                "{what}, {data_path}: a request reached an untrusted upstream"
            );
        }
    }
}

// --------------------------------------------------------- Postgres upstream

/// A database with table `t(v int)`, a TLS-only Postgres front for it,
/// and a proxy relaying to the front.
struct PgTls {
    _dir: TempDir,
    db: TestDb,
    front: PgTlsFront,
    proxy: SocketAddr,
    server: Served,
}

impl PgTls {
    /// `upstream_sslmode = mode`, `upstream_ca` the CA's file when `ca`
    /// is given; the proxy names the front as `host`.
    async fn start(
        leaf: &Leaf,
        answer: SslAnswer,
        mode: &str,
        ca: Option<&TestCa>,
        host: &str,
        process: bool,
    ) -> PgTls {
        let db = TestDb::create("fp_pg_uptls").await;
        direct(&db)
            .await
            .batch_execute("CREATE TABLE t (v int)")
            .await
            .expect("create table");
        let postgres = database_addr();
        let front = PgTlsFront::start(postgres, leaf, answer).await;
        let dir = TempDir::new("fp-pg-uptls");
        let mut conf = Conf::sqlite(dir.path());
        let mut pg =
            Section::to(format!("{host}:{}", front.addr.port())).set("upstream_sslmode", mode);
        if let Some(ca) = ca {
            let file = ca.write(dir.path(), "ca.pem");
            pg = pg.set("upstream_ca", file.display().to_string());
        }
        let proxy = conf.postgres(pg);
        let server = Served::start(process, dir.path(), conf).await;
        PgTls {
            _dir: dir,
            db,
            front,
            proxy,
            server,
        }
    }

    async fn connect(&self, options: Option<&str>) -> Result<Client, tokio_postgres::Error> {
        let mut conninfo = format!(
            "host=127.0.0.1 port={} dbname={} user=postgres",
            self.proxy.port(),
            self.db.name
        );
        if let Some(o) = options {
            conninfo.push_str(&format!(" options='{o}'"));
        }
        let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    async fn rows(&self) -> Vec<i32> {
        direct(&self.db)
            .await
            .query("SELECT v FROM t ORDER BY v", &[])
            .await
            .expect("read table")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// Where the tests' Postgres listens (`DATABASE_URL`'s host and port).
fn database_addr() -> SocketAddr {
    let url = crate::support::database_url();
    let hostport = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432");
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .unwrap_or_else(|e| panic!("DATABASE_URL host {hostport:?}: {e}"))
}

/// `require`, `verify-ca` and `verify-full` all reach the server through
/// the TLS handshake, and everything after it works as over plain TCP:
/// startup and authentication, the simple and the extended protocol,
/// fencing (a stale write refused with `ZF001`, nothing of it landing).
#[tokio::test]
async fn require_verify_ca_and_verify_full_reach_postgres_over_tls() {
    let ca = TestCa::new("fencepost test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    for (mode, host, trust) in [
        ("require", "127.0.0.1", false),
        ("verify-ca", "127.0.0.1", true),
        ("verify-full", "127.0.0.1", true),
        ("verify-full", "localhost", true),
    ] {
        let env = PgTls::start(
            &leaf,
            SslAnswer::Yes,
            mode,
            trust.then_some(&ca),
            host,
            false,
        )
        .await;
        let new = env
            .connect(Some(&opts(5, "r")))
            .await
            .unwrap_or_else(|e| panic!("{mode} via {host}: {e:?}"));
        new.simple_query("INSERT INTO t VALUES (5)")
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        new.execute("INSERT INTO t VALUES ($1)", &[&6i32])
            .await
            .unwrap_or_else(|e| panic!("{mode}: extended protocol: {e:?}"));
        let old = env.connect(Some(&opts(4, "r"))).await.expect("connect");
        let err = old
            .simple_query("INSERT INTO t VALUES (4)")
            .await
            .expect_err("a stale write must be refused");
        assert_eq!(code(&err), "ZF001", "{mode}: {err:?}");
        let ssl = new
            .simple_query("SELECT count(*) FROM t")
            .await
            .expect("read");
        assert!(ssl
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("2"))));
        assert_eq!(env.rows().await, vec![5, 6], "{mode}");
        assert_eq!(
            env.front.handshakes(),
            2,
            "{mode}: one TLS session per client"
        );
        assert_eq!(
            env.front.plain.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{mode}: a connection began in plain text"
        );
    }
}

/// `verify-ca` and `verify-full` refuse a server whose certificate comes
/// from another CA; `verify-full` also one whose certificate is for
/// another host, which `verify-ca` accepts (it checks the chain only).
/// The client is told why, as a connection failure (`08006`).
#[tokio::test]
async fn verify_modes_refuse_a_wrong_ca_and_verify_full_a_wrong_host_name() {
    let ca = TestCa::new("fencepost test CA");
    let other = TestCa::new("someone else's CA");
    let foreign = other.leaf(&["localhost", "127.0.0.1"]);
    for mode in ["verify-ca", "verify-full"] {
        let env = PgTls::start(
            &foreign,
            SslAnswer::Yes,
            mode,
            Some(&ca),
            "127.0.0.1",
            false,
        )
        .await;
        let err = env
            .connect(None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode}: a certificate from another CA was accepted"));
        assert_eq!(code(&err), "08006", "{mode}: {err:?}");
        let m = err
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(
            m.contains("SSL handshake") && m.contains("UnknownIssuer"),
            "{mode}: {m}"
        );
        assert_eq!(env.front.handshakes(), 0, "{mode}");
    }

    let misnamed = ca.leaf(&["db.example"]);
    let env = PgTls::start(
        &misnamed,
        SslAnswer::Yes,
        "verify-full",
        Some(&ca),
        "127.0.0.1",
        false,
    )
    .await;
    let Err(err) = env.connect(None).await else {
        panic!("verify-full accepted a certificate for another host");
    };
    assert_eq!(code(&err), "08006", "{err:?}");
    let m = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(m.contains("not valid for name"), "{m}");

    let env = PgTls::start(
        &misnamed,
        SslAnswer::Yes,
        "verify-ca",
        Some(&ca),
        "127.0.0.1",
        false,
    )
    .await;
    let c = env
        .connect(None)
        .await
        .expect("verify-ca checks the chain, not the name");
    c.simple_query("SELECT 1").await.expect("query");
    assert_eq!(env.front.handshakes(), 1);
}

/// A server that answers SSLRequest `N` is refused under `require`: the
/// client gets `08004` saying so, the proxy logs it, and no session is
/// opened in plain text instead.
#[tokio::test]
async fn a_server_that_will_not_do_tls_is_refused_under_require() {
    let ca = TestCa::new("fencepost test CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let env = PgTls::start(&leaf, SslAnswer::No, "require", None, "127.0.0.1", true).await;
    let Err(err) = env.connect(Some(&opts(1, "r"))).await else {
        panic!("require accepted a server without SSL");
    };
    assert_eq!(code(&err), "08004", "{err:?}");
    let m = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(m.contains("does not support SSL"), "{m}");
    let logged = crate::support::eventually(10, || {
        let log = env.server.log_text();
        async move { log.contains("does not support SSL").then_some(log) }
    })
    .await;
    assert!(logged.is_some(), "no log line: {}", env.server.log_text());
    assert_eq!(env.front.handshakes(), 0);
}

/// A cancel request goes to a TLS server over a TLS connection of its
/// own (the front drops plain-text connections, so a cancel sent in
/// plain text would be lost and the query would run its 30 s).
#[tokio::test]
async fn a_cancel_request_reaches_a_tls_server_over_tls() {
    let ca = TestCa::new("fencepost test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let env = PgTls::start(
        &leaf,
        SslAnswer::Yes,
        "verify-full",
        Some(&ca),
        "127.0.0.1",
        false,
    )
    .await;
    let c = env.connect(None).await.expect("connect");
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
    assert_eq!(env.front.handshakes(), 2, "the session and the cancel");
    assert_eq!(
        env.front.plain.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a connection began in plain text"
    );
}
