//! Input edges against the real binary: the checked duration parser with its
//! per-field bounds, duplicate JSON keys, on both the REST API and the admin
//! socket (docs/api.md, stacyvmd-admin(7)).

use crate::common;
use crate::sandbox_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use common::{Daemon, IO_TIMEOUT, Request, assert_error, assert_status, names_field};
use sandbox_support::{lease_action, leases, spawn_ok};
use serde_json::{Value, json};

/// One admin socket connection, greeting read.
struct Admin {
    reader: BufReader<UnixStream>,
}

impl Admin {
    fn connect(daemon: &Daemon) -> Admin {
        let path: PathBuf = daemon
            .ready_line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("admin="))
            .map(PathBuf::from)
            .expect("readiness line names the admin socket");
        let stream = UnixStream::connect(&path).expect("connect the admin socket");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut admin = Admin {
            reader: BufReader::new(stream),
        };
        let greeting = admin.line();
        assert_eq!(greeting["protocol"], "stacyvm-workerproto", "{greeting}");
        admin
    }

    #[track_caller]
    fn line(&mut self) -> Value {
        let mut text = String::new();
        let n = self.reader.read_line(&mut text).expect("a line in time");
        assert!(n > 0, "the daemon closed the admin connection");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
    }

    #[track_caller]
    fn send_raw(&mut self, line: &str) -> Value {
        let mut stream = self.reader.get_ref();
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        self.line()
    }

    #[track_caller]
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.send_raw(&json!({"id": "t", "method": method, "params": params}).to_string())
    }
}

