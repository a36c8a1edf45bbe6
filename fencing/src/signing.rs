//! Ed25519-signed tokens.
//!
//! A signed token is `<n>.<base64url(signature)>`, the signature taken over
//! `"fencepost-v1" 0x00 <resource> 0x00 <n in decimal>`. Binding the resource
//! into the message stops a token granted for one resource from being
//! replayed against another; the version prefix keeps these signatures from
//! ever being valid for some other message format.
//!
//! Key files hold one line: base64url (no padding) of the 32-byte secret
//! seed or public key. Reading the files is the caller's business.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

pub const SIGNATURE_LEN: usize = 64;
const DOMAIN: &[u8] = b"fencepost-v1\0";
/// Domain + longest resource + separator + 20 digits.
const MAX_MESSAGE: usize = DOMAIN.len() + crate::resource::MAX_LEN + 1 + 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not base64url")]
    Encoding,
    #[error("key must be 32 bytes, found {0}")]
    Length(usize),
    #[error("not a valid Ed25519 public key")]
    InvalidPublic,
}

/// Calls `f` with the signed message for `resource` and `n`. Verification
/// sits on the proxies' request path, so the message is built in a stack
/// buffer; only a resource longer than any valid name (which no proxy
/// verifies for, it refuses the name first) takes a heap one. The message
/// is never cut short: a truncated one would let a signature for one
/// number verify for another.
fn with_message<R>(resource: &str, n: u64, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let parts = [DOMAIN, resource.as_bytes(), &[0], &digits[i..]];
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_MESSAGE {
        return f(&parts.concat());
    }
    let mut buf = [0u8; MAX_MESSAGE];
    let mut at = 0;
    for p in parts {
        buf[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    f(&buf[..len])
}

fn decode_key(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| KeyError::Encoding)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

pub(crate) fn decode_signature(text: &str) -> Option<[u8; SIGNATURE_LEN]> {
    let mut out = [0u8; SIGNATURE_LEN];
    // 64 bytes encode to 86 characters without padding.
    if text.len() != 86 {
        return None;
    }
    match URL_SAFE_NO_PAD.decode_slice(text, &mut out) {
        Ok(SIGNATURE_LEN) => Some(out),
        _ => None,
    }
}

/// The elector's signing key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl Signer {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Signer {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Parses the contents of a secret key file.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(Self::from_seed)
    }

    pub fn seed_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.to_bytes())
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            key: self.key.verifying_key(),
        }
    }

    /// The token string the elector hands out for `n` on `resource`.
    pub fn sign(&self, resource: &str, n: u64) -> String {
        let sig = with_message(resource, n, |m| self.key.sign(m));
        format!("{n}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

/// A proxy's copy of the elector's public key.
#[derive(Clone)]
pub struct Verifier {
    key: VerifyingKey,
}

impl Verifier {
    /// Parses the contents of a public key file.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_key(text)?;
        VerifyingKey::from_bytes(&bytes)
            .map(|key| Verifier { key })
            .map_err(|_| KeyError::InvalidPublic)
    }

    pub fn public_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.to_bytes())
    }

    /// Strict verification: rejects the malleable and small-order forms that
    /// plain `verify` would let an attacker use to mint a second valid
    /// signature for the same token.
    pub fn verify(&self, resource: &str, n: u64, sig: &[u8; SIGNATURE_LEN]) -> bool {
        with_message(resource, n, |m| {
            self.key
                .verify_strict(m, &Signature::from_bytes(sig))
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{TokenPolicy, TokenRejection};

    fn signer() -> Signer {
        Signer::from_seed([7; 32])
    }

    #[test]
    fn signed_tokens_verify_only_for_their_resource_and_number() {
        let s = signer();
        let policy = TokenPolicy {
            verifier: Some(s.verifier()),
            allow_plain: false,
        };
        let tok = s.sign("orders", 42);
        assert_eq!(policy.check("orders", &tok), Ok(42));
        // Replayed against another resource.
        assert_eq!(
            policy.check("payments", &tok),
            Err(TokenRejection::Forged { n: 42 })
        );
        // Number changed, signature kept.
        let (_, sig) = tok.split_once('.').unwrap();
        assert_eq!(
            policy.check("orders", &format!("43.{sig}")),
            Err(TokenRejection::Forged { n: 43 })
        );
        // Unsigned where signatures are required.
        assert_eq!(
            policy.check("orders", "9223372036854775808"),
            Err(TokenRejection::Unsigned {
                n: 9223372036854775808
            })
        );
        // Signed by another key.
        let other = Signer::from_seed([8; 32]).sign("orders", 42);
        assert_eq!(
            policy.check("orders", &other),
            Err(TokenRejection::Forged { n: 42 })
        );
    }

    /// Found by the `token` fuzz target (fuzz/regressions/token): with a
    /// resource past 128 bytes the message was cut at a fixed length, so
    /// the number's last digits (or all of them) were not signed, and a
    /// token for `n` verified for `n ^ 1`.
    #[test]
    fn long_resources_sign_the_whole_message() {
        let s = signer();
        let policy = TokenPolicy {
            verifier: Some(s.verifier()),
            allow_plain: false,
        };
        for len in [128, 129, 130, 149, 150, 400] {
            let r = "x".repeat(len);
            let n = 18_446_744_069_481_706_546;
            let tok = s.sign(&r, n);
            assert_eq!(policy.check(&r, &tok), Ok(n), "{len}");
            let (_, sig) = tok.split_once('.').unwrap();
            assert_eq!(
                policy.check(&r, &format!("{}.{sig}", n + 1)),
                Err(TokenRejection::Forged { n: n + 1 }),
                "{len}"
            );
            assert_eq!(
                policy.check(&format!("{r}y"), &tok),
                Err(TokenRejection::Forged { n }),
                "{len}"
            );
        }
    }

    #[test]
    fn keys_round_trip_through_text() {
        let s = signer();
        let again = Signer::from_text(&s.seed_text()).unwrap();
        let v = Verifier::from_text(&s.verifier().public_text()).unwrap();
        let tok = again.sign("r", u64::MAX);
        let (n, sig) = tok.split_once('.').unwrap();
        assert_eq!(n, u64::MAX.to_string());
        assert!(v.verify("r", u64::MAX, &decode_signature(sig).unwrap()));
        assert!(matches!(
            Verifier::from_text("not base64!"),
            Err(KeyError::Encoding)
        ));
    }
}
