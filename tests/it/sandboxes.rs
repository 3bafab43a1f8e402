//! Sandboxes over REST against the real binary: spawn defaults and fields,
//! list/get/destroy/extend, idempotent retries, bad input, admission
//! preflight, limits, the reaper and prune, and provider failures and hangs
//! leaving nothing behind.

use crate::common;
use crate::sandbox_support;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Daemon, Request, assert_error, assert_status, names_field, now_millis, poll_until,
    rfc3339_millis,
};
use sandbox_support::{
    ADMISSION, SANDBOXES, admission, destroy, destroy_ok, get_sandbox, id_of, is_sandbox_id, lease,
    lease_is_free, leases, list, list_ids, markers, poll_until_ok, scheduler, spawn, spawn_ok,
    spawn_req, worker,
};
use serde_json::{Value, json};

const MINUTE_MS: i64 = 60_000;

/// Waits until the clock has moved past `ms`, so the next spawn gets a
/// later `created_at` (the list is ordered by it, at millisecond precision).
fn clock_past(ms: i64) {
    poll_until(Duration::from_secs(2), "the clock to advance", || {
        now_millis() > ms
    });
}

/// Nothing exists: no listed sandbox, no runtime marker, no lease.
#[track_caller]
fn assert_nothing_created(daemon: &Daemon, what: &str) {
    assert_eq!(list(daemon), Vec::<Value>::new(), "{what}: sandbox created");
    assert!(
        markers(&daemon.data_dir()).is_empty(),
        "{what}: runtime left: {:?}",
        markers(&daemon.data_dir())
    );
    assert_eq!(leases(daemon), Vec::<Value>::new(), "{what}: lease written");
}

#[test]
fn spawn_applies_defaults_and_returns_every_field() {
    let daemon = Daemon::start();
    let before = now_millis();
    let sandbox = spawn_ok(&daemon, &json!({}));
    let after = now_millis();
    let id = id_of(&sandbox);

    assert_eq!(sandbox["state"], "running", "{sandbox}");
    assert_eq!(sandbox["worker_id"], "local", "{sandbox}");
    assert_eq!(sandbox["provider"], "mock", "{sandbox}");
    assert_eq!(sandbox["image"], "default", "{sandbox}");
    assert_eq!(sandbox["memory_mb"], 512, "{sandbox}");
    assert_eq!(sandbox["vcpus"], 1, "{sandbox}");
    // Empty owner and metadata are omitted.
    assert!(sandbox.get("owner_id").is_none(), "{sandbox}");
    assert!(sandbox.get("metadata").is_none(), "{sandbox}");
    let created = rfc3339_millis(sandbox["created_at"].as_str().expect("created_at"));
    let expires = rfc3339_millis(sandbox["expires_at"].as_str().expect("expires_at"));
    assert!(
        (before - 1..=after + 1).contains(&created),
        "created_at {created} outside [{before}, {after}]"
    );
    assert_eq!(expires - created, 30 * MINUTE_MS, "default ttl is 30m");

    // Its runtime exists and it holds its lease.
    assert!(
        markers(&daemon.data_dir()).contains(&id),
        "no runtime marker for {id}"
    );
    let l = lease(&daemon, &id);
    assert_eq!(l["holder_id"], "local", "{l}");
    assert_eq!(l["resource_type"], "sandbox", "{l}");
    assert_eq!(l["generation"], 1, "{l}");
    assert_eq!(l["expired"], false, "{l}");

    // Counted on the local worker.
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 1);

    // No body at all means every default.
    let bare = daemon.send(&Request::post(SANDBOXES));
    assert_status(&bare, 201);
    assert_eq!(bare.json()["image"], "default", "{bare}");
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 2);
}

#[test]
fn spawn_fields_owner_header_metadata_and_template() {
    let daemon = Daemon::start();
    let metadata = json!({"team": "infra", "purpose": "ci run", "empty": ""});
    let sandbox = {
        let resp = daemon.send(
            &spawn_req(&json!({
                "image": "ubuntu-22.04",
                "memory_mb": 1024,
                "vcpus": 2,
                "ttl": "1h30m",
                "owner_id": "body-owner",
                "metadata": metadata,
            }))
            .header("X-User-ID", "header-owner"),
        );
        assert_status(&resp, 201);
        resp.json()
    };
    assert_eq!(sandbox["image"], "ubuntu-22.04", "{sandbox}");
    assert_eq!(sandbox["memory_mb"], 1024, "{sandbox}");
    assert_eq!(sandbox["vcpus"], 2, "{sandbox}");
    assert_eq!(
        sandbox["owner_id"], "header-owner",
        "X-User-ID must override the body's owner_id: {sandbox}"
    );
    assert_eq!(sandbox["metadata"], metadata, "{sandbox}");
    let created = rfc3339_millis(sandbox["created_at"].as_str().unwrap());
    let expires = rfc3339_millis(sandbox["expires_at"].as_str().unwrap());
    assert_eq!(expires - created, 90 * MINUTE_MS, "ttl 1h30m");

    // The stored record says the same.
    let got = get_sandbox(&daemon, &id_of(&sandbox));
    assert_status(&got, 200);
    assert_eq!(got.json(), sandbox, "GET differs from the spawn answer");

    // The body's owner_id when no header is sent.
    let owned = spawn_ok(&daemon, &json!({"owner_id": "alice@corp"}));
    assert_eq!(owned["owner_id"], "alice@corp", "{owned}");

    // StacyVM's `template` is the image when `image` is absent...
    let templated = spawn_ok(&daemon, &json!({"template": "python-3.12"}));
    assert_eq!(templated["image"], "python-3.12", "{templated}");
    // ...and an explicit image wins.
    let both = spawn_ok(
        &daemon,
        &json!({"template": "python-3.12", "image": "alpine"}),
    );
    assert_eq!(both["image"], "alpine", "{both}");
    // The provider named explicitly.
    let explicit = spawn_ok(&daemon, &json!({"provider": "mock"}));
    assert_eq!(explicit["provider"], "mock", "{explicit}");
}

