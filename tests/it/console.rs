//! The console (`GET /ui` on the admin port) in a real headless Chromium:
//! a real `fencepost serve` with the elector, an HTTP proxy and an admin
//! token goes through a failover and refuses the old leader's write; the
//! browser signs in through the page's form and the test reads what the
//! page shows (the live holder and token, the mark, the refusal, the lease
//! events, the timeline), sees a new refusal arrive without a reload, and
//! pages and searches 2,000 resources. A screenshot is kept under the
//! target dir (`target/tmp/console/`).
//!
//! And over plain HTTP: without the token, `/ui` is the sign-in page and
//! nothing else, every data endpoint answers 401; the listings page and
//! search server-side and stay whole without parameters.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::browser::{artifact_dir, Browser};
use crate::support::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "console-test-admin-token";
const RESOURCE: &str = "orders";

async fn lease(el: SocketAddr, action: &str, body: Value) -> Resp {
    send(
        client()
            .post(format!("http://{el}/v1/leases/{RESOURCE}/{action}"))
            .json(&body),
    )
    .await
}

fn granted(r: &Resp) -> String {
    assert_eq!(r.status, 200, "expected a grant: {}", r.text);
    r.body["token"].as_str().expect("token").to_owned()
}

async fn write(http: SocketAddr, token: &str) -> u16 {
    put(
        &format!("http://{http}/kv/{RESOURCE}"),
        Some(token),
        Some(RESOURCE),
        "v",
    )
    .await
    .0
}

