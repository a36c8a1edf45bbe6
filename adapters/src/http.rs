//! Which HTTP requests are writes.
//!
//! Kept apart from the proxy so the rule is one function both the proxy and
//! its tests use: a request is a write when its method is in the configured
//! set (POST, PUT, PATCH, DELETE by default). Unknown extension methods are
//! writes too unless configured otherwise: failing closed beats letting a
//! `PURGE` or `MKCOL` through unfenced.

use http::Method;

/// The configured set of write methods.
#[derive(Debug, Clone)]
pub struct WriteMethods {
    methods: Vec<Method>,
}

impl Default for WriteMethods {
    fn default() -> Self {
        WriteMethods {
            methods: vec![Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
        }
    }
}

/// Methods that are reads by definition (RFC 9110 safe methods).
const SAFE: [Method; 4] = [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE];

impl WriteMethods {
    /// Builds the set from method names; an invalid name is an error.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, http::method::InvalidMethod> {
        let methods = names
            .iter()
            .map(|n| Method::from_bytes(n.as_ref().trim().to_ascii_uppercase().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WriteMethods { methods })
    }

    pub fn is_write(&self, method: &Method) -> bool {
        if self.methods.contains(method) {
            return true;
        }
        // CONNECT and extension methods are not safe: treat as writes.
        !SAFE.contains(method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_writes_and_reads() {
        let w = WriteMethods::default();
        for m in ["POST", "PUT", "PATCH", "DELETE", "PURGE", "MKCOL"] {
            assert!(
                w.is_write(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(!w.is_write(&m), "{m}");
        }
    }
}
