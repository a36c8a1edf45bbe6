//! What every HTTP listener of fencepost shares (the HTTP fencing proxy,
//! the elector API, the admin API), so each is answered, authorized and
//! served one way:
//!
//! - [`problem`]: the one problem+json type and the `urn:fencepost:` types.
//! - [`bearer`]: the constant-time bearer-token check.
//! - [`http1`]: the HTTP/1.1 serve loop over the shared accept loop
//!   ([`crate::listener`]), with its connection bound and graceful drain.
//! - [`peer`]: the identity a client certificate proved, for authorization.
//! - [`access`]: who a caller is (client token or certificate) and what it
//!   may do (elector grants, admin roles).

pub mod access;
pub mod bearer;
pub mod http1;
pub mod peer;
pub mod problem;
