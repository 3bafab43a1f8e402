//! Owners: API keys bound to an owner with `[[auth.keys]]`. A user key sees
//! and acts on only its owner's sandboxes; another owner's sandbox answers
//! exactly as a missing one does (404, same code and message), so ids do not
//! leak; `X-User-ID` / `owner_id` naming anyone else is refused (403) and
//! changes nothing; admin keys see every owner; legacy `auth.api_keys`
//! entries act only on sandboxes without an owner; a SIGHUP carries new keys.
//!
//! The matrix runs on process sandboxes, so exec and every file route act
//! for real when the caller owns the sandbox.

use crate::common;
use crate::sandbox_support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, Request, Response, TempDir, assert_error, assert_status, poll_until};
use sandbox_support::{SANDBOXES, id_of};
use serde_json::{Value, json};

const ALICE_KEY: &str = "alice-key-0c5e7b2a94";
const BOB_KEY: &str = "bob-key-8f13d6e0a2";
const ADMIN_KEY: &str = "owners-admin-key-71b9c4";
const LEGACY_KEY: &str = "legacy-user-key-3a0f5d";
const LEGACY_ADMIN_KEY: &str = "legacy-admin-key-e42b18";
/// A well-formed sandbox id that names nothing.
const MISSING: &str = "sb-00000000000000ff";

fn keys_config(extra: &str) -> String {
    format!(
        "[auth]\napi_keys = [\"{LEGACY_KEY}\"]\nadmin_api_keys = [\"{LEGACY_ADMIN_KEY}\"]\n\n\
         [[auth.keys]]\nkey = \"{ALICE_KEY}\"\nowner_id = \"alice\"\n\n\
         [[auth.keys]]\nkey = \"{BOB_KEY}\"\nowner_id = \"bob\"\nrole = \"user\"\n\n\
         [[auth.keys]]\nkey = \"{ADMIN_KEY}\"\nrole = \"admin\"\n\n{extra}"
    )
}

/// A daemon with the owner keys whose process sandboxes run under a uid
/// range of its own (see tests/it/process_sandboxes.rs) and whose data dir is
/// outside /tmp (a sandbox has its own /tmp).
fn start_daemon() -> Daemon {
    let uid_base = 2_100_000_000 + (std::process::id() % 10_000) * 10_000;
    let dir = Arc::new(TempDir::new_in(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "owners",
    ));
    Daemon::builder()
        .args(&["--log-level", "debug"])
        .config(&keys_config(&format!(
            "[admin]\nenabled = false\n\n[providers.process]\nuid_base = {uid_base}\n"
        )))
        .dir(dir)
        .start()
}

/// Destroys every listed sandbox with the admin key when dropped: process
/// sandboxes outlive the daemon, pass or fail.
struct Cleanup<'d>(&'d Daemon);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let resp = self.0.send(&as_admin(Request::get(SANDBOXES)));
        if resp.status != 200 {
            return;
        }
        if let Value::Array(items) = resp.json() {
            for s in items {
                if let Some(id) = s["id"].as_str() {
                    let _ = self
                        .0
                        .send(&as_admin(Request::delete(&format!("{SANDBOXES}/{id}"))));
                }
            }
        }
    }
}

fn with_key(req: Request, key: &str) -> Request {
    req.header("X-API-Key", key)
}

fn as_admin(req: Request) -> Request {
    req.header("X-Admin-API-Key", ADMIN_KEY)
}

fn ids(resp: &Response) -> Vec<String> {
    assert_status(resp, 200);
    match resp.json() {
        Value::Array(items) => items
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_owned())
            .collect(),
        other => panic!("not an array: {other}"),
    }
}

fn listed(daemon: &Daemon, key: &str) -> Vec<String> {
    let mut out = ids(&daemon.send(&with_key(Request::get(SANDBOXES), key)));
    out.sort();
    out
}

fn spawn_as(daemon: &Daemon, key: &str, body: &Value) -> Response {
    daemon.send(&with_key(Request::post(SANDBOXES).json(body), key))
}

