//! A statement's decision: the fencing inputs it presents (its comment,
//! else the session's variables), the fencer's verdict on its write and on
//! a COMMIT's writes, and the guards filed in the open cycle.

use bytes::Bytes;
use fencing::{input, Protocol};
use wire::pg::{Classification, CommentFence};

use super::refusal::{refusal_error, refuse, Unit};
use super::session::Ctx;
use super::state::{Shared, Statement, Steady, Write};
use super::vars::Setting;
use crate::fencer::{Decision, Refusal, WriteInfo};

/// What [`fence`] made of a statement.
pub(super) enum Verdict {
    /// Nothing to decide (a read), or admitted in proxy mode: send it.
    Pass,
    /// Admitted in guard mode: send it after the guard calls for these
    /// writes (resource and verified number).
    Admitted(Vec<Write>),
    /// Refused: send these bytes instead.
    Refused(Bytes),
}

/// Files the statement's SETs, decides its write (and a COMMIT's writes)
/// through the fencer, and files guards and writes in the open cycle.
pub(super) async fn fence(
    ctx: &Ctx,
    class: &Classification,
    statement: &Statement,
    unit: Unit,
) -> Verdict {
    let (view, commits) = {
        let mut s = ctx.lock();
        if !class.settings.is_empty() {
            let settings = class.settings.iter().map(Setting::parse);
            s.open_cycle().data.settings.extend(settings);
        }
        let strict_write = ctx.proxy.strict && class.data && (class.data_in_block || s.in_block);
        if let Some(b) = class.block_after {
            s.in_block = b;
        }
        let write = class.write || strict_write;
        if write && !class.commits {
            if let Some(verdict) = steady(ctx, &mut s, class) {
                return verdict;
            }
        }
        // The variables as this statement sees them, its own SETs included;
        // read only for a write.
        let view = write.then(|| s.view());
        // The block's writes must still be current when it commits.
        let commits = if class.commits {
            s.txn_write_keys()
        } else {
            Vec::new()
        };
        (view, commits)
    };
    if view.is_none() && commits.is_empty() {
        return Verdict::Pass;
    }
    // A leading comment's values win over the session's.
    let own = view.as_ref().map(|v| {
        let mut presented = v.input();
        let blank = |s: &&str| s.trim().is_empty();
        if let Some(r) = class.comment.resource.as_deref().filter(|s| !blank(s)) {
            presented.resource = input::resource(r);
        }
        if let Some(t) = class.comment.token.as_deref().filter(|s| !blank(s)) {
            presented.token = input::token(t);
        }
        presented
    });
    let detail = || statement.fingerprint();
    let info = WriteInfo {
        protocol: Protocol::Postgres,
        client: ctx.peer,
        detail: &detail,
    };
    let proxy = &ctx.proxy;
    let mut admitted = Vec::with_capacity(1 + commits.len());
    let mut steady_now = None;
    if let Some(presented) = &own {
        match proxy
            .fencer
            .decide(&proxy.checker, &proxy.counters, presented, &info)
            .await
        {
            Decision::Admit(a) => {
                if let (Ok(token), Some(slot)) = (
                    &presented.token,
                    proxy.fencer.table().get(a.resource.as_str()),
                ) {
                    steady_now = Some(Steady {
                        resource: a.resource.to_name(),
                        token: *token,
                        n: a.token,
                        slot,
                    });
                }
                admitted.push((a.guard, a.resource.to_name(), a.token));
            }
            Decision::Refuse(r) => return refused(ctx, class, unit, &r),
        }
    }
    for (resource, token) in commits {
        if admitted
            .first()
            .is_some_and(|(_, r, t)| *r == resource && *t == token)
        {
            continue;
        }
        match proxy
            .fencer
            .decide_again(&proxy.counters, resource.as_ref_name(), token, &info)
            .await
        {
            Decision::Admit(a) => admitted.push((a.guard, resource, token)),
            Decision::Refuse(r) => {
                // Guards admitted for this statement drop here: it never runs.
                drop(admitted);
                return refused(ctx, class, unit, &r);
            }
        }
    }
    // Guard mode: compare-and-advance the admitted numbers in the
    // database too. A statement that cannot share a transaction is fenced
    // by the proxy only (see the session's module docs).
    // Only before the transaction's first write of each (resource, token):
    // later ones run under the gate it took (see `Shared::gate_held`).
    let mut guarded: Vec<Write> = Vec::new();
    let mut s = ctx.lock();
    if proxy.guard && !class.outside_block {
        guarded.extend(admitted.iter().map(|(_, r, t)| (r.clone(), *t)));
        guarded.sort();
        guarded.dedup();
        guarded.retain(|w| !s.gate_held(w));
    }
    if steady_now.is_some() {
        s.steady = steady_now;
    }
    let cycle = s.open_cycle();
    cycle.data.guarded.extend(guarded.iter().cloned());
    for (guard, resource, token) in admitted {
        cycle.data.guards.push(guard);
        cycle.data.writes.push((resource, token));
    }
    if guarded.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Admitted(guarded)
    }
}

/// The fast path (proxy mode; guard mode decides in full, for its gate
/// bookkeeping): a write that presents what the session's last admitted
/// write presented (the committed variables, no setting pending, no
/// comment) is admitted on the slot the session holds, with one CAS and no
/// allocation. `None`: decide in full.
fn steady(ctx: &Ctx, s: &mut Shared, class: &Classification) -> Option<Verdict> {
    let proxy = &ctx.proxy;
    if (proxy.guard && !class.outside_block) || class.comment != CommentFence::default() {
        return None;
    }
    let (Ok(resource), Ok(token)) = s.settled()? else {
        return None;
    };
    let held = s.steady.as_ref()?;
    if held.resource != *resource || held.token != *token {
        return None;
    }
    let admission = proxy.fencer.admit_held(
        &proxy.counters,
        &held.slot,
        held.resource.as_ref_name(),
        held.n,
    )?;
    let write: Write = (held.resource.clone(), held.n);
    let guard = admission.guard;
    let cycle = s.open_cycle();
    cycle.data.guards.push(guard);
    cycle.data.writes.push(write);
    Some(Verdict::Pass)
}

/// The refused statement's replacement, with the cycle set to swap the
/// server's answer for the fencing error.
fn refused(ctx: &Ctx, class: &Classification, unit: Unit, refusal: &Refusal) -> Verdict {
    let error = refusal_error(refusal);
    let mut s = ctx.lock();
    Verdict::Refused(refuse(s.open_cycle(), class, unit, error))
}
