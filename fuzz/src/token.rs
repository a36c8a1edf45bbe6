//! Token parsing (`fencing::token`), signed-token checks
//! (`fencing::signing`) and resource names (`fencing::resource`).
//!
//! Input: `resource 0x00 token` (no zero byte: all of it is the token, the
//! resource is `orders`). Bytes that are not UTF-8 are read lossily, as a
//! header value or SQL literal would never reach the parser otherwise.

use super::fencing;
use fencing::resource::{validate, ResourceError, MAX_LEN};
use fencing::token::{parse_decimal, Presented, TokenError, TokenPolicy, TokenRejection};
use fencing::Signer;

/// The fixed key the signed corpus entries were made with.
pub const SEED: [u8; 32] = [7; 32];

/// The signer for [`SEED`], made once (deriving it costs a scalar
/// multiplication per input otherwise).
fn signer() -> &'static Signer {
    static SIGNER: std::sync::OnceLock<Signer> = std::sync::OnceLock::new();
    SIGNER.get_or_init(|| Signer::from_seed(SEED))
}

/// Fuzz target `token`.
pub fn run(data: &[u8]) {
    let (resource, token, named) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..], true),
        None => (&b"orders"[..], data, false),
    };
    let resource = String::from_utf8_lossy(resource);
    let token = String::from_utf8_lossy(token);
    check_decimal(&token);
    check_presented(&token);
    check_resource(&resource);
    check_policies(&resource, &token);
    // Signing costs milliseconds, so only inputs that name a resource pay.
    if named {
        check_signing(&resource, data);
    }
}

/// `parse_decimal` is exactly `u64::from_str` without its `+` sign and
/// limited to 20 digits (so zero padding beyond that is refused).
pub fn check_decimal(s: &str) {
    let got = parse_decimal(s);
    let std = if s.starts_with('+') || s.len() > 20 {
        None
    } else {
        s.parse::<u64>().ok()
    };
    assert_eq!(got.clone().ok(), std, "{s:?}");
    match got {
        Ok(n) => {
            assert!(!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()));
            let shown = n.to_string();
            assert_eq!(parse_decimal(&shown), Ok(n));
            let canonical = s.trim_start_matches('0');
            assert_eq!(if canonical.is_empty() { "0" } else { canonical }, shown);
        }
        Err(TokenError::Empty) => assert!(s.is_empty()),
        Err(TokenError::Overflow) => {
            assert!(s.bytes().all(|b| b.is_ascii_digit()));
        }
        Err(TokenError::NotDecimal) => {
            assert!(!s.bytes().all(|b| b.is_ascii_digit()));
        }
        Err(e) => panic!("parse_decimal said {e:?} for {s:?}"),
    }
}

