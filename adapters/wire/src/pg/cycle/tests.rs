//! The state machine fed message sequences, as a session sends and
//! receives them: what the client sees of the server's answers, which
//! cycle each ReadyForQuery ends, and what the guard's refusal reports.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;
use crate::pg::frame::{error_response, split_frame, Frame};

/// Cycle data: a name; strip payload: the guarded statement's name.
type Session = Cycles<&'static str, &'static str>;

fn from_raw(raw: &Bytes) -> Frame {
    let mut b = BytesMut::from(&raw[..]);
    split_frame(&mut b, 1 << 20).unwrap().unwrap()
}

fn complete(tag: &str) -> Frame {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    Frame::new(b'C', &body)
}

fn ready(status: u8) -> Frame {
    Frame::new(b'Z', &[status])
}

fn error(code: &str, message: &str) -> Frame {
    from_raw(&error_response("ERROR", code, message))
}

/// Server messages by tag, with plausible bodies: `C` completes an
/// INSERT, `Z` is idle, `E` is a server error of the client's statement.
fn msgs(tags: &str) -> Vec<Frame> {
    tags.bytes()
        .filter(|t| !t.is_ascii_whitespace())
        .map(|t| match t {
            b'C' => complete("INSERT 0 1"),
            b'Z' => ready(b'I'),
            b'E' => error("23505", "duplicate key value violates unique constraint"),
            b'T' => Frame::new(b'T', &[0, 0]),
            other => Frame::new(other, &[]),
        })
        .collect()
}

/// The tags the client receives for `frames` (a replaced message shows as
/// its replacement's tag followed by `!`), and the answers.
fn feed(s: &mut Session, frames: Vec<Frame>) -> (String, Vec<Answer<&'static str, &'static str>>) {
    let mut seen = String::new();
    let mut answers = Vec::new();
    for f in frames {
        // As the session does: most messages only count.
        let a = if s.count_only(f.tag()) {
            Answer {
                replace: None,
                guard_refused: None,
                ended: None,
            }
        } else {
            s.on_server(f.borrowed())
        };
        match &a.replace {
            None => seen.push(f.tag() as char),
            Some(b) if b.is_empty() => {}
            Some(b) => {
                seen.push(b[0] as char);
                seen.push('!');
            }
        }
        answers.push(a);
    }
    (seen, answers)
}

/// The guard refusals reported: (payload, the mark the error named).
fn refused(answers: &[Answer<&'static str, &'static str>]) -> Vec<(&'static str, Option<u64>)> {
    answers
        .iter()
        .filter_map(|a| a.guard_refused.as_ref())
        .map(|g| (g.payload, g.current))
        .collect()
}

fn ended(answers: &[Answer<&'static str, &'static str>]) -> Vec<(u8, Option<&'static str>, bool)> {
    answers
        .iter()
        .filter_map(|a| a.ended.as_ref())
        .map(|e| (e.status, e.cycle, e.failed))
        .collect()
}

/// A session past authentication.
fn session() -> Session {
    let mut s = Session::new();
    assert!(s.awaiting(), "the first ReadyForQuery is owed");
    let (seen, answers) = feed(&mut s, msgs("R S S K Z"));
    assert_eq!(seen, "RSSKZ");
    assert_eq!(ended(&answers), [(b'I', Some(""), false)]);
    assert!(s.is_empty() && !s.awaiting());
    s
}

/// Sends `tags` as client messages in the open cycle (`S` or `Q` closes it).
fn send(s: &mut Session, name: &'static str, tags: &str) {
    for t in tags.bytes().filter(|t| !t.is_ascii_whitespace()) {
        let c = s.open_with(|| name);
        c.sent(t);
        if matches!(t, b'S' | b'Q' | b'F') {
            c.close();
        }
    }
}

