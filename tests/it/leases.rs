//! Leases and fencing against the real binary: sandbox leases, the admin
//! lease routes, and a destroy refused (changing nothing) while another
//! worker holds the sandbox's lease.

use crate::common;
use crate::sandbox_support;

use common::{Daemon, Request, assert_error, assert_status, rfc3339_millis};
use sandbox_support::{
    LEASES, destroy, destroy_ok, get_sandbox, id_of, lease, lease_action, lease_is_free, leases,
    list, markers, spawn_ok,
};
use serde_json::{Value, json};

/// Long lease TTL and renewal interval, so no background renewal changes a
/// lease between two reads of one test.
const QUIET_LEASES: &str = "[leases]\nttl = \"1h\"\nrenew_interval = \"30m\"\n";

fn quiet_daemon() -> Daemon {
    Daemon::builder().config(QUIET_LEASES).start()
}

#[track_caller]
fn lease_ok(daemon: &Daemon, id: &str, verb: &str, body: &Value) -> Value {
    let resp = lease_action(daemon, id, verb, body);
    assert_status(&resp, 200);
    resp.json()
}

fn generation(lease: &Value) -> u64 {
    lease["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("lease without generation: {lease}"))
}

fn millis(lease: &Value, field: &str) -> i64 {
    rfc3339_millis(
        lease[field]
            .as_str()
            .unwrap_or_else(|| panic!("lease without {field}: {lease}")),
    )
}

#[test]
fn a_spawned_sandbox_holds_its_lease_and_a_rival_cannot_take_it() {
    let daemon = quiet_daemon();
    let id = id_of(&spawn_ok(&daemon, &json!({})));
    let held = lease(&daemon, &id);
    assert_eq!(held["resource_id"], id.as_str(), "{held}");
    assert_eq!(held["resource_type"], "sandbox", "{held}");
    assert_eq!(held["holder_id"], "local", "{held}");
    assert_eq!(generation(&held), 1, "{held}");
    assert_eq!(held["expired"], false, "{held}");
    assert_eq!(held["transitions"], 1, "{held}");
    assert!(millis(&held, "acquired_at") <= millis(&held, "renewed_at"));
    assert!(millis(&held, "renewed_at") < millis(&held, "expires_at"));
    assert_eq!(leases(&daemon), vec![held.clone()]);

    // A rival's acquire, renew and release: 409, and nothing changes.
    for verb in ["acquire", "renew", "release"] {
        let resp = lease_action(
            &daemon,
            &id,
            verb,
            &json!({"holder_id": "worker-b", "ttl": "1h"}),
        );
        assert_error(&resp, 409, "CONFLICT");
        assert_eq!(
            lease(&daemon, &id),
            held,
            "a refused {verb} changed the lease"
        );
    }
    let got = get_sandbox(&daemon, &id);
    assert_status(&got, 200);
    assert_eq!(got.json()["state"], "running");
}

#[test]
fn destroy_is_refused_while_another_worker_holds_the_lease() {
    let daemon = quiet_daemon();
    let sandbox = spawn_ok(&daemon, &json!({}));
    let id = id_of(&sandbox);

    // Local lets go; worker-b takes the lease (a new generation).
    let released = lease_ok(&daemon, &id, "release", &json!({"holder_id": "local"}));
    assert_eq!(released["holder_id"], "", "{released}");
    assert_eq!(released["expired"], true, "{released}");
    assert_eq!(
        generation(&released),
        1,
        "release keeps the generation: {released}"
    );
    let taken = lease_ok(
        &daemon,
        &id,
        "acquire",
        &json!({"holder_id": "worker-b", "ttl": "1h"}),
    );
    assert_eq!(taken["holder_id"], "worker-b", "{taken}");
    assert_eq!(generation(&taken), 2, "{taken}");
    assert_eq!(taken["expired"], false, "{taken}");
    let taken = lease(&daemon, &id);

    // The destroy is refused and changes nothing.
    let refused = destroy(&daemon, &id);
    assert_error(&refused, 409, "CONFLICT");
    let still = get_sandbox(&daemon, &id);
    assert_status(&still, 200);
    assert_eq!(
        still.json(),
        sandbox,
        "a refused destroy changed the sandbox"
    );
    assert_eq!(list(&daemon), vec![sandbox.clone()]);
    assert_eq!(
        lease(&daemon, &id),
        taken,
        "a refused destroy changed the lease"
    );
    assert!(
        markers(&daemon.data_dir()).contains(&id),
        "a refused destroy removed the runtime"
    );
    // Extend needs the lease as well.
    let extend = daemon.send(
        &Request::post(&format!("/api/v1/sandboxes/{id}/extend")).json(&json!({"ttl": "2h"})),
    );
    assert_error(&extend, 409, "CONFLICT");
    assert_eq!(
        get_sandbox(&daemon, &id).json(),
        sandbox,
        "a refused extend changed it"
    );
    assert_eq!(lease(&daemon, &id), taken);
    // Prune leaves it alone too (it is not expired anyway), and says 0.
    let pruned = daemon.send(&Request::delete("/api/v1/sandboxes"));
    assert_status(&pruned, 200);
    assert_eq!(pruned.json()["pruned"], 0);

    // worker-b lets go: the destroy goes through with a newer generation.
    let freed = lease_ok(&daemon, &id, "release", &json!({"holder_id": "worker-b"}));
    assert_eq!(generation(&freed), 2, "{freed}");
    destroy_ok(&daemon, &id);
    assert_error(&get_sandbox(&daemon, &id), 404, "NOT_FOUND");
    assert!(!markers(&daemon.data_dir()).contains(&id), "runtime left");
    let after = lease(&daemon, &id);
    assert!(
        lease_is_free(&after),
        "destroy must release its lease: {after}"
    );
    assert!(
        generation(&after) > 2,
        "local re-acquired after a gap, so the generation must go up: {after}"
    );
}

#[test]
fn destroy_after_the_rival_lease_expires_goes_through() {
    let daemon = quiet_daemon();
    let id = id_of(&spawn_ok(&daemon, &json!({})));
    lease_ok(&daemon, &id, "release", &json!({"holder_id": "local"}));
    // The shortest lease the daemon takes; it lapses on its own.
    let short = lease_ok(
        &daemon,
        &id,
        "acquire",
        &json!({"holder_id": "worker-b", "ttl": "300ms"}),
    );
    assert_eq!(generation(&short), 2);
    let expiry = millis(&short, "expires_at");
    common::poll_until(
        std::time::Duration::from_secs(5),
        "worker-b's lease to expire",
        || common::now_millis() > expiry && lease(&daemon, &id)["expired"] == true,
    );
    destroy_ok(&daemon, &id);
    let after = lease(&daemon, &id);
    assert!(lease_is_free(&after), "{after}");
    assert_eq!(generation(&after), 3, "{after}");
}

#[test]
fn admin_lease_round_trip_on_an_arbitrary_resource() {
    let daemon = quiet_daemon();
    let id = "pool-vm-1";
    assert_error(&daemon.get(&format!("{LEASES}/{id}")), 404, "NOT_FOUND");
    // Renew or release of a lease that does not exist: 404.
    for verb in ["renew", "release"] {
        let resp = lease_action(&daemon, id, verb, &json!({"holder_id": "w1"}));
        assert_error(&resp, 404, "NOT_FOUND");
    }
    assert_eq!(leases(&daemon), Vec::<Value>::new());

    let first = lease_ok(
        &daemon,
        id,
        "acquire",
        &json!({"holder_id": "w1", "ttl": "10m", "resource_type": "pool_vm"}),
    );
    assert_eq!(first["resource_id"], id, "{first}");
    assert_eq!(first["resource_type"], "pool_vm", "{first}");
    assert_eq!(first["holder_id"], "w1", "{first}");
    assert_eq!(generation(&first), 1, "{first}");
    assert_eq!(first["expired"], false, "{first}");
    let ttl = millis(&first, "expires_at") - millis(&first, "acquired_at");
    assert!((599_000..=601_000).contains(&ttl), "ttl 10m: {first}");
    assert_eq!(lease(&daemon, id), first);

    // The same holder again: same generation.
    let again = lease_ok(
        &daemon,
        id,
        "acquire",
        &json!({"holder_id": "w1", "ttl": "10m", "resource_type": "pool_vm"}),
    );
    assert_eq!(generation(&again), 1, "{again}");

    // Others may not renew, release or take it.
    for verb in ["acquire", "renew", "release"] {
        let before = lease(&daemon, id);
        let resp = lease_action(&daemon, id, verb, &json!({"holder_id": "w2"}));
        assert_error(&resp, 409, "CONFLICT");
        assert_eq!(lease(&daemon, id), before, "a refused {verb} changed it");
    }

    // The holder renews: expiry moves forward, generation stays.
    let renewed = lease_ok(
        &daemon,
        id,
        "renew",
        &json!({"holder_id": "w1", "ttl": "20m"}),
    );
    assert_eq!(generation(&renewed), 1, "{renewed}");
    assert!(
        millis(&renewed, "expires_at") > millis(&first, "expires_at"),
        "renew did not extend: {renewed} vs {first}"
    );

    // Release keeps the row and the generation.
    let released = lease_ok(&daemon, id, "release", &json!({"holder_id": "w1"}));
    assert_eq!(released["holder_id"], "", "{released}");
    assert_eq!(released["expired"], true, "{released}");
    assert_eq!(generation(&released), 1, "{released}");
    assert_eq!(released["resource_type"], "pool_vm");
    // A released lease can be neither renewed nor released again.
    for verb in ["renew", "release"] {
        let resp = lease_action(&daemon, id, verb, &json!({"holder_id": "w1"}));
        assert_error(&resp, 409, "CONFLICT");
    }

    // The next acquire (any holder) gets generation 2.
    let second = lease_ok(
        &daemon,
        id,
        "acquire",
        &json!({"holder_id": "w2", "resource_type": "pool_vm"}),
    );
    assert_eq!(second["holder_id"], "w2", "{second}");
    assert_eq!(generation(&second), 2, "{second}");
    assert!(second["transitions"].as_u64().unwrap() >= 2, "{second}");
    lease_ok(&daemon, id, "release", &json!({"holder_id": "w2"}));
    let third = lease_ok(&daemon, id, "acquire", &json!({"holder_id": "w2"}));
    assert_eq!(generation(&third), 3, "{third}");

    let all = leases(&daemon);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["resource_id"], id);
}

