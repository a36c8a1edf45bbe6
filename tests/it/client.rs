//! The `fencepost-client` crate against a real fencepost server (elector,
//! HTTP proxy, Postgres proxy) and a real Postgres: the keeper's loss
//! fires before the elector can grant the lease to anyone else, a
//! refused renewal ends the term, every helper's writes are fenced,
//! every refusal comes back typed, the `leader_worker` example stops
//! cleanly when it loses its lease, and the demo is written with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use fencepost_client::pg::{
    fence_sqlx, fence_tokio_postgres, refusal_sqlx, refusal_tokio_postgres,
};
use fencepost_client::tower::{FencingLayer, Layer, Service};
use fencepost_client::{
    check_response, ElectorClient, EndReason, Error, FencedClient, LeaseKeeper, LeaseState,
    LossReason, RefusalKind, RefusedBy, RequestBuilderExt,
};

const R: &str = "ledger";

/// A server (in-process) with an elector, an HTTP proxy (watching the elector) and a
/// Postgres proxy, on SQLite; a fresh database behind the Postgres proxy.
struct Tier {
    _dir: TempDir,
    _server: InProc,
    db: TestDb,
    upstream: Upstream,
    elector_addr: SocketAddr,
    elector: String,
    http: String,
    pg: SocketAddr,
}

impl Tier {
    async fn start(prefix: &str) -> Tier {
        let db = TestDb::create(prefix).await;
        direct(&db)
            .await
            .batch_execute(
                "CREATE TABLE t (v text);
                 CREATE TABLE worker_log (id serial, holder text, token bigint, n int)",
            )
            .await
            .expect("tables");
        let dir = TempDir::new(prefix);
        let upstream = Upstream::start().await;
        let mut conf = Conf::sqlite(dir.path());
        let el = conf.elector(Section::new().set("min_ttl", "50ms"));
        let px = conf.http(
            Section::to(format!("http://{}", upstream.addr))
                .set("elector_watch", format!("http://{el}"))
                .set("watch_resources", vec![R]),
        );
        let pg = conf.postgres(Section::to("127.0.0.1:5432"));
        let server = InProc::start(conf).await;
        Tier {
            _dir: dir,
            _server: server,
            db,
            upstream,
            elector_addr: el,
            elector: format!("http://{el}"),
            http: format!("http://{px}"),
            pg,
        }
    }

    fn pg_config(&self) -> tokio_postgres::Config {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.pg.port(),
            self.db.name
        )
        .parse()
        .expect("pg config")
    }

    fn keeper(&self, holder: &str, ttl_ms: u64) -> LeaseKeeper {
        LeaseKeeper::builder(&self.elector, R, holder)
            .ttl(Duration::from_millis(ttl_ms))
            .start()
            .expect("keeper")
    }

    /// Tokens (as numbers) of what reached the HTTP upstream, in order.
    fn arrived_tokens(&self) -> Vec<u64> {
        self.upstream
            .arrivals()
            .iter()
            .filter_map(|a| a.token.as_deref())
            .filter_map(|t| t.split('.').next()?.parse().ok())
            .collect()
    }
}

