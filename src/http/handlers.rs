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
use crate::store::{AuditEntry, Deleted};
use crate::time::now_ms;
use crate::workers::validate_worker_id;

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// A body produced while it is sent, instead of `body`.
    pub stream: Option<Streamed>,
}

/// Bodies that are not in memory when the answer starts.
pub enum Streamed {
    /// A file's content, of known length.
    File(Box<dyn crate::worker::ops::FileStream>),
    /// NDJSON lines written (and flushed, one chunk each) as they come.
    Ndjson(Producer),
}

/// Writes a streamed body; called once, on the handler thread.
pub type Producer = Box<dyn FnOnce(&mut dyn std::io::Write) + Send>;

impl Reply {
    pub fn json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body,
            stream: None,
        }
    }

    pub fn streamed(status: u16, content_type: &'static str, stream: Streamed) -> Reply {
        Reply {
            status,
            content_type,
            body: Vec::new(),
            stream: Some(stream),
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
    let caller = match authorize(route.access(), &config.auth, &incoming.presented) {
        Ok(caller) => caller,
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
            .and_then(|bytes| heartbeat(ctx, incoming, caller.principal, &id, &bytes)),
        Route::DeleteWorker { id } => delete_worker(ctx, incoming, caller.principal, &id, query),
        Route::Diagnostics { .. } => diagnostics(ctx),
        Route::MetricsJson => metrics_json(ctx),
        Route::MetricsPrometheus { .. } => prometheus(ctx),
        Route::Scheduler => scheduler(ctx),
        Route::Spawn => read_body(body, body_length, limit)
            .and_then(|b| sandbox_handlers::spawn(ctx, incoming, &caller.scope, &b)),
        Route::Admission => read_body(body, body_length, limit)
            .and_then(|b| sandbox_handlers::admission(ctx, incoming, &caller.scope, query, &b)),
        Route::ListSandboxes => sandbox_handlers::list(ctx, &caller.scope),
        Route::PruneSandboxes => sandbox_handlers::prune(ctx, &caller.scope),
        Route::GetSandbox { id } => sandbox_handlers::get(ctx, &caller.scope, &id),
        Route::DestroySandbox { id } => sandbox_handlers::destroy(ctx, &caller.scope, &id),
        Route::ExtendSandbox { id } => read_body(body, body_length, limit)
            .and_then(|b| sandbox_handlers::extend(ctx, &caller.scope, &id, &b)),
        Route::Exec { id } => read_body(body, body_length, limit)
            .and_then(|b| super::io_handlers::exec(ctx, &caller.scope, &id, &b)),
        Route::Files { id, op } => {
            super::io_handlers::files(ctx, &caller.scope, &id, op, query, body, body_length)
        }
        Route::Providers => sandbox_handlers::providers(ctx),
        Route::ListLeases => sandbox_handlers::list_leases(ctx),
        Route::GetLease { id } => sandbox_handlers::get_lease(ctx, &id),
        Route::LeaseAction { id, action } => read_body(body, body_length, limit).and_then(|b| {
            sandbox_handlers::lease_action(ctx, incoming, caller.principal, &id, action, &b)
        }),
        Route::QuotaSummary => quota_summary(ctx),
        Route::ListTemplates => super::template_handlers::list(ctx, incoming, &caller.scope),
        Route::SaveTemplate => read_body(body, body_length, limit)
            .and_then(|b| super::template_handlers::save(ctx, incoming, &caller.scope, &b)),
        Route::GetTemplate { name } => {
            super::template_handlers::get(ctx, incoming, &caller.scope, &name)
        }
        Route::DeleteTemplate { name } => {
            super::template_handlers::delete(ctx, incoming, &caller.scope, &name)
        }
        Route::SpawnTemplate { name } => read_body(body, body_length, limit)
            .and_then(|b| super::template_handlers::spawn(ctx, incoming, &caller.scope, &name, &b)),
    };
    (id, result)
}

/// `GET /api/v1/quotas/summary`: how many quota policies there are and
/// how many set each limit (the StacyVM SDK's `QuotaSummary`); counts
/// only, never an owner id or a limit's value. No policy can set an exec
/// timeout (`with_max_exec_timeout` is always 0).
fn quota_summary(ctx: &Ctx) -> Result<Reply, ApiError> {
    let config = ctx.live.get();
    let policies = config.quotas.values();
    let count =
        |has: fn(&crate::config::QuotaPolicy) -> bool| policies.clone().filter(|p| has(p)).count();
    Ok(Reply::json(
        200,
        to_json(&json!({
            "total": config.quotas.len(),
            "with_max_sandboxes": count(|p| p.max_sandboxes.is_some()),
            "with_max_ttl": count(|p| p.max_ttl.is_some()),
            "with_max_exec_timeout": 0,
        })),
    ))
}

/// Reads at most `limit` bytes; a declared or actual larger body is a 413.
pub(super) fn read_body(
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
    if !ctx.connections.healthy() {
        return Err(ApiError::unavailable(
            "http: the internal server stopped taking connections",
        ));
    }
    ctx.store
        .ping()
        .map_err(|e| ApiError::unavailable(format!("store: {e}")))?;
    if let Some(why) = ctx.store.cannot_commit() {
        return Err(ApiError::unavailable(format!("store: {why}")));
    }
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
    let view = crate::controlplane::fleet::receive(
        &ctx.store,
        &ctx.scheduler,
        hb,
        incoming.received,
        &who.actor(),
        incoming.request_id,
    )?;
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

fn sources(ctx: &Ctx) -> crate::diagnostics::Sources<'_> {
    crate::diagnostics::Sources {
        live: &ctx.live,
        store: &ctx.store,
        scheduler: &ctx.scheduler,
        lifecycle: &ctx.lifecycle,
        http_connections: ctx.connections.open(),
    }
}

fn scheduler(ctx: &Ctx) -> Result<Reply, ApiError> {
    Ok(Reply::json(
        200,
        to_json(&crate::diagnostics::scheduler_json(&sources(ctx))?),
    ))
}

fn diagnostics(ctx: &Ctx) -> Result<Reply, ApiError> {
    Ok(Reply::json(
        200,
        to_json(&crate::diagnostics::diagnostics(&sources(ctx))?),
    ))
}

fn metrics_json(ctx: &Ctx) -> Result<Reply, ApiError> {
    Ok(Reply::json(
        200,
        to_json(&crate::diagnostics::metrics_json(&sources(ctx))?),
    ))
}

fn prometheus(ctx: &Ctx) -> Result<Reply, ApiError> {
    let figures = ctx.scheduler.figures()?;
    let tallies = ctx.store.tallies(now_ms());
    let mut text = render_prometheus(
        &figures,
        &tallies,
        &ProcessFigures::read(),
        ctx.store.wal_bytes(),
    );
    let providers: Vec<crate::metrics::ProviderFigures> = ctx
        .lifecycle
        .providers()
        .all()
        .map(|p| crate::metrics::ProviderFigures {
            name: p.name().to_owned(),
            healthy: p.health().is_ok(),
            runtimes: p.runtime_count(),
        })
        .collect();
    crate::metrics::render_providers(&mut text, &providers);
    Ok(Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: text.into_bytes(),
        stream: None,
    })
}
