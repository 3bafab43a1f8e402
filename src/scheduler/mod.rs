//! The scheduler: the thread that owns the in-memory cluster view.
//!
//! Runs on the `scheduler` thread. Holds every known worker with the
//! monotonic instant its last heartbeat was *received* here (never the
//! worker's own clock). Takes [`SchedulerRequest`]s (each with its reply
//! sender) from a bounded inbox, and on a one-second tick re-derives health
//! and logs every change. Readers (worker lists, metrics, diagnostics) ask it
//! for copies, so no scrape or list ever scans SQLite.
//!
//! Invariants: the view is loaded from the store before the daemon is ready;
//! every worker loaded at start gets a fresh grace window (`last_seen = now`);
//! the thread exits when every handle is dropped.

pub mod health;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select, tick};

use crate::config::PlacementPolicy;
use crate::events::Event;
use crate::metrics::{METRICS, WorkerFigures};
use crate::store::StoreHandle;
use crate::workers::{Heartbeat, Worker, WorkerStatus};
use health::{Health, Ineligible, Windows};
use snapshot::Board;
pub use snapshot::LocalStatus;

const REPLY_DEADLINE: Duration = Duration::from_secs(5);
const INBOX_CAPACITY: usize = 4096;
const HEALTH_TICK: Duration = Duration::from_secs(1);

/// A worker as the API and placement see it: the stored record plus what is
/// derived here.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub worker: Worker,
    pub health: Health,
    pub stale: bool,
    pub ineligible: Option<Ineligible>,
    pub active_sandboxes: u32,
    pub last_seen: Duration,
}

/// A borrowed [`WorkerView`], for rendering every worker without copying
/// them out of the scheduler (see [`SchedulerHandle::render_workers`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerRef<'a> {
    pub worker: &'a Worker,
    pub health: Health,
    pub stale: bool,
    pub ineligible: Option<Ineligible>,
    pub active_sandboxes: u32,
    pub last_seen: Duration,
}

impl WorkerRef<'_> {
    pub fn to_owned(self) -> WorkerView {
        WorkerView {
            worker: self.worker.clone(),
            health: self.health,
            stale: self.stale,
            ineligible: self.ineligible,
            active_sandboxes: self.active_sandboxes,
            last_seen: self.last_seen,
        }
    }
}

impl WorkerView {
    pub fn as_ref(&self) -> WorkerRef<'_> {
        WorkerRef {
            worker: &self.worker,
            health: self.health,
            stale: self.stale,
            ineligible: self.ineligible,
            active_sandboxes: self.active_sandboxes,
            last_seen: self.last_seen,
        }
    }
}

/// Renders borrowed worker views into bytes, on the caller's thread.
pub type RenderWorkers = Box<dyn for<'a> FnOnce(&[WorkerRef<'a>]) -> Vec<u8> + Send>;

/// Every worker, ordered by id, as the scheduler saw them at one instant.
/// The records are shared with the scheduler (copied only if it changes
/// one while the snapshot lives), so taking one copies no worker.
#[derive(Debug, Clone, Default)]
pub struct WorkersSnapshot {
    workers: Vec<SharedView>,
}

#[derive(Debug, Clone)]
struct SharedView {
    worker: Arc<Worker>,
    health: Health,
    stale: bool,
    ineligible: Option<Ineligible>,
    active_sandboxes: u32,
    last_seen: Duration,
}

impl WorkersSnapshot {
    /// Borrowed views, ordered by worker id.
    pub fn views(&self) -> Vec<WorkerRef<'_>> {
        self.workers
            .iter()
            .map(|v| WorkerRef {
                worker: &v.worker,
                health: v.health,
                stale: v.stale,
                ineligible: v.ineligible,
                active_sandboxes: v.active_sandboxes,
                last_seen: v.last_seen,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerStatus {
    pub policy: &'static str,
    pub local_worker_id: String,
    pub selected_worker_id: Option<String>,
    pub eligible_workers: usize,
    pub reservations: usize,
    pub windows: Windows,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerError {
    Unavailable(String),
}

impl std::fmt::Display for SchedulerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchedulerError::Unavailable(why) => write!(f, "scheduler unavailable: {why}"),
        }
    }
}

/// Admission limits, read from the live config by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_ttl_ms: i64,
    pub max_sandboxes: u32,
    /// 0 = no per-owner limit.
    pub max_per_owner: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionQuery {
    pub provider: String,
    pub owner_id: String,
    pub ttl_ms: i64,
    pub limits: Limits,
    /// Hold a slot on the chosen worker until `settle` (a real spawn), or
    /// only answer (a preflight).
    pub reserve: bool,
}

/// Why admission said no; the names are the API's `reason` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MaxTtl,
    MaxSandboxes,
    MaxSandboxesPerOwner,
    WorkerUnavailable,
    RemoteWorkerRpcUnavailable,
}

impl Denial {
    pub const ALL: [Denial; 5] = [
        Denial::MaxTtl,
        Denial::MaxSandboxes,
        Denial::MaxSandboxesPerOwner,
        Denial::WorkerUnavailable,
        Denial::RemoteWorkerRpcUnavailable,
    ];

