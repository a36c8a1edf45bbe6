//! fencepost's edges: everything that touches the outside world on behalf
//! of the pure core. The stores live here behind the [`store::Store`] trait
//! (SQLite embedded, Postgres shared); so does HTTP write detection.

pub mod http;
pub mod pg;
pub mod store;

pub use store::{open, AuditQuery, FenceRow, Store, StoreError};
