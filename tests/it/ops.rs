//! Operability through the real binary: the audit log's flush on graceful
//! shutdown and its drop counter, the admin API and its bearer token,
//! metrics, readiness, the `audit`, `keygen` and `migrate` commands, config
//! errors, JSON logs, and failing closed (then recovering) while the store
//! is away.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// An admin API (shaped by `admin`) and an HTTP proxy in front of
/// `upstream`, over `store`, with a 1 s store timeout; returns the config
/// with the admin API's and the proxy's addresses.
fn config(
    store: &str,
    admin: impl FnOnce(Section) -> Section,
    upstream: std::net::SocketAddr,
) -> (Conf, std::net::SocketAddr, std::net::SocketAddr) {
    let mut conf = Conf::store(store);
    conf.set("fencing", "store_timeout", "1s");
    let admin = conf.admin(admin(Section::new()));
    let http = conf.http(Section::to(format!("http://{upstream}")));
    (conf, admin, http)
}

#[tokio::test]
async fn audit_records_are_flushed_on_graceful_shutdown() {
    let dir = TempDir::new("fp-flush");
    let up = Upstream::start().await;
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let (mut conf, _admin, http) = config(&store, |a| a, up.addr);
    // Nothing would be written before shutdown but for the flush: the
    // interval is an hour and the batch larger than the test.
    conf.set("audit", "flush_interval", "1h")
        .set("audit", "batch_size", 100000);
    let mut server = Server::run(dir.path(), conf).await;
    let url = format!("http://{http}/kv/x");
    assert_eq!(put(&url, Some("5"), Some("orders"), "new").await.0, 200);
    let n = 40;
    for _ in 0..n {
        assert_eq!(put(&url, Some("3"), Some("orders"), "old").await.0, 409);
    }
    let status = server.terminate().expect("serve exited");
    assert!(
        status.success(),
        "graceful exit: {status:?}\n{}",
        server.log_text()
    );

    let cfg = dir.path().join("fencepost.toml");
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            "--limit",
            "1000",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(
        rows.len(),
        n,
        "every refusal audited exactly once, none lost at shutdown"
    );
    for r in &rows {
        assert_eq!(r["reason"], "stale");
        assert_eq!(r["protocol"], "http");
        assert_eq!(r["resource"], "orders");
        assert_eq!(r["presented_token"], 3);
        assert_eq!(r["current_token"], 5);
        assert_eq!(r["detail"], "PUT /kv/x");
    }
    // Nothing refused reached the upstream.
    assert!(up
        .arrivals()
        .iter()
        .all(|a| a.token.as_deref() == Some("5")));
}

