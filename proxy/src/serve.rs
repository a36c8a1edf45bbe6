//! `fencepost serve` and `fencepost migrate`: wiring, start-up and the
//! graceful shutdown order.
//!
//! Shutdown order matters for guarantee 5: listeners stop accepting, then
//! in-flight requests finish (each may still refuse and audit), and only
//! then is the audit log flushed.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fencing::{TokenPolicy, Verifier};
use store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::audit_sink::AuditSink;
use crate::cli::{MigrateArgs, ServeArgs};
use crate::config::{Config, LogFormat};
use crate::error::Error;
use crate::fencer::{Fencer, FencerOptions, TokenChecker};
use crate::shutdown::{self, Shutdown};
use crate::{admin, elector, http_proxy, logging, metrics, pg_proxy};

/// Reads a public key file for token verification.
pub fn read_verifier(path: &Path) -> Result<Verifier, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Verifier::from_text(&text).map_err(|e| Error::Key {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The token checker a listener's config asks for (`verify_key`,
/// `allow_plain_tokens`): one construction for both protocols, so an
/// `[[http]]` and a `[[postgres]]` listener given the same key accept
/// exactly the same tokens.
pub fn checker_for(
    verify_key: Option<&Path>,
    allow_plain: bool,
    cache_size: u64,
) -> Result<TokenChecker, Error> {
    let policy = match verify_key {
        Some(path) => TokenPolicy {
            verifier: Some(read_verifier(path)?),
            allow_plain,
        },
        None => TokenPolicy::plain(),
    };
    Ok(TokenChecker::new(policy, cache_size))
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("cannot listen on {addr} for {what}"), e))
}

