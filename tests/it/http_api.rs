//! REST API shapes: health, request ids, error bodies, the worker registry
//! and bad input, against the real binary.

use crate::common;

use std::time::Duration;

use common::{
    Client, Daemon, Request, assert_error, assert_status, id_set, ids, names_field, now_millis,
    rfc3339_millis,
};
use serde_json::{Value, json};

#[test]
fn health_live_ready_shapes() {
    let daemon = Daemon::start();

    let health = daemon.get("/api/v1/health");
    assert_status(&health, 200);
    assert!(
        health
            .header("Content-Type")
            .is_some_and(|v| v.starts_with("application/json")),
        "health Content-Type:\n{health}"
    );
    let body = health.json();
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert_eq!(body["worker_id"], "local", "{body}");

    assert_status(&daemon.get("/api/v1/live"), 200);
    assert_status(&daemon.get("/api/v1/ready"), 200);
    // The router matches the path, not the query string.
    assert_status(&daemon.get("/api/v1/health?probe=1"), 200);
}

#[test]
fn request_id_is_echoed_or_generated() {
    let daemon = Daemon::start();
    let mut client = daemon.client();

    let echoed =
        client.request(&Request::get("/api/v1/health").header("X-Request-ID", "req-abc-123"));
    assert_status(&echoed, 200);
    assert_eq!(
        echoed.header("X-Request-ID"),
        Some("req-abc-123"),
        "{echoed}"
    );

    let first = client.get("/api/v1/live");
    let second = client.get("/api/v1/live");
    let a = first.header("X-Request-ID").unwrap_or_default().to_string();
    let b = second
        .header("X-Request-ID")
        .unwrap_or_default()
        .to_string();
    assert!(!a.is_empty(), "no generated X-Request-ID:\n{first}");
    assert!(!b.is_empty(), "no generated X-Request-ID:\n{second}");
    assert_ne!(a, b, "generated request ids must differ");

    // Error responses carry one too.
    let missing = client.request(&Request::get("/api/v1/nope").header("X-Request-ID", "req-404"));
    assert_eq!(missing.header("X-Request-ID"), Some("req-404"), "{missing}");
    let bad = client.get("/api/v1/nope");
    assert!(
        bad.header("X-Request-ID").is_some_and(|v| !v.is_empty()),
        "404 without X-Request-ID:\n{bad}"
    );
}

#[test]
fn unknown_route_and_wrong_method_answer_json_errors() {
    let daemon = Daemon::start();
    for path in [
        "/api/v1/nope",
        "/nope",
        "/api/v2/workers",
        "/api/v1/workers/local/extra",
        // Not a public route, whatever the daemon uses internally.
        "/-/handoff",
    ] {
        assert_error(&daemon.get(path), 404, "NOT_FOUND");
    }
    for (method, path) in [
        ("POST", "/api/v1/health"),
        ("DELETE", "/api/v1/workers"),
        ("PUT", "/api/v1/workers/local"),
        ("GET", "/api/v1/admin/workers/local/heartbeat"),
        ("POST", "/api/v1/live"),
    ] {
        let resp = daemon.send(&Request::new(method, path));
        assert_error(&resp, 405, "METHOD_NOT_ALLOWED");
    }
}

/// Asserts every field of the spec's worker object with its JSON type.
#[track_caller]
fn assert_worker_shape(worker: &Value) {
    for key in [
        "id",
        "hostname",
        "status",
        "last_heartbeat",
        "created_at",
        "updated_at",
        "health",
    ] {
        assert!(
            worker[key].is_string(),
            "worker.{key} must be a string: {worker}"
        );
    }
    for key in ["providers", "capabilities"] {
        assert!(
            worker[key].is_array(),
            "worker.{key} must be an array: {worker}"
        );
    }
    assert!(
        worker["capacity"].is_object(),
        "worker.capacity must be an object: {worker}"
    );
    for key in ["stale", "eligible"] {
        assert!(
            worker[key].is_boolean(),
            "worker.{key} must be a bool: {worker}"
        );
    }
    assert!(
        worker["active_sandboxes"].is_u64(),
        "worker.active_sandboxes must be a non-negative integer: {worker}"
    );
    let seen = worker["last_seen_seconds"].as_f64();
    assert!(
        seen.is_some_and(|s| s >= 0.0),
        "worker.last_seen_seconds must be a non-negative number: {worker}"
    );
    for key in ["last_heartbeat", "created_at", "updated_at"] {
        let millis = rfc3339_millis(worker[key].as_str().unwrap());
        let skew = (millis - now_millis()).abs();
        assert!(skew < 3_600_000, "worker.{key} is not about now: {worker}");
    }
    let health = worker["health"].as_str().unwrap();
    assert!(
        ["ready", "suspect", "down"].contains(&health),
        "worker.health {health:?}: {worker}"
    );
}

