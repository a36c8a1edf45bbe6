//! Which HTTP requests are writes, and what fencing headers they carry.
//!
//! Kept apart from the proxy so the rules are functions both the proxy and
//! its tests (and the fuzzers) use: a request is a write when its method is
//! in the configured set (POST, PUT, PATCH, DELETE by default). Unknown
//! extension methods are writes too unless configured otherwise: failing
//! closed beats letting a `PURGE` or `MKCOL` through unfenced.
//!
//! The token and resource come from the `Fencing-Token` and
//! `Fencing-Resource` headers, the resource otherwise from the route whose
//! path prefix matches ([`fencing_headers`]).

use std::borrow::Cow;

use http::{HeaderMap, Method};

use crate::http1::path::{normalize, without_parameters, PathError};

/// The request header that carries the token.
pub const TOKEN_HEADER: &str = "fencing-token";
/// The request header that names the resource.
pub const RESOURCE_HEADER: &str = "fencing-resource";

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

/// A fencing header as the fencer should see it. A header sent twice or
/// with bytes outside visible ASCII is passed on in a form that can never
/// validate, so the fencer refuses and audits it like any invalid value
/// instead of the proxy guessing which copy was meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderText<'a> {
    Ok(Cow<'a, str>),
    Repeated(String),
    NotText(String),
    /// Not taken from a header at all: the write's path decides the
    /// resource through a route, and the request contradicts or escapes
    /// it. `text` never validates; `why` says what to fix.
    Unroutable {
        text: String,
        why: String,
    },
}

impl HeaderText<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            HeaderText::Ok(s) => s,
            HeaderText::Repeated(s) | HeaderText::NotText(s) => s,
            HeaderText::Unroutable { text, .. } => text,
        }
    }

    /// Why the value can never be valid, for the problem response's
    /// detail; `None` for a value that was read as sent.
    pub fn problem(&self, name: &str) -> Option<String> {
        match self {
            HeaderText::Ok(_) => None,
            HeaderText::Repeated(_) => Some(format!("{name} appears more than once")),
            HeaderText::NotText(_) => Some(format!("{name} is not visible ASCII text")),
            HeaderText::Unroutable { why, .. } => Some(why.clone()),
        }
    }
}

/// The value of header `name`, if the request has it.
pub fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<HeaderText<'a>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        // ',' is in neither the token nor the resource alphabet.
        let all: Vec<Cow<'_, str>> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        return Some(HeaderText::Repeated(all.join(",")));
    }
    Some(match first.to_str() {
        Ok(s) => HeaderText::Ok(Cow::Borrowed(s)),
        // The replacement character keeps it invalid whatever the bytes.
        Err(_) => HeaderText::NotText(format!(
            "\u{fffd}{}",
            String::from_utf8_lossy(first.as_bytes())
        )),
    })
}

/// The resource of the first route whose prefix `path` starts with,
/// ASCII case ignored: an upstream that ignores case must not be reachable
/// around a route (`/KV/1` for `/kv/`). `routes` are `(prefix, resource)`,
/// longest prefix first, so the first match is the most specific. `path`
/// should be normalised first ([`crate::http1::path::normalize`]).
pub fn route_resource<'r>(routes: &'r [(String, String)], path: &str) -> Option<&'r str> {
    routes
        .iter()
        .find(|(prefix, _)| starts_with_ignore_case(path, prefix))
        .map(|(_, r)| r.as_str())
}

fn starts_with_ignore_case(path: &str, prefix: &str) -> bool {
    path.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// The token and resource a write presents: the `Fencing-Token` header;
/// the `Fencing-Resource` header, or else the resource of the route that
/// matches `path` (see [`route_resource`]).
///
/// Where routes are configured, a path a route matches belongs to that
/// route's resource. A `Fencing-Resource` header naming another resource
/// is refused: otherwise a writer could be fenced on one resource and
/// write another's path. The route is decided on the normalised path
/// (RFC 3986 section 6: `/%6bv/` is `/kv/`), and a path an upstream might
/// resolve to a different route than the one the proxy matched is refused
/// ([`crate::http1::path`]: dot segments, `//`, `;`, encoded separators,
/// double encoding).
pub fn fencing_headers<'a>(
    headers: &'a HeaderMap,
    path: &str,
    routes: &'a [(String, String)],
) -> (Option<HeaderText<'a>>, Option<HeaderText<'a>>) {
    let token = header_text(headers, TOKEN_HEADER);
    let header = header_text(headers, RESOURCE_HEADER);
    if routes.is_empty() {
        return (token, header);
    }
    let path = match normalize(path) {
        Ok(p) => p,
        Err(e) => {
            let why = format!(
                "{e}; the route (and so the resource) the request reaches cannot be decided"
            );
            return (token, Some(unroutable(why)));
        }
    };
    // An upstream that cuts `;` parameters off must reach the same route.
    let routed = route_resource(routes, &path);
    match without_parameters(&path) {
        Ok(bare) if route_resource(routes, &bare) == routed => {}
        Ok(_) | Err(_) => {
            let why = format!(
                "{}; the route (and so the resource) the request reaches cannot be decided",
                PathError::Parameters
            );
            return (token, Some(unroutable(why)));
        }
    }
    let resource = match (header, routed) {
        (Some(HeaderText::Ok(named)), Some(routed)) if named != routed => {
            Some(unroutable(format!(
                "Fencing-Resource names {named:?}, but this path belongs to the route of {routed:?}"
            )))
        }
        (Some(h), _) => Some(h),
        (None, routed) => routed.map(|r| HeaderText::Ok(Cow::Borrowed(r))),
    };
    (token, resource)
}

