//! `fencepost demo`: the whole story on loopback, in one process.
//!
//! An elector, an HTTP fencing proxy (watching the elector) and a toy
//! key-value upstream start on ports the OS picks, over a fresh SQLite
//! store. Two writers go through a failover in which the first pauses past
//! its lease and then writes. The exit code is the verdict: 0 only if the
//! stale write was refused and never reached the upstream.
//!
//! The writers are written with `fencepost-client` (a `LeaseKeeper`, the
//! reqwest helpers, typed refusals), the way a user writes a leader, so the
//! showcase is also the crate's example. writer-a runs on a runtime of its
//! own, on its own thread, so the demo can freeze it whole, keeper and all.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fencepost_client::{LeaseKeeper, Refusal, RefusedBy, RequestBuilderExt};
use fencing::{LeaseConfig, ResourceName};
use store::{AuditQuery, Store};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

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

/// What writer-a's thread reports to the narrator.
enum FromA {
    Leading(String),
    Wrote(Result<u16, String>),
    /// Token read, request built: about to send, and now frozen.
    Frozen,
    /// The write sent on waking: the status, or the typed refusal.
    Stale(Result<u16, Refusal>),
    /// Its keeper's loss notice on waking, and how long after the wake.
    Lost(String, Duration),
    Failed(String),
}

/// writer-a, written the way a user writes a leader with
/// `fencepost-client`, on its own single-threaded runtime and thread. The
/// demo freezes that thread with a blocking wait, which stops everything
/// on the runtime at once (the keeper's renewals included), as a GC pause
/// or a VM migration stops a whole process.
fn spawn_writer_a(
    elector: String,
    proxy: String,
    ttl: Duration,
    tell: mpsc::UnboundedSender<FromA>,
    wake: std::sync::mpsc::Receiver<()>,
) {
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tell.send(FromA::Failed(format!("writer-a runtime: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            if let Err(e) = writer_a(&elector, &proxy, ttl, &tell, wake).await {
                let _ = tell.send(FromA::Failed(format!("writer-a: {e}")));
            }
        });
    });
}

async fn writer_a(
    elector: &str,
    proxy: &str,
    ttl: Duration,
    tell: &mpsc::UnboundedSender<FromA>,
    wake: std::sync::mpsc::Receiver<()>,
) -> Result<(), fencepost_client::Error> {
    let keeper = LeaseKeeper::builder(elector, RESOURCE, "writer-a")
        .ttl(ttl)
        .campaign_again(false)
        .start()?;
    let lease = keeper.leading().await?;
    let _ = tell.send(FromA::Leading(lease.token().to_string()));
    let http = reqwest::Client::new();
    let url = format!("{proxy}/kv/balance");

    let wrote = http
        .put(&url)
        .fencing(lease.fencing())
        .body("100")
        .send_fenced()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    let _ = tell.send(FromA::Wrote(wrote));

    // The next write is ready, token attached ...
    let next = http.put(&url).fencing(lease.fencing()).body("90");
    let _ = tell.send(FromA::Frozen);
    // ... and the whole process stops until the narrator wakes it.
    let _ = wake.recv();
    let woke = Instant::now();
    let stale = match next.send_fenced().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(fencepost_client::Error::Refused(r)) => Err(*r),
        Err(e) => return Err(e),
    };
    let _ = tell.send(FromA::Stale(stale));
    let loss = lease.lost().await;
    let _ = tell.send(FromA::Lost(
        loss.reason.to_string(),
        loss.at.saturating_duration_since(woke),
    ));
    keeper.shutdown().await;
    Ok(())
}

/// The next report from writer-a, bounded so a stuck demo fails instead
/// of hanging.
async fn from_a(rx: &mut mpsc::UnboundedReceiver<FromA>) -> Result<FromA, Error> {
    match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
        Ok(Some(FromA::Failed(e))) => Err(Error::Remote(e)),
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(Error::Remote("writer-a stopped".into())),
        Err(_) => Err(Error::Remote("writer-a did not answer in 30s".into())),
    }
}

