//! What a refused statement becomes: the marker the server fails on, and
//! the error the client sees in its place (see the session's module docs
//! for why a refusal goes through the server).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use fencing::Reason;
use wire::pg::frame;
use wire::pg::Classification;

use super::state::Cycle;
use crate::fencer::Refusal;

/// Makes refusal markers unique within the process, so a marker can never
/// match an error the server raised for something else.
static MARKERS: AtomicU64 = AtomicU64::new(1);

fn marker() -> String {
    format!(
        "fencepost-refusal-{}-{}",
        std::process::id(),
        MARKERS.fetch_add(1, Ordering::Relaxed)
    )
}

/// The SQLSTATE the contract gives each reason.
pub(super) fn sqlstate(reason: Reason) -> &'static str {
    match reason {
        Reason::Stale => "ZF001",
        Reason::Missing => "ZF002",
        Reason::Invalid | Reason::Forged => "ZF003",
        Reason::Unavailable => "ZF004",
    }
}

/// The ErrorResponse the client sees for a refusal.
pub(super) fn refusal_error(r: &Refusal) -> Bytes {
    frame::error_response("ERROR", sqlstate(r.reason), &r.message)
}

/// A FATAL error for the client, in the server's own words where it has
/// some (`08P01` protocol violation, `08006` connection failure, `57P01`
/// shutdown).
pub(super) fn fatal(code: &str, message: &str) -> Bytes {
    frame::error_response("FATAL", code, message)
}

/// Whether the refusal replaces a simple-protocol unit (Query or
/// FunctionCall, answered by its own ReadyForQuery) or an Execute.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Query,
    Execute,
}

/// What to send in place of a refused statement (see the module docs),
/// with the cycle set up to swap the server's answer for `error`.
pub(super) fn refuse(cycle: &mut Cycle, class: &Classification, unit: Unit, error: Bytes) -> Bytes {
    if unit == Unit::Query && class.single_commit {
        cycle.swap_complete(error);
        return frame::query("ROLLBACK");
    }
    let m = marker();
    let out = match unit {
        Unit::Query => frame::query(&format!("FETCH ALL FROM \"{m}\"")),
        Unit::Execute => frame::execute(&m),
    };
    cycle.swap_error(m, error);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(sqlstate(Reason::Stale), "ZF001");
        assert_eq!(sqlstate(Reason::Missing), "ZF002");
        assert_eq!(sqlstate(Reason::Invalid), "ZF003");
        assert_eq!(sqlstate(Reason::Forged), "ZF003");
        assert_eq!(sqlstate(Reason::Unavailable), "ZF004");
    }
}
