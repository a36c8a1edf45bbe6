//! Hostile input and load against the real `fencepost serve` binary, over
//! real sockets: connection floods past `max_connections`, slowloris on
//! both proxies, oversized messages and headers, garbage on every port,
//! a client that vanishes in the middle of a COPY, and on TLS listeners
//! handshake floods, garbage, byte-a-time ClientHellos and plaintext.
//!
//! The abuse tests keep a well-behaved client writing through both
//! proxies with a valid token while the abuse goes on, assert that every
//! one of its writes succeeds, and print its latency before and during
//! the abuse (run with `--nocapture` to see the figures). Nothing the
//! abuse does may panic the proxy or kill it, and its memory must stay
//! bounded. Figures are printed, never compared with fixed expectations;
//! the only time bounds are the abusers' own timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_postgres::NoTls;

use crate::support::{direct, get, opts, Conf, Section, Server, TempDir, TestDb, Upstream};

// ------------------------------------------------------------------ setup

/// Settings a test varies; everything else is the default.
struct Limits {
    max_connections: usize,
    startup_timeout: &'static str,
    header_read_timeout: &'static str,
    max_header_bytes: usize,
    max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1000,
            startup_timeout: "2s",
            header_read_timeout: "2s",
            max_header_bytes: 16 * 1024,
            max_frame_bytes: 1024 * 1024,
        }
    }
}

/// One `fencepost serve` with an HTTP proxy, a Postgres proxy, the admin
/// API and the elector, in front of a test upstream and a fresh database
/// with table `t(v int)`.
struct Env {
    _dir: TempDir,
    server: Server,
    db: TestDb,
    _upstream: Upstream,
    http: SocketAddr,
    pg: SocketAddr,
    admin: SocketAddr,
    elector: SocketAddr,
    limits: Limits,
}

impl Env {
    async fn start(prefix: &str, limits: Limits) -> Env {
        let db = TestDb::create(prefix).await;
        direct(&db)
            .await
            .batch_execute("CREATE TABLE t (v int)")
            .await
            .expect("create table");
        let upstream = Upstream::start().await;
        let dir = TempDir::new(prefix);
        let mut conf = Conf::sqlite(dir.path());
        conf.set("fencing", "drain_timeout", "10s");
        let admin = conf.admin(Section::new());
        let elector = conf.elector(Section::new());
        let max = limits.max_connections as i64;
        let http = conf.http(
            Section::to(format!("http://{}", upstream.addr))
                .set("max_connections", max)
                .set("header_read_timeout", limits.header_read_timeout)
                .set("max_header_bytes", limits.max_header_bytes as i64),
        );
        let pg = conf.postgres(
            Section::to("127.0.0.1:5432")
                .set("max_connections", max)
                .set("startup_timeout", limits.startup_timeout)
                .set("max_frame_bytes", limits.max_frame_bytes as i64),
        );
        // A process: the tests read its memory, its log and /metrics.
        let server = Server::run(dir.path(), conf).await;
        Env {
            _dir: dir,
            server,
            db,
            _upstream: upstream,
            http,
            pg,
            admin,
            elector,
            limits,
        }
    }

    fn pid(&self) -> u32 {
        self.server.child.as_ref().expect("server running").id()
    }

    /// The proxy is still running and never panicked.
    fn assert_healthy(&mut self) {
        let exited = self
            .server
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        assert!(
            exited.is_none(),
            "the proxy died: {exited:?}\n{}",
            self.server.log_text()
        );
        let log = self.server.log_text();
        assert!(!log.contains("panicked"), "the proxy panicked:\n{log}");
    }

