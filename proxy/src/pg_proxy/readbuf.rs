//! The read buffers of a session's two loops: none while the session is
//! idle, small while it talks, grown while the peer sends more than fits,
//! shrunk back after.
//!
//! Most client connections of a pool are idle most of the time, and most
//! statements and their answers are a few hundred bytes. So a loop with
//! nothing left over waits for its socket to become readable holding no
//! buffer at all ([`ReadBuf::fill_from`]); only then does it take one of
//! [`IDLE`] bytes from a small per-thread pool (or allocate it), and the
//! buffer goes back to the pool as soon as it is drained. An idle session
//! therefore holds no read buffer on either side (each was 1 KiB, before
//! that 8 KiB and 16 KiB; see BENCHMARKS.md), and a busy one takes and
//! returns the same pooled buffer around every wait: no allocation per
//! statement.
//!
//! A read that fills the room it had doubles the next read's room, up to
//! [`MAX`], so a large result is read in large chunks; a buffer grown for
//! such a burst is kept across waits until the first read that is small
//! again, with nothing left over, returns it to [`IDLE`].
//!
//! Nothing the session keeps points into a buffer once its frames are
//! handled (a prepared statement keeps its own copy of its text), so
//! `BytesMut::reserve` takes the whole allocation back, pooled or not.
//! A TLS client's side is read through rustls, which has buffers of its
//! own and no readiness to wait on: it reads into a kept buffer
//! ([`ReadBuf::read_from`]).

use std::cell::RefCell;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, Interest};
use tokio::net::tcp::OwnedReadHalf;

/// Room for one read while nothing larger has come.
pub(super) const IDLE: usize = 1024;
/// The most room one read gets.
const MAX: usize = 64 * 1024;
/// The size of an epoll engine thread's read buffer ([`ReadBuf::try_fill`]):
/// the most room one read gets.
pub(super) const SCRATCH: usize = MAX;
/// Drained buffers kept per thread for the next session that has input:
/// enough for the sessions one thread serves at once, few enough that the
/// pool's memory stays a fixed few tens of KiB.
const POOL: usize = 32;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of at least [`IDLE`] bytes of room: a pooled one if this
/// thread has one.
fn take() -> BytesMut {
    FREE.with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(IDLE))
}

/// Keeps a drained idle-size buffer for [`take`], or frees it when the
/// pool is full.
fn give(buf: BytesMut) {
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < POOL {
            f.push(buf);
        }
    });
}

/// A read buffer and the room its next read gets.
pub(super) struct ReadBuf {
    /// Complete messages are cut from the front; what is left is the start
    /// of the next one. No allocation while parked (see the module docs).
    pub(super) buf: BytesMut,
    room: usize,
    /// The last read was small: a burst, if there was one, is over.
    small: bool,
}

impl ReadBuf {
    /// No buffer yet: the first read takes one.
    pub(super) fn new() -> ReadBuf {
        ReadBuf::from(BytesMut::new())
    }

    /// Whether the last read was small (a burst is over), so buffers
    /// grown for it may be given back.
    pub(super) fn burst_over(&self) -> bool {
        self.small
    }

