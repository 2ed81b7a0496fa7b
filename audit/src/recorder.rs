//! Group commit: many producers, one writer thread, one fsync per batch.
//!
//! * [`Recorder::record`] blocks until the record is durable (administrator actions, policy
//!   revisions: acknowledge only after fsync).
//! * [`Recorder::submit`] / [`Recorder::submit_batch`] never block (flow verdicts from the
//!   datapath): when the queue is full the events are **counted** as dropped, and the count is
//!   itself recorded as an `events_dropped` record in the next batch — loss is accounted, never
//!   silent, and auditing never back-pressures the datapath.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::Event;
use crate::store::Store;

type Reply = mpsc::Sender<std::result::Result<std::ops::Range<u64>, String>>;

enum Msg {
    Events(Vec<Event>, Option<Reply>),
    Checkpoint(Reply),
    Retention(mpsc::Sender<std::result::Result<Vec<String>, String>>),
    SetRetention(u32, mpsc::Sender<std::result::Result<u32, String>>),
    /// Acknowledge once everything before is durable, then write nothing until the
    /// guard's sender is dropped.
    Pause(mpsc::Sender<()>, Receiver<()>),
    Stop,
}

/// While held, the writer appends nothing (see [`Recorder::pause`]); dropping it resumes.
pub struct PauseGuard {
    _resume: mpsc::Sender<()>,
}

/// Counters of a recorder.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub submitted: AtomicU64,
    pub written: AtomicU64,
    pub batches: AtomicU64,
    /// Events not written (queue full, or a failed write of a non-acknowledged batch).
    pub dropped: AtomicU64,
    /// Dropped events whose loss has been recorded in an `events_dropped` record.
    pub dropped_recorded: AtomicU64,
}

pub struct Recorder {
    tx: SyncSender<Msg>,
    stats: Arc<RecorderStats>,
    pending_drops: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Recorder {
    /// Start the writer thread. `queue` is the number of queued messages (a batch is one).
    pub fn spawn(store: Store, queue: usize, max_batch: usize) -> Recorder {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let stats = Arc::new(RecorderStats::default());
        let pending = Arc::new(AtomicU64::new(0));
        let (s2, p2) = (stats.clone(), pending.clone());
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(store, rx, s2, p2, max_batch.max(1)))
            .ok();
        Recorder {
            tx,
            stats,
            pending_drops: pending,
            handle,
        }
    }

    pub fn stats(&self) -> &RecorderStats {
        &self.stats
    }

    /// Append one record and wait until it is durable.
    pub fn record(&self, ev: Event) -> Result<u64> {
        Ok(self.record_batch(vec![ev])?.start)
    }

    /// Append records and wait until they are durable.
    pub fn record_batch(&self, evs: Vec<Event>) -> Result<std::ops::Range<u64>> {
        let (rtx, rrx) = mpsc::channel();
        self.stats
            .submitted
            .fetch_add(evs.len() as u64, Ordering::Relaxed);
        self.tx
            .send(Msg::Events(evs, Some(rtx)))
            .map_err(|_| Error::Stopped)?;
        rrx.recv()
            .map_err(|_| Error::Stopped)?
            .map_err(Error::Writer)
    }

    /// Queue one record without waiting. On a full queue it is counted as dropped.
    pub fn submit(&self, ev: Event) -> Result<()> {
        self.submit_batch(vec![ev])
    }

    /// Queue records without waiting. On a full queue they are counted as dropped.
    pub fn submit_batch(&self, evs: Vec<Event>) -> Result<()> {
        let n = evs.len() as u64;
        self.stats.submitted.fetch_add(n, Ordering::Relaxed);
        match self.tx.try_send(Msg::Events(evs, None)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                self.pending_drops.fetch_add(n, Ordering::Relaxed);
                Err(Error::QueueFull)
            }
            Err(TrySendError::Disconnected(_)) => Err(Error::Stopped),
        }
    }

    /// Sign a checkpoint now (after everything queued before this call).
    pub fn checkpoint(&self) -> Result<()> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send(Msg::Checkpoint(rtx))
            .map_err(|_| Error::Stopped)?;
        rrx.recv()
            .map_err(|_| Error::Stopped)?
            .map(|_| ())
            .map_err(Error::Writer)
    }

    /// Run the retention job in the writer (removes segments older than the retention period,
    /// each removal recorded first). Returns the purged segment names.
    pub fn enforce_retention(&self) -> Result<Vec<String>> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send(Msg::Retention(rtx))
            .map_err(|_| Error::Stopped)?;
        rrx.recv()
            .map_err(|_| Error::Stopped)?
            .map_err(Error::Writer)
    }

    /// Change the retention period in the writer (refused below the legal floor; the change
    /// is recorded). Returns the previous period.
    pub fn set_retention_days(&self, days: u32) -> Result<u32> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .send(Msg::SetRetention(days, rtx))
            .map_err(|_| Error::Stopped)?;
        rrx.recv()
            .map_err(|_| Error::Stopped)?
            .map_err(Error::Writer)
    }

    /// Make everything queued so far durable and checkpointed, then hold the writer until
    /// the guard is dropped: the store's files stay still, so a reader (a live `verify`, the
    /// compliance report) sees no half-written tail. Flow records offered meanwhile queue up
    /// and, if the queue fills, are counted as dropped — accounted as always.
    pub fn pause(&self) -> Result<PauseGuard> {
        let (ack_tx, ack_rx) = mpsc::channel();
        let (resume_tx, resume_rx) = mpsc::channel();
        self.tx
            .send(Msg::Pause(ack_tx, resume_rx))
            .map_err(|_| Error::Stopped)?;
        ack_rx.recv().map_err(|_| Error::Stopped)?;
        Ok(PauseGuard { _resume: resume_tx })
    }

    /// Drain the queue, record the stop, checkpoint and join the writer.
    pub fn shutdown(mut self) -> Result<()> {
        let _ = self.tx.send(Msg::Stop);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Writer("audit writer panicked".into()))?,
            None => Err(Error::Stopped),
        }
    }
}