#[test]
fn a_guard_prepended_to_a_query_is_hidden_up_to_its_completion() {
    let mut s = session();
    let c = s.open_with(|| "insert");
    c.hide_simple("insert");
    c.close();
    // The guard's SELECT: RowDescription, DataRow, CommandComplete; then
    // the client's INSERT.
    let (seen, answers) = feed(&mut s, msgs("T D C  C Z"));
    assert_eq!(seen, "CZ");
    assert_eq!(ended(&answers), [(b'I', Some("insert"), false)]);
}

#[test]
fn two_guards_before_a_multi_statement_query() {
    let mut s = session();
    let c = s.open_with(|| "two");
    c.hide_simple("a");
    c.hide_simple("b");
    c.close();
    let (seen, _) = feed(&mut s, msgs("TDC TDC  C C Z"));
    assert_eq!(seen, "CCZ");
}

#[test]
fn asynchronous_messages_pass_in_the_middle_of_a_guard_answer() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple("q");
    c.close();
    // A notice, a parameter status and a notification inside the guard's
    // answer belong to nobody: the client sees them, the strip goes on.
    let (seen, _) = feed(&mut s, msgs("T N D S A C  C Z"));
    assert_eq!(seen, "NSACZ");
}

#[test]
fn extended_protocol_with_describe_and_execute() {
    let mut s = session();
    // Parse, Bind, Describe portal; the guard goes just before Execute.
    send(&mut s, "batch", "P B D");
    s.open_with(|| "batch")
        .hide_extended(RUN_NAMED_COMPLETIONS, "batch");
    send(&mut s, "batch", "E S");
    // The client's 1 2 T; the guard's 1 2 D C 3 3; the client's D C; Z.
    let (seen, answers) = feed(&mut s, msgs("1 2 T  1 2 D C 3 3  D C Z"));
    assert_eq!(seen, "12TDCZ");
    assert_eq!(ended(&answers), [(b'I', Some("batch"), false)]);
}

#[test]
fn describe_of_a_statement_owes_one_completion_after_its_parameters() {
    let mut s = session();
    // Describe statement: ParameterDescription (not a completion), then
    // NoData.
    send(&mut s, "d", "P D B");
    s.open_with(|| "d")
        .hide_extended(RUN_NAMED_COMPLETIONS, "d");
    send(&mut s, "d", "E S");
    let (seen, _) = feed(&mut s, msgs("1 t n 2  1 2 D C 3 3  C Z"));
    assert_eq!(seen, "1tn2CZ");
}

#[test]
fn the_guards_stale_refusal_is_shown_and_reported() {
    let mut s = session();
    send(&mut s, "w", "P B");
    s.open_with(|| "w")
        .hide_extended(RUN_NAMED_COMPLETIONS, "w");
    send(&mut s, "w", "E S");
    let stale = error(
        "ZF001",
        "stale fencing token for resource r: presented 5, current 9 (refused by the database guard)",
    );
    let mut frames = msgs("1 2");
    frames.push(stale);
    frames.push(ready(b'I'));
    let (seen, answers) = feed(&mut s, frames);
    // The guard's ErrorResponse is the client's answer; the server skips
    // the rest up to Sync.
    assert_eq!(seen, "12EZ");
    let refused = refused(&answers);
    assert_eq!(refused, [("w", Some(9))]);
    assert_eq!(ended(&answers), [(b'I', Some("w"), true)]);
}

#[test]
fn another_error_of_the_guard_is_not_a_refusal() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple("q");
    c.close();
    let mut frames = vec![error("3F000", "schema \"fencepost\" does not exist")];
    frames.push(ready(b'I'));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "EZ");
    assert!(answers.iter().all(|a| a.guard_refused.is_none()));
}

#[test]
fn an_error_mid_batch_before_the_guard_ends_its_strip() {
    let mut s = session();
    send(&mut s, "bad", "P B");
    s.open_with(|| "bad")
        .hide_extended(RUN_NAMED_COMPLETIONS, "bad");
    send(&mut s, "bad", "E S");
    // Bind fails: the server discards the guard and the Execute, up to
    // Sync. The error is the client's own, not the guard's.
    let mut frames = msgs("1");
    frames.push(error("ZF001", "a client's own error with the guard's code"));
    frames.push(ready(b'I'));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "1EZ");
    assert!(answers.iter().all(|a| a.guard_refused.is_none()));
    assert_eq!(ended(&answers), [(b'I', Some("bad"), true)]);
}