fn process_sandbox(daemon: &Daemon, key: &str) -> Value {
    let resp = spawn_as(
        daemon,
        key,
        &json!({"provider": "process", "image": "host", "ttl": "30m"}),
    );
    assert_status(&resp, 201);
    resp.json()
}

/// Every sandbox route, as requests on sandbox `id`, in an order in which
/// each succeeds for the owner (files are written before they are read).
/// The last one destroys.
fn routes(id: &str) -> Vec<(&'static str, Request)> {
    let base = format!("{SANDBOXES}/{id}");
    let files = format!("{base}/files");
    vec![
        ("get", Request::get(&base)),
        (
            "extend",
            Request::post(&format!("{base}/extend")).json(&json!({"ttl": "45m"})),
        ),
        (
            "exec",
            Request::post(&format!("{base}/exec")).json(&json!({"command": "echo hi"})),
        ),
        (
            "exec stream",
            Request::post(&format!("{base}/exec"))
                .json(&json!({"command": "echo hi", "stream": true})),
        ),
        (
            "files write",
            Request::post(&files).json(&json!({"path": "/workspace/a.txt", "content": "alice"})),
        ),
        (
            "files upload",
            Request::new("PUT", &format!("{files}?path=/workspace/b.txt")).body("bee"),
        ),
        (
            "files read",
            Request::get(&format!("{files}?path=/workspace/a.txt")),
        ),
        (
            "files list",
            Request::get(&format!("{files}/list?path=/workspace")),
        ),
        (
            "files stat",
            Request::get(&format!("{files}/stat?path=/workspace/a.txt")),
        ),
        (
            "files glob",
            Request::get(&format!("{files}/glob?pattern=/workspace/*.txt")),
        ),
        (
            "files chmod",
            Request::post(&format!("{files}/chmod"))
                .json(&json!({"path": "/workspace/a.txt", "mode": "600"})),
        ),
        (
            "files move",
            Request::post(&format!("{files}/move"))
                .json(&json!({"old_path": "/workspace/b.txt", "new_path": "/workspace/c.txt"})),
        ),
        (
            "files delete",
            Request::delete(&format!("{files}?path=/workspace/c.txt")),
        ),
        ("destroy", Request::delete(&base)),
    ]
}

/// Status, code and message of an error, with `id` written as `{id}`.
fn refusal_shape(resp: &Response, id: &str) -> (u16, Value, String) {
    let body = resp.json();
    (
        resp.status,
        body["code"].clone(),
        body["message"].as_str().unwrap_or("").replace(id, "{id}"),
    )
}

/// Asserts that `key` acting on another owner's sandbox `id` is answered
/// exactly as acting on a missing id.
#[track_caller]
fn assert_looks_missing(daemon: &Daemon, key: &str, id: &str) {
    for ((what, theirs), (_, missing)) in routes(id).into_iter().zip(routes(MISSING)) {
        let theirs = daemon.send(&with_key(theirs, key));
        let missing = daemon.send(&with_key(missing, key));
        assert_error(&missing, 404, "NOT_FOUND");
        assert_eq!(
            refusal_shape(&theirs, id),
            refusal_shape(&missing, MISSING),
            "{what} on another owner's sandbox must look like a missing one\n\
             theirs:\n{theirs}\nmissing:\n{missing}"
        );
    }
}

