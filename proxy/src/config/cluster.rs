//! `[cluster]`: the fencing tier that every `fencepost serve` with a proxy
//! forms with the others sharing its Postgres store (docs/replicas.md).

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Join the tier when the store is Postgres and this process runs a
    /// proxy. Off: this process fences alone, which is only safe when it
    /// is the only proxy writing through the store.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A replica's lease in the store. A replica that cannot renew stops
    /// admitting writes within it, and an advance waits at most about this
    /// long for a replica that has gone silent.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub replica_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: true,
            replica_ttl: default_ttl(),
        }
    }
}

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.replica_ttl < Duration::from_millis(300) {
            return Err("cluster.replica_ttl must be at least 300ms".into());
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

fn default_ttl() -> Duration {
    Duration::from_secs(5)
}
