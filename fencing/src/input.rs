//! What a write presents, parsed once where it enters ("parse, don't
//! validate"): a resource name and a [`Presented`] token, or for each a
//! typed [`InputError`] saying why not. Both front ends (HTTP headers and
//! routes; Postgres startup options, `SET fencing.*` and comments) produce
//! a [`FenceInput`]; the decision reads only typed values, so nothing is
//! validated twice and no error travels as text built to fail later.

use crate::resource::{ResourceError, ResourceRef};
use crate::token::{Presented, TokenError};

/// The fencing inputs of one write. The resource is borrowed from where it
/// was presented, so building one allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceInput<'a> {
    pub resource: Result<ResourceRef<'a>, InputError>,
    pub token: Result<Presented, InputError>,
}

/// Which input a refusal is about, so a client knows what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Resource,
    Token,
}

/// Why an input has no usable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// Not presented.
    #[error("not presented")]
    Missing,
    /// Presented more than once (an HTTP header sent twice).
    #[error("appears more than once")]
    Repeated,
    /// Not visible ASCII text (an HTTP header's bytes).
    #[error("is not visible ASCII text")]
    NotText,
    /// The request contradicts or escapes the resource its route decides;
    /// says what to fix.
    #[error("{0}")]
    Unroutable(String),
    #[error("{0}")]
    Resource(#[from] ResourceError),
    #[error("{0}")]
    Token(#[from] TokenError),
}

/// A resource name as presented.
pub fn resource(text: &str) -> Result<ResourceRef<'_>, InputError> {
    Ok(ResourceRef::new(text)?)
}

/// A token as presented (surrounding ASCII whitespace ignored).
pub fn token(text: &str) -> Result<Presented, InputError> {
    Ok(Presented::parse(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_parse_once_into_types_or_typed_errors() {
        assert_eq!(resource("orders").map(|r| r.as_str()), Ok("orders"));
        assert_eq!(
            resource(""),
            Err(InputError::Resource(ResourceError::Empty))
        );
        assert_eq!(token(" 7 "), Ok(Presented::Plain(7)));
        assert_eq!(token("-1"), Err(InputError::Token(TokenError::NotDecimal)));
        assert_eq!(token(" "), Err(InputError::Token(TokenError::Empty)));
    }
}
