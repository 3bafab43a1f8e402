//! Worker-aware placement against the real binary: capacity counting
//! reservations in flight, spread and binpack with a second (remote)
//! worker, filtering with per-reason rejection counts, and the scheduler
//! status route.

use crate::common;
use crate::sandbox_support;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::{Client, Daemon, Response, assert_error, assert_status, names_field, poll_until};
use sandbox_support::{
    admission, destroy_ok, id_of, list, markers, scheduler, spawn, spawn_ok, spawn_req, worker,
};
use serde_json::{Value, json};

#[test]
fn concurrent_spawns_never_overshoot_capacity() {
    // A little provider latency keeps many spawns in flight at once, so
    // capacity must count reservations, not only finished sandboxes.
    let daemon = Daemon::builder()
        .config("[worker]\nmax_sandboxes = 5\n\n[providers.mock]\nlatency = \"50ms\"\n")
        .start();
    let threads = 8;
    let per_thread = 3;
    let barrier = Arc::new(Barrier::new(threads));
    let addr = daemon.addr;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                barrier.wait();
                (0..per_thread)
                    .map(|_| client.request(&spawn_req(&json!({}))))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<Response> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("spawn thread"))
        .collect();
    assert_eq!(answers.len(), threads * per_thread);

    let created: Vec<&Response> = answers.iter().filter(|r| r.status == 201).collect();
    assert_eq!(
        created.len(),
        5,
        "exactly worker.max_sandboxes spawns may succeed; statuses: {:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for resp in answers.iter().filter(|r| r.status != 201) {
        let msg = assert_error(resp, 429, "RESOURCE_LIMIT");
        assert!(names_field(&msg, "worker_unavailable"), "{msg}");
        assert!(
            names_field(&msg, "full"),
            "the message should count the full worker: {msg}"
        );
    }
    let local = worker(&daemon, "local");
    assert_eq!(local["active_sandboxes"], 5, "{local}");
    assert_eq!(
        local["eligible"], false,
        "a full worker is not eligible: {local}"
    );
    assert_eq!(list(&daemon).len(), 5);
    assert_eq!(markers(&daemon.data_dir()).len(), 5);
    assert_eq!(scheduler(&daemon)["reservations"], 0);

    let pre = admission(&daemon, &json!({}));
    assert_eq!(pre["allowed"], false, "{pre}");
    assert_eq!(pre["reason"], "worker_unavailable", "{pre}");
    assert_eq!(pre["worker_reason"], "no_eligible_worker", "{pre}");
    assert_eq!(pre["eligible_workers"], 0, "{pre}");
    assert_eq!(pre["rejections"], json!({"full": 1}), "{pre}");

    // Destroying one frees exactly one slot.
    destroy_ok(&daemon, &id_of(&created[0].json()));
    let again = spawn_ok(&daemon, &json!({}));
    assert_eq!(again["worker_id"], "local");
    assert_error(&spawn(&daemon, &json!({})), 429, "RESOURCE_LIMIT");
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 5);
}

/// Sends `n` spawns at once (one connection each), with these headers.
fn concurrent_spawns(daemon: &Daemon, n: usize, headers: &[(&str, &str)]) -> Vec<Response> {
    let barrier = Arc::new(Barrier::new(n));
    let req = headers
        .iter()
        .fold(spawn_req(&json!({})), |r, (k, v)| r.header(k, v));
    let addr = daemon.addr;
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, req) = (barrier.clone(), req.clone());
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                barrier.wait();
                client.request(&req)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("spawn thread"))
        .collect()
}

