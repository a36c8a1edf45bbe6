//! The `pg_frame`, `pg_startup`, `http_headers`, `http1` and `http1_body`
//! fuzz targets' checks, run in CI without AFL: over arbitrary and
//! generated inputs (proptest),
//! and over every file of the committed corpus (`fuzz/corpus/<target>`)
//! and of the crashes the fuzzers once found (`fuzz/regressions/<target>`).
//! The checks themselves are the fuzz crate's (`fuzz/src/pg.rs`,
//! `fuzz/src/http_headers.rs`), so the fuzzer and CI judge by the same
//! rules. The frame codec's own proptests (arbitrary chunking, raw
//! round-trips, bad lengths) are in `src/pg/frame.rs`; these add the typed
//! decoders, the startup packet, the options and the fencing headers.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The fuzz modules reach the core as `super::fencing`, so the crate root
// names it (clippy sees only this file, where it looks redundant).
#[allow(clippy::single_component_path_imports)]
use fencing;

#[path = "../../../fuzz/src/files.rs"]
mod files;
#[path = "../../../fuzz/src/http1_body.rs"]
mod http1_body_target;
#[path = "../../../fuzz/src/http1.rs"]
mod http1_target;
#[path = "../../../fuzz/src/http_headers.rs"]
mod http_target;
#[path = "../../../fuzz/src/pg.rs"]
mod pg_target;

use bytes::{BufMut, BytesMut};
use fencepost_wire::http::{fencing_headers, header_text, RESOURCE_HEADER, TOKEN_HEADER};
use fencepost_wire::pg::frame::{
    option_settings, split_frame, split_startup, ClientMsg, Frame, FrameError, StartupKind,
    MAX_STARTUP_LEN,
};
use fencing::InputError;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

/// Every file under `fuzz/<dir>/<target>`, by name.
fn inputs(dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    files::inputs(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz"),
        dir,
        target,
    )
}

fn replay(target: &str, min: usize, run: fn(&[u8])) {
    let corpus = inputs("corpus", target);
    assert!(
        corpus.len() >= min,
        "{target} corpus missing: {} files",
        corpus.len()
    );
    for (name, data) in corpus.iter().chain(&inputs("regressions", target)) {
        let r = std::panic::catch_unwind(|| run(data));
        assert!(r.is_ok(), "{name} fails the {target} target's checks");
    }
}

#[test]
fn committed_corpus_replays_clean() {
    replay("pg_frame", 8, pg_target::frames);
    replay("pg_startup", 8, pg_target::startup);
    replay("http_headers", 6, http_target::run);
    replay("http1", 8, http1_target::run);
    replay("http1_body", 8, http1_body_target::run);
}

