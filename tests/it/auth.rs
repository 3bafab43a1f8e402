//! API keys: who may call what, keys never logged, and the refusal to
//! listen on a non-loopback address with no key.

use crate::common;

use common::{Daemon, Request, assert_error, assert_status};
use serde_json::json;

const USER_KEY: &str = "user-key-5d1e9a7c0b";
const ADMIN_KEY: &str = "admin-key-b3f08e4a61";
const WRONG_KEY: &str = "wrong-key-77aa0c3d1f";

/// Checks every auth rule against a daemon configured with USER_KEY and
/// ADMIN_KEY, then that no key ever reached its log.
fn check_auth_rules(mut daemon: Daemon) {
    let workers = "/api/v1/workers";
    let heartbeat = "/api/v1/admin/workers/w-auth/heartbeat";

    // Open routes.
    for path in [
        "/api/v1/health",
        "/api/v1/live",
        "/api/v1/ready",
        "/metrics",
    ] {
        assert_status(&daemon.get(path), 200);
    }

    // Missing and wrong keys: 401, on user and admin routes.
    assert_error(&daemon.get(workers), 401, "UNAUTHORIZED");
    assert_error(&daemon.get("/api/v1/workers/local"), 401, "UNAUTHORIZED");
    assert_error(&daemon.get("/api/v1/diagnostics"), 401, "UNAUTHORIZED");
    for req in [
        Request::get(workers).header("X-API-Key", WRONG_KEY),
        Request::get(workers).header("Authorization", &format!("Bearer {WRONG_KEY}")),
        Request::get(workers).header("X-API-Key", ""),
        Request::post(heartbeat),
        Request::post(heartbeat).header("X-Admin-API-Key", WRONG_KEY),
        Request::delete("/api/v1/admin/workers/local").header("X-Admin-API-Key", WRONG_KEY),
        Request::get("/api/v1/admin/workers").header("X-API-Key", WRONG_KEY),
    ] {
        let resp = daemon.send(&req.header("X-Request-ID", "auth-check"));
        assert_error(&resp, 401, "UNAUTHORIZED");
        assert_eq!(resp.header("X-Request-ID"), Some("auth-check"));
    }

    // The user key, both forms, on user routes.
    for req in [
        Request::get(workers).header("X-API-Key", USER_KEY),
        Request::get(workers).header("Authorization", &format!("Bearer {USER_KEY}")),
        Request::get("/api/v1/workers/local").header("X-API-Key", USER_KEY),
        // An admin key is also good for user routes.
        Request::get(workers).header("X-Admin-API-Key", ADMIN_KEY),
    ] {
        assert_status(&daemon.send(&req), 200);
    }

    // The user key on admin routes: 403.
    for req in [
        Request::post(heartbeat).header("X-API-Key", USER_KEY),
        Request::post(heartbeat).header("Authorization", &format!("Bearer {USER_KEY}")),
        Request::get("/api/v1/admin/workers").header("X-API-Key", USER_KEY),
    ] {
        assert_error(&daemon.send(&req), 403, "FORBIDDEN");
    }
    let listed = daemon.send(&Request::get(workers).header("X-API-Key", USER_KEY));
    assert_eq!(
        listed.json().as_array().map(Vec::len),
        Some(1),
        "refused heartbeats created a worker"
    );

    // The admin key works on admin routes.
    let created = daemon.send(
        &Request::post(heartbeat)
            .header("X-Admin-API-Key", ADMIN_KEY)
            .json(&json!({"hostname": "h"})),
    );
    assert_status(&created, 200);
    let admin_list =
        daemon.send(&Request::get("/api/v1/admin/workers").header("X-Admin-API-Key", ADMIN_KEY));
    assert_status(&admin_list, 200);
    assert_eq!(admin_list.json().as_array().map(Vec::len), Some(2));

    assert_eq!(daemon.stop().code(), Some(0), "SIGTERM exit code");
    let log = daemon.stderr_text();
    for key in [USER_KEY, ADMIN_KEY, WRONG_KEY] {
        assert!(
            !log.contains(key),
            "key {key} appears in the daemon's log:\n{log}"
        );
    }
}

