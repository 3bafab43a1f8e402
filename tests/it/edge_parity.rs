//! The two edges (REST and the admin socket) against the real binary: the
//! same lease operations get the same outcome, the same error family, the
//! same fields, the same event and the same audit rows on both.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Daemon, Request, Response};
use serde_json::{Value, json};

const LEASES: &str = "/api/v1/admin/leases";
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One admin connection; event lines are kept aside in `events`.
struct Admin {
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
    next: u64,
}

impl Admin {
    fn connect(daemon: &Daemon) -> Admin {
        let path: PathBuf = daemon
            .ready_line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("admin="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no admin= in {}", daemon.ready_line));
        let stream = UnixStream::connect(&path).expect("connect the admin socket");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut admin = Admin {
            reader: BufReader::new(stream),
            events: Vec::new(),
            next: 0,
        };
        let greeting = admin.line();
        assert_eq!(greeting["protocol"], "stacyvm-workerproto", "{greeting}");
        admin
    }

    #[track_caller]
    fn line(&mut self) -> Value {
        let mut buf = String::new();
        let n = self
            .reader
            .read_line(&mut buf)
            .expect("a line within the timeout");
        assert!(n > 0, "the daemon closed the admin connection");
        serde_json::from_str(&buf).unwrap_or_else(|e| panic!("not JSON ({e}): {buf:?}"))
    }

    /// Sends one request with the given id and returns its reply.
    #[track_caller]
    fn call(&mut self, request_id: &str, method: &str, params: Value) -> Value {
        self.next += 1;
        let line = json!({"id": request_id, "method": method, "params": params}).to_string() + "\n";
        self.reader
            .get_ref()
            .write_all(line.as_bytes())
            .expect("write");
        loop {
            let value = self.line();
            if value.get("event").is_some() {
                self.events.push(value);
            } else {
                assert_eq!(value["id"], request_id, "{value}");
                return value;
            }
        }
    }

    /// Waits (with a deadline) for a `lease.changed` event on `resource`.
    #[track_caller]
    fn lease_event(&mut self, resource: &str) -> Value {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self
                .events
                .iter()
                .find(|e| e["event"] == "lease.changed" && e["data"]["resource_id"] == resource)
            {
                return e.clone();
            }
            assert!(
                Instant::now() < end,
                "no lease.changed event for {resource}: {:?}",
                self.events
            );
            self.reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = String::new();
            if let Ok(n) = self.reader.read_line(&mut buf) {
                assert!(n > 0, "the daemon closed the admin connection");
                let v: Value = serde_json::from_str(&buf).unwrap();
                if v.get("event").is_some() {
                    self.events.push(v);
                }
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(IO_TIMEOUT))
                .unwrap();
        }
    }
}

/// An edge-neutral outcome: `ok`, or the error family.
fn family_of_rest(resp: &Response) -> String {
    if resp.status == 200 {
        return "ok".into();
    }
    let code = resp.json()["code"].as_str().unwrap_or("").to_string();
    match (resp.status, code.as_str()) {
        (400, _) => "invalid".into(),
        (404, _) => "not_found".into(),
        (409, "STALE_GENERATION") => "stale".into(),
        (409, _) => "conflict".into(),
        (s, c) => format!("{s} {c}"),
    }
}

fn family_of_admin(reply: &Value) -> String {
    if reply["ok"] == true {
        return "ok".into();
    }
    match reply["error"]["code"].as_str().unwrap_or("") {
        "invalid_params" => "invalid".into(),
        "not_found" => "not_found".into(),
        "stale_generation" => "stale".into(),
        "lease_conflict" | "conflict" => "conflict".into(),
        other => other.to_string(),
    }
}

/// The fields of a lease answer, without values that depend on the clock.
fn lease_shape(lease: &Value) -> Value {
    let mut v = lease.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["acquired_at", "renewed_at", "expires_at", "resource_id"] {
            assert!(
                o.contains_key(k) || k == "resource_id",
                "lease without {k}: {lease}"
            );
            o.remove(k);
        }
    }
    v
}