#[test]
fn list_is_newest_first_and_get_returns_one() {
    let daemon = Daemon::start();
    assert_eq!(list(&daemon), Vec::<Value>::new());
    let mut spawned = Vec::new();
    for i in 0..4 {
        let s = spawn_ok(&daemon, &json!({"metadata": {"n": i.to_string()}}));
        clock_past(rfc3339_millis(s["created_at"].as_str().unwrap()));
        spawned.push(s);
    }
    let listed = list(&daemon);
    let newest_first: Vec<Value> = spawned.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first, "list must be newest first");
    for s in &spawned {
        let got = get_sandbox(&daemon, &id_of(s));
        assert_status(&got, 200);
        assert_eq!(&got.json(), s);
    }
}

#[test]
fn destroyed_sandboxes_are_gone() {
    let daemon = Daemon::start();
    let keep = id_of(&spawn_ok(&daemon, &json!({})));
    let gone = id_of(&spawn_ok(&daemon, &json!({})));
    destroy_ok(&daemon, &gone);

    assert_error(&get_sandbox(&daemon, &gone), 404, "NOT_FOUND");
    assert_error(&destroy(&daemon, &gone), 404, "NOT_FOUND");
    assert_eq!(list_ids(&daemon), vec![keep.clone()]);
    let runtimes = markers(&daemon.data_dir());
    assert!(
        !runtimes.contains(&gone),
        "runtime of destroyed {gone} left"
    );
    assert!(runtimes.contains(&keep), "runtime of {keep} missing");
    // The lease of a destroyed sandbox is released; its generation stays.
    let l = lease(&daemon, &gone);
    assert!(
        lease_is_free(&l),
        "lease of destroyed sandbox still held: {l}"
    );
    assert!(l["generation"].as_u64().unwrap() >= 1, "{l}");
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 1);

    // Unknown ids: well-formed or not.
    for id in ["sb-0000000000000000", "nope"] {
        assert_error(&destroy(&daemon, id), 404, "NOT_FOUND");
        assert_error(&get_sandbox(&daemon, id), 404, "NOT_FOUND");
    }
    assert_eq!(list_ids(&daemon), vec![keep]);
}

#[test]
fn extend_moves_expiry_and_respects_max_ttl() {
    let daemon = Daemon::start();
    let sandbox = spawn_ok(&daemon, &json!({"ttl": "10m"}));
    let id = id_of(&sandbox);
    let old_expiry = rfc3339_millis(sandbox["expires_at"].as_str().unwrap());
    let extend =
        |body: &Value| daemon.send(&Request::post(&format!("{SANDBOXES}/{id}/extend")).json(body));

    let before = now_millis();
    let resp = extend(&json!({"ttl": "2h"}));
    let after = now_millis();
    assert_status(&resp, 200);
    let extended = resp.json();
    assert_eq!(extended["id"], id.as_str());
    assert_eq!(extended["state"], "running");
    let new_expiry = rfc3339_millis(extended["expires_at"].as_str().unwrap());
    assert!(
        new_expiry > old_expiry,
        "expires_at did not move: {extended}"
    );
    assert!(
        (before + 120 * MINUTE_MS - 1..=after + 120 * MINUTE_MS + 1).contains(&new_expiry),
        "expires_at must be now + 2h: {extended}"
    );
    // The lease follows the sandbox's expiry.
    let l = lease(&daemon, &id);
    assert_eq!(l["holder_id"], "local", "{l}");
    assert!(
        rfc3339_millis(l["expires_at"].as_str().unwrap()) >= new_expiry - 1000,
        "lease did not follow extend: {l} vs {extended}"
    );

    // Over sandboxes.max_ttl (24h): refused, nothing changes.
    for body in [json!({"ttl": "48h"}), json!({"ttl": "24h1s"})] {
        let msg = assert_error(&extend(&body), 400, "BAD_REQUEST");
        assert!(names_field(&msg, "ttl"), "message should name ttl: {msg}");
    }
    // Bad bodies.
    for body in [
        json!({}),
        json!({"ttl": "soon"}),
        json!({"ttl": 60}),
        json!({"ttl": "-5m"}),
        json!({"ttl": "1h", "extra": 1}),
    ] {
        assert_error(&extend(&body), 400, "BAD_REQUEST");
    }
    let got = get_sandbox(&daemon, &id).json();
    assert_eq!(
        got["expires_at"], extended["expires_at"],
        "refused extend changed it"
    );

    // Unknown and destroyed sandboxes.
    let unknown = daemon.send(
        &Request::post(&format!("{SANDBOXES}/sb-0000000000000000/extend"))
            .json(&json!({"ttl": "1h"})),
    );
    assert_error(&unknown, 404, "NOT_FOUND");
    destroy_ok(&daemon, &id);
    assert_error(&extend(&json!({"ttl": "1h"})), 404, "NOT_FOUND");
}

