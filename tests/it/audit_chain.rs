//! Tamper evidence, end to end: records written by the real binary
//! (refused writes through the proxy, the elector's grants and denials)
//! verify with `fencepost audit verify`; an edited row, then a deleted one,
//! make it exit 3 naming that record; and the chains survive a kill -9 in
//! the middle of a flood, with the store up and with the store down (the
//! records then travel through the spool). SQLite and Postgres alike.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use sqlx::Connection;

use crate::support::*;

/// `fencepost audit verify --config <cfg>`: (exit code, stdout, stderr).
fn verify(server: &Server) -> (i32, String, String) {
    let cfg = server.config.to_string_lossy().into_owned();
    run_cli(&["audit", "verify", "--config", &cfg], &[])
}

/// `fencepost audit verify --store <url>`.
fn verify_store(url: &str) -> (i32, String, String) {
    run_cli(&["audit", "verify", "--store", url], &[])
}

/// Runs one statement on the store behind the proxy's back, as someone
/// with write access to the database would.
async fn tamper(store: &str, sql: &str) {
    if store.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(store).await.unwrap();
        let done = sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        assert_eq!(done.rows_affected(), 1, "{sql}");
    } else {
        let mut c = sqlx::PgConnection::connect(store).await.unwrap();
        sqlx::raw_sql("SET search_path = fencepost_store")
            .execute(&mut c)
            .await
            .unwrap();
        let done = sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        assert_eq!(done.rows_affected(), 1, "{sql}");
    }
}

