//! One shutdown signal for every listener of a process.
//!
//! Listeners stop accepting when it fires, then drain what they have;
//! `serve` flushes the audit log last, after nothing can refuse a write
//! any more.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The trigger side; dropping it also fires the signal.
pub struct Trigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has begun.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|fired| *fired).await;
    }

    pub fn is_fired(&self) -> bool {
        *self.rx.borrow()
    }
}

/// SIGINT and SIGTERM, caught from the moment this is called: the returned
/// future resolves on the first of them, including one that arrived
/// before it was first polled.
///
/// Call it before binding anything (and so before `--ready-file` exists):
/// until a handler is installed a SIGTERM has its default action and kills
/// the process, so a supervisor that signals as soon as the server says it
/// is ready would otherwise get a kill instead of a drain.
pub fn os_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        // `signal` installs the handler now, not at the first poll.
        fn install(kind: SignalKind, name: &'static str) -> Option<Signal> {
            signal(kind)
                .inspect_err(|e| tracing::warn!(signal = name, error = %e, "cannot handle the signal; it keeps its default action"))
                .ok()
        }
        async fn next(sig: Option<Signal>) {
            match sig {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let term = install(SignalKind::terminate(), "SIGTERM");
        let int = install(SignalKind::interrupt(), "SIGINT");
        async move {
            tokio::select! {
                _ = next(term) => {}
                _ = next(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
