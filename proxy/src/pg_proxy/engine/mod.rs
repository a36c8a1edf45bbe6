//! The epoll engine: the session threads' sessions as state machines in
//! an epoll loop of each thread's own, not tokio tasks.
//!
//! # Why
//! A statement through a session that is a tokio task costs about 11,100
//! instructions at one client (callgrind, pgbench TPC-B-like `-M simple`,
//! BENCHMARKS.md), against PgBouncer's 4,300; tokio's own code was 3,300
//! of them and the futures machinery around it (wakers, task state, the
//! time driver in every park) most of another 3,300. Fencepost's own work
//! per statement (split, classify, admit, the cycle) is under 2,000. Here
//! a readiness event calls the session's step directly: no waker, no task
//! to schedule, no future to poll on the hot path. Measured (callgrind,
//! `benches/pg_cost.sh`, same binary): 6,600-9,200 instructions a
//! statement against 10,700-13,700 as tasks, and 2.2 KiB per idle client
//! connection against 7.7 (BENCHMARKS.md, "The epoll engine").
//!
//! Why `mio` and not a poller of our own: it is the one tokio is built on
//! (already in the tree), and it is a thin, safe layer over `epoll`.
//!
//! # What runs where
//! - The acceptor and the startup exchange (the startup packet, a
//!   CancelRequest, the upstream connect) run on the process's runtime,
//!   as every listener's do; a session that is open is handed to the
//!   engine with the fewest sessions, through its [`Inbox`].
//! - The engine thread steps each session ([`conn::Conn::drive`]) when one
//!   of its sockets is ready or a message for it arrives, until it can go
//!   no further without waiting.
//! - A statement is decided on the engine thread, without a future
//!   ([`decide_now`](super::client::decide_now)), when the part of its
//!   decision that never waits can: a read, a write or COMMIT with the
//!   session's current token. Otherwise the rest of its decision
//!   ([`decide_owned`](super::client::decide_owned): the fencer's in
//!   full) is polled once on the engine thread, and most are ready then
//!   (a session's first write). One that is not (a newer token waiting
//!   for the drain, a store write) is spawned on the process's runtime,
//!   and its outcome comes back through the inbox; the session's client
//!   side waits for it meanwhile, its server side does not (the drain
//!   may wait for exactly those answers). So does the audit of the
//!   database guard's refusals, before the batch that carries them is
//!   relayed.
//! - The engine thread has entered the process's runtime, so the futures
//!   it polls find tokio's timers and spawn onto that runtime.
//!
//! The session's logic is the tokio loops' own: the same message handlers
//! (`client.rs`), the same booking of the server's answers (`server.rs`,
//! [`book`](super::server::book)), the same state (`state.rs`). Only the
//! I/O and the waiting differ.
//!
//! # Shutdown
//! On shutdown every session is closing: an idle one gets Postgres's
//! "terminating connection due to administrator command" and its server
//! a Terminate at once, a busy one when it is next idle. The engine ends
//! once it has no session left and the acceptor has nothing more for it,
//! or when the drain timeout has passed, closing what is left.

mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Interest, Token};
use wire::pg::{Frame, FrameError};

use self::conn::{Conn, Id, Step};
use super::client::{decide_owned, ClientSide, Later, Out};
use super::readbuf::SCRATCH;
use super::session::{Ctx, Open};
use super::startup::{ClientRead, ClientWrite, ServerRead, ServerWrite};
use super::PgProxy;
use crate::listener::ConnPermit;

/// The waker's token; sessions' tokens are their slot times two (the
/// client's socket) and that plus one (the server's).
const WAKE: Token = Token(usize::MAX);

