//! Schema migrations: `migrations/sqlite/NNNN_name.sql`, embedded at build time,
//! applied in order, each in its own transaction, recorded both in
//! `PRAGMA user_version` (the authoritative number) and in
//! `schema_migrations` (when and what, for operators). Landed migrations are
//! never edited; a new one is appended to [`MIGRATIONS`].
//!
//! What identifies an applied migration is its position (`version`, the
//! `user_version` it leaves) and its `name`; neither depends on where the
//! file lives, so the files moved from `migrations/` to `migrations/sqlite/`
//! (each backend keeps its own) without touching any applied history.

use rusqlite::Connection;

pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_init",
        sql: include_str!("../../../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        name: "0002_sandboxes_leases",
        sql: include_str!("../../../migrations/sqlite/0002_sandboxes_leases.sql"),
    },
    Migration {
        name: "0003_lean_audit",
        sql: include_str!("../../../migrations/sqlite/0003_lean_audit.sql"),
    },
    Migration {
        name: "0004_faults_retention",
        sql: include_str!("../../../migrations/sqlite/0004_faults_retention.sql"),
    },
    Migration {
        name: "0005_templates",
        sql: include_str!("../../../migrations/sqlite/0005_templates.sql"),
    },
];

/// Why the schema could not be brought up to date; nothing of the failed
/// migration was committed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database was written by a newer stacyvmd: refusing protects it.
    #[error(
        "database schema version {found} is newer than this stacyvmd knows ({known}); refusing to start"
    )]
    TooNew { found: i64, known: i64 },
    /// Reading the schema version or making `schema_migrations` failed.
    #[error("cannot read the schema version")]
    Read {
        #[source]
        source: rusqlite::Error,
    },
    /// Applying (or recording) migration `name` failed.
    #[error("cannot apply migration {name}")]
    Apply {
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// Brings the schema up to date. Returns how many migrations were applied.
pub fn migrate(conn: &mut Connection, now_ms: i64) -> Result<usize, MigrateError> {
    let known = MIGRATIONS.len() as i64;
    let read = |source| MigrateError::Read { source };
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(read)?;
    if found > known {
        return Err(MigrateError::TooNew { found, known });
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY NOT NULL,
             name TEXT NOT NULL,
             applied_at INTEGER NOT NULL
         ) STRICT",
    )
    .map_err(read)?;
    let mut applied = 0;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        apply_one(conn, version, migration, now_ms).map_err(|source| MigrateError::Apply {
            name: migration.name,
            source,
        })?;
        log::info!("applied migration {}", migration.name);
        applied += 1;
    }
    Ok(applied)
}

/// Migration `version` and its record, in one transaction.
fn apply_one(
    conn: &mut Connection,
    version: i64,
    migration: &Migration,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch(migration.sql)?;
    tx.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
        rusqlite::params![version, migration.name, now_ms],
    )?;
    // PRAGMA takes no bound parameters; `version` is our own integer.
    tx.execute_batch(&format!("PRAGMA user_version = {version}"))?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_once_and_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn, 1).unwrap(), MIGRATIONS.len());
        assert_eq!(migrate(&mut conn, 2).unwrap(), 0);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
    }

    #[test]
    fn refuses_a_newer_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA user_version = 999").unwrap();
        assert!(matches!(
            migrate(&mut conn, 1),
            Err(MigrateError::TooNew { found: 999, .. })
        ));
    }

    #[test]
    fn the_lean_audit_keeps_every_row_and_its_number() {
        let mut conn = Connection::open_in_memory().unwrap();
        // A database at schema 2, as an earlier stacyvmd left it.
        for m in &MIGRATIONS[..2] {
            conn.execute_batch(m.sql).unwrap();
        }
        conn.execute_batch("PRAGMA user_version = 2").unwrap();
        let insert = "INSERT INTO admin_audit (at, actor, request_id, action, target, outcome)
                      VALUES (?1, 'admin', 'r', 'lease.renew', 'x', 'ok')";
        for at in [10, 20, 30] {
            conn.execute(insert, [at]).unwrap();
        }
        conn.execute("DELETE FROM admin_audit WHERE at = 20", [])
            .unwrap();
        assert_eq!(migrate(&mut conn, 1).unwrap(), MIGRATIONS.len() - 2);
        conn.execute(insert, [40]).unwrap();
        let rows: Vec<(i64, i64)> = conn
            .prepare("SELECT seq, at FROM admin_audit ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(1, 10), (3, 30), (4, 40)]);
        // No AUTOINCREMENT counter and no `at` index left to write.
        let extra: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'admin_audit_at'
                 OR sql LIKE '%AUTOINCREMENT%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(extra, 0);
    }

    #[test]
    fn migration_names_are_ordered_and_numbered() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert!(m.name.starts_with(&format!("{:04}_", i + 1)), "{}", m.name);
        }
    }

    /// A database the main branch's binary made before the files moved to
    /// `migrations/sqlite/` (schema 5): nothing is applied again and its
    /// recorded history stays as it was.
    #[test]
    fn a_database_from_the_old_layout_needs_nothing_applied() {
        let dir = std::env::temp_dir().join(format!("stacyvmd-migrate-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("old.db");
        std::fs::write(&db, include_bytes!("testdata/schema-0005-main.db")).unwrap();
        let mut conn = Connection::open(&db).unwrap();
        let history = |conn: &Connection| -> Vec<(i64, String, i64)> {
            conn.prepare("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let before = history(&conn);
        assert_eq!(before.len(), 5);
        for (row, m) in before.iter().zip(MIGRATIONS) {
            assert_eq!(row.1, m.name, "a landed migration was renamed");
        }
        let applied = migrate(&mut conn, 1).unwrap();
        assert_eq!(applied, MIGRATIONS.len() - 5);
        assert_eq!(&history(&conn)[..5], &before[..]);
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
