//! The in-database guard of `enforce = "database"`: the statement the proxy
//! runs in a write's own transaction. The SQL it calls is in
//! `migrations/guard/`; installing it is I/O, so it lives in
//! `fencepost-store` (`guard::install`).

use super::frame::ErrorFields;

/// The guard call for one admitted write. `resource` has already been
/// validated as a resource name (`[A-Za-z0-9._:/-]`), so it needs no
/// escaping beyond quotes; the token is a number. `wait_ms` bounds how
/// long a newer token waits for the older-token transactions still in
/// flight (`[[postgres]] guard_wait`); past it the guard raises `ZF005`.
pub fn call(resource: &str, token: u64, wait_ms: u32) -> String {
    format!(
        "SELECT fencepost.advance('{}', '{token:020}', {wait_ms})",
        resource.replace('\'', "''")
    )
}

/// SQLSTATE of the guard's refusal of a stale token (the contract's code
/// for a stale token, raised by `fencepost.advance`).
pub const STALE: &[u8] = b"ZF001";

/// When an ErrorResponse is the guard's stale-token refusal: the current
/// mark its message names (`None` inside when it names none). Other errors
/// (the guard not installed, an aborted transaction) are the server's own.
pub fn stale_refusal(fields: &ErrorFields<'_>) -> Option<Option<u64>> {
    if fields.get(b'C') != Some(STALE) {
        return None;
    }
    Some(
        fields
            .get(b'M')
            .and_then(|m| std::str::from_utf8(m).ok())
            .and_then(current_mark),
    )
}

/// The current mark named in the guard's message ("..., current N ...").
fn current_mark(message: &str) -> Option<u64> {
    let (_, after) = message.rsplit_once("current ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::frame::{error_response, BackendMsg, Frame};

    fn fields_of(code: &str, message: &str, check: impl FnOnce(Option<Option<u64>>)) {
        let raw = error_response("ERROR", code, message);
        let frame = Frame::new(raw[0], &raw[5..]);
        let Ok(BackendMsg::ErrorResponse(fields)) = frame.backend() else {
            panic!("not an ErrorResponse");
        };
        check(super::stale_refusal(&fields));
    }

    #[test]
    fn current_mark_from_the_guard_message() {
        fields_of(
            "ZF001",
            "stale fencing token for resource r: presented 5, current 9 (refused by the database guard)",
            |r| assert_eq!(r, Some(Some(9))),
        );
        fields_of("ZF001", "no number here", |r| assert_eq!(r, Some(None)));
        fields_of(
            "42883",
            "function fencepost.advance does not exist, current 3",
            |r| assert_eq!(r, None),
        );
    }

    #[test]
    fn call_pads_and_quotes() {
        assert_eq!(
            super::call("orders", 5, 5000),
            "SELECT fencepost.advance('orders', '00000000000000000005', 5000)"
        );
        assert!(super::call("a'b", u64::MAX, 1).contains("'a''b', '18446744073709551615', 1)"));
    }
}