    /// [`Denial::as_str`] of each denial, in [`Denial::ALL`] order: the
    /// names of the admission metrics' denial slots (`d as usize`).
    pub const LABELS: [&'static str; 5] = [
        "max_ttl",
        "max_sandboxes",
        "max_sandboxes_per_owner",
        "worker_unavailable",
        "remote_worker_rpc_unavailable",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denial::MaxTtl => "max_ttl",
            Denial::MaxSandboxes => "max_sandboxes",
            Denial::MaxSandboxesPerOwner => "max_sandboxes_per_owner",
            Denial::WorkerUnavailable => "worker_unavailable",
            Denial::RemoteWorkerRpcUnavailable => "remote_worker_rpc_unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub denial: Option<Denial>,
    /// Live sandboxes plus reservations, fleet-wide and for this owner.
    pub active_sandboxes: u32,
    pub active_owner_sandboxes: u32,
    pub selected_worker_id: Option<String>,
    /// `local_fallback`, `no_eligible_worker` or `remote_worker_selected`.
    pub worker_reason: &'static str,
    /// Workers that could take it (only counted when `explain` was asked).
    pub eligible_workers: Option<usize>,
    /// reason -> workers filtered for it (only when `explain` was asked, or
    /// when no worker was eligible).
    pub rejections: BTreeMap<&'static str, usize>,
    pub reservation: Option<Reservation>,
}

/// A slot held on a worker for a spawn in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: u64,
    pub worker_id: String,
    pub owner_id: String,
}

/// What the scheduler did with a heartbeat offered as a refresh.
#[derive(Debug, Clone, PartialEq)]
pub enum Refresh {
    /// Taken in memory; its receive time is persisted with the next batch.
    Done(WorkerView),
    /// Not known here: a registration, to be stored durably first.
    Unknown,
    /// It declares a change: to be stored durably first.
    Changed,
}

pub enum SchedulerRequest {
    /// A heartbeat was stored; `received` is when it arrived here.
    Observe {
        worker: Worker,
        received: Instant,
        reply: Sender<WorkerView>,
    },
    /// A heartbeat that may be a plain refresh (see [`Refresh`]).
    Refresh {
        heartbeat: Heartbeat,
        received: Instant,
        now_ms: i64,
        reply: Sender<Refresh>,
    },
    /// Per-worker reasons for `scheduler.explain`.
    ExplainWorkers {
        provider: String,
        reply: Sender<Vec<(String, Option<&'static str>)>>,
    },
    /// An operator changed a worker's status (drain/undrain): keeps its
    /// heartbeat freshness as it is.
    SetStatus {
        id: String,
        status: WorkerStatus,
        reply: Sender<Option<WorkerView>>,
    },
    Forget {
        id: String,
        reply: Sender<bool>,
    },
    Get {
        id: String,
        reply: Sender<Option<WorkerView>>,
    },
    List {
        reply: Sender<Vec<WorkerView>>,
    },
    /// Every worker, ordered by id, for the caller to render.
    Snapshot {
        reply: Sender<WorkersSnapshot>,
    },
    Figures {
        reply: Sender<WorkerFigures>,
    },
    Status {
        reply: Sender<SchedulerStatus>,
    },
    SetWindows {
        windows: Windows,
        reply: Sender<()>,
    },
    Admit {
        query: AdmissionQuery,
        explain: bool,
        reply: Sender<Admission>,
    },
    /// A reservation's spawn ended: `created` turns it into a live sandbox.
    Settle {
        reservation: Reservation,
        created: bool,
        reply: Sender<()>,
    },
    /// A live sandbox ended (destroyed, lost) or was adopted.
    SandboxCount {
        worker_id: String,
        owner_id: String,
        delta: i32,
        reply: Sender<()>,
    },
    SetPolicy {
        policy: PlacementPolicy,
        reply: Sender<()>,
    },
}

#[derive(Clone)]
pub struct SchedulerHandle {
    inbox: Sender<SchedulerRequest>,
    board: Board,
}

impl SchedulerHandle {
    fn call<T>(
        &self,
        make: impl FnOnce(Sender<T>) -> SchedulerRequest,
    ) -> Result<T, SchedulerError> {
        let (reply, answer) = bounded(1);
        match self.inbox.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(SchedulerError::Unavailable("inbox is full".into()));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(SchedulerError::Unavailable("thread stopped".into()));
            }
        }
        answer
            .recv_timeout(REPLY_DEADLINE)
            .map_err(|_| SchedulerError::Unavailable("no reply in time".into()))
    }

    pub fn observe(&self, worker: Worker, received: Instant) -> Result<WorkerView, SchedulerError> {
        self.call(|reply| SchedulerRequest::Observe {
            worker,
            received,
            reply,
        })
    }
    pub fn refresh(
        &self,
        heartbeat: &Heartbeat,
        received: Instant,
        now_ms: i64,
    ) -> Result<Refresh, SchedulerError> {
        let heartbeat = heartbeat.clone();
        self.call(|reply| SchedulerRequest::Refresh {
            heartbeat,
            received,
            now_ms,
            reply,
        })
    }
    /// The local worker and the reservations in flight, read from the
    /// snapshot the scheduler publishes (see [`snapshot`]): no hop to the
    /// scheduler thread, so readers on many threads do not queue behind it.
    pub fn local_status(&self) -> Result<LocalStatus, SchedulerError> {
        self.board.read()
    }
    pub fn explain_workers(
        &self,
        provider: &str,
    ) -> Result<Vec<(String, Option<&'static str>)>, SchedulerError> {
        self.call(|reply| SchedulerRequest::ExplainWorkers {
            provider: provider.to_owned(),
            reply,
        })
    }
    pub fn set_status(
        &self,
        id: &str,
        status: WorkerStatus,
    ) -> Result<Option<WorkerView>, SchedulerError> {
        self.call(|reply| SchedulerRequest::SetStatus {
            id: id.to_owned(),
            status,
            reply,
        })
    }
    pub fn forget(&self, id: &str) -> Result<bool, SchedulerError> {
        self.call(|reply| SchedulerRequest::Forget {
            id: id.to_owned(),
            reply,
        })
    }
    pub fn get(&self, id: &str) -> Result<Option<WorkerView>, SchedulerError> {
        self.call(|reply| SchedulerRequest::Get {
            id: id.to_owned(),
            reply,
        })
    }
    /// Every worker, ordered by id; no worker record is copied.
    pub fn workers_snapshot(&self) -> Result<WorkersSnapshot, SchedulerError> {
        self.call(|reply| SchedulerRequest::Snapshot { reply })
    }
    /// Renders every worker (ordered by id) on the caller's thread, from a
    /// [`SchedulerHandle::workers_snapshot`].
    pub fn render_workers(&self, render: RenderWorkers) -> Result<Vec<u8>, SchedulerError> {
        Ok(render(&self.workers_snapshot()?.views()))
    }
    pub fn list(&self) -> Result<Vec<WorkerView>, SchedulerError> {
        self.call(|reply| SchedulerRequest::List { reply })
    }
    pub fn figures(&self) -> Result<WorkerFigures, SchedulerError> {
        self.call(|reply| SchedulerRequest::Figures { reply })
    }
    pub fn status(&self) -> Result<SchedulerStatus, SchedulerError> {
        self.call(|reply| SchedulerRequest::Status { reply })
    }
    pub fn set_windows(&self, windows: Windows) -> Result<(), SchedulerError> {
        self.call(|reply| SchedulerRequest::SetWindows { windows, reply })
    }
    pub fn admit(&self, query: AdmissionQuery, explain: bool) -> Result<Admission, SchedulerError> {
        self.call(|reply| SchedulerRequest::Admit {
            query,
            explain,
            reply,
        })
    }
    pub fn settle(&self, reservation: Reservation, created: bool) -> Result<(), SchedulerError> {
        self.call(|reply| SchedulerRequest::Settle {
            reservation,
            created,
            reply,
        })
    }
    pub fn sandbox_count(
        &self,
        worker_id: &str,
        owner_id: &str,
        delta: i32,
    ) -> Result<(), SchedulerError> {
        self.call(|reply| SchedulerRequest::SandboxCount {
            worker_id: worker_id.to_owned(),
            owner_id: owner_id.to_owned(),
            delta,
            reply,
        })
    }
    pub fn set_policy(&self, policy: PlacementPolicy) -> Result<(), SchedulerError> {
        self.call(|reply| SchedulerRequest::SetPolicy { policy, reply })
    }
}

