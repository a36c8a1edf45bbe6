//! The audit log beyond refused writes: every leadership change the
//! elector decides (grant, denial, release, expiry, refused renewal, and
//! renewals when asked for) is a record of its own `kind`, with holder,
//! tokens and client address, filtered by kind in `/v1/audit` and in
//! `fencepost audit`. And guarantee 5's durability: every refusal that
//! was answered has its record after a kill -9, with the store up (in the
//! store) and down (in the spool, shipped by the restarted process).
//! And the election metrics: acquisition latency, tenure, renewals
//! refused, transitions, leases held.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

/// An elector and an admin API on a SQLite store in this process, audit
/// batches written within 20 ms; `[elector]` shaped by `extra`.
async fn elector_with_admin(
    dir: &TempDir,
    extra: impl FnOnce(Section) -> Section,
) -> (InProc, String, String) {
    let mut conf = Conf::sqlite(dir.path());
    conf.set("audit", "flush_interval", "20ms");
    let el: SocketAddr = conf.elector(extra(Section::new().set("min_ttl", "50ms")));
    let admin = conf.admin(Section::new());
    let server = InProc::start(conf).await;
    (server, format!("http://{el}"), format!("http://{admin}"))
}

async fn lease(base: &str, resource: &str, action: &str, body: Value) -> Resp {
    send(
        client()
            .post(format!("{base}/v1/leases/{resource}/{action}"))
            .json(&body),
    )
    .await
}

/// The token of a grant, as the holder would present it.
fn granted(r: &Resp) -> String {
    assert_eq!(r.status, 200, "expected a grant: {}", r.text);
    r.body["token"].as_str().expect("token").to_owned()
}

/// Exactly `n` records from `/v1/audit?{query}`, waiting for the batch.
async fn audit(admin: &str, query: &str, n: usize) -> Vec<Value> {
    let url = format!("{admin}/v1/audit?{query}");
    let got = eventually(10, || async {
        let (_, body) = get(&url, None).await;
        let v: Vec<Value> = serde_json::from_str(&body).ok()?;
        (v.len() == n).then_some(v)
    })
    .await;
    match got {
        Some(v) => v,
        None => panic!(
            "{query}: wanted {n} records, last answer {:?}",
            get(&url, None).await
        ),
    }
}

