//! The fuzz targets' bodies, as plain functions over bytes.
//!
//! Each `src/bin/*.rs` is a one-line `afl::fuzz!` around one of these. The
//! modules do not use `afl`, and they reach the fencing core only as
//! `super::fencing`, so the workspace's own tests include the same files
//! (`#[path]`) to replay the committed corpus and to run them from
//! proptest, in CI, without AFL. A broken invariant panics, which AFL
//! records as a crash.

#![forbid(unsafe_code)]

use fencepost_fencing as fencing;

pub mod files;
pub mod http1;
pub mod http1_body;
pub mod http_headers;
pub mod pg;
pub mod token;
