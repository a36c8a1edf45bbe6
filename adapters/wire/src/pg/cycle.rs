//! Where the server is in answering the client: the cycle and strip state
//! machine of the proxy's session, with no I/O.
//!
//! # Cycles
//! Postgres answers each simple Query, each Sync (extended protocol) and
//! each fast-path FunctionCall with exactly one ReadyForQuery, in order.
//! The proxy opens a [`Cycle`] for every such unit before its bytes go to
//! the server ([`Cycles::open_with`]); each ReadyForQuery the server sends
//! closes the oldest one ([`Cycles::on_server`] reports it as [`Ended`]).
//! What a cycle carries besides the protocol's bookkeeping (the in-flight
//! guards of the writes it admitted, the settings it made) is the caller's
//! `C`, handed back when the server has answered the whole unit.
//!
//! # What the server's answers are swapped for
//! A refused statement is replaced by one that fails at the server; the
//! cycle remembers which error (the one naming a marker,
//! [`Cycle::swap_error`]) or which completion ([`Cycle::swap_complete`]) to
//! replace with the fencing error. Guard calls prepended to a Query shift
//! the server's error positions ([`Cycle::shift_positions`]).
//!
//! # Strips
//! Statements the proxy adds to the client's (the database guard's calls)
//! are answered by the server like any other; the client must not see
//! those answers. They are found by position: the cycle counts the
//! completions ([`is_completion`]) the client's own messages are owed
//! ([`Cycle::sent`]) and have been answered, and a [`Cycle::hide_simple`]
//! or [`Cycle::hide_extended`] made after `n` owed completions hides what
//! the server sends after the `n`th, up to the guard's own end. An
//! ErrorResponse is never hidden: it ends every strip of the cycle (the
//! server skips the rest of the unit), and if it is the guard's stale
//! refusal the strip's `S` comes back in [`Answer::guard_refused`].
//!
//! # Cycles of the proxy's own
//! A [`Cycles::insert_own`] cycle is one the proxy sends ahead of the
//! client's open one, inside a transaction block (its guard statement run
//! with Bind/Execute and its own Sync before a simple Query): the client
//! sees none of its answers, its ReadyForQuery included. An error in it is
//! hidden too, and carried: it takes the place of the next cycle's first
//! error (the client's statement, run after it in the failed block, fails
//! with `current transaction is aborted`), so the client sees the error
//! that stopped it, as if the added statement had been part of its own.
//! A [`Cycles::insert_own_unsynced`] cycle has no Sync: the server flushes
//! its answers with the client's, and it ends with its last hidden answer;
//! when it fails, the server skips the client's Query until the Sync the
//! caller then sends, whose ReadyForQuery ends the client's cycle with the
//! carried error shown just before it.

use std::collections::VecDeque;

use bytes::Bytes;

use super::frame::{self, BackendMsg, FrameRef};
use super::guard;

/// Server messages that end the answer to one extended-protocol message:
/// ParseComplete, BindComplete, CloseComplete, CommandComplete,
/// EmptyQueryResponse, PortalSuspended, RowDescription and NoData (the
/// last two end a Describe). Rows, notices and COPY data do not.
pub fn is_completion(tag: u8) -> bool {
    matches!(tag, b'1' | b'2' | b'3' | b'C' | b'I' | b's' | b'T' | b'n')
}

/// Client messages the server answers with exactly one completion:
/// Parse, Bind, Execute, Describe, Close.
pub fn owes_completion(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'E' | b'D' | b'C')
}

/// The completions of [`frame::run_named`]: Parse, Bind, Execute, two Close.
pub const RUN_NAMED_COMPLETIONS: u32 = 5;

/// One unit of work answered by one ReadyForQuery.
#[derive(Debug)]
pub struct Cycle<C, S> {
    /// Sync/Query/FunctionCall sent: the server will answer it.
    closed: bool,
    /// Completions the server owes for the client's messages sent so far.
    sent: u32,
    /// Completions of the client's messages seen from the server so far.
    seen: u32,
    /// Answers of added statements to hide, in the order they were sent.
    strips: VecDeque<Strip<S>>,
    /// Swap the server error whose message names the marker for this one.
    swap_error: Option<(String, Bytes)>,
    /// Swap the next CommandComplete for this.
    swap_complete: Option<Bytes>,
    error_seen: bool,
    rolled_back: bool,
    /// A COMMIT or PREPARE TRANSACTION completed.
    committed: bool,
    /// The proxy's own cycle ([`Cycles::insert_own`]): nothing of it
    /// reaches the client.
    own: bool,
    /// The proxy's own cycle sent without a Sync of its own
    /// ([`Cycles::insert_own_unsynced`]): it ends with its last hidden
    /// answer, or with its error, not with a ReadyForQuery.
    unsynced: bool,
    /// Characters prepended to this cycle's Query, which error positions
    /// in the client's text must not count.
    position_shift: u32,
    /// Texts inserted inside this cycle's Query: (characters of the
    /// client's text before it, its length in characters), in order.
    inserted: Vec<(u32, u32)>,
    /// The caller's part of the cycle.
    pub data: C,
}