    fn conninfo(&self, options: Option<&str>, app: Option<&str>) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} dbname={} user=postgres connect_timeout=10",
            self.pg.port(),
            self.db.name
        );
        if let Some(o) = options {
            s.push_str(&format!(" options='{o}'"));
        }
        if let Some(a) = app {
            s.push_str(&format!(" application_name={a}"));
        }
        s
    }

    async fn pg_client(
        &self,
        options: Option<&str>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(options, None), NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A value from the admin API's `/metrics`: the first series named
    /// `name` whose labels contain every one of `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (status, text) = get(&format!("http://{}/metrics", self.admin), None).await;
        assert_eq!(status, 200, "metrics: {text}");
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    }

    async fn open_connections(&self, protocol: &str, addr: SocketAddr) -> f64 {
        let p = format!("protocol=\"{protocol}\"");
        let l = format!("listener=\"{addr}\"");
        self.metric("fencepost_connections_open", &[&p, &l])
            .await
            .unwrap_or(-1.0)
    }

    async fn rejected(&self, protocol: &str, addr: SocketAddr) -> f64 {
        let p = format!("protocol=\"{protocol}\"");
        let l = format!("listener=\"{addr}\"");
        self.metric("fencepost_connections_rejected_total", &[&p, &l])
            .await
            .unwrap_or(-1.0)
    }

    /// Waits until the open-connection gauges read `pg` and `http`.
    async fn settle(&self, pg: f64, http: f64) {
        let ok = crate::support::eventually(10, || async {
            let (p, h) = (
                self.open_connections("postgres", self.pg).await,
                self.open_connections("http", self.http).await,
            );
            (p == pg && h == http).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "open connections did not settle at postgres={pg} http={http}: postgres={} http={}",
            self.open_connections("postgres", self.pg).await,
            self.open_connections("http", self.http).await
        );
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

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

// --------------------------------------------------- the well-behaved client

/// A writer that does everything right: one Postgres connection and one
/// keep-alive HTTP connection, each writing with a valid token.
struct Prober {
    pg: tokio_postgres::Client,
    http: SendRequest<Full<Bytes>>,
    http_addr: SocketAddr,
    n: i64,
}

#[derive(Default)]
struct Latencies {
    pg: Vec<Duration>,
    http: Vec<Duration>,
}

impl Prober {
    async fn connect(env: &Env) -> Prober {
        let pg = env
            .pg_client(Some(&opts(1, "probe-pg")))
            .await
            .expect("prober connects through the Postgres proxy");
        Prober {
            pg,
            http: http_conn(env.http).await,
            http_addr: env.http,
            n: 0,
        }
    }

    /// One fenced write through each proxy; panics unless both succeed.
    async fn write(&mut self, lat: &mut Latencies) {
        self.n += 1;
        let t = Instant::now();
        self.pg
            .simple_query(&format!("INSERT INTO t VALUES ({})", 1_000_000 + self.n))
            .await
            .unwrap_or_else(|e| panic!("the well-behaved Postgres write {} failed: {e}", self.n));
        lat.pg.push(t.elapsed());

        if self.http.is_closed() || self.http.ready().await.is_err() {
            // Keep-alive connections idle past header_read_timeout are
            // closed by the proxy, as they should be.
            self.http = http_conn(self.http_addr).await;
        }
        let t = Instant::now();
        let req = hyper::Request::put(format!("/probe/{}", self.n))
            .header("host", self.http_addr.to_string())
            .header("fencing-token", "1")
            .header("fencing-resource", "probe-http")
            .body(Full::new(Bytes::from_static(b"probe")))
            .expect("request");
        let resp = self
            .http
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("the well-behaved HTTP write {} failed: {e}", self.n));
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        assert_eq!(
            status, 200,
            "the well-behaved HTTP write {} got {status}",
            self.n
        );
        lat.http.push(t.elapsed());
    }

    async fn run(&mut self, n: usize) -> Latencies {
        let mut lat = Latencies::default();
        for _ in 0..n {
            self.write(&mut lat).await;
        }
        lat
    }

    /// Writes until `done` is set (at least `min` times).
    async fn run_while(&mut self, done: &AtomicBool, min: usize) -> Latencies {
        let mut lat = Latencies::default();
        while lat.pg.len() < min || !done.load(Ordering::SeqCst) {
            self.write(&mut lat).await;
            // A steady client, not a busy loop competing with the abuse.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat
    }
}

async fn http_conn(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to HTTP proxy");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    sender
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn report(what: &str, base: &Latencies, during: &Latencies) {
    for (proto, b, d) in [
        ("postgres", &base.pg, &during.pg),
        ("http", &base.http, &during.http),
    ] {
        eprintln!(
            "[{what}] well-behaved {proto} writes: baseline n={} p50={:?} p99={:?} | during n={} p50={:?} p99={:?} max={:?}",
            b.len(),
            pct(b, 0.5),
            pct(b, 0.99),
            d.len(),
            pct(d, 0.5),
            pct(d, 0.99),
            pct(d, 1.0),
        );
    }
}

/// The well-behaved client was never made to wait on an abuser: a write
/// stuck behind a slow or silent client would have taken the abuser's
/// whole timeout. Judged on the 99th percentile, so one scheduling hiccup
/// of a loaded CI machine is not taken for a stall.
fn assert_not_stalled(what: &str, during: &Latencies, stall: Duration) {
    for (proto, d) in [("postgres", &during.pg), ("http", &during.http)] {
        let p99 = pct(d, 0.99);
        assert!(
            p99 < stall,
            "[{what}] well-behaved {proto} writes: p99 {p99:?}, as long as an abuser's timeout ({stall:?})"
        );
    }
}

// ------------------------------------------------------ raw wire helpers

fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    message(b'Q', &b)
}

async fn read_msg(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        return Err(std::io::Error::other(format!("bad length {len}")));
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// The fields of an ErrorResponse body, by code letter.
fn fields(body: &[u8]) -> HashMap<char, String> {
    body.split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// A raw session through the Postgres proxy, authenticated (trust) and
/// ready for a query.
async fn pg_ready(env: &Env, params: &[(&str, &str)]) -> TcpStream {
    let mut s = TcpStream::connect(env.pg).await.expect("connect pg proxy");
    let mut p = vec![("user", "postgres"), ("database", env.db.name.as_str())];
    p.extend_from_slice(params);
    s.write_all(&startup_packet(&p))
        .await
        .expect("send startup");
    loop {
        let (tag, body) = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s))
            .await
            .expect("startup answered in time")
            .expect("read startup answer");
        match tag {
            b'Z' => return s,
            b'E' => panic!("startup refused: {:?}", fields(&body)),
            _ => {}
        }
    }
}

/// What a connection came to after the abuse: the first answer (if any)
/// and whether the peer closed.
#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug
enum Ending {
    /// The proxy answered with a Postgres error (severity, SQLSTATE).
    PgError(String, String),
    /// The proxy answered with an HTTP status line.
    Http(u16),
    /// Other bytes, then a close.
    Bytes(usize),
    /// Closed (EOF or reset) without a word.
    Closed,
    /// Still open when we stopped waiting.
    Open,
}

/// Reads everything `s` sends until it closes or `wait` passes.
async fn ending(s: &mut (impl AsyncRead + Unpin), wait: Duration) -> (Ending, Duration) {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    let elapsed = t.elapsed();
    let e = if got.starts_with(b"HTTP/1.") {
        let code = String::from_utf8_lossy(&got[9..got.len().min(12)])
            .parse()
            .unwrap_or(0);
        Ending::Http(code)
    } else if got.first() == Some(&b'E') && got.len() > 5 {
        let f = fields(&got[5..]);
        Ending::PgError(
            f.get(&'S').cloned().unwrap_or_default(),
            f.get(&'C').cloned().unwrap_or_default(),
        )
    } else if !got.is_empty() {
        Ending::Bytes(got.len())
    } else if closed {
        Ending::Closed
    } else {
        Ending::Open
    };
    (e, elapsed)
}

// ------------------------------------------------------------- the abuses

/// Result of a flood against one listener.
struct Flood {
    /// Connections the proxy kept (no answer: they hold a slot).
    held: Vec<TcpStream>,
    /// Connections refused with the protocol's "too many" answer.
    refused: usize,
    /// Anything else (must stay 0).
    other: Vec<Ending>,
}

/// Opens `n` connections to `addr` at once.
///
/// Postgres: a refused connection is told at once, before its startup
/// packet; an admitted one hears nothing and stays silent, so it holds
/// its slot without costing a server connection. HTTP: every connection
/// sends a request; an admitted one gets the upstream's `200` and is kept
/// open (keep-alive), a refused one gets the refusal.
async fn flood(addr: SocketAddr, n: usize, http: bool) -> Flood {
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("flood connect");
            if http {
                let req = format!("GET /flood/{i} HTTP/1.1\r\nhost: x\r\n\r\n");
                s.write_all(req.as_bytes()).await.expect("send request");
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let admitted = tokio::time::timeout(Duration::from_secs(10), async {
                    // The test upstream answers "ok": a whole 200 ends so.
                    while !(got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"\r\n\r\nok")) {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        if got.starts_with(b"HTTP/1.1 503") {
                            return false;
                        }
                    }
                    true
                })
                .await
                .unwrap_or(false);
                if admitted {
                    return (Some(s), None);
                }
                let (rest, _) = ending(&mut s, Duration::from_secs(5)).await;
                let e = if got.starts_with(b"HTTP/1.1 503") {
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    assert!(
                        text.contains("retry-after: 1")
                            && text.contains("application/problem+json"),
                        "a refused HTTP connection gets a problem with Retry-After: {text}"
                    );
                    Ending::Http(503)
                } else {
                    rest
                };
                return (None, Some(e));
            }
            let mut first = [0u8; 1];
            // An admitted connection hears nothing; a refused one is told
            // at once.
            match tokio::time::timeout(Duration::from_secs(3), s.peek(&mut first)).await {
                Err(_) => (Some(s), None),
                Ok(_) => {
                    // Over the limit: send what a real client would, then
                    // read the refusal in full.
                    let hello = startup_packet(&[("user", "postgres"), ("database", "postgres")]);
                    let _ = s.write_all(&hello).await;
                    let (e, _) = ending(&mut s, Duration::from_secs(5)).await;
                    (None, Some(e))
                }
            }
        });
    }
    let mut out = Flood {
        held: Vec::new(),
        refused: 0,
        other: Vec::new(),
    };
    while let Some(r) = set.join_next().await {
        match r.expect("flood task") {
            (Some(s), _) => out.held.push(s),
            (None, Some(Ending::Http(503))) if http => out.refused += 1,
            (None, Some(Ending::PgError(sev, code)))
                if !http && sev == "FATAL" && code == "53300" =>
            {
                out.refused += 1
            }
            (None, Some(e)) => out.other.push(e),
            (None, None) => unreachable!(),
        }
    }
    out
}

