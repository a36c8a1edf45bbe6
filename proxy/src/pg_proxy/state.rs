//! The state both loops of a session share, with no I/O: the cycles (the
//! protocol's position, [`wire::pg::cycle`]) with what the proxy files in
//! each, the open transaction's writes and settings, and the fencing
//! variables. The client loop files into it; [`Shared::on_server`] updates
//! it from one server message.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fencing::{InflightGuard, Presented, ResourceName, Slot};
use wire::pg::cycle::{self, Cycles, GuardRefused};
use wire::pg::frame::FrameRef;
use wire::pg::{ClientMsg, Frame};

use super::vars::{Resource, Setting, Token, Vars, View};

/// A write admitted in a transaction: its resource and verified number,
/// which the block's COMMIT decides again.
pub(super) type Write = (ResourceName, u64);

/// One unit of work answered by one ReadyForQuery.
/// A cycle's data is boxed: a cycle moves into the session's queue when
/// it opens, out of it when it is answered, and back into [`Shared`]'s
/// spare, and unboxed each move was a `memcpy` of the whole struct (boxed:
/// 7,120 → 6,698 instructions a statement, callgrind, TPC-B-like `-M
/// simple`). The
/// box itself is reused from cycle to cycle.
pub(super) type Cycle = cycle::Cycle<Box<CycleData>, Option<GuardCall>>;

/// What the proxy files in a cycle.
#[derive(Default)]
pub(super) struct CycleData {
    pub(super) started: Option<Instant>,
    /// Dropped when the server has answered the cycle: the writes are over.
    pub(super) guards: Vec<InflightGuard>,
    /// (resource, token) of the writes admitted in this cycle, so COMMIT
    /// can ask again whether they are still current.
    pub(super) writes: Vec<Write>,
    /// Changes to the fencing variables sent in this cycle.
    pub(super) settings: Vec<Setting>,
    /// Opened with nothing else awaiting an answer, the server inside a
    /// transaction block (its last ReadyForQuery said `T`): what runs
    /// first in this cycle runs in that block.
    pub(super) began_in_block: bool,
    /// A statement (Query or Execute) was sent in this cycle: a later one
    /// may run in another transaction or savepoint than the cycle began in.
    pub(super) executed: bool,
    /// (resource, token) of the database guard calls sent in this cycle.
    pub(super) guarded: Vec<Write>,
    /// The cycle parsed the prepared guard statement, at this epoch of
    /// [`GuardStatement`]: it is ready once the cycle succeeds.
    pub(super) prepares: Option<u32>,
}

/// Guard mode's prepared guard statement on the session's server
/// connection ([`wire::pg::guard::GuardFn::prepared`]): parsed once, then run with
/// Bind/Execute/Close in each guarded transaction of the extended
/// protocol, so the server does not parse and plan the guard call every
/// time.
///
/// Ready only once a cycle that parsed it succeeded. Anything that may
/// have dropped it (a client's `DEALLOCATE` or `DISCARD ALL`, a client's
/// Close of its name, a failed cycle that parsed it) makes it not ready,
/// and the next guard closes the name (not an error when it does not
/// exist) and parses it again: never a Bind of a statement that may be
/// gone, never a Parse of a name that may exist. A client that parses a
/// statement of its own under the name moves the guard to the next name
/// ([`GuardStatement::generation`]). If the server still answers that the
/// statement does not exist (a pooler between the proxy and Postgres that
/// changes server connections), the session goes back to one-shot guard
/// calls for good (`off`).
pub(super) struct GuardStatement {
    /// Numbers the name ([`wire::pg::guard::prepared_name`]).
    pub(super) generation: u32,
    /// The name of this generation, made on first use (an idle session,
    /// or one in proxy mode, keeps none).
    name: String,
    state: Prepared,
    /// Moves whenever the statement may have been dropped, so a cycle
    /// that parsed it before cannot make it ready after.
    epoch: u32,
    /// The server said the statement does not exist although the proxy
    /// had it ready: one-shot guard calls from now on.
    pub(super) off: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prepared {
    Absent,
    /// Parsed in a cycle not answered yet, at this epoch.
    Pending(u32),
    Ready,
}

impl GuardStatement {
    fn new() -> Self {
        GuardStatement {
            generation: 1,
            name: String::new(),
            state: Prepared::Absent,
            epoch: 0,
            off: false,
        }
    }