/// `(action, outcome is ok, detail)` of the audit rows for a target.
fn audit_rows(daemon: &Daemon, target: &str) -> Vec<(String, bool, String)> {
    let db = rusqlite::Connection::open_with_flags(
        daemon.data_dir().join("stacyvmd.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database");
    let mut stmt = db
        .prepare("SELECT action, outcome, detail FROM admin_audit WHERE target = ?1 ORDER BY seq")
        .unwrap();
    stmt.query_map([target], |r| {
        let outcome: String = r.get(1)?;
        Ok((r.get(0)?, outcome == "ok", r.get(2)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
fn lease_actions_agree_on_both_edges() {
    let daemon = Daemon::builder()
        .config("[leases]\nttl = \"1h\"\nrenew_interval = \"30m\"\n")
        .start();
    let mut admin = Admin::connect(&daemon);
    let sub = admin.call("sub", "events.subscribe", json!({"topics": ["lease"]}));
    assert_eq!(sub["ok"], true, "{sub}");
    let mut watcher = Admin::connect(&daemon);
    let sub = watcher.call("sub", "events.subscribe", json!({"topics": ["lease"]}));
    assert_eq!(sub["ok"], true, "{sub}");

    // (verb, holder) in order; the same script on each edge.
    let script: &[(&str, &str)] = &[
        ("acquire", "alice"),
        ("renew", "alice"),
        ("acquire", "bob"),
        ("renew", "bob"),
        ("release", "bob"),
        ("release", "alice"),
        ("renew", "alice"),
    ];
    let mut rest_answers = Vec::new();
    let mut admin_answers = Vec::new();
    for (n, (verb, holder)) in script.iter().enumerate() {
        let body = json!({"holder_id": holder});
        let resp = daemon.send(
            &Request::post(&format!("{LEASES}/res-rest/{verb}"))
                .header("X-Request-Id", &format!("rest-{n}"))
                .json(&body),
        );
        let rest_lease = if resp.status == 200 {
            lease_shape(&resp.json())
        } else {
            Value::Null
        };
        rest_answers.push((verb, holder, family_of_rest(&resp), rest_lease));

        let reply = admin.call(
            &format!("adm-{n}"),
            &format!("lease.{verb}"),
            json!({"resource_id": "res-admin", "holder_id": holder}),
        );
        let admin_lease = if reply["ok"] == true {
            lease_shape(&reply["result"])
        } else {
            Value::Null
        };
        admin_answers.push((verb, holder, family_of_admin(&reply), admin_lease));
    }
    assert_eq!(
        rest_answers, admin_answers,
        "the same lease script, REST vs admin socket"
    );
    assert_eq!(rest_answers[2].2, "conflict", "{rest_answers:?}");

    // Both edges publish the change.
    watcher.lease_event("res-admin");
    watcher.lease_event("res-rest");

    // Both edges validate the same ids: a resource id with whitespace, a
    // holder id with whitespace.
    let bad_holder = daemon.send(
        &Request::post(&format!("{LEASES}/res-rest/acquire"))
            .json(&json!({"holder_id": "has space"})),
    );
    let reply = admin.call(
        "adm-bad-holder",
        "lease.acquire",
        json!({"resource_id": "res-admin", "holder_id": "has space"}),
    );
    assert_eq!(family_of_rest(&bad_holder), "invalid", "{bad_holder}");
    assert_eq!(family_of_admin(&reply), "invalid", "{reply}");
    let reply = admin.call(
        "adm-bad-resource",
        "lease.acquire",
        json!({"resource_id": "has space", "holder_id": "alice"}),
    );
    assert_eq!(
        family_of_admin(&reply),
        "invalid",
        "a resource id with a space: {reply}"
    );
    assert!(
        daemon.get(&format!("{LEASES}/has%20space")).status == 404,
        "nothing was leased under the bad resource id"
    );

    // A change is audited alike on both edges, in the lease's own
    // transaction. A refusal commits nothing on REST (PERFORMANCE.md L3: a
    // refused acquire commits nothing); the admin socket audits every
    // mutating command, refusals included (admin protocol), so its extra
    // rows are exactly the refused scripted actions and the bad holder.
    let rest_rows: Vec<_> = audit_rows(&daemon, "res-rest");
    let admin_rows: Vec<_> = audit_rows(&daemon, "res-admin");
    let changes = |rows: &[(String, bool, String)]| -> Vec<(String, bool, String)> {
        rows.iter().filter(|r| r.1).cloned().collect()
    };
    assert!(!changes(&rest_rows).is_empty(), "{rest_rows:?}");
    assert_eq!(
        changes(&rest_rows),
        changes(&admin_rows),
        "audited changes, REST vs admin socket"
    );
    assert!(
        rest_rows.iter().all(|r| r.1),
        "REST audited a refusal (it must commit nothing): {rest_rows:?}"
    );
    assert_eq!(
        admin_rows.len(),
        script.len() + 1,
        "admin socket: one row per scripted action and one for the bad holder: {admin_rows:?}"
    );
}