#[test]
fn concurrent_spawns_never_overshoot_fleet_or_owner_limits() {
    let daemon = Daemon::builder()
        .config(concat!(
            "[sandboxes]\nmax_sandboxes = 3\nmax_per_owner = 2\n\n",
            "[providers.mock]\nlatency = \"50ms\"\n",
        ))
        .start();
    let alice = concurrent_spawns(&daemon, 8, &[("X-User-ID", "alice")]);
    let ok = alice.iter().filter(|r| r.status == 201).count();
    assert_eq!(ok, 2, "max_per_owner = 2 overshot or undershot");
    for resp in alice.iter().filter(|r| r.status != 201) {
        let msg = assert_error(resp, 429, "RESOURCE_LIMIT");
        assert!(names_field(&msg, "max_sandboxes_per_owner"), "{msg}");
    }
    let anyone = concurrent_spawns(&daemon, 8, &[]);
    let ok = anyone.iter().filter(|r| r.status == 201).count();
    assert_eq!(ok, 1, "max_sandboxes = 3 overshot or undershot");
    for resp in anyone.iter().filter(|r| r.status != 201) {
        let msg = assert_error(resp, 429, "RESOURCE_LIMIT");
        assert!(names_field(&msg, "max_sandboxes"), "{msg}");
    }
    assert_eq!(list(&daemon).len(), 3);
    let pre = admission(&daemon, &json!({"owner_id": "alice"}));
    assert_eq!(pre["active_sandboxes"], 3, "{pre}");
    assert_eq!(pre["active_owner_sandboxes"], 2, "{pre}");
    assert_eq!(scheduler(&daemon)["reservations"], 0);
}

fn register(daemon: &Daemon, id: &str, body: &Value) {
    let resp = daemon.heartbeat(id, body);
    assert_status(&resp, 200);
}

fn remote_body(max: u32) -> Value {
    json!({
        "hostname": "remote-host",
        "status": "online",
        "providers": ["mock"],
        "capacity": {"max_sandboxes": max},
    })
}

#[test]
fn spread_picks_an_emptier_remote_worker_and_says_it_cannot_reach_it() {
    let daemon = Daemon::builder()
        .config("[scheduler]\npolicy = \"spread\"\n")
        .start();
    // The local worker gets one sandbox, then an empty remote one appears.
    let first = spawn_ok(&daemon, &json!({}));
    register(&daemon, "w-remote", &remote_body(10));

    let refused = spawn(&daemon, &json!({}));
    let msg = assert_error(&refused, 429, "RESOURCE_LIMIT");
    assert!(names_field(&msg, "remote_worker_rpc_unavailable"), "{msg}");
    assert_eq!(
        list(&daemon),
        vec![first.clone()],
        "a refused spawn created something"
    );
    assert_eq!(markers(&daemon.data_dir()).len(), 1);
    assert_eq!(worker(&daemon, "w-remote")["active_sandboxes"], 0);

    let pre = admission(&daemon, &json!({}));
    assert_eq!(pre["allowed"], false, "{pre}");
    assert_eq!(pre["reason"], "remote_worker_rpc_unavailable", "{pre}");
    assert_eq!(pre["worker_reason"], "remote_worker_selected", "{pre}");
    assert_eq!(pre["selected_worker_id"], "w-remote", "{pre}");
    assert_eq!(pre["eligible_workers"], 2, "{pre}");

    let status = scheduler(&daemon);
    assert_eq!(status["policy"], "spread", "{status}");
    assert_eq!(status["selected_worker_id"], "w-remote", "{status}");
    assert_eq!(status["eligible_workers"], 2, "{status}");

    // Switch to binpack by reload: the fuller local worker is chosen.
    daemon.write_config("[scheduler]\npolicy = \"binpack\"\n");
    daemon.sighup();
    poll_until(
        Duration::from_secs(10),
        "policy binpack after SIGHUP",
        || scheduler(&daemon)["policy"] == "binpack",
    );
    let pre = admission(&daemon, &json!({}));
    assert_eq!(pre["allowed"], true, "{pre}");
    assert_eq!(pre["selected_worker_id"], "local", "{pre}");
    assert_eq!(pre["worker_reason"], "local_fallback", "{pre}");
    let placed = spawn_ok(&daemon, &json!({}));
    assert_eq!(placed["worker_id"], "local", "{placed}");
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 2);
}

#[test]
fn binpack_from_config_keeps_filling_the_local_worker() {
    let daemon = Daemon::builder()
        .config("[scheduler]\npolicy = \"binpack\"\n")
        .start();
    assert_eq!(scheduler(&daemon)["policy"], "binpack");
    spawn_ok(&daemon, &json!({}));
    register(&daemon, "w-remote", &remote_body(10));
    for _ in 0..3 {
        let placed = spawn_ok(&daemon, &json!({}));
        assert_eq!(placed["worker_id"], "local", "{placed}");
    }
    assert_eq!(worker(&daemon, "local")["active_sandboxes"], 4);
    assert_eq!(worker(&daemon, "w-remote")["active_sandboxes"], 0);
}

