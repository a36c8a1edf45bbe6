//! The start of a session: TLS (SSLRequest answered `S` when a
//! certificate is configured, and then required), the startup packet, and
//! CancelRequest, which goes to the server on a connection of its own.
//!
//! Towards the server, with `upstream_sslmode` set, every connection
//! (a cancel request's too, as libpq 17 sends it) begins as libpq's does:
//! SSLRequest, then on `S` the TLS handshake and everything else inside
//! it; on `N` the client is told, as libpq would tell it, and nothing is
//! sent in plain text.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use wire::pg::frame::{self, split_startup};
use wire::pg::{FrameError, StartupKind, StartupPacket};

use super::readbuf::ReadBuf;
use super::refusal::fatal;
use super::{PgProxy, CONNECT_TIMEOUT};
use crate::config::SslMode;

/// The client's half of the session: plain TCP, or TLS after an
/// SSLRequest was answered `S`. The TLS session is split with a lock
/// (`tokio::io::split`); plain TCP keeps its lock-free halves.
pub(super) enum ClientConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

type TlsConn = tokio_rustls::server::TlsStream<TcpStream>;

/// The client's read half. Plain TCP is read when the socket is readable,
/// so an idle session holds no read buffer (see `readbuf.rs`).
pub(super) enum ClientRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsConn>),
}

/// The client's write half.
pub(super) enum ClientWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsConn>),
}

impl ClientRead {
    /// Reads what the client has into `rb`; `Ok(0)` is the end of the
    /// stream. Cancel-safe: dropped while waiting, nothing was read.
    pub(super) async fn read(&mut self, rb: &mut ReadBuf) -> std::io::Result<usize> {
        match self {
            ClientRead::Plain(s) => rb.fill_from(s).await,
            ClientRead::Tls(s) => rb.read_from(s).await,
        }
    }
}

impl AsyncWrite for ClientWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientWrite::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientWrite::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientWrite::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientWrite::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientWrite::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientWrite::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl ClientConn {
    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ClientConn::Plain(s) => s.write_all(bytes).await,
            ClientConn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    pub(super) fn into_halves(self) -> (ClientRead, ClientWrite) {
        match self {
            ClientConn::Plain(s) => {
                let (r, w) = s.into_split();
                (ClientRead::Plain(r), ClientWrite::Plain(w))
            }
            ClientConn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ClientRead::Tls(r), ClientWrite::Tls(w))
            }
        }
    }
}

type ServerTls = tokio_rustls::client::TlsStream<TcpStream>;

/// The connection to the server: plain TCP, or TLS for
/// `upstream_sslmode` other than `disable`.
pub(super) enum ServerConn {
    Plain(TcpStream),
    Tls(Box<ServerTls>),
}

/// The server's read half (the server loop's). Plain TCP is read when the
/// socket is readable, holding no buffer while idle; TLS as the client's.
pub(super) enum ServerRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<ServerTls>),
}

/// The server's write half (the client loop's).
pub(super) enum ServerWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<ServerTls>),
}

impl ServerConn {
    pub(super) fn into_halves(self) -> (ServerRead, ServerWrite) {
        match self {
            ServerConn::Plain(s) => {
                let (r, w) = s.into_split();
                (ServerRead::Plain(r), ServerWrite::Plain(w))
            }
            ServerConn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ServerRead::Tls(r), ServerWrite::Tls(w))
            }
        }
    }
}

impl ServerRead {
    /// As [`ClientRead::read`].
    pub(super) async fn read(&mut self, rb: &mut ReadBuf) -> std::io::Result<usize> {
        match self {
            ServerRead::Plain(s) => rb.fill_from(s).await,
            ServerRead::Tls(s) => rb.read_from(s).await,
        }
    }
}

impl ServerWrite {
    /// Writes all of `bytes`; TLS records are flushed, so the server has
    /// the batch now.
    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ServerWrite::Plain(s) => s.write_all(bytes).await,
            ServerWrite::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// The end of the client's side: a TCP half-close, or TLS
    /// close_notify and then the half-close. Either way the server reads
    /// the end of its input once it has answered what came before.
    pub(super) async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            ServerWrite::Plain(s) => s.shutdown().await,
            ServerWrite::Tls(s) => s.shutdown().await,
        }
    }
}

