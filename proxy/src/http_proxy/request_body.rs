//! The client's request body on its way to the upstream, frame by frame:
//! it never holds more than the frame in hand, so a 64 MiB upload costs the
//! proxy a few buffers. Its own file so that the upstream pool (which sends
//! it) and the response body (which returns a connection to the pool) do
//! not import each other.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;

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

/// Reading the client's body failed (bad chunked framing, a client that
/// hung up mid-body): the client's fault, not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(#[source] hyper::Error);

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
                Poll::Ready(Some(Err(ClientBodyError(e).into())))
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
    caused_by::<BodyStalled>(e)
}

/// Whether `e` (or anything that caused it) is a [`ClientBodyError`].
pub fn is_client_body(e: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<ClientBodyError>(e)
}

fn caused_by<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}