#[test]
fn local_worker_is_listed_at_start() {
    let daemon = Daemon::start();
    assert_eq!(
        daemon.worker_id, "local",
        "readiness line: {}",
        daemon.ready_line
    );
    let workers = daemon.workers();
    assert_eq!(ids(&workers), ["local"], "{workers:?}");
    let local = &workers[0];
    assert_worker_shape(local);
    assert_eq!(local["status"], "online", "{local}");
    assert_eq!(local["stale"], false, "{local}");
    assert_eq!(local["health"], "ready", "{local}");
    assert_eq!(local["eligible"], true, "{local}");
    assert_eq!(local["providers"], json!(["mock", "process"]), "{local}");
    assert_eq!(local["capacity"]["max_sandboxes"], 64, "{local}");
    assert!(
        !local["hostname"].as_str().unwrap().is_empty(),
        "hostname defaults to the host's name: {local}"
    );

    let one = daemon.get("/api/v1/workers/local");
    assert_status(&one, 200);
    assert_eq!(one.json()["id"], "local");
}

#[test]
fn worker_id_flag_renames_the_local_worker() {
    let daemon = Daemon::builder().args(&["--worker-id", "node-a"]).start();
    assert_eq!(
        daemon.worker_id, "node-a",
        "readiness line: {}",
        daemon.ready_line
    );
    assert_eq!(daemon.worker_ids(), ["node-a"]);
    assert_eq!(daemon.get("/api/v1/health").json()["worker_id"], "node-a");
    assert_error(&daemon.get("/api/v1/workers/local"), 404, "NOT_FOUND");
}

#[test]
fn heartbeat_creates_then_refreshes_a_worker() {
    let daemon = Daemon::start();
    let created = daemon.heartbeat(
        "w-1",
        &json!({
            "hostname": "host-one",
            "status": "online",
            "providers": ["mock", "process"],
            "capabilities": ["gpu"],
            "capacity": {"max_sandboxes": 7}
        }),
    );
    assert_status(&created, 200);
    let first = created.json();
    assert_worker_shape(&first);
    assert_eq!(first["id"], "w-1");
    assert_eq!(first["hostname"], "host-one");
    assert_eq!(first["status"], "online");
    assert_eq!(first["providers"], json!(["mock", "process"]));
    assert_eq!(first["capabilities"], json!(["gpu"]));
    assert_eq!(first["capacity"]["max_sandboxes"], 7);
    assert_eq!(first["stale"], false);
    assert_eq!(first["health"], "ready");
    assert_eq!(first["active_sandboxes"], 0);

    // Heartbeat again until the clock visibly moves (timestamps may have
    // second precision); created_at must never change.
    let first_beat = rfc3339_millis(first["last_heartbeat"].as_str().unwrap());
    let first_updated = rfc3339_millis(first["updated_at"].as_str().unwrap());
    let mut latest = first.clone();
    common::poll_until(Duration::from_secs(5), "last_heartbeat to advance", || {
        let resp = daemon.heartbeat(
            "w-1",
            &json!({"hostname": "host-two", "status": "draining"}),
        );
        assert_status(&resp, 200);
        latest = resp.json();
        assert_eq!(
            latest["created_at"], first["created_at"],
            "created_at changed: {latest}"
        );
        rfc3339_millis(latest["last_heartbeat"].as_str().unwrap()) > first_beat
    });
    assert!(
        rfc3339_millis(latest["updated_at"].as_str().unwrap()) > first_updated,
        "updated_at did not advance: {first} -> {latest}"
    );
    assert_eq!(latest["hostname"], "host-two", "{latest}");
    assert_eq!(latest["status"], "draining", "{latest}");

    let fetched = daemon.get("/api/v1/workers/w-1");
    assert_status(&fetched, 200);
    let fetched = fetched.json();
    assert_worker_shape(&fetched);
    for key in ["id", "hostname", "status", "created_at", "last_heartbeat"] {
        assert_eq!(
            fetched[key], latest[key],
            "GET differs from heartbeat reply in {key}"
        );
    }

    // Blank status (or none at all) means online.
    let blank = daemon.heartbeat("w-1", &json!({"status": ""}));
    assert_status(&blank, 200);
    assert_eq!(blank.json()["status"], "online", "{blank}");
    let no_body = daemon.send(&Request::post("/api/v1/admin/workers/w-2/heartbeat"));
    assert_status(&no_body, 200);
    assert_eq!(no_body.json()["status"], "online", "{no_body}");
    assert_eq!(no_body.json()["id"], "w-2", "{no_body}");
}

