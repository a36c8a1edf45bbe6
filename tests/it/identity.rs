//! Identities at the elector and the admin API (issue 17, part 2): per
//! client bearer tokens stored hashed (`[[elector.clients]]`, made by
//! `fencepost keygen client-token`), grants of resources and holder names
//! (`[[elector.grants]]`), `403 urn:fencepost:forbidden` audited as
//! `lease_denied` with the identity, and the admin API's read and admin
//! roles (`[[admin.clients]]`). The identity rides in the audit record,
//! in `/v1/audit`, in `fencepost audit`, and in the hash chain
//! `fencepost audit verify` checks. Client certificate identities: end to
//! end through real mutual TLS (curl) below, and every matching rule
//! against `PeerCertificate` in `proxy/src/edge/access.rs`.

use std::net::SocketAddr;

use crate::support::tls::{curl, Pki};
use crate::support::*;
use serde_json::{json, Value};

const PROBLEM: &str = "application/problem+json";

/// A client made by `fencepost keygen client-token`: its token, and the
/// entry the command printed, parsed.
struct Client {
    token: String,
    entry: toml::Table,
}

fn keygen(name: &str, role: Option<&str>) -> (Client, String) {
    let mut args = vec!["keygen", "client-token", "--name", name];
    if let Some(r) = role {
        args.extend(["--role", r]);
    }
    let (code, out, err) = run_cli(&args, &[]);
    assert_eq!(code, 0, "keygen client-token: {err}");
    let token = out
        .lines()
        .find(|l| l.starts_with("fpc_"))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_owned();
    // The entry, from its header on, is TOML to paste as it is.
    let at = out
        .find("[[")
        .unwrap_or_else(|| panic!("no entry in {out}"));
    let doc: toml::Table = out[at..].parse().unwrap_or_else(|e| panic!("{e}: {out}"));
    let section = if role.is_some() { "admin" } else { "elector" };
    let entry = doc[section]["clients"][0]
        .as_table()
        .unwrap_or_else(|| panic!("no [[{section}.clients]] in {out}"))
        .clone();
    (Client { token, entry }, out)
}

fn inline(t: &toml::Table) -> String {
    toml::Value::Table(t.clone()).to_string()
}

/// An elector and an admin API with identities: `sched-a` may take
/// `orders` and `jobs/*` under its own name, `sched-b` `orders` and
/// `billing`, `watcher` nothing (a client with no grant); the admin API
/// has `grafana` (read) and `ops` (admin).
struct Setup {
    server: InProc,
    el: String,
    admin: String,
    store: String,
    a: Client,
    b: Client,
    watcher: Client,
    grafana: Client,
    ops: Client,
    _dir: TempDir,
}

async fn setup(name: &str) -> Setup {
    let dir = TempDir::new(name);
    let (a, _) = keygen("sched-a", None);
    let (b, _) = keygen("sched-b", None);
    let (watcher, _) = keygen("watcher", None);
    let (grafana, _) = keygen("grafana", Some("read"));
    let (ops, _) = keygen("ops", Some("admin"));
    let mut conf = Conf::sqlite(dir.path());
    conf.set("audit", "flush_interval", "20ms");
    let store = conf.store_url().to_owned();
    let clients = format!(
        "[{}, {}, {}]",
        inline(&a.entry),
        inline(&b.entry),
        inline(&watcher.entry)
    );
    let el: SocketAddr = conf.elector(
        Section::new()
            .set("min_ttl", "50ms")
            .raw("clients", &clients)
            .raw(
                "grants",
                r#"[
                    { identities = ["sched-a"], resources = ["orders"], prefixes = ["jobs/"] },
                    { identities = ["sched-b"], resources = ["orders", "billing"] },
                ]"#,
            ),
    );
    let admin = conf.admin(Section::new().raw(
        "clients",
        &format!("[{}, {}]", inline(&grafana.entry), inline(&ops.entry)),
    ));
    let server = InProc::start(conf).await;
    Setup {
        server,
        el: format!("http://{el}"),
        admin: format!("http://{admin}"),
        store,
        a,
        b,
        watcher,
        grafana,
        ops,
        _dir: dir,
    }
}