/// Where the answers of one added statement are, and how they end.
#[derive(Debug)]
struct Strip<S> {
    /// Sent after the client's messages owing this many completions: its
    /// answers come right after theirs.
    after: u32,
    /// A statement inserted in the middle of a Query: this many of the
    /// client's own statements (each ending with a CommandComplete) are
    /// answered first.
    skip: u32,
    kind: StripKind,
    payload: S,
}

#[derive(Debug, Clone, Copy)]
enum StripKind {
    /// Prepended to a simple Query: its answers end with CommandComplete.
    Simple,
    /// Inside an extended batch: this many completions left.
    Extended(u32),
}

impl<C, S> Cycle<C, S> {
    fn new(closed: bool, data: C) -> Self {
        Cycle {
            closed,
            sent: 0,
            seen: 0,
            strips: VecDeque::new(),
            swap_error: None,
            swap_complete: None,
            error_seen: false,
            rolled_back: false,
            committed: false,
            own: false,
            unsynced: false,
            position_shift: 0,
            inserted: Vec::new(),
            data,
        }
    }

    /// A message that ends the unit (Query, Sync, FunctionCall) is sent:
    /// new messages open the next cycle.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// A client message with tag `tag` is sent; counts what it is owed.
    pub fn sent(&mut self, tag: u8) {
        if owes_completion(tag) {
            self.sent += 1;
        }
    }

    /// A statement prepended to this cycle's Query: hide its answers up to
    /// its CommandComplete.
    pub fn hide_simple(&mut self, payload: S) {
        self.hide(StripKind::Simple, payload);
    }

    /// A statement inserted in this cycle's Query after `skip` more of the
    /// client's statements than the previous added statement (or, for the
    /// first, the start of the Query): hide its answers up to its
    /// CommandComplete. Postgres answers each statement of a Query that
    /// succeeds with exactly one CommandComplete; an error skips the rest
    /// of the Query, and ends every strip.
    pub fn hide_simple_after(&mut self, skip: u32, payload: S) {
        self.hide(StripKind::Simple, payload);
        if let Some(s) = self.strips.back_mut() {
            s.skip = skip;
        }
    }

    /// A statement run inside this cycle's extended batch, owing
    /// `completions`, sent now: hide its answers.
    pub fn hide_extended(&mut self, completions: u32, payload: S) {
        self.hide(StripKind::Extended(completions), payload);
    }

    fn hide(&mut self, kind: StripKind, payload: S) {
        self.strips.push_back(Strip {
            after: self.sent,
            skip: 0,
            kind,
            payload,
        });
    }

    /// `n` characters were prepended to this cycle's Query text.
    pub fn shift_positions(&mut self, n: u32) {
        self.position_shift = n;
    }

    /// `n` characters were inserted in this cycle's Query text after the
    /// client's first `at` characters (calls in text order).
    pub fn shift_positions_after(&mut self, at: u32, n: u32) {
        self.inserted.push((at, n));
    }

    /// An error position counted by the server in the text it ran, as a
    /// position in the client's own text (1-based characters).
    fn client_position(&self, pos: u32) -> u32 {
        let mut shift = self.position_shift;
        for &(at, n) in &self.inserted {
            // The inserted text starts at character `at + shift + 1`.
            if pos > at + shift {
                shift += n;
            }
        }
        pos.saturating_sub(shift).max(1)
    }

    /// Swap the server's ErrorResponse whose message names `marker` for
    /// `error`.
    pub fn swap_error(&mut self, marker: String, error: Bytes) {
        self.swap_error = Some((marker, error));
    }

    /// Swap the server's next CommandComplete for `error`.
    pub fn swap_complete(&mut self, error: Bytes) {
        self.swap_complete = Some(error);
    }

    /// Nothing of the client's has been sent in this cycle yet, and
    /// nothing of the proxy's.
    pub fn is_fresh(&self) -> bool {
        !self.closed && self.sent == 0 && self.strips.is_empty()
    }
}

