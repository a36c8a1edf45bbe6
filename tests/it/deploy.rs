//! `deploy/` kept true: the alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), the dashboard's queries are
//! valid PromQL, and every metric name the dashboard and the rules use is
//! one a real `fencepost serve` exports, read from its `/metrics` after
//! causing the events that make each one appear, and documented in
//! docs/metrics.md.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::support::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the package sits in the workspace")
        .to_path_buf()
}

/// Runs promtool; its absence is a failure (`.ci/deps` installs it).
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool not found ({e}): install Debian's prometheus package (.ci/deps does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// `fencepost_*` names in a query or rule text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("fencepost_") {
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/fencepost.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every PromQL text of the dashboard: panel targets (rows included) and
/// template variable queries.
fn dashboard_queries(d: &Value) -> Vec<String> {
    fn panels(v: &Value, out: &mut Vec<String>) {
        for p in v.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_owned());
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&d["panels"], &mut out);
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    let dir = root().join("deploy/prometheus");
    let out = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
    let out = promtool(&["test", "rules", "alerts_test.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    // One unit test (firing and quiet) for every alert.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 6);
    for a in alerts {
        let cases: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|c| c.starts_with(a))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{a}: no case where it stays quiet"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels")),
            "{a}: no case where it fires"
        );
    }
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let d = dashboard();
    assert_eq!(d["uid"], "fencepost-overview");
    let queries = dashboard_queries(&d);
    assert!(queries.len() > 20, "{queries:?}");
    // promtool checks PromQL in rule files: each query becomes a recording
    // rule, with Grafana's variables replaced by what they expand to.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = if let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
        {
            // label_values(<selector>, label): the selector is the query.
            inner
                .rsplit_once(',')
                .map_or(inner, |(sel, _)| sel)
                .to_owned()
        } else {
            q.clone()
        };
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$__range", "6h")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&q).unwrap()
        ));
    }
    let dir = TempDir::new("fp-dashboard-promql");
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let out = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}

async fn lease(el: &str, action: &str, body: Value) -> Resp {
    send(
        client()
            .post(format!("{el}/v1/leases/jobs/{action}"))
            .json(&body),
    )
    .await
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_use_is_exported_and_documented() {
    let db = TestDb::create("fp_deploy").await;
    let dir = TempDir::new("fp-deploy");
    let up = Upstream::start().await;
    let mut conf = Conf::store(db.url.clone());
    let admin = conf.admin(Section::new());
    let el = conf.elector(Section::new().set("min_ttl", "50ms"));
    let http = conf.http(Section::to(format!("http://{}", up.addr)));
    // A real process over a Postgres store: a replica of a tier, with an
    // elector and an HTTP proxy.
    let _server = Server::run(dir.path(), conf).await;
    let el = format!("http://{el}");

    // The events after which the rest of the metrics appear: an advance
    // and a stale refusal; a grant, a renewal, a refused renewal, a
    // release; a grant that expires.
    let url = format!("http://{http}/kv/x");
    let ok = eventually(20, || async {
        (put(&url, Some("10"), Some("r"), "new").await.0 == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "token 10 never admitted");
    assert_eq!(put(&url, Some("3"), Some("r"), "old").await.0, 409);
    let a = lease(&el, "acquire", json!({"holder": "a", "ttl_ms": 10_000})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let token = a.body["token"].as_str().unwrap().to_owned();
    let renewed = lease(&el, "renew", json!({"holder": "a", "token": token})).await;
    assert_eq!(renewed.status, 200, "{}", renewed.text);
    let refused = lease(&el, "renew", json!({"holder": "b", "token": token})).await;
    assert_eq!(refused.status, 409, "{}", refused.text);
    let released = lease(&el, "release", json!({"holder": "a", "token": token})).await;
    assert_eq!(released.status, 204, "{}", released.text);
    let b = lease(&el, "acquire", json!({"holder": "b", "ttl_ms": 200})).await;
    assert_eq!(b.status, 200, "{}", b.text);

    let scrape = eventually(20, || async {
        let (_, m) = get(&format!("http://{admin}/metrics"), None).await;
        m.contains("fencepost_elector_expiries_total").then_some(m)
    })
    .await
    .expect("the short lease's expiry counted");
    let mut exported = BTreeSet::new();
    for line in scrape.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }

    let mut used = BTreeSet::new();
    for q in dashboard_queries(&dashboard()) {
        used.extend(metric_names(&q));
    }
    let dashboard_names = used.len();
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    used.extend(metric_names(&rules));
    assert!(dashboard_names >= 15, "{used:?}");
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used in deploy/ but not exported by a real serve: {missing:?}\n{scrape}"
    );
    let documented = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    for name in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
            .unwrap_or(name);
        assert!(
            documented.contains(&format!("`{base}`")),
            "{base} is not in docs/metrics.md"
        );
    }
}