#[test]
fn idempotency_key_replays_the_first_spawn() {
    let daemon = Daemon::start();
    let req = spawn_req(&json!({"image": "alpine"})).header("Idempotency-Key", "retry-1");
    let first = daemon.send(&req);
    assert_status(&first, 201);
    let first = first.json();
    let second = daemon.send(&req);
    assert_status(&second, 201);
    assert_eq!(
        second.json()["id"],
        first["id"],
        "a retry made a second sandbox"
    );
    assert_eq!(list(&daemon).len(), 1);
    assert_eq!(markers(&daemon.data_dir()).len(), 1);

    // Another key is another sandbox.
    let other = daemon.send(&spawn_req(&json!({})).header("Idempotency-Key", "retry-2"));
    assert_status(&other, 201);
    assert_ne!(other.json()["id"], first["id"]);
    assert_eq!(list(&daemon).len(), 2);

    // Concurrent retries with one key: one sandbox, every answer names it.
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let addr = daemon.addr;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut client = common::Client::connect(addr);
                barrier.wait();
                client.request(&spawn_req(&json!({})).header("Idempotency-Key", "burst"))
            })
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut ids = BTreeSet::new();
    for resp in &answers {
        assert_status(resp, 201);
        ids.insert(id_of(&resp.json()));
    }
    assert_eq!(ids.len(), 1, "concurrent retries created {ids:?}");
    assert_eq!(list(&daemon).len(), 3);
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 3);

    // A bad key is refused.
    let bad = daemon.send(&spawn_req(&json!({})).header("Idempotency-Key", &"k".repeat(300)));
    assert_error(&bad, 400, "BAD_REQUEST");
    assert_eq!(list(&daemon).len(), 3);
}

#[test]
fn bad_input_is_refused_and_creates_nothing() {
    let daemon = Daemon::start();
    // (body, status, field the message must name)
    let huge = 1u64 << 40;
    let many_entries: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"ttl": "5x"}), 400, "ttl"),
        (json!({"ttl": "-1s"}), 400, "ttl"),
        (json!({"ttl": 7}), 400, "ttl"),
        (json!({"ttl": "0s"}), 400, "ttl"),
        (json!({"ttl": ""}), 400, "ttl"),
        (json!({"memory_mb": 0}), 400, "memory_mb"),
        (json!({"memory_mb": -1}), 400, "memory_mb"),
        (json!({"memory_mb": huge}), 400, "memory_mb"),
        (json!({"memory_mb": 1.5}), 400, "memory_mb"),
        (json!({"memory_mb": "512"}), 400, "memory_mb"),
        (json!({"vcpus": 0}), 400, "vcpus"),
        (json!({"vcpus": -2}), 400, "vcpus"),
        (json!({"vcpus": 100_000}), 400, "vcpus"),
        (json!({"provider": "firecracker"}), 404, "firecracker"),
        (json!({"provider": 3}), 400, "provider"),
        (json!({"bogus": true}), 400, "bogus"),
        (json!({"metadata": {"a": 1}}), 400, "metadata"),
        (json!({"metadata": {"a": null}}), 400, "metadata"),
        (json!({"metadata": ["a"]}), 400, "metadata"),
        (
            json!({"metadata": {"k": "v".repeat(5000)}}),
            400,
            "metadata",
        ),
        (json!({"metadata": {"": "v"}}), 400, "metadata"),
        (json!({"metadata": many_entries}), 400, "metadata"),
        (json!({"memory_mb": 65_537}), 400, "memory_mb"),
        (json!({"owner_id": "../x"}), 400, "owner_id"),
        (json!({"owner_id": "a b"}), 400, "owner_id"),
        (json!({"owner_id": "x;drop"}), 400, "owner_id"),
        (json!({"owner_id": "o".repeat(200)}), 400, "owner_id"),
        (json!({"owner_id": 5}), 400, "owner_id"),
        (json!({"image": 5}), 400, "image"),
    ];
    for (body, status, field) in &cases {
        for path in [SANDBOXES, ADMISSION] {
            let resp = daemon.send(&Request::post(path).json(body));
            let code = if *status == 404 {
                "NOT_FOUND"
            } else {
                "BAD_REQUEST"
            };
            assert_eq!(
                resp.status, *status,
                "POST {path} {body}: expected {status}; response:\n{resp}"
            );
            let msg = assert_error(&resp, *status, code);
            assert!(
                names_field(&msg, field),
                "POST {path} {body}: message should name {field:?}: {msg}"
            );
        }
    }
    // A hostile owner in the header is refused too.
    for owner in ["../x", "a b", "x/y"] {
        let resp = daemon.send(&spawn_req(&json!({})).header("X-User-ID", owner));
        let msg = assert_error(&resp, 400, "BAD_REQUEST");
        assert!(names_field(&msg, "owner_id"), "{owner:?}: {msg}");
    }
    // Not JSON, or not an object.
    for raw in ["{", "[]", "\"x\"", "null", "{\"ttl\":\"1m\",}"] {
        let resp = daemon.send(
            &Request::post(SANDBOXES)
                .header("Content-Type", "application/json")
                .body(raw),
        );
        assert_error(&resp, 400, "BAD_REQUEST");
    }
    assert_nothing_created(&daemon, "bad input");
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 0);
    assert_eq!(scheduler(&daemon)["reservations"], 0);
    // The daemon still serves.
    spawn_ok(&daemon, &json!({}));
}

