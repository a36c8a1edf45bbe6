//! One session on the epoll engine: the client loop and the server loop
//! of `client.rs` and `server.rs` as one state machine, stepped by
//! [`Conn::drive`] whenever a socket is ready or a message arrives.
//!
//! Each side keeps the tokio loop's order and its back-pressure:
//! - the client side reads only while its last batch for the server has
//!   been written whole (a `write_all` there), and decides one message at
//!   a time, waiting for a decision that waits;
//! - the server side reads only while what it relayed has been written to
//!   the client whole (unless the client is gone: then the answers are
//!   dropped, still booked, since they release guards), and holds a
//!   batch with a database guard's refusal until the refusal is audited.

use std::io::Write as _;
use std::net::Shutdown as Half;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf as _, Bytes, BytesMut};
use mio::net::TcpStream;
use wire::pg::cycle::GuardRefused;
use wire::pg::frame::{self, complete_frames};
use wire::pg::FrameError;

use super::{register, Decision, Env, Load, Msg, Opened};
use crate::listener::ConnPermit;
use crate::pg_proxy::client::{
    decide_now, handle_in_place, handle_now, ClientSide, Decided, Now, Out,
};
use crate::pg_proxy::readbuf::{ReadBuf, IDLE};
use crate::pg_proxy::refusal::fatal;
use crate::pg_proxy::server::{book, finish, guard_refused, malformed_answer, Booked};
use crate::pg_proxy::session::Ctx;
use crate::pg_proxy::state::GuardCall;

/// Rounds of a session's step (each a read or a write on each side, at
/// most) before the engine moves on to its other sessions: a peer that
/// keeps its socket full (a long COPY, a large result) must not keep the
/// thread's other sessions waiting. Tokio's tasks have the same kind of
/// budget.
const BUDGET: usize = 32;

/// Where a session's step left it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Waiting for a socket or a message.
    Waits,
    /// More to do at once, after the engine's other sessions.
    Again,
    /// Ended: the engine drops it, closing its sockets.
    Ended,
}

/// A session's slot in its engine and the generation it was opened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::pg_proxy) struct Id {
    pub(super) slot: usize,
    pub(super) generation: u32,
}

/// Bytes on their way to a socket that did not take them all yet.
#[derive(Default)]
struct Pending {
    buf: BytesMut,
    /// How much of `buf` has been written.
    at: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }

    /// Writes what it holds while `s` takes it. `Ok(true)`: all written;
    /// `Ok(false)`: the socket is full (`writable` is cleared).
    fn flush(&mut self, s: &mut TcpStream, writable: &mut bool) -> std::io::Result<bool> {
        while !self.is_empty() {
            if !*writable {
                return Ok(false);
            }
            match write(s, &self.buf[self.at..], writable)? {
                0 => return Ok(false),
                n => self.at += n,
            }
        }
        self.clear();
        Ok(true)
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.at = 0;
    }

    /// After a large batch: its room given back.
    fn shrink(&mut self) {
        if self.is_empty() && self.buf.capacity() > 4 * IDLE {
            *self = Pending::default();
        }
    }
}