/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// The engines of one listener.
pub(super) struct Engines {
    engines: Vec<Engine>,
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// One engine thread's way in: its inbox and how many sessions it holds
/// (open or still starting).
struct Engine {
    inbox: Arc<Inbox>,
    load: Arc<AtomicUsize>,
}

/// Where everything off the engine thread reaches it: a message queue
/// and the epoll waker that makes its loop look at the queue.
pub(super) struct Inbox {
    queue: Mutex<Queue>,
    waker: mio::Waker,
}

struct Queue {
    msgs: Vec<Msg>,
    /// The engine has ended: nothing more is taken.
    closed: bool,
}

/// What an engine is told.
pub(super) enum Msg {
    /// A session past its startup exchange.
    Open(Box<Opened>),
    /// A decision that waited is done: the session's client side and the
    /// outcome.
    Decided(Id, Box<(Box<ClientSide>, Result<Out, FrameError>)>),
    /// The database guard's refusals in a held batch are audited: relay
    /// it.
    Audited(Id),
    /// Shutdown has begun: every session is closing.
    Shutdown,
    /// The acceptor and the startup exchanges it began are over: nothing
    /// more will be handed over.
    NoMore,
}

/// A session handed over: its context, its two plain sockets, what the
/// client sent after its startup packet, its share of the listener's
/// bound and of the engine's load.
pub(super) struct Opened {
    ctx: Arc<Ctx>,
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    cbuf: BytesMut,
    permit: ConnPermit,
    load: Load,
}

impl Inbox {
    /// Queues `msg` for the engine; gives it back when the engine has
    /// ended.
    pub(super) fn send(&self, msg: Msg) -> Result<(), Msg> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            return Err(msg);
        }
        // A queue that was not empty has a wake-up pending already: the
        // engine takes the whole queue when it wakes.
        let wake = q.msgs.is_empty();
        q.msgs.push(msg);
        drop(q);
        if wake {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "cannot wake a Postgres proxy engine");
            }
        }
        Ok(())
    }

    fn take(&self, into: &mut Vec<Msg>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut q.msgs, into);
    }

    /// The engine ends: later messages are refused, queued ones dropped
    /// (a session handed over too late is closed).
    fn close(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.closed = true;
        q.msgs.clear();
    }
}

impl Engines {
    /// `n` engine threads, each entered into the process's runtime `rt`;
    /// each gives busy sessions up to `drain` after shutdown.
    pub(super) fn start(
        n: usize,
        rt: &tokio::runtime::Handle,
        drain: Duration,
    ) -> std::io::Result<Engines> {
        let mut engines = Vec::with_capacity(n);
        let mut done = Vec::with_capacity(n);
        for i in 0..n {
            let poll = mio::Poll::new()?;
            let waker = mio::Waker::new(poll.registry(), WAKE)?;
            let inbox = Arc::new(Inbox {
                queue: Mutex::new(Queue {
                    msgs: Vec::new(),
                    closed: false,
                }),
                waker,
            });
            let (ended, end) = tokio::sync::oneshot::channel::<()>();
            let (rt, theirs) = (rt.clone(), Arc::clone(&inbox));
            std::thread::Builder::new()
                .name(format!("pg-proxy-{i}"))
                .spawn(move || {
                    let _entered = rt.enter();
                    run(poll, &theirs, &rt, drain);
                    theirs.close();
                    drop(ended);
                })?;
            engines.push(Engine {
                inbox,
                load: Arc::new(AtomicUsize::new(0)),
            });
            done.push(end);
        }
        Ok(Engines { engines, done })
    }

    /// The engine with the fewest sessions, and the new session's share
    /// of its load.
    pub(super) fn pick(&self) -> Option<(Arc<Inbox>, Load)> {
        let e = self
            .engines
            .iter()
            .min_by_key(|e| e.load.load(Ordering::Relaxed))?;
        Some((Arc::clone(&e.inbox), Load::on(&e.load)))
    }

    /// Tells every engine `msg()`.
    pub(super) fn tell(&self, msg: impl Fn() -> Msg) {
        for e in &self.engines {
            let _ = e.inbox.send(msg());
        }
    }

    /// Waits for every engine thread to end.
    pub(super) async fn join(self) {
        drop(self.engines);
        for end in self.done {
            let _ = end.await;
        }
    }
}

/// A session past its startup exchange, made ready for an engine; the
/// session given back when a side of it is TLS, which the engine does
/// not speak (the caller runs it as a task); `Err(None)` when its sockets
/// could not be moved (logged; the session is closed).
pub(super) fn opened(
    proxy: Arc<PgProxy>,
    open: Open,
    peer: SocketAddr,
    permit: ConnPermit,
    load: Load,
) -> Result<Box<Opened>, Option<Box<(Open, ConnPermit)>>> {
    let plain = matches!(
        (&open.cr, &open.cw, &open.sr, &open.sw),
        (
            ClientRead::Plain(_),
            ClientWrite::Plain(_),
            ServerRead::Plain(_),
            ServerWrite::Plain(_),
        )
    );
    if !plain {
        return Err(Some(Box::new((open, permit))));
    }
    let Open {
        cr,
        cw,
        sr,
        sw,
        vars,
        cbuf,
    } = open;
    let (client, server) = match (cr, cw, sr, sw) {
        (
            ClientRead::Plain(cr),
            ClientWrite::Plain(cw),
            ServerRead::Plain(sr),
            ServerWrite::Plain(sw),
        ) => match (cr.reunite(cw), sr.reunite(sw)) {
            (Ok(c), Ok(s)) => (c, s),
            _ => {
                tracing::warn!(%peer, "a session's socket halves did not match; closing it");
                return Err(None);
            }
        },
        // Not reached: `plain` said so.
        _ => return Err(None),
    };
    // Off the runtime's reactor, onto the engine's.
    let (client, server) = match (client.into_std(), server.into_std()) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(%peer, error = %e, "cannot hand a session to a Postgres proxy engine");
            return Err(None);
        }
    };
    Ok(Box::new(Opened {
        ctx: Arc::new(Ctx::new(proxy, peer, vars, None)),
        client,
        server,
        cbuf,
        permit,
        load,
    }))
}

