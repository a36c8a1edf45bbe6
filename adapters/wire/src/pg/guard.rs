//! The in-database guard of `enforce = "database"`: the statement the proxy
//! runs in a write's own transaction. The SQL it calls is in
//! `migrations/guard/`; installing it is I/O, so it lives in
//! `fencepost-store` (`guard::install`).

/// The guard call for one admitted write. `resource` has already been
/// validated as a resource name (`[A-Za-z0-9._:/-]`), so it needs no
/// escaping beyond quotes; the token is a number.
pub fn call(resource: &str, token: u64) -> String {
    format!(
        "SELECT fencepost.advance('{}', '{token:020}')",
        resource.replace('\'', "''")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn call_pads_and_quotes() {
        assert_eq!(
            super::call("orders", 5),
            "SELECT fencepost.advance('orders', '00000000000000000005')"
        );
        assert!(super::call("a'b", u64::MAX).contains("'a''b', '18446744073709551615'"));
    }
}
