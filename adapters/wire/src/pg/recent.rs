//! One session's memory of the statements it classified, in front of the
//! shared [`Classifier`].
//!
//! A client repeats a handful of texts: an `-M extended` client sends the
//! same Parse text for every statement, a simple-protocol client the same
//! text with other numbers. The shared cache answers them too, but each
//! lookup there is a concurrent cache's work (hashing the text, its
//! bookkeeping of reads) plus, for a shaped text, a new `String`. Here the
//! last few texts are compared in place, the one after the entry used last
//! first, a shaped entry against the text's shape as it is computed
//! ([`shape_matches`]): no lock, no hash, no shape written, no allocation
//! on a hit. Callgrind, `-M extended -S`, one client:
//! see BENCHMARKS.md ("instructions per statement").
//!
//! The same rule as the shared cache decides what an entry is keyed by
//! ([`Classification::by_shape`]), and an entry holds the shared cache's own
//! `Arc`, so a hit here is exactly what the shared cache would answer.
//!
//! An entry also keeps the exact text it was last used with, as `Bytes` of
//! its own: a prepared statement keeps its text for the audit (a refused
//! Execute names it) and shares that copy instead of the Parse message,
//! which would pin the session's read buffer and make it reallocate.

use std::sync::Arc;

use bytes::Bytes;

use super::classify::{shape_into, shape_matches, Classification, Classifier, MAX_CACHED_TEXT};

/// Entries kept per session: more than pgbench's TPC-B-like script uses
/// (seven texts), few enough to compare one by one.
const ENTRIES: usize = 16;

/// No entry in [`Entry::next`].
const NONE: u8 = u8::MAX;

// Entry indices fit `Entry::next`'s bytes and `find`'s bit set.
const _: () = assert!(ENTRIES <= 32);

/// Texts longer than this are not kept per session (the shared cache still
/// has them): bounds a session's memory at `ENTRIES` times this.
const MAX_TEXT: usize = 1024;

/// A session's recent classifications. Empty (and allocation-free) until
/// the session's first statement.
#[derive(Default)]
pub struct Recent {
    entries: Vec<Entry>,
    /// The next entry to replace once full.
    next: usize,
    /// The entry the last lookup found or made.
    last: usize,
    /// The shape of the text being looked up, reused.
    scratch: String,
}

struct Entry {
    /// The entries asked for right after this one, the latest first
    /// ([`NONE`]: not yet): a script that branches (pgbench's TPC-B-like
    /// script adds a delta of either sign, and `+ -5` is not the shape of
    /// `+ 5`) is found at the first or second try, not by a scan.
    next: [u8; 2],
    /// The text's shape, or the text itself (see [`Classification::by_shape`]).
    key: Box<str>,
    by_shape: bool,
    class: Arc<Classification>,
    /// The exact text the entry was last used with.
    text: Bytes,
}

impl Recent {
    pub fn new() -> Recent {
        Recent::default()
    }

    /// What `classifier` says of `text` (raw bytes off the wire), from this
    /// session's memory when it has seen the text or its shape before.
    pub fn classify(&mut self, classifier: &Classifier, text: &[u8]) -> Arc<Classification> {
        self.lookup(classifier, text).0
    }

    /// As [`Recent::classify`], with the text as `Bytes` that share no
    /// buffer but the entry's own: no copy when the text is the one the
    /// entry last saw (a repeated Parse), one otherwise.
    pub fn classify_text(
        &mut self,
        classifier: &Classifier,
        text: &[u8],
    ) -> (Arc<Classification>, Bytes) {
        let (class, at) = self.lookup(classifier, text);
        let kept = match at.and_then(|i| self.entries.get_mut(i)) {
            Some(e) if e.text == text => e.text.clone(),
            Some(e) => {
                e.text = Bytes::copy_from_slice(text);
                e.text.clone()
            }
            None => Bytes::copy_from_slice(text),
        };
        (class, kept)
    }

