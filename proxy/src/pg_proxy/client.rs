//! The client's half of a session: messages read, each decided (one
//! function per kind) and sent on to the server in batches.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use fencing::{Protocol, Reason, ResourceName};
use wire::pg::cycle::{owes_completion, RUN_NAMED_COMPLETIONS};
use wire::pg::frame::{self, split_frame};
use wire::pg::guard;
use wire::pg::{Classification, ClientMsg, Frame, FrameError, Recent};

use super::fence::{fence_full, fence_now, Full, Verdict};
use super::gate::Gated;
use super::readbuf::{ReadBuf, IDLE};
use super::refusal::{fatal, refuse, sqlstate, Unit};
use super::session::Ctx;
use super::startup::{ClientRead, ServerWrite};
use super::state::{GuardCall, Shared, Statement, Write};
use super::PgProxy;
use super::ORPHAN_WAIT;
use crate::fencer::WriteInfo;
use crate::shutdown::Shutdown;

/// A statement known by name (Parse) or bound to a portal (Bind).
#[derive(Clone)]
struct Prepared {
    class: Arc<Classification>,
    /// The statement's text, for the audit's fingerprint on refusal; a
    /// copy the session's classifications share, not the Parse message
    /// (which would pin the read buffer).
    text: Bytes,
}

/// Unique names for the guard's statement and portal in extended batches.
static GUARD_NAMES: AtomicU64 = AtomicU64::new(1);

/// What an Execute of a portal the proxy never saw bound is, for the audit.
const UNKNOWN_PORTAL: &str = "(Execute of a portal the proxy did not see bound)";

/// What the client loop makes of one message.
pub(super) enum Out {
    /// Send these bytes to the server.
    Send(Bytes),
    /// Send them and stop: the client said goodbye.
    Last(Bytes),
}

/// Prepared statements or portals by name. The unnamed one, which most
/// drivers use for most statements, is kept inline: a session that uses
/// only it allocates no map (which it would keep for its whole life, idle
/// or not) and hashes nothing. The named ones hash with ahash, not the
/// standard SipHash: a Bind of a named statement (pgbench `-M prepared`)
/// looked it up for ~280 instructions (callgrind), and the names are the
/// client's own, in its own session, so no one else can aim collisions
/// at the map.
#[derive(Default)]
struct Named {
    unnamed: Option<Prepared>,
    named: HashMap<Bytes, Prepared, ahash::RandomState>,
}

impl Named {
    fn get(&self, name: &[u8]) -> Option<&Prepared> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    /// Whether `name` holds `p` already (the same classification and the
    /// same text): a Bind of the same statement to the same portal, as a
    /// client repeating a prepared statement sends, changes nothing.
    fn holds(&self, name: &[u8], p: &Prepared) -> bool {
        self.get(name).is_some_and(|held| {
            Arc::ptr_eq(&held.class, &p.class)
                && held.text.as_ptr() == p.text.as_ptr()
                && held.text.len() == p.text.len()
        })
    }

    /// Replacing one keeps its key (no allocation for a repeated Parse or
    /// Bind).
    fn set(&mut self, name: &[u8], p: Prepared) {
        if name.is_empty() {
            self.unnamed = Some(p);
        } else if let Some(old) = self.named.get_mut(name) {
            *old = p;
        } else {
            self.named.insert(Bytes::copy_from_slice(name), p);
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.named.remove(name);
        }
    }
}

/// What the client loop knows of the client's prepared statements and
/// portals, to classify an Execute.
pub(super) struct ClientSide {
    statements: Named,
    portals: Named,
    /// After a refusal in the extended protocol the server discards
    /// everything up to Sync; so does the proxy's fencing.
    skip_until_sync: bool,
    /// The texts this session classified lately: a repeated one is
    /// answered without the shared cache.
    recent: Recent,
    /// A guard went ahead of the last Query without a Sync of its own
    /// ([`guard_ahead`]): nothing more of the client's may go to the
    /// server until that guard's cycle has ended (the epoll engine looks
    /// at [`Cycles::unsynced_in_flight`], then clears this).
    ///
    /// [`Cycles::unsynced_in_flight`]: wire::pg::cycle::Cycles::unsynced_in_flight
    pub(super) awaits_own: bool,
}

impl ClientSide {
    pub(super) fn new() -> ClientSide {
        ClientSide {
            statements: Named::default(),
            portals: Named::default(),
            skip_until_sync: false,
            recent: Recent::new(),
            awaits_own: false,
        }
    }
}

