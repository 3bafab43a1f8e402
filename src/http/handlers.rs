//! Request handlers: route, authorize, act, answer. Each handler returns a
//! [`Reply`] or an [`ApiError`]; `serve` turns either into a response.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::json;

use super::Ctx;
use super::api::{ApiError, WorkerJson, parse_heartbeat, to_json};
use super::auth::{Presented, Principal, authorize};
use super::router::{Route, RouteError, RouteId, query_pairs, route};
use super::sandbox_handlers;
use crate::metrics::{ProcessFigures, render_prometheus};
use crate::scheduler::Refresh;
use crate::store::{AuditEntry, Deleted};
use crate::time::{format_duration, now_ms, rfc3339};
use crate::workers::validate_worker_id;

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body,
        }
    }
}

/// Request facts the handlers need, read once from tiny_http's request.
pub struct Incoming<'r> {
    pub method: &'r str,
    pub url: &'r str,
    pub request_id: &'r str,
    pub presented: Presented<'r>,
    pub received: Instant,
    /// `X-User-ID`: the sandbox owner, over the body's `owner_id`.
    pub user_id: Option<&'r str>,
    pub idempotency_key: Option<&'r str>,
}

pub fn handle(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    body: &mut dyn Read,
    body_length: Option<usize>,
) -> (RouteId, Result<Reply, ApiError>) {
    let (path, query) = incoming.url.split_once('?').unwrap_or((incoming.url, ""));
    let route = match route(incoming.method, path) {
        Ok(route) => route,
        Err(RouteError::NotFound) => {
            return (
                RouteId::Unmatched,
                Err(ApiError::not_found(format!("no route for {path}"))),
            );
        }
        Err(RouteError::MethodNotAllowed(allow)) => {
            return (RouteId::Unmatched, Err(ApiError::method_not_allowed(allow)));
        }
        Err(RouteError::BadPath(why)) => {
            return (RouteId::Unmatched, Err(ApiError::bad_request(why)));
        }
    };
    let id = route.id();
    let config = ctx.live.get();
    let principal = match authorize(route.access(), &config.auth, &incoming.presented) {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::METRICS.http.auth_failures.inc();
            log::warn!(
                "{} {path}: {} (request {})",
                incoming.method,
                e.message,
                incoming.request_id
            );
            return (id, Err(e));
        }
    };
    let limit = config.server.max_body_bytes;
    let result = match route {
        // The relay reads the probe's answer up to the end of its head: no body.
        Route::Handoff => Ok(Reply::json(200, Vec::new())),
        Route::Live => Ok(Reply::json(200, br#"{"status":"ok"}"#.to_vec())),
        Route::Health => Ok(Reply::json(
            200,
            to_json(
                &json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "worker_id": config.worker.id}),
            ),
        )),
        Route::Ready => ready(ctx),
        Route::ListWorkers { .. } => list_workers(ctx),
        Route::GetWorker { id, .. } => get_worker(ctx, &id),
        Route::Heartbeat { id } => read_body(body, body_length, limit)
            .and_then(|bytes| heartbeat(ctx, incoming, principal, &id, &bytes)),
        Route::DeleteWorker { id } => delete_worker(ctx, incoming, principal, &id, query),
        Route::Diagnostics { .. } => diagnostics(ctx),
        Route::MetricsJson => metrics_json(ctx),
        Route::MetricsPrometheus { .. } => prometheus(ctx),
        Route::Scheduler => scheduler(ctx),
        Route::Spawn => read_body(body, body_length, limit)
            .and_then(|b| sandbox_handlers::spawn(ctx, incoming, &b)),
        Route::Admission => read_body(body, body_length, limit)
            .and_then(|b| sandbox_handlers::admission(ctx, incoming, &b)),
        Route::ListSandboxes => sandbox_handlers::list(ctx),
        Route::PruneSandboxes => sandbox_handlers::prune(ctx),
        Route::GetSandbox { id } => sandbox_handlers::get(ctx, &id),
        Route::DestroySandbox { id } => sandbox_handlers::destroy(ctx, &id),
        Route::ExtendSandbox { id } => {
            read_body(body, body_length, limit).and_then(|b| sandbox_handlers::extend(ctx, &id, &b))
        }
        Route::Providers => sandbox_handlers::providers(ctx),
        Route::ListLeases => sandbox_handlers::list_leases(ctx),
        Route::GetLease { id } => sandbox_handlers::get_lease(ctx, &id),
        Route::LeaseAction { id, action } => read_body(body, body_length, limit)
            .and_then(|b| sandbox_handlers::lease_action(ctx, &id, action, &b)),
    };
    (id, result)
}