fn unroutable(why: String) -> HeaderText<'static> {
    // U+FFFD is in no token's or resource's alphabet.
    HeaderText::Unroutable {
        text: "\u{fffd}unroutable".to_owned(),
        why,
    }
}

/// Whether `path` decides a route as it is: no segment, escape or path
/// parameter that an upstream might resolve differently (see
/// [`crate::http1::path`]).
pub fn plain_path(path: &str) -> bool {
    normalize(path).is_ok_and(|p| without_parameters(&p).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn repeated_and_binary_headers_never_validate() {
        let mut h = HeaderMap::new();
        h.append(TOKEN_HEADER, HeaderValue::from_static("5"));
        h.append(TOKEN_HEADER, HeaderValue::from_static("5"));
        let t = header_text(&h, TOKEN_HEADER).unwrap();
        assert!(fencing::TokenPolicy::plain()
            .check("r", t.as_str())
            .is_err());
        assert!(t.problem("Fencing-Token").is_some());

        let mut h = HeaderMap::new();
        h.insert(
            RESOURCE_HEADER,
            HeaderValue::from_bytes(b"ord\xffers").unwrap(),
        );
        let r = header_text(&h, RESOURCE_HEADER).unwrap();
        assert!(fencing::resource::validate(r.as_str()).is_err());

        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static(" 7 "));
        let t = header_text(&h, TOKEN_HEADER).unwrap();
        assert_eq!(fencing::TokenPolicy::plain().check("r", t.as_str()), Ok(7));
        assert!(header_text(&h, RESOURCE_HEADER).is_none());
    }

    #[test]
    fn a_routed_path_keeps_its_resource() {
        let routes = vec![
            ("/orders/".to_owned(), "orders".to_owned()),
            ("/payments/".to_owned(), "payments".to_owned()),
        ];
        let mut h = HeaderMap::new();
        h.insert(RESOURCE_HEADER, HeaderValue::from_static("orders"));
        let (_, r) = fencing_headers(&h, "/orders/1", &routes);
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("orders"));
        // Another resource's route: refused, with a reason.
        let (_, r) = fencing_headers(&h, "/payments/a", &routes);
        let r = r.unwrap();
        assert!(fencing::resource::validate(r.as_str()).is_err());
        assert!(r.problem("Fencing-Resource").unwrap().contains("payments"));
        // An unrouted path may name its resource.
        let (_, r) = fencing_headers(&h, "/other/1", &routes);
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("orders"));
        for escape in [
            "/orders/../payments/a",
            "/orders/%2e%2e/payments/a",
            "/orders/.%2E/payments/a",
            "/orders/..%2fpayments/a",
            "/orders/x%5c..%5cpayments",
            "/orders/./a",
            "/orders/..",
        ] {
            let none = HeaderMap::new();
            let (_, r) = fencing_headers(&none, escape, &routes);
            let r = r.unwrap();
            assert!(fencing::resource::validate(r.as_str()).is_err(), "{escape}");
            assert!(r.problem("Fencing-Resource").is_some(), "{escape}");
        }
        // Dots inside a segment are just names.
        assert!(plain_path("/orders/v1.2/..x/a..b"));
        // Without routes the path plays no part.
        let (_, r) = fencing_headers(&h, "/orders/../x", &[]);
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("orders"));
    }

    #[test]
    fn resource_header_names_an_unrouted_path() {
        let routes = vec![
            ("/orders/eu/".to_owned(), "orders-eu".to_owned()),
            ("/orders/".to_owned(), "orders".to_owned()),
        ];
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static("9"));
        let (t, r) = fencing_headers(&h, "/orders/eu/1", &routes);
        assert_eq!(t.as_ref().map(HeaderText::as_str), Some("9"));
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("orders-eu"));
        let (_, r) = fencing_headers(&h, "/orders/us/1", &routes);
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("orders"));
        let (_, r) = fencing_headers(&h, "/other", &routes);
        assert_eq!(r, None);

        h.insert(RESOURCE_HEADER, HeaderValue::from_static("payments"));
        let (_, r) = fencing_headers(&h, "/other/1", &routes);
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("payments"));
        // A bad header is not replaced by the route: it is refused.
        h.append(RESOURCE_HEADER, HeaderValue::from_static("orders"));
        let (_, r) = fencing_headers(&h, "/orders/eu/1", &routes);
        assert_eq!(r.as_ref().map(HeaderText::as_str), Some("payments,orders"));
    }

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
