//! A worker that leads: it campaigns for a lease, writes through the
//! fencing proxies (HTTP and Postgres) with its token while it holds the
//! lease, and stops cleanly when it loses it or is asked to stop.
//!
//! ```sh
//! fencepost serve --config fencepost.toml    # elector, [[http]] and [[postgres]] proxies
//! psql -h 127.0.0.1 -p 5432 -d app -c 'CREATE TABLE worker_log (holder text, token bigint, n int)'
//! WORKER_HOLDER=w1 cargo run -p fencepost-client --features tokio-postgres --example leader_worker
//! ```
//!
//! Settings (environment, with defaults):
//! - `FENCEPOST_ELECTOR_URL` (`http://127.0.0.1:7070`), `FENCEPOST_ELECTOR_TOKEN`
//! - `WORKER_RESOURCE` (`orders`), `WORKER_HOLDER` (`worker-<pid>`),
//!   `WORKER_TTL_MS` (`10000`), `WORKER_INTERVAL_MS` (`200`)
//! - `WORKER_HTTP` (`http://127.0.0.1:8080/kv/`): each write is a PUT of
//!   `<WORKER_HTTP><n>`
//! - `WORKER_PG` (`host=127.0.0.1 port=6432 user=postgres dbname=app`):
//!   each write also inserts into `worker_log(holder, token, n)`
//!
//! It prints one line per event (`leading`, `wrote`, `refused`, `lost`,
//! `stopped`) and exits 0 once stopped cleanly, whatever the reason.

use std::time::Duration;

use fencepost_client::pg::{fence_tokio_postgres, refusal_tokio_postgres};
use fencepost_client::{Error, FencedClient, Lease, LeaseKeeper, Refusal, RequestBuilderExt};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Why the worker stopped writing.
enum Stop {
    Lost(String),
    Refused(Refusal),
    Asked,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let elector = env("FENCEPOST_ELECTOR_URL", "http://127.0.0.1:7070");
    let resource = env("WORKER_RESOURCE", "orders");
    let holder = env("WORKER_HOLDER", &format!("worker-{}", std::process::id()));
    let http_base = env("WORKER_HTTP", "http://127.0.0.1:8080/kv/");
    let pg = env(
        "WORKER_PG",
        "host=127.0.0.1 port=6432 user=postgres dbname=app",
    );
    let interval = env_ms("WORKER_INTERVAL_MS", 200);

    // One term only: after a loss this worker stops instead of campaigning
    // again (a supervisor restarts it, and it campaigns afresh).
    let mut keeper = LeaseKeeper::builder(&elector, &resource, &holder)
        .ttl(env_ms("WORKER_TTL_MS", 10_000))
        .campaign_again(false);
    if let Ok(t) = std::env::var("FENCEPOST_ELECTOR_TOKEN") {
        keeper = keeper.bearer_token(t);
    }
    let keeper = keeper.start()?;

    let lease = tokio::select! {
        l = keeper.leading() => l?,
        _ = tokio::signal::ctrl_c() => {
            keeper.shutdown().await;
            println!("stopped before leading");
            return Ok(());
        }
    };
    println!("leading {resource} token={}", lease.token());

    let stop = work(&lease, &http_base, &pg, &holder, interval).await?;
    match &stop {
        Stop::Lost(reason) => println!("lost the lease: {reason}"),
        Stop::Refused(r) => println!("refused: {r}"),
        Stop::Asked => println!("asked to stop"),
    }
    // Releases the lease if it is still ours, so a successor need not
    // wait out the TTL.
    keeper.shutdown().await;
    println!("stopped");
    Ok(())
}

/// Writes until the lease is lost, a proxy refuses, or Ctrl-C. Each
/// write runs to its end: one that was already on its way when the lease
/// was lost is the fencing proxies' to refuse.
async fn work(
    lease: &Lease,
    http_base: &str,
    pg: &str,
    holder: &str,
    interval: Duration,
) -> Result<Stop, Box<dyn std::error::Error>> {
    // This term's connection: its token rides in the startup options.
    let mut config: tokio_postgres::Config = pg.parse()?;
    fence_tokio_postgres(&mut config, lease.fencing());
    let (db, conn) = config.connect(tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    // Fences with this lease only; once it is lost, nothing is sent.
    let http = FencedClient::new(reqwest::Client::new(), lease);
    let token = i64::try_from(lease.token().value())?;

    let mut n: i32 = 0;
    let stop = loop {
        if let Some(loss) = lease.loss() {
            break Stop::Lost(loss.reason.to_string());
        }
        n += 1;
        let put = match http.put(format!("{http_base}{n}")) {
            Ok(req) => req.body(format!("{holder} {n}")).send_fenced().await,
            Err(e) => Err(e),
        };
        match put {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => return Err(format!("upstream answered {}", resp.status()).into()),
            Err(Error::Refused(r)) => break Stop::Refused(*r),
            Err(Error::NotLeading { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
        let insert = db
            .execute(
                "INSERT INTO worker_log (holder, token, n) VALUES ($1, $2, $3)",
                &[
                    &holder as &(dyn tokio_postgres::types::ToSql + Sync),
                    &token,
                    &n,
                ],
            )
            .await;
        if let Err(e) = insert {
            match refusal_tokio_postgres(&e) {
                Some(r) => break Stop::Refused(r),
                None => return Err(e.into()),
            }
        }
        println!("wrote n={n} token={token}");
        tokio::select! {
            loss = lease.lost() => break Stop::Lost(loss.reason.to_string()),
            _ = tokio::signal::ctrl_c() => break Stop::Asked,
            _ = tokio::time::sleep(interval) => {}
        }
    };
    drop(db);
    let _ = conn.await;
    Ok(stop)
}
