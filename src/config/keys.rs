//! Every key of the configuration file, once: its section, its name, the
//! [`Config`] field it sets and whether a SIGHUP may change it.
//!
//! This table is the one source of truth for both jobs that need the list
//! of keys: the reader accepts exactly these keys (anything else is
//! "unknown key", in this order), and the reload applies the keys marked
//! `reloadable` and names every other changed key as needing a restart.
//! A key read by the reader but missing here is refused as unknown, so the
//! two cannot drift apart; `tests.rs` checks each entry against its field
//! and against the man page.

use super::Config;

/// One key of the file.
pub(crate) struct Key {
    /// Dotted section (`providers.process`); `quotas.<owner>` stands for
    /// every owner's table.
    pub section: &'static str,
    pub name: &'static str,
    /// Dotted name as the reload logs it (`server.listen`).
    pub full_name: &'static str,
    /// A SIGHUP applies it at once; otherwise a change is logged as
    /// "needs restart" and the running value is kept.
    pub reloadable: bool,
    /// Whether two configs differ in the field this key sets.
    pub differs: fn(&Config, &Config) -> bool,
    /// Copies the field this key sets from the second config into the first.
    pub apply: fn(&mut Config, &Config),
}

/// The section that stands for each owner's `[quotas.<owner>]` table.
pub(crate) const QUOTAS: &str = "quotas.<owner>";

macro_rules! key {
    ($section:literal, $name:literal, $reloadable:expr, $($field:ident).+) => {
        Key {
            section: $section,
            name: $name,
            full_name: concat!($section, ".", $name),
            reloadable: $reloadable,
            differs: |a, b| a.$($field).+ != b.$($field).+,
            apply: |into, from| into.$($field).+ = from.$($field).+.clone(),
        }
    };
}

const LIVE: bool = true;
const RESTART: bool = false;

