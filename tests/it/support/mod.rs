//! Shared by the end-to-end tests: real sockets, a real Postgres, servers
//! in this process or the real binary. Each test gets its own temp dir,
//! listeners and (where needed) database, so tests run in parallel.
//!
//! - `browser`: headless Chromium over WebDriver, for the console.
//! - `config`: [`Conf`], the typed config builder, which binds each
//!   listener when it is declared.
//! - `http`: one HTTP client and [`Resp`], a response as tests read it.
//! - `server`: [`InProc`] (the library's `serve::start` on those very
//!   sockets) and [`Server`] (the `fencepost serve` process, for kill -9,
//!   SIGTERM, SIGSTOP and whatever else needs a process).
//! - `tls`: certificates from the real `fencepost keygen tls`, and TLS
//!   clients (rustls under hyper, curl, openssl s_client).
#![allow(dead_code)]

pub mod browser;
mod config;
mod http;
mod server;
pub mod tls;
pub mod tls_front;

pub use self::config::{Conf, Section};
pub use self::http::{client, send, Resp};
pub use self::server::{InProc, Served, Server};

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The `fencepost` binary the tests run: the one cargo built, unless
/// `FENCEPOST_BIN` names another (a long checker campaign runs a copy, so
/// rebuilding the worktree meanwhile cannot swap the binary under it).
pub fn bin() -> PathBuf {
    std::env::var_os("FENCEPOST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fencepost")))
}

/// A port nobody is listening on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// psql's flags for a test's command: no psqlrc, stop at the first error,
/// verbose errors (so the SQLSTATE is in the output).
pub const PSQL_STRICT: [&str; 5] = ["-X", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"];

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh Postgres database for one test, dropped afterwards.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    pub async fn create(prefix: &str) -> TestDb {
        let admin_url = database_url();
        let name = format!("{prefix}_{}_{}", std::process::id(), rand::random::<u32>());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("connect to DATABASE_URL");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin_url.clone());
        TestDb {
            url: format!("{base}/{name}"),
            name,
            admin_url,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee; use a private thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .join();
    }
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listening on {addr} after 30s");
}

/// Runs the binary with `args` and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run fencepost");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads lines of a child's stdout until `pred` matches one.
pub fn read_until(reader: &mut impl BufRead, pred: impl Fn(&str) -> bool) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if pred(&line) {
            return Some(line.trim_end().to_string());
        }
    }
}

pub fn lines(child_stdout: std::process::ChildStdout) -> BufReader<std::process::ChildStdout> {
    BufReader::new(child_stdout)
}