    /// Reads what `s` has, waiting for it without holding a buffer when
    /// nothing is left over. `Ok(0)` is the end of the stream.
    /// Cancel-safe: dropped while waiting, nothing was read.
    ///
    /// A short read (fewer bytes than the room it had) drained the socket,
    /// so it also clears the socket's readiness: the next wait goes
    /// straight to the reactor instead of first making a `read` that
    /// returns `WouldBlock`. That is one system call less per message
    /// batch on each side of a session (two per statement); tokio's own
    /// `AsyncRead` for `TcpStream` does the same (tokio issue 5866), but
    /// `try_read_buf`, which lets the wait hold no buffer, does not. Safe
    /// with epoll's edge-triggered readiness: bytes that arrive after the
    /// read raise a new event, and tokio clears only the readiness this
    /// read was made under, never a newer one.
    pub(super) async fn fill_from(&mut self, s: &OwnedReadHalf) -> std::io::Result<usize> {
        loop {
            self.park();
            s.readable().await?;
            self.prepare();
            let had = self.spare();
            let mut got = None;
            let buf = &mut self.buf;
            let tried = s.as_ref().try_io(Interest::READABLE, || {
                let n = s.try_read_buf(buf)?;
                got = Some(n);
                if n > 0 && n < had {
                    // Drained: tell `try_io` to clear the readiness. The
                    // bytes read are in `got`.
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match tried {
                Ok(n) => {
                    self.read(n, had);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(n) = got {
                        self.read(n, had);
                        return Ok(n);
                    }
                    // Readiness was stale: wait again.
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what `s` has into a buffer kept while waiting (a stream with
    /// no readiness of its own to wait on: TLS). `Ok(0)` is the end of the
    /// stream. Cancel-safe as `read_buf` is.
    pub(super) async fn read_from<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
    ) -> std::io::Result<usize> {
        self.prepare();
        let had = self.spare();
        let n = s.read_buf(&mut self.buf).await?;
        self.read(n, had);
        Ok(n)
    }

    /// Reads what `s` has, without waiting: the epoll engine's sockets,
    /// read when epoll has said they are readable. `Ok(None)`: nothing
    /// was there (`WouldBlock`); `Ok(Some((0, _)))`: the end of the
    /// stream; otherwise the bytes read and whether the read was short,
    /// which drained the socket (the engine then waits for its next
    /// readiness event instead of making a read that would block, as
    /// [`ReadBuf::fill_from`] does for tokio).
    ///
    /// The read goes into `scratch`, the engine thread's one buffer of
    /// [`SCRATCH`] bytes, zeroed once when the thread starts, and what came
    /// is copied to the end of this buffer. Without `unsafe` a `Read`
    /// takes only initialized bytes, so reading straight into this buffer
    /// meant zeroing its room first, every read: a `memset` of [`IDLE`]
    /// bytes and a resize and truncate around it, and reserving the room:
    /// about 390 instructions a statement in all (callgrind, TPC-B-like
    /// `-M simple`, 7,440 before; BENCHMARKS.md). The copy is of the
    /// bytes that came, a few hundred for an ordinary statement or answer.
    /// A read that finds nothing takes no buffer from the pool.
    pub(super) fn try_fill<R: std::io::Read>(
        &mut self,
        s: &mut R,
        scratch: &mut [u8],
    ) -> std::io::Result<Option<(usize, bool)>> {
        let had = self.room.min(scratch.len());
        loop {
            match s.read(&mut scratch[..had]) {
                Ok(n) => {
                    if n > 0 {
                        // No `prepare`: the copy reserves what it needs
                        // (taking the allocation back when nothing points
                        // into it any more), and `park` gives up a buffer
                        // grown for a burst that is over.
                        if self.buf.capacity() == 0 {
                            self.buf = take();
                        }
                        self.buf.extend_from_slice(&scratch[..n]);
                    }
                    self.read(n, had);
                    return Ok(Some((n, n < had)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Before a wait: a drained buffer is given up (to the pool when it is
    /// idle-size, freed when a burst that grew it is over); one holding
    /// the start of a message, or grown for a burst still going, is kept.
    pub(super) fn park(&mut self) {
        if !self.buf.is_empty() {
            return;
        }
        if self.room > IDLE {
            if !self.small {
                return;
            }
            self.room = IDLE;
            self.buf = BytesMut::new();
        }
        if self.buf.capacity() > 0 {
            give(std::mem::take(&mut self.buf));
        }
    }

    /// Room for the next read: a pooled buffer if none is held, and the
    /// allocation reused when nothing points into it any more; a buffer
    /// grown for a burst is given up once the burst is over and nothing
    /// is left in it.
    fn prepare(&mut self) {
        if self.small && self.room > IDLE && self.buf.is_empty() {
            self.room = IDLE;
            self.buf = BytesMut::new();
        }
        if self.buf.capacity() == 0 && self.buf.is_empty() {
            self.buf = take();
        }
        self.buf.reserve(self.room);
    }

    /// After a read of `n` bytes into the room [`ReadBuf::prepare`] made:
    /// the room grown when the read filled it, and whether the burst is
    /// over (a small read).
    fn read(&mut self, n: usize, had: usize) {
        if n >= had && self.room < MAX {
            self.room = (self.room * 2).min(MAX);
        }
        self.small = n <= IDLE;
    }

    /// Free room right now, as the next read will see it.
    fn spare(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }
}

impl From<BytesMut> for ReadBuf {
    /// Starts from what was read already (the startup exchange's buffer).
    fn from(buf: BytesMut) -> ReadBuf {
        ReadBuf {
            buf,
            room: IDLE,
            small: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One read that fills all the room it had, leaving the start of
    /// the next message (one byte) in the buffer, as a large answer does.
    fn fill_leaving_one(r: &mut ReadBuf) {
        r.prepare();
        let had = r.spare();
        r.buf.resize(r.buf.len() + had, 0);
        r.read(had, had);
        let keep = r.buf.len() - 1;
        drop(r.buf.split_to(keep));
    }

    #[test]
    fn grows_while_reads_fill_it_and_shrinks_back_after() {
        let mut r = ReadBuf::new();
        for _ in 0..10 {
            fill_leaving_one(&mut r);
        }
        assert_eq!(r.room, MAX);
        assert!(!r.burst_over());
        r.prepare();
        assert!(r.spare() >= MAX);
        r.buf.extend_from_slice(b"small");
        r.read(5, MAX);
        assert!(r.burst_over());
        r.buf.clear();
        r.prepare();
        assert_eq!(r.room, IDLE);
        assert!(r.buf.capacity() < 2 * IDLE);
    }

    #[test]
    fn a_read_of_exactly_idle_bytes_is_a_small_one() {
        let mut r = ReadBuf::new();
        r.prepare();
        r.buf.resize(IDLE, 0);
        r.read(IDLE, IDLE);
        assert!(r.burst_over());
        r.buf.clear();
        r.prepare();
        assert_eq!(r.room, IDLE, "nothing left over: no burst");
    }

    #[test]
    fn the_steady_state_reuses_one_allocation() {
        let mut r = ReadBuf::new();
        r.prepare();
        let at = r.buf.as_ptr();
        for _ in 0..100 {
            r.buf.extend_from_slice(&[1u8; 100]);
            let frame = r.buf.split_to(100).freeze();
            drop(frame);
            r.read(100, 1024);
            assert!(r.burst_over());
            // Parked in the pool while waiting, taken back after.
            r.park();
            assert_eq!(
                r.buf.capacity(),
                0,
                "a drained buffer is given up while waiting"
            );
            r.prepare();
            assert_eq!(r.buf.as_ptr(), at, "reallocated");
        }
    }

    #[test]
    fn a_partial_message_or_a_burst_keeps_its_buffer_while_waiting() {
        let mut r = ReadBuf::new();
        r.prepare();
        r.buf.extend_from_slice(b"half a message");
        r.read(14, IDLE);
        r.park();
        assert_eq!(&r.buf[..], b"half a message");
        r.buf.clear();
        // Reads that fill their room with more to come: the room grows,
        // and the grown buffer is kept across a wait while the burst goes
        // on.
        fill_leaving_one(&mut r);
        fill_leaving_one(&mut r);
        assert!(!r.burst_over());
        r.buf.clear();
        let kept = r.buf.capacity();
        r.park();
        assert!(
            kept > 0 && r.buf.capacity() == kept,
            "a burst keeps its buffer"
        );
        assert!(r.room > IDLE);
        // The burst is over: the grown buffer is freed, not pooled.
        r.prepare();
        r.buf.extend_from_slice(b"done");
        let had = r.spare() + 4;
        r.read(4, had);
        r.buf.clear();
        r.park();
        assert_eq!(r.buf.capacity(), 0);
        assert_eq!(r.room, IDLE);
    }

    #[test]
    fn the_pool_is_bounded() {
        for _ in 0..POOL * 2 {
            give(BytesMut::with_capacity(IDLE));
        }
        assert_eq!(FREE.with(|f| f.borrow().len()), POOL);
        for _ in 0..POOL * 2 {
            assert!(take().capacity() >= IDLE);
        }
    }
}