#[test]
fn an_error_after_the_guard_is_the_clients() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple("q");
    c.close();
    let (seen, answers) = feed(&mut s, msgs("T D C  E Z"));
    assert_eq!(seen, "EZ");
    assert!(answers.iter().all(|a| a.guard_refused.is_none()));
    assert_eq!(ended(&answers), [(b'I', Some("q"), true)]);
}

#[test]
fn pipelined_syncs_end_their_own_cycles_in_order() {
    let mut s = session();
    send(&mut s, "one", "P B E S");
    send(&mut s, "two", "P B");
    s.open_with(|| "two")
        .hide_extended(RUN_NAMED_COMPLETIONS, "two");
    send(&mut s, "two", "E S");
    send(&mut s, "three", "Q");
    assert!(s.awaiting());
    assert_eq!(
        s.data().copied().collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    let mut frames = msgs("1 2 C");
    frames.push(ready(b'T'));
    frames.extend(msgs("1 2  1 2 D C 3 3  C"));
    frames.push(ready(b'T'));
    frames.extend(msgs("C Z"));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "12CZ12CZCZ");
    assert_eq!(
        ended(&answers),
        [
            (b'T', Some("one"), false),
            (b'T', Some("two"), false),
            (b'I', Some("three"), false)
        ]
    );
    assert!(s.is_empty());
    assert_eq!(s.status(), b'I');
}

#[test]
fn an_error_in_one_pipelined_cycle_leaves_the_next_ones_strips() {
    let mut s = session();
    send(&mut s, "one", "P B E S");
    send(&mut s, "two", "P B");
    s.open_with(|| "two")
        .hide_extended(RUN_NAMED_COMPLETIONS, "two");
    send(&mut s, "two", "E S");
    let (seen, answers) = feed(&mut s, msgs("1 E Z  1 2  1 2 D C 3 3  C Z"));
    assert_eq!(seen, "1EZ12CZ");
    assert_eq!(
        ended(&answers),
        [(b'I', Some("one"), true), (b'I', Some("two"), false)]
    );
}

#[test]
fn copy_from_stdin_after_a_guard() {
    let mut s = session();
    let c = s.open_with(|| "copy");
    c.hide_simple("copy");
    c.close();
    // The client's CopyData and CopyDone owe nothing.
    send(&mut s, "copy", "d d c");
    // Guard; CopyInResponse; the COPY's CommandComplete.
    let mut frames = msgs("T D C  G");
    frames.push(complete("COPY 2"));
    frames.push(ready(b'I'));
    let (seen, _) = feed(&mut s, frames);
    assert_eq!(seen, "GCZ");
}

#[test]
fn copy_to_stdout_in_an_extended_batch() {
    let mut s = session();
    send(&mut s, "out", "P B");
    s.open_with(|| "out")
        .hide_extended(RUN_NAMED_COMPLETIONS, "out");
    send(&mut s, "out", "E S");
    // CopyOutResponse, CopyData and CopyDone are no completions.
    let (seen, _) = feed(&mut s, msgs("1 2  1 2 D C 3 3  H d d c C Z"));
    assert_eq!(seen, "12HddcCZ");
}

