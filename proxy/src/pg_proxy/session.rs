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
//!
//! # Guard mode (`enforce = "database"`)
//! After the proxy admits a write, it also sends `fencepost.advance(resource,
//! token)` (installed by `fencepost migrate --guard`) in the write's own
//! transaction, just before the write: prepended to the same Query in the
//! simple protocol (one implicit transaction, or the open block), or as a
//! Parse/Bind/Execute/Close under names of its own just before the
//! client's Execute, within the same Sync, in the extended protocol. The
//! upsert holds the resource's row lock until that transaction ends, so
//! Postgres itself serializes the resource's transactions across any
//! number of proxies, and a stale one fails with the guard's own `ZF001`.
//! The guard runs before every admitted write (not only a block's first):
//! repeating it in a transaction that already holds the lock is cheap, and
//! the proxy need not know which writes the server has already run.
//! Statements that Postgres refuses inside a transaction block (VACUUM,
//! CREATE DATABASE, CREATE INDEX CONCURRENTLY, ...) cannot share one with
//! the guard; they, and fast-path function calls, are fenced by the proxy
//! alone, as in `enforce = "proxy"`.
//! The guard's answers are hidden from the client by position: the cycle
//! counts the completions the client's own messages are owed, and drops
//! what the server sends for the guard between them (a [`Strip`]). Its
//! ErrorResponse is never hidden.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use fencing::{AuditRecord, InflightGuard, Protocol, Reason};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use wire::pg::frame::{self, split_frame, split_startup};
use wire::pg::guard;
use wire::pg::{
    BackendMsg, Classification, ClientMsg, CommentFence, FenceSetting, FenceVar, Frame, FrameError,
    StartupKind, StartupPacket,
};

use super::{PgProxy, CONNECT_TIMEOUT, ORPHAN_WAIT};
use crate::fencer::{now_ms, Decision, Refusal, WriteInfo};
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
    /// Completions (see [`is_completion`]) the server owes for the
    /// extended-protocol messages the client sent in this cycle so far.
    sent: u32,
    /// Completions of the client's messages seen from the server so far.
    seen: u32,
    /// Answers of guard statements (guard mode) to hide from the client,
    /// in the order they were sent.
    strips: VecDeque<Strip>,
    /// Characters of guard calls prepended to this cycle's Query, which
    /// error positions in the client's text must not count.
    position_shift: u32,
}

/// Where the answers of one injected guard call are, and how they end.
struct Strip {
    /// The guard went out after the client's messages owing this many
    /// completions; its answers come right after theirs.
    after: u32,
    kind: StripKind,
    /// What the guard compared, for the audit record when it refuses.
    resource: String,
    token: u64,
    detail: Detail,
}

/// The statement a guard protected, kept (cheaply: the message's bytes are
/// shared) so the audit can fingerprint it only if the guard refuses.
#[derive(Clone)]
enum Detail {
    Query(Frame),
    Parse(Frame),
    Label(&'static str),
}

impl Detail {
    fn fingerprint(&self) -> String {
        match self {
            Detail::Query(f) => match f.client() {
                Ok(ClientMsg::Query(t)) => wire::pg::fingerprint(t),
                _ => "(unreadable statement)".into(),
            },
            Detail::Parse(f) => Source::Parse(f).fingerprint(),
            Detail::Label(l) => (*l).to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum StripKind {
    /// Prepended to a simple Query: its answers end with CommandComplete.
    Simple,
    /// `frame::run_named` in an extended batch: this many completions left.
    Extended(u32),
}

/// The completions of `frame::run_named`: Parse, Bind, Execute, two Close.
const RUN_NAMED_COMPLETIONS: u32 = 5;

/// Server messages that end the answer to one extended-protocol message:
/// ParseComplete, BindComplete, CloseComplete, CommandComplete,
/// EmptyQueryResponse, PortalSuspended, RowDescription and NoData (the
/// last two end a Describe). Rows, notices and COPY data do not.
fn is_completion(tag: u8) -> bool {
    matches!(tag, b'1' | b'2' | b'3' | b'C' | b'I' | b's' | b'T' | b'n')
}

/// Client messages the server answers with exactly one completion:
/// Parse, Bind, Execute, Describe, Close.
fn owes_completion(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'E' | b'D' | b'C')
}

/// Unique names for the guard's statement and portal in extended batches.
static GUARD_NAMES: AtomicU64 = AtomicU64::new(1);

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
    /// A read-write transaction block is open as far as the statements
    /// sent so far say (for `strict` mode): set by BEGIN, cleared by
    /// COMMIT/ROLLBACK and by an idle ReadyForQuery with nothing pending.
    in_block: bool,
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
    client_w: tokio::sync::Mutex<ClientWrite>,
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
        // TLS buffers records: flush so the answer leaves now.
        w.write_all(bytes).await.is_ok() && w.flush().await.is_ok()
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
            Source::Text(t) => wire::pg::fingerprint(t),
            Source::Parse(f) => match f.client() {
                Ok(ClientMsg::Parse { query, .. }) => wire::pg::fingerprint(query),
                _ => "(unreadable statement)".into(),
            },
            Source::Label(l) => (*l).to_owned(),
        }
    }
}

