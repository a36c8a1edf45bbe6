//! Fencing tokens, the resource they are scoped to, and the forms a write
//! carries them in: HTTP headers, Postgres startup options, a `SET`, or a
//! leading statement comment.
//!
//! A [`Fencing`] is built once per lease term and cloned into every write,
//! so it keeps its header values ready-made: attaching it to a request
//! copies two reference-counted buffers and parses nothing.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::Error;

/// The request header that carries the token (`Fencing-Token`).
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("fencing-token");
/// The request header that names the resource (`Fencing-Resource`).
pub const RESOURCE_HEADER: HeaderName = HeaderName::from_static("fencing-resource");
/// The header of a `409` naming the token that now holds the fence.
pub const CURRENT_TOKEN_HEADER: HeaderName = HeaderName::from_static("fencing-current-token");

/// The environment variables `fencepost lease run` sets for its command.
pub const ENV_TOKEN: &str = "FENCING_TOKEN";
/// See [`ENV_TOKEN`].
pub const ENV_RESOURCE: &str = "FENCING_RESOURCE";
/// See [`ENV_TOKEN`].
pub const ENV_HOLDER: &str = "FENCING_HOLDER";
/// See [`ENV_TOKEN`].
pub const ENV_ELECTOR: &str = "FENCING_ELECTOR";

/// Longest resource name, in characters.
const MAX_RESOURCE: usize = 128;
/// Longest signature part accepted locally. An Ed25519 signature is 86
/// base64url characters; the proxy verifies it, this only bounds garbage.
const MAX_SIGNATURE: usize = 128;

/// A token as the elector issued it: `n` (decimal) or `n.signature` when
/// the elector signs tokens. Higher `n` is newer. The text is what a write
/// presents; [`value`](Self::value) is what proxies compare.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FencingToken {
    text: Arc<str>,
    header: HeaderValue,
    value: u64,
}

impl FencingToken {
    /// Parses a token as the elector returns it.
    ///
    /// ```
    /// use fencepost_client::FencingToken;
    /// let t = FencingToken::parse("42").unwrap();
    /// assert_eq!(t.value(), 42);
    /// let signed = FencingToken::parse("7.c2lnbmF0dXJl").unwrap();
    /// assert_eq!((signed.value(), signed.is_signed()), (7, true));
    /// assert!(FencingToken::parse("-1").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<FencingToken, Error> {
        let bad = |why: &str| Error::InvalidArgument(format!("token {text:?}: {why}"));
        let (digits, sig) = match text.split_once('.') {
            Some((d, s)) => (d, Some(s)),
            None => (text, None),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "must be decimal digits, optionally followed by .signature",
            ));
        }
        let value: u64 = digits
            .parse()
            .map_err(|_| bad("does not fit in an unsigned 64-bit integer"))?;
        if let Some(s) = sig {
            let ok = !s.is_empty()
                && s.len() <= MAX_SIGNATURE
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(bad("the signature must be base64url"));
            }
        }
        let header = HeaderValue::from_str(text).map_err(|_| bad("not a header value"))?;
        Ok(FencingToken {
            text: Arc::from(text),
            header,
            value,
        })
    }

    /// The number proxies compare.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// The token exactly as issued (what a write presents).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it carries the elector's signature.
    pub fn is_signed(&self) -> bool {
        self.text.contains('.')
    }

    /// The token as a header value, ready-made.
    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FencingToken({})", self.text)
    }
}

impl std::str::FromStr for FencingToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        FencingToken::parse(s)
    }
}

/// Checks a resource name: 1-128 characters of `A-Z a-z 0-9 . _ : / -`.
pub fn validate_resource(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_RESOURCE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "resource {name:?}: must be 1-{MAX_RESOURCE} characters of A-Z a-z 0-9 . _ : / -"
        )))
    }
}

/// A token and the resource it fences: everything a write must carry.
///
/// Get one from a [`Lease`](crate::Lease) (`lease.fencing()`), from the
/// environment `fencepost lease run` sets ([`Fencing::from_env`]), or build
/// one from parts ([`Fencing::new`]).
///
/// ```
/// use fencepost_client::Fencing;
/// let f = Fencing::new("orders", "42").unwrap();
/// assert_eq!(f.pg_options(), "-c fencing.token=42 -c fencing.resource=orders");
/// assert_eq!(f.sql_comment(), "/* fencing.token=42 fencing.resource=orders */");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Fencing {
    resource: Arc<str>,
    resource_header: HeaderValue,
    token: FencingToken,
}

impl Fencing {
    /// A resource name and a token text, both checked.
    pub fn new(resource: &str, token: &str) -> Result<Fencing, Error> {
        Fencing::with_token(resource, FencingToken::parse(token)?)
    }

