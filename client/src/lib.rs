//! # fencepost-client: lead with fencepost
//!
//! A leader needs three things, and this crate is them:
//!
//! 1. **A lease, kept.** [`LeaseKeeper`] campaigns at the elector (waiting
//!    with jittered backoff while another holder leads), renews at a third
//!    of the TTL, publishes the current [`LeaseState`] through a
//!    [`tokio::sync::watch`], and fires each [`Lease`]'s cancellation when
//!    it is lost: a renewal refused, or none confirmed before the lease
//!    could have expired by the local monotonic clock (measured from when
//!    the request was *sent*, minus a safety margin). That is before the
//!    elector can grant it to anyone else. On shutdown it releases.
//! 2. **The token on every write.** [`RequestBuilderExt::fencing`] and
//!    [`FencedClient`] for `reqwest`; [`tower::FencingLayer`] (feature
//!    `tower`); startup options for `tokio-postgres` and `sqlx` in [`pg`]
//!    (features `tokio-postgres`, `sqlx`); [`Fencing::sql_comment`] for
//!    connection pools.
//! 3. **Refusals you can branch on.** A fencing proxy's refusal, over HTTP
//!    (`409`/`428`/`400`/`403`/`503` `problem+json`) or Postgres
//!    (`ZF001`-`ZF004`), becomes one [`Refusal`] with a [`RefusalKind`]:
//!    `Stale`, `Missing`, `Invalid`, `Forged` or `Unavailable`.
//!
//! The keeper's loss notice is a courtesy, not the guarantee: a process
//! paused between reading its token and writing cannot be warned. The
//! fencing proxies are the guarantee; the keeper keeps a healthy leader
//! from ever finding out the hard way.
//!
//! ```no_run
//! use std::time::Duration;
//! use fencepost_client::{Error, FencedClient, LeaseKeeper, RefusalKind, RequestBuilderExt};
//!
//! # async fn run() -> Result<(), Error> {
//! let keeper = LeaseKeeper::builder("http://127.0.0.1:7070", "orders", "worker-1")
//!     .ttl(Duration::from_secs(10))
//!     .start()?;
//! let http = FencedClient::new(reqwest::Client::new(), &keeper);
//! loop {
//!     let lease = keeper.leading().await?;
//!     println!("leading with token {}", lease.token());
//!     loop {
//!         let write = http.put("http://127.0.0.1:8080/orders/42")?.body("paid");
//!         tokio::select! {
//!             loss = lease.lost() => { println!("lost: {}", loss.reason); break; }
//!             r = write.send_fenced() => match r {
//!                 Ok(_) => {}
//!                 Err(Error::Refused(r)) if r.kind == RefusalKind::Stale => break,
//!                 Err(e) => return Err(e),
//!             },
//!         }
//!         tokio::time::sleep(Duration::from_millis(100)).await;
//!     }
//! }
//! # }
//! ```
//!
//! Under `fencepost lease run`, a command gets its token from the
//! environment instead: [`Fencing::from_env`].
//!
//! The crate depends on nothing of the `fencepost` binary; the contract
//! between them is the elector's HTTP API and the proxies' headers and
//! error codes.
#![forbid(unsafe_code)]

mod elector;
mod error;
mod keeper;
mod lease;
pub mod pg;
mod refusal;
mod reqwest_ext;
mod source;
mod token;
#[cfg(feature = "tower")]
pub mod tower;

pub use elector::{ElectorClient, Grant};
pub use error::Error;
pub use keeper::{EndReason, KeeperBuilder, LeaseKeeper, LeaseState};
pub use lease::{Lease, Loss, LossReason};
pub use refusal::{Refusal, RefusalKind, RefusedBy};
pub use reqwest_ext::{check_response, FencedClient, RequestBuilderExt};
pub use source::TokenSource;
pub use token::{
    validate_resource, Fencing, FencingToken, CURRENT_TOKEN_HEADER, ENV_ELECTOR, ENV_HOLDER,
    ENV_RESOURCE, ENV_TOKEN, RESOURCE_HEADER, TOKEN_HEADER,
};

/// Re-exported so users name the same `CancellationToken` the crate uses.
pub use tokio_util::sync::CancellationToken;
