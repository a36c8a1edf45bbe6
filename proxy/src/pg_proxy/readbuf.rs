//! The read buffers of a session's two loops: small while the session is
//! idle, grown while the peer sends more than fits, shrunk back after.
//!
//! Most statements and their answers are a few hundred bytes, and most
//! client connections of a pool are idle most of the time, so a session
//! starts with [`IDLE`] bytes per direction (it was 8 KiB and 16 KiB, which
//! made an idle connection cost 15.7 KiB; see BENCHMARKS.md). A read that
//! fills the room it had doubles the next read's room, up to [`MAX`], so a
//! large result is read in large chunks; the first read that is small
//! again, with nothing left over, returns the buffer to [`IDLE`].
//!
//! In the steady state nothing allocates: the frames cut from the buffer
//! are dropped before the next read (nothing the session keeps points into
//! it: a prepared statement keeps its own copy of its text), so
//! `BytesMut::reserve` takes the whole allocation back.

use bytes::BytesMut;

/// Room for one read while nothing larger has come.
pub(super) const IDLE: usize = 1024;
/// The most room one read gets.
const MAX: usize = 64 * 1024;

/// A read buffer and the room its next read gets.
pub(super) struct ReadBuf {
    pub(super) buf: BytesMut,
    room: usize,
}

impl ReadBuf {
    pub(super) fn new() -> ReadBuf {
        ReadBuf::from(BytesMut::with_capacity(IDLE))
    }

    /// Room for the next read: reuses the allocation when nothing points
    /// into it any more; a buffer grown for a burst is given up once the
    /// burst is over (`shrink`) and nothing is left in it.
    pub(super) fn prepare(&mut self, shrink: bool) {
        if shrink && self.room > IDLE && self.buf.is_empty() {
            self.room = IDLE;
            self.buf = BytesMut::with_capacity(IDLE);
            return;
        }
        self.buf.reserve(self.room);
    }

    /// After a read of `n` bytes into the room [`ReadBuf::prepare`] made:
    /// whether the burst is over (a small read), and the room grown when
    /// the read filled it.
    pub(super) fn read(&mut self, n: usize, had: usize) -> bool {
        if n >= had && self.room < MAX {
            self.room = (self.room * 2).min(MAX);
        }
        n <= IDLE
    }

    /// Free room right now, as the next read will see it.
    pub(super) fn spare(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }
}

impl From<BytesMut> for ReadBuf {
    fn from(buf: BytesMut) -> ReadBuf {
        ReadBuf { buf, room: IDLE }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_reads_fill_it_and_shrinks_back_after() {
        let mut r = ReadBuf::new();
        for _ in 0..10 {
            r.prepare(false);
            let had = r.spare();
            r.buf.resize(r.buf.len() + had, 0);
            let small = r.read(had, had);
            assert_eq!(small, had <= IDLE, "a read is small only up to IDLE bytes");
            r.buf.clear();
        }
        assert_eq!(r.room, MAX);
        r.prepare(false);
        assert!(r.spare() >= MAX);
        r.buf.extend_from_slice(b"small");
        let small = r.read(5, MAX);
        assert!(small);
        r.buf.clear();
        r.prepare(small);
        assert_eq!(r.room, IDLE);
        assert!(r.buf.capacity() < 2 * IDLE);
    }

    #[test]
    fn the_steady_state_reuses_one_allocation() {
        let mut r = ReadBuf::new();
        r.prepare(false);
        let at = r.buf.as_ptr();
        for _ in 0..100 {
            r.buf.extend_from_slice(&[1u8; 100]);
            let frame = r.buf.split_to(100).freeze();
            drop(frame);
            assert!(r.read(100, 1024));
            r.prepare(true);
            assert_eq!(r.buf.as_ptr(), at, "reallocated");
        }
    }
}
