//! The elector through the real binary over real sockets: mutual exclusion
//! under a stampede, strictly increasing tokens (across expiry, release and
//! kill -9, on SQLite and on Postgres), signed tokens, the lock delay, the
//! error matrix, bearer auth, the watch stream, the `lease` CLI, and
//! failing closed when the store is gone.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const PROBLEM: &str = "application/problem+json";

fn sqlite_url(dir: &TempDir) -> String {
    format!("sqlite://{}/fp.db", dir.path().display())
}

/// A config running only the elector on `store`, its `[elector]` shaped
/// by `extra`; returns it with the elector's address.
fn config(store: &str, extra: impl FnOnce(Section) -> Section) -> (Conf, SocketAddr) {
    let mut conf = Conf::store(store);
    let addr = conf.elector(extra(Section::new().set("min_ttl", "50ms")));
    (conf, addr)
}

/// An elector in this process; returns it with its base URL.
async fn start(store: &str, extra: impl FnOnce(Section) -> Section) -> (InProc, String) {
    let (conf, addr) = config(store, extra);
    (InProc::start(conf).await, format!("http://{addr}"))
}

async fn post(base: &str, path: &str, body: Value) -> Resp {
    send(client().post(format!("{base}{path}")).json(&body)).await
}

async fn acquire(base: &str, resource: &str, holder: &str, ttl_ms: u64) -> Resp {
    post(
        base,
        &format!("/v1/leases/{resource}/acquire"),
        json!({"holder": holder, "ttl_ms": ttl_ms}),
    )
    .await
}

async fn release(base: &str, resource: &str, holder: &str, token: &str) -> Resp {
    post(
        base,
        &format!("/v1/leases/{resource}/release"),
        json!({"holder": holder, "token": token}),
    )
    .await
}

fn token_of(r: &Resp) -> u64 {
    assert_eq!(r.status, 200, "expected a grant: {}", r.text);
    let t = r.body["token"]
        .as_str()
        .unwrap_or_else(|| panic!("token must be a string: {}", r.text));
    token_value(t)
}

fn assert_problem(r: &Resp, status: u16, kind: &str) {
    assert_eq!(r.status, status, "status of {}", r.text);
    assert!(
        r.content_type.starts_with(PROBLEM),
        "content type {:?} for {}",
        r.content_type,
        r.text
    );
    assert_eq!(r.body["type"], kind, "problem type in {}", r.text);
    assert_eq!(r.body["status"], status, "status field in {}", r.text);
    assert!(
        r.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "detail in {}",
        r.text
    );
}

