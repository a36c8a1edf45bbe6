//! Where an HTTP/1.1 body ends: an exact Content-Length / chunked /
//! close-delimited state machine that never copies the body.
//!
//! A relay hands it each buffer it reads; [`BodyReader::advance`] says how
//! many of those bytes belong to the body (they go on verbatim: the chunk
//! framing too, which is why it must be exactly valid) and whether the
//! body is over. The bytes after the end are the next message on the
//! connection. An error is found in bytes that were read but not yet
//! passed on, so a relay that checks a buffer before writing it never
//! forwards the part of a body that made it invalid.
//!
//! Chunked framing is checked to the letter of RFC 9112 section 7.1: hex
//! sizes with an overflow check, extensions of visible characters only,
//! CRLF (never a bare LF or CR) after each size line, after each chunk's
//! data and after each trailer line, trailer lines as `name:value`.

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A response with no length: the body runs to the connection's close.
    UntilClose,
}

/// Longest chunk-size line (size, extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer lines accepted after the last chunk.
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Hex digits of a chunk size: 15 keeps the size below 2^60.
const MAX_SIZE_DIGITS: u8 = 15;

/// Why a body's framing is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunk size")]
    ChunkSize,
    #[error("invalid chunk extension")]
    ChunkExtension,
    #[error("chunk-size line longer than {MAX_CHUNK_LINE} bytes")]
    ChunkLineTooLong,
    #[error("chunk data not followed by CRLF")]
    ChunkDataEnd,
    #[error("a bare CR or LF where CRLF belongs")]
    BareLineEnding,
    #[error("invalid trailer line")]
    Trailer,
    #[error("trailers longer than {MAX_TRAILERS} bytes")]
    TrailersTooLong,
    #[error("the connection closed before the body's end")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    /// Reading hex digits: the size so far and how many digits.
    Size {
        size: u64,
        digits: u8,
        line: usize,
    },
    /// After `;`: extension bytes up to the CR.
    Extension {
        size: u64,
        line: usize,
    },
    /// CR seen after a size line; LF expected.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final CRLF.
    TrailerStart {
        total: usize,
    },
    /// Inside a trailer line's name (`colon` false) or value.
    Trailer {
        total: usize,
        colon: bool,
    },
    TrailerLf {
        total: usize,
    },
    FinalLf,
    UntilClose,
    Done,
}

/// What [`BodyReader::advance`] found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes at the start of the buffer that belong to the body.
    pub consumed: usize,
    /// The body ended within them.
    pub done: bool,
}

