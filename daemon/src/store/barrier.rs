//! The durability barrier, with group commit.
//!
//! sled's `flush()` writes the log with `pwrite` and then `sync_file_range`, which
//! waits for the pages to be written back but flushes neither the device's write
//! cache nor file metadata such as a grown size (field notes §3.1, spacejam/sled#1452).
//! A barrier is therefore `flush()` followed by `fdatasync` of the store's `db` file.
//!
//! One fsync costs the same whether it covers one write or a thousand, so concurrent
//! writers share it: each writer takes a ticket *after* its transaction committed, and
//! waits until a barrier that started after that ticket completes. A single thread runs
//! barriers back to back; everything that committed while one barrier ran is covered by
//! the next.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::watch;

/// What the sync thread has made durable so far.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Progress {
    /// Every ticket up to and including this one is durable.
    Durable(u64),
    /// A barrier failed. sled's state on disk is now unknown, so nothing more is
    /// acknowledged: the operator must restart the daemon (as Vector does on a flush error).
    Failed(String),
}

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub struct BarrierStats {
    /// Barriers completed.
    pub barriers: AtomicU64,
    /// Tickets covered by those barriers (>= barriers: the difference is group commit).
    pub tickets: AtomicU64,
    /// How long each barrier (flush + fdatasync) took.
    pub duration: crate::metrics::Histogram,
}

#[derive(Debug)]
struct Shared {
    /// The last ticket handed out.
    issued: AtomicU64,
    /// Wakes the sync thread; the bool asks it to stop.
    wake: Mutex<bool>,
    wake_cv: Condvar,
    progress: watch::Sender<Progress>,
    stats: BarrierStats,
    /// The newest high-water mark set by the store's user, and whether it changed
    /// since it was last written to the mark file.
    mark: Mutex<(Vec<u8>, bool)>,
    /// Joined by `stop`, so that the thread's handle on the database is gone when the
    /// store is closed and the same directory can be opened again.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Handle to the durability barrier. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Barrier {
    shared: Arc<Shared>,
}

/// The barrier failed; nothing written since the last successful barrier can be
/// acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("the store could not make writes durable: {0}")]
pub struct BarrierError(pub String);

impl Barrier {
    /// Starts the sync thread for `db`, whose log file is `db_file`.
    pub(crate) fn start(
        db: sled::Db,
        db_file: File,
        mark_file: Arc<File>,
        head: Vec<u8>,
    ) -> std::io::Result<Barrier> {
        let (progress, _) = watch::channel(Progress::Durable(0));
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            progress,
            stats: BarrierStats::default(),
            mark: Mutex::new((head, false)),
            thread: Mutex::new(None),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("pcrd-store-sync".into())
            .spawn(move || sync_loop(&thread_shared, &db, &db_file, &mark_file))?;
        if let Ok(mut slot) = shared.thread.lock() {
            *slot = Some(handle);
        }
        Ok(Barrier { shared })
    }

    /// Waits until everything committed before this call is durable.
    pub(crate) async fn wait(&self) -> Result<(), BarrierError> {
        let mut rx = self.shared.progress.subscribe();
        let ticket = self.request();
        let seen = rx
            .wait_for(|p| match p {
                Progress::Durable(done) => *done >= ticket,
                Progress::Failed(_) => true,
            })
            .await
            .map_err(|_| BarrierError("the store's sync thread has stopped".into()))?;
        match &*seen {
            Progress::Durable(_) => Ok(()),
            Progress::Failed(why) => Err(BarrierError(why.clone())),
        }
    }

    /// Sets the high-water mark: what the next barrier will record as durable. Call it
    /// after the transaction it describes has committed.
    pub(crate) fn set_mark(&self, payload: &[u8]) {
        if let Ok(mut mark) = self.shared.mark.lock() {
            *mark = (payload.to_vec(), true);
        }
    }

    /// Stops acknowledging writes: every later barrier fails with `why`.
    pub(crate) fn fail(&self, why: String) {
        self.shared.progress.send_replace(Progress::Failed(why));
    }