#[test]
fn a_refusal_mid_pipeline_swaps_only_the_error_naming_its_marker() {
    let mut s = session();
    send(&mut s, "before", "Q");
    let fencing = error_response("ERROR", "ZF001", "stale fencing token");
    let c = s.open_with(|| "refused");
    c.swap_error("fencepost-refusal-1-7".into(), fencing.clone());
    c.close();
    send(&mut s, "after", "P B E S");
    let mut frames = msgs("C Z");
    frames.push(error(
        "34000",
        "cursor \"fencepost-refusal-1-7\" does not exist",
    ));
    frames.push(ready(b'I'));
    frames.extend(msgs("1 2 C Z"));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "CZE!Z12CZ");
    assert_eq!(answers[2].replace.as_ref(), Some(&fencing));
    assert_eq!(
        ended(&answers),
        [
            (b'I', Some("before"), false),
            (b'I', Some("refused"), true),
            (b'I', Some("after"), false)
        ]
    );
}

#[test]
fn an_earlier_error_passes_unchanged_and_the_marker_is_never_reached() {
    let mut s = session();
    // Inside a failed block the server answers the marker's FETCH with
    // "current transaction is aborted": the client sees the server's own.
    let c = s.open_with(|| "refused");
    c.swap_error("fencepost-refusal-1-8".into(), Bytes::from_static(b"x"));
    c.close();
    let mut frames = vec![error(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )];
    frames.push(ready(b'E'));
    let (seen, _) = feed(&mut s, frames);
    assert_eq!(seen, "EZ");
}

#[test]
fn a_refused_execute_in_an_extended_batch() {
    let mut s = session();
    send(&mut s, "x", "P B");
    let fencing = error_response("ERROR", "ZF002", "this write carries no fencing token");
    let c = s.open_with(|| "x");
    c.swap_error("fencepost-refusal-1-9".into(), fencing);
    send(&mut s, "x", "E S");
    let mut frames = msgs("1 2");
    frames.push(error(
        "34000",
        "portal \"fencepost-refusal-1-9\" does not exist",
    ));
    frames.push(ready(b'I'));
    let (seen, _) = feed(&mut s, frames);
    assert_eq!(seen, "12E!Z");
}

#[test]
fn a_refused_commit_answers_its_rollback_with_the_error() {
    let mut s = session();
    let fencing = error_response("ERROR", "ZF001", "stale");
    let c = s.open_with(|| "commit");
    c.swap_complete(fencing);
    c.close();
    let frames = vec![complete("ROLLBACK"), ready(b'I')];
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "E!Z");
    // Rolled back: what the block set does not last.
    assert_eq!(ended(&answers), [(b'I', Some("commit"), true)]);
}

#[test]
fn error_positions_skip_the_prepended_guard() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple("q");
    c.shift_positions(60);
    c.close();
    let mut body = BytesMut::new();
    for (f, v) in [
        (b'S', "ERROR"),
        (b'C', "42601"),
        (b'M', "syntax"),
        (b'P', "75"),
    ] {
        body.put_u8(f);
        body.extend_from_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut frames = msgs("T D C");
    frames.push(Frame::new(b'E', &body));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "E!");
    let moved = from_raw(answers[3].replace.as_ref().unwrap());
    let Ok(BackendMsg::ErrorResponse(fields)) = moved.backend() else {
        panic!("not an error");
    };
    assert_eq!(fields.get(b'P'), Some(&b"15"[..]));
}

#[test]
fn a_server_speaking_out_of_turn_ends_no_cycle() {
    let mut s = session();
    let (seen, answers) = feed(&mut s, msgs("C E Z"));
    assert_eq!(seen, "CEZ");
    assert_eq!(ended(&answers), [(b'I', None, false)]);
}

#[test]
fn the_server_gone_leaves_nothing_awaited() {
    let mut s = session();
    send(&mut s, "q", "Q");
    assert!(s.awaiting());
    s.clear();
    assert!(!s.awaiting() && s.is_empty());
}