async fn pg_connect(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (c, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(conn);
    c
}

async fn leading(k: &LeaseKeeper) -> fencepost_client::Lease {
    tokio::time::timeout(Duration::from_secs(20), k.leading())
        .await
        .expect("leads within 20s")
        .expect("keeper leads")
}

fn assert_monotonic(tokens: &[u64]) {
    for w in tokens.windows(2) {
        assert!(w[1] >= w[0], "stale write landed: {tokens:?}");
    }
}

/// The loss must fire before the elector can grant the lease to anyone
/// else. Keeper `a` reaches the elector through a TCP shim the test cuts;
/// `b` campaigns directly. The elector granted `b` no earlier than `b`
/// sent its winning acquire, so `a`'s loss instant must precede that.
#[tokio::test]
async fn the_loss_fires_before_the_elector_grants_the_lease_to_another() {
    let tier = Tier::start("fpc_loss").await;
    let shim = Shim::start(tier.elector_addr).await;
    let ttl = Duration::from_millis(600);
    let a = LeaseKeeper::builder(&format!("http://{}", shim.addr), R, "a")
        .ttl(ttl)
        .campaign_again(false)
        .start()
        .unwrap();
    let lease_a = leading(&a).await;
    let b = tier.keeper("b", 600);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        matches!(b.state(), LeaseState::Campaigning),
        "b waits while a leads"
    );
    let http_a = FencedClient::new(reqwest::Client::new(), &lease_a);
    let r = http_a
        .put(format!("{}/kv/a1", tier.http))
        .unwrap()
        .body("a")
        .send_fenced()
        .await
        .expect("a's write admitted");
    assert_eq!(r.status(), 200);

    // a's renewals stop arriving (a partition between a and the elector).
    let cut_at = Instant::now();
    shim.cut();
    let loss = tokio::time::timeout(Duration::from_secs(5), lease_a.lost())
        .await
        .expect("a's loss fires");
    assert_eq!(loss.reason, LossReason::Unconfirmed);
    assert!(
        loss.at - cut_at < ttl,
        "fired {:?} after the cut",
        loss.at - cut_at
    );

    let lease_b = leading(&b).await;
    assert!(lease_b.token().value() > lease_a.token().value());
    assert!(
        loss.at < lease_b.requested_at(),
        "a was told {:?} after b's winning acquire was sent",
        loss.at - lease_b.requested_at()
    );
    println!(
        "a's loss fired {:?} before b's winning acquire was sent",
        lease_b.requested_at() - loss.at
    );

    // a's keeper has ended; its client sends nothing now ...
    assert!(matches!(
        a.ended().await,
        EndReason::Lost(LossReason::Unconfirmed)
    ));
    assert!(matches!(a.leading().await, Err(Error::Ended(_))));
    let before = tier.upstream.arrivals().len();
    assert!(matches!(
        http_a.put(format!("{}/kv/a2", tier.http)),
        Err(Error::NotLeading { .. })
    ));
    assert_eq!(tier.upstream.arrivals().len(), before, "nothing was sent");
    // ... and once b has written, a write with a's old token, sent
    // anyway, is refused and never forwarded.
    let r = FencedClient::new(reqwest::Client::new(), &lease_b)
        .put(format!("{}/kv/b1", tier.http))
        .unwrap()
        .body("b")
        .send_fenced()
        .await
        .expect("b's write admitted");
    assert_eq!(r.status(), 200);
    let before = tier.upstream.arrivals().len();
    let err = reqwest::Client::new()
        .put(format!("{}/kv/a3", tier.http))
        .fencing(lease_a.fencing())
        .body("late")
        .send_fenced()
        .await
        .unwrap_err();
    let r = err.refusal().expect("a refusal");
    assert_eq!(r.kind, RefusalKind::Stale);
    assert_eq!(r.presented_token, Some(lease_a.token().value()));
    assert_eq!(r.current_token, Some(lease_b.token().value()));
    assert_eq!(tier.upstream.arrivals().len(), before);
    a.shutdown().await;
    b.shutdown().await;
}

/// A renewal the elector refuses ends the term at once (the lease is
/// released from under the keeper here); the keeper then campaigns again
/// and leads under a newer token. Shutdown releases.
#[tokio::test]
async fn a_refused_renewal_ends_the_term_and_the_keeper_campaigns_again() {
    let tier = Tier::start("fpc_refused").await;
    let k = tier.keeper("k", 900);
    let states = k.subscribe();
    let first = leading(&k).await;
    ElectorClient::new(&tier.elector)
        .unwrap()
        .release(R, "k", first.token())
        .await
        .expect("released from under the keeper");
    let loss = tokio::time::timeout(Duration::from_secs(3), first.lost())
        .await
        .expect("loss fires at the next renewal");
    assert!(
        matches!(&loss.reason, LossReason::Refused(d) if d.contains("stop writing")),
        "{:?}",
        loss.reason
    );
    assert!(first.cancellation_token().is_cancelled());
    let second = leading(&k).await;
    assert!(second.token().value() > first.token().value());
    assert!(!second.is_lost());
    k.shutdown().await;
    assert_eq!(second.loss().map(|l| l.reason), Some(LossReason::ShutDown));
    assert!(matches!(
        *states.borrow(),
        LeaseState::Ended(EndReason::ShutDown)
    ));
    let (_, body) = get(&format!("{}/v1/leases/{R}", tier.elector), None).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["live"], false, "released on shutdown: {v}");
}

