//! Metric names and pre-registered handles.
//!
//! Handles are resolved once at start-up so the request path only bumps an
//! atomic: no label hashing, no registry lookup, no allocation.

use std::sync::OnceLock;

pub mod latency;

use fencing::{Protocol, Reason};
use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const WRITES: &str = "fencepost_writes_total";
pub const MARK: &str = "fencepost_high_water_mark";
pub const REQUEST_SECONDS: &str = "fencepost_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "fencepost_upstream_errors_total";
pub const GRANTS: &str = "fencepost_elector_grants_total";
pub const RENEWALS: &str = "fencepost_elector_renewals_total";
pub const EXPIRIES: &str = "fencepost_elector_expiries_total";
pub const RELEASES: &str = "fencepost_elector_releases_total";
pub const ACQUISITION_SECONDS: &str = "fencepost_lease_acquisition_seconds";
pub const TENURE_SECONDS: &str = "fencepost_leadership_tenure_seconds";
pub const RENEWALS_REFUSED: &str = "fencepost_lease_renewals_refused_total";
pub const TRANSITIONS: &str = "fencepost_lease_transitions_total";
pub const LEASES_HELD: &str = "fencepost_leases_held";
pub const AUDIT_WRITTEN: &str = "fencepost_audit_records_written_total";
pub const AUDIT_DROPPED: &str = "fencepost_audit_records_dropped_total";
pub const AUDIT_SPOOLED: &str = "fencepost_audit_records_spooled_total";
pub const CONNECTIONS_OPEN: &str = "fencepost_connections_open";
pub const CONNECTIONS_REJECTED: &str = "fencepost_connections_rejected_total";
pub const REPLICAS_LIVE: &str = "fencepost_replicas_live";
pub const ADVANCE_SECONDS: &str = "fencepost_advance_seconds";
pub const SELF_FENCED: &str = "fencepost_self_fenced_total";
pub const SENT_AFTER_LAPSE: &str = "fencepost_writes_sent_after_lapse_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "fencepost_tls_handshake_failures_total";
pub const TLS_RELOADS: &str = "fencepost_tls_reloads_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder (once per process) and returns the
/// handle `/metrics` renders from. Call it inside the runtime: it also
/// starts the upkeep task.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // A second recorder (tests embedding several servers) is harmless.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // Histogram samples accumulate until upkeep folds them into
            // buckets; rendering does that, but a deployment nobody scrapes
            // would grow by every request's sample forever. Measured: about
            // 25 bytes a request without this task, flat with it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let upkeep = handle.clone();
                rt.spawn(async move {
                    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
                    loop {
                        tick.tick().await;
                        upkeep.run_upkeep();
                    }
                });
            }
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        WRITES,
        "Writes seen by the fencing proxies, by protocol and outcome."
    );
    metrics::describe_gauge!(
        MARK,
        "Current high-water mark (highest admitted token) per resource."
    );
    metrics::describe_counter!(
        UPSTREAM_ERRORS,
        "Requests that failed at or on the way to the upstream."
    );
    metrics::describe_counter!(GRANTS, "Leases granted by the elector (new tokens issued).");
    metrics::describe_counter!(RENEWALS, "Leases renewed by the elector.");
    metrics::describe_counter!(EXPIRIES, "Leases that expired without release.");
    metrics::describe_counter!(RELEASES, "Leases released by their holder.");
    metrics::describe_histogram!(
        ACQUISITION_SECONDS,
        "Granted acquires: from the elector receiving the request to the grant committed."
    );
    metrics::describe_histogram!(
        TENURE_SECONDS,
        "How long a holder led: from its grant to its release or expiry."
    );
    metrics::describe_counter!(
        RENEWALS_REFUSED,
        "Renewals refused because the caller no longer held the lease."
    );
    metrics::describe_counter!(
        TRANSITIONS,
        "Leadership changes (a new token granted), per resource."
    );
    metrics::describe_gauge!(LEASES_HELD, "Leases live now, as this elector knows them.");
    metrics::describe_counter!(AUDIT_WRITTEN, "Audit records written to the store.");
    metrics::describe_counter!(
        AUDIT_DROPPED,
        "Audit records lost: the spool was full (or, for lease records, the queue)."
    );
    metrics::describe_counter!(
        AUDIT_SPOOLED,
        "Audit records written to the local spool while the store was slow or down."
    );
    metrics::describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections currently open, by protocol and listener."
    );
    metrics::describe_counter!(
        CONNECTIONS_REJECTED,
        "Client connections refused because the listener was at max_connections."
    );
    metrics::describe_gauge!(
        REPLICAS_LIVE,
        "Replicas of the fencing tier whose lease is live, at this replica's last renewal."
    );
    metrics::describe_histogram!(
        ADVANCE_SECONDS,
        "From claiming a newer token to admitting its first write: the store, the tier's acknowledgements and the drain."
    );
    metrics::describe_counter!(
        SELF_FENCED,
        "Times this replica stopped admitting writes because the store had not confirmed its lease in time."
    );
    metrics::describe_counter!(
        SENT_AFTER_LAPSE,
        "Admitted writes whose bytes left for the upstream after this replica's lease had lapsed (the process was held between its last look and the write)."
    );
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Connections to a TLS listener that ended before their handshake did: timeout, error (bad hello, refused or missing client certificate, the client left) or plaintext."
    );
    metrics::describe_counter!(
        TLS_RELOADS,
        "Certificate reloads of a TLS listener (SIGHUP or a file change): ok, or error (the previous certificate stays)."
    );
}

/// Per-protocol write counters, resolved once.
#[derive(Clone)]
pub struct WriteCounters {
    accepted: Counter,
    refused: [Counter; 5],
    /// Request latency (kept apart from the exporter: [`latency`]).
    pub latency: &'static latency::Latency,
    pub upstream_errors: Counter,
}

impl WriteCounters {
    pub fn new(protocol: Protocol) -> Self {
        let p = protocol.as_str();
        WriteCounters {
            accepted: metrics::counter!(WRITES, "protocol" => p, "outcome" => "accepted"),
            refused: Reason::ALL
                .map(|r| metrics::counter!(WRITES, "protocol" => p, "outcome" => r.as_str())),
            latency: latency::of(protocol),
            upstream_errors: metrics::counter!(UPSTREAM_ERRORS, "protocol" => p),
        }
    }

    pub fn accepted(&self) {
        self.accepted.increment(1);
    }

    pub fn refused(&self, reason: Reason) {
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.refused[i].increment(1);
    }
}
