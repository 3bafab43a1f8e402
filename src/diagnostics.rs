//! The diagnostics and JSON metrics documents, shared by the REST API and
//! the admin socket. Built from memory (scheduler view, store tallies,
//! process figures) plus one store round trip for its latency.

use serde_json::json;

use crate::config::LiveConfig;
use crate::controlplane::{Lifecycle, LifecycleError};
use crate::http::api::WorkerJson;
use crate::metrics::ProcessFigures;
use crate::scheduler::SchedulerHandle;
use crate::store::StoreHandle;
use crate::time::{format_duration, now_ms, rfc3339};

/// Every configured provider with its health and runtime count: the
/// `GET /api/v1/providers` answer, and the `providers` of diagnostics.
pub fn providers_json(registry: &crate::providers::Registry) -> Vec<serde_json::Value> {
    registry
        .all()
        .map(|p| {
            let health = p.health();
            json!({
                "name": p.name(),
                "healthy": health.is_ok(),
                "error": health.err().map(|e| e.to_string()),
                "default": p.name() == registry.default_name(),
                "capabilities": p.capabilities(),
                "runtimes": p.runtime_count(),
                "limits": p.limits(),
                "soft_limits": p.soft_limits(),
            })
        })
        .collect()
}

/// What the documents are built from.
pub struct Sources<'a> {
    pub live: &'a LiveConfig,
    pub store: &'a StoreHandle,
    pub scheduler: &'a SchedulerHandle,
    pub lifecycle: &'a Lifecycle,
    /// Open HTTP client connections (0 where the caller does not know).
    pub http_connections: usize,
}

pub fn scheduler_json(src: &Sources<'_>) -> Result<serde_json::Value, LifecycleError> {
    let s = src.scheduler.status()?;
    Ok(json!({
        "admission_control": true,
        "policy": s.policy,
        "worker_id": s.local_worker_id,
        "selected_worker_id": s.selected_worker_id,
        "eligible_workers": s.eligible_workers,
        "reservations": s.reservations,
        "stale_after": format_duration(s.windows.stale_after),
        "down_after": format_duration(s.windows.down_after),
    }))
}

fn store_json(src: &Sources<'_>) -> serde_json::Value {
    let m = &crate::metrics::METRICS.store;
    let ping = src.store.ping();
    json!({
        "healthy": ping.is_ok(),
        "error": ping.as_ref().err().map(ToString::to_string),
        "latency_ms": ping.as_ref().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(-1.0),
        "path": src.store.path().display().to_string(),
        "wal_bytes": src.store.wal_bytes(),
        "commits": m.commit_seconds.count(),
        "commit_batch_mean": m.batch_size.mean(),
        "commit_seconds_mean": m.commit_seconds.mean(),
        "commit_failures": m.commit_failures.get(),
        "checkpoints": m.checkpoints.get(),
        "checkpoint_finishes": m.checkpoint_finishes.get(),
    })
}

fn process_json() -> serde_json::Value {
    let p = ProcessFigures::read();
    json!({
        "pid": std::process::id(),
        "uptime_seconds": crate::metrics::METRICS.started.elapsed().as_secs_f64(),
        "threads": p.threads,
        "rss_bytes": p.resident_bytes,
        "open_fds": p.open_fds,
        "cpu_seconds": p.cpu_seconds,
    })
}

fn build_json() -> serde_json::Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
    })
}

pub fn diagnostics(src: &Sources<'_>) -> Result<serde_json::Value, LifecycleError> {
    let config = src.live.get();
    let views = src.scheduler.list()?;
    let figures = src.scheduler.figures()?;
    let items: Vec<WorkerJson<'_>> = views.iter().map(WorkerJson::from).collect();
    let providers = providers_json(src.lifecycle.providers());
    let mut body = json!({
        "generated_at": rfc3339(now_ms()),
        "build": build_json(),
        "process": process_json(),
        "store": store_json(src),
        "limits": {
            "max_body_bytes": config.server.max_body_bytes,
            "max_connections": config.server.max_connections,
            "http_threads": config.server.http_threads,
            "idle_timeout": format_duration(config.server.idle_timeout),
            "local_max_sandboxes": config.worker.max_sandboxes,
            "max_sandboxes": config.sandboxes.max_sandboxes,
            "max_per_owner": config.sandboxes.max_per_owner,
            "max_ttl": format_duration(config.sandboxes.max_ttl),
            "lease_ttl": format_duration(config.leases.ttl),
        },
        "http": {
            "connections_open": src.http_connections,
            "requests": crate::metrics::METRICS.http.total_requests(),
        },
        "scheduler": scheduler_json(src)?,
        "providers": providers,
        "workers": {
            "total": figures.total,
            "online": figures.online,
            "stale": figures.stale,
            "unhealthy": figures.unhealthy,
            "eligible": figures.eligible,
            "items": items,
        },
    });
    merge(&mut body, fleet_json(src, &figures));
    Ok(body)
}

/// Adds the fields of `extra` (an object) to `body` (an object).
fn merge(body: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(b), serde_json::Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
}

/// Leases, sandboxes and admissions for diagnostics and JSON metrics, from
/// the in-memory tallies.
fn fleet_json(src: &Sources<'_>, figures: &crate::metrics::WorkerFigures) -> serde_json::Value {
    let t = src.store.tallies(now_ms());
    let mut by_state = std::collections::BTreeMap::<&str, u64>::new();
    let mut by_provider = std::collections::BTreeMap::<&str, u64>::new();
    let mut total = 0;
    for (state, provider, _, n) in &t.sandboxes {
        *by_state.entry(state.as_str()).or_default() += n;
        *by_provider.entry(provider.as_str()).or_default() += n;
        total += n;
    }
    let by_worker: std::collections::BTreeMap<&str, u32> = figures
        .sandboxes_by_worker
        .iter()
        .map(|(w, n)| (w.as_str(), *n))
        .collect();
    let active: u32 = by_worker.values().sum();
    let admissions: std::collections::BTreeMap<&str, u64> = crate::metrics::METRICS
        .admission
        .outcomes()
        .into_iter()
        .collect();
    json!({
        "leases": {
            "total": t.leases_total,
            "active": t.leases_active,
            "expired": t.leases_expired,
            "by_holder": t.leases_by_holder,
        },
        "sandboxes": {
            "total": total,
            "active": active,
            "by_state": by_state,
            "by_provider": by_provider,
            "by_worker": by_worker,
        },
        "admissions": admissions,
    })
}

pub fn metrics_json(src: &Sources<'_>) -> Result<serde_json::Value, LifecycleError> {
    let f = src.scheduler.figures()?;
    let m = &crate::metrics::METRICS;
    let mut body = json!({
        "generated_at": rfc3339(now_ms()),
        "build": build_json(),
        "process": process_json(),
        "workers": {"total": f.total, "online": f.online, "stale": f.stale, "unhealthy": f.unhealthy, "eligible": f.eligible},
        "heartbeats_total": m.workers.heartbeats.get(),
        "worker_health_changes_total": m.workers.health_changes.get(),
        "http": {
            "requests_total": m.http.total_requests(),
            "connections_open": m.http.connections_open.get(),
            "connections_accepted_total": m.http.connections_accepted.get(),
            "connections_rejected_total": m.http.connections_rejected.get(),
            "auth_failures_total": m.http.auth_failures.get(),
        },
        "store": store_json(src),
    });
    merge(&mut body, fleet_json(src, &f));
    Ok(body)
}
