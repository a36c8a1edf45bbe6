//! One client connection: the startup exchange, then two loops, one per
//! direction, sharing a little state under a short mutex.
//!
//! # Cycles
//! Postgres answers each simple Query, each Sync (extended protocol) and
//! each fast-path FunctionCall with exactly one ReadyForQuery, in order.
//! The client loop opens a [`Cycle`] for every such unit before its bytes
//! go to the server; the server loop closes the oldest one at each
//! ReadyForQuery. A cycle carries the in-flight guards of the writes it
//! admitted, so a guard drops only when the server has answered the whole
//! unit: in autocommit, that is when the write has committed.
//!
//! # Transaction blocks
//! Inside a block a write's guard also drops at its ReadyForQuery, but the
//! block remembers the (resource, token) of every write it made, and its
//! COMMIT is a write of all of them: decided again, its guard held until
//! the COMMIT is answered. A block whose token went stale meanwhile can
//! therefore never commit, and a newer leader never waits for an older
//! leader's idle block (holding guards across the block would make every
//! failover wait for the old leader's client, up to the drain timeout,
//! for no gain in safety: uncommitted rows are not landed writes).
//!
//! # Refusals go through the server
//! A refused write is never sent. In its place the proxy sends something
//! that fails at the server, naming a marker (`FETCH` from, or `Execute` of,
//! a cursor/portal called `fencepost-refusal-N`, which cannot exist), and
//! swaps the server's "does not exist" ErrorResponse for the fencing one.
//! Why not answer locally? Because the server then does exactly what it
//! does for any failed statement: inside a transaction block it aborts the
//! block (the client sees status `E` and must ROLLBACK, and nothing of the
//! block can commit), in the extended protocol it discards messages until
//! Sync, and its ReadyForQuery carries the true transaction status. An
//! emulation would have to track all of that and could drift from the
//! server; this way the client's view and the server's cannot disagree.
//! If the server was already failing (an earlier error in the same block),
//! its own error passes through unchanged, as it would without the proxy.
//!
//! A COMMIT of a block whose token went stale is sent as ROLLBACK, and the
//! ROLLBACK's completion is swapped for the fencing error: the block is
//! rolled back and COMMIT answers `ZF001`, as the contract says.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use adapters::pg::frame::{self, split_frame, split_startup};
use adapters::pg::{
    BackendMsg, Classification, ClientMsg, CommentFence, FenceSetting, FenceVar, Frame, FrameError,
    StartupKind, StartupPacket,
};
use bytes::{Bytes, BytesMut};
use fencing::{InflightGuard, Protocol, Reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{PgProxy, CONNECT_TIMEOUT, ORPHAN_WAIT, STARTUP_TIMEOUT};
use crate::fencer::{Decision, Refusal, WriteInfo};
use crate::shutdown::Shutdown;

/// Makes refusal markers unique within the process, so a marker can never
/// match an error the server raised for something else.
static MARKERS: AtomicU64 = AtomicU64::new(1);

fn marker() -> String {
    format!(
        "fencepost-refusal-{}-{}",
        std::process::id(),
        MARKERS.fetch_add(1, Ordering::Relaxed)
    )
}

/// The SQLSTATE the contract gives each reason.
fn sqlstate(reason: Reason) -> &'static str {
    match reason {
        Reason::Stale => "ZF001",
        Reason::Missing => "ZF002",
        Reason::Invalid | Reason::Forged => "ZF003",
        Reason::Unavailable => "ZF004",
    }
}

fn refusal_error(r: &Refusal) -> Bytes {
    frame::error_response("ERROR", sqlstate(r.reason), &r.message)
}

/// A FATAL error for the client, in the server's own words where it has
/// some (`08P01` protocol violation, `08006` connection failure, `57P01`
/// shutdown).
fn fatal(code: &str, message: &str) -> Bytes {
    frame::error_response("FATAL", code, message)
}

/// One unit of work answered by one ReadyForQuery.
#[derive(Default)]
struct Cycle {
    /// Sync/Query/FunctionCall sent: the server will answer it.
    closed: bool,
    started: Option<Instant>,
    guards: Vec<InflightGuard>,
    /// (resource, token) of the writes admitted in this cycle, so COMMIT
    /// can ask again whether they are still current.
    writes: Vec<(String, String)>,
    /// Swap the server error whose message names the marker for this one.
    swap_error: Option<(String, Bytes)>,
    /// Swap the next CommandComplete for this (the ROLLBACK sent for a
    /// refused COMMIT).
    swap_complete: Option<Bytes>,
    /// Changes to the fencing variables sent in this cycle.
    settings: Vec<FenceSetting>,
    error_seen: bool,
    rolled_back: bool,
}