async fn call(base: &str, who: &Client, resource: &str, action: &str, body: Value) -> Resp {
    send(
        client()
            .post(format!("{base}/v1/leases/{resource}/{action}"))
            .bearer_auth(&who.token)
            .json(&body),
    )
    .await
}

async fn acquire(s: &Setup, who: &Client, resource: &str, holder: &str) -> Resp {
    call(
        &s.el,
        who,
        resource,
        "acquire",
        json!({"holder": holder, "ttl_ms": 30_000}),
    )
    .await
}

fn assert_forbidden(r: &Resp, identity: &str, resource: &str, holder: &str, refused: &str) {
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.content_type.starts_with(PROBLEM), "{}", r.content_type);
    assert_eq!(r.body["type"], "urn:fencepost:forbidden", "{}", r.text);
    assert_eq!(r.body["identity"], identity, "{}", r.text);
    assert_eq!(r.body["resource"], resource, "{}", r.text);
    assert_eq!(r.body["holder"], holder, "{}", r.text);
    assert_eq!(r.body["refused"], refused, "{}", r.text);
    assert!(r.body.get("token").is_none(), "{}", r.text);
}

/// Exactly `n` records from the admin API's `/v1/audit?{query}`, read as
/// `grafana`.
async fn audit(s: &Setup, query: &str, n: usize) -> Vec<Value> {
    let url = format!("{}/v1/audit?{query}", s.admin);
    let got = eventually(10, || async {
        let (_, body) = get(&url, Some(&s.grafana.token)).await;
        let v: Vec<Value> = serde_json::from_str(&body).ok()?;
        (v.len() == n).then_some(v)
    })
    .await;
    match got {
        Some(v) => v,
        None => panic!(
            "{query}: wanted {n} records, last answer {:?}",
            get(&url, Some(&s.grafana.token)).await
        ),
    }
}

fn granted(r: &Resp) -> String {
    assert_eq!(r.status, 200, "expected a grant: {}", r.text);
    r.body["token"].as_str().expect("token").to_owned()
}

