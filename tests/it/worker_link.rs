//! Every worker operation goes to the sandbox's own worker, under a lease
//! held by that worker: a sandbox whose worker is not this daemon's (the
//! local worker was renamed, or the sandbox is a remote worker's) is
//! refused before anything is touched, even when its lease has lapsed and
//! could be taken, and an extend keeps the lease with the owning worker.

use crate::common;
use crate::sandbox_support;

use std::time::Duration;

use common::{Daemon, assert_error, assert_status};
use sandbox_support::{destroy, get_sandbox, id_of, lease, spawn_ok};
use serde_json::{Value, json};

/// The fields of a lease that any change would move.
fn lease_state(l: &Value) -> Value {
    json!({
        "holder_id": l["holder_id"],
        "generation": l["generation"],
        "expires_at": l["expires_at"],
        "transitions": l["transitions"],
    })
}

#[test]
fn a_sandbox_of_another_worker_is_refused_with_nothing_changed() {
    // Short leases: by the time the second daemon runs, the first one's
    // lease has lapsed, so taking it would succeed.
    let short = "[leases]\nttl = \"500ms\"\nrenew_interval = \"100ms\"\n";
    let mut first = Daemon::builder()
        .args(&["--worker-id", "first"])
        .config(short)
        .start();
    let id = id_of(&spawn_ok(&first, &json!({"ttl": "1h"})));
    assert_eq!(first.stop().code(), Some(0));

    let second = Daemon::builder()
        .args(&["--worker-id", "second"])
        .config(short)
        .dir(first.dir().clone())
        .start();
    // Read once the first daemon (which renews its leases) has stopped.
    let before = lease(&second, &id);
    assert_eq!(before["holder_id"], "first", "{before}");
    let expires_at = common::rfc3339_millis(before["expires_at"].as_str().unwrap_or_default());
    common::poll_until(Duration::from_secs(5), "the first lease to lapse", || {
        common::now_millis() > expires_at + 50
    });
    let refused = destroy(&second, &id);
    let message = assert_error(&refused, 409, "CONFLICT");
    assert!(message.contains("first"), "{message}");
    let after = lease(&second, &id);
    assert_eq!(
        lease_state(&after),
        lease_state(&before),
        "a refused destroy took or moved the lease: {after}"
    );
    let sandbox = get_sandbox(&second, &id);
    assert_status(&sandbox, 200);
    assert_eq!(sandbox.json()["state"], "running", "{sandbox}");
    assert_eq!(sandbox.json()["worker_id"], "first", "{sandbox}");

    // An extend is a record change; the lease stays the owning worker's.
    let extended = second.send(
        &common::Request::post(&format!("/api/v1/sandboxes/{id}/extend"))
            .json(&json!({"ttl": "2h"})),
    );
    assert_status(&extended, 200);
    let renewed = lease(&second, &id);
    assert_eq!(renewed["holder_id"], "first", "{renewed}");
}