/// Why no connection to the server could be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum DialError {
    #[error("cannot reach the upstream server: {0}")]
    Connect(std::io::Error),
    #[error("the upstream server did not accept the connection in time")]
    Timeout,
    /// SSLRequest answered `N`.
    #[error(
        "the upstream server does not support SSL, but upstream_sslmode = \"{0}\" requires it"
    )]
    NoSsl(SslMode),
    /// SSLRequest answered with neither `S` nor `N` (an old server's
    /// ErrorResponse, or no Postgres at all).
    #[error("the upstream server answered SSLRequest with {0:?}, not S or N")]
    BadAnswer(char),
    #[error("SSL handshake with the upstream server failed: {0}")]
    Handshake(std::io::Error),
}

impl DialError {
    /// The FATAL error the client is told, with the SQLSTATE drivers use
    /// for these: a server that refuses SSL rejected the connection
    /// (`08004`, sqlserver_rejected_establishment_of_sqlconnection); one
    /// that cannot be reached, or whose certificate fails, failed it
    /// (`08006`, connection_failure).
    fn answer(&self) -> Bytes {
        let message = format!("fencepost: {self}");
        match self {
            DialError::NoSsl(_) | DialError::BadAnswer(_) => fatal("08004", &message),
            DialError::Connect(_) | DialError::Timeout | DialError::Handshake(_) => {
                fatal("08006", &message)
            }
        }
    }
}

/// A connection to the server, nodelay set, in TLS when configured:
/// SSLRequest first, the handshake on `S`. Bounded as a whole by
/// `CONNECT_TIMEOUT`.
pub(super) async fn dial(proxy: &PgProxy) -> Result<ServerConn, DialError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, dial_within(proxy)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout),
    }
}

async fn dial_within(proxy: &PgProxy) -> Result<ServerConn, DialError> {
    let mut tcp = TcpStream::connect(&proxy.upstream)
        .await
        .map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &proxy.upstream_tls else {
        return Ok(ServerConn::Plain(tcp));
    };
    tcp.write_all(&frame::SSL_REQUEST_PACKET)
        .await
        .map_err(DialError::Connect)?;
    // One byte, no more: whatever a server sent after its `S` would be
    // taken for part of the handshake (CVE-2021-23222), so none is read
    // here; rustls reads the rest and fails on it.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(DialError::Connect)?;
    match answer[0] {
        b'S' => {}
        b'N' => return Err(DialError::NoSsl(proxy.upstream_sslmode)),
        other => return Err(DialError::BadAnswer(char::from(other))),
    }
    // The caller's bound covers the handshake too.
    let tls = tls
        .handshake(tcp, CONNECT_TIMEOUT)
        .await
        .map_err(DialError::Handshake)?;
    Ok(ServerConn::Tls(Box::new(tls)))
}