/// The fencing variables of the session, tracked as Postgres tracks GUCs:
/// session values that only a transaction that ends well keeps, and
/// `SET LOCAL` values that end with their transaction.
///
/// Only what is known to have committed is stored; the settings of the
/// open transaction and of statements not yet answered are replayed on top
/// when a write needs the current values. Replaying (rather than applying
/// at once and undoing on failure) keeps a pipelined client's later SETs
/// when an earlier transaction fails.
#[derive(Debug, Default, Clone)]
struct Vars {
    /// From the startup packet: what RESET returns to.
    startup: [Option<String>; 2],
    /// As of the last transaction that ended well.
    committed: [Option<String>; 2],
}

/// The variables as a statement sees them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct View {
    session: [Option<String>; 2],
    /// `SET LOCAL` in the current transaction; `Some(None)` hides a value.
    local: [Option<Option<String>>; 2],
}

fn idx(v: FenceVar) -> usize {
    match v {
        FenceVar::Token => 0,
        FenceVar::Resource => 1,
    }
}

/// An empty value means "not set", as `SET fencing.token = ''` intends.
fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl Vars {
    fn from_startup(p: &StartupPacket) -> Vars {
        let mut startup: [Option<String>; 2] = [None, None];
        let mut put = |k: &str, v: &str| match k.to_ascii_lowercase().as_str() {
            "fencing.token" => startup[0] = non_empty(Some(v.to_owned())),
            "fencing.resource" => startup[1] = non_empty(Some(v.to_owned())),
            _ => {}
        };
        if let StartupKind::Startup { params, .. } = &p.kind {
            // Postgres takes unknown startup parameters as settings too.
            for (k, v) in params {
                put(k, v);
            }
        }
        if let Some(opts) = p.param("options") {
            for (k, v) in frame::option_settings(opts) {
                put(&k, &v);
            }
        }
        Vars {
            committed: startup.clone(),
            startup,
        }
    }

    /// The committed values with `settings` replayed on top.
    fn view<'a>(&self, settings: impl IntoIterator<Item = &'a FenceSetting>) -> View {
        let mut v = View {
            session: self.committed.clone(),
            local: [None, None],
        };
        for s in settings {
            self.apply(&mut v, s);
        }
        v
    }

    fn apply(&self, v: &mut View, s: &FenceSetting) {
        match s {
            FenceSetting::Set { var, value, local } => {
                let i = idx(*var);
                let value = match value {
                    Some(x) => non_empty(Some(x.clone())),
                    None => self.startup[i].clone(),
                };
                if *local {
                    v.local[i] = Some(value);
                } else {
                    v.session[i] = value;
                    v.local[i] = None;
                }
            }
            FenceSetting::Reset(var) => {
                let i = idx(*var);
                v.session[i] = self.startup[i].clone();
                v.local[i] = None;
            }
            FenceSetting::ResetAll => {
                v.session = self.startup.clone();
                v.local = [None, None];
            }
        }
    }

    /// A transaction that made `settings` committed: keep its session
    /// values (its `SET LOCAL`s end with it).
    fn commit<'a>(&mut self, settings: impl IntoIterator<Item = &'a FenceSetting>) {
        self.committed = self.view(settings).session;
    }
}

impl View {
    fn effective(&self, i: usize) -> Option<String> {
        match &self.local[i] {
            Some(v) => v.clone(),
            None => self.session[i].clone(),
        }
    }
}

/// State both loops see.
struct Shared {
    cycles: VecDeque<Cycle>,
    /// Status of the last ReadyForQuery.
    status: u8,
    /// Writes of the open transaction block, from cycles that ended with
    /// status `T`, which its COMMIT must decide again.
    txn_writes: Vec<(String, String)>,
    /// Settings of the open transaction, from cycles that ended in it.
    txn_settings: Vec<FenceSetting>,
    vars: Vars,
}

impl Shared {
    /// The cycle new client messages belong to, opened if needed.
    fn open_cycle(&mut self) -> &mut Cycle {
        if self.cycles.back().is_none_or(|c| c.closed) {
            self.cycles.push_back(Cycle {
                started: Some(Instant::now()),
                ..Cycle::default()
            });
        }
        let n = self.cycles.len();
        &mut self.cycles[n - 1]
    }