/// 2,000 more marks, straight into the store's file in one transaction:
/// the page is about showing thousands, not about making them.
async fn seed_fences(db: &std::path::Path, n: usize) {
    let url = format!("sqlite://{}", db.display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the store");
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..n {
        sqlx::query("INSERT INTO fences (resource, token, updated_at_ms) VALUES (?1, ?2, ?3)")
            .bind(format!("bulk/r{i:04}"))
            .bind(format!("{:020}", i + 1))
            .bind(1_700_000_000_000i64 + i as i64)
            .execute(&mut *tx)
            .await
            .expect("insert a mark");
    }
    tx.commit().await.expect("commit");
    pool.close().await;
}

/// The text of the first element matching `css`, or null.
const TEXT: &str =
    "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";
/// The same, but null while the text is empty.
const TEXT_SOME: &str =
    "const e = document.querySelector(arguments[0]); return e && e.textContent ? e.textContent : null;";

#[tokio::test]
async fn the_console_shows_a_failover_live_in_a_real_browser() {
    let dir = TempDir::new("fp-console");
    let up = Upstream::start().await;
    let db = dir.path().join("fencepost.db");
    let mut conf = Conf::sqlite(dir.path());
    conf.set("audit", "flush_interval", "20ms");
    let admin = conf.admin(Section::new().set("token", ADMIN_TOKEN));
    let el = conf.elector(Section::new().set("min_ttl", "50ms"));
    let http = conf.http(Section::to(format!("http://{}", up.addr)));
    let server = Server::run(dir.path(), conf).await;

    // The failover: A leads and writes, lets go; B takes over with a
    // newer token and writes; A, still believing it leads, is refused.
    let a = granted(&lease(el, "acquire", json!({"holder": "node-a", "ttl_ms": 60_000})).await);
    assert_eq!(write(http, &a).await, 200, "{}", server.log_text());
    let released = lease(el, "release", json!({"holder": "node-a", "token": a})).await;
    assert_eq!(released.status, 204, "{}", released.text);
    let b = granted(&lease(el, "acquire", json!({"holder": "node-b", "ttl_ms": 60_000})).await);
    assert!(token_value(&b) > token_value(&a));
    assert_eq!(write(http, &b).await, 200);
    assert_eq!(write(http, &a).await, 409, "the stale write is refused");

    let browser = Browser::start().await;
    browser.goto(&format!("http://{admin}/ui")).await;
    browser
        .wait_for(
            "the sign-in form",
            60,
            "return !document.querySelector('#signin').hidden && document.querySelector('#app').hidden;",
            json!([]),
        )
        .await;

    // A wrong token: the form says so and shows no data.
    browser.type_into("#token", "not-the-token").await;
    browser.click("#signin-submit").await;
    let said = browser
        .wait_for(
            "the wrong-token message",
            30,
            TEXT_SOME,
            json!(["#signin-error"]),
        )
        .await;
    let said = said.as_str().unwrap_or_default().to_owned();
    assert!(said.contains("Wrong token"), "the form said {said:?}");
    let app_hidden = browser
        .script("return document.querySelector('#app').hidden;", json!([]))
        .await;
    assert_eq!(app_hidden, json!(true));

    // The right one.
    browser.clear("#token").await;
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#signin-submit").await;

    // B holds the lease with its token, and the time left counts down.
    let row = browser
        .wait_for(
            "B's lease",
            30,
            "const r = document.querySelector(`#leases tr[data-resource='${arguments[0]}']`);
             if (!r || r.querySelector('.holder').textContent !== 'node-b') return null;
             return [r.querySelector('.token').textContent, r.querySelector('.left').textContent];",
            json!([RESOURCE]),
        )
        .await;
    assert_eq!(row[0], json!(token_value(&b).to_string()));
    let left = |v: &Value| -> f64 {
        v.as_str()
            .and_then(|s| s.strip_suffix(" s"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("time left reads {v}"))
    };
    let first = left(&row[1]);
    assert!(first > 0.0 && first <= 60.0, "time left {first}");
    browser
        .wait_for(
            "the time left counting down",
            30,
            "const t = document.querySelector(`#leases tr[data-resource='${arguments[0]}'] .left`).textContent;
             return parseFloat(t) < arguments[1];",
            json!([RESOURCE, first]),
        )
        .await;

    // The mark is B's token.
    let mark = browser
        .wait_for(
            "the mark",
            30,
            "const r = document.querySelector(`#fences tr[data-resource='${arguments[0]}'] .token`);
             return r ? r.textContent : null;",
            json!([RESOURCE]),
        )
        .await;
    assert_eq!(mark, json!(token_value(&b).to_string()));

    // The refused write and the lease events, newest first.
    let kinds_js = "return Array.from(document.querySelectorAll('#audit tbody tr'))
                      .map(r => r.dataset.kind);";
    let kinds = browser
        .wait_for(
            "the audit records",
            30,
            &format!(
                "const k = (() => {{ {kinds_js} }})();
                 return k.includes('refused_write') && k.filter(x => x === 'lease_granted').length === 2 ? k : null;"
            ),
            json!([]),
        )
        .await;
    assert_eq!(
        kinds,
        json!([
            "refused_write",
            "lease_granted",
            "lease_released",
            "lease_granted"
        ])
    );
    let refused = browser
        .script(
            "const r = document.querySelector(\"#audit tr[data-kind='refused_write']\");
             return Array.from(r.querySelectorAll('td')).map(td => td.textContent);",
            json!([]),
        )
        .await;
    assert_eq!(refused[2], json!(RESOURCE));
    assert_eq!(refused[4], json!(token_value(&a).to_string()), "presented");
    assert_eq!(refused[5], json!(token_value(&b).to_string()), "current");
    assert_eq!(refused[6], json!("stale"));

    // Live: the event stream is open; a new refusal appears without a
    // reload (the marker set on this document survives).
    browser
        .wait_for(
            "the stream to be live",
            30,
            "return document.querySelector('#live').textContent === 'live';",
            json!([]),
        )
        .await;
    browser
        .script("window.notReloaded = true; return null;", json!([]))
        .await;
    assert_eq!(write(http, &a).await, 409);
    browser
        .wait_for(
            "the second refusal, live",
            30,
            "return document.querySelectorAll(\"#audit tr[data-kind='refused_write']\").length === 2
                 && document.querySelector(\"#audit tr[data-kind='refused_write']\").classList.contains('fresh');",
            json!([]),
        )
        .await;
    assert_eq!(
        browser
            .script("return window.notReloaded === true;", json!([]))
            .await,
        json!(true),
        "the page was not reloaded"
    );

    // The kind filter.
    browser
        .script(
            "const s = document.querySelector('#audit-kind'); s.value = 'lease_granted';
             s.dispatchEvent(new Event('change')); return null;",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "only grants",
            30,
            &format!(
                "const k = (() => {{ {kinds_js} }})();
                 return k.length === 2 && k.every(x => x === 'lease_granted');"
            ),
            json!([]),
        )
        .await;

    // The timeline of the resource: two grants, two refusals.
    browser
        .click(&format!(
            "#leases tr[data-resource='{RESOURCE}'] button.link"
        ))
        .await;
    browser
        .wait_for(
            "the timeline",
            30,
            "return document.querySelectorAll('#timeline circle.grant').length === 2
                 && document.querySelectorAll('#timeline path.refused').length === 2;",
            json!([]),
        )
        .await;

    // 2,000 resources: the page shows one page of them (the stream says
    // the fences changed), and a search finds one.
    seed_fences(&db, 2000).await;
    let range = browser
        .wait_for(
            "the 2,001 marks",
            30,
            "const t = document.querySelector('#fences-range').textContent;
             return t.endsWith('of 2001') ? t : null;",
            json!([]),
        )
        .await;
    assert_eq!(range, json!("1\u{2013}50 of 2001"));
    let shown = browser
        .script(
            "return document.querySelectorAll('#fences tbody tr').length;",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(50));
    browser.type_into("#fences-q", "r1234").await;
    let found = browser
        .wait_for(
            "the search result",
            30,
            "const rows = document.querySelectorAll('#fences tbody tr');
             return rows.length === 1 ? [rows[0].dataset.resource,
                 rows[0].querySelector('.token').textContent] : null;",
            json!([]),
        )
        .await;
    assert_eq!(found, json!(["bulk/r1234", "1235"]));
    assert_eq!(
        browser.script(TEXT, json!(["#fences-range"])).await,
        json!("1\u{2013}1 of 1")
    );
    // Back to the first page, and the next one.
    browser.clear("#fences-q").await;
    browser
        .script(
            "document.querySelector('#fences-q').dispatchEvent(new Event('input')); return null;",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the first page again",
            30,
            "return document.querySelector('#fences-range').textContent === '1\u{2013}50 of 2001';",
            json!([]),
        )
        .await;
    browser.click("#fences-panel button[data-dir='1']").await;
    browser
        .wait_for(
            "the second page",
            30,
            "return document.querySelector('#fences-range').textContent === '51\u{2013}100 of 2001';",
            json!([]),
        )
        .await;

    // Back to every kind for the picture.
    browser
        .script(
            "const s = document.querySelector('#audit-kind'); s.value = '';
             s.dispatchEvent(new Event('change')); return null;",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "every kind again",
            30,
            &format!("return (() => {{ {kinds_js} }})().length === 5;"),
            json!([]),
        )
        .await;
    browser.click("#fences-panel button[data-dir='-1']").await;
    browser
        .wait_for(
            "the first page for the picture",
            30,
            "return document.querySelector('#fences-range').textContent === '1\u{2013}50 of 2001';",
            json!([]),
        )
        .await;
    let shot = artifact_dir().join("console.png");
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 10_000);
    browser.quit().await;
    drop(server);
}

#[tokio::test]
async fn without_the_token_the_console_is_a_sign_in_page_and_the_data_is_401() {
    let dir = TempDir::new("fp-console-http");
    let up = Upstream::start().await;
    let mut conf = Conf::sqlite(dir.path());
    let admin = conf.admin(Section::new().set("token", ADMIN_TOKEN));
    let el = conf.elector(Section::new());
    let http = conf.http(Section::to(format!("http://{}", up.addr)));
    let server = InProc::start(conf).await;

    let page = send(client().get(format!("http://{admin}/ui"))).await;
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    assert!(page.text.contains("id=\"signin-form\""));
    let csp = page.header("content-security-policy").unwrap_or_default();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(part), "CSP {csp:?} lacks {part}");
    }
    // Everything the page loads comes from this server.
    for src in ["/ui/app.js", "/ui/app.css"] {
        assert!(page.text.contains(&format!("\"{src}\"")), "{src}");
        let asset = send(client().get(format!("http://{admin}{src}"))).await;
        assert_eq!(asset.status, 200, "{src}");
        assert!(asset.header("content-security-policy").is_some());
    }
    assert!(!page.text.contains("http://") && !page.text.contains("https://"));

    for path in [
        "/v1/fences",
        "/v1/leases",
        "/v1/audit",
        "/v1/replicas",
        "/v1/events",
    ] {
        let r = send(client().get(format!("http://{admin}{path}"))).await;
        assert_eq!(r.status, 401, "{path} without the token");
        let r = send(
            client()
                .get(format!("http://{admin}{path}"))
                .bearer_auth("wrong"),
        )
        .await;
        assert_eq!(r.status, 401, "{path} with a wrong token");
        let r = send(
            client()
                .get(format!("http://{admin}{path}"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(r.status, 200, "{path} with the token: {}", r.text);
    }

    // Listings page and search in the store; without parameters they are
    // whole, as before.
    for (i, r) in ["app/a", "app/b", "jobs/c"].iter().enumerate() {
        let acquired = send(
            client()
                .post(format!("http://{el}/v1/leases/{r}/acquire"))
                .json(&json!({"holder": "h"})),
        )
        .await;
        granted(&acquired);
        // Plain tokens: the proxy takes any; 5 leaves room for a stale 4.
        let (code, body) = put(&format!("http://{http}/kv/x{i}"), Some("5"), Some(r), "v").await;
        assert_eq!(code, 200, "{body}");
    }
    let list = |base: String, query: &'static str| async move {
        let r = send(
            client()
                .get(format!("{base}?{query}"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(r.status, 200, "{query}: {}", r.text);
        let names: Vec<String> = r
            .body
            .as_array()
            .expect("an array")
            .iter()
            .map(|v| v["resource"].as_str().unwrap_or_default().to_owned())
            .collect();
        (
            names,
            r.header("x-total-count").unwrap_or_default().to_owned(),
        )
    };
    for base in [
        format!("http://{admin}/v1/fences"),
        format!("http://{admin}/v1/leases"),
        format!("http://{el}/v1/leases"),
    ] {
        assert_eq!(
            list(base.clone(), "").await,
            (
                vec!["app/a".into(), "app/b".into(), "jobs/c".into()],
                "3".into()
            ),
            "{base}"
        );
        assert_eq!(
            list(base.clone(), "limit=2").await,
            (vec!["app/a".into(), "app/b".into()], "3".into())
        );
        assert_eq!(
            list(base.clone(), "limit=2&offset=2").await,
            (vec!["jobs/c".into()], "3".into())
        );
        assert_eq!(
            list(base.clone(), "q=app/&offset=1").await,
            (vec!["app/b".into()], "2".into())
        );
        assert_eq!(list(base.clone(), "q=nothing").await, (vec![], "0".into()));
        let bad = send(
            client()
                .get(format!("{base}?limit=0"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(bad.status, 400, "{base}");
    }
    // A lease as the admin API shows it: holder, token, time left.
    let r = send(
        client()
            .get(format!("http://{admin}/v1/leases?q=jobs/"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    let l = &r.body[0];
    assert_eq!(l["holder"], "h");
    assert_eq!(l["live"], true);
    assert!(l["time_left_ms"].as_i64().is_some_and(|t| t > 0), "{l}");

    // The event stream greets, then says what changed.
    let mut events = client()
        .get(format!("http://{admin}/v1/events"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("events");
    assert_eq!(
        events.headers()["content-type"]
            .to_str()
            .unwrap_or_default(),
        "text/event-stream"
    );
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "event: hello").await;
    let (code, _) = put(
        &format!("http://{http}/kv/x0"),
        Some("4"),
        Some("app/a"),
        "v",
    )
    .await;
    assert_eq!(code, 409);
    read_until(&mut events, &mut seen, "event: audit").await;
    assert!(seen.contains("\"kind\":\"refused_write\""), "{seen}");

    // An open console does not hold a shutdown up: its stream ends.
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || server.shutdown()),
    )
    .await
    .expect("shutdown with an event stream open finished");
    assert_eq!(stopped.expect("the shutdown thread"), Ok(()));
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the event stream ended with the server");
}

/// Without `[admin] token` the page opens on the data at once (no
/// sign-in), and a release shows up live.
#[tokio::test]
async fn without_an_admin_token_the_console_opens_on_the_data() {
    let dir = TempDir::new("fp-console-open");
    let mut conf = Conf::sqlite(dir.path());
    conf.set("audit", "flush_interval", "20ms");
    let admin = conf.admin(Section::new());
    let el = conf.elector(Section::new());
    let _server = InProc::start(conf).await;
    let token = granted(&lease(el, "acquire", json!({"holder": "solo", "ttl_ms": 60_000})).await);

    let browser = Browser::start().await;
    browser.goto(&format!("http://{admin}/ui")).await;
    let holder = browser
        .wait_for(
            "the lease, without signing in",
            60,
            "const r = document.querySelector(`#leases tr[data-resource='${arguments[0]}'] .holder`);
             return r && document.querySelector('#signin').hidden ? r.textContent : null;",
            json!([RESOURCE]),
        )
        .await;
    assert_eq!(holder, json!("solo"));
    assert_eq!(
        browser
            .script(
                "return document.querySelector('#signout').hidden;",
                json!([])
            )
            .await,
        json!(true),
        "nothing to sign out of"
    );
    browser
        .wait_for(
            "the stream to be live",
            30,
            "return document.querySelector('#live').textContent === 'live';",
            json!([]),
        )
        .await;
    let released = lease(el, "release", json!({"holder": "solo", "token": token})).await;
    assert_eq!(released.status, 204, "{}", released.text);
    browser
        .wait_for(
            "the release, live",
            30,
            "const r = document.querySelector(`#leases tr[data-resource='${arguments[0]}']`);
             return r && r.querySelector('.holder').textContent === '\u{2014}'
                 && r.querySelector('.left').textContent === 'free'
                 && document.querySelector(\"#audit tr[data-kind='lease_released']\") !== null;",
            json!([RESOURCE]),
        )
        .await;
    browser.quit().await;
}

/// Reads the event stream into `seen` until it holds `want`.
async fn read_until(events: &mut reqwest::Response, seen: &mut String, want: &str) {
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.contains(want) {
            let chunk = events.chunk().await.expect("stream").expect("open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(got.is_ok(), "no {want:?} in {seen:?}");
}

/// On a tier (two replicas on one Postgres store) the page lists the
/// replicas and, beside a fence, each replica's own mark.
#[tokio::test]
async fn on_a_tier_the_console_shows_each_replicas_mark() {
    let db = TestDb::create("console_tier").await;
    let up = Upstream::start().await;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let dir = TempDir::new("fp-console-tier");
        let (http, admin) = (free_addr(), free_addr());
        let config = format!(
            r#"store = "{}"
[fencing]
store_timeout = "1s"
[cluster]
replica_ttl = "2000ms"
[admin]
listen = "{admin}"
[[http]]
listen = "{http}"
upstream = "http://{}"
"#,
            db.url, up.addr
        );
        let server = Server::start(dir.path(), &config);
        wait_port(http).await;
        wait_port(admin).await;
        replicas.push((dir, server, http, admin));
    }
    // Both join: token 1 is admitted through each.
    for (_, server, http, _) in &replicas {
        let ok = eventually(30, || async {
            (put(&format!("http://{http}/w"), Some("1"), Some("r"), "x")
                .await
                .0
                == 200)
                .then_some(())
        })
        .await;
        assert!(ok.is_some(), "{}", server.log_text());
    }
    // An advance through the first: the second acknowledges 2 before it
    // is admitted.
    let first = replicas[0].2;
    assert_eq!(
        put(&format!("http://{first}/w"), Some("2"), Some("r"), "x")
            .await
            .0,
        200
    );
    let (_, me) = get(&format!("http://{}/v1/replicas", replicas[1].3), None).await;
    let me: Value = serde_json::from_str(&me).unwrap();
    let second = me["self"]["id"]
        .as_str()
        .expect("the second's id")
        .to_owned();

    let browser = Browser::start().await;
    browser.goto(&format!("http://{}/ui", replicas[0].3)).await;
    let rows = browser
        .wait_for(
            "both replicas",
            60,
            "const r = document.querySelectorAll('#replicas tbody tr');
             return !document.querySelector('#replicas-panel').hidden && r.length === 2
                 ? Array.from(r).map(x => x.dataset.replica) : null;",
            json!([]),
        )
        .await;
    assert!(rows.as_array().unwrap().contains(&json!(second)), "{rows}");
    let marks = browser
        .wait_for(
            "the per-replica marks",
            30,
            "const c = document.querySelector(`#fences tr[data-resource='r'] td.per-replica`);
             return c ? Array.from(c.querySelectorAll('.mark')).map(m => m.textContent) : null;",
            json!([]),
        )
        .await;
    assert!(
        marks
            .as_array()
            .unwrap()
            .contains(&json!(format!("{second}: 2"))),
        "{marks}"
    );
    browser
        .screenshot(&artifact_dir().join("console-tier.png"))
        .await;
    browser.quit().await;
}
