//! The `token` fuzz target's checks, run in CI without AFL: over arbitrary
//! and generated inputs (proptest), and over every file of the committed
//! corpus (`fuzz/corpus/token`) and of the crashes it once found
//! (`fuzz/regressions/token`). The checks themselves are the fuzz crate's
//! (`fuzz/src/token.rs`), so the fuzzer and CI judge by the same rules.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fencepost_fencing as fencing;

#[path = "../../fuzz/src/files.rs"]
mod files;
#[path = "../../fuzz/src/token.rs"]
mod target;

use fencing::resource::{validate, MAX_LEN};
use fencing::token::{parse_decimal, Presented, TokenError, TokenPolicy, TokenRejection};
use fencing::Signer;
use proptest::prelude::*;

/// Every file under `fuzz/<dir>/<target>`, by name.
fn inputs(dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    files::inputs(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz"), dir, target)
}

#[test]
fn committed_corpus_replays_clean() {
    let corpus = inputs("corpus", "token");
    assert!(corpus.len() >= 20, "corpus missing: {} files", corpus.len());
    for (name, data) in corpus.iter().chain(&inputs("regressions", "token")) {
        let r = std::panic::catch_unwind(|| target::run(data));
        assert!(r.is_ok(), "{name} fails the token target's checks");
    }
}

/// A resource name the contract allows.
fn resource() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:/-]{1,128}"
}

#[test]
fn contract_examples() {
    for ok in [
        "0",
        "42",
        "18446744073709551615",
        "00000000000000000007",
        " 7\t",
    ] {
        assert!(Presented::parse(ok).is_ok(), "{ok:?}");
    }
    for (bad, why) in [
        ("18446744073709551616", TokenError::Overflow),
        ("99999999999999999999", TokenError::Overflow),
        ("000000000000000000001", TokenError::Overflow),
        ("-1", TokenError::NotDecimal),
        ("+1", TokenError::NotDecimal),
        ("0x1f", TokenError::NotDecimal),
        ("1_000", TokenError::NotDecimal),
        ("1e3", TokenError::NotDecimal),
        ("٣", TokenError::NotDecimal),
        ("", TokenError::Empty),
        ("  ", TokenError::Empty),
        ("7.", TokenError::BadSignatureEncoding),
        (".sig", TokenError::Empty),
    ] {
        assert_eq!(Presented::parse(bad), Err(why), "{bad:?}");
    }
}

proptest! {
    /// The fuzz target itself, on arbitrary bytes: no panic, no broken
    /// invariant.
    #[test]
    fn target_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        target::run(&data);
    }

    /// Every u64, written with up to 20 digits of zero padding and with
    /// surrounding blanks, parses to itself, plain and as the plain policy.
    #[test]
    fn canonical_decimals_parse(n: u64, width in 0usize..=20, pad in "[ \t]{0,3}") {
        let text = format!("{pad}{n:0width$}{pad}");
        prop_assert_eq!(Presented::parse(&text), Ok(Presented::Plain(n)));
        prop_assert_eq!(TokenPolicy::plain().check("r", &text), Ok(n));
        prop_assert_eq!(parse_decimal(&format!("{n:0width$}")), Ok(n));
    }

    /// Past u64::MAX or past 20 digits is Overflow, never a wrapped number.
    #[test]
    fn too_big_overflows(n in (u128::from(u64::MAX) + 1)..u128::MAX, zeros in 0usize..4) {
        let text = format!("{}{n}", "0".repeat(zeros));
        prop_assert_eq!(parse_decimal(&text), Err(TokenError::Overflow));
        prop_assert_eq!(
            TokenPolicy::plain().check("r", &text),
            Err(TokenRejection::Invalid(TokenError::Overflow))
        );
    }

    /// Anything but digits inside the number is refused, whatever the
    /// digits around it.
    #[test]
    fn non_digits_refused(a: u32, b: u32, c in "[^0-9.]") {
        let inner = format!("{a}{c}{b}");
        prop_assert!(Presented::parse(&inner).is_err(), "{:?}", inner);
        let signed = format!("{c}{a}");
        prop_assert_eq!(parse_decimal(&signed), Err(TokenError::NotDecimal));
    }

    /// Near-token text through the target's decimal and presented checks
    /// (a differential against `u64::from_str`).
    #[test]
    fn near_tokens(s in "[0-9+. \t_xa-f-]{0,24}") {
        target::check_decimal(&s);
        target::check_presented(&s);
        target::check_policies("orders", &s);
    }

    /// Resource names: arbitrary text, and text from the alphabet at every
    /// length around the limit.
    #[test]
    fn resource_names(
        any_text in prop::collection::vec(any::<u8>(), 0..200),
        len in 0usize..=(MAX_LEN + 8),
    ) {
        target::check_resource(&String::from_utf8_lossy(&any_text));
        let name = "a".repeat(len);
        target::check_resource(&name);
        prop_assert_eq!(validate(&name).is_ok(), (1..=MAX_LEN).contains(&len));
    }
}

proptest! {
    // Ed25519 in a debug build costs milliseconds per operation.
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A signed token verifies for its own resource and number only; the
    /// target's signing checks hold for any resource, valid or not.
    #[test]
    fn signed_tokens_bind_resource_and_number(r in resource(), n: u64, other in resource()) {
        let signer = Signer::from_seed(target::SEED);
        let tok = signer.sign(&r, n);
        target::check_policies(&r, &tok);
        target::check_signing(&r, &n.to_be_bytes());
        let strict = TokenPolicy { verifier: Some(signer.verifier()), allow_plain: false };
        if other != r {
            prop_assert_eq!(strict.check(&other, &tok), Err(TokenRejection::Forged { n }));
        }
        prop_assert_eq!(
            strict.check(&r, &n.to_string()),
            Err(TokenRejection::Unsigned { n })
        );
    }

    /// Any one character of the signature changed: refused, as forged or
    /// as not a signature at all, never admitted.
    #[test]
    fn tampered_signatures_refused(n: u64, at in 0usize..86, c in "[A-Za-z0-9_=+/ -]") {
        let signer = Signer::from_seed(target::SEED);
        let tok = signer.sign("orders", n);
        let (num, sig) = tok.split_once('.').unwrap();
        let mut sig: Vec<char> = sig.chars().collect();
        let c = c.chars().next().unwrap();
        prop_assume!(sig[at] != c);
        sig[at] = c;
        let tampered = format!("{num}.{}", sig.into_iter().collect::<String>());
        let strict = TokenPolicy { verifier: Some(signer.verifier()), allow_plain: true };
        let got = strict.check("orders", &tampered);
        prop_assert!(
            matches!(
                got,
                Err(TokenRejection::Forged { .. })
                    | Err(TokenRejection::Invalid(TokenError::BadSignatureEncoding))
            ),
            "{:?} for {:?}", got, tampered
        );
    }

    /// The target's signing checks with arbitrary resources, including
    /// names past the 128-byte limit.
    #[test]
    fn signing_any_resource(r in "\\PC{0,200}", n: u64) {
        target::check_signing(&r, &n.to_le_bytes());
    }
}
