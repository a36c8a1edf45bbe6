//! Heap allocations per proxied HTTP request and per Postgres statement,
//! held to a budget.
//!
//! The proxy runs in this process (the `fencepost` library's
//! `serve::start`) under a counting global allocator. The client and the
//! upstream are plain blocking sockets on their own threads with fixed
//! buffers, so in steady state they allocate nothing: the same loop run
//! straight at the upstream measures that, and is subtracted. What is left
//! is what the proxy allocates per keep-alive request, for a read and for a
//! fenced write with the same token (the steady state of a leader).
//!
//! The byte relay (`data_path = "relay"`, the default) allocates nothing
//! per keep-alive request once its buffers have grown: 0.02 per GET and
//! per PUT when its budget was set (2000 requests each, debug build; a
//! few allocations over the whole run, none per request), so the budget
//! is 0.1, as for the Postgres proxy: one allocation per request anywhere
//! on the path fails it. The hyper path (`data_path = "hyper"`, the
//! fallback) measured 13.02 per GET and 16.02 per PUT; its budgets are
//! one above, so it cannot grow unnoticed either. Run with `--nocapture`
//! to see the figures.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations per GET through the byte relay (`data_path = "relay"`), at
/// most.
const RELAY_GET_BUDGET: f64 = 0.1;
/// Allocations per PUT through the relay, 64-byte body, the current token.
const RELAY_PUT_BUDGET: f64 = 0.1;
/// The same through the hyper path (`data_path = "hyper"`), the fallback.
const HYPER_GET_BUDGET: f64 = 14.0;
const HYPER_PUT_BUDGET: f64 = 17.0;

const ROUNDS: usize = 2000;
const WARMUP: usize = 300;
/// Measured windows per case; the least counts (see `least_of`).
const REPEATS: usize = 3;

/// The counter is process-wide: the tests take turns (`cargo test` runs
/// them on parallel threads; nextest in separate processes).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The content length of a head in `buf[..end]`, 0 if none.
fn content_length(head: &[u8]) -> usize {
    let text = std::str::from_utf8(head).unwrap_or("");
    text.split("\r\n")
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// Reads one message (head and `Content-Length` body) into `buf`.
fn read_message(s: &mut TcpStream, buf: &mut [u8]) -> bool {
    let mut have = 0;
    loop {
        if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let total = end + 4 + content_length(&buf[..end]);
            if have >= total {
                return true;
            }
        }
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => have += n,
        }
    }
}

/// An upstream answering every request `200` with a 2-byte body.
fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 8192];
                while read_message(&mut s, &mut buf) {
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `request` `n` times on one keep-alive connection.
fn drive(to: SocketAddr, request: &[u8], n: usize) {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = [0u8; 8192];
    for _ in 0..n {
        s.write_all(request).unwrap();
        assert!(read_message(&mut s, &mut buf), "connection closed");
        assert!(buf.starts_with(b"HTTP/1.1 200"));
    }
}

/// Allocations per request of `n` requests to `to`, after a warm-up.
fn per_request(to: SocketAddr, request: &'static [u8]) -> f64 {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let mut s = TcpStream::connect(to).unwrap();
                s.set_nodelay(true).unwrap();
                let mut buf = [0u8; 8192];
                let mut round = |n| {
                    for _ in 0..n {
                        s.write_all(request).unwrap();
                        assert!(read_message(&mut s, &mut buf), "connection closed");
                        assert!(buf.starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..40]);
                    }
                };
                round(WARMUP);
                least_of(REPEATS, || {
                    let region = Region::new(GLOBAL);
                    round(ROUNDS);
                    region.change().allocations as f64 / ROUNDS as f64
                })
            })
            .join()
            .unwrap()
    })
}

const GET: &[u8] = b"GET /kv/1 HTTP/1.1\r\nHost: p\r\n\r\n";
const PUT: &[u8] = b"PUT /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 7\r\nContent-Length: 64\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123";