/// The state of one body being read.
#[derive(Debug, Clone)]
pub struct BodyReader {
    state: State,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible characters, space, tab and obs-text: what a field value or a
/// chunk extension may hold.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl BodyReader {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size {
                size: 0,
                digits: 0,
                line: 0,
            },
            Framing::UntilClose => State::UntilClose,
        };
        BodyReader { state }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The connection closed: fine only for a close-delimited body (which
    /// then ends) or one already over.
    pub fn eof(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Truncated),
        }
    }

    /// Reads as much of `input` as belongs to the body. On an error
    /// nothing of `input` should be forwarded; the reader is then spent.
    pub fn advance(&mut self, input: &[u8]) -> Result<Progress, BodyError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => break,
                State::UntilClose => i = input.len(),
                State::Length(n) | State::Data(n) => {
                    let left = input.len() - i;
                    let take = usize::try_from(n).map_or(left, |n| n.min(left));
                    i += take;
                    let rest = n - take as u64;
                    self.state = match (self.state, rest) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), r) => State::Length(r),
                        (_, 0) => State::DataCr,
                        (_, r) => State::Data(r),
                    };
                }
                _ => {
                    self.step(input[i])?;
                    i += 1;
                }
            }
        }
        Ok(Progress {
            consumed: i,
            done: self.state == State::Done,
        })
    }

    /// One byte of chunk framing.
    fn step(&mut self, b: u8) -> Result<(), BodyError> {
        let next = match self.state {
            State::Size { size, digits, line } => {
                let line = line + 1;
                if line > MAX_CHUNK_LINE {
                    return Err(BodyError::ChunkLineTooLong);
                }
                match (hex(b), b) {
                    (Some(d), _) => {
                        if digits >= MAX_SIZE_DIGITS {
                            return Err(BodyError::ChunkSize);
                        }
                        State::Size {
                            size: size * 16 + u64::from(d),
                            digits: digits + 1,
                            line,
                        }
                    }
                    (None, _) if digits == 0 => return Err(BodyError::ChunkSize),
                    (None, b';') => State::Extension { size, line },
                    (None, b'\r') => State::SizeLf { size },
                    (None, b'\n') => return Err(BodyError::BareLineEnding),
                    // Whitespace before `;` (BWS) is tolerated by some
                    // parsers and not others: refused.
                    (None, _) => return Err(BodyError::ChunkSize),
                }
            }
            State::Extension { size, line } => {
                let line = line + 1;
                if line > MAX_CHUNK_LINE {
                    return Err(BodyError::ChunkLineTooLong);
                }
                match b {
                    b'\r' => State::SizeLf { size },
                    b'\n' => return Err(BodyError::BareLineEnding),
                    b if is_field_byte(b) => State::Extension { size, line },
                    _ => return Err(BodyError::ChunkExtension),
                }
            }
            State::SizeLf { size } => match (b, size) {
                (b'\n', 0) => State::TrailerStart { total: 0 },
                (b'\n', n) => State::Data(n),
                _ => return Err(BodyError::BareLineEnding),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(BodyError::ChunkDataEnd),
            },
            State::DataLf => match b {
                b'\n' => State::Size {
                    size: 0,
                    digits: 0,
                    line: 0,
                },
                _ => return Err(BodyError::ChunkDataEnd),
            },
            State::TrailerStart { total } => match b {
                b'\r' => State::FinalLf,
                b if is_tchar(b) => State::Trailer {
                    total: grow(total)?,
                    colon: false,
                },
                b'\n' => return Err(BodyError::BareLineEnding),
                _ => return Err(BodyError::Trailer),
            },
            State::Trailer { total, colon } => {
                let total = grow(total)?;
                match b {
                    b'\r' if colon => State::TrailerLf { total },
                    b'\r' => return Err(BodyError::Trailer),
                    b'\n' => return Err(BodyError::BareLineEnding),
                    b':' if !colon => State::Trailer { total, colon: true },
                    b if !colon && is_tchar(b) => State::Trailer { total, colon },
                    b if colon && is_field_byte(b) => State::Trailer { total, colon },
                    _ => return Err(BodyError::Trailer),
                }
            }
            State::TrailerLf { total } => match b {
                b'\n' => State::TrailerStart { total },
                _ => return Err(BodyError::BareLineEnding),
            },
            State::FinalLf => match b {
                b'\n' => State::Done,
                _ => return Err(BodyError::BareLineEnding),
            },
            // `advance` handles these without stepping.
            State::Length(_) | State::Data(_) | State::UntilClose | State::Done => self.state,
        };
        self.state = next;
        Ok(())
    }
}

