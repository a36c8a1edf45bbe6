//! The two body types the proxy streams through, frame by frame.
//!
//! Neither ever holds more than the frame in hand, so a 64 MiB upload or
//! download costs the proxy a few buffers, not 64 MiB. Both are plain enums
//! and structs rather than `BoxBody`, so the hot path allocates nothing per
//! request for its bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fencing::InflightGuard;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Sleep;

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

/// The client's request body on its way to the upstream. It says when it
/// has been sent in full (or abandoned), because `upstream_timeout` bounds
/// the upstream's think time, not how long a client takes to upload. And it
/// gives up on a client that stops sending mid-body: such a client would
/// otherwise hold a concurrency permit and, for a write, the in-flight
/// guard that a newer leader's first write is waiting on.
pub struct RequestBody {
    inner: Incoming,
    sent: Option<oneshot::Sender<()>>,
    /// Allocated only for requests that have a body.
    stall: Option<(Duration, Pin<Box<Sleep>>)>,
}

/// The client sent no body data for this long.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0:?}")]
pub struct BodyStalled(pub Duration);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl RequestBody {
    /// Wraps `inner`; the receiver resolves once the body is sent or dropped.
    pub fn new(inner: Incoming, stall_after: Duration) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut body = RequestBody {
            inner,
            sent: Some(tx),
            stall: None,
        };
        if body.inner.is_end_stream() {
            body.signal();
        } else {
            body.stall = Some((stall_after, Box::pin(tokio::time::sleep(stall_after))));
        }
        (body, rx)
    }

    fn signal(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.signal();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.signal();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.signal();
                } else if let Some((after, sleep)) = &mut this.stall {
                    let now = tokio::time::Instant::now();
                    // A configured timeout past what Instant can hold means
                    // "never", not a panic.
                    if let Some(deadline) = now.checked_add(*after) {
                        sleep.as_mut().reset(deadline);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let Some((after, sleep)) = &mut this.stall else {
                    return Poll::Pending;
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let after = *after;
                this.signal();
                Poll::Ready(Some(Err(BodyStalled(after).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (or anything that caused it) is a [`BodyStalled`].
pub fn is_stall(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyStalled>() {
            return true;
        }
        cur = err.source();
    }
    false
}
