//! End-to-end tests of the HTTP fencing proxy: the real `fencepost serve`
//! binary between a real client and a real upstream written here.
//!
//! The upstream records every request's arrival and completion in one
//! ordered log, and can hold a request (`/hold/{name}`) until the test
//! releases it, so the races the fencing guarantees are about are forced
//! rather than hoped for, and every assertion about what reached the
//! upstream is made from the upstream's own record.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use std::path::Path;

use crate::support::{client, Conf, InProc, Resp, Section, Served, TempDir, TestDb};

// ------------------------------------------------------------ the upstream

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Arrive,
    Complete,
}

#[derive(Debug, Clone)]
struct Ev {
    /// Identifies the request; the same for its Arrive and Complete.
    id: u64,
    kind: Kind,
    method: String,
    path: String,
    token: Option<String>,
    headers: Vec<(String, String)>,
}

impl Ev {
    fn token_n(&self) -> u64 {
        self.token
            .as_deref()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }
}

#[derive(Default)]
struct UpState {
    next: AtomicU64,
    log: Mutex<Vec<Ev>>,
    holds: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl UpState {
    fn hold(&self, name: &str) -> watch::Sender<bool> {
        self.holds
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .clone()
    }
}

/// Test upstream. Paths:
/// - `/hold/{name}`: answers only once the test calls `release(name)`;
/// - `/hold-body/{name}`: sends headers at once, the body only on release;
/// - `/jitter/...`: waits 0-3 ms before answering, so writes overlap;
/// - `/source/{mib}`: streams that many MiB back;
/// - anything else: reads the whole body and answers with its length.
///
/// Responses carry a hop-by-hop header pair the proxy must strip.
struct Upstream {
    addr: SocketAddr,
    state: Arc<UpState>,
}

type UpBody = BoxBody<Bytes, Infallible>;

impl Upstream {
    async fn start() -> Arc<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpState::default());
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(up_handle(st, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Arc::new(Upstream { addr, state })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn events(&self) -> Vec<Ev> {
        self.state.log.lock().unwrap().clone()
    }

    fn arrivals(&self) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| e.kind == Kind::Arrive)
            .collect()
    }

    fn arrived(&self, path: &str) -> bool {
        self.arrivals().iter().any(|e| e.path == path)
    }

    fn release(&self, name: &str) {
        self.state.hold(name).send_replace(true);
    }

