//! The path a route decision is made on: RFC 3986 section 6 normalisation,
//! and a refusal for every path an upstream might resolve to a different
//! route than the proxy matched.
//!
//! Routes map path prefixes to resources, so the proxy and the upstream
//! must agree on what path a request names. Normalising what RFC 3986
//! says is equivalent (percent-encoded unreserved characters decoded,
//! `/%6bv/` is `/kv/`; hex digits in upper case) lets the proxy see the
//! path the upstream will. What upstreams resolve *differently* from one
//! another cannot be normalised, only refused ([`PathError`]):
//! - dot segments, also percent-encoded (`/a/%2e%2e/b`): removed by some,
//!   kept by others;
//! - encoded `/` and `\`, and a raw `\`: decoded into separators by some;
//! - double encoding (`%252e`): decoded twice by some;
//! - empty segments (`//`, `/a//b`): merged by some (nginx's
//!   `merge_slashes`), so `//orders/1` may reach `/orders/1`;
//! - `;` path parameters (raw or `%3B`) that hide a dot segment or
//!   another route: some servlet containers cut them off, so
//!   `/orders;x/1` and `/x/..;/orders/1` may reach `/orders/1`
//!   ([`without_parameters`] gives the path such an upstream sees; the
//!   route must not depend on which of the two is used);
//! - an invalid escape, `%00`, control and non-ASCII bytes, `#`.
//!
//! Letter case in the path is kept (paths are case-sensitive); route
//! prefixes match it without regard to ASCII case, so an upstream that
//! ignores case cannot be reached around a route (see
//! [`crate::http::route_resource`]).

use std::borrow::Cow;

/// Why a path cannot decide a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path has a `.` or `..` segment (maybe percent-encoded)")]
    DotSegment,
    #[error("the path has an empty segment (`//`)")]
    EmptySegment,
    #[error("the path has an encoded `/` or `\\`, or a `\\`")]
    Separator,
    #[error("the path's `;` parameters hide a dot or empty segment, or another route")]
    Parameters,
    #[error("the path is percent-encoded twice (`%25` before hex digits)")]
    DoubleEncoding,
    #[error("the path has an invalid percent escape")]
    BadEscape,
    #[error("the path has a control, non-ASCII or `#` byte")]
    BadByte,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The normalised form of `path` (without its query), or why it is
/// ambiguous. Borrowed when it needs no change, the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                match h * 16 + l {
                    b'/' | b'\\' => return Err(PathError::Separator),
                    b'%' if bytes.get(i + 3).copied().and_then(hex).is_some()
                        && bytes.get(i + 4).copied().and_then(hex).is_some() =>
                    {
                        return Err(PathError::DoubleEncoding)
                    }
                    0..=0x1f | 0x7f => return Err(PathError::BadByte),
                    _ => {}
                }
                changed = true;
                i += 3;
            }
            b'\\' => return Err(PathError::Separator),
            b'#' => return Err(PathError::BadByte),
            b if b <= 0x20 || b >= 0x7f => return Err(PathError::BadByte),
            _ => i += 1,
        }
    }
    let path = if changed {
        let decoded = decode_unreserved(bytes);
        // Decoding may make a double encoding of what was none: `%25e%35`
        // is `%25e5` once its `%35` is decoded, which an upstream that
        // decodes twice reads as `%e5` (found by the `http1` fuzz target:
        // the normal form was not a fixed point).
        if double_encoded(decoded.as_bytes()) {
            return Err(PathError::DoubleEncoding);
        }
        Cow::Owned(decoded)
    } else {
        Cow::Borrowed(path)
    };
    check_segments(&path)?;
    Ok(path)
}

/// `path` (normalised) as an upstream that cuts path parameters off
/// sees it: each segment up to its first `;` (raw or `%3B`). Refused if
/// that leaves a dot segment or an empty inner one (`/x/..;/a`,
/// `/a/;x/b`). Borrowed when there is no `;`.
pub fn without_parameters(path: &str) -> Result<Cow<'_, str>, PathError> {
    let has = |s: &str| s.contains(';') || s.contains("%3B") || s.contains("%3b");
    if !has(path) {
        return Ok(Cow::Borrowed(path));
    }
    let bare: Vec<&str> = path
        .split('/')
        .map(|seg| {
            let cut = [seg.find(';'), seg.find("%3B"), seg.find("%3b")]
                .into_iter()
                .flatten()
                .min();
            cut.map_or(seg, |i| &seg[..i])
        })
        .collect();
    let bare = bare.join("/");
    check_segments(&bare).map_err(|_| PathError::Parameters)?;
    Ok(Cow::Owned(bare))
}

/// Decodes escapes of unreserved characters, upper-cases the rest.
/// `bytes` has only valid escapes (checked by [`normalize`]).
fn decode_unreserved(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (h, l) = (bytes[i + 1], bytes[i + 2]);
            let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
            if unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(h.to_ascii_uppercase()));
                out.push(char::from(l.to_ascii_uppercase()));
            }
            i += 3;
        } else {
            out.push(char::from(b));
            i += 1;
        }
    }
    out
}