/// The client's half of the session: plain TCP, or TLS after an
/// SSLRequest was answered `S`. The TLS session is split with a lock
/// (`tokio::io::split`); plain TCP keeps its lock-free halves.
enum ClientConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

type ClientRead = Box<dyn AsyncRead + Send + Unpin>;
type ClientWrite = Box<dyn AsyncWrite + Send + Unpin>;

impl ClientConn {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ClientConn::Plain(s) => s.write_all(bytes).await,
            ClientConn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    fn into_halves(self) -> (ClientRead, ClientWrite) {
        match self {
            ClientConn::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            ClientConn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// The startup exchange up to the StartupMessage or CancelRequest,
/// upgrading to TLS on the way when the client asks and a certificate is
/// configured. `None`: the client left or was told why not.
async fn accept(
    proxy: &PgProxy,
    client: TcpStream,
    buf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<(ClientConn, StartupPacket)> {
    let mut conn = ClientConn::Plain(client);
    loop {
        let got = match &mut conn {
            ClientConn::Plain(s) => startup(s, buf, proxy.tls.is_some()).await,
            // Once encrypted, a second SSLRequest gets "no".
            ClientConn::Tls(s) => startup(&mut **s, buf, false).await,
        };
        match got {
            Ok(Some(Got::Packet(p))) => return Some((conn, p)),
            Ok(Some(Got::Tls)) => {
                let (ClientConn::Plain(mut tcp), Some(acceptor)) = (conn, proxy.tls.clone()) else {
                    return None;
                };
                // Bytes sent after the SSLRequest but before the handshake
                // would be taken as if they came encrypted (CVE-2021-23214):
                // refuse, as Postgres does.
                if !buf.is_empty() {
                    let _ = tcp
                        .write_all(&fatal(
                            "08P01",
                            "received unencrypted data after SSL request",
                        ))
                        .await;
                    return None;
                }
                tcp.write_all(frame::ACCEPT_ENCRYPTION).await.ok()?;
                match acceptor.accept(tcp).await {
                    Ok(tls) => conn = ClientConn::Tls(Box::new(tls)),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return None;
                    }
                }
            }
            Ok(None) => return None,
            Err(StartupError::Frame(e)) => {
                tracing::debug!(%peer, error = %e, "bad startup packet");
                let _ = conn
                    .write_all(&fatal("08P01", &format!("invalid startup packet: {e}")))
                    .await;
                return None;
            }
            Err(StartupError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "client left during startup");
                return None;
            }
        }
    }
}

pub(super) async fn run(
    proxy: Arc<PgProxy>,
    client: TcpStream,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let mut cbuf = BytesMut::with_capacity(8 * 1024);
    let (mut client, startup) = match tokio::time::timeout(
        proxy.startup_timeout,
        accept(&proxy, client, &mut cbuf, peer),
    )
    .await
    {
        Ok(Some(x)) => x,
        Ok(None) => return,
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
    let (cr, cw) = client.into_halves();
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
            in_block: false,
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

/// What [`startup`] read.
enum Got {
    Packet(StartupPacket),
    /// An SSLRequest, to be answered `S` and upgraded by the caller.
    Tls,
}

/// Reads startup packets, answering GSS encryption requests (and SSL
/// ones unless `offer_tls`) with "no", until a StartupMessage or
/// CancelRequest arrives. `None`: the client left.
async fn startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    offer_tls: bool,
) -> Result<Option<Got>, StartupError> {
    loop {
        if let Some(p) = split_startup(buf).map_err(StartupError::Frame)? {
            match p.kind {
                StartupKind::Ssl if offer_tls => return Ok(Some(Got::Tls)),
                StartupKind::Ssl | StartupKind::GssEnc => {
                    client
                        .write_all(frame::REFUSE_ENCRYPTION)
                        .await
                        .map_err(StartupError::Io)?;
                    continue;
                }
                _ => return Ok(Some(Got::Packet(p))),
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
    mut cr: ClientRead,
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
    // Made once, not per read: each is a registration (a watch receiver, a
    // waiter in the Notify's list) that a loop iteration per message would
    // redo every time. Both end the loop (or stop being polled) once they
    // fire, so they are never polled after completing.
    let mut server_gone = pin!(ctx.server_gone.notified());
    server_gone.as_mut().enable();
    let mut shutting_down = pin!(shutdown.wait());
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
            // Earlier pipelined messages must go out before a decision
            // waits: it may be waiting (the drain) for exactly those to be
            // answered. Most decisions never wait (a read, or a write with
            // the current token), and then they leave in the same write
            // as this message, one syscall and one packet for a whole
            // Parse/Bind/Execute/Sync batch. So try the decision once, and
            // flush only if it would wait.
            let mut handled = pin!(handle(ctx, &mut side, frame));
            let done = match poll_fn(|cx| Poll::Ready(handled.as_mut().poll(cx))).await {
                Poll::Ready(done) => done,
                Poll::Pending => {
                    if !out.is_empty() {
                        if sw.write_all(&out).await.is_err() {
                            break 'read;
                        }
                        out.clear();
                    }
                    handled.await
                }
            };
            match done {
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
            () = &mut server_gone => break,
            () = &mut shutting_down, if !closing => closing = true,
            () = answered, if closing => {}
        }
    }
    if !terminated {
        // The client vanished. What it already sent may still be running;
        // keep its guards until the server has answered it, so a newer
        // token's drain waits for it. Half-close first, as a vanished
        // client's own socket would: the server still finishes (and
        // answers) what it is running, then reads EOF and ends the
        // session, rolling back an open block. Without it a server
        // waiting for input (a COPY FROM STDIN, half a message) would
        // never answer, and the guards would pin the resource until
        // ORPHAN_WAIT.
        let _ = sw.shutdown().await;
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

async fn handle(ctx: &Ctx, side: &mut ClientSide, frame: Frame) -> Result<Out, FrameError> {
    let proxy = &ctx.proxy;
    match frame.client()? {
        ClientMsg::Query(text) => {
            side.skip_until_sync = false;
            let class = proxy.classifier.classify_bytes(text);
            let original = frame.clone();
            let out = match fence(ctx, &class, Source::Text(text), Unit::Query).await {
                Verdict::Refused(b) => b,
                Verdict::Pass => frame.into_raw(),
                Verdict::Admitted(writes) => {
                    let mut s = ctx.lock();
                    let cycle = s.open_cycle();
                    // One guard statement per admitted (resource, token),
                    // prepended in the same Query: one implicit transaction
                    // (or the same block) as the client's statements.
                    let mut body = Vec::with_capacity(text.len() + 96 * writes.len());
                    for (r, t) in &writes {
                        body.extend_from_slice(guard::call(r, *t).as_bytes());
                        body.extend_from_slice(b";\n");
                        cycle.strips.push_back(Strip {
                            after: cycle.sent,
                            kind: StripKind::Simple,
                            resource: r.clone(),
                            token: *t,
                            detail: Detail::Query(original.clone()),
                        });
                    }
                    cycle.position_shift = u32::try_from(body.len()).unwrap_or(u32::MAX);
                    body.extend_from_slice(text);
                    body.push(0);
                    Frame::new(b'Q', &body).into_raw()
                }
            };
            ctx.lock().open_cycle().closed = true;
            Ok(Out::Send(out))
        }
        ClientMsg::Parse { name, query } => {
            let class = proxy.classifier.classify_bytes(query);
            let name = Bytes::copy_from_slice(name);
            ctx.lock().open_cycle().sent += 1;
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
            ctx.lock().open_cycle().sent += 1;
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
            let verdict = fence(ctx, class, source, Unit::Execute).await;
            let mut s = ctx.lock();
            let cycle = s.open_cycle();
            let out = match verdict {
                Verdict::Refused(poison) => {
                    side.skip_until_sync = true;
                    poison
                }
                Verdict::Pass => frame.into_raw(),
                Verdict::Admitted(writes) => {
                    // The guard runs just before the Execute, before the
                    // same Sync: in the same (implicit or explicit)
                    // transaction, under names of its own so the client's
                    // unnamed statement and portal are left alone.
                    let mut out = BytesMut::new();
                    for (r, t) in &writes {
                        let name = format!(
                            "fencepost-guard-{}",
                            GUARD_NAMES.fetch_add(1, Ordering::Relaxed)
                        );
                        out.extend_from_slice(&frame::run_named(&name, &guard::call(r, *t)));
                        cycle.strips.push_back(Strip {
                            after: cycle.sent,
                            kind: StripKind::Extended(RUN_NAMED_COMPLETIONS),
                            resource: r.clone(),
                            token: *t,
                            detail: match &prepared {
                                Some(p) => Detail::Parse(p.parse.clone()),
                                None => Detail::Label(
                                    "(Execute of a portal the proxy did not see bound)",
                                ),
                            },
                        });
                    }
                    out.extend_from_slice(frame.raw());
                    out.freeze()
                }
            };
            cycle.sent += 1;
            Ok(Out::Send(out))
        }
        ClientMsg::Close { kind, name } => {
            ctx.lock().open_cycle().sent += 1;
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
            // In guard mode the call is fenced by the proxy only: the
            // fast-path protocol has no way to run a second statement in
            // the same implicit transaction.
            let out = match fence(
                ctx,
                &class,
                Source::Label("(fast-path function call)"),
                Unit::Query,
            )
            .await
            {
                Verdict::Refused(b) => b,
                Verdict::Pass | Verdict::Admitted(_) => frame.into_raw(),
            };
            ctx.lock().open_cycle().closed = true;
            Ok(Out::Send(out))
        }
        ClientMsg::Terminate => Ok(Out::Last(frame.into_raw())),
        ClientMsg::Other => {
            if owes_completion(frame.tag()) {
                // Describe.
                ctx.lock().open_cycle().sent += 1;
            }
            Ok(Out::Send(frame.into_raw()))
        }
    }
}

/// Whether the refusal replaces a simple-protocol unit (Query or
/// FunctionCall, answered by its own ReadyForQuery) or an Execute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Query,
    Execute,
}

/// What [`fence`] made of a statement.
enum Verdict {
    /// Nothing to decide (a read), or admitted in proxy mode: send it.
    Pass,
    /// Admitted in guard mode: send it after the guard calls for these
    /// (resource, token) pairs.
    Admitted(Vec<(String, u64)>),
    /// Refused: send these bytes instead.
    Refused(Bytes),
}

/// Applies the statement's SETs, decides its write (and a COMMIT's
/// writes) through the fencer, and files guards in the open cycle.
async fn fence(ctx: &Ctx, class: &Classification, source: Source<'_>, unit: Unit) -> Verdict {
    let (fences, peer) = {
        let mut s = ctx.lock();
        s.open_cycle()
            .settings
            .extend(class.settings.iter().cloned());
        let view = s.view();
        let strict_write = ctx.proxy.strict && class.data && (class.data_in_block || s.in_block);
        if let Some(b) = class.block_after {
            s.in_block = b;
        }
        let mut fences: Vec<(Option<String>, Option<String>)> = Vec::new();
        if class.write || strict_write {
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
        return Verdict::Pass;
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
                return Verdict::Refused(refuse(cycle, class, unit, error));
            }
        }
    }
    // Guard mode: the numbers to compare-and-advance in the database. The
    // checker has just accepted these tokens (and caches signed ones), so
    // this cannot fail; if it somehow did, refuse rather than skip the
    // guard.
    let mut guarded = Vec::new();
    // A statement that cannot share a transaction is fenced by the proxy
    // only (see the module docs).
    if ctx.proxy.guard && !class.outside_block {
        for (_, resource, token) in &admitted {
            let (Some(r), Some(t)) = (resource, token) else {
                continue;
            };
            match ctx.proxy.checker.check(r, t) {
                Ok(n) => guarded.push((r.clone(), n)),
                Err(_) => {
                    drop(admitted);
                    let error = frame::error_response(
                        "ERROR",
                        "ZF004",
                        "fencepost: cannot run the database guard for this token",
                    );
                    let mut s = ctx.lock();
                    let cycle = s.open_cycle();
                    return Verdict::Refused(refuse(cycle, class, unit, error));
                }
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
    if guarded.is_empty() {
        Verdict::Pass
    } else {
        guarded.sort();
        guarded.dedup();
        Verdict::Admitted(guarded)
    }
}

/// What to send in place of a refused statement (see the module docs),
/// with the cycle set up to swap the server's answer for `error`.
fn refuse(cycle: &mut Cycle, class: &Classification, unit: Unit, error: Bytes) -> Bytes {
    if unit == Unit::Query && class.single_commit {
        cycle.swap_complete = Some(error);
        return frame::query("ROLLBACK");
    }
    let m = marker();
    cycle.swap_error = Some((m.clone(), error));
    match unit {
        Unit::Query => frame::query(&format!("FETCH ALL FROM \"{m}\"")),
        Unit::Execute => frame::execute(&m),
    }
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
    if let Some(hidden) = strip_guard_answer(ctx, frame) {
        return Some(hidden);
    }
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
                // A position in the client's text, counted by the server
                // over the guard calls prepended to it.
                _ if cycle.position_shift > 0 => {
                    frame::shift_position(b'E', &frame.body(), cycle.position_shift)
                }
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
                if status == b'I' && s.cycles.is_empty() {
                    s.in_block = false;
                }
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

/// Hides the answers of injected guard calls: returns an empty
/// replacement for a message that belongs to one, and counts the client's
/// own completions otherwise. An ErrorResponse is never hidden (a stale
/// guard's ZF001 is what the client must see) and ends every pending
/// strip of the cycle, since the server skips the rest of the unit.
fn strip_guard_answer(ctx: &Ctx, frame: &Frame) -> Option<Bytes> {
    let tag = frame.tag();
    // Asynchronous messages (notice, parameter status, notification) may
    // come at any time and belong to nobody.
    if matches!(tag, b'N' | b'S' | b'A' | b'Z') {
        return None;
    }
    let mut s = ctx.lock();
    let cycle = s.cycles.front_mut()?;
    if tag == b'E' {
        let refused = match cycle.strips.front() {
            Some(strip) if cycle.seen >= strip.after => guard_refusal(ctx, strip, frame),
            _ => None,
        };
        cycle.strips.clear();
        drop(s);
        if let Some(rec) = refused {
            // The proxy had admitted (and counted) this write; the guard
            // refused it: audit and count the refusal, once, here.
            ctx.proxy.counters.refused(Reason::Stale);
            tracing::info!(
                protocol = "postgres",
                reason = "stale",
                resource = rec.resource.as_deref().unwrap_or(""),
                presented = rec.presented_token,
                current = rec.current_token,
                client = %ctx.peer,
                "write refused by the database guard"
            );
            ctx.proxy.audit.record(rec);
        }
        return None;
    }
    let seen = cycle.seen;
    match cycle.strips.front_mut() {
        Some(strip) if seen >= strip.after => {
            let done = match &mut strip.kind {
                StripKind::Simple => tag == b'C',
                StripKind::Extended(left) => {
                    if is_completion(tag) {
                        *left = left.saturating_sub(1);
                    }
                    *left == 0
                }
            };
            if done {
                cycle.strips.pop_front();
            }
            Some(Bytes::new())
        }
        _ => {
            if is_completion(tag) {
                cycle.seen += 1;
            }
            None
        }
    }
}

/// The audit record of a guard's ErrorResponse, when it is the guard's
/// stale-token refusal (SQLSTATE ZF001); other errors (the guard not
/// installed, an aborted transaction) are the server's own and pass as
/// they are.
fn guard_refusal(ctx: &Ctx, strip: &Strip, frame: &Frame) -> Option<AuditRecord> {
    let Ok(BackendMsg::ErrorResponse(fields)) = frame.backend() else {
        return None;
    };
    if fields.get(b'C') != Some(&b"ZF001"[..]) {
        return None;
    }
    let current = fields
        .get(b'M')
        .and_then(|m| std::str::from_utf8(m).ok())
        .and_then(guard_current);
    Some(AuditRecord::new(
        now_ms(),
        Some(&strip.resource),
        Protocol::Postgres,
        Reason::Stale,
        Some(strip.token),
        current,
        ctx.peer.to_string(),
        &strip.detail.fingerprint(),
    ))
}

/// The current mark named in the guard's message ("..., current N ...").
fn guard_current(message: &str) -> Option<u64> {
    let (_, after) = message.rsplit_once("current ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_mark_from_the_guard_message() {
        assert_eq!(
            guard_current("stale fencing token for resource r: presented 5, current 9 (refused by the database guard)"),
            Some(9)
        );
        assert_eq!(guard_current("no number here"), None);
    }

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
