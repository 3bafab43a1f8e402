//! Admin-socket method dispatch. Every lifecycle change goes through the
//! same `Lifecycle`, store and scheduler calls as the REST API: one code
//! path, not two.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::{AdminCtx, Peer, Subscriber, Writer};
use crate::controlplane::LifecycleError;
use crate::http::api::{LeaseJson, SandboxJson, WorkerJson, parse_heartbeat, parse_spawn};
use crate::sandboxes::OwnerScope;
use crate::store::{AuditEntry, LeaseOp};
use crate::time::{MAX_DURATION, now_ms, parse_duration_within};
use crate::workerproto::{self, Claims, Envelope, ErrorCode, Method, ProtoError};
use crate::workers::{WorkerStatus, validate_worker_id};

/// Answers one request line with one reply line.
pub fn handle(
    ctx: &Arc<AdminCtx>,
    line: &[u8],
    peer: Peer,
    claims: &Claims,
    writer: &Writer,
) -> String {
    let envelope = match workerproto::parse_envelope(line) {
        Ok(e) => e,
        Err(rejected) => return workerproto::error_reply(rejected.id.as_deref(), &rejected.error),
    };
    let id = envelope.id.clone();
    let method = envelope.method;
    let result = run(ctx, &envelope, peer, claims, writer);
    // A lease change was audited by `workerproto::lease_action`, in the
    // lease's own transaction; everything else, refusals included, is
    // audited here (the admin socket audits every mutating command).
    let audited_in_place = matches!(
        method,
        Method::LeaseAcquire | Method::LeaseRenew | Method::LeaseRelease
    ) && result.is_ok();
    if method.mutates() {
        let outcome = result.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok");
        log::info!("admin {} by {}: {outcome}", method.name(), peer.actor());
    }
    if method.mutates() && !audited_in_place {
        let outcome = result.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok");
        let target = target_of(&envelope);
        let entry = AuditEntry {
            outcome: outcome.into(),
            ..AuditEntry::new(
                now_ms(),
                &peer.actor(),
                id.as_deref().unwrap_or(""),
                method.name(),
                &target,
                "admin socket",
            )
        };
        if let Err(e) = ctx.store.record_audit(entry) {
            log::error!("could not audit admin {}: {e}", method.name());
        }
    }
    match result {
        Ok(Answer::Value(value)) => workerproto::ok_reply(id.as_deref(), &value),
        Ok(Answer::Serialized(result)) => workerproto::ok_reply_serialized(id.as_deref(), &result),
        Err(error) => workerproto::error_reply(id.as_deref(), &error),
    }
}

/// A method's result: a JSON value, or a result already serialised from
/// borrowed fields (`worker.status`, the hot read, builds no `Value` tree).
enum Answer {
    Value(Value),
    Serialized(String),
}

impl From<Value> for Answer {
    fn from(value: Value) -> Answer {
        Answer::Value(value)
    }
}

/// The result of `worker.status`.
#[derive(serde::Serialize)]
struct WorkerStatusJson<'a> {
    worker: Option<WorkerJson<'a>>,
    draining: bool,
    providers: Vec<&'a str>,
    sandboxes_owned: u32,
    leases_held: u64,
    reservations: usize,
    uptime_seconds: f64,
    version: &'static str,
}

fn target_of(e: &Envelope) -> String {
    if let Some(lease) = &e.lease {
        return lease.resource_id.clone();
    }
    ["id", "resource_id", "level"]
        .iter()
        .find_map(|k| e.params.get(*k).and_then(Value::as_str))
        .map(str::to_owned)
        .or_else(|| e.worker_id.clone())
        .unwrap_or_default()
}

impl From<LifecycleError> for ProtoError {
    fn from(e: LifecycleError) -> ProtoError {
        let code = match &e {
            LifecycleError::Invalid(_) => ErrorCode::InvalidParams,
            LifecycleError::NotFound(_) => ErrorCode::NotFound,
            LifecycleError::Conflict(_) => ErrorCode::Conflict,
            LifecycleError::Denied(_) => ErrorCode::ResourceLimit,
            // The closed code set has no disk code: `unavailable` (retry
            // later), with a message that starts with "storage full".
            LifecycleError::Unavailable(_) | LifecycleError::StorageFull(_) => {
                ErrorCode::Unavailable
            }
            LifecycleError::Provider(_) | LifecycleError::Internal(_) => ErrorCode::Internal,
        };
        ProtoError::new(code, e.to_string())
    }
}