#[test]
fn admission_preflight_answers_and_creates_nothing() {
    let daemon = Daemon::start();
    let ok = admission(&daemon, &json!({"ttl": "1h", "owner_id": "alice"}));
    assert_eq!(ok["allowed"], true, "{ok}");
    assert_eq!(ok["queueable"], false, "{ok}");
    assert!(ok.get("reason").is_none(), "{ok}");
    assert_eq!(ok["selected_worker_id"], "local", "{ok}");
    assert_eq!(ok["worker_reason"], "local_fallback", "{ok}");
    assert_eq!(ok["eligible_workers"], 1, "{ok}");
    assert_eq!(ok["active_sandboxes"], 0, "{ok}");
    assert_eq!(ok["max_sandboxes"], 1000, "{ok}");
    assert_eq!(ok["max_ttl"], "24h", "{ok}");
    assert_eq!(ok["active_owner_sandboxes"], 0, "{ok}");
    assert!(ok["rejections"].is_object(), "{ok}");

    // The limits are inclusive.
    let edge = admission(
        &daemon,
        &json!({"ttl": "24h", "memory_mb": 65_536, "vcpus": 64}),
    );
    assert_eq!(edge["allowed"], true, "{edge}");
    let long = admission(&daemon, &json!({"ttl": "48h"}));
    assert_eq!(long["allowed"], false, "{long}");
    assert_eq!(long["reason"], "max_ttl", "{long}");
    assert_nothing_created(&daemon, "admission preflight");

    // The spawn itself is refused for the same reason.
    let refused = spawn(&daemon, &json!({"ttl": "48h"}));
    let msg = assert_error(&refused, 429, "RESOURCE_LIMIT");
    assert!(names_field(&msg, "max_ttl"), "{msg}");
    assert_nothing_created(&daemon, "spawn over max_ttl");

    // After a spawn the preflight counts it.
    spawn_ok(&daemon, &json!({"owner_id": "alice"}));
    let counted = admission(&daemon, &json!({"owner_id": "alice"}));
    assert_eq!(counted["active_sandboxes"], 1, "{counted}");
    assert_eq!(counted["active_owner_sandboxes"], 1, "{counted}");
    assert_eq!(list(&daemon).len(), 1);
}

#[test]
fn max_sandboxes_limit() {
    let daemon = Daemon::builder()
        .config("[sandboxes]\nmax_sandboxes = 2\n")
        .start();
    let a = id_of(&spawn_ok(&daemon, &json!({})));
    spawn_ok(&daemon, &json!({}));
    let refused = spawn(&daemon, &json!({}));
    let msg = assert_error(&refused, 429, "RESOURCE_LIMIT");
    assert!(names_field(&msg, "max_sandboxes"), "{msg}");
    assert_eq!(list(&daemon).len(), 2);
    assert_eq!(markers(&daemon.data_dir()).len(), 2);

    let pre = admission(&daemon, &json!({}));
    assert_eq!(pre["allowed"], false, "{pre}");
    assert_eq!(pre["reason"], "max_sandboxes", "{pre}");
    assert_eq!(pre["active_sandboxes"], 2, "{pre}");
    assert_eq!(pre["max_sandboxes"], 2, "{pre}");

    // A destroy frees a slot.
    destroy_ok(&daemon, &a);
    spawn_ok(&daemon, &json!({}));
    assert_error(&spawn(&daemon, &json!({})), 429, "RESOURCE_LIMIT");
}

#[test]
fn limits_follow_a_reload() {
    let daemon = Daemon::builder()
        .config("[sandboxes]\nmax_sandboxes = 1\n")
        .start();
    spawn_ok(&daemon, &json!({}));
    assert_error(&spawn(&daemon, &json!({})), 429, "RESOURCE_LIMIT");
    daemon.write_config("[sandboxes]\nmax_sandboxes = 3\n");
    daemon.sighup();
    poll_until(
        Duration::from_secs(10),
        "max_sandboxes 3 after SIGHUP",
        || admission(&daemon, &json!({}))["max_sandboxes"] == 3,
    );
    spawn_ok(&daemon, &json!({}));
    spawn_ok(&daemon, &json!({}));
    assert_error(&spawn(&daemon, &json!({})), 429, "RESOURCE_LIMIT");
    assert_eq!(list(&daemon).len(), 3);
}