#[test]
fn owner_matrix_every_sandbox_route() {
    let daemon = start_daemon();
    let _cleanup = Cleanup(&daemon);
    let alice = process_sandbox(&daemon, ALICE_KEY);
    let bob = process_sandbox(&daemon, BOB_KEY);
    let (a, b) = (id_of(&alice), id_of(&bob));
    assert_eq!(alice["owner_id"], "alice", "{alice}");
    assert_eq!(bob["owner_id"], "bob", "{bob}");

    // Each lists only its own; the admin keys (both forms) list both.
    assert_eq!(listed(&daemon, ALICE_KEY), vec![a.clone()]);
    assert_eq!(listed(&daemon, BOB_KEY), vec![b.clone()]);
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    for admin in [ADMIN_KEY, LEGACY_ADMIN_KEY] {
        let mut all = ids(&daemon.send(&Request::get(SANDBOXES).header("X-Admin-API-Key", admin)));
        all.sort();
        assert_eq!(all, both, "an admin key sees every owner");
    }

    // Bob on every route of Alice's sandbox: exactly a missing sandbox.
    assert_looks_missing(&daemon, BOB_KEY, &a);

    // ...and nothing changed: still running, same expiry, none of Bob's files.
    let now = daemon.send(&with_key(
        Request::get(&format!("{SANDBOXES}/{a}")),
        ALICE_KEY,
    ));
    assert_status(&now, 200);
    assert_eq!(now.json()["state"], "running", "{now}");
    assert_eq!(now.json()["expires_at"], alice["expires_at"], "{now}");
    let stat = daemon.send(&with_key(
        Request::get(&format!("{SANDBOXES}/{a}/files/stat?path=/workspace/a.txt")),
        ALICE_KEY,
    ));
    assert_error(&stat, 404, "NOT_FOUND");

    // Alice on every route of her own sandbox: each works, destroy last.
    for (what, req) in routes(&a) {
        let resp = daemon.send(&with_key(req, ALICE_KEY));
        assert!(
            (200..300).contains(&resp.status),
            "{what} on her own sandbox:\n{resp}"
        );
        if what == "files read" {
            assert_eq!(resp.text(), "alice", "{what}");
        }
    }
    assert_eq!(listed(&daemon, ALICE_KEY), Vec::<String>::new());
    // Bob's sandbox is untouched by all of it.
    assert_eq!(listed(&daemon, BOB_KEY), vec![b.clone()]);

    // The admin key acts on any owner's sandbox.
    let destroyed = daemon.send(&as_admin(Request::delete(&format!("{SANDBOXES}/{b}"))));
    assert_status(&destroyed, 200);
    assert_eq!(listed(&daemon, BOB_KEY), Vec::<String>::new());
}

