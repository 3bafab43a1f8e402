//! The store: the one thread that owns the SQLite write connection.
//!
//! Runs on the `store` thread. Takes [`StoreRequest`]s from a bounded inbox;
//! each carries its own reply sender. Group commit: the thread takes one
//! request, drains up to `max_batch - 1` more that are already queued, runs
//! them all in one `BEGIN IMMEDIATE` transaction (each write inside its own
//! savepoint, so one failing write rolls back alone), commits with
//! `synchronous = FULL`, and only then replies. A reply therefore means
//! durable.
//!
//! Automatic WAL checkpoints are off on this connection (they would run
//! inside a commit and stall it); the `store-checkpoint` thread checkpoints
//! from its own connection on a timer, and `journal_size_limit` bounds the
//! WAL file when it is reset.
//!
//! The WAL is reset (written again from its start) only by a write that
//! begins when every frame has been checkpointed. Under steady writes the
//! checkpoint thread never gets there: commits land while it copies. The
//! WAL then grows by every commit, and each commit's sync also has to
//! write the file's new size and blocks to the filesystem journal. So
//! after each pass that did not find the WAL reset, unless commits left
//! it far behind ([`FINISH_MAX_FRAMES`]), the store thread copies the rest
//! itself between two batches (nothing commits meanwhile, so it completes;
//! usually a few frames) and its next write resets the WAL: commits then
//! overwrite blocks the file already has.
//!
//! Invariants: nothing else opens a write connection; every reply is sent
//! after COMMIT returned; the inbox is bounded, so overload is an
//! `Unavailable` error at the caller, never an unbounded queue.

pub mod migrate;
mod retention;
mod sandbox_statements;
pub mod space;
mod statements;
mod template_statements;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use rusqlite::Connection;

use crate::config::StoreConfig;
use crate::leases::{self, Acquired, Lease, LeaseError};
use crate::metrics::METRICS;
use crate::sandboxes::{Sandbox, SandboxState};
use crate::workers::{Heartbeat, Worker, WorkerStatus};

pub use sandbox_statements::{LiveSandbox, Reclaimed};
pub use statements::AuditEntry;

/// The most WAL frames the store thread checkpoints itself, between two
/// batches, to finish a checkpoint pass that concurrent commits kept short
/// (1 MiB of 4 KiB pages; a few frames under steady small writes). Nothing
/// commits while it runs, so it is kept small: during a burst of large
/// batches (spawns, lease renewal chunks) the WAL grows until it is over.
const FINISH_MAX_FRAMES: i64 = 256;