#[test]
fn max_per_owner_limit() {
    let daemon = Daemon::builder()
        .config("[sandboxes]\nmax_per_owner = 1\n")
        .start();
    spawn_ok(&daemon, &json!({"owner_id": "alice"}));
    let refused = spawn(&daemon, &json!({"owner_id": "alice"}));
    let msg = assert_error(&refused, 429, "RESOURCE_LIMIT");
    assert!(names_field(&msg, "max_sandboxes_per_owner"), "{msg}");
    // The header owner counts the same as the body owner.
    let by_header =
        daemon.send(&spawn_req(&json!({"owner_id": "bob"})).header("X-User-ID", "alice"));
    assert_error(&by_header, 429, "RESOURCE_LIMIT");
    // Other owners, and no owner, are not limited by alice's sandbox.
    let bob = daemon.send(&spawn_req(&json!({})).header("X-User-ID", "bob"));
    assert_status(&bob, 201);
    assert_eq!(bob.json()["owner_id"], "bob");
    spawn_ok(&daemon, &json!({}));
    spawn_ok(&daemon, &json!({}));
    assert_eq!(list(&daemon).len(), 4);

    let pre = admission(&daemon, &json!({"owner_id": "bob"}));
    assert_eq!(pre["allowed"], false, "{pre}");
    assert_eq!(pre["reason"], "max_sandboxes_per_owner", "{pre}");
    assert_eq!(pre["active_owner_sandboxes"], 1, "{pre}");
    assert_eq!(pre["max_owner_sandboxes"], 1, "{pre}");
}

#[test]
fn reaper_destroys_expired_sandboxes() {
    let daemon = Daemon::builder()
        .config("[sandboxes]\nreap_interval = \"100ms\"\n")
        .start();
    let keep = id_of(&spawn_ok(&daemon, &json!({"ttl": "1h"})));
    let short = id_of(&spawn_ok(&daemon, &json!({"ttl": "1s"})));
    poll_until(
        Duration::from_secs(10),
        "the reaper to destroy the 1s sandbox",
        || get_sandbox(&daemon, &short).status == 404,
    );
    assert_eq!(list_ids(&daemon), vec![keep.clone()]);
    let runtimes = markers(&daemon.data_dir());
    assert!(
        !runtimes.contains(&short),
        "reaped runtime left: {runtimes:?}"
    );
    assert!(runtimes.contains(&keep));
    let l = lease(&daemon, &short);
    assert!(lease_is_free(&l), "lease of reaped sandbox held: {l}");
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 1);
}

#[test]
fn prune_destroys_only_expired_sandboxes() {
    // A reaper that never runs during the test, so prune has work to do.
    let daemon = Daemon::builder()
        .config("[sandboxes]\nreap_interval = \"1h\"\n")
        .start();
    let keep = id_of(&spawn_ok(&daemon, &json!({"ttl": "1h"})));
    let expiring: Vec<Value> = (0..2)
        .map(|_| spawn_ok(&daemon, &json!({"ttl": "1s"})))
        .collect();
    let last_expiry = expiring
        .iter()
        .map(|s| rfc3339_millis(s["expires_at"].as_str().unwrap()))
        .max()
        .unwrap();
    poll_until(Duration::from_secs(5), "the short ttl to pass", || {
        now_millis() > last_expiry
    });
    // Expired but not yet reaped: still listed.
    assert_eq!(list(&daemon).len(), 3);

    let resp = daemon.send(&Request::delete(SANDBOXES));
    assert_status(&resp, 200);
    assert_eq!(resp.json(), json!({"pruned": 2}));
    assert_eq!(list_ids(&daemon), vec![keep.clone()]);
    for s in &expiring {
        assert_error(&get_sandbox(&daemon, &id_of(s)), 404, "NOT_FOUND");
    }
    assert_eq!(
        markers(&daemon.data_dir()).into_iter().collect::<Vec<_>>(),
        vec![keep]
    );
    let again = daemon.send(&Request::delete(SANDBOXES));
    assert_status(&again, 200);
    assert_eq!(again.json(), json!({"pruned": 0}));
}

#[test]
fn failing_provider_leaves_nothing_behind() {
    let daemon = Daemon::builder()
        .config("[providers.mock]\nfailure_rate = 1.0\n")
        .start();
    let resp = spawn(&daemon, &json!({"image": "alpine"}));
    assert_error(&resp, 500, "INTERNAL_ERROR");

    let listed = list(&daemon);
    assert!(
        listed.iter().all(|s| s["state"] != "running"),
        "a failed spawn is listed as running: {listed:?}"
    );
    assert_eq!(listed.len(), 1, "the failed spawn's record: {listed:?}");
    let record = &listed[0];
    assert_eq!(record["state"], "error", "{record}");
    let id = id_of(record);
    assert!(is_sandbox_id(&id));
    assert!(
        markers(&daemon.data_dir()).is_empty(),
        "runtime left behind: {:?}",
        markers(&daemon.data_dir())
    );
    let l = lease(&daemon, &id);
    assert!(lease_is_free(&l), "lease of failed spawn still held: {l}");
    // No reservation or live count leaks.
    assert_eq!(scheduler(&daemon)["reservations"], 0);
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 0);
    assert_eq!(admission(&daemon, &json!({}))["active_sandboxes"], 0);

    // The failed record can be destroyed.
    destroy_ok(&daemon, &id);
    assert_eq!(list(&daemon), Vec::<Value>::new());
}

