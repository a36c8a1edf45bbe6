//! Writes audit records to the store in group commits, and makes a refused
//! write's record durable before the refusal is answered (guarantee 5).
//!
//! A refusal submits its record with [`AuditSink::durable`] and awaits it:
//! it returns once the record is committed in the store, or appended and
//! synced to the local spool ([`crate::audit_spool`]) while the store is
//! slow or down. One task writes. It takes everything queued at that
//! moment as one batch (one transaction, one commit), and the refusals that
//! arrive while a commit is in flight form the next batch: a flood of
//! stale writes costs one commit per batch, not one sync per refusal
//! (group commit). Lease records ([`AuditSink::record`]) take the same
//! path without anyone waiting on them.
//!
//! When a batch cannot be committed (the store failed or did not answer
//! within `store_timeout`), it goes to the spool, and so does every batch
//! after it until the spool has been shipped: records keep their order.
//! A shipper task retries the store every second and removes what it
//! shipped from the spool. Only a full spool (`[audit] spool_max_bytes`)
//! drops records, counted in `fencepost_audit_records_dropped_total`.
//!
//! The writer is also where records are chained (tamper evidence,
//! [`fencing::audit_chain`]): it is the one place every record of this
//! process passes through in order, so it links each record to the one
//! before under this process's chain id before the batch goes to the store
//! or the spool. A spooled record keeps its link when it is shipped later.
//! A batch the full spool drops keeps its place in the chain: the lost
//! records show as a gap in `fencepost audit verify`, where they were lost.
//! (Reusing their sequence numbers would be wrong: a batch whose store
//! commit timed out may have landed after all, and the unique (chain, seq)
//! index would then skip the later records that reused them.)
//!
//! A kill -9 loses nothing answered: every answered refusal's record is in
//! the store or in the synced spool, which the next start ships. A crash
//! in the instant between a shipped batch's commit and its removal from
//! the spool ships that batch again on the next start (a duplicate, never
//! a loss).

use std::sync::Arc;
use std::time::Duration;

use fencing::{AuditRecord, Chainer};
use metrics::Counter;
use store::Store;
use tokio::sync::{mpsc, oneshot};

use crate::audit_spool::Spool;
use crate::config::AuditConfig;
use crate::metrics::{AUDIT_DROPPED, AUDIT_SPOOLED, AUDIT_WRITTEN};

// Boxing the record would cost an allocation per refusal to shrink the
// rare `Flush`; the channel holds at most `queue_capacity` messages.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// A record, and who waits for it to be durable, if anyone.
    Record(AuditRecord, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
}

/// Handle for submitting records. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    dropped: Counter,
}

/// How often the shipper tries the store while the spool holds records.
const SHIP_EVERY: Duration = Duration::from_secs(1);

impl AuditSink {
    /// Starts the writer and the spool shipper on the current runtime. The
    /// writer's records form one hash chain under a new random chain id.
    pub fn start(store: Arc<dyn Store>, cfg: &AuditConfig, spool: Spool) -> AuditSink {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let dropped = metrics::counter!(AUDIT_DROPPED);
        let spool = Arc::new(spool);
        let writer = Writer {
            store: Arc::clone(&store),
            spool: Arc::clone(&spool),
            batch_size: cfg.batch_size.max(1),
            interval: cfg.flush_interval,
            written: metrics::counter!(AUDIT_WRITTEN),
            spooled: metrics::counter!(AUDIT_SPOOLED),
            dropped: dropped.clone(),
            chain: Chainer::new(new_chain_id()),
        };
        tracing::info!(chain = writer.chain.chain(), "audit chain started");
        tokio::spawn(writer.run(rx));
        tokio::spawn(ship_loop(store, spool, cfg.batch_size.max(1)));
        AuditSink { tx, dropped }
    }

    /// Queues a record nobody waits for (a lease record); never waits. A
    /// full queue or a stopped writer counts the record as dropped.
    pub fn record(&self, rec: AuditRecord) {
        if self.tx.try_send(Msg::Record(rec, None)).is_err() {
            self.dropped.increment(1);
            tracing::warn!("audit queue full or closed: record dropped");
        }
    }

    /// Submits a refused write's record and waits until it is durable: in
    /// the store, or in the synced spool (or dropped and counted, when the
    /// spool is full). A full queue makes the refusal wait its turn: the
    /// record must not be lost, and a flood is slowed instead.
    pub fn durable(
        &self,
        rec: AuditRecord,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tx = self.tx.clone();
        let dropped = self.dropped.clone();
        async move {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Record(rec, Some(done))).await.is_err() {
                dropped.increment(1);
                tracing::error!("audit writer stopped: record dropped");
                return;
            }
            let _ = wait.await;
        }
    }

    /// Waits until every record queued before this call has been written
    /// or spooled (or dropped and counted), or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        let sent = tokio::time::timeout(timeout, self.tx.send(Msg::Flush(done))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(())))
    }
}

struct Writer {
    store: Arc<dyn Store>,
    spool: Arc<Spool>,
    batch_size: usize,
    interval: Duration,
    written: Counter,
    spooled: Counter,
    dropped: Counter,
    chain: Chainer,
}

/// 128 random bits, hex: two processes never share a chain.
fn new_chain_id() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch: Vec<AuditRecord> = Vec::with_capacity(self.batch_size);
        let mut waiters: Vec<oneshot::Sender<()>> = vec![];
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut urgent = false;
            let deadline = tokio::time::Instant::now() + self.interval;
            loop {
                match next.take() {
                    Some(Msg::Record(mut r, w)) => {
                        self.chain.link(&mut r);
                        batch.push(r);
                        if let Some(w) = w {
                            waiters.push(w);
                            urgent = true;
                        }
                    }
                    Some(Msg::Flush(w)) => {
                        waiters.push(w);
                        urgent = true;
                    }
                    None => {}
                }
                if batch.len() >= self.batch_size {
                    break;
                }
                // Whatever is queued now joins this batch; someone waiting
                // means no waiting for more (group commit, not a timer).
                match rx.try_recv() {
                    Ok(m) => next = Some(m),
                    Err(_) if urgent => break,
                    Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(m)) => next = Some(m),
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            if !batch.is_empty() {
                self.write(&mut batch).await;
            }
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// One batch: to the store unless the spool holds older records; to
    /// the spool when the store fails.
    async fn write(&self, batch: &mut Vec<AuditRecord>) {
        if !self.spool.active() {
            match self.store.append_audit(batch).await {
                Ok(()) => {
                    self.written.increment(batch.len() as u64);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.len(), "audit store write failed; spooling locally");
                }
            }
        }
        let n = batch.len() as u64;
        match self.spool.append(std::mem::take(batch)).await {
            Ok(()) => self.spooled.increment(n),
            Err(e) => {
                tracing::error!(error = %e, records = n, "audit spool cannot take the records: dropped");
                self.dropped.increment(n);
            }
        }
    }
}

/// Ships the spool to the store whenever it holds records and the store
/// answers.
async fn ship_loop(store: Arc<dyn Store>, spool: Arc<Spool>, batch_size: usize) {
    let mut tick = tokio::time::interval(SHIP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !spool.active() {
            continue;
        }
        match spool.ship(&*store, batch_size).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!(AUDIT_WRITTEN).increment(n as u64);
                tracing::info!(records = n, "audit spool shipped to the store");
            }
            Err(e) => tracing::debug!(error = %e, "audit spool not shipped yet"),
        }
    }
}