#[test]
fn a_cycle_that_ends_or_rolls_back_a_transaction_says_so() {
    let mut s = session();
    for (tag, status, txn_ended, failed) in [
        ("INSERT 0 1", b'T', false, false),
        ("SAVEPOINT", b'T', false, false),
        ("RELEASE", b'T', false, false),
        // COMMIT AND CHAIN: a new transaction, status still T.
        ("COMMIT", b'T', true, false),
        // ROLLBACK TO SAVEPOINT's tag.
        ("ROLLBACK", b'T', true, true),
        ("PREPARE TRANSACTION", b'I', true, false),
    ] {
        send(&mut s, "q", "Q");
        let (_, answers) = feed(&mut s, vec![complete(tag), ready(status)]);
        let e = answers
            .iter()
            .find_map(|a| a.ended.as_ref())
            .expect("the cycle ends");
        assert_eq!((e.txn_ended, e.failed), (txn_ended, failed), "{tag}");
    }
}

#[test]
fn guards_inside_a_query_are_hidden_after_the_clients_statements_before_them() {
    let mut s = session();
    let c = s.open_with(|| "q");
    // `INSERT; SELECT ...; COMMIT; <guard>; INSERT; ROLLBACK TO s; <guard>
    // <guard>; INSERT`: a prepended guard, then guards after three client
    // statements, and after two more (two calls at one place).
    c.hide_simple("front");
    c.hide_simple_after(3, "a");
    c.hide_simple_after(2, "b");
    c.hide_simple_after(0, "c");
    c.close();
    // Guard, INSERT, SELECT (rows), COMMIT, guard, INSERT, ROLLBACK, two
    // guards, INSERT. The client's SELECT's RowDescription counts as no
    // statement: only CommandCompletes do.
    let (seen, answers) = feed(&mut s, msgs("TDC C TDDC C TDC C C TDC TDC C Z"));
    assert_eq!(seen, "CTDDCCCCCZ");
    assert_eq!(ended(&answers), [(b'I', Some("q"), false)]);
}

#[test]
fn an_error_before_an_inserted_guard_ends_its_strip() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple_after(2, "late");
    c.close();
    // The first statement fails: Postgres skips the rest, the guard too.
    let (seen, answers) = feed(&mut s, msgs("E Z"));
    assert_eq!(seen, "EZ");
    assert!(answers.iter().all(|a| a.guard_refused.is_none()));
    // The next cycle has no strip left over.
    let c = s.open_with(|| "next");
    c.close();
    let (seen, _) = feed(&mut s, msgs("TDC Z"));
    assert_eq!(seen, "TDCZ");
}

#[test]
fn an_inserted_guards_stale_refusal_is_reported() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple_after(1, "late");
    c.close();
    let mut frames = msgs("C");
    frames.push(error(
        "ZF001",
        "stale fencing token for resource r: presented 3, current 4 (refused by the database guard)",
    ));
    frames.extend(msgs("Z"));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "CEZ");
    let refused = answers[1]
        .guard_refused
        .as_ref()
        .expect("the guard's refusal");
    assert_eq!((refused.payload, refused.current), ("late", Some(4)));
}

