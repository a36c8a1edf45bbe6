//! The HTTP proxy's fencing headers (`wire::http::fencing_headers`).
//!
//! Input: lines split at `\n`. The first is the request path; each other
//! is `name:value`, appended in order (so names repeat), with values of any
//! bytes `http` allows (not necessarily UTF-8). Lines that `http` would
//! refuse as a name or value are skipped, as hyper would refuse them before
//! the proxy saw them.

use super::fencing;
use fencepost_wire::http::{
    fencing_headers, header_problem, header_text, route_resource, RESOURCE_HEADER, TOKEN_HEADER,
};
use fencing::input::{self, InputError};
use fencing::ResourceName;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

/// The routes the target runs with, longest prefix first as the proxy
/// sorts them.
pub fn routes() -> Vec<(String, ResourceName)> {
    [
        ("/orders/eu/", "orders-eu"),
        ("/orders/", "orders"),
        ("/kv", "kv"),
    ]
    .into_iter()
    .filter_map(|(p, r)| Some((p.to_owned(), ResourceName::new(r).ok()?)))
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

/// What the proxy reads from `headers` and `path` is what was sent, parsed,
/// when it was sent once as text, and otherwise a typed error: never a
/// value of a header sent twice or not as text.
pub fn check(headers: &HeaderMap, path: &str, routes: &[(String, ResourceName)]) {
    let got = fencing_headers(headers, path, routes);
    let token = header_text(headers, TOKEN_HEADER);
    check_one(headers, TOKEN_HEADER, token.clone());
    let expected = match token {
        None => Err(InputError::Missing),
        Some(t) => t.and_then(input::token),
    };
    assert_eq!(got.token, expected);
    use fencepost_wire::http1::path::{normalize, without_parameters};
    let normal = normalize(path);
    let hidden = normal.as_ref().is_ok_and(|p| {
        without_parameters(p).map_or(true, |bare| {
            route_resource(routes, &bare) != route_resource(routes, p)
        })
    });
    if !routes.is_empty() && (normal.is_err() || hidden) {
        // A path that might reach another route: refused whatever it says.
        assert!(matches!(got.resource, Err(InputError::Unroutable(_))));
        return;
    }
    // Without routes the path plays no part.
    let normal = normal.map_or_else(|_| path.to_owned(), |p| p.into_owned());
    let routed = route_resource(routes, &normal);
    match header_text(headers, RESOURCE_HEADER) {
        Some(Ok(named)) if routed.is_some_and(|r| r.as_str() != named) => {
            // Naming another resource than the path's route: refused.
            let Err(e) = &got.resource else {
                panic!("another route's resource accepted: {named:?}");
            };
            assert!(matches!(e, InputError::Unroutable(_)));
            assert!(header_problem(e, RESOURCE_HEADER).is_some());
        }
        Some(h) => {
            check_one(headers, RESOURCE_HEADER, Some(h.clone()));
            assert_eq!(got.resource, h.and_then(input::resource));
        }
        None => {
            // The most specific route, by brute force (on the normalised
            // path, ASCII case ignored).
            let lower = normal.to_ascii_lowercase();
            let expected = routes
                .iter()
                .filter(|(p, _)| lower.starts_with(&p.to_ascii_lowercase()))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, r)| r.as_str());
            assert_eq!(
                route_resource(routes, &normal).map(|r| r.as_str()),
                expected
            );
            match expected {
                Some(r) => assert_eq!(got.resource.map(|g| g.as_str()), Ok(r)),
                None => assert_eq!(got.resource, Err(InputError::Missing)),
            }
        }
    }
}

fn check_one(headers: &HeaderMap, name: &str, got: Option<Result<&str, InputError>>) {
    let values: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
    match (got, values.as_slice()) {
        (None, []) => {}
        (Some(Ok(s)), [v]) => assert_eq!(v.to_str().ok(), Some(s)),
        (Some(Err(e @ InputError::NotText)), [v]) => {
            assert!(v.to_str().is_err());
            assert!(header_problem(&e, name).is_some());
        }
        (Some(Err(e @ InputError::Repeated)), [_, _, ..]) => {
            assert!(header_problem(&e, name).is_some());
        }
        (got, values) => panic!("{got:?} for {} values", values.len()),
    }
}