#[test]
fn a_user_key_cannot_speak_for_another_owner() {
    let daemon = Daemon::builder().config(&keys_config("")).start();
    let alice = id_of(&{
        let r = spawn_as(&daemon, ALICE_KEY, &json!({}));
        assert_status(&r, 201);
        r.json()
    });
    let count = |daemon: &Daemon| ids(&daemon.send(&as_admin(Request::get(SANDBOXES)))).len();
    assert_eq!(count(&daemon), 1);

    // Naming its own owner is fine, by header or body.
    let own = daemon.send(&with_key(
        Request::post(SANDBOXES).json(&json!({"owner_id": "bob"})),
        BOB_KEY,
    ));
    assert_status(&own, 201);
    assert_eq!(own.json()["owner_id"], "bob", "{own}");
    let own = daemon.send(
        &with_key(Request::post(SANDBOXES).json(&json!({})), BOB_KEY).header("X-User-ID", "bob"),
    );
    assert_status(&own, 201);
    assert_eq!(own.json()["owner_id"], "bob", "{own}");
    assert_eq!(count(&daemon), 3);

    // Naming anyone else is refused and changes nothing.
    let spoofs = [
        with_key(Request::post(SANDBOXES).json(&json!({})), BOB_KEY).header("X-User-ID", "alice"),
        with_key(
            Request::post(SANDBOXES).json(&json!({"owner_id": "alice"})),
            BOB_KEY,
        ),
        with_key(
            Request::post(&format!("{SANDBOXES}/admission")).json(&json!({"owner_id": "alice"})),
            BOB_KEY,
        ),
        with_key(Request::get(SANDBOXES), BOB_KEY).header("X-User-ID", "alice"),
        with_key(Request::get(&format!("{SANDBOXES}/{alice}")), BOB_KEY)
            .header("X-User-ID", "alice"),
        with_key(Request::delete(&format!("{SANDBOXES}/{alice}")), BOB_KEY)
            .header("X-User-ID", "alice"),
        with_key(
            Request::post(&format!("{SANDBOXES}/{alice}/extend")).json(&json!({"ttl": "1h"})),
            BOB_KEY,
        )
        .header("X-User-ID", "alice"),
        // The Bearer form is the same key.
        Request::delete(&format!("{SANDBOXES}/{alice}"))
            .header("Authorization", &format!("Bearer {BOB_KEY}"))
            .header("X-User-ID", "alice"),
        // A legacy user key has no owner: it may not name one.
        with_key(Request::post(SANDBOXES).json(&json!({})), LEGACY_KEY).header("X-User-ID", "bob"),
        with_key(
            Request::post(SANDBOXES).json(&json!({"owner_id": "alice"})),
            LEGACY_KEY,
        ),
        with_key(Request::get(&format!("{SANDBOXES}/{alice}")), LEGACY_KEY)
            .header("X-User-ID", "alice"),
    ];
    for req in spoofs {
        let resp = daemon.send(&req);
        let message = assert_error(&resp, 403, "FORBIDDEN");
        assert!(
            message.contains("X-User-ID") || message.contains("owner_id"),
            "the refusal must say what was refused: {message}\n{req:?}"
        );
    }
    assert_eq!(count(&daemon), 3, "a refused spoof created a sandbox");
    let still = daemon.send(&with_key(
        Request::get(&format!("{SANDBOXES}/{alice}")),
        ALICE_KEY,
    ));
    assert_status(&still, 200);

    // Admission for a user key counts its own owner's sandboxes.
    let preflight = daemon.send(&with_key(
        Request::post(&format!("{SANDBOXES}/admission")).json(&json!({})),
        BOB_KEY,
    ));
    assert_status(&preflight, 200);
    assert_eq!(preflight.json()["active_owner_sandboxes"], 2, "{preflight}");

    // Admin keys still name owners, by header over body, and see them all.
    for admin in [ADMIN_KEY, LEGACY_ADMIN_KEY] {
        let resp = daemon.send(
            &Request::post(SANDBOXES)
                .header("X-Admin-API-Key", admin)
                .header("X-User-ID", "carol")
                .json(&json!({"owner_id": "dave"})),
        );
        assert_status(&resp, 201);
        assert_eq!(resp.json()["owner_id"], "carol", "{resp}");
    }
    assert_eq!(count(&daemon), 5);

    // The legacy user key acts only on sandboxes without an owner.
    let unowned = spawn_as(&daemon, LEGACY_KEY, &json!({}));
    assert_status(&unowned, 201);
    assert!(unowned.json().get("owner_id").is_none(), "{unowned}");
    let u = id_of(&unowned.json());
    assert_eq!(listed(&daemon, LEGACY_KEY), vec![u.clone()]);
    assert!(!listed(&daemon, ALICE_KEY).contains(&u));
    let theirs = daemon.send(&with_key(
        Request::get(&format!("{SANDBOXES}/{alice}")),
        LEGACY_KEY,
    ));
    let missing = daemon.send(&with_key(
        Request::get(&format!("{SANDBOXES}/{MISSING}")),
        LEGACY_KEY,
    ));
    assert_eq!(
        refusal_shape(&theirs, &alice),
        refusal_shape(&missing, MISSING)
    );
    let mine = daemon.send(&with_key(
        Request::get(&format!("{SANDBOXES}/{u}")),
        ALICE_KEY,
    ));
    assert_eq!(refusal_shape(&mine, &u), refusal_shape(&missing, MISSING));

    // No key reached the log.
    let log = daemon.stderr_text();
    for key in [ALICE_KEY, BOB_KEY, ADMIN_KEY, LEGACY_KEY, LEGACY_ADMIN_KEY] {
        assert!(!log.contains(key), "a key appears in the log:\n{log}");
    }
}

