//! The server's half of a session: every message relayed to the client,
//! swapped (a refusal's error) or hidden (the guard's answers), as the
//! session's state ([`Shared::on_server`](super::state::Shared::on_server))
//! says, under one lock for all the messages of a read; each ReadyForQuery
//! releases the guards of the cycle it ends.

use bytes::{Bytes, BytesMut};
use fencing::{Protocol, Reason};
use wire::pg::cycle::GuardRefused;
use wire::pg::frame::{complete_frames, frames};
use wire::pg::FrameError;

use super::readbuf::{ReadBuf, IDLE};
use super::refusal::fatal;
use super::session::Ctx;
use super::startup::ServerRead;
use super::state::GuardCall;
use crate::fencer::{Refusal, WriteInfo};

pub(super) async fn server_loop(ctx: &Ctx, mut sr: ServerRead) {
    let mut rb = ReadBuf::new();
    // Only for a batch with a message swapped or hidden; the rest are
    // forwarded as they were read, without a copy.
    let mut out = BytesMut::new();
    let mut client_gone = false;
    // The database guard's refusals in a batch (guard mode), audited
    // before the batch is relayed.
    let mut refusals: Vec<GuardRefused<GuardCall>> = Vec::new();
    loop {
        let (complete, malformed) = complete_frames(&rb.buf, ctx.proxy.max_frame);
        if complete > 0 {
            let batch = rb.buf.split_to(complete).freeze();
            // No `sync` here: a task's session sends no unsynced cycle
            // (`client.rs` `guard_ahead`).
            let Booked {
                rewritten, ready, ..
            } = book(ctx, &batch, &mut out, &mut refusals);
            if ready {
                ctx.answered.notify_waiters();
            }
            // A guard refusal is answered only once its audit record is
            // durable. Boxed: the audit's future would otherwise size
            // every session's task.
            for refused in refusals.drain(..) {
                Box::pin(guard_refused(ctx, refused)).await;
            }
            let send: &[u8] = if rewritten { &out } else { &batch };
            if !send.is_empty() && !client_gone && !ctx.to_client(send).await {
                // Keep reading: the server's answers still release guards.
                client_gone = true;
            }
            out.clear();
            if rb.burst_over() && out.capacity() > 4 * IDLE {
                // A large answer is over: give its room back.
                out = BytesMut::new();
            }
        }
        if let Some(e) = malformed {
            let fatal = malformed_answer(ctx, &e);
            if !client_gone {
                ctx.to_client(&fatal).await;
            }
            finish(ctx);
            return;
        }
        match sr.read(&mut rb).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    finish(ctx);
}

/// What [`book`] found in a batch.
pub(super) struct Booked {
    /// A message was swapped or hidden: send `out`, not the batch.
    pub(super) rewritten: bool,
    /// The batch held a ReadyForQuery.
    pub(super) ready: bool,
    /// Send a Sync to the server ([`wire::pg::cycle::Cycles::take_sync`];
    /// only on the epoll engine, whose sessions send unsynced own cycles).
    pub(super) sync: bool,
}

/// Books a batch of complete messages from the server in the session's
/// state, under one lock for all of them, not one a message: each
/// ReadyForQuery releases the guards of the cycle it ends (and records
/// the statement's latency), the database guard's refusals go to
/// `refusals` (to be audited before the batch is relayed), and a batch
/// with a message swapped or hidden is written, rewritten, to `out`;
/// the rest are relayed as they were read, without a copy.
pub(super) fn book(
    ctx: &Ctx,
    batch: &Bytes,
    out: &mut BytesMut,
    refusals: &mut Vec<GuardRefused<GuardCall>>,
) -> Booked {
    let mut copied = 0;
    let mut booked = Booked {
        rewritten: false,
        ready: false,
        sync: false,
    };
    let mut s = ctx.lock();
    for (at, frame) in frames(batch) {
        if s.counted(frame) {
            continue;
        }
        let answered = s.on_server(frame);
        if let Some(refused) = answered.guard_refused {
            refusals.push(refused);
        }
        if answered.ready {
            booked.ready = true;
            if let Some(t) = answered.started {
                ctx.proxy.counters.latency.record(t.elapsed());
            }
        }
        if let Some(replacement) = answered.replace {
            out.extend_from_slice(&batch[copied..at]);
            out.extend_from_slice(&replacement);
            copied = at + frame.raw().len();
            booked.rewritten = true;
        }
    }
    if booked.rewritten {
        out.extend_from_slice(&batch[copied..]);
    }
    booked.sync = s.cycles.take_sync();
    booked
}

/// A malformed message from the server: logged and counted; the fatal
/// error the client gets for it.
pub(super) fn malformed_answer(ctx: &Ctx, e: &FrameError) -> Bytes {
    tracing::warn!(peer = %ctx.peer, error = %e, "malformed message from the upstream server");
    ctx.proxy.counters.upstream_errors.increment(1);
    fatal(
        "08P01",
        &format!("fencepost: the upstream server sent a malformed message: {e}"),
    )
}

/// The server side has ended: nothing more will be answered. Guards drop
/// with the state (the server has closed, so the writes are over).
pub(super) fn finish(ctx: &Ctx) {
    ctx.lock().cycles.clear();
    ctx.server_gone.notify_one();
    ctx.answered.notify_waiters();
}

/// The proxy had admitted (and counted) this write; the database guard
/// refused it. The refusal is audited and counted where every other one
/// is, by the fencer.
pub(super) fn guard_refused(
    ctx: &Ctx,
    refused: GuardRefused<GuardCall>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let GuardRefused {
        payload: call,
        current,
    } = refused;
    let refusal = Refusal {
        reason: Reason::Stale,
        field: None,
        presented: Some(call.token),
        current,
        message: format!(
            "stale fencing token for resource {}: presented {}, current {} (refused by the database guard)",
            call.resource,
            call.token,
            current.map_or_else(|| "unknown".to_owned(), |c| c.to_string()),
        ),
        resource: Some(call.resource),
    };
    let detail = || call.statement.fingerprint();
    let info = WriteInfo {
        protocol: Protocol::Postgres,
        client: ctx.peer,
        detail: &detail,
    };
    ctx.proxy
        .fencer
        .refused(&ctx.proxy.counters, &refusal, &info)
}
