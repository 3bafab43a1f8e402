//! Retention: with a short `store.retention`, ended sandboxes, released
//! leases, idempotency keys and audit rows are purged by themselves; live
//! sandboxes and their leases stay; and a lease generation never goes
//! back, even for a resource id whose lease row was purged.

use crate::common;
use crate::sandbox_support;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, Request, assert_status, now_millis, poll_until};
use sandbox_support::{SANDBOXES, destroy_ok, id_of, lease_action, spawn_ok};
use serde_json::json;

fn count(db: &Path, sql: &str, param: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open db");
    conn.query_row(sql, [param], |r| r.get(0)).expect(sql)
}

#[test]
fn old_rows_are_purged_and_generations_never_go_back() {
    let daemon = Daemon::builder()
        .config("[store]\nretention = \"2s\"\n")
        .start();
    let db = daemon.db.clone();
    let spawn_keyed = || {
        let resp = daemon.send(
            &Request::post(SANDBOXES)
                .header("Idempotency-Key", "k-1")
                .json(&json!({})),
        );
        assert_status(&resp, 201);
        id_of(&resp.json())
    };
    let ended = spawn_keyed();
    destroy_ok(&daemon, &ended);
    let live = id_of(&spawn_ok(&daemon, &json!({})));
    // A lease on a resource that is not a sandbox, released: its row may go.
    let taken = lease_action(
        &daemon,
        "res-1",
        "acquire",
        &json!({"holder_id": "h-1", "ttl": "1h", "resource_type": "pool_vm"}),
    );
    assert_status(&taken, 200);
    let first_generation = taken.json()["generation"].as_u64().expect("generation");
    assert_status(
        &lease_action(&daemon, "res-1", "release", &json!({"holder_id": "h-1"})),
        200,
    );
    // An audited admin action (a registration writes an audit row).
    assert_status(
        &daemon.heartbeat("w-audited", &json!({"status": "draining"})),
        200,
    );
    let written_at = now_millis();
    assert!(count(&db, "SELECT count(*) FROM admin_audit WHERE ?1 = ?1", "") > 0);

    poll_until(Duration::from_secs(20), "the retention purge", || {
        count(&db, "SELECT count(*) FROM sandboxes WHERE id = ?1", &ended) == 0
            && count(
                &db,
                "SELECT count(*) FROM leases WHERE resource_id = ?1",
                &ended,
            ) == 0
            && count(
                &db,
                "SELECT count(*) FROM leases WHERE resource_id = ?1",
                "res-1",
            ) == 0
            && count(
                &db,
                "SELECT count(*) FROM idempotency_keys WHERE ?1 = ?1",
                "",
            ) == 0
            && count(
                &db,
                "SELECT count(*) FROM admin_audit WHERE at <= ?1",
                &written_at.to_string(),
            ) == 0
    });
    // The live sandbox and its lease are kept, however old.
    assert_eq!(
        count(&db, "SELECT count(*) FROM sandboxes WHERE id = ?1", &live),
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM leases WHERE resource_id = ?1 AND holder_id <> ''",
            &live
        ),
        1
    );
    assert_status(&daemon.get(&format!("{SANDBOXES}/{live}")), 200);

    // The purged resource's next lease starts above every purged generation.
    let again = lease_action(
        &daemon,
        "res-1",
        "acquire",
        &json!({"holder_id": "h-2", "ttl": "1h", "resource_type": "pool_vm"}),
    );
    assert_status(&again, 200);
    let generation = again.json()["generation"].as_u64().expect("generation");
    assert!(
        generation > first_generation,
        "generation went back from {first_generation} to {generation}: {}",
        again.json()
    );
    // The spent idempotency key makes a new sandbox, not a 404.
    let fresh = spawn_keyed();
    assert_ne!(fresh, ended);
}