    /// The statement's (and its portal's) name.
    pub(super) fn name(&mut self) -> &str {
        if self.name.is_empty() {
            self.name = wire::pg::guard::prepared_name(self.generation);
        }
        &self.name
    }

    /// Whether a Bind of it finds it on the server.
    pub(super) fn ready(&self) -> bool {
        self.state == Prepared::Ready
    }

    /// It is being parsed in the open cycle: the epoch to confirm it at.
    pub(super) fn parsing(&mut self) -> u32 {
        self.state = Prepared::Pending(self.epoch);
        self.epoch
    }

    /// It may be gone from the server.
    pub(super) fn invalidate(&mut self) {
        self.state = Prepared::Absent;
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// The client uses the name for a statement of its own: the guard
    /// moves to the next name.
    pub(super) fn rename(&mut self) {
        self.invalidate();
        self.generation = self.generation.wrapping_add(1).max(1);
        self.name.clear();
    }

    /// A cycle that parsed it at `epoch` was answered.
    fn confirm(&mut self, epoch: u32, succeeded: bool) {
        if self.state == Prepared::Pending(epoch) {
            self.state = if succeeded {
                Prepared::Ready
            } else {
                Prepared::Absent
            };
        }
        if !succeeded {
            // Parsed or not, what the cycle left is unknown.
            self.invalidate();
        }
    }
}

/// One database guard call sent (guard mode): what it compared, for the
/// audit record when it refuses.
pub(super) struct GuardCall {
    pub(super) resource: ResourceName,
    pub(super) token: u64,
    pub(super) statement: Statement,
}

/// Where a statement's text is, for the audit's fingerprint; read only
/// when a write is refused, so admitted writes pay nothing for it (a
/// message's bytes are shared, not copied).
#[derive(Clone)]
pub(super) enum Statement {
    /// A simple Query message.
    Query(Frame),
    /// The text of an executed statement (shared, not copied: see
    /// [`wire::pg::Recent::classify_text`]).
    Text(Bytes),
    /// No text to show.
    Label(&'static str),
}

impl Statement {
    pub(super) fn fingerprint(&self) -> String {
        match self {
            Statement::Query(f) => match f.client() {
                Ok(ClientMsg::Query(t)) => wire::pg::fingerprint(t),
                _ => "(unreadable statement)".into(),
            },
            Statement::Text(t) => wire::pg::fingerprint(t),
            Statement::Label(l) => (*l).to_owned(),
        }
    }
}

/// What the session's last admitted write presented, the number it
/// verified to, and its resource's fence slot: a write presenting the same
/// is admitted with one CAS on the slot ([`Fencer::admit_held`]), without
/// verifying, looking up or allocating anything.
///
/// [`Fencer::admit_held`]: crate::fencer::Fencer::admit_held
pub(super) struct Steady {
    pub(super) resource: ResourceName,
    pub(super) token: Presented,
    pub(super) n: u64,
    pub(super) slot: Arc<Slot>,
}

/// State both loops see.
pub(super) struct Shared {
    pub(super) cycles: Cycles<Box<CycleData>, Option<GuardCall>>,
    /// Writes of the open transaction block, from cycles that ended with
    /// status `T`, which its COMMIT must decide again.
    txn_writes: Vec<Write>,
    /// Settings of the open transaction, from cycles that ended in it.
    txn_settings: Vec<Setting>,
    /// (resource, token) whose database guard the open transaction block
    /// holds, as the server has confirmed; see [`Shared::gate_held`].
    held: Vec<Write>,
    vars: Vars,
    /// A read-write transaction block is open as far as the statements
    /// sent so far say (for `strict` mode): set by BEGIN, cleared by
    /// COMMIT/ROLLBACK and by an idle ReadyForQuery with nothing pending.
    pub(super) in_block: bool,
    /// The fast path's inputs, from the last full decision that admitted.
    pub(super) steady: Option<Steady>,
    /// On a tier, the newest write the proxy alone fenced and armed the
    /// next write to the server with (see `Ctx::arm`): what the audit
    /// record names if the replica lease lapses before it is sent.
    pub(super) armed: Option<Statement>,
    /// An answered cycle's data, emptied, for the next cycle: its box and
    /// its vectors keep their capacity, so opening a cycle and filing a
    /// guard allocate nothing. `None` while a cycle has it (a pipelining
    /// client's further cycles get boxes of their own).
    spare: Option<Box<CycleData>>,
    /// Guard mode's prepared guard statement.
    pub(super) guard_statement: GuardStatement,
}

/// What one server message did to the session.
pub(super) struct Answered {
    /// Send this in the message's place (empty: hide it); `None`: relay.
    pub(super) replace: Option<Bytes>,
    /// The database guard refused a write the proxy had admitted.
    pub(super) guard_refused: Option<GuardRefused<GuardCall>>,
    /// A ReadyForQuery.
    pub(super) ready: bool,
    /// When the cycle it ended was opened.
    pub(super) started: Option<Instant>,
}

impl Shared {
    /// A session after its startup packet, with its startup variables.
    pub(super) fn new(vars: Vars) -> Self {
        Shared {
            cycles: Cycles::new(),
            txn_writes: Vec::new(),
            txn_settings: Vec::new(),
            held: Vec::new(),
            vars,
            in_block: false,
            steady: None,
            armed: None,
            spare: None,
            guard_statement: GuardStatement::new(),
        }
    }

