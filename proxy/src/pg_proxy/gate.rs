//! A future polled only when something it waits for has woken it.
//!
//! A session's task runs two loops (`tokio::join!` of the client's and the
//! server's), and the client loop waits on several things at once (its
//! socket, the server side's end, the process's shutdown). Tokio polls
//! every one of them at every wake of the task, whichever woke it: each
//! statement's answer from the server re-polled the whole client loop, and
//! each poll of a pending `Notify` or `watch` takes its waiter list's lock
//! (callgrind, `-M simple`, one client: about 900 instructions a statement
//! for the shutdown watch and the server-gone `Notify`, before counting
//! the client loop's own re-poll). [`Gated`] gives the future it wraps a
//! waker of its own, which notes that it fired before it wakes the task;
//! the future is polled only after that (and once at first), so a wake
//! meant for one loop, or for one branch, leaves the others alone.
//!
//! Written here rather than taken from a crate: `futures_util`'s
//! `FuturesUnordered` does the same with an allocation per future and a
//! ready queue, for a fixed pair of futures that need neither.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The gate's waker: fired notes it, then wakes the task.
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `inner`, polled (with the gate's own waker) only once a waker it
/// registered has fired since its last poll.
pub(super) struct Gated<'a, F> {
    inner: Pin<&'a mut F>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<'a, F: Future> Gated<'a, F> {
    pub(super) fn new(inner: Pin<&'a mut F>) -> Self {
        let flag = Arc::new(Flag {
            // The first poll goes through: nothing is registered yet.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&flag));
        Gated { inner, flag, waker }
    }
}

impl<F: Future> Future for Gated<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Register before looking at the flag: a wake after the look
        // finds the task's waker and wakes it again.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;

    /// What a [`Probe`] records: its polls, whether it may finish, and the
    /// waker it was last polled with.
    #[derive(Default)]
    struct Probed {
        polls: AtomicUsize,
        open: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probed {
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }

        fn take_waker(&self) -> Waker {
            self.waker.lock().unwrap().take().unwrap()
        }
    }

    /// Counts its polls; ready once `open` is set, registering the waker
    /// it was polled with for whoever sets it.
    struct Probe<'a>(&'a Probed);

    impl Future for Probe<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// The session's task: counts how often it is woken.
    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<CountWakes>, Waker) {
        let task = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&task));
        (task, waker)
    }

    #[test]
    fn polled_first_then_only_when_its_own_waker_fired() {
        let probed = Probed::default();
        let probe = pin!(Probe(&probed));
        let mut gated = pin!(Gated::new(probe));
        let (task, task_waker) = task();
        let mut cx = Context::from_waker(&task_waker);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(probed.polls(), 1, "the first poll goes through");
        // The task woken for something else: the probe is left alone.
        for _ in 0..5 {
            assert!(gated.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(probed.polls(), 1);
        // Its own waker fires: the task is woken, the probe polled again.
        probed.open.store(true, Ordering::SeqCst);
        probed.take_waker().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(probed.polls(), 2);
    }

    #[test]
    fn a_wake_before_the_next_poll_is_not_lost() {
        let probed = Probed::default();
        let probe = pin!(Probe(&probed));
        let mut gated = pin!(Gated::new(probe));
        let (_task, task_waker) = task();
        let mut cx = Context::from_waker(&task_waker);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        // Fired twice while the task had not run: one poll sees it.
        let w = probed.take_waker();
        w.wake_by_ref();
        w.wake();
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(probed.polls(), 2);
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(probed.polls(), 2);
    }
}