#[test]
fn workers_are_listed_by_id_and_admin_aliases_match() {
    let daemon = Daemon::start();
    for id in ["zeta", "alpha", "mid", "Beta", "a-1"] {
        assert_status(&daemon.heartbeat(id, &json!({})), 200);
    }
    let workers = daemon.workers();
    let listed = ids(&workers);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "GET /api/v1/workers must be ordered by id");
    assert_eq!(listed.len(), 6, "{listed:?}");
    for worker in &workers {
        assert_worker_shape(worker);
    }

    let admin = daemon.get("/api/v1/admin/workers");
    assert_status(&admin, 200);
    let admin = admin.json();
    assert_eq!(
        ids(admin.as_array().expect("admin list is an array")),
        listed,
        "admin alias lists the same workers"
    );
    let one = daemon.get("/api/v1/admin/workers/mid");
    assert_status(&one, 200);
    assert_eq!(one.json()["id"], "mid");
    assert_error(&daemon.get("/api/v1/admin/workers/ghost"), 404, "NOT_FOUND");
}

#[test]
fn unknown_worker_is_404_and_delete_removes_it() {
    let daemon = Daemon::start();
    assert_error(&daemon.get("/api/v1/workers/ghost"), 404, "NOT_FOUND");
    assert_error(
        &daemon.send(&Request::delete("/api/v1/admin/workers/ghost")),
        404,
        "NOT_FOUND",
    );

    assert_status(&daemon.heartbeat("doomed", &json!({})), 200);
    let deleted = daemon.send(&Request::delete("/api/v1/admin/workers/doomed"));
    assert_status(&deleted, 200);
    assert_eq!(deleted.json(), json!({"status": "deleted"}));
    assert_error(&daemon.get("/api/v1/workers/doomed"), 404, "NOT_FOUND");
    assert_eq!(daemon.worker_ids(), ["local"]);
    assert_error(
        &daemon.send(&Request::delete("/api/v1/admin/workers/doomed")),
        404,
        "NOT_FOUND",
    );

    // The daemon's own worker cannot be deleted, forced or not.
    for path in [
        "/api/v1/admin/workers/local",
        "/api/v1/admin/workers/local?force=true",
    ] {
        assert_error(&daemon.send(&Request::delete(path)), 409, "CONFLICT");
    }
    assert_eq!(daemon.worker_ids(), ["local"]);
}

#[test]
fn worker_id_limits() {
    let daemon = Daemon::start();
    let longest = "a".repeat(128);
    let resp = daemon.heartbeat(&longest, &json!({}));
    assert_status(&resp, 200);
    assert_eq!(resp.json()["id"], longest.as_str());
    for id in ["node_1.example-2", "UPPER", "x"] {
        assert_status(&daemon.heartbeat(id, &json!({})), 200);
    }
}