pub(super) async fn client_loop(
    ctx: &Ctx,
    mut cr: ClientRead,
    mut sw: ServerWrite,
    buf: BytesMut,
    shutdown: Shutdown,
) {
    let mut rb = ReadBuf::from(buf);
    let mut side = ClientSide::new();
    let mut out = BytesMut::new();
    // Made once, not per read: each is a registration (a watch receiver, a
    // waiter in the Notify's list) that a loop iteration per message would
    // redo every time. Both end the loop (or stop being polled) once they
    // fire, so they are never polled after completing. Gated: polled only
    // once they have woken the task, not at every wake (a pending
    // `Notify` or `watch` takes a lock each time it is polled).
    let mut server_gone = pin!(ctx.server_gone.notified());
    server_gone.as_mut().enable();
    let mut server_gone = Gated::new(server_gone);
    let shutting_down = pin!(shutdown.wait());
    let mut shutting_down = Gated::new(shutting_down);
    let mut closing = false;
    let mut terminated = false;
    // Set when a batch was stopped because the replica lease lapsed since
    // a write in it was admitted.
    let mut lapsed: Option<Stopped> = None;
    'read: loop {
        loop {
            let frame = match split_frame(&mut rb.buf, ctx.proxy.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer = %ctx.peer, error = %e, "malformed message from client");
                    if let Err(Unsent::Lapsed(stopped)) = to_server(ctx, &mut sw, &out).await {
                        lapsed = Some(stopped);
                        break 'read;
                    }
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
                        if let Err(e) = to_server(ctx, &mut sw, &out).await {
                            lapsed = e.lapsed();
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
                    match to_server(ctx, &mut sw, &out).await {
                        Err(Unsent::Lapsed(stopped)) => lapsed = Some(stopped),
                        Ok(()) | Err(Unsent::Broken) => terminated = true,
                    }
                    break 'read;
                }
                Err(e) => {
                    tracing::debug!(peer = %ctx.peer, error = %e, "malformed message from client");
                    if let Err(Unsent::Lapsed(stopped)) = to_server(ctx, &mut sw, &out).await {
                        lapsed = Some(stopped);
                        break 'read;
                    }
                    ctx.to_client(&fatal("08P01", &format!("fencepost: {e}")))
                        .await;
                    break 'read;
                }
            }
        }
        if !out.is_empty() {
            if let Err(e) = to_server(ctx, &mut sw, &out).await {
                lapsed = e.lapsed();
                break;
            }
            out.clear();
            if rb.burst_over() && out.capacity() > 4 * IDLE {
                // A large batch is over: give its room back.
                out = BytesMut::new();
            }
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
        // In this order: the gated waits cost a flag's look when they
        // have not fired, and a client that keeps its socket readable
        // (pipelining) must not keep the server's end or a shutdown
        // waiting.
        tokio::select! {
            biased;
            () = &mut server_gone => break,
            () = &mut shutting_down, if !closing => closing = true,
            () = answered, if closing => {}
            r = cr.read(&mut rb) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
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
    if let Some(stopped) = lapsed {
        // What was sent has been answered (or the server is gone); the
        // rest never will be.
        lapse_refused(ctx, stopped).await;
    }
    let _ = sw.shutdown().await;
}

/// Why a batch did not reach the server whole.
enum Unsent {
    /// The server's connection failed.
    Broken,
    /// The replica lease lapsed since a write in the batch was admitted;
    /// the rest of the batch was not written.
    Lapsed(Stopped),
}

/// The write a stopped batch was armed for, for its audit record: the
/// newest the session admitted, and the statement that armed the batch.
struct Stopped {
    write: Option<Write>,
    statement: Option<Statement>,
}

impl Unsent {
    fn lapsed(self) -> Option<Stopped> {
        match self {
            Unsent::Broken => None,
            Unsent::Lapsed(newest) => Some(newest),
        }
    }
}

/// Writes a batch to the server. A batch holding a write the proxy alone
/// fenced ([`Ctx::arm`]) goes out one write system call at a time, each
/// immediately after the last look at the replica lease
/// ([`Fencer::still_leased`]), waiting for room in the socket *before*
/// the look: a server that stops reading (a batch larger than the socket
/// buffers, behind a statement that waits) cannot hold the rest of a
/// write past the look. A lapse stops the batch where it is.
///
/// Every other batch is one `write_all`, as before: nothing to look at.
///
/// [`Fencer::still_leased`]: crate::fencer::Fencer::still_leased
async fn to_server(ctx: &Ctx, sw: &mut ServerWrite, out: &[u8]) -> Result<(), Unsent> {
    let Some(since) = ctx.take_armed() else {
        return sw.write_all(out).await.map_err(|_| Unsent::Broken);
    };
    let fencer = &ctx.proxy.fencer;
    let lapsed = || {
        let mut s = ctx.lock();
        let write = s.armed_write();
        Unsent::Lapsed(Stopped {
            write,
            statement: s.armed.take(),
        })
    };
    // After the last byte left: a lapse since the admission all the same
    // is the residue no look can close; say so (`Fencer::note_sent`).
    let sent = || {
        if !fencer.still_leased(since) {
            let (resource, token) = ctx.lock().armed_write().unzip();
            fencer.note_sent(
                since,
                "postgres",
                resource.as_ref().map(|r| r.as_str()),
                token,
            );
        }
    };
    let ServerWrite::Plain(w) = sw else {
        // TLS: records are sealed and flushed whole, so one look, just
        // before they are written.
        if !fencer.still_leased(since) {
            return Err(lapsed());
        }
        sw.write_all(out).await.map_err(|_| Unsent::Broken)?;
        sent();
        return Ok(());
    };
    let mut rest = out;
    while !rest.is_empty() {
        w.writable().await.map_err(|_| Unsent::Broken)?;
        if !fencer.still_leased(since) {
            return Err(lapsed());
        }
        match w.try_write(rest) {
            Ok(0) => return Err(Unsent::Broken),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Unsent::Broken),
        }
    }
    sent();
    Ok(())
}