    async fn wait_arrival(&self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.arrived(path) {
            assert!(
                Instant::now() < deadline,
                "{path} never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn up_handle(st: Arc<UpState>, req: Request<Incoming>) -> Response<UpBody> {
    let id = st.next.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let ev = |kind| Ev {
        id,
        kind,
        method: req.method().to_string(),
        path: path.clone(),
        token: req
            .headers()
            .get("fencing-token")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let arrive = ev(Kind::Arrive);
    let complete = ev(Kind::Complete);
    st.log.lock().unwrap().push(arrive);

    if let Some(mib) = path.strip_prefix("/source/") {
        let mib: usize = mib.parse().unwrap_or(1);
        let chunk = Bytes::from(vec![0xcd; 1 << 20]);
        let frames = futures_util::stream::iter(
            (0..mib).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
        );
        st.log.lock().unwrap().push(complete);
        return Response::new(BodyExt::boxed(StreamBody::new(frames)));
    }

    let mut body = req.into_body();
    let mut n: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    if let Some(name) = path.strip_prefix("/hold-body/") {
        // Headers now, the rest of the answer only once released: the
        // write is not complete until its body has ended.
        let rx = st.hold(name).subscribe();
        let tail = futures_util::stream::once(async move {
            let mut rx = rx;
            let _ = rx.wait_for(|released| *released).await;
            st.log.lock().unwrap().push(complete);
            Ok::<_, Infallible>(Frame::data(Bytes::from(n.to_string())))
        });
        return Response::new(BodyExt::boxed(StreamBody::new(tail)));
    }
    if let Some(name) = path.strip_prefix("/hold/") {
        let mut rx = st.hold(name).subscribe();
        let _ = rx.wait_for(|released| *released).await;
    }
    if path.starts_with("/jitter/") {
        let us = rand::random::<u64>() % 3000;
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
    st.log.lock().unwrap().push(complete);
    let mut resp = Response::new(BodyExt::boxed(Full::new(Bytes::from(n.to_string()))));
    let h = resp.headers_mut();
    h.insert("connection", "x-up-secret".parse().unwrap());
    h.insert("x-up-secret", "1".parse().unwrap());
    resp
}

// ------------------------------------------------------------ the proxy

/// A config with an admin API and a fast audit flush, over a SQLite
/// store in `dir`; returns it with the admin API's address.
fn config(dir: &Path) -> (Conf, SocketAddr) {
    let mut conf = Conf::sqlite(dir);
    conf.set("audit", "flush_interval", "20ms");
    let admin = conf.admin(Section::new());
    (conf, admin)
}

/// One proxy in front of one test upstream, with an admin API.
struct Env {
    _dir: TempDir,
    server: Served,
    upstream: Arc<Upstream>,
    proxy: SocketAddr,
    admin: SocketAddr,
    c: reqwest::Client,
}

impl Env {
    /// In-process; `http` shapes the `[[http]]` section, `fencing` sets
    /// keys of `[fencing]`.
    async fn start(http: impl FnOnce(Section) -> Section, fencing: &[(&str, &str)]) -> Env {
        Env::start_as(false, http, fencing).await
    }

    /// As a `fencepost serve` process (kill -9, SIGTERM, its memory).
    async fn process() -> Env {
        Env::start_as(true, |h| h, &[]).await
    }

    async fn start_as(
        process: bool,
        http: impl FnOnce(Section) -> Section,
        fencing: &[(&str, &str)],
    ) -> Env {
        let dir = TempDir::new("fp-http");
        let upstream = Upstream::start().await;
        let (mut conf, admin) = config(dir.path());
        for (k, v) in fencing {
            conf.set("fencing", k, *v);
        }
        let proxy = conf.http(http(Section::to(upstream.url())));
        Env {
            server: Served::start(process, dir.path(), conf).await,
            _dir: dir,
            upstream,
            proxy,
            admin,
            c: client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    async fn put(&self, path: &str, resource: Option<&str>, token: Option<&str>) -> Resp {
        send(self.c.put(self.url(path)).body("x"), resource, token).await
    }

    async fn audit(&self, query: &str) -> Vec<Value> {
        let resp = self
            .c
            .get(format!(
                "http://{}/v1/audit?kind=refused_write&{query}",
                self.admin
            ))
            .send()
            .await
            .expect("admin API reachable");
        assert_eq!(resp.status(), 200, "GET /v1/audit");
        match resp.json::<Value>().await.expect("audit JSON") {
            Value::Array(a) => a,
            other => panic!("/v1/audit is not an array: {other}"),
        }
    }

    /// Polls the audit log until `pred` holds (bounded), then returns it.
    async fn audit_until(&self, query: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let recs = self.audit(query).await;
            if pred(&recs) {
                return recs;
            }
            assert!(
                Instant::now() < deadline,
                "audit log never matched; last: {recs:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn fence(&self, resource: &str) -> Option<u64> {
        let resp = self
            .c
            .get(format!("http://{}/v1/fences/{resource}", self.admin))
            .send()
            .await
            .ok()?;
        if resp.status() != 200 {
            return None;
        }
        num(resp.json::<Value>().await.ok()?.get("token")?)
    }
}

/// Sends `req` with the fencing headers given.
async fn send(
    mut req: reqwest::RequestBuilder,
    resource: Option<&str>,
    token: Option<&str>,
) -> Resp {
    if let Some(r) = resource {
        req = req.header("fencing-resource", r);
    }
    if let Some(t) = token {
        req = req.header("fencing-token", t);
    }
    crate::support::send(req).await
}

fn num(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RSS until dropped; `peak()` is the highest seen.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        RssWatch { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ------------------------------------------------------------ tests

/// A routed path belongs to its route's resource: neither a header naming
/// another resource nor a path that climbs out of the route (which the
/// upstream may resolve to another route's path) gets a write past the
/// fence of the resource whose path it writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_cannot_leave_its_route_by_header_or_by_path() {
    let env = Env::start(
        |h| {
            h.raw(
                "routes",
                r#"[{ prefix = "/orders/", resource = "orders" }, { prefix = "/payments/", resource = "payments" }]"#,
            )
        },
        &[],
    )
    .await;
    assert_eq!(env.put("/orders/1", None, Some("1")).await.status, 200);
    assert_eq!(env.put("/payments/1", None, Some("5")).await.status, 200);
    // The old payments leader (token 4) is fenced on its own route ...
    assert_eq!(env.put("/payments/2", None, Some("4")).await.status, 409);
    // ... and may not borrow the orders fence for a payments path ...
    let by_header = env.put("/payments/3", Some("orders"), Some("1")).await;
    assert_eq!(by_header.status, 400, "{by_header:?}");
    assert_eq!(by_header.problem_type(), "urn:fencepost:invalid-resource");
    assert!(
        by_header.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("payments")),
        "{by_header:?}"
    );
    // ... nor climb there from the orders route. Sent raw: an HTTP
    // client library would resolve the dot segments itself.
    let escapes = [
        "/orders/../payments/4",
        "/orders/%2e%2e/payments/5",
        "/orders/..%2Fpayments/6",
    ];
    for path in escapes {
        let mut s = TcpStream::connect(env.proxy).await.expect("connect");
        let req = format!(
            "PUT {path} HTTP/1.1\r\nhost: x\r\nfencing-token: 1\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx"
        );
        s.write_all(req.as_bytes()).await.expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(
            answer.contains("urn:fencepost:invalid-resource"),
            "{path}: {answer}"
        );
    }
    assert_eq!(
        env.upstream.arrivals().len(),
        2,
        "only the two admitted writes reached the upstream"
    );
    // Each refusal is audited as an invalid request.
    let refused = 1 + escapes.len();
    let invalid = |recs: &[Value]| recs.iter().filter(|r| r["reason"] == "invalid").count();
    let recs = env
        .audit_until("limit=100", |recs| invalid(recs) >= refused)
        .await;
    assert_eq!(invalid(&recs), refused, "{recs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_write_gets_409_is_never_forwarded_and_audited_once() {
    let env = Env::start(
        |h| {
            h.raw(
                "routes",
                r#"[{ prefix = "/orders/", resource = "orders" }]"#,
            )
        },
        &[],
    )
    .await;

    let ok = env.put("/orders/1", None, Some("10")).await;
    assert_eq!(ok.status, 200, "{ok:?}");

    let stale = env.put("/orders/2", None, Some("9")).await;
    assert_eq!(stale.status, 409, "{stale:?}");
    assert_eq!(stale.header("fencing-current-token"), Some("10"));
    assert_eq!(
        stale.header("content-type"),
        Some("application/problem+json")
    );
    let p = &stale.body;
    assert_eq!(p["type"], "urn:fencepost:stale-token");
    assert_eq!(p["status"], 409);
    assert_eq!(p["resource"], "orders");
    assert_eq!(num(&p["presented_token"]), Some(9));
    assert_eq!(num(&p["current_token"]), Some(10));
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{p}");

    // The header names the resource too, on a path no route covers.
    let by_header = env.put("/elsewhere", Some("orders"), Some("8")).await;
    assert_eq!(by_header.status, 409, "{by_header:?}");

    assert!(
        !env.upstream.arrived("/orders/2"),
        "the stale write reached the upstream"
    );
    assert!(
        !env.upstream.arrived("/elsewhere"),
        "the stale write reached the upstream"
    );
    assert_eq!(env.upstream.arrivals().len(), 1);

    let is_stale_9 = |r: &Value| r["reason"] == "stale" && num(&r["presented_token"]) == Some(9);
    env.audit_until("resource=orders", |recs| recs.iter().any(is_stale_9))
        .await;
    // Past several flush intervals: a duplicate would have landed by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = env.audit("resource=orders").await;
    let hits: Vec<&Value> = recs.iter().filter(|r| is_stale_9(r)).collect();
    assert_eq!(
        hits.len(),
        1,
        "exactly one audit record per refusal: {recs:?}"
    );
    let r = hits[0];
    assert_eq!(r["protocol"], "http");
    assert_eq!(num(&r["current_token"]), Some(10));
    assert_eq!(r["detail"], "PUT /orders/2");
    assert!(
        r["client_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1")),
        "{r}"
    );
    assert_eq!(
        recs.len(),
        2,
        "one record for each of the two refusals: {recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn newer_token_waits_for_older_write_to_complete_at_the_upstream() {
    let env = Arc::new(Env::start(|h| h, &[("drain_timeout", "20s")]).await);
    // Held before the upstream's response headers, then after them.
    drain_case(&env, "/hold/", 5, 6).await;
    drain_case(&env, "/hold-body/", 7, 8).await;
}

/// A client that hangs up while its write is still at the upstream must
/// not take the write's guard with it: hyper drops the request's future,
/// but the upstream may still be applying the write, so a newer token
/// waits until the upstream has really answered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_hanging_up_mid_write_keeps_the_drain_waiting() {
    let env = Arc::new(Env::start(|h| h, &[("drain_timeout", "20s")]).await);
    // Held before the upstream's response headers, then after them.
    for (hold, old, new) in [("/hold/", 5u64, 6u64), ("/hold-body/", 7, 8)] {
        let held_path = format!("{hold}h{old}");
        let new_path = format!("/h{new}");
        let e = Arc::clone(&env);
        let (p, t) = (held_path.clone(), old.to_string());
        let held = tokio::spawn(async move { e.put(&p, Some("hang"), Some(&t)).await });
        env.upstream.wait_arrival(&held_path).await;
        // The client hangs up: its connection to the proxy closes.
        held.abort();
        assert!(held.await.is_err(), "the held request was cancelled");
        tokio::time::sleep(Duration::from_millis(200)).await;

        let e = Arc::clone(&env);
        let (p, t) = (new_path.clone(), new.to_string());
        let newer = tokio::spawn(async move { e.put(&p, Some("hang"), Some(&t)).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !env.upstream.arrived(&new_path),
            "token {new} was forwarded while the hung-up write of token {old} was still at the upstream ({hold})"
        );
        env.upstream.release(&format!("h{old}"));
        let newer = newer.await.unwrap();
        assert_eq!(newer.status, 200, "{newer:?}");
        let log = env.upstream.events();
        let pos = |path: &str, kind| {
            log.iter()
                .position(|e| e.path == path && e.kind == kind)
                .unwrap()
        };
        assert!(
            pos(&held_path, Kind::Complete) < pos(&new_path, Kind::Arrive),
            "token {new} arrived before token {old} completed: {log:?}"
        );
    }
}

/// Token `old`'s write is held at the upstream (under `hold`); token `new`
/// must not be forwarded until it has completed, while `old` is refused
/// from the moment `new` claimed the fence.
async fn drain_case(env: &Arc<Env>, hold: &str, old: u64, new: u64) {
    let (old_s, new_s) = (old.to_string(), new.to_string());
    let held_path = format!("{hold}d{old}");
    let new_path = format!("/w{new}");
    let e = Arc::clone(env);
    let (p, t) = (held_path.clone(), old_s.clone());
    let held = tokio::spawn(async move { e.put(&p, Some("drain"), Some(&t)).await });
    env.upstream.wait_arrival(&held_path).await;

    let e = Arc::clone(env);
    let (p, t) = (new_path.clone(), new_s.clone());
    let newer = tokio::spawn(async move { e.put(&p, Some("drain"), Some(&t)).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.fence("drain").await != Some(new) {
        assert!(
            Instant::now() < deadline,
            "token {new} never became durable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // From the claim on, `old` is stale, although `new` is not forwarded yet.
    let late_path = format!("/late{old}");
    let late = env.put(&late_path, Some("drain"), Some(&old_s)).await;
    assert_eq!(late.status, 409, "{late:?}");
    assert_eq!(num(&late.body["current_token"]), Some(new));

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !env.upstream.arrived(&new_path),
        "token {new} was forwarded while token {old} was still in flight ({hold})"
    );
    assert!(
        !newer.is_finished(),
        "token {new} answered before the drain"
    );

    env.upstream.release(&format!("d{old}"));
    let held = held.await.unwrap();
    assert_eq!(held.status, 200, "{held:?}");
    assert_eq!(held.text, "1", "the held write's full answer");
    let newer = newer.await.unwrap();
    assert_eq!(newer.status, 200, "{newer:?}");

    let log = env.upstream.events();
    let pos = |path: &str, kind| {
        log.iter()
            .position(|e| e.path == path && e.kind == kind)
            .unwrap()
    };
    assert!(
        pos(&held_path, Kind::Complete) < pos(&new_path, Kind::Arrive),
        "token {new} arrived before token {old} completed: {log:?}"
    );
    assert!(!env.upstream.arrived(&late_path));

    let again = format!("/late{old}-again");
    assert_eq!(
        env.put(&again, Some("drain"), Some(&old_s)).await.status,
        409
    );
    assert!(!env.upstream.arrived(&again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_token_is_still_refused_after_kill_9_and_restart() {
    let mut env = Env::process().await;
    assert_eq!(env.put("/a", Some("dur"), Some("7")).await.status, 200);
    // The first write with 8 is forwarded only once 8 is durable.
    assert_eq!(env.put("/b", Some("dur"), Some("8")).await.status, 200);

    env.server.process().restart();
    env.server.process().wait_ready().await;

    let stale = env.put("/c", Some("dur"), Some("7")).await;
    assert_eq!(stale.status, 409, "{stale:?}");
    assert_eq!(stale.header("fencing-current-token"), Some("8"));
    assert!(!env.upstream.arrived("/c"));
    assert_eq!(env.put("/d", Some("dur"), Some("8")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_writers_across_failovers_never_land_out_of_order() {
    let env = Arc::new(Env::start(|h| h, &[]).await);
    let leader = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16 {
        let (env, leader, stop) = (Arc::clone(&env), Arc::clone(&leader), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut statuses = HashMap::<u16, u32>::new();
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                let current = leader.load(Ordering::SeqCst);
                // Some writers lag a failover behind, as deposed leaders do.
                let token = if current > 1 && rand::random::<u8>() < 85 {
                    current - 1
                } else {
                    current
                };
                let r = env
                    .put(
                        &format!("/jitter/{w}-{k}"),
                        Some("conc"),
                        Some(&token.to_string()),
                    )
                    .await;
                *statuses.entry(r.status).or_default() += 1;
                k += 1;
            }
            statuses
        }));
    }
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        leader.fetch_add(1, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    stop.store(true, Ordering::SeqCst);
    let mut totals = HashMap::<u16, u32>::new();
    for w in writers {
        for (s, n) in w.await.unwrap() {
            *totals.entry(s).or_default() += n;
        }
    }
    assert!(
        totals.keys().all(|s| *s == 200 || *s == 409),
        "only admitted or stale answers expected: {totals:?}"
    );
    assert!(
        totals.get(&409).copied().unwrap_or(0) > 0,
        "no stale write was attempted: {totals:?}"
    );

    // Replay the upstream's own log: arrivals never go back in token, and
    // when a newer token first arrives nothing older is still in flight.
    let log: Vec<Ev> = env
        .upstream
        .events()
        .into_iter()
        .filter(|e| e.path.starts_with("/jitter/"))
        .collect();
    let mut inflight = HashMap::<u64, i64>::new();
    let mut high = 0;
    let mut tokens_seen = 0;
    for e in &log {
        let t = e.token_n();
        match e.kind {
            Kind::Arrive => {
                assert!(
                    t >= high,
                    "token {t} arrived after token {high} (request {})",
                    e.id
                );
                if t > high {
                    let older: i64 = inflight
                        .iter()
                        .filter(|(k, _)| **k < t)
                        .map(|(_, n)| *n)
                        .sum();
                    assert_eq!(
                        older, 0,
                        "token {t} arrived while {older} older writes were in flight"
                    );
                    high = t;
                    tokens_seen += 1;
                }
                *inflight.entry(t).or_default() += 1;
            }
            Kind::Complete => *inflight.entry(t).or_default() -= 1,
        }
    }
    assert!(
        tokens_seen >= 5,
        "too few failovers reached the upstream ({tokens_seen}); {totals:?}"
    );
    assert_eq!(
        log.iter().filter(|e| e.kind == Kind::Arrive).count() as u32,
        totals[&200],
        "every admitted write, and nothing else, reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_64_mib_body_streams_through_both_ways_without_the_proxy_holding_it() {
    const MIB: usize = 1 << 20;
    let mut env = Env::process().await;
    let pid = env.server.process().child.as_ref().unwrap().id();
    // Warm up: first requests allocate pools and buffers once.
    assert_eq!(env.put("/warm", Some("big"), Some("1")).await.status, 200);
    let baseline = rss_kib(pid);

    let watch = RssWatch::start(pid);
    let chunk = Bytes::from(vec![0xab; MIB]);
    let stream =
        futures_util::stream::iter((0..64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let up = send(
        env.c
            .put(env.url("/sink"))
            .body(reqwest::Body::wrap_stream(stream)),
        Some("big"),
        Some("1"),
    )
    .await;
    assert_eq!(up.status, 200, "{up:?}");
    assert_eq!(
        up.text,
        (64 * MIB).to_string(),
        "the upstream got every byte"
    );

    let mut down = env.c.get(env.url("/source/64")).send().await.unwrap();
    assert_eq!(down.status(), 200);
    let mut got = 0;
    while let Some(c) = down.chunk().await.unwrap() {
        got += c.len();
    }
    assert_eq!(got, 64 * MIB);

    let peak = watch.peak();
    let grew_mib = peak.saturating_sub(baseline) / 1024;
    assert!(
        grew_mib < 16,
        "proxy RSS grew by {grew_mib} MiB (baseline {baseline} kB, peak {peak} kB) for a 64 MiB body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_malformed_and_duplicate_tokens_and_bad_resources_get_contract_codes() {
    let env = Env::start(
        |h| {
            h.raw(
                "routes",
                r#"[{ prefix = "/orders/", resource = "orders" }]"#,
            )
        },
        &[],
    )
    .await;
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no token",
            env.c.put(env.url("/orders/1")),
            428,
            "urn:fencepost:token-required",
        ),
        (
            "no token, no resource",
            env.c.post(env.url("/x")),
            428,
            "urn:fencepost:token-required",
        ),
        (
            "no resource",
            env.c.delete(env.url("/x")).header("fencing-token", "3"),
            428,
            "urn:fencepost:resource-required",
        ),
        (
            "letters",
            env.c
                .put(env.url("/orders/1"))
                .header("fencing-token", "abc"),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "negative",
            env.c
                .put(env.url("/orders/1"))
                .header("fencing-token", "-1"),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "2^64",
            env.c
                .put(env.url("/orders/1"))
                .header("fencing-token", "18446744073709551616"),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "hex",
            env.c
                .patch(env.url("/orders/1"))
                .header("fencing-token", "0x10"),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "empty",
            env.c.put(env.url("/orders/1")).header("fencing-token", ""),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "duplicate",
            env.c
                .put(env.url("/orders/1"))
                .header("fencing-token", "3")
                .header("fencing-token", "3"),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "not text",
            env.c.put(env.url("/orders/1")).header(
                "fencing-token",
                reqwest::header::HeaderValue::from_bytes(b"3\xff").unwrap(),
            ),
            400,
            "urn:fencepost:invalid-token",
        ),
        (
            "bad resource",
            env.c
                .put(env.url("/x"))
                .header("fencing-token", "3")
                .header("fencing-resource", "no spaces!"),
            400,
            "urn:fencepost:invalid-resource",
        ),
        (
            "long resource",
            env.c
                .put(env.url("/x"))
                .header("fencing-token", "3")
                .header("fencing-resource", "r".repeat(129)),
            400,
            "urn:fencepost:invalid-resource",
        ),
        (
            "duplicate resource",
            env.c
                .put(env.url("/x"))
                .header("fencing-token", "3")
                .header("fencing-resource", "a")
                .header("fencing-resource", "b"),
            400,
            "urn:fencepost:invalid-resource",
        ),
        (
            "extension method",
            env.c.request(
                reqwest::Method::from_bytes(b"PURGE").unwrap(),
                env.url("/orders/1"),
            ),
            428,
            "urn:fencepost:token-required",
        ),
    ];
    let n = cases.len();
    for (what, req, status, kind) in cases {
        let r = send(req, None, None).await;
        assert_eq!(r.status, status, "{what}: {r:?}");
        assert_eq!(r.problem_type(), kind, "{what}: {r:?}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
    }
    assert!(
        env.upstream.arrivals().is_empty(),
        "a refused write reached the upstream"
    );

    // Every refusal is audited once.
    let recs = env.audit_until("limit=1000", |recs| recs.len() >= n).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recs_after = env.audit("limit=1000").await;
    assert_eq!(
        recs_after.len(),
        n,
        "one audit record per refusal: {recs:?}"
    );
    let missing = recs_after
        .iter()
        .filter(|r| r["reason"] == "missing")
        .count();
    assert_eq!(missing, 4, "{recs_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_pass_without_a_token_and_headers_are_rewritten() {
    let env = Env::start(
        |h| {
            h.raw(
                "routes",
                r#"[{ prefix = "/orders/", resource = "orders" }]"#,
            )
        },
        &[],
    )
    .await;
    let get = send(env.c.get(env.url("/orders/1")), None, None).await;
    assert_eq!(get.status, 200, "{get:?}");
    let head = env.c.head(env.url("/orders/2")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let arrivals = env.upstream.arrivals();
    assert!(arrivals
        .iter()
        .any(|e| e.path == "/orders/1" && e.method == "GET"));
    assert!(arrivals
        .iter()
        .any(|e| e.path == "/orders/2" && e.method == "HEAD"));

    // Raw request, so the hop-by-hop headers go out exactly as written.
    let mut s = TcpStream::connect(env.proxy).await.unwrap();
    s.write_all(
        b"GET /echo HTTP/1.1\r\nHost: client.example\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 10.1.2.3\r\n\
          X-Kept: yes\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "proxy closed the connection");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("x-up-secret"),
        "a header the upstream's Connection named came back: {head}"
    );

    let ev = env
        .upstream
        .arrivals()
        .into_iter()
        .find(|e| e.path == "/echo")
        .unwrap();
    let h: HashMap<&str, &str> = ev
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        h.get("host").copied(),
        Some(env.upstream.addr.to_string().as_str())
    );
    assert_eq!(
        h.get("x-forwarded-for").copied(),
        Some("10.1.2.3, 127.0.0.1")
    );
    assert_eq!(h.get("x-kept").copied(), Some("yes"));
    for gone in ["x-secret", "keep-alive", "te", "proxy-connection"] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_upstream_is_502_and_hung_upstream_is_504_within_the_timeout() {
    let dir = TempDir::new("fp-http-up");
    let upstream = Upstream::start().await;
    // Port 1: nothing listens there, and no other test can bind it.
    let dead_upstream = "http://127.0.0.1:1";
    let (mut conf, admin) = config(dir.path());
    conf.set("fencing", "drain_timeout", "3s");
    let dead_px = conf.http(Section::to(dead_upstream));
    let slow_px = conf.http(Section::to(upstream.url()).set("upstream_timeout", "1s"));
    // A process: the test reads /metrics, whose recorder is per process.
    let _server = Served::start(true, dir.path(), conf).await;
    let c = client();

    let r = send(c.get(format!("http://{dead_px}/x")), None, None).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.problem_type(), "urn:fencepost:upstream-unreachable");
    let r = send(
        c.put(format!("http://{dead_px}/x")),
        Some("gone"),
        Some("1"),
    )
    .await;
    assert_eq!(r.status, 502, "{r:?}");

    let started = Instant::now();
    let r = send(
        c.put(format!("http://{slow_px}/hold/never")),
        Some("slow"),
        Some("1"),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.problem_type(), "urn:fencepost:upstream-timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "504 after {took:?}"
    );
    // The timed-out write no longer holds the fence: a newer token passes
    // at once instead of waiting out the drain timeout.
    let r = send(
        c.put(format!("http://{slow_px}/ok")),
        Some("slow"),
        Some("2"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    let metrics = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fencepost_upstream_errors_total") && l.contains("http"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 3.0, "upstream errors not counted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_client_does_not_stop_others_from_being_served() {
    let env = Env::start(
        |h| h.set("header_read_timeout", "1s").set("idle_timeout", "1s"),
        &[("drain_timeout", "10s")],
    )
    .await;
    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(env.proxy).await.unwrap();
        s.write_all(b"PUT /orders/1 HTTP/1.1\r\nHost: x\r\nFencing-Tok")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    let r = send(env.c.get(env.url("/fine")), None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served only after {:?}",
        started.elapsed()
    );

    // And the stalled connections are cut once their header time is up.
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match slow[0].read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 may come first
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled header kept its connection open");

    // A header past max_header_bytes is refused, not buffered.
    let flood = send(
        env.c
            .get(env.url("/flood"))
            .header("x-flood", "a".repeat(80 * 1024)),
        None,
        None,
    )
    .await;
    assert_eq!(flood.status, 431, "{flood:?}");

    // A writer that stops mid-body is cut off and lets go of the fence: a
    // newer token does not wait out the drain timeout behind it.
    let mut stalled = TcpStream::connect(env.proxy).await.unwrap();
    stalled
        .write_all(
            b"PUT /stall HTTP/1.1\r\nHost: x\r\nFencing-Resource: stall\r\nFencing-Token: 1\r\n\
              Content-Length: 100\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    env.upstream.wait_arrival("/stall").await;
    let started = Instant::now();
    let next = env.put("/after-stall", Some("stall"), Some("2")).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the newer token waited {:?} behind a stalled upload",
        started.elapsed()
    );
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// `workers = 2`: the relay on its own current-thread runtimes, each
/// accepting on the listener with its own upstream connections, answers
/// and fences as the shared runtime does, over many connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_threads_serve_and_fence() {
    let env = Env::start(|h| h.set("workers", 2), &[]).await;
    let mut conns = Vec::new();
    for i in 0..8 {
        conns.push(client());
        let r = send(conns[i].get(env.url(&format!("/r/{i}"))), None, None).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(
        env.put("/w/1", Some("threads"), Some("5")).await.status,
        200
    );
    for (i, c) in conns.iter().enumerate() {
        let r = send(
            c.put(env.url(&format!("/w/old{i}"))),
            Some("threads"),
            Some("4"),
        )
        .await;
        assert_eq!(r.status, 409, "{r:?}");
        let r = send(
            c.put(env.url(&format!("/w/same{i}"))),
            Some("threads"),
            Some("5"),
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(env
        .upstream
        .arrivals()
        .iter()
        .all(|e| !e.path.starts_with("/w/old")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_past_the_concurrency_bound_get_503_with_retry_after() {
    let env = Arc::new(Env::start(|h| h.set("max_concurrent_requests", 2), &[]).await);
    let mut held = Vec::new();
    for name in ["c1", "c2"] {
        let e = Arc::clone(&env);
        held.push(tokio::spawn(async move {
            send(e.c.get(e.url(&format!("/hold/{name}"))), None, None).await
        }));
        env.upstream.wait_arrival(&format!("/hold/{name}")).await;
    }
    let r = send(env.c.get(env.url("/third")), None, None).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(!env.upstream.arrived("/third"));
    env.upstream.release("c1");
    env.upstream.release("c2");
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    assert_eq!(
        send(env.c.get(env.url("/fourth")), None, None).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_fail_closed_with_503_when_the_store_is_down() {
    let dir = TempDir::new("fp-http-store");
    let upstream = Upstream::start().await;
    let mut conf = Conf::unreachable_store("postgres://postgres@127.0.0.1:1/x");
    conf.set("fencing", "store_timeout", "1s");
    let proxy = conf.http(Section::to(upstream.url()));
    let server = Served::start(false, dir.path(), conf).await;
    let c = client();

    let r = send(c.put(format!("http://{proxy}/w")), Some("down"), Some("1")).await;
    assert_eq!(r.status, 503, "{r:?}\n{}", server.log_text());
    assert_eq!(r.problem_type(), "urn:fencepost:fence-unavailable");
    assert!(r.header("retry-after").is_some());
    assert!(
        !upstream.arrived("/w"),
        "a write was admitted without fence state"
    );

    // Reads need no fence state.
    assert_eq!(
        send(c.get(format!("http://{proxy}/r")), None, None)
            .await
            .status,
        200
    );
}

/// `store_timeout` is the whole bound on a store call, whatever its size:
/// nothing beneath it (the Postgres store once cut every call at a fixed
/// 5 s) may cut a call shorter. A store that stalls 6 s is waited out with
/// `store_timeout = "8s"`, and the write lands; with `"2s"` the same stall
/// refuses it, fail closed, after about 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_timeout_above_five_seconds_is_honoured() {
    let db = TestDb::create("fp_http_slow").await;
    let upstream = Upstream::start().await;
    let c = client();
    for (timeout, admitted) in [("8s", true), ("2s", false)] {
        let dir = TempDir::new("fp-http-slow");
        let shim = StallShim::start(&db.url).await;
        let store = shim.url.clone();
        let mut conf = Conf::store(store);
        conf.set("fencing", "store_timeout", timeout);
        // A replica lease longer than the stall: this test is about
        // store_timeout, not about a replica self-fencing.
        conf.set("cluster", "replica_ttl", "30s");
        let proxy = conf.http(Section::to(upstream.url()));
        let server = Served::start(false, dir.path(), conf).await;
        // The store answers: a first write lands (and the pool is warm).
        let warm = format!("warm-{timeout}");
        let r = send(
            c.put(format!("http://{proxy}/{warm}")),
            Some(&warm),
            Some("1"),
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}\n{}", server.log_text());

        shim.stall(Duration::from_secs(6));
        let slow = format!("slow-{timeout}");
        let t = Instant::now();
        let r = send(
            c.put(format!("http://{proxy}/{slow}")),
            Some(&slow),
            Some("1"),
        )
        .await;
        let took = t.elapsed();
        if admitted {
            assert_eq!(r.status, 200, "{r:?} after {took:?}\n{}", server.log_text());
            assert!(
                took >= Duration::from_secs(5),
                "the stall was real: {took:?}"
            );
            assert!(upstream.arrived(&format!("/{slow}")));
        } else {
            assert_eq!(r.status, 503, "{r:?} after {took:?}");
            assert_eq!(r.problem_type(), "urn:fencepost:fence-unavailable");
            assert!(
                took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
                "refused at the configured bound: {took:?}"
            );
            assert!(!upstream.arrived(&format!("/{slow}")));
        }
        drop(server);
    }
}

/// A TCP forwarder to a Postgres server that can hold every byte, both
/// ways, for a while: a store host that hangs without resetting anything.
struct StallShim {
    /// `url` with the shim's address in place of the server's.
    url: String,
    until: Arc<Mutex<tokio::time::Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl StallShim {
    async fn start(url: &str) -> StallShim {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let (user, rest) = rest.split_once('@').map_or(("", rest), |(u, r)| (u, r));
        let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
        let target = tokio::net::lookup_host(hostport)
            .await
            .expect("resolve the store")
            .next()
            .expect("an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let at = if user.is_empty() {
            String::new()
        } else {
            format!("{user}@")
        };
        let until = Arc::new(Mutex::new(tokio::time::Instant::now()));
        let held = Arc::clone(&until);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, Arc::clone(&held)));
                tokio::spawn(Self::pipe(sr, cw, Arc::clone(&held)));
            }
        });
        StallShim {
            url: format!("{scheme}://{at}{addr}/{path}"),
            until,
            task,
        }
    }

    /// Holds whatever arrives, either way, until `d` from now.
    fn stall(&self, d: Duration) {
        *self.until.lock().unwrap() = tokio::time::Instant::now() + d;
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        until: Arc<Mutex<tokio::time::Instant>>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let hold = *until.lock().unwrap();
            tokio::time::sleep_until(hold).await;
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for StallShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_seen_on_the_elector_watch_fences_the_old_leader_before_the_new_one_writes() {
    grant_fences_via_the_watch(None, false).await;
}

/// The watch must get through an elector that demands a bearer token:
/// given as `elector_token`, or taken from this config's `[elector]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_elector_watch_presents_the_elector_bearer_token() {
    grant_fences_via_the_watch(Some("w4tch-s3cret"), true).await;
    grant_fences_via_the_watch(Some("w4tch-s3cret"), false).await;
}

async fn grant_fences_via_the_watch(bearer: Option<&'static str>, explicit: bool) {
    let dir = TempDir::new("fp-http-elector");
    let upstream = Upstream::start().await;
    let (mut conf, _admin) = config(dir.path());
    let mut el = Section::new();
    if let Some(t) = bearer {
        el = el.set("token", t);
    }
    let elector = conf.elector(el);
    let mut http = Section::to(upstream.url())
        .set("elector_watch", format!("http://{elector}"))
        .raw("routes", r#"[{ prefix = "/acct/", resource = "acct" }]"#);
    if let Some(t) = bearer.filter(|_| explicit) {
        http = http.set("elector_token", t);
    }
    let proxy = conf.http(http);
    let _server = InProc::start(conf).await;
    let c = client();
    let el = format!("http://{elector}/v1/leases/acct");
    let auth = move |r: reqwest::RequestBuilder| match bearer {
        Some(t) => r.bearer_auth(t),
        None => r,
    };

    let acquire = |holder: &'static str| {
        let c = c.clone();
        let el = el.clone();
        async move {
            let r = auth(c.post(format!("{el}/acquire")))
                .json(&serde_json::json!({"holder": holder, "ttl_ms": 60_000}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "acquire for {holder}");
            let v: Value = r.json().await.unwrap();
            match &v["token"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }
        }
    };
    let token_a = acquire("a").await;
    let w = send(
        c.put(format!("http://{proxy}/acct/1")),
        None,
        Some(&token_a),
    )
    .await;
    assert_eq!(w.status, 200, "{w:?}");

    let r = auth(c.post(format!("{el}/release")))
        .json(&serde_json::json!({"holder": "a", "token": token_a}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "release: {}", r.status());
    let token_b = acquire("b").await;
    let b: u64 = token_b.split('.').next().unwrap().parse().unwrap();
    assert!(b > token_a.parse().unwrap());

    // No write with token b is sent; only the grant can fence a out.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut k = 0;
    let refused = loop {
        k += 1;
        let r = send(
            c.put(format!("http://{proxy}/acct/old-{k}")),
            None,
            Some(&token_a),
        )
        .await;
        if r.status == 409 {
            break r;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "the grant of token {b} never fenced token {token_a}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(num(&refused.body["current_token"]), Some(b));
    assert!(upstream
        .arrivals()
        .iter()
        .all(|e| e.token.as_deref() != Some(token_b.as_str())));
    assert!(!upstream.arrived(&format!("/acct/old-{k}")));

    let w = send(
        c.put(format!("http://{proxy}/acct/2")),
        None,
        Some(&token_b),
    )
    .await;
    assert_eq!(w.status, 200, "{w:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_stops_accepting_and_finishes_the_write_in_flight() {
    let mut env = Env::process().await;
    let env_c = env.c.clone();
    let url = env.url("/hold/sd");
    let held = tokio::spawn(async move { send(env_c.put(url), Some("sd"), Some("1")).await });
    env.upstream.wait_arrival("/hold/sd").await;

    let mut child = env.server.process().child.take().unwrap();
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(env.proxy).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited with a write in flight"
    );

    env.upstream.release("sd");
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
