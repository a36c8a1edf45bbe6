//! `fencepost_request_duration_seconds`: the proxies' request latency,
//! kept in fixed buckets of our own and rendered beside the exporter's
//! metrics, not in the exporter.
//!
//! Why our own: both data paths record one sample per request (an HTTP
//! request, a Postgres statement's answer). Through the Prometheus
//! exporter a sample is pushed whole into a lock-free block list that an
//! upkeep task folds into buckets later, behind a generation counter for
//! idle tracking and a clock read. Here a sample is a search of 17 bounds
//! and two relaxed atomic additions, and nothing is kept per sample, so
//! nothing needs upkeep: booking a statement's answers went from 1,590 to
//! 1,459 instructions (callgrind, pgbench TPC-B-like `-M simple`, one
//! client; BENCHMARKS.md). The exposition is the same
//! histogram: the exporter's buckets, cumulative counts, `_sum` and
//! `_count`, one series per protocol.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fencing::Protocol;

use super::REQUEST_SECONDS;

/// Upper bounds of the buckets, in nanoseconds (50 us to 10 s), as the
/// exporter's `set_buckets` had them in seconds; one more bucket holds
/// the rest (`+Inf`).
const BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const HELP: &str = "Time from request to response through the proxy.";

/// One protocol's request latencies.
pub struct Latency {
    protocol: Protocol,
    /// A proxy of this protocol exists: its series is rendered, zeros and
    /// all, as the exporter rendered a registered histogram.
    used: AtomicBool,
    /// Samples per bucket (not cumulative), the last one past every bound.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    const fn new(protocol: Protocol) -> Latency {
        Latency {
            protocol,
            used: AtomicBool::new(false),
            buckets: [const { AtomicU64::new(0) }; BOUNDS_NS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one request that took `took`.
    pub fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Appends this protocol's series (buckets, sum, count) to `out`.
    fn render(&self, out: &mut String) {
        let p = self.protocol.as_str();
        let mut count = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            count += b.load(Ordering::Relaxed);
            let _ = match BOUNDS_NS.get(i) {
                Some(&ns) => writeln!(
                    out,
                    "{REQUEST_SECONDS}_bucket{{protocol=\"{p}\",le=\"{}\"}} {count}",
                    ns as f64 / 1e9
                ),
                None => writeln!(
                    out,
                    "{REQUEST_SECONDS}_bucket{{protocol=\"{p}\",le=\"+Inf\"}} {count}"
                ),
            };
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{REQUEST_SECONDS}_sum{{protocol=\"{p}\"}} {sum}");
        let _ = writeln!(out, "{REQUEST_SECONDS}_count{{protocol=\"{p}\"}} {count}");
    }
}

static HTTP: Latency = Latency::new(Protocol::Http);
static POSTGRES: Latency = Latency::new(Protocol::Postgres);
static ELECTOR: Latency = Latency::new(Protocol::Elector);

/// The process's latency histogram for `protocol`, its series rendered
/// from now on.
pub fn of(protocol: Protocol) -> &'static Latency {
    let l = match protocol {
        Protocol::Http => &HTTP,
        Protocol::Postgres => &POSTGRES,
        Protocol::Elector => &ELECTOR,
    };
    l.used.store(true, Ordering::Relaxed);
    l
}

/// Appends the histogram family (help, type, a series per protocol in
/// use) to a Prometheus text exposition; nothing when no proxy exists.
pub fn render(out: &mut String) {
    let used: Vec<&Latency> = [&HTTP, &POSTGRES, &ELECTOR]
        .into_iter()
        .filter(|l| l.used.load(Ordering::Relaxed))
        .collect();
    if used.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(out, "# HELP {REQUEST_SECONDS} {HELP}");
    let _ = writeln!(out, "# TYPE {REQUEST_SECONDS} histogram");
    for l in used {
        l.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket_line(text: &str, le: &str) -> u64 {
        let prefix = format!("{REQUEST_SECONDS}_bucket{{protocol=\"elector\",le=\"{le}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no bucket le={le} in:\n{text}"))
    }

    #[test]
    fn samples_land_in_cumulative_buckets_with_sum_and_count() {
        // The elector records no latency anywhere else, so this test owns
        // its series.
        let l = of(Protocol::Elector);
        l.record(Duration::from_micros(50)); // on the first bound: its bucket
        l.record(Duration::from_micros(51));
        l.record(Duration::from_millis(3));
        l.record(Duration::from_secs(11)); // past every bound
        let mut text = String::from("# some exporter output");
        render(&mut text);
        assert!(text.contains(&format!("\n# TYPE {REQUEST_SECONDS} histogram\n")));
        assert_eq!(bucket_line(&text, "0.00005"), 1);
        assert_eq!(bucket_line(&text, "0.0001"), 2);
        assert_eq!(bucket_line(&text, "0.0025"), 2);
        assert_eq!(bucket_line(&text, "0.005"), 3);
        assert_eq!(bucket_line(&text, "10"), 3);
        assert_eq!(bucket_line(&text, "+Inf"), 4);
        assert!(text.contains(&format!(
            "{REQUEST_SECONDS}_count{{protocol=\"elector\"}} 4\n"
        )));
        let sum: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{REQUEST_SECONDS}_sum{{protocol=\"elector\"}} "))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!((sum - 11.003_101).abs() < 1e-9, "sum {sum}");
    }
}
