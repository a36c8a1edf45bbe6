//! One fencing tier: three `fencepost serve` replicas on one Postgres
//! store, each case of issue 12's "Why" against the real binary, judged by
//! what the upstream itself saw.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// Replica TTL of these tests: short, so the expiry cases run quickly, but
/// with room for a loaded two-core CI machine.
const TTL_MS: u64 = 2_000;

/// What the upstream saw: one entry per request, with when it arrived and
/// when it was answered.
#[derive(Debug, Clone)]
struct Seen {
    token: u64,
    path: String,
    start: Instant,
    end: Option<Instant>,
}

/// An HTTP upstream that records arrivals and answers `/slow/...` after
/// 1.5 s.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        Recorder::with(true).await
    }

    /// `keep_alive: false`: every answer closes its connection, so a proxy
    /// keeps no idle connection to it and connects anew for each request.
    async fn with(keep_alive: bool) -> Recorder {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let token = req
                                .headers()
                                .get("fencing-token")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let path = req.uri().path().to_string();
                            let i = {
                                let mut s = seen.lock().unwrap();
                                s.push(Seen {
                                    token,
                                    path: path.clone(),
                                    start: Instant::now(),
                                    end: None,
                                });
                                s.len() - 1
                            };
                            let _ = req.into_body().collect().await;
                            if path.starts_with("/slow") {
                                tokio::time::sleep(Duration::from_millis(1_500)).await;
                            }
                            seen.lock().unwrap()[i].end = Some(Instant::now());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The tier's guarantee as the upstream sees it: no write with a token
    /// below one already received arrives later, and no write arrives
    /// before every write with a lower token has been answered.
    fn violations(&self) -> Vec<String> {
        let seen = self.seen();
        let mut v = Vec::new();
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[..i] {
                if b.token > a.token {
                    v.push(format!(
                        "{} (token {}) arrived after token {}",
                        a.path, a.token, b.token
                    ));
                }
            }
            for b in &seen {
                if b.token < a.token && b.start <= a.start && b.end.is_none_or(|e| e > a.start) {
                    v.push(format!(
                        "{} (token {}) arrived while {} (token {}) was still in flight",
                        a.path, a.token, b.path, b.token
                    ));
                }
            }
        }
        v
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Replica {
    _dir: TempDir,
    server: Server,
    http: SocketAddr,
    pg: SocketAddr,
    admin: SocketAddr,
}

impl Replica {
    /// A replica on `store_url` in front of the HTTP upstream and the test
    /// database's server.
    async fn start(store_url: &str, upstream: SocketAddr) -> Replica {
        Replica::start_with(store_url, upstream, "").await
    }

    /// With `http_extra` (TOML lines) in its `[[http]]` section.
    async fn start_with(store_url: &str, upstream: SocketAddr, http_extra: &str) -> Replica {
        let dir = TempDir::new("tier");
        let (http, pg, admin) = (free_addr(), free_addr(), free_addr());
        let config = format!(
            r#"store = "{store_url}"
[audit]
flush_interval = "20ms"
[fencing]
drain_timeout = "10s"
store_timeout = "1s"
[cluster]
replica_ttl = "{TTL_MS}ms"
[admin]
listen = "{admin}"
[[http]]
listen = "{http}"
upstream = "http://{upstream}"
{http_extra}
[[postgres]]
listen = "{pg}"
upstream = "127.0.0.1:5432"
"#
        );
        let server = Server::start(dir.path(), &config);
        wait_port(http).await;
        wait_port(pg).await;
        Replica {
            _dir: dir,
            server,
            http,
            pg,
            admin,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    async fn put(&self, path: &str, token: u64) -> u16 {
        put(&self.url(path), Some(&token.to_string()), Some("r"), "x")
            .await
            .0
    }

    /// Waits until a write with `token` is admitted (the replica joined).
    async fn ready(&self, token: u64) {
        let ok = eventually(20, || async {
            (self.put("/warmup", token).await == 200).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "replica never admitted:\n{}",
            self.server.log_text()
        );
    }

    fn pid(&self) -> u32 {
        self.server.child.as_ref().unwrap().id()
    }

    async fn metrics(&self) -> String {
        get(&format!("http://{}/metrics", self.admin), None).await.1
    }

    /// `fencepost_writes_total` of one protocol and outcome.
    async fn writes(&self, protocol: &str, outcome: &str) -> f64 {
        let name =
            format!("fencepost_writes_total{{protocol=\"{protocol}\",outcome=\"{outcome}\"}}");
        metric(&self.metrics().await, &name).unwrap_or(0.0)
    }

    /// Waits until `fencepost_writes_total` of `protocol` and `outcome`
    /// is above `than`.
    async fn wait_writes(&self, protocol: &str, outcome: &str, than: f64) {
        let seen = eventually(20, || async {
            (self.writes(protocol, outcome).await > than).then_some(())
        })
        .await;
        assert!(
            seen.is_some(),
            "no {protocol} write counted {outcome}:\n{}\n{}",
            self.metrics().await,
            self.server.log_text()
        );
    }

    /// Waits until the replica's lease is confirmed again (it admits).
    async fn wait_admitting(&self) {
        let url = format!("http://{}/readyz", self.admin);
        let back = eventually(20, || async {
            let (_, body) = get(&url, None).await;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["replica"]["admitting"] == true).then_some(())
        })
        .await;
        assert!(
            back.is_some(),
            "the replica never admitted again:\n{}",
            self.server.log_text()
        );
    }

    /// Waits until the tier's audit (one store) holds a refused write of
    /// `reason` whose detail begins with `detail`.
    async fn wait_audited(&self, reason: &str, detail: &str) {
        let url = format!(
            "http://{}/v1/audit?kind=refused_write&limit=100",
            self.admin
        );
        let found = eventually(20, || async {
            let (_, body) = get(&url, None).await;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v.as_array()?
                .iter()
                .any(|r| {
                    r["reason"] == reason
                        && r["detail"].as_str().is_some_and(|d| d.starts_with(detail))
                })
                .then_some(())
        })
        .await;
        assert!(
            found.is_some(),
            "no {reason} refusal of {detail} audited:\n{}",
            get(&url, None).await.1
        );
    }
}

struct Tier {
    db: TestDb,
    upstream: Recorder,
    replicas: Vec<Replica>,
}

impl Tier {
    /// What a failure message needs: the upstream's arrivals, the store's
    /// tier tables and every replica's log.
    async fn evidence(&self) -> String {
        let t0 = self.upstream.seen().first().map(|s| s.start);
        let mut out = String::from("upstream arrivals:\n");
        for s in self.upstream.seen() {
            out.push_str(&format!(
                "  {:>8?} {} token {} answered {:?}\n",
                t0.map(|t| s.start - t).unwrap_or_default(),
                s.path,
                s.token,
                s.end.map(|e| e - s.start)
            ));
        }
        let c = direct(&self.db).await;
        for q in [
            "SELECT resource, token, seq FROM fencepost_store.fences",
            "SELECT seq::text FROM fencepost_store.advance_seq",
            "SELECT id, joined_seq::text, renewed_at::text, expires_at::text FROM fencepost_store.replicas",
            "SELECT resource, replica_id, token FROM fencepost_store.acks",
        ] {
            out.push_str(&format!("{q}:\n"));
            if let Ok(rows) = c.simple_query(q).await {
                for m in rows {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        let cols: Vec<&str> =
                            (0..r.len()).map(|i| r.get(i).unwrap_or("")).collect();
                        out.push_str(&format!("  {}\n", cols.join(" | ")));
                    }
                }
            }
        }
        for (i, r) in self.replicas.iter().enumerate() {
            out.push_str(&format!("R{} log:\n{}\n", i + 1, r.server.log_text()));
        }
        out
    }

    async fn start(prefix: &str) -> Tier {
        let db = TestDb::create(prefix).await;
        direct(&db)
            .await
            .batch_execute("CREATE TABLE t (v int)")
            .await
            .unwrap();
        let upstream = Recorder::start().await;
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(Replica::start(&db.url, upstream.addr).await);
        }
        Tier {
            db,
            upstream,
            replicas,
        }
    }
}

/// Leader A writes with 1 through R1, leader B with 2 through R2 (a plain
/// token: no grant event anywhere), then A writes again through R1: R1
/// must refuse every one of A's later writes, at once and ever after.
#[tokio::test]
async fn a_stale_write_through_another_replica_is_refused() {
    let tier = Tier::start("tier_stale").await;
    let [r1, r2, r3] = &tier.replicas[..] else {
        unreachable!()
    };
    r1.ready(1).await;
    r2.ready(1).await;
    r3.ready(1).await;
    assert_eq!(r2.put("/b", 2).await, 200);
    for i in 0..50 {
        let status = r1.put(&format!("/a{i}"), 1).await;
        assert_eq!(status, 409, "A's write {i} through R1 was not refused");
        assert_eq!(r3.put(&format!("/a3-{i}"), 1).await, 409);
    }
    // B keeps writing through any replica.
    assert_eq!(r1.put("/b1", 2).await, 200);
    assert_eq!(r3.put("/b3", 2).await, 200);
    let v = tier.upstream.violations();
    assert!(v.is_empty(), "{v:#?}");
    assert!(tier
        .upstream
        .seen()
        .iter()
        .all(|s| !s.path.starts_with("/a")));
}

/// The drain crosses replicas: A's token-1 write is in flight at the
/// upstream through R1 when B's first token-2 write comes through R2; B's
/// write must not reach the upstream before A's has completed.
#[tokio::test]
async fn the_drain_crosses_replicas() {
    let tier = Tier::start("tier_drain").await;
    let [r1, r2, r3] = &tier.replicas[..] else {
        unreachable!()
    };
    r1.ready(1).await;
    r2.ready(1).await;
    r3.ready(1).await;
    let a = tokio::spawn({
        let url = r1.url("/slow/a");
        async move { put(&url, Some("1"), Some("r"), "a").await.0 }
    });
    // Let A's write reach the upstream.
    let arrived = eventually(5, || async {
        tier.upstream
            .seen()
            .iter()
            .any(|s| s.path == "/slow/a")
            .then_some(())
    })
    .await;
    assert!(arrived.is_some());
    let t = Instant::now();
    let status = r2.put("/b", 2).await;
    assert_eq!(
        status,
        200,
        "R2:\n{}\nR1:\n{}",
        r2.server.log_text(),
        r1.server.log_text()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1_000),
        "B's write was admitted after {:?}, while A's was still in flight",
        t.elapsed()
    );
    assert_eq!(a.await.unwrap(), 200);
    let v = tier.upstream.violations();
    assert!(v.is_empty(), "{v:#?}");
}

