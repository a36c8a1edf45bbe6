//! The byte relay's body state machine (`wire::http1::body::BodyReader`)
//! against a reference decoder written the plain way: the whole body in
//! one buffer, parsed top-down by RFC 9112 section 7.1's grammar (with
//! the relay's limits), knowing nothing of reads or states.
//!
//! Input: byte 0 picks the framing (bit 0 set: chunked; else a
//! `Content-Length` of bytes 1-2, big-endian); byte 3 says how many of
//! the following bytes are read sizes (`% 16`), each read `% 32 + 1`
//! bytes, used in turn; the rest is what the peer sends.
//!
//! Checks: fed in those reads, as a relay feeds it, the machine gives the
//! reference's verdict (the body ends at the same byte, or is refused, or
//! wants more), and the bytes it passes on are the same: up to the end,
//! or, for a refused body, only bytes the reference still calls a valid
//! beginning, all of them before the read that held the error (a relay
//! forwards nothing of a read the machine refused).

use fencepost_wire::http1::body::{BodyReader, Framing, MAX_CHUNK_LINE, MAX_TRAILERS};

/// What a decoder makes of a whole stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The body ends after this many bytes.
    Ends(usize),
    /// Valid so far; more is needed.
    More,
    /// Not a valid body.
    Invalid,
}

/// Hex digits a chunk size may have (the machine's bound: below 2^60).
const MAX_SIZE_DIGITS: usize = 15;

/// The reference: `body` decoded whole.
pub fn reference(framing: Framing, body: &[u8]) -> Verdict {
    match framing {
        Framing::Length(n) => match usize::try_from(n) {
            Ok(n) if n <= body.len() => Verdict::Ends(n),
            _ => Verdict::More,
        },
        Framing::UntilClose => Verdict::More,
        Framing::Chunked => match chunked(body) {
            Ok(Some(end)) => Verdict::Ends(end),
            Ok(None) => Verdict::More,
            Err(()) => Verdict::Invalid,
        },
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// `Ok(Some(end))`: a whole chunked body of `end` bytes; `Ok(None)`: a
/// valid beginning; `Err`: invalid.
fn chunked(b: &[u8]) -> Result<Option<usize>, ()> {
    let mut i = 0;
    loop {
        // chunk-size [ chunk-ext ] CRLF, the line at most MAX_CHUNK_LINE
        // bytes up to and including its CR.
        let start = i;
        let line_end = b[start..].iter().position(|&c| c == b'\r' || c == b'\n');
        let line = match line_end {
            Some(n) => &b[start..start + n],
            None => &b[start..],
        };
        let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits > MAX_SIZE_DIGITS {
            return Err(());
        }
        let after = &line[digits..];
        if digits == 0 && !line.is_empty() {
            return Err(());
        }
        if let Some((&first, ext)) = after.split_first() {
            if first != b';' || !ext.iter().all(|&c| is_field_byte(c)) {
                return Err(());
            }
        }
        let Some(n) = line_end else {
            return if line.len() > MAX_CHUNK_LINE {
                Err(())
            } else {
                Ok(None)
            };
        };
        if digits == 0 || n + 1 > MAX_CHUNK_LINE {
            return Err(());
        }
        i = start + n;
        if b[i] != b'\r' {
            return Err(());
        }
        match b.get(i + 1) {
            None => return Ok(None),
            Some(b'\n') => i += 2,
            Some(_) => return Err(()),
        }
        let size = line[..digits].iter().fold(0u64, |s, &c| {
            s * 16 + u64::from((c as char).to_digit(16).unwrap_or(0))
        });
        if size == 0 {
            return trailers(b, i);
        }
        // chunk-data CRLF
        let Some(end) = usize::try_from(size).ok().and_then(|s| i.checked_add(s)) else {
            return Ok(None);
        };
        if end > b.len() {
            return Ok(None);
        }
        i = end;
        match (b.get(i), b.get(i + 1)) {
            (None, _) => return Ok(None),
            (Some(b'\r'), None) => return Ok(None),
            (Some(b'\r'), Some(b'\n')) => i += 2,
            _ => return Err(()),
        }
    }
}

/// `*( field-line CRLF ) CRLF` from `i`, the lines (each counted up to and
/// including its CR) at most MAX_TRAILERS bytes in all.
fn trailers(b: &[u8], mut i: usize) -> Result<Option<usize>, ()> {
    let mut total = 0;
    loop {
        match b.get(i) {
            None => return Ok(None),
            Some(b'\r') => {
                return match b.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some(i + 2)),
                    Some(_) => Err(()),
                }
            }
            Some(_) => {}
        }
        let rest = &b[i..];
        let cr = rest.iter().position(|&c| c == b'\r' || c == b'\n');
        let line = &rest[..cr.unwrap_or(rest.len())];
        let name = line.iter().take_while(|&&c| is_tchar(c)).count();
        if name == 0 {
            return Err(());
        }
        let valid = match line.get(name) {
            None => true,
            Some(b':') => line[name + 1..].iter().all(|&c| is_field_byte(c)),
            Some(_) => false,
        };
        if !valid {
            return Err(());
        }
        // Counted bytes so far, the CR included once it is there.
        let counted = total + line.len() + usize::from(cr.is_some());
        if counted > MAX_TRAILERS {
            return Err(());
        }
        let Some(cr) = cr else {
            return Ok(None);
        };
        if rest[cr] != b'\r' || line.get(name) != Some(&b':') {
            return Err(());
        }
        match rest.get(cr + 1) {
            None => return Ok(None),
            Some(b'\n') => {}
            Some(_) => return Err(()),
        }
        total = counted;
        i += cr + 2;
    }
}

