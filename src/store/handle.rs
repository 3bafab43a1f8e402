//! [`StoreHandle`]: cloneable access to the store thread, one blocking
//! method per [`StoreRequest`], each with a reply deadline. Also reads what
//! the store thread publishes without a round trip: its disk [`Health`] and
//! the in-memory [`Tallies`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError, bounded};

use super::{
    AuditEntry, Deleted, LeaseOp, Outcome, Reclaimed, SpawnStart, StoreError, StoreRequest,
    StoreResult, Tallies, TallyFigures, space,
};
use crate::leases::{Acquired, Lease, LeaseError};
use crate::sandboxes::Sandbox;
use crate::workers::{Heartbeat, Worker, WorkerStatus};

/// How long a caller waits for a reply before it calls the store unavailable.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);

/// Cloneable access to the store thread: one blocking method per request.
#[derive(Clone)]
pub struct StoreHandle {
    inbox: Sender<StoreRequest>,
    path: PathBuf,
    tallies: Arc<Mutex<Tallies>>,
    health: Arc<Health>,
}

/// What the store thread knows about its disk, read by readiness and
/// diagnostics without a round trip.
#[derive(Default)]
pub struct Health {
    /// The last commit failed for lack of space, and none has succeeded since.
    pub(crate) full: AtomicBool,
    /// The reserve file is in place.
    pub(crate) reserve_held: AtomicBool,
}

