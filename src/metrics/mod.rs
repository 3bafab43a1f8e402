//! Process-wide metrics: lock-free atomics written on the hot paths and read
//! by the metrics endpoints. Nothing here touches SQLite: a scrape renders
//! these counters plus the scheduler's in-memory worker view.
//!
//! Written by every thread; read by the HTTP handler threads. Relaxed
//! ordering is enough: each figure is independent and only needs to be
//! eventually exact.

//!
//! A leaf: it knows nothing of the modules that count. Routes arrive as a
//! [`RouteLabel`] (a slot and two label values), admission denials as a
//! slot whose reason names the scheduler gives once
//! ([`AdmissionMetrics::name_reasons`]), and the store's tallies through
//! the [`FleetTallies`] trait. [`prometheus`] renders the text format,
//! [`process`] reads /proc/self.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

pub mod process;
pub mod prometheus;

pub use process::ProcessFigures;
pub use prometheus::{FleetTallies, ProviderFigures, render_prometheus, render_providers};

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// A fixed-bucket histogram over integer observations (microseconds, or
/// plain counts); `scale` converts to the exported unit.
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum: AtomicU64,
    scale: f64,
}

const LATENCY_BOUNDS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];
const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

impl Histogram {
    fn new(bounds: &'static [u64], scale: f64) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    fn latency() -> Histogram {
        Histogram::new(LATENCY_BOUNDS_US, 1e-6)
    }

    pub fn observe(&self, value: u64) {
        // Buckets are stored non-cumulatively; rendering accumulates.
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn mean(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum.load(Relaxed) as f64 * self.scale / n as f64
        }
    }
}

/// Status codes the daemon answers with; anything else counts as "other".
pub const STATUS_CODES: [u16; 15] = [
    200, 201, 204, 400, 401, 403, 404, 405, 408, 409, 413, 429, 500, 503, 0,
];

fn status_index(code: u16) -> usize {
    STATUS_CODES
        .iter()
        .position(|c| *c == code)
        .unwrap_or(STATUS_CODES.len() - 1)
}

/// Routes the HTTP figures have room for; [`RouteLabel::slot`] is below it.
pub const ROUTE_SLOTS: usize = 64;

/// A route as the metrics see it: a stable slot (its order in the
/// Prometheus text) and its `route` and `method` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLabel {
    pub slot: usize,
    pub path: &'static str,
    pub method: &'static str,
}

pub struct HttpMetrics {
    requests: Vec<[Counter; STATUS_CODES.len()]>,
    durations: Vec<Histogram>,
    /// (route, method) per slot, set by the first request counted there.
    labels: Vec<OnceLock<(&'static str, &'static str)>>,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    pub connections_rejected: Counter,
    pub connections_timed_out: Counter,
    pub auth_failures: Counter,
}

impl HttpMetrics {
    pub fn observe(&self, route: impl Into<RouteLabel>, code: u16, elapsed: Duration) {
        let route = route.into();
        let Some(labels) = self.labels.get(route.slot) else {
            return;
        };
        labels.get_or_init(|| (route.path, route.method));
        self.requests[route.slot][status_index(code)].inc();
        self.durations[route.slot].observe_duration(elapsed);
    }

    pub fn total_requests(&self) -> u64 {
        self.requests
            .iter()
            .flat_map(|r| r.iter())
            .map(Counter::get)
            .sum()
    }
}

pub struct StoreMetrics {
    pub batch_size: Histogram,
    pub commit_seconds: Histogram,
    pub commit_failures: Counter,
    pub checkpoints: Counter,
    pub checkpoint_finishes: Counter,
    /// Times the store found the disk full (a commit failed for lack of space).
    pub disk_full_events: Counter,
    /// Rows removed by the retention purge.
    pub purged_rows: Counter,
}

impl StoreMetrics {
    pub fn observe_commit(&self, batch: usize, elapsed: Duration) {
        self.batch_size.observe(batch as u64);
        self.commit_seconds.observe_duration(elapsed);
    }
}

pub struct WorkerMetrics {
    pub heartbeats: Counter,
    pub health_changes: Counter,
}

/// Denial reasons the admission figures have room for.
pub const DENIAL_SLOTS: usize = 16;

/// Admission outcomes: allowed, or denied per reason.
pub struct AdmissionMetrics {
    allowed: Counter,
    denied: [Counter; DENIAL_SLOTS],
    /// The reason of each denial slot, in order; named by the scheduler.
    reasons: OnceLock<&'static [&'static str]>,
}

