//! Where the HTTP helpers get the token from at the moment a request is
//! built: a keeper (whatever term is current), one lease (until it is
//! lost), or a fixed token (from `fencepost lease run`'s environment).

use tokio::sync::watch;

use crate::keeper::LeaseState;
use crate::{Error, Fencing, Lease, LeaseKeeper};

/// The token a helper attaches, read afresh for every request.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// Follows a keeper across terms; `NotLeading` while it campaigns.
    Keeper {
        state: watch::Receiver<LeaseState>,
        resource: String,
    },
    /// One term only: `NotLeading` once this lease is lost, even if the
    /// keeper leads again (with a token the caller has not seen).
    Lease(Lease),
    /// Always this token (the proxies decide whether it is still good).
    Fixed(Fencing),
}

impl TokenSource {
    /// The token and resource to attach now, or `Error::NotLeading`.
    pub fn current(&self) -> Result<Fencing, Error> {
        match self {
            TokenSource::Keeper { state, resource } => state
                .borrow()
                .lease()
                .map(|l| l.fencing().clone())
                .ok_or_else(|| Error::NotLeading {
                    resource: resource.clone(),
                }),
            TokenSource::Lease(l) if !l.is_lost() => Ok(l.fencing().clone()),
            TokenSource::Lease(l) => Err(Error::NotLeading {
                resource: l.resource().to_owned(),
            }),
            TokenSource::Fixed(f) => Ok(f.clone()),
        }
    }
}

impl From<&LeaseKeeper> for TokenSource {
    fn from(k: &LeaseKeeper) -> Self {
        TokenSource::Keeper {
            state: k.subscribe(),
            resource: k.resource().to_owned(),
        }
    }
}

impl From<Lease> for TokenSource {
    fn from(l: Lease) -> Self {
        TokenSource::Lease(l)
    }
}

impl From<&Lease> for TokenSource {
    fn from(l: &Lease) -> Self {
        TokenSource::Lease(l.clone())
    }
}

impl From<Fencing> for TokenSource {
    fn from(f: Fencing) -> Self {
        TokenSource::Fixed(f)
    }
}
