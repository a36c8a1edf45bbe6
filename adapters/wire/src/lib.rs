//! What fencepost knows about the protocols it stands in, with no I/O.
//!
//! Everything here is a pure function of bytes (or of parsed headers), so it
//! is property-tested and fuzzed without a socket, a runtime or a database;
//! the fuzz crate links this crate alone, not sqlx. What touches the outside
//! world lives elsewhere: the stores in `fencepost-store`, the sockets and
//! loops in the `fencepost` crate.
//!
//! # Layout
//! - [`pg`]: the Postgres wire protocol. [`pg::frame`] cuts bytes into
//!   messages, [`pg::classify`] says which statements are writes and what
//!   they set the fencing variables to, [`pg::cycle`] tracks where the
//!   server is in answering a session, [`pg::guard`] writes the database
//!   guard's call and reads its refusal.
//! - [`http`]: which HTTP requests are writes, and which fencing token and
//!   resource their headers and path carry.
//! - [`http1`]: HTTP/1.1 framing for a proxy that relays bytes: the head
//!   parser that refuses every ambiguity, the body state machine, and the
//!   path normalisation route decisions are made on.

#![forbid(unsafe_code)]

pub mod http;
pub mod http1;
pub mod pg;