    /// Every write of the transaction so far, answered or not.
    fn txn_write_keys(&self) -> Vec<(String, String)> {
        let mut keys: Vec<(String, String)> = self.txn_writes.clone();
        for c in &self.cycles {
            keys.extend(c.writes.iter().cloned());
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// The variables as the next statement sees them: committed, then the
    /// open transaction's settings, then those not answered yet.
    fn view(&self) -> View {
        self.vars.view(
            self.txn_settings
                .iter()
                .chain(self.cycles.iter().flat_map(|c| c.settings.iter())),
        )
    }

    /// Closed cycles the server has not answered yet.
    fn awaiting(&self) -> bool {
        self.cycles.iter().any(|c| c.closed)
    }
}

struct Ctx {
    proxy: Arc<PgProxy>,
    peer: SocketAddr,
    shared: Mutex<Shared>,
    /// Fired at each ReadyForQuery.
    answered: Notify,
    /// Fired when the server side has ended.
    server_gone: Notify,
    client_w: tokio::sync::Mutex<OwnedWriteHalf>,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing below panics while holding it; a poisoned lock still
        // holds consistent state.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Best effort: the client may be gone.
    async fn to_client(&self, bytes: &[u8]) -> bool {
        let mut w = self.client_w.lock().await;
        w.write_all(bytes).await.is_ok()
    }
}

/// A statement known by name (Parse) or bound to a portal (Bind).
#[derive(Clone)]
struct Prepared {
    class: Arc<Classification>,
    /// The Parse message, for the audit's fingerprint on refusal.
    parse: Frame,
}

/// Where a statement's text is, for the audit's fingerprint; read only
/// when a write is refused, so admitted writes pay nothing for it.
#[derive(Clone, Copy)]
enum Source<'a> {
    Text(&'a [u8]),
    Parse(&'a Frame),
    Label(&'static str),
}

impl Source<'_> {
    fn fingerprint(&self) -> String {
        match self {
            Source::Text(t) => adapters::pg::fingerprint(t),
            Source::Parse(f) => match f.client() {
                Ok(ClientMsg::Parse { query, .. }) => adapters::pg::fingerprint(query),
                _ => "(unreadable statement)".into(),
            },
            Source::Label(l) => (*l).to_owned(),
        }
    }
}

pub(super) async fn run(
    proxy: Arc<PgProxy>,
    mut client: TcpStream,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let mut cbuf = BytesMut::with_capacity(8 * 1024);
    let startup = match tokio::time::timeout(STARTUP_TIMEOUT, startup(&mut client, &mut cbuf)).await
    {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return,
        Ok(Err(StartupError::Frame(e))) => {
            tracing::debug!(%peer, error = %e, "bad startup packet");
            let _ = client
                .write_all(&fatal("08P01", &format!("invalid startup packet: {e}")))
                .await;
            return;
        }
        Ok(Err(StartupError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "client left during startup");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "startup timed out");
            return;
        }
    };
    if startup.kind == StartupKind::Cancel {
        forward_cancel(&proxy, startup.raw).await;
        return;
    }
    let server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&proxy.upstream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            proxy.counters.upstream_errors.increment(1);
            tracing::warn!(%peer, upstream = %proxy.upstream, error = %e, "cannot reach the upstream Postgres server");
            let _ = client
                .write_all(&fatal(
                    "08006",
                    &format!("fencepost: cannot reach the upstream server: {e}"),
                ))
                .await;
            return;
        }
        Err(_) => {
            proxy.counters.upstream_errors.increment(1);
            let _ = client
                .write_all(&fatal(
                    "08006",
                    "fencepost: the upstream server did not accept the connection in time",
                ))
                .await;
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let vars = Vars::from_startup(&startup);
    let (cr, cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    if sw.write_all(&startup.raw).await.is_err() {
        proxy.counters.upstream_errors.increment(1);
        return;
    }
    let mut cycles = VecDeque::new();
    // The server's first ReadyForQuery ends authentication.
    cycles.push_back(Cycle {
        closed: true,
        ..Cycle::default()
    });
    let ctx = Ctx {
        proxy,
        peer,
        shared: Mutex::new(Shared {
            cycles,
            status: b'I',
            txn_writes: Vec::new(),
            txn_settings: Vec::new(),
            vars,
        }),
        answered: Notify::new(),
        server_gone: Notify::new(),
        client_w: tokio::sync::Mutex::new(cw),
    };
    tokio::join!(
        client_loop(&ctx, cr, sw, cbuf, shutdown),
        server_loop(&ctx, sr)
    );
}

enum StartupError {
    Frame(FrameError),
    Io(std::io::Error),
}

/// Reads startup packets, answering SSL and GSS encryption requests with
/// "no", until a StartupMessage or CancelRequest arrives. `None`: the
/// client left.
async fn startup(
    client: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Option<StartupPacket>, StartupError> {
    loop {
        if let Some(p) = split_startup(buf).map_err(StartupError::Frame)? {
            match p.kind {
                StartupKind::Ssl | StartupKind::GssEnc => {
                    client
                        .write_all(frame::REFUSE_ENCRYPTION)
                        .await
                        .map_err(StartupError::Io)?;
                    continue;
                }
                _ => return Ok(Some(p)),
            }
        }
        if client.read_buf(buf).await.map_err(StartupError::Io)? == 0 {
            return Ok(None);
        }
    }
}

/// A CancelRequest goes to the server on a connection of its own, as
/// Postgres expects; with one upstream, the backend it names is there.
async fn forward_cancel(proxy: &PgProxy, raw: Bytes) {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&proxy.upstream)).await
    else {
        proxy.counters.upstream_errors.increment(1);
        return;
    };
    if s.write_all(&raw).await.is_ok() {
        // The server closes the connection when it has read the request.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, s.read(&mut sink)).await;
    }
}

/// What the client loop makes of one message.
enum Out {
    /// Send these bytes to the server.
    Send(Bytes),
    /// Send them and stop: the client said goodbye.
    Last(Bytes),
}

struct ClientSide {
    statements: HashMap<Bytes, Prepared>,
    portals: HashMap<Bytes, Prepared>,
    /// After a refusal in the extended protocol the server discards
    /// everything up to Sync; so does the proxy's fencing.
    skip_until_sync: bool,
}

async fn client_loop(
    ctx: &Ctx,
    mut cr: OwnedReadHalf,
    mut sw: OwnedWriteHalf,
    mut buf: BytesMut,
    shutdown: Shutdown,
) {
    let mut side = ClientSide {
        statements: HashMap::new(),
        portals: HashMap::new(),
        skip_until_sync: false,
    };
    let mut out = BytesMut::new();
    let mut closing = false;
    let mut terminated = false;
    'read: loop {
        loop {
            let frame = match split_frame(&mut buf, ctx.proxy.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer = %ctx.peer, error = %e, "malformed message from client");
                    let _ = sw.write_all(&out).await;
                    ctx.to_client(&fatal("08P01", &format!("fencepost: {e}")))
                        .await;
                    break 'read;
                }
            };
            // Earlier pipelined messages go out before a decision may wait.
            if !out.is_empty() && needs_decision(&frame) {
                if sw.write_all(&out).await.is_err() {
                    break 'read;
                }
                out.clear();
            }
            match handle(ctx, &mut side, frame).await {
                Ok(Out::Send(b)) => out.extend_from_slice(&b),
                Ok(Out::Last(b)) => {
                    out.extend_from_slice(&b);
                    terminated = true;
                    let _ = sw.write_all(&out).await;
                    break 'read;
                }
                Err(e) => {
                    tracing::debug!(peer = %ctx.peer, error = %e, "malformed message from client");
                    let _ = sw.write_all(&out).await;
                    ctx.to_client(&fatal("08P01", &format!("fencepost: {e}")))
                        .await;
                    break 'read;
                }
            }
        }
        if !out.is_empty() {
            if sw.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if closing && idle(ctx) {
            ctx.to_client(&fatal(
                "57P01",
                "terminating connection due to administrator command",
            ))
            .await;
            let _ = sw.write_all(&frame::terminate()).await;
            terminated = true;
            break;
        }
        let answered = ctx.answered.notified();
        tokio::select! {
            r = cr.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            () = ctx.server_gone.notified() => break,
            () = shutdown.wait(), if !closing => closing = true,
            () = answered, if closing => {}
        }
    }
    if !terminated {
        // The client vanished. What it already sent may still be running;
        // keep its guards until the server has answered it, so a newer
        // token's drain waits for it. An open transaction block is rolled
        // back by the server when the connection closes.
        wait_answered(ctx).await;
    }
    let _ = sw.shutdown().await;
}