/// `k` HTTP clients sending their headers one byte every `every`; returns
/// how long each lasted before the proxy cut it.
async fn slowloris_http(addr: SocketAddr, k: usize, every: Duration) -> Vec<(Ending, Duration)> {
    let mut set = JoinSet::new();
    for i in 0..k {
        set.spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect");
            let (mut r, mut w) = s.into_split();
            let head = format!("PUT /slow/{i} HTTP/1.1\r\nhost: x\r\nfencing-token: 1\r\nx-slow: ");
            let writer = async move {
                if w.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                // Far more bytes than the timeout allows at this pace.
                for _ in 0..1000 {
                    tokio::time::sleep(every).await;
                    if w.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            };
            let reader = ending(&mut r, Duration::from_secs(20));
            tokio::pin!(reader);
            tokio::select! {
                e = &mut reader => e,
                // Cut while writing: the reader sees the close too.
                () = writer => reader.await,
            }
        });
    }
    set.join_all().await
}

/// `k` Postgres clients sending their startup packet one byte every
/// `every`.
async fn slowloris_pg(env: &Env, k: usize, every: Duration) -> Vec<(Ending, Duration)> {
    let packet = startup_packet(&[("user", "postgres"), ("database", &env.db.name)]);
    let addr = env.pg;
    let mut set = JoinSet::new();
    for _ in 0..k {
        let packet = packet.clone();
        set.spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect");
            let (mut r, mut w) = s.into_split();
            let writer = async move {
                for b in packet {
                    if w.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
                // Complete after all: stay silent until cut.
                std::future::pending::<()>().await;
            };
            let reader = ending(&mut r, Duration::from_secs(20));
            tokio::pin!(reader);
            tokio::select! {
                e = &mut reader => e,
                () = writer => reader.await,
            }
        });
    }
    set.join_all().await
}

/// A message far above `max_frame_bytes` costs only its connection:
/// checked with a huge declared length and with a body really sent.
async fn oversized_pg(env: &Env) {
    let max = env.limits.max_frame_bytes;
    // A huge declared length, body never sent.
    let mut s = pg_ready(env, &[]).await;
    let mut m = vec![b'Q'];
    m.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
    m.extend_from_slice(b"SELECT 1");
    s.write_all(&m).await.expect("send header");
    let (e, took) = ending(&mut s, Duration::from_secs(5)).await;
    eprintln!("[oversized] declared 2 GiB Query: {e:?} after {took:?}");
    assert!(
        matches!(&e, Ending::PgError(sev, code) if sev == "FATAL" && code == "08P01"),
        "a 2 GiB declared frame must get FATAL 08P01, got {e:?}"
    );

    // A body really sent, four times the bound, in chunks.
    let mut s = pg_ready(env, &[]).await;
    let len = 4 * max;
    let mut head = vec![b'Q'];
    head.extend_from_slice(&((len + 4) as u32).to_be_bytes());
    let t = Instant::now();
    let (mut r, mut w) = s.split();
    let writer = async {
        let _ = w.write_all(&head).await;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    };
    let (sent, (e, _)) = tokio::join!(writer, ending(&mut r, Duration::from_secs(10)));
    eprintln!(
        "[oversized] {} MiB Query body: {e:?} after {:?}, {} KiB accepted by the socket",
        len >> 20,
        t.elapsed(),
        sent >> 10
    );
    assert!(
        matches!(&e, Ending::PgError(sev, code) if sev == "FATAL" && code == "08P01")
            || matches!(e, Ending::Closed),
        "an oversized frame must cost the connection, got {e:?}"
    );

    // Just under the bound is fine: the limit is the configured one.
    let c = env
        .pg_client(None)
        .await
        .expect("connect for a large query");
    let text = "y".repeat(max - 4096);
    let rows = c
        .simple_query(&format!("SELECT length('{text}')"))
        .await
        .expect("a large query under max_frame_bytes passes");
    let n = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(n, Some((max - 4096).to_string()));

    // Startup packets: above Postgres's own bound (10,000 bytes), and a
    // declared 2 GiB.
    for (what, bytes) in [
        ("20 kB startup packet", {
            let mut p = ((20_000u32).to_be_bytes()).to_vec();
            p.extend_from_slice(&196_608u32.to_be_bytes());
            p.resize(20_000, b'u');
            p
        }),
        ("2 GiB declared startup packet", {
            let mut p = 0x7fff_ffffu32.to_be_bytes().to_vec();
            p.extend_from_slice(&196_608u32.to_be_bytes());
            p
        }),
    ] {
        let mut s = TcpStream::connect(env.pg).await.expect("connect");
        let _ = s.write_all(&bytes).await;
        let (e, took) = ending(&mut s, Duration::from_secs(5)).await;
        eprintln!("[oversized] {what}: {e:?} after {took:?}");
        assert!(
            matches!(&e, Ending::PgError(sev, code) if sev == "FATAL" && code == "08P01"),
            "{what} must be refused with FATAL 08P01, got {e:?}"
        );
    }
}

