//! Templates (`/api/v1/templates`, issue 13): saved spawn bodies, durable,
//! validated like a spawn, seen by their owner (and nobody's by everyone),
//! spawned by name.

use crate::common;
use crate::sandbox_support;

use common::{Daemon, Request, Response, assert_error, assert_status};
use sandbox_support::{destroy_ok, id_of};
use serde_json::{Value, json};

const TEMPLATES: &str = "/api/v1/templates";

fn template_path(name: &str) -> String {
    format!("{TEMPLATES}/{name}")
}

fn as_user(req: Request, user: Option<&str>) -> Request {
    match user {
        Some(u) => req.header("X-User-ID", u),
        None => req,
    }
}

fn save(daemon: &Daemon, user: Option<&str>, body: &Value) -> Response {
    daemon.send(&as_user(Request::post(TEMPLATES).json(body), user))
}

fn get(daemon: &Daemon, user: Option<&str>, name: &str) -> Response {
    daemon.send(&as_user(Request::get(&template_path(name)), user))
}

fn names(daemon: &Daemon, user: Option<&str>) -> Vec<String> {
    let resp = daemon.send(&as_user(Request::get(TEMPLATES), user));
    assert_status(&resp, 200);
    resp.json()
        .as_array()
        .unwrap_or_else(|| panic!("list is not an array: {resp}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

fn spawn(daemon: &Daemon, user: Option<&str>, name: &str) -> Response {
    daemon.send(&as_user(
        Request::post(&format!("{TEMPLATES}/{name}/spawn")),
        user,
    ))
}

#[test]
fn a_template_is_saved_read_spawned_and_deleted() {
    let daemon = Daemon::start();
    let body = json!({
        "name": "py",
        "image": "python-3.12",
        "memory_mb": 256,
        "vcpus": 2,
        "ttl": "45m",
        "provider": "",
        "metadata": {"team": "data"},
    });
    let created = save(&daemon, None, &body);
    assert_status(&created, 201);
    let t = created.json();
    assert_eq!(
        (
            &t["name"],
            &t["image"],
            &t["memory_mb"],
            &t["vcpus"],
            &t["ttl"]
        ),
        (
            &json!("py"),
            &json!("python-3.12"),
            &json!(256),
            &json!(2),
            &json!("45m")
        ),
        "{t}"
    );
    assert_eq!(t["metadata"], json!({"team": "data"}), "{t}");
    assert_eq!(
        t["provider"], "",
        "an empty provider is the default one: {t}"
    );

    // Saving the same name again replaces it (200) and keeps created_at.
    let updated = save(
        &daemon,
        None,
        &json!({"name": "py", "image": "python-3.13"}),
    );
    assert_status(&updated, 200);
    let u = updated.json();
    assert_eq!(u["image"], "python-3.13", "{u}");
    assert_eq!(u["created_at"], t["created_at"], "{u}");
    assert_eq!(
        (&u["memory_mb"], &u["ttl"]),
        (&json!(512), &json!("30m")),
        "defaults: {u}"
    );
    assert_eq!(get(&daemon, None, "py").json(), u);
    assert_eq!(names(&daemon, None), vec!["py"]);

    save(&daemon, None, &body);
    let spawned = spawn(&daemon, None, "py");
    assert_status(&spawned, 201);
    let sandbox = spawned.json();
    assert_eq!(
        (
            &sandbox["image"],
            &sandbox["memory_mb"],
            &sandbox["vcpus"],
            &sandbox["provider"]
        ),
        (
            &json!("python-3.12"),
            &json!(256),
            &json!(2),
            &json!("mock")
        ),
        "{sandbox}"
    );
    assert_eq!(sandbox["metadata"], json!({"team": "data"}), "{sandbox}");
    let ms = |field: &str| common::rfc3339_millis(sandbox[field].as_str().unwrap());
    assert_eq!(
        ms("expires_at") - ms("created_at"),
        45 * 60 * 1000,
        "ttl 45m: {sandbox}"
    );
    destroy_ok(&daemon, &id_of(&sandbox));

    let deleted = daemon.send(&Request::delete(&template_path("py")));
    assert_status(&deleted, 200);
    assert_error(&get(&daemon, None, "py"), 404, "TEMPLATE_NOT_FOUND");
    assert_error(&spawn(&daemon, None, "py"), 404, "TEMPLATE_NOT_FOUND");
    assert_error(
        &daemon.send(&Request::delete(&template_path("py"))),
        404,
        "TEMPLATE_NOT_FOUND",
    );
    assert!(names(&daemon, None).is_empty());
}

#[test]
fn bad_templates_are_refused_and_change_nothing() {
    let daemon = Daemon::start();
    let ok = json!({"name": "t", "image": "default"});
    let with = |key: &str, value: Value| {
        let mut b = ok.clone();
        b[key] = value;
        b
    };
    let cases = [
        (json!({"image": "default"}), "name"),
        (json!({"name": "t"}), "image"),
        (with("name", json!("a/b")), "name"),
        (with("name", json!(".x")), "name"),
        (with("name", json!("")), "name"),
        (with("name", json!(7)), "name"),
        (with("ttl", json!("forever")), "ttl"),
        (with("ttl", json!("0s")), "ttl"),
        (with("memory_mb", json!(0)), "memory_mb"),
        (with("memory_mb", json!(1u64 << 40)), "memory_mb"),
        (with("vcpus", json!(-1)), "vcpus"),
        (with("metadata", json!({"k": 1})), "metadata"),
        (with("owner_id", json!("mallory")), "owner_id"),
        (with("colour", json!("blue")), "colour"),
    ];
    for (body, field) in cases {
        let message = assert_error(&save(&daemon, None, &body), 400, "BAD_REQUEST");
        assert!(message.contains(field), "{body}: {message}");
    }
    let raw = |bytes: &str| daemon.send(&Request::post(TEMPLATES).body(bytes.as_bytes().to_vec()));
    assert_error(&raw("{\"name\":"), 400, "BAD_REQUEST");
    assert_error(&raw("[1]"), 400, "BAD_REQUEST");
    assert_error(&raw(""), 400, "BAD_REQUEST");
    assert!(
        names(&daemon, None).is_empty(),
        "a refused template was saved"
    );

    save(&daemon, None, &ok);
    let resp =
        daemon.send(&Request::post(&format!("{TEMPLATES}/t/spawn")).json(&json!({"image": "x"})));
    assert_error(&resp, 400, "BAD_REQUEST");
}

#[test]
fn a_caller_sees_its_own_templates_and_nobodys() {
    let daemon = Daemon::start();
    assert_status(
        &save(&daemon, None, &json!({"name": "base", "image": "default"})),
        201,
    );
    assert_status(
        &save(
            &daemon,
            Some("alice"),
            &json!({"name": "py", "image": "py-alice"}),
        ),
        201,
    );
    // The same name for another owner is another template.
    assert_status(
        &save(
            &daemon,
            Some("bob"),
            &json!({"name": "py", "image": "py-bob"}),
        ),
        201,
    );
    assert_eq!(names(&daemon, Some("alice")), vec!["base", "py"]);
    assert_eq!(names(&daemon, Some("carol")), vec!["base"]);
    assert_eq!(names(&daemon, None), vec!["base"]);
    assert_eq!(get(&daemon, Some("bob"), "py").json()["image"], "py-bob");
    assert_error(
        &get(&daemon, Some("carol"), "py"),
        404,
        "TEMPLATE_NOT_FOUND",
    );

    // A sandbox spawned from a template is the caller's.
    let sandbox = spawn(&daemon, Some("alice"), "py");
    assert_status(&sandbox, 201);
    assert_eq!(sandbox.json()["owner_id"], "alice");
    assert_eq!(sandbox.json()["image"], "py-alice");
    destroy_ok(&daemon, &id_of(&sandbox.json()));

    // Nobody's template is not deleted on an owner's behalf.
    let delete = |user| daemon.send(&as_user(Request::delete(&template_path("base")), user));
    assert_error(&delete(Some("alice")), 404, "TEMPLATE_NOT_FOUND");
    assert_eq!(names(&daemon, Some("alice")), vec!["base", "py"]);
    assert_status(&delete(None), 200);
    assert_eq!(names(&daemon, Some("alice")), vec!["py"]);
}

#[test]
fn a_saved_template_survives_kill_9() {
    let mut daemon = Daemon::start();
    assert_status(
        &save(
            &daemon,
            None,
            &json!({"name": "keep", "image": "default", "ttl": "2h"}),
        ),
        201,
    );
    daemon.kill9();
    let daemon = daemon.restart();
    let t = get(&daemon, None, "keep");
    assert_status(&t, 200);
    assert_eq!(t.json()["ttl"], "2h");
}

/// With owner-bound keys, a key's templates are its owner's: another
/// owner's are invisible (404 as a missing one), `X-User-ID` naming
/// someone else is refused, and a legacy unbound key sees only nobody's.
#[test]
fn owner_bound_keys_decide_whose_templates_a_caller_sees() {
    let daemon = Daemon::builder()
        .config(
            "[auth]\napi_keys = [\"legacy-key-0001\"]\n\n\
             [[auth.keys]]\nkey = \"alice-key-0001\"\nowner_id = \"alice\"\n\n\
             [[auth.keys]]\nkey = \"bob-key-00001\"\nowner_id = \"bob\"\n\n\
             [[auth.keys]]\nkey = \"admin-key-0001\"\nrole = \"admin\"\n",
        )
        .start();
    let with_key = |req: Request, key: &str| req.header("X-API-Key", key);
    let list = |key: &str| -> Vec<String> {
        let resp = daemon.send(&with_key(Request::get(TEMPLATES), key));
        assert_status(&resp, 200);
        resp.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let post =
        |key: &str, body: Value| daemon.send(&with_key(Request::post(TEMPLATES).json(&body), key));
    assert_status(
        &post("alice-key-0001", json!({"name": "py", "image": "a"})),
        201,
    );
    assert_status(
        &post("admin-key-0001", json!({"name": "base", "image": "b"})),
        201,
    );
    assert_eq!(list("alice-key-0001"), vec!["base", "py"]);
    assert_eq!(list("bob-key-00001"), vec!["base"]);
    assert_eq!(list("legacy-key-0001"), vec!["base"]);
    let bob_get = daemon.send(&with_key(
        Request::get(&template_path("py")),
        "bob-key-00001",
    ));
    assert_error(&bob_get, 404, "TEMPLATE_NOT_FOUND");
    let spoof =
        with_key(Request::get(&template_path("py")), "bob-key-00001").header("X-User-ID", "alice");
    assert_error(&daemon.send(&spoof), 403, "FORBIDDEN");
    // The admin key acts for the owner X-User-ID names.
    let as_alice =
        with_key(Request::get(&template_path("py")), "admin-key-0001").header("X-User-ID", "alice");
    assert_eq!(daemon.send(&as_alice).json()["image"], "a");
    // A sandbox spawned from a template is the key's owner's.
    let spawned = daemon.send(&with_key(
        Request::post(&format!("{TEMPLATES}/base/spawn")),
        "bob-key-00001",
    ));
    assert_status(&spawned, 201);
    assert_eq!(spawned.json()["owner_id"], "bob");
}
