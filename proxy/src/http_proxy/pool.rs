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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::request_body::RequestBody;

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
}

pub struct Pool {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    max_header_bytes: usize,
    idle: Mutex<Vec<(Sender, Instant)>>,
}

impl Pool {
    pub fn new(
        addr: String,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            connect_timeout,
            max_idle,
            idle_timeout,
            max_header_bytes: 64 * 1024,
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
        let stream = connect_tcp(addr, self.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .max_header_size(self.max_header_bytes)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: addr.clone(),
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
