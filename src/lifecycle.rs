//! Sandbox lifecycle: spawn, destroy, extend, reap, renew and reconcile.
//! One code path for every caller (REST now, the admin socket later).
//!
//! Runs on the caller's thread (an HTTP handler, the `reaper` thread, or the
//! supervisor during startup) and talks to the store, the scheduler and the
//! local worker's executor through their handles.
//!
//! Invariants:
//! - every mutating step takes or renews the sandbox lease first, and this
//!   worker checks holder, expiry and generation (its fence) before it acts;
//! - a spawn persists its lease and `creating` record together before the
//!   provider runs, and any failure after that destroys the runtime, marks
//!   the record `error` and releases the lease: nothing half-done remains;
//! - a destroy refused because another worker holds the lease changes
//!   nothing;
//! - scheduler counts follow the store: a reservation is settled exactly
//!   once, a live sandbox that ends is subtracted exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::LiveConfig;
use crate::leases::Lease;
use crate::providers::{ExecError, ExecutorHandle, Late, Registry, RuntimeSpec};
use crate::sandboxes::{
    OwnerScope, Sandbox, SandboxIds, SandboxState, SpawnSpec, validate_owner_id,
};
use crate::scheduler::{Admission, AdmissionQuery, Limits, SchedulerError, SchedulerHandle};
use crate::store::{SandboxRefusal, SpawnStart, StoreError, StoreHandle};
use crate::time::now_ms;

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

fn publish_lease(event: fn(crate::events::LeaseFigures) -> crate::events::Event, lease: &Lease) {
    crate::events::publish(|| {
        event(crate::events::LeaseFigures {
            resource_id: lease.resource_id.clone(),
            holder_id: lease.holder_id.clone(),
            generation: lease.generation,
        })
    });
}

#[derive(Debug, Clone, PartialEq)]
pub enum LifecycleError {
    Invalid(String),
    NotFound(String),
    /// Another worker holds the lease, or the state forbids the change.
    Conflict(String),
    Denied(Box<Admission>),
    /// The provider failed; nothing is left behind.
    Provider(String),
    /// A component (store, scheduler, executor, provider) did not answer.
    Unavailable(String),
    /// The store's disk is full: nothing was committed (the message says
    /// what, if anything, already happened outside the store).
    StorageFull(String),
    Internal(String),
}

impl std::fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LifecycleError::Invalid(m)
            | LifecycleError::NotFound(m)
            | LifecycleError::Conflict(m)
            | LifecycleError::Provider(m)
            | LifecycleError::Unavailable(m)
            | LifecycleError::StorageFull(m)
            | LifecycleError::Internal(m) => f.write_str(m),
            LifecycleError::Denied(a) => {
                write!(
                    f,
                    "admission denied: {}",
                    a.denial.map_or("unknown", |d| d.as_str())
                )
            }
        }
    }
}

impl From<StoreError> for LifecycleError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => LifecycleError::Unavailable(e.to_string()),
            StoreError::Database(_) => LifecycleError::Internal(e.to_string()),
            StoreError::Full(_) => LifecycleError::StorageFull(e.to_string()),
        }
    }
}

impl From<SchedulerError> for LifecycleError {
    fn from(e: SchedulerError) -> Self {
        LifecycleError::Unavailable(e.to_string())
    }
}

fn refusal(id: &str, r: SandboxRefusal) -> LifecycleError {
    match r {
        SandboxRefusal::NotFound | SandboxRefusal::NotLive(SandboxState::Destroyed) => {
            LifecycleError::NotFound(format!("sandbox {id} not found"))
        }
        SandboxRefusal::NotLive(state) => {
            LifecycleError::Conflict(format!("sandbox {id} is {}", state.as_str()))
        }
        SandboxRefusal::Lease(e) => LifecycleError::Conflict(format!("sandbox {id}: {e}")),
    }
}