    /// The newest write filed in an open cycle: what a batch armed for
    /// the last look carries (named when the replica lease lapsed before
    /// it was sent, or after).
    pub(super) fn armed_write(&self) -> Option<Write> {
        self.cycles
            .data()
            .filter_map(|c| c.writes.last().cloned())
            .last()
    }

    /// The cycle new client messages belong to, opened if needed.
    #[inline]
    pub(super) fn open_cycle(&mut self) -> &mut Cycle {
        let began_in_block = self.cycles.is_empty() && self.cycles.status() == b'T';
        let spare = &mut self.spare;
        self.cycles.open_with(|| {
            let mut data = spare.take().unwrap_or_default();
            data.started = Some(Instant::now());
            data.began_in_block = began_in_block;
            data.executed = false;
            data
        })
    }

    /// A cycle of the proxy's own before the open one ([`Cycles::insert_own`],
    /// or [`Cycles::insert_own_unsynced`] when `unsynced`), its data from
    /// the spare: inside the block the open cycle began in, no latency of
    /// its own (the client's statement is timed).
    pub(super) fn insert_own_cycle(&mut self, unsynced: bool) -> Option<&mut Cycle> {
        let mut data = self.spare.take().unwrap_or_default();
        data.started = None;
        data.began_in_block = true;
        data.executed = true;
        if unsynced {
            self.cycles.insert_own_unsynced(data)
        } else {
            self.cycles.insert_own(data)
        }
    }

    /// Whether the next statement, sent now in the open cycle, runs in a
    /// transaction that already holds the database guard of `write`, so a
    /// guard call for it would only find the gate held and return: the
    /// guard is taken before a transaction's first write, not before
    /// every one.
    ///
    /// True only when the server has confirmed it: the statement is the
    /// first of a cycle opened with nothing else in flight, the server
    /// inside a block (so it runs in the block the last ReadyForQuery
    /// reported), and a guard call for `write` succeeded in an earlier
    /// cycle of that block that began in it. [`Shared::on_server`] forgets
    /// every held guard when a cycle fails, rolls back (also `ROLLBACK
    /// TO`, which may release a gate taken in the savepoint; the guard is
    /// then taken again, and returns at once if the gate survived),
    /// commits (also `AND CHAIN`) or leaves the block. A pipelining client
    /// whose statements overtake the answers is guarded every time.
    pub(super) fn gate_held(&mut self, write: &Write) -> bool {
        let held = self.held.contains(write);
        let c = self.open_cycle();
        held && c.data.began_in_block && !c.data.executed
    }

    /// The variables as the next statement sees them when no setting is
    /// pending (none in the open transaction, none unanswered): the
    /// committed ones, borrowed. `None` when settings are pending
    /// ([`Shared::view`] replays them).
    pub(super) fn settled(&self) -> Option<(&Resource, &Token)> {
        let pending =
            !self.txn_settings.is_empty() || self.cycles.data().any(|c| !c.settings.is_empty());
        (!pending).then(|| self.vars.committed())
    }