/// Fuzz target `http1_body`.
pub fn run(data: &[u8]) {
    let (Some(&mode), Some(&hi), Some(&lo), Some(&nreads)) =
        (data.first(), data.get(1), data.get(2), data.get(3))
    else {
        return;
    };
    let framing = if mode & 1 == 1 {
        Framing::Chunked
    } else {
        Framing::Length(u64::from(u16::from_be_bytes([hi, lo])))
    };
    let nreads = usize::from(nreads % 16).min(data.len() - 4);
    let reads: Vec<usize> = data[4..4 + nreads]
        .iter()
        .map(|&r| usize::from(r % 32) + 1)
        .collect();
    let stream = &data[4 + nreads..];
    check(framing, stream, &reads);
}

/// The machine fed `stream` in reads of the sizes `reads` (in turn;
/// all of it at once when empty) against [`reference`].
pub fn check(framing: Framing, stream: &[u8], reads: &[usize]) {
    let expected = reference(framing, stream);
    let mut machine = BodyReader::new(framing);
    let mut at = 0;
    let mut forwarded = 0;
    let mut sizes = reads.iter().cycle();
    let got = loop {
        if at == stream.len() {
            break if machine.is_done() {
                Verdict::Ends(forwarded)
            } else {
                Verdict::More
            };
        }
        let size = sizes.next().copied().unwrap_or(stream.len());
        let read = &stream[at..(at + size).min(stream.len())];
        match machine.advance(read) {
            Ok(p) => {
                assert!(p.consumed <= read.len());
                assert!(p.done || p.consumed == read.len(), "stopped early");
                forwarded += p.consumed;
                at += read.len();
                if p.done {
                    break Verdict::Ends(forwarded);
                }
            }
            Err(_) => {
                // Nothing of this read goes on: what did was a valid
                // beginning by the reference too.
                assert_eq!(
                    reference(framing, &stream[..forwarded]),
                    Verdict::More,
                    "forwarded an invalid prefix"
                );
                break Verdict::Invalid;
            }
        }
    };
    assert_eq!(got, expected, "{framing:?} read in {reads:?}");
}