/// Headers above `max_header_bytes`: 431, or at least a close.
async fn oversized_http(env: &Env) {
    let big = env.limits.max_header_bytes * 4;
    for (what, req) in [
        (
            "one huge header",
            format!(
                "PUT /x HTTP/1.1\r\nhost: x\r\nfencing-token: 1\r\nx-big: {}\r\n\r\n",
                "b".repeat(big)
            ),
        ),
        (
            "many headers",
            format!(
                "GET /x HTTP/1.1\r\nhost: x\r\n{}\r\n",
                (0..big / 16)
                    .map(|i| format!("x-h{i}: vvvvvv\r\n"))
                    .collect::<String>()
            ),
        ),
        (
            "a huge request line",
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "p".repeat(big)),
        ),
    ] {
        let mut s = TcpStream::connect(env.http).await.expect("connect");
        let (mut r, mut w) = s.split();
        let writer = async {
            let _ = w.write_all(req.as_bytes()).await;
        };
        let ((), (e, took)) = tokio::join!(writer, ending(&mut r, Duration::from_secs(5)));
        eprintln!(
            "[oversized] HTTP {what} ({} KiB): {e:?} after {took:?}",
            req.len() >> 10
        );
        assert!(
            matches!(e, Ending::Http(431) | Ending::Http(414) | Ending::Closed),
            "HTTP {what} above max_header_bytes must get 431 or a close, got {e:?}"
        );
    }
}

/// Garbage on every port. Returns how many connections were thrown.
async fn garbage(env: &Env, rng: &mut StdRng) -> usize {
    let mut thrown = 0;
    let targets = [
        ("http", env.http),
        ("postgres", env.pg),
        ("admin", env.admin),
        ("elector", env.elector),
    ];
    let mut set = JoinSet::new();
    for (name, addr) in targets {
        for _ in 0..8 {
            let len = rng.gen_range(1..32 * 1024);
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            thrown += 1;
            set.spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let (mut r, mut w) = s.split();
                let writer = async {
                    let _ = w.write_all(&bytes).await;
                };
                let ((), (e, _)) = tokio::join!(writer, ending(&mut r, Duration::from_secs(4)));
                (name, e)
            });
        }
    }
    // Other protocols on each proxy port.
    let pg_startup = startup_packet(&[("user", "postgres"), ("database", &env.db.name)]);
    let http_get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
    for (name, addr, bytes) in [
        ("http-to-postgres", env.pg, http_get.clone()),
        ("postgres-to-http", env.http, pg_startup.clone()),
        ("postgres-to-admin", env.admin, pg_startup.clone()),
        ("postgres-to-elector", env.elector, pg_startup),
    ] {
        thrown += 1;
        set.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(&bytes).await;
            (name, ending(&mut s, Duration::from_secs(4)).await.0)
        });
    }
    let mut endings: HashMap<&str, Vec<Ending>> = HashMap::new();
    while let Some(r) = set.join_next().await {
        let (name, e) = r.expect("garbage task");
        endings.entry(name).or_default().push(e);
    }
    // TLS ClientHellos, from a real TLS client, to both proxies.
    for (name, addr) in [("tls-to-postgres", env.pg), ("tls-to-http", env.http)] {
        thrown += 1;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name_ = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let r = tokio::time::timeout(Duration::from_secs(5), connector.connect(name_, tcp)).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "{name}: the TLS handshake must fail promptly on a non-TLS port"
        );
    }
    // Random bytes inside an authenticated Postgres session.
    for _ in 0..4 {
        thrown += 1;
        let mut s = pg_ready(env, &[]).await;
        let len = rng.gen_range(1..16 * 1024);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        let _ = s.write_all(&bytes).await;
        let (e, _) = ending(&mut s, Duration::from_secs(3)).await;
        endings.entry("postgres-in-session").or_default().push(e);
    }

    // What the protocol ports must say to the wrong protocol.
    let first = |k: &str| endings.get(k).and_then(|v| v.first());
    assert!(
        matches!(first("http-to-postgres"), Some(Ending::PgError(s, c)) if s == "FATAL" && c == "08P01"),
        "an HTTP request on the Postgres port must get FATAL 08P01: {:?}",
        first("http-to-postgres")
    );
    assert!(
        matches!(
            first("postgres-to-http"),
            Some(Ending::Http(400)) | Some(Ending::Closed)
        ),
        "a Postgres startup on the HTTP port must get 400 or a close: {:?}",
        first("postgres-to-http")
    );
    // Random bytes on the proxy ports end in a refusal or a close within
    // their timeouts (+ slack), never a hung socket.
    for k in ["http", "postgres"] {
        for e in &endings[k] {
            assert!(
                !matches!(e, Ending::Open),
                "garbage on the {k} port left the connection open past its timeout: {endings:?}"
            );
        }
    }
    let summary: Vec<String> = {
        let mut v: Vec<_> = endings.iter().collect();
        v.sort_by_key(|(k, _)| *k);
        v.iter().map(|(k, e)| format!("{k}: {e:?}")).collect()
    };
    eprintln!("[garbage] endings:\n  {}", summary.join("\n  "));
    thrown
}

// ------------------------------------------------------------------ tests