#[test]
fn error_positions_skip_every_inserted_guard_before_them() {
    let position = |inserted: &[(u32, u32)], prefix: u32, pos: u32| {
        let mut s = session();
        let c = s.open_with(|| "q");
        if prefix > 0 {
            c.shift_positions(prefix);
        }
        for &(at, n) in inserted {
            c.shift_positions_after(at, n);
        }
        c.close();
        let mut body = BytesMut::new();
        for (f, v) in [
            (b'S', "ERROR"),
            (b'C', "42703"),
            (b'P', &pos.to_string()[..]),
        ] {
            body.put_u8(f);
            body.extend_from_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let (_, answers) = feed(&mut s, vec![Frame::new(b'E', &body)]);
        let moved = from_raw(answers[0].replace.as_ref().unwrap());
        let Ok(BackendMsg::ErrorResponse(fields)) = moved.backend() else {
            panic!("not an error");
        };
        std::str::from_utf8(fields.get(b'P').unwrap())
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    // Client text of 30 characters; 10 inserted after its first 8, 20
    // after its first 20; 5 prepended.
    let ins = [(8, 10), (20, 20)];
    // Client character 3 (1-based): before both.
    assert_eq!(position(&ins, 5, 5 + 3), 3);
    // Client character 8: the last one before the first insertion.
    assert_eq!(position(&ins, 5, 5 + 8), 8);
    // Client character 9: after the first insertion.
    assert_eq!(position(&ins, 5, 5 + 10 + 9), 9);
    // Client character 25: after both.
    assert_eq!(position(&ins, 5, 5 + 10 + 20 + 25), 25);
    assert_eq!(position(&ins, 0, 10 + 20 + 25), 25);
}

#[test]
fn a_clients_own_error_before_an_inserted_guard_is_not_the_guards() {
    let mut s = session();
    let c = s.open_with(|| "q");
    c.hide_simple_after(1, "late");
    c.close();
    let mut frames = vec![error(
        "ZF001",
        "stale fencing token for resource r: presented 3, current 4 (raised by the client's own function)",
    )];
    frames.extend(msgs("Z"));
    let (seen, answers) = feed(&mut s, frames);
    assert_eq!(seen, "EZ");
    assert!(answers.iter().all(|a| a.guard_refused.is_none()));
}

/// A session inside a transaction block (its last ReadyForQuery said `T`).
fn in_block() -> Session {
    let mut s = session();
    send(&mut s, "begin", "Q");
    let (seen, _) = feed(&mut s, vec![complete("BEGIN"), ready(b'T')]);
    assert_eq!(seen, "CZ");
    s
}

/// The client's Query opened, the proxy's own guard cycle put before it
/// (Bind, Execute, Close, Sync), the Query closed.
fn guard_ahead_of_query(s: &mut Session) {
    own_ahead_of_query(s, true);
}

/// [`guard_ahead_of_query`], with the own cycle's Sync or without it (Bind,
/// Execute, Close, then the client's Query).
fn own_ahead_of_query(s: &mut Session, synced: bool) {
    s.open_with(|| "update");
    let own = if synced {
        s.insert_own("guard")
    } else {
        s.insert_own_unsynced("guard")
    };
    own.expect("the open cycle is alone and fresh")
        .hide_extended(3, "update");
    send(s, "update", "Q");
}

#[test]
fn the_own_cycles_error_takes_the_place_of_the_clients_aborted_block_error() {
    let mut s = in_block();
    guard_ahead_of_query(&mut s);
    let stale = error(
        "ZF001",
        "stale fencing token for resource r: presented 5, current 9 (refused by the database guard)",
    );
    let stale_raw = stale.raw().clone();
    let mut frames = msgs("2");
    frames.push(stale);
    frames.push(ready(b'E'));
    frames.push(error(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    ));
    frames.push(ready(b'E'));
    let (seen, answers) = feed(&mut s, frames);
    // The client sees one error, the guard's, and one ReadyForQuery.
    assert_eq!(seen, "E!Z");
    let shown: Vec<_> = answers
        .iter()
        .filter_map(|a| a.replace.as_ref())
        .filter(|b| !b.is_empty())
        .collect();
    assert_eq!(shown, [&stale_raw]);
    let refused = refused(&answers);
    assert_eq!(refused, [("update", Some(9))]);
    assert_eq!(
        ended(&answers),
        [(b'E', Some("guard"), true), (b'E', Some("update"), true)]
    );
    // Nothing is carried past the cycle it was for.
    send(&mut s, "rollback", "Q");
    let (seen, _) = feed(&mut s, vec![error("42601", "syntax error"), ready(b'E')]);
    assert_eq!(seen, "EZ");
}

#[test]
fn a_fatal_error_of_the_own_cycle_is_shown_at_once() {
    let mut s = in_block();
    guard_ahead_of_query(&mut s);
    let fatal = from_raw(&error_response("FATAL", "57P01", "terminating connection"));
    let (seen, _) = feed(&mut s, vec![fatal]);
    assert_eq!(seen, "E");
}

#[test]
fn no_own_cycle_goes_before_a_cycle_with_something_sent_or_another_in_flight() {
    let mut s = in_block();
    send(&mut s, "parse", "P");
    assert!(
        s.insert_own("guard").is_none(),
        "the open cycle has a Parse in it"
    );
    send(&mut s, "parse", "S");
    s.open_with(|| "next");
    assert!(
        s.insert_own("guard").is_none(),
        "a cycle is still in flight"
    );
}

/// With a Sync of its own the proxy's cycle ends at its ReadyForQuery;
/// without one, at its last hidden answer, before the client's answers.
/// The client sees neither.
#[test]
fn a_cycle_of_the_proxys_own_is_hidden_whole_with_or_without_its_sync() {
    for synced in [true, false] {
        let mut s = in_block();
        own_ahead_of_query(&mut s, synced);
        assert_eq!(s.unsynced_in_flight(), !synced);
        // The guard: BindComplete, DataRow, CommandComplete, CloseComplete
        // (and its ReadyForQuery); then the client's UPDATE.
        let mut frames = msgs("2 D C 3");
        if synced {
            frames.push(ready(b'T'));
        }
        frames.push(complete("UPDATE 1"));
        frames.push(ready(b'T'));
        let (seen, answers) = feed(&mut s, frames);
        assert_eq!(seen, "CZ", "synced {synced}");
        assert_eq!(
            ended(&answers),
            [(b'T', Some("guard"), false), (b'T', Some("update"), false)],
            "synced {synced}"
        );
        let own_end = if synced { 4 } else { 3 };
        assert!(
            answers[own_end].ended.is_some()
                && answers[..own_end].iter().all(|a| a.ended.is_none())
        );
        assert!(!s.take_sync());
        assert!(!s.unsynced_in_flight() && s.is_empty() && s.status() == b'T');
    }
}

#[test]
fn an_unsynced_own_cycles_error_asks_for_a_sync_and_is_the_clients_error() {
    let mut s = in_block();
    own_ahead_of_query(&mut s, false);
    let stale = error(
        "ZF001",
        "stale fencing token for resource r: presented 5, current 9 (refused by the database guard)",
    );
    let stale_raw = stale.raw().clone();
    // The guard's BindComplete, then its error; the server skips the
    // rest up to the proxy's Sync, which it answers alone.
    let (seen, answers) = feed(&mut s, vec![msgs("2").remove(0), stale]);
    assert_eq!(seen, "");
    assert!(s.take_sync(), "no Sync asked for");
    assert!(!s.take_sync(), "a Sync asked for twice");
    assert_eq!(ended(&answers), [(b'E', Some("guard"), true)]);
    let refused = refused(&answers);
    assert_eq!(refused, [("update", Some(9))]);
    assert!(!s.unsynced_in_flight());
    let ready_e = ready(b'E');
    let mut expect = stale_raw.to_vec();
    expect.extend_from_slice(ready_e.raw());
    let (seen, answers) = feed(&mut s, vec![ready_e]);
    // The client sees the guard's error, then the ReadyForQuery.
    assert_eq!(seen, "E!");
    assert_eq!(answers[0].replace.as_deref(), Some(&expect[..]));
    assert_eq!(ended(&answers), [(b'E', Some("update"), true)]);
    assert!(s.is_empty() && s.status() == b'E');
    // Nothing is carried past the cycle it was for.
    send(&mut s, "rollback", "Q");
    let (seen, _) = feed(&mut s, vec![complete("ROLLBACK"), ready(b'I')]);
    assert_eq!(seen, "CZ");
}

#[test]
fn an_unsynced_own_cycles_fatal_error_is_shown_at_once() {
    let mut s = in_block();
    own_ahead_of_query(&mut s, false);
    let fatal = from_raw(&error_response("FATAL", "57P01", "terminating connection"));
    let (seen, _) = feed(&mut s, vec![fatal]);
    assert_eq!(seen, "E");
    assert!(!s.take_sync());
}
