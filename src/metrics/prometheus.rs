//! The Prometheus text exposition format 0.0.4: one function per family
//! group, in the order a scrape has always listed them.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use super::{Histogram, METRICS, Metrics, ProcessFigures, STATUS_CODES, WorkerFigures};

impl Histogram {
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

pub(super) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
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

/// Fleet figures the store tallies; the store implements it.
pub trait FleetTallies {
    /// Leases: (total, active, expired).
    fn lease_counts(&self) -> (u64, u64, u64);
    /// Active leases by holder, in the order to list them.
    fn leases_by_holder(&self) -> impl Iterator<Item = (&str, u64)>;
    /// Sandbox records: (state, provider, owner worker, count).
    fn sandbox_rows(&self) -> impl Iterator<Item = (&str, &str, &str, u64)>;
    /// How many rows [`FleetTallies::sandbox_rows`] yields (to size the text).
    fn sandbox_row_count(&self) -> usize;
}

/// Leases, sandboxes, admissions and reservations.
fn render_fleet(out: &mut String, workers: &WorkerFigures, t: &impl FleetTallies) {
    family(
        out,
        "stacyvmd_leases",
        "gauge",
        "Leases by status: total, active (held, unexpired), expired (lapsed or released).",
    );
    let (total, active, expired) = t.lease_counts();
    for (status, n) in [("total", total), ("active", active), ("expired", expired)] {
        let _ = writeln!(out, "stacyvmd_leases{{status=\"{status}\"}} {n}");
    }
    family(
        out,
        "stacyvmd_leases_by_holder",
        "gauge",
        "Active leases by holder.",
    );
    for (holder, n) in t.leases_by_holder() {
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
    for (state, provider, worker, n) in t.sandbox_rows() {
        let _ = writeln!(
            out,
            "stacyvmd_sandboxes{{state=\"{}\",provider=\"{}\",worker=\"{}\"}} {n}",
            state,
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
    tallies: &impl FleetTallies,
    process: &ProcessFigures,
    store_wal_bytes: u64,
) -> String {
    let m = &*METRICS;
    let mut out = String::with_capacity(
        8192 + workers.heartbeat_ages.len() * 160 + tallies.sandbox_row_count() * 120,
    );
    render_fleet(&mut out, workers, tallies);
    render_workers(&mut out, m, workers);
    render_http(&mut out, m);
    render_counters(&mut out, m);
    render_store(&mut out, m, store_wal_bytes);
    super::process::render(&mut out, process, m.started_unix_ms);
    out
}

/// Build information, workers, heartbeats and health changes.
fn render_workers(out: &mut String, m: &Metrics, workers: &WorkerFigures) {
    family(
        out,
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
        out,
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
        out,
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
        out,
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
        out,
        "stacyvmd_worker_health_changes_total",
        "counter",
        "Derived worker health transitions.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_worker_health_changes_total {}",
        m.workers.health_changes.get()
    );
}

/// Requests by route and status, their latency, open connections.
fn render_http(out: &mut String, m: &Metrics) {
    family(
        out,
        "stacyvmd_http_requests_total",
        "counter",
        "HTTP requests answered, by route, method and status code.",
    );
    for (slot, counts) in m.http.requests.iter().enumerate() {
        let Some((path, method)) = m.http.labels[slot].get() else {
            continue;
        };
        for (code, n) in STATUS_CODES.iter().zip(counts.iter().map(|c| c.get())) {
            if n > 0 {
                let code = if *code == 0 {
                    "other".to_owned()
                } else {
                    code.to_string()
                };
                let _ = writeln!(
                    out,
                    "stacyvmd_http_requests_total{{route=\"{path}\",method=\"{method}\",code=\"{code}\"}} {n}",
                );
            }
        }
    }
    family(
        out,
        "stacyvmd_http_request_duration_seconds",
        "histogram",
        "Time from request received to response written, by route.",
    );
    for (slot, h) in m.http.durations.iter().enumerate() {
        let Some((path, method)) = m.http.labels[slot].get() else {
            continue;
        };
        if h.count() > 0 {
            let labels = format!("route=\"{path}\",method=\"{method}\"");
            h.render(out, "stacyvmd_http_request_duration_seconds", &labels);
        }
    }
    family(
        out,
        "stacyvmd_http_connections_open",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(
        out,
        "stacyvmd_http_connections_open {}",
        m.http.connections_open.get()
    );
}

/// The plain counters of the HTTP edge, the store, events and sandbox I/O.
fn render_counters(out: &mut String, m: &Metrics) {
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
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", counter.get());
    }
}

/// Group-commit histograms and the WAL size.
fn render_store(out: &mut String, m: &Metrics, store_wal_bytes: u64) {
    family(
        out,
        "stacyvmd_store_commit_batch_size",
        "histogram",
        "Requests per group commit.",
    );
    m.store
        .batch_size
        .render(out, "stacyvmd_store_commit_batch_size", "");
    family(
        out,
        "stacyvmd_store_commit_duration_seconds",
        "histogram",
        "Group commit latency, BEGIN to COMMIT.",
    );
    m.store
        .commit_seconds
        .render(out, "stacyvmd_store_commit_duration_seconds", "");
    family(
        out,
        "stacyvmd_store_wal_bytes",
        "gauge",
        "Size of the SQLite WAL file.",
    );
    let _ = writeln!(out, "stacyvmd_store_wal_bytes {store_wal_bytes}");
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoTallies;

    impl FleetTallies for NoTallies {
        fn lease_counts(&self) -> (u64, u64, u64) {
            (0, 0, 0)
        }
        fn leases_by_holder(&self) -> impl Iterator<Item = (&str, u64)> {
            std::iter::empty()
        }
        fn sandbox_rows(&self) -> impl Iterator<Item = (&str, &str, &str, u64)> {
            std::iter::empty()
        }
        fn sandbox_row_count(&self) -> usize {
            0
        }
    }

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
        let text = render_prometheus(&figures, &NoTallies, &ProcessFigures::read(), 0);
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