fn grow(total: usize) -> Result<usize, BodyError> {
    let total = total + 1;
    if total > MAX_TRAILERS {
        return Err(BodyError::TrailersTooLong);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` whole; the consumed length and whether it ended.
    fn run(framing: Framing, input: &[u8]) -> Result<(usize, bool), BodyError> {
        let mut r = BodyReader::new(framing);
        let p = r.advance(input)?;
        Ok((p.consumed, p.done))
    }

    #[test]
    fn length_stops_at_its_end_and_leaves_the_next_message() {
        let input = b"helloGET / HTTP/1.1\r\n";
        assert_eq!(run(Framing::Length(5), input), Ok((5, true)));
        assert_eq!(run(Framing::Length(9), b"hello"), Ok((5, false)));
        assert_eq!(run(Framing::Length(0), input), Ok((0, true)));
        let mut r = BodyReader::new(Framing::Length(3));
        assert_eq!(r.eof(), Err(BodyError::Truncated));
    }

    #[test]
    fn chunked_finds_the_true_end() {
        let body = b"5\r\nhello\r\n3;ext=\"v\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        assert_eq!(run(Framing::Chunked, body), Ok((body.len() - 4, true)));
        let upper = b"A\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(run(Framing::Chunked, upper), Ok((upper.len(), true)));
    }

    /// Research notes 1.4 item 5 and Http11Probe's chunk cases: each must
    /// be refused, none passed on.
    #[test]
    fn chunk_errors_are_refused() {
        let cases: [(&[u8], BodyError); 14] = [
            (b"\r\n", BodyError::ChunkSize),
            (b"g\r\n", BodyError::ChunkSize),
            (b" 5\r\nhello\r\n0\r\n\r\n", BodyError::ChunkSize),
            (b"5 \r\nhello\r\n0\r\n\r\n", BodyError::ChunkSize),
            (b"+5\r\nhello\r\n0\r\n\r\n", BodyError::ChunkSize),
            (b"-1\r\n", BodyError::ChunkSize),
            (b"0x5\r\nhello\r\n", BodyError::ChunkSize),
            (b"1000000000000000\r\n", BodyError::ChunkSize),
            (b"5\nhello\r\n0\r\n\r\n", BodyError::BareLineEnding),
            (b"5;a\nhello\r\n", BodyError::BareLineEnding),
            (b"5\r\nhelloX\r\n0\r\n\r\n", BodyError::ChunkDataEnd),
            (b"5\r\nhello\n0\r\n\r\n", BodyError::ChunkDataEnd),
            (b"0\r\n\n", BodyError::BareLineEnding),
            (b"0\r\nX-T: 1\n\r\n", BodyError::BareLineEnding),
        ];
        for (input, want) in cases {
            assert_eq!(
                run(Framing::Chunked, input),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        for bad in [
            &b"0\r\n: no name\r\n\r\n"[..],
            b"0\r\nX T: 1\r\n\r\n",
            b"0\r\nnocolon\r\n\r\n",
        ] {
            assert_eq!(run(Framing::Chunked, bad), Err(BodyError::Trailer));
        }
        assert_eq!(
            run(Framing::Chunked, b"1;\x01\r\n"),
            Err(BodyError::ChunkExtension)
        );
        let long = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_LINE]].concat();
        assert_eq!(
            run(Framing::Chunked, &long),
            Err(BodyError::ChunkLineTooLong)
        );
    }

    #[test]
    fn the_largest_size_is_bounded_not_overflowed() {
        // 15 hex digits: accepted, and the data state holds it.
        let (n, done) = run(Framing::Chunked, b"fffffffffffffff\r\nabc").unwrap();
        assert_eq!((n, done), (20, false));
    }

    #[test]
    fn close_delimited_runs_to_eof() {
        let mut r = BodyReader::new(Framing::UntilClose);
        assert_eq!(
            r.advance(b"anything\r\n0\r\n\r\n"),
            Ok(Progress {
                consumed: 15,
                done: false
            })
        );
        assert_eq!(r.eof(), Ok(()));
        assert!(r.is_done());
        let mut r = BodyReader::new(Framing::Chunked);
        r.advance(b"5\r\nhel").unwrap();
        assert_eq!(r.eof(), Err(BodyError::Truncated));
    }

    /// A chunked encoding of `chunks`, with `trailers`.
    fn encode(chunks: &[Vec<u8>], trailers: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for (n, v) in trailers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        /// Any split of a valid body into reads finds the same end, and the
        /// bytes after it are never consumed.
        #[test]
        fn any_split_finds_the_same_end(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..6),
            trailers in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,8}", "[ -~]{0,12}"), 0..3),
            cuts in prop::collection::vec(0usize..300, 0..8),
            tail in prop::collection::vec(any::<u8>(), 0..20),
        ) {
            let body = encode(&chunks, &trailers);
            let mut stream = body.clone();
            stream.extend_from_slice(&tail);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut r = BodyReader::new(Framing::Chunked);
            let mut at = 0;
            for cut in cuts {
                if cut < at || r.is_done() {
                    continue;
                }
                let p = r.advance(&stream[at..cut]).unwrap();
                // All of a read is body, unless the body ended in it.
                prop_assert!(p.done || p.consumed == cut - at);
                at += p.consumed;
            }
            prop_assert!(r.is_done());
            prop_assert_eq!(at, body.len());
        }

        /// Arbitrary bytes: never a panic, never more than the input, and
        /// a reader that ended consumes nothing more.
        #[test]
        fn arbitrary_bytes_never_overrun(
            input in prop::collection::vec(any::<u8>(), 0..200),
            len in 0u64..100,
            chunked in any::<bool>(),
        ) {
            let framing = if chunked { Framing::Chunked } else { Framing::Length(len) };
            let mut r = BodyReader::new(framing);
            if let Ok(p) = r.advance(&input) {
                prop_assert!(p.consumed <= input.len());
                prop_assert!(p.done || p.consumed == input.len());
                if p.done {
                    prop_assert_eq!(r.advance(&input).map(|p| p.consumed), Ok(0));
                }
            }
        }

        /// A Content-Length body is exactly its length, whatever the split.
        #[test]
        fn length_is_exact(len in 0u64..500, extra in 0usize..50, split in 0usize..600) {
            let stream = vec![b'x'; len as usize + extra];
            let split = split.min(stream.len());
            let mut r = BodyReader::new(Framing::Length(len));
            let a = r.advance(&stream[..split]).unwrap().consumed;
            let b = r.advance(&stream[a..]).unwrap().consumed;
            prop_assert_eq!(a + b, len as usize);
            prop_assert!(r.is_done());
        }
    }
}
