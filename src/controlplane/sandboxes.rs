//! The control plane's sandbox service: spawn, destroy, extend, reads,
//! reaping and lease renewal. It admits (`admission`), records (the
//! store), dispatches to the owning worker (a `WorkerLink`) and finishes
//! (the store again); it never calls a provider itself.
//!
//! Runs on the caller's thread (an HTTP handler, an admin connection, the
//! `reaper` thread, or the supervisor during startup).
//!
//! Invariants:
//! - every mutating step takes or renews the sandbox lease first, for the
//!   worker that owns the sandbox, and that worker checks holder, expiry
//!   and generation (its fence) before it acts;
//! - a spawn persists its lease and `creating` record together before the
//!   provider runs, and any failure after that destroys the runtime, marks
//!   the record `error` and releases the lease: nothing half-done remains;
//! - a destroy refused because another worker holds the lease changes
//!   nothing; so does one of a sandbox whose worker cannot be reached;
//! - scheduler counts follow the store: a reservation is settled exactly
//!   once, a live sandbox that ends is subtracted exactly once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::errors::{link_failure, refusal};
use super::flights::Flights;
use super::{LifecycleError, SpawnRequest, limits_for};
use crate::config::LiveConfig;
use crate::events::{Event, LeaseFigures};
use crate::leases::Lease;
use crate::providers::{Registry, RuntimeSpec};
use crate::sandboxes::{OwnerScope, Sandbox, SandboxIds, SandboxState, SpawnSpec};
use crate::scheduler::SchedulerHandle;
use crate::store::{SpawnStart, StoreHandle};
use crate::time::now_ms;
use crate::worker::executor::{ExecError, Late};
use crate::worker::{LinkError, Links, WorkerLink};

/// Leases renewed per store request by the background renewal: a commit of
/// this many row updates takes a few ms, which bounds how long any other
/// store request waits behind renewal.
pub const RENEW_CHUNK: usize = 2_000;

/// Marks `sandbox` destroyed and releases its lease (one transaction), then
/// updates the scheduler's counts.
fn finish_destroy(
    store: &StoreHandle,
    scheduler: &SchedulerHandle,
    sandbox: &Sandbox,
    holder: &str,
) -> Result<Sandbox, LifecycleError> {
    let destroyed = match store.finish_destroy(&sandbox.id, holder, now_ms())? {
        Ok(s) => s,
        Err(r) => return Err(refusal(&sandbox.id, r)),
    };
    if sandbox.state.is_live() {
        scheduler.sandbox_count(&sandbox.worker_id, &sandbox.owner_id, -1)?;
    }
    Ok(destroyed)
}

fn publish_lease(event: fn(LeaseFigures) -> Event, lease: &Lease) {
    crate::events::publish(|| {
        event(LeaseFigures {
            resource_id: lease.resource_id.clone(),
            holder_id: lease.holder_id.clone(),
            generation: lease.generation,
        })
    });
}

pub struct Lifecycle {
    pub(super) live: LiveConfig,
    pub(super) store: StoreHandle,
    pub(super) scheduler: SchedulerHandle,
    pub(super) links: Links,
    ids: SandboxIds,
    flights: Flights,
    /// Destroys whose runtime is gone but whose final commit failed (the
    /// disk was full, the store did not answer): id -> the sandbox as it
    /// was. Retried by [`Lifecycle::finish_unfinished_destroys`]; hidden
    /// from reads meanwhile, so no answer claims a runtime that is gone.
    /// The durable `destroy_intents` row covers a restart.
    unfinished: Mutex<HashMap<String, Sandbox>>,
}

impl Lifecycle {
    pub fn new(
        live: LiveConfig,
        store: StoreHandle,
        scheduler: SchedulerHandle,
        links: Links,
    ) -> Lifecycle {
        Lifecycle {
            live,
            store,
            scheduler,
            links,
            ids: SandboxIds::new(),
            flights: Flights::default(),
            unfinished: Mutex::new(HashMap::new()),
        }
    }