impl From<crate::store::StoreError> for ProtoError {
    fn from(e: crate::store::StoreError) -> ProtoError {
        LifecycleError::from(e).into()
    }
}

impl From<crate::scheduler::SchedulerError> for ProtoError {
    fn from(e: crate::scheduler::SchedulerError) -> ProtoError {
        LifecycleError::from(e).into()
    }
}

fn invalid(message: impl Into<String>) -> ProtoError {
    ProtoError::new(ErrorCode::InvalidParams, message)
}

/// Params, checked against the names a method takes.
struct Params<'a>(&'a Map<String, Value>);

impl<'a> Params<'a> {
    fn only(map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Params<'a>, ProtoError> {
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(invalid(format!(
                "unknown param `{unknown}` (expected {})",
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        Ok(Params(map))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ProtoError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(format!("param `{key}` must be a string"))),
        }
    }

    fn required(&self, key: &str) -> Result<&'a str, ProtoError> {
        self.str(key)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(format!("param `{key}` is required")))
    }

    fn bool(&self, key: &str) -> Result<bool, ProtoError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(format!("param `{key}` must be true or false"))),
        }
    }

    /// A positive duration of at most `max`, through the one checked
    /// parser (never truncated: the old `as_millis() as i64` turned
    /// `18446744073709552s` into 384 ms).
    fn duration_ms(&self, key: &str, max: Duration) -> Result<Option<i64>, ProtoError> {
        match self.str(key)? {
            None => Ok(None),
            Some(text) => parse_duration_within(text, Duration::from_millis(1), max)
                .map(|d| Some(crate::time::millis(d)))
                .map_err(|e| invalid(format!("param `{key}`: {e}"))),
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn worker_id_param(p: &Params<'_>) -> Result<String, ProtoError> {
    let id = p.required("id")?;
    validate_worker_id(id).map_err(invalid)?;
    Ok(id.to_owned())
}

fn run(
    ctx: &Arc<AdminCtx>,
    e: &Envelope,
    peer: Peer,
    claims: &Claims,
    writer: &Writer,
) -> Result<Answer, ProtoError> {
    let now = now_ms();
    if !claims.allows(e.method, now) {
        return Err(ProtoError::new(
            ErrorCode::Forbidden,
            format!("{} needs the admin access level", e.method.name()),
        ));
    }
    let config = ctx.live.get();
    let me = config.worker.id.clone();
    // The six worker methods act as the addressed worker: this daemon's own.
    if e.method.scope().is_some() {
        if let Some(addressed) = e.worker_id.as_deref().filter(|w| *w != me) {
            return Err(ProtoError::new(
                ErrorCode::Unavailable,
                format!(
                    "worker {addressed} is remote and remote worker RPC is not available; this daemon is {me}"
                ),
            ));
        }
        // The highest generation known for the resource: what this worker
        // has acted under, or the store's current lease, whichever is newer.
        let highest = match &e.lease {
            Some(l) => {
                let stored = ctx
                    .store
                    .get_lease(&l.resource_id)?
                    .map_or(0, |cur| cur.generation);
                stored.max(ctx.lifecycle.highest_generation(&l.resource_id))
            }
            None => 0,
        };
        workerproto::check_lease(e.method, e.lease.as_ref(), &me, highest, now)?;
    }
    let lease_ttl = crate::time::millis(config.leases.ttl);
    let max_lease_ttl = config.leases.max_ttl;
    match e.method {
        Method::WorkerHeartbeat => {
            let params = Value::Object(e.params.clone()).to_string();
            let id = e.worker_id.clone().unwrap_or_else(|| me.clone());
            validate_worker_id(&id).map_err(invalid)?;
            let hb = parse_heartbeat(&id, params.as_bytes()).map_err(|err| invalid(err.message))?;
            let view = crate::controlplane::fleet::receive(
                &ctx.store,
                &ctx.scheduler,
                hb,
                Instant::now(),
                &peer.actor(),
                "",
            )?;
            let next = config.worker.heartbeat_interval;
            Ok(
                json!({"worker": to_value(&WorkerJson::from(&view)), "next_heartbeat_in": crate::time::format_duration(next)}).into(),
            )
        }
        Method::WorkerSpawn => {
            let lease = e.lease.as_ref().expect("checked above");
            let params = Value::Object(e.params.clone()).to_string();
            let mut req = parse_spawn(params.as_bytes()).map_err(|err| invalid(err.message))?;
            req.sandbox_id = Some(lease.resource_id.clone());
            let (sandbox, _) = ctx.lifecycle.spawn(&req)?;
            Ok(to_value(&SandboxJson::from(&sandbox)).into())
        }
        Method::WorkerDestroy | Method::SandboxDestroy => {
            let id = match &e.lease {
                Some(lease) if e.method == Method::WorkerDestroy => lease.resource_id.clone(),
                _ => Params::only(&e.params, &["id"])?.required("id")?.to_owned(),
            };
            ctx.lifecycle.destroy(&OwnerScope::All, &id)?;
            Ok(json!({"status": "destroyed", "id": id}).into())
        }
        Method::WorkerStatus => {
            Params::only(&e.params, &[])?;
            // From the scheduler's published snapshot and the store's
            // cached count: no thread hop, no scan (docs/ARCHITECTURE.md).
            let local = ctx.scheduler.local_status()?;
            let view = local.worker();
            let status = WorkerStatusJson {
                worker: view.map(WorkerJson::from),
                draining: ctx.draining.load(Ordering::SeqCst),
                providers: ctx.lifecycle.providers().names(),
                sandboxes_owned: view.map_or(0, |v| v.active_sandboxes),
                leases_held: ctx.store.leases_held(&me, now),
                reservations: local.reservations(),
                uptime_seconds: crate::metrics::METRICS.started.elapsed().as_secs_f64(),
                version: env!("CARGO_PKG_VERSION"),
            };
            // Sized for a typical answer (about 600 bytes), so the
            // serialiser does not grow the buffer.
            let mut out = Vec::with_capacity(1024);
            serde_json::to_writer(&mut out, &status)
                .map_err(|err| err.to_string())
                .and_then(|()| String::from_utf8(out).map_err(|err| err.to_string()))
                .map(Answer::Serialized)
                .map_err(|err| {
                    ProtoError::new(ErrorCode::Internal, format!("cannot serialise: {err}"))
                })
        }
        Method::WorkerRenewLease => {
            let lease = e.lease.as_ref().expect("checked above");
            let ttl = Params::only(&e.params, &["ttl"])?
                .duration_ms("ttl", max_lease_ttl)?
                .unwrap_or(lease_ttl);
            let renewed = ctx.store.renew_lease(&lease.resource_id, &me, ttl, now)??;
            Ok(to_value(&LeaseJson::new(&renewed, now)).into())
        }
        Method::WorkerShutdown => shutdown(ctx, e, &me).map(Answer::Value),
        Method::WorkerList => {
            Params::only(&e.params, &[])?;
            let views = ctx.scheduler.list()?;
            Ok(Value::Array(
                views
                    .iter()
                    .map(|v| to_value(&WorkerJson::from(v)))
                    .collect(),
            )
            .into())
        }
        Method::WorkerGet => {
            let id = worker_id_param(&Params::only(&e.params, &["id"])?)?;
            let view = ctx.scheduler.get(&id)?.ok_or_else(|| {
                ProtoError::new(ErrorCode::NotFound, format!("worker {id} not found"))
            })?;
            Ok(to_value(&WorkerJson::from(&view)).into())
        }
        Method::WorkerDelete => {
            let p = Params::only(&e.params, &["id", "force"])?;
            let id = worker_id_param(&p)?;
            if id == me {
                return Err(ProtoError::new(
                    ErrorCode::Conflict,
                    format!("worker {id} is this daemon's own; use worker.shutdown"),
                ));
            }
            let live = ctx.scheduler.get(&id)?.map_or(0, |v| v.active_sandboxes);
            if live > 0 && !p.bool("force")? {
                return Err(ProtoError::new(
                    ErrorCode::Conflict,
                    format!("worker {id} owns {live} live sandboxes; pass force"),
                ));
            }
            let audit = AuditEntry::new(
                now,
                &peer.actor(),
                e.id.as_deref().unwrap_or(""),
                "worker.delete",
                &id,
                "admin socket",
            );
            match ctx.store.delete_worker(&id, audit)? {
                crate::store::Deleted::Yes => {
                    ctx.scheduler.forget(&id)?;
                    Ok(json!({"status": "deleted"}).into())
                }
                crate::store::Deleted::NotFound => Err(ProtoError::new(
                    ErrorCode::NotFound,
                    format!("worker {id} not found"),
                )),
            }
        }
        Method::WorkerDrain | Method::WorkerUndrain => {
            let p = Params::only(&e.params, &["id", "deadline"])?;
            let id = worker_id_param(&p)?;
            let status = if e.method == Method::WorkerDrain {
                WorkerStatus::Draining
            } else {
                WorkerStatus::Online
            };
            if id == me {
                ctx.draining
                    .store(status == WorkerStatus::Draining, Ordering::SeqCst);
            }
            let stored = ctx.store.set_worker_status(&id, status, now)?;
            if stored.is_none() {
                return Err(ProtoError::new(
                    ErrorCode::NotFound,
                    format!("worker {id} not found"),
                ));
            }
            let view = ctx.scheduler.set_status(&id, status)?;
            crate::events::publish(|| crate::events::Event::WorkerStatus {
                id: id.to_owned(),
                status: status.as_str(),
            });
            Ok(view
                .map_or(Value::Null, |v| to_value(&WorkerJson::from(&v)))
                .into())
        }
        Method::SandboxList => {
            Params::only(&e.params, &[])?;
            let all = ctx.lifecycle.list(&OwnerScope::All)?;
            Ok(Value::Array(
                all.iter()
                    .map(|s| to_value(&SandboxJson::from(s)))
                    .collect(),
            )
            .into())
        }
        Method::SandboxGet => {
            let id = Params::only(&e.params, &["id"])?.required("id")?.to_owned();
            Ok(to_value(&SandboxJson::from(
                &ctx.lifecycle.get(&OwnerScope::All, &id)?,
            ))
            .into())
        }
        Method::SandboxSpawn => {
            let params = Value::Object(e.params.clone()).to_string();
            let req = parse_spawn(params.as_bytes()).map_err(|err| invalid(err.message))?;
            let (sandbox, _) = ctx.lifecycle.spawn(&req)?;
            Ok(to_value(&SandboxJson::from(&sandbox)).into())
        }
        Method::LeaseAcquire | Method::LeaseRenew | Method::LeaseRelease => {
            let p = Params::only(
                &e.params,
                &["resource_id", "resource_type", "holder_id", "ttl"],
            )?;
            let resource = p.required("resource_id")?;
            let holder = p.required("holder_id")?;
            validate_worker_id(holder)
                .map_err(|err| invalid(format!("param `holder_id`: {err}")))?;
            let ttl = p.duration_ms("ttl", max_lease_ttl)?.unwrap_or(lease_ttl);
            let op = match e.method {
                Method::LeaseAcquire => LeaseOp::Acquire {
                    resource_type: p.str("resource_type")?.unwrap_or("sandbox").to_owned(),
                },
                Method::LeaseRenew => LeaseOp::Renew,
                _ => LeaseOp::Release,
            };
            // One rule set with REST (`workerproto::lease_action`): it
            // audits a change and a store refusal itself.
            let call = workerproto::LeaseCall {
                op,
                resource_id: resource,
                holder_id: holder,
                ttl_ms: ttl,
                actor: &peer.actor(),
                request_id: e.id.as_deref().unwrap_or(""),
            };
            let lease =
                workerproto::lease_action(&ctx.store, call, now).map_err(|err| match err {
                    workerproto::LeaseActionError::Invalid(m) => {
                        invalid(format!("param `resource_id`: {m}"))
                    }
                    workerproto::LeaseActionError::Refused(e) => ProtoError::from(e),
                    workerproto::LeaseActionError::Store(e) => ProtoError::from(e),
                })?;
            Ok(to_value(&LeaseJson::new(&lease, now)).into())
        }
        Method::LeaseGet => {
            let resource = Params::only(&e.params, &["resource_id"])?.required("resource_id")?;
            let lease = ctx.store.get_lease(resource)?.ok_or_else(|| {
                ProtoError::new(ErrorCode::NotFound, format!("no lease for {resource}"))
            })?;
            Ok(to_value(&LeaseJson::new(&lease, now)).into())
        }
        Method::LeaseList => {
            Params::only(&e.params, &[])?;
            let all = ctx.store.list_leases()?;
            Ok(Value::Array(
                all.iter()
                    .map(|l| to_value(&LeaseJson::new(l, now)))
                    .collect(),
            )
            .into())
        }
        Method::SchedulerStatus => {
            Params::only(&e.params, &[])?;
            Ok(crate::diagnostics::scheduler_json(&sources(ctx))?.into())
        }
        Method::SchedulerExplain => {
            let p = Params::only(&e.params, &["provider", "owner_id", "ttl"])?;
            let mut req = crate::controlplane::SpawnRequest {
                provider: p.str("provider")?.map(str::to_owned),
                ..Default::default()
            };
            req.owner_id = p.str("owner_id")?.unwrap_or("").to_owned();
            // As for a spawn: over `sandboxes.max_ttl` is an admission
            // answer, not a parse error.
            req.ttl_ms = p.duration_ms("ttl", MAX_DURATION)?;
            let spec = ctx.lifecycle.resolve(&req)?;
            let admission = ctx.lifecycle.admission(&req)?;
            let per_worker: Vec<Value> = ctx
                .scheduler
                .explain_workers(&spec.provider)?
                .into_iter()
                .map(|(id, reason)| json!({"worker_id": id, "eligible": reason.is_none(), "reason": reason}))
                .collect();
            Ok(json!({
                "provider": spec.provider,
                "allowed": admission.denial.is_none(),
                "reason": admission.denial.map(|d| d.as_str()),
                "selected_worker_id": admission.selected_worker_id,
                "worker_reason": admission.worker_reason,
                "rejections": admission.rejections,
                "workers": per_worker,
            })
            .into())
        }
        Method::DaemonStatus => {
            Params::only(&e.params, &[])?;
            let f = ctx.scheduler.figures()?;
            Ok(json!({
                "daemon": "stacyvmd",
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "worker_id": me,
                "uptime_seconds": crate::metrics::METRICS.started.elapsed().as_secs_f64(),
                "listen": config.server.listen.to_string(),
                "database": config.store.path.display().to_string(),
                "workers": f.total,
                "draining": ctx.draining.load(Ordering::SeqCst),
                "log_level": log::max_level().to_string().to_lowercase(),
                "admin_connections": ctx.open_connections(),
            })
            .into())
        }
        Method::DaemonDiagnostics => {
            Params::only(&e.params, &[])?;
            Ok(crate::diagnostics::diagnostics(&sources(ctx))?.into())
        }
        Method::DaemonReload => {
            Params::only(&e.params, &[])?;
            ctx.supervisor
                .send(crate::supervise::SupervisorEvent::Reload)
                .map_err(|_| {
                    ProtoError::new(ErrorCode::Unavailable, "the supervisor is stopping")
                })?;
            Ok(json!({"status": "reload requested"}).into())
        }
        Method::DaemonLogLevel => {
            let level = Params::only(&e.params, &["level"])?.required("level")?;
            let parsed: log::LevelFilter = level.parse().map_err(|_| {
                invalid("param `level` must be one of off, error, warn, info, debug, trace")
            })?;
            log::set_max_level(parsed);
            log::warn!(
                "log level set to {parsed} by {} (until the next reload)",
                peer.actor()
            );
            Ok(json!({"level": parsed.to_string().to_lowercase()}).into())
        }
        Method::EventsSubscribe => {
            let topics = match e.params.get("topics") {
                None | Some(Value::Null) => crate::events::TOPICS
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect(),
                Some(Value::Array(items)) => {
                    let mut topics = Vec::new();
                    for item in items {
                        match item.as_str() {
                            Some(t) if crate::events::TOPICS.contains(&t) => {
                                topics.push(t.to_owned())
                            }
                            _ => {
                                return Err(invalid(format!(
                                    "param `topics` items must be among {}",
                                    crate::events::TOPICS.join(", ")
                                )));
                            }
                        }
                    }
                    topics
                }
                Some(_) => return Err(invalid("param `topics` must be an array")),
            };
            Params::only(&e.params, &["topics"])?;
            let mut subs = ctx.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            subs.retain(|s| !Arc::ptr_eq(&s.writer, writer));
            let subscriber = Subscriber::start(topics.clone(), writer).map_err(|err| {
                ProtoError::new(
                    ErrorCode::Internal,
                    format!("cannot start the subscription: {err}"),
                )
            })?;
            subs.push(subscriber);
            crate::events::set_listening(true);
            Ok(json!({"subscribed": topics}).into())
        }
        Method::Help => {
            let only = Params::only(&e.params, &["method"])?.str("method")?;
            let list: Vec<Value> = Method::ALL
                .iter()
                .filter(|m| only.is_none_or(|name| m.name() == name))
                .map(|m| json!({"method": m.name(), "params": m.params_help(), "lease": m.needs_lease(), "mutates": m.mutates(), "scope": m.scope().map(|s| s.as_str())}))
                .collect();
            if list.is_empty() {
                return Err(ProtoError::new(ErrorCode::NotFound, "no such method"));
            }
            Ok(Value::Array(list).into())
        }
    }
}

fn sources(ctx: &AdminCtx) -> crate::diagnostics::Sources<'_> {
    crate::diagnostics::Sources {
        live: &ctx.live,
        store: &ctx.store,
        scheduler: &ctx.scheduler,
        lifecycle: &ctx.lifecycle,
        http_connections: 0,
    }
}

/// The longest `worker.shutdown` deadline accepted.
const MAX_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3600);

