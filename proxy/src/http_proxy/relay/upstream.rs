//! Keep-alive connections to the upstream, as plain sockets (or TLS
//! sessions for an `https://` upstream): the byte relay speaks HTTP/1.1
//! on them itself, inside the client's task, so a connection is just a
//! stream with no task, channel or hyper state of its own.
//!
//! A connection is taken off the stack for one exchange and put back only
//! when that exchange is over on the wire in both directions: the whole
//! request body sent and the whole answer read. A connection whose
//! client was still uploading when the upstream answered is closed, never
//! pooled, so no other request waits behind that upload.
//!
//! The lock is a plain mutex around a `Vec` push or pop, never held across
//! an await.
//!
//! [`UpConn`] is an enum, not a boxed trait object: a plain connection
//! costs one inlined match per read or write, no allocation and no
//! dynamic dispatch; the TLS session, large, is boxed so the enum stays
//! the size of a socket.

use std::io::{self, ErrorKind, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{tcp, TcpStream};
use tokio_rustls::client::TlsStream;

pub use crate::http_proxy::pool::ConnectError;
use crate::http_proxy::pool::{connect_tcp, connect_tls};
use crate::upstream_tls::UpstreamTls;

type Tls = TlsStream<TcpStream>;

/// One connection to the upstream.
pub enum UpConn {
    Plain(TcpStream),
    Tls(Box<Tls>),
}

impl UpConn {
    /// Writes all of `buf`; a TLS session's records are flushed to the
    /// socket too, so the upstream has them before the answer is awaited.
    #[inline]
    pub async fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            UpConn::Plain(s) => s.write_all(buf).await,
            UpConn::Tls(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
        }
    }

    /// The halves an upload needs at once: one to notice an early answer,
    /// one to write the body.
    pub fn halves(&mut self) -> (Early<'_>, Sink<'_>) {
        match self {
            UpConn::Plain(s) => {
                let (r, w) = s.split();
                (Early::Plain(r), Sink::Plain(w))
            }
            UpConn::Tls(s) => {
                // A lock between the halves, for TLS only (one session
                // state both directions go through).
                let (r, w) = tokio::io::split(&mut **s);
                (Early::Tls(r), Sink::Tls(w))
            }
        }
    }
}

/// The read side during an upload.
pub enum Early<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut Tls>),
}

impl Early<'_> {
    /// Resolves once the upstream has sent something (or closed): a plain
    /// socket is peeked, the bytes left where they are; a TLS session's
    /// bytes cannot be peeked at through the records, so they are read
    /// into `resp`, where the answer's first read would have put them.
    /// Cancel-safe, as both reads are.
    pub async fn answered(&mut self, resp: &mut Vec<u8>) {
        match self {
            Early::Plain(r) => {
                let mut probe = [0u8; 1];
                let _ = r.peek(&mut probe).await;
            }
            Early::Tls(r) => {
                resp.reserve(4096);
                let _ = r.read_buf(resp).await;
            }
        }
    }
}

/// The write side during an upload.
pub enum Sink<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut Tls>),
}

impl Sink<'_> {
    /// As [`UpConn::send_all`].
    pub async fn send_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(buf).await,
            Sink::Tls(w) => {
                w.write_all(buf).await?;
                w.flush().await
            }
        }
    }
}

impl AsyncRead for UpConn {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpConn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpConn {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpConn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpConn::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            UpConn::Plain(s) => s.is_write_vectored(),
            UpConn::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_flush(cx),
            UpConn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpConn::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

pub struct Upstreams {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    /// Set for an `https://` upstream.
    tls: Option<Arc<UpstreamTls>>,
    idle: Mutex<Vec<(UpConn, Instant)>>,
}

impl Upstreams {
    pub fn new(
        addr: String,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
        tls: Option<Arc<UpstreamTls>>,
    ) -> Self {
        Upstreams {
            addr,
            connect_timeout,
            max_idle,
            idle_timeout,
            tls,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(UpConn, Instant)>> {
        // A panic while holding this lock leaves only a Vec of sockets.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection the upstream has not closed, if there is one.
    pub fn checkout(&self) -> Option<UpConn> {
        loop {
            let (mut conn, since) = self.lock().pop()?;
            if since.elapsed() <= self.idle_timeout && quiet(&mut conn) {
                return Some(conn);
            }
        }
    }

    /// Back on the stack, once its exchange is over in both directions.
    pub fn checkin(&self, conn: UpConn) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    /// A new connection (TLS handshake included for `https://`).
    pub async fn connect(&self) -> Result<UpConn, ConnectError> {
        match &self.tls {
            None => Ok(UpConn::Plain(
                connect_tcp(&self.addr, self.connect_timeout).await?,
            )),
            Some(tls) => Ok(UpConn::Tls(Box::new(
                connect_tls(&self.addr, self.connect_timeout, tls).await?,
            ))),
        }
    }
}

/// An idle connection has nothing to read: an end of stream means the
/// upstream closed it, and bytes nobody asked for mean it cannot be
/// trusted with the next answer. A TLS session is read once without
/// waiting (what is pending is Pending): the socket's bytes may be
/// records that carry nothing (session tickets, which the read takes in),
/// so only what comes out of the session counts.
fn quiet(conn: &mut UpConn) -> bool {
    let mut probe = [0u8; 1];
    match conn {
        UpConn::Plain(s) => {
            matches!(s.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
        }
        UpConn::Tls(s) => s.read(&mut probe).now_or_never().is_none(),
    }
}
