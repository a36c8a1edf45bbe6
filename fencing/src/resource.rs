//! Resource names: the unit one leader at a time may write.
//!
//! Names travel in headers, SQL comments, URLs and store rows, so the
//! alphabet is deliberately small (`[A-Za-z0-9._:/-]`, 1 to 128 bytes): no
//! quoting, escaping or injection question can arise anywhere downstream.

use std::fmt;
use std::sync::Arc;

/// Longest accepted resource name, in bytes.
pub const MAX_LEN: usize = 128;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("resource name is empty")]
    Empty,
    #[error("resource name is {0} bytes long; at most 128 are allowed")]
    TooLong(usize),
    #[error("resource name contains {0:?}; only A-Z a-z 0-9 . _ : / - are allowed")]
    BadChar(char),
}

/// A validated resource name. Shared, not copied, when cloned: a Postgres
/// session files its resource with every write it admits, and that must
/// not allocate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceName(Arc<str>);

/// Checks a candidate name without allocating, so hot paths can validate a
/// borrowed header value before deciding whether they need an owned name.
pub fn validate(s: &str) -> Result<(), ResourceError> {
    if s.is_empty() {
        return Err(ResourceError::Empty);
    }
    if s.len() > MAX_LEN {
        return Err(ResourceError::TooLong(s.len()));
    }
    match s.bytes().find(|b| !is_name_byte(*b)) {
        None => Ok(()),
        Some(b) => {
            // Report the offending character, not a byte of it.
            let c = s
                .chars()
                .find(|c| !c.is_ascii() || !is_name_byte(*c as u8))
                .unwrap_or(b as char);
            Err(ResourceError::BadChar(c))
        }
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-')
}

impl ResourceName {
    pub fn new(s: &str) -> Result<Self, ResourceError> {
        validate(s)?;
        Ok(ResourceName(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ResourceName {
    type Err = ResourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourceName::new(s)
    }
}

impl AsRef<str> for ResourceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated resource name borrowed from where it was presented (a
/// header, a route, a session variable): the decision's form of a name,
/// which costs no allocation on the hot path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef<'a>(&'a str);

impl<'a> ResourceRef<'a> {
    pub fn new(s: &'a str) -> Result<Self, ResourceError> {
        validate(s)?;
        Ok(ResourceRef(s))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }

    pub fn to_name(&self) -> ResourceName {
        ResourceName(self.0.into())
    }
}

impl ResourceName {
    /// The name as the decision takes it.
    pub fn as_ref_name(&self) -> ResourceRef<'_> {
        ResourceRef(&self.0)
    }
}

impl PartialEq<ResourceName> for ResourceRef<'_> {
    fn eq(&self, other: &ResourceName) -> bool {
        self.0 == &*other.0
    }
}

impl fmt::Display for ResourceRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for ResourceRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Debug for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for ResourceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ResourceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ResourceName::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "orders", "shard:7/eu-west.1_x", &"x".repeat(128)] {
            assert!(ResourceName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(ResourceName::new(""), Err(ResourceError::Empty));
        assert_eq!(
            ResourceName::new(&"x".repeat(129)),
            Err(ResourceError::TooLong(129))
        );
        assert_eq!(ResourceName::new("a b"), Err(ResourceError::BadChar(' ')));
        assert_eq!(ResourceName::new("a'b"), Err(ResourceError::BadChar('\'')));
        assert_eq!(ResourceName::new("é"), Err(ResourceError::BadChar('é')));
        assert_eq!(ResourceName::new("a\0"), Err(ResourceError::BadChar('\0')));
    }

    proptest! {
        #[test]
        fn valid_iff_alphabet_and_length(s in "\\PC{0,140}") {
            let expected = !s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(is_name_byte);
            prop_assert_eq!(ResourceName::new(&s).is_ok(), expected);
        }
    }
}
