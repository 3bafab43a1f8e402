//! The SQLite store end to end, through its handle: group commit,
//! savepoints, the WAL reset, the heartbeat upsert.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::open::open;
use crate::config::StoreConfig;
use crate::store::handle::wal_path;
use crate::store::{AuditEntry, Deleted, StoreHandle};
use crate::workers::{Heartbeat, WorkerStatus};

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stacyvmd-store-{name}-{}", std::process::id()));
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
    let (notifier, _events) = crate::supervise::ExitNotifier::for_tests();
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
    let (notifier, _events) = crate::supervise::ExitNotifier::for_tests();
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
    // About one reset per checkpoint pass when the test runs alone; without
    // the store thread's share, a few in hundreds of passes (measured: 3 in
    // 50 s, so about 0.06 in this window). Beside the other unit tests on
    // two cores, passes are starved (measured: 3 resets in 18 passes), so
    // the bound is two resets: far above what the old code gets here.
    let passes = (elapsed.as_millis() / 50) as usize;
    assert!(passes >= 4, "only {elapsed:?} of writes");
    assert!(
        resets >= 2,
        "the WAL was reset {resets} times in {elapsed:?} ({passes} checkpoint passes)"
    );
}

#[test]
fn one_failing_write_does_not_undo_its_batch_mates() {
    let path = temp_db("savepoint");
    let (notifier, _events) = crate::supervise::ExitNotifier::for_tests();
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
    let (notifier, _events) = crate::supervise::ExitNotifier::for_tests();
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
