//! Parsing the tokens writers present.
//!
//! A token is an unsigned 64-bit integer. On the wire it is either plain
//! decimal (`42`) or signed by the elector (`42.<base64url signature>`, see
//! [`crate::signing`]). Parsing is strict on purpose: a sign, a space inside,
//! a hex prefix or a value past `u64::MAX` is *invalid*, never rounded or
//! truncated into some other, possibly admissible, token.

use crate::signing::{Verifier, SIGNATURE_LEN};

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token must be decimal digits (optionally followed by .signature)")]
    NotDecimal,
    #[error("token does not fit in an unsigned 64-bit integer")]
    Overflow,
    #[error("token signature is not valid base64url of an Ed25519 signature")]
    BadSignatureEncoding,
}

/// A token as presented, before any signature check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    Plain(u64),
    Signed { n: u64, sig: [u8; SIGNATURE_LEN] },
}

impl Presented {
    pub fn value(&self) -> u64 {
        match self {
            Presented::Plain(n) | Presented::Signed { n, .. } => *n,
        }
    }

    /// Parses `n` or `n.sig`. Surrounding ASCII whitespace is ignored (header
    /// values and SQL literals often carry it); anything else is not.
    pub fn parse(raw: &str) -> Result<Presented, TokenError> {
        let raw = raw.trim_ascii();
        match raw.split_once('.') {
            None => parse_decimal(raw).map(Presented::Plain),
            Some((n, sig)) => {
                let n = parse_decimal(n)?;
                let sig = crate::signing::decode_signature(sig)
                    .ok_or(TokenError::BadSignatureEncoding)?;
                Ok(Presented::Signed { n, sig })
            }
        }
    }
}

/// Strict decimal u64: 1 to 20 ASCII digits, no sign, no overflow.
pub fn parse_decimal(s: &str) -> Result<u64, TokenError> {
    if s.is_empty() {
        return Err(TokenError::Empty);
    }
    if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(if s.bytes().all(|b| b.is_ascii_digit()) {
            TokenError::Overflow
        } else {
            TokenError::NotDecimal
        });
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(TokenError::Overflow)?;
    }
    Ok(v)
}

/// Why a presented token was not accepted as a number at all. Maps onto the
/// contract's `invalid` (400 / ZF003) and `forged` (403 / ZF003) reasons.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TokenRejection {
    #[error("invalid token: {0}")]
    Invalid(#[from] TokenError),
    #[error("unsigned token refused: this proxy requires tokens signed by the elector")]
    Unsigned { n: u64 },
    #[error("token signature does not verify for this resource")]
    Forged { n: u64 },
}

impl TokenRejection {
    /// The number the client presented, when one could be read.
    pub fn presented(&self) -> Option<u64> {
        match self {
            TokenRejection::Invalid(_) => None,
            TokenRejection::Unsigned { n } | TokenRejection::Forged { n } => Some(*n),
        }
    }

    /// Whether the contract calls this `forged` (audited, 403) rather than
    /// `invalid` (400). An unsigned token where signatures are required is a
    /// forgery attempt in effect: it claims a leadership nobody vouched for.
    pub fn is_forged(&self) -> bool {
        !matches!(self, TokenRejection::Invalid(_))
    }
}

/// What a proxy accepts. Without a verifier, signatures are not checked (the
/// number is used); with one, only signed tokens are accepted unless plain
/// ones are explicitly allowed.
#[derive(Clone, Default)]
pub struct TokenPolicy {
    pub verifier: Option<Verifier>,
    pub allow_plain: bool,
}

impl TokenPolicy {
    pub fn plain() -> Self {
        TokenPolicy {
            verifier: None,
            allow_plain: true,
        }
    }

    /// Turns a raw token into the number to fence with, or says why not.
    pub fn check(&self, resource: &str, raw: &str) -> Result<u64, TokenRejection> {
        self.verify(resource, Presented::parse(raw)?)
    }

    /// The number to fence `resource` with, for a token already parsed.
    pub fn verify(&self, resource: &str, presented: Presented) -> Result<u64, TokenRejection> {
        match (&self.verifier, presented) {
            (None, p) => Ok(p.value()),
            (Some(_), Presented::Plain(n)) if self.allow_plain => Ok(n),
            (Some(_), Presented::Plain(n)) => Err(TokenRejection::Unsigned { n }),
            (Some(v), Presented::Signed { n, sig }) => {
                if v.verify(resource, n, &sig) {
                    Ok(n)
                } else {
                    Err(TokenRejection::Forged { n })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_decimal() {
        assert_eq!(parse_decimal("0"), Ok(0));
        assert_eq!(parse_decimal("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_decimal("18446744073709551616"),
            Err(TokenError::Overflow)
        );
        assert_eq!(parse_decimal("-1"), Err(TokenError::NotDecimal));
        assert_eq!(parse_decimal("+1"), Err(TokenError::NotDecimal));
        assert_eq!(parse_decimal("0x10"), Err(TokenError::NotDecimal));
        assert_eq!(parse_decimal("1 2"), Err(TokenError::NotDecimal));
        assert_eq!(parse_decimal(""), Err(TokenError::Empty));
        assert_eq!(Presented::parse(" 7 "), Ok(Presented::Plain(7)));
        assert_eq!(
            Presented::parse("7."),
            Err(TokenError::BadSignatureEncoding)
        );
    }

    proptest! {
        #[test]
        fn every_u64_round_trips(n: u64) {
            prop_assert_eq!(parse_decimal(&n.to_string()), Ok(n));
        }

        #[test]
        fn never_panics_and_only_digits_parse(s in "\\PC{0,40}") {
            let r = parse_decimal(&s);
            if r.is_ok() {
                prop_assert!(s.bytes().all(|b| b.is_ascii_digit()));
                let shown = r.unwrap().to_string();
                prop_assert_eq!(shown.trim_start_matches('0'), s.trim_start_matches('0'));
            }
            let _ = Presented::parse(&s);
        }
    }
}