    /// The classification, and the entry holding it if there is one.
    fn lookup(
        &mut self,
        classifier: &Classifier,
        text: &[u8],
    ) -> (Arc<Classification>, Option<usize>) {
        let raw = text;
        if raw.len() > MAX_TEXT.min(MAX_CACHED_TEXT) {
            return (classifier.classify_bytes(raw), None);
        }
        if let Some(i) = self.find(raw) {
            self.followed_by(i);
            return (Arc::clone(&self.entries[i].class), Some(i));
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            return (classifier.classify_bytes(raw), None);
        };
        let shaped = shape_into(text, &mut self.scratch);
        let shape = self.scratch.as_str();
        let class = classifier.classify(text);
        let by_shape = shaped && class.by_shape();
        let entry = Entry {
            next: [NONE; 2],
            key: if by_shape { shape.into() } else { text.into() },
            by_shape,
            class: Arc::clone(&class),
            text: Bytes::copy_from_slice(raw),
        };
        let at = if self.entries.len() < ENTRIES {
            // Room for one entry at first (a Vec's first push makes four):
            // an idle pooled connection that ran one statement keeps one.
            if self.entries.capacity() == 0 {
                self.entries.reserve_exact(1);
            }
            self.entries.push(entry);
            self.entries.len() - 1
        } else {
            let at = self.next;
            self.entries[at] = entry;
            self.next = (self.next + 1) % ENTRIES;
            at
        };
        self.followed_by(at);
        (class, Some(at))
    }

    /// Entry `i` answered the lookup after the one used last: it becomes
    /// the last, and the first guess after that one.
    fn followed_by(&mut self, i: usize) {
        let Ok(byte) = u8::try_from(i) else {
            return;
        };
        if let Some(prev) = self.entries.get_mut(self.last) {
            if prev.next[0] != byte {
                prev.next = [byte, prev.next[0]];
            }
        }
        self.last = i;
    }

    /// The entry `text` (at most [`MAX_TEXT`] bytes) is answered by: the
    /// two entries asked for after the entry used last, the last time it
    /// was used ([`Entry::next`]), then the one after it in order (a
    /// session repeating a script first asks for its texts in the order it
    /// first did), then that entry itself (one statement again and
    /// again), then the others. Each is compared in place, the text's
    /// shape never written ([`shape_matches`]); a text that is not UTF-8
    /// matches none (keys are UTF-8, shapes ASCII). Which entry answers
    /// does not matter: any that matches holds what the shared cache
    /// would answer. Guessing first what followed last time: pgbench's
    /// TPC-B-like `-M simple`, 3.2 comparisons a statement before, about
    /// 1.2 after (callgrind, BENCHMARKS.md).
    fn find(&self, text: &[u8]) -> Option<usize> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }
        let last = self.entries.get(self.last);
        let after = if self.last + 1 < n { self.last + 1 } else { 0 };
        let guesses = [
            last.map_or(NONE, |e| e.next[0]),
            last.map_or(NONE, |e| e.next[1]),
            u8::try_from(after).unwrap_or(NONE),
            u8::try_from(self.last).unwrap_or(NONE),
        ];
        let mut tried = 0u32;
        for (k, &g) in guesses.iter().enumerate() {
            let i = usize::from(g);
            if g == NONE || i >= n || guesses[..k].contains(&g) {
                continue;
            }
            if self.entries[i].matches(text) {
                return Some(i);
            }
            tried |= 1 << i;
        }
        (0..n)
            .filter(|&i| tried & (1 << i) == 0)
            .find(|&i| self.entries[i].matches(text))
    }
}