/// The cycles of one session, oldest first.
#[derive(Debug)]
pub struct Cycles<C, S> {
    queue: VecDeque<Cycle<C, S>>,
    /// Status of the last ReadyForQuery.
    status: u8,
    /// The error that ended the proxy's own cycle, for the next cycle's
    /// first error (see [`Cycles::insert_own`]).
    carried: Option<Bytes>,
    /// A Sync is owed to the server ([`Cycles::take_sync`]).
    sync: bool,
}

/// What [`Cycles::on_server`] made of one server message.
#[derive(Debug)]
pub struct Answer<C, S> {
    /// Send this to the client in the message's place (empty: hide it);
    /// `None`: relay the message as it is.
    pub replace: Option<Bytes>,
    /// The message is the database guard's stale-token refusal of the
    /// statement added with this payload.
    pub guard_refused: Option<GuardRefused<S>>,
    /// The message is a ReadyForQuery, or the last answer (or the error)
    /// of the proxy's own cycle sent without a Sync.
    pub ended: Option<Ended<C>>,
}

/// The guard refused: what it protected, and the mark it named.
#[derive(Debug)]
pub struct GuardRefused<S> {
    pub payload: S,
    pub current: Option<u64>,
}

/// A ReadyForQuery: the session's new status and the cycle it answered.
#[derive(Debug)]
pub struct Ended<C> {
    pub status: u8,
    /// `None` when no cycle was waiting (a server speaking out of turn).
    pub cycle: Option<C>,
    /// The cycle met an error or a ROLLBACK (of the block, or TO a
    /// savepoint): what it did does not last.
    pub failed: bool,
    /// A COMMIT (also `AND CHAIN`), ROLLBACK or PREPARE TRANSACTION
    /// completed in the cycle: a transaction open at its end is not (all
    /// of) the one that was open at its start.
    pub txn_ended: bool,
}

impl<C: Default, S> Default for Cycles<C, S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Default, S> Cycles<C, S> {
    /// A session after its startup packet: the server's first
    /// ReadyForQuery, which ends authentication, is owed.
    pub fn new() -> Self {
        Cycles {
            queue: VecDeque::from([Cycle::new(true, C::default())]),
            status: b'I',
            carried: None,
            sync: false,
        }
    }
}

impl<C, S> Cycles<C, S> {
    /// The cycle new client messages belong to, opened (with `new()` as its
    /// data) if the last one is closed.
    pub fn open_with(&mut self, new: impl FnOnce() -> C) -> &mut Cycle<C, S> {
        if self.queue.back().is_none_or(|c| c.closed) {
            // Room for one cycle at first, not the four a first push
            // makes: most sessions never have two in flight, and the
            // room is kept for the session's life (idle or not). A
            // pipelining client grows it as a Vec grows.
            if self.queue.capacity() == 0 {
                self.queue.reserve_exact(1);
            }
            self.queue.push_back(Cycle::new(false, new()));
        }
        let n = self.queue.len();
        &mut self.queue[n - 1]
    }

    /// A cycle of the proxy's own, closed (its Sync sent), put just before
    /// the open cycle, which must be the only one and [`Cycle::is_fresh`]:
    /// its messages go to the server first. The client sees none of its
    /// answers; an error in it replaces the next cycle's first error. For
    /// a statement the proxy runs in the client's transaction block ahead
    /// of the client's Query: the Sync does not end a block, so both run
    /// in it. `None` (nothing inserted) when the open cycle is not alone
    /// and fresh.
    pub fn insert_own(&mut self, data: C) -> Option<&mut Cycle<C, S>> {
        if self.queue.len() != 1 || !self.queue.front().is_some_and(Cycle::is_fresh) {
            return None;
        }
        let mut own = Cycle::new(true, data);
        own.own = true;
        self.queue.push_front(own);
        self.queue.front_mut()
    }

    /// [`Cycles::insert_own`] for a cycle sent without a Sync, just before
    /// the client's simple Query: the server flushes nothing of it until
    /// the Query's ReadyForQuery, so its answers come in the same read as
    /// the client's (one read and one wake-up fewer, and no Sync for the
    /// server to answer). It ends with its last hidden answer, reported
    /// as [`Ended`] with the last status. An error ends it too, reported
    /// as failed with status `E`; the server then skips the client's Query,
    /// so the caller must send a Sync ([`Cycles::take_sync`]), whose
    /// ReadyForQuery ends the client's cycle with the carried error shown
    /// before it, as the client's own error. The caller sends nothing
    /// more of the client's until the cycle has ended
    /// ([`Cycles::unsynced_in_flight`]): the server would skip that too.
    pub fn insert_own_unsynced(&mut self, data: C) -> Option<&mut Cycle<C, S>> {
        let own = self.insert_own(data)?;
        own.unsynced = true;
        Some(own)
    }

