//! When a listener's certificate is reloaded: on SIGHUP, and when one of
//! its files changes.
//!
//! Why poll the files (once a [`POLL`]) instead of inotify: a `stat` of
//! two or three files a second costs nothing measurable, needs no new
//! dependency, and sees every way a certificate gets replaced, including
//! those inotify misses or reports on another path: cert-manager and
//! Kubernetes secrets swap a `..data` symlink (the watched file itself
//! never changes, the path resolves elsewhere), and NFS or bind mounts
//! deliver no events at all. `metadata` follows symlinks, so a swap shows
//! as a new inode.
//!
//! A change is acted on once the files have looked the same for two polls
//! in a row, so a certificate written in place (or a cert and key written
//! one after the other) is read whole, not half-written. A reload that
//! fails keeps the old config and is not retried until the files change
//! again (or SIGHUP), so a bad file logs one error, not one a second.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::ServerTls;
use crate::config::ListenerTls;
use crate::shutdown::Shutdown;

/// How often the files are looked at.
pub(super) const POLL: Duration = Duration::from_secs(1);

/// What identifies one version of a file: its inode (a rename or symlink
/// swap makes a new one), modification time and length (an in-place
/// write). `None`: the file is missing or unreadable right now.
type Stamp = Option<(u64, u64, Option<SystemTime>, u64)>;

/// The stamps of a listener's files, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamps(Vec<Stamp>);

impl Stamps {
    pub(super) fn of(files: &ListenerTls) -> Stamps {
        use std::os::unix::fs::MetadataExt;
        let stamp = |p: &std::path::Path| -> Stamp {
            let m = std::fs::metadata(p).ok()?;
            Some((m.dev(), m.ino(), m.modified().ok(), m.len()))
        };
        let mut v = vec![stamp(&files.cert), stamp(&files.key)];
        if let Some(ca) = &files.client_ca {
            v.push(stamp(ca));
        }
        Stamps(v)
    }
}

impl ServerTls {
    /// Starts reloading this listener's config on SIGHUP and on file
    /// change, until `shutdown`. The SIGHUP handler is installed before
    /// this returns (a signal sent once the server says it is ready must
    /// find it, or SIGHUP's default action would end the process).
    pub fn watch(self: &Arc<Self>, shutdown: Shutdown) {
        let hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; certificates reload on file change only");
                None
            }
        };
        tokio::spawn(watch(Arc::clone(self), hup, shutdown));
    }

    /// Reloads after recording the files' current stamps as seen, so the
    /// poller does not reload the same files again.
    fn reload_seen(&self, why: &str) {
        let now = Stamps::of(&self.files);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = now;
        self.reload(why);
    }
}

async fn hangup(sig: &mut Option<Signal>) {
    match sig {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn watch(tls: Arc<ServerTls>, mut hup: Option<Signal>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // A change seen once, waiting to be seen unchanged on the next poll.
    let mut pending: Option<Stamps> = None;
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = hangup(&mut hup) => {
                pending = None;
                tls.reload_seen("SIGHUP");
            }
            _ = tick.tick() => {
                let now = Stamps::of(&tls.files);
                let changed = *tls.seen.lock().unwrap_or_else(|e| e.into_inner()) != now;
                if !changed {
                    pending = None;
                } else if pending.as_ref() == Some(&now) {
                    pending = None;
                    tls.reload_seen("file change");
                } else {
                    pending = Some(now);
                }
            }
        }
    }
}
