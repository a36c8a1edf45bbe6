//! Keep-alive connections to the upstream, as plain sockets: the byte
//! relay speaks HTTP/1.1 on them itself, inside the client's task, so a
//! connection is just a `TcpStream` with no task, channel or hyper state
//! of its own.
//!
//! A connection is taken off the stack for one exchange and put back only
//! when that exchange is over on the wire in both directions: the whole
//! request body sent and the whole answer read. A connection whose
//! client was still uploading when the upstream answered is closed, never
//! pooled, so no other request waits behind that upload.
//!
//! The lock is a plain mutex around a `Vec` push or pop, never held across
//! an await.

use std::io::ErrorKind;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

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
}

pub struct Upstreams {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Upstreams {
    pub fn new(
        addr: String,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        Upstreams {
            addr,
            connect_timeout,
            max_idle,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(TcpStream, Instant)>> {
        // A panic while holding this lock leaves only a Vec of sockets.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection the upstream has not closed, if there is one.
    pub fn checkout(&self) -> Option<TcpStream> {
        loop {
            let (stream, since) = self.lock().pop()?;
            if since.elapsed() <= self.idle_timeout && quiet(&stream) {
                return Some(stream);
            }
        }
    }

    /// Back on the stack, once its exchange is over in both directions.
    pub fn checkin(&self, stream: TcpStream) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push((stream, Instant::now()));
        }
    }

    /// A new connection, `TCP_NODELAY` set (a request's head and body go
    /// in one write; nothing is gained by waiting to coalesce).
    pub async fn connect(&self) -> Result<TcpStream, ConnectError> {
        let addr = &self.addr;
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(source)) => Err(ConnectError::Io {
                addr: addr.clone(),
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                addr: addr.clone(),
                timeout: self.connect_timeout,
            }),
        }
    }
}

/// An idle connection has nothing to read: an end of stream means the
/// upstream closed it, and bytes nobody asked for mean it cannot be
/// trusted with the next answer.
fn quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
}
