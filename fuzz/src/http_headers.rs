//! The HTTP proxy's fencing headers (`wire::http::fencing_headers`).
//!
//! Input: lines split at `\n`. The first is the request path; each other
//! is `name:value`, appended in order (so names repeat), with values of any
//! bytes `http` allows (not necessarily UTF-8). Lines that `http` would
//! refuse as a name or value are skipped, as hyper would refuse them before
//! the proxy saw them.

use super::fencing;
use fencepost_wire::http::{
    fencing_headers, header_text, route_resource, HeaderText, RESOURCE_HEADER, TOKEN_HEADER,
};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// The routes the target runs with, longest prefix first as the proxy
/// sorts them.
pub fn routes() -> Vec<(String, String)> {
    [
        ("/orders/eu/", "orders-eu"),
        ("/orders/", "orders"),
        ("/kv", "kv"),
    ]
    .into_iter()
    .map(|(p, r)| (p.to_owned(), r.to_owned()))
    .collect()
}

/// Reads the input format above.
pub fn parse(data: &[u8]) -> (String, HeaderMap) {
    let mut lines = data.split(|&b| b == b'\n');
    let path = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    (path, headers)
}

/// Fuzz target `http_headers`.
pub fn run(data: &[u8]) {
    let (path, headers) = parse(data);
    check(&headers, &path, &routes());
}

/// What the proxy reads from `headers` and `path` is what was sent when it
/// was sent once as text, and otherwise something no token or resource
/// check can accept.
pub fn check(headers: &HeaderMap, path: &str, routes: &[(String, String)]) {
    let (token, resource) = fencing_headers(headers, path, routes);
    assert_eq!(token, header_text(headers, TOKEN_HEADER));
    check_one(headers, TOKEN_HEADER, token.as_ref());
    use fencepost_wire::http1::path::{normalize, without_parameters};
    let normal = normalize(path);
    let hidden = normal.as_ref().is_ok_and(|p| {
        without_parameters(p).map_or(true, |bare| {
            route_resource(routes, &bare) != route_resource(routes, p)
        })
    });
    if !routes.is_empty() && (normal.is_err() || hidden) {
        // A path that might reach another route: refused whatever it says.
        assert!(matches!(resource, Some(HeaderText::Unroutable { .. })));
        return;
    }
    // Without routes the path plays no part.
    let normal = normal.map_or_else(|_| path.to_owned(), |p| p.into_owned());
    let routed = route_resource(routes, &normal);
    match header_text(headers, RESOURCE_HEADER) {
        Some(HeaderText::Ok(named)) if routed.is_some_and(|r| r != named) => {
            // Naming another resource than the path's route: refused.
            let r = resource.expect("a resource");
            assert!(matches!(r, HeaderText::Unroutable { .. }));
            assert!(fencing::resource::validate(r.as_str()).is_err());
            assert!(r.problem(RESOURCE_HEADER).is_some());
        }
        Some(h) => {
            assert_eq!(resource.as_ref(), Some(&h));
            check_one(headers, RESOURCE_HEADER, Some(&h));
        }
        None => {
            // The most specific route, by brute force.
            // (on the normalised path, ASCII case ignored).
            let lower = normal.to_ascii_lowercase();
            let expected = routes
                .iter()
                .filter(|(p, _)| lower.starts_with(&p.to_ascii_lowercase()))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, r)| r.as_str());
            assert_eq!(route_resource(routes, &normal), expected);
            assert_eq!(resource.as_ref().map(HeaderText::as_str), expected);
            assert!(matches!(resource, None | Some(HeaderText::Ok(_))));
        }
    }
}

fn check_one(headers: &HeaderMap, name: &str, got: Option<&HeaderText<'_>>) {
    let values: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
    let Some(got) = got else {
        assert!(values.is_empty());
        return;
    };
    match (got, values.as_slice()) {
        (HeaderText::Ok(s), [v]) => {
            assert_eq!(v.to_str().ok(), Some(&**s));
            assert_eq!(got.problem(name), None);
            return;
        }
        (HeaderText::NotText(s), [v]) => {
            assert!(v.to_str().is_err());
            assert!(s.starts_with('\u{fffd}'));
        }
        (HeaderText::Repeated(s), [_, _, ..]) => {
            let joined: Vec<String> = values
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            assert_eq!(*s, joined.join(","));
        }
        (got, values) => panic!("{got:?} for {} values", values.len()),
    }
    // Not read as sent: it must never pass as a token or a resource.
    assert!(got.problem(name).is_some());
    let s = got.as_str();
    assert!(fencing::resource::validate(s).is_err(), "{s:?}");
    assert!(
        fencing::TokenPolicy::plain().check("r", s).is_err(),
        "{s:?}"
    );
    assert!(fencing::token::Presented::parse(s).is_err(), "{s:?}");
}
