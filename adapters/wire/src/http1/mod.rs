//! HTTP/1.1 message framing, with no I/O: what a proxy that relays bytes
//! needs to know about a message before it may pass any of them on.
//!
//! A byte relay forwards the client's own header lines and body bytes, so
//! every way two parsers could read one byte stream differently (request
//! smuggling, RFC 9112 section 11.2) has to be refused here, before the
//! first byte goes on. Each module refuses what is ambiguous rather than
//! guessing:
//! - [`head`]: request and response heads over `httparse`, keeping the
//!   original header lines, classifying hop-by-hop, framing and fencing
//!   headers, and refusing what RFC 9112 makes an error (CL with TE, a
//!   repeated or signed Content-Length, bare LF, a missing or repeated
//!   Host, CONNECT, a 101 nobody asked for ...).
//! - [`body`]: the exact Content-Length / chunked / close-delimited body
//!   state machine, for requests and responses, which says where a body
//!   ends without copying it.
//! - [`path`]: RFC 3986 section 6 normalisation of a request path for
//!   route decisions, refusing the paths an upstream might resolve to
//!   another route.
//!
//! The hazards each check answers are listed, with their sources, in the
//! tests of each module.

pub mod body;
pub mod head;
pub mod path;