#[test]
fn hanging_provider_times_out_and_the_late_runtime_is_removed() {
    let latency = Duration::from_secs(2);
    let daemon = Daemon::builder()
        .config("[sandboxes]\nprovider_timeout = \"200ms\"\n\n[providers.mock]\nlatency = \"2s\"\n")
        .start();
    let started = Instant::now();
    let resp = spawn(&daemon, &json!({}));
    let took = started.elapsed();
    assert_error(&resp, 503, "UNAVAILABLE");
    assert!(
        resp.header("Retry-After").is_some(),
        "503 without Retry-After:\n{resp}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "spawn against a hanging provider took {took:?}"
    );

    let listed = list(&daemon);
    assert!(
        listed.iter().all(|s| s["state"] != "running"),
        "timed-out spawn listed as running: {listed:?}"
    );
    let ids: Vec<String> = listed.iter().map(id_of).collect();
    for id in &ids {
        let l = lease(&daemon, id);
        assert!(
            lease_is_free(&l),
            "lease of timed-out spawn still held: {l}"
        );
    }

    // The provider finishes the abandoned spawn at `latency`, and the daemon
    // must then remove that late runtime (its destroy takes `latency` too).
    // The mock offers no completion signal, so the poll ends only once every
    // provider call this spawn started (each `latency` long, the last one
    // starting when the spawn returns) must have returned, with no runtime.
    let horizon = latency * 2 + Duration::from_millis(600);
    let mut seen = BTreeSet::new();
    poll_until_ok(
        Duration::from_secs(15),
        "the late runtime of the timed-out spawn to be removed",
        || {
            let now = markers(&daemon.data_dir());
            seen.extend(now.iter().cloned());
            if started.elapsed() >= horizon && now.is_empty() {
                Ok(())
            } else {
                Err(format!("runtimes: {now:?}"))
            }
        },
    );
    for id in &seen {
        assert!(ids.contains(id), "runtime {id} has no record at all");
    }
    assert_eq!(scheduler(&daemon)["reservations"], 0);
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 0);
    assert!(list(&daemon).iter().all(|s| s["state"] != "running"));
}

/// The value of the one sample line that starts with `series` (name and
/// labels exactly as rendered), if there is one.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("sample value"))
}

fn requests_series(route: &str, method: &str, code: u16) -> String {
    format!("stacyvmd_http_requests_total{{route=\"{route}\",method=\"{method}\",code=\"{code}\"}}")
}

fn one_path() -> &'static str {
    "/api/v1/sandboxes/{id}"
}

#[test]
fn sandbox_routes_are_counted_in_http_metrics() {
    let daemon = Daemon::start();
    let id = id_of(&spawn_ok(&daemon, &json!({})));
    spawn_ok(&daemon, &json!({}));
    assert_status(&get_sandbox(&daemon, &id), 200);
    destroy_ok(&daemon, &id);
    assert_error(&destroy(&daemon, &id), 404, "NOT_FOUND");
    // A request is counted after its answer is written: the last one may
    // reach the counters just after the client has read it.
    let last = requests_series(one_path(), "DELETE", 404);
    poll_until(
        Duration::from_secs(5),
        "the last request to be counted",
        || sample(&daemon.get("/metrics").text(), &last) == Some(1.0),
    );
    let text = daemon.get("/metrics").text();
    let requests = requests_series;
    let one = one_path();
    for (series, expected) in [
        (requests(SANDBOXES, "POST", 201), 2.0),
        (requests(one, "GET", 200), 1.0),
        (requests(one, "DELETE", 200), 1.0),
        (requests(one, "DELETE", 404), 1.0),
        (
            format!(
                "stacyvmd_http_request_duration_seconds_count\
                 {{route=\"{SANDBOXES}\",method=\"POST\"}}"
            ),
            2.0,
        ),
    ] {
        assert_eq!(
            sample(&text, &series),
            Some(expected),
            "{series} in /metrics:\n{text}"
        );
    }
}

#[test]
fn idempotent_retry_of_a_failed_spawn_is_not_a_success() {
    let daemon = Daemon::builder()
        .config("[providers.mock]\nfailure_rate = 1.0\n")
        .start();
    let req = spawn_req(&json!({})).header("Idempotency-Key", "fails");
    assert_error(&daemon.send(&req), 500, "INTERNAL_ERROR");
    // The first result was a failure: a retry may fail again or try again,
    // but must not report success with the failed (state "error") record.
    let retry = daemon.send(&req);
    assert!(
        retry.status != 201 || retry.json()["state"] == "running",
        "a retry of a failed spawn answered 201 with a sandbox that is not running:\n{retry}"
    );
}