/// Every audit record the admin API returns, oldest first.
async fn all_records(admin: SocketAddr) -> Vec<Value> {
    let (status, body) = get(
        &format!("http://{admin}/v1/audit?kind=all&limit=10000"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut v: Vec<Value> = serde_json::from_str(&body).unwrap();
    v.reverse();
    v
}

/// Waits until the store holds exactly `n` audit records.
async fn records_reach(admin: SocketAddr, n: usize) -> Vec<Value> {
    let got = eventually(20, || async {
        let v = all_records(admin).await;
        (v.len() == n).then_some(v)
    })
    .await;
    match got {
        Some(v) => v,
        None => panic!("wanted {n} records, have {:?}", all_records(admin).await),
    }
}

/// Elector, HTTP proxy and admin API as one real process over `store`;
/// the mark of resource `r` at 10.
async fn serve(
    dir: &TempDir,
    store: &str,
) -> (Server, SocketAddr, SocketAddr, SocketAddr, Upstream) {
    let up = Upstream::start().await;
    let mut conf = Conf::store(store);
    conf.set("fencing", "store_timeout", "1s");
    conf.set("audit", "flush_interval", "20ms");
    let admin = conf.admin(Section::new());
    let el = conf.elector(Section::new());
    let http = conf.http(Section::to(format!("http://{}", up.addr)));
    let server = Server::run(dir.path(), conf).await;
    let ok = eventually(20, || async {
        (put(&format!("http://{http}/kv/x"), Some("10"), Some("r"), "new")
            .await
            .0
            == 200)
            .then_some(())
    })
    .await;
    assert!(ok.is_some(), "token 10 never admitted");
    (server, admin, el, http, up)
}

async fn stale_write(http: SocketAddr) {
    let (status, body) = put(&format!("http://{http}/kv/x"), Some("3"), Some("r"), "old").await;
    assert_eq!(status, 409, "{body}");
}

async fn lease(el: SocketAddr, action: &str, holder: &str) -> u16 {
    send(
        client()
            .post(format!("http://{el}/v1/leases/jobs/{action}"))
            .json(&json!({"holder": holder, "ttl_ms": 60_000})),
    )
    .await
    .status
}

fn link(rec: &Value) -> (String, u64, i64) {
    (
        rec["chain"].as_str().expect("chained").to_owned(),
        rec["seq"].as_u64().expect("seq"),
        rec["id"].as_i64().expect("id"),
    )
}

async fn edited_then_deleted_rows_are_named(store: String, dir: TempDir) {
    let (mut server, admin, el, http, _up) = serve(&dir, &store).await;
    // Refused writes and leadership changes, interleaved in one chain.
    stale_write(http).await;
    assert_eq!(lease(el, "acquire", "node-a").await, 200);
    stale_write(http).await;
    assert_eq!(lease(el, "acquire", "node-b").await, 409);
    for _ in 0..4 {
        stale_write(http).await;
    }
    let recs = records_reach(admin, 8).await;
    server.terminate();
    let chains: std::collections::BTreeSet<String> = recs.iter().map(|r| link(r).0).collect();
    assert_eq!(chains.len(), 1, "one process, one chain: {recs:?}");
    let seqs: Vec<u64> = recs.iter().map(|r| link(r).1).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "{recs:?}");
    assert!(recs
        .iter()
        .all(|r| r["hash"].as_str().is_some_and(|h| h.len() == 64)));

    let (code, out, err) = verify(&server);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified: 8 records in 1 chains"), "{out}");

    // One field of one row, changed with SQL.
    let (_, _, edited) = link(&recs[3]);
    tamper(
        &store,
        &format!("UPDATE audit SET client_addr = '10.6.6.6:1' WHERE id = {edited}"),
    )
    .await;
    let (code, out, err) = verify(&server);
    assert_eq!(code, 3, "{out}{err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("FIRST MISMATCH: record id {edited} (chain "))
            && first.contains("seq 4)")
            && first.contains("hash mismatch"),
        "{out}"
    );
    assert_eq!(
        out.matches("MISMATCH").count(),
        1,
        "one edit, one mismatch: {out}"
    );
    let addr = recs[3]["client_addr"].as_str().unwrap();
    tamper(
        &store,
        &format!("UPDATE audit SET client_addr = '{addr}' WHERE id = {edited}"),
    )
    .await;
    let (code, out, _) = verify(&server);
    assert_eq!(code, 0, "put back, it verifies again: {out}");

    // A row from the middle, deleted: the next one names the gap.
    let (_, _, deleted) = link(&recs[5]);
    let (_, _, after) = link(&recs[6]);
    tamper(&store, &format!("DELETE FROM audit WHERE id = {deleted}")).await;
    let (code, out, err) = verify(&server);
    assert_eq!(code, 3, "{out}{err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("FIRST MISMATCH: record id {after} (chain "))
            && first.contains("gap in sequence: expected seq 6, found 7"),
        "{out}"
    );
    assert!(
        out.contains("NOT verified: 1 records do not match"),
        "{out}"
    );
}

#[tokio::test]
async fn sqlite_verify_names_an_edited_row_and_a_deleted_one() {
    let dir = TempDir::new("fp-chain-sqlite");
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    edited_then_deleted_rows_are_named(store, dir).await;
}

#[tokio::test]
async fn postgres_verify_names_an_edited_row_and_a_deleted_one() {
    let db = TestDb::create("fp_chain_edit").await;
    let dir = TempDir::new("fp-chain-pg");
    edited_then_deleted_rows_are_named(db.url.clone(), dir).await;
}

/// Stale writes from eight clients until told to stop; counts the 409s.
/// Errors (the server killed under them) end a client quietly.
fn flood(
    http: SocketAddr,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|_| {
            let (refused, stop) = (refused.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                while stop.load(Ordering::SeqCst) == 0 {
                    let r = c
                        .put(format!("http://{http}/kv/x"))
                        .header("Fencing-Token", "3")
                        .header("Fencing-Resource", "r")
                        .body("stale")
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 409 => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// Floods, kills -9 once at least `at` refusals were answered, and waits
/// for the clients.
async fn kill_mid_flood(server: &mut Server, http: SocketAddr, at: usize) -> usize {
    let refused = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let tasks = flood(http, refused.clone(), stop.clone());
    let reached = eventually(30, || async {
        (refused.load(Ordering::SeqCst) >= at).then_some(())
    })
    .await;
    server.kill9();
    stop.store(1, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(reached.is_some(), "the flood never reached {at} refusals");
    refused.load(Ordering::SeqCst)
}

#[tokio::test]
async fn sqlite_chains_verify_after_kill_9_mid_flood() {
    let dir = TempDir::new("fp-chain-kill");
    let store = format!("sqlite://{}/fp.db", dir.path().display());
    let (mut server, admin, _el, http, _up) = serve(&dir, &store).await;
    let first = kill_mid_flood(&mut server, http, 60).await;
    server.restart();
    server.wait_ready().await;
    stale_write(http).await;
    let recs = eventually(20, || async {
        let v = all_records(admin).await;
        (v.len() > first).then_some(v)
    })
    .await
    .expect("the first run's records and the new one");
    server.terminate();
    let chains: std::collections::BTreeSet<String> = recs.iter().map(|r| link(r).0).collect();
    assert_eq!(chains.len(), 2, "two processes, two chains");
    let (code, out, err) = verify(&server);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("verified: {} records in 2 chains", recs.len())),
        "{out}"
    );
}

#[tokio::test]
async fn postgres_chains_verify_after_kill_9_mid_flood_through_the_spool() {
    let db = TestDb::create("fp_chain_spool").await;
    let pg: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let shim = Shim::start(pg).await;
    let store = db.url.replace("127.0.0.1:5432", &shim.addr.to_string());
    let dir = TempDir::new("fp-chain-spool");
    let (mut server, admin, _el, http, _up) = serve(&dir, &store).await;
    // Some records straight to the store, then the store goes away and
    // the rest of the chain goes to the spool, then kill -9 mid-flood.
    for _ in 0..5 {
        stale_write(http).await;
    }
    records_reach(admin, 5).await;
    shim.cut();
    let spooled = kill_mid_flood(&mut server, http, 40).await;
    let in_spool: usize = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
        .sum();
    assert!(
        in_spool >= spooled,
        "every answered refusal is in the spool: {in_spool} < {spooled}"
    );
    shim.restore();
    server.restart();
    server.wait_ready().await;
    // Every answered refusal was spooled (some unanswered ones may be
    // too); the spool file is gone once all of it is shipped.
    let total = 5 + spooled;
    let recs = eventually(30, || async {
        let left = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".spool"));
        let v = all_records(admin).await;
        (!left && v.len() >= total).then_some(v)
    })
    .await
    .expect("the spool shipped");
    stale_write(http).await;
    let recs_after = records_reach(admin, recs.len() + 1).await;
    server.terminate();
    let chains: std::collections::BTreeSet<String> = recs_after.iter().map(|r| link(r).0).collect();
    assert_eq!(chains.len(), 2, "two processes, two chains");
    // Straight to the database, not through the test's shim.
    let (code, out, err) = verify_store(&db.url);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "verified: {} records in 2 chains",
            recs_after.len()
        )),
        "{out}"
    );
    eprintln!("{spooled} answered, {in_spool} spooled; {out}");
}
