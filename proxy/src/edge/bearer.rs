//! `Authorization: Bearer <token>`, checked the same way by every API that
//! has a token (admin, elector).

use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, StatusCode};
use subtle::{Choice, ConstantTimeEq};

use super::problem::{self, Problem};

/// Whether `headers` carry `Authorization: Bearer <expected>`.
///
/// The scheme is case-insensitive (RFC 9110 11.1) and surrounding blanks
/// are ignored. The comparison takes time that depends on `expected`'s
/// length only, never on the presented token or on how much of it was
/// right, so response timing cannot be used to guess the secret byte by
/// byte (`subtle`'s constant-time primitives, which the optimizer is kept
/// from turning into early exits).
pub fn matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(got) = presented(headers) else {
        return false;
    };
    let (got, want) = (got.as_bytes(), expected.as_bytes());
    let same_len = (got.len() as u64).ct_eq(&(want.len() as u64));
    // One comparison per byte of the secret, whatever was presented:
    // a shorter token is compared against zeros (and fails on length).
    let same_bytes = want
        .iter()
        .enumerate()
        .fold(Choice::from(1), |acc, (i, w)| {
            acc & got.get(i).copied().unwrap_or(0).ct_eq(w)
        });
    bool::from(same_len & same_bytes)
}

/// The token after `Bearer `, if the header has that form.
pub(crate) fn presented(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The 401 for a missing or wrong token; `detail` says which token the
/// endpoint wants.
pub fn unauthorized(detail: &'static str) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        problem::UNAUTHORIZED,
        "Unauthorized",
        detail,
    )
    .header(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn only_the_exact_token_matches() {
        assert!(matches(&with("Bearer secret"), "secret"));
        assert!(matches(&with("bearer secret"), "secret"));
        assert!(matches(&with("  BEARER   secret  "), "secret"));
        assert!(!matches(&with("Bearer secreT"), "secret"));
        assert!(!matches(&with("Bearer secret2"), "secret"));
        assert!(!matches(&with("Bearer secre"), "secret"));
        assert!(!matches(&with("Bearer "), "secret"));
        assert!(!matches(&with("Basic secret"), "secret"));
        assert!(!matches(&with("secret"), "secret"));
        assert!(!matches(&HeaderMap::new(), "secret"));
        // Lengths that differ by a multiple of 256 (a truncating cast of
        // the length difference would call them equal).
        let long = "a".repeat(256);
        assert!(!matches(&with(&format!("Bearer {long}")), ""));
        assert!(!matches(&with(&format!("Bearer x{long}")), "x"));
    }

    #[test]
    fn unauthorized_asks_for_a_bearer_token() {
        let resp: http::Response<bytes::Bytes> = unauthorized("needs a token").response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[WWW_AUTHENTICATE], "Bearer");
    }
}