/// A plain HTTP upstream for tests: answers every request `200 ok` and
/// records what arrived, in order, from its own point of view.
pub struct Upstream {
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>>,
    /// Connections served (for TLS: handshakes completed).
    pub conns: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct Arrival {
    pub method: String,
    pub path: String,
    pub token: Option<String>,
    /// When the request arrived (its body read) and when the upstream was
    /// done with it: its answer sent, or the request abandoned because its
    /// connection closed mid-hold (a proxy killed). The window in which it
    /// was in flight at the upstream.
    pub at: Instant,
    pub done: Option<Instant>,
}

/// Marks an [`Arrival`] done when the upstream's handler ends, answered or
/// dropped.
struct DoneOnDrop {
    log: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>>,
    i: usize,
}

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(a) = l.get_mut(self.i) {
                a.done.get_or_insert_with(Instant::now);
            }
        }
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_holding(0).await
    }

    /// An upstream that holds each request 0..`hold_ms` ms (a fresh draw
    /// each) before answering, so writes overlap there and a drain that
    /// fails to wait for them shows in [`Arrival::done`].
    pub async fn start_holding(hold_ms: u64) -> Upstream {
        Self::start_with(hold_ms, None).await
    }

    /// The same upstream behind TLS (`https://`), with `acceptor`'s
    /// certificate.
    pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> Upstream {
        Self::start_with(0, Some(acceptor)).await
    }

    async fn start_with(hold_ms: u64, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let log: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>> = Default::default();
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let log2 = log.clone();
        let conns2 = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log2.clone();
                let conns = conns2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let token = req
                                .headers()
                                .get("fencing-token")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let (parts, body) = req.into_parts();
                            let _ = body.collect().await;
                            let i = {
                                let mut l = log.lock().unwrap();
                                l.push(Arrival {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_string(),
                                    token,
                                    at: Instant::now(),
                                    done: None,
                                });
                                l.len() - 1
                            };
                            let done = DoneOnDrop {
                                log: log.clone(),
                                i,
                            };
                            if hold_ms > 0 {
                                let ms = rand::random::<u64>() % hold_ms;
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            drop(done);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let http1 = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http1.serve_connection(io, svc).await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http1.serve_connection(io, svc).await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            log,
            conns,
            task,
        }
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP forwarder on loopback that a test can cut and restore, to take a
/// dependency (the store) away and give it back without touching it, or
/// slow down ([`Shim::delay`]).
pub struct Shim {
    pub addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Shim {
    pub async fn start(target: SocketAddr) -> Shim {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind shim");
        let addr = listener.local_addr().expect("shim addr");
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (gen_tx, _) = tokio::sync::watch::channel(0u64);
        let generation = std::sync::Arc::new(gen_tx);
        let (up2, gen2, delay2) = (up.clone(), generation.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = gen2.subscribe();
                let delay = delay2.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, delay.clone()) => {}
                        _ = pump(sr, cw, delay) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Shim {
            addr,
            up,
            generation,
            delay_ms,
            task,
        }
    }

    /// Refuse new connections and sever the open ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds every chunk `ms` ms before passing it on, both ways (0: none).
    pub fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One direction of a [`Shim`]: copies until either end closes, each chunk
/// held the shim's current delay first (order is kept: one chunk at a time).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let ms = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP forwarder to `target` whose new connections can be held back:
/// while [`ConnectGate::hold`] is on, a connect to it does not complete,
/// however long, and it completes once [`ConnectGate::release`] opens the
/// gate (at the connecting side's next SYN retransmission: 1 s, 3 s, 7 s
/// ... after its first).
///
/// No timer decides it: the gate's listener has a backlog of 0 (one
/// connection may wait to be accepted), and while held it accepts nothing
/// and has a connection of its own waiting, so its accept queue is full
/// and the kernel drops every new SYN. Connections already forwarded are
/// left alone.
pub struct ConnectGate {
    pub addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    parked: tokio::sync::watch::Receiver<bool>,
    filler: Option<tokio::net::TcpStream>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectGate {
    pub async fn start(target: SocketAddr) -> ConnectGate {
        let socket = tokio::net::TcpSocket::new_v4().expect("gate socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind gate");
        let listener = socket.listen(0).expect("listen with a backlog of 0");
        let addr = listener.local_addr().expect("gate addr");
        let (open, mut open_rx) = tokio::sync::watch::channel(true);
        let (parked_tx, parked) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                if !*open_rx.borrow_and_update() {
                    // Held: accept nothing, and say so.
                    parked_tx.send_replace(true);
                    if open_rx.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                parked_tx.send_replace(false);
                let client = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((c, _)) => c,
                        Err(_) => return,
                    },
                    // Accepting is cancel-safe: a connection that arrives
                    // now waits in the queue.
                    r = open_rx.changed() => {
                        if r.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let no_delay = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, no_delay.clone()) => {}
                        _ = pump(sr, cw, no_delay) => {}
                    }
                });
            }
        });
        ConnectGate {
            addr,
            open,
            parked,
            filler: None,
            task,
        }
    }

    /// From now until [`ConnectGate::release`], no new connection to the
    /// gate completes.
    pub async fn hold(&mut self) {
        self.open.send_replace(false);
        let mut parked = self.parked.clone();
        parked
            .wait_for(|p| *p)
            .await
            .expect("the gate's task is running");
        // The one place in the accept queue, taken.
        self.filler = Some(
            tokio::net::TcpStream::connect(self.addr)
                .await
                .expect("the gate's own connection"),
        );
    }

    /// Opens the gate: the queued connection of its own is accepted (and
    /// ends), and held connects complete at their next SYN.
    pub fn release(&mut self) {
        self.filler = None;
        self.open.send_replace(true);
    }
}

impl Drop for ConnectGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of the first sample of `name_and_labels` (a metric name, or
/// a name with its `{labels}`) in Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// GETs a URL and returns (status, body).
pub async fn get(url: &str, bearer: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// PUTs through a fencing proxy with the given token and resource headers.
pub async fn put(
    url: &str,
    token: Option<&str>,
    resource: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut req = reqwest::Client::new().put(url).body(body.to_owned());
    if let Some(t) = token {
        req = req.header("Fencing-Token", t);
    }
    if let Some(r) = resource {
        req = req.header("Fencing-Resource", r);
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// SIGSTOPs `pid` and waits until every thread of it has stopped. `kill`
/// returning is not enough: the kernel wakes one thread of the process to
/// begin the group stop, and until that thread gets a CPU (milliseconds on
/// a loaded machine) the others keep running and may still serve a
/// request that arrives "after" the stop.
pub async fn stop_process(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success()),
        "kill -STOP {pid}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} not stopped 10 s after SIGSTOP"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether every thread of `pid` is in state T (stopped), from
/// `/proc/<pid>/task/<tid>/stat` (the state follows the command name's
/// closing parenthesis).
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut threads = 0;
    for task in tasks {
        let Ok(stat) = task.and_then(|t| std::fs::read_to_string(t.path().join("stat"))) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state != Some("T") {
            return false;
        }
        threads += 1;
    }
    threads > 0
}

/// Polls `f` until it returns Some or `secs` pass.
pub async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client straight to the test's database, bypassing every proxy: what
/// the tests read the storage's own truth through.
pub async fn direct(db: &TestDb) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect directly");
    tokio::spawn(conn);
    c
}

/// Startup `options` carrying a token and a resource.
pub fn opts(token: impl std::fmt::Display, resource: &str) -> String {
    format!("-c fencing.token={token} -c fencing.resource={resource}")
}

/// The SQLSTATE of a failed statement.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a server error: {e}"))
}

/// The number in a token string (`n` or `n.sig`).
pub fn token_value(token: &str) -> u64 {
    token
        .split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a token: {token:?}"))
}