/// Reads at most `limit` bytes; a declared or actual larger body is a 413.
fn read_body(
    body: &mut dyn Read,
    declared: Option<usize>,
    limit: u64,
) -> Result<Vec<u8>, ApiError> {
    if declared.is_some_and(|n| n as u64 > limit) {
        return Err(ApiError::too_large(limit));
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(64 * 1024));
    body.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(bytes)
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    validate_worker_id(id).map_err(|e| ApiError::bad_request(format!("invalid worker id: {e}")))
}

fn ready(ctx: &Ctx) -> Result<Reply, ApiError> {
    if ctx.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("shutting down"));
    }
    ctx.store
        .ping()
        .map_err(|e| ApiError::unavailable(format!("store: {e}")))?;
    let local = ctx.live.get().worker.id.clone();
    match ctx
        .scheduler
        .get(&local)
        .map_err(|e| ApiError::unavailable(format!("scheduler: {e}")))?
    {
        Some(_) => Ok(Reply::json(200, br#"{"status":"ready"}"#.to_vec())),
        None => Err(ApiError::unavailable(format!(
            "local worker: {local} is not registered"
        ))),
    }
}

fn list_workers(ctx: &Ctx) -> Result<Reply, ApiError> {
    let body = ctx.scheduler.render_workers(Box::new(|workers| {
        let items: Vec<WorkerJson<'_>> = workers.iter().map(|w| WorkerJson::from(*w)).collect();
        to_json(&items)
    }))?;
    Ok(Reply::json(200, body))
}

fn get_worker(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    valid_id(id)?;
    match ctx.scheduler.get(id)? {
        Some(view) => Ok(Reply::json(200, to_json(&WorkerJson::from(&view)))),
        None => Err(ApiError::not_found(format!("worker {id} not found"))),
    }
}

fn heartbeat(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    who: Principal,
    id: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    valid_id(id)?;
    let hb = parse_heartbeat(id, body)?;
    // A refresh that declares nothing new is soft state: the scheduler
    // takes it in memory and persists receive times in batches. A
    // registration or a change is stored durably, and audited.
    let detail = match ctx.scheduler.refresh(&hb, incoming.received, now_ms())? {
        Refresh::Done(view) => {
            crate::metrics::METRICS.workers.heartbeats.inc();
            return Ok(Reply::json(200, to_json(&WorkerJson::from(&view))));
        }
        Refresh::Unknown => "registered",
        Refresh::Changed => "changed",
    };
    let audit = Some(AuditEntry::new(
        now_ms(),
        &who.actor(),
        incoming.request_id,
        "worker.heartbeat",
        id,
        detail,
    ));
    let worker = ctx.store.save_heartbeat(hb, now_ms(), audit)?;
    crate::metrics::METRICS.workers.heartbeats.inc();
    let view = ctx.scheduler.observe(worker, incoming.received)?;
    Ok(Reply::json(200, to_json(&WorkerJson::from(&view))))
}

fn delete_worker(
    ctx: &Ctx,
    incoming: &Incoming<'_>,
    who: Principal,
    id: &str,
    query: &str,
) -> Result<Reply, ApiError> {
    valid_id(id)?;
    let mut force = false;
    for (key, value) in query_pairs(query).map_err(ApiError::bad_request)? {
        match (key.as_str(), value.as_str()) {
            ("force", "true" | "1") => force = true,
            ("force", "false" | "0" | "") => force = false,
            ("force", other) => {
                return Err(ApiError::bad_request(format!(
                    "query parameter `force` must be true or false, not {other:?}"
                )));
            }
            (other, _) => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}`"
                )));
            }
        }
    }
    let audit = AuditEntry::new(
        now_ms(),
        &who.actor(),
        incoming.request_id,
        "worker.delete",
        id,
        if force { "force" } else { "" },
    );
    if id == ctx.live.get().worker.id {
        let error = ApiError::conflict(format!(
            "worker {id} is this daemon's own local worker; stop the daemon instead"
        ));
        ctx.store.record_audit(AuditEntry {
            outcome: error.code.into(),
            ..audit
        })?;
        return Err(error);
    }
    // A worker that still owns live sandboxes keeps its record unless the
    // operator insists: its sandboxes would otherwise point at nothing.
    let live = ctx.scheduler.get(id)?.map_or(0, |v| v.active_sandboxes);
    if live > 0 && !force {
        let error = ApiError::conflict(format!(
            "worker {id} still owns {live} live sandboxes; destroy them or use ?force=true"
        ));
        ctx.store.record_audit(AuditEntry {
            outcome: error.code.into(),
            ..audit
        })?;
        return Err(error);
    }
    match ctx.store.delete_worker(id, audit)? {
        Deleted::Yes => {
            ctx.scheduler.forget(id)?;
            log::info!(
                "worker {id} deleted by {} (request {})",
                who.actor(),
                incoming.request_id
            );
            Ok(Reply::json(200, br#"{"status":"deleted"}"#.to_vec()))
        }
        Deleted::NotFound => Err(ApiError::not_found(format!("worker {id} not found"))),
    }
}

fn scheduler_json(ctx: &Ctx) -> Result<serde_json::Value, ApiError> {
    let s = ctx.scheduler.status()?;
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

fn scheduler(ctx: &Ctx) -> Result<Reply, ApiError> {
    Ok(Reply::json(200, to_json(&scheduler_json(ctx)?)))
}

fn store_json(ctx: &Ctx) -> serde_json::Value {
    let m = &crate::metrics::METRICS.store;
    let ping = ctx.store.ping();
    json!({
        "healthy": ping.is_ok(),
        "error": ping.as_ref().err().map(ToString::to_string),
        "latency_ms": ping.as_ref().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(-1.0),
        "path": ctx.store.path().display().to_string(),
        "wal_bytes": ctx.store.wal_bytes(),
        "commits": m.commit_seconds.count(),
        "commit_batch_mean": m.batch_size.mean(),
        "commit_seconds_mean": m.commit_seconds.mean(),
        "commit_failures": m.commit_failures.get(),
        "checkpoints": m.checkpoints.get(),
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

fn diagnostics(ctx: &Ctx) -> Result<Reply, ApiError> {
    let config = ctx.live.get();
    let views = ctx.scheduler.list()?;
    let figures = ctx.scheduler.figures()?;
    let items: Vec<WorkerJson<'_>> = views.iter().map(WorkerJson::from).collect();
    let providers: Vec<serde_json::Value> = ctx
        .lifecycle
        .providers()
        .all()
        .map(|p| {
            let health = p.health();
            json!({
                "name": p.name(),
                "healthy": health.is_ok(),
                "error": health.err().map(|e| e.to_string()),
                "runtimes": p.list_runtimes().map(|r| r.len()).unwrap_or(0),
            })
        })
        .collect();
    let mut body = json!({
        "generated_at": rfc3339(now_ms()),
        "build": build_json(),
        "process": process_json(),
        "store": store_json(ctx),
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
            "connections_open": ctx.connections.open(),
            "requests": crate::metrics::METRICS.http.total_requests(),
        },
        "scheduler": scheduler_json(ctx)?,
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
    merge(&mut body, fleet_json(ctx, &figures));
    Ok(Reply::json(200, to_json(&body)))
}

/// Adds the fields of `extra` (an object) to `body` (an object).
fn merge(body: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(b), serde_json::Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
}

/// Leases, sandboxes and admissions for diagnostics and JSON metrics, from
/// the in-memory tallies.
fn fleet_json(ctx: &Ctx, figures: &crate::metrics::WorkerFigures) -> serde_json::Value {
    let t = ctx.store.tallies(now_ms());
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

fn metrics_json(ctx: &Ctx) -> Result<Reply, ApiError> {
    let f = ctx.scheduler.figures()?;
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
        "store": store_json(ctx),
    });
    merge(&mut body, fleet_json(ctx, &f));
    Ok(Reply::json(200, to_json(&body)))
}

fn prometheus(ctx: &Ctx) -> Result<Reply, ApiError> {
    let figures = ctx.scheduler.figures()?;
    let tallies = ctx.store.tallies(now_ms());
    let text = render_prometheus(
        &figures,
        &tallies,
        &ProcessFigures::read(),
        ctx.store.wal_bytes(),
    );
    Ok(Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: text.into_bytes(),
    })
}