#[tokio::test]
async fn store_outage_fails_closed_spools_audit_records_and_recovers() {
    let db = TestDb::create("fp_ops_outage").await;
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let shim = Shim::start(pg).await;
    let store = db.url.replace("127.0.0.1:5432", &shim.addr.to_string());
    let dir = TempDir::new("fp-outage");
    let up = Upstream::start().await;
    let (mut conf, admin, http) = config(&store, |a| a, up.addr);
    conf.set("audit", "flush_interval", "50ms");
    let _server = Server::run(dir.path(), conf).await;
    let url = format!("http://{http}/kv/x");
    let ok = eventually(20, || async {
        (put(&url, Some("5"), Some("orders"), "a").await.0 == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "write never admitted with the store up");

    shim.cut();
    // A newer token cannot be made durable: refused, not admitted.
    let (s, body) = put(&url, Some("6"), Some("orders"), "b").await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("urn:fencepost:fence-unavailable"), "{body}");
    // A stale one is still fenced from memory.
    assert_eq!(put(&url, Some("4"), Some("orders"), "c").await.0, 409);
    // A resource never seen cannot be decided without the store.
    assert_eq!(put(&url, Some("1"), Some("other"), "d").await.0, 503);
    // The three refusals were answered with their records in the spool.
    let (_, m) = get(&format!("http://{admin}/metrics"), None).await;
    assert_eq!(
        metric(&m, "fencepost_audit_records_spooled_total"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(get(&format!("http://{admin}/readyz"), None).await.0, 503);

    shim.restore();
    let recovered = eventually(30, || async {
        (put(&url, Some("6"), Some("orders"), "e").await.0 == 200).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "did not recover when the store came back"
    );
    assert_eq!(put(&url, Some("5"), Some("orders"), "f").await.0, 409);
    let tokens: Vec<_> = up.arrivals().into_iter().filter_map(|a| a.token).collect();
    assert_eq!(
        tokens,
        vec!["5", "6"],
        "only admitted writes reached the upstream"
    );
    // The spool was shipped, in order, ahead of the refusal after it.
    let reasons = eventually(20, || async {
        let (_, b) = get(&format!("http://{admin}/v1/audit?kind=refused_write"), None).await;
        let v: Vec<Value> = serde_json::from_str(&b).ok()?;
        let r: Vec<String> = v
            .iter()
            .rev()
            .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
            .collect();
        (r.len() == 4).then_some(r)
    })
    .await;
    assert_eq!(
        reasons.as_deref(),
        Some(
            &[
                "unavailable".to_owned(),
                "stale".into(),
                "unavailable".into(),
                "stale".into()
            ][..]
        ),
        "no record lost to the outage"
    );
    let (_, m) = get(&format!("http://{admin}/metrics"), None).await;
    assert_eq!(
        metric(&m, "fencepost_audit_records_dropped_total"),
        Some(0.0)
    );
}

#[tokio::test]
async fn admin_api_needs_its_token_and_reports_fences_audit_and_metrics() {
    let dir = TempDir::new("fp-admin");
    let up = Upstream::start().await;
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let (conf, admin, http) = config(&store, |a| a.set("token", "s3cret"), up.addr);
    let _server = Server::run(dir.path(), conf).await;
    let base = format!("http://{admin}");
    let url = format!("http://{http}/kv/y");
    assert_eq!(put(&url, Some("7"), Some("shard/1"), "a").await.0, 200);
    assert_eq!(put(&url, Some("2"), Some("shard/1"), "b").await.0, 409);
    assert_eq!(put(&url, None, Some("shard/1"), "c").await.0, 428);

    for path in [
        "/metrics",
        "/readyz",
        "/v1/fences",
        "/v1/audit",
        "/v1/fences/shard/1",
    ] {
        let (s, body) = get(&format!("{base}{path}"), None).await;
        assert_eq!(s, 401, "{path} without token: {body}");
        assert_eq!(
            get(&format!("{base}{path}"), Some("wrong")).await.0,
            401,
            "{path} wrong token"
        );
    }
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz"), Some("s3cret")).await.0, 200);

    let (s, fence) = get(&format!("{base}/v1/fences/shard/1"), Some("s3cret")).await;
    assert_eq!(s, 200, "{fence}");
    let fence: Value = serde_json::from_str(&fence).unwrap();
    assert_eq!(
        (fence["resource"].as_str(), fence["token"].as_u64()),
        (Some("shard/1"), Some(7))
    );
    assert!(fence["updated_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    let audit = eventually(10, || async {
        let (_, b) = get(
            &format!("{base}/v1/audit?resource=shard/1&limit=10"),
            Some("s3cret"),
        )
        .await;
        let v: Vec<Value> = serde_json::from_str(&b).ok()?;
        (v.len() == 2).then_some(v)
    })
    .await
    .expect("both refusals audited");
    assert_eq!(audit[0]["reason"], "missing", "newest first");
    assert_eq!(audit[1]["reason"], "stale");
    for key in [
        "id",
        "at",
        "resource",
        "protocol",
        "reason",
        "presented_token",
        "current_token",
        "client_addr",
        "detail",
    ] {
        assert!(audit[1].get(key).is_some(), "audit record lacks {key}");
    }
    assert!(audit[1]["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let (s, _) = get(&format!("{base}/v1/audit?limit=0"), Some("s3cret")).await;
    assert_eq!(s, 400);

    let (_, m) = get(&format!("{base}/metrics"), Some("s3cret")).await;
    assert_eq!(
        metric(
            &m,
            "fencepost_writes_total{protocol=\"http\",outcome=\"accepted\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "fencepost_writes_total{protocol=\"http\",outcome=\"stale\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "fencepost_writes_total{protocol=\"http\",outcome=\"missing\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "fencepost_high_water_mark{resource=\"shard/1\"}"),
        Some(7.0)
    );
    assert!(
        m.contains("fencepost_request_duration_seconds"),
        "latency histogram missing"
    );

    // The CLI reads the same records through the admin API.
    let (code, out, err) = run_cli(
        &["audit", "--admin", &base, "--resource", "shard/1"],
        &[("FENCEPOST_ADMIN_TOKEN", "s3cret")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().next().unwrap_or("").starts_with("AT"), "{out}");
    assert!(out.contains("stale") && out.contains("missing"), "{out}");
    let (code, _, err) = run_cli(&["audit", "--admin", &base], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");

    // Readiness follows the upstream.
    drop(up);
    let unready = eventually(10, || async {
        (get(&format!("{base}/readyz"), Some("s3cret")).await.0 == 503).then_some(())
    })
    .await;
    assert!(
        unready.is_some(),
        "readyz stayed ready with the upstream gone"
    );
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = TempDir::new("fp-keygen");
    let out = dir.path().join("k");
    let (code, stdout, err) = run_cli(&["keygen", "--out", out.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("k.pub"));
    let secret = std::fs::read_to_string(dir.path().join("k.key")).unwrap();
    let public = std::fs::read_to_string(dir.path().join("k.pub")).unwrap();
    let signer = fencing::Signer::from_text(&secret).expect("secret parses");
    assert_eq!(signer.verifier().public_text(), public.trim());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("k.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "secret key readable by others: {mode:o}");
    let (code, _, err) = run_cli(&["keygen", "--out", out.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let dir = TempDir::new("fp-badcfg");
    let cases = [
        ("nonsense = 1\n", "nonsense"),
        ("[[http]]\nlisten = \"127.0.0.1:1\"\nupstream = \"ftp://x\"\n", "http://"),
        ("[[http]]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://x\"\nroutes = [{ prefix = \"/\", resource = \"bad name\" }]\n", "resource"),
        ("[elector]\nlisten = \"127.0.0.1:1\"\nlock_delay = \"soon\"\n", "lock_delay"),
        ("", "nothing to run"),
    ];
    for (text, needle) in cases {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, text).unwrap();
        let (code, _, err) = run_cli(&["serve", "--config", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{text}");
        assert!(
            err.contains(needle),
            "config {text:?}: error {err:?} does not mention {needle:?}"
        );
    }
    let (code, _, err) = run_cli(&["serve", "--config", "/nonexistent/fp.toml"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/fp.toml"), "{err}");
}

#[test]
fn migrate_applies_and_help_teaches() {
    let dir = TempDir::new("fp-migrate");
    let url = format!("sqlite://{}/m.db", dir.path().display());
    for _ in 0..2 {
        let (code, out, err) = run_cli(&["migrate", "--store", &url], &[]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("migrated"), "{out}");
    }
    let (code, out, _) = run_cli(&["serve", "--help"], &[]);
    assert_eq!(code, 0);
    for needle in [
        "FENCEPOST_STORE",
        "FENCEPOST_ADMIN_TOKEN",
        "FENCEPOST_HTTP_[N_]UPSTREAM",
        "SIGTERM",
    ] {
        assert!(out.contains(needle), "serve --help lacks {needle}");
    }
    let (_, out, _) = run_cli(&["--help"], &[]);
    assert!(out.contains("fencepost demo"), "{out}");
}

#[tokio::test]
async fn logs_are_json_on_request() {
    let dir = TempDir::new("fp-json");
    let up = Upstream::start().await;
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let (mut conf, _admin, http) = config(&store, |a| a, up.addr);
    conf.set("log", "format", "json");
    let mut server = Server::run(dir.path(), conf).await;
    assert_eq!(
        put(&format!("http://{http}/kv/z"), Some("1"), Some("r"), "x")
            .await
            .0,
        200
    );
    assert_eq!(
        put(&format!("http://{http}/kv/z"), Some("0"), Some("r"), "x")
            .await
            .0,
        409
    );
    server.terminate();
    let log = server.log_text();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "write refused" && l["reason"] == "stale"),
        "{log}"
    );
}

/// `listen = "127.0.0.1:0"` picks free ports; `--ready-file` says which,
/// once every listener is bound, so a supervisor (or a test) needs no
/// port chosen in advance.
#[tokio::test]
async fn serve_on_port_zero_writes_the_bound_addresses_to_the_ready_file() {
    let dir = TempDir::new("fp-ready");
    let up = Upstream::start().await;
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let mut conf = Conf::store(store);
    conf.admin(Section::new().listen(any));
    conf.http(Section::to(format!("http://{}", up.addr)).listen(any));
    let config = dir.path().join("fencepost.toml");
    std::fs::write(&config, conf.render()).unwrap();
    let ready = dir.path().join("ready.json");
    let mut child = std::process::Command::new(bin())
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--ready-file",
        ])
        .arg(&ready)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve");
    let text = eventually(30, || {
        let ready = ready.clone();
        async move { std::fs::read_to_string(ready).ok() }
    })
    .await
    .expect("ready file written");
    let addrs: Value = serde_json::from_str(&text).unwrap();
    let admin: std::net::SocketAddr = addrs["admin"].as_str().unwrap().parse().unwrap();
    let http: std::net::SocketAddr = addrs["http"][0].as_str().unwrap().parse().unwrap();
    assert_ne!(admin.port(), 0, "{text}");
    assert_ne!(http.port(), 0, "{text}");
    assert_eq!(addrs["postgres"], serde_json::json!([]), "{text}");
    assert_eq!(addrs["elector"], Value::Null, "{text}");
    // Both are serving when the file appears.
    assert_eq!(get(&format!("http://{admin}/healthz"), None).await.0, 200);
    assert_eq!(
        put(&format!("http://{http}/kv/a"), Some("1"), Some("r"), "x")
            .await
            .0,
        200
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A SIGTERM sent the instant serve is up drains and exits 0: the
/// handlers are installed before anything is bound, so there is no moment
/// when a listener accepts, or `--ready-file` says ready, and SIGTERM
/// still has its default action (it had, until the first poll of the
/// shutdown future after the ready file was written: a supervisor's prompt
/// SIGTERM killed serve). Signalled the instant the first listener accepts
/// (before the store is even opened, a wide window the old order failed
/// every time) and the instant the ready file appears.
#[tokio::test]
async fn a_sigterm_the_instant_serve_is_up_drains_and_exits_0() {
    for round in 0..6 {
        let at_ready = round % 2 == 1;
        let dir = TempDir::new("fp-term");
        let store = format!("sqlite://{}/fp.db", dir.path().display());
        let mut conf = Conf::store(store);
        let http = conf.http(Section::to("http://127.0.0.1:9"));
        let mut server = Server::launch(dir.path(), conf);
        let ready = server.ready_file().unwrap().to_owned();
        let pid = server.child.as_ref().unwrap().id().to_string();
        // A blocking watch on its own thread: the signal follows the
        // listener or the file within a millisecond or so.
        let signalled = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let up = || {
                if at_ready {
                    ready.exists()
                } else {
                    std::net::TcpStream::connect(http).is_ok()
                }
            };
            while !up() {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .is_ok_and(|s| s.success())
        })
        .await
        .unwrap();
        let when = if at_ready { "ready file" } else { "listener" };
        assert!(
            signalled,
            "round {round}: no {when} in 30 s\n{}",
            server.log_text()
        );
        let mut child = server.child.take().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        let log = server.log_text();
        assert!(
            status.success(),
            "round {round}: SIGTERM at the {when} ended serve with {status:?}\n{log}"
        );
        assert!(
            log.contains("shutting down: draining connections"),
            "round {round}: no drain in the log\n{log}"
        );
    }
}
