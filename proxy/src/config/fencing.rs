//! `[fencing]`: the decision path's bounds and caches.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FencingConfig {
    /// Longest a newer token's first write waits for older writes to
    /// finish at the upstream; past it the newer write gets 503.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Longest any store call waits before failing closed: fence decisions
    /// (503), lease operations (503), API reads. The whole bound: nothing
    /// beneath it cuts a call shorter.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Verified signed tokens kept, so signatures are checked once.
    #[serde(default = "default_token_cache")]
    pub token_cache_size: u64,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            drain_timeout: default_drain(),
            store_timeout: default_store_timeout(),
            token_cache_size: default_token_cache(),
        }
    }
}

impl FencingConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.store_timeout.is_zero() {
            return Err("fencing.store_timeout must be above zero".into());
        }
        Ok(())
    }
}

fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_token_cache() -> u64 {
    100_000
}
