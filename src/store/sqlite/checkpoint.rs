//! The `store-checkpoint` thread and the checkpoint the store thread runs
//! itself between two batches.
//!
//! Automatic WAL checkpoints are off on the writer connection (they would
//! run inside a commit and stall it); this thread checkpoints from its own
//! connection on a timer, and `journal_size_limit` bounds the WAL file when
//! it is reset.
//!
//! The WAL is reset (written again from its start) only by a write that
//! begins when every frame has been checkpointed. Under steady writes the
//! checkpoint thread never gets there: commits land while it copies. The
//! WAL then grows by every commit, and each commit's sync also has to
//! write the file's new size and blocks to the filesystem journal. So
//! after each pass that did not find the WAL reset, unless commits left
//! it far behind ([`FINISH_MAX_FRAMES`]), the store thread copies the rest
//! itself between two batches (nothing commits meanwhile, so it completes;
//! usually a few frames) and its next write resets the WAL: commits then
//! overwrite blocks the file already has.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use rusqlite::Connection;

use crate::metrics::METRICS;

/// The most WAL frames the store thread checkpoints itself, between two
/// batches, to finish a checkpoint pass that concurrent commits kept short
/// (1 MiB of 4 KiB pages; a few frames under steady small writes). Nothing
/// commits while it runs, so it is kept small: during a burst of large
/// batches (spawns, lease renewal chunks) the WAL grows until it is over.
const FINISH_MAX_FRAMES: i64 = 256;

/// connection on a timer, so checkpoint work never runs inside a commit.
/// A pass that leaves the WAL unreset, by at most [`FINISH_MAX_FRAMES`]
/// frames, is handed to the store thread to finish (see the module notes).
pub struct Checkpointer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    pub(super) fn start(
        path: &Path,
        interval: Duration,
        finish: Arc<AtomicBool>,
    ) -> Result<Checkpointer, String> {
        let conn = Connection::open(path).map_err(|e| format!("checkpoint connection: {e}"))?;
        conn.busy_timeout(Duration::from_millis(100))
            .map_err(|e| e.to_string())?;
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                let ticks = crossbeam_channel::tick(interval);
                loop {
                    crossbeam_channel::select! {
                        recv(stopped) -> _ => break,
                        recv(ticks) -> _ => {
                            // Even a pass that copied every frame it saw
                            // leaves the WAL unreset when a commit landed
                            // meanwhile (the usual case under steady
                            // writes): the store thread's own pass is then
                            // a few frames, or nothing when idle.
                            if let Some((log_frames, left)) = checkpoint(&conn, Checkpoint::Pass)
                                && log_frames > 0
                                && left <= FINISH_MAX_FRAMES
                            {
                                finish.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                // One more PASSIVE checkpoint at shutdown, after the last commits.
                checkpoint(&conn, Checkpoint::Pass);
            })
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Checkpointer { stop, thread })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Who runs a checkpoint: the checkpoint thread's timed pass, or the store
/// thread finishing one between batches.
#[derive(Clone, Copy, Debug)]
pub(super) enum Checkpoint {
    Pass,
    Finish,
}

/// Whether the last checkpoint failed (its warning is not repeated).
static CHECKPOINT_FAILING: AtomicBool = AtomicBool::new(false);

/// Runs a PASSIVE checkpoint; returns the WAL's frames when it started and
/// how many of them it left uncopied (None when it failed).
pub(super) fn checkpoint(conn: &Connection, kind: Checkpoint) -> Option<(i64, i64)> {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        Ok((log_frames, done)) => {
            if CHECKPOINT_FAILING.swap(false, Ordering::Relaxed) {
                log::info!("WAL checkpoints succeed again");
            }
            match kind {
                Checkpoint::Pass => METRICS.store.checkpoints.inc(),
                Checkpoint::Finish => METRICS.store.checkpoint_finishes.inc(),
            }
            if log_frames > 0 {
                log::trace!(
                    "checkpoint ({kind:?}): {done}/{log_frames} frames in {:?}",
                    started.elapsed()
                );
            }
            Some((log_frames, log_frames - done))
        }
        Err(e) => {
            // Once per streak: under a full disk every pass fails alike.
            if !CHECKPOINT_FAILING.swap(true, Ordering::Relaxed) {
                log::warn!("WAL checkpoint ({kind:?}) failed: {e}");
            }
            None
        }
    }
}
