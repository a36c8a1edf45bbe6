//! One client connection: the startup exchange, then two loops, one per
//! direction, sharing a little state under a short mutex.
//!
//! # Layout
//! - `startup`: TLS, the startup packet, CancelRequest.
//! - `client`: the client loop, one function per message kind.
//! - `fence`: a statement's decision through the [`Fencer`](crate::fencer::Fencer).
//! - `refusal`: what a refused statement becomes.
//! - `server`: the server loop: answers relayed, swapped or hidden.
//! - `state` and `vars`: what both loops share, with no I/O; the protocol's
//!   position in it is [`wire::pg::cycle`], tested on its own.
//! - `gate`: each loop (and each of the client loop's waits) polled only
//!   when woken for it, not at every wake of the session's task.
//! - `engine`: the default way the session threads run a session once it
//!   is open: the same handlers and state as the two loops here, stepped
//!   by an epoll loop instead of polled as a task (`engine/mod.rs` says
//!   why and what still runs here: TLS, a tier, `engine = "tokio"`).
//!
//! # Cycles
//! Postgres answers each simple Query, each Sync (extended protocol) and
//! each fast-path FunctionCall with exactly one ReadyForQuery, in order.
//! The client loop opens a cycle ([`wire::pg::cycle::Cycle`]) for every
//! such unit before its bytes go to the server; the server loop closes the
//! oldest one at each ReadyForQuery. A cycle carries the in-flight guards
//! of the writes it admitted, so a guard drops only when the server has
//! answered the whole unit: in autocommit, that is when the write has
//! committed.
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
//! # The last look before the server (a tier, proxy mode)
//! A write the proxy alone fences (proxy mode; in guard mode the
//! statements the guard cannot accompany) arms the client loop's next
//! write to the server with the instant it was admitted at
//! ([`Ctx::arm`]). That batch is then written one system call at a time,
//! each right after [`Fencer::still_leased`] (waiting for room in the
//! socket *before* the look), so neither a pause of the process nor a
//! server that stops reading can carry the rest of an admitted write past
//! a lapse of the replica lease. The exception is the session itself: a
//! batch stopped there may be cut mid-message, which no refusal marker
//! can follow, so the server's connection is closed (it runs nothing of
//! the cut message or after it, and rolls back an open block), what it
//! was sent before is answered, and the client gets `FATAL` `ZF004`.
//!
//! [`Fencer::still_leased`]: crate::fencer::Fencer::still_leased
//!
//! # Guard mode (`enforce = "database"`)
//! After the proxy admits a write, it also sends `fencepost.advance(resource,
//! token, guard_wait)` (installed by `fencepost migrate --guard`) in the
//! write's own transaction, just before the write. In the extended
//! protocol it is a Bind/Execute/Close of the session's prepared guard
//! statement (`state::GuardStatement`, parsed once per server session)
//! just before the client's Execute, within the same Sync. In the simple
//! protocol, inside a transaction block the server is known to be in, it
//! is the same Bind/Execute/Close just before the client's Query (on the
//! epoll engine with no Sync between them, over TLS with a Sync of its
//! own, which does not end a block), in a cycle of the proxy's own whose
//! answers the client never sees (`client::guard_ahead`); elsewhere it is
//! prepended to the same Query (one implicit transaction).
//! The function is a shared/exclusive gate per resource
//! (`migrations/guard/0002_gate.sql`): the mark's own token holds it
//! shared until the transaction ends, so one leader's transactions run
//! concurrently, a newer token holds it exclusive, so Postgres drains the
//! older ones across any number of proxies (at most `guard_wait`, then
//! `ZF005`), and a stale one fails with the guard's own `ZF001`.
//! The guard runs before every admitted write (not only a block's first):
//! in a transaction that already holds the gate with that token the call
//! returns at once (a memo Postgres undoes with the lock, so after a
//! `ROLLBACK TO` that released the gate the next write takes it again),
//! and the proxy need not know which writes the server has already run or
//! rolled back.
//! Statements that Postgres refuses inside a transaction block (VACUUM,
//! CREATE DATABASE, CREATE INDEX CONCURRENTLY, ...) cannot share one with
//! the guard; they, and fast-path function calls, are fenced by the proxy
//! alone, as in `enforce = "proxy"`.
//! The guard's answers are hidden from the client by position: the cycle
//! counts the completions the client's own messages are owed, and drops
//! what the server sends for the guard between them (a strip). Its
//! ErrorResponse is never hidden; in a cycle of the proxy's own it is
//! shown in place of the error the client's statement then meets.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use wire::pg::StartupKind;