#[test]
fn prune_by_a_user_key_reaps_only_its_owners_sandboxes() {
    // The reaper is slowed down so that expired sandboxes wait for a prune.
    let daemon = Daemon::builder()
        .config(&keys_config("[sandboxes]\nreap_interval = \"1h\"\n"))
        .start();
    let short = |key| {
        let r = spawn_as(&daemon, key, &json!({"ttl": "1s"}));
        assert_status(&r, 201);
        id_of(&r.json())
    };
    let (a, b) = (short(ALICE_KEY), short(BOB_KEY));
    let prune = |key| {
        let r = daemon.send(&with_key(Request::delete(SANDBOXES), key));
        assert_status(&r, 200);
        r.json()["pruned"].as_u64().expect("pruned")
    };
    // Wait until both have expired (a prune by the admin would reap them).
    poll_until(Duration::from_secs(5), "the sandboxes to expire", || {
        let r = daemon.send(&as_admin(Request::get(SANDBOXES)));
        r.json().as_array().expect("array").iter().all(|s| {
            common::rfc3339_millis(s["expires_at"].as_str().unwrap()) < common::now_millis()
        })
    });
    assert_eq!(prune(BOB_KEY), 1);
    assert_eq!(listed(&daemon, BOB_KEY), Vec::<String>::new());
    assert_eq!(
        listed(&daemon, ALICE_KEY),
        vec![a],
        "Bob's prune reaped Alice's"
    );
    assert_eq!(prune(LEGACY_KEY), 0);
    assert_eq!(prune(ALICE_KEY), 1);
    let _ = b;
}

#[test]
fn sighup_carries_new_owner_keys() {
    let mut daemon = Daemon::builder().config(&keys_config("")).start();
    let carol_key = "carol-key-5b2e9d07c1";
    let carol = || {
        daemon.send(&with_key(
            Request::post(SANDBOXES).json(&json!({})),
            carol_key,
        ))
    };
    assert_error(&carol(), 401, "UNAUTHORIZED");
    daemon.write_config(&keys_config(&format!(
        "[[auth.keys]]\nkey = \"{carol_key}\"\nowner_id = \"carol\"\n"
    )));
    daemon.sighup();
    poll_until(Duration::from_secs(5), "carol's key to be taken", || {
        carol().status == 201
    });
    let made = carol();
    assert_eq!(made.json()["owner_id"], "carol", "{made}");
    // The old keys still work, bound as before.
    let bob = spawn_as(&daemon, BOB_KEY, &json!({}));
    assert_eq!(bob.json()["owner_id"], "bob", "{bob}");
    // A reload that drops Bob's table revokes his key; Carol's stays.
    daemon.write_config(&format!(
        "[[auth.keys]]\nkey = \"{ALICE_KEY}\"\nowner_id = \"alice\"\n\n\
         [[auth.keys]]\nkey = \"{carol_key}\"\nowner_id = \"carol\"\n"
    ));
    daemon.sighup();
    poll_until(Duration::from_secs(5), "bob's key to be revoked", || {
        spawn_as(&daemon, BOB_KEY, &json!({})).status == 401
    });
    assert_status(&carol(), 201);
    assert_eq!(listed(&daemon, "carol-key-5b2e9d07c1").len(), 3);
    assert_eq!(daemon.stop().code(), Some(0));
    assert!(!daemon.stderr_text().contains(carol_key));
}

#[test]
fn bad_key_tables_are_refused_at_load() {
    let cases: &[(&str, &str)] = &[
        // The same key twice, in any two places.
        (
            "[[auth.keys]]\nkey = \"dup-key-1\"\nowner_id = \"a\"\n[[auth.keys]]\nkey = \"dup-key-1\"\nowner_id = \"b\"\n",
            "unique",
        ),
        (
            "[auth]\napi_keys = [\"dup-key-2\"]\n[[auth.keys]]\nkey = \"dup-key-2\"\nowner_id = \"a\"\n",
            "unique",
        ),
        (
            "[auth]\nadmin_api_keys = [\"dup-key-3\"]\napi_keys = [\"dup-key-3\"]\n",
            "unique",
        ),
        // A user key needs its owner.
        ("[[auth.keys]]\nkey = \"k-no-owner\"\n", "owner_id"),
        (
            "[[auth.keys]]\nkey = \"k-role\"\nowner_id = \"a\"\nrole = \"root\"\n",
            "role",
        ),
        (
            "[[auth.keys]]\nkey = \"k-owner\"\nowner_id = \"a/b\"\n",
            "owner_id",
        ),
        ("[[auth.keys]]\nowner_id = \"a\"\n", "key"),
        (
            "[[auth.keys]]\nkey = \"k-extra\"\nowner_id = \"a\"\nextra = 1\n",
            "extra",
        ),
    ];
    for (config, word) in cases {
        let refused = Daemon::builder()
            .config(config)
            .try_start()
            .err()
            .unwrap_or_else(|| panic!("started with a bad key table:\n{config}"));
        assert!(!refused.status.success(), "{refused}");
        let out = refused.output();
        assert!(
            out.contains("auth") && out.contains(word),
            "the refusal must name auth and {word:?}:\n{config}\n{refused}"
        );
        for secret in ["dup-key-1", "dup-key-2", "dup-key-3"] {
            assert!(
                !out.contains(secret),
                "the refusal shows the key:\n{refused}"
            );
        }
    }
}