/// A spawn as asked, before defaults and limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpawnRequest {
    pub image: Option<String>,
    pub provider: Option<String>,
    pub memory_mb: Option<u64>,
    pub vcpus: Option<u64>,
    pub ttl_ms: Option<i64>,
    pub owner_id: String,
    pub metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    /// The id to create (worker.spawn names the sandbox by its lease);
    /// `None` makes a fresh one.
    pub sandbox_id: Option<String>,
}

/// The admission limits for `owner`: `[sandboxes]`, tightened by the
/// owner's `[quotas.<owner>]` policy where it has one (a quota can only
/// lower a fleet-wide limit, never raise it).
pub fn limits_for(config: &crate::config::Config, owner: &str) -> Limits {
    let fleet = &config.sandboxes;
    let mut limits = Limits {
        max_ttl_ms: fleet.max_ttl.as_millis() as i64,
        max_sandboxes: fleet.max_sandboxes,
        max_per_owner: fleet.max_per_owner,
    };
    if let Some(q) = (!owner.is_empty())
        .then(|| config.quotas.get(owner))
        .flatten()
    {
        if let Some(ttl) = q.max_ttl {
            limits.max_ttl_ms = limits.max_ttl_ms.min(ttl.as_millis() as i64);
        }
        if let Some(n) = q.max_sandboxes {
            limits.max_per_owner = match limits.max_per_owner {
                0 => n,
                fleet => fleet.min(n),
            };
        }
    }
    limits
}

