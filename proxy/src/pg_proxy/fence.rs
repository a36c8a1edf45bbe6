//! A statement's decision: the fencing inputs it presents (its comment,
//! else the session's variables), the fencer's verdict on its write and on
//! a COMMIT's writes, and the guards filed in the open cycle.

use bytes::Bytes;
use fencing::{input, Protocol};
use wire::pg::classify::GuardPoint;
use wire::pg::{Classification, CommentFence};

use super::refusal::{refusal_error, refuse, Unit};
use super::session::{Ctx, NOT_ARMED};
use super::state::{Shared, Statement, Steady, Write};
use super::vars::{Setting, View};
use crate::fencer::{Decision, Refusal, WriteInfo};

/// What [`fence_now`] or [`fence_full`] made of a statement.
pub(super) enum Verdict {
    /// Nothing to decide (a read), or admitted in proxy mode: send it.
    Pass,
    /// Admitted in guard mode: send it with guard calls for these writes
    /// (resource and verified number), each just before the statement of
    /// the text with that index (0: in front of it), in that order.
    Admitted(Vec<(u32, Write)>),
    /// Refused: send these bytes instead.
    Refused(Bytes),
}

/// What [`fence_now`] leaves to [`fence_full`]: the statement's write as
/// the session's variables present it (its own SETs included), the
/// block's writes a COMMIT must find still current, and whether the
/// statement counts as a write only under `strict`.
pub(super) struct Full {
    view: Option<View>,
    commits: Vec<Write>,
    strict_write: bool,
}