#[test]
fn admin_lease_bad_input() {
    let daemon = quiet_daemon();
    let id = "pool-vm-2";
    for body in [
        json!({}),
        json!({"holder_id": ""}),
        json!({"holder_id": "a b"}),
        json!({"holder_id": "w/1"}),
        json!({"holder_id": 7}),
        json!({"holder_id": "w1", "ttl": "soon"}),
        json!({"holder_id": "w1", "ttl": "-1s"}),
        json!({"holder_id": "w1", "ttl": 5}),
        json!({"holder_id": "w1", "extra": true}),
    ] {
        let resp = lease_action(&daemon, id, "acquire", &body);
        assert_error(&resp, 400, "BAD_REQUEST");
    }
    let resp = daemon.send(
        &Request::post(&format!("{LEASES}/{id}/acquire"))
            .header("Content-Type", "application/json")
            .body("{"),
    );
    assert_error(&resp, 400, "BAD_REQUEST");
    // Unknown verbs are not routes.
    let resp = lease_action(&daemon, id, "steal", &json!({"holder_id": "w1"}));
    assert!(
        resp.status == 404 || resp.status == 405,
        "unknown lease verb:\n{resp}"
    );
    assert_eq!(
        leases(&daemon),
        Vec::<Value>::new(),
        "bad input wrote a lease"
    );
}