#[test]
fn bad_heartbeats_are_400_and_change_nothing() {
    let daemon = Daemon::start();
    assert_status(&daemon.heartbeat("w-ok", &json!({"hostname": "h"})), 200);
    let before = daemon.workers();

    let too_long = "a".repeat(129);
    // (worker id in the path, body, field the message must name)
    let cases: Vec<(&str, &str, &str)> = vec![
        ("w-new", r#"{"status": "#, ""),
        ("w-new", r#"{"hostname": "h",}"#, ""),
        ("w-new", "not json at all", ""),
        ("w-new", "[1, 2]", ""),
        ("w-new", r#"{"status": 5}"#, "status"),
        ("w-new", r#"{"hostname": 7}"#, "hostname"),
        ("w-new", r#"{"providers": "x"}"#, "providers"),
        ("w-new", r#"{"providers": [1]}"#, "providers"),
        ("w-new", r#"{"capabilities": {"a": 1}}"#, "capabilities"),
        (
            "w-new",
            r#"{"capacity": {"max_sandboxes": -1}}"#,
            "max_sandboxes",
        ),
        (
            "w-new",
            r#"{"capacity": {"max_sandboxes": "ten"}}"#,
            "max_sandboxes",
        ),
        ("w-new", r#"{"capacity": 3}"#, "capacity"),
        ("w-new", r#"{"bogus_field": 1}"#, "bogus_field"),
        ("w-ok", r#"{"status": 5}"#, "status"),
        ("w-ok", r#"{"surprise": true}"#, "surprise"),
        ("", "{}", "id"),
        (&too_long, "{}", "id"),
        ("a%2Fb", "{}", "id"),
        ("a%2fb", "{}", "id"),
        ("a%20b", "{}", "id"),
        ("a%09b", "{}", "id"),
        ("a%0Ab", "{}", "id"),
        ("a%01b", "{}", "id"),
        ("a%7Fb", "{}", "id"),
        ("%20", "{}", "id"),
    ];
    let mut witness = Client::connect(daemon.addr);
    for (id, body, field) in &cases {
        let req = Request::post(&format!("/api/v1/admin/workers/{id}/heartbeat"))
            .header("Content-Type", "application/json")
            .body(body.as_bytes());
        let resp = daemon.send(&req);
        let message = assert_error(&resp, 400, "BAD_REQUEST");
        if !field.is_empty() {
            assert!(
                names_field(&message, field)
                    || (*field == "id" && names_field(&message, "worker_id")),
                "message for id {id:?} body {body} must name `{field}`: {message:?}"
            );
        }
        // Another client is served meanwhile.
        assert_status(&witness.get("/api/v1/live"), 200);
    }

    let after = daemon.workers();
    assert_eq!(
        id_set(&after),
        id_set(&before),
        "bad input changed the worker list"
    );
    let ok_before = before.iter().find(|w| w["id"] == "w-ok").unwrap();
    let ok_after = after.iter().find(|w| w["id"] == "w-ok").unwrap();
    for key in [
        "hostname",
        "status",
        "providers",
        "capabilities",
        "capacity",
        "updated_at",
    ] {
        assert_eq!(
            ok_after[key], ok_before[key],
            "bad input changed w-ok.{key}"
        );
    }
}

#[test]
fn body_over_max_body_bytes_is_413() {
    let daemon = Daemon::builder()
        .config("[server]\nmax_body_bytes = 1024\n")
        .start();
    let before = daemon.worker_ids();

    let big = json!({"hostname": "h".repeat(4096)});
    let resp = daemon.heartbeat("w-big", &big);
    assert_error(&resp, 413, "PAYLOAD_TOO_LARGE");

    // A declared length over the limit is refused even before the body.
    let mut client = daemon.client();
    let declared = client.send(
        &Request::post("/api/v1/admin/workers/w-big/heartbeat").header("Content-Length", "1000000"),
    );
    match declared {
        Ok(resp) => {
            assert_error(&resp, 413, "PAYLOAD_TOO_LARGE");
        }
        Err(e) => panic!("no 413 for a declared oversize body: {e}"),
    }

    // Under the limit works.
    assert_status(
        &daemon.heartbeat("w-small", &json!({"hostname": "small"})),
        200,
    );
    let mut expected = before.clone();
    expected.push("w-small".to_string());
    expected.sort();
    assert_eq!(
        daemon.worker_ids(),
        expected,
        "the 413s changed the worker list"
    );
}
