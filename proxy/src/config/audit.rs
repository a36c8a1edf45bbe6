//! `[audit]`: how refusal records reach the store.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Records written per store transaction, at most.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Longest a record waits before its batch is written.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Records buffered in memory while the store is slow or down; past
    /// this, records are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            batch_size: default_batch(),
            flush_interval: default_flush(),
            queue_capacity: default_queue(),
        }
    }
}

fn default_batch() -> usize {
    256
}
fn default_flush() -> Duration {
    Duration::from_millis(200)
}
fn default_queue() -> usize {
    65_536
}
