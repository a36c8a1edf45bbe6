//! The checker on a fencing tier (issue 12): the same writers and checks
//! as the single-process runs, against three `fencepost serve` replicas
//! sharing one Postgres store, with an elector in a process of its own on
//! that store (so a grant is an advance the whole tier learns of).
//!
//! Every HTTP write goes through a random replica; every Postgres
//! connection (the tokio-postgres writers' and each psql process) through
//! a random one, and a writer reconnects after about a quarter of its
//! writes, so a leader's successive writes and transactions cross
//! replicas. The Postgres proxies run `enforce = "proxy"`
//! ([`Mode::Tier`]) or `enforce = "database"` ([`Mode::TierGuard`]);
//! a third of the Postgres writes are `BEGIN; UPDATE; INSERT; COMMIT`. The
//! HTTP upstream holds each request 0-20 ms, so the cross-replica drain is
//! judged too: no write may arrive while one with a lower token is still
//! in flight there.
//!
//! Each replica reaches the store through its own TCP shim. Faults, drawn
//! from the seed: `pause` (a writer past its lease; in guard mode inside
//! its transaction), `sigstop` (the psql leader), `pg_terminate` (every
//! backend of the data database), `kill9` (a random replica, restarted
//! 50-400 ms later on the same ports), `store_cut` (a replica's shim to
//! the store severed for half to twice the replica TTL), `replica_stop`
//! (SIGSTOP of a replica past its replica TTL, then SIGCONT),
//! `elector_restart` (kill -9 of the elector's process alone, restarted),
//! `store_delay` (20-300 ms on every chunk of a replica's store link for
//! 0.5-2.5 s). A run of 16 s or more injects every kind at least once;
//! a shorter run draws kinds at random.
//!
//! Audit records land in the one shared store and do not name the
//! replica that wrote them: keyed refusals are matched one to one as
//! before, refused COMMITs by count over the whole tier, and a record must
//! fall inside some replica's lifetime.
//!
//! Run: `cargo nextest run -p fencepost --test it -E 'test(checker::tier)'
//! --no-capture` (20 s each by default). Campaign:
//! `FENCEPOST_CHECKER_RUNS=N FENCEPOST_CHECKER_SECS=S` (S may be as short
//! as 5 here; seeds seed, seed+1, ...). Each run prints its seed and the
//! command that replays it.

use super::*;

/// The replicas' `[cluster] replica_ttl`: short, so a stop or cut past it
/// fits a short run, with room for a loaded two-core machine.
const TTL_MS: u64 = 1_500;

/// Fault kinds of a tier run.
const KINDS: [&str; 8] = [
    "pause",
    "sigstop",
    "pg_terminate",
    "kill9",
    "store_cut",
    "replica_stop",
    "elector_restart",
    "store_delay",
];

/// Fencing across three replicas, Postgres proxy mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_holds_across_a_tier_of_three_replicas() {
    campaign(Mode::Tier, "checker, a tier of three replicas").await;
}

/// Fencing across three replicas, Postgres guard mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_holds_across_a_tier_in_guard_mode() {
    campaign(
        Mode::TierGuard,
        "checker, a tier of three replicas in guard mode",
    )
    .await;
}

/// The tier's checker can fail: with the writers going around the
/// replicas, under the same faults, it reports violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tier_checker_catches_writes_that_bypass_the_replicas() {
    let seed = env_u64("FENCEPOST_CHECKER_SEED").unwrap_or_else(rand::random);
    println!("tier checker self-test: seed {seed}, writers bypass the replicas");
    let v = run(seed, 8, 2, Mode::TierBypass).await;
    assert!(
        v > 0,
        "the tier checker found nothing wrong with unfenced writes (seed {seed})"
    );
}

/// One replica: its process, its store link, its listeners.
struct Replica {
    dir: TempDir,
    server: Server,
    link: Shim,
    http: SocketAddr,
    pg: SocketAddr,
}

