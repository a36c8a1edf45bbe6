//! Serving the admin and elector APIs (axum routers) with the limits the
//! proxies' listeners have.
//!
//! `axum::serve` reads request heads with no deadline and accepts without
//! bound, so one slowloris client per file descriptor could exhaust the
//! process. Here each connection is an HTTP/1.1 connection from hyper's
//! builder with a header-read timeout (which also closes keep-alive
//! connections idle that long), behind the shared accept loop and its
//! connection bound.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::listener::{http_overloaded, next_connection, ConnLimit, HTTP_HEAD_END};
use crate::shutdown::Shutdown;

/// A client must send its request head (or its next one, on a keep-alive
/// connection) within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections per API listener. Operators and proxies' watch
/// streams need a handful; a flood gets 503s.
const MAX_CONNECTIONS: usize = 1024;
/// Bound on a request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves `app` on `listener` until `shutdown`; then calls `closing` (to
/// end long-lived streams) and waits for open requests to finish.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
    closing: impl FnOnce(),
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let limit = ConnLimit::new(
        name,
        addr,
        MAX_CONNECTIONS,
        http_overloaded("this API is at its connection bound; retry shortly"),
        Some(HTTP_HEAD_END),
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES.max(8 * 1024))
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    while let Some((stream, peer, permit)) = next_connection(&listener, &shutdown, &limit).await {
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, api = name, "API connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    closing();
    graceful.shutdown().await;
    Ok(())
}