proptest! {
    /// The `http1_body` target (the body machine against the reference
    /// decoder) over arbitrary bytes.
    #[test]
    fn http1_body_target_holds_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        http1_body_target::run(&data);
    }

    /// The `http1_body` target over chunked bodies built from plausible
    /// pieces (valid ones and near misses), split into arbitrary reads.
    #[test]
    fn http1_body_target_holds_on_plausible_chunked_bodies(
        pieces in prop::collection::vec(prop::sample::select(vec![
            "5\r\nhello\r\n", "1;a=b\r\nx\r\n", "A\r\n0123456789\r\n", "0\r\n", "\r\n",
            "T: 1\r\n", "T:\r\n", "\n", "\r", "zz", ";", "fffffffffffffff", "3\r\nab",
        ]), 0..8),
        reads in prop::collection::vec(1usize..40, 0..6),
    ) {
        let body: Vec<u8> = pieces.concat().into_bytes();
        http1_body_target::check(fencepost_wire::http1::body::Framing::Chunked, &body, &reads);
    }

    /// The `http1` target over arbitrary bytes.
    #[test]
    fn http1_target_holds_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
        http1_target::run(&data);
    }

    /// The `http1` target over requests built from plausible pieces, so
    /// the head parses and the body machine runs.
    #[test]
    fn http1_target_holds_on_plausible_requests(
        step in any::<u8>(),
        response in any::<bool>(),
        line in prop::sample::select(vec![
            "PUT /kv/a HTTP/1.1", "POST /%6bv//x HTTP/1.1", "GET / HTTP/1.0",
            "HTTP/1.1 200 OK", "HTTP/1.0 204 No Content", "HTTP/1.1 100 Continue",
        ]),
        headers in prop::collection::vec(prop::sample::select(vec![
            "Host: p", "Content-Length: 5", "Content-Length: 0", "Transfer-Encoding: chunked",
            "Connection: close", "Connection: x-a", "X-A: 1", "Fencing-Token: 9",
            "Expect: 100-continue", "Transfer-Encoding: gzip",
        ]), 0..5),
        body in prop::collection::vec(prop::sample::select(vec![
            "hello", "5\r\n", "0\r\n", "\r\n", "\n", "T: 1", "zz", ";e=1",
        ]), 0..8),
    ) {
        let mut data = vec![step, u8::from(response)];
        data.extend_from_slice(line.as_bytes());
        data.extend_from_slice(b"\r\n");
        for h in headers {
            data.extend_from_slice(h.as_bytes());
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b"\r\n");
        for b in body {
            data.extend_from_slice(b.as_bytes());
        }
        http1_target::run(&data);
    }
}

/// A C string's contents: any bytes but NUL.
fn cbytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 0..max)
}

/// The client messages the proxy decodes, with their encodings.
fn client_msg() -> impl Strategy<Value = (u8, Vec<u8>, Vec<Vec<u8>>, u32)> {
    (0u8..6, cbytes(40), cbytes(40), any::<u32>(), any::<u8>()).prop_map(
        |(kind, a, b, n, close_kind)| {
            let mut body = Vec::new();
            let cstr = |body: &mut Vec<u8>, s: &[u8]| {
                body.extend_from_slice(s);
                body.push(0);
            };
            let (tag, strings) = match kind {
                0 => {
                    cstr(&mut body, &a);
                    (b'Q', vec![a])
                }
                1 => {
                    cstr(&mut body, &a);
                    cstr(&mut body, &b);
                    body.put_u16(1);
                    body.put_u32(n);
                    (b'P', vec![a, b])
                }
                2 => {
                    cstr(&mut body, &a);
                    cstr(&mut body, &b);
                    body.put_u16(0);
                    body.put_u16(1);
                    body.put_i32(-1);
                    body.put_u16(0);
                    (b'B', vec![a, b])
                }
                3 => {
                    cstr(&mut body, &a);
                    body.put_u32(n);
                    (b'E', vec![a])
                }
                4 => {
                    body.push(close_kind);
                    cstr(&mut body, &a);
                    (b'C', vec![a])
                }
                _ => (b'S', vec![]),
            };
            (tag, body, strings, n)
        },
    )
}

/// An ErrorResponse or NoticeResponse body with fields in any order, one
/// of them maybe a `P` position.
fn error_body() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (
        prop::sample::select(vec![b'E', b'N']),
        prop::collection::vec(
            (
                prop::sample::select(b"SVCMDPHW".to_vec()),
                prop_oneof![
                    cbytes(20),
                    any::<u32>().prop_map(|p| p.to_string().into_bytes())
                ],
            ),
            0..6,
        ),
    )
        .prop_map(|(tag, fields)| {
            let mut body = Vec::new();
            for (c, v) in fields {
                body.push(c);
                body.extend(v);
                body.push(0);
            }
            body.push(0);
            (tag, body)
        })
}

/// Startup parameters: names and values are C strings in UTF-8.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("[^\0]{1,12}", "[^\0]{0,40}"), 0..6)
}