#[tokio::test]
async fn concurrent_acquires_grant_exactly_one() {
    let dir = TempDir::new("fp-el-race");
    let (_server, base) = start(&sqlite_url(&dir), |e| e).await;
    let base = Arc::new(base);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let base = Arc::clone(&base);
        tasks.push(tokio::spawn(async move {
            acquire(&base, "race/shard-1", &format!("holder-{i}"), 30_000).await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            200 => winners.push(r),
            409 => losers.push(r),
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner");
    assert_eq!(losers.len(), 31);
    let win = &winners[0];
    let holder = win.body["holder"].as_str().expect("holder").to_owned();
    let token = win.body["token"].as_str().expect("token string").to_owned();
    assert_eq!(win.body["resource"], "race/shard-1");
    assert!(win.body["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.contains('.')));
    assert!(win.body["ttl_ms"] == 30_000);
    for l in &losers {
        assert_problem(l, 409, "urn:fencepost:lease-held");
        assert_eq!(l.body["holder"], holder.as_str(), "409 names the holder");
        assert!(l.body["expires_at"].is_string());
        assert!(
            l.body.get("token").is_none(),
            "409 must not carry a token: {}",
            l.text
        );
        assert!(
            !l.text.contains(&format!("\"{token}\"")),
            "409 leaks the token: {}",
            l.text
        );
    }
    // The holder asking again gets its own token back.
    let again = acquire(&base, "race/shard-1", &holder, 30_000).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["token"], token.as_str());

    let show = send(client().get(format!("{base}/v1/leases/race/shard-1"))).await;
    assert_eq!(show.status, 200, "{}", show.text);
    assert_eq!(show.body["holder"], holder.as_str());
    assert_eq!(show.body["token"], token.as_str());
    assert_eq!(show.body["live"], true);
    let list = send(client().get(format!("{base}/v1/leases"))).await;
    assert_eq!(list.status, 200);
    let rows = list.body.as_array().expect("array");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["resource"], "race/shard-1");
}

#[tokio::test]
async fn tokens_strictly_increase_across_expiry_and_release() {
    let dir = TempDir::new("fp-el-mono");
    let (_server, base) = start(&sqlite_url(&dir), |e| e).await;
    let r = "orders";
    let t1 = token_of(&acquire(&base, r, "a", 300).await);
    assert_problem(
        &acquire(&base, r, "b", 300).await,
        409,
        "urn:fencepost:lease-held",
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Expired: b gets it, with a higher token.
    let t2 = token_of(&acquire(&base, r, "b", 10_000).await);
    assert!(t2 > t1, "{t2} > {t1} after expiry");
    // a's old token is dead.
    let renew_a = post(
        &base,
        &format!("/v1/leases/{r}/renew"),
        json!({"holder": "a", "token": t1.to_string()}),
    )
    .await;
    assert_problem(&renew_a, 409, "urn:fencepost:lease-lost");
    // Released: the next grant is higher again, and immediate.
    let rel = release(&base, r, "b", &t2.to_string()).await;
    assert_eq!(rel.status, 204, "{}", rel.text);
    let show = send(client().get(format!("{base}/v1/leases/{r}"))).await;
    assert_eq!(show.body["holder"], Value::Null);
    assert_eq!(show.body["live"], false);
    assert_eq!(show.body["token"], t2.to_string().as_str());
    let t3 = token_of(&acquire(&base, r, "a", 10_000).await);
    assert!(t3 > t2, "{t3} > {t2} after release");
    // Renewal keeps the token and moves the expiry.
    let before = send(client().get(format!("{base}/v1/leases/{r}")))
        .await
        .body["expires_at_ms"]
        .as_i64()
        .expect("expires_at_ms");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = post(
        &base,
        &format!("/v1/leases/{r}/renew"),
        json!({"holder": "a", "token": t3.to_string(), "ttl_ms": 20_000}),
    )
    .await;
    assert_eq!(token_of(&renewed), t3);
    assert_eq!(renewed.body["ttl_ms"], 20_000);
    let after = send(client().get(format!("{base}/v1/leases/{r}")))
        .await
        .body["expires_at_ms"]
        .as_i64()
        .expect("expires_at_ms");
    assert!(after > before, "renew moved the expiry: {after} > {before}");
    // Many cycles: every grant above the last.
    let mut last = t3;
    assert_eq!(release(&base, r, "a", &t3.to_string()).await.status, 204);
    for i in 0..20 {
        let h = format!("h{i}");
        let t = token_of(&acquire(&base, r, &h, 10_000).await);
        assert!(t > last, "{t} > {last}");
        assert_eq!(release(&base, r, &h, &t.to_string()).await.status, 204);
        last = t;
    }
}

/// Clients hammer acquire/release while the server is killed with -9;
/// after the restart, the next token is above every token ever returned.
async fn tokens_survive_kill9(store: &str, dir: &TempDir) {
    let (conf, addr) = config(store, |e| e);
    let mut server = Server::run(dir.path(), conf).await;
    let base = format!("http://{addr}");
    let mut issued: BTreeSet<u64> = BTreeSet::new();
    for round in 0..3 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..4 {
            let (base, stop) = (base.clone(), Arc::clone(&stop));
            workers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let c = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                let holder = format!("w{w}");
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let r = c
                        .post(format!("{base}/v1/leases/jobs/acquire"))
                        .json(&json!({"holder": holder, "ttl_ms": 60_000}))
                        .send()
                        .await;
                    let Ok(r) = r else { break };
                    if r.status() != 200 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let Ok(v) = r.json::<Value>().await else {
                        break;
                    };
                    let t = v["token"].as_str().expect("token").to_owned();
                    got.push(token_value(&t));
                    let _ = c
                        .post(format!("{base}/v1/leases/jobs/release"))
                        .json(&json!({"holder": holder, "token": t}))
                        .send()
                        .await;
                }
                got
            }));
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = issued.len();
        for w in workers {
            issued.extend(w.await.expect("worker"));
        }
        eprintln!(
            "round {round}: {} tokens issued before kill -9",
            issued.len() - before
        );
        assert!(
            issued.len() - before >= 5,
            "round {round}: tokens were issued before the crash: {issued:?}"
        );
        server.restart();
        server.wait_ready().await;
        let max = *issued.iter().next_back().expect("some tokens");
        // The lease may still be held by a worker that never released it.
        let t = eventually(10, || async {
            let r = acquire(&base, "jobs", "after-crash", 60_000).await;
            if r.status == 200 {
                Some(token_of(&r))
            } else {
                let rows = send(client().get(format!("{base}/v1/leases/jobs"))).await;
                let holder = rows.body["holder"].as_str().map(str::to_owned);
                let tok = rows.body["token"].as_str().map(str::to_owned);
                if let (Some(h), Some(tok)) = (holder, tok) {
                    let _ = release(&base, "jobs", &h, &tok).await;
                }
                None
            }
        })
        .await
        .expect("acquire after restart");
        assert!(
            t > max,
            "after kill -9 the next token {t} must exceed {max}"
        );
        assert!(!issued.contains(&t), "token {t} issued twice");
        issued.insert(t);
        let rel = release(&base, "jobs", "after-crash", &t.to_string()).await;
        assert_eq!(rel.status, 204, "{}", rel.text);
    }
}