/// How long a caller waits for a reply before it calls the store unavailable.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);
const INBOX_CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    /// The store thread is gone, overloaded or did not answer in time.
    Unavailable(String),
    /// SQLite refused the operation; nothing from it was committed.
    Database(String),
    /// The filesystem holding the database is full: nothing from the
    /// operation was committed, and the store retries by itself as soon as
    /// space returns.
    Full(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Database(why) => write!(f, "store error: {why}"),
            StoreError::Full(why) => write!(f, "storage full: {why}"),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
            _ => StoreError::Database(e.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The lease changes an operator can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOp {
    Acquire { resource_type: String },
    Renew,
    Release,
}

/// Outcome of deleting a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Yes,
    NotFound,
}

/// Why a sandbox operation was refused; nothing was written.
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxRefusal {
    NotFound,
    /// The sandbox is not live (destroyed, error, lost) where that matters.
    NotLive(SandboxState),
    Lease(LeaseError),
}

/// The result of starting a spawn.
#[derive(Debug, Clone, PartialEq)]
pub enum SpawnStart {
    /// Record (state `creating`) and lease committed together.
    Started { sandbox: Sandbox, lease: Lease },
    /// The idempotency key was used before: the first result.
    Replayed(Sandbox),
}

pub type Outcome<T> = StoreResult<Result<T, SandboxRefusal>>;

pub enum StoreRequest {
    /// Upsert from a heartbeat (keeps `created_at`), with an optional audit
    /// row in the same transaction.
    SaveHeartbeat {
        heartbeat: Heartbeat,
        now_ms: i64,
        audit: Option<AuditEntry>,
        reply: Sender<StoreResult<Worker>>,
    },
    /// Refreshed heartbeat receive times, persisted in a batch (soft state).
    TouchWorkers {
        updates: Vec<(String, i64)>,
        reply: Sender<StoreResult<()>>,
    },
    SetWorkerStatus {
        id: String,
        status: WorkerStatus,
        now_ms: i64,
        reply: Sender<StoreResult<Option<Worker>>>,
    },
    DeleteWorker {
        id: String,
        audit: AuditEntry,
        reply: Sender<StoreResult<Deleted>>,
    },
    RecordAudit {
        entry: AuditEntry,
        reply: Sender<StoreResult<()>>,
    },
    ListWorkers {
        reply: Sender<StoreResult<Vec<Worker>>>,
    },
    /// Lease for the new sandbox, then its `creating` record (and the
    /// idempotency key), in one transaction.
    StartSpawn {
        sandbox: Sandbox,
        lease_ttl_ms: i64,
        idempotency_key: Option<String>,
        reply: Sender<Outcome<SpawnStart>>,
    },
    /// `running` after the provider started it, or `error` (lease released)
    /// when it could not.
    FinishSpawn {
        id: String,
        holder: String,
        ok: bool,
        now_ms: i64,
        reply: Sender<Outcome<Sandbox>>,
    },
    /// Acquire (or renew) the sandbox lease for `holder` before a destroy,
    /// and record the destroy's intent with it (see `DestroyIntents`).
    StartDestroy {
        id: String,
        holder: String,
        lease_ttl_ms: i64,
        now_ms: i64,
        reply: Sender<Outcome<(Sandbox, Lease)>>,
    },
    /// Mark destroyed and release the lease, together.
    FinishDestroy {
        id: String,
        holder: String,
        now_ms: i64,
        reply: Sender<Outcome<Sandbox>>,
    },
    /// New expiry, with the lease renewed to match, together.
    Extend {
        id: String,
        holder: String,
        expires_at_ms: i64,
        lease_ttl_ms: i64,
        now_ms: i64,
        reply: Sender<Outcome<Sandbox>>,
    },
    /// Mark a record whose runtime vanished `lost`, releasing its lease.
    MarkLost {
        id: String,
        holder: String,
        now_ms: i64,
        reply: Sender<Outcome<Sandbox>>,
    },
    GetSandbox {
        id: String,
        reply: Sender<StoreResult<Option<Sandbox>>>,
    },
    /// Sandboxes whose destroy started and did not finish (nor fail and
    /// give its lease back): their runtime may be gone.
    DestroyIntents {
        reply: Sender<StoreResult<Vec<String>>>,
    },
    /// The sandbox a previous spawn with this idempotency key created.
    FindIdempotent {
        key: String,
        reply: Sender<StoreResult<Option<Sandbox>>>,
    },
    ListSandboxes {
        reply: Sender<StoreResult<Vec<Sandbox>>>,
    },
    ListExpired {
        now_ms: i64,
        limit: usize,
        /// Only this owner's (`""`: those without an owner); `None`: every owner's.
        owner: Option<String>,
        reply: Sender<StoreResult<Vec<Sandbox>>>,
    },
    /// Startup: take back the leases of this worker's live sandboxes that
    /// it does not hold unexpired; answers those live sandboxes and the
    /// ones another holder has.
    ReclaimSandboxLeases {
        holder: String,
        ttl_ms: i64,
        now_ms: i64,
        reply: Sender<StoreResult<Reclaimed>>,
    },
    LiveCounts {
        reply: Sender<StoreResult<Vec<(String, String, u32)>>>,
    },
    AcquireLease {
        resource_id: String,
        resource_type: String,
        holder: String,
        ttl_ms: i64,
        now_ms: i64,
        /// Written in the same transaction when the change succeeds.
        audit: Option<AuditEntry>,
        reply: Sender<StoreResult<Result<(Lease, Acquired), LeaseError>>>,
    },
    RenewLease {
        resource_id: String,
        holder: String,
        ttl_ms: i64,
        now_ms: i64,
        /// Written in the same transaction when the change succeeds.
        audit: Option<AuditEntry>,
        reply: Sender<StoreResult<Result<Lease, LeaseError>>>,
    },
    ReleaseLease {
        resource_id: String,
        holder: String,
        now_ms: i64,
        /// Written in the same transaction when the change succeeds.
        audit: Option<AuditEntry>,
        reply: Sender<StoreResult<Result<Lease, LeaseError>>>,
    },
    GetLease {
        resource_id: String,
        reply: Sender<StoreResult<Option<Lease>>>,
    },
    ListLeases {
        reply: Sender<StoreResult<Vec<Lease>>>,
    },
    /// Background renewal of the leases on `holder`'s live sandboxes: at
    /// most `limit` of them, soonest expiry first, each to `now_ms +
    /// ttl_ms`; answers how many.
    RenewSandboxLeases {
        holder: String,
        ttl_ms: i64,
        now_ms: i64,
        limit: usize,
        reply: Sender<StoreResult<usize>>,
    },
    Ping {
        reply: Sender<StoreResult<()>>,
    },
    SaveTemplate {
        template: crate::templates::Template,
        now_ms: i64,
        reply: Sender<StoreResult<crate::templates::Saved>>,
    },
    GetTemplate {
        owner: String,
        name: String,
        reply: Sender<StoreResult<Option<crate::templates::Template>>>,
    },
    ListTemplates {
        owner: String,
        reply: Sender<StoreResult<Vec<crate::templates::Template>>>,
    },
    DeleteTemplate {
        owner: String,
        name: String,
        reply: Sender<StoreResult<bool>>,
    },
}

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
    full: AtomicBool,
    /// The reserve file is in place.
    reserve_held: AtomicBool,
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

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Committed lease holders and sandbox counts, mirrored in memory.
#[derive(Default)]
pub struct Tallies {
    /// resource_id -> (holder, expires_at); holder '' when released.
    leases: HashMap<String, (String, i64)>,
    /// (state, provider, worker) -> sandboxes.
    sandboxes: HashMap<(SandboxState, String, String), u64>,
    /// Bumped by every lease change; a [`HeldCount`] is valid for one.
    lease_changes: u64,
    held: Option<HeldCount>,
}

/// One holder's active-lease count, as counted at `counted_at_ms`.
struct HeldCount {
    holder: String,
    lease_changes: u64,
    counted_at_ms: i64,
    /// The earliest expiry among the counted leases: the count can only
    /// fall, and only when one of them expires.
    valid_until_ms: i64,
    count: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TallyFigures {
    pub leases_total: u64,
    pub leases_active: u64,
    pub leases_expired: u64,
    /// holder -> active leases.
    pub leases_by_holder: BTreeMap<String, u64>,
    pub sandboxes: Vec<(SandboxState, String, String, u64)>,
}

impl crate::metrics::FleetTallies for TallyFigures {
    fn lease_counts(&self) -> (u64, u64, u64) {
        (self.leases_total, self.leases_active, self.leases_expired)
    }
    fn leases_by_holder(&self) -> impl Iterator<Item = (&str, u64)> {
        self.leases_by_holder.iter().map(|(h, n)| (h.as_str(), *n))
    }
    fn sandbox_rows(&self) -> impl Iterator<Item = (&str, &str, &str, u64)> {
        self.sandboxes
            .iter()
            .map(|(state, p, w, n)| (state.as_str(), p.as_str(), w.as_str(), *n))
    }
    fn sandbox_row_count(&self) -> usize {
        self.sandboxes.len()
    }
}

impl Tallies {
    fn lease(&mut self, lease: &Lease) {
        self.set_lease(
            lease.resource_id.clone(),
            lease.holder_id.clone(),
            lease.expires_at_ms,
        );
    }

    fn set_lease(&mut self, resource_id: String, holder: String, expires_at_ms: i64) {
        self.leases.insert(resource_id, (holder, expires_at_ms));
        self.lease_changes += 1;
    }

    /// Leases `holder` holds at `now_ms` (held and unexpired), as
    /// [`Tallies::figures`] counts them. The count is reused while no lease
    /// changed and `now_ms` lies between when it was counted and the first
    /// expiry among them (a wall clock stepped back recounts); otherwise it
    /// is recounted, O(leases).
    fn held(&mut self, holder: &str, now_ms: i64) -> u64 {
        if let Some(c) = &self.held {
            if c.holder == holder
                && c.lease_changes == self.lease_changes
                && c.counted_at_ms <= now_ms
                && now_ms < c.valid_until_ms
            {
                return c.count;
            }
        }
        let mut count = 0;
        let mut valid_until_ms = i64::MAX;
        for (h, expires) in self.leases.values() {
            if h == holder && !h.is_empty() && now_ms < *expires {
                count += 1;
                valid_until_ms = valid_until_ms.min(*expires);
            }
        }
        self.held = Some(HeldCount {
            holder: holder.to_owned(),
            lease_changes: self.lease_changes,
            counted_at_ms: now_ms,
            valid_until_ms,
            count,
        });
        count
    }

    /// Rows the retention purge removed.
    fn purged(&mut self, leases: &[String], sandboxes: &[(SandboxState, String, String)]) {
        for id in leases {
            self.leases.remove(id);
        }
        if !leases.is_empty() {
            self.lease_changes += 1;
        }
        for key in sandboxes {
            if let Some(n) = self.sandboxes.get_mut(key) {
                *n = n.saturating_sub(1);
            }
        }
    }

    fn moved(&mut self, from: Option<&Sandbox>, to: &Sandbox) {
        if let Some(old) = from {
            if let Some(n) =
                self.sandboxes
                    .get_mut(&(old.state, old.provider.clone(), old.worker_id.clone()))
            {
                *n = n.saturating_sub(1);
            }
        }
        *self
            .sandboxes
            .entry((to.state, to.provider.clone(), to.worker_id.clone()))
            .or_default() += 1;
    }

    fn figures(&self, now_ms: i64) -> TallyFigures {
        let mut f = TallyFigures {
            leases_total: self.leases.len() as u64,
            ..Default::default()
        };
        for (holder, expires) in self.leases.values() {
            if !holder.is_empty() && now_ms < *expires {
                f.leases_active += 1;
                *f.leases_by_holder.entry(holder.clone()).or_default() += 1;
            } else {
                f.leases_expired += 1;
            }
        }
        f.sandboxes = self
            .sandboxes
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|((s, p, w), n)| (*s, p.clone(), w.clone(), *n))
            .collect();
        f.sandboxes.sort();
        f
    }
}

/// The opened store: its handle and the threads to join at shutdown.
pub struct Store {
    pub handle: StoreHandle,
    pub thread: JoinHandle<()>,
    pub checkpointer: Checkpointer,
    /// Held for the life of the process: one daemon per database.
    pub lock: std::fs::File,
}

/// Takes `<database>.lock` (flock, exclusive, non-blocking). A second daemon
/// on the same database would fight the first over its sockets and rows; it
/// is refused instead. The kernel drops the lock when the process ends,
/// however it ends.
fn lock_database(db: &Path) -> Result<std::fs::File, String> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(format!(
            "another stacyvmd is using {} (its lock {} is held); refusing to start",
            db.display(),
            path.display()
        )),
        Err(e) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// Why the store could not open.
#[derive(Debug)]
pub enum OpenError {
    /// The filesystem has no room for the reserve or the first writes.
    Full(String),
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Full(m) | OpenError::Other(m) => f.write_str(m),
        }
    }
}

