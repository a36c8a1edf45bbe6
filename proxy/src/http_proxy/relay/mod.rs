//! The proxied data path as a byte relay: each request head is parsed once
//! ([`wire::http1::head`]), decided, and its own header lines are written
//! on to the upstream minus the hop-by-hop and `Connection`-named lines;
//! bodies in both directions go through the exact body machine
//! ([`wire::http1::body`]), which says where each ends without copying it.
//! The upstream connection is a plain socket driven inside the client's
//! task: no `HeaderMap`, no request or response structs, no channel or
//! task between the two halves (what hyper's server and client cost per
//! request, see issue 14 and BENCHMARKS.md).
//!
//! What the hyper path did stays, in the same order: the concurrency
//! bound (503), the fencing decision (problem+json refusals, audited by
//! the fencer), on a tier the last look at the replica lease immediately
//! before the request's first byte is written upstream
//! ([`Fencer::still_leased`](crate::fencer::Fencer::still_leased): 503
//! if it lapsed since the admission), the in-flight guard held until the
//! upstream's answer has been read to its end (also when the client hangs
//! up: the answer is still read, and discarded), `upstream_timeout`
//! (504, which lets go of the guard), the header-read and body-stall
//! bounds (408), 502 for an upstream that cannot be reached or breaks
//! HTTP.
//!
//! Framing rules, each a test in `tests/it/framing.rs`: a request head or
//! body that is not exactly valid is refused before any of it is
//! forwarded where the error is in what was already read (a chunked body
//! is checked read by read, before each read is written on); a refused
//! request whose body was not read says `connection: close`; the
//! upstream's 1xx are not relayed to HTTP/1.0 clients (and `100 Continue`
//! never, the proxy answers `Expect` itself), 204/304/`HEAD` answers have
//! no body, `Content-Length` with chunked is read as chunked with the
//! length line dropped, a close-delimited answer closes the client's
//! connection after it; an upstream connection is reused only after an
//! exchange that ended cleanly in both directions.
//!
//! An `https://` upstream is the same exchange over a TLS session
//! (`upstream.rs` `UpConn`); what differs is only how an early answer is
//! noticed mid-upload (read, not peeked, see `Early::answered`) and that
//! writes are flushed through the session.

mod upstream;

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Sleep;
use wire::http::fence_input;
use wire::http1::body::{BodyReader, Framing, Progress};
use wire::http1::head::{
    header_slots, parse_request, parse_response, HeadError, RequestHead, ResponseKind, Version,
};

pub use self::upstream::Upstreams;
use self::upstream::{ConnectError, UpConn};
use super::problem::{self, Problem};
use super::HttpProxy;
use crate::edge::http1::problem_bytes;
use crate::fencer::{Admission, Decision, WriteInfo};
use crate::shutdown::Shutdown;

/// Bytes read at a time while a body is relayed.
const CHUNK: usize = 16 * 1024;
/// Largest response head taken from the upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// A connection closed with its client's body unread is read (and the
/// bytes discarded) for at most this long and this much first, so the
/// answer is not lost to a reset from the unread bytes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// What a client connection keeps between its requests, so a keep-alive
/// request allocates nothing once they have grown.
struct Buffers {
    /// The client's bytes: a head and whatever came with it.
    head: Vec<u8>,
    /// How far `head` was searched for the end of a head.
    scanned: usize,
    scratch: Scratch,
}

/// The buffers an exchange writes while the request head is borrowed.
struct Scratch {
    /// The client's body, read by read, past what came with the head.
    body: Vec<u8>,
    /// The upstream's answer head and whatever came with it.
    resp: Vec<u8>,
    /// The upstream's body, read by read.
    down: Vec<u8>,
    /// What is written next: a head and the first body bytes, in one write.
    out: Vec<u8>,
}

/// How a client connection goes on after an exchange.
enum Next {
    /// Another request may follow; its first bytes (if any) are these.
    KeepAlive(Leftover),
    Close,
}

/// Where the bytes after a request's body are.
enum Leftover {
    /// In the head buffer, from here on.
    Head(usize),
    /// In the body buffer.
    Body(Range<usize>),
}