struct Entry {
    /// Shared with [`WorkersSnapshot`]s; changed through `Arc::make_mut`.
    worker: Arc<Worker>,
    last_seen: Instant,
    /// Health as of the last evaluation, to log changes once.
    health: Health,
    /// Live sandboxes owned by this worker.
    active: u32,
    /// Spawns in flight placed on this worker.
    reserved: u32,
    /// The load under which it is filed in `eligible`, if it is.
    filed: Option<u32>,
    /// The reason it is counted under in `reasons` (`None` = eligible), as
    /// of its last filing; `None` until it is filed.
    counted: Option<Option<Ineligible>>,
}

impl Entry {
    fn load(&self) -> u32 {
        self.active + self.reserved
    }
}

/// The view itself; pure apart from the `now` passed in.
///
/// Placement cost does not grow with the number of sandboxes (counts, not
/// lists), and only mildly with workers: `eligible` keeps the workers that
/// can take a sandbox ordered by load, so spread and binpack read from one
/// end instead of scanning every worker.
struct ClusterView {
    workers: BTreeMap<String, Entry>,
    /// (load, id) of every worker eligible at its last evaluation.
    eligible: BTreeSet<(u32, String)>,
    /// Every worker counted by the reason it was filed under.
    reasons: ReasonCounts,
    /// (instant its heartbeat goes stale, id) of every worker filed as
    /// online and fresh: the ones whose reason time alone can change
    /// (to `stale`) before they are filed again.
    lapses: BTreeSet<(Instant, String)>,
    windows: Windows,
    local_worker_id: String,
    policy: PlacementPolicy,
    /// owner -> live sandboxes plus reservations.
    owners: HashMap<String, u32>,
    total_live: u32,
    reservations: HashMap<u64, Reservation>,
    next_reservation: u64,
    /// Workers refreshed in memory since the last flush to the store.
    dirty: BTreeSet<String>,
}

