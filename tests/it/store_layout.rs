//! A database written before the migrations moved to `migrations/sqlite/`
//! opens with this build as it is: nothing is applied again, the recorded
//! history is kept, and the daemon serves from it.
//!
//! The fixture `src/store/sqlite/testdata/schema-0005-main.db` was made by
//! the main branch's binary (schema 5, `migrations/NNNN_name.sql` layout):
//! started on an empty data directory and stopped with SIGTERM.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::{Daemon, TempDir, repo_path};

/// When the fixture's main-branch binary applied its five migrations.
const FIXTURE_APPLIED_AT: i64 = 1_796_316_050_658;

fn history(db: &Path) -> (i64, Vec<(i64, String, i64)>) {
    let conn = rusqlite::Connection::open(db).expect("open db");
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    let rows = conn
        .prepare("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    (version, rows)
}

#[test]
fn a_database_from_the_old_migration_layout_opens_unchanged() {
    let dir = Arc::new(TempDir::new("old-layout"));
    std::fs::create_dir_all(dir.join("data")).expect("data dir");
    let db = dir.join("data").join("stacyvmd.db");
    std::fs::copy(
        repo_path("src/store/sqlite/testdata/schema-0005-main.db"),
        &db,
    )
    .expect("copy fixture");
    let (version, before) = history(&db);
    assert_eq!(version, 5, "fixture is not at schema 5: {before:?}");
    assert!(
        before.iter().all(|(_, _, at)| *at == FIXTURE_APPLIED_AT),
        "{before:?}"
    );

    let mut daemon = Daemon::builder().dir(dir.clone()).start();
    assert_eq!(daemon.db, db, "the daemon opened another database");
    let workers = daemon.workers();
    assert!(
        workers.iter().any(|w| w["id"] == daemon.worker_id),
        "local worker not served from the old database: {workers:?}"
    );
    assert_eq!(daemon.stop().code(), Some(0), "{}", daemon.stderr_text());
    assert!(
        !daemon.stderr_text().contains("applied migration"),
        "a landed migration was applied again:\n{}",
        daemon.stderr_text()
    );

    let (version_after, after) = history(&db);
    // Every migration this build knows is either in the fixture's history,
    // kept as it was, or appended after it; none is recorded twice.
    assert!(version_after >= version, "{version_after} < {version}");
    assert_eq!(&after[..before.len()], &before[..], "history rewritten");
    assert_eq!(after.len() as i64, version_after, "{after:?}");
}