/// Serves one client connection until it closes, a request says
/// `Connection: close`, or `shutdown` fires (the request in flight, if
/// any, is finished first).
///
/// `C` is the client's stream: a `TcpStream` (nodelay set at accept), or
/// a TLS stream over one; each is its own monomorphisation, so plaintext
/// pays nothing for TLS existing.
pub async fn serve_connection<C: Client>(
    proxy: Arc<HttpProxy>,
    upstreams: Arc<Upstreams>,
    mut client: C,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let peer = Peer::new(peer);
    // The connection's two timers, each re-armed per use (see `until`):
    // the client's (head, between requests) and the upstream's.
    let mut client_timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut upstream_timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut bufs = Buffers {
        head: Vec::with_capacity(4096),
        scanned: 0,
        scratch: Scratch {
            body: Vec::new(),
            resp: Vec::with_capacity(4096),
            down: Vec::new(),
            out: Vec::with_capacity(4096),
        },
    };
    // One wait for shutdown for the connection's life, polled while it
    // idles between requests: a new one per request cost a receiver
    // clone and a registration with the channel, and their undoing.
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        let timer = client_timer.as_mut();
        match read_head(&proxy, &mut client, &mut bufs, stop.as_mut(), timer).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(p) => {
                answer(&mut client, &mut bufs.scratch.out, &p, true, false).await;
                return linger(client).await;
            }
        }
        let started = Instant::now();
        let next = exchange(
            &proxy,
            &upstreams,
            &mut client,
            &peer,
            &mut bufs,
            &shutdown,
            upstream_timer.as_mut(),
        )
        .await;
        proxy.counters.latency.record(started.elapsed());
        match next {
            Next::KeepAlive(_) if shutdown.is_fired() => return,
            Next::KeepAlive(Leftover::Head(from)) => {
                bufs.head.drain(..from);
            }
            Next::KeepAlive(Leftover::Body(range)) => {
                bufs.head.clear();
                bufs.head.extend_from_slice(&bufs.scratch.body[range]);
            }
            Next::Close => return linger(client).await,
        }
        bufs.scanned = 0;
    }
}

/// A client connection's stream: plain TCP or TLS over it.
pub trait Client: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Client for T {}

/// Writes `bytes` to the client, then flushes. For TCP the flush is a
/// no-op; TLS keeps in its own buffer whatever the socket did not take at
/// once, and nothing else would send it before the client's next read.
async fn to_client<C: Client>(client: &mut C, bytes: &[u8]) -> std::io::Result<()> {
    client.write_all(bytes).await?;
    client.flush().await
}

/// The client: its address, and its IP as `X-Forwarded-For` gives it,
/// formatted once per connection: `Display` for an address costs a few
/// hundred instructions of formatting machinery, which every request paid.
struct Peer {
    addr: SocketAddr,
    text: [u8; Peer::MAX],
    len: usize,
}

impl Peer {
    /// The longest IPv6 text form (an IPv4-mapped address), and more.
    const MAX: usize = 48;

    fn new(addr: SocketAddr) -> Self {
        let mut text = [0u8; Self::MAX];
        let mut rest = &mut text[..];
        // 48 bytes hold any address's text, so this cannot fail.
        let _ = write!(rest, "{}", addr.ip());
        let len = Self::MAX - rest.len();
        Peer { addr, text, len }
    }

    fn ip_text(&self) -> &[u8] {
        &self.text[..self.len]
    }
}

/// `fut`, or `Err(TimedOut)` if `timer` (armed by the caller with
/// `Sleep::reset`) fires first: `tokio::time::timeout` on a timer the
/// connection keeps. A new `timeout` registers a timer in the runtime's
/// wheel under its lock and removes it again, on every call; a kept
/// timer moved to a later deadline is one atomic update (tokio extends a
/// registered deadline in place). The future is polled first, as
/// `timeout` does.
async fn until<F: Future>(timer: Pin<&mut Sleep>, fut: F) -> Result<F::Output, TimedOut> {
    tokio::select! {
        biased;
        out = fut => Ok(out),
        () = timer => Err(TimedOut),
    }
}

/// [`until`] `limit` from now.
async fn bounded<F: Future>(
    mut timer: Pin<&mut Sleep>,
    limit: Duration,
    fut: F,
) -> Result<F::Output, TimedOut> {
    timer.as_mut().reset(tokio::time::Instant::now() + limit);
    until(timer, fut).await
}

