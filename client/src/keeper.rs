//! [`LeaseKeeper`]: campaigns for a lease, renews it, and says when it is
//! lost, from one background task.
//!
//! The rule that makes it safe: a lease is valid locally until the send
//! time of the last *confirmed* acquire or renewal plus the TTL, minus a
//! safety margin. The elector starts the TTL when it receives the request,
//! which is no earlier than it was sent, so as long as the two monotonic
//! clocks run at about the same rate the local deadline passes first, and
//! the loss fires before the elector can grant the lease to anyone else.
//! A process that was paused wakes up to a deadline in the past: the loss
//! fires at once, whatever renewal answer arrives with it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::elector::Grant;
use crate::lease::{Lease, LossReason};
use crate::token::validate_resource;
use crate::{ElectorClient, Error};

/// Longest holder name the elector accepts, in characters.
const MAX_HOLDER: usize = 256;
/// How long a release at shutdown may take before the keeper gives up on
/// it (the lease then simply expires).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the keeper is.
#[derive(Debug, Clone)]
pub enum LeaseState {
    /// Waiting for the lease: another holder leads, or the elector is not
    /// answering.
    Campaigning,
    /// This process leads, with this lease.
    Leading(Lease),
    /// The keeper has stopped and will not lead again.
    Ended(EndReason),
}

impl LeaseState {
    /// The lease, while leading and not yet lost.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            LeaseState::Leading(l) if !l.is_lost() => Some(l),
            _ => None,
        }
    }
}

/// Why a keeper stopped.
#[derive(Debug, Clone)]
pub enum EndReason {
    /// [`LeaseKeeper::shutdown`] (or drop).
    ShutDown,
    /// The lease was lost and [`KeeperBuilder::campaign_again`] is off.
    Lost(LossReason),
    /// The elector refused in a way retrying cannot fix (bad TTL or holder
    /// name, bearer token missing or wrong, outside this identity's grants).
    Failed(Arc<Error>),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::ShutDown => f.write_str("shut down"),
            EndReason::Lost(r) => write!(f, "lease lost ({r})"),
            EndReason::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Settings of a [`LeaseKeeper`]; from [`LeaseKeeper::builder`].
#[derive(Clone)]
pub struct KeeperBuilder {
    elector_url: String,
    http: Option<reqwest::Client>,
    bearer: Option<String>,
    resource: String,
    holder: String,
    ttl: Duration,
    renew_every: Option<Duration>,
    safety_margin: Option<Duration>,
    backoff: Option<(Duration, Duration)>,
    campaign_again: bool,
}

impl KeeperBuilder {
    /// Lease length asked of the elector (default 10 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often to renew (default a third of the TTL). Must leave room
    /// before the deadline for a retry or two.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// How long before the lease could expire at the elector the loss
    /// fires (default a tenth of the TTL). Covers clock rate differences
    /// and the time your code takes to stop once told.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// Bounds of the randomized exponential backoff between acquire
    /// attempts while another holder leads (default 50 ms up to a quarter
    /// of the TTL, at most 5 s).
    pub fn campaign_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Some((min, max));
        self
    }

    /// After a loss, campaign again (the default) or end the keeper.
    pub fn campaign_again(mut self, again: bool) -> Self {
        self.campaign_again = again;
        self
    }

    /// The elector's bearer token (`[elector] token`), if it has one.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }

    /// Your own `reqwest::Client` for the elector (TLS, proxies).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Checks the settings and starts campaigning in a background task.
    /// Must be called inside a Tokio runtime.
    pub fn start(self) -> Result<LeaseKeeper, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidArgument("LeaseKeeper::start needs a Tokio runtime".into())
        })?;
        let cfg = self.check()?;
        let (tx, rx) = watch::channel(LeaseState::Campaigning);
        let stop = CancellationToken::new();
        let cfg = Arc::new(cfg);
        let task = runtime.spawn(run(Arc::clone(&cfg), tx, stop.clone()));
        Ok(LeaseKeeper {
            cfg,
            state: rx,
            stop,
            task: Some(task),
        })
    }

    fn check(self) -> Result<Config, Error> {
        validate_resource(&self.resource)?;
        let n = self.holder.chars().count();
        if n == 0 || n > MAX_HOLDER || self.holder.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "holder {:?}: must be 1-{MAX_HOLDER} printable characters",
                self.holder
            )));
        }
        let ttl = self.ttl;
        if ttl < Duration::from_millis(10) {
            return Err(Error::InvalidArgument(format!(
                "ttl {ttl:?} is too short (at least 10ms)"
            )));
        }
        let margin = self.safety_margin.unwrap_or(ttl / 10);
        let renew_every = self.renew_every.unwrap_or(ttl / 3);
        if margin >= ttl || renew_every.is_zero() || renew_every >= ttl - margin {
            return Err(Error::InvalidArgument(format!(
                "renew_every ({renew_every:?}) must be above zero and below the TTL minus the safety margin ({:?})",
                ttl.saturating_sub(margin)
            )));
        }
        let (min, max) = self.backoff.unwrap_or_else(|| {
            let max = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            (Duration::from_millis(50).min(max), max)
        });
        if min.is_zero() || min > max {
            return Err(Error::InvalidArgument(format!(
                "campaign backoff bounds {min:?}..{max:?}: need 0 < min <= max"
            )));
        }
        let mut elector = match self.http {
            Some(c) => ElectorClient::with_http_client(&self.elector_url, c)?,
            None => ElectorClient::new(&self.elector_url)?,
        };
        if let Some(b) = self.bearer {
            elector = elector.bearer_token(b);
        }
        Ok(Config {
            elector,
            resource: self.resource,
            holder: self.holder,
            ttl,
            margin,
            renew_every,
            backoff: (min, max),
            campaign_again: self.campaign_again,
        })
    }
}

