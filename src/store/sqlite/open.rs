//! Opening the SQLite store: the data directory, the `flock` that makes
//! this process the database's only writer, private file modes, the
//! disk-full reserve, the writer connection's pragmas, migrations (on the
//! calling thread, before READY), the tallies loaded from the committed
//! rows, and the `store` and `store-checkpoint` threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use rusqlite::Connection;

use super::batch::{Writer, run};
use super::checkpoint::Checkpointer;
use super::{migrate, retention, sandbox_statements, space};
use crate::config::StoreConfig;
use crate::store::{Health, StoreHandle, StoreResult, Tallies};

const INBOX_CAPACITY: usize = 4096;

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

/// Why the store could not open. The message is the whole story (what,
/// where, and the cause's text): the supervisor prints it once and exits.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The filesystem has no room for the reserve or the first writes.
    #[error("{0}")]
    Full(String),
    #[error("{0}")]
    Other(String),
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
    on_exit: crate::supervise::ExitNotifier,
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
        migrate::MigrateError::Apply { name, source } => {
            sqlite_failed(&format!("cannot apply migration {name} to"), source)
        }
        migrate::MigrateError::Read { source } => sqlite_failed("cannot migrate", source),
        too_new @ migrate::MigrateError::TooNew { .. } => OpenError::Other(too_new.to_string()),
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
        handle: StoreHandle::new(inbox, config.path.clone(), tallies, health),
        thread,
        checkpointer,
        lock,
    })
}

pub(crate) fn load_tallies(conn: &mut Connection) -> StoreResult<Tallies> {
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