#[test]
fn owner_keys_from_the_environment() {
    let daemon = Daemon::builder()
        .env(
            "STACYVMD_OWNER_KEYS",
            &format!("alice={ALICE_KEY}, bob={BOB_KEY}"),
        )
        .start();
    let a = spawn_as(&daemon, ALICE_KEY, &json!({}));
    assert_status(&a, 201);
    assert_eq!(a.json()["owner_id"], "alice", "{a}");
    let a = id_of(&a.json());
    assert_eq!(listed(&daemon, ALICE_KEY), vec![a.clone()]);
    assert_eq!(listed(&daemon, BOB_KEY), Vec::<String>::new());
    let spoof = daemon.send(
        &with_key(Request::delete(&format!("{SANDBOXES}/{a}")), BOB_KEY)
            .header("X-User-ID", "alice"),
    );
    assert_error(&spoof, 403, "FORBIDDEN");
    // Without an admin key configured, no one sees across owners.
    assert_error(&daemon.get(SANDBOXES), 401, "UNAUTHORIZED");
}

#[test]
fn a_refused_owner_is_answered_before_the_body() {
    let daemon = Daemon::builder().config(&keys_config("")).start();
    // A head that declares a body it never sends: the relay answers at
    // once (the same 403 the handler gives), and nobody waits for the body.
    let mut client = common::Client::connect(daemon.addr);
    client.set_read_timeout(Duration::from_secs(5));
    client
        .write_raw(
            format!(
                "POST {SANDBOXES} HTTP/1.1\r\nHost: t\r\nX-API-Key: {BOB_KEY}\r\n\
                 X-User-ID: alice\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("write the head");
    let resp = client.read_response().expect("an answer before the body");
    let message = assert_error(&resp, 403, "FORBIDDEN");
    assert!(message.contains("X-User-ID"), "{message}");
    assert_eq!(
        ids(&daemon.send(&as_admin(Request::get(SANDBOXES)))),
        Vec::<String>::new()
    );
}

#[test]
fn audit_names_owner_keys_by_position_never_by_key() {
    let daemon = Daemon::builder().config(&keys_config("")).start();
    // The third [[auth.keys]] table is the admin key; the legacy admin
    // list names its own.
    for (key, request_id) in [(ADMIN_KEY, "aud-key"), (LEGACY_ADMIN_KEY, "aud-legacy")] {
        let resp = daemon.send(
            &Request::post("/api/v1/admin/workers/w-aud/heartbeat")
                .header("X-Admin-API-Key", key)
                .header("X-Request-ID", request_id)
                .json(&json!({"hostname": request_id})),
        );
        assert_status(&resp, 200);
    }
    let db = rusqlite::Connection::open_with_flags(
        &daemon.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database");
    let mut stmt = db
        .prepare(
            "SELECT request_id, actor FROM admin_audit WHERE request_id LIKE 'aud-%' ORDER BY seq",
        )
        .unwrap();
    let rows: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        vec![
            ("aud-key".to_owned(), "key#3".to_owned()),
            ("aud-legacy".to_owned(), "admin-key#1".to_owned()),
        ]
    );
}
