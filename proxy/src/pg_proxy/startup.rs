//! The start of a session: TLS (SSLRequest answered `S` when a
//! certificate is configured, and then required), the startup packet, and
//! CancelRequest, which goes to the server on a connection of its own.

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
/// Postgres expects; with one upstream, the backend it names is there.
pub(super) async fn forward_cancel(proxy: &PgProxy, raw: Bytes) {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&proxy.upstream)).await
    else {
        proxy.counters.upstream_errors.increment(1);
        return;
    };
    if s.write_all(&raw).await.is_ok() {
        // The server closes the connection when it has read the request.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, s.read(&mut sink)).await;
    }
}

/// The connection to the upstream server, with nodelay set; on failure
/// the client is told why (`08006`) and `None` comes back.
pub(super) async fn connect_upstream(
    proxy: &PgProxy,
    client: &mut ClientConn,
    peer: SocketAddr,
) -> Option<TcpStream> {
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&proxy.upstream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            proxy.counters.upstream_errors.increment(1);
            tracing::warn!(%peer, upstream = %proxy.upstream, error = %e, "cannot reach the upstream Postgres server");
            let _ = client
                .write_all(&fatal(
                    "08006",
                    &format!("fencepost: cannot reach the upstream server: {e}"),
                ))
                .await;
            return None;
        }
        Err(_) => {
            proxy.counters.upstream_errors.increment(1);
            let _ = client
                .write_all(&fatal(
                    "08006",
                    "fencepost: the upstream server did not accept the connection in time",
                ))
                .await;
            return None;
        }
    };
    let _ = server.set_nodelay(true);
    Some(server)
}