fn idle(ctx: &Ctx) -> bool {
    let s = ctx.lock();
    s.cycles.is_empty() && s.status == b'I'
}

async fn wait_answered(ctx: &Ctx) {
    let wait = async {
        loop {
            let mut n = pin!(ctx.answered.notified());
            n.as_mut().enable();
            if !ctx.lock().awaiting() {
                return;
            }
            tokio::select! {
                () = n => {}
                () = ctx.server_gone.notified() => return,
            }
        }
    };
    if tokio::time::timeout(ORPHAN_WAIT, wait).await.is_err() {
        tracing::warn!(peer = %ctx.peer, "server still busy with a vanished client's statements; closing");
    }
}

fn needs_decision(f: &Frame) -> bool {
    matches!(f.tag(), b'Q' | b'E' | b'F')
}

async fn handle(ctx: &Ctx, side: &mut ClientSide, frame: Frame) -> Result<Out, FrameError> {
    let proxy = &ctx.proxy;
    match frame.client()? {
        ClientMsg::Query(text) => {
            side.skip_until_sync = false;
            let class = proxy.classifier.classify_bytes(text);
            let out = fence(ctx, &class, Source::Text(text), Unit::Query).await;
            ctx.lock().open_cycle().closed = true;
            Ok(Out::Send(out.unwrap_or_else(|| frame.into_raw())))
        }
        ClientMsg::Parse { name, query } => {
            let class = proxy.classifier.classify_bytes(query);
            let name = Bytes::copy_from_slice(name);
            ctx.lock().open_cycle();
            side.statements.insert(
                name,
                Prepared {
                    class,
                    parse: frame.clone(),
                },
            );
            Ok(Out::Send(frame.into_raw()))
        }
        ClientMsg::Bind { portal, statement } => {
            let portal = Bytes::copy_from_slice(portal);
            ctx.lock().open_cycle();
            match side.statements.get(statement).cloned() {
                Some(p) => {
                    side.portals.insert(portal, p);
                }
                None => {
                    side.portals.remove(&portal);
                }
            }
            Ok(Out::Send(frame.into_raw()))
        }
        ClientMsg::Execute { portal, .. } => {
            ctx.lock().open_cycle();
            if side.skip_until_sync {
                return Ok(Out::Send(frame.into_raw()));
            }
            let prepared = side.portals.get(portal).cloned();
            // A portal the proxy never saw bound is unknown: a write.
            let unknown = Classification {
                write: true,
                ..Classification::default()
            };
            let (class, source) = match &prepared {
                Some(p) => (&*p.class, Source::Parse(&p.parse)),
                None => (
                    &unknown,
                    Source::Label("(Execute of a portal the proxy did not see bound)"),
                ),
            };
            match fence(ctx, class, source, Unit::Execute).await {
                Some(poison) => {
                    side.skip_until_sync = true;
                    Ok(Out::Send(poison))
                }
                None => Ok(Out::Send(frame.into_raw())),
            }
        }
        ClientMsg::Close { kind, name } => {
            ctx.lock().open_cycle();
            match kind {
                b'S' => {
                    side.statements.remove(name);
                }
                b'P' => {
                    side.portals.remove(name);
                }
                _ => {}
            }
            Ok(Out::Send(frame.into_raw()))
        }
        ClientMsg::Sync => {
            side.skip_until_sync = false;
            ctx.lock().open_cycle().closed = true;
            Ok(Out::Send(frame.into_raw()))
        }
        ClientMsg::FunctionCall => {
            // A fast-path call can do anything: a write.
            let class = Classification {
                write: true,
                ..Classification::default()
            };
            let out = fence(
                ctx,
                &class,
                Source::Label("(fast-path function call)"),
                Unit::Query,
            )
            .await;
            ctx.lock().open_cycle().closed = true;
            Ok(Out::Send(out.unwrap_or_else(|| frame.into_raw())))
        }
        ClientMsg::Terminate => Ok(Out::Last(frame.into_raw())),
        ClientMsg::Other => Ok(Out::Send(frame.into_raw())),
    }
}

