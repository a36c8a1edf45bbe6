//! The crate's error type: what a leader can run into, each case something
//! it can branch on.

use std::time::Duration;

use crate::Refusal;

/// Everything this crate can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A fencing proxy refused the write. See [`Refusal::kind`]. (Boxed:
    /// a refusal is large and rare, and every `Result` here carries room
    /// for the largest variant.)
    #[error(transparent)]
    Refused(Box<Refusal>),

    /// A write was about to go out while no lease is held: the keeper is
    /// campaigning, or the lease was lost. Nothing was sent.
    #[error("not leading {resource}: no lease is held right now, nothing was sent")]
    NotLeading { resource: String },

    /// Acquire: another holder's lease is live (or the lease is in its lock
    /// delay after an expiry). The keeper waits and tries again.
    #[error("{detail}")]
    LeaseHeld {
        /// The live holder, when the elector named one.
        holder: Option<String>,
        /// How long the elector asked to wait, when it said.
        retry_after: Option<Duration>,
        detail: String,
    },

    /// Renew or release: this holder no longer holds the lease with this
    /// token. Stop writing.
    #[error("lease lost: {detail}")]
    LeaseLost { detail: String },

    /// The elector answered with an error that retrying will not fix
    /// (`400` bad TTL or holder, `401` bearer token missing or wrong, `403`
    /// outside this identity's grants), or a server error (`5xx`, which
    /// [`is_retriable`](Self::is_retriable)).
    #[error("elector answered {status}: {detail}")]
    Elector {
        status: u16,
        /// The problem `type` (`urn:fencepost:...`), when there was one.
        problem_type: Option<String>,
        detail: String,
    },

    /// The request never got an answer: connection refused, timeout,
    /// a reset. Retriable.
    #[error("{url}: {message}")]
    Unreachable { url: String, message: String },

    /// A fenced HTTP request failed in transport (not a refusal).
    #[error("request failed: {0}")]
    Http(#[source] reqwest::Error),

    /// A bad argument: a resource name, a token, a URL, a TTL.
    #[error("{0}")]
    InvalidArgument(String),

    /// The [`LeaseKeeper`](crate::LeaseKeeper) has ended (shut down, or
    /// lost its lease with campaigning again turned off); it will not lead
    /// again.
    #[error("the lease keeper has ended: {0}")]
    Ended(String),
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Error::Refused(Box::new(r))
    }
}

impl Error {
    /// The refusal, when a proxy refused the write.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the same call may succeed later: the elector or proxy was
    /// unreachable or briefly unavailable, or another holder leads for now.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Refused(r) => r.is_retriable(),
            Error::LeaseHeld { .. } | Error::Unreachable { .. } | Error::Http(_) => true,
            Error::Elector { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}