impl StoreHandle {
    fn call<T>(&self, make: impl FnOnce(Sender<StoreResult<T>>) -> StoreRequest) -> StoreResult<T> {
        let (reply, answer) = bounded(1);
        match self.inbox.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(StoreError::Unavailable("write queue is full".into()));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(StoreError::Unavailable("store thread stopped".into()));
            }
        }
        answer.recv_timeout(REPLY_DEADLINE).unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "no reply from the store thread in time".into(),
            ))
        })
    }

    pub fn save_heartbeat(
        &self,
        heartbeat: Heartbeat,
        now_ms: i64,
        audit: Option<AuditEntry>,
    ) -> StoreResult<Worker> {
        self.call(|reply| StoreRequest::SaveHeartbeat {
            heartbeat,
            now_ms,
            audit,
            reply,
        })
    }

    pub fn set_worker_status(
        &self,
        id: &str,
        status: WorkerStatus,
        now_ms: i64,
    ) -> StoreResult<Option<Worker>> {
        self.call(|reply| StoreRequest::SetWorkerStatus {
            id: id.to_owned(),
            status,
            now_ms,
            reply,
        })
    }

    /// Queues refreshed heartbeat times and returns at once: the caller (the
    /// scheduler) must not wait on the disk, and the times are soft state.
    pub fn touch_workers(&self, updates: Vec<(String, i64)>) -> StoreResult<()> {
        let (reply, _ignored) = bounded(1);
        self.inbox
            .try_send(StoreRequest::TouchWorkers { updates, reply })
            .map_err(|e| match e {
                TrySendError::Full(_) => StoreError::Unavailable("write queue is full".into()),
                TrySendError::Disconnected(_) => {
                    StoreError::Unavailable("store thread stopped".into())
                }
            })
    }

    pub fn delete_worker(&self, id: &str, audit: AuditEntry) -> StoreResult<Deleted> {
        self.call(|reply| StoreRequest::DeleteWorker {
            id: id.to_owned(),
            audit,
            reply,
        })
    }

    pub fn record_audit(&self, entry: AuditEntry) -> StoreResult<()> {
        self.call(|reply| StoreRequest::RecordAudit { entry, reply })
    }

    pub fn list_workers(&self) -> StoreResult<Vec<Worker>> {
        self.call(|reply| StoreRequest::ListWorkers { reply })
    }

    pub fn start_spawn(
        &self,
        sandbox: Sandbox,
        lease_ttl_ms: i64,
        idempotency_key: Option<String>,
    ) -> Outcome<SpawnStart> {
        self.call(|reply| StoreRequest::StartSpawn {
            sandbox,
            lease_ttl_ms,
            idempotency_key,
            reply,
        })
    }

    pub fn finish_spawn(&self, id: &str, holder: &str, ok: bool, now_ms: i64) -> Outcome<Sandbox> {
        self.call(|reply| StoreRequest::FinishSpawn {
            id: id.to_owned(),
            holder: holder.to_owned(),
            ok,
            now_ms,
            reply,
        })
    }

    pub fn start_destroy(
        &self,
        id: &str,
        holder: &str,
        lease_ttl_ms: i64,
        now_ms: i64,
    ) -> Outcome<(Sandbox, Lease)> {
        self.call(|reply| StoreRequest::StartDestroy {
            id: id.to_owned(),
            holder: holder.to_owned(),
            lease_ttl_ms,
            now_ms,
            reply,
        })
    }

    pub fn finish_destroy(&self, id: &str, holder: &str, now_ms: i64) -> Outcome<Sandbox> {
        self.call(|reply| StoreRequest::FinishDestroy {
            id: id.to_owned(),
            holder: holder.to_owned(),
            now_ms,
            reply,
        })
    }

    pub fn extend(
        &self,
        id: &str,
        holder: &str,
        expires_at_ms: i64,
        lease_ttl_ms: i64,
        now_ms: i64,
    ) -> Outcome<Sandbox> {
        self.call(|reply| StoreRequest::Extend {
            id: id.to_owned(),
            holder: holder.to_owned(),
            expires_at_ms,
            lease_ttl_ms,
            now_ms,
            reply,
        })
    }

    pub fn mark_lost(&self, id: &str, holder: &str, now_ms: i64) -> Outcome<Sandbox> {
        self.call(|reply| StoreRequest::MarkLost {
            id: id.to_owned(),
            holder: holder.to_owned(),
            now_ms,
            reply,
        })
    }

    pub fn get_sandbox(&self, id: &str) -> StoreResult<Option<Sandbox>> {
        self.call(|reply| StoreRequest::GetSandbox {
            id: id.to_owned(),
            reply,
        })
    }

    pub fn destroy_intents(&self) -> StoreResult<Vec<String>> {
        self.call(|reply| StoreRequest::DestroyIntents { reply })
    }

    pub fn find_idempotent(&self, key: &str) -> StoreResult<Option<Sandbox>> {
        self.call(|reply| StoreRequest::FindIdempotent {
            key: key.to_owned(),
            reply,
        })
    }

    pub fn list_sandboxes(&self) -> StoreResult<Vec<Sandbox>> {
        self.call(|reply| StoreRequest::ListSandboxes { reply })
    }

    pub fn list_expired(
        &self,
        now_ms: i64,
        limit: usize,
        owner: Option<&str>,
    ) -> StoreResult<Vec<Sandbox>> {
        self.call(|reply| StoreRequest::ListExpired {
            now_ms,
            limit,
            owner: owner.map(str::to_owned),
            reply,
        })
    }

    pub fn reclaim_sandbox_leases(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Reclaimed> {
        self.call(|reply| StoreRequest::ReclaimSandboxLeases {
            holder: holder.to_owned(),
            ttl_ms,
            now_ms,
            reply,
        })
    }

    pub fn live_counts(&self) -> StoreResult<Vec<(String, String, u32)>> {
        self.call(|reply| StoreRequest::LiveCounts { reply })
    }

    /// A lease change with its audit row written in the same transaction
    /// when it succeeds; a refusal writes nothing (and costs no fsync).
    pub fn lease_op(
        &self,
        op: LeaseOp,
        resource_id: &str,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
        audit: AuditEntry,
    ) -> StoreResult<Result<Lease, LeaseError>> {
        let (resource_id, holder, audit) = (resource_id.to_owned(), holder.to_owned(), Some(audit));
        match op {
            LeaseOp::Acquire { resource_type } => self
                .call(|reply| StoreRequest::AcquireLease {
                    resource_id,
                    resource_type,
                    holder,
                    ttl_ms,
                    now_ms,
                    audit,
                    reply,
                })
                .map(|r| r.map(|(lease, _)| lease)),
            LeaseOp::Renew => self.call(|reply| StoreRequest::RenewLease {
                resource_id,
                holder,
                ttl_ms,
                now_ms,
                audit,
                reply,
            }),
            LeaseOp::Release => self.call(|reply| StoreRequest::ReleaseLease {
                resource_id,
                holder,
                now_ms,
                audit,
                reply,
            }),
        }
    }

    pub fn acquire_lease(
        &self,
        resource_id: &str,
        resource_type: &str,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Result<(Lease, Acquired), LeaseError>> {
        self.call(|reply| StoreRequest::AcquireLease {
            resource_id: resource_id.to_owned(),
            resource_type: resource_type.to_owned(),
            holder: holder.to_owned(),
            ttl_ms,
            now_ms,
            audit: None,
            reply,
        })
    }

    pub fn renew_lease(
        &self,
        resource_id: &str,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Result<Lease, LeaseError>> {
        self.call(|reply| StoreRequest::RenewLease {
            resource_id: resource_id.to_owned(),
            holder: holder.to_owned(),
            ttl_ms,
            now_ms,
            audit: None,
            reply,
        })
    }

    pub fn release_lease(
        &self,
        resource_id: &str,
        holder: &str,
        now_ms: i64,
    ) -> StoreResult<Result<Lease, LeaseError>> {
        self.call(|reply| StoreRequest::ReleaseLease {
            resource_id: resource_id.to_owned(),
            holder: holder.to_owned(),
            now_ms,
            audit: None,
            reply,
        })
    }

    pub fn get_lease(&self, resource_id: &str) -> StoreResult<Option<Lease>> {
        self.call(|reply| StoreRequest::GetLease {
            resource_id: resource_id.to_owned(),
            reply,
        })
    }

    pub fn list_leases(&self) -> StoreResult<Vec<Lease>> {
        self.call(|reply| StoreRequest::ListLeases { reply })
    }

    /// One chunk of background renewal: see
    /// [`StoreRequest::RenewSandboxLeases`].
    pub fn renew_sandbox_leases(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<usize> {
        self.call(|reply| StoreRequest::RenewSandboxLeases {
            holder: holder.to_owned(),
            ttl_ms,
            now_ms,
            limit,
            reply,
        })
    }

    /// Round trip through the store thread, for readiness and diagnostics.
    /// Creates or replaces a template (durable when this returns).
    pub fn save_template(
        &self,
        template: crate::templates::Template,
        now_ms: i64,
    ) -> StoreResult<crate::templates::Saved> {
        self.call(|reply| StoreRequest::SaveTemplate {
            template,
            now_ms,
            reply,
        })
    }

    /// `owner`'s template `name`, else nobody's (`owner` "" is nobody).
    pub fn get_template(
        &self,
        owner: &str,
        name: &str,
    ) -> StoreResult<Option<crate::templates::Template>> {
        self.call(|reply| StoreRequest::GetTemplate {
            owner: owner.to_owned(),
            name: name.to_owned(),
            reply,
        })
    }

    pub fn list_templates(&self, owner: &str) -> StoreResult<Vec<crate::templates::Template>> {
        self.call(|reply| StoreRequest::ListTemplates {
            owner: owner.to_owned(),
            reply,
        })
    }

    /// Deletes `owner`'s own template `name`; whether there was one.
    pub fn delete_template(&self, owner: &str, name: &str) -> StoreResult<bool> {
        self.call(|reply| StoreRequest::DeleteTemplate {
            owner: owner.to_owned(),
            name: name.to_owned(),
            reply,
        })
    }

    pub fn ping(&self) -> StoreResult<Duration> {
        let started = Instant::now();
        self.call(|reply| StoreRequest::Ping { reply })?;
        Ok(started.elapsed())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the store cannot commit right now (`None`: it can, as far as it
    /// knows): the disk is full. Readiness fails while this is `Some`.
    pub fn cannot_commit(&self) -> Option<String> {
        self.health.full.load(Ordering::SeqCst).then(|| {
            format!(
                "storage full: cannot commit to {} ({})",
                self.path.display(),
                space::describe_free(&self.path)
            )
        })
    }

    /// Whether the disk-full reserve file is in place.
    pub fn reserve_held(&self) -> bool {
        self.health.reserve_held.load(Ordering::SeqCst)
    }

    /// Bytes in the WAL file right now (0 when it does not exist).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(wal_path(&self.path))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Lease and sandbox figures from memory (kept by the store thread after
    /// each commit), for metrics and diagnostics: never a SQL scan.
    pub fn tallies(&self, now_ms: i64) -> TallyFigures {
        self.tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .figures(now_ms)
    }

    /// Active leases held by `holder` (what `worker.status` reports), from
    /// memory. Counted once per change to the leases and cached until the
    /// first of them expires, so asking often costs no scan (see
    /// [`Tallies::held`]).
    pub fn leases_held(&self, holder: &str, now_ms: i64) -> u64 {
        self.tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .held(holder, now_ms)
    }
}

impl StoreHandle {
    /// The handle a backend gives out once its thread runs.
    pub(crate) fn new(
        inbox: Sender<StoreRequest>,
        path: PathBuf,
        tallies: Arc<Mutex<Tallies>>,
        health: Arc<Health>,
    ) -> StoreHandle {
        StoreHandle {
            inbox,
            path,
            tallies,
            health,
        }
    }
}

/// The WAL file beside the database.
pub(crate) fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}