    /// The local worker's providers.
    pub fn providers(&self) -> &Registry {
        self.links.local().providers()
    }

    /// The dispatch to workers (exec and files go through it directly).
    pub fn links(&self) -> &Links {
        &self.links
    }

    /// This daemon's own worker id.
    pub(super) fn me(&self) -> &str {
        self.links.local().worker_id()
    }

    pub(super) fn lease_ttl_ms(&self) -> i64 {
        self.live.get().leases.ttl.as_millis() as i64
    }

    fn provider_timeout(&self) -> Duration {
        self.live.get().sandboxes.provider_timeout
    }

    /// The highest lease generation the local worker accepted for `id`.
    pub fn highest_generation(&self, id: &str) -> u64 {
        self.links.local().highest_generation(id)
    }

    /// The sandbox ended: its worker forgets its fence entry.
    pub(super) fn forget(&self, sandbox: &Sandbox) {
        if let Ok(link) = self.links.get(&sandbox.worker_id) {
            link.forget(&sandbox.id);
        }
    }

    /// Spawns a sandbox. Returns it and whether it is an idempotent replay.
    pub fn spawn(&self, req: &SpawnRequest) -> Result<(Sandbox, bool), LifecycleError> {
        let spec = self.resolve(req)?;
        let key = req
            .idempotency_key
            .as_ref()
            .map(|k| format!("{}\n{k}", spec.owner_id));
        if let Some(key) = &key {
            if let Some(existing) = self.store.find_idempotent(key)? {
                return self.replayed(existing);
            }
        }
        let admission = self.scheduler.admit(self.query(&spec, true), false)?;
        let Some(reservation) = admission.reservation.clone() else {
            return Err(LifecycleError::Denied(Box::new(admission)));
        };
        if let Some(id) = &req.sandbox_id {
            if !crate::sandboxes::is_sandbox_id(id) {
                let _ = self.scheduler.settle(reservation, false);
                return Err(LifecycleError::Invalid(format!(
                    "{id:?} is not a sandbox id (sb- and 16 hex digits)"
                )));
            }
            match self.store.get_sandbox(id) {
                Ok(None) => {}
                Ok(Some(_)) => {
                    let _ = self.scheduler.settle(reservation, false);
                    return Err(LifecycleError::Conflict(format!(
                        "sandbox {id} already exists"
                    )));
                }
                Err(e) => {
                    let _ = self.scheduler.settle(reservation, false);
                    return Err(e.into());
                }
            }
        }
        let result =
            self.spawn_reserved(&spec, key, &reservation.worker_id, req.sandbox_id.clone());
        let created = matches!(result, Ok((_, false)));
        if let Err(e) = self.scheduler.settle(reservation, created) {
            log::error!("could not settle a reservation: {e}");
        }
        result
    }