/// `worker.shutdown`: drain now (no new placements here), wait for spawns in
/// flight up to the deadline, then stop the daemon (`mode` "stop", the
/// default) or leave it running drained (`mode` "drain").
fn shutdown(ctx: &Arc<AdminCtx>, e: &Envelope, me: &str) -> Result<Value, ProtoError> {
    let p = Params::only(&e.params, &["deadline", "mode"])?;
    let deadline = p
        .duration_ms("deadline", MAX_SHUTDOWN_DEADLINE)?
        .map_or(Duration::from_secs(10), |ms| {
            Duration::from_millis(ms as u64)
        });
    let stop = match p.str("mode")?.unwrap_or("stop") {
        "stop" => true,
        "drain" => false,
        other => {
            return Err(invalid(format!(
                "param `mode` must be stop or drain, not {other:?}"
            )));
        }
    };
    ctx.draining.store(true, Ordering::SeqCst);
    ctx.store
        .set_worker_status(me, WorkerStatus::Draining, now_ms())?;
    ctx.scheduler.set_status(me, WorkerStatus::Draining)?;
    crate::events::publish(|| crate::events::Event::WorkerDraining {
        id: me.to_owned(),
        mode: if stop { "stop" } else { "drain" },
    });
    let waiter = ctx.clone();
    std::thread::Builder::new()
        .name("admin-shutdown".into())
        .spawn(move || {
            let until = Instant::now() + deadline;
            // Bounded wait for spawns in flight to settle.
            while Instant::now() < until
                && waiter.scheduler.status().is_ok_and(|s| s.reservations > 0)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            if stop {
                let _ = waiter
                    .supervisor
                    .send(crate::supervise::SupervisorEvent::Shutdown(
                        "worker.shutdown",
                    ));
            }
        })
        .map_err(|err| {
            ProtoError::new(
                ErrorCode::Internal,
                format!("cannot start the drain: {err}"),
            )
        })?;
    Ok(
        json!({"draining": true, "mode": if stop { "stop" } else { "drain" }, "deadline": crate::time::format_duration(deadline)}),
    )
}
