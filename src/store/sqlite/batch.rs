//! The `store` thread's loop: group commit and the duties between batches.
//!
//! Take one request, drain up to `max_batch - 1` more that are already
//! queued, and run them all in one `BEGIN IMMEDIATE` transaction through
//! [`rules::apply`] (each write in its own savepoint), commit with
//! `synchronous = FULL`, and only then reply and update the tallies. A
//! reply therefore means durable. Between batches: recovery while the disk
//! is full, otherwise retention and the reserve, and finishing a checkpoint
//! pass the checkpoint thread asked for (see checkpoint.rs).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::Connection;

use super::checkpoint::{Checkpoint, checkpoint};
use super::{retention, space};
use crate::metrics::METRICS;
use crate::store::rules::{self, Deferred};
use crate::store::{Health, StoreError, StoreRequest, Tallies};

/// How often the store thread tries to commit again while the disk is full
/// (with nothing else to commit, a one-row probe).
const RECOVERY_INTERVAL: Duration = Duration::from_millis(250);

/// The store thread's own state beside its connection: the disk and the
/// duties it runs between batches.
pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) reserve: space::Reserve,
    pub(super) health: Arc<Health>,
    pub(super) retention: retention::Retention,
    pub(super) next_recovery: Instant,
    /// When a disk-full change was last logged at warning level: a disk on
    /// the brink flips between full and not many times a second.
    pub(super) last_logged: Option<Instant>,
}

/// How often a flipping disk-full state is logged above debug.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How a batch's COMMIT went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Committed {
    Yes,
    /// Failed for lack of space.
    Full,
    Failed,
}

impl Writer {
    fn full(&self) -> bool {
        self.health.full.load(Ordering::SeqCst)
    }

    /// When the loop must wake up even with no request.
    fn next_duty(&self) -> Instant {
        if self.full() {
            self.next_recovery
        } else {
            self.retention.next_run()
        }
    }

    fn committed(&mut self, conn: &Connection, outcome: Committed) {
        match outcome {
            Committed::Yes if self.full() => self.space_returned("a commit"),
            Committed::Full if !self.full() => self.disk_full(conn),
            Committed::Yes | Committed::Full | Committed::Failed => {}
        }
    }

    /// The first commit that failed for lack of space: say so once, give
    /// the reserve back and let a checkpoint empty the WAL into it.
    fn disk_full(&mut self, conn: &Connection) {
        self.health.full.store(true, Ordering::SeqCst);
        METRICS.store.disk_full_events.inc();
        let released = self.reserve.release();
        self.health.reserve_held.store(false, Ordering::SeqCst);
        let level = self.log_level();
        log::log!(
            level,
            "storage full: cannot commit to {} ({}); {}writes answer 507 STORAGE_FULL and /api/v1/ready 503 until space returns",
            self.path.display(),
            space::describe_free(&self.path),
            if released {
                format!("released the {}-byte reserve; ", self.reserve.bytes())
            } else {
                String::new()
            }
        );
        truncate_wal(conn);
        self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
    }

    /// Error for the first change in [`FULL_LOG_INTERVAL`], debug after.
    fn log_level(&mut self) -> log::Level {
        let now = Instant::now();
        match self.last_logged {
            Some(at) if now.duration_since(at) < FULL_LOG_INTERVAL => log::Level::Debug,
            _ => {
                self.last_logged = Some(now);
                log::Level::Error
            }
        }
    }

    fn space_returned(&mut self, what: &str) {
        self.health.full.store(false, Ordering::SeqCst);
        let level = match self.log_level() {
            log::Level::Error => log::Level::Warn,
            other => other,
        };
        log::log!(
            level,
            "storage: {what} succeeded again on {} ({}); writes resume",
            self.path.display(),
            space::describe_free(&self.path)
        );
    }

    /// Work between batches: while full, try to commit again; otherwise
    /// put the reserve back when there is room and run retention when due.
    fn duties(&mut self, conn: &mut Connection, tallies: &Mutex<Tallies>) {
        let now = Instant::now();
        if self.full() {
            if now >= self.next_recovery {
                truncate_wal(conn);
                if probe(conn).is_ok() {
                    self.space_returned("a probe write");
                }
                self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
            }
            return;
        }
        if now < self.retention.next_run() {
            return;
        }
        self.restore_reserve();
        let outcome = self.retention.run(conn, tallies);
        if outcome == Committed::Full {
            self.disk_full(conn);
        }
    }