/// A deadline passed.
struct TimedOut;

/// Says the connection is over, then reads (and drops) what the client
/// still sends for a moment, so a close with unread bytes does not reset
/// the connection before the client has read its answer.
async fn linger<C: Client>(mut client: C) {
    if client.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Where a head ends in `buf`, searching from `*scanned` on: at a blank
/// line (CRLF or bare LF; the parser refuses the latter), after the
/// first byte that is not one (a client may send empty lines first).
/// Only the LFs are looked at (found with `memchr`), not every byte.
fn head_end(buf: &[u8], scanned: &mut usize) -> bool {
    let Some(first) = buf.iter().position(|&b| b != b'\r' && b != b'\n') else {
        *scanned = buf.len();
        return false;
    };
    let from = (*scanned).max(first);
    let found = memchr::memchr_iter(b'\n', &buf[from..]).any(|i| {
        let at = from + i;
        buf[..at].ends_with(b"\n") || buf[..at].ends_with(b"\n\r")
    });
    // A terminator may straddle reads: look back two bytes next time.
    *scanned = buf.len().saturating_sub(2);
    found
}

/// Reads until `bufs.head` holds a whole head. `Ok(false)`: the client
/// closed, or stayed idle past the idle timeout, or shutdown (`stop`, the
/// connection's wait for it, never polled again once it has resolved)
/// came first, with nothing of a request sent; `Err`: the answer to send
/// before closing (431, 408).
async fn read_head<C: Client>(
    proxy: &HttpProxy,
    client: &mut C,
    bufs: &mut Buffers,
    mut stop: Pin<&mut impl Future<Output = ()>>,
    mut timer: Pin<&mut Sleep>,
) -> Result<bool, Problem> {
    // The whole head within `head_timeout`.
    timer
        .as_mut()
        .reset(tokio::time::Instant::now() + proxy.relay.head_timeout);
    let limit = proxy.relay.max_head;
    loop {
        if head_end(&bufs.head, &mut bufs.scanned) {
            return Ok(true);
        }
        if !bufs.head.is_empty() {
            // What has come so far may already be no HTTP at all (a
            // binary protocol on the wrong port): refuse it now rather
            // than wait out the header timeout.
            let mut slots = header_slots();
            if let Err(e) = parse_request(&bufs.head, &mut slots) {
                return Err(head_problem(&e));
            }
        }
        if bufs.head.len() >= limit {
            return Err(head_too_large(limit));
        }
        if bufs.head.capacity() - bufs.head.len() < 1024 {
            bufs.head.reserve(4096);
        }
        let idle = bufs.head.is_empty();
        let read = tokio::select! {
            biased;
            r = until(timer.as_mut(), client.read_buf(&mut bufs.head)) => r,
            () = stop.as_mut(), if idle => return Ok(false),
        };
        match read {
            Err(_) if bufs.head.iter().all(|&b| b == b'\r' || b == b'\n') => return Ok(false),
            Err(_) => {
                return Err(Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    problem::BAD_REQUEST,
                    "Request header timed out",
                    format!(
                        "the request head did not arrive within {:?}",
                        proxy.relay.head_timeout
                    ),
                ))
            }
            Ok(Ok(0) | Err(_)) => return Ok(false),
            Ok(Ok(_)) => {}
        }
    }
}

fn head_too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        problem::BAD_REQUEST,
        "Request header fields too large",
        format!("the request head is larger than max_header_bytes ({limit})"),
    )
}

/// Writes `p` to the client; a client that is gone is not an error here.
async fn answer<C: Client>(
    client: &mut C,
    out: &mut Vec<u8>,
    p: &Problem,
    close: bool,
    head: bool,
) {
    out.clear();
    problem_bytes(p, close, head, out);
    let _ = to_client(client, out).await;
}

fn bad_request(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        problem::BAD_REQUEST,
        "Bad request",
        detail,
    )
}

fn head_problem(e: &HeadError) -> Problem {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let title = match e.status() {
        405 => "Method not allowed",
        417 => "Expectation failed",
        431 => "Request header fields too large",
        _ => "Bad request",
    };
    Problem::new(status, problem::BAD_REQUEST, title, e.to_string())
}

