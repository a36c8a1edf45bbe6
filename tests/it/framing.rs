//! HTTP/1.1 framing through the real HTTP proxy, over raw sockets: each
//! finding of issue 14's framing review is a test here, written to fail
//! against the proxy that had the hole.
//!
//! Requests are written byte by byte as a hostile client would (an HTTP
//! library would normalise them first), and the upstreams are either the
//! recording test upstream or a scripted raw one that answers what no
//! library would send (a length with chunked framing, an unasked-for
//! 101, an answer before the request body is in).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Conf, InProc, Section, TempDir, Upstream};

/// A fencepost server (in-process) with one HTTP proxy (route `/kv/` →
/// `kv`) in front of `upstream`.
struct Env {
    _dir: TempDir,
    _server: InProc,
    proxy: SocketAddr,
}

impl Env {
    async fn start(prefix: &str, upstream: SocketAddr) -> Env {
        let dir = TempDir::new(prefix);
        let mut conf = Conf::sqlite(dir.path());
        let proxy = conf.http(
            Section::to(format!("http://{upstream}"))
                .set("upstream_timeout", "5s")
                .raw("routes", r#"[{ prefix = "/kv/", resource = "kv" }]"#),
        );
        let server = InProc::start(conf).await;
        Env {
            _dir: dir,
            _server: server,
            proxy,
        }
    }

    /// Sends `raw` on a new connection and reads until the proxy closes
    /// it (requests say `Connection: close`) or 10 s pass.
    async fn exchange(&self, raw: &str) -> String {
        let mut s = TcpStream::connect(self.proxy).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn status(answer: &str) -> u16 {
    answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// A raw upstream: for every request head it sees on a connection (a
/// blank line after the last one it answered), it writes `answer`,
/// without reading any body first. Bodies are read and thrown away.
async fn raw_upstream(answer: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut answered = 0;
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen[answered..].windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        answered += end + 4;
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Route escapes: a path spelled so that the upstream reaches `/kv/`
/// while a prefix match on the raw path does not (or may not) is decided
/// on its normalised form, or refused. Here the writer names another
/// resource, so every such path must be refused and none forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_escapes_are_normalised_or_refused() {
    let upstream = Upstream::start().await;
    let env = Env::start("framing-routes", upstream.addr).await;
    for path in [
        "/%6bv/1",
        "/%6Bv/1",
        "/k%76/1",
        "/KV/1",
        "//kv/1",
        "/x//kv/1",
        "/kv;x/1",
        "/x/..;/kv/1",
        "/x/%2e%2e;/kv/1",
        "/x/%252e%252e/kv/1",
        "/x/%2e%2e/kv/1",
    ] {
        let answer = env
            .exchange(&format!(
                "PUT {path} HTTP/1.1\r\nHost: p\r\nFencing-Token: 1\r\nFencing-Resource: other\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
            ))
            .await;
        assert_eq!(status(&answer), 400, "{path}: {answer}");
        assert!(
            answer.contains("urn:fencepost:invalid-resource"),
            "{path}: {answer}"
        );
    }
    assert!(upstream.arrivals().is_empty(), "{:?}", upstream.arrivals());
    // The normalised path picks the route: no header needed.
    let answer = env
        .exchange("PUT /%6bv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
        .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(upstream.arrivals().len(), 1);
}

/// `Connection: Fencing-Token` made the proxy strip the token on its way
/// to the upstream. Naming a fencing or framing header in `Connection` is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_naming_the_token_is_refused() {
    let upstream = Upstream::start().await;
    let env = Env::start("framing-conn", upstream.addr).await;
    for named in ["Fencing-Token", "fencing-resource", "Content-Length"] {
        let answer = env
            .exchange(&format!(
                "PUT /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 1\r\nContent-Length: 1\r\nConnection: close, {named}\r\n\r\nx"
            ))
            .await;
        assert_eq!(status(&answer), 400, "{named}: {answer}");
    }
    assert!(upstream.arrivals().is_empty(), "{:?}", upstream.arrivals());
}

/// A body on a read would reach the upstream unfenced: a read with a body
/// is fenced like a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_a_body_are_fenced() {
    let upstream = Upstream::start().await;
    let env = Env::start("framing-readbody", upstream.addr).await;
    for method in ["GET", "HEAD", "OPTIONS"] {
        let answer = env
            .exchange(&format!(
                "{method} /kv/1 HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
            ))
            .await;
        assert_eq!(status(&answer), 428, "{method}: {answer}");
        let answer = env
            .exchange(&format!(
                "{method} /kv/1 HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ))
            .await;
        assert_eq!(status(&answer), 428, "{method} chunked: {answer}");
    }
    assert!(upstream.arrivals().is_empty(), "{:?}", upstream.arrivals());
    // With a token it is a fenced write like any other; without a body a
    // read needs none.
    let answer = env
        .exchange("GET /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        .await;
    assert_eq!(status(&answer), 200, "{answer}");
    let answer = env
        .exchange("GET /kv/1 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status(&answer), 200, "{answer}");
}

/// A malformed chunked request body was answered `502` (blamed on the
/// upstream). The client's framing error is the client's: `400`, and not
/// counted as an upstream failure. (The part of the body read before the
/// error has reached the upstream by then: only the byte relay, which
/// checks each read before writing it, can stop that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_the_clients_error() {
    let upstream = Upstream::start().await;
    let env = Env::start("framing-badchunk", upstream.addr).await;
    for body in ["5\r\nhelloXX0\r\n\r\n", "zz\r\nhello\r\n0\r\n\r\n"] {
        let answer = env
            .exchange(&format!(
                "PUT /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
            ))
            .await;
        assert_eq!(status(&answer), 400, "{body:?}: {answer}");
        assert!(
            answer.contains("urn:fencepost:bad-request"),
            "{body:?}: {answer}"
        );
    }
}

/// CONNECT was forwarded, and a request with two Hosts or none (HTTP/1.1)
/// accepted: all refused, none forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_bad_hosts_are_refused() {
    let upstream = Upstream::start().await;
    let env = Env::start("framing-host", upstream.addr).await;
    let answer = env
        .exchange("CONNECT p:443 HTTP/1.1\r\nHost: p:443\r\nFencing-Token: 1\r\nFencing-Resource: kv\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status(&answer), 405, "{answer}");
    for raw in [
        "PUT /kv/1 HTTP/1.1\r\nHost: p\r\nHost: q\r\nFencing-Token: 1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        "PUT /kv/1 HTTP/1.1\r\nFencing-Token: 1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        "GET /kv/1 HTTP/1.1\r\nHost: p\r\nhost: p\r\nConnection: close\r\n\r\n",
    ] {
        let answer = env.exchange(raw).await;
        assert_eq!(status(&answer), 400, "{raw:?}: {answer}");
    }
    assert!(upstream.arrivals().is_empty(), "{:?}", upstream.arrivals());
    // HTTP/1.0 needs no Host.
    let answer = env.exchange("GET /kv/1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "{answer}");
}

/// An upstream answer with Content-Length and chunked framing was relayed
/// with the length and a truncated body. Chunked wins (RFC 9112 section
/// 6.3): the client gets the whole body, framed consistently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_length_with_chunked_is_read_as_chunked() {
    let (up, _task) = raw_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
    )
    .await;
    let env = Env::start("framing-clte", up).await;
    let answer = env
        .exchange("GET /kv/1 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.contains("hello world"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("content-length: 3"),
        "{answer}"
    );
}

/// A 101 the client did not ask for (the proxy never forwards `Upgrade`)
/// is not relayed: the connection would turn into a tunnel nobody fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_upgrade_is_not_relayed() {
    let (up, _task) = raw_upstream(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    let env = Env::start("framing-101", up).await;
    let answer = env
        .exchange(
            "GET /kv/1 HTTP/1.1\r\nHost: p\r\nUpgrade: x\r\nConnection: close, upgrade\r\n\r\n",
        )
        .await;
    assert_eq!(status(&answer), 502, "{answer}");
}

/// An upstream that answers before the request body is in: its connection
/// went back to the pool while the client was still uploading, and the
/// next request (another client's) waited behind the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_progress_keeps_its_connection_out_of_the_pool() {
    let (up, _task) = raw_upstream("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let env = Env::start("framing-pool", up).await;
    // Warm one pooled connection, then start a slow upload on it.
    let answer = env
        .exchange("GET /r HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status(&answer), 200, "{answer}");
    let mut slow = TcpStream::connect(env.proxy).await.unwrap();
    slow.write_all(
        b"PUT /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 1\r\nContent-Length: 10\r\n\r\nhello",
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    slow.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // The upload is paused; another client's read must not wait for it.
    let t = Instant::now();
    let answer = env
        .exchange("GET /r HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        .await;
    let took = t.elapsed();
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(
        took < Duration::from_millis(1500),
        "a read waited {took:?} behind another client's paused upload"
    );
    slow.write_all(b"world").await.unwrap();
}

/// After a refusal the client's connection either stays usable (the body
/// was read) or the refusal says `Connection: close`: a client that
/// reuses it must never meet a silently closed socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_keeps_the_connection_or_says_close() {
    let upstream = Upstream::start().await;
    let env = Env::start("framing-409", upstream.addr).await;
    let answer = env
        .exchange("PUT /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 5\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
        .await;
    assert_eq!(status(&answer), 200, "{answer}");
    // (body sent with the head, body still to come): the last case is a
    // client that has not finished its upload when the refusal comes.
    for (now, later) in [("", ""), ("x", ""), ("0123456789", ""), ("01234", "56789")] {
        let mut s = TcpStream::connect(env.proxy).await.unwrap();
        let stale = format!(
            "PUT /kv/1 HTTP/1.1\r\nHost: p\r\nFencing-Token: 4\r\nContent-Length: {}\r\n\r\n{now}",
            now.len() + later.len()
        );
        s.write_all(stale.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 409"), "{head}");
        let len: usize = header(&head, "content-length").unwrap().parse().unwrap();
        let mut rest = vec![0u8; len];
        s.read_exact(&mut rest).await.unwrap();
        if header(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            continue;
        }
        // Said nothing: the connection must still carry a request.
        let next = format!("{later}GET /kv/1 HTTP/1.1\r\nHost: p\r\n\r\n");
        let sent = s.write_all(next.as_bytes()).await;
        let next = read_head(&mut s).await;
        assert!(
            sent.is_ok() && next.starts_with("HTTP/1.1 200"),
            "body {now:?}+{later:?}: after a 409 without Connection: close, the next request got {next:?} ({sent:?})"
        );
    }
}

/// Reads one response head (to the blank line), or what came before EOF.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// What a hyper server (the reference the relay is judged against) made
/// of one connection's bytes: each request's path and body, in order.
async fn hyper_reads(raw: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let log = log.clone();
            async move {
                let path = req.uri().path().to_owned();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec());
                if let Ok(body) = body {
                    log.lock().unwrap().push((path, body));
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    server.abort();
    let seen = seen.lock().unwrap().clone();
    seen
}

/// The chunk data of a chunked body `wire` has validated.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&body[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap(), 16).unwrap();
        body = &body[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// The relay's framing (`wire::http1`) against hyper's, on the crafted
/// requests of the framing review: wherever `wire` accepts a request,
/// hyper reads the same body and then the same next request (so the two
/// can never disagree about where a message ends); where `wire` refuses,
/// hyper may accept (`wire` is stricter by design), which is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_framing_agrees_with_hyper_or_is_stricter() {
    use wire::http1::body::{BodyReader, Framing};
    use wire::http1::head::{header_slots, parse_request};

    let heads_and_bodies: &[&str] = &[
        "Content-Length: 5\r\n\r\nhello",
        "Content-Length: 0\r\n\r\n",
        "Content-Length: 005\r\n\r\nhello",
        "Content-Length: +5\r\n\r\nhello",
        "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "Content-Length: 5, 5\r\n\r\nhello",
        "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        "X: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",
        "Content-Length : 5\r\n\r\nhello",
        "Content-Length: 5\n\r\nhello",
        "Content-Length: 5\r\n\nhello",
        "Connection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    ];
    let mut stricter = Vec::new();
    for (i, tail) in heads_and_bodies.iter().enumerate() {
        let first = format!("POST /case/{i} HTTP/1.1\r\nHost: h\r\n{tail}");
        let next = format!("GET /next/{i} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let raw = [first.as_bytes(), next.as_bytes()].concat();

        let mut headers = header_slots();
        let wire_body = match parse_request(&raw, &mut headers) {
            Ok(Some(head)) => {
                let mut reader = BodyReader::new(head.framing);
                let rest = &raw[head.len..];
                match reader.advance(rest) {
                    Ok(p) if p.done => {
                        let body = &rest[..p.consumed];
                        assert_eq!(&rest[p.consumed..], next.as_bytes(), "case {i}: {tail:?}");
                        Some(match head.framing {
                            Framing::Chunked => dechunk(body),
                            _ => body.to_vec(),
                        })
                    }
                    Ok(_) => panic!("case {i}: wire wants more of a complete body: {tail:?}"),
                    Err(_) => None,
                }
            }
            Ok(None) => panic!("case {i}: wire wants more of a complete head: {tail:?}"),
            Err(_) => None,
        };
        let hyper = hyper_reads(raw.clone()).await;
        match wire_body {
            Some(body) => {
                assert_eq!(
                    hyper,
                    vec![
                        (format!("/case/{i}"), body),
                        (format!("/next/{i}"), Vec::new())
                    ],
                    "case {i}: wire and hyper read {tail:?} differently"
                );
            }
            None if !hyper.is_empty() => stricter.push(tail),
            None => {}
        }
    }
    println!("refused by wire, accepted by hyper: {stricter:#?}");
}
