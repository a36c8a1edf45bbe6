//! `fencepost demo`: the whole story on loopback, in one process.
//!
//! An elector, an HTTP fencing proxy (watching the elector) and a toy
//! key-value upstream start on ports the OS picks, over a fresh SQLite
//! store. Two writers go through a failover in which the first pauses past
//! its lease and then writes. The exit code is the verdict: 0 only if the
//! stale write was refused and never reached the upstream.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fencing::LeaseConfig;
use serde_json::Value;
use store::{AuditQuery, Store};
use tokio::net::TcpListener;

use crate::audit_sink::AuditSink;
use crate::cli::DemoArgs;
use crate::config::{AuditConfig, Config, HttpProxyConfig};
use crate::elector::{Elector, ElectorSettings};
use crate::error::Error;
use crate::fencer::{Fencer, FencerOptions, TokenChecker};
use crate::http_proxy::{watch_elector, HttpProxy};
use crate::kv_upstream::KvUpstream;
use crate::shutdown;

const RESOURCE: &str = "orders";

async fn listener() -> Result<TcpListener, Error> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("cannot bind a loopback port", e))
}

fn addr(l: &TcpListener) -> Result<std::net::SocketAddr, Error> {
    l.local_addr().map_err(|e| Error::io("loopback port", e))
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

fn result(text: &str) {
    println!("   -> {text}");
}

struct Client {
    http: reqwest::Client,
    elector: String,
    proxy: String,
}

impl Client {
    async fn acquire(&self, holder: &str, ttl: Duration) -> Result<String, Error> {
        let resp = self
            .http
            .post(format!("{}/v1/leases/{RESOURCE}/acquire", self.elector))
            .json(&serde_json::json!({ "holder": holder, "ttl_ms": ttl.as_millis() as u64 }))
            .send()
            .await
            .map_err(|e| Error::Remote(format!("elector: {e}")))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| Error::Remote(format!("elector: {e}")))?;
        match body.get("token").and_then(Value::as_str) {
            Some(t) if status.is_success() => Ok(t.to_owned()),
            _ => Err(Error::Remote(format!(
                "elector refused {holder}: {status} {body}"
            ))),
        }
    }

    /// PUT through the proxy; returns the status and the body text.
    async fn put(&self, key: &str, value: &str, token: &str) -> Result<(u16, String), Error> {
        let resp = self
            .http
            .put(format!("{}/kv/{key}", self.proxy))
            .header("Fencing-Token", token)
            .header("Fencing-Resource", RESOURCE)
            .body(value.to_owned())
            .send()
            .await
            .map_err(|e| Error::Remote(format!("proxy: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((status, text))
    }

    async fn get(&self, key: &str) -> Result<String, Error> {
        let resp = self
            .http
            .get(format!("{}/kv/{key}", self.proxy))
            .send()
            .await
            .map_err(|e| Error::Remote(format!("proxy: {e}")))?;
        resp.text()
            .await
            .map_err(|e| Error::Remote(format!("proxy: {e}")))
    }
}

pub async fn run(args: DemoArgs) -> Result<ExitCode, Error> {
    let ttl = args.ttl.max(Duration::from_millis(200));
    let temp;
    let dir = match args.dir {
        Some(d) => d,
        None => {
            temp = std::env::temp_dir().join(format!("fencepost-demo-{}", std::process::id()));
            temp
        }
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let db = dir.join("fencepost.db");
    let _ = std::fs::remove_file(&db);
    let store_url = format!("sqlite://{}", db.display());

    // Everything on loopback ports the OS picks.
    let _ = crate::metrics::install();
    let store: Arc<dyn Store> = store::open(&store_url).await?;
    store.migrate().await?;
    let (trigger, sd) = shutdown::channel();
    let config = Config::from_parts("", "demo", std::iter::empty())?;
    let audit = AuditSink::start(Arc::clone(&store), &AuditConfig::default());
    let fencer = Arc::new(Fencer::new(
        Arc::clone(&store),
        audit.clone(),
        FencerOptions {
            store_timeout: config.fencing.store_timeout,
            drain_timeout: config.fencing.drain_timeout,
            resource_labels: true,
        },
    ));

    let (el_l, px_l, up_l) = (listener().await?, listener().await?, listener().await?);
    let (el_a, px_a, up_a) = (addr(&el_l)?, addr(&px_l)?, addr(&up_l)?);
    let upstream = KvUpstream::start(up_l)
        .await
        .map_err(|e| Error::io("cannot start the demo upstream", e))?;

    let elector = Elector::new(
        Arc::clone(&store),
        ElectorSettings {
            lease: LeaseConfig::default(),
            default_ttl: ttl,
            signer: None,
            auth_token: None,
        },
    );
    tokio::spawn(elector.serve(el_l, sd.clone()));

    let proxy_cfg: HttpProxyConfig = toml::from_str(&format!(
        "listen = \"{px_a}\"\nupstream = \"http://{up_a}\"\nelector_watch = \"http://{el_a}\"\nwatch_resources = [\"{RESOURCE}\"]\n"
    ))
    .map_err(|e| Error::Usage(format!("demo proxy config: {e}")))?;
    let checker = TokenChecker::plain();
    let proxy = HttpProxy::new(&proxy_cfg, Arc::clone(&fencer), checker.clone())?;
    tokio::spawn(proxy.serve(px_l, sd.clone(), Duration::from_secs(5)));
    tokio::spawn(watch_elector(
        Arc::clone(&fencer),
        checker,
        format!("http://{el_a}"),
        None,
        vec![RESOURCE.to_owned()],
        sd.clone(),
    ));

    let c = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Remote(e.to_string()))?,
        elector: format!("http://{el_a}"),
        proxy: format!("http://{px_a}"),
    };

    println!("fencepost demo: a leader pauses past its lease, wakes up, and tries to write.\n");
    println!("  elector        http://{el_a}   grants leases, issues increasing tokens");
    println!("  fencing proxy  http://{px_a}   in front of the upstream, watching the elector");
    println!("  upstream       http://{up_a}   a key-value store that knows nothing of leaders");
    println!(
        "  store          {}   fences, leases, audit log",
        db.display()
    );

    let pause = ttl + ttl / 2 + Duration::from_millis(300);
    step(
        1,
        &format!(
            "writer-a acquires the lease on \"{RESOURCE}\" for {}",
            humantime::format_duration(ttl)
        ),
    );
    let token_a = c.acquire("writer-a", ttl).await?;
    result(&format!("token {token_a}"));

    step(
        2,
        &format!("writer-a writes balance=100 with token {token_a}"),
    );
    let (s, _) = c.put("balance", "100", &token_a).await?;
    result(&format!(
        "{s} {}",
        if s == 200 {
            "OK: admitted and forwarded"
        } else {
            "unexpected"
        }
    ));

    step(
        3,
        &format!(
            "writer-a pauses (a GC pause, a VM migration, a partition) for {} and stops renewing",
            humantime::format_duration(pause)
        ),
    );
    tokio::time::sleep(pause).await;
    result("writer-a's lease has expired; writer-a does not know");

    step(4, "writer-b campaigns and acquires the lease");
    let token_b = c.acquire("writer-b", ttl * 4).await?;
    result(&format!("token {token_b}"));
    let fenced = {
        let fencer = Arc::clone(&fencer);
        let want: u64 = fencing::token::Presented::parse(&token_b)
            .map(|p| p.value())
            .unwrap_or(u64::MAX);
        wait_until(
            move || {
                fencer
                    .table()
                    .get(RESOURCE)
                    .is_some_and(|s| s.mark() >= want)
            },
            Duration::from_secs(5),
        )
        .await
    };
    result(if fenced {
        "the proxy saw the grant on the elector's watch stream and raised the mark before writer-b wrote anything"
    } else {
        "the proxy did not see the grant in time (watch stream)"
    });

    let before_stale = upstream.arrivals().len();
    step(5, &format!("writer-a wakes up, still believing it leads, and writes balance=90 with token {token_a}"));
    let (stale_status, stale_body) = c.put("balance", "90", &token_a).await?;
    let detail = serde_json::from_str::<Value>(&stale_body)
        .ok()
        .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or(stale_body.clone());
    result(&format!(
        "{stale_status} {}: {detail}",
        if stale_status == 409 { "Conflict" } else { "" }
    ));

    step(
        6,
        &format!("writer-b writes balance=250 with token {token_b}"),
    );
    let (s, _) = c.put("balance", "250", &token_b).await?;
    result(&format!(
        "{s} {}",
        if s == 200 {
            "OK: admitted and forwarded"
        } else {
            "unexpected"
        }
    ));

    step(7, "the audit log holds the refused write");
    audit.flush(Duration::from_secs(5)).await;
    let records = store
        .query_audit(&AuditQuery {
            resource: Some(RESOURCE.into()),
            since_ms: None,
            limit: 10,
        })
        .await?;
    for r in &records {
        println!(
            "     {} resource={} protocol={} reason={} presented={} current={} client={} detail={:?}",
            crate::admin::format_ms(r.at_ms),
            r.resource.as_deref().unwrap_or("-"),
            r.protocol.as_str(),
            r.reason.as_str(),
            r.presented_token.map_or("-".into(), |t| t.to_string()),
            r.current_token.map_or("-".into(), |t| t.to_string()),
            r.client_addr,
            r.detail,
        );
    }

    step(8, "what actually reached the upstream, from its own log");
    let arrivals = upstream.arrivals();
    for a in &arrivals {
        println!(
            "     #{} {} {} token={}",
            a.seq,
            a.method,
            a.key,
            a.token.as_deref().unwrap_or("-")
        );
    }
    let final_value = c.get("balance").await?;
    println!("     final state: balance = {final_value}");

    trigger.fire();
    audit.flush(Duration::from_secs(5)).await;

    // Anything carrying writer-a's token after it woke up is the stale write.
    let stale_reached = arrivals
        .iter()
        .skip(before_stale)
        .any(|a| a.token.as_deref() == Some(token_a.as_str()));
    let audited = records.iter().any(|r| {
        r.reason == fencing::Reason::Stale
            && r.presented_token.map(|t| t.to_string()) == Some(token_a.clone())
    });
    let held = stale_status == 409 && !stale_reached && audited && final_value == "250";
    println!();
    if held {
        println!(
            "Fencing held: the stale write was refused, audited, and never reached the upstream."
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FENCING FAILED: refused={} reached_upstream={stale_reached} audited={audited} final={final_value}",
            stale_status == 409
        );
        Ok(ExitCode::from(1))
    }
}

async fn wait_until(f: impl Fn() -> bool, total: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + total;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