/// Whether the refusal replaces a simple-protocol unit (Query or
/// FunctionCall, answered by its own ReadyForQuery) or an Execute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Query,
    Execute,
}

/// Applies the statement's SETs, decides its write (and a COMMIT's
/// writes) through the fencer, and files guards in the open cycle.
/// Returns what to send instead of the message when refused.
async fn fence(ctx: &Ctx, class: &Classification, source: Source<'_>, unit: Unit) -> Option<Bytes> {
    let (fences, peer) = {
        let mut s = ctx.lock();
        s.open_cycle()
            .settings
            .extend(class.settings.iter().cloned());
        let view = s.view();
        let mut fences: Vec<(Option<String>, Option<String>)> = Vec::new();
        if class.write {
            let CommentFence { token, resource } = &class.comment;
            fences.push((
                non_empty(resource.clone()).or_else(|| view.effective(1)),
                non_empty(token.clone()).or_else(|| view.effective(0)),
            ));
        }
        if class.commits {
            // The block's writes must still be current when it commits.
            for (r, t) in s.txn_write_keys() {
                let key = (Some(r), Some(t));
                if !fences.contains(&key) {
                    fences.push(key);
                }
            }
        }
        (fences, ctx.peer)
    };
    if fences.is_empty() {
        return None;
    }
    let detail = || source.fingerprint();
    let info = WriteInfo {
        protocol: Protocol::Postgres,
        client: peer,
        detail: &detail,
    };
    let mut admitted = Vec::with_capacity(fences.len());
    for (resource, token) in &fences {
        let decision = ctx
            .proxy
            .fencer
            .decide(
                &ctx.proxy.checker,
                &ctx.proxy.counters,
                resource.as_deref(),
                token.as_deref(),
                &info,
            )
            .await;
        match decision {
            Decision::Admit(a) => admitted.push((a.guard, resource.clone(), token.clone())),
            Decision::Refuse(refusal) => {
                // Guards admitted for this statement drop here: it never runs.
                drop(admitted);
                let error = refusal_error(&refusal);
                let mut s = ctx.lock();
                let cycle = s.open_cycle();
                if unit == Unit::Query && class.single_commit {
                    cycle.swap_complete = Some(error);
                    return Some(frame::query("ROLLBACK"));
                }
                let m = marker();
                cycle.swap_error = Some((m.clone(), error));
                return Some(match unit {
                    Unit::Query => frame::query(&format!("FETCH ALL FROM \"{m}\"")),
                    Unit::Execute => frame::execute(&m),
                });
            }
        }
    }
    let mut s = ctx.lock();
    let cycle = s.open_cycle();
    for (guard, resource, token) in admitted {
        cycle.guards.push(guard);
        if let (Some(r), Some(t)) = (resource, token) {
            cycle.writes.push((r, t));
        }
    }
    None
}

