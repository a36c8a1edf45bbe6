//! `[audit]`: how audit records reach the store, and the local spool they
//! wait in while it is slow or down.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Records written per store transaction (one group commit), at most.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Longest a record nobody waits for (a lease record) is held to fill
    /// a batch. A refused write's record is written at once.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Records queued for the writer; past this, a refusal waits for room
    /// (and a lease record is dropped and counted).
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// The local spool file; by default beside the SQLite file, or
    /// `fencepost-audit-<hash>.spool` in the working directory.
    #[serde(default)]
    pub spool: Option<PathBuf>,
    /// Largest the spool may grow; past it, records are dropped and counted.
    #[serde(default = "default_spool_max")]
    pub spool_max_bytes: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            batch_size: default_batch(),
            flush_interval: default_flush(),
            queue_capacity: default_queue(),
            spool: None,
            spool_max_bytes: default_spool_max(),
        }
    }
}

fn default_batch() -> usize {
    256
}
fn default_flush() -> Duration {
    Duration::from_millis(200)
}
fn default_spool_max() -> u64 {
    256 * 1024 * 1024
}
fn default_queue() -> usize {
    65_536
}
