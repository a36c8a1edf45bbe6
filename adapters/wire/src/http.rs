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

use fencing::input::{self, FenceInput, InputError};
use fencing::ResourceName;
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

/// The value of header `name`: `None` when the request has none; a typed
/// error when it is sent twice or is not visible ASCII, so the proxy never
/// guesses which copy was meant.
pub fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<Result<&'a str, InputError>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return Some(Err(InputError::Repeated));
    }
    Some(first.to_str().map_err(|_| InputError::NotText))
}

/// The resource of the first route whose prefix `path` starts with,
/// ASCII case ignored: an upstream that ignores case must not be reachable
/// around a route (`/KV/1` for `/kv/`). `routes` are `(prefix, resource)`,
/// longest prefix first, so the first match is the most specific. `path`
/// should be normalised first ([`crate::http1::path::normalize`]).
pub fn route_resource<'r>(
    routes: &'r [(String, ResourceName)],
    path: &str,
) -> Option<&'r ResourceName> {
    routes
        .iter()
        .find(|(prefix, _)| starts_with_ignore_case(path, prefix))
        .map(|(_, r)| r)
}

fn starts_with_ignore_case(path: &str, prefix: &str) -> bool {
    path.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// The token and resource a write presents, parsed: the `Fencing-Token`
/// header; the `Fencing-Resource` header, or else the resource of the
/// route that matches `path` (see [`route_resource`]).
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
    routes: &'a [(String, ResourceName)],
) -> FenceInput<'a> {
    fence_input(
        header_text(headers, TOKEN_HEADER),
        header_text(headers, RESOURCE_HEADER),
        path,
        routes,
    )
}

/// [`fencing_headers`] from the two header values as found (`None`: not
/// sent; an error: sent twice or not text), for a proxy that reads its
/// headers without a `HeaderMap` (the byte relay, over
/// [`crate::http1::head`]).
pub fn fence_input<'a>(
    token: Option<Result<&'a str, InputError>>,
    header: Option<Result<&'a str, InputError>>,
    path: &str,
    routes: &'a [(String, ResourceName)],
) -> FenceInput<'a> {
    let token = match token {
        None => Err(InputError::Missing),
        Some(text) => text.and_then(input::token),
    };
    let from_header = |h: Option<Result<&'a str, InputError>>| match h {
        None => Err(InputError::Missing),
        Some(text) => text.and_then(input::resource),
    };
    if routes.is_empty() {
        return FenceInput {
            resource: from_header(header),
            token,
        };
    }
    let unroutable = |e: &dyn std::fmt::Display| {
        Err(InputError::Unroutable(format!(
            "{e}; the route (and so the resource) the request reaches cannot be decided"
        )))
    };
    let path = match normalize(path) {
        Ok(p) => p,
        Err(e) => {
            return FenceInput {
                resource: unroutable(&e),
                token,
            }
        }
    };
    // An upstream that cuts `;` parameters off must reach the same route.
    let routed = route_resource(routes, &path);
    match without_parameters(&path) {
        Ok(bare) if route_resource(routes, &bare) == routed => {}
        Ok(_) | Err(_) => {
            return FenceInput {
                resource: unroutable(&PathError::Parameters),
                token,
            }
        }
    }
    let resource = match (header, routed) {
        (Some(Ok(named)), Some(routed)) if named != routed.as_str() => {
            Err(InputError::Unroutable(format!(
                "Fencing-Resource names {named:?}, but this path belongs to the route of {routed:?}"
            )))
        }
        (Some(h), _) => from_header(Some(h)),
        (None, Some(routed)) => Ok(routed.as_ref_name()),
        (None, None) => Err(InputError::Missing),
    };
    FenceInput { resource, token }
}