/// One `-c name=value` or `--name=value` setting, as libpq writes it.
fn setting() -> impl Strategy<Value = (String, String, bool)> {
    (
        "[a-z_][a-zA-Z0-9_.-]{0,15}",
        "[^\\\\\0]{0,16}",
        any::<bool>(),
    )
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_whitespace() || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

proptest! {
    /// The `pg_frame` target on arbitrary bytes: no panic, frames are what
    /// was consumed, waits and errors consume nothing.
    #[test]
    fn frame_target_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        pg_target::frames(&data);
    }

    /// The `pg_startup` target on arbitrary bytes, and on a valid packet
    /// with one byte changed.
    #[test]
    fn startup_target_on_arbitrary_bytes(
        data in prop::collection::vec(any::<u8>(), 0..600),
        ps in params(),
        at: usize,
        byte: u8,
    ) {
        pg_target::startup(&data);
        let mut packet = pg_target::encode_startup(3 << 16, &ps);
        let at = at % packet.len();
        packet[at] = byte;
        pg_target::startup(&packet);
    }

    /// Typed client messages decode to exactly what was encoded, through
    /// any chunking, and split never takes more than the buffer holds.
    #[test]
    fn client_messages_round_trip(
        msgs in prop::collection::vec(client_msg(), 1..8),
        chunk in 1usize..32,
    ) {
        let mut stream = Vec::new();
        for (tag, body, _, _) in &msgs {
            stream.extend_from_slice(Frame::new(*tag, body).raw());
        }
        prop_assert_eq!(pg_target::split_stream(&stream, 4096, chunk), stream.len());
        let mut buf = BytesMut::from(&stream[..]);
        for (tag, body, strings, n) in &msgs {
            let before = buf.len();
            let f = split_frame(&mut buf, 4096).unwrap().unwrap();
            prop_assert!(before - buf.len() == f.raw().len() && f.raw().len() <= before);
            prop_assert_eq!(f.tag(), *tag);
            let s = |i: usize| &strings[i][..];
            match f.client().unwrap() {
                ClientMsg::Query(q) => prop_assert_eq!(q, s(0)),
                ClientMsg::Parse { name, query } => prop_assert_eq!((name, query), (s(0), s(1))),
                ClientMsg::Bind { portal, statement } => {
                    prop_assert_eq!((portal, statement), (s(0), s(1)))
                }
                ClientMsg::Execute { portal, max_rows } => {
                    prop_assert_eq!((portal, max_rows), (s(0), *n))
                }
                ClientMsg::Close { kind, name } => prop_assert_eq!((kind, name), (body[0], s(0))),
                ClientMsg::Sync => prop_assert_eq!(*tag, b'S'),
                other => return Err(TestCaseError::fail(format!("decoded as {other:?}"))),
            }
        }
        prop_assert!(buf.is_empty());
    }

    /// Error and notice frames: fields read back, and `shift_position`
    /// moves `P` back and keeps the rest (the target's `check_frame`).
    #[test]
    fn error_frames((tag, body) in error_body()) {
        let f = Frame::new(tag, &body);
        pg_target::check_frame(&f);
    }

    /// A startup packet round-trips: same parameters, same bytes, the
    /// bytes after it left in the buffer; a packet past the limit is
    /// refused before it is read.
    #[test]
    fn startup_packets_round_trip(
        ps in params(),
        minor in 0u32..4,
        trailing in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let packet = pg_target::encode_startup((3 << 16) | minor, &ps);
        let mut buf = BytesMut::from(&packet[..]);
        buf.extend_from_slice(&trailing);
        let p = split_startup(&mut buf).unwrap().unwrap();
        prop_assert_eq!(&p.raw[..], &packet[..]);
        prop_assert_eq!(&buf[..], &trailing[..]);
        let StartupKind::Startup { version, params } = &p.kind else {
            return Err(TestCaseError::fail("not a startup packet"));
        };
        prop_assert_eq!(*version, (3 << 16) | minor);
        prop_assert_eq!(params, &ps);
        for (k, _) in &ps {
            let first = ps.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            prop_assert_eq!(p.param(k), first);
        }
        // Every proper prefix waits for more.
        for cut in [0, 3, 4, packet.len() / 2, packet.len() - 1] {
            let mut part = BytesMut::from(&packet[..cut]);
            prop_assert_eq!(split_startup(&mut part), Ok(None));
            prop_assert_eq!(part.len(), cut);
        }
    }

    /// Announced lengths outside [8, 10000] are errors, whatever follows.
    #[test]
    fn startup_lengths(len: u32, rest in prop::collection::vec(any::<u8>(), 0..16)) {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.extend_from_slice(&rest);
        let r = split_startup(&mut buf);
        if len < 8 {
            prop_assert!(matches!(r, Err(FrameError::BadStartup(_))));
        } else if len as usize > MAX_STARTUP_LEN {
            prop_assert!(matches!(r, Err(FrameError::TooLong { .. })), "expected TooLong");
        } else if 4 + rest.len() < len as usize {
            prop_assert_eq!(r, Ok(None));
        }
        prop_assert!(buf.len() <= 4 + rest.len());
    }

    /// Options as a client writes them (`-c n=v`, `-cn=v`, `--n=v`, with
    /// backslash escapes) split back into the settings, names folded as
    /// the server folds them.
    #[test]
    fn options_round_trip(settings in prop::collection::vec(setting(), 0..5), sep in "[ \t]{1,3}") {
        let words: Vec<String> = settings
            .iter()
            .map(|(k, v, long)| {
                if *long {
                    format!("--{}={}", escape(k), escape(v))
                } else {
                    format!("-c {}={}", escape(k), escape(v))
                }
            })
            .collect();
        let text = words.join(&sep);
        let expected: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v, _)| (k.replace('-', "_").to_ascii_lowercase(), v.clone()))
            .collect();
        prop_assert_eq!(option_settings(&text), expected);
        pg_target::check_options(&text);
    }

    /// The `http_headers` target on arbitrary bytes.
    #[test]
    fn header_target_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        http_target::run(&data);
    }

    /// Header sets built from fencing and other names, repeated or not,
    /// with any value bytes `http` allows: the target's checks hold.
    #[test]
    fn header_sets(
        headers in prop::collection::vec(
            (
                prop::sample::select(vec![TOKEN_HEADER, RESOURCE_HEADER, "Fencing-Token", "host", "x-fencing-token"]),
                prop::collection::vec(any::<u8>(), 0..24),
            ),
            0..6,
        ),
        path in prop::sample::select(vec!["/", "/orders/1", "/orders/eu/7", "/kv", "/kvx/y", "/other"]),
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        }
        http_target::check(&map, path, &http_target::routes());
    }

    /// One visible-ASCII value is read as sent; two values, or one with a
    /// byte outside visible ASCII, are typed errors, never values.
    #[test]
    fn repeated_and_binary_values_never_validate(
        a in "[ -~]{0,20}",
        b in "[ -~]{0,20}",
        high in prop::collection::vec(0x80u8..=0xff, 1..4),
    ) {
        let mut h = HeaderMap::new();
        h.insert(TOKEN_HEADER, HeaderValue::from_str(&a).unwrap());
        prop_assert_eq!(header_text(&h, TOKEN_HEADER), Some(Ok(a.as_str())));
        h.append(TOKEN_HEADER, HeaderValue::from_str(&b).unwrap());
        prop_assert_eq!(header_text(&h, TOKEN_HEADER), Some(Err(InputError::Repeated)));
        prop_assert_eq!(fencing_headers(&h, "/", &[]).token, Err(InputError::Repeated));

        let mut value = a.clone().into_bytes();
        value.extend(&high);
        let mut h = HeaderMap::new();
        h.insert(RESOURCE_HEADER, HeaderValue::from_bytes(&value).unwrap());
        let routes = http_target::routes();
        let got = fencing_headers(&h, "/orders/1", &routes);
        prop_assert_eq!(got.resource, Err(InputError::NotText));
    }
}
