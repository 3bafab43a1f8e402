//! What survives a restart, SIGTERM under load and kill -9 under load, and
//! the refusal to open a database from a newer schema.

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::{Client, Daemon, Request, assert_status, id_set, poll_until};
use serde_json::{Value, json};

fn user_version(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open db");
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
        .expect("read user_version")
}

fn by_id(workers: &[Value], id: &str) -> Value {
    workers
        .iter()
        .find(|w| w["id"] == id)
        .unwrap_or_else(|| panic!("worker {id} missing from {workers:?}"))
        .clone()
}

#[test]
fn restart_keeps_workers_and_migrations_are_idempotent() {
    let mut daemon = Daemon::start();
    for (id, host) in [("w-a", "host-a"), ("w-b", "host-b"), ("w-c", "host-c")] {
        let body = json!({
            "hostname": host,
            "status": "online",
            "providers": ["mock"],
            "capabilities": ["cap-1"],
            "capacity": {"max_sandboxes": 5}
        });
        assert_status(&daemon.heartbeat(id, &body), 200);
    }
    let before = daemon.workers();
    assert_eq!(daemon.stop().code(), Some(0));
    let version = user_version(&daemon.db);
    assert!(version > 0, "migrations did not set PRAGMA user_version");

    for round in 0..2 {
        let mut restarted = daemon.restart();
        let after = restarted.workers();
        assert_eq!(
            id_set(&after),
            id_set(&before),
            "round {round}: workers lost or invented"
        );
        for id in ["w-a", "w-b", "w-c"] {
            let (old, new) = (by_id(&before, id), by_id(&after, id));
            for key in [
                "hostname",
                "status",
                "providers",
                "capabilities",
                "capacity",
                "created_at",
            ] {
                assert_eq!(
                    new[key], old[key],
                    "round {round}: {id}.{key} changed across restart"
                );
            }
            // Every known worker gets a fresh grace window after a restart.
            assert_eq!(
                new["stale"], false,
                "round {round}: {id} stale right after restart: {new}"
            );
        }
        assert_eq!(restarted.stop().code(), Some(0));
        assert_eq!(
            user_version(&restarted.db),
            version,
            "round {round}: a restart changed user_version"
        );
        daemon = restarted;
    }
}

#[test]
fn a_database_from_a_newer_schema_is_refused() {
    let mut daemon = Daemon::start();
    assert_eq!(daemon.stop().code(), Some(0));
    let future = user_version(&daemon.db) + 100;
    {
        let conn = rusqlite::Connection::open(&daemon.db).expect("open db");
        conn.execute_batch(&format!("PRAGMA user_version = {future};"))
            .expect("set user_version");
    }
    let db = daemon.db.clone();
    // Keeps the temp dir alive after the refused daemon is dropped.
    let _dir = daemon.dir().clone();
    let refused = daemon
        .try_restart()
        .err()
        .expect("stacyvmd served a database with a newer schema version");
    assert!(!refused.status.success(), "{refused}");
    let out = refused.output().to_lowercase();
    assert!(
        out.contains("version") || out.contains("schema"),
        "the refusal must say the schema is newer\n{refused}"
    );
    assert_eq!(
        user_version(&db),
        future,
        "the refused start changed the database"
    );
}

/// Drives `threads` keep-alive clients, each creating distinct workers
/// `w-<thread>-<n>` by heartbeat, until `min_acked` heartbeats got a 200;
/// then runs `stop` while they keep going. Returns the acknowledged ids.
fn heartbeats_while(
    addr: SocketAddr,
    threads: usize,
    min_acked: usize,
    stop: impl FnOnce() -> ExitStatus,
) -> (BTreeSet<String>, ExitStatus) {
    let acked_count = AtomicUsize::new(0);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let acked_count = &acked_count;
                thread::Builder::new()
                    .name(format!("load-{t}"))
                    .spawn_scoped(scope, move || {
                        let mut acked = Vec::new();
                        let Ok(mut client) = Client::try_connect(addr) else {
                            return acked;
                        };
                        for n in 0..20_000 {
                            let id = format!("w-{t}-{n}");
                            let req =
                                Request::post(&format!("/api/v1/admin/workers/{id}/heartbeat"))
                                    .json(&json!({"hostname": format!("host-{t}")}));
                            match client.send(&req) {
                                Ok(resp) if resp.status == 200 => {
                                    acked.push(id);
                                    acked_count.fetch_add(1, Ordering::Relaxed);
                                }
                                // 503 while stopping is fine; anything else is not.
                                Ok(resp) if resp.status == 503 => break,
                                Ok(resp) => panic!("heartbeat {id} under load:\n{resp}"),
                                Err(_) => break,
                            }
                        }
                        acked
                    })
                    .expect("spawn load thread")
            })
            .collect();
        poll_until(
            Duration::from_secs(20),
            "heartbeats to be acknowledged",
            || acked_count.load(Ordering::Relaxed) >= min_acked,
        );
        let status = stop();
        let acked = handles
            .into_iter()
            .flat_map(|h| h.join().expect("load thread panicked"))
            .collect();
        (acked, status)
    })
}

fn assert_all_present(daemon: &Daemon, acked: &BTreeSet<String>) {
    let stored = id_set(&daemon.workers());
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged workers lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
}

#[test]
fn sigterm_under_heartbeat_load_loses_nothing_acknowledged() {
    let mut daemon = Daemon::start();
    let addr = daemon.addr;
    let (acked, status) = heartbeats_while(addr, 4, 60, || daemon.stop());
    assert_eq!(status.code(), Some(0), "exit status of SIGTERM under load");
    assert!(acked.len() >= 60);
    let daemon = daemon.restart();
    assert_all_present(&daemon, &acked);
}

#[test]
fn kill_9_under_heartbeat_load_loses_nothing_acknowledged() {
    let mut daemon = Daemon::start();
    let addr = daemon.addr;
    let (acked, _status) = heartbeats_while(addr, 4, 100, || daemon.kill9());
    assert!(acked.len() >= 100);
    let daemon = daemon.restart();
    assert_all_present(&daemon, &acked);
    // The store still takes writes after the crash recovery.
    assert_status(&daemon.heartbeat("after-crash", &json!({})), 200);
}
