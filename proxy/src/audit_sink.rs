//! Writes audit records off the request path, in batches.
//!
//! A refusal only pushes its record into a bounded queue (`try_send`, no
//! await); one task drains the queue into the store. When the store is down
//! the task retries a batch briefly, then drops it and counts the loss, and
//! when the queue is full new records are dropped and counted: fencing must
//! never wait on its audit log (guarantee 5). On graceful shutdown
//! [`AuditSink::flush`] waits until everything queued so far is written.

use std::sync::Arc;
use std::time::Duration;

use fencing::AuditRecord;
use metrics::Counter;
use store::Store;
use tokio::sync::{mpsc, oneshot};

use crate::config::AuditConfig;
use crate::metrics::{AUDIT_DROPPED, AUDIT_WRITTEN};

enum Msg {
    Record(AuditRecord),
    Flush(oneshot::Sender<()>),
}

/// Handle for submitting records. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    dropped: Counter,
}

/// Attempts per batch before it is dropped; with the backoff below this
/// bounds a dead store's hold on the queue to about 1.5 s per batch.
const ATTEMPTS: u32 = 4;

impl AuditSink {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>, cfg: &AuditConfig) -> AuditSink {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let dropped = metrics::counter!(AUDIT_DROPPED);
        let written = metrics::counter!(AUDIT_WRITTEN);
        tokio::spawn(writer(
            store,
            rx,
            cfg.batch_size.max(1),
            cfg.flush_interval,
            written,
            dropped.clone(),
        ));
        AuditSink { tx, dropped }
    }

    /// Queues a record; never waits. A full queue or a stopped writer
    /// counts the record as dropped.
    pub fn record(&self, rec: AuditRecord) {
        if self.tx.try_send(Msg::Record(rec)).is_err() {
            self.dropped.increment(1);
            tracing::warn!("audit queue full or closed: record dropped");
        }
    }

    /// Waits until every record queued before this call has been written
    /// (or dropped and counted), or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        let sent = tokio::time::timeout(timeout, self.tx.send(Msg::Flush(done))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(())))
    }
}

async fn writer(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Msg>,
    batch_size: usize,
    interval: Duration,
    written: Counter,
    dropped: Counter,
) {
    let mut batch: Vec<AuditRecord> = Vec::with_capacity(batch_size);
    let mut waiters: Vec<oneshot::Sender<()>> = vec![];
    loop {
        // Wait for the first message, then gather for up to `interval`.
        let Some(first) = rx.recv().await else { break };
        let deadline = tokio::time::Instant::now() + interval;
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(Msg::Record(r)) => batch.push(r),
                Some(Msg::Flush(w)) => {
                    waiters.push(w);
                    break; // write now
                }
                None => {}
            }
            if batch.len() >= batch_size {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => next = Some(m),
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_batch(&*store, &mut batch, &written, &dropped).await;
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
    if !batch.is_empty() {
        write_batch(&*store, &mut batch, &written, &dropped).await;
    }
}

async fn write_batch(
    store: &dyn Store,
    batch: &mut Vec<AuditRecord>,
    written: &Counter,
    dropped: &Counter,
) {
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        match store.append_audit(batch).await {
            Ok(()) => {
                written.increment(batch.len() as u64);
                batch.clear();
                return;
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(error = %e, records = batch.len(), attempt, "audit write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "audit store down: records dropped");
            }
        }
    }
    dropped.increment(batch.len() as u64);
    batch.clear();
}