/// Migrates, retrying in the background while the store is unreachable so
/// the process can start (and fail closed) during a store outage.
async fn migrate_with_retry(store: Arc<dyn Store>, shutdown: Shutdown) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match store.migrate().await {
            Ok(()) => {
                tracing::info!(store = store.kind(), "store migrated");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "store migration failed; writes fail closed until it succeeds");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

pub async fn run(args: ServeArgs, log_format: Option<LogFormat>) -> Result<ExitCode, Error> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(f) = log_format {
        config.log.format = f;
    }
    logging::init(config.log.format, &config.log.level);
    if config.elector.is_none()
        && config.http.is_empty()
        && config.admin.is_none()
        && config.postgres.is_empty()
    {
        return Err(Error::Usage(
            "the config names nothing to run: add [elector], [[http]], [[postgres]] or [admin] (see fencepost.example.toml)"
                .into(),
        ));
    }
    let prometheus = metrics::install();
    // Every store call of the process, decisions, leases and API reads,
    // is bounded by store_timeout here, once.
    let store = store::open(&config.store, config.fencing.store_timeout).await?;
    let (trigger, shutdown) = shutdown::channel();

    // Try the migration once in the foreground so a healthy start is ready
    // at once; keep trying in the background otherwise.
    let migrate = tokio::spawn(migrate_with_retry(Arc::clone(&store), shutdown.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while !migrate.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let audit = AuditSink::start(Arc::clone(&store), &config.audit);
    let fencer = Arc::new(Fencer::new(
        Arc::clone(&store),
        audit.clone(),
        FencerOptions {
            drain_timeout: config.fencing.drain_timeout,
            resource_labels: config.admin.as_ref().is_none_or(|a| a.resource_labels),
        },
    ));

    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    if let Some(ecfg) = &config.elector {
        let settings = elector::ElectorSettings::from_config(ecfg)?;
        let listener = bind(ecfg.listen, "the elector").await?;
        let el = elector::Elector::new(Arc::clone(&store), settings);
        let sd = shutdown.clone();
        tracing::info!(listen = %ecfg.listen, "elector listening");
        tasks.spawn(async move {
            el.serve(listener, sd)
                .await
                .map_err(|e| Error::io("elector", e))
        });
    }
    for hcfg in &config.http {
        let checker = checker_for(
            hcfg.verify_key.as_deref(),
            hcfg.allow_plain_tokens,
            config.fencing.token_cache_size,
        )?;
        let listener = bind(hcfg.listen, "an HTTP proxy").await?;
        let proxy = http_proxy::HttpProxy::new(hcfg, Arc::clone(&fencer), checker.clone())?;
        if let Some(url) = &hcfg.elector_watch {
            let resources = hcfg.watched_resources();
            let bearer = hcfg
                .elector_token
                .clone()
                .or_else(|| config.elector.as_ref().and_then(|e| e.token.clone()));
            tokio::spawn(http_proxy::watch_elector(
                Arc::clone(&fencer),
                checker,
                url.clone(),
                bearer,
                resources,
                shutdown.clone(),
            ));
        }
        let sd = shutdown.clone();
        let drain = args.shutdown_timeout;
        tracing::info!(listen = %hcfg.listen, upstream = %hcfg.upstream, "HTTP fencing proxy listening");
        tasks.spawn(async move {
            proxy
                .serve(listener, sd, drain)
                .await
                .map_err(|e| Error::io("HTTP proxy", e))
        });
    }
    for pcfg in &config.postgres {
        let checker = checker_for(
            pcfg.verify_key.as_deref(),
            pcfg.allow_plain_tokens,
            config.fencing.token_cache_size,
        )?;
        let listener = bind(pcfg.listen, "a Postgres proxy").await?;
        let proxy = pg_proxy::PgProxy::new(pcfg, Arc::clone(&fencer), checker, audit.clone())?;
        let sd = shutdown.clone();
        let drain = args.shutdown_timeout;
        tracing::info!(listen = %pcfg.listen, upstream = %pcfg.upstream, "Postgres fencing proxy listening");
        tasks.spawn(async move {
            proxy
                .serve(listener, sd, drain)
                .await
                .map_err(|e| Error::io("Postgres proxy", e))
        });
    }
    if let Some(acfg) = &config.admin {
        let listener = bind(acfg.listen, "the admin API").await?;
        let state = admin::AdminState {
            store: Arc::clone(&store),
            prometheus,
            token: acfg.token.clone(),
            upstreams: config.http.iter().map(|h| h.upstream.clone()).collect(),
        };
        let sd = shutdown.clone();
        tracing::info!(listen = %acfg.listen, "admin API listening");
        tasks.spawn(async move {
            admin::serve(state, listener, sd)
                .await
                .map_err(|e| Error::io("admin API", e))
        });
    }

    // Run until a signal, or until a listener dies on its own.
    let mut failed = None;
    tokio::select! {
        _ = shutdown::os_signal() => tracing::info!("shutting down: draining connections"),
        Some(res) = tasks.join_next() => {
            if let Ok(Err(e)) = res {
                tracing::error!(error = %e, "a listener failed; shutting down");
                failed = Some(e);
            }
        }
    }
    trigger.fire();
    let drained = tokio::time::timeout(args.shutdown_timeout + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        tracing::warn!("some connections did not finish within the shutdown timeout");
    }
    if audit.flush(Duration::from_secs(10)).await {
        tracing::info!("audit log flushed");
    } else {
        tracing::error!(
            "audit log could not be flushed; see fencepost_audit_records_dropped_total"
        );
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

pub async fn migrate(args: MigrateArgs) -> Result<ExitCode, Error> {
    if let Some(url) = &args.guard {
        // The protected database, not the store: only the guard's schema
        // goes there.
        store::guard::install(url).await?;
        println!("installed the fencepost guard (schema fencepost) in {url}");
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(args.config.as_deref())?;
    let url = args.store.unwrap_or(config.store);
    let store = store::open(&url, config.fencing.store_timeout).await?;
    store.migrate().await?;
    println!("migrated {} store {url}", store.kind());
    Ok(ExitCode::SUCCESS)
}