/// A replica cut off from the store (a TCP shim between it and Postgres)
/// stops admitting, same-token writes included, within its TTL; the rest
/// of the tier advances without it after its lease expires; it rejoins by
/// itself, and has learnt the advance.
#[tokio::test]
async fn a_replica_cut_off_from_the_store_stops_admitting_within_its_ttl() {
    let db = TestDb::create("tier_cut").await;
    let upstream = Recorder::start().await;
    let shim = Shim::start("127.0.0.1:5432".parse().unwrap()).await;
    let shim_url = db.url.replace("127.0.0.1:5432", &shim.addr.to_string());
    assert_ne!(shim_url, db.url, "the store URL names 127.0.0.1:5432");
    let r1 = Replica::start(&db.url, upstream.addr).await;
    let r3 = Replica::start(&shim_url, upstream.addr).await;
    r1.ready(1).await;
    r3.ready(1).await;
    shim.cut();
    let cut = Instant::now();
    let mut last_admitted = None;
    while cut.elapsed() < Duration::from_millis(3 * TTL_MS) {
        match r3.put("/same", 1).await {
            200 => last_admitted = Some(cut.elapsed()),
            503 => {}
            other => panic!("unexpected status {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = last_admitted.unwrap_or_default();
    println!("cut-off replica kept admitting for {kept:?} after the cut (TTL {TTL_MS} ms)");
    assert!(
        kept < Duration::from_millis(TTL_MS),
        "admitted {kept:?} after the cut"
    );
    assert_eq!(r3.put("/same", 1).await, 503, "self-fenced");
    // The advance through R1 completes once R3's lease has expired.
    let t = Instant::now();
    assert_eq!(r1.put("/b", 2).await, 200);
    assert!(t.elapsed() < Duration::from_millis(2 * TTL_MS + 1_000));
    shim.restore();
    // R3 rejoins, with the mark it missed.
    let back = eventually(10, || async {
        (r3.put("/b3", 2).await == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "R3 never rejoined:\n{}",
        r3.server.log_text()
    );
    assert_eq!(r3.put("/a", 1).await, 409);
    let v = upstream.violations();
    assert!(v.is_empty(), "{v:#?}");
}

/// A replica SIGSTOPped past its TTL: the tier advances without it, and
/// when it resumes, a stale write that was waiting in its socket is not
/// forwarded.
#[tokio::test]
async fn a_replica_paused_past_its_ttl_forwards_nothing_stale() {
    let tier = Tier::start("tier_stop").await;
    let [r1, r2, r3] = &tier.replicas[..] else {
        unreachable!()
    };
    r1.ready(1).await;
    r2.ready(1).await;
    r3.ready(1).await;
    // Stopped for real before A writes: SIGSTOP takes effect when a thread
    // of R3 gets the CPU to begin the group stop, and until then R3's
    // other threads may still admit A's write with the mark's own token
    // and forward it, legitimately (it then completes before B's advance,
    // which waits for R3's lease: seen under load, 1 run in 34, as "stale
    // write answered 200" with /a-late at the upstream 1.9 s before /b).
    stop_process(r3.pid()).await;
    let pid = r3.pid().to_string();
    // A's write reaches R3's socket while it is paused.
    let stale = tokio::spawn({
        let url = r3.url("/a-late");
        async move { put(&url, Some("1"), Some("r"), "a").await.0 }
    });
    let t = Instant::now();
    assert_eq!(r2.put("/b", 2).await, 200);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_millis(2 * TTL_MS + 1_000),
        "{waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(TTL_MS)).await;
    // Paused all along, or the case is not the one this test is about: a
    // SIGCONT from outside (the kernel sends one to every process of a
    // process group that becomes orphaned while one of them is stopped)
    // resumes R3 within its lease, and it may then admit A's write before
    // it learns of B's advance, legitimately, B's advance waiting for it.
    assert!(
        all_threads_stopped(r3.pid()),
        "R3 was resumed before its TTL by a SIGCONT from outside the test"
    );
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let status = stale.await.unwrap();
    // The guarantee is what the upstream saw; the status says why.
    let evidence = tier.evidence().await;
    let v = tier.upstream.violations();
    assert!(
        v.is_empty(),
        "{v:#?}\nstale write answered {status}\n{evidence}"
    );
    assert!(
        tier.upstream.seen().iter().all(|s| s.path != "/a-late"),
        "stale write answered {status}\n{evidence}"
    );
    assert!(
        matches!(status, 409 | 503),
        "stale write answered {status}\n{evidence}"
    );
    // And R3 rejoins with the new mark.
    let back = eventually(10, || async {
        (r3.put("/b3", 2).await == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "R3 never rejoined:\n{}",
        r3.server.log_text()
    );
}

/// Issue 12's residue (tier checker, seed 6000422): R1 admits A's token-1
/// write, and the write then waits longer than R1's replica TTL before its
/// first byte would go upstream: R1's connect to the upstream is held (a
/// [`ConnectGate`], no timer), while R1's store link is cut and R2
/// advances to 2 without R1, once R1's lease has expired in the store.
/// When the connect completes, R1 must not send A's write: 503, audited,
/// and the upstream never sees it. `renewed`: R1's store link is back
/// first and R1 has renewed its lease (learning token 2) before the
/// connect completes: a renewal must not make an admission from before
/// the lapse good again.
async fn a_write_stalled_past_the_ttl_is_not_sent(data_path: &str, renewed: bool) {
    let db = TestDb::create("tier_stall").await;
    // No keep-alive: R1 holds no idle connection, so A's write connects.
    let upstream = Recorder::with(false).await;
    let link = Shim::start("127.0.0.1:5432".parse().unwrap()).await;
    let link_url = db.url.replace("127.0.0.1:5432", &link.addr.to_string());
    assert_ne!(link_url, db.url, "the store URL names 127.0.0.1:5432");
    let mut gate = ConnectGate::start(upstream.addr).await;
    let extra = format!("data_path = \"{data_path}\"");
    let r1 = Replica::start_with(&link_url, gate.addr, &extra).await;
    let r2 = Replica::start_with(&db.url, upstream.addr, &extra).await;
    r1.ready(1).await;
    r2.ready(1).await;

    gate.hold().await;
    let admitted = r1.writes("http", "accepted").await;
    let a = tokio::spawn({
        let url = r1.url("/a-stalled");
        async move { put(&url, Some("1"), Some("r"), "a").await }
    });
    // Admitted (counted), then waiting for its connection.
    r1.wait_writes("http", "accepted", admitted).await;
    link.cut();
    // Admitted once R1's lease has expired in the store.
    assert_eq!(r2.put("/b", 2).await, 200);
    if renewed {
        link.restore();
        r1.wait_admitting().await;
    }
    let unavailable = r1.writes("http", "unavailable").await;
    gate.release();
    let (status, body) = a.await.unwrap();
    let seen: Vec<(String, u64)> = upstream
        .seen()
        .iter()
        .map(|s| (s.path.clone(), s.token))
        .collect();
    assert!(
        seen.iter().all(|(path, _)| path != "/a-stalled"),
        "A's write reached the upstream after R1's lease had lapsed (answered {status}); \
         the upstream saw {seen:?}\nR1 log:\n{}",
        r1.server.log_text()
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("urn:fencepost:fence-unavailable"), "{body}");
    assert_eq!(
        r1.writes("http", "unavailable").await,
        unavailable + 1.0,
        "counted as unavailable"
    );
    if !renewed {
        link.restore();
    }
    // Audited like every refusal (spooled while the store was away).
    r1.wait_audited("unavailable", "PUT /a-stalled").await;
    let v = upstream.violations();
    assert!(v.is_empty(), "{v:#?}");
}

#[tokio::test]
async fn a_write_stalled_past_the_ttl_is_not_sent_by_the_relay() {
    a_write_stalled_past_the_ttl_is_not_sent("relay", false).await;
}

#[tokio::test]
async fn a_write_stalled_past_the_ttl_is_not_sent_by_the_relay_after_a_renewal() {
    a_write_stalled_past_the_ttl_is_not_sent("relay", true).await;
}

#[tokio::test]
async fn a_write_stalled_past_the_ttl_is_not_sent_by_the_hyper_path() {
    a_write_stalled_past_the_ttl_is_not_sent("hyper", false).await;
}

#[tokio::test]
async fn a_write_stalled_past_the_ttl_is_not_sent_by_the_hyper_path_after_a_renewal() {
    a_write_stalled_past_the_ttl_is_not_sent("hyper", true).await;
}

/// The same residue in Postgres proxy mode, where the stall is the
/// server's: R1 admits A's token-1 INSERT, but A's session is blocked
/// behind an advisory lock the test holds (A's own statement, pipelined
/// just before), and the INSERT is larger than the sockets between R1 and
/// the server can hold, so most of it is still in R1 while R1's store link
/// is cut, R2 advances to 2 and R1 renews. When the test lets the lock go
/// the server reads again, and R1 must not write the rest: the session
/// ends with `FATAL` `ZF004` (what was sent before, the lock's `SELECT`,
/// is answered first), the INSERT never runs, and the refusal is audited.
#[tokio::test]
async fn a_postgres_write_held_past_the_ttl_is_not_sent() {
    let db = TestDb::create("tier_pg_stall").await;
    direct(&db)
        .await
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();
    let upstream = Recorder::start().await;
    let link = Shim::start("127.0.0.1:5432".parse().unwrap()).await;
    let link_url = db.url.replace("127.0.0.1:5432", &link.addr.to_string());
    let r1 = Replica::start(&link_url, upstream.addr).await;
    let r2 = Replica::start(&db.url, upstream.addr).await;
    r1.ready(1).await;
    r2.ready(1).await;
    let lock = direct(&db).await;
    lock.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let a = Arc::new(pg_client(&r1, &db, 1).await);
    a.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    // Far more than the kernel buffers between R1 and the server hold
    // while the server reads nothing (the send buffer grows to
    // tcp_wmem's maximum, the receive buffer stays near its default).
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(4 << 20);
    let size = (4 * wmem_max).max(16 << 20);
    let insert = format!("INSERT INTO t VALUES (3) /* {} */", "x".repeat(size));
    let admitted = r1.writes("postgres", "accepted").await;
    let pipeline = tokio::spawn({
        let a = Arc::clone(&a);
        async move {
            let (waited, inserted) = tokio::join!(
                a.simple_query("SELECT pg_advisory_lock(4242)"),
                a.simple_query(&insert)
            );
            (waited.map(|_| ()), inserted.map(|_| ()))
        }
    });
    r1.wait_writes("postgres", "accepted", admitted).await;
    link.cut();
    let b = pg_client(&r2, &db, 2).await;
    b.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    link.restore();
    r1.wait_admitting().await;
    lock.batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    let (waited, inserted) = pipeline.await.unwrap();
    let rows: Vec<i32> = direct(&db)
        .await
        .query("SELECT v FROM t ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        vec![1, 2],
        "A's INSERT (token 1) ran after B's (token 2); if R1 had written all of its {size} \
         bytes before the lapse, the socket buffers are larger than assumed \
         (tcp_wmem max {wmem_max})\nR1 log:\n{}",
        r1.server.log_text()
    );
    assert!(waited.is_ok(), "the statement sent before: {waited:?}");
    let e = inserted.expect_err("the INSERT must fail");
    assert_eq!(code(&e), "ZF004", "{e:?}");
    // Named by its statement, as every refusal is.
    r1.wait_audited("unavailable", "INSERT INTO t VALUES ($1)")
        .await;
}

async fn pg_client(replica: &Replica, db: &TestDb, token: u64) -> tokio_postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={} user=postgres options='{}'",
        replica.pg.port(),
        db.name,
        opts(token, "r")
    );
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

/// Postgres proxy mode across replicas: A's open transaction through R1 is
/// rolled back at COMMIT once B advanced through R2, and A's later
/// statements through R1 are refused.
#[tokio::test]
async fn postgres_writes_go_stale_across_replicas() {
    let tier = Tier::start("tier_pg").await;
    let [r1, r2, _] = &tier.replicas[..] else {
        unreachable!()
    };
    r1.ready(1).await;
    r2.ready(1).await;
    tier.replicas[2].ready(1).await;
    let a = pg_client(r1, &tier.db, 1).await;
    a.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (10)")
        .await
        .unwrap();
    let b = pg_client(r2, &tier.db, 2).await;
    b.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let e = a.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(code(&e), "ZF001");
    let e = a
        .batch_execute("INSERT INTO t VALUES (11)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "ZF001");
    let rows: Vec<i32> = direct(&tier.db)
        .await
        .query("SELECT v FROM t ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1, 2]);
}

/// `GET /v1/replicas` lists the tier, and a replica shut down gracefully
/// leaves it at once (no advance waits for its lease).
#[tokio::test]
async fn the_admin_api_lists_the_tier_and_a_graceful_stop_leaves_it() {
    let mut tier = Tier::start("tier_list").await;
    for r in &tier.replicas {
        r.ready(1).await;
    }
    let (status, body) = get(
        &format!("http://{}/v1/replicas", tier.replicas[0].admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let live = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["live"] == true)
        .count();
    assert_eq!(live, 3, "{body}");
    tier.replicas[2].server.terminate();
    let t = Instant::now();
    assert_eq!(tier.replicas[0].put("/b", 2).await, 200);
    assert!(
        t.elapsed() < Duration::from_millis(TTL_MS / 2),
        "the advance waited {:?} for a replica that had left",
        t.elapsed()
    );
    // The fence shows each replica's own mark: the replica still in the
    // tier acknowledged 2 before the advance was admitted.
    let url = format!("http://{}/v1/fences?q=r&limit=10", tier.replicas[0].admin);
    let (status, body) = get(&url, None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let fence = v
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["resource"] == "r")
        .unwrap_or_else(|| panic!("no fence r in {body}"));
    assert_eq!(fence["token"], 2, "{body}");
    let (_, me) = get(
        &format!("http://{}/v1/replicas", tier.replicas[1].admin),
        None,
    )
    .await;
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    let id = me["self"]["id"].as_str().expect("replica 1's id");
    assert_eq!(fence["replicas"][id], 2, "{body}");
}
