//! The cluster view: every worker with its receive time, live count and
//! reservations, and the indexes kept beside it (eligible workers by load,
//! reason counts, stale-lapse instants, owner counts).

use super::*;

pub(super) struct Entry {
    /// Shared with [`WorkersSnapshot`]s; changed through `Arc::make_mut`.
    pub(super) worker: Arc<Worker>,
    pub(super) last_seen: Instant,
    /// Health as of the last evaluation, to log changes once.
    pub(super) health: Health,
    /// Live sandboxes owned by this worker.
    pub(super) active: u32,
    /// Spawns in flight placed on this worker.
    pub(super) reserved: u32,
    /// The load under which it is filed in `eligible`, if it is.
    pub(super) filed: Option<u32>,
    /// The reason it is counted under in `reasons` (`None` = eligible), as
    /// of its last filing; `None` until it is filed.
    pub(super) counted: Option<Option<Ineligible>>,
}

impl Entry {
    pub(super) fn load(&self) -> u32 {
        self.active + self.reserved
    }
}

/// The view itself; pure apart from the `now` passed in.
///
/// Placement cost does not grow with the number of sandboxes (counts, not
/// lists), and only mildly with workers: `eligible` keeps the workers that
/// can take a sandbox ordered by load, so spread and binpack read from one
/// end instead of scanning every worker.
pub(super) struct ClusterView {
    pub(super) workers: BTreeMap<String, Entry>,
    /// (load, id) of every worker eligible at its last evaluation.
    pub(super) eligible: BTreeSet<(u32, String)>,
    /// Every worker counted by the reason it was filed under.
    pub(super) reasons: ReasonCounts,
    /// (instant its heartbeat goes stale, id) of every worker filed as
    /// online and fresh: the ones whose reason time alone can change
    /// (to `stale`) before they are filed again.
    pub(super) lapses: BTreeSet<(Instant, String)>,
    pub(super) windows: Windows,
    pub(super) local_worker_id: String,
    pub(super) policy: PlacementPolicy,
    /// owner -> live sandboxes plus reservations.
    pub(super) owners: HashMap<String, u32>,
    pub(super) total_live: u32,
    pub(super) reservations: HashMap<u64, Reservation>,
    pub(super) next_reservation: u64,
    /// Workers refreshed in memory since the last flush to the store.
    pub(super) dirty: BTreeSet<String>,
}

impl ClusterView {
    pub(super) fn new(
        local_worker_id: String,
        windows: Windows,
        policy: PlacementPolicy,
    ) -> ClusterView {
        ClusterView {
            workers: BTreeMap::new(),
            eligible: BTreeSet::new(),
            reasons: ReasonCounts::default(),
            lapses: BTreeSet::new(),
            windows,
            local_worker_id,
            policy,
            owners: HashMap::new(),
            total_live: 0,
            reservations: HashMap::new(),
            next_reservation: 1,
            dirty: BTreeSet::new(),
        }
    }

    pub(super) fn view(&self, entry: &Entry, now: Instant) -> WorkerView {
        self.view_ref(entry, now).to_owned()
    }

    pub(super) fn snapshot(&self, now: Instant) -> WorkersSnapshot {
        let workers = self
            .workers
            .values()
            .map(|e| {
                let v = self.view_ref(e, now);
                SharedView {
                    worker: Arc::clone(&e.worker),
                    health: v.health,
                    stale: v.stale,
                    ineligible: v.ineligible,
                    active_sandboxes: v.active_sandboxes,
                    last_seen: v.last_seen,
                }
            })
            .collect();
        WorkersSnapshot { workers }
    }

