//! The store contract: what the rest of the daemon may ask of the durable
//! state, and what a backend must provide to answer it.
//!
//! - [`StoreRequest`]: one variant per operation, each with its reply
//!   sender; [`StoreHandle`] (handle.rs) sends them with a deadline.
//! - [`StoreError`]: what a caller can see go wrong.
//! - [`Tx`]: the small transaction trait. The rules (rules.rs: leases,
//!   sandboxes, workers, audit, templates) are written once against it; a
//!   backend implements statements, not rules.
//! - [`Tallies`] (tallies.rs): the in-memory mirror of committed lease
//!   holders and sandbox counts, kept by the single writer.
//!
//! The SQLite backend (sqlite/) runs the `store` thread: group commit of
//! many requests in one transaction, each in its own savepoint, replies
//! only after COMMIT. docs/store.md writes the contract down: what is
//! atomic with what, which effects wait for COMMIT, and the single-writer
//! assumptions (the tallies, the `flock`, the scheduler's reservations).
//!
//! Invariants: one writer per database; every reply is sent after COMMIT
//! returned; the inbox is bounded, so overload is an `Unavailable` error at
//! the caller, never an unbounded queue.

mod handle;
mod rules;
pub mod sqlite;
mod tallies;

use std::collections::HashSet;

use crossbeam_channel::Sender;

use crate::leases::{Acquired, Lease, LeaseError};
use crate::sandboxes::{Sandbox, SandboxState};
use crate::templates::{Saved, Template};
use crate::workers::{Heartbeat, Worker, WorkerStatus};

pub use handle::{Health, StoreHandle};
pub use sqlite::open::open;
pub use sqlite::space;
pub use sqlite::{Checkpointer, OpenError, Store, full_at_start};
pub use tallies::{Tallies, TallyFigures};

/// What a caller can see go wrong. Cloned into every reply of a batch whose
/// COMMIT failed, so it carries the cause's text (the backend logs the
/// cause itself once, where it happened).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The store thread is gone, overloaded or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the operation; nothing from it was committed.
    #[error("store error: {0}")]
    Database(String),
    /// The filesystem holding the database is full: nothing from the
    /// operation was committed, and the store retries by itself as soon as
    /// space returns.
    #[error("storage full: {0}")]
    Full(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One admin mutation for the `admin_audit` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// Which credential acted (`admin-key#2`, `open-access`), never the key.
    pub actor: String,
    pub request_id: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
}

impl AuditEntry {
    pub fn new(
        at_ms: i64,
        actor: &str,
        request_id: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> AuditEntry {
        AuditEntry {
            at_ms,
            actor: actor.to_owned(),
            request_id: request_id.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: "ok".to_owned(),
            detail: detail.to_owned(),
        }
    }
}

/// A live sandbox as startup reconciliation needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSandbox {
    pub id: String,
    pub state: SandboxState,
    pub provider: String,
    pub owner_id: String,
}

/// What startup reclaim found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reclaimed {
    /// The holder's live sandboxes, in no particular order.
    pub live: Vec<LiveSandbox>,
    /// (resource_id, other holder) for the live sandboxes whose lease
    /// another holder has unexpired: left alone.
    pub conflicts: Vec<(String, String)>,
}

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
        template: Template,
        now_ms: i64,
        reply: Sender<StoreResult<Saved>>,
    },
    GetTemplate {
        owner: String,
        name: String,
        reply: Sender<StoreResult<Option<Template>>>,
    },
    ListTemplates {
        owner: String,
        reply: Sender<StoreResult<Vec<Template>>>,
    },
    DeleteTemplate {
        owner: String,
        name: String,
        reply: Sender<StoreResult<bool>>,
    },
}

/// The statements the rules need, inside one open transaction of the
/// backend. Every method is one statement (or one small, fixed group of
/// them) with no policy of its own: the rules decide what to write, a
/// backend only how. A method's error means the transaction can still be
/// rolled back to the last savepoint.
pub trait Tx {
    /// Opens the savepoint one request runs in (never nested).
    fn savepoint(&self) -> StoreResult<()>;
    /// Undoes everything since [`Tx::savepoint`].
    fn rollback_to_savepoint(&self) -> StoreResult<()>;
    /// Ends the savepoint (its writes stay in the transaction).
    fn release_savepoint(&self) -> StoreResult<()>;