/// Every helper puts the keeper's token on its writes, and the writes
/// land: reqwest (wrapper and extension), tower, tokio-postgres and sqlx
/// startup options, the statement comment. After a newer leader, the
/// same helpers' writes come back as typed `Stale` refusals.
#[tokio::test]
async fn every_helper_fences_its_writes_through_both_proxies() {
    let tier = Tier::start("fpc_helpers").await;
    let k = tier.keeper("w", 5000);
    let lease = leading(&k).await;
    let token = lease.token().to_string();

    // reqwest, through the wrapper that follows the keeper.
    let http = FencedClient::new(reqwest::Client::new(), &k);
    let r = http
        .put(format!("{}/kv/one", tier.http))
        .unwrap()
        .body("1")
        .send_fenced()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // tower, around hyper-util's client.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut svc = FencingLayer::new(&k).layer(client);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let req = http::Request::put(format!("{}/kv/two", tier.http))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"2")))
        .unwrap();
    let resp = svc.call(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let arrived: Vec<_> = tier
        .upstream
        .arrivals()
        .into_iter()
        .map(|a| (a.path, a.token))
        .collect();
    assert_eq!(
        arrived,
        vec![
            ("/kv/one".to_owned(), Some(token.clone())),
            ("/kv/two".to_owned(), Some(token.clone())),
        ]
    );

    // tokio-postgres with the token in the startup options.
    let mut cfg = tier.pg_config();
    fence_tokio_postgres(&mut cfg, lease.fencing());
    let pg = pg_connect(&cfg).await;
    pg.execute("INSERT INTO t VALUES ('tokio-postgres')", &[])
        .await
        .expect("fenced insert");
    // sqlx, the same way.
    let opts = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(tier.pg.port())
        .username("postgres")
        .database(&tier.db.name);
    let sqlx_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(fence_sqlx(opts.clone(), lease.fencing()))
        .await
        .expect("sqlx through the proxy");
    sqlx::query("INSERT INTO t VALUES ('sqlx')")
        .execute(&sqlx_pool)
        .await
        .expect("fenced sqlx insert");
    // A connection without a token: the comment fences one statement,
    // and without it the write is refused as missing.
    let bare = pg_connect(&tier.pg_config()).await;
    bare.execute(
        &format!(
            "{} INSERT INTO t VALUES ('comment')",
            lease.fencing().sql_comment()
        ),
        &[],
    )
    .await
    .expect("comment-fenced insert");
    let e = bare
        .execute("INSERT INTO t VALUES ('bare')", &[])
        .await
        .unwrap_err();
    let r = refusal_tokio_postgres(&e).expect("typed");
    assert_eq!(r.kind, RefusalKind::Missing);
    assert_eq!(
        r.refused_by,
        RefusedBy::Postgres {
            sqlstate: "ZF002".into()
        }
    );
    let rows: Vec<String> = direct(&tier.db)
        .await
        .query("SELECT v FROM t ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["comment", "sqlx", "tokio-postgres"]);

    // A newer leader: the old keeper shuts down (releasing), another
    // leads and writes; the old token through each helper is stale.
    let old = lease.fencing().clone();
    k.shutdown().await;
    assert!(matches!(
        http.put(format!("{}/kv/x", tier.http)),
        Err(Error::NotLeading { .. })
    ));
    let k2 = tier.keeper("w2", 5000);
    let lease2 = leading(&k2).await;
    let mut cfg2 = tier.pg_config();
    fence_tokio_postgres(&mut cfg2, lease2.fencing());
    pg_connect(&cfg2)
        .await
        .execute("INSERT INTO t VALUES ('new leader')", &[])
        .await
        .expect("new leader writes");

    let old_http = FencedClient::new(reqwest::Client::new(), old.clone());
    let e = old_http
        .put(format!("{}/kv/three", tier.http))
        .unwrap()
        .body("3")
        .send_fenced()
        .await
        .unwrap_err();
    let r = e.refusal().expect("typed");
    assert_eq!(
        (r.kind, r.presented_token, r.current_token),
        (
            RefusalKind::Stale,
            Some(old.token().value()),
            Some(lease2.token().value())
        )
    );
    let e = pg
        .execute("INSERT INTO t VALUES ('stale')", &[])
        .await
        .unwrap_err();
    let r = refusal_tokio_postgres(&e).expect("typed");
    assert_eq!(
        (r.kind, r.presented_token, r.current_token),
        (
            RefusalKind::Stale,
            Some(old.token().value()),
            Some(lease2.token().value())
        )
    );
    assert_eq!(r.resource.as_deref(), Some(R));
    let e = sqlx::query("INSERT INTO t VALUES ('stale sqlx')")
        .execute(&sqlx_pool)
        .await
        .unwrap_err();
    assert_eq!(refusal_sqlx(&e).map(|r| r.kind), Some(RefusalKind::Stale));
    let stale_rows: i64 = direct(&tier.db)
        .await
        .query_one("SELECT count(*) FROM t WHERE v LIKE 'stale%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale_rows, 0);
    assert!(!tier
        .upstream
        .arrivals()
        .iter()
        .any(|a| a.path == "/kv/three"));
    k2.shutdown().await;
}

/// Every kind of refusal, from both proxies, read by the crate into its
/// typed form: stale, missing, invalid, forged (signed tokens required)
/// and unavailable (the store cut away).
#[tokio::test]
async fn refusals_from_both_proxies_come_back_typed() {
    let store_db = TestDb::create("fpc_store").await;
    let db = TestDb::create("fpc_guarded").await;
    direct(&db)
        .await
        .batch_execute("CREATE TABLE t (v text)")
        .await
        .unwrap();
    let pg_host: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let shim = Shim::start(pg_host).await;
    let store_url = store_db
        .url
        .replace("127.0.0.1:5432", &shim.addr.to_string());
    let dir = TempDir::new("fpc-refusals");
    let key = dir.path().join("elector");
    let (code, _, err) = run_cli(&["keygen", "--out", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let up = Upstream::start().await;
    let mut conf = Conf::store(store_url);
    let el = conf.elector(Section::new().set("signing_key", format!("{}.key", key.display())));
    let px = conf.http(
        Section::to(format!("http://{}", up.addr))
            .set("verify_key", format!("{}.pub", key.display())),
    );
    let pg = conf.postgres(
        Section::to("127.0.0.1:5432").set("verify_key", format!("{}.pub", key.display())),
    );
    let _server = InProc::start(conf).await;
    let elector = ElectorClient::new(&format!("http://{el}")).unwrap();
    let url = format!("http://{px}/kv/k");
    let conninfo = |options: Option<&str>| {
        let mut c: tokio_postgres::Config = format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            pg.port(),
            db.name
        )
        .parse()
        .unwrap();
        if let Some(o) = options {
            c.options(o);
        }
        c
    };
    let http_refusal = |resp: reqwest::Response| async move {
        match check_response(resp).await {
            Err(Error::Refused(r)) => *r,
            Ok(r) => panic!("not refused: {}", r.status()),
            Err(e) => panic!("not a refusal: {e}"),
        }
    };
    let pg_refusal = |options: String| async move {
        let c = pg_connect(&conninfo(Some(&options))).await;
        let e = c
            .execute("INSERT INTO t VALUES ('x')", &[])
            .await
            .expect_err("refused");
        refusal_tokio_postgres(&e).unwrap_or_else(|| panic!("not a refusal: {e}"))
    };

    // Two terms: t1 then t2, both signed; t2 writes first through both.
    let g1 = elector
        .acquire(R, "a", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(g1.fencing.token().is_signed());
    elector.release(R, "a", g1.fencing.token()).await.unwrap();
    let g2 = elector
        .acquire(R, "b", Duration::from_secs(60))
        .await
        .unwrap();
    let ok = reqwest::Client::new()
        .put(&url)
        .fencing(&g2.fencing)
        .body("b")
        .send_fenced()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let mut c = conninfo(None);
    fence_tokio_postgres(&mut c, &g2.fencing);
    pg_connect(&c)
        .await
        .execute("INSERT INTO t VALUES ('b')", &[])
        .await
        .expect("t2 admitted");

    // Stale.
    let r = http_refusal(
        reqwest::Client::new()
            .put(&url)
            .fencing(&g1.fencing)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.kind, RefusalKind::Stale);
    assert_eq!(r.current_token, Some(g2.fencing.token().value()));
    assert!(matches!(&r.refused_by, RefusedBy::Http { status: 409, .. }));
    let r = pg_refusal(g1.fencing.pg_options()).await;
    assert_eq!(r.kind, RefusalKind::Stale);
    assert_eq!(r.current_token, Some(g2.fencing.token().value()));

    // Missing.
    let r = http_refusal(reqwest::Client::new().put(&url).send().await.unwrap()).await;
    assert_eq!(r.kind, RefusalKind::Missing);
    assert!(matches!(&r.refused_by, RefusedBy::Http { status: 428, .. }));
    let r = pg_refusal(format!("-c fencing.resource={R}")).await;
    assert_eq!(r.kind, RefusalKind::Missing);

    // Invalid.
    let raw = |token: &str| {
        reqwest::Client::new()
            .put(&url)
            .header("Fencing-Token", token)
            .header("Fencing-Resource", R)
    };
    let r = http_refusal(raw("twelve").send().await.unwrap()).await;
    assert_eq!(r.kind, RefusalKind::Invalid);
    assert!(matches!(&r.refused_by, RefusedBy::Http { status: 400, .. }));
    let r = pg_refusal(format!("-c fencing.token=twelve -c fencing.resource={R}")).await;
    assert_eq!(r.kind, RefusalKind::Invalid);

    // Forged: unsigned where signatures are required, and a signature
    // moved to another number.
    let n = g2.fencing.token().value() + 1;
    let sig = g2.fencing.token().as_str().split_once('.').unwrap().1;
    for forged in [n.to_string(), format!("{n}.{sig}")] {
        let r = http_refusal(raw(&forged).send().await.unwrap()).await;
        assert_eq!(r.kind, RefusalKind::Forged, "{forged}");
        assert!(matches!(&r.refused_by, RefusedBy::Http { status: 403, .. }));
        let r = pg_refusal(format!("-c fencing.token={forged} -c fencing.resource={R}")).await;
        assert_eq!(r.kind, RefusalKind::Forged, "{forged}: {}", r.detail);
    }

    // Unavailable: a newer token needs the store, which is cut away.
    elector.release(R, "b", g2.fencing.token()).await.unwrap();
    let g3 = elector
        .acquire(R, "c", Duration::from_secs(60))
        .await
        .unwrap();
    shim.cut();
    let r = http_refusal(raw(g3.fencing.token().as_str()).send().await.unwrap()).await;
    assert_eq!(r.kind, RefusalKind::Unavailable);
    assert!(r.is_retriable());
    assert!(matches!(&r.refused_by, RefusedBy::Http { status: 503, .. }));
    let r = pg_refusal(g3.fencing.pg_options()).await;
    assert_eq!(r.kind, RefusalKind::Unavailable);
    assert_eq!(
        r.refused_by,
        RefusedBy::Postgres {
            sqlstate: "ZF004".into()
        }
    );
    shim.restore();

    // Nothing refused landed.
    let rows: Vec<String> = direct(&db)
        .await
        .query("SELECT v FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["b"]);
    assert_eq!(up.arrivals().len(), 1);
}

/// Where cargo put the `leader_worker` example: next to this test's
/// binary (`target/<profile>/deps/..`), built by `cargo build
/// --workspace --all-targets` and by the workspace's test runs. Built
/// here if a narrower build left it out.
fn leader_worker() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join("leader_worker");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args([
                "build",
                "-p",
                "fencepost-client",
                "--features",
                "tokio-postgres",
                "--example",
                "leader_worker",
            ])
            .status()
            .expect("run cargo")
            .success();
        assert!(ok, "cannot build the leader_worker example");
    }
    path
}

/// The example as a user runs it: it leads, writes through both proxies,
/// is paused past its lease while another leader takes over, and on
/// waking stops cleanly, having landed nothing stale.
#[tokio::test]
async fn the_leader_worker_example_stops_cleanly_when_it_loses_the_lease() {
    let tier = Tier::start("fpc_worker").await;
    let out_path = tier._dir.path().join("worker.out");
    let mut worker = Command::new(leader_worker())
        .env("FENCEPOST_ELECTOR_URL", &tier.elector)
        .env("WORKER_RESOURCE", R)
        .env("WORKER_HOLDER", "worker")
        .env("WORKER_TTL_MS", "800")
        .env("WORKER_INTERVAL_MS", "50")
        .env("WORKER_HTTP", format!("{}/kv/", tier.http))
        .env(
            "WORKER_PG",
            format!(
                "host=127.0.0.1 port={} user=postgres dbname={}",
                tier.pg.port(),
                tier.db.name
            ),
        )
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the example");
    let out = || std::fs::read_to_string(&out_path).unwrap_or_default();
    eventually(30, || async {
        (out().matches("wrote").count() >= 3).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the worker did not write: {}", out()));

    // Paused past its lease; another leader takes over and writes.
    let pid = worker.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let thief = tier.keeper("thief", 5000);
    let lease = leading(&thief).await;
    let mut cfg = tier.pg_config();
    fence_tokio_postgres(&mut cfg, lease.fencing());
    let thief_pg = pg_connect(&cfg).await;
    thief_pg
        .execute(
            "INSERT INTO worker_log (holder, token, n) VALUES ('thief', $1, 0)",
            &[&i64::try_from(lease.token().value()).unwrap()],
        )
        .await
        .expect("the new leader writes");
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not stop: {}", out());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = out();
    println!("{text}");
    assert!(status.success(), "{status:?}: {text}");
    assert!(text.contains("leading ledger token="), "{text}");
    assert!(
        text.contains("lost the lease") || text.contains("refused: write refused (stale"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("stopped"), "{text}");

    // Nothing the worker wrote landed after the new leader's first write.
    let rows = direct(&tier.db)
        .await
        .query(
            "SELECT holder FROM worker_log WHERE id > (SELECT min(id) FROM worker_log WHERE holder = 'thief')",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rows.is_empty(),
        "{} worker rows after the takeover",
        rows.len()
    );
    assert_monotonic(&tier.arrived_tokens());
    thief.shutdown().await;
}

/// The showcase is written with the crate, and its verdict still holds.
#[test]
fn the_demo_uses_the_crate_and_fencing_holds() {
    let dir = TempDir::new("fpc-demo");
    let (code, out, err) = run_cli(&["demo", "--dir", dir.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    for needle in [
        "LeaseKeeper",
        "Refusal { kind: stale, presented: 1, current: 2 }",
        "fired the loss",
        "Fencing held",
        "releases the lease",
    ] {
        assert!(out.contains(needle), "demo output lacks {needle:?}:\n{out}");
    }
}