struct Config {
    elector: ElectorClient,
    resource: String,
    holder: String,
    ttl: Duration,
    margin: Duration,
    renew_every: Duration,
    backoff: (Duration, Duration),
    campaign_again: bool,
}

/// Campaigns for a lease and keeps it.
///
/// One background task acquires the lease (retrying with jittered backoff
/// while another holder leads), renews it every third of the TTL, and on
/// loss fires the [`Lease`]'s cancellation, before the lease could have
/// expired at the elector. The current state is a
/// [`tokio::sync::watch`] ([`subscribe`](Self::subscribe)); after a loss
/// it campaigns again unless told not to. [`shutdown`](Self::shutdown)
/// releases the lease so the next candidate need not wait out the TTL.
///
/// ```no_run
/// use std::time::Duration;
/// use fencepost_client::{LeaseKeeper, RequestBuilderExt};
///
/// # async fn f() -> Result<(), fencepost_client::Error> {
/// let keeper = LeaseKeeper::builder("http://127.0.0.1:7070", "orders", "worker-1")
///     .ttl(Duration::from_secs(10))
///     .start()?;
/// let http = reqwest::Client::new();
/// loop {
///     let lease = keeper.leading().await?; // waits while another holder leads
///     let stop = lease.cancellation_token();
///     while !stop.is_cancelled() {
///         http.put("http://127.0.0.1:8080/orders/42")
///             .fencing(lease.fencing())
///             .body("paid")
///             .send_fenced()
///             .await?;
///         # break;
///     }
///     # break;
/// }
/// keeper.shutdown().await; // releases the lease
/// # Ok(()) }
/// ```
pub struct LeaseKeeper {
    cfg: Arc<Config>,
    state: watch::Receiver<LeaseState>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Settings for a keeper of `resource`'s lease at the elector at
    /// `elector_url`, as `holder` (a stable name for this process: pod
    /// name, host:pid).
    pub fn builder(elector_url: &str, resource: &str, holder: &str) -> KeeperBuilder {
        KeeperBuilder {
            elector_url: elector_url.to_owned(),
            http: None,
            bearer: None,
            resource: resource.to_owned(),
            holder: holder.to_owned(),
            ttl: Duration::from_secs(10),
            renew_every: None,
            safety_margin: None,
            backoff: None,
            campaign_again: true,
        }
    }

    pub fn resource(&self) -> &str {
        &self.cfg.resource
    }

    pub fn holder(&self) -> &str {
        &self.cfg.holder
    }

    /// The state, now.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// The lease, if this process leads right now.
    pub fn current(&self) -> Option<Lease> {
        self.state.borrow().lease().cloned()
    }

    /// A receiver of every state change (campaigning, leading, ended).
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Waits until this process leads and returns the lease.
    /// `Err(Error::Ended)` once the keeper has ended; for
    /// [`EndReason::Failed`] the message is the elector's.
    pub async fn leading(&self) -> Result<Lease, Error> {
        let mut rx = self.state.clone();
        loop {
            let ended = {
                let s = rx.borrow_and_update();
                match &*s {
                    LeaseState::Leading(l) if !l.is_lost() => return Ok(l.clone()),
                    LeaseState::Ended(r) => Some(r.to_string()),
                    _ => None,
                }
            };
            if let Some(r) = ended {
                return Err(Error::Ended(r));
            }
            if rx.changed().await.is_err() {
                return Err(Error::Ended("the keeper's task is gone".into()));
            }
        }
    }

    /// Waits until the keeper has ended, and says why.
    pub async fn ended(&self) -> EndReason {
        let mut rx = self.state.clone();
        loop {
            if let LeaseState::Ended(r) = &*rx.borrow_and_update() {
                return r.clone();
            }
            if rx.changed().await.is_err() {
                return EndReason::ShutDown;
            }
        }
    }