fn status_body(status: &str, providers: &[&str], max: u32) -> Value {
    json!({"status": status, "providers": providers, "capacity": {"max_sandboxes": max}})
}

#[test]
fn ineligible_workers_are_filtered_with_reasons() {
    let daemon = Daemon::builder()
        .config(concat!(
            "[worker]\nheartbeat_interval = \"200ms\"\n",
            "stale_after = \"1500ms\"\ndown_after = \"1h\"\n",
        ))
        .start();
    // Registered once and never again, so it goes stale.
    register(&daemon, "w-stale", &remote_body(10));
    poll_until(Duration::from_secs(10), "w-stale to go stale", || {
        worker(&daemon, "w-stale")["stale"] == true
    });
    register(
        &daemon,
        "w-draining",
        &status_body("draining", &["mock"], 10),
    );
    register(&daemon, "w-full", &remote_body(0));
    register(
        &daemon,
        "w-unhealthy",
        &status_body("unhealthy", &["mock"], 10),
    );
    register(
        &daemon,
        "w-process",
        &status_body("online", &["process"], 10),
    );

    let pre = admission(&daemon, &json!({}));
    assert_eq!(pre["allowed"], true, "{pre}");
    assert_eq!(pre["selected_worker_id"], "local", "{pre}");
    assert_eq!(pre["worker_reason"], "local_fallback", "{pre}");
    assert_eq!(pre["eligible_workers"], 1, "{pre}");
    assert_eq!(
        pre["rejections"],
        json!({
            "draining": 1,
            "full": 1,
            "stale": 1,
            "not_online": 1,
            "provider_unsupported": 1,
        }),
        "{pre}"
    );
    for id in ["w-stale", "w-draining", "w-full", "w-unhealthy"] {
        assert_eq!(worker(&daemon, id)["eligible"], false, "{id}");
    }
    assert_eq!(worker(&daemon, "local")["eligible"], true);
    let placed = spawn_ok(&daemon, &json!({}));
    assert_eq!(placed["worker_id"], "local");
}

#[test]
fn nothing_eligible_is_explained_in_the_refusal() {
    // The local worker has no capacity at all; the only other worker drains.
    let daemon = Daemon::builder()
        .config("[worker]\nmax_sandboxes = 0\n")
        .start();
    register(
        &daemon,
        "w-draining",
        &status_body("draining", &["mock"], 10),
    );
    let refused = spawn(&daemon, &json!({}));
    let msg = assert_error(&refused, 429, "RESOURCE_LIMIT");
    for word in ["worker_unavailable", "full", "draining"] {
        assert!(names_field(&msg, word), "message should name {word}: {msg}");
    }
    let pre = admission(&daemon, &json!({}));
    assert_eq!(pre["allowed"], false, "{pre}");
    assert_eq!(pre["reason"], "worker_unavailable", "{pre}");
    assert_eq!(pre["worker_reason"], "no_eligible_worker", "{pre}");
    assert_eq!(pre["eligible_workers"], 0, "{pre}");
    assert_eq!(
        pre["rejections"],
        json!({"draining": 1, "full": 1}),
        "{pre}"
    );
    assert!(
        pre.get("selected_worker_id").is_none_or(Value::is_null),
        "{pre}"
    );
    assert_eq!(list(&daemon), Vec::<Value>::new());
    let status = scheduler(&daemon);
    assert_eq!(status["eligible_workers"], 0, "{status}");
    assert!(status["selected_worker_id"].is_null(), "{status}");
}

#[test]
fn scheduler_status_fields() {
    let daemon = Daemon::start();
    let status = scheduler(&daemon);
    assert_eq!(status["admission_control"], true, "{status}");
    assert_eq!(status["policy"], "spread", "{status}");
    assert_eq!(status["worker_id"], "local", "{status}");
    assert_eq!(status["selected_worker_id"], "local", "{status}");
    assert_eq!(status["eligible_workers"], 1, "{status}");
    assert_eq!(status["reservations"], 0, "{status}");

    // The worker id follows --worker-id, and so does placement.
    let named = Daemon::builder().args(&["--worker-id", "node-7"]).start();
    let status = scheduler(&named);
    assert_eq!(status["worker_id"], "node-7", "{status}");
    assert_eq!(status["selected_worker_id"], "node-7", "{status}");
    let placed = spawn_ok(&named, &json!({}));
    assert_eq!(placed["worker_id"], "node-7", "{placed}");
}