async fn server_loop(ctx: &Ctx, mut sr: OwnedReadHalf) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::new();
    let mut client_gone = false;
    loop {
        loop {
            let frame = match split_frame(&mut buf, ctx.proxy.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(peer = %ctx.peer, error = %e, "malformed message from the upstream server");
                    ctx.proxy.counters.upstream_errors.increment(1);
                    out.extend_from_slice(&fatal(
                        "08P01",
                        &format!("fencepost: the upstream server sent a malformed message: {e}"),
                    ));
                    if !client_gone {
                        ctx.to_client(&out).await;
                    }
                    finish(ctx);
                    return;
                }
            };
            match on_server_frame(ctx, &frame) {
                Some(replacement) => out.extend_from_slice(&replacement),
                None => out.extend_from_slice(frame.raw()),
            }
        }
        if !out.is_empty() {
            if !client_gone && !ctx.to_client(&out).await {
                // Keep reading: the server's answers still release guards.
                client_gone = true;
            }
            out.clear();
        }
        match sr.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    finish(ctx);
}

/// The server side has ended: nothing more will be answered. Guards drop
/// with the state (the server has closed, so the writes are over).
fn finish(ctx: &Ctx) {
    {
        let mut s = ctx.lock();
        s.cycles.clear();
    }
    ctx.server_gone.notify_one();
    ctx.answered.notify_waiters();
}

