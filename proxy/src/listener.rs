//! Accepting connections, shared by every listener (HTTP and Postgres
//! proxies, the APIs): the accept loop, the per-listener connection limit,
//! and the set of open connections that shutdown drains.
//!
//! Protocol-agnostic: what a refused client is told, and how a connection
//! is served, come from the caller (`edge::http1` for HTTP, `pg_proxy` for
//! Postgres).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use metrics::{Counter, Gauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::{CONNECTIONS_OPEN, CONNECTIONS_REJECTED};
use crate::shutdown::Shutdown;

/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// After telling a refused client why, how long its connection may linger
/// while the proxy reads (and discards) what the client already sent.
/// Closing a socket with unread input makes the kernel answer with a
/// reset, which can destroy the refusal before the client has read it.
const LINGER: Duration = Duration::from_secs(1);
/// Bytes of a refused client's input read before giving up on it.
const LINGER_BYTES: usize = 64 * 1024;
/// Refused connections lingering at once; past this a refusal is written
/// and the socket closed at once, so a flood cannot pin file descriptors
/// through the refusals themselves.
const MAX_LINGERING: usize = 256;

/// The connection bound of one listener: a permit per open connection,
/// held for the connection's whole life. A client over the bound gets
/// the protocol's own "too many connections" answer and is closed, so it
/// learns why and when to retry instead of hanging in the backlog.
pub struct ConnLimit {
    permits: Arc<Semaphore>,
    lingering: Arc<Semaphore>,
    /// Written to a refused client: a Postgres ErrorResponse or an HTTP
    /// 503, whole.
    refusal: Bytes,
    /// Read the client's input up to this mark before answering (the end
    /// of an HTTP request head): HTTP clients take a response that
    /// arrives before their request was sent for a protocol error.
    answer_after: Option<&'static [u8]>,
    rejected: Counter,
    open: Gauge,
}

/// One admitted connection's share of the bound; released on drop.
pub struct ConnPermit {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl ConnLimit {
    /// `protocol` and `listen` label the metrics; `max` is clamped to what
    /// a semaphore can count (at least 1, validated by the config).
    /// `refusal` is what a client over `max` is told, after its input up
    /// to `answer_after` (if given) has been read.
    pub fn new(
        protocol: &'static str,
        listen: SocketAddr,
        max: usize,
        refusal: Bytes,
        answer_after: Option<&'static [u8]>,
    ) -> Self {
        let listener = listen.to_string();
        ConnLimit {
            permits: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            refusal,
            answer_after,
            rejected: metrics::counter!(
                CONNECTIONS_REJECTED,
                "protocol" => protocol,
                "listener" => listener.clone()
            ),
            open: metrics::gauge!(CONNECTIONS_OPEN, "protocol" => protocol, "listener" => listener),
        }
    }

    /// A permit for `stream`, or `None` when the listener is full: the
    /// client is then told so and closed in the background.
    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, ConnPermit)> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                self.open.increment(1.0);
                Some((
                    stream,
                    ConnPermit {
                        _permit: permit,
                        open: self.open.clone(),
                    },
                ))
            }
            Err(_) => {
                self.rejected.increment(1);
                tracing::debug!(%peer, "connection refused: listener at max_connections");
                let refusal = self.refusal.clone();
                let linger = Arc::clone(&self.lingering).try_acquire_owned().ok();
                tokio::spawn(refuse(stream, refusal, self.answer_after, linger));
                None
            }
        }
    }
}

/// Writes the refusal, then closes gracefully: our FIN first, then the
/// client's pending input is read and dropped (bounded in time and size)
/// so the close does not turn into a reset that eats the refusal. Without
/// a lingering slot (a flood beyond [`MAX_LINGERING`]) the refusal is
/// written at once and the socket closed.
async fn refuse(
    mut stream: TcpStream,
    refusal: Bytes,
    answer_after: Option<&'static [u8]>,
    linger: Option<OwnedSemaphorePermit>,
) {
    if let (Some(mark), Some(_)) = (answer_after, &linger) {
        // Until the mark, EOF, the time bound or the size bound, whichever
        // comes first; then answer anyway.
        let _ = tokio::time::timeout(LINGER, async {
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            while seen.len() < LINGER_BYTES {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
                if seen.windows(mark.len()).any(|w| w == mark) {
                    return;
                }
            }
        })
        .await;
    }
    let written = tokio::time::timeout(LINGER, stream.write_all(&refusal)).await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = stream.shutdown().await;
    if linger.is_none() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut seen = 0;
        while seen < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}

