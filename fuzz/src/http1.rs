//! The byte relay's framing (`wire::http1`): head parser, body state
//! machine and path normalisation.
//!
//! Input: byte 0 is the read size the body is fed in (`% 64 + 1`); bit 0 of
//! byte 1 says response (set) or request; the rest is the stream: a head,
//! then whatever follows it.
//!
//! Checks, beyond "no panic": every proper prefix of an accepted head is
//! "incomplete", never an error and never another head (so a relay reading
//! in pieces decides as one reading it whole); the lines a relay forwards
//! are whole CRLF-terminated lines of the head, in order, never a
//! hop-by-hop or `Connection` line (nor `Host`, for a request); the body
//! machine finds the same end (or the same refusal) however the stream is
//! split into reads, never consuming past it; path normalisation is
//! idempotent.

use fencepost_wire::http1::body::{BodyReader, Framing};
use fencepost_wire::http1::head::{self, Kind};
use fencepost_wire::http1::path;

/// Fuzz target `http1`.
pub fn run(data: &[u8]) {
    let (Some(&step), Some(&flags)) = (data.first(), data.get(1)) else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let stream = &data[2..];
    let mut headers = head::header_slots();
    let (len, framing) = if flags & 1 == 1 {
        let Ok(Some(h)) = head::parse_response(stream, &mut headers, "GET") else {
            return;
        };
        check_lines(stream, h.len, h.forwarded_lines(), false);
        (h.len, h.framing)
    } else {
        let Ok(Some(h)) = head::parse_request(stream, &mut headers) else {
            return;
        };
        check_lines(stream, h.len, h.forwarded_lines(), true);
        let p = h.path();
        assert!(p.starts_with('/') || p == "*");
        if let Ok(once) = path::normalize(p) {
            assert_eq!(path::normalize(&once).as_deref(), Ok(&*once));
        }
        (h.len, h.framing)
    };
    for cut in 0..len {
        let mut headers = head::header_slots();
        let partial = if flags & 1 == 1 {
            head::parse_response(&stream[..cut], &mut headers, "GET").map(|h| h.is_some())
        } else {
            head::parse_request(&stream[..cut], &mut headers).map(|h| h.is_some())
        };
        assert_eq!(partial, Ok(false), "prefix of {cut} bytes");
    }
    body(&stream[len..], framing, step);
}

fn check_lines(
    stream: &[u8],
    len: usize,
    lines: impl Iterator<Item = std::ops::Range<usize>>,
    request: bool,
) {
    let mut last = 0;
    for r in lines {
        assert!(r.start >= last && r.start < r.end && r.end <= len);
        let line = &stream[r.clone()];
        assert!(line.ends_with(b"\r\n"));
        assert!(!line[..line.len() - 2].contains(&b'\n'));
        let colon = line.iter().position(|&b| b == b':').unwrap_or(0);
        let kind = Kind::of(std::str::from_utf8(&line[..colon]).unwrap_or(""));
        assert!(!matches!(kind, Kind::HopByHop | Kind::Connection));
        assert!(!request || kind != Kind::Host);
        last = r.end;
    }
}

/// The same body, fed whole and in reads of `step` bytes.
fn body(rest: &[u8], framing: Framing, step: usize) {
    let mut whole = BodyReader::new(framing);
    let at_once = whole.advance(rest);
    let mut pieces = BodyReader::new(framing);
    let mut consumed = 0;
    let mut failed = false;
    for chunk in rest.chunks(step) {
        match pieces.advance(chunk) {
            Ok(p) => {
                assert!(p.consumed <= chunk.len());
                assert!(p.done || p.consumed == chunk.len());
                consumed += p.consumed;
                if p.done {
                    break;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match at_once {
        Ok(p) => {
            assert!(!failed);
            assert_eq!((p.consumed, p.done), (consumed, pieces.is_done()));
            assert!(p.done || p.consumed == rest.len());
        }
        Err(_) => assert!(failed),
    }
}