    /// Stops: fires the current lease's loss, releases it (bounded by a
    /// short timeout; otherwise it expires by itself), and waits for the
    /// background task. Stop your own writes first where you can: once
    /// released, another holder may be granted the lease at once (the
    /// fencing proxies then refuse anything still in flight with this
    /// token).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaseKeeper {
    /// Dropping stops the keeper too; the release then happens in the
    /// background if the runtime lives on.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ------------------------------------------------------------- the task

async fn run(cfg: Arc<Config>, tx: watch::Sender<LeaseState>, stop: CancellationToken) {
    let end = loop {
        tx.send_replace(LeaseState::Campaigning);
        let (grant, sent) = match campaign(&cfg, &stop).await {
            Ok(Some(g)) => g,
            Ok(None) => break EndReason::ShutDown,
            Err(e) => {
                tracing::error!(resource = %cfg.resource, holder = %cfg.holder, error = %e, "lease keeper: campaign failed; giving up");
                break EndReason::Failed(Arc::new(e));
            }
        };
        let ttl = grant.ttl.min(cfg.ttl);
        let lease = Lease::new(
            grant.fencing,
            cfg.holder.clone(),
            ttl,
            sent,
            sent + ttl - cfg.margin,
        );
        tracing::info!(resource = %cfg.resource, holder = %cfg.holder, token = %lease.token(), "lease acquired");
        tx.send_replace(LeaseState::Leading(lease.clone()));
        match hold(&cfg, &lease, &stop).await {
            Held::Stopped => {
                lease.end(LossReason::ShutDown);
                release(&cfg, &lease).await;
                break EndReason::ShutDown;
            }
            Held::Failed(e) => break EndReason::Failed(Arc::new(e)),
            Held::Lost(reason) => {
                // Info, not warn: the loss is handed to the application,
                // which knows how loud it should be.
                tracing::info!(resource = %cfg.resource, holder = %cfg.holder, token = %lease.token(), %reason, "lease lost");
                if !cfg.campaign_again {
                    break EndReason::Lost(reason);
                }
            }
        }
    };
    tx.send_replace(LeaseState::Ended(end));
}

/// Acquires, retrying while another holder leads or the elector is
/// unreachable. `Ok(None)`: stopped. The instant is when the winning
/// request was sent.
async fn campaign(
    cfg: &Config,
    stop: &CancellationToken,
) -> Result<Option<(Grant, Instant)>, Error> {
    let mut attempt = 0u32;
    loop {
        let sent = Instant::now();
        let answer = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(None),
            a = timeout(cfg.ttl - cfg.margin, cfg.elector.acquire(&cfg.resource, &cfg.holder, cfg.ttl)) => a,
        };
        let mut wait = backoff(cfg.backoff, attempt);
        match answer {
            Ok(Ok(g)) if sent + g.ttl.min(cfg.ttl) > Instant::now() + cfg.margin => {
                return Ok(Some((g, sent)));
            }
            Ok(Ok(_)) => {
                // The grant took so long to arrive that it is no longer
                // safe to use; as its holder, asking again renews it.
                tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, "lease keeper: grant arrived too late to use; asking again");
            }
            Ok(Err(Error::LeaseHeld { retry_after, .. })) => {
                if let Some(r) = retry_after {
                    wait = wait.max(r);
                }
            }
            Ok(Err(e)) if e.is_retriable() => {
                tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, error = %e, "lease keeper: acquire failed; retrying");
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, "lease keeper: acquire got no answer in time; retrying");
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(None),
            _ = sleep(wait) => {}
        }
    }
}

enum Held {
    Stopped,
    Lost(LossReason),
    Failed(Error),
}

