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
//! Invariants: nothing else opens a write connection; every reply is sent
//! after COMMIT returned; the inbox is bounded, so overload is an
//! `Unavailable` error at the caller, never an unbounded queue.

pub mod migrate;
mod statements;

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use rusqlite::Connection;

use crate::config::StoreConfig;
use crate::metrics::METRICS;
use crate::workers::{Heartbeat, Worker, WorkerStatus};

pub use statements::AuditEntry;

/// How long a caller waits for a reply before it calls the store unavailable.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);
const INBOX_CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    /// The store thread is gone, overloaded or did not answer in time.
    Unavailable(String),
    /// SQLite refused the operation; nothing from it was committed.
    Database(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Database(why) => write!(f, "store error: {why}"),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Outcome of deleting a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Yes,
    NotFound,
}

pub enum StoreRequest {
    /// Upsert from a heartbeat (keeps `created_at`), with an optional audit
    /// row in the same transaction.
    SaveHeartbeat {
        heartbeat: Heartbeat,
        now_ms: i64,
        audit: Option<AuditEntry>,
        reply: Sender<StoreResult<Worker>>,
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
    GetWorker {
        id: String,
        reply: Sender<StoreResult<Option<Worker>>>,
    },
    ListWorkers {
        reply: Sender<StoreResult<Vec<Worker>>>,
    },
    Ping {
        reply: Sender<StoreResult<()>>,
    },
}

/// Cloneable access to the store thread: one blocking method per request.
#[derive(Clone)]
pub struct StoreHandle {
    inbox: Sender<StoreRequest>,
    path: PathBuf,
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

    pub fn get_worker(&self, id: &str) -> StoreResult<Option<Worker>> {
        self.call(|reply| StoreRequest::GetWorker {
            id: id.to_owned(),
            reply,
        })
    }

    pub fn list_workers(&self) -> StoreResult<Vec<Worker>> {
        self.call(|reply| StoreRequest::ListWorkers { reply })
    }

    /// Round trip through the store thread, for readiness and diagnostics.
    pub fn ping(&self) -> StoreResult<Duration> {
        let started = Instant::now();
        self.call(|reply| StoreRequest::Ping { reply })?;
        Ok(started.elapsed())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the WAL file right now (0 when it does not exist).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(wal_path(&self.path))
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The opened store: its handle and the threads to join at shutdown.
pub struct Store {
    pub handle: StoreHandle,
    pub thread: JoinHandle<()>,
    pub checkpointer: Checkpointer,
}

/// Opens (creating if needed) the database, applies migrations on the
/// calling thread so that a failure stops startup before READY, then starts
/// the store and checkpoint threads.
pub fn open(config: &StoreConfig, on_exit: crate::daemon::ExitNotifier) -> Result<Store, String> {
    if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    }
    let mut conn = Connection::open(&config.path)
        .map_err(|e| format!("cannot open {}: {e}", config.path.display()))?;
    configure_writer(&conn, config.wal_size_limit)
        .map_err(|e| format!("cannot configure {}: {e}", config.path.display()))?;
    migrate::migrate(&mut conn, crate::time::now_ms()).map_err(|e| e.to_string())?;

    let (inbox, requests) = bounded(INBOX_CAPACITY);
    let max_batch = config.max_batch;
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || {
            let _exit = on_exit.guard("store");
            run(conn, requests, max_batch);
        })
        .map_err(|e| format!("cannot start the store thread: {e}"))?;
    let checkpointer = Checkpointer::start(&config.path, config.checkpoint_interval)?;
    Ok(Store {
        handle: StoreHandle {
            inbox,
            path: config.path.clone(),
        },
        thread,
        checkpointer,
    })
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

/// The store thread's loop. Returns when every handle is dropped.
fn run(mut conn: Connection, requests: Receiver<StoreRequest>, max_batch: usize) {
    let mut batch: Vec<StoreRequest> = Vec::with_capacity(max_batch);
    while let Ok(first) = requests.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch);
    }
    log::debug!("store thread: inbox closed, exiting");
}

/// A reply held back until the batch's COMMIT has returned.
enum Pending {
    Worker(Sender<StoreResult<Worker>>, StoreResult<Worker>),
    MaybeWorker(
        Sender<StoreResult<Option<Worker>>>,
        StoreResult<Option<Worker>>,
    ),
    Workers(Sender<StoreResult<Vec<Worker>>>, StoreResult<Vec<Worker>>),
    Deleted(Sender<StoreResult<Deleted>>, StoreResult<Deleted>),
    Unit(Sender<StoreResult<()>>, StoreResult<()>),
}

impl Pending {
    fn fail(self, error: &StoreError) {
        // A failed COMMIT turns every answer into that error: nothing of the
        // batch is durable, so nothing may be acknowledged.
        match self {
            Pending::Worker(tx, _) => drop(tx.send(Err(error.clone()))),
            Pending::MaybeWorker(tx, _) => drop(tx.send(Err(error.clone()))),
            Pending::Workers(tx, _) => drop(tx.send(Err(error.clone()))),
            Pending::Deleted(tx, _) => drop(tx.send(Err(error.clone()))),
            Pending::Unit(tx, _) => drop(tx.send(Err(error.clone()))),
        }
    }

