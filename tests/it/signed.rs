//! Signed tokens end to end: the elector signs with its secret key, the
//! HTTP proxy verifies with the public one. Forged, replayed and unsigned
//! tokens (even one above every token ever issued) are refused with 403
//! and audited as forged; genuine ones pass, and the proxy's watch of the
//! elector verifies the grants it fences with.

use crate::support::*;
use serde_json::Value;

async fn acquire(elector: &str, resource: &str, holder: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{elector}/v1/leases/{resource}/acquire"))
        .json(&serde_json::json!({ "holder": holder, "ttl_ms": 60_000 }))
        .send()
        .await
        .expect("elector reachable");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    body["token"].as_str().expect("token string").to_owned()
}

async fn release(elector: &str, resource: &str, holder: &str, token: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{elector}/v1/leases/{resource}/release"))
        .json(&serde_json::json!({ "holder": holder, "token": token }))
        .send()
        .await
        .expect("elector reachable");
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn only_tokens_the_elector_signed_for_this_resource_are_admitted() {
    let dir = TempDir::new("fp-signed");
    let key = dir.path().join("elector");
    let (code, _, err) = run_cli(&["keygen", "--out", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let up = Upstream::start().await;
    let mut conf = Conf::store(format!("sqlite://{}", dir.path().join("fp.db").display()));
    let admin = conf.admin(Section::new());
    let el = conf.elector(Section::new().set("signing_key", format!("{}.key", key.display())));
    let http = conf.http(
        Section::to(format!("http://{}", up.addr))
            .set("verify_key", format!("{}.pub", key.display()))
            .set("elector_watch", format!("http://{el}"))
            .set("watch_resources", vec!["orders", "payments"]),
    );
    let _server = InProc::start(conf).await;
    let elector = format!("http://{el}");
    let url = format!("http://{http}/kv/a");

    let t1 = acquire(&elector, "orders", "a").await;
    let (n1, sig1) = t1.split_once('.').expect("signed token has a signature");
    assert_eq!(put(&url, Some(&t1), Some("orders"), "1").await.0, 200);
    // The same genuine token again (served from the verified-token cache).
    assert_eq!(put(&url, Some(&t1), Some("orders"), "2").await.0, 200);

    let forged_number = format!("{}.{sig1}", n1.parse::<u64>().unwrap() + 1);
    let mut flipped = sig1.to_string().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = format!("{n1}.{}", String::from_utf8(flipped).unwrap());
    let payments = acquire(&elector, "payments", "a").await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("number raised, signature kept", forged_number, "orders"),
        ("signature altered", flipped, "orders"),
        (
            "unsigned token above every issued one",
            "9223372036854775808".into(),
            "orders",
        ),
        (
            "token for another resource replayed",
            payments.clone(),
            "orders",
        ),
    ];
    for (what, token, resource) in &cases {
        let (s, body) = put(&url, Some(token), Some(resource), "x").await;
        assert_eq!(s, 403, "{what}: {body}");
        let v: Value = serde_json::from_str(&body).expect("problem json");
        assert_eq!(v["type"], "urn:fencepost:forged-token", "{what}");
    }
    // A malformed signature is not a forgery, just invalid.
    assert_eq!(
        put(&url, Some(&format!("{n1}.abc")), Some("orders"), "x")
            .await
            .0,
        400
    );
    // Genuine token still works; nothing forged reached the upstream.
    assert_eq!(put(&url, Some(&t1), Some("orders"), "3").await.0, 200);
    assert!(up
        .arrivals()
        .iter()
        .all(|a| a.token.as_deref() == Some(t1.as_str())));

    let audit = eventually(10, || async {
        let (_, b) = get(
            &format!("http://{admin}/v1/audit?kind=refused_write&resource=orders"),
            None,
        )
        .await;
        let v: Vec<Value> = serde_json::from_str(&b).ok()?;
        (v.len() == cases.len() + 1).then_some(v)
    })
    .await
    .expect("every refusal audited once");
    let forged = audit.iter().filter(|r| r["reason"] == "forged").count();
    assert_eq!(forged, cases.len(), "{audit:?}");

    // Failover: the watch verifies the signed grant and fences token 1 at once.
    release(&elector, "orders", "a", &t1).await;
    let t2 = acquire(&elector, "orders", "b").await;
    let fenced = eventually(10, || async {
        (put(&url, Some(&t1), Some("orders"), "late").await.0 == 409).then_some(())
    })
    .await;
    assert!(
        fenced.is_some(),
        "old leader not fenced after the signed grant"
    );
    assert_eq!(put(&url, Some(&t2), Some("orders"), "4").await.0, 200);
    let tokens: Vec<_> = up.arrivals().into_iter().filter_map(|a| a.token).collect();
    let first_t2 = tokens.iter().position(|t| *t == t2).expect("t2 arrived");
    assert!(
        tokens[first_t2..].iter().all(|t| *t == t2),
        "a t1 write landed after t2: {tokens:?}"
    );
}