/// Renews until the lease is lost or the keeper stops. Fires the loss
/// itself, the moment it is known.
async fn hold(cfg: &Config, lease: &Lease, stop: &CancellationToken) -> Held {
    let lost = |reason: LossReason| {
        lease.end(reason.clone());
        Held::Lost(reason)
    };
    let mut next = lease.requested_at() + cfg.renew_every;
    let mut failures = 0u32;
    loop {
        let deadline = tokio::time::Instant::from_std(lease.valid_until());
        // `biased`: after a pause, the deadline wins over a renewal timer
        // that expired at the same time.
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Held::Stopped,
            _ = sleep_until(deadline) => return lost(LossReason::Unconfirmed),
            _ = sleep_until(tokio::time::Instant::from_std(next)) => {}
        }
        let sent = Instant::now();
        let renewal = cfg
            .elector
            .renew(&cfg.resource, &cfg.holder, lease.token(), Some(cfg.ttl));
        let answer = tokio::select! {
            biased;
            _ = stop.cancelled() => return Held::Stopped,
            _ = sleep_until(deadline) => return lost(LossReason::Unconfirmed),
            a = timeout(cfg.renew_every, renewal) => a,
        };
        match answer {
            Ok(Ok(g)) if g.fencing.token() == lease.token() => {
                lease.extend(sent + g.ttl.min(cfg.ttl) - cfg.margin);
                next = sent + cfg.renew_every;
                failures = 0;
            }
            Ok(Ok(g)) => {
                // The elector renewed under another token: not this term.
                return lost(LossReason::Refused(format!(
                    "renewal answered with token {}, not {}",
                    g.fencing.token(),
                    lease.token()
                )));
            }
            Ok(Err(Error::LeaseLost { detail })) => return lost(LossReason::Refused(detail)),
            Ok(Err(e)) if e.is_retriable() => {
                failures = failures.saturating_add(1);
                tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, error = %e, "lease keeper: renewal failed; retrying until the lease's local deadline");
                next = Instant::now() + retry_delay(cfg.renew_every, failures);
            }
            Ok(Err(e)) => {
                lease.end(LossReason::Failed(e.to_string()));
                return Held::Failed(e);
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, "lease keeper: renewal got no answer in time; retrying");
                next = Instant::now() + retry_delay(cfg.renew_every, failures);
            }
        }
    }
}

async fn release(cfg: &Config, lease: &Lease) {
    match timeout(
        RELEASE_TIMEOUT,
        cfg.elector
            .release(&cfg.resource, &cfg.holder, lease.token()),
    )
    .await
    {
        Ok(Ok(())) => {
            tracing::info!(resource = %cfg.resource, holder = %cfg.holder, token = %lease.token(), "lease released")
        }
        Ok(Err(e)) => {
            tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, error = %e, "lease release failed; it will expire")
        }
        Err(_) => {
            tracing::warn!(resource = %cfg.resource, holder = %cfg.holder, "lease release got no answer; it will expire")
        }
    }
}

/// Exponential backoff with equal jitter: half the step fixed, half
/// random, so candidates spread out but none waits near zero.
fn backoff((min, max): (Duration, Duration), attempt: u32) -> Duration {
    let step = min
        .checked_mul(1u32 << attempt.min(20))
        .unwrap_or(max)
        .min(max);
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Between failed renewals: a quarter of the renewal interval, doubling,
/// jittered, so several retries fit before the deadline.
fn retry_delay(renew_every: Duration, failures: u32) -> Duration {
    let base = (renew_every / 4).max(Duration::from_millis(1));
    backoff((base, renew_every), failures.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        let (min, max) = (Duration::from_millis(50), Duration::from_millis(2000));
        for attempt in 0..40 {
            let d = backoff((min, max), attempt);
            let step = (min * 2u32.pow(attempt.min(20))).min(max);
            assert!(d >= step / 2 && d <= step, "{attempt}: {d:?} vs {step:?}");
        }
    }

    #[test]
    fn retries_fit_before_the_deadline() {
        let every = Duration::from_millis(300);
        assert!(retry_delay(every, 1) <= every / 4);
        assert!(retry_delay(every, 10) <= every);
    }

    fn builder() -> KeeperBuilder {
        LeaseKeeper::builder("http://127.0.0.1:1", "orders", "w1")
    }

    #[test]
    fn settings_are_checked() {
        assert!(builder().check().is_ok());
        let cfg = builder().ttl(Duration::from_secs(3)).check().ok().unwrap();
        assert_eq!(cfg.renew_every, Duration::from_secs(1));
        assert_eq!(cfg.margin, Duration::from_millis(300));
        for bad in [
            LeaseKeeper::builder("http://x", "bad name", "w"),
            LeaseKeeper::builder("http://x", "r", ""),
            LeaseKeeper::builder("ftp://x", "r", "w"),
            builder().ttl(Duration::from_millis(1)),
            builder().safety_margin(Duration::from_secs(10)),
            builder().renew_every(Duration::from_secs(9)),
            builder().renew_every(Duration::ZERO),
            builder().campaign_backoff(Duration::from_secs(2), Duration::from_secs(1)),
        ] {
            assert!(bad.check().is_err());
        }
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        assert!(matches!(builder().start(), Err(Error::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn an_unreachable_elector_keeps_it_campaigning_and_shutdown_ends_it() {
        // Port 1 on loopback: nothing listens, connections are refused.
        let k = builder().ttl(Duration::from_millis(300)).start().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(k.state(), LeaseState::Campaigning));
        assert!(k.current().is_none());
        let rx = k.subscribe();
        k.shutdown().await;
        assert!(matches!(
            &*rx.borrow(),
            LeaseState::Ended(EndReason::ShutDown)
        ));
    }
}