impl From<String> for OpenError {
    fn from(m: String) -> Self {
        OpenError::Other(m)
    }
}

/// The one message a start on a full disk gives: what, where, how much.
pub fn full_at_start(path: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!(
        "storage full: {what} {}: {e} ({} on its filesystem); free some space and start again",
        path.display(),
        space::describe_free(path)
    )
}

/// Opens (creating if needed) the database, applies migrations on the
/// calling thread so that a failure stops startup before READY, then starts
/// the store and checkpoint threads. The reserve file is made first: a
/// filesystem without room for it fails here, clearly, before anything
/// else is written.
pub fn open(
    config: &StoreConfig,
    on_exit: crate::daemon::ExitNotifier,
) -> Result<Store, OpenError> {
    if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    }
    let lock = lock_database(&config.path)?;
    make_private(&config.path)?;
    let mut reserve = space::Reserve::new(&config.path, config.reserve_bytes);
    reserve.ensure().map_err(|e| {
        let what = format!("cannot make the {}-byte reserve", config.reserve_bytes);
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            OpenError::Full(full_at_start(reserve.path(), &what, e))
        } else {
            OpenError::Other(format!("{what} {}: {e}", reserve.path().display()))
        }
    })?;
    let sqlite_failed = |what: &str, e: rusqlite::Error| {
        if space::is_full(&e, &config.path) {
            OpenError::Full(full_at_start(&config.path, what, e))
        } else {
            OpenError::Other(format!("{what} {}: {e}", config.path.display()))
        }
    };
    let mut conn = Connection::open(&config.path).map_err(|e| sqlite_failed("cannot open", e))?;
    configure_writer(&conn, config.wal_size_limit)
        .map_err(|e| sqlite_failed("cannot configure", e))?;
    migrate::migrate(&mut conn, crate::time::now_ms()).map_err(|e| match e {
        migrate::MigrateError::Sqlite(e) => sqlite_failed("cannot migrate", e),
        other => OpenError::Other(other.to_string()),
    })?;
    let tallies = Arc::new(Mutex::new(
        load_tallies(&mut conn).map_err(|e| format!("cannot load tallies: {e}"))?,
    ));
    let health = Arc::new(Health::default());
    health.reserve_held.store(reserve.held(), Ordering::SeqCst);
    let writer = Writer {
        path: config.path.clone(),
        reserve,
        health: health.clone(),
        retention: retention::Retention::new(config.retention),
        next_recovery: Instant::now(),
        last_logged: None,
    };

    let (inbox, requests) = bounded(INBOX_CAPACITY);
    let max_batch = config.max_batch;
    let thread_tallies = tallies.clone();
    let finish = Arc::new(AtomicBool::new(false));
    let store_finish = finish.clone();
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            let _exit = on_exit.guard("store");
            run(
                conn,
                writer,
                requests,
                max_batch,
                &thread_tallies,
                &store_finish,
            );
        })
        .map_err(|e| format!("cannot start the store thread: {e}"))?;
    let checkpointer = Checkpointer::start(&config.path, config.checkpoint_interval, finish)?;
    Ok(Store {
        handle: StoreHandle {
            inbox,
            path: config.path.clone(),
            tallies,
            health,
        },
        thread,
        checkpointer,
        lock,
    })
}

fn load_tallies(conn: &mut Connection) -> StoreResult<Tallies> {
    let tx = conn.transaction()?;
    let mut t = Tallies::default();
    sandbox_statements::for_each_lease_holder(&tx, |id, holder, expires_at_ms| {
        t.set_lease(id, holder, expires_at_ms)
    })?;
    for (state, provider, worker, n) in sandbox_statements::sandbox_tally(&tx)? {
        t.sandboxes.insert((state, provider, worker), n);
    }
    tx.commit()?;
    Ok(t)
}

/// The files beside the database that hold its data or guard it.
const COMPANIONS: [&str; 4] = ["-wal", "-shm", "-journal", ".lock"];

/// Makes the database and its companions the daemon's alone (0600).
/// SQLite creates the WAL and SHM with the database file's own mode
/// whatever the umask, so the database is created 0600 before SQLite
/// opens it. Files an older version or an operator left wider are
/// tightened, and that is logged.
fn make_private(db: &Path) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(db)
        .map_err(|e| format!("cannot create {}: {e}", db.display()))?;
    let companions = COMPANIONS.iter().map(|suffix| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    });
    for path in std::iter::once(db.to_path_buf()).chain(companions) {
        let mode = match std::fs::metadata(&path) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot stat {}: {e}", path.display())),
        };
        if mode & 0o7077 != 0 {
            let private = mode & 0o700;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(private))
                .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
            log::warn!(
                "storage: tightened {} from mode {mode:04o} to {private:04o}",
                path.display()
            );
        }
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
}

fn configure_writer(conn: &Connection, wal_size_limit: u64) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL;
         PRAGMA wal_autocheckpoint = 0;
         PRAGMA journal_size_limit = {wal_size_limit};
         PRAGMA foreign_keys = ON;"
    ))
}

/// How often the store thread tries to commit again while the disk is full
/// (with nothing else to commit, a one-row probe).
const RECOVERY_INTERVAL: Duration = Duration::from_millis(250);

/// The store thread's own state beside its connection: the disk and the
/// duties it runs between batches.
struct Writer {
    path: PathBuf,
    reserve: space::Reserve,
    health: Arc<Health>,
    retention: retention::Retention,
    next_recovery: Instant,
    /// When a disk-full change was last logged at warning level: a disk on
    /// the brink flips between full and not many times a second.
    last_logged: Option<Instant>,
}

/// How often a flipping disk-full state is logged above debug.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How a batch's COMMIT went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Committed {
    Yes,
    /// Failed for lack of space.
    Full,
    Failed,
}

impl Writer {
    fn full(&self) -> bool {
        self.health.full.load(Ordering::SeqCst)
    }

    /// When the loop must wake up even with no request.
    fn next_duty(&self) -> Instant {
        if self.full() {
            self.next_recovery
        } else {
            self.retention.next_run()
        }
    }