// Two workers: the abuse's own work in this process must not delay the
// well-behaved client's measured writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_refused_past_max_connections_while_a_good_client_keeps_writing() {
    let max = 20;
    let mut env = Env::start(
        "fp_hostile_flood",
        Limits {
            max_connections: max,
            startup_timeout: "20s",
            header_read_timeout: "20s",
            ..Limits::default()
        },
    )
    .await;
    let mut prober = Prober::connect(&env).await;
    let base = prober.run(100).await;
    env.settle(1.0, 1.0).await;

    let n = 10 * max;
    let done = AtomicBool::new(false);
    let abuse = async {
        let t = Instant::now();
        let (pg, http) = tokio::join!(flood(env.pg, n, false), flood(env.http, n, true));
        // Real clients over the limit get the documented answers too.
        let Err(e) = env.pg_client(Some(&opts(1, "probe-pg"))).await else {
            panic!("a Postgres client over max_connections must be refused");
        };
        assert_eq!(
            e.as_db_error().map(|d| d.code().code()),
            Some("53300"),
            "refusal over max_connections: {e}"
        );
        eprintln!(
            "[flood] tokio-postgres over the limit: {:?}",
            e.as_db_error()
                .map(|d| (d.severity(), d.code().code(), d.message()))
        );
        let resp = reqwest::Client::new()
            .put(format!("http://{}/over", env.http))
            .header("fencing-token", "1")
            .header("fencing-resource", "probe-http")
            .send()
            .await
            .expect("an HTTP client over max_connections gets an answer");
        assert_eq!(resp.status(), 503);
        assert_eq!(
            resp.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert_eq!(
            resp.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..])
        );
        let body: serde_json::Value = resp.json().await.expect("problem body");
        assert_eq!(body["type"], "urn:fencepost:overloaded");
        // Hold the flood a moment longer while the good client writes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let open = (
            env.open_connections("postgres", env.pg).await,
            env.open_connections("http", env.http).await,
        );
        done.store(true, Ordering::SeqCst);
        (pg, http, open, t.elapsed())
    };
    let (during, (pg, http, open, took)) = tokio::join!(prober.run_while(&done, 20), abuse);

    eprintln!(
        "[flood] {n} connections per port in {took:?}: postgres held {} refused {} other {:?}; http held {} refused {} other {:?}",
        pg.held.len(),
        pg.refused,
        pg.other,
        http.held.len(),
        http.refused,
        http.other
    );
    // Exactly the free slots were taken; everyone else was told why.
    assert_eq!(pg.held.len(), max - 1, "postgres slots taken by the flood");
    assert_eq!(http.held.len(), max - 1, "http slots taken by the flood");
    assert!(pg.other.is_empty() && http.other.is_empty());
    assert_eq!(pg.refused, n - (max - 1));
    assert_eq!(http.refused, n - (max - 1));
    assert_eq!(
        open,
        (max as f64, max as f64),
        "open connections at the limit"
    );
    let (rp, rh) = (
        env.rejected("postgres", env.pg).await,
        env.rejected("http", env.http).await,
    );
    eprintln!("[flood] fencepost_connections_rejected_total: postgres={rp} http={rh}");
    assert_eq!(rp, (pg.refused + 1) as f64, "postgres rejections counted");
    assert_eq!(rh, (http.refused + 1) as f64, "http rejections counted");

    report("flood", &base, &during);
    assert_not_stalled("flood", &during, Duration::from_secs(5));

    // The flood leaves: capacity comes back.
    drop(pg.held);
    drop(http.held);
    env.settle(1.0, 1.0).await;
    let c = env
        .pg_client(Some(&opts(1, "probe-pg")))
        .await
        .expect("a new Postgres client is admitted after the flood");
    c.simple_query("INSERT INTO t VALUES (7)")
        .await
        .expect("and writes");
    let (status, _) = crate::support::put(
        &format!("http://{}/after", env.http),
        Some("1"),
        Some("probe-http"),
        "x",
    )
    .await;
    assert_eq!(status, 200, "a new HTTP client is admitted after the flood");
    let after = prober.run(20).await;
    assert_eq!(after.pg.len(), 20);
    env.assert_healthy();
}

// Two workers: the abuse's own work in this process must not delay the
// well-behaved client's measured writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_at_their_timeouts_and_stall_nobody() {
    let mut env = Env::start("fp_hostile_slow", Limits::default()).await;
    let mut prober = Prober::connect(&env).await;
    let base = prober.run(100).await;

    // A client that completes its startup, sends half a message, then
    // goes silent: it must not hold anybody else up.
    let mut half = pg_ready(&env, &[]).await;
    let mut partial = vec![b'Q'];
    partial.extend_from_slice(&1000u32.to_be_bytes());
    partial.extend_from_slice(b"INSERT INTO t VALUES (");
    half.write_all(&partial).await.expect("send half a message");

    let timeout = Duration::from_secs(2);
    let done = AtomicBool::new(false);
    let abuse = async {
        let r = tokio::join!(
            slowloris_http(env.http, 20, Duration::from_millis(500)),
            slowloris_pg(&env, 20, Duration::from_millis(300)),
            // A client that connects and never says a word.
            async {
                let mut s = TcpStream::connect(env.pg).await.expect("connect");
                ending(&mut s, Duration::from_secs(20)).await
            },
            async {
                let mut s = TcpStream::connect(env.http).await.expect("connect");
                ending(&mut s, Duration::from_secs(20)).await
            },
        );
        done.store(true, Ordering::SeqCst);
        r
    };
    let (during, (http, pg, silent_pg, silent_http)) =
        tokio::join!(prober.run_while(&done, 20), abuse);

    for (what, v) in [("http headers", &http), ("postgres startup", &pg)] {
        let times: Vec<Duration> = v.iter().map(|(_, d)| *d).collect();
        eprintln!(
            "[slowloris] {} {what} clients, 1 byte at a time: cut after min={:?} p50={:?} max={:?}; endings {:?}",
            v.len(),
            pct(&times, 0.0),
            pct(&times, 0.5),
            pct(&times, 1.0),
            v.iter().map(|(e, _)| e).collect::<Vec<_>>().first()
        );
        for (e, d) in v.iter() {
            assert!(
                !matches!(e, Ending::Open),
                "a slow {what} client was never cut"
            );
            assert!(
                *d >= timeout - Duration::from_millis(300) && *d < timeout + Duration::from_secs(3),
                "a slow {what} client was cut after {d:?}, not at its {timeout:?} timeout"
            );
        }
    }
    eprintln!(
        "[slowloris] silent postgres client: {silent_pg:?}; silent http client: {silent_http:?}"
    );
    for (what, (e, d)) in [("postgres", silent_pg), ("http", silent_http)] {
        assert!(
            !matches!(e, Ending::Open) && d < timeout + Duration::from_secs(3),
            "a silent {what} client must be cut at its timeout: {e:?} after {d:?}"
        );
    }
    report("slowloris", &base, &during);
    assert_not_stalled("slowloris", &during, timeout);

    // The half-sent message is still pending; the proxy serves on.
    let c = env
        .pg_client(Some(&opts(1, "probe-pg")))
        .await
        .expect("a new client connects next to the half-sent message");
    c.simple_query("INSERT INTO t VALUES (8)")
        .await
        .expect("and writes");
    drop(half);
    env.assert_healthy();
}

// Two workers: the abuse's own work in this process must not delay the
// well-behaved client's measured writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_and_headers_cost_only_their_own_connection() {
    let mut env = Env::start("fp_hostile_big", Limits::default()).await;
    let mut prober = Prober::connect(&env).await;
    let base = prober.run(100).await;
    let done = AtomicBool::new(false);
    let abuse = async {
        oversized_pg(&env).await;
        oversized_http(&env).await;
        done.store(true, Ordering::SeqCst);
    };
    let (during, ()) = tokio::join!(prober.run_while(&done, 20), abuse);
    report("oversized", &base, &during);
    assert_not_stalled("oversized", &during, Duration::from_secs(5));
    env.assert_healthy();
}

