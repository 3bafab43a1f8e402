//! Input edges against the real binary: the checked duration parser with its
//! per-field bounds, duplicate JSON keys, on both the REST API and the admin
//! socket (docs/api.md, stacyvmd-admin(7)).

mod common;
mod sandbox_support;

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