    /// Every write of the transaction so far, answered or not.
    pub(super) fn txn_write_keys(&self) -> Vec<Write> {
        let mut keys: Vec<Write> = self.txn_writes.clone();
        for c in self.cycles.data() {
            keys.extend(c.writes.iter().cloned());
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Whether the transaction so far wrote, and wrote only under
    /// `(resource, n)`: [`Shared::txn_write_keys`] would be that one write.
    /// Allocates nothing (a COMMIT's fast path asks it).
    pub(super) fn txn_wrote_only(&self, resource: &ResourceName, n: u64) -> bool {
        let mut writes = self
            .txn_writes
            .iter()
            .chain(self.cycles.data().flat_map(|c| c.writes.iter()))
            .peekable();
        writes.peek().is_some() && writes.all(|(r, t)| r == resource && *t == n)
    }

    /// The variables as the next statement sees them: committed, then the
    /// open transaction's settings, then those not answered yet.
    pub(super) fn view(&self) -> View {
        self.vars.view(
            self.txn_settings
                .iter()
                .chain(self.cycles.data().flat_map(|c| c.settings.iter())),
        )
    }

    /// Nothing pending and no transaction open: a session that may be
    /// closed without cutting anything short.
    pub(super) fn idle(&self) -> bool {
        self.cycles.is_empty() && self.cycles.status() == b'I'
    }

    /// [`Shared::on_server`] for a message that only counts (see
    /// [`Cycles::count_only`]): `true` when it was one, and is relayed as
    /// it is with nothing else to do.
    pub(super) fn counted(&mut self, frame: FrameRef<'_>) -> bool {
        self.cycles.count_only(frame.tag())
    }

    /// Bookkeeping for one server message. A ReadyForQuery ends the oldest
    /// cycle: its guards drop (the server has finished its statements), and
    /// its settings and writes join the open transaction or end with it.
    #[inline(always)]
    pub(super) fn on_server(&mut self, frame: FrameRef<'_>) -> Answered {
        if frame.tag() == b'E' {
            self.prepared_guard_missing(frame);
        }
        let answer = self.cycles.on_server(frame);
        let mut answered = Answered {
            replace: answer.replace,
            // Only a guard call's refusal; the other statements the proxy
            // adds carry no call.
            guard_refused: answer.guard_refused.and_then(|r| {
                Some(GuardRefused {
                    payload: r.payload?,
                    current: r.current,
                })
            }),
            ready: answer.ended.is_some(),
            started: None,
        };
        let Some(ended) = answer.ended else {
            return answered;
        };
        let status = ended.status;
        if status == b'I' && self.cycles.is_empty() {
            self.in_block = false;
        }
        if let Some(mut c) = ended.cycle {
            answered.started = c.started;
            if let Some(epoch) = c.prepares.take() {
                self.guard_statement.confirm(epoch, !ended.failed);
            }
            if status == b'T' || status == b'E' {
                self.txn_settings.append(&mut c.settings);
            } else {
                let settings = std::mem::take(&mut self.txn_settings);
                // With nothing set, committing changes nothing (and would
                // copy both variables, reference counts and all, for
                // each statement).
                let set = !settings.is_empty() || !c.settings.is_empty();
                if !ended.failed && set {
                    self.vars.commit(settings.iter().chain(c.settings.iter()));
                }
            }
            if status == b'T' && !ended.failed && !ended.txn_ended {
                // Still the block the cycle began in (if it began in one):
                // its guards hold the gate until the block ends.
                if c.began_in_block && !c.guarded.is_empty() {
                    self.held.append(&mut c.guarded);
                    self.held.sort();
                    self.held.dedup();
                }
            } else {
                self.held.clear();
            }
            if status == b'T' {
                self.txn_writes.append(&mut c.writes);
            } else {
                // The block is over, or failed ('E'): nothing of it can
                // commit any more.
                self.txn_writes.clear();
            }
            // The cycle's writes are over: its guards drop here.
            c.guards.clear();
            c.guarded.clear();
            c.writes.clear();
            c.settings.clear();
            self.spare = Some(c);
        }
        answered
    }

    /// An ErrorResponse saying the prepared guard statement does not
    /// exist (SQLSTATE 26000 naming it): something between the proxy and
    /// Postgres dropped it unseen, so the session stops relying on it.
    fn prepared_guard_missing(&mut self, frame: FrameRef<'_>) {
        let g = &mut self.guard_statement;
        if g.off || g.name.is_empty() {
            return;
        }
        let Ok(wire::pg::frame::BackendMsg::ErrorResponse(fields)) = frame.backend() else {
            return;
        };
        if fields.get(b'C') != Some(b"26000") {
            return;
        }
        let quoted = format!("\"{}\"", g.name);
        let names_it = fields
            .get(b'M')
            .is_some_and(|m| m.windows(quoted.len()).any(|w| w == quoted.as_bytes()));
        if names_it {
            tracing::warn!(
                "the server lost fencepost's prepared guard statement {}; this session sends one-shot guard calls from now on",
                g.name
            );
            g.off = true;
            g.invalidate();
        }
    }
}