/// The answer to a batch stopped by a lapsed replica lease: audited and
/// counted as `unavailable` like every refusal, then `FATAL` `ZF004` and
/// the session's end. Not an `ERROR` in the statement's place, as other
/// refusals are: part of the batch may already be at the server (up to a
/// message cut in two), so the server's connection is closed instead,
/// which runs nothing of the cut message or after it and rolls back an
/// open block, as Postgres does for a client that vanished.
async fn lapse_refused(ctx: &Ctx, stopped: Stopped) {
    let (resource, token) = stopped.write.unzip();
    let detail = || {
        stopped.statement.as_ref().map_or_else(
            || String::from("(not sent: the replica lease lapsed after its admission)"),
            Statement::fingerprint,
        )
    };
    let info = WriteInfo {
        protocol: Protocol::Postgres,
        client: ctx.peer,
        detail: &detail,
    };
    let refusal = ctx
        .proxy
        .fencer
        .lapsed(&ctx.proxy.counters, None, resource, token, &info)
        .await;
    let message = format!(
        "{}; the session ends (what was sent before the lapse ran; nothing after it did)",
        refusal.message
    );
    ctx.to_client(&fatal(sqlstate(Reason::Unavailable), &message))
        .await;
}

fn idle(ctx: &Ctx) -> bool {
    ctx.lock().idle()
}

