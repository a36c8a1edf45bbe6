//! A `tower` layer that sets `Fencing-Token` and `Fencing-Resource` on
//! every `http::Request` from the current token, for clients built on
//! tower (hyper-util's client, tonic, axum's test clients, your own
//! stacks).
//!
//! While there is no token (the keeper campaigns, the lease was lost) the
//! service answers `Error::NotLeading` without calling the inner service,
//! so nothing goes out unfenced.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The traits, re-exported so a stack needs no extra dependency to use
/// the layer.
pub use tower_layer::Layer;
pub use tower_service::Service;

use crate::{Error, TokenSource};

/// The error type of [`FencingService`]: the inner service's, or
/// [`Error::NotLeading`], boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Adds the fencing headers to every request.
///
/// ```
/// use fencepost_client::{Fencing, tower::FencingLayer};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let fencing = Fencing::new("orders", "42").unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(FencingLayer::new(fencing))
///     .service_fn(|req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(req.headers()["fencing-token"].clone())
///     });
/// let token = svc.oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(token, "42");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct FencingLayer {
    source: TokenSource,
}

impl FencingLayer {
    /// Fences with whatever `source` holds at each request: a
    /// `&LeaseKeeper`, a `Lease` (one term) or a fixed `Fencing`.
    pub fn new(source: impl Into<TokenSource>) -> FencingLayer {
        FencingLayer {
            source: source.into(),
        }
    }
}

impl<S> Layer<S> for FencingLayer {
    type Service = FencingService<S>;

    fn layer(&self, inner: S) -> FencingService<S> {
        FencingService {
            inner,
            source: self.source.clone(),
        }
    }
}

/// The service [`FencingLayer`] makes.
#[derive(Clone, Debug)]
pub struct FencingService<S> {
    inner: S,
    source: TokenSource,
}

impl<S, B> Service<http::Request<B>> for FencingService<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = FencingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.source.current() {
            Ok(f) => {
                f.apply_headers(req.headers_mut());
                FencingFuture::Inner {
                    fut: self.inner.call(req),
                }
            }
            Err(e) => FencingFuture::NotLeading { error: Some(e) },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`FencingService`].
    #[project = Proj]
    pub enum FencingFuture<F> {
        Inner { #[pin] fut: F },
        NotLeading { error: Option<Error> },
    }
}

impl<F, T, E> Future for FencingFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Inner { fut } => fut.poll(cx).map_err(Into::into),
            Proj::NotLeading { error } => Poll::Ready(Err(match error.take() {
                Some(e) => Box::new(e),
                None => "FencingFuture polled after completion".into(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fencing, LeaseKeeper};
    use tower::{ServiceBuilder, ServiceExt};

    #[tokio::test]
    async fn no_token_means_nothing_is_sent() {
        // A keeper that cannot reach its elector never leads.
        let keeper = LeaseKeeper::builder("http://127.0.0.1:1", "orders", "w")
            .start()
            .unwrap();
        let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = called.clone();
        let svc = ServiceBuilder::new()
            .layer(FencingLayer::new(&keeper))
            .service_fn(move |_req: http::Request<()>| {
                c.store(true, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, std::convert::Infallible>(()) }
            });
        let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
        let e = err.downcast_ref::<Error>().unwrap();
        assert!(matches!(e, Error::NotLeading { resource } if resource == "orders"));
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
        keeper.shutdown().await;
    }

    #[tokio::test]
    async fn headers_replace_what_the_caller_set() {
        let svc = ServiceBuilder::new()
            .layer(FencingLayer::new(Fencing::new("a/b", "7").unwrap()))
            .service_fn(|req: http::Request<()>| async move {
                Ok::<_, std::convert::Infallible>(req.headers().clone())
            });
        let req = http::Request::builder()
            .header("fencing-token", "1")
            .body(())
            .unwrap();
        let h = svc.oneshot(req).await.unwrap();
        assert_eq!(h.get_all("fencing-token").iter().count(), 1);
        assert_eq!(h["fencing-token"], "7");
        assert_eq!(h["fencing-resource"], "a/b");
    }
}