/// Bookkeeping for one server message; returns a replacement for it.
fn on_server_frame(ctx: &Ctx, frame: &Frame) -> Option<Bytes> {
    let msg = match frame.backend() {
        Ok(m) => m,
        // Not ours to judge: relay it and let the client complain.
        Err(_) => return None,
    };
    match msg {
        BackendMsg::ErrorResponse(fields) => {
            let mut s = ctx.lock();
            let cycle = s.cycles.front_mut()?;
            cycle.error_seen = true;
            let names_marker = |m: &str| {
                fields
                    .get(b'M')
                    .is_some_and(|msg| msg.windows(m.len()).any(|w| w == m.as_bytes()))
            };
            match &cycle.swap_error {
                Some((m, _)) if names_marker(m) => cycle.swap_error.take().map(|(_, e)| e),
                _ => None,
            }
        }
        BackendMsg::CommandComplete(tag) => {
            let mut s = ctx.lock();
            let cycle = s.cycles.front_mut()?;
            if tag == b"ROLLBACK" {
                cycle.rolled_back = true;
            }
            cycle.swap_complete.take()
        }
        BackendMsg::ReadyForQuery(status) => {
            let done = {
                let mut s = ctx.lock();
                let cycle = s.cycles.pop_front();
                s.status = status;
                let mut done = None;
                if let Some(mut c) = cycle {
                    if let Some(t) = c.started {
                        done = Some(t);
                    }
                    if status == b'T' || status == b'E' {
                        s.txn_settings.append(&mut c.settings);
                    } else {
                        let settings = std::mem::take(&mut s.txn_settings);
                        if !(c.error_seen || c.rolled_back) {
                            s.vars.commit(settings.iter().chain(c.settings.iter()));
                        }
                    }
                    // The cycle's guards drop with it: the server has
                    // finished its statements.
                    if status == b'T' {
                        s.txn_writes.append(&mut c.writes);
                    } else {
                        // The block is over, or failed ('E'): nothing of it
                        // can commit any more.
                        s.txn_writes.clear();
                    }
                }
                done
            };
            if let Some(t) = done {
                ctx.proxy.counters.latency.record(t.elapsed().as_secs_f64());
            }
            ctx.answered.notify_waiters();
            None
        }
        BackendMsg::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(var: FenceVar, v: &str, local: bool) -> FenceSetting {
        FenceSetting::Set {
            var,
            value: Some(v.into()),
            local,
        }
    }

    #[test]
    fn vars_follow_transactions() {
        let mut v = Vars {
            startup: [Some("1".into()), Some("r".into())],
            committed: [Some("1".into()), Some("r".into())],
        };
        let tok = |view: View| view.effective(0);
        let s5 = set(FenceVar::Token, "5", false);
        let l6 = set(FenceVar::Token, "6", true);
        assert_eq!(tok(v.view([&s5])).as_deref(), Some("5"));
        assert_eq!(tok(v.view([&s5, &l6])).as_deref(), Some("6"));
        // Commit: the session value stays, the local one ends.
        v.commit([&s5, &l6]);
        assert_eq!(tok(v.view([])).as_deref(), Some("5"));
        // A session SET after SET LOCAL overrides it.
        let s7 = set(FenceVar::Token, "7", false);
        assert_eq!(tok(v.view([&l6, &s7])).as_deref(), Some("7"));
        let reset = FenceSetting::Reset(FenceVar::Token);
        assert_eq!(tok(v.view([&reset])).as_deref(), Some("1"));
        let empty = set(FenceVar::Resource, "", false);
        assert_eq!(v.view([&empty]).effective(1), None);
        assert_eq!(
            v.view([&empty, &FenceSetting::ResetAll])
                .effective(1)
                .as_deref(),
            Some("r")
        );
        let default_local = FenceSetting::Set {
            var: FenceVar::Token,
            value: None,
            local: true,
        };
        assert_eq!(tok(v.view([&default_local])).as_deref(), Some("1"));
    }

    #[test]
    fn sqlstates() {
        assert_eq!(sqlstate(Reason::Stale), "ZF001");
        assert_eq!(sqlstate(Reason::Missing), "ZF002");
        assert_eq!(sqlstate(Reason::Invalid), "ZF003");
        assert_eq!(sqlstate(Reason::Forged), "ZF003");
        assert_eq!(sqlstate(Reason::Unavailable), "ZF004");
    }

    #[test]
    fn startup_vars() {
        let p = StartupPacket {
            raw: Bytes::new(),
            kind: StartupKind::Startup {
                version: 3 << 16,
                params: vec![
                    ("user".into(), "u".into()),
                    (
                        "options".into(),
                        "-c fencing.token=5 -c fencing.resource=orders".into(),
                    ),
                ],
            },
        };
        let v = Vars::from_startup(&p).view([]);
        assert_eq!(v.effective(0).as_deref(), Some("5"));
        assert_eq!(v.effective(1).as_deref(), Some("orders"));
    }
}