    /// A resource name (checked) and an already parsed token.
    pub fn with_token(resource: &str, token: FencingToken) -> Result<Fencing, Error> {
        validate_resource(resource)?;
        let resource_header = HeaderValue::from_str(resource)
            .map_err(|_| Error::InvalidArgument(format!("resource {resource:?}")))?;
        Ok(Fencing {
            resource: Arc::from(resource),
            resource_header,
            token,
        })
    }

    /// What `fencepost lease run` hands its command: `FENCING_TOKEN` and
    /// `FENCING_RESOURCE`.
    pub fn from_env() -> Result<Fencing, Error> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                Error::InvalidArgument(format!(
                    "{name} is not set (run this under `fencepost lease run`)"
                ))
            })
        };
        Fencing::new(&var(ENV_RESOURCE)?, &var(ENV_TOKEN)?)
    }

    pub fn token(&self) -> &FencingToken {
        &self.token
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Sets `Fencing-Token` and `Fencing-Resource` (replacing any present).
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        headers.insert(TOKEN_HEADER, self.token.header.clone());
        headers.insert(RESOURCE_HEADER, self.resource_header.clone());
    }

    /// The two headers as (name, value) pairs.
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 2] {
        [
            (TOKEN_HEADER, self.token.header.clone()),
            (RESOURCE_HEADER, self.resource_header.clone()),
        ]
    }

    /// The startup `options` a Postgres connection carries the token in:
    /// `-c fencing.token=T -c fencing.resource=R`. Token and resource
    /// alphabets have no spaces or backslashes, so nothing needs escaping.
    pub fn pg_options(&self) -> String {
        format!(
            "-c fencing.token={} -c fencing.resource={}",
            self.token, self.resource
        )
    }

    /// A leading statement comment that fences one statement, whatever
    /// the session carries: prefix it to the SQL text. The way to fence
    /// through a connection pool whose connections outlive a lease term.
    pub fn sql_comment(&self) -> String {
        format!(
            "/* fencing.token={} fencing.resource={} */",
            self.token, self.resource
        )
    }

    /// `SET` statements that fence the rest of a session (or, run as
    /// `SET LOCAL` by you, one transaction).
    pub fn set_statements(&self) -> String {
        format!(
            "SET fencing.token = '{}'; SET fencing.resource = '{}'",
            self.token, self.resource
        )
    }
}

impl fmt::Debug for Fencing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fencing")
            .field("resource", &&*self.resource)
            .field("token", &self.token.as_str())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly() {
        assert_eq!(FencingToken::parse("0").unwrap().value(), 0);
        assert_eq!(
            FencingToken::parse("18446744073709551615").unwrap().value(),
            u64::MAX
        );
        for bad in [
            "",
            " 1",
            "1 ",
            "+1",
            "18446744073709551616",
            "1.",
            ".abc",
            "1.a b",
            "1.a=",
            "x",
        ] {
            assert!(FencingToken::parse(bad).is_err(), "{bad:?}");
        }
        let t = FencingToken::parse("12.AbC-_9").unwrap();
        assert_eq!(
            (t.value(), t.as_str(), t.is_signed()),
            (12, "12.AbC-_9", true)
        );
        assert!(FencingToken::parse(&format!("1.{}", "a".repeat(129))).is_err());
    }

    #[test]
    fn resources_follow_the_contract_alphabet() {
        for ok in ["orders", "a", "shard/7:users.v2-x_y", &"r".repeat(128)] {
            assert!(validate_resource(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "ü", "a'b", &"r".repeat(129)] {
            assert!(validate_resource(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fencing_forms() {
        let f = Fencing::new("shard/1", "9.sig").unwrap();
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static("old"));
        f.apply_headers(&mut h);
        assert_eq!(h[TOKEN_HEADER], "9.sig");
        assert_eq!(h[RESOURCE_HEADER], "shard/1");
        assert_eq!(h.len(), 2);
        assert_eq!(
            f.set_statements(),
            "SET fencing.token = '9.sig'; SET fencing.resource = 'shard/1'"
        );
        assert!(Fencing::new("bad name", "1").is_err());
    }

    #[test]
    fn fencing_from_the_environment_lease_run_sets() {
        // The only test touching these variables.
        std::env::set_var(ENV_TOKEN, "17");
        std::env::set_var(ENV_RESOURCE, "shard/3");
        let f = Fencing::from_env().unwrap();
        assert_eq!((f.resource(), f.token().value()), ("shard/3", 17));
        std::env::set_var(ENV_TOKEN, "not a token");
        assert!(Fencing::from_env().is_err());
        std::env::remove_var(ENV_TOKEN);
        let e = Fencing::from_env().unwrap_err().to_string();
        assert!(e.contains("FENCING_TOKEN is not set"), "{e}");
    }
}
