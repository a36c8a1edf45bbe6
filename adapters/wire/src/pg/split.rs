//! Where the statements of a multi-statement text begin, so guard mode can
//! put a guard call between two of them (see
//! [`GuardPoint`](super::classify::GuardPoint)).
//!
//! Found by Postgres's own parser (`pg_query`'s split), so semicolons in
//! strings, dollar quotes, quoted identifiers and comments, and in SQL
//! function bodies (`BEGIN ATOMIC ... END`), are never taken for the end
//! of a statement: the statements are exactly those the server will run,
//! and an offset is always at a statement's start, outside any token.

/// The byte offset in `text` at which each of its statements begins, as
/// Postgres's parser splits it (statement 0 at 0); `None` when it does not
/// parse.
pub fn statement_starts(text: &str) -> Option<Vec<usize>> {
    let base = text.as_ptr() as usize;
    let parts = pg_query::split_with_parser(text).ok()?;
    let mut starts: Vec<usize> = parts
        .iter()
        .map(|p| (p.as_ptr() as usize).saturating_sub(base))
        .collect();
    if let Some(first) = starts.first_mut() {
        *first = 0;
    }
    // Each must be a statement start inside the text: anything else and
    // the caller refuses rather than guess.
    let inside = starts.windows(2).all(|w| w[0] < w[1])
        && starts
            .iter()
            .all(|&s| s <= text.len() && text.is_char_boundary(s));
    inside.then_some(starts)
}

#[cfg(test)]
mod tests {
    use super::statement_starts;

    fn pieces(text: &str) -> Vec<&str> {
        let starts = statement_starts(text).expect("parses");
        let mut out = Vec::new();
        for (i, s) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(text.len());
            out.push(&text[*s..end]);
        }
        out
    }

    #[test]
    fn semicolons_inside_tokens_split_nothing() {
        let text = "SELECT 'a; COMMIT' /* ; ROLLBACK; */; COMMIT; -- ; BEGIN;\n\
                    SELECT $x$ ; END; $x$, \"q;\"; SELECT E'\\'; COMMIT;'";
        let p = pieces(text);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[1].trim_start().starts_with("COMMIT"), "{p:?}");
        assert!(p[2].contains("$x$ ; END; $x$"), "{p:?}");
        assert!(p[3].contains("COMMIT;'"), "{p:?}");
    }

    #[test]
    fn sql_function_bodies_are_one_statement() {
        let text = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; SELECT f()";
        assert_eq!(pieces(text).len(), 2);
    }

    #[test]
    fn offsets_are_bytes_at_character_boundaries() {
        let text = "SELECT 'é'; UPDATE t SET a = 'ü'";
        let starts = statement_starts(text).expect("parses");
        assert_eq!(starts.len(), 2);
        assert_eq!(&text[..starts[1]], "SELECT 'é';");
        assert_eq!(statement_starts("SELECT (").map(|s| s.len()), None);
    }
}