pub struct Lifecycle {
    live: LiveConfig,
    store: StoreHandle,
    scheduler: SchedulerHandle,
    executor: ExecutorHandle,
    providers: Registry,
    ids: SandboxIds,
    /// Highest lease generation this worker has seen per sandbox.
    fence: Mutex<HashMap<String, u64>>,
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
        executor: ExecutorHandle,
        providers: Registry,
    ) -> Lifecycle {
        Lifecycle {
            live,
            store,
            scheduler,
            executor,
            providers,
            ids: SandboxIds::new(),
            fence: Mutex::new(HashMap::new()),
            unfinished: Mutex::new(HashMap::new()),
        }
    }

    pub fn providers(&self) -> &Registry {
        &self.providers
    }

    fn me(&self) -> String {
        self.live.get().worker.id.clone()
    }

    fn lease_ttl_ms(&self) -> i64 {
        self.live.get().leases.ttl.as_millis() as i64
    }

    /// The acting worker's check before it mutates under `lease`: it must
    /// hold it, unexpired, with a generation not older than any it has seen.
    fn fenced(&self, lease: &Lease, now: i64) -> Result<(), LifecycleError> {
        let me = self.me();
        if lease.holder_id != me {
            return Err(LifecycleError::Conflict(format!(
                "lease on {} is held by {}",
                lease.resource_id, lease.holder_id
            )));
        }
        if lease.expires_at_ms <= now {
            return Err(LifecycleError::Conflict(format!(
                "lease on {} expired",
                lease.resource_id
            )));
        }
        let mut seen = self.fence.lock().unwrap_or_else(|e| e.into_inner());
        let highest = seen.entry(lease.resource_id.clone()).or_insert(0);
        crate::leases::check_generation(lease.generation, *highest).map_err(|e| {
            LifecycleError::Conflict(format!("lease on {}: {e}", lease.resource_id))
        })?;
        *highest = lease.generation;
        Ok(())
    }

    /// The highest lease generation this worker has seen for `id`.
    pub fn highest_generation(&self, id: &str) -> u64 {
        self.fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    fn forget_fence(&self, id: &str) {
        self.fence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Applies defaults and limits. An unknown provider is `NotFound`.
    pub fn resolve(&self, req: &SpawnRequest) -> Result<SpawnSpec, LifecycleError> {
        let config = self.live.get();
        let c = &config.sandboxes;
        let provider = req
            .provider
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| self.providers.default_name().to_owned());
        if self.providers.get(&provider).is_none() {
            return Err(LifecycleError::NotFound(format!(
                "unknown provider {provider:?} (configured: {})",
                self.providers.names().join(", ")
            )));
        }
        let image = req
            .image
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| c.default_image.clone());
        crate::workers::validate_name("image", &image).map_err(LifecycleError::Invalid)?;
        if let Some(p) = self.providers.get(&provider) {
            p.check_image(&image).map_err(LifecycleError::Invalid)?;
        }
        let memory_mb = req.memory_mb.unwrap_or(u64::from(c.default_memory_mb));
        if memory_mb == 0 || memory_mb > u64::from(c.max_memory_mb) {
            return Err(LifecycleError::Invalid(format!(
                "field `memory_mb` must be from 1 to {}",
                c.max_memory_mb
            )));
        }
        let vcpus = req.vcpus.unwrap_or(u64::from(c.default_vcpus));
        if vcpus == 0 || vcpus > u64::from(c.max_vcpus) {
            return Err(LifecycleError::Invalid(format!(
                "field `vcpus` must be from 1 to {}",
                c.max_vcpus
            )));
        }
        let ttl_ms = req.ttl_ms.unwrap_or(c.default_ttl.as_millis() as i64);
        if ttl_ms <= 0 {
            return Err(LifecycleError::Invalid(
                "field `ttl` must be positive".into(),
            ));
        }
        validate_owner_id(&req.owner_id).map_err(LifecycleError::Invalid)?;
        Ok(SpawnSpec {
            image,
            provider,
            memory_mb: memory_mb as u32,
            vcpus: vcpus as u32,
            ttl_ms,
            owner_id: req.owner_id.clone(),
            metadata: req.metadata.clone(),
        })
    }

    fn query(&self, spec: &SpawnSpec, reserve: bool) -> AdmissionQuery {
        let config = self.live.get();
        AdmissionQuery {
            provider: spec.provider.clone(),
            owner_id: spec.owner_id.clone(),
            ttl_ms: spec.ttl_ms,
            limits: limits_for(&config, &spec.owner_id),
            reserve,
        }
    }

    /// Preflight: what a spawn would be told now, creating nothing.
    pub fn admission(&self, req: &SpawnRequest) -> Result<Admission, LifecycleError> {
        let spec = self.resolve(req)?;
        Ok(self.scheduler.admit(self.query(&spec, false), true)?)
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
        let (sandbox, lease) = match self.store.start_spawn(sandbox, self.lease_ttl_ms(), key)? {
            Ok(SpawnStart::Started { sandbox, lease }) => (sandbox, lease),
            Ok(SpawnStart::Replayed(existing)) => return self.replayed(existing),
            Err(r) => return Err(refusal(&id, r)),
        };
        self.fenced(&lease, now)?;
        let provider = self
            .providers
            .get(&sandbox.provider)
            .expect("resolve checked the provider")
            .clone();
        let runtime = RuntimeSpec {
            sandbox_id: id.clone(),
            image: sandbox.image.clone(),
            memory_mb: sandbox.memory_mb,
            vcpus: sandbox.vcpus,
        };
        let timeout = self.live.get().sandboxes.provider_timeout;
        let started = self.executor.spawn(&provider, runtime, timeout);
        let failure = match started {
            Ok(()) => match self.store.finish_spawn(&id, worker_id, true, now_ms()) {
                Ok(Ok(running)) => {
                    log::info!("sandbox {id} running on {worker_id} ({})", running.provider);
                    publish_lease(crate::events::Event::LeaseAcquired, &lease);
                    crate::events::publish(|| crate::events::Event::SandboxRunning {
                        id: id.clone(),
                        worker_id: worker_id.to_owned(),
                    });
                    return Ok((running, false));
                }
                Ok(Err(r)) => refusal(&id, r),
                Err(e) => LifecycleError::from(e),
            },
            Err(ExecError::Provider(e)) => {
                LifecycleError::Provider(format!("spawn of {id} failed: {e}"))
            }
            Err(e @ (ExecError::Timeout | ExecError::Unavailable(_))) => {
                LifecycleError::Unavailable(format!("spawn of {id}: {e}"))
            }
        };
        // Undo: no runtime, record `error`, lease released.
        if let Err(e) = self.executor.destroy(&provider, &id, timeout, None) {
            log::error!("cleanup of failed spawn {id}: destroying its runtime failed: {e}");
        }
        match self.store.finish_spawn(&id, worker_id, false, now_ms()) {
            Ok(Ok(_)) => {}
            Ok(Err(r)) => log::error!("cleanup of failed spawn {id}: {}", refusal(&id, r)),
            Err(e) => log::error!("cleanup of failed spawn {id}: {e}"),
        }
        self.forget_fence(&id);
        crate::events::publish(|| crate::events::Event::SandboxError {
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
        let deadline = std::time::Instant::now()
            + self.live.get().sandboxes.provider_timeout
            + Duration::from_secs(1);
        while existing.state == SandboxState::Creating && std::time::Instant::now() < deadline {
            // A bounded wait on another request's progress; the record is the
            // only signal there is.
            std::thread::sleep(Duration::from_millis(10));
            existing = match self.store.get_sandbox(&existing.id)? {
                Some(s) => s,
                None => {
                    return Err(LifecycleError::Conflict(format!(
                        "the spawn of {} vanished; retry",
                        existing.id
                    )));
                }
            };
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

    /// Destroys a sandbox: lease first, then provider, then record and lease
    /// release together.
    /// A sandbox outside `scope` is refused as a missing one, before
    /// anything is touched (owners never change, so the check holds).
    pub fn destroy(&self, scope: &OwnerScope, id: &str) -> Result<Sandbox, LifecycleError> {
        if *scope != OwnerScope::All {
            self.get(scope, id)?;
        }
        let me = self.me();
        let now = now_ms();
        let (sandbox, lease) = match self
            .store
            .start_destroy(id, &me, self.lease_ttl_ms(), now)?
        {
            Ok(pair) => pair,
            Err(r) => return Err(refusal(id, r)),
        };
        self.fenced(&lease, now)?;
        if sandbox.worker_id != me {
            let _ = self.store.release_lease(id, &me, now_ms());
            return Err(LifecycleError::Conflict(format!(
                "sandbox {id} is owned by worker {}; remote worker RPC is not available",
                sandbox.worker_id
            )));
        }
        match self.providers.get(&sandbox.provider) {
            Some(provider) => {
                let timeout = self.live.get().sandboxes.provider_timeout;
                // If the provider answers after the deadline, finish the
                // destroy then (the lease is still ours), or give the lease
                // back if it failed: the record never claims a runtime that
                // is gone.
                let (store, scheduler, late_id, late_me, late_sandbox) = (
                    self.store.clone(),
                    self.scheduler.clone(),
                    id.to_owned(),
                    me.clone(),
                    sandbox.clone(),
                );
                let late: Late = Box::new(move |result| match result {
                    Ok(()) => match finish_destroy(&store, &scheduler, &late_sandbox, &late_me) {
                        Ok(_) => {
                            log::info!("sandbox {late_id} destroyed (the provider answered late)")
                        }
                        Err(e) => log::error!("late destroy of {late_id}: {e}"),
                    },
                    Err(e) => {
                        log::error!("late destroy of {late_id} failed: {e}");
                        let _ = store.release_lease(&late_id, &late_me, now_ms());
                    }
                });
                match self.executor.destroy(provider, id, timeout, Some(late)) {
                    Ok(()) => {}
                    Err(ExecError::Timeout) => {
                        return Err(LifecycleError::Unavailable(format!(
                            "destroy of {id}: the provider did not answer in time; it completes in the background"
                        )));
                    }
                    Err(e) => {
                        let _ = self.store.release_lease(id, &me, now_ms());
                        return Err(match e {
                            ExecError::Provider(e) => {
                                LifecycleError::Provider(format!("destroy of {id} failed: {e}"))
                            }
                            other => {
                                LifecycleError::Unavailable(format!("destroy of {id}: {other}"))
                            }
                        });
                    }
                }
            }
            None => log::warn!(
                "sandbox {id}: provider {} is no longer configured; marking destroyed",
                sandbox.provider
            ),
        }
        let destroyed = match finish_destroy(&self.store, &self.scheduler, &sandbox, &me) {
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
        self.forget_fence(id);
        log::info!("sandbox {id} destroyed");
        publish_lease(crate::events::Event::LeaseReleased, &lease);
        crate::events::publish(|| crate::events::Event::SandboxDestroyed { id: id.to_owned() });
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
            &self.me(),
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
        let me = self.me();
        let mut finished = 0;
        for sandbox in pending {
            let outcome = finish_destroy(&self.store, &self.scheduler, &sandbox, &me);
            match &outcome {
                Err(LifecycleError::StorageFull(_) | LifecycleError::Unavailable(_)) => continue,
                Ok(_) => {
                    finished += 1;
                    log::info!("sandbox {} destroyed (record finished late)", sandbox.id);
                    crate::events::publish(|| crate::events::Event::SandboxDestroyed {
                        id: sandbox.id.clone(),
                    });
                }
                Err(e) => log::error!("finishing the destroy of {}: {e}", sandbox.id),
            }
            self.forget_fence(&sandbox.id);
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
            match self.store.renew_sandbox_leases(&me, ttl, now, RENEW_CHUNK) {
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

    /// A running sandbox whose runtime is gone (its processes were killed
    /// from outside) is marked `lost` when that is noticed, not only at the
    /// next restart, and the provider's leftovers are removed. Returns
    /// whether the record was changed.
    pub fn runtime_vanished(&self, sandbox: &Sandbox) -> bool {
        match self.mark_lost(&sandbox.id, &sandbox.owner_id) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                log::warn!("marking sandbox {} lost: {e}", sandbox.id);
                return false;
            }
        }
        self.forget_fence(&sandbox.id);
        log::warn!(
            "sandbox {} has no runtime any more (killed from outside?); marked lost",
            sandbox.id
        );
        crate::events::publish(|| crate::events::Event::SandboxLost {
            id: sandbox.id.clone(),
        });
        if let Some(provider) = self.providers.get(&sandbox.provider) {
            let timeout = self.live.get().sandboxes.provider_timeout;
            if let Err(e) = self.executor.destroy(provider, &sandbox.id, timeout, None) {
                log::warn!("sandbox {}: removing what is left of it: {e}", sandbox.id);
            }
        }
        true
    }

    /// Marks a live record of this worker `lost` and takes it off the
    /// scheduler's count. `Ok(false)`: the store refused (logged), nothing
    /// changed.
    fn mark_lost(&self, id: &str, owner_id: &str) -> Result<bool, LifecycleError> {
        let me = self.me();
        match self.store.mark_lost(id, &me, now_ms())? {
            Ok(_) => {
                self.scheduler.sandbox_count(&me, owner_id, -1)?;
                Ok(true)
            }
            Err(r) => {
                log::warn!("{}", refusal(id, r));
                Ok(false)
            }
        }
    }

    /// Startup reconciliation of provider runtimes against the store.
    /// Leases first: this worker takes back the leases of its live
    /// sandboxes in one statement, and leaves alone any sandbox another
    /// holder has. Then records without a runtime are marked `lost`, a
    /// half-finished spawn whose runtime exists is adopted, and runtimes
    /// without a live record are reaped (under a lease). Every step is
    /// logged. Returns (kept, adopted, lost, reaped).
    pub fn reconcile(&self) -> Result<(usize, usize, usize, usize), LifecycleError> {
        let me = self.me();
        let ttl = self.lease_ttl_ms();
        let timeout = self.live.get().sandboxes.provider_timeout;
        let (mut kept, mut adopted, mut lost, mut reaped, mut destroyed) = (0, 0, 0, 0, 0);
        let started = std::time::Instant::now();
        let reclaimed = self.store.reclaim_sandbox_leases(&me, ttl, now_ms())?;
        log::debug!(
            "reconcile: {} live records and their leases in {:?}",
            reclaimed.live.len(),
            started.elapsed()
        );
        let conflicts: HashMap<String, String> = reclaimed.conflicts.into_iter().collect();
        for (id, holder) in &conflicts {
            log::warn!("reconcile: sandbox {id} is leased by {holder}; leaving it");
        }
        let records = reclaimed.live;
        let intents: std::collections::HashSet<String> =
            self.store.destroy_intents()?.into_iter().collect();
        let recorded: std::collections::HashSet<&str> =
            records.iter().map(|r| r.id.as_str()).collect();
        for provider in self.providers.all() {
            let listed = std::time::Instant::now();
            let runtimes = provider
                .list_runtimes()
                .map_err(|e| LifecycleError::Provider(e.to_string()))?;
            log::debug!(
                "reconcile: {} runtimes of {} listed in {:?}",
                runtimes.len(),
                provider.name(),
                listed.elapsed()
            );
            let running: std::collections::HashSet<&str> =
                runtimes.iter().map(String::as_str).collect();
            for record in records.iter().filter(|r| r.provider == provider.name()) {
                if conflicts.contains_key(&record.id) {
                    continue;
                }
                let has_runtime = running.contains(record.id.as_str());
                if has_runtime && record.state == SandboxState::Running {
                    kept += 1;
                } else if has_runtime {
                    match self.store.finish_spawn(&record.id, &me, true, now_ms())? {
                        Ok(_) => {
                            adopted += 1;
                            log::info!(
                                "reconcile: adopted the runtime of half-finished spawn {}",
                                record.id
                            );
                        }
                        Err(r) => log::warn!("reconcile: {}", refusal(&record.id, r)),
                    }
                } else if intents.contains(&record.id) {
                    // A destroy got as far as the provider and not to its
                    // commit (a crash, a full disk): finish it.
                    match self.store.finish_destroy(&record.id, &me, now_ms())? {
                        Ok(_) => {
                            self.scheduler.sandbox_count(&me, &record.owner_id, -1)?;
                            destroyed += 1;
                            log::warn!(
                                "reconcile: finished the interrupted destroy of {} (its runtime is gone)",
                                record.id
                            );
                        }
                        Err(r) => log::warn!("reconcile: {}", refusal(&record.id, r)),
                    }
                } else {
                    if self.mark_lost(&record.id, &record.owner_id)? {
                        lost += 1;
                        log::warn!(
                            "reconcile: sandbox {} has no runtime; marked lost",
                            record.id
                        );
                    }
                }
            }
            for runtime in runtimes.iter().filter(|r| !recorded.contains(r.as_str())) {
                // No live record of ours: lease first, then reap.
                match self
                    .store
                    .acquire_lease(runtime, "sandbox", &me, ttl, now_ms())?
                {
                    Ok(_) => {
                        match self.executor.destroy(provider, runtime, timeout, None) {
                            Ok(()) => {
                                reaped += 1;
                                log::warn!(
                                    "reconcile: reaped runtime {runtime}, which has no live record"
                                );
                            }
                            Err(e) => {
                                log::error!("reconcile: could not reap runtime {runtime}: {e}")
                            }
                        }
                        if let Err(e) = self.store.release_lease(runtime, &me, now_ms())? {
                            log::warn!("reconcile: releasing the lease on {runtime}: {e}");
                        }
                    }
                    Err(e) => log::warn!("reconcile: runtime {runtime} left alone: {e}"),
                }
            }
        }
        log::info!(
            "reconcile: {kept} kept, {adopted} adopted, {lost} lost, {reaped} reaped, {destroyed} interrupted destroys finished"
        );
        Ok((kept, adopted, lost, reaped))
    }
}