use super::client::client_loop;
use super::gate::Gated;
use super::readbuf;
use super::server::server_loop;
use super::startup::{
    accept, connect_upstream, forward_cancel, ClientRead, ClientWrite, ServerRead, ServerWrite,
};
use super::state::{Shared, Statement};
use super::vars::Vars;
use super::PgProxy;
use crate::shutdown::Shutdown;

/// What both loops of a session hold.
pub(super) struct Ctx {
    pub(super) proxy: Arc<PgProxy>,
    pub(super) peer: SocketAddr,
    shared: Mutex<Shared>,
    /// Fired at each ReadyForQuery.
    pub(super) answered: Notify,
    /// Fired when the server side has ended.
    pub(super) server_gone: Notify,
    /// The client's write half; `None` on the epoll engine, which writes
    /// to the client itself (`engine/conn.rs`).
    client_w: Option<tokio::sync::Mutex<ClientWrite>>,
    /// The earliest admission instant ([`Admission::leased_at`]) of the
    /// writes fenced by the proxy alone whose bytes the client loop has
    /// not written to the server yet ([`NOT_ARMED`]: none). The client
    /// loop takes it before each write to the server and looks at the
    /// replica lease before every write system call of that batch
    /// (`client.rs` `to_server`). Only on a tier.
    ///
    /// [`Admission::leased_at`]: crate::fencer::Admission::leased_at
    unsent: AtomicU64,
}

/// [`Ctx`]'s `unsent` when no write is waiting to be sent.
pub(super) const NOT_ARMED: u64 = u64::MAX;

impl Ctx {
    /// A session's context once it is open; `cw` is `None` on the epoll
    /// engine.
    pub(super) fn new(
        proxy: Arc<PgProxy>,
        peer: SocketAddr,
        vars: Vars,
        cw: Option<ClientWrite>,
    ) -> Ctx {
        Ctx {
            proxy,
            peer,
            // The server's first ReadyForQuery ends authentication: owed.
            shared: Mutex::new(Shared::new(vars)),
            answered: Notify::new(),
            server_gone: Notify::new(),
            client_w: cw.map(tokio::sync::Mutex::new),
            unsent: AtomicU64::new(NOT_ARMED),
        }
    }

    /// The session runs on the epoll engine, which writes to the client
    /// itself and sends the Sync an unsynced own cycle's failure asks for
    /// ([`wire::pg::cycle::Cycles::insert_own_unsynced`]).
    pub(super) fn on_engine(&self) -> bool {
        self.client_w.is_none()
    }

    /// The shared state. A std mutex, never held across an await.
    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing below panics while holding it; a poisoned lock still
        // holds consistent state.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A write the proxy alone fenced, admitted at `leased_at`, is about
    /// to join the batch for the server: the batch is written only while
    /// the replica lease holds since then. `s` is this session's state,
    /// locked by the caller: it keeps `statement` for the audit record of
    /// a batch that is stopped (a reference count, no copy).
    pub(super) fn arm(&self, s: &mut Shared, leased_at: u64, statement: &Statement) {
        if self.proxy.fencer.tiered() {
            self.unsent.fetch_min(leased_at, Ordering::Relaxed);
            s.armed = Some(statement.clone());
        }
    }

