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

use std::collections::BTreeMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select, tick};

use crate::metrics::{METRICS, WorkerFigures};
use crate::workers::{Worker, WorkerStatus};
use health::{Health, Ineligible, Windows};

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

pub enum SchedulerRequest {
    /// A heartbeat was stored; `received` is when it arrived here.
    Observe {
        worker: Worker,
        received: Instant,
        reply: Sender<WorkerView>,
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
}

#[derive(Clone)]
pub struct SchedulerHandle {
    inbox: Sender<SchedulerRequest>,
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
}

struct Entry {
    worker: Worker,
    last_seen: Instant,
    /// Health as of the last evaluation, to log changes once.
    health: Health,
}

/// The view itself; pure apart from the `now` passed in.
struct ClusterView {
    workers: BTreeMap<String, Entry>,
    windows: Windows,
    local_worker_id: String,
}

impl ClusterView {
    fn view(&self, entry: &Entry, now: Instant) -> WorkerView {
        let last_seen = now.saturating_duration_since(entry.last_seen);
        let health = health::health(last_seen, self.windows);
        // Sandboxes arrive with the placement milestone; until then no worker
        // owns any.
        let active_sandboxes = 0;
        WorkerView {
            worker: entry.worker.clone(),
            health,
            stale: last_seen > self.windows.stale_after,
            ineligible: health::ineligibility(&entry.worker, health, active_sandboxes),
            active_sandboxes,
            last_seen,
        }
    }

    fn observe(&mut self, worker: Worker, received: Instant, now: Instant) -> WorkerView {
        let id = worker.id.clone();
        let previous = self.workers.get(&id).map(|e| e.health);
        let entry = Entry {
            worker,
            last_seen: received,
            health: Health::Ready,
        };
        let view = self.view(&entry, now);
        match previous {
            None => log::info!("worker {id} registered (status {})", entry.worker.status),
            Some(old) if old != view.health => {
                METRICS.workers.health_changes.inc();
                log::info!(
                    "worker {id} health {} -> {} (heartbeat received)",
                    old.as_str(),
                    view.health.as_str()
                );
            }
            Some(_) => {}
        }
        self.workers.insert(
            id,
            Entry {
                health: view.health,
                ..entry
            },
        );
        view
    }

    /// Re-derives health for every worker and logs each change once.
    fn evaluate(&mut self, now: Instant) {
        let windows = self.windows;
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
                entry.health = current;
            }
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
        }
        f
    }

    fn status(&self, now: Instant) -> SchedulerStatus {
        // Spread: among eligible workers the one with the fewest active
        // sandboxes, ties broken by id (the map's order).
        let mut eligible = 0;
        let mut selected: Option<(u32, &str)> = None;
        for (id, entry) in &self.workers {
            let v = self.view(entry, now);
            if v.ineligible.is_none() {
                eligible += 1;
                if selected.is_none_or(|(active, _)| v.active_sandboxes < active) {
                    selected = Some((v.active_sandboxes, id));
                }
            }
        }
        SchedulerStatus {
            policy: "spread",
            local_worker_id: self.local_worker_id.clone(),
            selected_worker_id: selected.map(|(_, id)| id.to_owned()),
            eligible_workers: eligible,
            reservations: 0,
            windows: self.windows,
        }
    }
}

/// Starts the scheduler thread with the workers loaded from the store.
pub fn start(
    loaded: Vec<Worker>,
    local_worker_id: String,
    windows: Windows,
    on_exit: crate::daemon::ExitNotifier,
) -> std::io::Result<(SchedulerHandle, JoinHandle<()>)> {
    let now = Instant::now();
    let workers = loaded
        .into_iter()
        .map(|w| {
            (
                w.id.clone(),
                Entry {
                    worker: w,
                    last_seen: now,
                    health: Health::Ready,
                },
            )
        })
        .collect();
    let view = ClusterView {
        workers,
        windows,
        local_worker_id,
    };
    let (inbox, requests) = bounded(INBOX_CAPACITY);
    let thread = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let _exit = on_exit.guard("scheduler");
            run(view, requests);
        })?;
    Ok((SchedulerHandle { inbox }, thread))
}

fn run(mut view: ClusterView, requests: Receiver<SchedulerRequest>) {
    let ticks = tick(HEALTH_TICK);
    loop {
        select! {
            recv(requests) -> request => match request {
                Ok(request) => handle(&mut view, request),
                Err(_) => break,
            },
            recv(ticks) -> _ => view.evaluate(Instant::now()),
        }
    }
    log::debug!("scheduler thread: inbox closed, exiting");
}

fn handle(view: &mut ClusterView, request: SchedulerRequest) {
    let now = Instant::now();
    // A caller that timed out dropped its receiver; ignoring the send error
    // is correct.
    match request {
        SchedulerRequest::Observe {
            worker,
            received,
            reply,
        } => {
            let _ = reply.send(view.observe(worker, received, now));
        }
        SchedulerRequest::Forget { id, reply } => {
            let removed = view.workers.remove(&id).is_some();
            if removed {
                log::info!("worker {id} removed from the cluster view");
            }
            let _ = reply.send(removed);
        }
        SchedulerRequest::Get { id, reply } => {
            let _ = reply.send(view.workers.get(&id).map(|e| view.view(e, now)));
        }
        SchedulerRequest::List { reply } => {
            let _ = reply.send(view.workers.values().map(|e| view.view(e, now)).collect());
        }
        SchedulerRequest::Figures { reply } => {
            let _ = reply.send(view.figures(now));
        }
        SchedulerRequest::Status { reply } => {
            let _ = reply.send(view.status(now));
        }
        SchedulerRequest::SetWindows { windows, reply } => {
            view.windows = windows;
            view.evaluate(now);
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Capacity;

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
        let mut v = ClusterView {
            workers: BTreeMap::new(),
            windows: W,
            local_worker_id: "local".into(),
        };
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
}