    fn committed(&mut self, conn: &Connection, outcome: Committed) {
        match outcome {
            Committed::Yes if self.full() => self.space_returned("a commit"),
            Committed::Full if !self.full() => self.disk_full(conn),
            Committed::Yes | Committed::Full | Committed::Failed => {}
        }
    }

    /// The first commit that failed for lack of space: say so once, give
    /// the reserve back and let a checkpoint empty the WAL into it.
    fn disk_full(&mut self, conn: &Connection) {
        self.health.full.store(true, Ordering::SeqCst);
        METRICS.store.disk_full_events.inc();
        let released = self.reserve.release();
        self.health.reserve_held.store(false, Ordering::SeqCst);
        let level = self.log_level();
        log::log!(
            level,
            "storage full: cannot commit to {} ({}); {}writes answer 507 STORAGE_FULL and /api/v1/ready 503 until space returns",
            self.path.display(),
            space::describe_free(&self.path),
            if released {
                format!("released the {}-byte reserve; ", self.reserve.bytes())
            } else {
                String::new()
            }
        );
        truncate_wal(conn);
        self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
    }

    /// Error for the first change in [`FULL_LOG_INTERVAL`], debug after.
    fn log_level(&mut self) -> log::Level {
        let now = Instant::now();
        match self.last_logged {
            Some(at) if now.duration_since(at) < FULL_LOG_INTERVAL => log::Level::Debug,
            _ => {
                self.last_logged = Some(now);
                log::Level::Error
            }
        }
    }

    fn space_returned(&mut self, what: &str) {
        self.health.full.store(false, Ordering::SeqCst);
        let level = match self.log_level() {
            log::Level::Error => log::Level::Warn,
            other => other,
        };
        log::log!(
            level,
            "storage: {what} succeeded again on {} ({}); writes resume",
            self.path.display(),
            space::describe_free(&self.path)
        );
    }

    /// Work between batches: while full, try to commit again; otherwise
    /// put the reserve back when there is room and run retention when due.
    fn duties(&mut self, conn: &mut Connection, tallies: &Mutex<Tallies>) {
        let now = Instant::now();
        if self.full() {
            if now >= self.next_recovery {
                truncate_wal(conn);
                if probe(conn).is_ok() {
                    self.space_returned("a probe write");
                }
                self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
            }
            return;
        }
        if now < self.retention.next_run() {
            return;
        }
        self.restore_reserve();
        let outcome = self.retention.run(conn, tallies);
        if outcome == Committed::Full {
            self.disk_full(conn);
        }
    }

    /// Makes the reserve again once the filesystem has room for it twice
    /// over (so that making it does not fill the disk by itself).
    fn restore_reserve(&mut self) {
        if self.reserve.held() {
            return;
        }
        let room = space::free_bytes(&self.path).unwrap_or(0);
        if room < self.reserve.bytes().saturating_mul(2) {
            return;
        }
        match self.reserve.ensure() {
            Ok(()) => {
                self.health.reserve_held.store(true, Ordering::SeqCst);
                log::info!(
                    "storage: the {}-byte reserve {} is back in place",
                    self.reserve.bytes(),
                    self.reserve.path().display()
                );
            }
            Err(e) => log::debug!("storage: reserve not restored yet: {e}"),
        }
    }
}

/// Copies the whole WAL into the database and truncates it to nothing,
/// giving its space back (needs no reader in the way: only this thread
/// reads through this connection, and the checkpoint thread only
/// checkpoints).
fn truncate_wal(conn: &Connection) {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    }) {
        Ok((0, frames)) => log::info!("storage: WAL checkpointed and truncated ({frames} frames)"),
        Ok((_, frames)) => log::debug!("storage: WAL truncate blocked ({frames} frames)"),
        Err(e) => log::debug!("storage: WAL truncate failed: {e}"),
    }
}

/// One tiny durable write: whether the store can commit at all.
fn probe(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO store_meta (key, value) VALUES ('probe', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [crate::time::now_ms()],
    )?;
    tx.commit()
}

/// The store thread's loop. Returns when every handle is dropped.
fn run(
    mut conn: Connection,
    mut writer: Writer,
    requests: Receiver<StoreRequest>,
    max_batch: usize,
    tallies: &Mutex<Tallies>,
    finish_checkpoint: &AtomicBool,
) {
    let mut batch: Vec<StoreRequest> = Vec::with_capacity(max_batch);
    loop {
        let wait = writer.next_duty().saturating_duration_since(Instant::now());
        match requests.recv_timeout(wait) {
            Ok(first) => {
                batch.push(first);
                while batch.len() < max_batch {
                    match requests.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let outcome = commit_batch(&mut conn, &writer.path, &mut batch, tallies);
                writer.committed(&conn, outcome);
                if finish_checkpoint.swap(false, Ordering::Relaxed) && !writer.full() {
                    checkpoint(&conn, Checkpoint::Finish);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        writer.duties(&mut conn, tallies);
    }
    log::debug!("store thread: inbox closed, exiting");
}

/// A reply held back until the batch's COMMIT returned: on success it sends
/// the result and applies the in-memory effects; on failure it sends the
/// commit error instead (nothing of the batch is durable, so nothing may be
/// acknowledged) and applies nothing.
type Deferred = Box<dyn FnOnce(Option<&StoreError>, &mut Tallies)>;

/// In-memory effects of a committed write.
#[derive(Default)]
struct Effects {
    leases: Vec<Lease>,
    sandboxes: Vec<(Option<Sandbox>, Sandbox)>,
}

impl Effects {
    fn apply(self, t: &mut Tallies) {
        self.leases.iter().for_each(|l| t.lease(l));
        self.sandboxes
            .iter()
            .for_each(|(from, to)| t.moved(from.as_ref(), to));
    }
}

fn defer<T: Send + 'static>(
    reply: Sender<StoreResult<T>>,
    result: StoreResult<T>,
    effects: Effects,
) -> Deferred {
    Box::new(move |commit_error, tallies| {
        let answer = match commit_error {
            Some(e) => Err(e.clone()),
            None => {
                if result.is_ok() {
                    effects.apply(tallies);
                }
                result
            }
        };
        // A caller that gave up waiting dropped its receiver; that is fine.
        let _ = reply.send(answer);
    })
}

fn commit_batch(
    conn: &mut Connection,
    path: &Path,
    batch: &mut Vec<StoreRequest>,
    tallies: &Mutex<Tallies>,
) -> Committed {
    let started = Instant::now();
    let size = batch.len();
    let mut pending: Vec<Deferred> = Vec::with_capacity(size);
    let outcome = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for request in batch.drain(..) {
            pending.push(apply(&tx, request));
        }
        tx.commit()
    })();
    let mut tallies = tallies.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Ok(()) => {
            METRICS.store.observe_commit(size, started.elapsed());
            pending.into_iter().for_each(|p| p(None, &mut tallies));
            Committed::Yes
        }
        Err(error) => {
            let full = space::is_full(&error, path);
            let error = if full {
                StoreError::Full(format!(
                    "cannot commit to {} ({}): {error}",
                    path.display(),
                    space::describe_free(path)
                ))
            } else {
                StoreError::from(error)
            };
            // Under a full disk every batch fails the same way: the first
            // is logged by the caller's state change, the rest at debug.
            if full {
                log::debug!("store commit of {size} requests failed: {error}");
            } else {
                log::error!("store commit of {size} requests failed: {error}");
            }
            METRICS.store.commit_failures.inc();
            // Requests not yet applied when the transaction failed to open
            // are still in `batch`; they get the same answer.
            let unapplied = StoreError::Unavailable("not applied".into());
            for request in batch.drain(..) {
                pending.push(reply_only(request, &unapplied));
            }
            pending
                .into_iter()
                .for_each(|p| p(Some(&error), &mut tallies));
            if full {
                Committed::Full
            } else {
                Committed::Failed
            }
        }
    }
}