    /// The batch's earliest admission instant, if it holds such a write;
    /// disarms for the next batch.
    pub(super) fn take_armed(&self) -> Option<u64> {
        Some(self.unsent.swap(NOT_ARMED, Ordering::Relaxed)).filter(|&at| at != NOT_ARMED)
    }

    /// Best effort: the client may be gone. Both loops write to the
    /// client (the client loop only its fatal errors), so the write half
    /// is behind an async mutex, held for one write and flush.
    pub(super) async fn to_client(&self, bytes: &[u8]) -> bool {
        let Some(client_w) = &self.client_w else {
            return false;
        };
        // Free but for the client loop's rare fatal errors: take it
        // without building and polling a lock future (a waiter queued
        // first keeps its turn: `try_lock` fails while one is).
        let mut w = match client_w.try_lock() {
            Ok(w) => w,
            Err(_) => client_w.lock().await,
        };
        // TLS buffers records: flush so the answer leaves now.
        w.write_all(bytes).await.is_ok() && w.flush().await.is_ok()
    }
}

/// One client connection, from its first byte to its end.
///
/// The session's task is sized for the largest state its future can be
/// in, for as long as the connection lives, idle or not; so the startup
/// exchange (the TLS handshake, the upstream connect, their timeouts)
/// runs in a boxed future of its own, freed once the session is open.
pub(super) async fn run(
    proxy: Arc<PgProxy>,
    client: TcpStream,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let Some(open) = Box::pin(open(&proxy, client, peer)).await else {
        return;
    };
    run_open(proxy, open, peer, shutdown).await;
}

/// An open session's two loops, to its end.
pub(super) async fn run_open(
    proxy: Arc<PgProxy>,
    open: Open,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let Open {
        cr,
        cw,
        sr,
        sw,
        vars,
        cbuf,
    } = open;
    let ctx = Ctx::new(proxy, peer, vars, Some(cw));
    // Each loop polled only when woken for it: a server answer does not
    // re-poll the client loop's waits, nor a client message the server
    // loop's (see `gate`).
    let client = pin!(client_loop(&ctx, cr, sw, cbuf, shutdown));
    let server = pin!(server_loop(&ctx, sr));
    tokio::join!(Gated::new(client), Gated::new(server));
}

/// A session past its startup packet, connected upstream.
pub(super) struct Open {
    pub(super) cr: ClientRead,
    pub(super) cw: ClientWrite,
    pub(super) sr: ServerRead,
    pub(super) sw: ServerWrite,
    pub(super) vars: Vars,
    /// What the client sent after its startup packet.
    pub(super) cbuf: BytesMut,
}

/// The startup exchange, the upstream connection and the startup packet
/// sent on; `None` when the session ends there (a CancelRequest, a client
/// that left or was refused). The startup packet is dropped here, once
/// sent: the session keeps only its fencing variables.
pub(super) async fn open(
    proxy: &Arc<PgProxy>,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<Open> {
    let mut cbuf = BytesMut::with_capacity(readbuf::IDLE);
    let (mut client, startup) = match tokio::time::timeout(
        proxy.startup_timeout,
        accept(proxy, client, &mut cbuf, peer),
    )
    .await
    {
        Ok(Some(x)) => x,
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!(%peer, "startup timed out");
            return None;
        }
    };
    if startup.kind == StartupKind::Cancel {
        forward_cancel(proxy, startup.raw).await;
        return None;
    }
    let server = connect_upstream(proxy, &mut client, peer).await?;
    let vars = Vars::from_startup(&startup);
    let (cr, cw) = client.into_halves();
    let (sr, mut sw) = server.into_halves();
    if sw.write_all(&startup.raw).await.is_err() {
        proxy.counters.upstream_errors.increment(1);
        return None;
    }
    Some(Open {
        cr,
        cw,
        sr,
        sw,
        vars,
        cbuf,
    })
}