#[test]
fn leases_of_live_sandboxes_are_renewed_in_the_background() {
    let daemon = Daemon::builder()
        .config("[leases]\nttl = \"1s\"\nrenew_interval = \"100ms\"\n")
        .start();
    let live = id_of(&spawn_ok(&daemon, &json!({})));
    let first = lease(&daemon, &live);
    let first_expiry = millis(&first, "expires_at");
    // Past the lease's first expiry it is still held: renewed, not re-acquired.
    common::poll_until(
        std::time::Duration::from_secs(10),
        "the clock to pass the first lease expiry",
        || common::now_millis() > first_expiry + 200,
    );
    let later = lease(&daemon, &live);
    assert_eq!(later["holder_id"], "local", "{later}");
    assert_eq!(
        later["expired"], false,
        "lease of a live sandbox lapsed: {later}"
    );
    assert_eq!(
        generation(&later),
        1,
        "renewal must keep the generation: {later}"
    );
    assert!(millis(&later, "expires_at") > first_expiry, "{later}");
    destroy_ok(&daemon, &live);
}

#[test]
fn restart_leaves_a_sandbox_leased_by_another_worker_alone() {
    let daemon = quiet_daemon();
    let sandbox = spawn_ok(&daemon, &json!({}));
    let id = id_of(&sandbox);
    lease_ok(&daemon, &id, "release", &json!({"holder_id": "local"}));
    lease_ok(
        &daemon,
        &id,
        "acquire",
        &json!({"holder_id": "worker-b", "ttl": "1h"}),
    );
    let held = lease(&daemon, &id);
    let mut daemon = daemon;
    assert_eq!(daemon.stop().code(), Some(0));

    let daemon = daemon.restart();
    // Reconciliation neither took the lease nor touched the sandbox.
    assert_eq!(
        lease(&daemon, &id),
        held,
        "restart changed worker-b's lease"
    );
    assert_eq!(get_sandbox(&daemon, &id).json(), sandbox);
    assert!(markers(&daemon.data_dir()).contains(&id), "runtime reaped");
    assert_error(&destroy(&daemon, &id), 409, "CONFLICT");
    lease_ok(&daemon, &id, "release", &json!({"holder_id": "worker-b"}));
    destroy_ok(&daemon, &id);
    assert!(generation(&lease(&daemon, &id)) > 2);
}