    pub(super) fn view_ref<'e>(&self, entry: &'e Entry, now: Instant) -> WorkerRef<'e> {
        derive(
            &entry.worker,
            entry.last_seen,
            entry.active,
            entry.reserved,
            self.windows,
            now,
        )
    }

    /// Re-files one worker in the indexes after any change to it.
    pub(super) fn refile(&mut self, id: &str, now: Instant) {
        self.unfile(id);
        self.file(id, now);
    }

    /// Takes a worker out of the indexes (`eligible`, `reasons`, `lapses`),
    /// by what it was filed under.
    pub(super) fn unfile(&mut self, id: &str) {
        let Some(entry) = self.workers.get_mut(id) else {
            return;
        };
        if let Some(load) = entry.filed.take() {
            self.eligible.remove(&(load, id.to_owned()));
        }
        if let Some(reason) = entry.counted.take() {
            self.reasons.remove(&entry.worker, reason);
            // Its key cannot have moved: `observe` and `set_windows` unfile
            // before they change the receive time or the windows.
            if let Some(at) = entry.last_seen.checked_add(self.windows.stale_after) {
                self.lapses.remove(&(at, id.to_owned()));
            }
        }
    }

    /// Files an unfiled worker in the indexes as it is at `now`.
    pub(super) fn file(&mut self, id: &str, now: Instant) {
        let windows = self.windows;
        let Some(entry) = self.workers.get_mut(id) else {
            return;
        };
        let age = now.saturating_duration_since(entry.last_seen);
        let reason =
            health::ineligibility(&entry.worker, health::health(age, windows), entry.load());
        if reason.is_none() {
            entry.filed = Some(entry.load());
            self.eligible.insert((entry.load(), id.to_owned()));
        }
        // Filed online and fresh: only time can make it stale unfiled (and
        // not within the life of the process, if `stale_after` is absurd).
        if reason != Some(Ineligible::Stale) && entry.worker.status == WorkerStatus::Online {
            if let Some(at) = entry.last_seen.checked_add(windows.stale_after) {
                self.lapses.insert((at, id.to_owned()));
            }
        }
        self.reasons.add(&entry.worker, reason);
        entry.counted = Some(reason);
    }

    pub(super) fn observe(
        &mut self,
        worker: impl Into<Arc<Worker>>,
        received: Instant,
        now: Instant,
    ) -> WorkerView {
        let worker = worker.into();
        let id = worker.id.clone();
        // Unfiled by what the previous record was filed under, before the
        // record (its status, providers, receive time) is replaced.
        self.unfile(&id);
        let previous = self
            .workers
            .get(&id)
            .map(|e| (e.health, e.active, e.reserved));
        let (active, reserved) = previous.map_or((0, 0), |(_, a, r)| (a, r));
        let entry = Entry {
            worker,
            last_seen: received,
            health: Health::Ready,
            active,
            reserved,
            filed: None,
            counted: None,
        };
        let view = self.view(&entry, now);
        match previous {
            None => {
                log::info!("worker {id} registered (status {})", entry.worker.status);
                crate::events::publish(|| Event::WorkerRegistered { id: id.to_owned() });
            }
            Some((old, _, _)) if old != view.health => {
                METRICS.workers.health_changes.inc();
                crate::events::publish(|| Event::WorkerHealth {
                    id: id.to_owned(),
                    from: old.as_str(),
                    to: view.health.as_str(),
                    last_seen_seconds: None,
                });
                log::info!(
                    "worker {id} health {} -> {} (heartbeat received)",
                    old.as_str(),
                    view.health.as_str()
                );
            }
            Some(_) => {}
        }
        self.workers.insert(
            id.clone(),
            Entry {
                health: view.health,
                ..entry
            },
        );
        self.file(&id, now);
        view
    }

    pub(super) fn refresh(
        &mut self,
        hb: &Heartbeat,
        received: Instant,
        now_ms: i64,
        now: Instant,
    ) -> Refresh {
        let Some(entry) = self.workers.get_mut(&hb.id) else {
            return Refresh::Unknown;
        };
        if hb.changes(&entry.worker) {
            return Refresh::Changed;
        }
        let record = Arc::make_mut(&mut entry.worker);
        record.last_heartbeat_ms = now_ms;
        record.updated_at_ms = now_ms;
        let worker = Arc::clone(&entry.worker);
        self.dirty.insert(hb.id.clone());
        Refresh::Done(self.observe(worker, received, now))
    }

    /// The receive times refreshed in memory since the last call.
    pub(super) fn take_dirty(&mut self) -> Vec<(String, i64)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|id| {
                self.workers
                    .get(&id)
                    .map(|e| (id, e.worker.last_heartbeat_ms))
            })
            .collect()
    }

    pub(super) fn forget(&mut self, id: &str) -> bool {
        self.dirty.remove(id);
        self.unfile(id);
        self.workers.remove(id).is_some()
    }

    /// New health windows: every worker's reason and lapse instant may
    /// move, so every worker is re-filed.
    pub(super) fn set_windows(&mut self, windows: Windows, now: Instant) {
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in &ids {
            self.unfile(id);
        }
        self.windows = windows;
        for id in &ids {
            self.file(id, now);
        }
        self.evaluate(now);
    }

    /// Re-derives health for every worker, logs each change once, and
    /// re-files the workers whose eligibility changed.
    pub(super) fn evaluate(&mut self, now: Instant) {
        let windows = self.windows;
        let mut changed = Vec::new();
        for (id, entry) in self.workers.iter_mut() {
            let age = now.saturating_duration_since(entry.last_seen);
            let current = health::health(age, windows);
            if current != entry.health {
                METRICS.workers.health_changes.inc();
                log::warn!(
                    "worker {id} health {} -> {} (last heartbeat received {:.1}s ago)",
                    entry.health.as_str(),
                    current.as_str(),
                    age.as_secs_f64()
                );
                crate::events::publish(|| {
                    let (id, from, to) = (id.to_owned(), entry.health.as_str(), current.as_str());
                    let last_seen_seconds = age.as_secs_f64();
                    if current == Health::Ready {
                        Event::WorkerHealth {
                            id,
                            from,
                            to,
                            last_seen_seconds: Some(last_seen_seconds),
                        }
                    } else {
                        Event::WorkerStale {
                            id,
                            from,
                            to,
                            last_seen_seconds,
                        }
                    }
                });
                entry.health = current;
                changed.push(id.clone());
            }
        }
        for id in changed {
            self.refile(&id, now);
        }
    }

    pub(super) fn figures(&self, now: Instant) -> WorkerFigures {
        let mut f = WorkerFigures {
            total: self.workers.len(),
            ..Default::default()
        };
        f.heartbeat_ages.reserve(self.workers.len());
        for (id, entry) in &self.workers {
            let v = self.view(entry, now);
            f.online += usize::from(v.worker.status == WorkerStatus::Online);
            f.stale += usize::from(v.stale);
            f.unhealthy +=
                usize::from(v.worker.status == WorkerStatus::Unhealthy || v.health == Health::Down);
            f.eligible += usize::from(v.ineligible.is_none());
            f.heartbeat_ages
                .push((id.clone(), v.last_seen.as_secs_f64()));
            f.sandboxes_by_worker.push((id.clone(), entry.active));
        }
        f.reservations = self.reservations.len();
        f
    }

    pub(super) fn status(&self, now: Instant) -> SchedulerStatus {
        let (eligible, _) = self.explain("", now);
        SchedulerStatus {
            policy: self.policy.as_str(),
            local_worker_id: self.local_worker_id.clone(),
            selected_worker_id: self.pick("", now).map(str::to_owned),
            eligible_workers: eligible,
            reservations: self.reservations.len(),
            windows: self.windows,
        }
    }
}

/// A worker's derived view at `now`: the one rule for health, staleness and
/// eligibility, used on the scheduler thread and by snapshot readers.
pub(super) fn derive(
    worker: &Worker,
    last_seen: Instant,
    active: u32,
    reserved: u32,
    windows: Windows,
    now: Instant,
) -> WorkerRef<'_> {
    let age = now.saturating_duration_since(last_seen);
    let health = health::health(age, windows);
    WorkerRef {
        worker,
        health,
        stale: age > windows.stale_after,
        ineligible: health::ineligibility(worker, health, active + reserved),
        active_sandboxes: active,
        last_seen: age,
    }
}