/// Runs `f` inside its own savepoint; an error (or a refusal) rolls back
/// just this request.
fn isolated<T, R>(
    tx: &rusqlite::Transaction<'_>,
    f: impl FnOnce(&mut Effects) -> StoreResult<Result<T, R>>,
) -> (StoreResult<Result<T, R>>, Effects) {
    let mut effects = Effects::default();
    let result = (|| {
        tx.execute_batch("SAVEPOINT one")?;
        let result = f(&mut effects);
        if !matches!(result, Ok(Ok(_))) {
            tx.execute_batch("ROLLBACK TO one")?;
            effects = Effects::default();
        }
        tx.execute_batch("RELEASE one")?;
        result
    })();
    (result, effects)
}

/// A plain write: `Ok` commits, `Err` rolls back.
fn isolated_write<T>(
    tx: &rusqlite::Transaction<'_>,
    f: impl FnOnce(&mut Effects) -> StoreResult<T>,
) -> (StoreResult<T>, Effects) {
    let (result, effects) = isolated(tx, |e| f(e).map(Ok::<T, std::convert::Infallible>));
    (
        result.map(|r| match r {
            Ok(v) => v,
        }),
        effects,
    )
}

fn apply(tx: &rusqlite::Transaction<'_>, request: StoreRequest) -> Deferred {
    use sandbox_statements as sql;
    let none = Effects::default;
    match request {
        StoreRequest::TouchWorkers { updates, reply } => {
            let (result, fx) = isolated_write(tx, |_| {
                for (id, at_ms) in &updates {
                    statements::touch_worker(tx, id, *at_ms)?;
                }
                Ok(())
            });
            defer(reply, result, fx)
        }
        StoreRequest::SaveHeartbeat {
            heartbeat,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |_| {
                let worker = statements::upsert_worker(tx, &heartbeat, now_ms)?;
                if let Some(entry) = &audit {
                    statements::insert_audit(tx, entry)?;
                }
                Ok(worker)
            });
            defer(reply, result, fx)
        }
        StoreRequest::SetWorkerStatus {
            id,
            status,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |_| {
                statements::set_worker_status(tx, &id, status, now_ms)
            });
            defer(reply, result, fx)
        }
        StoreRequest::DeleteWorker { id, audit, reply } => {
            let (result, fx) = isolated_write(tx, |_| {
                let deleted = statements::delete_worker(tx, &id)?;
                let outcome = if deleted == Deleted::Yes {
                    "ok"
                } else {
                    "NOT_FOUND"
                };
                statements::insert_audit(
                    tx,
                    &AuditEntry {
                        outcome: outcome.into(),
                        ..audit
                    },
                )?;
                Ok(deleted)
            });
            defer(reply, result, fx)
        }
        StoreRequest::RecordAudit { entry, reply } => {
            let (result, fx) = isolated_write(tx, |_| statements::insert_audit(tx, &entry));
            defer(reply, result, fx)
        }
        StoreRequest::ListWorkers { reply } => defer(reply, statements::list_workers(tx), none()),
        StoreRequest::StartSpawn {
            sandbox,
            lease_ttl_ms,
            idempotency_key,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                if let Some(key) = &idempotency_key {
                    if let Some(existing) = sql::get_idempotent(tx, key)? {
                        match sql::get_sandbox(tx, &existing)? {
                            Some(s) => return Ok(Ok(SpawnStart::Replayed(s))),
                            // Its sandbox was purged by retention: the key
                            // is spent, this spawn makes a new one.
                            None => sql::forget_idempotent(tx, &existing)?,
                        }
                    }
                }
                let current = sql::lease_to_acquire(tx, &sandbox.id)?;
                let lease = match leases::acquire(
                    current.as_ref(),
                    &sandbox.id,
                    "sandbox",
                    &sandbox.worker_id,
                    lease_ttl_ms,
                    sandbox.created_at_ms,
                ) {
                    Ok((lease, _)) => lease,
                    Err(e) => return Ok(Err(SandboxRefusal::Lease(e))),
                };
                sql::put_lease(tx, &lease)?;
                sql::insert_sandbox(tx, &sandbox)?;
                if let Some(key) = &idempotency_key {
                    sql::put_idempotent(tx, key, &sandbox.id, sandbox.created_at_ms)?;
                }
                fx.leases.push(lease.clone());
                fx.sandboxes.push((None, sandbox.clone()));
                Ok(Ok(SpawnStart::Started { sandbox, lease }))
            });
            defer(reply, result, fx)
        }
        StoreRequest::FinishSpawn {
            id,
            holder,
            ok,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                let Some(before) = sql::get_sandbox(tx, &id)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                // Only a spawn in progress can finish; anything else means
                // the record moved on and must not be overwritten.
                if before.state != SandboxState::Creating {
                    return Ok(Err(SandboxRefusal::NotLive(before.state)));
                }
                let state = if ok {
                    SandboxState::Running
                } else {
                    SandboxState::Error
                };
                let Some(after) = sql::set_sandbox_state(tx, &id, state, now_ms)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                if !ok {
                    release_if_held(tx, fx, &id, &holder, now_ms)?;
                    // A failed spawn is not a result to replay: a retry with
                    // the same Idempotency-Key tries again.
                    sql::forget_idempotent(tx, &id)?;
                }
                fx.sandboxes.push((Some(before), after.clone()));
                Ok(Ok(after))
            });
            defer(reply, result, fx)
        }
        StoreRequest::StartDestroy {
            id,
            holder,
            lease_ttl_ms,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                let Some(sandbox) = sql::get_sandbox(tx, &id)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                // Destroyed is gone; creating is a spawn in progress, which
                // finishes (or undoes itself) first.
                if matches!(
                    sandbox.state,
                    SandboxState::Destroyed | SandboxState::Creating
                ) {
                    return Ok(Err(SandboxRefusal::NotLive(sandbox.state)));
                }
                let current = sql::get_lease(tx, &id)?;
                let lease = match leases::acquire(
                    current.as_ref(),
                    &id,
                    "sandbox",
                    &holder,
                    lease_ttl_ms,
                    now_ms,
                ) {
                    Ok((lease, _)) => lease,
                    Err(e) => return Ok(Err(SandboxRefusal::Lease(e))),
                };
                sql::put_lease(tx, &lease)?;
                sql::put_destroy_intent(tx, &id, now_ms)?;
                fx.leases.push(lease.clone());
                Ok(Ok((sandbox, lease)))
            });
            defer(reply, result, fx)
        }
        StoreRequest::FinishDestroy {
            id,
            holder,
            now_ms,
            reply,
        } => {
            let (result, fx) = end_sandbox(tx, &id, &holder, SandboxState::Destroyed, now_ms);
            defer(reply, result, fx)
        }
        StoreRequest::MarkLost {
            id,
            holder,
            now_ms,
            reply,
        } => {
            let (result, fx) = end_sandbox(tx, &id, &holder, SandboxState::Lost, now_ms);
            defer(reply, result, fx)
        }
        StoreRequest::Extend {
            id,
            holder,
            expires_at_ms,
            lease_ttl_ms,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated(tx, |fx| {
                let Some(sandbox) = sql::get_sandbox(tx, &id)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                if !sandbox.state.is_live() {
                    return Ok(Err(SandboxRefusal::NotLive(sandbox.state)));
                }
                let current = sql::lease_to_acquire(tx, &id)?;
                let ttl = lease_ttl_ms.max(expires_at_ms - now_ms);
                let lease =
                    match leases::acquire(current.as_ref(), &id, "sandbox", &holder, ttl, now_ms) {
                        Ok((lease, _)) => lease,
                        Err(e) => return Ok(Err(SandboxRefusal::Lease(e))),
                    };
                sql::put_lease(tx, &lease)?;
                let Some(after) = sql::set_sandbox_expiry(tx, &id, expires_at_ms, now_ms)? else {
                    return Ok(Err(SandboxRefusal::NotFound));
                };
                fx.leases.push(lease);
                Ok(Ok(after))
            });
            defer(reply, result, fx)
        }
        StoreRequest::GetSandbox { id, reply } => defer(reply, sql::get_sandbox(tx, &id), none()),
        StoreRequest::DestroyIntents { reply } => defer(reply, sql::destroy_intents(tx), none()),
        StoreRequest::FindIdempotent { key, reply } => {
            let found = sql::get_idempotent(tx, &key).and_then(|id| match id {
                Some(id) => sql::get_sandbox(tx, &id),
                None => Ok(None),
            });
            defer(reply, found, none())
        }
        StoreRequest::ListSandboxes { reply } => defer(reply, sql::list_sandboxes(tx), none()),
        StoreRequest::ListExpired {
            now_ms,
            limit,
            owner,
            reply,
        } => defer(
            reply,
            sql::list_expired(tx, now_ms, limit, owner.as_deref()),
            none(),
        ),
        StoreRequest::ReclaimSandboxLeases {
            holder,
            ttl_ms,
            now_ms,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |fx| {
                let (reclaimed, taken) = sql::reclaim_sandbox_leases(tx, &holder, ttl_ms, now_ms)?;
                fx.leases.extend(taken);
                Ok(reclaimed)
            });
            defer(reply, result, fx)
        }
        StoreRequest::LiveCounts { reply } => defer(reply, sql::live_counts(tx), none()),
        StoreRequest::AcquireLease {
            resource_id,
            resource_type,
            holder,
            ttl_ms,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = change_lease(tx, &resource_id, audit.as_ref(), true, |current| {
                leases::acquire(
                    current,
                    &resource_id,
                    &resource_type,
                    &holder,
                    ttl_ms,
                    now_ms,
                )
            });
            defer(reply, result, fx)
        }
        StoreRequest::RenewLease {
            resource_id,
            holder,
            ttl_ms,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = change_lease(tx, &resource_id, audit.as_ref(), false, |current| {
                leases::renew(current, &holder, ttl_ms, now_ms).map(|l| (l, ()))
            });
            defer(reply, result.map(|r| r.map(|(lease, ())| lease)), fx)
        }
        StoreRequest::ReleaseLease {
            resource_id,
            holder,
            now_ms,
            audit,
            reply,
        } => {
            let (result, fx) = change_lease(tx, &resource_id, audit.as_ref(), false, |current| {
                leases::release(current, &holder, now_ms).map(|l| (l, ()))
            });
            // Giving the lease back ends a destroy that did not happen.
            let result = match result {
                Ok(Ok(done)) => sql::forget_destroy_intent(tx, &resource_id).map(|()| Ok(done)),
                other => other,
            };
            defer(reply, result.map(|r| r.map(|(lease, ())| lease)), fx)
        }
        StoreRequest::GetLease { resource_id, reply } => {
            defer(reply, sql::get_lease(tx, &resource_id), none())
        }
        StoreRequest::ListLeases { reply } => defer(reply, sql::list_leases(tx), none()),
        StoreRequest::SaveTemplate {
            template,
            now_ms,
            reply,
        } => {
            let (result, fx) =
                isolated_write(tx, |_| template_statements::save(tx, &template, now_ms));
            defer(reply, result, fx)
        }
        StoreRequest::GetTemplate { owner, name, reply } => {
            defer(reply, template_statements::get(tx, &owner, &name), none())
        }
        StoreRequest::ListTemplates { owner, reply } => {
            defer(reply, template_statements::list(tx, &owner), none())
        }
        StoreRequest::DeleteTemplate { owner, name, reply } => {
            let (result, fx) =
                isolated_write(tx, |_| template_statements::delete(tx, &owner, &name));
            defer(reply, result, fx)
        }
        StoreRequest::RenewSandboxLeases {
            holder,
            ttl_ms,
            now_ms,
            limit,
            reply,
        } => {
            let (result, fx) = isolated_write(tx, |fx| {
                let renewed = sql::renew_live_sandbox_leases(tx, &holder, ttl_ms, now_ms, limit)?;
                for (resource_id, expires_at_ms) in &renewed {
                    fx.leases
                        .push(tally_lease(resource_id.clone(), &holder, *expires_at_ms));
                }
                Ok(renewed.len())
            });
            defer(reply, result, fx)
        }
        StoreRequest::Ping { reply } => defer(reply, Ok(()), none()),
    }
}

