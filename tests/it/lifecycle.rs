//! The command line, check-config, configuration precedence, signals
//! (SIGTERM, SIGINT, SIGHUP reload) and the readiness line.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{Daemon, Request, TempDir, assert_error, assert_status, command, poll_until, run};
use serde_json::json;

/// Every config key from the contract, set to a valid non-default value.
const FULL_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
allow_unauthenticated_remote = false
http_threads = 3
max_connections = 200
max_body_bytes = 65536
idle_timeout = "30s"
shutdown_timeout = "5s"

[store]
data_dir = "./data"
path = ""
checkpoint_interval = "500ms"
wal_size_limit = 8388608
max_batch = 64

[worker]
id = "full-config"
hostname = "full-host"
providers = ["mock"]
capabilities = ["gpu", "fast-disk"]
max_sandboxes = 12
heartbeat_interval = "2s"
stale_after = "1m30s"
down_after = "1h"

[auth]
api_keys = []
admin_api_keys = []

[log]
level = "debug"
"#;

fn check_config(text: &str) -> common::Finished {
    let dir = TempDir::new("check");
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    run(command()
        .current_dir(dir.path())
        .arg("--config")
        .arg(&path)
        .arg("check-config"))
}

/// The "error: ..." lines of check-config's output.
fn error_lines(out: &common::Finished) -> Vec<String> {
    out.output()
        .lines()
        .filter(|l| l.trim_start().starts_with("error:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn version_and_help() {
    for flag in ["--version", "-V"] {
        let out = run(command().arg(flag));
        assert_eq!(out.status.code(), Some(0), "{out}");
        assert_eq!(out.stdout.trim(), "stacyvmd 0.1.0", "{out}");
    }
    for flag in ["--help", "-h"] {
        let out = run(command().arg(flag));
        assert_eq!(out.status.code(), Some(0), "{out}");
        let text = out.output();
        for word in [
            "serve",
            "check-config",
            "--config",
            "--listen",
            "--data-dir",
        ] {
            assert!(text.contains(word), "--help does not mention {word}\n{out}");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = TempDir::new("usage");
    for args in [
        vec!["--no-such-flag", "serve"],
        vec!["frobnicate"],
        vec!["--log-level", "loud", "check-config"],
        vec!["--config", "/nonexistent/stacyvmd.toml", "check-config"],
        vec!["--listen"],
    ] {
        let out = run(command().current_dir(dir.path()).args(&args));
        assert_eq!(out.status.code(), Some(2), "stacyvmd {args:?}\n{out}");
        assert!(
            !out.stderr.trim().is_empty(),
            "stacyvmd {args:?} says nothing\n{out}"
        );
    }
}

#[test]
fn check_config_accepts_every_documented_key() {
    let out = check_config(FULL_CONFIG);
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(error_lines(&out).is_empty(), "{out}");

    // Options may also follow the subcommand.
    let dir = TempDir::new("check-after");
    let path = dir.join("c.toml");
    std::fs::write(&path, FULL_CONFIG).unwrap();
    let out = run(command().arg("check-config").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(0), "{out}");

    // An empty file is all defaults.
    let out = check_config("");
    assert_eq!(out.status.code(), Some(0), "{out}");
}

#[test]
fn check_config_reports_every_problem() {
    let out = check_config("[server]\nbogus_key = 1\nidle_timeout = \"ten seconds\"\n");
    assert_eq!(out.status.code(), Some(2), "{out}");
    let errors = error_lines(&out);
    assert!(
        errors.iter().any(|l| l.contains("bogus_key")),
        "the unknown key is not reported\n{out}"
    );
    assert!(
        errors.iter().any(|l| l.contains("idle_timeout")),
        "the bad duration is not reported\n{out}"
    );
    assert!(errors.len() >= 2, "expected one line per problem\n{out}");
}

#[test]
fn check_config_names_each_bad_key() {
    let cases = [
        ("[log]\nlevel = \"loud\"\n", "level"),
        ("[server]\nlisten = \"not an address\"\n", "listen"),
        ("[server]\nhttp_threads = \"four\"\n", "http_threads"),
        ("[server]\nmax_body_bytes = -5\n", "max_body_bytes"),
        ("[worker]\nstale_after = \"15 parsecs\"\n", "stale_after"),
        ("[worker]\nproviders = \"mock\"\n", "providers"),
        ("[store]\ncheckpoint_interval = 5\n", "checkpoint_interval"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[auth]\napi_keys = \"not-a-list\"\n", "api_keys"),
    ];
    for (text, key) in cases {
        let out = check_config(text);
        assert_eq!(out.status.code(), Some(2), "config:\n{text}\n{out}");
        assert!(
            error_lines(&out).iter().any(|l| l.contains(key)),
            "config:\n{text}\nno error line names {key}\n{out}"
        );
    }
    // Broken TOML is an error too, not a panic.
    let out = check_config("[server\nlisten = ");
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(!error_lines(&out).is_empty(), "{out}");
}

#[test]
fn serve_refuses_a_bad_config() {
    let refused = Daemon::builder()
        .config("[server]\nbogus_key = 1\n")
        .try_start()
        .err()
        .expect("stacyvmd served with an unknown config key");
    assert_eq!(refused.status.code(), Some(2), "{refused}");
    assert!(refused.output().contains("bogus_key"), "{refused}");
}

#[test]
fn readiness_line_and_stdout() {
    let mut daemon = Daemon::start();
    let db = &daemon.db;
    assert!(
        db.is_absolute(),
        "db= must be absolute: {}",
        daemon.ready_line
    );
    assert!(db.exists(), "db= does not exist: {}", daemon.ready_line);
    assert!(
        db.starts_with(daemon.data_dir().canonicalize().unwrap())
            || db.starts_with(daemon.data_dir()),
        "db is not in --data-dir: {}",
        daemon.ready_line
    );
    assert_eq!(db.file_name().unwrap(), "stacyvmd.db");
    assert_eq!(daemon.stop().code(), Some(0));
    let extra = daemon.stdout_after_ready();
    assert!(
        extra.is_empty(),
        "stdout must hold only the readiness line: {extra:?}"
    );
}

fn local_status(db: &Path, id: &str) -> String {
    let conn = rusqlite::Connection::open(db).expect("open db");
    conn.query_row("SELECT status FROM workers WHERE id = ?1", [id], |row| {
        row.get(0)
    })
    .expect("read the local worker's status")
}

#[test]
fn sigterm_exits_0_and_marks_the_local_worker_offline() {
    for signal in ["TERM", "INT"] {
        let mut daemon = Daemon::start();
        let mut client = daemon.client();
        assert_status(&client.get("/api/v1/workers"), 200);
        // An idle keep-alive connection must not hold up the stop.
        daemon.signal(signal);
        let status = daemon.wait_exit(Duration::from_secs(15));
        assert_eq!(status.code(), Some(0), "exit status after SIG{signal}");
        let stored = local_status(&daemon.db, "local");
        assert_ne!(
            stored, "online",
            "after SIG{signal} the local worker is still stored online"
        );

        // After a restart it is online again.
        let daemon = daemon.restart();
        let local = daemon.get("/api/v1/workers/local").json();
        assert_eq!(local["status"], "online", "{local}");
    }
}

#[test]
fn configuration_precedence() {
    let dir = TempDir::new("precedence");
    let config = dir.join("env.toml");
    std::fs::write(&config, "[worker]\nid = \"from-config\"\n").unwrap();
    let config = config.to_str().unwrap();

    let from_config = Daemon::builder().env("STACYVMD_CONFIG", config).start();
    assert_eq!(
        from_config.worker_id, "from-config",
        "{}",
        from_config.ready_line
    );
    drop(from_config);

    let from_env = Daemon::builder()
        .env("STACYVMD_CONFIG", config)
        .env("STACYVMD_WORKER_ID", "from-env")
        .start();
    assert_eq!(from_env.worker_id, "from-env", "{}", from_env.ready_line);
    drop(from_env);

    let from_flag = Daemon::builder()
        .env("STACYVMD_CONFIG", config)
        .env("STACYVMD_WORKER_ID", "from-env")
        .args(&["--worker-id", "from-flag"])
        .start();
    assert_eq!(from_flag.worker_id, "from-flag", "{}", from_flag.ready_line);
    assert_eq!(from_flag.worker_ids(), ["from-flag"]);
}

#[test]
fn data_dir_from_environment() {
    let dir = TempDir::new("datadir-env");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let state = state.canonicalize().unwrap();
    let daemon = Daemon::builder()
        .no_data_dir()
        .env("STATE_DIRECTORY", state.to_str().unwrap())
        .start();
    assert!(
        daemon.db.starts_with(&state),
        "STATE_DIRECTORY is not the default data dir: {}",
        daemon.ready_line
    );
    drop(daemon);

    let env_dir = dir.join("env-data");
    let daemon = Daemon::builder()
        .no_data_dir()
        .env("STATE_DIRECTORY", state.to_str().unwrap())
        .env("STACYVMD_DATA_DIR", env_dir.to_str().unwrap())
        .start();
    assert!(
        daemon
            .db
            .starts_with(env_dir.canonicalize().unwrap_or(env_dir.clone()))
            || daemon.db.starts_with(&env_dir),
        "STACYVMD_DATA_DIR is not used: {}",
        daemon.ready_line
    );
}

fn keys_config(user: &str, admin: &str, level: &str, threads: u32) -> String {
    format!(
        "[server]\nhttp_threads = {threads}\n\n[auth]\napi_keys = [\"{user}\"]\nadmin_api_keys = [\"{admin}\"]\n\n[log]\nlevel = \"{level}\"\n"
    )
}

#[test]
fn sighup_reloads_keys_and_keeps_the_old_config_when_broken() {
    const OLD: &str = "old-user-key-0e1d2c";
    const NEW: &str = "new-user-key-9f8a7b";
    const ADMIN: &str = "admin-key-4c4c4c";
    let mut daemon = Daemon::builder()
        .config(&keys_config(OLD, ADMIN, "info", 4))
        .start();
    let with_key = |key: &str| Request::get("/api/v1/workers").header("X-API-Key", key);
    assert_status(&daemon.send(&with_key(OLD)), 200);
    assert_error(&daemon.send(&with_key(NEW)), 401, "UNAUTHORIZED");

    // New key, new log level, and a key that needs a restart.
    daemon.write_config(&keys_config(NEW, ADMIN, "debug", 2));
    daemon.sighup();
    poll_until(
        Duration::from_secs(5),
        "the reloaded key to be accepted",
        || daemon.send(&with_key(NEW)).status == 200,
    );
    assert_error(&daemon.send(&with_key(OLD)), 401, "UNAUTHORIZED");
    poll_until(
        Duration::from_secs(5),
        "a \"needs restart\" log line for server.http_threads",
        || {
            daemon
                .stderr_text()
                .lines()
                .any(|l| l.contains("needs restart") && l.contains("http_threads"))
        },
    );

    // A broken file: logged, and the current keys keep working.
    let logged_before = daemon.stderr_text().len();
    daemon.write_config("[auth\napi_keys = [\"half");
    daemon.sighup();
    poll_until(
        Duration::from_secs(5),
        "a WARN/ERROR log line about the bad reload",
        || {
            let log = daemon.stderr_text();
            log[logged_before..].lines().any(|l| {
                let lower = l.to_lowercase();
                (l.contains("ERROR") || l.contains("WARN"))
                    && (lower.contains("config") || lower.contains("reload"))
            })
        },
    );
    assert!(
        daemon.is_running(),
        "a broken config on SIGHUP stopped the daemon"
    );
    assert_status(&daemon.send(&with_key(NEW)), 200);
    assert_error(&daemon.send(&with_key(OLD)), 401, "UNAUTHORIZED");
    assert_status(
        &daemon.send(
            &Request::post("/api/v1/admin/workers/after-reload/heartbeat")
                .header("X-Admin-API-Key", ADMIN)
                .json(&json!({})),
        ),
        200,
    );

    assert_eq!(daemon.stop().code(), Some(0));
    let log = daemon.stderr_text();
    for key in [OLD, NEW, ADMIN] {
        assert!(!log.contains(key), "key {key} appears in the log:\n{log}");
    }
}