fn unexpected(what: &str) -> Error {
    Error::Remote(format!("writer-a: unexpected {what}"))
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
    let config = Config::from_parts("", "demo", std::iter::empty())?;
    let store: Arc<dyn Store> = store::open(&store_url, config.fencing.store_timeout).await?;
    store.migrate().await?;
    let (trigger, sd) = shutdown::channel();
    let spool = crate::audit_spool::default_path(&store_url, &[]);
    let spool = crate::audit_spool::Spool::open(spool, AuditConfig::default().spool_max_bytes)
        .map_err(|e| Error::Usage(format!("audit spool: {e}")))?;
    let audit = AuditSink::start(Arc::clone(&store), &AuditConfig::default(), spool);
    let fencer = Arc::new(Fencer::new(
        Arc::clone(&store),
        audit.clone(),
        FencerOptions {
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
            access: None,
            audit_renewals: false,
            resource_labels: true,
        },
        audit.clone(),
    );
    tokio::spawn(elector.serve(el_l, None, sd.clone()));

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
        vec![ResourceName::new(RESOURCE).map_err(|e| Error::Usage(format!("demo resource: {e}")))?],
        sd.clone(),
    ));

    let elector_url = format!("http://{el_a}");
    let proxy_url = format!("http://{px_a}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::Remote(e.to_string()))?;

    println!("fencepost demo: a leader pauses past its lease, wakes up, and tries to write.\n");
    println!("  elector        {elector_url}   grants leases, issues increasing tokens");
    println!("  fencing proxy  {proxy_url}   in front of the upstream, watching the elector");
    println!("  upstream       http://{up_a}   a key-value store that knows nothing of leaders");
    println!(
        "  store          {}   fences, leases, audit log",
        db.display()
    );
    println!("  writers        two leaders written with the fencepost-client crate (LeaseKeeper)");

    step(
        1,
        &format!(
            "writer-a starts a LeaseKeeper on \"{RESOURCE}\" (TTL {}) and waits until it leads",
            humantime::format_duration(ttl)
        ),
    );
    let (tell, mut from_a_rx) = mpsc::unbounded_channel();
    let (wake_a, wake_rx) = std::sync::mpsc::channel();
    spawn_writer_a(elector_url.clone(), proxy_url.clone(), ttl, tell, wake_rx);
    let FromA::Leading(token_a) = from_a(&mut from_a_rx).await? else {
        return Err(unexpected("report instead of its token"));
    };
    result(&format!(
        "leading with token {token_a}; its keeper renews every third of the TTL"
    ));

    step(
        2,
        &format!(
            "writer-a writes balance=100 with token {token_a} (Fencing-Token, Fencing-Resource)"
        ),
    );
    let FromA::Wrote(wrote) = from_a(&mut from_a_rx).await? else {
        return Err(unexpected("report instead of its first write"));
    };
    result(&match wrote {
        Ok(200) => "200 OK: admitted and forwarded".to_owned(),
        Ok(s) => format!("{s} unexpected"),
        Err(e) => format!("failed: {e}"),
    });

    step(
        3,
        "writer-a builds its next write (balance=90, its token attached) and freezes before sending it: a GC pause, a VM migration. Its keeper is frozen too and cannot renew",
    );
    let FromA::Frozen = from_a(&mut from_a_rx).await? else {
        return Err(unexpected("report instead of freezing"));
    };
    let frozen_at = Instant::now();
    result("writer-a is frozen");

    step(4, "writer-b starts a LeaseKeeper and campaigns; it retries with jittered backoff while writer-a's lease is live");
    let keeper_b = LeaseKeeper::builder(&elector_url, RESOURCE, "writer-b")
        .ttl(ttl * 4)
        .start()
        .map_err(|e| Error::Remote(e.to_string()))?;
    let lease_b = tokio::time::timeout(Duration::from_secs(30), keeper_b.leading())
        .await
        .map_err(|_| Error::Remote("writer-b did not get the lease in 30s".into()))?
        .map_err(|e| Error::Remote(e.to_string()))?;
    let token_b = lease_b.token().to_string();
    result(&format!(
        "writer-a's lease expired unrenewed; writer-b leads with token {token_b}, {} after writer-a froze",
        humantime::format_duration(round_ms(frozen_at.elapsed()))
    ));
    let fenced = {
        let fencer = Arc::clone(&fencer);
        let want = lease_b.token().value();
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
    step(
        5,
        &format!("writer-a wakes up, still believing it leads, and its write goes out: balance=90 with token {token_a}"),
    );
    let _ = wake_a.send(());
    let FromA::Stale(stale) = from_a(&mut from_a_rx).await? else {
        return Err(unexpected("report instead of its stale write"));
    };
    let stale_status = match &stale {
        Ok(s) => {
            result(&format!("{s}: the write was NOT refused"));
            *s
        }
        Err(r) => {
            let status = match &r.refused_by {
                RefusedBy::Http { status, .. } => *status,
                RefusedBy::Postgres { .. } => 0,
            };
            result(&format!("{status} Conflict: {}", r.detail));
            result(&format!(
                "writer-a's client reads it as Refusal {{ kind: {}, presented: {}, current: {} }}",
                r.kind,
                r.presented_token.map_or("-".into(), |t| t.to_string()),
                r.current_token.map_or("-".into(), |t| t.to_string()),
            ));
            status
        }
    };
    if let FromA::Lost(reason, after) = from_a(&mut from_a_rx).await? {
        result(&format!(
            "writer-a's keeper, waking with it, fired the loss {:.1} ms after the wake ({reason}): too late for a write already built, which is why the proxy is there",
            after.as_secs_f64() * 1000.0
        ));
    }

    step(
        6,
        &format!("writer-b writes balance=250 with token {token_b}"),
    );
    let wrote_b = http
        .put(format!("{proxy_url}/kv/balance"))
        .fencing(lease_b.fencing())
        .body("250")
        .send_fenced()
        .await;
    result(&match wrote_b {
        Ok(r) if r.status() == 200 => "200 OK: admitted and forwarded".to_owned(),
        Ok(r) => format!("{} unexpected", r.status()),
        Err(e) => format!("failed: {e}"),
    });

    step(7, "the audit log holds the refused write");
    audit.flush(Duration::from_secs(5)).await;
    let records = store
        .query_audit(&AuditQuery {
            resource: Some(RESOURCE.into()),
            since_ms: None,
            kind: Some(fencing::Kind::RefusedWrite),
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
    let final_value = http
        .get(format!("{proxy_url}/kv/balance"))
        .send()
        .await
        .map_err(|e| Error::Remote(format!("proxy: {e}")))?
        .text()
        .await
        .map_err(|e| Error::Remote(format!("proxy: {e}")))?;
    println!("     final state: balance = {final_value}");

    step(
        9,
        "writer-b shuts its keeper down, which releases the lease",
    );
    keeper_b.shutdown().await;
    result("released: the next candidate need not wait out the TTL");

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

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