// Two workers: the abuse's own work in this process must not delay the
// well-behaved client's measured writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_port_panics_nothing_and_stalls_nobody() {
    let seed: u64 = std::env::var("FENCEPOST_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("[garbage] seed {seed} (FENCEPOST_HOSTILE_SEED={seed} to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut env = Env::start("fp_hostile_garbage", Limits::default()).await;
    let mut prober = Prober::connect(&env).await;
    let base = prober.run(100).await;
    let done = AtomicBool::new(false);
    let abuse = async {
        let n = garbage(&env, &mut rng).await;
        done.store(true, Ordering::SeqCst);
        n
    };
    let (during, thrown) = tokio::join!(prober.run_while(&done, 20), abuse);
    eprintln!("[garbage] {thrown} connections of garbage (seed {seed})");
    report("garbage", &base, &during);
    assert_not_stalled("garbage", &during, Duration::from_secs(5));

    // Every port still serves.
    assert_eq!(
        get(&format!("http://{}/healthz", env.admin), None).await.0,
        200
    );
    assert_eq!(
        get(&format!("http://{}/v1/leases", env.elector), None)
            .await
            .0,
        200
    );
    env.assert_healthy();
}

/// The admin and elector APIs cut slow and silent clients too (they were
/// served by `axum::serve`, which waits for a request head forever), and
/// keep answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_admin_and_elector_apis_is_cut() {
    let mut env = Env::start("fp_hostile_api", Limits::default()).await;
    let started = Instant::now();
    let slow = async {
        tokio::join!(
            slowloris_http(env.admin, 5, Duration::from_millis(700)),
            slowloris_http(env.elector, 5, Duration::from_millis(700)),
            async {
                let mut s = TcpStream::connect(env.elector).await.expect("connect");
                ending(&mut s, Duration::from_secs(25)).await
            },
        )
    };
    let serving = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        (
            get(&format!("http://{}/healthz", env.admin), None).await.0,
            get(&format!("http://{}/v1/leases", env.elector), None)
                .await
                .0,
        )
    };
    let ((admin, elector, silent), (health, leases)) = tokio::join!(slow, serving);
    assert_eq!(
        (health, leases),
        (200, 200),
        "the APIs answered while abused"
    );
    for (what, e) in admin
        .iter()
        .map(|e| ("admin", e))
        .chain(elector.iter().map(|e| ("elector", e)))
        .chain(std::iter::once(("elector, silent", &silent)))
    {
        eprintln!("[api slowloris] {what}: {:?} after {:?}", e.0, e.1);
        assert!(
            !matches!(e.0, Ending::Open) && e.1 < Duration::from_secs(20),
            "{what}: a slow client was not cut: {e:?}"
        );
    }
    eprintln!("[api slowloris] all cut within {:?}", started.elapsed());
    env.assert_healthy();
}

// Two workers: the abuse's own work in this process must not delay the
// well-behaved client's measured writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_copy_releases_its_guard_and_commits_nothing() {
    let env = Env::start("fp_hostile_copy", Limits::default()).await;
    let observer = direct(&env.db).await;
    env.settle(0.0, 0.0).await;

    // (token, what the vanishing client leaves behind): whole CopyData
    // messages, or half of one.
    for (round, (old, new, half)) in [(5u64, 6u64, false), (7, 8, true)].into_iter().enumerate() {
        let app = format!("hostile_copy_{round}");
        let options = opts(old, "copy-r");
        let mut s = pg_ready(&env, &[("options", &options), ("application_name", &app)]).await;
        s.write_all(&query("COPY t FROM STDIN"))
            .await
            .expect("send COPY");
        let (tag, _) = read_msg(&mut s).await.expect("COPY answered");
        assert_eq!(tag, b'G', "CopyInResponse");
        for i in 0..100 {
            s.write_all(&message(b'd', format!("{}\n", 10_000 + i).as_bytes()))
                .await
                .expect("send CopyData");
        }
        if half {
            let mut m = vec![b'd'];
            m.extend_from_slice(&1000u32.to_be_bytes());
            m.extend_from_slice(b"123");
            s.write_all(&m).await.expect("send half a CopyData");
        }
        // Make sure the server is in the COPY (rows arriving) before the
        // client vanishes.
        crate::support::eventually(5, || async {
            let rows = observer
                .query(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'COPY%'",
                    &[&app],
                )
                .await
                .ok()?;
            (!rows.is_empty()).then_some(())
        })
        .await
        .expect("the COPY is running at the server");
        drop(s);

        // A newer token's write on the same resource is admitted promptly:
        // the vanished COPY's in-flight guard was released.
        let t = Instant::now();
        let c = env
            .pg_client(Some(&opts(new, "copy-r")))
            .await
            .expect("connect with the newer token");
        c.simple_query(&format!("INSERT INTO t VALUES ({new})"))
            .await
            .expect("the newer token's write is admitted");
        let took = t.elapsed();
        eprintln!(
            "[mid-copy] round {round} ({}): newer token {new} admitted {took:?} after the COPY client vanished",
            if half { "half a CopyData" } else { "whole CopyData" }
        );
        assert!(
            took < Duration::from_secs(5),
            "the newer token waited {took:?}: the vanished COPY's guard was held"
        );

        // The server backend went away and nothing of the COPY landed.
        let gone = crate::support::eventually(10, || async {
            let rows = observer
                .query(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .ok()?;
            rows.is_empty().then_some(())
        })
        .await;
        assert!(
            gone.is_some(),
            "the vanished client's backend is still there"
        );
        drop(c);
        env.settle(0.0, 0.0).await;
    }
    assert_eq!(
        env.rows().await,
        vec![6, 8],
        "nothing of the COPYs committed"
    );
    let mut env = env;
    env.assert_healthy();
}

// Two workers: the abuse's own work in this process must not delay the
// well-behaved client's measured writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_through_every_abuse() {
    let seed: u64 = rand::random();
    eprintln!("[memory] garbage seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let max = 50;
    let mut env = Env::start(
        "fp_hostile_mem",
        Limits {
            max_connections: max,
            ..Limits::default()
        },
    )
    .await;
    let mut prober = Prober::connect(&env).await;
    let base = prober.run(300).await;
    let pid = env.pid();
    let before = rss_kib(pid);
    eprintln!("[memory] RSS after warm-up: {before} KiB");

    let mut peak = before;
    let mut during_all = Latencies::default();
    for round in 1..=2 {
        let done = AtomicBool::new(false);
        let abuse = async {
            let (pg, http) = tokio::join!(
                flood(env.pg, 4 * max, false),
                flood(env.http, 4 * max, true)
            );
            assert!(pg.refused > 0 && http.refused > 0);
            let held = rss_kib(pid);
            drop((pg.held, http.held));
            // The flood's slots are free again before the next abuse.
            env.settle(1.0, 1.0).await;
            tokio::join!(
                slowloris_http(env.http, 10, Duration::from_millis(400)),
                slowloris_pg(&env, 10, Duration::from_millis(400)),
                oversized_pg(&env),
                oversized_http(&env),
            );
            garbage(&env, &mut rng).await;
            done.store(true, Ordering::SeqCst);
            held
        };
        let (during, held) = tokio::join!(prober.run_while(&done, 20), abuse);
        let now = rss_kib(pid);
        peak = peak.max(held).max(now);
        eprintln!(
            "[memory] round {round}: RSS with the flood held {held} KiB, after the round {now} KiB"
        );
        during_all.pg.extend(during.pg);
        during_all.http.extend(during.http);
    }
    // Let the connections of the last round close.
    env.settle(1.0, 1.0).await;
    let after = rss_kib(pid);
    eprintln!("[memory] RSS before {before} KiB, peak {peak} KiB, after {after} KiB");
    report("all abuse", &base, &during_all);
    // Generous: twice the warm-up figure, or 64 MiB above it, whichever is
    // more. A leak per connection or per oversized frame would blow it
    // (every round sends 4 MiB frames and hundreds of connections).
    let bound = (2 * before).max(before + 64 * 1024);
    assert!(
        after <= bound && peak <= bound,
        "RSS grew from {before} KiB to peak {peak} KiB, {after} KiB after (bound {bound} KiB)"
    );
    env.assert_healthy();
}