#[track_caller]
fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["ok"], false, "expected an error: {reply}");
    reply["error"]["code"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------
// Durations

/// A lease TTL far over any sane bound, and one that overflows the old
/// `as_millis() as i64` (it became a 384 ms lease on the admin socket).
const HUGE_TTLS: [&str; 3] = ["106751991167d", "18446744073709552s", "24h1ms"];

#[test]
fn rest_lease_ttls_over_the_bound_are_refused_and_write_nothing() {
    let daemon = Daemon::start();
    for ttl in HUGE_TTLS {
        let resp = lease_action(
            &daemon,
            "res-1",
            "acquire",
            &json!({"holder_id": "w1", "ttl": ttl}),
        );
        let message = assert_error(&resp, 400, "BAD_REQUEST");
        assert!(names_field(&message, "ttl"), "{ttl}: {message}");
        assert!(message.contains("24h"), "names the bound: {message}");
    }
    assert_eq!(leases(&daemon), Vec::<Value>::new(), "a refused ttl wrote");

    // The bound itself is accepted, and renders as RFC 3339.
    let resp = lease_action(
        &daemon,
        "res-1",
        "acquire",
        &json!({"holder_id": "w1", "ttl": "24h"}),
    );
    assert_status(&resp, 200);
    let expires = resp.json()["expires_at"].as_str().unwrap().to_owned();
    common::rfc3339_millis(&expires);
}

#[test]
fn a_configured_lease_bound_is_the_one_enforced() {
    let daemon = Daemon::builder()
        .config("[leases]\nmax_ttl = \"1h\"\n")
        .start();
    let over = lease_action(
        &daemon,
        "res-1",
        "acquire",
        &json!({"holder_id": "w1", "ttl": "1h1s"}),
    );
    assert_error(&over, 400, "BAD_REQUEST");
    let at = lease_action(
        &daemon,
        "res-1",
        "acquire",
        &json!({"holder_id": "w1", "ttl": "1h"}),
    );
    assert_status(&at, 200);
}

#[test]
fn rest_sandbox_and_exec_durations_that_overflow_are_400() {
    let daemon = Daemon::start();
    // Over every field's ceiling: refused as bad input, not as an admission.
    let resp = daemon
        .send(&Request::post("/api/v1/sandboxes").json(&json!({"ttl": "18446744073709552s"})));
    assert_error(&resp, 400, "BAD_REQUEST");
    let sandbox = spawn_ok(&daemon, &json!({}));
    let id = sandbox["id"].as_str().unwrap();
    for ttl in HUGE_TTLS {
        let resp = daemon.send(
            &Request::post(&format!("/api/v1/sandboxes/{id}/extend")).json(&json!({"ttl": ttl})),
        );
        assert_error(&resp, 400, "BAD_REQUEST");
    }
    let after = daemon.get(&format!("/api/v1/sandboxes/{id}")).json();
    assert_eq!(after["expires_at"], sandbox["expires_at"], "{after}");
}

#[test]
fn admin_durations_are_checked_against_their_bounds() {
    let daemon = Daemon::start();
    let mut admin = Admin::connect(&daemon);
    for ttl in HUGE_TTLS {
        let reply = admin.call(
            "lease.acquire",
            json!({"resource_id": "res-1", "holder_id": "h", "ttl": ttl}),
        );
        assert_eq!(error_code(&reply), "invalid_params", "{ttl}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(names_field(message, "ttl"), "{message}");
    }
    let reply = admin.call("lease.get", json!({"resource_id": "res-1"}));
    assert_eq!(
        error_code(&reply),
        "not_found",
        "a refused ttl wrote: {reply}"
    );

    for (method, params) in [
        ("sandbox.spawn", json!({"ttl": "18446744073709552s"})),
        ("scheduler.explain", json!({"ttl": "18446744073709552s"})),
        ("worker.shutdown", json!({"deadline": "18446744073709552s"})),
        ("worker.shutdown", json!({"deadline": "2h"})),
    ] {
        let reply = admin.call(method, params.clone());
        assert_eq!(
            error_code(&reply),
            "invalid_params",
            "{method} {params}: {reply}"
        );
    }
    // Still serving (the refused shutdown did not stop anything).
    let reply = admin.call(
        "lease.acquire",
        json!({"resource_id": "res-1", "holder_id": "h", "ttl": "24h"}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(daemon.get("/api/v1/live").status, 200);
}

#[test]
fn config_durations_over_their_bound_are_refused_at_startup() {
    for config in [
        "[leases]\nttl = \"18446744073709552s\"\n",
        "[leases]\nttl = \"25h\"\n",
        "[server]\nidle_timeout = \"106751991167d\"\n",
        "[sandboxes]\nmax_ttl = \"106751991167d\"\n",
    ] {
        let failed = Daemon::builder()
            .config(config)
            .try_start()
            .err()
            .unwrap_or_else(|| panic!("started with {config:?}"));
        let output = failed.output();
        assert!(output.contains("at most"), "{config:?}: {output}");
    }
}

// ---------------------------------------------------------------------------
// Duplicate JSON keys

/// A JSON body sent as written (serde_json's `json!` cannot repeat a key).
fn raw_json(method: &str, path: &str, body: &str) -> Request {
    Request::new(method, path)
        .header("Content-Type", "application/json")
        .body(body.as_bytes().to_vec())
}

/// 400 BAD_REQUEST whose message names the duplicated key by its path.
#[track_caller]
fn assert_duplicate(resp: &common::Response, path: &str) {
    let message = assert_error(resp, 400, "BAD_REQUEST");
    assert!(
        message.contains("duplicate") && message.contains(&format!("`{path}`")),
        "the message names the duplicate `{path}`: {message}"
    );
}

#[test]
fn rest_bodies_with_a_duplicate_key_at_any_depth_are_400_and_change_nothing() {
    let daemon = Daemon::start();
    let leases_path = "/api/v1/admin/leases/res-1/acquire";
    let resp = daemon.send(&raw_json(
        "POST",
        leases_path,
        r#"{"holder_id":"a","holder_id":"b","ttl":"1m"}"#,
    ));
    assert_duplicate(&resp, "holder_id");
    assert_eq!(leases(&daemon), Vec::<Value>::new(), "a refused body wrote");

    // Heartbeats: top level and nested in `capacity`; no worker appears.
    let before = daemon.worker_ids();
    for (body, path) in [
        (r#"{"hostname":"a","hostname":"b"}"#, "hostname"),
        (
            r#"{"capacity":{"max_sandboxes":1,"max_sandboxes":100}}"#,
            "capacity.max_sandboxes",
        ),
    ] {
        let resp = daemon.send(&raw_json(
            "POST",
            "/api/v1/admin/workers/w-dup/heartbeat",
            body,
        ));
        assert_duplicate(&resp, path);
    }
    assert_eq!(daemon.worker_ids(), before, "a refused heartbeat wrote");

    // Spawn: nested in metadata, and in an object inside an array.
    let sandboxes = || daemon.get("/api/v1/sandboxes").json();
    let none = sandboxes();
    for (body, path) in [
        (r#"{"metadata":{"k":"1","k":"2"}}"#, "metadata.k"),
        (r#"{"image":"a","image":"b"}"#, "image"),
        (r#"{"metadata":{"k":"1"},"x":[{"a":1,"a":2}]}"#, "x[0].a"),
    ] {
        let resp = daemon.send(&raw_json("POST", "/api/v1/sandboxes", body));
        assert_duplicate(&resp, path);
    }
    assert_eq!(sandboxes(), none, "a refused spawn wrote");

    // Exec and extend against a live sandbox.
    let sandbox = spawn_ok(&daemon, &json!({}));
    let id = sandbox["id"].as_str().unwrap();
    let resp = daemon.send(&raw_json(
        "POST",
        &format!("/api/v1/sandboxes/{id}/exec"),
        r#"{"command":"true","env":{"A":"1","A":"2"}}"#,
    ));
    assert_duplicate(&resp, "env.A");
    let resp = daemon.send(&raw_json(
        "POST",
        &format!("/api/v1/sandboxes/{id}/extend"),
        r#"{"ttl":"1m","ttl":"2m"}"#,
    ));
    assert_duplicate(&resp, "ttl");
    let after = daemon.get(&format!("/api/v1/sandboxes/{id}")).json();
    assert_eq!(after["expires_at"], sandbox["expires_at"], "{after}");

    // The same bodies without the repetition are fine.
    let resp = daemon.send(&raw_json(
        "POST",
        &format!("/api/v1/sandboxes/{id}/extend"),
        r#"{"ttl":"2m"}"#,
    ));
    assert_status(&resp, 200);
}

#[test]
fn admin_envelopes_with_a_duplicate_key_at_any_depth_are_invalid_params() {
    let daemon = Daemon::start();
    let mut admin = Admin::connect(&daemon);
    for (line, path) in [
        (
            r#"{"id":"1","method":"lease.acquire","method":"lease.release","params":{"resource_id":"res-1","holder_id":"h","ttl":"1m"}}"#,
            "method",
        ),
        (
            r#"{"id":"2","method":"lease.acquire","params":{"resource_id":"res-1","holder_id":"a","holder_id":"b","ttl":"1m"}}"#,
            "params.holder_id",
        ),
        (
            r#"{"id":"3","method":"sandbox.spawn","params":{"metadata":{"k":"1","k":"2"}}}"#,
            "params.metadata.k",
        ),
        (
            r#"{"id":"4","method":"worker.status","lease":{"resource_id":"r","resource_id":"s"}}"#,
            "lease.resource_id",
        ),
        (
            r#"{"id":"5","method":"worker.heartbeat","params":{"providers":["mock"],"capacity":{"max_sandboxes":1,"max_sandboxes":2}}}"#,
            "params.capacity.max_sandboxes",
        ),
    ] {
        let reply = admin.send_raw(line);
        assert_eq!(error_code(&reply), "invalid_params", "{line}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("duplicate") && message.contains(&format!("`{path}`")),
            "names `{path}`: {message}"
        );
    }
    // Nothing changed, and the connection still serves.
    let reply = admin.call("lease.get", json!({"resource_id": "res-1"}));
    assert_eq!(
        error_code(&reply),
        "not_found",
        "a refused line wrote: {reply}"
    );
    let sandboxes = admin.call("sandbox.list", json!({}));
    assert_eq!(sandboxes["result"], json!([]), "{sandboxes}");
}

// ---------------------------------------------------------------------------
// File modes

/// Starts the daemon under `umask 000`, so that only the modes it sets
/// itself protect its files.
fn daemon_with_open_umask(builder: common::DaemonBuilder) -> Daemon {
    builder
        .wrapper(&["sh", "-c", "umask 000 && exec \"$0\" \"$@\""])
        .start()
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The database and every file SQLite or the daemon keeps beside it.
fn database_files(daemon: &Daemon) -> Vec<PathBuf> {
    let db = daemon.data_dir().join("stacyvmd.db");
    let mut files = vec![db.clone()];
    for suffix in ["-wal", "-shm", ".lock"] {
        let mut name = db.clone().into_os_string();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    files
}

#[track_caller]
fn assert_private(daemon: &Daemon) {
    for file in database_files(daemon) {
        assert_eq!(
            mode(&file),
            0o600,
            "{} is {:o}",
            file.display(),
            mode(&file)
        );
    }
    let socket = daemon
        .ready_line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("admin="))
        .map(PathBuf::from)
        .expect("readiness line names the admin socket");
    assert_eq!(mode(&socket), 0o600, "admin socket is {:o}", mode(&socket));
}

/// Commits something durable (the WAL and SHM exist afterwards).
fn write_a_lease(daemon: &Daemon, id: &str) {
    let resp = lease_action(
        daemon,
        id,
        "acquire",
        &json!({"holder_id": "w1", "ttl": "1m"}),
    );
    assert_status(&resp, 200);
}

#[test]
fn the_database_its_wal_and_shm_and_the_socket_are_0600() {
    let mut daemon = daemon_with_open_umask(
        Daemon::builder().config("[store]\ncheckpoint_interval = \"100ms\"\n"),
    );
    write_a_lease(&daemon, "res-1");
    assert_private(&daemon);
    // After checkpoints ran, and after a restart re-created the WAL and SHM.
    write_a_lease(&daemon, "res-2");
    assert_private(&daemon);
    daemon.stop();
    let daemon = daemon.restart();
    write_a_lease(&daemon, "res-3");
    assert_private(&daemon);
}

#[test]
fn an_existing_database_with_wider_modes_is_tightened_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let mut daemon = Daemon::start();
    write_a_lease(&daemon, "res-1");
    let files = database_files(&daemon);
    daemon.kill9();
    // As an older version left them: the database world-readable, its
    // WAL and SHM (left by the kill) wider still.
    for (file, wide) in files.iter().zip([0o644, 0o666, 0o664, 0o644]) {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(wide)).unwrap();
    }
    let daemon = daemon.restart();
    assert_private(&daemon);
    let log = daemon.stderr_text();
    assert!(
        log.contains("tightened") && log.contains("stacyvmd.db"),
        "the tightening is logged: {log}"
    );
    // The data survived.
    assert_eq!(leases(&daemon).len(), 1);
}