    /// Makes the reserve again once the filesystem has room for it twice
    /// over (so that making it does not fill the disk by itself).
    fn restore_reserve(&mut self) {
        if self.reserve.held() {
            return;
        }
        let room = space::free_bytes(&self.path).unwrap_or(0);
        if room < self.reserve.bytes().saturating_mul(2) {
            return;
        }
        match self.reserve.ensure() {
            Ok(()) => {
                self.health.reserve_held.store(true, Ordering::SeqCst);
                log::info!(
                    "storage: the {}-byte reserve {} is back in place",
                    self.reserve.bytes(),
                    self.reserve.path().display()
                );
            }
            Err(e) => log::debug!("storage: reserve not restored yet: {e}"),
        }
    }
}

/// Copies the whole WAL into the database and truncates it to nothing,
/// giving its space back (needs no reader in the way: only this thread
/// reads through this connection, and the checkpoint thread only
/// checkpoints).
fn truncate_wal(conn: &Connection) {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    }) {
        Ok((0, frames)) => log::info!("storage: WAL checkpointed and truncated ({frames} frames)"),
        Ok((_, frames)) => log::debug!("storage: WAL truncate blocked ({frames} frames)"),
        Err(e) => log::debug!("storage: WAL truncate failed: {e}"),
    }
}

/// One tiny durable write: whether the store can commit at all.
fn probe(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO store_meta (key, value) VALUES ('probe', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [crate::time::now_ms()],
    )?;
    tx.commit()
}

/// The store thread's loop. Returns when every handle is dropped.
pub(super) fn run(
    mut conn: Connection,
    mut writer: Writer,
    requests: Receiver<StoreRequest>,
    max_batch: usize,
    tallies: &Mutex<Tallies>,
    finish_checkpoint: &AtomicBool,
) {
    let mut batch: Vec<StoreRequest> = Vec::with_capacity(max_batch);
    loop {
        let wait = writer.next_duty().saturating_duration_since(Instant::now());
        match requests.recv_timeout(wait) {
            Ok(first) => {
                batch.push(first);
                while batch.len() < max_batch {
                    match requests.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let outcome = commit_batch(&mut conn, &writer.path, &mut batch, tallies);
                writer.committed(&conn, outcome);
                if finish_checkpoint.swap(false, Ordering::Relaxed) && !writer.full() {
                    checkpoint(&conn, Checkpoint::Finish);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        writer.duties(&mut conn, tallies);
    }
    log::debug!("store thread: inbox closed, exiting");
}

/// Runs `batch` in one `BEGIN IMMEDIATE` transaction and commits it; then
/// sends every reply and applies the effects of those that succeeded, or,
/// when the commit failed, answers every request with its error.
fn commit_batch(
    conn: &mut Connection,
    path: &Path,
    batch: &mut Vec<StoreRequest>,
    tallies: &Mutex<Tallies>,
) -> Committed {
    let started = Instant::now();
    let size = batch.len();
    let mut pending: Vec<Deferred> = Vec::with_capacity(size);
    let outcome = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for request in batch.drain(..) {
            pending.push(rules::apply(&tx, request));
        }
        tx.commit()
    })();
    let mut tallies = tallies.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Ok(()) => {
            METRICS.store.observe_commit(size, started.elapsed());
            pending.into_iter().for_each(|p| p(None, &mut tallies));
            Committed::Yes
        }
        Err(error) => {
            let full = space::is_full(&error, path);
            let error = if full {
                StoreError::Full(format!(
                    "cannot commit to {} ({}): {error}",
                    path.display(),
                    space::describe_free(path)
                ))
            } else {
                StoreError::from(error)
            };
            // Under a full disk every batch fails the same way: the first
            // is logged by the caller's state change, the rest at debug.
            if full {
                log::debug!("store commit of {size} requests failed: {error}");
            } else {
                log::error!("store commit of {size} requests failed: {error}");
            }
            METRICS.store.commit_failures.inc();
            // Requests not yet applied when the transaction failed to open
            // are still in `batch`; they get the same answer.
            let unapplied = StoreError::Unavailable("not applied".into());
            for request in batch.drain(..) {
                pending.push(rules::reply_only(request, &unapplied));
            }
            pending
                .into_iter()
                .for_each(|p| p(Some(&error), &mut tallies));
            if full {
                Committed::Full
            } else {
                Committed::Failed
            }
        }
    }
}
