//! Process-wide metrics: lock-free atomics written on the hot paths and read
//! by the metrics endpoints. Nothing here touches SQLite: a scrape renders
//! these counters plus the scheduler's in-memory worker view.
//!
//! Written by every thread; read by the HTTP handler threads. Relaxed
//! ordering is enough: each figure is independent and only needs to be
//! eventually exact.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::http::router::RouteId;
use crate::scheduler::Denial;
use crate::store::TallyFigures;

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

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                *bound as f64 * self.scale
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum.load(Relaxed) as f64 * self.scale
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
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

pub struct HttpMetrics {
    requests: Vec<[Counter; STATUS_CODES.len()]>,
    durations: Vec<Histogram>,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    pub connections_rejected: Counter,
    pub connections_timed_out: Counter,
    pub auth_failures: Counter,
}

impl HttpMetrics {
    pub fn observe(&self, route: RouteId, code: u16, elapsed: Duration) {
        self.requests[route as usize][status_index(code)].inc();
        self.durations[route as usize].observe_duration(elapsed);
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

/// Admission outcomes: allowed, or denied per reason.
pub struct AdmissionMetrics {
    allowed: Counter,
    denied: [Counter; Denial::ALL.len()],
}

impl AdmissionMetrics {
    pub fn observe(&self, denial: Option<Denial>) {
        match denial {
            None => self.allowed.inc(),
            Some(d) => self.denied[d as usize].inc(),
        }
    }

    /// ("allowed" or a denial reason, count)
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        let mut out = vec![("allowed", self.allowed.get())];
        out.extend(
            Denial::ALL
                .iter()
                .map(|d| (d.as_str(), self.denied[*d as usize].get())),
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
                requests: RouteId::ALL.iter().map(|_| Default::default()).collect(),
                durations: RouteId::ALL.iter().map(|_| Histogram::latency()).collect(),
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

/// Process figures read from /proc/self (Linux).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl ProcessFigures {
    pub fn read() -> ProcessFigures {
        let mut p = ProcessFigures::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name, which may hold spaces.
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // utime + stime in clock ticks; USER_HZ is 100 on Linux.
                p.cpu_seconds = (num(11) + num(12)) as f64 / 100.0;
                p.threads = num(17);
                p.virtual_bytes = num(20);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            p.resident_bytes = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024);
        }
        p.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            p.max_fds = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        p
    }
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

/// One provider's figures for the Prometheus text.
pub struct ProviderFigures {
    pub name: String,
    pub healthy: bool,
    pub runtimes: usize,
}

/// Provider health and runtime counts.
pub fn render_providers(out: &mut String, providers: &[ProviderFigures]) {
    type Value = fn(&ProviderFigures) -> usize;
    let gauges: [(&str, &str, Value); 2] = [
        (
            "stacyvmd_provider_healthy",
            "1 when the provider can start sandboxes, else 0.",
            |p| usize::from(p.healthy),
        ),
        (
            "stacyvmd_provider_runtimes",
            "Sandbox runtimes the provider has on this worker.",
            |p| p.runtimes,
        ),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        for p in providers {
            let _ = writeln!(
                out,
                "{name}{{provider=\"{}\"}} {}",
                label(&p.name),
                value(p)
            );
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Leases, sandboxes, admissions and reservations.
fn render_fleet(out: &mut String, workers: &WorkerFigures, t: &TallyFigures) {
    family(
        out,
        "stacyvmd_leases",
        "gauge",
        "Leases by status: total, active (held, unexpired), expired (lapsed or released).",
    );
    for (status, n) in [
        ("total", t.leases_total),
        ("active", t.leases_active),
        ("expired", t.leases_expired),
    ] {
        let _ = writeln!(out, "stacyvmd_leases{{status=\"{status}\"}} {n}");
    }
    family(
        out,
        "stacyvmd_leases_by_holder",
        "gauge",
        "Active leases by holder.",
    );
    for (holder, n) in &t.leases_by_holder {
        let _ = writeln!(
            out,
            "stacyvmd_leases_by_holder{{holder=\"{}\"}} {n}",
            label(holder)
        );
    }
    family(
        out,
        "stacyvmd_sandboxes",
        "gauge",
        "Sandbox records by state, provider and owner worker.",
    );
    for (state, provider, worker, n) in &t.sandboxes {
        let _ = writeln!(
            out,
            "stacyvmd_sandboxes{{state=\"{}\",provider=\"{}\",worker=\"{}\"}} {n}",
            state.as_str(),
            label(provider),
            label(worker)
        );
    }
    family(
        out,
        "stacyvmd_sandboxes_by_worker",
        "gauge",
        "Live sandboxes (creating or running) owned by each worker.",
    );
    for (worker, n) in &workers.sandboxes_by_worker {
        let _ = writeln!(
            out,
            "stacyvmd_sandboxes_by_worker{{worker=\"{}\"}} {n}",
            label(worker)
        );
    }
    family(
        out,
        "stacyvmd_scheduler_reservations",
        "gauge",
        "Spawns in flight holding a slot on a worker.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_scheduler_reservations {}",
        workers.reservations
    );
    family(
        out,
        "stacyvmd_admissions_total",
        "counter",
        "Admission decisions, by outcome: allowed or the denial reason.",
    );
    for (outcome, n) in METRICS.admission.outcomes() {
        let _ = writeln!(
            out,
            "stacyvmd_admissions_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
}

/// Renders the text exposition format 0.0.4.
pub fn render_prometheus(
    workers: &WorkerFigures,
    tallies: &TallyFigures,
    process: &ProcessFigures,
    store_wal_bytes: u64,
) -> String {
    let m = &*METRICS;
    let mut out = String::with_capacity(
        8192 + workers.heartbeat_ages.len() * 160 + tallies.sandboxes.len() * 120,
    );
    render_fleet(&mut out, workers, tallies);

    family(
        &mut out,
        "stacyvmd_build_info",
        "gauge",
        "Build information; always 1.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_build_info{{version=\"{}\",target=\"{}-{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    );

    family(
        &mut out,
        "stacyvmd_workers",
        "gauge",
        "Known workers by status: total, online, stale, unhealthy, eligible.",
    );
    for (status, n) in [
        ("total", workers.total),
        ("online", workers.online),
        ("stale", workers.stale),
        ("unhealthy", workers.unhealthy),
        ("eligible", workers.eligible),
    ] {
        let _ = writeln!(out, "stacyvmd_workers{{status=\"{status}\"}} {n}");
    }
    family(
        &mut out,
        "stacyvmd_worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since this daemon last received a heartbeat from the worker (monotonic clock).",
    );
    for (id, age) in &workers.heartbeat_ages {
        let _ = writeln!(
            out,
            "stacyvmd_worker_heartbeat_age_seconds{{worker=\"{}\"}} {age:.3}",
            label(id)
        );
    }
    family(
        &mut out,
        "stacyvmd_heartbeats_total",
        "counter",
        "Heartbeats received and stored.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_heartbeats_total {}",
        m.workers.heartbeats.get()
    );
    family(
        &mut out,
        "stacyvmd_worker_health_changes_total",
        "counter",
        "Derived worker health transitions.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_worker_health_changes_total {}",
        m.workers.health_changes.get()
    );

    family(
        &mut out,
        "stacyvmd_http_requests_total",
        "counter",
        "HTTP requests answered, by route, method and status code.",
    );
    for route in RouteId::ALL {
        for (i, code) in STATUS_CODES.iter().enumerate() {
            let n = m.http.requests[route as usize][i].get();
            if n > 0 {
                let code = if *code == 0 {
                    "other".to_owned()
                } else {
                    code.to_string()
                };
                let _ = writeln!(
                    out,
                    "stacyvmd_http_requests_total{{route=\"{}\",method=\"{}\",code=\"{code}\"}} {n}",
                    route.path_label(),
                    route.method_label()
                );
            }
        }
    }
    family(
        &mut out,
        "stacyvmd_http_request_duration_seconds",
        "histogram",
        "Time from request received to response written, by route.",
    );
    for route in RouteId::ALL {
        let h = &m.http.durations[route as usize];
        if h.count() > 0 {
            let labels = format!(
                "route=\"{}\",method=\"{}\"",
                route.path_label(),
                route.method_label()
            );
            h.render(&mut out, "stacyvmd_http_request_duration_seconds", &labels);
        }
    }
    family(
        &mut out,
        "stacyvmd_http_connections_open",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_http_connections_open {}",
        m.http.connections_open.get()
    );
    for (name, help, counter) in [
        (
            "stacyvmd_http_connections_accepted_total",
            "Client connections accepted.",
            &m.http.connections_accepted,
        ),
        (
            "stacyvmd_http_connections_rejected_total",
            "Client connections refused because server.max_connections was reached.",
            &m.http.connections_rejected,
        ),
        (
            "stacyvmd_http_connections_timed_out_total",
            "Client connections closed after server.idle_timeout without traffic.",
            &m.http.connections_timed_out,
        ),
        (
            "stacyvmd_http_auth_failures_total",
            "Requests refused with 401 or 403.",
            &m.http.auth_failures,
        ),
        (
            "stacyvmd_store_commit_failures_total",
            "Group commits that failed and were rolled back.",
            &m.store.commit_failures,
        ),
        (
            "stacyvmd_store_checkpoints_total",
            "WAL checkpoints run by the checkpoint thread.",
            &m.store.checkpoints,
        ),
        (
            "stacyvmd_store_checkpoint_finishes_total",
            "Checkpoint passes finished by the store thread between commits, so that the WAL is reset.",
            &m.store.checkpoint_finishes,
        ),
        (
            "stacyvmd_store_disk_full_total",
            "Times a commit failed because the filesystem was full (the reserve is released each time).",
            &m.store.disk_full_events,
        ),
        (
            "stacyvmd_store_purged_rows_total",
            "Rows removed by the retention purge (ended sandboxes, released leases, idempotency keys, audit rows).",
            &m.store.purged_rows,
        ),
        (
            "stacyvmd_admin_events_dropped_total",
            "Admin-socket events dropped because the event queue was full.",
            &m.events_dropped,
        ),
        (
            "stacyvmd_sandbox_execs_completed_total",
            "Execs whose command ran to its end, whatever its exit code.",
            &m.sandbox_io.execs_completed,
        ),
        (
            "stacyvmd_sandbox_execs_timed_out_total",
            "Execs killed at their timeout.",
            &m.sandbox_io.execs_timed_out,
        ),
        (
            "stacyvmd_sandbox_execs_abandoned_total",
            "Streamed execs killed because their client went away.",
            &m.sandbox_io.execs_abandoned,
        ),
        (
            "stacyvmd_sandbox_execs_failed_total",
            "Execs that could not start (bad request, sandbox not running, helper failure).",
            &m.sandbox_io.execs_failed,
        ),
        (
            "stacyvmd_sandbox_file_ops_total",
            "File operations in sandboxes, successful or not.",
            &m.sandbox_io.file_ops,
        ),
        (
            "stacyvmd_sandbox_file_op_errors_total",
            "File operations in sandboxes that answered an error.",
            &m.sandbox_io.file_op_errors,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", counter.get());
    }

    family(
        &mut out,
        "stacyvmd_store_commit_batch_size",
        "histogram",
        "Requests per group commit.",
    );
    m.store
        .batch_size
        .render(&mut out, "stacyvmd_store_commit_batch_size", "");
    family(
        &mut out,
        "stacyvmd_store_commit_duration_seconds",
        "histogram",
        "Group commit latency, BEGIN to COMMIT.",
    );
    m.store
        .commit_seconds
        .render(&mut out, "stacyvmd_store_commit_duration_seconds", "");
    family(
        &mut out,
        "stacyvmd_store_wal_bytes",
        "gauge",
        "Size of the SQLite WAL file.",
    );
    let _ = writeln!(out, "stacyvmd_store_wal_bytes {store_wal_bytes}");

    family(
        &mut out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    let _ = writeln!(out, "process_cpu_seconds_total {}", process.cpu_seconds);
    family(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    let _ = writeln!(
        out,
        "process_resident_memory_bytes {}",
        process.resident_bytes
    );
    family(
        &mut out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    );
    let _ = writeln!(
        out,
        "process_virtual_memory_bytes {}",
        process.virtual_bytes
    );
    family(
        &mut out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    );
    let _ = writeln!(out, "process_open_fds {}", process.open_fds);
    family(
        &mut out,
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
    );
    let _ = writeln!(out, "process_max_fds {}", process.max_fds);
    family(
        &mut out,
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
    );
    let _ = writeln!(out, "process_threads {}", process.threads);
    family(
        &mut out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    );
    let _ = writeln!(
        out,
        "process_start_time_seconds {:.3}",
        m.started_unix_ms as f64 / 1000.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[1, 10, 100], 1.0);
        for v in [0, 1, 5, 50, 500] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"100\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_sum 556\n"), "{out}");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn every_family_has_help_and_type() {
        let figures = WorkerFigures {
            total: 1,
            heartbeat_ages: vec![("w\"1".into(), 1.5)],
            ..Default::default()
        };
        let text = render_prometheus(
            &figures,
            &TallyFigures::default(),
            &ProcessFigures::read(),
            0,
        );
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(
                    typed.contains(name) || typed.contains(base),
                    "{name} has no TYPE"
                );
            }
        }
        assert!(text.contains("stacyvmd_worker_heartbeat_age_seconds{worker=\"w\\\"1\"} 1.500"));
    }
}
