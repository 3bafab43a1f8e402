//! The local worker's status, published by the scheduler thread for readers
//! that must not wait for it (`worker.status` on every admin connection).
//!
//! The scheduler thread owns the [`Board`]: after every request it has
//! handled, and *before* it sends that request's reply, it compares the
//! local worker's entry, the health windows and the number of reservations
//! with the published snapshot and swaps in a new one if any of them
//! changed; every health tick (1 s) republishes unconditionally. Readers
//! clone the `Arc` under a short read lock and derive health, staleness and
//! eligibility from the snapshot with their own `now`, by the same rule the
//! scheduler uses ([`super::derive`]).
//!
//! Staleness bound: a change made by any scheduler request is visible to
//! every reader before that request's caller gets its reply (so a client
//! that drains and then asks sees `draining`); the derived fields are exact
//! at the reader's instant. A snapshot that has not been republished for
//! [`MAX_AGE`] (the scheduler thread is wedged) is refused as `Unavailable`,
//! as a call to a wedged thread would be, and so is any read after the
//! thread has ended.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::health::Windows;
use super::{ClusterView, SchedulerError, WorkerRef, derive};
use crate::workers::Worker;

/// A snapshot older than this is refused: the scheduler republishes every
/// health tick, so only a wedged or overloaded thread lets it age. Equal to
/// the scheduler's reply deadline, the wait a hop would have allowed.
pub const MAX_AGE: Duration = super::REPLY_DEADLINE;

/// The local worker's entry as the scheduler holds it.
#[derive(Debug, Clone, PartialEq)]
struct LocalEntry {
    worker: Worker,
    last_seen: Instant,
    active: u32,
    reserved: u32,
}

#[derive(Debug, Clone, PartialEq)]
struct LocalSnapshot {
    local: Option<LocalEntry>,
    windows: Windows,
    reservations: usize,
}

impl LocalSnapshot {
    fn of(view: &ClusterView) -> LocalSnapshot {
        LocalSnapshot {
            local: view.workers.get(&view.local_worker_id).map(|e| LocalEntry {
                worker: (*e.worker).clone(),
                last_seen: e.last_seen,
                active: e.active,
                reserved: e.reserved,
            }),
            windows: view.windows,
            reservations: view.reservations.len(),
        }
    }

    /// Whether this snapshot still says what `view` holds; no allocation.
    fn matches(&self, view: &ClusterView) -> bool {
        let entry = view.workers.get(&view.local_worker_id);
        let same_entry = match (&self.local, entry) {
            (None, None) => true,
            (Some(mine), Some(e)) => {
                mine.last_seen == e.last_seen
                    && mine.active == e.active
                    && mine.reserved == e.reserved
                    && mine.worker == *e.worker
            }
            _ => false,
        };
        same_entry && self.windows == view.windows && self.reservations == view.reservations.len()
    }
}

struct Published {
    snapshot: LocalSnapshot,
    at: Instant,
}

/// Where the scheduler thread publishes; `None` once the thread has ended.
#[derive(Clone)]
pub struct Board(Arc<RwLock<Option<Arc<Published>>>>);

impl Board {
    pub fn new(view: &ClusterView, now: Instant) -> Board {
        let board = Board(Arc::new(RwLock::new(None)));
        board.swap(Some(LocalSnapshot::of(view)), now);
        board
    }

    fn swap(&self, snapshot: Option<LocalSnapshot>, now: Instant) {
        let published = snapshot.map(|snapshot| Arc::new(Published { snapshot, at: now }));
        // A poisoned lock still holds a whole value (writers only swap it).
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = published;
    }

    fn current(&self) -> Option<Arc<Published>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Republishes if `view` changed since the last publication, or always
    /// when `force` (the health tick). Scheduler thread only.
    pub fn publish(&self, view: &ClusterView, now: Instant, force: bool) {
        let unchanged = self.current().is_some_and(|p| p.snapshot.matches(view));
        if force || !unchanged {
            self.swap(Some(LocalSnapshot::of(view)), now);
        }
    }

    /// The scheduler thread has ended: readers get `Unavailable` from now on.
    pub fn close(&self) {
        self.swap(None, Instant::now());
    }

    /// The local worker's status now, without a hop to the scheduler.
    pub fn read(&self) -> Result<LocalStatus, SchedulerError> {
        self.read_at(Instant::now())
    }

    fn read_at(&self, now: Instant) -> Result<LocalStatus, SchedulerError> {
        let published = self
            .current()
            .ok_or_else(|| SchedulerError::Unavailable("thread stopped".into()))?;
        if now.saturating_duration_since(published.at) > MAX_AGE {
            return Err(SchedulerError::Unavailable(
                "no status published in time".into(),
            ));
        }
        Ok(LocalStatus { published, now })
    }
}