/// Sections in the order their problems are reported; within a section,
/// keys in the order "unknown key" lists them.
// One row per key, as a table: rustfmt would break the long rows.
#[rustfmt::skip]
pub(crate) static KEYS: &[Key] = &[
    key!("server", "listen", RESTART, server.listen),
    key!("server", "allow_unauthenticated_remote", RESTART, server.allow_unauthenticated_remote),
    key!("server", "http_threads", RESTART, server.http_threads),
    key!("server", "max_connections", RESTART, server.max_connections),
    key!("server", "max_connections_per_client", LIVE, server.max_connections_per_client),
    key!("server", "max_body_bytes", LIVE, server.max_body_bytes),
    key!("server", "idle_timeout", LIVE, server.idle_timeout),
    key!("server", "header_timeout", LIVE, server.header_timeout),
    key!("server", "body_timeout", LIVE, server.body_timeout),
    key!("server", "min_body_rate", LIVE, server.min_body_rate),
    key!("server", "shutdown_timeout", RESTART, server.shutdown_timeout),
    key!("store", "data_dir", RESTART, store.data_dir),
    key!("store", "path", RESTART, store.path),
    key!("store", "checkpoint_interval", RESTART, store.checkpoint_interval),
    key!("store", "wal_size_limit", RESTART, store.wal_size_limit),
    key!("store", "max_batch", RESTART, store.max_batch),
    key!("store", "reserve_bytes", RESTART, store.reserve_bytes),
    key!("store", "retention", RESTART, store.retention),
    key!("worker", "id", RESTART, worker.id),
    key!("worker", "hostname", RESTART, worker.hostname),
    key!("worker", "providers", RESTART, worker.providers),
    key!("worker", "capabilities", LIVE, worker.capabilities),
    key!("worker", "max_sandboxes", LIVE, worker.max_sandboxes),
    key!("worker", "heartbeat_interval", RESTART, worker.heartbeat_interval),
    key!("worker", "stale_after", LIVE, worker.stale_after),
    key!("worker", "down_after", LIVE, worker.down_after),
    key!("auth", "api_keys", LIVE, auth.api_keys),
    key!("auth", "admin_api_keys", LIVE, auth.admin_api_keys),
    key!("auth", "keys", LIVE, auth.keys),
    key!("log", "level", LIVE, log.level),
    key!("sandboxes", "default_image", LIVE, sandboxes.default_image),
    key!("sandboxes", "default_ttl", LIVE, sandboxes.default_ttl),
    key!("sandboxes", "max_ttl", LIVE, sandboxes.max_ttl),
    key!("sandboxes", "max_sandboxes", LIVE, sandboxes.max_sandboxes),
    key!("sandboxes", "max_per_owner", LIVE, sandboxes.max_per_owner),
    key!("sandboxes", "default_memory_mb", LIVE, sandboxes.default_memory_mb),
    key!("sandboxes", "max_memory_mb", LIVE, sandboxes.max_memory_mb),
    key!("sandboxes", "default_vcpus", LIVE, sandboxes.default_vcpus),
    key!("sandboxes", "max_vcpus", LIVE, sandboxes.max_vcpus),
    key!("sandboxes", "provider_timeout", LIVE, sandboxes.provider_timeout),
    // The reaper's timer is set once at start.
    key!("sandboxes", "reap_interval", RESTART, sandboxes.reap_interval),
    key!("leases", "ttl", RESTART, leases.ttl),
    key!("leases", "renew_interval", RESTART, leases.renew_interval),
    key!("leases", "max_ttl", RESTART, leases.max_ttl),
    key!("scheduler", "policy", LIVE, scheduler.policy),
    key!("providers", "default", RESTART, providers.default),
    key!("providers.mock", "latency", RESTART, providers.mock.latency),
    key!("providers.mock", "failure_rate", RESTART, providers.mock.failure_rate),
    key!("providers.process", "images", RESTART, providers.process.images),
    key!("providers.process", "uid_base", RESTART, providers.process.uid_base),
    key!("providers.process", "max_processes", RESTART, providers.process.max_processes),
    key!("providers.process", "max_open_files", RESTART, providers.process.max_open_files),
    key!("providers.process", "max_file_mb", RESTART, providers.process.max_file_bytes),
    key!("providers.process", "exec_timeout", RESTART, providers.process.exec_timeout),
    key!("providers.process", "max_exec_timeout", RESTART, providers.process.max_exec_timeout),
    key!("providers.process", "exec_output_bytes", RESTART, providers.process.exec_output_bytes),
    key!("providers.process", "max_upload_mb", RESTART, providers.process.max_upload_bytes),
    key!("providers.process", "cgroup", RESTART, providers.process.cgroup),
    key!("providers.process", "disk_mb", RESTART, providers.process.disk_mb),
    key!("providers.process", "uid_count", RESTART, providers.process.uid_count),
    key!("providers.process", "workspace_mb", RESTART, providers.process.workspace_mb),
    key!("providers.process", "workspace_inodes", RESTART, providers.process.workspace_inodes),
    key!("providers.process", "file_timeout", RESTART, providers.process.file_timeout),
    key!("providers.process", "max_ops_per_sandbox", RESTART, providers.process.max_ops_per_sandbox),
    key!("providers.process", "proc", RESTART, providers.process.proc),
    key!("providers.process", "uid_registry", RESTART, providers.process.uid_registry),
    key!("admin", "enabled", RESTART, admin.enabled),
    key!("admin", "socket", RESTART, admin.socket),
    key!("admin", "socket_gid", RESTART, admin.socket_gid),
    key!("admin", "admin_uids", RESTART, admin.admin_uids),
    key!("admin", "admin_gids", RESTART, admin.admin_gids),
    key!("admin", "read_uids", RESTART, admin.read_uids),
    key!("admin", "read_gids", RESTART, admin.read_gids),
    key!("admin", "max_connections", RESTART, admin.max_connections),
    key!("admin", "max_connections_per_client", RESTART, admin.max_connections_per_client),
    key!("admin", "max_line_bytes", RESTART, admin.max_line_bytes),
    key!("admin", "idle_timeout", RESTART, admin.idle_timeout),
    key!("admin", "line_timeout", RESTART, admin.line_timeout),
    // One entry per key of every owner's table: both carry the whole map.
    key!("quotas.<owner>", "max_sandboxes", LIVE, quotas),
    key!("quotas.<owner>", "max_ttl", LIVE, quotas),
];

/// The top-level sections, in table order.
pub(crate) fn sections() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for key in KEYS {
        let top = top_level(key.section);
        if !out.contains(&top) {
            out.push(top);
        }
    }
    out
}

/// What `section` may hold: its keys, then its subsections' names
/// (`providers` holds `default`, `mock` and `process`).
pub(crate) fn known_in(section: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = KEYS
        .iter()
        .filter(|k| k.section == section)
        .map(|k| k.name)
        .collect();
    for key in KEYS {
        let child = key
            .section
            .strip_prefix(section)
            .and_then(|rest| rest.strip_prefix('.'));
        if let Some(child) = child.filter(|c| !out.contains(c)) {
            out.push(child);
        }
    }
    out
}

fn top_level(section: &'static str) -> &'static str {
    section.split_once('.').map_or(section, |(top, _)| top)
}