/// One write system call's worth; `Ok(0)` when the socket is full (and
/// `writable` is cleared), an error when it is broken.
fn write(s: &mut TcpStream, bytes: &[u8], writable: &mut bool) -> std::io::Result<usize> {
    loop {
        match s.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                *writable = false;
                return Ok(0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A socket's readiness as epoll last said it, until a read or write
/// finds otherwise (epoll is edge-triggered: it says so once).
#[derive(Clone, Copy)]
struct Ready {
    read: bool,
    write: bool,
    /// The peer has closed its side (or the socket failed): the end is
    /// there to be read after whatever data is left, and epoll will not
    /// say so again, so a short read no longer means the socket is
    /// drained.
    closed: bool,
}

impl Ready {
    /// After a read of `n` bytes that was `short`: whether to read again
    /// before the next readiness event.
    fn after_read(&mut self, short: bool) {
        self.read = !short || self.closed;
    }
}

pub(super) struct Conn {
    id: Id,
    ctx: Arc<Ctx>,
    client: TcpStream,
    server: TcpStream,
    c_ready: Ready,
    s_ready: Ready,
    cin: ReadBuf,
    sin: ReadBuf,
    /// `None` while a decision that waited is on the runtime. Boxed: it
    /// moves into every statement's decision and back, 8 bytes, not 280.
    side: Option<Box<ClientSide>>,
    /// The client side's batch for the server.
    to_server: Pending,
    /// Relayed answers the client's socket has not taken yet.
    to_client: Pending,
    /// A batch with a message swapped or hidden, rewritten.
    rewritten: BytesMut,
    /// The database guard's refusals in a batch, to audit before it is
    /// relayed.
    refusals: Vec<GuardRefused<GuardCall>>,
    /// A batch waiting for its refusals' audit ([`Msg::Audited`]).
    held: Option<Bytes>,
    /// Shutdown has begun: close the session once it is idle.
    closing: bool,
    /// The client side has ended (the client said goodbye, vanished,
    /// sent something malformed, or the server is gone): nothing more is
    /// read from the client, and the server's socket is shut for writing
    /// once the last batch is written.
    client_done: bool,
    /// The server's socket is shut for writing.
    server_shut: bool,
    /// Writing to the client failed: answers are booked, then dropped.
    client_gone: bool,
    /// The server side has ended.
    server_done: bool,
    _permit: ConnPermit,
    _load: Load,
}

impl Conn {
    pub(super) fn new(
        id: Id,
        opened: Opened,
        registry: &mio::Registry,
        closing: bool,
    ) -> std::io::Result<Conn> {
        let Opened {
            ctx,
            client,
            server,
            cbuf,
            permit,
            load,
        } = opened;
        let mut client = TcpStream::from_std(client);
        let mut server = TcpStream::from_std(server);
        register(registry, id, &mut client, &mut server)?;
        // Ready until a read or a write finds otherwise: the first step
        // tries each once.
        let ready = Ready {
            read: true,
            write: true,
            closed: false,
        };
        Ok(Conn {
            id,
            ctx,
            client,
            server,
            c_ready: ready,
            s_ready: ready,
            cin: ReadBuf::from(cbuf),
            sin: ReadBuf::new(),
            side: Some(Box::new(ClientSide::new())),
            to_server: Pending::default(),
            to_client: Pending::default(),
            rewritten: BytesMut::new(),
            refusals: Vec::new(),
            held: None,
            closing,
            client_done: false,
            server_shut: false,
            client_gone: false,
            server_done: false,
            _permit: permit,
            _load: load,
        })
    }

    pub(super) fn id(&self) -> Id {
        self.id
    }

    /// A readiness event for one of the sockets; whether it is news.
    pub(super) fn ready(&mut self, server: bool, read: bool, write: bool, closed: bool) -> bool {
        let r = if server {
            &mut self.s_ready
        } else {
            &mut self.c_ready
        };
        r.read |= read;
        r.write |= write;
        r.closed |= closed;
        read || write
    }

    /// Shutdown has begun.
    pub(super) fn close(&mut self) {
        self.closing = true;
    }

    /// A decision that waited is done.
    pub(super) fn decided(&mut self, side: Box<ClientSide>, out: Result<Out, FrameError>) {
        self.side = Some(side);
        if !self.client_done {
            self.sent(out);
        }
    }

    /// A held batch's refusals are audited: it goes on to the client.
    pub(super) fn audited(&mut self) {
        if let Some(batch) = self.held.take() {
            self.relay_bytes(&batch);
        }
    }

    /// Steps the session as far as it goes without waiting, or for
    /// [`BUDGET`] rounds, whichever comes first.
    pub(super) fn drive<D: Decision>(&mut self, env: &mut Env<'_, D>) -> Step {
        let mut more = true;
        for _ in 0..BUDGET {
            let mut moved = self.flush_client();
            moved |= self.server_side(env);
            moved |= self.flush_server();
            moved |= self.client_side(env);
            if !moved {
                more = false;
                break;
            }
        }
        if !self.c_ready.read {
            self.cin.park();
        }
        if !self.s_ready.read {
            self.sin.park();
        }
        if self.server_done && self.client_done && (self.client_gone || self.to_client.is_empty()) {
            Step::Ended
        } else if more {
            Step::Again
        } else {
            Step::Waits
        }
    }

    /// The client side: its messages handled in order, each batch written
    /// to the server whole before more is read.
    fn client_side<D: Decision>(&mut self, env: &mut Env<'_, D>) -> bool {
        if self.client_done {
            return false;
        }
        if self.server_done {
            // The server is gone: nothing the client sends can be run.
            self.client_done = true;
            return true;
        }
        if !self.to_server.is_empty() {
            return false;
        }
        let Some(mut side) = self.side.take() else {
            // A decision is on the runtime.
            return false;
        };
        if side.awaits_own && self.awaits_own(&mut side) {
            self.side = Some(side);
            return false;
        }
        let max = self.ctx.proxy.max_frame;
        loop {
            // Most messages are handled where they lie and copied to the
            // batch; statements are cut off as frames of their own.
            let step = frame::message_len(&self.cin.buf, max).and_then(|n| match n {
                None => Ok(None),
                Some(n) => handle_in_place(
                    &self.ctx,
                    &mut side,
                    &self.cin.buf[..n],
                    &mut self.to_server.buf,
                )
                .map(|handled| Some((n, handled))),
            });
            let n = match step {
                Ok(None) => break,
                Ok(Some((n, true))) => {
                    self.cin.buf.advance(n);
                    continue;
                }
                Ok(Some((n, false))) => n,
                Err(e) => {
                    self.side = Some(side);
                    self.malformed(&e);
                    return true;
                }
            };
            let frame = frame::cut_frame(&mut self.cin.buf, n);
            let now = handle_now(&self.ctx, &mut side, frame).and_then(|now| match now {
                Now::Done(out) => Ok(Decided::Ready(out)),
                Now::Decide(frame) => decide_now(&self.ctx, &mut side, frame),
            });
            let out = match now {
                Ok(Decided::Ready(out)) => Ok(out),
                Ok(Decided::Later(frame, later)) => {
                    let decision = (env.decide)(Arc::clone(&self.ctx), side, frame, later);
                    match env.first_poll(decision) {
                        Poll::Ready(Some((s, out))) => {
                            side = s;
                            out
                        }
                        // Not there (`first_poll` only just put it),
                        // and the client side went with it: end that
                        // side rather than wait for it forever.
                        Poll::Ready(None) => {
                            self.client_done = true;
                            return true;
                        }
                        Poll::Pending => {
                            // It waits (a newer token's drain, a store
                            // write): on the runtime, which polls it again
                            // with a waker of its own. What was gathered
                            // goes to the server meanwhile: the drain may
                            // wait for exactly those statements.
                            let decision = env.take_decision();
                            let (id, inbox) = (self.id, Arc::clone(env.inbox));
                            env.rt.spawn(async move {
                                if let Some(decided) = decision.await {
                                    let _ = inbox.send(Msg::Decided(id, Box::new(decided)));
                                }
                            });
                            return true;
                        }
                    }
                }
                Err(e) => Err(e),
            };
            self.sent(out);
            if self.client_done {
                self.side = Some(side);
                return true;
            }
            if side.awaits_own {
                break;
            }
        }
        self.side = Some(side);
        if !self.to_server.is_empty() {
            // The batch: `flush_server` writes it.
            return true;
        }
        if self.cin.burst_over() {
            self.to_server.shrink();
        }
        if self.closing && self.ctx.lock().idle() {
            self.to_client.buf.extend_from_slice(&fatal(
                "57P01",
                "terminating connection due to administrator command",
            ));
            self.to_server.buf.extend_from_slice(&frame::terminate());
            self.client_done = true;
            return true;
        }
        if !self.c_ready.read {
            return false;
        }
        match self.cin.try_fill(&mut self.client, &mut env.scratch) {
            Ok(Some((0, _))) | Err(_) => {
                // The client vanished. What it already sent may still be
                // running: the server's socket is shut for writing, as the
                // client's own would be, so the server finishes (and
                // answers, releasing the guards) what it runs, then reads
                // the end and closes, rolling back an open block.
                self.client_done = true;
            }
            Ok(Some((_, short))) => self.c_ready.after_read(short),
            Ok(None) => self.c_ready.read = false,
        }
        true
    }

    /// A guard went ahead of the client's last Query without a Sync
    /// ([`ClientSide::awaits_own`]): whether its cycle is still in flight.
    /// If it fails, the server skips everything up to the Sync the server
    /// side then sends, so nothing more of the client's goes before that.
    /// Out of line: rare (once per guarded transaction, while it waits).
    #[cold]
    #[inline(never)]
    fn awaits_own(&self, side: &mut ClientSide) -> bool {
        if self.ctx.lock().cycles.unsynced_in_flight() {
            return true;
        }
        side.awaits_own = false;
        false
    }

    /// A handled message's bytes join the batch for the server.
    fn sent(&mut self, out: Result<Out, FrameError>) {
        match out {
            Ok(Out::Send(b)) => self.to_server.buf.extend_from_slice(&b),
            Ok(Out::Last(b)) => {
                self.to_server.buf.extend_from_slice(&b);
                self.client_done = true;
            }
            Err(e) => self.malformed(&e),
        }
    }

    /// A malformed message from the client: what came before it is still
    /// sent, the client is told why, and its side ends.
    fn malformed(&mut self, e: &FrameError) {
        tracing::debug!(peer = %self.ctx.peer, error = %e, "malformed message from client");
        self.to_client
            .buf
            .extend_from_slice(&fatal("08P01", &format!("fencepost: {e}")));
        self.client_done = true;
    }

    /// Writes the client side's batch; once the client side has ended and
    /// its last batch is out, shuts the server's socket for writing.
    fn flush_server(&mut self) -> bool {
        if self.server_done {
            self.to_server.clear();
            return false;
        }
        let mut moved = false;
        if !self.to_server.is_empty() {
            let had = self.to_server.at;
            match self
                .to_server
                .flush(&mut self.server, &mut self.s_ready.write)
            {
                Ok(all) => moved = all || self.to_server.at != had,
                Err(_) => {
                    // The server's connection failed: the client side
                    // ends; the server side reads the end.
                    self.to_server.clear();
                    self.client_done = true;
                    self.s_ready.read = true;
                    moved = true;
                }
            }
        }
        if self.client_done && self.to_server.is_empty() && !self.server_shut {
            let _ = self.server.shutdown(Half::Write);
            self.server_shut = true;
            moved = true;
        }
        moved
    }

    /// The server side: each read's complete messages booked under one
    /// lock and relayed (rewritten where a message is swapped or hidden),
    /// then the next read, once the client has taken the last.
    fn server_side<D: Decision>(&mut self, env: &mut Env<'_, D>) -> bool {
        if self.server_done || self.held.is_some() {
            return false;
        }
        if !self.client_gone && !self.to_client.is_empty() {
            return false;
        }
        let (complete, malformed) = complete_frames(&self.sin.buf, self.ctx.proxy.max_frame);
        if complete > 0 {
            let batch = self.sin.buf.split_to(complete).freeze();
            let Booked {
                rewritten, sync, ..
            } = book(&self.ctx, &batch, &mut self.rewritten, &mut self.refusals);
            if sync {
                // The proxy's own cycle, sent without a Sync, failed: the
                // server skips up to a Sync, which ends the client's Query
                // (held back until now, see `client_side`).
                self.to_server.buf.extend_from_slice(frame::SYNC);
            }
            if !self.refusals.is_empty() {
                // A guard refusal is answered only once its audit record
                // is durable.
                self.held = Some(if rewritten {
                    self.rewritten.split().freeze()
                } else {
                    batch
                });
                let audits: Vec<_> = self
                    .refusals
                    .drain(..)
                    .map(|r| guard_refused(&self.ctx, r))
                    .collect();
                let (id, inbox) = (self.id, Arc::clone(env.inbox));
                env.rt.spawn(async move {
                    for audit in audits {
                        audit.await;
                    }
                    let _ = inbox.send(Msg::Audited(id));
                });
                return true;
            }
            if rewritten {
                let out = std::mem::take(&mut self.rewritten);
                self.relay_bytes(&out);
                self.rewritten = out;
                self.rewritten.clear();
                if self.sin.burst_over() && self.rewritten.capacity() > 4 * IDLE {
                    self.rewritten = BytesMut::new();
                }
            } else {
                self.relay_bytes(&batch);
            }
            if let Some(e) = malformed {
                self.server_malformed(&e);
            }
            return true;
        }
        if let Some(e) = malformed {
            self.server_malformed(&e);
            return true;
        }
        if !self.s_ready.read {
            return false;
        }
        match self.sin.try_fill(&mut self.server, &mut env.scratch) {
            Ok(Some((0, _))) | Err(_) => {
                finish(&self.ctx);
                self.server_done = true;
            }
            Ok(Some((_, short))) => self.s_ready.after_read(short),
            Ok(None) => self.s_ready.read = false,
        }
        true
    }

    fn server_malformed(&mut self, e: &FrameError) {
        let fatal = malformed_answer(&self.ctx, e);
        self.relay_bytes(&fatal);
        finish(&self.ctx);
        self.server_done = true;
    }

    /// Relays `bytes` to the client: written at once as far as the socket
    /// takes them (no copy), the rest kept for [`Conn::flush_client`].
    fn relay_bytes(&mut self, bytes: &[u8]) {
        if self.client_gone || bytes.is_empty() {
            return;
        }
        let mut rest = bytes;
        if self.to_client.is_empty() {
            while !rest.is_empty() && self.c_ready.write {
                match write(&mut self.client, rest, &mut self.c_ready.write) {
                    Ok(n) => rest = &rest[n..],
                    Err(_) => {
                        // Keep reading: the server's answers still
                        // release guards.
                        self.client_gone = true;
                        return;
                    }
                }
            }
        }
        self.to_client.buf.extend_from_slice(rest);
    }

    fn flush_client(&mut self) -> bool {
        if self.to_client.is_empty() {
            return false;
        }
        if self.client_gone {
            self.to_client.clear();
            return true;
        }
        let had = self.to_client.at;
        match self
            .to_client
            .flush(&mut self.client, &mut self.c_ready.write)
        {
            Ok(true) => {
                self.to_client.shrink();
                true
            }
            Ok(false) => self.to_client.at != had,
            Err(_) => {
                self.client_gone = true;
                self.to_client.clear();
                true
            }
        }
    }
}
