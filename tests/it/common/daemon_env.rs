//! The environment the daemon reads, removed from every daemon the tests
//! and the benches start, so that the developer's shell (or a systemd
//! session) cannot change what a test or a measurement sees. One list for
//! both: tests/it/common/mod.rs has it as a module, benches/common/daemon.rs
//! includes this file with `#[path]`.

/// Every variable the daemon (src/config.rs, src/main.rs, src/daemon.rs,
/// src/notify.rs) or its logger reads.
pub const DAEMON_ENV: &[&str] = &[
    "STACYVMD_CONFIG",
    "STACYVMD_LISTEN",
    "STACYVMD_DATA_DIR",
    "STACYVMD_LOG_LEVEL",
    "STACYVMD_WORKER_ID",
    "STACYVMD_API_KEYS",
    "STACYVMD_ADMIN_API_KEYS",
    "STACYVMD_OWNER_KEYS",
    // systemd: the default data dir and admin socket dir, readiness and
    // the watchdog.
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    // env_logger
    "RUST_LOG",
    "RUST_LOG_STYLE",
];