#[test]
fn idempotent_retry_during_the_first_spawn_gets_the_first_result() {
    let daemon = Daemon::builder()
        .config("[providers.mock]\nlatency = \"1s\"\n")
        .start();
    let addr = daemon.addr;
    let key_req = || spawn_req(&json!({})).header("Idempotency-Key", "slow");
    let first = thread::spawn(move || common::Client::connect(addr).request(&key_req()));
    poll_until(
        Duration::from_secs(5),
        "the first spawn to be recorded",
        || list(&daemon).iter().any(|s| s["state"] == "creating"),
    );
    let retry = daemon.send(&key_req());
    let first = first.join().expect("first spawn");
    assert_status(&first, 201);
    // The retry may wait for the first result or be refused (409), but a
    // 201 must be that result, not a half-made sandbox.
    assert!(
        retry.status == 409 || (retry.status == 201 && retry.json() == first.json()),
        "retry while the first spawn runs:\n{retry}\nfirst answer:\n{first}"
    );
    assert_eq!(list(&daemon).len(), 1);
}

/// The ids of the listed sandboxes in this state.
fn ids_in_state(daemon: &Daemon, state: &str) -> BTreeSet<String> {
    list(daemon)
        .iter()
        .filter(|s| s["state"] == state)
        .map(id_of)
        .collect()
}

#[test]
fn destroy_during_spawn_is_refused_or_wins() {
    // The executor has 4 threads: 4 slow spawns occupy them, so the spawn
    // under test and the destroy sent while it is `creating` queue up and
    // reach the provider at nearly the same moment. Whatever the order, a
    // destroy answered 200 must stay done (no record, no runtime, no lease
    // held), and a refused one must leave the spawn whole. The race is
    // repeated a few times, since the provider's timing decides the order.
    let daemon = Daemon::builder()
        .config("[server]\nhttp_threads = 12\n\n[providers.mock]\nlatency = \"150ms\"\n")
        .start();
    let addr = daemon.addr;
    let spawn_in_background =
        || thread::spawn(move || common::Client::connect(addr).request(&spawn_req(&json!({}))));
    for attempt in 0..12 {
        let busy: Vec<_> = (0..4).map(|_| spawn_in_background()).collect();
        poll_until(Duration::from_secs(5), "4 spawns in flight", || {
            ids_in_state(&daemon, "creating").len() == 4
        });
        let occupied = ids_in_state(&daemon, "creating");
        let spawning = spawn_in_background();
        let mut id = String::new();
        poll_until(
            Duration::from_secs(5),
            "the spawn to be recorded",
            || match ids_in_state(&daemon, "creating")
                .into_iter()
                .find(|i| !occupied.contains(i))
            {
                Some(found) => {
                    id = found;
                    true
                }
                None => false,
            },
        );
        let destroyed = destroy(&daemon, &id);
        let spawned = spawning.join().expect("spawn thread");
        for b in busy {
            assert_status(&b.join().expect("busy spawn"), 201);
        }
        let got = get_sandbox(&daemon, &id);
        let runtime = markers(&daemon.data_dir()).contains(&id);
        let what = format!(
            "attempt {attempt}: DELETE during spawn of {id} answered {}, the spawn {}; \
             afterwards GET {} {}, runtime marker present: {runtime}",
            destroyed.status,
            spawned.status,
            got.status,
            got.text()
        );
        match destroyed.status {
            200 => {
                assert_eq!(got.status, 404, "acknowledged destroy undone: {what}");
                assert!(
                    !runtime,
                    "runtime left after an acknowledged destroy: {what}"
                );
                let l = lease(&daemon, &id);
                assert!(lease_is_free(&l), "lease held after destroy: {l}; {what}");
            }
            409 => {
                assert_status(&spawned, 201);
                assert_eq!(got.json()["state"], "running", "{what}");
                assert!(runtime, "{what}");
            }
            _ => panic!("{what}\n{destroyed}"),
        }
    }
    let running = ids_in_state(&daemon, "running");
    assert_eq!(
        markers(&daemon.data_dir()),
        running,
        "runtimes and running records differ"
    );
    assert_eq!(
        worker(&daemon, "local")["active_sandboxes"].as_u64(),
        Some(running.len() as u64),
        "the scheduler's count differs from the running records"
    );
    assert_eq!(scheduler(&daemon)["reservations"], 0);
}