impl ClusterView {
    fn new(local_worker_id: String, windows: Windows, policy: PlacementPolicy) -> ClusterView {
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

    fn view(&self, entry: &Entry, now: Instant) -> WorkerView {
        self.view_ref(entry, now).to_owned()
    }

    fn snapshot(&self, now: Instant) -> WorkersSnapshot {
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

    fn view_ref<'e>(&self, entry: &'e Entry, now: Instant) -> WorkerRef<'e> {
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
    fn refile(&mut self, id: &str, now: Instant) {
        self.unfile(id);
        self.file(id, now);
    }

    /// Takes a worker out of the indexes (`eligible`, `reasons`, `lapses`),
    /// by what it was filed under.
    fn unfile(&mut self, id: &str) {
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
    fn file(&mut self, id: &str, now: Instant) {
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

    fn observe(
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

    fn refresh(&mut self, hb: &Heartbeat, received: Instant, now_ms: i64, now: Instant) -> Refresh {
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
    fn take_dirty(&mut self) -> Vec<(String, i64)> {
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

    fn forget(&mut self, id: &str) -> bool {
        self.dirty.remove(id);
        self.unfile(id);
        self.workers.remove(id).is_some()
    }

    /// New health windows: every worker's reason and lapse instant may
    /// move, so every worker is re-filed.
    fn set_windows(&mut self, windows: Windows, now: Instant) {
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
    fn evaluate(&mut self, now: Instant) {
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

    fn figures(&self, now: Instant) -> WorkerFigures {
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

    /// Picks a worker for `provider` by policy from the eligible index; a
    /// candidate whose health lapsed since the last evaluation is skipped.
    fn pick(&self, provider: &str, now: Instant) -> Option<&str> {
        let fits = |(_, id): &&(u32, String)| {
            self.workers.get(id).is_some_and(|e| {
                let health =
                    health::health(now.saturating_duration_since(e.last_seen), self.windows);
                health::supports(&e.worker, provider)
                    && health::ineligibility(&e.worker, health, e.load()).is_none()
            })
        };
        let found = match self.policy {
            PlacementPolicy::Spread => self.eligible.iter().find(fits),
            PlacementPolicy::Binpack => self.eligible.iter().rev().find(fits),
        };
        found.map(|(_, id)| id.as_str())
    }

    /// Each worker with why it cannot take a sandbox for `provider` now.
    fn reasons(&self, provider: &str, now: Instant) -> Vec<(String, Option<&'static str>)> {
        self.workers
            .iter()
            .map(|(id, entry)| {
                let reason = if health::supports(&entry.worker, provider) {
                    self.view_ref(entry, now).ineligible
                } else {
                    Some(health::Ineligible::ProviderUnsupported)
                };
                (id.clone(), reason.map(|r| r.as_str()))
            })
            .collect()
    }

    /// Eligible workers for `provider` at `now`, and the others counted by
    /// reason, for explanations and for "nothing fits" answers. Read from
    /// the counts kept at filing, corrected for the workers that went
    /// stale since they were filed (at most the last health tick's worth):
    /// the same answer as judging every worker at `now`, without visiting
    /// every worker.
    fn explain(&self, provider: &str, now: Instant) -> (usize, BTreeMap<&'static str, usize>) {
        let mut counts = self.reasons.supporting(provider);
        // Lapsed: still filed as fresh, but their age is past `stale_after`.
        for (_, id) in self.lapses.range(..(now, String::new())) {
            let Some(entry) = self.workers.get(id) else {
                continue;
            };
            if let Some(reason) = entry
                .counted
                .filter(|_| health::supports(&entry.worker, provider))
            {
                counts.take(reason);
                counts.put(Some(Ineligible::Stale));
            }
        }
        let mut rejections = BTreeMap::new();
        let unsupported = self.reasons.all.total() - counts.total();
        if unsupported > 0 {
            rejections.insert(Ineligible::ProviderUnsupported.as_str(), unsupported);
        }
        for reason in Ineligible::ALL {
            let n = counts.get(Some(reason));
            if n > 0 {
                rejections.insert(reason.as_str(), n);
            }
        }
        (counts.get(None), rejections)
    }

    fn admit(&mut self, q: &AdmissionQuery, explain: bool, now: Instant) -> Admission {
        let owner_load = if q.owner_id.is_empty() {
            0
        } else {
            self.owners.get(&q.owner_id).copied().unwrap_or(0)
        };
        let mut answer = Admission {
            denial: None,
            active_sandboxes: self.total_live + self.reservations.len() as u32,
            active_owner_sandboxes: owner_load,
            selected_worker_id: None,
            worker_reason: "no_eligible_worker",
            eligible_workers: None,
            rejections: BTreeMap::new(),
            reservation: None,
        };
        if explain {
            let (eligible, rejections) = self.explain(&q.provider, now);
            answer.eligible_workers = Some(eligible);
            answer.rejections = rejections;
        }
        let limit_denial = if q.ttl_ms > q.limits.max_ttl_ms {
            Some(Denial::MaxTtl)
        } else if answer.active_sandboxes >= q.limits.max_sandboxes {
            Some(Denial::MaxSandboxes)
        } else if q.limits.max_per_owner > 0
            && !q.owner_id.is_empty()
            && owner_load >= q.limits.max_per_owner
        {
            Some(Denial::MaxSandboxesPerOwner)
        } else {
            None
        };
        let selected = self.pick(&q.provider, now).map(str::to_owned);
        answer.selected_worker_id = selected.clone();
        answer.worker_reason = match &selected {
            None => "no_eligible_worker",
            Some(id) if *id == self.local_worker_id => "local_fallback",
            Some(_) => "remote_worker_selected",
        };
        answer.denial = limit_denial.or(match &selected {
            None => Some(Denial::WorkerUnavailable),
            Some(id) if *id != self.local_worker_id => Some(Denial::RemoteWorkerRpcUnavailable),
            Some(_) => None,
        });
        if answer.denial == Some(Denial::WorkerUnavailable) && !explain {
            let (eligible, rejections) = self.explain(&q.provider, now);
            answer.eligible_workers = Some(eligible);
            answer.rejections = rejections;
        }
        if answer.denial.is_none() && q.reserve {
            let worker_id = selected.expect("an admitted spawn has a worker");
            let reservation = Reservation {
                id: self.next_reservation,
                worker_id,
                owner_id: q.owner_id.clone(),
            };
            self.next_reservation += 1;
            self.adjust(&reservation.worker_id, &reservation.owner_id, 0, 1, now);
            self.reservations
                .insert(reservation.id, reservation.clone());
            answer.reservation = Some(reservation);
        }
        METRICS.admission.observe(answer.denial.map(|d| d as usize));
        if let Some(denial) = answer.denial.filter(|_| q.reserve) {
            crate::events::publish(|| Event::AdmissionDenied {
                reason: denial.as_str(),
                provider: q.provider.clone(),
                owner_id: q.owner_id.clone(),
                rejections: answer.rejections.clone(),
            });
        }
        answer
    }

    /// Applies changes in live and reserved counts for a worker and owner.
    fn adjust(&mut self, worker_id: &str, owner_id: &str, live: i32, reserved: i32, now: Instant) {
        if let Some(entry) = self.workers.get_mut(worker_id) {
            entry.active = entry.active.saturating_add_signed(live);
            entry.reserved = entry.reserved.saturating_add_signed(reserved);
        }
        self.total_live = self.total_live.saturating_add_signed(live);
        if !owner_id.is_empty() {
            let n = self.owners.entry(owner_id.to_owned()).or_default();
            *n = n.saturating_add_signed(live + reserved);
            if *n == 0 {
                self.owners.remove(owner_id);
            }
        }
        self.refile(worker_id, now);
    }

    fn settle(&mut self, reservation: &Reservation, created: bool, now: Instant) {
        if self.reservations.remove(&reservation.id).is_some() {
            self.adjust(
                &reservation.worker_id,
                &reservation.owner_id,
                i32::from(created),
                -1,
                now,
            );
        }
    }

    fn status(&self, now: Instant) -> SchedulerStatus {
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

/// Workers by reason (`None` = eligible), one slot per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts([usize; 6]);

impl Counts {
    fn slot(reason: Option<Ineligible>) -> usize {
        match reason {
            None => 0,
            Some(Ineligible::NotOnline) => 1,
            Some(Ineligible::Draining) => 2,
            Some(Ineligible::Stale) => 3,
            Some(Ineligible::Full) => 4,
            Some(Ineligible::ProviderUnsupported) => 5,
        }
    }
    fn get(&self, reason: Option<Ineligible>) -> usize {
        self.0[Counts::slot(reason)]
    }
    fn put(&mut self, reason: Option<Ineligible>) {
        self.0[Counts::slot(reason)] += 1;
    }
    fn take(&mut self, reason: Option<Ineligible>) {
        let n = &mut self.0[Counts::slot(reason)];
        *n = n.saturating_sub(1);
    }
    fn total(&self) -> usize {
        self.0.iter().sum()
    }
    fn plus(mut self, other: &Counts) -> Counts {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
        self
    }
}

/// Filed workers counted by reason, split by provider support, so the
/// counts for one provider cost no walk over the workers.
#[derive(Default)]
struct ReasonCounts {
    /// Every filed worker.
    all: Counts,
    /// Workers with no provider list: they run every provider.
    every_provider: Counts,
    /// provider -> workers that list it (once, however often listed).
    listed: HashMap<String, Counts>,
}

impl ReasonCounts {
    /// The providers a worker lists, each once.
    fn listed_by(worker: &Worker) -> impl Iterator<Item = &String> {
        worker
            .providers
            .iter()
            .enumerate()
            .filter(|(i, p)| !worker.providers[..*i].contains(p))
            .map(|(_, p)| p)
    }

    fn add(&mut self, worker: &Worker, reason: Option<Ineligible>) {
        self.all.put(reason);
        if worker.providers.is_empty() {
            self.every_provider.put(reason);
        }
        for p in ReasonCounts::listed_by(worker) {
            self.listed.entry(p.clone()).or_default().put(reason);
        }
    }

    fn remove(&mut self, worker: &Worker, reason: Option<Ineligible>) {
        self.all.take(reason);
        if worker.providers.is_empty() {
            self.every_provider.take(reason);
        }
        for p in ReasonCounts::listed_by(worker) {
            if let Some(counts) = self.listed.get_mut(p) {
                counts.take(reason);
                if counts.total() == 0 {
                    self.listed.remove(p);
                }
            }
        }
    }

    /// The workers that run `provider` (`""`: every worker), by reason.
    fn supporting(&self, provider: &str) -> Counts {
        if provider.is_empty() {
            return self.all;
        }
        match self.listed.get(provider) {
            Some(listed) => self.every_provider.plus(listed),
            None => self.every_provider,
        }
    }
}

/// A worker's derived view at `now`: the one rule for health, staleness and
/// eligibility, used on the scheduler thread and by snapshot readers.
fn derive(
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

/// Starts the scheduler thread with the workers and live sandbox counts
/// loaded from the store.
pub fn start(
    loaded: Vec<Worker>,
    live_counts: Vec<(String, String, u32)>,
    local_worker_id: String,
    windows: Windows,
    policy: PlacementPolicy,
    store: StoreHandle,
    on_exit: crate::daemon::ExitNotifier,
) -> std::io::Result<(SchedulerHandle, JoinHandle<()>)> {
    METRICS.admission.name_reasons(&Denial::LABELS);
    let now = Instant::now();
    let mut view = ClusterView::new(local_worker_id, windows, policy);
    for w in loaded {
        // Every worker known at start gets a fresh grace window.
        view.workers.insert(
            w.id.clone(),
            Entry {
                worker: Arc::new(w),
                last_seen: now,
                health: Health::Ready,
                active: 0,
                reserved: 0,
                filed: None,
                counted: None,
            },
        );
    }
    for (worker_id, owner_id, n) in live_counts {
        view.adjust(&worker_id, &owner_id, n as i32, 0, now);
    }
    let ids: Vec<String> = view.workers.keys().cloned().collect();
    for id in ids {
        view.refile(&id, now);
    }
    let (inbox, requests) = bounded(INBOX_CAPACITY);
    let board = Board::new(&view, now);
    let thread_board = board.clone();
    let thread = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let _exit = on_exit.guard("scheduler");
            let _closed = CloseOnExit(&thread_board);
            run(view, requests, &store, &thread_board);
        })?;
    Ok((SchedulerHandle { inbox, board }, thread))
}

/// Closes the board when the scheduler thread ends, however it ends, so
/// snapshot readers get `Unavailable` as callers of a stopped thread do.
struct CloseOnExit<'a>(&'a Board);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

fn run(
    mut view: ClusterView,
    requests: Receiver<SchedulerRequest>,
    store: &StoreHandle,
    board: &Board,
) {
    let ticks = tick(HEALTH_TICK);
    loop {
        select! {
            recv(requests) -> request => match request {
                Ok(request) => {
                    let now = Instant::now();
                    let reply = handle(&mut view, request, now);
                    // Published before the reply, so the caller (and anyone
                    // it tells) reads its own change from the snapshot.
                    board.publish(&view, now, false);
                    reply();
                }
                Err(_) => break,
            },
            recv(ticks) -> _ => {
                let now = Instant::now();
                view.evaluate(now);
                board.publish(&view, now, true);
                flush(&mut view, store);
            }
        }
    }
    flush(&mut view, store);
    log::debug!("scheduler thread: inbox closed, exiting");
}

/// Persists refreshed receive times in one batch, without waiting: they are
/// soft state, and the scheduler never blocks on the disk.
fn flush(view: &mut ClusterView, store: &StoreHandle) {
    let updates = view.take_dirty();
    if !updates.is_empty() {
        if let Err(e) = store.touch_workers(updates) {
            log::warn!("heartbeat times not persisted this round: {e}");
        }
    }
}

/// A reply held back until the snapshot is published (see `run`).
type Reply = Box<dyn FnOnce()>;

fn send<T: 'static>(reply: Sender<T>, value: T) -> Reply {
    // A caller that timed out dropped its receiver; ignoring the send error
    // is correct.
    Box::new(move || {
        let _ = reply.send(value);
    })
}

/// Applies one request to the view and returns its reply, unsent.
fn handle(view: &mut ClusterView, request: SchedulerRequest, now: Instant) -> Reply {
    match request {
        SchedulerRequest::Observe {
            worker,
            received,
            reply,
        } => send(reply, view.observe(worker, received, now)),
        SchedulerRequest::Refresh {
            heartbeat,
            received,
            now_ms,
            reply,
        } => send(reply, view.refresh(&heartbeat, received, now_ms, now)),
        SchedulerRequest::ExplainWorkers { provider, reply } => {
            send(reply, view.reasons(&provider, now))
        }
        SchedulerRequest::SetStatus { id, status, reply } => {
            let updated = view
                .workers
                .get_mut(&id)
                .map(|e| Arc::make_mut(&mut e.worker).status = status)
                .is_some();
            if updated {
                view.refile(&id, now);
                log::info!("worker {id} status set to {status}");
            }
            send(reply, view.workers.get(&id).map(|e| view.view(e, now)))
        }
        SchedulerRequest::Forget { id, reply } => {
            let removed = view.forget(&id);
            if removed {
                log::info!("worker {id} removed from the cluster view");
            }
            send(reply, removed)
        }
        SchedulerRequest::Get { id, reply } => {
            send(reply, view.workers.get(&id).map(|e| view.view(e, now)))
        }
        SchedulerRequest::List { reply } => send(
            reply,
            view.workers.values().map(|e| view.view(e, now)).collect(),
        ),
        SchedulerRequest::Snapshot { reply } => send(reply, view.snapshot(now)),
        SchedulerRequest::Figures { reply } => send(reply, view.figures(now)),
        SchedulerRequest::Status { reply } => send(reply, view.status(now)),
        SchedulerRequest::SetWindows { windows, reply } => {
            view.set_windows(windows, now);
            send(reply, ())
        }
        SchedulerRequest::Admit {
            query,
            explain,
            reply,
        } => send(reply, view.admit(&query, explain, now)),
        SchedulerRequest::Settle {
            reservation,
            created,
            reply,
        } => {
            view.settle(&reservation, created, now);
            send(reply, ())
        }
        SchedulerRequest::SandboxCount {
            worker_id,
            owner_id,
            delta,
            reply,
        } => {
            view.adjust(&worker_id, &owner_id, delta, 0, now);
            send(reply, ())
        }
        SchedulerRequest::SetPolicy { policy, reply } => {
            view.policy = policy;
            send(reply, ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Capacity;
    use proptest::prelude::*;

    /// What `explain` answered before it kept counts: every worker judged
    /// at `now`. The reference the counts must agree with.
    fn explain_by_walking(
        v: &ClusterView,
        provider: &str,
        now: Instant,
    ) -> (usize, BTreeMap<&'static str, usize>) {
        let mut eligible = 0;
        let mut rejections = BTreeMap::new();
        for entry in v.workers.values() {
            let reason = if health::supports(&entry.worker, provider) {
                v.view_ref(entry, now).ineligible
            } else {
                Some(Ineligible::ProviderUnsupported)
            };
            match reason {
                None => eligible += 1,
                Some(r) => *rejections.entry(r.as_str()).or_default() += 1,
            }
        }
        (eligible, rejections)
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A heartbeat from worker `id`, received `age_s` seconds ago.
        Observe {
            id: u8,
            status: u8,
            providers: Vec<u8>,
            max: Option<u32>,
            age_s: u64,
        },
        Load {
            id: u8,
            live: i32,
            reserved: i32,
        },
        SetStatus {
            id: u8,
            status: u8,
        },
        Forget {
            id: u8,
        },
        Windows {
            stale_s: u64,
        },
        Evaluate,
        Wait {
            s: u64,
        },
    }

    fn status_of(n: u8) -> WorkerStatus {
        [
            WorkerStatus::Online,
            WorkerStatus::Online,
            WorkerStatus::Draining,
            WorkerStatus::Unhealthy,
            WorkerStatus::Offline,
        ][usize::from(n) % 5]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6u8, 0..5u8, proptest::collection::vec(0..3u8, 0..4), proptest::option::of(0..4u32), 0..40u64)
                .prop_map(|(id, status, providers, max, age_s)| Op::Observe { id, status, providers, max, age_s }),
            2 => (0..6u8, -1..3i32, -1..2i32).prop_map(|(id, live, reserved)| Op::Load { id, live, reserved }),
            1 => (0..6u8, 0..5u8).prop_map(|(id, status)| Op::SetStatus { id, status }),
            1 => (0..6u8).prop_map(|id| Op::Forget { id }),
            1 => (5..30u64).prop_map(|stale_s| Op::Windows { stale_s }),
            1 => Just(Op::Evaluate),
            2 => (0..20u64).prop_map(|s| Op::Wait { s }),
        ]
    }

    #[test]
    fn an_absurd_stale_window_neither_panics_nor_miscounts() {
        let now = Instant::now();
        let huge = Windows {
            stale_after: Duration::MAX,
            down_after: Duration::MAX,
        };
        let mut v = ClusterView::new("local".into(), huge, PlacementPolicy::Spread);
        v.observe(with_capacity("local", 4, &[]), now, now);
        v.adjust("local", "", 1, 0, now);
        v.set_windows(W, now);
        v.set_windows(huge, now);
        v.forget("local");
        v.observe(with_capacity("local", 4, &[]), now, now);
        let later = now + Duration::from_secs(3600);
        assert_eq!(v.explain("", later), explain_by_walking(&v, "", later));
        assert_eq!(v.explain("", later).0, 1);
    }

    proptest! {
        /// The kept counts answer exactly as walking every worker does, for
        /// every provider, after any sequence of changes and waits.
        #[test]
        fn explain_counts_match_walking_every_worker(ops in proptest::collection::vec(op(), 1..60)) {
            let names = ["mock", "process", "vm"];
            let start = Instant::now();
            let mut now = start + Duration::from_secs(100);
            let mut v = ClusterView::new("w0".into(), W, PlacementPolicy::Spread);
            for op in ops {
                match op {
                    Op::Observe { id, status, providers, max, age_s } => {
                        let mut w = worker(&format!("w{id}"), status_of(status));
                        w.providers = providers.iter().map(|p| names[usize::from(*p)].to_owned()).collect();
                        w.capacity.max_sandboxes = max;
                        v.observe(w, now - Duration::from_secs(age_s), now);
                    }
                    Op::Load { id, live, reserved } => v.adjust(&format!("w{id}"), "", live, reserved, now),
                    Op::SetStatus { id, status } => {
                        let id = format!("w{id}");
                        if let Some(e) = v.workers.get_mut(&id) {
                            Arc::make_mut(&mut e.worker).status = status_of(status);
                            v.refile(&id, now);
                        }
                    }
                    Op::Forget { id } => {
                        v.forget(&format!("w{id}"));
                    }
                    Op::Windows { stale_s } => v.set_windows(
                        Windows { stale_after: Duration::from_secs(stale_s), down_after: Duration::from_secs(stale_s * 4) },
                        now,
                    ),
                    Op::Evaluate => v.evaluate(now),
                    Op::Wait { s } => now += Duration::from_secs(s),
                }
                for provider in ["", "mock", "process", "vm", "none"] {
                    prop_assert_eq!(v.explain(provider, now), explain_by_walking(&v, provider, now), "provider {:?}", provider);
                }
            }
        }
    }

    const W: Windows = Windows {
        stale_after: Duration::from_secs(15),
        down_after: Duration::from_secs(60),
    };

    fn worker(id: &str, status: WorkerStatus) -> Worker {
        Worker {
            id: id.into(),
            hostname: "h".into(),
            status,
            providers: vec![],
            capabilities: vec![],
            capacity: Capacity::default(),
            last_heartbeat_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn view_with(workers: &[(&str, WorkerStatus, u64)], now: Instant) -> ClusterView {
        let mut v = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        for (id, status, age_s) in workers {
            v.observe(worker(id, *status), now - Duration::from_secs(*age_s), now);
        }
        v
    }

    #[test]
    fn freshness_uses_receive_time_not_worker_clock() {
        let now = Instant::now() + Duration::from_secs(120);
        let mut w = worker("a", WorkerStatus::Online);
        w.last_heartbeat_ms = 0; // a worker clock in 1970 does not make it stale
        let mut v = view_with(&[], now);
        let seen = v.observe(w, now, now);
        assert_eq!(seen.health, Health::Ready);
        assert!(!seen.stale);
    }

    #[test]
    fn a_workers_snapshot_shares_records_and_keeps_what_it_saw() {
        let now = Instant::now() + Duration::from_secs(120);
        let mut v = view_with(
            &[
                ("b", WorkerStatus::Online, 0),
                ("a", WorkerStatus::Online, 0),
            ],
            now,
        );
        let snap = v.snapshot(now);
        let ids: Vec<&str> = snap.views().iter().map(|w| w.worker.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(Arc::ptr_eq(&snap.workers[0].worker, &v.workers["a"].worker));
        // A change after the snapshot copies the record; the snapshot keeps the old one.
        Arc::make_mut(&mut v.workers.get_mut("a").unwrap().worker).status = WorkerStatus::Draining;
        v.refile("a", now);
        assert_eq!(snap.views()[0].worker.status, WorkerStatus::Online);
        assert_eq!(
            v.snapshot(now).views()[0].worker.status,
            WorkerStatus::Draining
        );
        let listed: Vec<WorkerView> = v
            .snapshot(now)
            .views()
            .into_iter()
            .map(WorkerRef::to_owned)
            .collect();
        let viewed: Vec<WorkerView> = v.workers.values().map(|e| v.view(e, now)).collect();
        assert_eq!(listed, viewed);
    }

    #[test]
    fn figures_count_by_status_and_staleness() {
        let now = Instant::now() + Duration::from_secs(120);
        let v = view_with(
            &[
                ("a", WorkerStatus::Online, 0),
                ("b", WorkerStatus::Online, 20),
                ("c", WorkerStatus::Unhealthy, 0),
                ("d", WorkerStatus::Online, 100),
            ],
            now,
        );
        let f = v.figures(now);
        assert_eq!(
            (f.total, f.online, f.stale, f.unhealthy, f.eligible),
            (4, 3, 2, 2, 1)
        );
        assert_eq!(v.status(now).selected_worker_id.as_deref(), Some("a"));
    }

    #[test]
    fn evaluate_tracks_health_changes() {
        let start = Instant::now();
        let mut v = view_with(&[("a", WorkerStatus::Online, 0)], start);
        v.evaluate(start + Duration::from_secs(16));
        assert_eq!(v.workers["a"].health, Health::Suspect);
        v.evaluate(start + Duration::from_secs(61));
        assert_eq!(v.workers["a"].health, Health::Down);
        let back = v.observe(
            worker("a", WorkerStatus::Online),
            start + Duration::from_secs(62),
            start + Duration::from_secs(62),
        );
        assert_eq!(back.health, Health::Ready);
    }

    fn with_capacity(id: &str, max: u32, providers: &[&str]) -> Worker {
        let mut w = worker(id, WorkerStatus::Online);
        w.capacity.max_sandboxes = Some(max);
        w.providers = providers.iter().map(|p| (*p).to_owned()).collect();
        w
    }

    fn query(owner: &str, reserve: bool) -> AdmissionQuery {
        AdmissionQuery {
            provider: "mock".into(),
            owner_id: owner.into(),
            ttl_ms: 60_000,
            limits: Limits {
                max_ttl_ms: 3_600_000,
                max_sandboxes: 1000,
                max_per_owner: 0,
            },
            reserve,
        }
    }

    #[test]
    fn reservations_never_overshoot_capacity() {
        let now = Instant::now();
        let mut v = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        v.observe(with_capacity("local", 3, &["mock"]), now, now);
        let held: Vec<Reservation> = (0..3)
            .map(|_| v.admit(&query("", true), false, now).reservation.unwrap())
            .collect();
        let full = v.admit(&query("", true), false, now);
        assert_eq!(full.denial, Some(Denial::WorkerUnavailable));
        assert_eq!(full.rejections.get("full"), Some(&1));
        // A failed spawn frees its slot; a created one keeps it as live.
        v.settle(&held[0], false, now);
        v.settle(&held[1], true, now);
        let again = v.admit(&query("", true), false, now);
        assert!(again.denial.is_none());
        assert_eq!(v.workers["local"].active, 1);
        assert_eq!(v.workers["local"].reserved, 2);
    }

    #[test]
    fn spread_binpack_and_remote_workers() {
        let now = Instant::now();
        let mut v = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        v.observe(with_capacity("local", 10, &[]), now, now);
        v.observe(with_capacity("remote", 10, &["mock"]), now, now);
        v.adjust("local", "", 2, 0, now);
        // Spread picks the emptier remote worker, and says it cannot reach it.
        let a = v.admit(&query("", true), false, now);
        assert_eq!(a.selected_worker_id.as_deref(), Some("remote"));
        assert_eq!(a.denial, Some(Denial::RemoteWorkerRpcUnavailable));
        assert_eq!(a.worker_reason, "remote_worker_selected");
        assert!(a.reservation.is_none());
        v.policy = PlacementPolicy::Binpack;
        let b = v.admit(&query("", true), false, now);
        assert_eq!(b.selected_worker_id.as_deref(), Some("local"));
        assert_eq!(b.worker_reason, "local_fallback");
        assert!(b.denial.is_none());
    }

    #[test]
    fn limits_and_reasons() {
        let now = Instant::now();
        let mut v = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        v.observe(with_capacity("local", 10, &["process"]), now, now);
        v.observe(
            worker("stale", WorkerStatus::Online),
            now - Duration::from_secs(30),
            now,
        );
        v.observe(worker("drain", WorkerStatus::Draining), now, now);
        let a = v.admit(&query("", false), true, now);
        assert_eq!(a.denial, Some(Denial::WorkerUnavailable));
        assert_eq!(a.eligible_workers, Some(0));
        let reasons: Vec<(&str, usize)> = a.rejections.iter().map(|(r, n)| (*r, *n)).collect();
        assert_eq!(
            reasons,
            vec![("draining", 1), ("provider_unsupported", 1), ("stale", 1)]
        );
        let mut q = query("bob", false);
        q.ttl_ms = 4_000_000;
        assert_eq!(v.admit(&q, false, now).denial, Some(Denial::MaxTtl));
        let mut v = ClusterView::new("local".into(), W, PlacementPolicy::Spread);
        v.observe(with_capacity("local", 10, &[]), now, now);
        let mut q = query("bob", true);
        q.limits.max_per_owner = 1;
        assert!(v.admit(&q, false, now).denial.is_none());
        assert_eq!(
            v.admit(&q, false, now).denial,
            Some(Denial::MaxSandboxesPerOwner)
        );
        q.owner_id = "carol".into();
        q.limits.max_sandboxes = 1;
        assert_eq!(v.admit(&q, false, now).denial, Some(Denial::MaxSandboxes));
    }
}