    fn spawn_reserved(
        &self,
        spec: &SpawnSpec,
        key: Option<String>,
        worker_id: &str,
        requested_id: Option<String>,
    ) -> Result<(Sandbox, bool), LifecycleError> {
        let now = now_ms();
        let sandbox = Sandbox {
            id: requested_id.unwrap_or_else(|| self.ids.next()),
            state: SandboxState::Creating,
            provider: spec.provider.clone(),
            image: spec.image.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            owner_id: spec.owner_id.clone(),
            metadata: spec.metadata.clone(),
            worker_id: worker_id.to_owned(),
            created_at_ms: now,
            expires_at_ms: now.saturating_add(spec.ttl_ms),
            updated_at_ms: now,
        };
        let id = sandbox.id.clone();
        let what = format!("spawn of {id}");
        let link = self
            .links
            .get(worker_id)
            .map_err(|e| link_failure(&what, e))?;
        // A retry with the same key waits for this flight, not on a timer.
        let _flight = key.is_some().then(|| self.flights.start(&id));
        let (sandbox, lease) = match self.store.start_spawn(sandbox, self.lease_ttl_ms(), key)? {
            Ok(SpawnStart::Started { sandbox, lease }) => (sandbox, lease),
            Ok(SpawnStart::Replayed(existing)) => return self.replayed(existing),
            Err(r) => return Err(refusal(&id, r)),
        };
        let runtime = RuntimeSpec {
            sandbox_id: id.clone(),
            image: sandbox.image.clone(),
            memory_mb: sandbox.memory_mb,
            vcpus: sandbox.vcpus,
        };
        let timeout = self.provider_timeout();
        let started = link.spawn(&lease, &sandbox.provider, runtime, timeout);
        let fenced = matches!(started, Err(LinkError::Fenced(_)));
        let failure = match started {
            Ok(()) => match self.store.finish_spawn(&id, worker_id, true, now_ms()) {
                Ok(Ok(running)) => {
                    log::info!("sandbox {id} running on {worker_id} ({})", running.provider);
                    publish_lease(Event::LeaseAcquired, &lease);
                    crate::events::publish(|| Event::SandboxRunning {
                        id: id.clone(),
                        worker_id: worker_id.to_owned(),
                    });
                    return Ok((running, false));
                }
                Ok(Err(r)) => refusal(&id, r),
                Err(e) => LifecycleError::from(e),
            },
            Err(e) => link_failure(&what, e),
        };
        // Undo: no runtime, record `error`, lease released. A worker that
        // refused the lease started nothing, and would refuse the undo too.
        if !fenced {
            if let Err(e) = link.destroy(&lease, &sandbox.provider, &id, timeout, None) {
                log::error!("cleanup of failed spawn {id}: destroying its runtime failed: {e}");
            }
        }
        match self.store.finish_spawn(&id, worker_id, false, now_ms()) {
            Ok(Ok(_)) => {}
            Ok(Err(r)) => log::error!("cleanup of failed spawn {id}: {}", refusal(&id, r)),
            Err(e) => log::error!("cleanup of failed spawn {id}: {e}"),
        }
        link.forget(&id);
        crate::events::publish(|| Event::SandboxError {
            id: id.clone(),
            error: failure.to_string(),
        });
        log::warn!("{failure}");
        Err(failure)
    }

    /// The answer to a retried spawn: the first result. A retry that arrives
    /// while the first spawn is still in progress waits for it (bounded by
    /// the provider deadline); a first spawn that failed is a conflict to
    /// retry (its key is released, so the retry after that spawns anew).
    fn replayed(&self, mut existing: Sandbox) -> Result<(Sandbox, bool), LifecycleError> {
        if existing.state == SandboxState::Creating {
            let deadline = Instant::now() + self.provider_timeout() + Duration::from_secs(1);
            self.flights.wait(&existing.id, deadline);
            existing = self.store.get_sandbox(&existing.id)?.ok_or_else(|| {
                LifecycleError::Conflict(format!("the spawn of {} vanished; retry", existing.id))
            })?;
        }
        match existing.state {
            SandboxState::Creating => Err(LifecycleError::Conflict(format!(
                "the spawn with this Idempotency-Key ({}) is still in progress; retry",
                existing.id
            ))),
            SandboxState::Error => Err(LifecycleError::Conflict(format!(
                "the spawn with this Idempotency-Key ({}) failed; retry",
                existing.id
            ))),
            _ => Ok((existing, true)),
        }
    }

