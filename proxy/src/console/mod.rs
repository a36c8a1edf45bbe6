//! The operator's console, `GET /ui` on the admin port: one page that
//! shows leases, fences (per replica on a shared store), replicas, the
//! newest audit records and a timeline per resource, kept live by an
//! event stream.
//!
//! - `assets`: the page itself, hand-written HTML, CSS and JS compiled
//!   into the binary (`web/`), served under a Content-Security-Policy
//!   that allows nothing from anywhere else;
//! - `events`: `GET /v1/events`, the Server-Sent Events stream the page
//!   reads (the store polled once per second, changes pushed).
//!
//! The page reads only the admin API's JSON endpoints, with the admin
//! token (when one is set) in an `Authorization` header that its own
//! script adds: the token is never in a URL or a cookie.

pub mod assets;
pub mod events;