// ------------------------------------------------------------ TLS listeners

/// A raw Postgres session over TLS (SSLRequest, then the handshake), for
/// a well-behaved client whose every write is timed.
async fn pg_tls_ready(
    addr: SocketAddr,
    db: &str,
    config: &Arc<rustls::ClientConfig>,
    params: &[(&str, &str)],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect pg proxy");
    let mut ssl = 8u32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80_877_103u32.to_be_bytes());
    tcp.write_all(&ssl).await.expect("SSLRequest");
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .expect("SSLRequest answered");
    assert_eq!(
        &answer, b"S",
        "the TLS Postgres listener must accept SSLRequest"
    );
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the Postgres proxy");
    let mut p = vec![("user", "postgres"), ("database", db)];
    p.extend_from_slice(params);
    s.write_all(&startup_packet(&p))
        .await
        .expect("send startup");
    s.flush().await.expect("flush");
    loop {
        let (tag, body) = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s))
            .await
            .expect("startup answered in time")
            .expect("read startup answer");
        match tag {
            b'Z' => return s,
            b'E' => panic!("startup refused: {:?}", fields(&body)),
            _ => {}
        }
    }
}

/// A well-behaved client of TLS listeners: one Postgres session and one
/// keep-alive HTTPS connection, writing with a valid token.
struct TlsProber {
    pg: tokio_rustls::client::TlsStream<TcpStream>,
    http: SendRequest<Full<Bytes>>,
    http_addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    n: i64,
}

impl TlsProber {
    async fn write(&mut self, lat: &mut Latencies) {
        self.n += 1;
        let t = Instant::now();
        let q = query(&format!("INSERT INTO t VALUES ({})", 1_000_000 + self.n));
        self.pg.write_all(&q).await.expect("send the write");
        self.pg.flush().await.expect("flush");
        loop {
            let (tag, body) = read_msg(&mut self.pg).await.unwrap_or_else(|e| {
                panic!("the well-behaved TLS Postgres write {} failed: {e}", self.n)
            });
            match tag {
                b'Z' => break,
                b'E' => panic!(
                    "the well-behaved TLS Postgres write failed: {:?}",
                    fields(&body)
                ),
                _ => {}
            }
        }
        lat.pg.push(t.elapsed());

        if self.http.is_closed() || self.http.ready().await.is_err() {
            self.http = crate::support::tls::https_conn(self.http_addr, &self.config)
                .await
                .expect("reconnect over TLS");
        }
        let t = Instant::now();
        let (status, _) = crate::support::tls::send(
            &mut self.http,
            "PUT",
            &format!("/probe/{}", self.n),
            Some("1"),
        )
        .await
        .unwrap_or_else(|e| panic!("the well-behaved HTTPS write {} failed: {e}", self.n));
        assert_eq!(status, 200, "the well-behaved HTTPS write {}", self.n);
        lat.http.push(t.elapsed());
    }

    async fn run_while(&mut self, done: &AtomicBool, min: usize) -> Latencies {
        let mut lat = Latencies::default();
        while lat.pg.len() < min || !done.load(Ordering::SeqCst) {
            self.write(&mut lat).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat
    }
}

/// The first flight of a real TLS client: a whole ClientHello.
fn client_hello(config: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut c = rustls::ClientConnection::new(Arc::clone(config), name).expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("hello");
    }
    out
}

/// A TLS client at `addr` sending its ClientHello one byte every `every`
/// (after an SSLRequest on Postgres); how it ended and when.
async fn slow_hello(
    addr: SocketAddr,
    hello: Vec<u8>,
    pg: bool,
    every: Duration,
) -> (Ending, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    if pg {
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&80_877_103u32.to_be_bytes());
        s.write_all(&ssl).await.expect("SSLRequest");
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.expect("answer");
    }
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        for b in hello {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await;
    };
    let reader = ending(&mut r, Duration::from_secs(20));
    tokio::pin!(reader);
    let (e, _) = tokio::select! {
        e = &mut reader => e,
        () = writer => reader.await,
    };
    (e, t.elapsed())
}