/// One session's share of an engine's load (or a worker's), given back
/// when it ends.
pub(super) struct Load(Arc<AtomicUsize>);

impl Load {
    pub(super) fn on(load: &Arc<AtomicUsize>) -> Load {
        load.fetch_add(1, Ordering::Relaxed);
        Load(Arc::clone(load))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A statement's full decision as the engine runs it:
/// [`decide_owned`](super::client::decide_owned)'s future, named through
/// this bound since its type has no name.
pub(super) trait Decision:
    Future<Output = (Box<ClientSide>, Result<Out, FrameError>)> + Send + 'static
{
}

impl<D> Decision for D where
    D: Future<Output = (Box<ClientSide>, Result<Out, FrameError>)> + Send + 'static
{
}

/// What a session's step needs of its engine.
pub(super) struct Env<'a, D> {
    pub(super) rt: &'a tokio::runtime::Handle,
    pub(super) inbox: &'a Arc<Inbox>,
    /// Makes the rest of a statement's decision, when
    /// [`decide_now`](super::client::decide_now) left it.
    pub(super) decide: fn(Arc<Ctx>, Box<ClientSide>, Frame, Later) -> D,
    /// Where decisions are polled first: one allocation per engine, not
    /// one per statement. A decision that is not ready at once takes it
    /// with it to the runtime, and the engine allocates another (only
    /// then: a drain or a store write, not an ordinary statement).
    room: Pin<Box<Option<D>>>,
    /// Where every read of this engine's sockets lands first, zeroed once
    /// ([`ReadBuf::try_fill`](super::readbuf::ReadBuf::try_fill)).
    pub(super) scratch: Box<[u8]>,
}

impl<D: Decision> Env<'_, D> {
    /// Polls `decision` once, in [`Env::room`], with a waker that does
    /// nothing: a decision that is not ready is handed to the runtime
    /// ([`Env::take_decision`]), which polls it again with its own.
    /// `Ready(None)` cannot happen (the room was just filled); the caller
    /// treats it as nothing to do.
    pub(super) fn first_poll(&mut self, decision: D) -> Poll<Option<D::Output>> {
        self.room.set(Some(decision));
        let polled = match self.room.as_mut().as_pin_mut() {
            Some(d) => d.poll(&mut Context::from_waker(Waker::noop())).map(Some),
            None => Poll::Ready(None),
        };
        if polled.is_ready() {
            self.room.set(None);
        }
        polled
    }

    /// The decision [`Env::first_poll`] left pending, to finish elsewhere.
    pub(super) fn take_decision(&mut self) -> Pending<D> {
        Pending(std::mem::replace(&mut self.room, Box::pin(None)))
    }
}

/// A decision on its way to the runtime, in the room it was first polled
/// in; `None` if the room was empty.
pub(super) struct Pending<D>(Pin<Box<Option<D>>>);

impl<D: Decision> Future for Pending<D> {
    type Output = Option<D::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.as_mut().as_pin_mut() {
            Some(d) => d.poll(cx).map(Some),
            None => Poll::Ready(None),
        }
    }
}

/// The sessions of one engine, by slot; a slot's generation tells a
/// message for a session that has ended from one for the session that
/// took its slot since.
struct Slots {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    generation: u32,
    open: usize,
}

impl Slots {
    fn get(&mut self, id: Id) -> Option<&mut Conn> {
        self.conns
            .get_mut(id.slot)?
            .as_mut()
            .filter(|c| c.id().generation == id.generation)
    }

    fn by_slot(&mut self, slot: usize) -> Option<&mut Conn> {
        self.conns.get_mut(slot)?.as_mut()
    }

    fn next_id(&mut self) -> Id {
        self.generation = self.generation.wrapping_add(1);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        Id {
            slot,
            generation: self.generation,
        }
    }

