//! Accepting connections, shared by the HTTP and Postgres proxies.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;

/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next client connection, or `None` once shutdown has begun.
///
/// Accept errors (out of file descriptors, a handshake aborted by the
/// peer) are transient: backing off briefly beats spinning on them, and
/// one bad connection must never stop the listener. Cancel-safe, so a
/// caller may race it against other work in `select!`.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &Shutdown,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.wait() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Fencing round trips are small messages: no Nagle delay.
                let _ = stream.set_nodelay(true);
                return Some((stream, peer));
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