/// A lease rule's answer: the store's error, or the rule's own refusal.
type LeaseOutcome<T> = StoreResult<Result<T, LeaseError>>;

/// Applies one lease rule to the stored lease of `resource_id`: on success
/// the new lease (and `audit`, if any) is written in the request's
/// savepoint; a refusal writes nothing. An `acquiring` rule starts above
/// the generation floor where no row exists.
fn change_lease<T>(
    tx: &rusqlite::Transaction<'_>,
    resource_id: &str,
    audit: Option<&AuditEntry>,
    acquiring: bool,
    rule: impl FnOnce(Option<&Lease>) -> Result<(Lease, T), LeaseError>,
) -> (LeaseOutcome<(Lease, T)>, Effects) {
    isolated(tx, |fx| {
        let current = if acquiring {
            sandbox_statements::lease_to_acquire(tx, resource_id)?
        } else {
            sandbox_statements::get_lease(tx, resource_id)?
        };
        match rule(current.as_ref()) {
            Ok((lease, extra)) => {
                sandbox_statements::put_lease(tx, &lease)?;
                if let Some(entry) = audit {
                    statements::insert_audit(tx, entry)?;
                }
                fx.leases.push(lease.clone());
                Ok(Ok((lease, extra)))
            }
            Err(e) => Ok(Err(e)),
        }
    })
}

