//! Keep-alive connections to the one upstream of a listener.
//!
//! A listener talks to exactly one upstream, so the pool needs no key: it
//! is a stack of idle HTTP/1.1 connections. hyper-util's general-purpose
//! client was here before; per request it hashed a pool key, compared
//! authorities and moved a stack of large futures, about a fifth of the
//! proxy's instructions per request under callgrind. A connection is taken
//! off the stack for one request and put back only once the upstream's
//! answer has been read to its end, so the next request on it cannot
//! start before the last one is over.
//!
//! The lock is a plain mutex around a `Vec` push or pop, never held across
//! an await.
//!
//! An `https://` upstream's connections are TLS under hyper's HTTP/1.1
//! client; the sender does not show which, so the pool and the request
//! path are the same for both (each kind of connection is a task of its
//! own, typed by its stream: no dispatch per read or write).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::request_body::RequestBody;
use crate::upstream_tls::UpstreamTls;

pub type Sender = http1::SendRequest<RequestBody>;

/// Why no connection to the upstream could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {addr} took longer than {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: hyper::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
}

impl ConnectError {
    /// The problem detail a client gets for it (`502`): where the
    /// upstream is, and for a TLS failure why (an unknown issuer, a name
    /// the certificate does not carry), which is what an operator needs
    /// to fix it.
    pub fn detail(&self, upstream: &impl std::fmt::Display) -> String {
        match self {
            ConnectError::Tls { source, .. } => {
                format!("TLS handshake with the upstream {upstream} failed: {source}")
            }
            _ => format!("cannot connect to the upstream {upstream}"),
        }
    }
}

/// A TCP connection to `addr` within `timeout`, then the TLS handshake
/// when `tls` is set (within `timeout` again).
pub async fn connect_tls(
    addr: &str,
    timeout: Duration,
    tls: &UpstreamTls,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let tcp = connect_tcp(addr, timeout).await?;
    tls.handshake(tcp, timeout)
        .await
        .map_err(|source| ConnectError::Tls {
            addr: addr.to_owned(),
            source,
        })
}

pub struct Pool {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    max_header_bytes: usize,
    /// Set for an `https://` upstream.
    tls: Option<Arc<UpstreamTls>>,
    idle: Mutex<Vec<(Sender, Instant)>>,
}

impl Pool {
    pub fn new(
        addr: String,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
        tls: Option<Arc<UpstreamTls>>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            connect_timeout,
            max_idle,
            idle_timeout,
            max_header_bytes: 64 * 1024,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, Instant)>> {
        // A panic while holding this lock leaves only a Vec of senders
        // behind, which is still consistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection that is still open and ready, if there is one.
    pub async fn checkout(&self) -> Option<Sender> {
        loop {
            let (mut sender, since) = self.lock().pop()?;
            if sender.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            // Ready at once unless the upstream's last answer is still
            // being wound up by the connection task; an error means the
            // upstream closed it.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Back on the stack, once its last answer has been read in full.
    pub fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push((sender, Instant::now()));
        }
    }

    /// A new connection. Its I/O runs in a task of its own that ends when
    /// the upstream closes it or every sender for it is gone.
    pub async fn connect(&self) -> Result<Sender, ConnectError> {
        let addr = &self.addr;
        match &self.tls {
            None => {
                self.handshake_http1(connect_tcp(addr, self.connect_timeout).await?)
                    .await
            }
            Some(tls) => {
                self.handshake_http1(connect_tls(addr, self.connect_timeout, tls).await?)
                    .await
            }
        }
    }

    /// hyper's HTTP/1.1 client on a connected stream, its I/O spawned.
    async fn handshake_http1<S>(&self, stream: S) -> Result<Sender, ConnectError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .max_header_size(self.max_header_bytes)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: self.addr.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A TCP connection to `addr` within `timeout`, `TCP_NODELAY` set (a
/// request's head and body go out in as few writes as they can; nothing is
/// gained by waiting to coalesce). Both data paths connect through this.
pub async fn connect_tcp(addr: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(ConnectError::Io {
            addr: addr.to_owned(),
            source,
        }),
        Err(_) => Err(ConnectError::Timeout {
            addr: addr.to_owned(),
            timeout,
        }),
    }
}