/// One request and its answer.
async fn exchange<C: Client>(
    proxy: &HttpProxy,
    upstreams: &Upstreams,
    client: &mut C,
    peer: &Peer,
    bufs: &mut Buffers,
    shutdown: &Shutdown,
    timer: Pin<&mut Sleep>,
) -> Next {
    let mut slots = header_slots();
    let Buffers { head, scratch, .. } = bufs;
    let bufs = scratch;
    let head = match parse_request(head, &mut slots) {
        Ok(Some(h)) => h,
        Ok(None) => {
            let p = bad_request("the request head is incomplete");
            answer(client, &mut bufs.out, &p, true, false).await;
            return Next::Close;
        }
        Err(e) => {
            answer(client, &mut bufs.out, &head_problem(&e), true, false).await;
            return Next::Close;
        }
    };
    // A head that came whole in one read was not measured while it was
    // read.
    if head.len > proxy.relay.max_head {
        let p = head_too_large(proxy.relay.max_head);
        answer(client, &mut bufs.out, &p, true, false).await;
        return Next::Close;
    }
    let is_head = head.method == "HEAD";
    // The body as far as it came with the head, checked before anything
    // of it is forwarded.
    let mut body = BodyReader::new(head.framing);
    let first = match body.advance(&head.buf()[head.len..]) {
        Ok(p) => p,
        Err(e) => {
            let p = bad_request(format!(
                "the request body is not valid HTTP/1.1 framing: {e}"
            ));
            answer(client, &mut bufs.out, &p, true, is_head).await;
            return Next::Close;
        }
    };
    // Where the next request starts, once this body has been read.
    let read_through = first
        .done
        .then(|| Leftover::Head(head.len + first.consumed));

    let Ok(permit) = Arc::clone(&proxy.limit).try_acquire_owned() else {
        let p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            problem::OVERLOADED,
            "Too many requests in flight",
            "the proxy is at its max_concurrent_requests bound; retry shortly",
        )
        .retry_after(1);
        return refuse(client, &mut bufs.out, &p, &head, read_through).await;
    };
    let Ok(method) = Method::from_bytes(head.method.as_bytes()) else {
        let p = bad_request("the request method is not a token");
        return refuse(client, &mut bufs.out, &p, &head, None).await;
    };
    // A body on a read would reach the upstream unfenced: a request with
    // a body is fenced whatever its method.
    let has_body = !(first.done && first.consumed == 0);
    let admitted = if !proxy.writes.is_write(&method) && !has_body {
        None
    } else {
        let input = fence_input(head.token(), head.resource(), head.path(), &proxy.routes);
        let detail = || format!("{} {}", head.method, head.path());
        let info = WriteInfo {
            protocol: fencing::Protocol::Http,
            client: peer.addr,
            detail: &detail,
        };
        match proxy
            .fencer
            .decide(&proxy.checker, &proxy.counters, &input, &info)
            .await
        {
            Decision::Admit(admitted) => Some(admitted),
            Decision::Refuse(refusal) => {
                let p = Problem::for_headers(&refusal, &input);
                return refuse(client, &mut bufs.out, &p, &head, read_through).await;
            }
        }
    };

    let call = Call {
        proxy,
        upstreams,
        ip: peer.ip_text(),
        peer: peer.addr,
        timer,
        head: &head,
        first,
        body,
        read_through,
        admitted,
        _permit: permit,
    };
    call.run(client, bufs, shutdown).await
}

/// Answers a request the proxy refuses; the connection stays open only if
/// its body has been read through.
async fn refuse<C: Client>(
    client: &mut C,
    out: &mut Vec<u8>,
    p: &Problem,
    head: &RequestHead<'_, '_>,
    read_through: Option<Leftover>,
) -> Next {
    let keep = read_through.filter(|_| head.keep_alive());
    answer(client, out, p, keep.is_none(), head.method == "HEAD").await;
    keep.map_or(Next::Close, Next::KeepAlive)
}