/// A lease as far as the tallies care: who holds it until when.
fn tally_lease(resource_id: String, holder: &str, expires_at_ms: i64) -> Lease {
    Lease {
        resource_id,
        resource_type: String::new(),
        holder_id: holder.to_owned(),
        generation: 1,
        acquired_at_ms: 0,
        renewed_at_ms: 0,
        expires_at_ms,
        transitions: 0,
    }
}

/// Destroyed or lost: the state change and the lease release commit together.
fn end_sandbox(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    holder: &str,
    state: SandboxState,
    now_ms: i64,
) -> (Outcome<Sandbox>, Effects) {
    use sandbox_statements as sql;
    isolated(tx, |fx| {
        let Some(before) = sql::get_sandbox(tx, id)? else {
            return Ok(Err(SandboxRefusal::NotFound));
        };
        let current = sql::get_lease(tx, id)?;
        if let Err(e) = leases::check_holder(current.as_ref(), holder, now_ms) {
            return Ok(Err(SandboxRefusal::Lease(e)));
        }
        let Some(after) = sql::set_sandbox_state(tx, id, state, now_ms)? else {
            return Ok(Err(SandboxRefusal::NotFound));
        };
        release_if_held(tx, fx, id, holder, now_ms)?;
        sql::forget_destroy_intent(tx, id)?;
        fx.sandboxes.push((Some(before), after.clone()));
        Ok(Ok(after))
    })
}

fn release_if_held(
    tx: &rusqlite::Transaction<'_>,
    fx: &mut Effects,
    id: &str,
    holder: &str,
    now_ms: i64,
) -> StoreResult<()> {
    let current = sandbox_statements::get_lease(tx, id)?;
    if let Ok(released) = leases::release(current.as_ref(), holder, now_ms) {
        sandbox_statements::put_lease(tx, &released)?;
        fx.leases.push(released);
    }
    Ok(())
}

/// Answers a request that was never applied with `error`.
fn reply_only(request: StoreRequest, error: &StoreError) -> Deferred {
    fn fail<T: Send + 'static>(reply: Sender<StoreResult<T>>, error: &StoreError) -> Deferred {
        defer(reply, Err(error.clone()), Effects::default())
    }
    match request {
        StoreRequest::SaveHeartbeat { reply, .. } => fail(reply, error),
        StoreRequest::SetWorkerStatus { reply, .. } => fail(reply, error),
        StoreRequest::DeleteWorker { reply, .. } => fail(reply, error),
        StoreRequest::TouchWorkers { reply, .. } => fail(reply, error),
        StoreRequest::RecordAudit { reply, .. } | StoreRequest::Ping { reply } => {
            fail(reply, error)
        }
        StoreRequest::ListWorkers { reply } => fail(reply, error),
        StoreRequest::StartSpawn { reply, .. } => fail(reply, error),
        StoreRequest::FinishSpawn { reply, .. }
        | StoreRequest::FinishDestroy { reply, .. }
        | StoreRequest::Extend { reply, .. }
        | StoreRequest::MarkLost { reply, .. } => fail(reply, error),
        StoreRequest::StartDestroy { reply, .. } => fail(reply, error),
        StoreRequest::GetSandbox { reply, .. } | StoreRequest::FindIdempotent { reply, .. } => {
            fail(reply, error)
        }
        StoreRequest::DestroyIntents { reply } => fail(reply, error),
        StoreRequest::ListSandboxes { reply } | StoreRequest::ListExpired { reply, .. } => {
            fail(reply, error)
        }
        StoreRequest::ReclaimSandboxLeases { reply, .. } => fail(reply, error),
        StoreRequest::LiveCounts { reply } => fail(reply, error),
        StoreRequest::AcquireLease { reply, .. } => fail(reply, error),
        StoreRequest::RenewLease { reply, .. } | StoreRequest::ReleaseLease { reply, .. } => {
            fail(reply, error)
        }
        StoreRequest::GetLease { reply, .. } => fail(reply, error),
        StoreRequest::ListLeases { reply } => fail(reply, error),
        StoreRequest::RenewSandboxLeases { reply, .. } => fail(reply, error),
        StoreRequest::SaveTemplate { reply, .. } => fail(reply, error),
        StoreRequest::GetTemplate { reply, .. } => fail(reply, error),
        StoreRequest::ListTemplates { reply, .. } => fail(reply, error),
        StoreRequest::DeleteTemplate { reply, .. } => fail(reply, error),
    }
}