async fn wait_answered(ctx: &Ctx) {
    let wait = async {
        loop {
            let mut n = pin!(ctx.answered.notified());
            n.as_mut().enable();
            if !ctx.lock().cycles.awaiting() {
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

/// What a handler sends in place of the client's message.
enum Send {
    /// The message itself.
    Same,
    /// These bytes instead (a refusal, or the message with guard calls).
    Instead(Bytes),
    /// These bytes, then the message.
    Prefixed(Bytes),
}

/// One client message: bookkeeping, the decision if it carries a
/// statement, and the bytes to send for it.
async fn handle(ctx: &Ctx, side: &mut ClientSide, frame: Frame) -> Result<Out, FrameError> {
    match handle_now(ctx, side, frame)? {
        Now::Done(out) => Ok(out),
        Now::Decide(frame) => decide(ctx, side, frame).await,
    }
}

/// What [`handle_now`] made of a message.
pub(super) enum Now {
    /// Handled: these bytes go to the server.
    Done(Out),
    /// A statement to decide ([`decide`]): a Query, an Execute or a
    /// fast-path call, whose decision may wait (a newer token's drain).
    Decide(Frame),
}

/// The messages whose handling never waits, handled at once; the ones
/// that carry a statement to decide are given back for [`decide`]. The
/// epoll engine calls this for the messages [`handle_in_place`] leaves
/// (statements and Terminate), then [`decide_now`] for statements, and
/// builds a decision's future only for those the fencer decides in full.
pub(super) fn handle_now(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: Frame,
) -> Result<Now, FrameError> {
    let tag = frame.tag();
    // A statement by its tag: [`decide_now`] decodes it (decoding a
    // Query here too scanned its whole text twice).
    if matches!(tag, b'Q' | b'E' | b'F') {
        return Ok(Now::Decide(frame));
    }
    let send = on_message(ctx, side, frame.client()?, tag);
    Ok(match send {
        Some(send) => Now::Done(Out::Send(sent(frame, send))),
        None if tag == b'X' => Now::Done(Out::Last(frame.into_raw())),
        None => Now::Decide(frame),
    })
}

/// A message that never waits, handled: what to send for it. `None` for
/// a statement (Query, Execute, fast-path call), which is decided, and for
/// Terminate, which ends the client side. Inlined into both callers (and
/// `Shared::open_cycle` marked `#[inline]`): out of line, the two cost
/// about 80 instructions a statement more at `-M extended` and `-M
/// prepared` (callgrind, TPC-B-like, 7,463 against 7,385).
#[inline(always)]
fn on_message(ctx: &Ctx, side: &mut ClientSide, msg: ClientMsg<'_>, tag: u8) -> Option<Send> {
    Some(match msg {
        ClientMsg::Query(_)
        | ClientMsg::Execute { .. }
        | ClientMsg::FunctionCall
        | ClientMsg::Terminate => return None,
        ClientMsg::Parse { name, query } => on_parse(ctx, side, name, query),
        ClientMsg::Bind { portal, statement } => on_bind(ctx, side, portal, statement),
        ClientMsg::Close { kind, name } => on_close(ctx, side, kind, name),
        ClientMsg::Sync => on_sync(ctx, side),
        ClientMsg::Other => on_other(ctx, tag),
    })
}

/// [`handle_now`] for a message still in the read buffer (`raw`, one
/// whole message): when it is one that never waits and never goes
/// through a decision (not a statement, not Terminate), handled, and the
/// bytes to send for it appended to `out`; `Ok(false)` for the others,
/// which [`handle_now`] takes as frames of their own. The epoll engine
/// handles most extended-protocol messages (Bind, Describe, Sync) so,
/// without cutting a frame off the buffer (a reference count up and down
/// and a `Bytes` per message).
pub(super) fn handle_in_place(
    ctx: &Ctx,
    side: &mut ClientSide,
    raw: &[u8],
    out: &mut BytesMut,
) -> Result<bool, FrameError> {
    // Statements and Terminate by their tag, before a decode (a Query's
    // would scan its whole text, which `handle_now` decodes again).
    let Some(&tag) = raw
        .first()
        .filter(|t| !matches!(t, b'Q' | b'E' | b'F' | b'X'))
    else {
        return Ok(false);
    };
    let Some(send) = on_message(ctx, side, frame::client_msg(raw)?, tag) else {
        return Ok(false);
    };
    match send {
        Send::Same => out.extend_from_slice(raw),
        Send::Instead(b) => out.extend_from_slice(&b),
        Send::Prefixed(b) => {
            out.extend_from_slice(&b);
            out.extend_from_slice(raw);
        }
    }
    Ok(true)
}

/// A Query, an Execute or a fast-path call: decided, and the bytes to
/// send for it ([`decide_now`], then [`decide_later`] when it must).
pub(super) async fn decide(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: Frame,
) -> Result<Out, FrameError> {
    match decide_now(ctx, side, frame)? {
        Decided::Ready(out) => Ok(out),
        Decided::Later(frame, later) => decide_later(ctx, side, frame, later).await,
    }
}

/// What [`decide_now`] made of a statement.
pub(super) enum Decided {
    /// Decided: these bytes go to the server.
    Ready(Out),
    /// The fencer must decide it in full, which may wait (a newer token's
    /// drain, a store write): [`decide_later`] does, with what the part
    /// that never waits gathered.
    Later(Frame, Later),
}

/// What a statement's part that never waits ([`fence_now`] and what goes
/// before it) leaves to [`decide_later`]: its classification, the guard
/// name its SQL takes, and the fencer's inputs. The statement itself is
/// made again from the frame.
pub(super) enum Later {
    Query {
        class: Arc<Classification>,
        taken: Option<Bytes>,
        full: Box<Full>,
    },
    Execute {
        /// `None`: a portal the proxy never saw bound.
        class: Option<Arc<Classification>>,
        statement: Statement,
        taken: Option<Bytes>,
        full: Box<Full>,
    },
    FunctionCall(Box<Full>),
}

/// A statement decided where that never waits: a read, a leader's steady
/// write or COMMIT, a refusal the classification alone makes; almost
/// every statement. The epoll engine builds a future ([`decide_owned`])
/// only for a [`Decided::Later`]: building one for each statement, moving
/// it into place and polling it cost 350-400 instructions a statement
/// (callgrind, TPC-B-like, one client).
pub(super) fn decide_now(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: Frame,
) -> Result<Decided, FrameError> {
    let now = match frame.client()? {
        ClientMsg::Query(text) => query_now(ctx, side, &frame, text),
        ClientMsg::Execute { portal, .. } => execute_now(ctx, side, &frame, portal),
        ClientMsg::FunctionCall => function_call_now(ctx),
        // Not a statement (`handle_now` gives `decide` none of these):
        // handled as `handle_now` handles it.
        _ => {
            return match handle_now(ctx, side, frame)? {
                Now::Done(out) => Ok(Decided::Ready(out)),
                // The same frame parsed as a statement there: cannot
                // happen, and is never sent undecided.
                Now::Decide(_) => Err(FrameError::Malformed {
                    what: "client",
                    why: "parsed as a statement and as none",
                }),
            };
        }
    };
    Ok(match now {
        Ok(send) => Decided::Ready(Out::Send(sent(frame, send))),
        Err(later) => Decided::Later(frame, later),
    })
}

/// The rest of a statement [`decide_now`] left: the fencer's full
/// decision, then what the handler makes of its verdict.
pub(super) async fn decide_later(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: Frame,
    later: Later,
) -> Result<Out, FrameError> {
    let send = match later {
        Later::Query { class, taken, full } => {
            let ClientMsg::Query(text) = frame.client()? else {
                return Err(NOT_THE_STATEMENT);
            };
            let statement = Statement::Query(frame.clone());
            let verdict = fence_full(ctx, &class, &statement, Unit::Query, false, full).await;
            query_verdict(ctx, side, &frame, text, &class, taken, &statement, verdict)
        }
        Later::Execute {
            class,
            statement,
            taken,
            full,
        } => {
            let class = class.as_deref().unwrap_or(&UNKNOWN);
            let verdict = fence_full(ctx, class, &statement, Unit::Execute, false, full).await;
            execute_verdict(ctx, side, &frame, class, taken, statement, verdict)
        }
        Later::FunctionCall(full) => {
            let verdict = fence_full(
                ctx,
                &FUNCTION_CALL,
                &FUNCTION_CALL_STATEMENT,
                Unit::Query,
                true,
                full,
            )
            .await;
            function_call_verdict(ctx, verdict)
        }
    };
    Ok(Out::Send(sent(frame, send)))
}

/// [`decide_later`] given a frame whose statement is not the one
/// [`decide_now`] began: cannot happen (the same bytes parse the same).
const NOT_THE_STATEMENT: FrameError = FrameError::Malformed {
    what: "client",
    why: "a statement decided in two parts parsed differently",
};

/// [`decide_later`] owning what it uses, so that a decision that waits
/// can be handed to the runtime whole (the epoll engine's sessions);
/// gives the client side back with the outcome.
pub(super) async fn decide_owned(
    ctx: Arc<Ctx>,
    mut side: Box<ClientSide>,
    frame: Frame,
    later: Later,
) -> (Box<ClientSide>, Result<Out, FrameError>) {
    let out = decide_later(&ctx, &mut side, frame, later).await;
    (side, out)
}

/// The bytes a handler's [`Send`] stands for.
fn sent(frame: Frame, send: Send) -> Bytes {
    match send {
        Send::Same => frame.into_raw(),
        Send::Instead(b) => b,
        Send::Prefixed(b) => {
            let mut out = BytesMut::with_capacity(b.len() + frame.raw().len());
            out.extend_from_slice(&b);
            out.extend_from_slice(frame.raw());
            out.freeze()
        }
    }
}

/// A simple Query: one cycle; in guard mode the guard calls go in front of
/// the client's text, in the same implicit transaction (or the same block),
/// or, in a text of several statements that ends a transaction or rolls
/// back to a savepoint, also between its statements (see
/// [`wire::pg::classify::GuardPoint`]). `Err`: the fencer decides in full
/// ([`decide_later`]).
fn query_now(ctx: &Ctx, side: &mut ClientSide, frame: &Frame, text: &[u8]) -> Result<Send, Later> {
    side.skip_until_sync = false;
    let class = side.recent.classify(&ctx.proxy.classifier, text);
    if class.drops_prepared {
        ctx.lock().guard_statement.invalidate();
    }
    let taken = sql_takes_guard_name(ctx, &class, text);
    if ctx.proxy.guard && class.unsplit {
        let send = Send::Instead(unguardable(ctx, &class, NOT_UTF8));
        return Ok(prefixed(taken, finish_query(ctx, send)));
    }
    let statement = Statement::Query(frame.clone());
    match fence_now(ctx, &class, &statement, false) {
        Ok(verdict) => Ok(query_verdict(
            ctx, side, frame, text, &class, taken, &statement, verdict,
        )),
        Err(full) => Err(Later::Query { class, taken, full }),
    }
}

/// What a Query's verdict sends.
#[allow(clippy::too_many_arguments)]
fn query_verdict(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: &Frame,
    text: &[u8],
    class: &Classification,
    taken: Option<Bytes>,
    statement: &Statement,
    verdict: Verdict,
) -> Send {
    let send = match verdict {
        Verdict::Refused(b) => Send::Instead(b),
        Verdict::Pass => Send::Same,
        Verdict::Admitted(plan) if plan.iter().all(|(at, _)| *at == 0) => {
            let mut s = ctx.lock();
            if taken.is_none() {
                let unsynced = ctx.on_engine();
                let ahead = guard_ahead(&mut s, &ctx.proxy, &plan, statement, frame, unsynced);
                if let Some(b) = ahead {
                    drop(s);
                    side.awaits_own = unsynced;
                    return finish_query(ctx, Send::Instead(b));
                }
            }
            let cycle = s.open_cycle();
            // One guard statement per admitted (resource, token).
            let mut body = Vec::with_capacity(text.len() + 96 * plan.len());
            for (_, (r, t)) in plan {
                body.extend_from_slice(
                    guard::call(ctx.proxy.guard_fn, r.as_str(), t, ctx.proxy.guard_wait_ms)
                        .as_bytes(),
                );
                body.extend_from_slice(b";\n");
                cycle.hide_simple(Some(GuardCall {
                    resource: r,
                    token: t,
                    statement: statement.clone(),
                }));
            }
            cycle.shift_positions(u32::try_from(body.len()).unwrap_or(u32::MAX));
            body.extend_from_slice(text);
            body.push(0);
            Send::Instead(Frame::new(b'Q', &body).into_raw())
        }
        Verdict::Admitted(plan) => match guards_between(ctx, text, plan, statement) {
            Some(b) => Send::Instead(b),
            None => Send::Instead(unguardable(ctx, class, UNSPLIT)),
        },
    };
    prefixed(taken, finish_query(ctx, send))
}

/// The Query's cycle: a statement sent, and closed (a Query ends its unit).
fn finish_query(ctx: &Ctx, send: Send) -> Send {
    let mut s = ctx.lock();
    let cycle = s.open_cycle();
    cycle.data.executed = true;
    cycle.close();
    send
}

/// Guard mode, a Query whose guard calls all go in front of it, run in a
/// transaction block: the calls go ahead as the session's prepared guard
/// statement (Bind, Execute, Close), in a cycle of the proxy's own
/// ([`wire::pg::cycle::Cycles::insert_own`]), and the Query goes as the
/// client sent it. The server neither parses nor plans the call, as in
/// the extended protocol (prepended to the text it is a statement of its
/// own: about 27,000 backend instructions, `benches/guard_sql_cost.sh`).
/// The guard and the client's statement run in the block's transaction,
/// as a prepended call does; an error of the guard's is what the client
/// sees.
///
/// On the epoll engine (`unsynced`) the proxy's cycle has no Sync
/// ([`wire::pg::cycle::Cycles::insert_own_unsynced`]): the server flushes
/// nothing before the Query's ReadyForQuery, so the guard's answers come
/// with the Query's, one read and one wake-up of the proxy fewer per
/// guarded transaction, and no Sync for the server to answer. When the
/// guard fails, the server skips the Query up to a Sync, which the engine
/// then sends; the client sends nothing more meanwhile
/// ([`ClientSide::awaits_own`]). Elsewhere (a TLS session's tasks) the
/// cycle has a Sync of its own, which does not end a block; the guard's
/// error then takes the place of the aborted block's error that the
/// client's statement meets.
///
/// Only when the server is known to be in the block: the Query's cycle
/// opened with nothing else in flight after a ReadyForQuery that said `T`,
/// and nothing sent in it yet. Outside a block a Sync would commit the
/// guard's own implicit transaction before the statement ran (and a
/// pipelining client's Query may run in a block not begun yet): there the
/// calls are prepended to the text. `None` then, and when the session has
/// given the prepared statement up.
fn guard_ahead(
    s: &mut Shared,
    proxy: &PgProxy,
    plan: &[(u32, Write)],
    statement: &Statement,
    frame: &Frame,
    unsynced: bool,
) -> Option<Bytes> {
    let open = s.open_cycle();
    if !open.data.began_in_block || !open.is_fresh() || s.guard_statement.off {
        return None;
    }
    // The calls' writes hold the gate once the proxy's cycle succeeds.
    let mut guarded = std::mem::take(&mut s.open_cycle().data.guarded);
    let mut out = BytesMut::with_capacity(96 * plan.len() + 5 + frame.raw().len());
    let mut owed = Vec::with_capacity(plan.len());
    let mut prepares = None;
    for (_, (r, t)) in plan {
        let (n, epoch) = guard_extended(&mut out, s, proxy, r, *t);
        prepares = prepares.or(epoch);
        owed.push(n);
    }
    if !unsynced {
        out.extend_from_slice(frame::SYNC);
    }
    let own = s.insert_own_cycle(unsynced)?;
    // Appended, and the emptied list given back: each cycle's box keeps a
    // list with room.
    own.data.guarded.append(&mut guarded);
    own.data.prepares = prepares;
    for ((_, (r, t)), n) in plan.iter().zip(owed) {
        own.hide_extended(
            n,
            Some(GuardCall {
                resource: r.clone(),
                token: *t,
                statement: statement.clone(),
            }),
        );
    }
    s.open_cycle().data.guarded = guarded;
    out.extend_from_slice(frame.raw());
    Some(out.freeze())
}

/// An SQL `PREPARE` that may name the prepared guard statement (its text
/// holds the name, in any case): the guard's statement is closed just
/// before the client's message (its CloseComplete hidden, ahead of every
/// other strip of the cycle) and the guard moves to the next name, so the
/// client's PREPARE finds the name free. Returns the Close to send first.
fn sql_takes_guard_name(ctx: &Ctx, class: &Classification, text: &[u8]) -> Option<Bytes> {
    if !ctx.proxy.guard || !class.prepares {
        return None;
    }
    let mut s = ctx.lock();
    let name = s.guard_statement.name().as_bytes();
    let named = text
        .windows(name.len())
        .any(|w| w.eq_ignore_ascii_case(name));
    if !named {
        return None;
    }
    Some(take_guard_name(&mut s))
}

/// The client takes the prepared guard statement's name: Close it, hide the
/// answer, move the guard to the next name.
fn take_guard_name(s: &mut Shared) -> Bytes {
    let close = frame::close(b'S', s.guard_statement.name());
    s.guard_statement.rename();
    s.open_cycle().hide_extended(1, None);
    close
}

/// `send`, after `first` when there is one.
fn prefixed(first: Option<Bytes>, send: Send) -> Send {
    match (first, send) {
        (None, send) => send,
        (Some(first), Send::Same) => Send::Prefixed(first),
        (Some(first), Send::Instead(b)) => {
            let mut out = BytesMut::with_capacity(first.len() + b.len());
            out.extend_from_slice(&first);
            out.extend_from_slice(&b);
            Send::Instead(out.freeze())
        }
        (Some(first), Send::Prefixed(b)) => {
            let mut out = BytesMut::with_capacity(first.len() + b.len());
            out.extend_from_slice(&first);
            out.extend_from_slice(&b);
            Send::Prefixed(out.freeze())
        }
    }
}

/// Why guard mode refuses a Query it cannot guard statement by statement.
const NOT_UTF8: &str =
    "fencepost guard mode: a simple query that is not valid UTF-8 and holds a ';' \
     may be several statements, and where one transaction ends and the next begins cannot be told \
     to guard each; send it as one statement per query, or in UTF-8";
const UNSPLIT: &str =
    "fencepost guard mode: the statements of this simple query could not be told apart \
     to guard each transaction in it; send one statement per query";

/// The Query refused whole (it fails at the server, which answers the
/// error in its place, as a fencing refusal does), with Postgres's
/// `feature_not_supported`: nothing of it runs.
fn unguardable(ctx: &Ctx, class: &Classification, message: &str) -> Bytes {
    let error = frame::error_response("ERROR", "0A000", message);
    let mut s = ctx.lock();
    refuse(s.open_cycle(), class, Unit::Query, error)
}

/// The client's text with each guard call of `plan` inserted just before
/// the statement it names, the cycle set to hide their answers and to
/// move error positions back into the client's text. `None` when the text
/// cannot be split where its classification said.
fn guards_between(
    ctx: &Ctx,
    text: &[u8],
    plan: Vec<(u32, Write)>,
    statement: &Statement,
) -> Option<Bytes> {
    let text = std::str::from_utf8(text).ok()?;
    let starts = wire::pg::split::statement_starts(text)?;
    let mut body = Vec::with_capacity(text.len() + 96 * plan.len() + 1);
    let mut inserted: Vec<(u32, u32, u32, Write)> = Vec::with_capacity(plan.len());
    let (mut copied, mut chars, mut prev) = (0usize, 0u32, 0u32);
    for (stmt, (r, t)) in plan {
        let at = *starts.get(usize::try_from(stmt).ok()?)?;
        if at < copied {
            return None;
        }
        body.extend_from_slice(&text.as_bytes()[copied..at]);
        chars += u32::try_from(text[copied..at].chars().count()).ok()?;
        copied = at;
        let mut call = guard::call(ctx.proxy.guard_fn, r.as_str(), t, ctx.proxy.guard_wait_ms);
        call.push_str(";\n");
        body.extend_from_slice(call.as_bytes());
        // Statements of the client's answered before this one.
        let skip = stmt.checked_sub(prev)?;
        prev = stmt;
        let len = u32::try_from(call.len()).ok()?;
        inserted.push((skip, chars, len, (r, t)));
    }
    body.extend_from_slice(&text.as_bytes()[copied..]);
    body.push(0);
    let mut s = ctx.lock();
    let cycle = s.open_cycle();
    for (skip, chars, len, (r, t)) in inserted {
        cycle.hide_simple_after(
            skip,
            Some(GuardCall {
                resource: r,
                token: t,
                statement: statement.clone(),
            }),
        );
        cycle.shift_positions_after(chars, len);
    }
    Some(Frame::new(b'Q', &body).into_raw())
}

/// Parse: the statement is classified now, decided at its Execute. A
/// client that parses a statement under the prepared guard statement's
/// name gets the name: the guard's statement is closed just before (its
/// CloseComplete hidden) and the guard moves to the next name.
fn on_parse(ctx: &Ctx, side: &mut ClientSide, name: &[u8], query: &[u8]) -> Send {
    let (class, text) = side.recent.classify_text(&ctx.proxy.classifier, query);
    let mut s = ctx.lock();
    let taken = ctx.proxy.guard && guard::is_prepared_name(name, s.guard_statement.generation);
    let send = taken.then(|| take_guard_name(&mut s));
    s.open_cycle().sent(b'P');
    drop(s);
    side.statements.set(name, Prepared { class, text });
    match send {
        Some(close) => Send::Prefixed(close),
        None => Send::Same,
    }
}

fn on_bind(ctx: &Ctx, side: &mut ClientSide, portal: &[u8], statement: &[u8]) -> Send {
    ctx.lock().open_cycle().sent(b'B');
    match side.statements.get(statement) {
        // No copy (two reference counts up, two down) when the portal is
        // bound to it already.
        Some(p) if side.portals.holds(portal, p) => {}
        Some(p) => side.portals.set(portal, p.clone()),
        None => side.portals.remove(portal),
    }
    Send::Same
}

/// Execute: the portal's statement decided; in guard mode the guard runs
/// just before it, before the same Sync, in the same (implicit or
/// explicit) transaction, under names of its own so the client's unnamed
/// statement and portal are left alone. `Err`: the fencer decides in full
/// ([`decide_later`]).
fn execute_now(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: &Frame,
    portal: &[u8],
) -> Result<Send, Later> {
    if side.skip_until_sync {
        ctx.lock().open_cycle().data.executed = true;
        return Ok(Send::Same);
    }
    ctx.lock().open_cycle();
    let (class, statement) = match side.portals.get(portal) {
        Some(Prepared { class, text }) => (Some(Arc::clone(class)), Statement::Text(text.clone())),
        None => (None, Statement::Label(UNKNOWN_PORTAL)),
    };
    let known = class.as_deref().unwrap_or(&UNKNOWN);
    let taken = match &statement {
        Statement::Text(text) => sql_takes_guard_name(ctx, known, text),
        _ => None,
    };
    match fence_now(ctx, known, &statement, false) {
        Ok(verdict) => Ok(execute_verdict(
            ctx, side, frame, known, taken, statement, verdict,
        )),
        Err(full) => Err(Later::Execute {
            class,
            statement,
            taken,
            full,
        }),
    }
}

/// A portal the proxy never saw bound is unknown: a write.
static UNKNOWN: Classification = Classification::UNKNOWN_WRITE;

/// What an Execute's verdict sends.
fn execute_verdict(
    ctx: &Ctx,
    side: &mut ClientSide,
    frame: &Frame,
    class: &Classification,
    taken: Option<Bytes>,
    statement: Statement,
    verdict: Verdict,
) -> Send {
    let mut s = ctx.lock();
    if class.drops_prepared {
        s.guard_statement.invalidate();
    }
    let send = match verdict {
        Verdict::Refused(poison) => {
            side.skip_until_sync = true;
            Send::Instead(poison)
        }
        Verdict::Pass => Send::Same,
        Verdict::Admitted(writes) => {
            let mut out = BytesMut::with_capacity(128 * writes.len() + frame.raw().len());
            // One statement: every guard goes before it.
            for (_, (r, t)) in writes {
                let (owed, prepares) = guard_extended(&mut out, &mut s, &ctx.proxy, &r, t);
                if prepares.is_some() {
                    s.open_cycle().data.prepares = prepares;
                }
                s.open_cycle().hide_extended(
                    owed,
                    Some(GuardCall {
                        resource: r,
                        token: t,
                        statement: statement.clone(),
                    }),
                );
            }
            out.extend_from_slice(frame.raw());
            Send::Instead(out.freeze())
        }
    };
    let cycle = s.open_cycle();
    cycle.sent(b'E');
    cycle.data.executed = true;
    prefixed(taken, send)
}

/// Appends one guard call to an extended batch, before the client's
/// Execute; returns the completions the server owes for it, and the epoch
/// of [`GuardStatement`] to confirm when the cycle it goes in parsed the
/// statement. The session's prepared guard statement when it is ready
/// (Bind, Execute, Close of the portal: the server neither parses nor
/// plans the call); otherwise Close of its name and Parse first, which
/// make it ready once that cycle succeeds; one-shot under a unique name
/// when the session has given the prepared statement up.
///
/// [`GuardStatement`]: super::state::GuardStatement
fn guard_extended(
    out: &mut BytesMut,
    s: &mut Shared,
    proxy: &PgProxy,
    resource: &ResourceName,
    token: u64,
) -> (u32, Option<u32>) {
    let g = &mut s.guard_statement;
    if g.off {
        let name = format!(
            "fencepost-guard-{}",
            GUARD_NAMES.fetch_add(1, Ordering::Relaxed)
        );
        out.extend_from_slice(&frame::run_named(
            &name,
            &guard::call(
                proxy.guard_fn,
                resource.as_str(),
                token,
                proxy.guard_wait_ms,
            ),
        ));
        return (RUN_NAMED_COMPLETIONS, None);
    }
    let mut owed = 3;
    let mut prepares = None;
    if !g.ready() {
        let epoch = g.parsing();
        out.extend_from_slice(&frame::close(b'S', g.name()));
        out.extend_from_slice(&frame::parse_typed(
            g.name(),
            proxy.guard_fn.prepared(),
            &guard::PREPARED_TYPES,
        ));
        owed += 2;
        prepares = Some(epoch);
    }
    let g = &mut s.guard_statement;
    let name = g.name();
    frame::bind_execute_close(
        out,
        name,
        name,
        &[
            resource.as_str().as_bytes(),
            &guard::token_digits(token),
            proxy.guard_wait_text.as_bytes(),
        ],
    );
    (owed, prepares)
}

fn on_close(ctx: &Ctx, side: &mut ClientSide, kind: u8, name: &[u8]) -> Send {
    let mut s = ctx.lock();
    if kind == b'S' && guard::is_prepared_name(name, s.guard_statement.generation) {
        // The client closes the guard's statement (it has none of that
        // name): it is gone.
        s.guard_statement.invalidate();
    }
    s.open_cycle().sent(b'C');
    drop(s);
    match kind {
        b'S' => side.statements.remove(name),
        b'P' => side.portals.remove(name),
        _ => {}
    }
    Send::Same
}

fn on_sync(ctx: &Ctx, side: &mut ClientSide) -> Send {
    side.skip_until_sync = false;
    ctx.lock().open_cycle().close();
    Send::Same
}

/// A fast-path call can do anything: a write. In guard mode it is fenced
/// by the proxy only: the fast-path protocol has no way to run a second
/// statement in the same implicit transaction. `Err`: the fencer decides
/// in full ([`decide_later`]).
fn function_call_now(ctx: &Ctx) -> Result<Send, Later> {
    match fence_now(ctx, &FUNCTION_CALL, &FUNCTION_CALL_STATEMENT, true) {
        Ok(verdict) => Ok(function_call_verdict(ctx, verdict)),
        Err(full) => Err(Later::FunctionCall(full)),
    }
}

/// A fast-path call, for the fencer: a write.
static FUNCTION_CALL: Classification = Classification::UNKNOWN_WRITE;

/// A fast-path call, for the audit.
const FUNCTION_CALL_STATEMENT: Statement = Statement::Label("(fast-path function call)");

/// What a fast-path call's verdict sends.
fn function_call_verdict(ctx: &Ctx, verdict: Verdict) -> Send {
    let send = match verdict {
        Verdict::Refused(b) => Send::Instead(b),
        Verdict::Pass | Verdict::Admitted(_) => Send::Same,
    };
    ctx.lock().open_cycle().close();
    send
}

/// Everything else passes as it is (Flush, COPY data, passwords and
/// SASL belong to no new cycle); a Describe is owed its completion.
fn on_other(ctx: &Ctx, tag: u8) -> Send {
    if owes_completion(tag) {
        ctx.lock().open_cycle().sent(tag);
    }
    Send::Same
}