/// A statement's fencing, the part that never waits, run once per
/// statement: files the statement's SETs and its block state, and decides
/// a read, a steady write and a steady COMMIT ([`steady`],
/// [`steady_commit`]), which is almost every statement of a leader.
/// `Err`: the decision needs the fencer in full ([`fence_full`], which may
/// wait: a newer token's drain, a store write), with what this part
/// gathered. Apart so that the epoll engine builds no future for the
/// statements decided here.
///
/// `alone`: the statement is fenced by the proxy alone in guard mode too
/// (a fast-path call, which no guard call can accompany): no guard is
/// planned or filed for it, and its admission is looked at again before
/// it is sent, as in proxy mode ([`Ctx::arm`]).
pub(super) fn fence_now(
    ctx: &Ctx,
    class: &Classification,
    statement: &Statement,
    alone: bool,
) -> Result<Verdict, Box<Full>> {
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
        if let Some(verdict) = steady(ctx, &mut s, class, statement, alone) {
            return Ok(verdict);
        }
    }
    if class.commits && !write {
        if let Some(verdict) = steady_commit(ctx, &mut s, statement) {
            return Ok(verdict);
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
    if view.is_none() && commits.is_empty() {
        return Ok(Verdict::Pass);
    }
    // Boxed: the slow path's, and as large as the variables' view.
    Err(Box::new(Full {
        view,
        commits,
        strict_write,
    }))
}

/// The rest of a statement's fencing: the fencer's full decision (which
/// may wait) on what [`fence_now`] gathered, and the guards and writes
/// filed in the open cycle.
pub(super) async fn fence_full(
    ctx: &Ctx,
    class: &Classification,
    statement: &Statement,
    unit: Unit,
    alone: bool,
    full: Box<Full>,
) -> Verdict {
    let Full {
        view,
        commits,
        strict_write,
    } = *full;
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
    // The earliest admission's instant, for the look before sending.
    let mut leased_at = NOT_ARMED;
    let mut steady_now = None;
    // The statement's own write, which each later segment of a
    // multi-statement text guards again; and whether the block's COMMIT
    // needs it decided too.
    let mut own_write: Option<Write> = None;
    let mut own_commits = false;
    if let Some(presented) = &own {
        // Boxed: a full decision is the slow path (the fast one is
        // `steady`), and its future (store and tier I/O) would otherwise
        // size every session's task, idle or not.
        match Box::pin(
            proxy
                .fencer
                .decide(&proxy.checker, &proxy.counters, presented, &info),
        )
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
                own_write = Some((a.resource.to_name(), a.token));
                leased_at = leased_at.min(a.leased_at);
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
            own_commits = true;
            continue;
        }
        match Box::pin(proxy.fencer.decide_again(
            &proxy.counters,
            resource.as_ref_name(),
            token,
            &info,
        ))
        .await
        {
            Decision::Admit(a) => {
                leased_at = leased_at.min(a.leased_at);
                admitted.push((a.guard, resource, token));
            }
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
    let mut plan: Vec<(u32, Write)> = Vec::new();
    let mut s = ctx.lock();
    // `alone`: no guard call goes with it, so none may be filed (a guard
    // filed as sent would make the block's next write skip its own).
    if proxy.guard && !class.outside_block && !alone {
        guarded.extend(admitted.iter().map(|(_, r, t)| (r.clone(), *t)));
        guarded.sort();
        guarded.dedup();
        guarded.retain(|w| !s.gate_held(w));
        plan = placed(class, strict_write, guarded.clone(), own_write, own_commits);
        guarded.retain(|w| plan.iter().any(|(_, p)| p == w));
    }
    if steady_now.is_some() {
        s.steady = steady_now;
    }
    // Guard mode's database guard checks the write in its own
    // transaction; a write the proxy fences alone gets the proxy's last
    // look before it is sent.
    if leased_at != NOT_ARMED && (!proxy.guard || class.outside_block || alone) {
        ctx.arm(&mut s, leased_at, statement);
    }
    let cycle = s.open_cycle();
    cycle.data.guarded.extend(guarded.iter().cloned());
    for (guard, resource, token) in admitted {
        cycle.data.guards.push(guard);
        cycle.data.writes.push((resource, token));
    }
    if plan.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Admitted(plan)
    }
}

/// Where in the text each guard call goes (see
/// [`wire::pg::classify::GuardPoint`]). `lead`: the guards the
/// transaction the text begins in still needs (the block's COMMIT's
/// writes, and the text's own write unless that transaction holds its
/// gate already); they go before the first segment's first data
/// statement, or in front of the text. Each later segment that writes
/// (in `strict` mode: that has any data statement, when the text counts as
/// a write) runs in a transaction of its own, or after a `ROLLBACK TO`:
/// the text's own write is guarded there again, whatever was held before.
fn placed(
    class: &Classification,
    strict_write: bool,
    lead: Vec<Write>,
    own: Option<Write>,
    own_commits: bool,
) -> Vec<(u32, Write)> {
    let points = &class.guard_points;
    if points.is_empty() {
        return lead.into_iter().map(|w| (0, w)).collect();
    }
    let guards = |p: &GuardPoint| p.write || strict_write;
    let first = points.first().filter(|p| p.first);
    let lead_at = first.map_or(0, |p| p.stmt);
    let own_in_first = first.is_some_and(guards);
    let mut plan: Vec<(u32, Write)> = lead
        .into_iter()
        .filter(|w| own_in_first || own_commits || own.as_ref() != Some(w))
        .map(|w| (lead_at, w))
        .collect();
    if let Some(own) = own {
        plan.extend(
            points
                .iter()
                .filter(|p| !p.first && guards(p))
                .map(|p| (p.stmt, own.clone())),
        );
    }
    plan
}

/// The fast path: a write that presents what the session's last admitted
/// write presented (the committed variables, no setting pending, no
/// comment) is admitted on the slot the session holds, with one CAS and no
/// allocation. `None`: decide in full.
///
/// In guard mode the statement runs in a transaction that holds the
/// database gate for this very write ([`Shared::gate_held`]), or it is
/// one the proxy fences alone; or it is the write that takes the gate,
/// admitted the same way with its guard call planned
/// ([`steady_guarded`]). In TPC-B-like transactions the first kind alone
/// put three writes of four on the fast path (callgrind, one pgbench
/// client, `-M simple`: the proxy's instructions per transaction in guard
/// mode fell from 137,700 to 127,700, proxy mode's being 117,800).
fn steady(
    ctx: &Ctx,
    s: &mut Shared,
    class: &Classification,
    statement: &Statement,
    alone: bool,
) -> Option<Verdict> {
    let proxy = &ctx.proxy;
    if class.comment != CommentFence::default() {
        return None;
    }
    let (Ok(resource), Ok(token)) = s.settled()? else {
        return None;
    };
    let held = s.steady.as_ref()?;
    if held.resource != *resource || held.token != *token {
        return None;
    }
    let write: Write = (held.resource.clone(), held.n);
    let db_guarded = proxy.guard && !class.outside_block && !alone;
    if db_guarded && !s.gate_held(&write) {
        return steady_guarded(ctx, s, class, statement, write);
    }
    // Proxy mode, or a statement guard mode cannot guard: the proxy
    // alone, with its last look before the statement is sent.
    admit_steady(ctx, s, statement, !db_guarded)
}

/// Guard mode, the steady write whose transaction does not hold the
/// database gate yet (a leader's every transaction's first write): admitted
/// on the slot the session holds, as [`steady`] admits the rest, with one
/// guard call in front of the statement. What [`fence_full`] plans
/// for it, without the decision's future, the list of the block's writes
/// and the resource's name made three times: that path cost 6,900
/// instructions a TPC-B-like transaction more than proxy mode's steady one
/// (callgrind, one pgbench client, `-M prepared`). `None` for a text of
/// several statements (its guards go where [`placed`] puts them) and
/// whenever [`admit_steady`] would give up.
fn steady_guarded(
    ctx: &Ctx,
    s: &mut Shared,
    class: &Classification,
    statement: &Statement,
    write: Write,
) -> Option<Verdict> {
    if !class.guard_points.is_empty() {
        return None;
    }
    // The database guard checks the write in its own transaction: no
    // last look by the proxy (the full path arms none here either).
    admit_steady(ctx, s, statement, false)?;
    s.open_cycle().data.guarded.push(write.clone());
    Some(Verdict::Admitted(vec![(0, write)]))
}

/// The fast path of a COMMIT: the block wrote under one write only, the
/// session's steady one, so the COMMIT is admitted again on the slot the
/// session holds, as [`steady`] admits a write: one CAS, no list of the
/// block's writes and no decision future boxed for
/// [`Fencer::decide_again`], whose own steady state is the same CAS after
/// a look-up of the slot. In guard mode only while the block holds the
/// database gate for that write (no guard call is due). `None`: decide in
/// full (writes under more than one token or resource; guard mode without
/// the gate; the mark moved, a drain is on, or this replica cannot confirm
/// its lease).
///
/// [`Fencer::decide_again`]: crate::fencer::Fencer::decide_again
fn steady_commit(ctx: &Ctx, s: &mut Shared, statement: &Statement) -> Option<Verdict> {
    let held = s.steady.as_ref()?;
    if !s.txn_wrote_only(&held.resource, held.n) {
        return None;
    }
    // Guard mode: the block must hold the database gate for its one write;
    // the full path would then plan no guard call either, and arms no last
    // look.
    let guard = ctx.proxy.guard;
    if guard {
        let write: Write = (held.resource.clone(), held.n);
        if !s.gate_held(&write) {
            return None;
        }
    }
    admit_steady(ctx, s, statement, !guard)
}

/// Admits the session's steady write again on the slot it holds (one
/// CAS), with the proxy's last look armed when `arm`, and files the guard
/// and the write in the open cycle. `None` when the CAS does not apply.
fn admit_steady(ctx: &Ctx, s: &mut Shared, statement: &Statement, arm: bool) -> Option<Verdict> {
    let proxy = &ctx.proxy;
    let held = s.steady.as_ref()?;
    let write: Write = (held.resource.clone(), held.n);
    let admission = proxy.fencer.admit_held(
        &proxy.counters,
        &held.slot,
        held.resource.as_ref_name(),
        held.n,
    )?;
    let (guard, leased_at) = (admission.guard, admission.leased_at);
    if arm {
        ctx.arm(s, leased_at, statement);
    }
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