impl AdmissionMetrics {
    /// Names the denial slots: slot `i` is `reasons[i]`. The first call wins;
    /// slots past [`DENIAL_SLOTS`] are not counted.
    pub fn name_reasons(&self, reasons: &'static [&'static str]) {
        self.reasons.get_or_init(|| reasons);
    }

    /// `None` when allowed, else the denial's slot.
    pub fn observe(&self, denied: Option<usize>) {
        match denied {
            None => self.allowed.inc(),
            Some(slot) => {
                if let Some(c) = self.denied.get(slot) {
                    c.inc();
                }
            }
        }
    }

    /// ("allowed" or a denial reason, count)
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        let reasons = self.reasons.get().copied().unwrap_or_default();
        let mut out = vec![("allowed", self.allowed.get())];
        out.extend(
            reasons
                .iter()
                .zip(&self.denied)
                .map(|(reason, c)| (*reason, c.get())),
        );
        out
    }
}

pub struct Metrics {
    /// Admin-socket events dropped because subscribers fell behind.
    pub events_dropped: Counter,
    pub sandbox_io: SandboxIoMetrics,
    pub http: HttpMetrics,
    pub admission: AdmissionMetrics,
    pub store: StoreMetrics,
    pub workers: WorkerMetrics,
    pub started: Instant,
    pub started_unix_ms: i64,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            http: HttpMetrics {
                requests: (0..ROUTE_SLOTS).map(|_| Default::default()).collect(),
                durations: (0..ROUTE_SLOTS).map(|_| Histogram::latency()).collect(),
                labels: (0..ROUTE_SLOTS).map(|_| OnceLock::new()).collect(),
                connections_open: Gauge::default(),
                connections_accepted: Counter::default(),
                connections_rejected: Counter::default(),
                connections_timed_out: Counter::default(),
                auth_failures: Counter::default(),
            },
            events_dropped: Counter::default(),
            sandbox_io: SandboxIoMetrics::default(),
            admission: AdmissionMetrics {
                allowed: Counter::default(),
                denied: Default::default(),
                reasons: OnceLock::new(),
            },
            store: StoreMetrics {
                batch_size: Histogram::new(BATCH_BOUNDS, 1.0),
                commit_seconds: Histogram::latency(),
                commit_failures: Counter::default(),
                checkpoints: Counter::default(),
                checkpoint_finishes: Counter::default(),
                disk_full_events: Counter::default(),
                purged_rows: Counter::default(),
            },
            workers: WorkerMetrics {
                heartbeats: Counter::default(),
                health_changes: Counter::default(),
            },
            started: Instant::now(),
            started_unix_ms: crate::time::now_ms(),
        }
    }
}

/// The worker figures a scrape needs, taken from the scheduler's view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerFigures {
    pub total: usize,
    pub online: usize,
    pub stale: usize,
    pub unhealthy: usize,
    pub eligible: usize,
    /// (worker id, seconds since the last heartbeat was received)
    pub heartbeat_ages: Vec<(String, f64)>,
    /// (worker id, live sandboxes it owns)
    pub sandboxes_by_worker: Vec<(String, u32)>,
    /// Spawns in flight holding a slot.
    pub reservations: usize,
}

/// Exec and file operations in sandboxes.
#[derive(Default)]
pub struct SandboxIoMetrics {
    /// Execs whose command ran to its end (any exit code).
    pub execs_completed: Counter,
    pub execs_timed_out: Counter,
    /// Streamed execs whose client went away (the command was killed).
    pub execs_abandoned: Counter,
    /// Execs refused or failed before or while starting.
    pub execs_failed: Counter,
    pub file_ops: Counter,
    pub file_op_errors: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_labelled_by_its_first_request_and_out_of_range_slots_are_ignored() {
        let m = Metrics::new();
        let route = RouteLabel {
            slot: 3,
            path: "/x",
            method: "GET",
        };
        assert!(m.http.labels[3].get().is_none());
        m.http.observe(route, 200, Duration::from_millis(1));
        m.http.observe(route, 999, Duration::from_millis(1));
        m.http.observe(
            RouteLabel {
                slot: ROUTE_SLOTS,
                ..route
            },
            200,
            Duration::ZERO,
        );
        assert_eq!(m.http.labels[3].get(), Some(&("/x", "GET")));
        assert_eq!(m.http.total_requests(), 2);
        assert_eq!(m.http.requests[3][STATUS_CODES.len() - 1].get(), 1);
    }

    #[test]
    fn admission_outcomes_follow_the_named_reasons() {
        let m = Metrics::new();
        m.admission.observe(None);
        m.admission.observe(Some(1));
        assert_eq!(m.admission.outcomes(), vec![("allowed", 1)]);
        m.admission.name_reasons(&["a", "b"]);
        m.admission.name_reasons(&["ignored"]);
        m.admission.observe(Some(DENIAL_SLOTS));
        assert_eq!(
            m.admission.outcomes(),
            vec![("allowed", 1), ("a", 0), ("b", 1)]
        );
    }
}