    fn put(&mut self, conn: Conn) {
        let slot = conn.id().slot;
        if let Some(at) = self.conns.get_mut(slot) {
            *at = Some(conn);
            self.open += 1;
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(at) = self.conns.get_mut(slot) {
            if at.take().is_some() {
                self.open -= 1;
                self.free.push(slot);
            }
        }
    }
}

/// The engine's loop, until shutdown has drained it.
fn run(poll: mio::Poll, inbox: &Arc<Inbox>, rt: &tokio::runtime::Handle, drain: Duration) {
    run_with(poll, inbox, rt, drain, decide_owned);
}

/// [`run`], with the decision's type named by `decide`.
fn run_with<D: Decision>(
    mut poll: mio::Poll,
    inbox: &Arc<Inbox>,
    rt: &tokio::runtime::Handle,
    drain: Duration,
    decide: fn(Arc<Ctx>, Box<ClientSide>, Frame, Later) -> D,
) {
    let mut env = Env {
        rt,
        inbox,
        decide,
        room: Box::pin(None),
        scratch: vec![0; SCRATCH].into_boxed_slice(),
    };
    let mut slots = Slots {
        conns: Vec::new(),
        free: Vec::new(),
        generation: 0,
        open: 0,
    };
    let mut events = Events::with_capacity(EVENTS);
    let mut msgs = Vec::new();
    // Slots to step after this round of events, each once.
    let mut due: Vec<usize> = Vec::new();
    // Slots whose step ran out of budget: stepped again next round,
    // after a look at the sockets that does not wait.
    let mut again: Vec<usize> = Vec::new();
    let mut closing = false;
    let mut no_more = false;
    let mut deadline: Option<Instant> = None;
    loop {
        let timeout = if again.is_empty() {
            deadline.map(|d| d.saturating_duration_since(Instant::now()))
        } else {
            Some(Duration::ZERO)
        };
        due.append(&mut again);
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "a Postgres proxy engine cannot wait for its sockets; its sessions close");
                return;
            }
        }
        for ev in events.iter() {
            if ev.token() == WAKE {
                continue;
            }
            let (slot, server) = (ev.token().0 >> 1, ev.token().0 & 1 == 1);
            if let Some(c) = slots.by_slot(slot) {
                let closed = ev.is_read_closed() || ev.is_error();
                let read = ev.is_readable() || closed;
                let write = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                if c.ready(server, read, write, closed) {
                    due.push(slot);
                }
            }
        }
        inbox.take(&mut msgs);
        for msg in msgs.drain(..) {
            match msg {
                Msg::Open(opened) => {
                    let id = slots.next_id();
                    match Conn::new(id, *opened, poll.registry(), closing) {
                        Ok(c) => {
                            slots.put(c);
                            due.push(id.slot);
                        }
                        Err(e) => {
                            slots.free.push(id.slot);
                            tracing::warn!(error = %e, "a Postgres proxy engine cannot take a session");
                        }
                    }
                }
                Msg::Decided(id, decided) => {
                    if let Some(c) = slots.get(id) {
                        let (side, out) = *decided;
                        c.decided(side, out);
                        due.push(id.slot);
                    }
                }
                Msg::Audited(id) => {
                    if let Some(c) = slots.get(id) {
                        c.audited();
                        due.push(id.slot);
                    }
                }
                Msg::Shutdown => {
                    closing = true;
                    // A drain too long to add to the clock has no deadline.
                    deadline = Instant::now().checked_add(drain);
                    for (slot, c) in slots.conns.iter_mut().enumerate() {
                        if let Some(c) = c {
                            c.close();
                            due.push(slot);
                        }
                    }
                }
                Msg::NoMore => no_more = true,
            }
        }
        due.sort_unstable();
        due.dedup();
        for slot in due.drain(..) {
            match slots.by_slot(slot).map(|c| c.drive(&mut env)) {
                Some(Step::Waits) => {}
                Some(Step::Again) => again.push(slot),
                Some(Step::Ended) => slots.remove(slot),
                None => {}
            }
        }
        if closing && no_more && slots.open == 0 {
            return;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if slots.open > 0 {
                tracing::warn!(
                    listener = "postgres",
                    open = slots.open,
                    within = ?drain,
                    "connections still busy after the shutdown timeout; closing them"
                );
            }
            return;
        }
    }
}

/// Registers a session's sockets with the engine's poller.
fn register(
    registry: &mio::Registry,
    id: Id,
    client: &mut mio::net::TcpStream,
    server: &mut mio::net::TcpStream,
) -> std::io::Result<()> {
    let both = Interest::READABLE | Interest::WRITABLE;
    registry.register(client, Token(id.slot << 1), both)?;
    registry.register(server, Token((id.slot << 1) | 1), both)
}