/// An escaped `%` followed by two hex digits: an escape within an escape.
fn double_encoded(bytes: &[u8]) -> bool {
    bytes.windows(5).any(|w| {
        w[0] == b'%' && w[1] == b'2' && w[2] == b'5' && hex(w[3]).is_some() && hex(w[4]).is_some()
    })
}

/// No `.`/`..` segment and no empty one except a trailing slash.
fn check_segments(path: &str) -> Result<(), PathError> {
    let rest = &path[1..];
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        match seg {
            "." | ".." => return Err(PathError::DotSegment),
            "" if segments.peek().is_some() => return Err(PathError::EmptySegment),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn equivalent_spellings_normalise_to_one_path() {
        for (raw, want) in [
            ("/kv/1", "/kv/1"),
            ("/%6bv/1", "/kv/1"),
            ("/%6Bv/1", "/kv/1"),
            ("/k%76/a%2Db%5f~", "/kv/a-b_~"),
            ("/kv/%e2%82%ac", "/kv/%E2%82%AC"),
            ("/kv/", "/kv/"),
            ("/", "/"),
            ("/kv/v1.2/..x/a..b", "/kv/v1.2/..x/a..b"),
            ("/kv/50%25off", "/kv/50%25off"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    /// The route escapes: each refused, none normalised into a
    /// path that might match another route.
    #[test]
    fn ambiguous_paths_are_refused() {
        for (raw, want) in [
            ("/kv/../orders/1", PathError::DotSegment),
            ("/kv/./1", PathError::DotSegment),
            ("/kv/..", PathError::DotSegment),
            ("/kv/%2e%2e/orders", PathError::DotSegment),
            ("/kv/.%2E/orders", PathError::DotSegment),
            ("/kv/%2E", PathError::DotSegment),
            ("//kv/1", PathError::EmptySegment),
            ("/kv//1", PathError::EmptySegment),
            ("/%2fkv/1", PathError::Separator),
            ("/kv/..%2forders", PathError::Separator),
            ("/kv/x%5c..%5corders", PathError::Separator),
            ("/kv\\..\\orders", PathError::Separator),
            ("/kv/%252e%252e/orders", PathError::DoubleEncoding),
            ("/kv/%252F", PathError::DoubleEncoding),
            // Double encodings that appear only once unreserved escapes
            // are decoded (regressions/http1/path-double-encoding-*).
            ("/k.;/%25e%35ep", PathError::DoubleEncoding),
            ("/kv/%25%32%65", PathError::DoubleEncoding),
            ("/kv/%zz", PathError::BadEscape),
            ("/kv/%2", PathError::BadEscape),
            ("/kv/%00", PathError::BadByte),
            ("/kv/a#b", PathError::BadByte),
            ("/kv/\u{e9}", PathError::BadByte),
            ("kv/1", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn parameters_are_cut_as_a_servlet_container_would() {
        for (raw, want) in [
            ("/kv/1", "/kv/1"),
            ("/kv;x/1", "/kv/1"),
            ("/kv/1;jsessionid=a", "/kv/1"),
            ("/kv%3Bx/1", "/kv/1"),
            ("/kv/x'%3B%20DROP", "/kv/x'"),
        ] {
            let n = normalize(raw).unwrap();
            assert_eq!(without_parameters(&n).as_deref(), Ok(want), "{raw}");
        }
        for raw in [
            "/x/..;/kv/1",
            "/x/%2e%2e;/kv/1",
            "/x/.;a/kv",
            "/kv/;x/1",
            "/;/kv",
        ] {
            let n = normalize(raw).unwrap();
            assert_eq!(without_parameters(&n), Err(PathError::Parameters), "{raw}");
        }
    }

    proptest! {
        /// Normalising is idempotent, and a normalised path has no escape
        /// of an unreserved character, no dot or empty inner segment.
        #[test]
        fn normal_form_is_a_fixed_point(raw in "/[a-zA-Z0-9%._~;/\\-]{0,30}") {
            if let Ok(once) = normalize(&raw) {
                let twice = normalize(&once).map(Cow::into_owned);
                prop_assert_eq!(twice.as_deref(), Ok(&*once));
                prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
                prop_assert!(!once[1..].split('/').rev().skip(1).any(str::is_empty));
            }
        }

        /// Escaping any unreserved byte of a plain path changes nothing.
        #[test]
        fn escaping_unreserved_bytes_is_the_same_path(
            raw in "/[a-z0-9._~-]{1,10}(/[a-z0-9_~-]{1,10}){0,3}",
            which in prop::collection::vec(any::<bool>(), 40),
        ) {
            let Ok(plain) = normalize(&raw) else { return Ok(()) };
            let escaped: String = raw
                .bytes()
                .zip(which.iter().cycle())
                .map(|(b, &e)| if e && b != b'/' { format!("%{b:02x}") } else { char::from(b).to_string() })
                .collect();
            prop_assert_eq!(normalize(&escaped).map(Cow::into_owned), Ok(plain.into_owned()));
        }
    }
}
