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

use crate::http_proxy::pool::connect_tcp;
pub use crate::http_proxy::pool::ConnectError;

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

    /// A new connection.
    pub async fn connect(&self) -> Result<TcpStream, ConnectError> {
        connect_tcp(&self.addr, self.connect_timeout).await
    }
}

/// An idle connection has nothing to read: an end of stream means the
/// upstream closed it, and bytes nobody asked for mean it cannot be
/// trusted with the next answer.
fn quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
}