#[test]
fn hanging_destroy_leaves_a_consistent_sandbox() {
    let timeout = "[sandboxes]\nprovider_timeout = \"200ms\"\n";
    let mut daemon = Daemon::builder().config(timeout).start();
    let id = id_of(&spawn_ok(&daemon, &json!({})));
    assert_eq!(daemon.stop().code(), Some(0));
    // The same runtime, now behind a provider that takes 1 s per call.
    daemon.write_config(&format!("{timeout}\n[providers.mock]\nlatency = \"1s\"\n"));
    let daemon = daemon.restart();

    let started = Instant::now();
    let resp = destroy(&daemon, &id);
    assert_error(&resp, 503, "UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_millis(1500));

    // Once the provider's late destroy has returned (no signal but its
    // latency), the sandbox must be whole or gone: a running record keeps
    // its runtime and its lease; otherwise no runtime is left.
    let horizon = Duration::from_millis(1000 + 600);
    poll_until_ok(
        Duration::from_secs(10),
        "a whole or gone sandbox after a timed-out destroy",
        || {
            let got = get_sandbox(&daemon, &id);
            let runtime = markers(&daemon.data_dir()).contains(&id);
            let l = lease(&daemon, &id);
            let running = got.status == 200 && got.json()["state"] == "running";
            let consistent = if running {
                runtime && l["holder_id"] == "local" && l["expired"] == false
            } else {
                !runtime
            };
            if started.elapsed() >= horizon && consistent {
                Ok(())
            } else {
                Err(format!(
                    "GET {} {}; runtime marker present: {runtime}; lease {l}",
                    got.status,
                    got.text()
                ))
            }
        },
    );
    assert_eq!(scheduler(&daemon)["reservations"], 0);
}

/// Restart reclaim: a lease still held is kept as it is; a lapsed or a
/// released one is taken back with a new generation; a missing one is
/// created; one a rival holds unexpired is left alone, and its sandbox is
/// neither marked lost nor touched. All four sandboxes keep running.
#[test]
fn restart_reclaims_only_the_leases_it_does_not_hold() {
    let mut daemon = Daemon::builder().start();
    let ids: Vec<String> = (0..5)
        .map(|_| id_of(&spawn_ok(&daemon, &json!({"ttl": "1h"}))))
        .collect();
    let before: Vec<Value> = ids.iter().map(|id| lease(&daemon, id)).collect();
    assert_eq!(daemon.stop().code(), Some(0));
    let (held, lapsed, released, missing, rival) = (&ids[0], &ids[1], &ids[2], &ids[3], &ids[4]);
    let far = now_millis() + 60 * MINUTE_MS;
    {
        let db = rusqlite::Connection::open(&daemon.db).expect("open the database");
        db.execute(
            "UPDATE leases SET expires_at = ?2 WHERE resource_id = ?1",
            rusqlite::params![held, far],
        )
        .unwrap();
        db.execute(
            "UPDATE leases SET expires_at = 1 WHERE resource_id = ?1",
            [lapsed],
        )
        .unwrap();
        db.execute(
            "UPDATE leases SET holder_id = '' WHERE resource_id = ?1",
            [released],
        )
        .unwrap();
        db.execute("DELETE FROM leases WHERE resource_id = ?1", [missing])
            .unwrap();
        db.execute(
            "UPDATE leases SET holder_id = 'rival', expires_at = ?2 WHERE resource_id = ?1",
            rusqlite::params![rival, far],
        )
        .unwrap();
    }
    let daemon = daemon.restart();

    let generation = |l: &Value| l["generation"].as_u64().unwrap();
    let after_held = lease(&daemon, held);
    assert_eq!(after_held["holder_id"], "local", "{after_held}");
    assert_eq!(
        generation(&after_held),
        generation(&before[0]),
        "{after_held}"
    );
    assert_eq!(
        after_held["acquired_at"], before[0]["acquired_at"],
        "{after_held}"
    );
    for (id, old) in [(lapsed, &before[1]), (released, &before[2])] {
        let l = lease(&daemon, id);
        assert_eq!(l["holder_id"], "local", "{l}");
        assert_eq!(l["expired"], false, "{l}");
        assert_eq!(generation(&l), generation(old) + 1, "{l}");
    }
    let created = lease(&daemon, missing);
    assert_eq!(created["holder_id"], "local", "{created}");
    assert_eq!(created["expired"], false, "{created}");
    assert_eq!(generation(&created), 1, "{created}");
    let rivals = lease(&daemon, rival);
    assert_eq!(rivals["holder_id"], "rival", "{rivals}");
    assert_eq!(generation(&rivals), generation(&before[4]), "{rivals}");

    for id in &ids {
        let got = get_sandbox(&daemon, id);
        assert_status(&got, 200);
        assert_eq!(got.json()["state"], "running", "{id}: {}", got.text());
    }
    assert_eq!(
        markers(&daemon.data_dir()),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(
        worker(&daemon, "local")["active_sandboxes"].as_u64(),
        Some(5)
    );
}

/// The StacyVM SDK builds `SpawnAdmissionDecision(**answer)`, so any field
/// it does not know is a TypeError in the client: by default the answer
/// has only its fields (placement detail with `?detail=placement`).
#[test]
fn the_default_admission_answer_has_only_the_sdks_fields() {
    let daemon = Daemon::builder()
        .config("[sandboxes]\nmax_per_owner = 2\n")
        .start();
    const SDK_FIELDS: &[&str] = &[
        "allowed",
        "queueable",
        "reason",
        "active_sandboxes",
        "max_sandboxes",
        "active_owner_sandboxes",
        "max_owner_sandboxes",
        "max_ttl",
    ];
    for body in [
        json!({}),
        json!({"owner_id": "alice"}),
        json!({"ttl": "999h"}),
    ] {
        let resp = daemon.send(&Request::post(ADMISSION).json(&body));
        assert_status(&resp, 200);
        let answer = resp.json();
        let keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
        for key in &keys {
            assert!(
                SDK_FIELDS.contains(&key.as_str()),
                "{body}: field {key} in {answer}"
            );
        }
        assert!(keys.len() >= 5, "{answer}");
    }
    let detailed = admission(&daemon, &json!({}));
    assert_eq!(detailed["worker_reason"], "local_fallback", "{detailed}");
    let bad =
        daemon.send(&Request::post(&format!("{ADMISSION}?detail=everything")).json(&json!({})));
    assert_error(&bad, 400, "BAD_REQUEST");
}