/// TLS listeners under abuse: a flood of complete handshakes, garbage
/// (random, and random behind a TLS record header), ClientHellos sent a
/// byte at a time, silent clients and plaintext requests, on the HTTP
/// proxy (relay) and the Postgres proxy at once. Each abuser costs its own
/// connection, for at most the handshake timeout; a well-behaved TLS
/// client keeps writing through both without waiting on any of them; the
/// process keeps its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_shrug_off_handshake_floods_garbage_and_slow_handshakes() {
    use crate::support::tls::Pki;
    let seed: u64 = rand::random();
    eprintln!("[tls] garbage seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let prefix = "fp_hostile_tls";
    let db = TestDb::create(prefix).await;
    direct(&db)
        .await
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .expect("create table");
    let upstream = Upstream::start().await;
    let dir = TempDir::new(prefix);
    let pki = Pki::keygen(&dir.path().join("pki"), &[]);
    let mut conf = Conf::sqlite(dir.path());
    let admin = conf.admin(Section::new());
    let http = conf.http(pki.section(
        Section::to(format!("http://{}", upstream.addr)).set("header_read_timeout", "2s"),
        false,
    ));
    let pg = conf.postgres(pki.section(
        Section::to("127.0.0.1:5432").set("startup_timeout", "2s"),
        false,
    ));
    let mut server = Server::run(dir.path(), conf).await;
    let pid = server.child.as_ref().expect("running").id();
    let timeout = Duration::from_secs(2);

    let http_cfg = crate::support::tls::client_config(&pki.ca, None);
    let mut pg_cfg = (*http_cfg).clone();
    pg_cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    let pg_cfg = Arc::new(pg_cfg);
    let probe_opts = opts(1, "probe-pg");
    let mut prober = TlsProber {
        pg: pg_tls_ready(pg, &db.name, &pg_cfg, &[("options", probe_opts.as_str())]).await,
        http: crate::support::tls::https_conn(http, &http_cfg)
            .await
            .expect("HTTPS connect"),
        http_addr: http,
        config: Arc::clone(&http_cfg),
        n: 0,
    };
    let warm = AtomicBool::new(true);
    let base = prober.run_while(&warm, 100).await;
    let before = rss_kib(pid);

    let hello = client_hello(&http_cfg);
    let pg_hello = client_hello(&pg_cfg);
    let mut junk: Vec<Vec<u8>> = Vec::new();
    for i in 0..16 {
        let len = rng.gen_range(1..16 * 1024);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        if i % 2 == 0 {
            // A handshake record header, then garbage.
            bytes[0] = 0x16;
            if len > 2 {
                bytes[1] = 0x03;
                bytes[2] = 0x01;
            }
        }
        junk.push(bytes);
    }

    let done = AtomicBool::new(false);
    let abuse = async {
        // 1. A flood of complete handshakes, each dropped at once.
        let mut set = JoinSet::new();
        for i in 0..200 {
            let (addr, cfg, is_pg) = if i % 2 == 0 {
                (http, Arc::clone(&http_cfg), false)
            } else {
                (pg, Arc::clone(&pg_cfg), true)
            };
            set.spawn(async move {
                if is_pg {
                    let mut tcp = TcpStream::connect(addr).await.ok()?;
                    let mut ssl = 8u32.to_be_bytes().to_vec();
                    ssl.extend_from_slice(&80_877_103u32.to_be_bytes());
                    tcp.write_all(&ssl).await.ok()?;
                    let mut a = [0u8; 1];
                    tcp.read_exact(&mut a).await.ok()?;
                    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
                    tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await
                        .ok()?;
                } else {
                    crate::support::tls::connect(addr, "localhost", &cfg)
                        .await
                        .ok()?;
                }
                Some(())
            });
        }
        let handshakes = set.join_all().await.iter().filter(|r| r.is_some()).count();

        // 2-5 at once: garbage, slow hellos, silent clients, plaintext.
        let mut set = JoinSet::new();
        for (i, bytes) in junk.iter().enumerate() {
            let addr = if i % 4 < 2 { http } else { pg };
            let bytes = bytes.clone();
            set.spawn(async move {
                let t = Instant::now();
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let (mut r, mut w) = s.split();
                let writer = async {
                    let _ = w.write_all(&bytes).await;
                };
                let ((), (e, _)) = tokio::join!(writer, ending(&mut r, Duration::from_secs(20)));
                ("garbage", e, t.elapsed())
            });
        }
        for i in 0..20 {
            let (addr, h, is_pg) = if i % 2 == 0 {
                (http, hello.clone(), false)
            } else {
                (pg, pg_hello.clone(), true)
            };
            set.spawn(async move {
                let (e, d) = slow_hello(addr, h, is_pg, Duration::from_millis(300)).await;
                ("slow hello", e, d)
            });
        }
        for addr in [http, pg] {
            set.spawn(async move {
                let t = Instant::now();
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let (e, _) = ending(&mut s, Duration::from_secs(20)).await;
                ("silent", e, t.elapsed())
            });
        }
        set.spawn(async move {
            let t = Instant::now();
            let mut s = TcpStream::connect(http).await.expect("connect");
            s.write_all(
                b"PUT /x HTTP/1.1\r\nhost: x\r\nfencing-token: 1\r\ncontent-length: 0\r\n\r\n",
            )
            .await
            .expect("send");
            let (e, _) = ending(&mut s, Duration::from_secs(20)).await;
            ("plaintext", e, t.elapsed())
        });
        let endings = set.join_all().await;
        done.store(true, Ordering::SeqCst);
        (handshakes, endings)
    };
    let (during, (handshakes, endings)) = tokio::join!(prober.run_while(&done, 20), abuse);

    eprintln!("[tls] {handshakes} of 200 flood handshakes completed");
    assert_eq!(
        handshakes, 200,
        "the handshake flood stays within max_connections"
    );
    for (what, e, d) in &endings {
        match *what {
            // Garbage is refused at once by the TLS parser (an alert or a
            // close), never left open.
            "garbage" => assert!(
                !matches!(e, Ending::Open) && *d < timeout + Duration::from_secs(3),
                "garbage on a TLS port: {e:?} after {d:?}"
            ),
            "slow hello" | "silent" => assert!(
                !matches!(e, Ending::Open)
                    && *d >= timeout - Duration::from_millis(300)
                    && *d < timeout + Duration::from_secs(3),
                "a {what} client must be cut at the {timeout:?} handshake timeout: {e:?} after {d:?}"
            ),
            _ => assert!(
                matches!(e, Ending::Http(400)),
                "plaintext on the TLS HTTP port must get a 400: {e:?}"
            ),
        }
    }
    let slow: Vec<Duration> = endings
        .iter()
        .filter(|(w, _, _)| *w == "slow hello")
        .map(|(_, _, d)| *d)
        .collect();
    eprintln!(
        "[tls] slow ClientHellos cut after min={:?} p50={:?} max={:?}",
        pct(&slow, 0.0),
        pct(&slow, 0.5),
        pct(&slow, 1.0)
    );
    report("tls abuse", &base, &during);
    assert_not_stalled("tls abuse", &during, timeout);

    // Every kind of failure was counted.
    let (_, text) = get(&format!("http://{admin}/metrics"), None).await;
    for reason in ["timeout", "error", "plaintext"] {
        let n: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("fencepost_tls_handshake_failures_total{")
                    && l.contains(&format!("listener=\"{http}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(
            n >= 1.0,
            "no {reason} counted on the TLS HTTP listener:\n{text}"
        );
    }

    let after = rss_kib(pid);
    eprintln!("[tls] RSS before the abuse {before} KiB, after {after} KiB");
    let bound = (2 * before).max(before + 64 * 1024);
    assert!(
        after <= bound,
        "RSS grew from {before} KiB to {after} KiB (bound {bound} KiB)"
    );
    let exited = server
        .child
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten());
    assert!(
        exited.is_none(),
        "the proxy died: {exited:?}\n{}",
        server.log_text()
    );
    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
}