/// The local worker and the reservations in flight, as of one instant.
pub struct LocalStatus {
    published: Arc<Published>,
    now: Instant,
}

impl LocalStatus {
    /// The local worker, derived at the reader's instant; `None` if the
    /// scheduler does not know it (deleted from under the daemon).
    pub fn worker(&self) -> Option<WorkerRef<'_>> {
        let s = &self.published.snapshot;
        s.local.as_ref().map(|e| {
            derive(
                &e.worker,
                e.last_seen,
                e.active,
                e.reserved,
                s.windows,
                self.now,
            )
        })
    }

    /// Spawns in flight fleet-wide (reservations held, not yet settled).
    pub fn reservations(&self) -> usize {
        self.published.snapshot.reservations
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlacementPolicy;
    use crate::scheduler::health::Health;
    use crate::scheduler::{AdmissionQuery, Limits};
    use crate::workers::{Capacity, WorkerStatus};

    const W: Windows = Windows {
        stale_after: Duration::from_secs(15),
        down_after: Duration::from_secs(60),
    };

    fn local(max: u32) -> Worker {
        Worker {
            id: "local".into(),
            hostname: "h".into(),
            status: WorkerStatus::Online,
            providers: vec![],
            capabilities: vec![],
            capacity: Capacity {
                max_sandboxes: Some(max),
            },
            last_heartbeat_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn reserve(view: &mut ClusterView, now: Instant) {
        let query = AdmissionQuery {
            provider: "mock".into(),
            owner_id: String::new(),
            ttl_ms: 60_000,
            limits: Limits {
                max_ttl_ms: 3_600_000,
                max_sandboxes: 1000,
                max_per_owner: 0,
            },
            reserve: true,
        };
        assert!(view.admit(&query, false, now).reservation.is_some());
    }

    #[test]
    fn readers_see_every_change_once_published() {
        let now = Instant::now();
        let mut view = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        let board = Board::new(&view, now);
        assert!(board.read_at(now).unwrap().worker().is_none());

        view.observe(local(1), now, now);
        board.publish(&view, now, false);
        let status = board.read_at(now).unwrap();
        let worker = status.worker().expect("published after observe");
        assert_eq!(
            (worker.worker.id.as_str(), worker.ineligible),
            ("local", None)
        );

        // A reservation fills the only slot: the count and eligibility move.
        reserve(&mut view, now);
        board.publish(&view, now, false);
        let status = board.read_at(now).unwrap();
        assert_eq!(status.reservations(), 1);
        assert_eq!(
            status.worker().unwrap().ineligible,
            Some(crate::scheduler::health::Ineligible::Full)
        );

        std::sync::Arc::make_mut(&mut view.workers.get_mut("local").unwrap().worker).status =
            WorkerStatus::Draining;
        board.publish(&view, now, false);
        let status = board.read_at(now).unwrap();
        assert_eq!(
            status.worker().unwrap().worker.status,
            WorkerStatus::Draining
        );
    }

    #[test]
    fn health_is_derived_at_the_readers_instant() {
        let start = Instant::now();
        let mut view = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        view.observe(local(4), start, start);
        let board = Board::new(&view, start);
        // Nothing republished, yet a reader 4 s later sees the worker's age
        // then, exactly as the scheduler would derive it.
        let later = start + Duration::from_secs(4);
        let aged = board.read_at(later).unwrap();
        assert_eq!(aged.worker().unwrap().last_seen, Duration::from_secs(4));
        assert_eq!(
            aged.worker().unwrap(),
            view.view_ref(&view.workers["local"], later)
        );
        // A snapshot nobody republished for longer than MAX_AGE is refused.
        let past_bound = start + MAX_AGE + Duration::from_millis(1);
        assert!(matches!(
            board.read_at(past_bound),
            Err(SchedulerError::Unavailable(_))
        ));
        // A tick republishes it; health keeps following the reader's clock.
        let stale_time = start + Duration::from_secs(20);
        board.publish(&view, stale_time, true);
        let status = board.read_at(stale_time).unwrap();
        let worker = status.worker().unwrap();
        assert_eq!((worker.health, worker.stale), (Health::Suspect, true));
        assert_eq!(
            worker.ineligible,
            Some(crate::scheduler::health::Ineligible::Stale)
        );
    }

    #[test]
    fn an_unchanged_view_is_not_republished_and_a_closed_board_is_unavailable() {
        let now = Instant::now();
        let mut view = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        view.observe(local(4), now, now);
        let board = Board::new(&view, now);
        let before = board.current().unwrap();
        board.publish(&view, now + Duration::from_millis(10), false);
        assert!(Arc::ptr_eq(&before, &board.current().unwrap()));
        board.close();
        assert!(matches!(
            board.read_at(now),
            Err(SchedulerError::Unavailable(_))
        ));
    }
}
