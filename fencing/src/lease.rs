//! The elector's lease state machine.
//!
//! [`decide`] is a pure function from (stored lease, operation, now) to
//! (outcome, lease to store). The elector runs it inside one store
//! transaction per operation, with the row locked, so concurrent candidates
//! serialize on the store and exactly one wins, and a token is durable
//! before anyone sees it (guarantee 6). Time is always the elector's clock,
//! passed in as `now_ms`; a client's idea of time never enters.

use serde::{Deserialize, Serialize};

/// A resource's lease row. The row outlives its holders: `token` is the
/// last token ever issued for the resource and never goes down, which is
/// what keeps re-grants after expiry or release strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub resource: String,
    /// Current holder, if the lease is held (it may have expired by now).
    pub holder: Option<String>,
    pub token: u64,
    pub granted_at_ms: i64,
    pub expires_at_ms: i64,
    pub ttl_ms: i64,
    /// No new grant before this instant (lock delay after an expiry).
    pub free_after_ms: i64,
}

impl LeaseRecord {
    /// The live holder at `now_ms`, if any.
    pub fn live_holder(&self, now_ms: i64) -> Option<&str> {
        match &self.holder {
            Some(h) if now_ms < self.expires_at_ms => Some(h),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOp {
    Acquire {
        holder: String,
        ttl_ms: i64,
    },
    Renew {
        holder: String,
        token: u64,
        ttl_ms: Option<i64>,
    },
    Release {
        holder: String,
        token: u64,
    },
}

impl LeaseOp {
    pub fn holder(&self) -> &str {
        match self {
            LeaseOp::Acquire { holder, .. }
            | LeaseOp::Renew { holder, .. }
            | LeaseOp::Release { holder, .. } => holder,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    pub min_ttl_ms: i64,
    pub max_ttl_ms: i64,
    /// After a lease expires (not after a release), no new grant for this
    /// long: a holder that was merely slow gets time to notice it lost the
    /// lease before someone else starts writing, as in Chubby and Consul.
    pub lock_delay_ms: i64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            min_ttl_ms: 100,
            max_ttl_ms: 24 * 3600 * 1000,
            lock_delay_ms: 0,
        }
    }
}

/// What happened. Success variants carry the stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// A new token was issued. `previous` is the holder whose lease this
    /// replaced after it expired, if any.
    Granted {
        lease: LeaseRecord,
        previous: Option<(String, u64)>,
    },
    /// The live holder asked again: same token, fresh expiry.
    Reacquired {
        lease: LeaseRecord,
    },
    Renewed {
        lease: LeaseRecord,
    },
    Released {
        lease: LeaseRecord,
    },
    /// Another holder's lease is live.
    Held {
        lease: LeaseRecord,
    },
    /// Free, but inside the lock delay after an expiry.
    LockDelay {
        until_ms: i64,
        lease: LeaseRecord,
    },
    /// Renew or release by someone who does not hold this token's lease.
    NotHolder {
        lease: Option<LeaseRecord>,
    },
    /// Every token has been issued for this resource.
    Exhausted,
    /// The request itself is out of bounds.
    BadTtl {
        ttl_ms: i64,
        min_ms: i64,
        max_ms: i64,
    },
}

impl LeaseOutcome {
    /// The record to write back, if the operation changed it.
    pub fn to_store(&self) -> Option<&LeaseRecord> {
        match self {
            LeaseOutcome::Granted { lease, .. }
            | LeaseOutcome::Reacquired { lease }
            | LeaseOutcome::Renewed { lease }
            | LeaseOutcome::Released { lease } => Some(lease),
            _ => None,
        }
    }
}

fn check_ttl(ttl_ms: i64, cfg: &LeaseConfig) -> Result<(), LeaseOutcome> {
    if ttl_ms < cfg.min_ttl_ms || ttl_ms > cfg.max_ttl_ms {
        return Err(LeaseOutcome::BadTtl {
            ttl_ms,
            min_ms: cfg.min_ttl_ms,
            max_ms: cfg.max_ttl_ms,
        });
    }
    Ok(())
}

/// Applies `op` to the stored lease of `resource` at `now_ms`.
pub fn decide(
    resource: &str,
    stored: Option<&LeaseRecord>,
    op: &LeaseOp,
    now_ms: i64,
    cfg: &LeaseConfig,
) -> LeaseOutcome {
    match op {
        LeaseOp::Acquire { holder, ttl_ms } => {
            if let Err(bad) = check_ttl(*ttl_ms, cfg) {
                return bad;
            }
            let expires_at_ms = now_ms.saturating_add(*ttl_ms);
            match stored {
                Some(cur) => match cur.live_holder(now_ms) {
                    Some(h) if h == holder => LeaseOutcome::Reacquired {
                        lease: LeaseRecord {
                            expires_at_ms,
                            ttl_ms: *ttl_ms,
                            ..cur.clone()
                        },
                    },
                    Some(_) => LeaseOutcome::Held { lease: cur.clone() },
                    None => {
                        // Expired without release: the lock delay starts at expiry.
                        let free_after = if cur.holder.is_some() {
                            cur.free_after_ms
                                .max(cur.expires_at_ms.saturating_add(cfg.lock_delay_ms))
                        } else {
                            cur.free_after_ms
                        };
                        if now_ms < free_after {
                            return LeaseOutcome::LockDelay {
                                until_ms: free_after,
                                lease: cur.clone(),
                            };
                        }
                        let Some(token) = cur.token.checked_add(1) else {
                            return LeaseOutcome::Exhausted;
                        };
                        let previous = cur.holder.clone().map(|h| (h, cur.token));
                        LeaseOutcome::Granted {
                            lease: LeaseRecord {
                                resource: resource.to_owned(),
                                holder: Some(holder.clone()),
                                token,
                                granted_at_ms: now_ms,
                                expires_at_ms,
                                ttl_ms: *ttl_ms,
                                free_after_ms: 0,
                            },
                            previous,
                        }
                    }
                },
                None => LeaseOutcome::Granted {
                    lease: LeaseRecord {
                        resource: resource.to_owned(),
                        holder: Some(holder.clone()),
                        token: 1,
                        granted_at_ms: now_ms,
                        expires_at_ms,
                        ttl_ms: *ttl_ms,
                        free_after_ms: 0,
                    },
                    previous: None,
                },
            }
        }
        LeaseOp::Renew {
            holder,
            token,
            ttl_ms,
        } => {
            let Some(cur) = stored
                .filter(|c| c.live_holder(now_ms) == Some(holder.as_str()) && c.token == *token)
            else {
                return LeaseOutcome::NotHolder {
                    lease: stored.cloned(),
                };
            };
            let ttl = ttl_ms.unwrap_or(cur.ttl_ms);
            if let Err(bad) = check_ttl(ttl, cfg) {
                return bad;
            }
            LeaseOutcome::Renewed {
                lease: LeaseRecord {
                    expires_at_ms: now_ms.saturating_add(ttl),
                    ttl_ms: ttl,
                    ..cur.clone()
                },
            }
        }
        LeaseOp::Release { holder, token } => {
            // Releasing an expired lease one still names is allowed and
            // harmless; releasing someone else's is not.
            let Some(cur) = stored
                .filter(|c| c.holder.as_deref() == Some(holder.as_str()) && c.token == *token)
            else {
                return LeaseOutcome::NotHolder {
                    lease: stored.cloned(),
                };
            };
            LeaseOutcome::Released {
                lease: LeaseRecord {
                    holder: None,
                    expires_at_ms: now_ms.min(cur.expires_at_ms),
                    free_after_ms: 0,
                    ..cur.clone()
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: LeaseConfig = LeaseConfig {
        min_ttl_ms: 10,
        max_ttl_ms: 10_000,
        lock_delay_ms: 0,
    };

    fn acquire(h: &str, ttl: i64) -> LeaseOp {
        LeaseOp::Acquire {
            holder: h.into(),
            ttl_ms: ttl,
        }
    }

    fn apply(
        stored: &mut Option<LeaseRecord>,
        op: &LeaseOp,
        now: i64,
        cfg: &LeaseConfig,
    ) -> LeaseOutcome {
        let out = decide("r", stored.as_ref(), op, now, cfg);
        if let Some(rec) = out.to_store() {
            *stored = Some(rec.clone());
        }
        out
    }

    #[test]
    fn grant_hold_expire_regrant() {
        let mut s = None;
        let LeaseOutcome::Granted { lease: a, .. } = apply(&mut s, &acquire("a", 100), 0, &CFG)
        else {
            panic!()
        };
        assert_eq!(a.token, 1);
        assert!(matches!(
            apply(&mut s, &acquire("b", 100), 50, &CFG),
            LeaseOutcome::Held { .. }
        ));
        let LeaseOutcome::Reacquired { lease } = apply(&mut s, &acquire("a", 100), 60, &CFG) else {
            panic!()
        };
        assert_eq!(lease.token, 1);
        let LeaseOutcome::Granted { lease: b, previous } =
            apply(&mut s, &acquire("b", 100), 160, &CFG)
        else {
            panic!()
        };
        assert_eq!(b.token, 2);
        assert_eq!(previous, Some(("a".into(), 1)));
        let renew = LeaseOp::Renew {
            holder: "a".into(),
            token: 1,
            ttl_ms: None,
        };
        assert!(matches!(
            apply(&mut s, &renew, 170, &CFG),
            LeaseOutcome::NotHolder { .. }
        ));
    }

    #[test]
    fn lock_delay_applies_after_expiry_not_release() {
        let cfg = LeaseConfig {
            lock_delay_ms: 500,
            ..CFG
        };
        let mut s = None;
        apply(&mut s, &acquire("a", 100), 0, &cfg);
        let out = apply(&mut s, &acquire("b", 100), 200, &cfg);
        assert!(
            matches!(out, LeaseOutcome::LockDelay { until_ms: 600, .. }),
            "{out:?}"
        );
        assert!(matches!(
            apply(&mut s, &acquire("b", 100), 600, &cfg),
            LeaseOutcome::Granted { .. }
        ));
        let rel = LeaseOp::Release {
            holder: "b".into(),
            token: 2,
        };
        assert!(matches!(
            apply(&mut s, &rel, 610, &cfg),
            LeaseOutcome::Released { .. }
        ));
        assert!(matches!(
            apply(&mut s, &acquire("c", 100), 611, &cfg),
            LeaseOutcome::Granted { .. }
        ));
    }

    #[test]
    fn bad_ttls_are_refused() {
        let mut s = None;
        for ttl in [0, -1, 9, 10_001, i64::MAX] {
            assert!(matches!(
                apply(&mut s, &acquire("a", ttl), 0, &CFG),
                LeaseOutcome::BadTtl { .. }
            ));
        }
        assert!(s.is_none());
    }

    #[test]
    fn tokens_exhaust_instead_of_wrapping() {
        let mut s = Some(LeaseRecord {
            resource: "r".into(),
            holder: None,
            token: u64::MAX,
            granted_at_ms: 0,
            expires_at_ms: 0,
            ttl_ms: 10,
            free_after_ms: 0,
        });
        assert_eq!(
            apply(&mut s, &acquire("a", 100), 1, &CFG),
            LeaseOutcome::Exhausted
        );
    }

    fn op_strategy() -> impl Strategy<Value = LeaseOp> {
        let holder = prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(String::from);
        prop_oneof![
            (holder.clone(), 0i64..300)
                .prop_map(|(holder, ttl_ms)| LeaseOp::Acquire { holder, ttl_ms }),
            (holder.clone(), 0u64..6, proptest::option::of(0i64..300)).prop_map(
                |(holder, token, ttl_ms)| LeaseOp::Renew {
                    holder,
                    token,
                    ttl_ms
                }
            ),
            (holder, 0u64..6).prop_map(|(holder, token)| LeaseOp::Release { holder, token }),
        ]
    }

    proptest! {
        /// Whatever the sequence: tokens never repeat or go down, at most one
        /// live holder exists, and a grant only happens when nobody else holds
        /// a live lease.
        #[test]
        fn tokens_strictly_increase_and_one_holder(
            steps in proptest::collection::vec((op_strategy(), 0i64..80), 1..200),
            delay in 0i64..200,
        ) {
            let cfg = LeaseConfig { lock_delay_ms: delay, ..CFG };
            let mut s: Option<LeaseRecord> = None;
            let mut now = 0;
            let mut issued: Vec<u64> = vec![];
            for (op, dt) in steps {
                now += dt;
                let before = s.clone();
                let out = apply(&mut s, &op, now, &cfg);
                if let LeaseOutcome::Granted { lease, .. } = &out {
                    if let Some(b) = &before {
                        prop_assert!(b.live_holder(now).is_none(), "granted over a live lease");
                    }
                    prop_assert!(issued.last().is_none_or(|&l| lease.token > l));
                    issued.push(lease.token);
                }
                if let (Some(b), Some(a)) = (&before, &s) {
                    prop_assert!(a.token >= b.token, "last token went down");
                }
            }
        }
    }
}