    // Workers and audit.
    /// Insert or refresh; absent heartbeat fields keep the stored value,
    /// `created_at` is never touched by an update.
    fn upsert_worker(&self, heartbeat: &Heartbeat, now_ms: i64) -> StoreResult<Worker>;
    fn set_worker_status(
        &self,
        id: &str,
        status: WorkerStatus,
        now_ms: i64,
    ) -> StoreResult<Option<Worker>>;
    /// Moves `last_heartbeat` forward only.
    fn touch_worker(&self, id: &str, at_ms: i64) -> StoreResult<()>;
    fn delete_worker(&self, id: &str) -> StoreResult<Deleted>;
    fn list_workers(&self) -> StoreResult<Vec<Worker>>;
    fn insert_audit(&self, entry: &AuditEntry) -> StoreResult<()>;

    // Sandboxes.
    fn insert_sandbox(&self, sandbox: &Sandbox) -> StoreResult<()>;
    fn get_sandbox(&self, id: &str) -> StoreResult<Option<Sandbox>>;
    /// The record after the change; `None` when there is none.
    fn set_sandbox_state(
        &self,
        id: &str,
        state: SandboxState,
        now_ms: i64,
    ) -> StoreResult<Option<Sandbox>>;
    fn set_sandbox_expiry(
        &self,
        id: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Option<Sandbox>>;
    fn list_sandboxes(&self) -> StoreResult<Vec<Sandbox>>;
    /// Live sandboxes past their expiry, soonest first, at most `limit`;
    /// `owner` as in [`StoreRequest::ListExpired`].
    fn list_expired(
        &self,
        now_ms: i64,
        limit: usize,
        owner: Option<&str>,
    ) -> StoreResult<Vec<Sandbox>>;
    /// (worker, owner, live sandboxes).
    fn live_counts(&self) -> StoreResult<Vec<(String, String, u32)>>;
    /// `worker`'s live sandboxes, in no particular order.
    fn live_sandboxes_of(&self, worker: &str) -> StoreResult<Vec<LiveSandbox>>;
    /// The sandbox id a spawn with this idempotency key created.
    fn get_idempotent(&self, key: &str) -> StoreResult<Option<String>>;
    fn put_idempotent(&self, key: &str, sandbox_id: &str, now_ms: i64) -> StoreResult<()>;
    /// Forgets every idempotency key of `sandbox_id`.
    fn forget_idempotent(&self, sandbox_id: &str) -> StoreResult<()>;
    fn put_destroy_intent(&self, sandbox_id: &str, now_ms: i64) -> StoreResult<()>;
    fn forget_destroy_intent(&self, sandbox_id: &str) -> StoreResult<()>;
    fn destroy_intents(&self) -> StoreResult<Vec<String>>;

    // Leases.
    fn get_lease(&self, resource_id: &str) -> StoreResult<Option<Lease>>;
    /// Insert or replace the whole lease row.
    fn put_lease(&self, lease: &Lease) -> StoreResult<()>;
    fn list_leases(&self) -> StoreResult<Vec<Lease>>;
    /// The highest generation of any lease row removed by retention (0:
    /// none): a lease made where no row exists starts above it.
    fn generation_floor(&self) -> StoreResult<u64>;
    /// Resources whose lease `holder` holds unexpired at `now_ms`.
    fn held_lease_ids(&self, holder: &str, now_ms: i64) -> StoreResult<HashSet<String>>;
    /// Sets `renewed_at = now_ms, expires_at = now_ms + ttl_ms` on at most
    /// `limit` leases `holder` holds unexpired on its own live sandboxes
    /// and that expire before `now_ms + ttl_ms`, soonest expiry first;
    /// answers the (resource_id, expires_at) pairs it changed. One bulk
    /// statement, because background renewal touches every lease.
    fn renew_live_sandbox_leases(
        &self,
        holder: &str,
        ttl_ms: i64,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>>;

    // Templates.
    fn template_exists(&self, owner: &str, name: &str) -> StoreResult<bool>;
    fn count_templates(&self, owner: &str) -> StoreResult<u64>;
    /// Insert or replace, keeping `created_at` of the one it replaces.
    fn upsert_template(&self, template: &Template, now_ms: i64) -> StoreResult<()>;
    /// `owner`'s template `name`, else nobody's.
    fn get_template(&self, owner: &str, name: &str) -> StoreResult<Option<Template>>;
    /// `owner`'s templates and nobody's, by name (the owner's first on a tie).
    fn list_templates(&self, owner: &str) -> StoreResult<Vec<Template>>;
    /// Deletes `owner`'s own template `name`; whether there was one.
    fn delete_template(&self, owner: &str, name: &str) -> StoreResult<bool>;
}
