//! The response body the proxy streams to its clients, frame by frame (the
//! request body going the other way is `request_body.rs`).
//!
//! It never holds more than the frame in hand, so a 64 MiB download costs
//! the proxy a few buffers, not 64 MiB. It is a plain enum rather than
//! `BoxBody`, so the hot path allocates nothing per request for it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fencing::InflightGuard;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::pool::{Pool, Sender};

/// What the proxy answers a client with: either the upstream's body,
/// streamed, or a small body of its own (problem+json).
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody::Full(Some(bytes))
    }
}

/// A problem response's body.
impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::full(bytes)
    }
}

/// The upstream's response body, plus what must live exactly as long as the
/// upstream is still answering.
///
/// The in-flight guard is the drain of guarantee 2: a newer token waits for
/// it, so it is released only once the upstream has sent its whole answer
/// (or failed), never merely when the response headers came back.
pub struct UpstreamBody {
    /// `None` only once handed to the background finisher in `drop`.
    inner: Option<Incoming>,
    guard: Option<InflightGuard>,
    permit: Option<OwnedSemaphorePermit>,
    /// How long a dropped-early body may keep reading the upstream's answer
    /// to its end before the guard is given up anyway.
    finish_within: Duration,
    /// The connection this answer came on, back to its pool once the
    /// answer has been read to its end (and closed if it never is).
    conn: Option<(Sender, Arc<Pool>)>,
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        hold: Hold,
        finish_within: Duration,
        conn: Option<(Sender, Arc<Pool>)>,
    ) -> Self {
        UpstreamBody {
            inner: Some(inner),
            guard: hold.guard,
            permit: hold.permit,
            finish_within,
            conn,
        }
    }

    /// The answer is over: `complete` when read to its end, not cut off.
    fn finish(&mut self, complete: bool) {
        self.guard = None;
        self.permit = None;
        if let Some((sender, pool)) = self.conn.take() {
            if complete {
                pool.checkin(sender);
            }
        }
    }
}

/// What a request holds while the upstream works on it: the write's
/// in-flight guard (the drain of guarantee 2 waits for it) and the
/// request's concurrency permit.
#[derive(Default)]
pub struct Hold {
    pub guard: Option<InflightGuard>,
    pub permit: Option<OwnedSemaphorePermit>,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away mid-response. For a write, the upstream may
        // still be sending (and thus still doing) it; finish reading in the
        // background so the guard, and the drain behind it, only lets go
        // when the upstream is really done.
        if self.inner.as_ref().is_some_and(Body::is_end_stream) {
            // Nothing left to read (an empty body is never polled).
            self.finish(true);
            return;
        }
        let Some(guard) = self.guard.take() else {
            return;
        };
        let Some(mut inner) = self.inner.take().filter(|b| !b.is_end_stream()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let permit = self.permit.take();
        let within = self.finish_within;
        rt.spawn(async move {
            let rest = async {
                while let Some(frame) = inner.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(within, rest).await;
            drop(guard);
            drop(permit);
        });
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upstream(up) => {
                let Some(inner) = up.inner.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => up.finish(true),
                    Poll::Ready(Some(Err(_))) => up.finish(false),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => up.finish(true),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Upstream(up) => up.inner.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(up) => up
                .inner
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}