/// `Presented::parse`: a plain token is a trimmed strict decimal; a signed
/// one is a strict decimal, a dot and 86 characters of base64url.
pub fn check_presented(s: &str) {
    let trimmed = s.trim_ascii();
    match Presented::parse(s) {
        Ok(Presented::Plain(n)) => {
            assert!(!trimmed.contains('.'));
            assert_eq!(parse_decimal(trimmed), Ok(n));
        }
        Ok(Presented::Signed { n, .. }) => {
            let Some((num, text)) = trimmed.split_once('.') else {
                panic!("signed without a dot: {s:?}");
            };
            assert_eq!(parse_decimal(num), Ok(n));
            assert_eq!(text.len(), 86);
            assert!(text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
        Err(TokenError::BadSignatureEncoding) => assert!(trimmed.contains('.')),
        Err(e) => {
            let number = trimmed.split_once('.').map_or(trimmed, |(n, _)| n);
            assert_eq!(parse_decimal(number), Err(e));
        }
    }
}

/// `resource::validate` accepts exactly 1..=128 bytes of `[A-Za-z0-9._:/-]`
/// and names what it refuses.
pub fn check_resource(s: &str) {
    let name_byte = |b: u8| b.is_ascii_alphanumeric() || b".-_:/".contains(&b);
    let expected = !s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(name_byte);
    let got = validate(s);
    assert_eq!(got.is_ok(), expected, "{s:?}");
    match got {
        Ok(()) => assert!(fencing::ResourceName::new(s).is_ok_and(|r| r.as_str() == s)),
        Err(ResourceError::Empty) => assert!(s.is_empty()),
        Err(ResourceError::TooLong(n)) => assert!(n == s.len() && n > MAX_LEN),
        Err(ResourceError::BadChar(c)) => {
            assert!(s.contains(c));
            assert!(!c.is_ascii() || !name_byte(c as u8));
        }
    }
}

/// The plain policy takes any well-formed token's number; the signing one
/// takes only the signature the elector's key makes, and with plain tokens
/// allowed, those too.
pub fn check_policies(resource: &str, token: &str) {
    let presented = Presented::parse(token);
    let plain = TokenPolicy::plain().check(resource, token);
    assert_eq!(
        plain.clone().ok(),
        presented.clone().ok().map(|p| p.value())
    );
    if let (Err(TokenRejection::Invalid(e)), Err(pe)) = (&plain, &presented) {
        assert_eq!(e, pe);
    }

    let signer = signer();
    for allow_plain in [false, true] {
        let policy = TokenPolicy {
            verifier: Some(signer.verifier()),
            allow_plain,
        };
        let got = policy.check(resource, token);
        match (presented.clone(), &got) {
            (Err(e), _) => assert_eq!(got, Err(TokenRejection::Invalid(e))),
            (Ok(Presented::Plain(n)), _) if allow_plain => assert_eq!(got, Ok(n)),
            (Ok(Presented::Plain(n)), _) => assert_eq!(got, Err(TokenRejection::Unsigned { n })),
            (Ok(Presented::Signed { n, .. }), Ok(m)) => {
                // Only the elector's own signature verifies (Ed25519 signs
                // deterministically, and the fuzzer cannot forge another),
                // in its one encoding.
                assert_eq!(*m, n);
                let theirs = token.trim_ascii().split_once('.').map(|(_, s)| s);
                let ours = signer.sign(resource, n);
                assert_eq!(theirs, ours.split_once('.').map(|(_, s)| s), "{resource:?}");
            }
            (Ok(Presented::Signed { n, .. }), Err(e)) => {
                assert_eq!(*e, TokenRejection::Forged { n });
            }
        }
        if let Err(e) = &got {
            assert_eq!(e.is_forged(), !matches!(e, TokenRejection::Invalid(_)));
            assert_eq!(e.presented(), presented.clone().ok().map(|p| p.value()));
        }
    }
}

/// A token the key signs for `(resource, n)` verifies for exactly that
/// pair: not for the next number, not for a resource one byte longer.
pub fn check_signing(resource: &str, data: &[u8]) {
    let mut n_bytes = [0u8; 8];
    for (i, b) in data.iter().rev().take(8).enumerate() {
        n_bytes[i] = *b;
    }
    let n = u64::from_le_bytes(n_bytes);
    let signer = signer();
    let policy = TokenPolicy {
        verifier: Some(signer.verifier()),
        allow_plain: false,
    };
    let token = signer.sign(resource, n);
    assert_eq!(policy.check(resource, &token), Ok(n), "{resource:?} {n}");
    let Some((_, sig)) = token.split_once('.') else {
        panic!("signed token without a dot: {token:?}");
    };
    let other = n ^ 1;
    assert_eq!(
        policy.check(resource, &format!("{other}.{sig}")),
        Err(TokenRejection::Forged { n: other }),
        "signature for {n} on {resource:?} also verifies {other}"
    );
    let longer = format!("{resource}x");
    assert_eq!(
        policy.check(&longer, &token),
        Err(TokenRejection::Forged { n }),
        "signature on {resource:?} also verifies on {longer:?}"
    );
}