/// The `store-checkpoint` thread: PASSIVE checkpoints from a second
/// connection on a timer, so checkpoint work never runs inside a commit.
/// A pass that leaves the WAL unreset, by at most [`FINISH_MAX_FRAMES`]
/// frames, is handed to the store thread to finish (see the module notes).
pub struct Checkpointer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    fn start(
        path: &Path,
        interval: Duration,
        finish: Arc<AtomicBool>,
    ) -> Result<Checkpointer, String> {
        let conn = Connection::open(path).map_err(|e| format!("checkpoint connection: {e}"))?;
        conn.busy_timeout(Duration::from_millis(100))
            .map_err(|e| e.to_string())?;
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                let ticks = crossbeam_channel::tick(interval);
                loop {
                    crossbeam_channel::select! {
                        recv(stopped) -> _ => break,
                        recv(ticks) -> _ => {
                            // Even a pass that copied every frame it saw
                            // leaves the WAL unreset when a commit landed
                            // meanwhile (the usual case under steady
                            // writes): the store thread's own pass is then
                            // a few frames, or nothing when idle.
                            if let Some((log_frames, left)) = checkpoint(&conn, Checkpoint::Pass)
                                && log_frames > 0
                                && left <= FINISH_MAX_FRAMES
                            {
                                finish.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                }
                // One more PASSIVE checkpoint at shutdown, after the last commits.
                checkpoint(&conn, Checkpoint::Pass);
            })
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Checkpointer { stop, thread })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Who runs a checkpoint: the checkpoint thread's timed pass, or the store
/// thread finishing one between batches.
#[derive(Clone, Copy, Debug)]
enum Checkpoint {
    Pass,
    Finish,
}

/// Whether the last checkpoint failed (its warning is not repeated).
static CHECKPOINT_FAILING: AtomicBool = AtomicBool::new(false);

/// Runs a PASSIVE checkpoint; returns the WAL's frames when it started and
/// how many of them it left uncopied (None when it failed).
fn checkpoint(conn: &Connection, kind: Checkpoint) -> Option<(i64, i64)> {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        Ok((log_frames, done)) => {
            if CHECKPOINT_FAILING.swap(false, Ordering::Relaxed) {
                log::info!("WAL checkpoints succeed again");
            }
            match kind {
                Checkpoint::Pass => METRICS.store.checkpoints.inc(),
                Checkpoint::Finish => METRICS.store.checkpoint_finishes.inc(),
            }
            if log_frames > 0 {
                log::trace!(
                    "checkpoint ({kind:?}): {done}/{log_frames} frames in {:?}",
                    started.elapsed()
                );
            }
            Some((log_frames, log_frames - done))
        }
        Err(e) => {
            // Once per streak: under a full disk every pass fails alike.
            if !CHECKPOINT_FAILING.swap(true, Ordering::Relaxed) {
                log::warn!("WAL checkpoint ({kind:?}) failed: {e}");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached count always equals what `figures` counts, across lease
    /// changes, expiries and a wall clock stepped back.
    #[test]
    fn held_leases_match_the_full_count() {
        let mut t = Tallies::default();
        let check = |t: &mut Tallies, now: i64| {
            let full = t
                .figures(now)
                .leases_by_holder
                .get("me")
                .copied()
                .unwrap_or(0);
            assert_eq!(t.held("me", now), full, "at {now}");
            // Asked twice: the cached answer is the same.
            assert_eq!(t.held("me", now), full, "cached at {now}");
        };
        check(&mut t, 0);
        t.lease(&tally_lease("a".into(), "me", 100));
        t.lease(&tally_lease("b".into(), "me", 200));
        t.lease(&tally_lease("c".into(), "other", 150));
        for now in [0, 50, 99, 100, 150, 199, 200, 250] {
            check(&mut t, now);
        }
        // The clock steps back: expired leases count again.
        check(&mut t, 10);
        assert_eq!(t.held("me", 10), 2);
        // A renew, a release and a new holder each change the count.
        t.lease(&tally_lease("a".into(), "me", 1_000));
        check(&mut t, 300);
        assert_eq!(t.held("me", 300), 1);
        t.lease(&tally_lease("a".into(), "", 1_000));
        check(&mut t, 300);
        t.lease(&tally_lease("c".into(), "me", 1_000));
        check(&mut t, 300);
        assert_eq!(t.held("me", 300), 1);
        assert_eq!(t.held("other", 300), 0);
        check(&mut t, 300);
    }

    fn temp_db(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stacyvmd-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("t.db")
    }

    fn config(path: &Path) -> StoreConfig {
        StoreConfig {
            data_dir: path.parent().unwrap().to_path_buf(),
            path: path.to_path_buf(),
            checkpoint_interval: Duration::from_millis(50),
            wal_size_limit: 1 << 20,
            max_batch: 64,
            reserve_bytes: 1 << 16,
            retention: Duration::from_secs(7 * 86_400),
        }
    }

    #[test]
    fn concurrent_writes_are_group_committed_and_durable() {
        let path = temp_db("group");
        let (notifier, _events) = crate::daemon::ExitNotifier::for_tests();
        let store = open(&config(&path), notifier).unwrap();
        let writers: Vec<_> = (0..8)
            .map(|t| {
                let h = store.handle.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let hb = Heartbeat {
                            id: format!("w-{t}-{i}"),
                            ..Default::default()
                        };
                        h.save_heartbeat(hb, 1000 + i, None).unwrap();
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(store.handle.list_workers().unwrap().len(), 400);
        // A fresh connection (as after a crash) sees every acknowledged write.
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM workers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 400);
    }

    /// The WAL header's salts; SQLite draws new ones each time it resets
    /// the WAL (starts writing it again from its beginning).
    fn wal_salts(db: &Path) -> Option<[u8; 8]> {
        let header = std::fs::read(wal_path(db)).ok()?;
        header.get(16..24)?.try_into().ok()
    }

    #[test]
    fn the_wal_is_reset_under_steady_writes() {
        let path = temp_db("walreset");
        let (notifier, _events) = crate::daemon::ExitNotifier::for_tests();
        let store = open(&config(&path), notifier).unwrap();
        let write = |h: &StoreHandle, id: &str, i: i64| {
            let hb = Heartbeat {
                id: id.into(),
                ..Default::default()
            };
            h.save_heartbeat(hb, i, None).unwrap();
        };
        write(&store.handle, "w", 0);
        // Three writers keep the store thread busy without a pause, so the
        // checkpoint thread alone (a pass every 50 ms here) almost never
        // finds the WAL fully copied; this one watches the WAL's salts
        // between its own writes for half a second (or 20,000 writes).
        let done = Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..3)
            .map(|t| {
                let (h, done) = (store.handle.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !done.load(Ordering::Relaxed) && i < 100_000 {
                        write(&h, &format!("busy-{t}"), i);
                        i += 1;
                    }
                })
            })
            .collect();
        let mut salts = wal_salts(&path).expect("a WAL after the first commit");
        let mut resets = 0;
        let started = Instant::now();
        for i in 1..20_000 {
            write(&store.handle, "w", i);
            let now = wal_salts(&path).expect("the WAL");
            if now != salts {
                resets += 1;
                salts = now;
            }
            if started.elapsed() >= Duration::from_millis(500) {
                break;
            }
        }
        let elapsed = started.elapsed();
        done.store(true, Ordering::Relaxed);
        busy.into_iter().for_each(|b| b.join().unwrap());
        // About one reset per checkpoint pass; without the store thread's
        // share, a few in hundreds of passes (measured: 3 in 50 s).
        let passes = (elapsed.as_millis() / 50) as usize;
        assert!(passes >= 4, "only {elapsed:?} of writes");
        assert!(
            resets * 4 >= passes,
            "the WAL was reset {resets} times in {elapsed:?} ({passes} checkpoint passes)"
        );
    }

    #[test]
    fn one_failing_write_does_not_undo_its_batch_mates() {
        let path = temp_db("savepoint");
        let (notifier, _events) = crate::daemon::ExitNotifier::for_tests();
        let store = open(&config(&path), notifier).unwrap();
        let h = store.handle.clone();
        h.save_heartbeat(
            Heartbeat {
                id: "a".into(),
                ..Default::default()
            },
            1,
            None,
        )
        .unwrap();
        // Status of an unknown worker: Ok(None), nothing written.
        assert_eq!(
            h.set_worker_status("nope", WorkerStatus::Offline, 2)
                .unwrap(),
            None
        );
        let audit = AuditEntry::new(3, "admin", "req-1", "worker.delete", "a", "");
        assert_eq!(h.delete_worker("a", audit.clone()).unwrap(), Deleted::Yes);
        assert_eq!(h.delete_worker("a", audit).unwrap(), Deleted::NotFound);
        let conn = Connection::open(&path).unwrap();
        let audits: Vec<String> = conn
            .prepare("SELECT outcome FROM admin_audit ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(audits, vec!["ok", "NOT_FOUND"]);
    }

    #[test]
    fn heartbeat_keeps_created_at_and_unsent_fields() {
        let path = temp_db("upsert");
        let (notifier, _events) = crate::daemon::ExitNotifier::for_tests();
        let store = open(&config(&path), notifier).unwrap();
        let h = store.handle.clone();
        let first = Heartbeat {
            id: "w".into(),
            hostname: Some("host-a".into()),
            providers: Some(vec!["mock".into()]),
            capacity: Some(crate::workers::Capacity {
                max_sandboxes: Some(4),
            }),
            ..Default::default()
        };
        let a = h.save_heartbeat(first, 1000, None).unwrap();
        let b = h
            .save_heartbeat(
                Heartbeat {
                    id: "w".into(),
                    ..Default::default()
                },
                2000,
                None,
            )
            .unwrap();
        assert_eq!(b.created_at_ms, a.created_at_ms);
        assert_eq!(b.updated_at_ms, 2000);
        assert_eq!(b.last_heartbeat_ms, 2000);
        assert_eq!(b.hostname, "host-a");
        assert_eq!(b.providers, vec!["mock"]);
        assert_eq!(b.capacity.max_sandboxes, Some(4));
        assert_eq!(b.status, WorkerStatus::Online);
    }
}