impl Replica {
    async fn start(store_url: &str, upstream: SocketAddr, enforce: &str) -> Replica {
        let link = Shim::start(SocketAddr::from(([127, 0, 0, 1], 5432))).await;
        let url = store_url.replace("127.0.0.1:5432", &link.addr.to_string());
        assert_ne!(url, store_url, "the store URL names 127.0.0.1:5432");
        let dir = TempDir::new("fp-tier-replica");
        let mut conf = Conf::store(url);
        conf.set("audit", "flush_interval", "20ms")
            .set("fencing", "store_timeout", "1s")
            .set("fencing", "drain_timeout", "10s")
            .set("cluster", "replica_ttl", format!("{TTL_MS}ms"));
        conf.admin(Section::new());
        let http = conf.http(Section::to(format!("http://{upstream}")));
        let pg = conf.postgres(Section::to("127.0.0.1:5432").set("enforce", enforce));
        let server = Server::run(dir.path(), conf).await;
        Replica {
            dir,
            server,
            link,
            http,
            pg,
        }
    }

    fn pid(&self) -> Option<String> {
        self.server.child.as_ref().map(|c| c.id().to_string())
    }
}

fn signal(sig: &str, pid: &str) -> bool {
    std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success())
}

/// One tier run; returns the number of violations.
pub(super) async fn run(seed: u64, secs: u64, writers: usize, mode: Mode) -> usize {
    let bypass = mode == Mode::TierBypass;
    let guard = mode == Mode::TierGuard;
    println!(
        "tier run, seed {seed}: replay with FENCEPOST_CHECKER_SEED={seed} FENCEPOST_CHECKER_SECS={secs} \
         FENCEPOST_CHECKER_WRITERS={writers} cargo nextest run -p fencepost --test it --no-capture -E 'test(={})'",
        match mode {
            Mode::TierGuard => "checker::tier::fencing_holds_across_a_tier_in_guard_mode",
            Mode::TierBypass => "checker::tier::the_tier_checker_catches_writes_that_bypass_the_replicas",
            _ => "checker::tier::fencing_holds_across_a_tier_of_three_replicas",
        }
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TestDb::create("fptier").await;
    let store = TestDb::create("fptierstore").await;
    let direct = create_register(&db.url).await;
    if guard {
        let (code, out, err) = crate::support::run_cli(&["migrate", "--guard", &db.url], &[]);
        assert_eq!(code, 0, "migrate --guard: {out}{err}");
    }
    let enforce = if guard { "database" } else { "proxy" };
    let upstream = Upstream::start_holding(20).await;

    // The elector, alone in its process on the store; its admin API
    // serves the marks (read from the store) to the sampler.
    let edir = TempDir::new("fp-tier-elector");
    let mut econf = Conf::store(store.url.clone());
    econf.set("audit", "flush_interval", "20ms");
    let admin = econf.admin(Section::new());
    let elector = econf.elector(Section::new().set("min_ttl", "50ms"));
    let mut elector_srv = Server::run(edir.path(), econf).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&store.url, upstream.addr, enforce).await);
    }
    let lifetimes: Vec<Vec<Epoch>> = (0..replicas.len())
        .map(|_| {
            vec![Epoch {
                start_ms: now_ms(),
                end_ms: None,
                graceful: false,
            }]
        })
        .collect();
    let lifetimes = Arc::new(Mutex::new(lifetimes));
    let addrs = Arc::new(Addrs {
        elector,
        http: if bypass {
            vec![upstream.addr]
        } else {
            replicas.iter().map(|r| r.http).collect()
        },
        pg: if bypass {
            vec![SocketAddr::from(([127, 0, 0, 1], 5432))]
        } else {
            replicas.iter().map(|r| r.pg).collect()
        },
        route: if bypass { Route::First } else { Route::Random },
        db_name: db.name.clone(),
    });
    let shared = Arc::new(Shared {
        pauses: (0..2 * writers).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let crew = Crew::start(&mut rng, writers, &addrs, &shared, admin);

    // The nemesis: with room for it, every kind once in a random order
    // first; then random kinds until the quiet tail.
    let every = secs >= 16;
    // The self-test's short run starts with paused leaders, the fault
    // whose late writes unfenced storage lets through.
    let mut order: Vec<&str> = if every {
        KINDS.to_vec()
    } else if bypass {
        vec!["pause"; 4]
    } else {
        vec![]
    };
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut faults: BTreeMap<&str, u64> = KINDS.iter().map(|k| (*k, 0)).collect();
    let run_start = Instant::now();
    // The tail outlasts a replica TTL, so the tier is whole again at the end.
    let tail = Duration::from_millis(2 * TTL_MS);
    let fault_end = run_start + Duration::from_secs(secs).saturating_sub(tail);
    let mut nemesis_db = Some(direct);
    let mut sink_log = SinkLog::default();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut i = 0;
    while Instant::now() < fault_end || i < order.len() {
        let kind = order
            .get(i)
            .copied()
            .unwrap_or_else(|| KINDS[rng.gen_range(0..KINDS.len())]);
        i += 1;
        let r = rng.gen_range(0..replicas.len());
        match kind {
            "pause" => {
                let w = if guard {
                    rng.gen_range(writers..2 * writers)
                } else {
                    rng.gen_range(0..2 * writers)
                };
                shared.pauses[w].store(rng.gen_range(900..2000), Ordering::SeqCst);
            }
            "sigstop" => {
                shared
                    .psql_stop
                    .store(rng.gen_range(900..2000), Ordering::SeqCst);
            }
            "pg_terminate" => {
                if nemesis_db.is_none() {
                    nemesis_db = Some(connect_direct(&db.url).await);
                }
                let c = nemesis_db.as_ref().expect("nemesis connection");
                let res = c
                    .simple_query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid() \
                         AND backend_type = 'client backend'",
                    )
                    .await;
                if res.is_err() {
                    nemesis_db = None;
                }
            }
            "kill9" => {
                let rep = &mut replicas[r];
                rep.server.kill9();
                sink_log.scan(&rep.server.log_text());
                {
                    let mut l = lifetimes.lock().unwrap();
                    if let Some(last) = l[r].last_mut() {
                        last.end_ms = Some(now_ms());
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
                lifetimes.lock().unwrap()[r].push(Epoch {
                    start_ms: now_ms(),
                    end_ms: None,
                    graceful: false,
                });
                rep.server.restart();
                back_up(&mut rep.server).await;
            }
            "store_cut" => {
                let link = &replicas[r].link;
                link.cut();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(TTL_MS / 2..2 * TTL_MS)))
                    .await;
                link.restore();
            }
            "replica_stop" => {
                if let Some(pid) = replicas[r].pid() {
                    let stopped = signal("-STOP", &pid);
                    tokio::time::sleep(Duration::from_millis(TTL_MS + rng.gen_range(200..1000)))
                        .await;
                    if stopped {
                        signal("-CONT", &pid);
                    }
                }
            }
            "elector_restart" => {
                elector_srv.kill9();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
                elector_srv.restart();
                back_up(&mut elector_srv).await;
            }
            "store_delay" => {
                let link = &replicas[r].link;
                link.delay(rng.gen_range(20..300));
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2500))).await;
                link.delay(0);
            }
            _ => unreachable!(),
        }
        *faults.get_mut(kind).expect("known kind") += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
    }
    tokio::time::sleep(tail).await;
    let samples = crew.stop(&shared).await;
    let c = http_client();
    let final_fences: HashMap<String, u64> = crate::support::eventually(20, || {
        let c = c.clone();
        async move {
            let f = fences(&c, admin).await;
            (!f.is_empty()).then(|| f.into_iter().collect())
        }
    })
    .await
    .unwrap_or_default();
    // Graceful ends: every replica flushes its audit queue and its spool.
    for (i, rep) in replicas.iter_mut().enumerate() {
        rep.server.terminate();
        sink_log.scan(&rep.server.log_text());
        let mut l = lifetimes.lock().unwrap();
        if let Some(last) = l[i].last_mut() {
            last.end_ms = Some(now_ms());
            last.graceful = true;
        }
    }
    elector_srv.terminate();
    let audit = read_audit(&elector_srv.config, None);
    let history = read_history(&db.url).await;
    let arrivals = landed_http(&upstream);
    let attempts = shared.attempts.lock().unwrap().clone();
    let grants = shared.grants.lock().unwrap().clone();
    let lifetimes = lifetimes.lock().unwrap().clone();
    let mut report = Report::default();
    check(
        &mut report,
        &Procs {
            lifetimes: &lifetimes,
            audit_shared: true,
            pg_mark_in_store: true,
            audit_dropped: sink_log.dropped_records,
        },
        &attempts,
        &arrivals,
        &history,
        &grants,
        &samples,
        &final_fences,
        &audit,
    );
    if guard {
        let landed = history.iter().map(|h| h.1).max().unwrap_or(0);
        let mark = guard_mark(&db.url).await;
        if mark < landed {
            report.violations.push(format!(
                "the database guard's mark of {PG_RES} is {mark}, below landed token {landed}"
            ));
        }
    }
    let failovers = summarize(
        &Run {
            seed,
            writers,
            faults: &faults,
            lifetimes: lifetimes.iter().map(Vec::len).sum(),
            shared: &shared,
            grants: &grants,
            attempts: &attempts,
            http_landed: arrivals.len(),
            pg_landed: history.len(),
            audit: &audit,
            sink_log: &sink_log,
        },
        &report,
        bypass,
    );
    if bypass {
        return report.violations.len();
    }
    // The residue the last look cannot close (a replica held between its
    // look and its write past its lease, docs/replicas.md "Assumptions")
    // is reported by the replica itself after the write: a violation that
    // comes with such a line is that residue, one without it is not.
    let late: Vec<String> = replicas
        .iter()
        .enumerate()
        .flat_map(|(i, rep)| {
            rep.server
                .log_text()
                .lines()
                .filter(|l| l.contains("write sent after this replica's lease lapsed"))
                .map(|l| format!("replica {i}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect();
    println!(
        "writes sent after a lapse of their replica's lease (logged by the replicas): {}",
        late.len()
    );
    if !report.violations.is_empty() {
        for l in &late {
            println!("  {l}");
        }
        for (i, rep) in replicas.iter().enumerate() {
            let log = rep.server.log_text();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            println!("replica {i} ({}) log tail:", rep.dir.path().display());
            for l in tail.into_iter().rev() {
                println!("  {l}");
            }
        }
    }
    // A run long enough for every fault must also show a failover, a
    // refusal and admitted writes; a campaign's short runs just count.
    if every {
        enough_happened(seed, &attempts, &failovers, &faults, true);
    }
    report.violations.len()
}

/// Waits until a restarted process is up: its ready file, which `serve`
/// writes (whole, by a rename) once every listener is bound. A connect to
/// one of its addresses proves nothing: the ports were free between the
/// kill and the restart, and another process on the machine (another
/// test's listener on port 0) may have taken one, so the connect reached
/// that process while the restarted one had exited, unable to bind; the
/// run then went on with the replica gone and a stranger on its port. A
/// start that lost a port exits and is retried (the port may come free
/// again); if it keeps losing, the run stops, with the log, rather than be
/// judged without that replica.
async fn back_up(server: &mut Server) {
    let ready = server
        .ready_file()
        .map(std::path::Path::to_path_buf)
        .expect("the checker starts its servers with a ready file");
    let mut starts = 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ready.exists() {
            return;
        }
        if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
            assert!(
                starts < 5,
                "a restarted server exited {starts} times ({status}), the last with:\n{}",
                server.log_text()
            );
            starts += 1;
            server.restart();
        }
        assert!(
            Instant::now() < deadline,
            "a restarted server was not up after 30 s:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