/// The startup exchange up to the StartupMessage or CancelRequest,
/// upgrading to TLS on the way when the client asks and a certificate is
/// configured. `None`: the client left or was told why not.
pub(super) async fn accept(
    proxy: &PgProxy,
    client: TcpStream,
    buf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<(ClientConn, StartupPacket)> {
    let mut conn = ClientConn::Plain(client);
    loop {
        let got = match &mut conn {
            ClientConn::Plain(s) => startup(s, buf, proxy.tls.is_some()).await,
            // Once encrypted, a second SSLRequest gets "no".
            ClientConn::Tls(s) => startup(&mut **s, buf, false).await,
        };
        match got {
            // A listener with a certificate serves TLS sessions only, as a
            // Postgres whose pg_hba.conf has only `hostssl` lines: the
            // client is told so (28000, as Postgres says it). A
            // CancelRequest carries no data and libpq before 17 sends it
            // in plaintext whatever the session used: it goes through.
            Ok(Some(Got::Packet(p)))
                if matches!(conn, ClientConn::Plain(_))
                    && p.kind != StartupKind::Cancel
                    && proxy.tls.is_some() =>
            {
                if let Some(tls) = &proxy.tls {
                    tls.count_plaintext();
                }
                tracing::debug!(%peer, "plaintext startup on a TLS listener refused");
                let _ = conn
                    .write_all(&fatal(
                        "28000",
                        "fencepost: this server accepts TLS connections only (use sslmode=require or stronger)",
                    ))
                    .await;
                return None;
            }
            Ok(Some(Got::Packet(p))) => return Some((conn, p)),
            Ok(Some(Got::Tls)) => {
                let (ClientConn::Plain(mut tcp), Some(tls)) = (conn, proxy.tls.as_ref()) else {
                    return None;
                };
                // Bytes sent after the SSLRequest but before the handshake
                // would be taken as if they came encrypted (CVE-2021-23214):
                // refuse, as Postgres does.
                if !buf.is_empty() {
                    let _ = tcp
                        .write_all(&fatal(
                            "08P01",
                            "received unencrypted data after SSL request",
                        ))
                        .await;
                    return None;
                }
                tcp.write_all(frame::ACCEPT_ENCRYPTION).await.ok()?;
                // Failures are logged and counted there. The client
                // certificate's names have no use here yet: a session is
                // authorized by Postgres itself.
                let (stream, _) = tls.handshake(tcp, peer).await?;
                conn = ClientConn::Tls(Box::new(stream));
            }
            Ok(None) => return None,
            Err(StartupError::Frame(e)) => {
                tracing::debug!(%peer, error = %e, "bad startup packet");
                let _ = conn
                    .write_all(&fatal("08P01", &format!("invalid startup packet: {e}")))
                    .await;
                return None;
            }
            Err(StartupError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "client left during startup");
                return None;
            }
        }
    }
}

enum StartupError {
    Frame(FrameError),
    Io(std::io::Error),
}

/// What [`startup`] read.
enum Got {
    Packet(StartupPacket),
    /// An SSLRequest, to be answered `S` and upgraded by the caller.
    Tls,
}

/// Reads startup packets, answering GSS encryption requests (and SSL
/// ones unless `offer_tls`) with "no", until a StartupMessage or
/// CancelRequest arrives. `None`: the client left.
async fn startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    offer_tls: bool,
) -> Result<Option<Got>, StartupError> {
    loop {
        if let Some(p) = split_startup(buf).map_err(StartupError::Frame)? {
            match p.kind {
                StartupKind::Ssl if offer_tls => return Ok(Some(Got::Tls)),
                StartupKind::Ssl | StartupKind::GssEnc => {
                    client
                        .write_all(frame::REFUSE_ENCRYPTION)
                        .await
                        .map_err(StartupError::Io)?;
                    continue;
                }
                _ => return Ok(Some(Got::Packet(p))),
            }
        }
        if client.read_buf(buf).await.map_err(StartupError::Io)? == 0 {
            return Ok(None);
        }
    }
}

/// A CancelRequest goes to the server on a connection of its own, as
/// Postgres expects (in TLS when the sessions are); with one upstream,
/// the backend it names is there. The client learns nothing either way,
/// as from Postgres; a failure is logged and counted.
pub(super) async fn forward_cancel(proxy: &PgProxy, raw: Bytes) {
    let (mut r, mut w) = match dial(proxy).await {
        Ok(s) => s.into_halves(),
        Err(e) => {
            proxy.counters.upstream_errors.increment(1);
            tracing::warn!(upstream = %proxy.upstream, error = %e, "cannot forward a cancel request to the upstream Postgres server");
            return;
        }
    };
    if w.write_all(&raw).await.is_ok() {
        // The server closes the connection when it has read the request.
        let mut rb = ReadBuf::new();
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, r.read(&mut rb)).await;
    }
}

/// The connection to the upstream server (see [`dial`]); on failure the
/// client is told why (`08006`, or `08004` for a server that refuses
/// SSL), the reason is logged, and `None` comes back.
pub(super) async fn connect_upstream(
    proxy: &PgProxy,
    client: &mut ClientConn,
    peer: SocketAddr,
) -> Option<ServerConn> {
    match dial(proxy).await {
        Ok(s) => Some(s),
        Err(e) => {
            proxy.counters.upstream_errors.increment(1);
            tracing::warn!(%peer, upstream = %proxy.upstream, sslmode = %proxy.upstream_sslmode, error = %e, "cannot connect to the upstream Postgres server");
            let _ = client.write_all(&e.answer()).await;
            None
        }
    }
}