#[tokio::test]
async fn a_client_outside_its_grants_is_refused_with_403_and_audited_with_its_identity() {
    let s = setup("fp-id-denied").await;
    // A resource no grant of sched-a covers.
    let r = acquire(&s, &s.a, "billing", "sched-a").await;
    assert_forbidden(&r, "sched-a", "billing", "sched-a", "resource");
    // A resource it has, under a holder name that is not its own.
    let r = acquire(&s, &s.a, "orders", "sched-b").await;
    assert_forbidden(&r, "sched-a", "orders", "sched-b", "holder");
    // A prefix grant covers what is under it, not the bare prefix word.
    let r = acquire(&s, &s.a, "jobs", "sched-a").await;
    assert_forbidden(&r, "sched-a", "jobs", "sched-a", "resource");
    // A client with no grant at all.
    let r = acquire(&s, &s.watcher, "orders", "watcher").await;
    assert_forbidden(&r, "watcher", "orders", "watcher", "resource");

    // Nothing was granted: the resources are still free for their owners.
    let show = send(
        client()
            .get(format!("{}/v1/leases/billing", s.el))
            .bearer_auth(&s.a.token),
    )
    .await;
    assert_eq!(show.status, 404, "{}", show.text);
    granted(&acquire(&s, &s.b, "orders", "sched-b").await);

    let denied = audit(&s, "kind=lease_denied&limit=100", 4).await;
    let seen: Vec<(&str, &str, &str, &str)> = denied
        .iter()
        .rev()
        .map(|r| {
            assert_eq!(r["reason"], "forbidden", "{r}");
            assert_eq!(r["protocol"], "elector", "{r}");
            assert!(
                r["client_addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{r}"
            );
            assert!(
                r["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("acquire refused")),
                "{r}"
            );
            (
                r["identity"].as_str().unwrap_or("-"),
                r["resource"].as_str().unwrap_or("-"),
                r["holder"].as_str().unwrap_or("-"),
                r["detail"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    let who: Vec<_> = seen.iter().map(|(i, r, h, _)| (*i, *r, *h)).collect();
    assert_eq!(
        who,
        vec![
            ("sched-a", "billing", "sched-a"),
            ("sched-a", "orders", "sched-b"),
            ("sched-a", "jobs", "sched-a"),
            ("watcher", "orders", "watcher"),
        ]
    );
    assert!(seen[1].3.contains("holder name \"sched-b\""), "{seen:?}");
    // The grant that followed is recorded with its identity too.
    let grant = audit(&s, "kind=lease_granted", 1).await;
    assert_eq!(grant[0]["identity"], "sched-b");
    assert_eq!(grant[0]["holder"], "sched-b");
}

#[tokio::test]
async fn a_granted_client_leads_end_to_end_and_no_other_client_can_renew_or_release_its_lease() {
    let s = setup("fp-id-lead").await;
    let t = granted(&acquire(&s, &s.a, "orders", "sched-a").await);
    let renew = json!({"holder": "sched-a", "token": t});

    // sched-b may take orders, but not as sched-a: renewing or releasing
    // sched-a's lease with its token is refused before the store is asked.
    let r = call(&s.el, &s.b, "orders", "renew", renew.clone()).await;
    assert_forbidden(&r, "sched-b", "orders", "sched-a", "holder");
    let r = call(&s.el, &s.b, "orders", "release", renew.clone()).await;
    assert_forbidden(&r, "sched-b", "orders", "sched-a", "holder");
    // Under its own name it meets the lease rules, not the grants.
    let r = acquire(&s, &s.b, "orders", "sched-b").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.body["type"], "urn:fencepost:lease-held");

    // The lease is still sched-a's, which renews and releases it.
    let r = call(&s.el, &s.a, "orders", "renew", renew.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = call(&s.el, &s.a, "orders", "release", renew.clone()).await;
    assert_eq!(r.status, 204, "{}", r.text);
    // A prefix grant: anything under jobs/.
    granted(&acquire(&s, &s.a, "jobs/nightly/1", "sched-a").await);
    // Reads need an identity, not a grant.
    let list = send(
        client()
            .get(format!("{}/v1/leases", s.el))
            .bearer_auth(&s.watcher.token),
    )
    .await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.body.as_array().map(Vec::len), Some(2), "{}", list.text);
    let watch = send(
        client()
            .get(format!("{}/v1/leases/orders/watch", s.el))
            .bearer_auth(&s.watcher.token),
    )
    .await;
    assert_eq!(watch.status, 200);
    assert!(watch.content_type.starts_with("text/event-stream"));

    // Three denials: the two refusals, and sched-b's acquire of a held
    // lease (reason held, with its identity too).
    let denied = audit(&s, "kind=lease_denied", 3).await;
    assert_eq!(denied[0]["reason"], "held", "{denied:?}");
    assert_eq!(denied[0]["identity"], "sched-b", "{denied:?}");
    for (rec, action) in denied[1..].iter().zip(["release", "renew"]) {
        assert_eq!(rec["identity"], "sched-b", "{rec}");
        assert_eq!(rec["holder"], "sched-a", "{rec}");
        assert_eq!(rec["reason"], "forbidden", "{rec}");
        assert_eq!(rec["presented_token"], token_value(&t), "{rec}");
        assert!(
            rec["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(&format!("{action} refused"))),
            "{rec}"
        );
    }
    let released = audit(&s, "kind=lease_released", 1).await;
    assert_eq!(released[0]["identity"], "sched-a");
    let grants = audit(&s, "kind=lease_granted", 2).await;
    assert!(
        grants.iter().all(|g| g["identity"] == "sched-a"),
        "{grants:?}"
    );
}

#[tokio::test]
async fn a_missing_wrong_or_unknown_client_token_is_401() {
    let s = setup("fp-id-401").await;
    let hash = s.a.entry["token_hash"].as_str().unwrap().to_owned();
    let short = s.a.token[..s.a.token.len() - 1].to_owned();
    let wrong: Vec<Option<String>> = vec![
        None,
        Some("fpc_not-a-client".into()),
        Some(short),
        Some(format!("{}x", s.a.token)),
        // What the config holds is not a credential.
        Some(hash.clone()),
        Some(hash.trim_start_matches("sha256:").to_owned()),
        // An admin client is no elector client.
        Some(s.ops.token.clone()),
    ];
    for auth in wrong {
        for req in [
            client()
                .post(format!("{}/v1/leases/orders/acquire", s.el))
                .json(&json!({"holder": "sched-a"})),
            client().get(format!("{}/v1/leases", s.el)),
            client().get(format!("{}/v1/leases/orders/watch", s.el)),
        ] {
            let req = match &auth {
                Some(t) => req.bearer_auth(t),
                None => req,
            };
            let r = send(req).await;
            assert_eq!(r.status, 401, "{auth:?}: {}", r.text);
            assert_eq!(r.body["type"], "urn:fencepost:unauthorized", "{}", r.text);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    // Nothing was granted, nothing audited as a lease change.
    let r = acquire(&s, &s.a, "orders", "sched-a").await;
    granted(&r);
    let all = audit(&s, "kind=all", 1).await;
    assert_eq!(all[0]["kind"], "lease_granted");
}

#[tokio::test]
async fn a_read_only_admin_identity_reads_everything_and_writes_nothing() {
    let s = setup("fp-id-admin").await;
    granted(&acquire(&s, &s.a, "orders", "sched-a").await);
    for path in [
        "/metrics",
        "/readyz",
        "/v1/fences",
        "/v1/leases",
        "/v1/replicas",
        "/v1/audit?kind=all",
        "/v1/events",
    ] {
        for who in [&s.grafana, &s.ops] {
            let r = send(
                client()
                    .get(format!("{}{path}", s.admin))
                    .bearer_auth(&who.token),
            )
            .await;
            assert_eq!(r.status, 200, "GET {path}: {}", r.text);
        }
        let r = send(client().get(format!("{}{path}", s.admin))).await;
        assert_eq!(r.status, 401, "GET {path} without a token: {}", r.text);
        let r = send(
            client()
                .get(format!("{}{path}", s.admin))
                .bearer_auth(&s.a.token),
        )
        .await;
        assert_eq!(r.status, 401, "an elector client is no admin client");
    }
    // A write, by method: refused to the read role before routing...
    for (method, path) in [
        (reqwest::Method::POST, "/v1/fences"),
        (reqwest::Method::DELETE, "/v1/fences/orders"),
        (reqwest::Method::PUT, "/v1/audit"),
    ] {
        let r = send(
            client()
                .request(method.clone(), format!("{}{path}", s.admin))
                .bearer_auth(&s.grafana.token),
        )
        .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text);
        assert_eq!(r.body["type"], "urn:fencepost:forbidden", "{}", r.text);
        assert_eq!(r.body["identity"], "grafana", "{}", r.text);
        // ...and let through for the admin role (the API has no such
        // endpoint, so routing answers).
        let r = send(
            client()
                .request(method.clone(), format!("{}{path}", s.admin))
                .bearer_auth(&s.ops.token),
        )
        .await;
        assert_eq!(r.status, 405, "{method} {path} as admin: {}", r.text);
    }
    // Liveness and the console's page stay open.
    assert_eq!(
        send(client().get(format!("{}/healthz", s.admin)))
            .await
            .status,
        200
    );
    assert_eq!(
        send(client().get(format!("{}/ui", s.admin))).await.status,
        200
    );
}

#[tokio::test]
async fn the_identity_is_in_fencepost_audit_and_in_the_hash_chain() {
    let s = setup("fp-id-chain").await;
    let r = acquire(&s, &s.a, "billing", "sched-a").await;
    assert_eq!(r.status, 403);
    let t = granted(&acquire(&s, &s.a, "orders", "sched-a").await);
    // A record without an identity in the same chain: an expiry.
    granted(
        &call(
            &s.el,
            &s.b,
            "billing",
            "acquire",
            json!({"holder": "sched-b", "ttl_ms": 100}),
        )
        .await,
    );
    audit(&s, "kind=lease_expired", 1).await;
    let recs = audit(&s, "kind=all&limit=100", 4).await;

    let (code, out, err) = run_cli(
        &[
            "audit",
            "--admin",
            &s.admin,
            "--auth-token",
            &s.grafana.token,
            "--kind",
            "all",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let head = out.lines().next().unwrap_or_default();
    assert!(head.contains("IDENTITY"), "{out}");
    let denial = out
        .lines()
        .find(|l| l.contains("lease_denied"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        denial.contains("sched-a") && denial.contains("forbidden"),
        "{out}"
    );
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--admin",
            &s.admin,
            "--auth-token",
            &s.ops.token,
            "--kind",
            "lease_granted",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines
        .iter()
        .any(|l| l["identity"] == "sched-a" && l["current_token"] == token_value(&t)));

    s.server.shutdown().expect("clean shutdown");
    let verify = || run_cli(&["audit", "verify", "--store", &s.store], &[]);
    let (code, out, err) = verify();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified: 4 records in 1 chains"), "{out}");

    // The identity is covered by the record's hash: changed, or removed
    // (a v2 record made to look like a v1 one), it is named.
    let denied_id = recs
        .iter()
        .find(|r| r["kind"] == "lease_denied")
        .and_then(|r| r["id"].as_i64())
        .expect("the denial's id");
    for sql in [
        format!("UPDATE audit SET identity = 'sched-b' WHERE id = {denied_id}"),
        format!("UPDATE audit SET identity = NULL WHERE id = {denied_id}"),
    ] {
        tamper(&s.store, &sql).await;
        let (code, out, err) = verify();
        assert_eq!(code, 3, "{sql}: {out}{err}");
        let first = out.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("FIRST MISMATCH: record id {denied_id} "))
                && first.contains("hash mismatch"),
            "{sql}: {out}"
        );
    }
    tamper(
        &s.store,
        &format!("UPDATE audit SET identity = 'sched-a' WHERE id = {denied_id}"),
    )
    .await;
    let (code, out, _) = verify();
    assert_eq!(code, 0, "put back, it verifies again: {out}");
}

async fn tamper(store: &str, sql: &str) {
    use sqlx::Connection as _;
    let mut c = sqlx::SqliteConnection::connect(store).await.unwrap();
    let done = sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    assert_eq!(done.rows_affected(), 1, "{sql}");
}

#[test]
fn keygen_client_token_prints_a_fresh_token_and_the_entry_with_its_hash() {
    let (one, out) = keygen("sched-a", None);
    let (two, _) = keygen("sched-a", None);
    assert_ne!(one.token, two.token, "a fresh token each time");
    // 32 random bytes, base64url without padding, after the prefix.
    assert_eq!(one.token.len(), 4 + 43, "{out}");
    assert_eq!(one.entry["name"].as_str(), Some("sched-a"));
    let hash = one.entry["token_hash"].as_str().unwrap();
    assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64, "{out}");
    assert!(!out.contains(&format!("token_hash = \"{}", one.token)));
    assert_ne!(one.entry["token_hash"], two.entry["token_hash"]);
    let (admin, out) = keygen("grafana", Some("read"));
    assert_eq!(admin.entry["role"].as_str(), Some("read"), "{out}");
    // A name a config would refuse is refused here.
    let (code, _, err) = run_cli(&["keygen", "client-token", "--name", ""], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--name"), "{err}");
}

/// A client certificate is an identity end to end: `fencepost keygen tls`
/// makes certificates for `sched-cert` and `intruder`, the elector requires
/// client certificates (`tls_client_ca`), and a grant names `sched-cert`.
/// Through curl: the certificate leads under its own name, is refused
/// (403, audited with its name) under another, and a verified certificate
/// no grant names may read but not acquire.
#[tokio::test]
async fn a_client_certificate_is_an_identity_through_real_mutual_tls() {
    let dir = TempDir::new("fp-id-mtls");
    let pki = Pki::keygen(&dir.path().join("pki"), &["sched-cert", "intruder"]);
    let mut conf = Conf::sqlite(dir.path());
    conf.set("audit", "flush_interval", "20ms");
    let el = conf.elector(pki.section(
        Section::new().raw(
            "grants",
            r#"[{ identities = ["sched-cert"], resources = ["orders"] }]"#,
        ),
        true,
    ));
    let admin = conf.admin(Section::new());
    let _server = InProc::start(conf).await;
    let ca = pki.ca.display().to_string();
    let call = |who: &'static str, path: &'static str, body: Option<&'static str>| {
        let (cert, key) = pki.client(who);
        let ca = ca.clone();
        async move {
            let url = format!("https://localhost:{}{path}", el.port());
            let (cert, key) = (cert.display().to_string(), key.display().to_string());
            let mut args = vec!["--cacert", &ca, "--cert", &cert, "--key", &key];
            if let Some(b) = body {
                args.extend(["-H", "content-type: application/json", "-d", b]);
            }
            args.push(&url);
            let (code, out) = curl(&args).await;
            assert_eq!(code, 0, "{out}");
            let status = out.lines().last().unwrap_or("").to_owned();
            let body = out.lines().rev().nth(1).unwrap_or("").to_owned();
            (status, body)
        }
    };
    let (status, body) = call(
        "sched-cert",
        "/v1/leases/orders/acquire",
        Some(r#"{"holder":"sched-cert"}"#),
    )
    .await;
    assert_eq!(status, "200", "{body}");
    let (status, body) = call(
        "sched-cert",
        "/v1/leases/orders/acquire",
        Some(r#"{"holder":"someone-else"}"#),
    )
    .await;
    assert_eq!(status, "403", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["type"], "urn:fencepost:forbidden");
    assert_eq!(v["identity"], "sched-cert");
    assert_eq!(v["refused"], "holder");
    // Verified, but named by no grant: reads yes, leases no.
    let (status, body) = call("intruder", "/v1/leases", None).await;
    assert_eq!(status, "200", "{body}");
    let (status, body) = call(
        "intruder",
        "/v1/leases/billing/acquire",
        Some(r#"{"holder":"intruder"}"#),
    )
    .await;
    assert_eq!(status, "403", "{body}");

    let url = format!("http://{admin}/v1/audit?kind=lease_denied");
    let denied = eventually(10, || async {
        let (_, body) = get(&url, None).await;
        let v: Vec<Value> = serde_json::from_str(&body).ok()?;
        (v.len() == 2).then_some(v)
    })
    .await
    .expect("both refusals audited");
    assert_eq!(denied[0]["identity"], "intruder", "{denied:?}");
    assert_eq!(denied[1]["identity"], "sched-cert", "{denied:?}");
    assert_eq!(denied[1]["holder"], "someone-else", "{denied:?}");
    let url = format!("http://{admin}/v1/audit?kind=lease_granted");
    let (_, body) = get(&url, None).await;
    assert!(body.contains("\"identity\":\"sched-cert\""), "{body}");
}
