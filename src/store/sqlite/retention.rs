//! Retention: rows that only record the past are purged once they are
//! older than `store.retention`, in small batches, on the store thread
//! between two group commits (never inside one), so the database and its
//! WAL stay bounded under steady churn while the single writer stays the
//! only writer.
//!
//! What goes, each at most [`PURGE_BATCH`] rows per run:
//! - sandboxes `destroyed` or `error` whose last change is older than the
//!   cutoff (`lost` rows stay for an operator to look at);
//! - released leases (holder `''`) released before the cutoff whose
//!   resource has no sandbox row any more: the lease row of any sandbox
//!   that still exists is kept. The highest generation purged is kept in
//!   `store_meta.generation_floor` and a lease made where no row exists
//!   starts above it, so a generation never goes back, even when a
//!   resource id comes back (a `worker.spawn` may name its sandbox id);
//! - idempotency keys and audit rows older than the cutoff, oldest first
//!   (both are appended in time order, so their rowid order is time order
//!   and a look at the oldest [`PURGE_BATCH`] rows is enough).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use super::batch::Committed;
use crate::metrics::METRICS;
use crate::sandboxes::SandboxState;
use crate::store::Tallies;

/// Rows per table per run: one run is a transaction of at most a few
/// thousand row deletes (a few ms), so no request waits long behind it.
pub const PURGE_BATCH: i64 = 500;
/// Between runs when the last one found less than a batch anywhere.
const PURGE_INTERVAL: Duration = Duration::from_secs(1);
/// Between runs while there is a backlog.
const CATCH_UP_INTERVAL: Duration = Duration::from_millis(50);

pub struct Retention {
    keep_ms: i64,
    next: Instant,
}

/// What one run removed.
#[derive(Default)]
struct Purged {
    sandboxes: Vec<(SandboxState, String, String)>,
    leases: Vec<String>,
    keys: usize,
    audit: usize,
}

impl Purged {
    fn rows(&self) -> usize {
        self.sandboxes.len() + self.leases.len() + self.keys + self.audit
    }

    fn backlog(&self) -> bool {
        [
            self.sandboxes.len(),
            self.leases.len(),
            self.keys,
            self.audit,
        ]
        .iter()
        .any(|n| *n as i64 >= PURGE_BATCH)
    }
}

impl Retention {
    pub fn new(keep: Duration) -> Retention {
        Retention {
            keep_ms: i64::try_from(keep.as_millis()).unwrap_or(i64::MAX),
            next: Instant::now() + PURGE_INTERVAL,
        }
    }

    pub fn next_run(&self) -> Instant {
        self.next
    }

    /// One purge run: everything older than the cutoff, up to a batch per
    /// table, in one transaction; the tallies follow after COMMIT.
    pub fn run(&mut self, conn: &mut Connection, tallies: &Mutex<Tallies>) -> Committed {
        let cutoff = crate::time::now_ms().saturating_sub(self.keep_ms);
        let result = (|| -> rusqlite::Result<Purged> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let purged = purge(&tx, cutoff)?;
            if purged.rows() > 0 {
                tx.commit()?;
            }
            Ok(purged)
        })();
        let (outcome, backlog) = match result {
            Ok(purged) => {
                let rows = purged.rows();
                if rows > 0 {
                    METRICS.store.purged_rows.add(rows as u64);
                    log::debug!(
                        "retention: purged {} sandboxes, {} leases, {} idempotency keys, {} audit rows",
                        purged.sandboxes.len(),
                        purged.leases.len(),
                        purged.keys,
                        purged.audit
                    );
                    let mut t = tallies.lock().unwrap_or_else(|e| e.into_inner());
                    t.purged(&purged.leases, &purged.sandboxes);
                }
                (Committed::Yes, purged.backlog())
            }
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) => {
                (Committed::Full, false)
            }
            Err(e) => {
                log::warn!("retention purge failed: {e}");
                (Committed::Failed, false)
            }
        };
        self.next = Instant::now()
            + if backlog {
                CATCH_UP_INTERVAL
            } else {
                PURGE_INTERVAL
            };
        outcome
    }
}

fn purge(tx: &rusqlite::Transaction<'_>, cutoff: i64) -> rusqlite::Result<Purged> {
    let mut purged = Purged::default();
    {
        let mut ended = tx.prepare_cached(
            "SELECT id, state, provider, worker_id FROM sandboxes
             WHERE state IN ('destroyed', 'error') AND updated_at < ?1
             ORDER BY updated_at LIMIT ?2",
        )?;
        let rows = ended
            .query_map(params![cutoff, PURGE_BATCH], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut delete = tx.prepare_cached("DELETE FROM sandboxes WHERE id = ?1")?;
        for (id, state, provider, worker) in rows {
            delete.execute([&id])?;
            let state = SandboxState::parse(&state).unwrap_or(SandboxState::Destroyed);
            purged.sandboxes.push((state, provider, worker));
        }
    }
    {
        let mut released = tx.prepare_cached(
            "SELECT resource_id, generation FROM leases
             WHERE holder_id = '' AND expires_at < ?1
               AND NOT EXISTS (SELECT 1 FROM sandboxes WHERE sandboxes.id = leases.resource_id)
             ORDER BY expires_at LIMIT ?2",
        )?;
        let rows = released
            .query_map(params![cutoff, PURGE_BATCH], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut delete = tx.prepare_cached("DELETE FROM leases WHERE resource_id = ?1")?;
        let mut floor = 0;
        for (id, generation) in rows {
            delete.execute([&id])?;
            floor = floor.max(generation);
            purged.leases.push(id);
        }
        if floor > 0 {
            tx.prepare_cached(
                "INSERT INTO store_meta (key, value) VALUES ('generation_floor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            )?
            .execute([floor])?;
        }
    }
    purged.keys = tx
        .prepare_cached(
            "DELETE FROM idempotency_keys WHERE rowid IN (
                 SELECT rowid FROM (SELECT rowid, created_at FROM idempotency_keys ORDER BY rowid LIMIT ?2)
                 WHERE created_at < ?1)",
        )?
        .execute(params![cutoff, PURGE_BATCH])?;
    purged.audit = tx
        .prepare_cached(
            "DELETE FROM admin_audit WHERE seq IN (
                 SELECT seq FROM (SELECT seq, at FROM admin_audit ORDER BY seq LIMIT ?2)
                 WHERE at < ?1)",
        )?
        .execute(params![cutoff, PURGE_BATCH])?;
    Ok(purged)
}

/// The generation a lease made where no row exists must start above (0:
/// nothing was ever purged).
pub(super) fn generation_floor(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
    use rusqlite::OptionalExtension;
    let floor: Option<i64> = tx
        .prepare_cached("SELECT value FROM store_meta WHERE key = 'generation_floor'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(floor.unwrap_or(0).max(0) as u64)
}
