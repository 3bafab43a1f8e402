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

mod admission;
pub mod health;
mod reasons;
mod snapshot;
mod view;

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
pub use admission::{Admission, AdmissionQuery, Denial, Limits, Reservation};
use health::{Health, Ineligible, Windows};
use reasons::ReasonCounts;
use snapshot::Board;
pub use snapshot::LocalStatus;
use view::{ClusterView, Entry, derive};

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

/// Starts the scheduler thread with the workers and live sandbox counts
/// loaded from the store.
pub fn start(
    loaded: Vec<Worker>,
    live_counts: Vec<(String, String, u32)>,
    local_worker_id: String,
    windows: Windows,
    policy: PlacementPolicy,
    store: StoreHandle,
    on_exit: crate::supervise::ExitNotifier,
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