    /// Resolves once the barrier has failed (or was failed), with why.
    pub(crate) async fn failed(&self) -> String {
        let mut rx = self.shared.progress.subscribe();
        match rx.wait_for(|p| matches!(p, Progress::Failed(_))).await {
            Ok(p) => match &*p {
                Progress::Failed(why) => why.clone(),
                Progress::Durable(_) => String::new(),
            },
            Err(_) => "the store's sync thread has stopped".into(),
        }
    }

    /// Why the barrier failed, once it has.
    pub(crate) fn failure(&self) -> Option<String> {
        match &*self.shared.progress.borrow() {
            Progress::Failed(why) => Some(why.clone()),
            Progress::Durable(_) => None,
        }
    }

    pub(crate) fn stats(&self) -> &BarrierStats {
        &self.shared.stats
    }

    fn request(&self) -> u64 {
        // Taken after the caller's transaction committed: a barrier that starts after
        // this point covers that transaction.
        let ticket = self.shared.issued.fetch_add(1, Ordering::AcqRel) + 1;
        let _guard = self.shared.wake.lock();
        self.shared.wake_cv.notify_one();
        ticket
    }

    /// Stops the sync thread after the barriers already requested, waits for it, and
    /// returns the newest mark set.
    pub(crate) fn stop(&self) -> Vec<u8> {
        if let Ok(mut stop) = self.shared.wake.lock() {
            *stop = true;
        }
        self.shared.wake_cv.notify_one();
        let handle = self.shared.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.shared
            .mark
            .lock()
            .map(|m| m.0.clone())
            .unwrap_or_default()
    }
}

fn sync_loop(shared: &Shared, db: &sled::Db, db_file: &File, mark_file: &File) {
    let mut durable = 0u64;
    loop {
        {
            let Ok(mut stop) = shared.wake.lock() else {
                return;
            };
            while !*stop && shared.issued.load(Ordering::Acquire) <= durable {
                stop = match shared.wake_cv.wait(stop) {
                    Ok(guard) => guard,
                    Err(_) => return,
                };
            }
            if *stop && shared.issued.load(Ordering::Acquire) <= durable {
                return;
            }
        }
        let target = shared.issued.load(Ordering::Acquire);
        // Taken before the flush: the mark describes a commit that this barrier covers.
        let mark = shared.mark.lock().ok().and_then(|mut m| {
            let changed = std::mem::replace(&mut m.1, false);
            changed.then(|| m.0.clone())
        });
        let started = Instant::now();
        let result = db
            .flush()
            .map_err(|e| format!("sled flush failed: {e}"))
            .and_then(|_| {
                db_file
                    .sync_data()
                    .map_err(|e| format!("fdatasync of the store's log failed: {e}"))
            });
        let elapsed = started.elapsed();
        match result {
            Ok(()) => {
                let stats = &shared.stats;
                stats.barriers.fetch_add(1, Ordering::Relaxed);
                stats.tickets.fetch_add(target - durable, Ordering::Relaxed);
                stats.duration.observe(elapsed);
                durable = target;
                // The mark only strengthens the check at open; failing to write it is
                // not a reason to stop acknowledging durable writes.
                let mark = mark.map(|head| super::mark::Mark { clean: false, head });
                if let Some(Err(e)) = mark.map(|m| super::mark::write(mark_file, &m)) {
                    tracing::warn!(error = %e, "Could not update the store's high-water mark.");
                }
                // A failure declared meanwhile (`fail`) stands.
                shared.progress.send_if_modified(|p| match p {
                    Progress::Failed(_) => false,
                    Progress::Durable(_) => {
                        *p = Progress::Durable(durable);
                        true
                    }
                });
            }
            Err(why) => {
                tracing::error!(error = %why, "Store durability barrier failed; nothing more will be acknowledged. Restart pcrd.");
                shared.progress.send_replace(Progress::Failed(why));
                return;
            }
        }
    }
}
