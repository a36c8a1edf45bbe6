//! `fencepost serve` and `fencepost migrate`: wiring, start-up and the
//! graceful shutdown order.
//!
//! Shutdown order matters for guarantee 5: listeners stop accepting, then
//! in-flight requests finish (each may still refuse and audit), and only
//! then is the audit log flushed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fencing::{TokenPolicy, Verifier};
use store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::audit_sink::AuditSink;
use crate::audit_spool::{self, Spool};
use crate::cli::{MigrateArgs, ServeArgs};
use crate::cluster::{self, Tier};
use crate::config::{Config, LogFormat};
use crate::edge::http1::API_HEAD_TIMEOUT;
use crate::error::Error;
use crate::fencer::{Fencer, FencerOptions, TokenChecker};
use crate::shutdown::{self, Shutdown, Trigger};
use crate::tls::{self, Alpn};
use crate::{admin, elector, http_proxy, logging, metrics, pg_proxy};

/// Reads a public key file for token verification.
pub(crate) fn read_verifier(path: &Path) -> Result<Verifier, Error> {
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
pub(crate) fn checker_for(
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

/// The tier replica this process is, if any: it runs a proxy, its store
/// can hold a tier (Postgres) and `[cluster] enabled` is not off.
fn join_tier(config: &Config, store: &Arc<dyn Store>) -> Option<Arc<Tier>> {
    let proxies = !config.http.is_empty() || !config.postgres.is_empty();
    if !proxies || !config.cluster.enabled {
        return None;
    }
    if !store.supports_tier() {
        tracing::info!(
            store = store.kind(),
            "the store holds one process: no fencing tier (use a Postgres store for replicas)"
        );
        return None;
    }
    let mut addresses: Vec<String> = Vec::new();
    addresses.extend(config.http.iter().map(|h| format!("http={}", h.listen)));
    addresses.extend(
        config
            .postgres
            .iter()
            .map(|p| format!("postgres={}", p.listen)),
    );
    addresses.extend(config.admin.iter().map(|a| format!("admin={}", a.listen)));
    Some(Arc::new(Tier::new(
        Arc::clone(store),
        config.cluster.replica_ttl,
        addresses.join(" "),
    )))
}

/// One listening socket per listener the config names, bound before the
/// server starts: by [`Listeners::bind`] from the config's `listen`
/// addresses, or by the caller (tests bind port 0 and keep the socket, so
/// no other process can take the port between choosing and serving it).
pub struct Listeners {
    pub elector: Option<TcpListener>,
    /// One per `[[http]]`, in config order.
    pub http: Vec<TcpListener>,
    /// One per `[[postgres]]`, in config order.
    pub postgres: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every `listen` address of `config` (port 0: any free port).
    pub async fn bind(config: &Config) -> Result<Listeners, Error> {
        let mut http = Vec::with_capacity(config.http.len());
        for h in &config.http {
            http.push(bind(h.listen, "an HTTP proxy").await?);
        }
        let mut postgres = Vec::with_capacity(config.postgres.len());
        for p in &config.postgres {
            postgres.push(bind(p.listen, "a Postgres proxy").await?);
        }
        Ok(Listeners {
            elector: match &config.elector {
                Some(e) => Some(bind(e.listen, "the elector").await?),
                None => None,
            },
            http,
            postgres,
            admin: match &config.admin {
                Some(a) => Some(bind(a.listen, "the admin API").await?),
                None => None,
            },
        })
    }
}

/// Where a started server listens: the bound addresses, in config order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addrs {
    pub elector: Option<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub postgres: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// A started server: every listener accepting, until [`Server::run_until`]
/// is told to stop.
pub struct Server {
    tasks: JoinSet<Result<(), Error>>,
    trigger: Trigger,
    audit: AuditSink,
    shutdown_timeout: Duration,
    addrs: Addrs,
    /// The store's migration, which keeps retrying in the background
    /// while the store is unreachable.
    migrate: tokio::task::JoinHandle<()>,
    /// This process's replica of the fencing tier: it leaves the tier
    /// once its connections are drained.
    tier: Option<Arc<Tier>>,
}

fn local(listener: &TcpListener, what: &str) -> Result<SocketAddr, Error> {
    listener
        .local_addr()
        .map_err(|e| Error::io(format!("the address of {what}"), e))
}

/// Raises the mark of every resource this process's elector grants, so the
/// old leader is refused from the grant on, without `elector_watch`.
async fn fence_at_grant(
    mut events: tokio::sync::broadcast::Receiver<elector::LeaseEvent>,
    fencer: Arc<Fencer>,
    shutdown: shutdown::Shutdown,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = shutdown.wait() => return,
        };
        match ev {
            Ok(ev) if ev.kind == elector::EventKind::Granted => {
                // One task each: a fence waits for the drain of older
                // writes, which must not delay the next resource's fence.
                let fencer = Arc::clone(&fencer);
                tokio::spawn(async move {
                    if let Err(e) = fencer.fence_to(&ev.resource, ev.token_value).await {
                        tracing::warn!(resource = ev.resource, token = ev.token_value, error = %e, "fence at grant failed; the new leader's first write fences instead");
                    }
                });
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// `fencepost serve`: loads the config, binds, writes `--ready-file`, and
/// runs until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs, log_format: Option<LogFormat>) -> Result<ExitCode, Error> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(f) = log_format {
        config.log.format = f;
    }
    logging::init(config.log.format, &config.log.level);
    // Caught before anything listens or `--ready-file` says we are up: a
    // SIGTERM from then on drains, it never kills.
    let stop = shutdown::os_signal();
    let listeners = Listeners::bind(&config).await?;
    let server = start(config, listeners, args.shutdown_timeout).await?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, server.addrs())?;
    }
    server.run_until(stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the bound addresses as JSON, whole or not at all (written
/// beside, then renamed), so a reader polling for the file never sees
/// half of it.
fn write_ready_file(path: &Path, addrs: &Addrs) -> Result<(), Error> {
    let text = serde_json::to_string(addrs)
        .map_err(|e| Error::io("the ready file", std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("cannot write the ready file {}", path.display()), e))
}

/// Starts everything `config` names on `listeners` (one per listener the
/// config names; each listener's `listen` is replaced by its socket's
/// address): the store and its migration, the audit sink, the one
/// `Fencer` every listener shares, and a task per listener.
pub async fn start(
    mut config: Config,
    listeners: Listeners,
    shutdown_timeout: Duration,
) -> Result<Server, Error> {
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
    if listeners.elector.is_some() != config.elector.is_some()
        || listeners.admin.is_some() != config.admin.is_some()
        || listeners.http.len() != config.http.len()
        || listeners.postgres.len() != config.postgres.len()
    {
        return Err(Error::Usage(
            "one listener is needed for each listener the config names".into(),
        ));
    }
    if let (Some(e), Some(l)) = (&mut config.elector, &listeners.elector) {
        e.listen = local(l, "the elector")?;
    }
    for (h, l) in config.http.iter_mut().zip(&listeners.http) {
        h.listen = local(l, "an HTTP proxy")?;
    }
    for (p, l) in config.postgres.iter_mut().zip(&listeners.postgres) {
        p.listen = local(l, "a Postgres proxy")?;
    }
    if let (Some(a), Some(l)) = (&mut config.admin, &listeners.admin) {
        a.listen = local(l, "the admin API")?;
    }
    let addrs = Addrs {
        elector: config.elector.as_ref().map(|e| e.listen),
        http: config.http.iter().map(|h| h.listen).collect(),
        postgres: config.postgres.iter().map(|p| p.listen).collect(),
        admin: config.admin.as_ref().map(|a| a.listen),
    };
    let Listeners {
        elector: elector_listener,
        http: http_listeners,
        postgres: pg_listeners,
        admin: admin_listener,
    } = listeners;

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

    let audit = AuditSink::start(Arc::clone(&store), &config.audit, open_spool(&config)?);
    let mut fencer = Fencer::new(
        Arc::clone(&store),
        audit.clone(),
        FencerOptions {
            drain_timeout: config.fencing.drain_timeout,
            resource_labels: config.admin.as_ref().is_none_or(|a| a.resource_labels),
        },
    );
    let tier = join_tier(&config, &store);
    if let Some(t) = &tier {
        fencer = fencer.with_tier(Arc::clone(t));
    }
    let fencer = Arc::new(fencer);
    if let Some(t) = &tier {
        tracing::info!(replica = t.id(), replica_ttl = ?t.ttl(), "joining the fencing tier");
        let _ = tokio::time::timeout(Duration::from_secs(3), t.join(&fencer)).await;
        tokio::spawn(cluster::run(
            Arc::clone(t),
            Arc::clone(&fencer),
            shutdown.clone(),
        ));
    }

    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    if let (Some(ecfg), Some(listener)) = (&config.elector, elector_listener) {
        let mut settings = elector::ElectorSettings::from_config(ecfg)?;
        settings.resource_labels = config.admin.as_ref().is_none_or(|a| a.resource_labels);
        let el = elector::Elector::new(Arc::clone(&store), settings, audit.clone());
        // Fence at grant in this process. On a tier the store already made
        // the grant an advance every replica learns of.
        if tier.is_none() && !(config.http.is_empty() && config.postgres.is_empty()) {
            tokio::spawn(fence_at_grant(
                el.subscribe(),
                Arc::clone(&fencer),
                shutdown.clone(),
            ));
        }
        let tls = tls::for_listener(
            "elector",
            ecfg.listen,
            ecfg.tls(),
            Alpn::Http1,
            API_HEAD_TIMEOUT,
        )?;
        if let Some(t) = &tls {
            t.watch(shutdown.clone());
        }
        let sd = shutdown.clone();
        tracing::info!(listen = %ecfg.listen, tls = tls.is_some(), "elector listening");
        tasks.spawn(async move {
            el.serve(listener, tls, sd)
                .await
                .map_err(|e| Error::io("elector", e))
        });
    }
    for (hcfg, listener) in config.http.iter().zip(http_listeners) {
        let checker = checker_for(
            hcfg.verify_key.as_deref(),
            hcfg.allow_plain_tokens,
            config.fencing.token_cache_size,
        )?;
        let proxy = http_proxy::HttpProxy::new(hcfg, Arc::clone(&fencer), checker.clone())?;
        if let Some(t) = proxy.tls() {
            t.watch(shutdown.clone());
        }
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
        tracing::info!(listen = %hcfg.listen, upstream = %hcfg.upstream, tls = proxy.tls().is_some(), "HTTP fencing proxy listening");
        tasks.spawn(async move {
            proxy
                .serve(listener, sd, shutdown_timeout)
                .await
                .map_err(|e| Error::io("HTTP proxy", e))
        });
    }
    for (pcfg, listener) in config.postgres.iter().zip(pg_listeners) {
        let checker = checker_for(
            pcfg.verify_key.as_deref(),
            pcfg.allow_plain_tokens,
            config.fencing.token_cache_size,
        )?;
        let proxy = pg_proxy::PgProxy::new(pcfg, Arc::clone(&fencer), checker)?;
        if let Some(t) = proxy.tls() {
            t.watch(shutdown.clone());
        }
        let sd = shutdown.clone();
        tracing::info!(listen = %pcfg.listen, upstream = %pcfg.upstream, tls = proxy.tls().is_some(), "Postgres fencing proxy listening");
        tasks.spawn(async move {
            proxy
                .serve(listener, sd, shutdown_timeout)
                .await
                .map_err(|e| Error::io("Postgres proxy", e))
        });
    }
    if let (Some(acfg), Some(listener)) = (&config.admin, admin_listener) {
        let state = admin::AdminState {
            store: Arc::clone(&store),
            prometheus,
            token: acfg.token.clone(),
            clients: acfg.clients.clone().into(),
            upstreams: config.http.iter().map(|h| h.upstream.clone()).collect(),
            tier: tier.clone(),
            shutdown: shutdown.clone(),
        };
        let tls = tls::for_listener(
            "admin",
            acfg.listen,
            acfg.tls(),
            Alpn::Http1,
            API_HEAD_TIMEOUT,
        )?;
        if let Some(t) = &tls {
            t.watch(shutdown.clone());
        }
        let sd = shutdown.clone();
        tracing::info!(listen = %acfg.listen, tls = tls.is_some(), "admin API listening");
        tasks.spawn(async move {
            admin::serve(state, listener, tls, sd)
                .await
                .map_err(|e| Error::io("admin API", e))
        });
    }
    Ok(Server {
        tasks,
        trigger,
        audit,
        shutdown_timeout,
        addrs,
        migrate,
        tier,
    })
}

impl Server {
    /// The bound addresses, in config order.
    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    /// Whether the store's migration has finished (start waits for it
    /// only 3 s, so a server can start, failing closed, while its store
    /// is away).
    pub fn is_migrated(&self) -> bool {
        self.migrate.is_finished()
    }

    /// Serves until `stop` resolves or a listener dies on its own, then
    /// shuts down in order: listeners stop accepting, in-flight work
    /// finishes (up to the shutdown timeout), the audit log is flushed.
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> Result<(), Error> {
        let mut failed = None;
        tokio::select! {
            _ = stop => tracing::info!("shutting down: draining connections"),
            Some(res) = self.tasks.join_next() => {
                if let Ok(Err(e)) = res {
                    tracing::error!(error = %e, "a listener failed; shutting down");
                    failed = Some(e);
                }
            }
        }
        self.trigger.fire();
        let tasks = &mut self.tasks;
        let drained = tokio::time::timeout(self.shutdown_timeout + Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !drained {
            tracing::warn!("some connections did not finish within the shutdown timeout");
        }
        if let Some(t) = &self.tier {
            t.leave().await;
        }
        if self.audit.flush(Duration::from_secs(10)).await {
            tracing::info!("audit log flushed");
        } else {
            tracing::error!(
                "audit log could not be flushed; see fencepost_audit_records_dropped_total"
            );
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

pub async fn migrate(args: MigrateArgs) -> Result<ExitCode, Error> {
    if let Some(url) = &args.guard {
        // The protected database, not the store: only the guard's schema
        // goes there.
        let extension = store::guard::install(url).await?;
        println!("installed the fencepost guard (schema fencepost) in {url}");
        match extension {
            store::guard::Extension::Installed => println!(
                "the fencepost_guard extension is installed: fencepost.advance_fast is there for [[postgres]] guard_extension = true"
            ),
            store::guard::Extension::Unavailable => println!(
                "the server has no fencepost_guard extension: guard mode calls fencepost.advance (leave guard_extension unset)"
            ),
            store::guard::Extension::Refused(why) => println!(
                "the server has the fencepost_guard extension, but creating or updating it failed ({why}): a superuser can run CREATE EXTENSION fencepost_guard (or ALTER EXTENSION fencepost_guard UPDATE); until then leave guard_extension unset"
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(args.config.as_deref())?;
    let url = args.store.unwrap_or(config.store);
    let store = store::open(&url, config.fencing.store_timeout).await?;
    store.migrate().await?;
    println!("migrated {} store {url}", store.kind());
    Ok(ExitCode::SUCCESS)
}

/// The process's audit spool: `[audit] spool`, or the default name for its
/// store and listen addresses (one spool per process, found again by a
/// restart with the same config).
fn open_spool(config: &Config) -> Result<Spool, Error> {
    let path = match &config.audit.spool {
        Some(p) => p.clone(),
        None => {
            let mut listens: Vec<String> = Vec::new();
            listens.extend(config.admin.iter().map(|a| a.listen.to_string()));
            listens.extend(config.elector.iter().map(|e| e.listen.to_string()));
            listens.extend(config.http.iter().map(|h| h.listen.to_string()));
            listens.extend(config.postgres.iter().map(|p| p.listen.to_string()));
            audit_spool::default_path(&config.store, &listens)
        }
    };
    Spool::open(path, config.audit.spool_max_bytes)
        .map_err(|e| Error::Usage(format!("audit spool: {e}")))
}