#[test]
fn keys_from_the_config_file() {
    let daemon = Daemon::builder()
        .args(&["--log-level", "debug"])
        .config(&format!(
            "[auth]\napi_keys = [\"{USER_KEY}\"]\nadmin_api_keys = [\"{ADMIN_KEY}\"]\n"
        ))
        .start();
    check_auth_rules(daemon);
}

#[test]
fn keys_from_the_environment() {
    let daemon = Daemon::builder()
        .args(&["--log-level", "debug"])
        .env("STACYVMD_API_KEYS", &format!("other-user-key-1,{USER_KEY}"))
        .env(
            "STACYVMD_ADMIN_API_KEYS",
            &format!("{ADMIN_KEY},other-admin-key-2"),
        )
        .start();
    check_auth_rules(daemon);
}

#[test]
fn the_bearer_scheme_is_case_insensitive_with_any_spaces() {
    let daemon = Daemon::builder()
        .config(&format!("[auth]\napi_keys = [\"{USER_KEY}\"]\n"))
        .start();
    for scheme in [
        "Bearer ",
        "bearer ",
        "BEARER ",
        "bEaReR ",
        "Bearer    ",
        "bearer\t",
    ] {
        let value = format!("{scheme}{USER_KEY}");
        // Without a body (the handler decides) and with one (the relay
        // decides before the body): the same answer.
        let get = daemon.send(&Request::get("/api/v1/workers").header("Authorization", &value));
        assert_status(&get, 200);
        let post = daemon.send(
            &Request::post("/api/v1/sandboxes/admission")
                .header("Authorization", &value)
                .json(&json!({})),
        );
        assert_status(&post, 200);
    }
    // Another scheme, or the scheme glued to the key, is not a bearer token.
    for value in [
        format!("Basic {USER_KEY}"),
        format!("Bearer{USER_KEY}"),
        format!("Bearerx {USER_KEY}"),
        USER_KEY.to_owned(),
    ] {
        let resp = daemon.send(&Request::get("/api/v1/workers").header("Authorization", &value));
        assert_error(&resp, 401, "UNAUTHORIZED");
        let resp = daemon.send(
            &Request::post("/api/v1/sandboxes/admission")
                .header("Authorization", &value)
                .json(&json!({})),
        );
        assert_error(&resp, 401, "UNAUTHORIZED");
    }
}

#[test]
fn no_keys_means_every_route_is_open_on_loopback() {
    let daemon = Daemon::start();
    assert_status(&daemon.get("/api/v1/workers"), 200);
    assert_status(&daemon.heartbeat("w-open", &json!({})), 200);
    // A stray key header changes nothing when no keys are configured.
    assert_status(
        &daemon.send(&Request::get("/api/v1/workers").header("X-API-Key", WRONG_KEY)),
        200,
    );
}

#[test]
fn refuses_a_remote_listen_address_without_a_key() {
    let refused = Daemon::builder()
        .listen(Some("0.0.0.0:0"))
        .try_start()
        .err()
        .expect("stacyvmd served on 0.0.0.0 with no API key");
    assert!(
        !refused.status.success(),
        "refusal must exit non-zero\n{refused}"
    );
    let out = refused.output().to_lowercase();
    assert!(
        out.contains("key") || out.contains("allow_unauthenticated_remote"),
        "the refusal must say an API key is needed\n{refused}"
    );

    // With a key it starts, and the key is enforced.
    let daemon = Daemon::builder()
        .listen(Some("0.0.0.0:0"))
        .env("STACYVMD_API_KEYS", USER_KEY)
        .start();
    assert!(
        daemon.listen_addr.starts_with("0.0.0.0:"),
        "{}",
        daemon.ready_line
    );
    assert_error(&daemon.get("/api/v1/workers"), 401, "UNAUTHORIZED");
    assert_status(
        &daemon.send(&Request::get("/api/v1/workers").header("X-API-Key", USER_KEY)),
        200,
    );

    // Or when explicitly allowed.
    let allowed = Daemon::builder()
        .listen(Some("0.0.0.0:0"))
        .config("[server]\nallow_unauthenticated_remote = true\n")
        .start();
    assert_status(&allowed.get("/api/v1/workers"), 200);
}