impl Entry {
    fn matches(&self, text: &[u8]) -> bool {
        if self.by_shape {
            shape_matches(text, self.key.as_bytes())
        } else {
            *self.key.as_bytes() == *text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier() -> Classifier {
        Classifier::new(super::super::DEFAULT_WRITE_FUNCTIONS, 1 << 20)
    }

    #[test]
    fn answers_what_the_shared_classifier_answers() {
        let c = classifier();
        let mut r = Recent::new();
        let texts: [&[u8]; 9] = [
            b"SELECT abalance FROM acc WHERE aid = 17",
            b"SELECT abalance FROM acc WHERE aid = 90210",
            b"UPDATE acc SET abalance = abalance + 5 WHERE aid = 3",
            b"SET fencing.token = 7",
            b"SET fencing.token = 8",
            b"/* fencing.token=9 */ UPDATE t SET a = 1",
            b"/* fencing.token=10 */ UPDATE t SET a = 1",
            b"SELECT '\xff'",
            b"SELECT 1",
        ];
        // Twice: the second round is answered from the session's entries.
        for _ in 0..2 {
            for t in texts {
                assert_eq!(*r.classify(&c, t), *c.classify_bytes(t), "{t:?}");
            }
        }
        assert_eq!(r.classify(&c, b"SET fencing.token = 8").settings.len(), 1);
    }

    #[test]
    fn the_kept_text_is_the_exact_text_and_shared_when_repeated() {
        let c = classifier();
        let mut r = Recent::new();
        let (_, a) = r.classify_text(&c, b"SELECT 1 FROM t WHERE x = 1");
        let (_, b) = r.classify_text(&c, b"SELECT 1 FROM t WHERE x = 1");
        assert_eq!(a, &b"SELECT 1 FROM t WHERE x = 1"[..]);
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "a repeated text is not copied again"
        );
        let (_, d) = r.classify_text(&c, b"SELECT 1 FROM t WHERE x = 2");
        assert_eq!(d, &b"SELECT 1 FROM t WHERE x = 2"[..]);
        let (_, e) = r.classify_text(&c, b"SELECT '\xff'");
        assert_eq!(e, &b"SELECT '\xff'"[..]);
    }

    #[test]
    fn a_branching_script_is_guessed_from_what_followed_last_time() {
        let c = classifier();
        let mut r = Recent::new();
        let script: [&[u8]; 4] = [
            b"SELECT a FROM t WHERE id = 1",
            b"UPDATE t SET a = a + 5 WHERE id = 1",
            b"UPDATE t SET a = a + -5 WHERE id = 1",
            b"COMMIT",
        ];
        // The first statement, then either sign, then COMMIT, a few times.
        for sign in [1, 2, 2, 1, 1, 2] {
            for t in [script[0], script[sign], script[3]] {
                assert_eq!(*r.classify(&c, t), *c.classify_bytes(t), "{t:?}");
            }
        }
        // The SELECT's entry remembers both signs, the latest first.
        let first = r
            .entries
            .iter()
            .find(|e| e.matches(script[0]))
            .expect("kept");
        let followers: Vec<&[u8]> = first
            .next
            .iter()
            .map(|&i| r.entries[usize::from(i)].text.as_ref())
            .collect();
        assert_eq!(followers, [script[2], script[1]]);
        // And the lookup after the SELECT finds either at a guess.
        let _ = r.classify(&c, script[0]);
        let at = r.find(script[1]).expect("found");
        assert!(r.entries[r.last].next.contains(&(at as u8)));
    }

    #[test]
    fn a_repeated_text_is_the_same_entry_and_the_memory_is_bounded() {
        let c = classifier();
        let mut r = Recent::new();
        let a = r.classify(&c, b"SELECT 1 FROM t WHERE x = 1");
        let b = r.classify(&c, b"SELECT 1 FROM t WHERE x = 2");
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..100 {
            let t = format!("SELECT c{i} FROM t");
            assert!(!r.classify(&c, t.as_bytes()).write);
        }
        assert_eq!(r.entries.len(), ENTRIES);
        let long = format!("SELECT {} 1", "x, ".repeat(MAX_TEXT));
        let _ = r.classify(&c, long.as_bytes());
        assert!(r.entries.iter().all(|e| e.key.len() <= MAX_TEXT));
    }
}