/// Allocations per proxied GET and PUT (harness subtracted) through a
/// proxy with `data_path = path`.
async fn proxied_allocations(path: &str) -> (f64, f64) {
    let up = upstream();
    let dir = std::env::temp_dir().join(format!("fencepost-alloc-{path}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("fencepost.toml");
    std::fs::write(
        &config_path,
        format!(
            "store = \"sqlite://{}/fencepost.db\"\n[[http]]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://{up}\"\ndata_path = \"{path}\"\nroutes = [{{ prefix = \"/kv/\", resource = \"kv\" }}]\n",
            dir.display()
        ),
    )
    .unwrap();
    let config = fencepost::config::Config::load(Some(&config_path)).unwrap();
    let listeners = fencepost::serve::Listeners {
        elector: None,
        http: vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()],
        postgres: Vec::new(),
        admin: None,
    };
    let server = fencepost::serve::start(config, listeners, Duration::from_secs(1))
        .await
        .unwrap();
    let proxy = server.addrs().http[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run_until(async {
        let _ = stopped.await;
    }));

    let figures = tokio::task::spawn_blocking(move || {
        // The first write with token 7 raises the mark (store I/O, once).
        drive(proxy, PUT, 1);
        let harness_get = per_request(up, GET);
        let harness_put = per_request(up, PUT);
        let get = per_request(proxy, GET) - harness_get;
        let put = per_request(proxy, PUT) - harness_put;
        (harness_get, harness_put, get, put)
    })
    .await
    .unwrap();
    let (harness_get, harness_put, get, put) = figures;
    println!(
        "data_path = {path}: allocations per request: proxied GET {get:.2}, proxied PUT {put:.2} \
         (harness alone: {harness_get:.2} GET, {harness_put:.2} PUT)"
    );
    assert!(
        harness_get < 0.1 && harness_put < 0.1,
        "the harness itself allocates per request: {harness_get} {harness_put}"
    );
    let _ = stop.send(());
    let _ = run.await;
    let _ = std::fs::remove_dir_all(&dir);
    (get, put)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_proxied_request_stay_within_budget() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (get, put) = proxied_allocations("relay").await;
    assert!(
        get <= RELAY_GET_BUDGET,
        "a GET through the relay allocates {get:.2} times (budget {RELAY_GET_BUDGET})"
    );
    assert!(
        put <= RELAY_PUT_BUDGET,
        "a PUT through the relay allocates {put:.2} times (budget {RELAY_PUT_BUDGET})"
    );
    let (get, put) = proxied_allocations("hyper").await;
    assert!(
        get <= HYPER_GET_BUDGET,
        "a GET through the hyper path allocates {get:.1} times (budget {HYPER_GET_BUDGET})"
    );
    assert!(
        put <= HYPER_PUT_BUDGET,
        "a PUT through the hyper path allocates {put:.1} times (budget {HYPER_PUT_BUDGET})"
    );
}

// ---------------------------------------------------------------- Postgres
//
// A statement through the Postgres proxy (proxy mode) to a real Postgres,
// from a client speaking the protocol over a blocking socket with fixed
// buffers (so the harness allocates nothing; checked against Postgres
// directly). The session's fast path (issue 13): a statement seen before on
// the connection reuses its classification, a write with the token its last
// admitted write presented is one CAS on the slot it holds. Neither
// allocates; what the budget leaves room for is the read buffer, which a
// Parse message kept for the audit can pin, so it is replaced now and then
// (well under one allocation in ten statements).

/// Allocations per statement, at most, on the fast path.
const PG_BUDGET: f64 = 0.1;

fn pg_msg(tag: u8, body: &[&[u8]]) -> Vec<u8> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    let mut m = vec![tag];
    m.extend_from_slice(&u32::try_from(len + 4).unwrap().to_be_bytes());
    for b in body {
        m.extend_from_slice(b);
    }
    m
}

/// Reads messages until a ReadyForQuery; panics on an ErrorResponse.
fn pg_until_ready(s: &mut TcpStream, buf: &mut [u8]) {
    let (mut have, mut at) = (0usize, 0usize);
    loop {
        while have - at >= 5 {
            let len = u32::from_be_bytes(buf[at + 1..at + 5].try_into().unwrap()) as usize;
            if have - at < 1 + len {
                break;
            }
            let tag = buf[at];
            assert!(
                tag != b'E',
                "error from the server: {}",
                String::from_utf8_lossy(&buf[at + 5..at + 1 + len])
            );
            if tag == b'R' {
                let code = u32::from_be_bytes(buf[at + 5..at + 9].try_into().unwrap());
                assert_eq!(code, 0, "the test expects trust authentication");
            }
            at += 1 + len;
            if tag == b'Z' {
                assert_eq!(at, have, "bytes after ReadyForQuery");
                return;
            }
        }
        if at > 0 {
            buf.copy_within(at..have, 0);
            have -= at;
            at = 0;
        }
        let n = s.read(&mut buf[have..]).unwrap();
        assert!(n > 0, "connection closed");
        have += n;
    }
}

/// A session to `to` (Postgres or the proxy) with the token in its options.
fn pg_connect(to: SocketAddr, db: &str) -> TcpStream {
    let mut s = TcpStream::connect(to).unwrap();
    s.set_nodelay(true).unwrap();
    let params = format!(
        "user\0postgres\0database\0{db}\0options\0-c fencing.token=1 -c fencing.resource=alloc\0\0"
    );
    let mut m = Vec::new();
    m.extend_from_slice(&u32::try_from(8 + params.len()).unwrap().to_be_bytes());
    m.extend_from_slice(&196_608u32.to_be_bytes());
    m.extend_from_slice(params.as_bytes());
    s.write_all(&m).unwrap();
    pg_until_ready(&mut s, &mut [0u8; 8192]);
    s
}

