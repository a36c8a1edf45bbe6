//! The in-database guard of `enforce = "database"`: the statement the proxy
//! runs in a write's own transaction. The SQL it calls is in
//! `migrations/guard/`; installing it is I/O, so it lives in
//! `fencepost-store` (`guard::install`).

use super::frame::ErrorFields;

/// Which function the guard call runs: `fencepost.advance` (PL/pgSQL,
/// `migrations/guard/`), or `fencepost.advance_fast` of the
/// `fencepost_guard` extension (`deploy/fencepost_guard/`: the same-token
/// check in C, every other case handed to `fencepost.advance`), which a
/// proxy calls with `[[postgres]] guard_extension = true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardFn {
    /// `fencepost.advance`: the guard as installed by `migrate --guard`.
    Sql,
    /// `fencepost.advance_fast`: `guard_extension = true`.
    Extension,
}

impl GuardFn {
    /// The function's qualified name.
    pub const fn name(self) -> &'static str {
        match self {
            GuardFn::Sql => "fencepost.advance",
            GuardFn::Extension => "fencepost.advance_fast",
        }
    }

    /// The guard call as a prepared statement, parsed once per server
    /// session and then run with Bind/Execute for each guarded transaction
    /// (`enforce = "database"`, extended protocol): the server parses,
    /// analyses and plans the call once, not once per transaction.
    /// Measured on the backend (the server under callgrind, pgbench
    /// TPC-B-like, one client, instructions per transaction over proxy
    /// mode's): a named Parse/Bind/Execute/Close/Close per transaction cost
    /// 145,000 (`-M prepared`, over 311,000) and 146,000 (`-M extended`);
    /// the prepared statement's Bind/Execute/Close costs 97,000 and 87,000.
    pub const fn prepared(self) -> &'static str {
        match self {
            GuardFn::Sql => "SELECT fencepost.advance($1, $2, $3)",
            GuardFn::Extension => "SELECT fencepost.advance_fast($1, $2, $3)",
        }
    }
}

/// The guard call for one admitted write. `resource` has already been
/// validated as a resource name (`[A-Za-z0-9._:/-]`), so it needs no
/// escaping beyond quotes; the token is a number. `wait_ms` bounds how
/// long a newer token waits for the older-token transactions still in
/// flight (`[[postgres]] guard_wait`); past it the guard raises `ZF005`.
pub fn call(f: GuardFn, resource: &str, token: u64, wait_ms: u32) -> String {
    format!(
        "SELECT {}('{}', '{token:020}', {wait_ms})",
        f.name(),
        resource.replace('\'', "''")
    )
}

/// Parameter types of [`GuardFn::prepared`]: `text`, `text`, `integer`.
pub const PREPARED_TYPES: [u32; 3] = [25, 25, 23];

/// The prefix of the prepared guard statement's name (and its portal's):
/// the session's generation follows, so a client that takes the name for a
/// statement of its own moves the guard to the next one.
pub const PREPARED_PREFIX: &str = "fencepost_guard_";

/// The name of the prepared guard statement of generation `generation`.
pub fn prepared_name(generation: u32) -> String {
    format!("{PREPARED_PREFIX}{generation}")
}

/// Whether `name` is the prepared guard statement's name in `generation`
/// (allocates only for a name that starts with the prefix).
pub fn is_prepared_name(name: &[u8], generation: u32) -> bool {
    name.strip_prefix(PREPARED_PREFIX.as_bytes())
        .is_some_and(|rest| rest == generation.to_string().as_bytes())
}

/// The token as [`GuardFn::prepared`]'s second parameter: the guard's 20 digits.
pub fn token_digits(token: u64) -> [u8; 20] {
    let mut digits = [b'0'; 20];
    let mut t = token;
    for d in digits.iter_mut().rev() {
        *d = b'0' + u8::try_from(t % 10).unwrap_or(0);
        t /= 10;
    }
    digits
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
    use super::GuardFn;

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
    fn prepared_names_and_params() {
        assert_eq!(super::prepared_name(3), "fencepost_guard_3");
        assert!(super::is_prepared_name(b"fencepost_guard_3", 3));
        assert!(!super::is_prepared_name(b"fencepost_guard_3", 4));
        assert!(!super::is_prepared_name(b"fencepost_guard_03", 3));
        assert!(!super::is_prepared_name(b"fencepost_guard_", 0));
        assert!(!super::is_prepared_name(b"s3", 3));
        assert_eq!(&super::token_digits(5), b"00000000000000000005");
        assert_eq!(&super::token_digits(u64::MAX), b"18446744073709551615");
        assert_eq!(
            super::token_digits(12345).to_vec(),
            format!("{:020}", 12345).into_bytes()
        );
    }

    #[test]
    fn call_pads_and_quotes() {
        assert_eq!(
            super::call(GuardFn::Sql, "orders", 5, 5000),
            "SELECT fencepost.advance('orders', '00000000000000000005', 5000)"
        );
        assert_eq!(
            super::call(GuardFn::Extension, "orders", 5, 5000),
            "SELECT fencepost.advance_fast('orders', '00000000000000000005', 5000)"
        );
        assert!(super::call(GuardFn::Sql, "a'b", u64::MAX, 1)
            .contains("'a''b', '18446744073709551615', 1)"));
        for f in [GuardFn::Sql, GuardFn::Extension] {
            assert_eq!(
                f.prepared(),
                format!("SELECT {}($1, $2, $3)", f.name()),
                "{f:?}"
            );
        }
    }
}