#[tokio::test]
async fn tokens_survive_kill9_sqlite() {
    let dir = TempDir::new("fp-el-k9s");
    tokens_survive_kill9(&sqlite_url(&dir), &dir).await;
}

#[tokio::test]
async fn tokens_survive_kill9_postgres() {
    let dir = TempDir::new("fp-el-k9p");
    let db = TestDb::create("fp_elector").await;
    tokens_survive_kill9(&db.url, &dir).await;
}

/// Two elector processes sharing one Postgres store: the store serializes
/// candidates across them, and each one's watch stream reports grants made
/// by the other.
#[tokio::test]
async fn replicas_on_postgres_grant_exactly_one() {
    let db = TestDb::create("fp_elector").await;
    let (_a, base_a) = start(&db.url, |e| e).await;
    let (_b, base_b) = start(&db.url, |e| e).await;
    let mut on_b = Sse::open(&format!("{base_b}/v1/leases/pg/race/watch")).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let base = if i % 2 == 0 {
            base_a.clone()
        } else {
            base_b.clone()
        };
        tasks.push(tokio::spawn(async move {
            let r = acquire(&base, "pg/race", &format!("h{i}"), 30_000).await;
            (base, format!("h{i}"), r)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (base, holder, r) = t.await.expect("task");
        match r.status {
            200 => winners.push((base, holder, token_of(&r))),
            409 => assert_problem(&r, 409, "urn:fencepost:lease-held"),
            s => panic!("unexpected {s}: {}", r.text),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one grant across replicas");
    let (base, holder, t1) = winners.remove(0);
    let (name, data) = on_b.next(5).await.expect("B reports the grant");
    assert_eq!(
        (name.as_str(), data["token_value"].as_u64()),
        ("granted", Some(t1))
    );

    // A grant made on A only reaches B's stream through B's store scan.
    assert_eq!(
        release(&base, "pg/race", &holder, &t1.to_string())
            .await
            .status,
        204
    );
    let t2 = token_of(&acquire(&base_a, "pg/race", "z", 30_000).await);
    assert!(t2 > t1);
    let mut seen = None;
    while let Some((name, data)) = on_b.next(5).await {
        if name == "granted" {
            seen = Some(data);
            break;
        }
    }
    let seen = seen.expect("B reports A's grant");
    assert_eq!(seen["token_value"].as_u64(), Some(t2));
    assert_eq!(seen["holder"], "z");
    // And B refuses a competing candidate.
    assert_problem(
        &acquire(&base_b, "pg/race", "y", 30_000).await,
        409,
        "urn:fencepost:lease-held",
    );
}

#[tokio::test]
async fn signed_tokens_verify_and_carry_the_resource() {
    let dir = TempDir::new("fp-el-sign");
    let out = dir.path().join("elector");
    let (code, _, err) = run_cli(&["keygen", "--out", out.to_str().expect("path")], &[]);
    assert_eq!(code, 0, "keygen: {err}");
    let key = dir.path().join("elector.key");
    let public = std::fs::read_to_string(dir.path().join("elector.pub")).expect("public key");
    let verifier = fencing::Verifier::from_text(&public).expect("public key parses");
    let policy = fencing::TokenPolicy {
        verifier: Some(verifier),
        allow_plain: false,
    };
    let (_server, base) = start(&sqlite_url(&dir), |e| {
        e.set("signing_key", key.display().to_string())
    })
    .await;

    let r = acquire(&base, "billing/eu", "a", 10_000).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = r.body["token"].as_str().expect("token").to_owned();
    assert!(token.contains('.'), "signed token: {token}");
    assert_eq!(policy.check("billing/eu", &token), Ok(token_value(&token)));
    // Bound to its resource: no replay against another.
    assert!(policy.check("billing/us", &token).is_err());
    // GET shows the number only, not a usable signed token.
    let show = send(client().get(format!("{base}/v1/leases/billing/eu"))).await;
    assert_eq!(show.body["token"], token_value(&token).to_string().as_str());
    // Renew with the signed token works, with a tampered one does not.
    let renew = |tok: String| {
        let base = base.clone();
        async move {
            post(
                &base,
                "/v1/leases/billing/eu/renew",
                json!({"holder": "a", "token": tok}),
            )
            .await
        }
    };
    let ok = renew(token.clone()).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.body["token"], token.as_str());
    let n = token_value(&token);
    let forged = fencing::Signer::from_seed([9; 32]).sign("billing/eu", n);
    assert_problem(&renew(forged).await, 409, "urn:fencepost:not-holder");
    // After release and re-grant the new signed token verifies too.
    assert_eq!(release(&base, "billing/eu", "a", &token).await.status, 204);
    let r2 = acquire(&base, "billing/eu", "b", 10_000).await;
    let t2 = r2.body["token"].as_str().expect("token").to_owned();
    assert_eq!(policy.check("billing/eu", &t2), Ok(n + 1));
}

#[tokio::test]
async fn lock_delay_holds_off_grants_after_expiry_only() {
    let dir = TempDir::new("fp-el-delay");
    let (_server, base) = start(&sqlite_url(&dir), |e| e.set("lock_delay", "1500ms")).await;
    let t1 = token_of(&acquire(&base, "r", "a", 200).await);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Expired, but inside the lock delay: refused, with a hint when to retry.
    let held_off = acquire(&base, "r", "b", 10_000).await;
    assert_problem(&held_off, 409, "urn:fencepost:lock-delay");
    assert!(held_off.headers.contains_key("retry-after"));
    let free_at = held_off.body["free_at_ms"].as_i64().expect("free_at_ms");
    let granted = eventually(5, || async {
        let r = acquire(&base, "r", "b", 10_000).await;
        (r.status == 200).then(|| token_of(&r))
    })
    .await
    .expect("granted after the lock delay");
    assert!(granted > t1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert!(now_ms >= free_at, "not granted before the lock delay ended");
    // After a release there is no lock delay.
    assert_eq!(
        release(&base, "r", "b", &granted.to_string()).await.status,
        204
    );
    let t3 = acquire(&base, "r", "c", 10_000).await;
    assert_eq!(t3.status, 200, "{}", t3.text);
}

#[tokio::test]
async fn bad_input_gets_problem_json() {
    let dir = TempDir::new("fp-el-bad");
    let (_server, base) = start(&sqlite_url(&dir), |e| e.set("max_ttl", "1h")).await;
    let c = client();
    let url = format!("{base}/v1/leases/orders/acquire");

    let raw = |body: &'static str, ct: &'static str| {
        let req = c.post(&url).header("content-type", ct).body(body);
        send(req)
    };
    assert_problem(
        &raw("{not json", "application/json").await,
        400,
        "urn:fencepost:invalid-body",
    );
    assert_problem(
        &raw("", "application/json").await,
        400,
        "urn:fencepost:invalid-body",
    );
    assert_problem(
        &raw("[1,2]", "application/json").await,
        400,
        "urn:fencepost:invalid-body",
    );
    assert_problem(
        &raw("{\"holder\":\"a\",\"ttl\":5}", "application/json").await,
        400,
        "urn:fencepost:invalid-body",
    );
    assert_problem(
        &raw("{\"holder\":\"a\"}", "text/plain").await,
        415,
        "urn:fencepost:unsupported-media-type",
    );
    let big = format!("{{\"holder\":\"{}\"}}", "x".repeat(100 * 1024));
    let r = send(
        c.post(&url)
            .header("content-type", "application/json")
            .body(big),
    )
    .await;
    assert_problem(&r, 413, "urn:fencepost:body-too-large");

    for ttl in [
        json!(0),
        json!(-5),
        json!(10_000_000_000u64),
        json!(u64::MAX),
    ] {
        let r = post(
            &base,
            "/v1/leases/orders/acquire",
            json!({"holder": "a", "ttl_ms": ttl}),
        )
        .await;
        assert_problem(&r, 400, "urn:fencepost:invalid-ttl");
    }
    let r = post(
        &base,
        "/v1/leases/orders/acquire",
        json!({"holder": "a", "ttl_ms": 1.5}),
    )
    .await;
    assert_problem(&r, 400, "urn:fencepost:invalid-body");
    for holder in [json!(""), json!("a\u{1}b"), json!("x".repeat(300))] {
        let r = post(
            &base,
            "/v1/leases/orders/acquire",
            json!({"holder": holder}),
        )
        .await;
        assert_problem(&r, 400, "urn:fencepost:invalid-holder");
    }
    for bad in ["bad%20name", "semi;colon", "quote'd", &"x".repeat(129)] {
        let r = post(
            &base,
            &format!("/v1/leases/{bad}/acquire"),
            json!({"holder": "a"}),
        )
        .await;
        assert_problem(&r, 400, "urn:fencepost:invalid-resource");
        let r = send(c.get(format!("{base}/v1/leases/{bad}"))).await;
        assert_problem(&r, 400, "urn:fencepost:invalid-resource");
    }
    // Nothing was granted by any of that.
    let r = send(c.get(format!("{base}/v1/leases/orders"))).await;
    assert_problem(&r, 404, "urn:fencepost:no-lease");

    // Renew with the wrong token, release of someone else's lease.
    let t = token_of(&acquire(&base, "orders", "a", 60_000).await);
    let wrong = post(
        &base,
        "/v1/leases/orders/renew",
        json!({"holder": "a", "token": (t + 1).to_string()}),
    )
    .await;
    assert_problem(&wrong, 409, "urn:fencepost:lease-lost");
    let other = post(
        &base,
        "/v1/leases/orders/renew",
        json!({"holder": "b", "token": t.to_string()}),
    )
    .await;
    assert_problem(&other, 409, "urn:fencepost:lease-lost");
    assert!(
        !other.text.contains(&format!("\"{t}\"")),
        "no token in the 409"
    );
    let steal = release(&base, "orders", "b", &t.to_string()).await;
    assert_problem(&steal, 409, "urn:fencepost:not-holder");
    let garbage = release(&base, "orders", "a", "12abc").await;
    assert_problem(&garbage, 400, "urn:fencepost:invalid-token");
    let missing = post(&base, "/v1/leases/orders/renew", json!({"holder": "a"})).await;
    assert_problem(&missing, 400, "urn:fencepost:invalid-body");
    // Still a's, unharmed.
    let show = send(c.get(format!("{base}/v1/leases/orders"))).await;
    assert_eq!(show.body["holder"], "a");
    // Unknown lease, unknown endpoint, wrong method.
    assert_problem(
        &send(c.get(format!("{base}/v1/leases/never"))).await,
        404,
        "urn:fencepost:no-lease",
    );
    assert_problem(
        &send(c.get(format!("{base}/nope"))).await,
        404,
        "urn:fencepost:not-found",
    );
    let r = send(c.delete(format!("{base}/v1/leases/orders"))).await;
    assert_problem(&r, 405, "urn:fencepost:method-not-allowed");
    let r = send(c.get(format!("{base}/v1/leases/orders/acquire"))).await;
    assert_problem(&r, 405, "urn:fencepost:method-not-allowed");
}

#[tokio::test]
async fn bearer_token_is_enforced() {
    let dir = TempDir::new("fp-el-auth");
    let (_server, base) = start(&sqlite_url(&dir), |e| e.set("token", "s3cret")).await;
    let c = client();
    let body = json!({"holder": "a"});
    let url = format!("{base}/v1/leases/orders/acquire");
    let none = send(c.post(&url).json(&body)).await;
    assert_problem(&none, 401, "urn:fencepost:unauthorized");
    let wrong = send(c.post(&url).bearer_auth("s3creT").json(&body)).await;
    assert_problem(&wrong, 401, "urn:fencepost:unauthorized");
    let longer = send(c.post(&url).bearer_auth("s3cret2").json(&body)).await;
    assert_problem(&longer, 401, "urn:fencepost:unauthorized");
    for path in ["/v1/leases", "/v1/leases/orders", "/v1/leases/orders/watch"] {
        let r = send(c.get(format!("{base}{path}"))).await;
        assert_problem(&r, 401, "urn:fencepost:unauthorized");
    }
    let ok = send(c.post(&url).bearer_auth("s3cret").json(&body)).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let list = send(c.get(format!("{base}/v1/leases")).bearer_auth("s3cret")).await;
    assert_eq!(list.status, 200);
    // The CLI passes it too.
    let target = ["--elector", &base, "--resource", "orders"];
    let (code, _, err) = run_cli(&[&["lease", "show"], &target[..]].concat(), &[]);
    assert_eq!(code, 1, "no token: {err}");
    let (code, out, err) = run_cli(
        &[&["lease", "show"], &target[..]].concat(),
        &[("FENCEPOST_ELECTOR_TOKEN", "s3cret")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"holder\""), "{out}");
}

/// Reads SSE events (name, data) from a streaming response.
struct Sse {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    async fn open(url: &str) -> Sse {
        let r = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("watch connects");
        assert_eq!(r.status(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Sse {
            stream: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event, within `secs`.
    async fn next(&mut self, secs: u64) -> Option<(String, Value)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    return Some((
                        name,
                        serde_json::from_str(&data).expect("event data is JSON"),
                    ));
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn watch_stream_delivers_grants_releases_and_expiries() {
    let dir = TempDir::new("fp-el-watch");
    // A process: the test reads /metrics (the recorder is per process)
    // and ends with SIGTERM.
    let (mut conf, el) = config(&sqlite_url(&dir), |e| e);
    let admin = conf.admin(Section::new());
    let mut server = Server::run(dir.path(), conf).await;
    let base = format!("http://{el}");
    let mut w = Sse::open(&format!("{base}/v1/leases/feed/watch")).await;
    let mut other = Sse::open(&format!("{base}/v1/leases/other/watch")).await;

    let g = acquire(&base, "feed", "a", 400).await;
    let t1 = g.body["token"].as_str().expect("token").to_owned();
    let (name, data) = w.next(5).await.expect("granted event");
    assert_eq!(name, "granted");
    assert_eq!(data["type"], "granted");
    assert_eq!(data["resource"], "feed");
    assert_eq!(data["holder"], "a");
    assert_eq!(data["token"], t1.as_str());
    assert_eq!(data["token_value"], token_value(&t1));
    assert_eq!(data["ttl_ms"], 400);
    assert!(data["expires_at"].is_string() && data["expires_at_ms"].is_i64());

    let renewed = post(
        &base,
        "/v1/leases/feed/renew",
        json!({"holder": "a", "token": t1}),
    )
    .await;
    assert_eq!(renewed.status, 200, "{}", renewed.text);
    let (name, _) = w.next(5).await.expect("renewed event");
    assert_eq!(name, "renewed");

    // Nobody renews: the expiry is announced without any request.
    let (name, data) = w.next(5).await.expect("expired event");
    assert_eq!(name, "expired");
    assert_eq!(data["holder"], "a");
    assert_eq!(data["token_value"], token_value(&t1));

    let t2 = acquire(&base, "feed", "b", 30_000).await.body["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let (name, data) = w.next(5).await.expect("second grant");
    assert_eq!(
        (name.as_str(), data["token"].as_str()),
        ("granted", Some(t2.as_str()))
    );
    assert_eq!(release(&base, "feed", "b", &t2).await.status, 204);
    let (name, data) = w.next(5).await.expect("released event");
    assert_eq!(name, "released");
    assert_eq!(data["holder"], "b");

    // A new subscriber starts from the current lease.
    let mut late = Sse::open(&format!("{base}/v1/leases/feed/watch")).await;
    let (name, data) = late.next(5).await.expect("current event");
    assert_eq!(name, "current");
    assert_eq!(data["token_value"], token_value(&t2));
    assert_eq!(data["holder"], Value::Null);
    // Events are per resource.
    assert!(
        other.next(1).await.is_none(),
        "no events for an untouched resource"
    );

    // The expiry was counted once, grants twice.
    let (_, metrics) = get(&format!("http://{admin}/metrics"), None).await;
    assert_eq!(
        metric(&metrics, "fencepost_elector_expiries_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "fencepost_elector_grants_total"), 2.0);
    assert_eq!(metric(&metrics, "fencepost_elector_releases_total"), 1.0);

    // Open watch streams do not hold up a graceful shutdown.
    let started = Instant::now();
    let status = server.terminate().expect("serve exits");
    assert!(status.success(), "{status:?}\n{}", server.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} on watch streams",
        started.elapsed()
    );
    assert!(w.next(1).await.is_none(), "the stream ended");
}

#[tokio::test]
async fn cli_acquire_prints_only_the_token() {
    let dir = TempDir::new("fp-el-cli");
    let (_server, base) = start(&sqlite_url(&dir), |e| e).await;
    let target = |r: &'static str| {
        vec![
            "--elector".to_owned(),
            base.clone(),
            "--resource".to_owned(),
            r.to_owned(),
        ]
    };
    let args = |head: &[&str], r: &'static str, tail: &[&str]| -> Vec<String> {
        head.iter()
            .map(|s| s.to_string())
            .chain(target(r))
            .chain(tail.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run_cli(&refs, &[])
    };

    let (code, out, err) = run(args(
        &["lease", "acquire"],
        "jobs/nightly",
        &["--holder", "cron-1", "--ttl", "30s"],
    ));
    assert_eq!(code, 0, "{err}");
    let token = out.trim_end_matches('\n');
    assert!(
        !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()),
        "stdout is only the token: {out:?}"
    );
    assert_eq!(out, format!("{token}\n"));

    // In a shell, the way the docs show it.
    let script = format!(
        "TOKEN=$(\"{}\" lease acquire --elector {base} --resource jobs/nightly --holder cron-1) && printf '%s' \"$TOKEN\"",
        bin().display()
    );
    let sh = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("sh");
    assert!(
        sh.status.success(),
        "{}",
        String::from_utf8_lossy(&sh.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&sh.stdout),
        token,
        "re-acquire by the holder gives its token back"
    );

    let (code, out, _) = run(args(
        &["lease", "acquire"],
        "jobs/nightly",
        &["--holder", "cron-2"],
    ));
    assert_eq!(code, 3, "held by another");
    assert!(out.is_empty(), "no token on stdout when refused: {out:?}");

    let (code, out, err) = run(args(&["lease", "show"], "jobs/nightly", &[]));
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("show prints JSON");
    assert_eq!(v["holder"], "cron-1");
    assert_eq!(v["token"], token);
    let (code, _, _) = run(args(&["lease", "show"], "jobs/none", &[]));
    assert_eq!(code, 4, "no lease");

    let (code, out, err) = run(args(
        &["lease", "renew"],
        "jobs/nightly",
        &["--holder", "cron-1", "--token", token, "--ttl", "1m"],
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), token);
    let (code, _, _) = run(args(
        &["lease", "renew"],
        "jobs/nightly",
        &["--holder", "cron-2", "--token", token],
    ));
    assert_eq!(code, 3, "renew by a non-holder is lost");
    let (code, _, err) = run(args(
        &["lease", "release"],
        "jobs/nightly",
        &["--holder", "cron-1", "--token", token],
    ));
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = run(args(
        &["lease", "renew"],
        "jobs/nightly",
        &["--holder", "cron-1", "--token", token],
    ));
    assert_eq!(code, 3, "renew after release is lost");
    let (code, _, err) = run(args(&["lease", "acquire"], "bad name", &["--holder", "x"]));
    assert_eq!(code, 1);
    assert!(err.contains("resource"), "{err}");
    // An elector that is not there: an error, promptly, never a token.
    let (code, out, _) = run_cli(
        &[
            "lease",
            "acquire",
            "--elector",
            &format!("http://{}", free_addr()),
            "--resource",
            "r",
            "--holder",
            "x",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(out.is_empty());
}

#[tokio::test]
async fn store_down_fails_closed() {
    let dead = format!("postgres://postgres@127.0.0.1:{}/nothing", free_port());
    let (mut conf, addr) = config(&dead, |e| e);
    conf.store_up = false;
    let _server = InProc::start(conf).await;
    let base = format!("http://{addr}");
    for i in 0..3 {
        let r = acquire(&base, "orders", &format!("h{i}"), 10_000).await;
        assert_ne!(r.status, 200, "granted without a store: {}", r.text);
        assert_problem(&r, 503, "urn:fencepost:store-unavailable");
    }
    let r = send(client().get(format!("{base}/v1/leases/orders"))).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = send(client().get(format!("{base}/v1/leases/orders/watch"))).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let (code, out, _) = run_cli(
        &[
            "lease",
            "acquire",
            "--elector",
            &base,
            "--resource",
            "orders",
            "--holder",
            "x",
        ],
        &[],
    );
    assert_eq!(code, 1, "store down is an error, not a token");
    assert!(out.is_empty());
}

/// Runs `fencepost serve` on `config_text` expecting it to refuse to start;
/// returns its stderr.
fn serve_refuses(dir: &TempDir, config_text: &str) -> String {
    let cfg = dir
        .path()
        .join(format!("bad-{}.toml", rand::random::<u32>()));
    std::fs::write(&cfg, config_text).expect("write config");
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--config", cfg.to_str().expect("path")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "serve started with a bad config");
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
            }
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running with a bad config");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Any free port, bound by serve itself: a serve that must refuse to
/// start needs no socket held for it.
const ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

#[tokio::test]
async fn bad_elector_settings_stop_serve() {
    let dir = TempDir::new("fp-el-badcfg");
    let store = sqlite_url(&dir);
    let missing = dir.path().join("nope.key");
    let err = serve_refuses(
        &dir,
        &config(&store, |e| {
            e.listen(ANY)
                .set("signing_key", missing.display().to_string())
        })
        .0
        .render(),
    );
    assert!(err.contains("nope.key"), "names the key file: {err}");
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key!\n").expect("write key");
    let err = serve_refuses(
        &dir,
        &config(&store, |e| {
            e.listen(ANY)
                .set("signing_key", garbage.display().to_string())
        })
        .0
        .render(),
    );
    assert!(err.contains("garbage.key"), "names the key file: {err}");
    let err = serve_refuses(
        &dir,
        &config(&store, |e| e.listen(ANY).set("default_ttl", "10ms"))
            .0
            .render(),
    );
    assert!(err.contains("default_ttl"), "{err}");
}
