//! A statement's decision: the fencing variables it sees, the fencer's
//! verdict on its write (and on a COMMIT's writes), and the guards filed
//! in the open cycle.

use bytes::Bytes;
use fencing::Protocol;
use wire::pg::frame;
use wire::pg::{Classification, CommentFence};

use super::refusal::{refusal_error, refuse, Unit};
use super::session::Ctx;
use super::state::Statement;
use super::vars::non_empty;
use crate::fencer::{Decision, WriteInfo};

/// What [`fence`] made of a statement.
pub(super) enum Verdict {
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
pub(super) async fn fence(
    ctx: &Ctx,
    class: &Classification,
    statement: &Statement,
    unit: Unit,
) -> Verdict {
    let (fences, peer) = {
        let mut s = ctx.lock();
        s.open_cycle()
            .data
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
    let detail = || statement.fingerprint();
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
        cycle.data.guards.push(guard);
        if let (Some(r), Some(t)) = (resource, token) {
            cycle.data.writes.push((r, t));
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
