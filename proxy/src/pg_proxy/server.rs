//! The server's half of a session: every message relayed to the client,
//! swapped (a refusal's error) or hidden (the guard's answers), as the
//! session's state ([`Shared::on_server`](super::state::Shared::on_server))
//! says; each ReadyForQuery releases the guards of the cycle it ends.

use bytes::{Bytes, BytesMut};
use fencing::{AuditRecord, Protocol, Reason};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use wire::pg::cycle::GuardRefused;
use wire::pg::frame::split_frame;
use wire::pg::Frame;

use super::refusal::fatal;
use super::session::Ctx;
use super::state::GuardCall;
use crate::fencer::now_ms;

pub(super) async fn server_loop(ctx: &Ctx, mut sr: OwnedReadHalf) {
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
    ctx.lock().cycles.clear();
    ctx.server_gone.notify_one();
    ctx.answered.notify_waiters();
}

/// Bookkeeping for one server message; returns a replacement for it.
fn on_server_frame(ctx: &Ctx, frame: &Frame) -> Option<Bytes> {
    let answered = ctx.lock().on_server(frame);
    if let Some(refused) = answered.guard_refused {
        guard_refused(ctx, refused);
    }
    if answered.ready {
        if let Some(t) = answered.started {
            ctx.proxy.counters.latency.record(t.elapsed().as_secs_f64());
        }
        ctx.answered.notify_waiters();
    }
    answered.replace
}

/// The proxy had admitted (and counted) this write; the database guard
/// refused it: audit and count the refusal, once, here.
fn guard_refused(ctx: &Ctx, refused: GuardRefused<GuardCall>) {
    let GuardRefused {
        payload: call,
        current,
    } = refused;
    let rec = AuditRecord::new(
        now_ms(),
        Some(&call.resource),
        Protocol::Postgres,
        Reason::Stale,
        Some(call.token),
        current,
        ctx.peer.to_string(),
        &call.statement.fingerprint(),
    );
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