    /// A cycle of the proxy's own sent without a Sync has not ended yet.
    pub fn unsynced_in_flight(&self) -> bool {
        self.queue.iter().any(|c| c.unsynced)
    }

    /// Whether to send a Sync to the server now (asked once per batch of
    /// answers, after them): the proxy's own cycle sent without one
    /// failed, and the server skips everything up to a Sync, the client's
    /// Query after it included. The ReadyForQuery that answers it ends the
    /// client's cycle, with the carried error before it.
    pub fn take_sync(&mut self) -> bool {
        std::mem::take(&mut self.sync)
    }

    /// The data of every cycle not answered yet, oldest first.
    pub fn data(&self) -> impl Iterator<Item = &C> {
        self.queue.iter().map(|c| &c.data)
    }

    /// Closed cycles the server has not answered yet.
    pub fn awaiting(&self) -> bool {
        self.queue.iter().any(|c| c.closed)
    }

    /// Nothing sent and unanswered, nothing open.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The status of the last ReadyForQuery (`I`, `T` or `E`).
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The server is gone: nothing more will be answered.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.carried = None;
        self.sync = false;
    }

    /// [`Cycles::on_server`] for a message that changes nothing but the
    /// count of completions seen, without building an [`Answer`]: `true`
    /// when `tag` is such a message (not an error, a CommandComplete or a
    /// ReadyForQuery, with no added statement's answers to hide in the
    /// oldest cycle), counted and to be relayed as it is. Most of what the
    /// server sends (row descriptions, rows) is.
    pub fn count_only(&mut self, tag: u8) -> bool {
        if matches!(tag, b'E' | b'C' | b'Z') {
            return false;
        }
        match self.queue.front_mut() {
            Some(c) if !c.strips.is_empty() || c.own => false,
            Some(c) => {
                if is_completion(tag) {
                    c.seen += 1;
                }
                true
            }
            None => true,
        }
    }

    /// Bookkeeping for one server message. Inlined into the session's
    /// booking loop, its one caller, with `Shared::on_server`: out of
    /// line, the two cost about 80 instructions a statement more
    /// (callgrind, TPC-B-like `-M simple`, 6,207 against 6,128).
    #[inline(always)]
    pub fn on_server(&mut self, frame: FrameRef<'_>) -> Answer<C, S> {
        let mut answer = Answer {
            replace: None,
            guard_refused: None,
            ended: None,
        };
        if let Some(hidden) = self.strip(frame, &mut answer) {
            answer.replace = Some(hidden);
            if self
                .queue
                .front()
                .is_some_and(|c| c.unsynced && c.strips.is_empty())
            {
                // Its last hidden answer: over, with no ReadyForQuery.
                let status = self.status;
                answer.ended = self.end_unsynced(status, false);
            }
            return answer;
        }
        let Ok(msg) = frame.backend() else {
            // Not ours to judge: relay it and let the client complain.
            return answer;
        };
        match msg {
            BackendMsg::ErrorResponse(fields) => {
                let Some(cycle) = self.queue.front_mut() else {
                    return answer;
                };
                cycle.error_seen = true;
                let unsynced = cycle.unsynced;
                if cycle.own {
                    // Carried to the client's statement that follows (an
                    // error that ends the session is shown at once).
                    let ends_session = fields
                        .get(b'V')
                        .or_else(|| fields.get(b'S'))
                        .is_some_and(|v| v != b"ERROR".as_slice());
                    if !ends_session {
                        self.carried = Some(Bytes::copy_from_slice(frame.raw()));
                        answer.replace = Some(Bytes::new());
                        if unsynced {
                            // The server skips up to a Sync: the client's
                            // Query too. The block is aborted.
                            answer.ended = self.end_unsynced(b'E', true);
                            self.sync = true;
                        }
                    }
                    return answer;
                }
                if let Some(carried) = self.carried.take() {
                    answer.replace = Some(carried);
                    return answer;
                }
                let names_marker = |m: &str| {
                    fields
                        .get(b'M')
                        .is_some_and(|msg| msg.windows(m.len()).any(|w| w == m.as_bytes()))
                };
                answer.replace = match &cycle.swap_error {
                    Some((m, _)) if names_marker(m) => cycle.swap_error.take().map(|(_, e)| e),
                    // A position in the client's text, counted by the
                    // server over the statements prepended to it.
                    _ if cycle.position_shift > 0 || !cycle.inserted.is_empty() => {
                        frame::map_position(b'E', frame.body(), |p| cycle.client_position(p))
                    }
                    _ => None,
                };
            }
            BackendMsg::CommandComplete(tag) => {
                let Some(cycle) = self.queue.front_mut() else {
                    return answer;
                };
                // ROLLBACK TO SAVEPOINT's tag is ROLLBACK too; END's is
                // COMMIT, ABORT's ROLLBACK.
                match tag {
                    b"ROLLBACK" => cycle.rolled_back = true,
                    b"COMMIT" | b"PREPARE TRANSACTION" => cycle.committed = true,
                    _ => {}
                }
                answer.replace = cycle.swap_complete.take();
            }
            BackendMsg::ReadyForQuery(status) => {
                self.status = status;
                let cycle = self.queue.pop_front();
                let mut carried = false;
                if cycle.as_ref().is_some_and(|c| c.own) {
                    answer.replace = Some(Bytes::new());
                } else if let Some(error) = self.carried.take() {
                    answer.replace = Some(carried_before(&error, frame.raw()));
                    carried = true;
                }
                answer.ended = Some(Ended {
                    status,
                    failed: carried
                        || cycle
                            .as_ref()
                            .is_some_and(|c| c.error_seen || c.rolled_back),
                    txn_ended: cycle.as_ref().is_some_and(|c| c.rolled_back || c.committed),
                    cycle: cycle.map(|c| c.data),
                });
            }
            BackendMsg::Other => {}
        }
        answer
    }

    /// Ends the unsynced own cycle at the front, which has no ReadyForQuery
    /// of its own: what [`Ended`] reports for it.
    #[cold]
    #[inline(never)]
    fn end_unsynced(&mut self, status: u8, failed: bool) -> Option<Ended<C>> {
        let cycle = self.queue.pop_front()?;
        Some(Ended {
            status,
            cycle: Some(cycle.data),
            failed,
            txn_ended: false,
        })
    }

    /// Hides the answers of added statements: returns an empty replacement
    /// for a message that belongs to one, and counts the client's own
    /// completions otherwise.
    fn strip(&mut self, frame: FrameRef<'_>, answer: &mut Answer<C, S>) -> Option<Bytes> {
        let tag = frame.tag();
        // Asynchronous messages (notice, parameter status, notification)
        // may come at any time and belong to nobody.
        if matches!(tag, b'N' | b'S' | b'A' | b'Z') {
            return None;
        }
        let cycle = self.queue.front_mut()?;
        if tag == b'E' {
            let seen = cycle.seen;
            // The guard's own error only once the client's statements
            // before it have all been answered.
            if cycle
                .strips
                .front()
                .is_some_and(|s| seen >= s.after && s.skip == 0)
            {
                if let (Some(strip), Ok(BackendMsg::ErrorResponse(fields))) =
                    (cycle.strips.pop_front(), frame.backend())
                {
                    answer.guard_refused =
                        guard::stale_refusal(&fields).map(|current| GuardRefused {
                            payload: strip.payload,
                            current,
                        });
                }
            }
            cycle.strips.clear();
            return None;
        }
        let seen = cycle.seen;
        match cycle.strips.front_mut() {
            Some(strip) if seen >= strip.after && strip.skip > 0 => {
                // The client's own statements before an inserted one.
                if tag == b'C' {
                    strip.skip -= 1;
                }
                if is_completion(tag) {
                    cycle.seen += 1;
                }
                None
            }
            Some(strip) if seen >= strip.after => {
                let done = match &mut strip.kind {
                    StripKind::Simple => tag == b'C',
                    StripKind::Extended(left) => {
                        if is_completion(tag) {
                            *left = left.saturating_sub(1);
                        }
                        *left == 0
                    }
                };
                if done {
                    cycle.strips.pop_front();
                }
                Some(Bytes::new())
            }
            _ => {
                if is_completion(tag) {
                    cycle.seen += 1;
                }
                None
            }
        }
    }
}

/// The ReadyForQuery of the cycle after an unsynced own cycle that failed
/// (the server skipped its Query; this answers the proxy's Sync), with the
/// carried error before it: the client's error. After a synced own cycle
/// the client's statement fails, and its error took the carried one's
/// place. Out of line: [`Cycles::on_server`] is inlined into the
/// session's booking loop, which every statement runs.
#[cold]
#[inline(never)]
fn carried_before(error: &[u8], ready: &[u8]) -> Bytes {
    let mut both = Vec::with_capacity(error.len() + ready.len());
    both.extend_from_slice(error);
    both.extend_from_slice(ready);
    Bytes::from(both)
}

#[cfg(test)]
mod tests;