    /// Destroys a sandbox: lease first (for the worker that owns it), then
    /// that worker destroys the runtime, then record and lease release
    /// together. A sandbox outside `scope` is refused as a missing one,
    /// and one whose worker cannot be reached is refused, both before
    /// anything is touched.
    pub fn destroy(&self, scope: &OwnerScope, id: &str) -> Result<Sandbox, LifecycleError> {
        let found = self.get(scope, id)?;
        let what = format!("destroy of {id}");
        let link = self
            .links
            .get(&found.worker_id)
            .map_err(|e| link_failure(&what, e))?;
        let holder = link.worker_id().to_owned();
        let (sandbox, lease) =
            match self
                .store
                .start_destroy(id, &holder, self.lease_ttl_ms(), now_ms())?
            {
                Ok(pair) => pair,
                Err(r) => return Err(refusal(id, r)),
            };
        let timeout = self.provider_timeout();
        // If the worker answers after the deadline, finish the destroy then
        // (the lease is still held), or give the lease back if it failed:
        // the record never claims a runtime that is gone.
        let late: Late = {
            let (store, scheduler, sandbox, holder) = (
                self.store.clone(),
                self.scheduler.clone(),
                sandbox.clone(),
                holder.clone(),
            );
            Box::new(move |result| match result {
                Ok(()) => match finish_destroy(&store, &scheduler, &sandbox, &holder) {
                    Ok(_) => log::info!(
                        "sandbox {} destroyed (the provider answered late)",
                        sandbox.id
                    ),
                    Err(e) => log::error!("late destroy of {}: {e}", sandbox.id),
                },
                Err(e) => {
                    log::error!("late destroy of {} failed: {e}", sandbox.id);
                    let _ = store.release_lease(&sandbox.id, &holder, now_ms());
                }
            })
        };
        match link.destroy(&lease, &sandbox.provider, id, timeout, Some(late)) {
            Ok(()) => {}
            Err(LinkError::NoProvider(p)) => {
                log::warn!("sandbox {id}: provider {p} is no longer configured; marking destroyed")
            }
            Err(LinkError::Exec(ExecError::Timeout)) => {
                return Err(LifecycleError::Unavailable(format!(
                    "destroy of {id}: the provider did not answer in time; it completes in the background"
                )));
            }
            Err(e) => {
                let _ = self.store.release_lease(id, &holder, now_ms());
                return Err(link_failure(&what, e));
            }
        }
        let destroyed = match finish_destroy(&self.store, &self.scheduler, &sandbox, &holder) {
            Ok(destroyed) => destroyed,
            Err(e @ (LifecycleError::StorageFull(_) | LifecycleError::Unavailable(_))) => {
                self.unfinished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_owned(), sandbox.clone());
                log::warn!(
                    "sandbox {id}: runtime destroyed, record not committed ({e}); finishing it when the store can commit"
                );
                let message = format!(
                    "sandbox {id}: its runtime is destroyed, but the record could not be committed ({e}); it is finished as soon as the store can commit again"
                );
                return Err(match e {
                    LifecycleError::StorageFull(_) => LifecycleError::StorageFull(message),
                    _ => LifecycleError::Unavailable(message),
                });
            }
            Err(e) => return Err(e),
        };
        link.forget(id);
        log::info!("sandbox {id} destroyed");
        publish_lease(Event::LeaseReleased, &lease);
        crate::events::publish(|| Event::SandboxDestroyed { id: id.to_owned() });
        Ok(destroyed)
    }

    pub fn extend(
        &self,
        scope: &OwnerScope,
        id: &str,
        ttl_ms: i64,
    ) -> Result<Sandbox, LifecycleError> {
        // The sandbox (in scope) for its owner, whose quota may bound the
        // ttl below sandboxes.max_ttl.
        let sandbox = self.get(scope, id)?;
        let config = self.live.get();
        let max = limits_for(&config, &sandbox.owner_id).max_ttl_ms;
        if ttl_ms <= 0 || ttl_ms > max {
            let bound = if max < config.sandboxes.max_ttl.as_millis() as i64 {
                format!("the quota of owner {:?}", sandbox.owner_id)
            } else {
                "sandboxes.max_ttl".to_owned()
            };
            return Err(LifecycleError::Invalid(format!(
                "field `ttl` must be positive and at most {bound} ({})",
                crate::time::format_duration(Duration::from_millis(max as u64))
            )));
        }
        let now = now_ms();
        match self.store.extend(
            id,
            &sandbox.worker_id,
            now.saturating_add(ttl_ms),
            self.lease_ttl_ms(),
            now,
        )? {
            Ok(s) => Ok(s),
            Err(r) => Err(refusal(id, r)),
        }
    }

    /// A live sandbox within `scope`; one outside it is answered exactly
    /// as a missing one, so its id does not leak.
    pub fn get(&self, scope: &OwnerScope, id: &str) -> Result<Sandbox, LifecycleError> {
        match self.store.get_sandbox(id)? {
            Some(s)
                if s.state != SandboxState::Destroyed
                    && scope.permits(&s.owner_id)
                    && !self.is_unfinished(id) =>
            {
                Ok(s)
            }
            _ => Err(LifecycleError::NotFound(format!("sandbox {id} not found"))),
        }
    }

    pub fn list(&self, scope: &OwnerScope) -> Result<Vec<Sandbox>, LifecycleError> {
        let mut all = self.store.list_sandboxes()?;
        if *scope != OwnerScope::All {
            all.retain(|s| scope.permits(&s.owner_id));
        }
        let unfinished = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
        if !unfinished.is_empty() {
            all.retain(|s| !unfinished.contains_key(&s.id));
        }
        Ok(all)
    }

    fn is_unfinished(&self, id: &str) -> bool {
        self.unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Commits the destroys whose runtime went but whose record could not
    /// be committed then; called on a short timer by the reaper (a no-op
    /// when there are none). Returns how many were finished.
    pub fn finish_unfinished_destroys(&self) -> usize {
        let pending: Vec<Sandbox> = {
            let unfinished = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
            if unfinished.is_empty() {
                return 0;
            }
            unfinished.values().cloned().collect()
        };
        let mut finished = 0;
        for sandbox in pending {
            let outcome =
                finish_destroy(&self.store, &self.scheduler, &sandbox, &sandbox.worker_id);
            match &outcome {
                Err(LifecycleError::StorageFull(_) | LifecycleError::Unavailable(_)) => continue,
                Ok(_) => {
                    finished += 1;
                    log::info!("sandbox {} destroyed (record finished late)", sandbox.id);
                    crate::events::publish(|| Event::SandboxDestroyed {
                        id: sandbox.id.clone(),
                    });
                }
                Err(e) => log::error!("finishing the destroy of {}: {e}", sandbox.id),
            }
            self.forget(&sandbox);
            self.unfinished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&sandbox.id);
        }
        finished
    }

    /// Destroys every sandbox within `scope` whose TTL passed. Returns how
    /// many.
    pub fn prune(&self, scope: &OwnerScope) -> Result<usize, LifecycleError> {
        let mut pruned = 0;
        loop {
            let expired = self
                .store
                .list_expired(now_ms(), 256, scope.fixed_owner())?;
            if expired.is_empty() {
                return Ok(pruned);
            }
            let mut progress = false;
            for s in expired {
                match self.destroy(scope, &s.id) {
                    Ok(_) => {
                        pruned += 1;
                        progress = true;
                    }
                    Err(e) => log::warn!("could not reap expired sandbox {}: {e}", s.id),
                }
            }
            if !progress {
                return Ok(pruned);
            }
        }
    }

    /// Keeps the leases of this worker's live sandboxes from lapsing: each
    /// one that expires before `now + ttl` is extended to `now + ttl`, in
    /// chunks of [`RENEW_CHUNK`], one store request (and commit) each, so
    /// other requests queued meanwhile are served between chunks instead of
    /// waiting behind one commit of every lease (0.4-1.7 s at 100,000).
    pub fn renew_leases(&self) {
        let (me, ttl, now) = (self.me(), self.lease_ttl_ms(), now_ms());
        let mut renewed = 0;
        loop {
            match self.store.renew_sandbox_leases(me, ttl, now, RENEW_CHUNK) {
                Ok(n) => {
                    renewed += n;
                    if n < RENEW_CHUNK {
                        break;
                    }
                }
                Err(e) => {
                    log::warn!("lease renewal failed after {renewed} leases: {e}");
                    return;
                }
            }
        }
        if renewed > 0 {
            log::trace!("renewed {renewed} sandbox leases");
        }
    }
}
