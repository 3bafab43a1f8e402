//! Helpers shared by the sandbox, placement, lease and crash tests: thin
//! wrappers over `common`'s daemon and client for the sandbox and lease
//! routes, and a look at the mock provider's runtime markers.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Daemon, Request, Response, assert_status};

pub const SANDBOXES: &str = "/api/v1/sandboxes";
pub const ADMISSION: &str = "/api/v1/sandboxes/admission";
pub const LEASES: &str = "/api/v1/admin/leases";

/// `sb-` and 16 lowercase hex digits.
pub fn is_sandbox_id(id: &str) -> bool {
    id.strip_prefix("sb-").is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

pub fn spawn_req(body: &Value) -> Request {
    Request::post(SANDBOXES).json(body)
}

pub fn spawn(daemon: &Daemon, body: &Value) -> Response {
    daemon.send(&spawn_req(body))
}

/// Spawns and asserts 201; returns the sandbox.
#[track_caller]
pub fn spawn_ok(daemon: &Daemon, body: &Value) -> Value {
    let resp = spawn(daemon, body);
    assert_status(&resp, 201);
    let sandbox = resp.json();
    let id = sandbox["id"].as_str().unwrap_or_default();
    assert!(is_sandbox_id(id), "bad sandbox id in {sandbox}");
    sandbox
}

pub fn id_of(sandbox: &Value) -> String {
    sandbox["id"]
        .as_str()
        .unwrap_or_else(|| panic!("sandbox without string id: {sandbox}"))
        .to_string()
}

pub fn sandbox_path(id: &str) -> String {
    format!("{SANDBOXES}/{id}")
}

pub fn get_sandbox(daemon: &Daemon, id: &str) -> Response {
    daemon.get(&sandbox_path(id))
}

pub fn destroy(daemon: &Daemon, id: &str) -> Response {
    daemon.send(&Request::delete(&sandbox_path(id)))
}

#[track_caller]
pub fn destroy_ok(daemon: &Daemon, id: &str) {
    let resp = destroy(daemon, id);
    assert_status(&resp, 200);
    assert_eq!(resp.json(), json!({"status": "destroyed"}), "{resp}");
}

/// `GET /api/v1/sandboxes` (asserts 200 and an array).
#[track_caller]
pub fn list(daemon: &Daemon) -> Vec<Value> {
    let resp = daemon.get(SANDBOXES);
    assert_status(&resp, 200);
    match resp.json() {
        Value::Array(items) => items,
        other => panic!("GET {SANDBOXES} is not an array: {other}"),
    }
}

/// The `state` of sandbox `id` in a list answer, or `None` if not listed.
pub fn state_in(listed: &[Value], id: &str) -> Option<Value> {
    listed
        .iter()
        .find(|s| s["id"] == id)
        .map(|s| s["state"].clone())
}

pub fn list_ids(daemon: &Daemon) -> Vec<String> {
    list(daemon).iter().map(id_of).collect()
}

/// `POST /api/v1/sandboxes/admission` (asserts 200).
#[track_caller]
/// The admission answer with its placement detail (`?detail=placement`).
pub fn admission(daemon: &Daemon, body: &Value) -> Value {
    let resp = daemon.send(&Request::post(&format!("{ADMISSION}?detail=placement")).json(body));
    assert_status(&resp, 200);
    resp.json()
}

/// `GET /api/v1/admin/leases` as an array (asserts 200).
#[track_caller]
pub fn leases(daemon: &Daemon) -> Vec<Value> {
    let resp = daemon.get(LEASES);
    assert_status(&resp, 200);
    match resp.json() {
        Value::Array(items) => items,
        other => panic!("GET {LEASES} is not an array: {other}"),
    }
}

/// The lease on `id` (asserts 200).
#[track_caller]
pub fn lease(daemon: &Daemon, id: &str) -> Value {
    let resp = daemon.get(&format!("{LEASES}/{id}"));
    assert_status(&resp, 200);
    resp.json()
}

/// `POST /api/v1/admin/leases/{id}/{verb}` with `body`.
pub fn lease_action(daemon: &Daemon, id: &str, verb: &str, body: &Value) -> Response {
    daemon.send(&Request::post(&format!("{LEASES}/{id}/{verb}")).json(body))
}

/// True when the lease is free: released (no holder) or expired.
pub fn lease_is_free(lease: &Value) -> bool {
    lease["holder_id"] == "" || lease["expired"] == true
}

/// The mock provider's runtimes: one marker file per runtime.
pub fn markers(data_dir: &Path) -> BTreeSet<String> {
    let dir = data_dir.join("mock-runtimes");
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| {
                e.expect("read mock-runtimes entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("read {}: {e}", dir.display()),
    }
}

/// `GET /api/v1/workers/{id}` (asserts 200).
#[track_caller]
pub fn worker(daemon: &Daemon, id: &str) -> Value {
    let resp = daemon.get(&format!("/api/v1/workers/{id}"));
    assert_status(&resp, 200);
    resp.json()
}

/// `GET /api/v1/scheduler` (asserts 200).
#[track_caller]
pub fn scheduler(daemon: &Daemon) -> Value {
    let resp = daemon.get("/api/v1/scheduler");
    assert_status(&resp, 200);
    resp.json()
}

/// Like `common::poll_until`, for checks that explain themselves: polls
/// `check` until it returns `Ok`; at the deadline panics with `what` and
/// the last explanation.
#[track_caller]
pub fn poll_until_ok(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let end = Instant::now() + deadline;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() >= end => {
                panic!("timed out after {deadline:?} waiting for: {what}\nlast state: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