    fn send(self) {
        // A caller that gave up waiting dropped its receiver; that is fine.
        match self {
            Pending::Worker(tx, r) => drop(tx.send(r)),
            Pending::MaybeWorker(tx, r) => drop(tx.send(r)),
            Pending::Workers(tx, r) => drop(tx.send(r)),
            Pending::Deleted(tx, r) => drop(tx.send(r)),
            Pending::Unit(tx, r) => drop(tx.send(r)),
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &mut Vec<StoreRequest>) {
    let started = Instant::now();
    let size = batch.len();
    let mut pending = Vec::with_capacity(size);
    let outcome = (|| -> StoreResult<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for request in batch.drain(..) {
            pending.push(apply(&tx, request));
        }
        tx.commit()?;
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            METRICS.store.observe_commit(size, started.elapsed());
            pending.into_iter().for_each(Pending::send);
        }
        Err(error) => {
            log::error!("store commit of {size} requests failed: {error}");
            METRICS.store.commit_failures.inc();
            // Requests not yet applied when the transaction failed to open
            // are still in `batch`; answer them too.
            for request in batch.drain(..) {
                pending.push(apply_nothing(request));
            }
            pending.into_iter().for_each(|p| p.fail(&error));
        }
    }
}

/// Runs one request inside its own savepoint; a failing write rolls back
/// alone and is answered with its error.
fn apply(tx: &rusqlite::Transaction<'_>, request: StoreRequest) -> Pending {
    fn isolated<T>(
        tx: &rusqlite::Transaction<'_>,
        f: impl FnOnce() -> StoreResult<T>,
    ) -> StoreResult<T> {
        tx.execute_batch("SAVEPOINT one")?;
        let result = f();
        if result.is_err() {
            tx.execute_batch("ROLLBACK TO one")?;
        }
        tx.execute_batch("RELEASE one")?;
        result
    }
    match request {
        StoreRequest::SaveHeartbeat {
            heartbeat,
            now_ms,
            audit,
            reply,
        } => {
            let result = isolated(tx, || {
                let worker = statements::upsert_worker(tx, &heartbeat, now_ms)?;
                if let Some(entry) = &audit {
                    statements::insert_audit(tx, entry)?;
                }
                Ok(worker)
            });
            Pending::Worker(reply, result)
        }
        StoreRequest::SetWorkerStatus {
            id,
            status,
            now_ms,
            reply,
        } => {
            let result = isolated(tx, || {
                statements::set_worker_status(tx, &id, status, now_ms)
            });
            Pending::MaybeWorker(reply, result)
        }
        StoreRequest::DeleteWorker { id, audit, reply } => {
            let result = isolated(tx, || {
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
            Pending::Deleted(reply, result)
        }
        StoreRequest::RecordAudit { entry, reply } => {
            Pending::Unit(reply, isolated(tx, || statements::insert_audit(tx, &entry)))
        }
        StoreRequest::GetWorker { id, reply } => {
            Pending::MaybeWorker(reply, statements::get_worker(tx, &id))
        }
        StoreRequest::ListWorkers { reply } => {
            Pending::Workers(reply, statements::list_workers(tx))
        }
        StoreRequest::Ping { reply } => Pending::Unit(reply, Ok(())),
    }
}

/// The reply slot of a request that was never applied.
fn apply_nothing(request: StoreRequest) -> Pending {
    fn none<T>() -> StoreResult<T> {
        Err(StoreError::Unavailable("not applied".into()))
    }
    match request {
        StoreRequest::SaveHeartbeat { reply, .. } => Pending::Worker(reply, none()),
        StoreRequest::SetWorkerStatus { reply, .. } | StoreRequest::GetWorker { reply, .. } => {
            Pending::MaybeWorker(reply, none())
        }
        StoreRequest::DeleteWorker { reply, .. } => Pending::Deleted(reply, none()),
        StoreRequest::RecordAudit { reply, .. } | StoreRequest::Ping { reply } => {
            Pending::Unit(reply, none())
        }
        StoreRequest::ListWorkers { reply } => Pending::Workers(reply, none()),
    }
}

/// The `store-checkpoint` thread: PASSIVE checkpoints from a second
/// connection on a timer, so checkpoint work never runs inside a commit.
pub struct Checkpointer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path, interval: Duration) -> Result<Checkpointer, String> {
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
                        recv(ticks) -> _ => checkpoint(&conn),
                    }
                }
                // A last full checkpoint at shutdown leaves a small WAL behind.
                checkpoint(&conn);
            })
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Checkpointer { stop, thread })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn checkpoint(conn: &Connection) {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        Ok((log_frames, done)) => {
            METRICS.store.checkpoints.inc();
            if log_frames > 0 {
                log::trace!(
                    "checkpoint: {done}/{log_frames} frames in {:?}",
                    started.elapsed()
                );
            }
        }
        Err(e) => log::warn!("WAL checkpoint failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