/// The next admitted client connection, or `None` once shutdown has begun.
/// Connections over `limit` are answered with its refusal and never
/// returned.
///
/// Accept errors (out of file descriptors, a handshake aborted by the
/// peer) are transient: backing off briefly beats spinning on them, and
/// one bad connection must never stop the listener. Cancel-safe, so a
/// caller may race it against other work in `select!`.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &Shutdown,
    limit: &ConnLimit,
) -> Option<(TcpStream, SocketAddr, ConnPermit)> {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.wait() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Fencing round trips are small messages: no Nagle delay.
                let _ = stream.set_nodelay(true);
                if let Some((stream, permit)) = limit.admit(stream, peer) {
                    return Some((stream, peer, permit));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = shutdown.wait() => return None,
                }
            }
        }
    }
}

/// Accepts on `listener` until `shutdown`, running `serve(stream, peer)`
/// as a task per admitted connection (holding the connection's permit
/// until it ends), and returns the connections still open for the caller
/// to [`Connections::drain`]. The listener is closed on return, so new
/// clients are refused by the kernel from then on. `name` says which
/// listener it is in logs.
pub async fn serve<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    shutdown: &Shutdown,
    limit: &ConnLimit,
    mut serve: F,
) -> Connections
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut open = JoinSet::new();
    loop {
        let next = tokio::select! {
            c = next_connection(&listener, shutdown, limit) => c,
            // Reap finished connections so the set does not grow.
            Some(_) = open.join_next(), if !open.is_empty() => continue,
        };
        let Some((stream, peer, permit)) = next else {
            break;
        };
        // The connection's share of max_connections is released when its
        // future ends. `map`, not `async move { conn.await; .. }`: an async
        // block stores the future it captured and the future it awaits
        // apart, so each connection's task would hold its future twice, for
        // its whole life (most of an idle Postgres session's memory).
        open.spawn(serve(stream, peer).map(move |()| drop(permit)));
    }
    drop(listener);
    Connections { name, open }
}

/// The connections of a listener that has stopped accepting.
pub struct Connections {
    name: &'static str,
    open: JoinSet<()>,
}

impl Connections {
    /// Connections a caller spawned itself (a listener's worker thread,
    /// which runs the connections another task accepted), to drain as
    /// [`serve`]'s are.
    pub fn new(name: &'static str, open: JoinSet<()>) -> Self {
        Connections { name, open }
    }

    /// Waits for every connection to end, for at most `within` (`None`:
    /// as long as they take); returns whether all did. Connections still
    /// open past `within` are aborted.
    pub async fn drain(mut self, within: Option<Duration>) -> bool {
        let all = async { while self.open.join_next().await.is_some() {} };
        let drained = match within {
            Some(d) => tokio::time::timeout(d, all).await.is_ok(),
            None => {
                all.await;
                true
            }
        };
        if !drained {
            tracing::warn!(
                listener = self.name,
                open = self.open.len(),
                ?within,
                "connections still busy after the shutdown timeout; closing them"
            );
            self.open.shutdown().await;
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::shutdown;

    fn limit(addr: SocketAddr, max: usize) -> ConnLimit {
        ConnLimit::new("test", addr, max, Bytes::from_static(b"full\n"), None)
    }

    /// Connections are served until shutdown, then drained: a connection
    /// that finishes within the bound counts as drained, one that does
    /// not is closed when the bound passes.
    #[tokio::test]
    async fn serves_until_shutdown_then_drains_within_the_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, sd) = shutdown::channel();
        let served = Arc::new(AtomicUsize::new(0));
        let limit = limit(addr, 8);
        let count = Arc::clone(&served);
        let accept = tokio::spawn(async move {
            serve("test", listener, &sd, &limit, move |mut stream, _| {
                count.fetch_add(1, Ordering::SeqCst);
                async move {
                    // Echo one line, then hold the connection until the
                    // client closes it.
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            })
            .await
        });
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 2];
        for s in [&mut a, &mut b] {
            s.write_all(b"hi").await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hi");
        }
        trigger.fire();
        let open = accept.await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 2);
        // The listener is closed: no new client gets in.
        assert!(TcpStream::connect(addr).await.is_err());
        drop(a);
        // `b` stays open past the bound: it is closed, not waited for.
        let t = tokio::time::Instant::now();
        assert!(!open.drain(Some(Duration::from_millis(200))).await);
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(matches!(b.read(&mut buf).await, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn a_connection_over_the_bound_is_told_and_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, sd) = shutdown::channel();
        let limit = limit(addr, 1);
        let accept = tokio::spawn(async move {
            serve("test", listener, &sd, &limit, |stream, _| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(stream);
            })
            .await
        });
        let _held = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        over.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"full\n");
        trigger.fire();
        let open = accept.await.unwrap();
        assert!(!open.drain(Some(Duration::from_millis(50))).await);
    }
}