fn writer(
    mut store: Store,
    rx: Receiver<Msg>,
    stats: Arc<RecorderStats>,
    pending: Arc<AtomicU64>,
    max_batch: usize,
) -> Result<()> {
    let idle = store
        .config()
        .checkpoint_interval
        .min(Duration::from_secs(1));
    loop {
        let first = match rx.recv_timeout(idle) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                let _ = store.checkpoint();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => Msg::Stop,
        };
        let mut batch: Vec<Event> = Vec::new();
        let mut replies: Vec<(Reply, usize, usize)> = Vec::new();
        let mut unacked = 0u64;
        let mut stop = false;
        let mut ckpt: Vec<Reply> = Vec::new();
        let mut retention = Vec::new();
        let mut set_retention = Vec::new();
        let mut pauses = Vec::new();
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            match m {
                Msg::Events(evs, reply) => {
                    let start = batch.len();
                    if reply.is_none() {
                        unacked += evs.len() as u64;
                    }
                    batch.extend(evs);
                    if let Some(r) = reply {
                        replies.push((r, start, batch.len()));
                    }
                }
                Msg::Checkpoint(r) => ckpt.push(r),
                Msg::Retention(r) => retention.push(r),
                Msg::SetRetention(days, r) => set_retention.push((days, r)),
                Msg::Pause(ack, resume) => {
                    pauses.push((ack, resume));
                    // Nothing queued after the pause may be written before it.
                    break;
                }
                Msg::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.len() >= max_batch {
                break;
            }
            msg = rx.try_recv().ok();
        }
        let drops = pending.swap(0, Ordering::Relaxed);
        let offset = usize::from(drops > 0);
        if drops > 0 {
            batch.insert(
                0,
                Event::EventsDropped {
                    source: "audit-recorder".into(),
                    count: drops,
                    reason: "recorder queue full (events counted, not stored individually)".into(),
                },
            );
        }
        let n = batch.len() as u64;
        match store.append_batch(batch) {
            Ok(range) => {
                stats.written.fetch_add(n, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.dropped_recorded.fetch_add(drops, Ordering::Relaxed);
                for (r, a, b) in replies {
                    let s = range.start + (a + offset) as u64;
                    let e = range.start + (b + offset) as u64;
                    let _ = r.send(Ok(s..e));
                }
            }
            Err(e) => {
                // Not acknowledged: waiting producers get the error; fire-and-forget events
                // are counted as dropped (and the count re-queued to be recorded).
                pending.fetch_add(drops + unacked, Ordering::Relaxed);
                stats.dropped.fetch_add(unacked, Ordering::Relaxed);
                for (r, _, _) in replies {
                    let _ = r.send(Err(e.to_string()));
                }
            }
        }
        for (days, r) in set_retention {
            let _ = r.send(store.set_retention_days(days).map_err(|e| e.to_string()));
        }
        for r in retention {
            let _ = r.send(store.enforce_retention().map_err(|e| e.to_string()));
        }
        for r in ckpt {
            let res = store.checkpoint().map(|_| 0..0).map_err(|e| e.to_string());
            let _ = r.send(res);
        }
        for (ack, resume) in pauses {
            let _ = store.checkpoint();
            if ack.send(()).is_ok() {
                // Returns when the guard is dropped.
                let _ = resume.recv();
            }
        }
        if stop {
            // Drain anything still queued, then close.
            let mut rest = Vec::new();
            while let Ok(Msg::Events(evs, reply)) = rx.try_recv() {
                let n = evs.len();
                let r = store.append_batch(evs);
                if let Some(reply) = reply {
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                } else {
                    rest.push(n);
                }
            }
            let drops = pending.swap(0, Ordering::Relaxed);
            if drops > 0 {
                store.append(Event::EventsDropped {
                    source: "audit-recorder".into(),
                    count: drops,
                    reason: "recorder queue full".into(),
                })?;
                stats.dropped_recorded.fetch_add(drops, Ordering::Relaxed);
            }
            return store.close();
        }
    }
}