/// An admitted request on its way: what it holds until the upstream's
/// answer has been read to its end (the guard, the concurrency permit).
struct Call<'p, 'h, 'b, 'r> {
    proxy: &'p HttpProxy,
    /// This worker's upstream connections.
    upstreams: &'p Upstreams,
    /// The client's address, as text.
    ip: &'p [u8],
    /// The client's address, for the audit of a write refused late.
    peer: SocketAddr,
    /// The upstream's timer (see `until`).
    timer: Pin<&'p mut Sleep>,
    head: &'h RequestHead<'b, 'h>,
    first: Progress,
    body: BodyReader,
    read_through: Option<Leftover>,
    /// A write's admission, whose guard is dropped with the call: after
    /// the answer, or on a failure. `None` for a read.
    admitted: Option<Admission<'r>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// How the upstream half of an exchange failed.
enum Failure {
    Unreachable(ConnectError),
    /// Broke the connection or HTTP before a whole answer head.
    Broken(&'static str),
    TimedOut,
    /// The client's body: stalled (408) or invalid (400), or the client
    /// hung up mid-body (no answer possible).
    BodyStalled,
    BodyInvalid(String),
    ClientGone,
    /// Nothing was written: this replica's lease lapsed after the write's
    /// admission (503, audited as `unavailable`).
    Lapsed,
}

impl Call<'_, '_, '_, '_> {
    async fn run<C: Client>(
        mut self,
        client: &mut C,
        bufs: &mut Scratch,
        shutdown: &Shutdown,
    ) -> Next {
        let proxy = self.proxy;
        let head = self.head;
        let expect = head.expect_continue && head.version == Version::Http11;
        write_request_head(proxy, head, self.ip, &mut bufs.out);
        bufs.out
            .extend_from_slice(&head.buf()[head.len..head.len + self.first.consumed]);
        // Empty until the answer's first bytes: the upload may take them
        // in (a TLS upstream that answers early).
        bufs.resp.clear();

        let sent = self.send(&bufs.out).await;
        let (mut up, retry) = match sent {
            Ok(s) => s,
            Err(f) => return self.failed(client, bufs, f).await,
        };
        if expect && !self.first.done && self.first.consumed == 0 {
            let _ = to_client(client, b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let body_sent = match self.upload(client, bufs, &mut up).await {
            Ok(sent) => sent,
            Err(f) => return self.failed(client, bufs, f).await,
        };
        match self
            .first_read(&mut up, &mut bufs.resp, retry, &bufs.out)
            .await
        {
            Ok(Some(fresh)) => up = fresh,
            Ok(None) => {}
            Err(f) => return self.failed(client, bufs, f).await,
        }
        self.respond(client, bufs, up, body_sent, shutdown).await
    }

    /// The last look before a write's first byte goes upstream
    /// ([`Fencer::still_leased`](crate::fencer::Fencer::still_leased)):
    /// called immediately before each write of the request head, with no
    /// await and no system call between it and the write's own (a
    /// `TcpStream`'s first poll writes at once). A lapse is answered 503
    /// and the connection, unused, goes back to the stack.
    fn leased(&self, up: UpConn) -> Result<UpConn, Failure> {
        match &self.admitted {
            Some(a) if !self.proxy.fencer.still_leased(a.leased_at) => {
                self.upstreams.checkin(up);
                Err(Failure::Lapsed)
            }
            _ => Ok(up),
        }
    }

    /// A connection with the request head (and what came of the body)
    /// written; whether it may be retried on a new one if the upstream
    /// turns out to have closed it (pooled, the whole request in hand).
    async fn send(&self, out: &[u8]) -> Result<(UpConn, bool), Failure> {
        let upstreams = self.upstreams;
        let whole = self.first.done;
        if let Some(up) = upstreams.checkout() {
            let mut up = self.leased(up)?;
            if up.send_all(out).await.is_ok() {
                self.sent();
                return Ok((up, whole));
            }
            if !whole {
                return Err(Failure::Broken("the upstream connection failed"));
            }
        }
        // A connect can take long (an upstream slow to accept): the look
        // comes after it.
        let up = upstreams.connect().await.map_err(Failure::Unreachable)?;
        let mut up = self.leased(up)?;
        up.send_all(out)
            .await
            .map_err(|_| Failure::Broken("the upstream connection failed"))?;
        self.sent();
        Ok((up, false))
    }

    /// After the head left: whether the lease lapsed since the admission
    /// all the same ([`Fencer::note_sent`](crate::fencer::Fencer::note_sent)).
    fn sent(&self) {
        if let Some(a) = &self.admitted {
            let fencer = &self.proxy.fencer;
            fencer.note_sent(
                a.leased_at,
                "http",
                Some(a.resource.as_str()),
                Some(a.token),
            );
        }
    }

    /// Relays the rest of the client's body. `Ok(false)`: the upstream
    /// answered before it was all sent (the answer is relayed, the
    /// upstream connection then closed, never pooled).
    async fn upload<C: Client>(
        &mut self,
        client: &mut C,
        bufs: &mut Scratch,
        up: &mut UpConn,
    ) -> Result<bool, Failure> {
        if self.first.done {
            return Ok(true);
        }
        let stall = self.proxy.relay.body_stall;
        let within = self.proxy.upstream_timeout;
        let (mut up_read, mut up_write) = up.halves();
        loop {
            bufs.body.clear();
            bufs.body.reserve(CHUNK);
            let read = tokio::select! {
                biased;
                () = up_read.answered(&mut bufs.resp) => return Ok(false),
                r = tokio::time::timeout(stall, client.read_buf(&mut bufs.body)) => r,
            };
            let n = match read {
                Err(_) => return Err(Failure::BodyStalled),
                Ok(Ok(0) | Err(_)) => return Err(Failure::ClientGone),
                Ok(Ok(n)) => n,
            };
            let p = self
                .body
                .advance(&bufs.body[..n])
                .map_err(|e| Failure::BodyInvalid(e.to_string()))?;
            let wrote = tokio::select! {
                biased;
                () = up_read.answered(&mut bufs.resp) => return Ok(false),
                r = tokio::time::timeout(within, up_write.send_all(&bufs.body[..p.consumed])) => r,
            };
            match wrote {
                Err(_) => return Err(Failure::TimedOut),
                Ok(Err(_)) => return Err(Failure::Broken("the upstream connection failed")),
                Ok(Ok(())) => {}
            }
            if p.done {
                self.read_through = Some(Leftover::Body(p.consumed..n));
                return Ok(true);
            }
        }
    }

    /// The first read of the answer, within `upstream_timeout` (done
    /// already when the upload took the answer's first bytes in). A pooled
    /// connection the upstream had closed (nothing comes back, the whole
    /// request still in `out`) is replaced by a new one, once: the new
    /// one is returned.
    async fn first_read(
        &mut self,
        up: &mut UpConn,
        resp: &mut Vec<u8>,
        retry: bool,
        out: &[u8],
    ) -> Result<Option<UpConn>, Failure> {
        if !resp.is_empty() {
            return Ok(None);
        }
        let within = self.proxy.upstream_timeout;
        match bounded(self.timer.as_mut(), within, up.read_buf(resp)).await {
            Err(_) => Err(Failure::TimedOut),
            Ok(Ok(n)) if n > 0 => Ok(None),
            Ok(_) if retry => {
                let upstreams = self.upstreams;
                let fresh = upstreams.connect().await.map_err(Failure::Unreachable)?;
                let mut fresh = self.leased(fresh)?;
                fresh
                    .send_all(out)
                    .await
                    .map_err(|_| Failure::Broken("the upstream connection failed"))?;
                self.sent();
                match bounded(self.timer.as_mut(), within, fresh.read_buf(resp)).await {
                    Err(_) => Err(Failure::TimedOut),
                    Ok(Ok(n)) if n > 0 => Ok(Some(fresh)),
                    Ok(_) => Err(Failure::Broken(
                        "the upstream closed the connection before answering",
                    )),
                }
            }
            Ok(_) => Err(Failure::Broken(
                "the upstream closed the connection before answering",
            )),
        }
    }

    /// Reads the answer's head (relaying 1xx), then relays the answer.
    async fn respond<C: Client>(
        mut self,
        client: &mut C,
        bufs: &mut Scratch,
        mut up: UpConn,
        body_sent: bool,
        shutdown: &Shutdown,
    ) -> Next {
        let within = self.proxy.upstream_timeout;
        let mut scanned = 0;
        loop {
            while !head_end(&bufs.resp, &mut scanned) {
                if bufs.resp.len() > MAX_RESPONSE_HEAD {
                    return self
                        .failed(
                            client,
                            bufs,
                            Failure::Broken("the upstream's answer head is too large"),
                        )
                        .await;
                }
                bufs.resp.reserve(4096);
                match bounded(self.timer.as_mut(), within, up.read_buf(&mut bufs.resp)).await {
                    Err(_) => return self.failed(client, bufs, Failure::TimedOut).await,
                    Ok(Ok(0) | Err(_)) => {
                        return self
                            .failed(
                                client,
                                bufs,
                                Failure::Broken("the upstream closed the connection mid-head"),
                            )
                            .await
                    }
                    Ok(Ok(_)) => {}
                }
            }
            let mut slots = header_slots();
            let resp =
                match parse_response(&bufs.resp, &mut slots, self.head.method) {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return self
                            .failed(
                                client,
                                bufs,
                                Failure::Broken("the upstream's answer head is incomplete"),
                            )
                            .await
                    }
                    Err(HeadError::UnexpectedUpgrade) => return self
                        .failed(
                            client,
                            bufs,
                            Failure::Broken(
                                "the upstream switched protocols, which the proxy never asks for",
                            ),
                        )
                        .await,
                    Err(_) => {
                        return self
                            .failed(
                                client,
                                bufs,
                                Failure::Broken("the upstream's answer is not valid HTTP/1.1"),
                            )
                            .await
                    }
                };
            if resp.kind == ResponseKind::Interim {
                let len = resp.len;
                // `100 Continue` was the proxy's to send; a 1.0 client
                // knows no interim answers.
                if resp.status != 100 && self.head.version == Version::Http11 {
                    let _ = to_client(client, &bufs.resp[..len]).await;
                }
                bufs.resp.drain(..len);
                scanned = 0;
                continue;
            }

            // The answer's head, as the upstream wrote it, minus its
            // hop-by-hop lines, with this connection's own.
            let keep = self.read_through.is_some()
                && body_sent
                && self.head.keep_alive()
                && resp.framing != Framing::UntilClose
                && !shutdown.is_fired();
            let out = &mut bufs.out;
            out.clear();
            out.extend_from_slice(b"HTTP/1.1");
            // The head is CRLF only (checked by the parse): the status
            // line ends just before the first LF.
            let status_end = memchr::memchr(b'\n', &bufs.resp).map_or(8, |lf| lf.saturating_sub(1));
            out.extend_from_slice(&bufs.resp[8..status_end + 2]);
            for span in resp.forwarded_lines() {
                out.extend_from_slice(&bufs.resp[span]);
            }
            if !keep {
                out.extend_from_slice(b"connection: close\r\n");
            } else if self.head.version == Version::Http10 {
                out.extend_from_slice(b"connection: keep-alive\r\n");
            }
            out.extend_from_slice(b"\r\n");
            let mut body = BodyReader::new(resp.framing);
            let rest = &bufs.resp[resp.len..];
            let Ok(first) = body.advance(rest) else {
                return self
                    .failed(
                        client,
                        bufs,
                        Failure::Broken("the upstream's answer body is not valid HTTP/1.1 framing"),
                    )
                    .await;
            };
            out.extend_from_slice(&rest[..first.consumed]);
            let mut clean = !first.done || first.consumed == rest.len();
            let reusable = resp.reusable() && body_sent;
            let mut client_ok = to_client(client, out).await.is_ok();
            let mut complete = first.done;
            while !complete {
                bufs.down.clear();
                bufs.down.reserve(CHUNK);
                let n =
                    match bounded(self.timer.as_mut(), within, up.read_buf(&mut bufs.down)).await {
                        Ok(Ok(0)) => {
                            // Close-delimited: the end; else truncated.
                            complete = body.eof().is_ok();
                            clean = false;
                            break;
                        }
                        Ok(Ok(n)) => n,
                        Ok(Err(_)) | Err(_) => break,
                    };
                let Ok(p) = body.advance(&bufs.down[..n]) else {
                    break;
                };
                if client_ok {
                    client_ok = to_client(client, &bufs.down[..p.consumed]).await.is_ok();
                }
                complete = p.done;
                clean &= !p.done || p.consumed == n;
            }
            if !complete {
                // The answer broke off: the client cannot be told but by
                // the close.
                self.proxy.counters.upstream_errors.increment(1);
                tracing::warn!(upstream = %self.proxy.upstream.authority(), "upstream answer broke off mid-body");
                return Next::Close;
            }
            if reusable && clean {
                self.upstreams.checkin(up);
            }
            return match self.read_through {
                Some(rest) if keep && client_ok => Next::KeepAlive(rest),
                _ => Next::Close,
            };
        }
    }

    /// The answer to a failed call; the guard and permit go with `self`.
    async fn failed<C: Client>(mut self, client: &mut C, bufs: &mut Scratch, f: Failure) -> Next {
        let proxy = self.proxy;
        let upstream = proxy.upstream.authority();
        let p = match f {
            Failure::Unreachable(e) => {
                proxy.counters.upstream_errors.increment(1);
                tracing::warn!(error = %e, "upstream unreachable");
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    problem::UPSTREAM_UNREACHABLE,
                    "Upstream unreachable",
                    e.detail(upstream),
                )
            }
            Failure::Broken(why) => {
                proxy.counters.upstream_errors.increment(1);
                tracing::warn!(%upstream, why, "upstream request failed");
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    problem::UPSTREAM_ERROR,
                    "Upstream failed",
                    why,
                )
            }
            Failure::TimedOut => {
                proxy.counters.upstream_errors.increment(1);
                let timeout = proxy.upstream_timeout;
                tracing::warn!(%upstream, ?timeout, "upstream timed out");
                // Documented: a 504 lets go of the guard (see the README).
                Problem::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    problem::UPSTREAM_TIMEOUT,
                    "Upstream timed out",
                    format!("the upstream sent no response headers within {timeout:?}"),
                )
            }
            Failure::BodyStalled => {
                tracing::info!("client stalled mid-upload; request abandoned");
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    problem::BAD_REQUEST,
                    "Request body timed out",
                    format!(
                        "no request body data arrived for {:?}",
                        proxy.relay.body_stall
                    ),
                )
            }
            Failure::BodyInvalid(why) => {
                tracing::info!(error = %why, "client's request body failed; request abandoned");
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    problem::BAD_REQUEST,
                    "Bad request body",
                    format!("the request body is not valid HTTP/1.1 framing: {why}"),
                )
            }
            Failure::ClientGone => return Next::Close,
            Failure::Lapsed => {
                let head = self.head;
                let detail = || format!("{} {}", head.method, head.path());
                let info = WriteInfo {
                    protocol: fencing::Protocol::Http,
                    client: self.peer,
                    detail: &detail,
                };
                let (guard, resource, token) = match self.admitted.take() {
                    Some(a) => (Some(a.guard), Some(a.resource.to_name()), Some(a.token)),
                    None => (None, None, None),
                };
                let refusal = proxy
                    .fencer
                    .lapsed(&proxy.counters, guard, resource, token, &info)
                    .await;
                Problem::from_refusal(&refusal)
            }
        };
        let is_head = self.head.method == "HEAD";
        let keep = self.read_through.filter(|_| self.head.keep_alive());
        drop(self.admitted);
        answer(client, &mut bufs.out, &p, keep.is_none(), is_head).await;
        keep.map_or(Next::Close, Next::KeepAlive)
    }
}

/// The request head as the upstream gets it: the request line in origin
/// form under the upstream's base path, the upstream's `Host`, the
/// client's own lines minus the hop-by-hop ones, and `X-Forwarded-For`
/// with the client's address appended to what it already said.
fn write_request_head(proxy: &HttpProxy, head: &RequestHead<'_, '_>, ip: &[u8], out: &mut Vec<u8>) {
    const XFF: &[u8] = b"x-forwarded-for:";
    out.clear();
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(proxy.upstream.base().as_bytes());
    out.extend_from_slice(head.path_and_query().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(proxy.upstream.host().as_bytes());
    out.extend_from_slice(b"\r\n");
    let buf = head.buf();
    let mut prior = false;
    for span in head.forwarded_lines() {
        let line = &buf[span];
        if line.len() >= XFF.len() && line[..XFF.len()].eq_ignore_ascii_case(XFF) {
            prior = true;
        } else {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if prior {
        for (h, _) in head.headers() {
            if h.name.eq_ignore_ascii_case("x-forwarded-for") {
                out.extend_from_slice(h.value.trim_ascii());
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\n\r\n");
}