#[tokio::test]
async fn every_leadership_change_is_audited_with_its_kind() {
    let dir = TempDir::new("fp-audit-lease");
    let (_server, el, admin) = elector_with_admin(&dir, |s| s).await;
    let r = "jobs/main";

    let a1 = granted(
        &lease(
            &el,
            r,
            "acquire",
            json!({"holder": "node-a", "ttl_ms": 10_000}),
        )
        .await,
    );
    let denied = lease(&el, r, "acquire", json!({"holder": "node-b"})).await;
    assert_eq!(denied.status, 409, "{}", denied.text);
    let refused = lease(&el, r, "renew", json!({"holder": "node-b", "token": a1})).await;
    assert_eq!(refused.status, 409, "{}", refused.text);
    // A successful renewal is not audited by default.
    assert_eq!(
        lease(&el, r, "renew", json!({"holder": "node-a", "token": a1}))
            .await
            .status,
        200
    );
    assert_eq!(
        lease(&el, r, "release", json!({"holder": "node-a", "token": a1}))
            .await
            .status,
        204
    );
    // node-b's short lease runs out unrenewed, then node-a takes over.
    let b = granted(
        &lease(
            &el,
            r,
            "acquire",
            json!({"holder": "node-b", "ttl_ms": 200}),
        )
        .await,
    );
    audit(&admin, &format!("resource={r}&kind=lease_expired"), 1).await;
    let a2 = granted(
        &lease(
            &el,
            r,
            "acquire",
            json!({"holder": "node-a", "ttl_ms": 10_000}),
        )
        .await,
    );

    let all = audit(&admin, &format!("resource={r}&limit=100"), 7).await;
    let seen: Vec<(&str, &str, &str)> = all
        .iter()
        .rev()
        .map(|v| {
            (
                v["kind"].as_str().unwrap(),
                v["holder"].as_str().unwrap(),
                v["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("lease_granted", "node-a", "free"),
            ("lease_denied", "node-b", "held"),
            ("renewal_refused", "node-b", "not_holder"),
            ("lease_released", "node-a", "released"),
            ("lease_granted", "node-b", "free"),
            ("lease_expired", "node-b", "ttl"),
            ("lease_granted", "node-a", "takeover"),
        ],
        "oldest first: {all:#?}"
    );
    for v in &all {
        assert_eq!(v["protocol"], "elector", "{v}");
        assert_eq!(v["resource"], r, "{v}");
        let client = v["client_addr"].as_str().unwrap();
        if v["kind"] == "lease_expired" {
            assert_eq!(client, "", "an expiry has no client: {v}");
        } else {
            assert!(client.starts_with("127.0.0.1:"), "{v}");
        }
    }
    let token = |t: &str| token_value(t);
    // Newest first: the takeover names its token and the expired holder.
    assert_eq!(all[0]["current_token"], token(&a2));
    assert!(
        all[0]["detail"].as_str().unwrap().contains("node-b"),
        "{}",
        all[0]
    );
    assert_eq!(all[1]["current_token"], token(&b));
    assert_eq!(
        all[4]["presented_token"],
        token(&a1),
        "the refused renewal's token"
    );
    assert_eq!(all[4]["current_token"], token(&a1));

    // The kind filter, over the API and the CLI, and refused writes apart.
    assert_eq!(audit(&admin, "kind=lease_granted", 3).await.len(), 3);
    audit(&admin, "kind=refused_write", 0).await;
    let (status, body) = get(&format!("{admin}/v1/audit?kind=bogus"), None).await;
    assert_eq!(status, 400, "{body}");
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--admin",
            &admin,
            "--resource",
            r,
            "--kind",
            "lease_denied",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["holder"], "node-b");
    let (code, out, _) = run_cli(&["audit", "--admin", &admin, "--kind", "all"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("renewal_refused") && out.contains("HOLDER"),
        "{out}"
    );
    let (code, out, _) = run_cli(&["audit", "--admin", &admin], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "no audit records"),
        "refused writes by default"
    );
    let (code, _, err) = run_cli(&["audit", "--admin", &admin, "--kind", "nope"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--kind"), "{err}");
}

#[tokio::test]
async fn renewals_are_audited_when_asked_for() {
    let dir = TempDir::new("fp-audit-renew");
    let (_server, el, admin) = elector_with_admin(&dir, |s| s.set("audit_renewals", true)).await;
    let t = granted(&lease(&el, "r1", "acquire", json!({"holder": "h", "ttl_ms": 5000})).await);
    for _ in 0..3 {
        assert_eq!(
            lease(&el, "r1", "renew", json!({"holder": "h", "token": t}))
                .await
                .status,
            200
        );
    }
    let renewed = audit(&admin, "kind=lease_renewed", 3).await;
    assert!(renewed
        .iter()
        .all(|v| v["holder"] == "h" && v["reason"] == "renewed"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    audit(&admin, "kind=lease_renewed", 3).await;
}

/// `n` stale writes (token 3 under mark 10) on `resource` through the proxy
/// at `http`, eight clients at once; every one must be answered 409.
async fn stale_flood(http: SocketAddr, resource: &str, n: usize) {
    let url = format!("http://{http}/kv/flood");
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, next, resource) = (url.clone(), next.clone(), resource.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = client();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let r = send(
                    c.put(&url)
                        .header("Fencing-Token", "3")
                        .header("Fencing-Resource", resource.as_str())
                        .body("stale"),
                )
                .await;
                assert_eq!(r.status, 409, "{}", r.text);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A proxy in front of a test upstream over `store`, as a real process,
/// with the mark of `resource` at 10.
async fn proxy_at_ten(
    dir: &TempDir,
    store: &str,
    resource: &str,
) -> (Server, SocketAddr, SocketAddr, Upstream) {
    let up = Upstream::start().await;
    let mut conf = Conf::store(store);
    conf.set("fencing", "store_timeout", "1s");
    let admin = conf.admin(Section::new());
    let http = conf.http(Section::to(format!("http://{}", up.addr)));
    let server = Server::run(dir.path(), conf).await;
    let ok = eventually(20, || async {
        (put(
            &format!("http://{http}/kv/flood"),
            Some("10"),
            Some(resource),
            "new",
        )
        .await
        .0 == 200)
            .then_some(())
    })
    .await;
    assert!(ok.is_some(), "token 10 never admitted");
    (server, admin, http, up)
}

#[tokio::test]
async fn answered_refusals_survive_kill_9_with_the_store_up() {
    const N: usize = 50;
    let dir = TempDir::new("fp-audit-kill");
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let (mut server, _admin, http, _up) = proxy_at_ten(&dir, &store, "k9").await;
    stale_flood(http, "k9", N).await;
    server.kill9();
    // Straight from the store: no restart, no flush, nothing in memory.
    let cfg = server.config.to_string_lossy().into_owned();
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--config",
            &cfg,
            "--resource",
            "k9",
            "--limit",
            "1000",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let stale = out.lines().filter(|l| l.contains("\"stale\"")).count();
    assert_eq!(
        stale, N,
        "every answered refusal's record is in the store:\n{out}"
    );
}

#[tokio::test]
async fn answered_refusals_survive_kill_9_with_the_store_down() {
    const N: usize = 50;
    let db = TestDb::create("fp_audit_spool").await;
    let pg: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let shim = Shim::start(pg).await;
    let store = db.url.replace("127.0.0.1:5432", &shim.addr.to_string());
    let dir = TempDir::new("fp-audit-spool");
    let (mut server, admin, http, _up) = proxy_at_ten(&dir, &store, "sp").await;
    shim.cut();
    // Fenced from memory, audited into the local spool.
    stale_flood(http, "sp", N).await;
    server.kill9();
    let spooled: usize = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
        .sum();
    assert_eq!(spooled, N, "the spool holds every answered refusal");
    shim.restore();
    server.restart();
    server.wait_ready().await;
    let url = format!("http://{admin}/v1/audit?kind=refused_write&resource=sp&limit=1000");
    let shipped = eventually(30, || async {
        let (_, b) = get(&url, None).await;
        let v: Vec<Value> = serde_json::from_str(&b).ok()?;
        (v.len() >= N).then_some(v.len())
    })
    .await;
    assert_eq!(shipped, Some(N), "the restarted server shipped the spool");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, b) = get(&url, None).await;
    let v: Vec<Value> = serde_json::from_str(&b).unwrap();
    assert_eq!(v.len(), N, "shipped once");
    assert!(v.iter().all(|r| r["reason"] == "stale"));
}

#[tokio::test]
async fn election_metrics_count_what_happened() {
    let dir = TempDir::new("fp-election-metrics");
    let mut conf = Conf::sqlite(dir.path());
    let el = conf.elector(Section::new().set("min_ttl", "50ms"));
    let admin = conf.admin(Section::new());
    // A process of its own: /metrics is per process.
    let _server = Server::run(dir.path(), conf).await;
    let (el, admin) = (format!("http://{el}"), format!("http://{admin}"));
    let scrape = || async { get(&format!("{admin}/metrics"), None).await.1 };

    let m = scrape().await;
    assert_eq!(
        metric(&m, "fencepost_lease_renewals_refused_total"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(metric(&m, "fencepost_leases_held"), Some(0.0), "{m}");

    let a = granted(
        &lease(
            &el,
            "m",
            "acquire",
            json!({"holder": "a", "ttl_ms": 10_000}),
        )
        .await,
    );
    assert_eq!(
        lease(&el, "m", "acquire", json!({"holder": "b"}))
            .await
            .status,
        409
    );
    assert_eq!(
        lease(&el, "m", "renew", json!({"holder": "b", "token": a}))
            .await
            .status,
        409
    );
    let m = scrape().await;
    assert_eq!(metric(&m, "fencepost_leases_held"), Some(1.0), "{m}");
    assert_eq!(
        metric(&m, "fencepost_lease_renewals_refused_total"),
        Some(1.0)
    );
    assert_eq!(
        lease(&el, "m", "release", json!({"holder": "a", "token": a}))
            .await
            .status,
        204
    );
    granted(&lease(&el, "m", "acquire", json!({"holder": "b", "ttl_ms": 200})).await);
    let m = eventually(10, || async {
        let m = scrape().await;
        (metric(&m, "fencepost_leadership_tenure_seconds_count") == Some(2.0)).then_some(m)
    })
    .await
    .expect("the release and the expiry observed as tenures");
    assert_eq!(metric(&m, "fencepost_leases_held"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "fencepost_lease_transitions_total{resource=\"m\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "fencepost_lease_acquisition_seconds_count"),
        Some(2.0),
        "{m}"
    );
    let tenure = metric(&m, "fencepost_leadership_tenure_seconds_sum").unwrap();
    assert!(
        (0.2..10.0).contains(&tenure),
        "a's term plus b's 200 ms: {tenure}"
    );
}