/// Allocations per round of `round` (one statement) on a fresh session.
fn pg_per_statement(to: SocketAddr, db: &str, setup: &[u8], round: &[u8]) -> f64 {
    let mut s = pg_connect(to, db);
    let mut buf = [0u8; 8192];
    if !setup.is_empty() {
        s.write_all(setup).unwrap();
        pg_until_ready(&mut s, &mut buf);
    }
    let mut go = |n| {
        for _ in 0..n {
            s.write_all(round).unwrap();
            pg_until_ready(&mut s, &mut buf);
        }
    };
    go(WARMUP);
    least_of(REPEATS, || {
        let region = Region::new(GLOBAL);
        go(ROUNDS);
        region.change().allocations as f64 / ROUNDS as f64
    })
}

/// The counter sees the whole process: besides the path under test, the
/// proxy's background work (timers, store upkeep, metrics) allocates
/// now and then, and on a slow machine a burst of it can land in one
/// measured window (CI once saw 0.110 for one case while every other case
/// measured 0.015). A per-request allocation shows in every window, so
/// the least of a few windows measures the path and not the background.
fn least_of(repeats: usize, mut window: impl FnMut() -> f64) -> f64 {
    (0..repeats).map(|_| window()).fold(f64::INFINITY, f64::min)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_proxied_statement_stay_within_budget() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // The test's own database, on the server DATABASE_URL names.
    let admin_url = database_url();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let admin_conn = tokio::spawn(conn);
    let db = format!("fencepost_alloc_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = admin_url.parse::<tokio_postgres::Config>().unwrap();
    let host = match url.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = url.get_ports().first().copied().unwrap_or(5432);
    let server: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();

    let dir = std::env::temp_dir().join(format!("fencepost-alloc-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("fencepost.toml");
    std::fs::write(
        &config_path,
        format!(
            "store = \"sqlite://{}/fencepost.db\"\n[[postgres]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{server}\"\nenforce = \"proxy\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let config = fencepost::config::Config::load(Some(&config_path)).unwrap();
    let listeners = fencepost::serve::Listeners {
        elector: None,
        http: Vec::new(),
        postgres: vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()],
        admin: None,
    };
    let started = fencepost::serve::start(config, listeners, Duration::from_secs(1))
        .await
        .unwrap();
    let proxy = started.addrs().postgres[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(started.run_until(async {
        let _ = stopped.await;
    }));

    let q = |sql: &str| pg_msg(b'Q', &[sql.as_bytes(), b"\0"]);
    let parse = |name: &str, sql: &str| {
        pg_msg(
            b'P',
            &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0", &[0, 0]],
        )
    };
    let bind = |statement: &str| pg_msg(b'B', &[b"\0", statement.as_bytes(), b"\0", &[0u8; 6]]);
    let execute = pg_msg(b'E', &[b"\0", &[0u8; 4]]);
    let sync = pg_msg(b'S', &[]);
    let extended = |sql: &str| [parse("", sql), bind(""), execute.clone(), sync.clone()].concat();
    let prepared = [bind("s"), execute.clone(), sync.clone()].concat();

    const READ: &str = "SELECT x FROM alloc_t WHERE id = 1";
    const WRITE: &str = "UPDATE alloc_t SET x = x + 1 WHERE id = 1";
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("simple read", Vec::new(), q(READ)),
        ("extended read", Vec::new(), extended(READ)),
        (
            "prepared read",
            [parse("s", READ), sync.clone()].concat(),
            prepared.clone(),
        ),
        ("simple write", Vec::new(), q(WRITE)),
        ("extended write", Vec::new(), extended(WRITE)),
        (
            "prepared write",
            [parse("s", WRITE), sync.clone()].concat(),
            prepared.clone(),
        ),
    ];

    let name = db.clone();
    let figures = tokio::task::spawn_blocking(move || {
        let db = name;
        // The table, and the first write with token 1 (the mark becomes 1:
        // store I/O, once).
        let mut s = pg_connect(proxy, &db);
        s.write_all(&q(
            "CREATE TABLE alloc_t (id int PRIMARY KEY, x int); INSERT INTO alloc_t VALUES (1, 0)",
        ))
        .unwrap();
        pg_until_ready(&mut s, &mut [0u8; 8192]);
        s.write_all(&q(WRITE)).unwrap();
        pg_until_ready(&mut s, &mut [0u8; 8192]);
        drop(s);
        cases
            .iter()
            .map(|(name, setup, round)| {
                let harness = pg_per_statement(server, &db, setup, round);
                let through = pg_per_statement(proxy, &db, setup, round) - harness;
                (*name, harness, through)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (name, harness, through) in &figures {
        println!("allocations per statement, {name}: {through:.3} through the proxy (harness alone: {harness:.3})");
    }
    for (name, harness, through) in &figures {
        // The client allocates nothing; what the process does meanwhile
        // in the background (timers, the metrics upkeep) shows here.
        assert!(
            *harness < 0.1,
            "the harness allocates per statement ({name}): {harness}"
        );
        assert!(
            *through <= PG_BUDGET,
            "a proxied statement ({name}) allocates {through:.3} times (budget {PG_BUDGET})"
        );
    }

    let _ = stop.send(());
    let _ = run.await;
    let _ = std::fs::remove_dir_all(&dir);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    drop(admin);
    let _ = admin_conn.await;
}