/// What to tell a client about an input error of header `name` that the
/// header itself caused (sent twice, not text, contradicting its route);
/// `None` for errors of the value, which the refusal's message says.
pub fn header_problem(error: &InputError, name: &str) -> Option<String> {
    match error {
        InputError::Repeated => Some(format!("{name} appears more than once")),
        InputError::NotText => Some(format!("{name} is not visible ASCII text")),
        InputError::Unroutable(why) => Some(why.clone()),
        _ => None,
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
    use fencing::Presented;
    use http::HeaderValue;

    fn routes(list: &[(&str, &str)]) -> Vec<(String, ResourceName)> {
        list.iter()
            .map(|(p, r)| ((*p).to_owned(), ResourceName::new(r).unwrap()))
            .collect()
    }

    fn resource<'a>(i: &FenceInput<'a>) -> Result<&'a str, InputError> {
        i.resource.clone().map(|r| r.as_str())
    }

    #[test]
    fn repeated_and_binary_headers_are_typed_errors() {
        let mut h = HeaderMap::new();
        h.append(TOKEN_HEADER, HeaderValue::from_static("5"));
        h.append(TOKEN_HEADER, HeaderValue::from_static("5"));
        let i = fencing_headers(&h, "/", &[]);
        assert_eq!(i.token, Err(InputError::Repeated));
        assert_eq!(
            header_problem(&InputError::Repeated, "Fencing-Token").as_deref(),
            Some("Fencing-Token appears more than once")
        );

        let mut h = HeaderMap::new();
        h.insert(
            RESOURCE_HEADER,
            HeaderValue::from_bytes(b"ord\xffers").unwrap(),
        );
        let i = fencing_headers(&h, "/", &[]);
        assert_eq!(i.resource, Err(InputError::NotText));
        assert_eq!(i.token, Err(InputError::Missing));

        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static(" 7 "));
        let i = fencing_headers(&h, "/", &[]);
        assert_eq!(i.token, Ok(Presented::Plain(7)));
        assert_eq!(i.resource, Err(InputError::Missing));
        // A blank header is presented, and invalid (not missing).
        h.insert(RESOURCE_HEADER, HeaderValue::from_static(""));
        let i = fencing_headers(&h, "/", &[]);
        assert!(matches!(i.resource, Err(InputError::Resource(_))));
    }

    #[test]
    fn a_routed_path_keeps_its_resource() {
        let routes = routes(&[("/orders/", "orders"), ("/payments/", "payments")]);
        let mut h = HeaderMap::new();
        h.insert(RESOURCE_HEADER, HeaderValue::from_static("orders"));
        assert_eq!(
            resource(&fencing_headers(&h, "/orders/1", &routes)),
            Ok("orders")
        );
        // Another resource's route: refused, with a reason.
        let i = fencing_headers(&h, "/payments/a", &routes);
        let Err(e) = i.resource else {
            panic!("another route's resource was accepted");
        };
        assert!(header_problem(&e, "Fencing-Resource")
            .unwrap()
            .contains("payments"));
        // An unrouted path may name its resource.
        assert_eq!(
            resource(&fencing_headers(&h, "/other/1", &routes)),
            Ok("orders")
        );
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
            let i = fencing_headers(&none, escape, &routes);
            assert!(
                matches!(i.resource, Err(InputError::Unroutable(_))),
                "{escape}"
            );
        }
        // Dots inside a segment are just names.
        assert!(plain_path("/orders/v1.2/..x/a..b"));
        // Without routes the path plays no part.
        assert_eq!(
            resource(&fencing_headers(&h, "/orders/../x", &[])),
            Ok("orders")
        );
    }

    #[test]
    fn resource_header_names_an_unrouted_path() {
        let routes = routes(&[("/orders/eu/", "orders-eu"), ("/orders/", "orders")]);
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_static("9"));
        let i = fencing_headers(&h, "/orders/eu/1", &routes);
        assert_eq!(i.token, Ok(Presented::Plain(9)));
        assert_eq!(resource(&i), Ok("orders-eu"));
        assert_eq!(
            resource(&fencing_headers(&h, "/orders/us/1", &routes)),
            Ok("orders")
        );
        assert_eq!(
            resource(&fencing_headers(&h, "/other", &routes)),
            Err(InputError::Missing)
        );

        h.insert(RESOURCE_HEADER, HeaderValue::from_static("payments"));
        assert_eq!(
            resource(&fencing_headers(&h, "/other/1", &routes)),
            Ok("payments")
        );
        // A bad header is not replaced by the route: it is refused.
        h.append(RESOURCE_HEADER, HeaderValue::from_static("orders"));
        assert_eq!(
            resource(&fencing_headers(&h, "/orders/eu/1", &routes)),
            Err(InputError::Repeated)
        );
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
