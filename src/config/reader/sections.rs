//! The sections with no reader of their own: `[server]`, `[store]`,
//! `[worker]`, `[log]`, `[sandboxes]`, `[leases]`, `[scheduler]`,
//! `[admin]` and `[quotas.<owner>]`, one function each. Each reads its keys
//! in a fixed order and then checks the rules within the section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::Reader;
use crate::config::keys::{self, QUOTAS};
use crate::config::schema::{
    AdminConfig, DATABASE_FILE, DAY, DEFAULT_DATA_DIR, DEFAULT_LISTEN, HOUR, LeaseConfig,
    PlacementPolicy, QuotaPolicy, SandboxConfig, SchedulerConfig, ServerConfig, StoreConfig,
    WorkerConfig,
};
use crate::time::format_duration;
use crate::workers::validate_worker_id;

impl Reader {
    pub(super) fn server(&mut self, table: &toml::Table) -> ServerConfig {
        let s = self.known_section(table, "server", "server");
        let listen_text = self.string(s, "server", "listen", DEFAULT_LISTEN);
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    "server.listen",
                    format!("{listen_text:?} is not an IP:port address"),
                );
                DEFAULT_LISTEN
                    .parse()
                    .expect("default listen address parses")
            }
        };
        ServerConfig {
            listen,
            allow_unauthenticated_remote: self.boolean(
                s,
                "server",
                "allow_unauthenticated_remote",
                false,
            ),
            http_threads: self.integer(s, "server", "http_threads", 16, 1, 256) as usize,
            max_connections: self.integer(s, "server", "max_connections", 1024, 1, 65_536) as usize,
            max_connections_per_client: self.integer(
                s,
                "server",
                "max_connections_per_client",
                256,
                1,
                65_536,
            ) as usize,
            max_body_bytes: self.integer(s, "server", "max_body_bytes", 1 << 20, 1, 1 << 30) as u64,
            idle_timeout: self.duration(
                s,
                "server",
                "idle_timeout",
                "75s",
                Duration::from_millis(100),
                HOUR,
            ),
            shutdown_timeout: self.duration(
                s,
                "server",
                "shutdown_timeout",
                "20s",
                Duration::ZERO,
                HOUR,
            ),
            header_timeout: self.duration(
                s,
                "server",
                "header_timeout",
                "10s",
                Duration::from_millis(100),
                HOUR,
            ),
            body_timeout: self.duration(
                s,
                "server",
                "body_timeout",
                "10s",
                Duration::from_millis(100),
                HOUR,
            ),
            min_body_rate: self.integer(s, "server", "min_body_rate", 8192, 1, 1 << 30) as u64,
        }
    }

    pub(super) fn store(
        &mut self,
        table: &toml::Table,
        state_directory: Option<&str>,
    ) -> StoreConfig {
        let st = self.known_section(table, "store", "store");
        let data_dir = PathBuf::from(self.string(
            st,
            "store",
            "data_dir",
            state_directory.unwrap_or(DEFAULT_DATA_DIR),
        ));
        let path_text = self.string(st, "store", "path", "");
        let path = if path_text.is_empty() {
            data_dir.join(DATABASE_FILE)
        } else {
            PathBuf::from(path_text)
        };
        StoreConfig {
            data_dir,
            path,
            checkpoint_interval: self.duration(
                st,
                "store",
                "checkpoint_interval",
                "1s",
                Duration::from_millis(10),
                HOUR,
            ),
            wal_size_limit: self.integer(st, "store", "wal_size_limit", 64 << 20, 0, 1 << 40)
                as u64,
            max_batch: self.integer(st, "store", "max_batch", 256, 1, 10_000) as usize,
            reserve_bytes: self.integer(st, "store", "reserve_bytes", 8 << 20, 0, 1 << 34) as u64,
            retention: self.duration(
                st,
                "store",
                "retention",
                "7d",
                Duration::from_secs(1),
                3650 * DAY,
            ),
        }
    }

    pub(super) fn worker(&mut self, table: &toml::Table) -> WorkerConfig {
        let w = self.known_section(table, "worker", "worker");
        let id = self.string(w, "worker", "id", "local");
        if let Err(e) = validate_worker_id(&id) {
            self.problem("worker.id", e);
        }
        let mut hostname = self.string(w, "worker", "hostname", "");
        if hostname.is_empty() {
            hostname = system_hostname();
        }
        let worker = WorkerConfig {
            id,
            hostname,
            providers: self.string_list(w, "worker", "providers", &["mock", "process"]),
            capabilities: self.string_list(w, "worker", "capabilities", &[]),
            max_sandboxes: self.integer(w, "worker", "max_sandboxes", 64, 0, 1_000_000) as u32,
            heartbeat_interval: self.duration(
                w,
                "worker",
                "heartbeat_interval",
                "5s",
                Duration::from_millis(10),
                HOUR,
            ),
            stale_after: self.duration(
                w,
                "worker",
                "stale_after",
                "15s",
                Duration::from_millis(10),
                DAY,
            ),
            down_after: self.duration(
                w,
                "worker",
                "down_after",
                "60s",
                Duration::from_millis(10),
                7 * DAY,
            ),
        };
        if worker.heartbeat_interval >= worker.stale_after {
            self.problem(
                "worker.heartbeat_interval",
                format!(
                    "must be shorter than worker.stale_after ({}), or the local worker goes stale between its own heartbeats",
                    format_duration(worker.stale_after)
                ),
            );
        }
        if worker.down_after < worker.stale_after {
            self.problem(
                "worker.down_after",
                "must not be shorter than worker.stale_after".into(),
            );
        }
        worker
    }

    pub(super) fn log(&mut self, table: &toml::Table) -> log::LevelFilter {
        let l = self.known_section(table, "log", "log");
        let level_text = self.string(l, "log", "level", "info");
        match level_text.parse::<log::LevelFilter>() {
            Ok(level) => level,
            Err(_) => {
                self.problem(
                    "log.level",
                    format!("{level_text:?} is not one of off, error, warn, info, debug, trace"),
                );
                log::LevelFilter::Info
            }
        }
    }

    pub(super) fn sandboxes(&mut self, table: &toml::Table) -> SandboxConfig {
        let sb = self.known_section(table, "sandboxes", "sandboxes");
        let sandboxes = SandboxConfig {
            default_image: self.string(sb, "sandboxes", "default_image", "default"),
            default_ttl: self.duration(
                sb,
                "sandboxes",
                "default_ttl",
                "30m",
                Duration::from_secs(1),
                365 * DAY,
            ),
            max_ttl: self.duration(
                sb,
                "sandboxes",
                "max_ttl",
                "24h",
                Duration::from_secs(1),
                365 * DAY,
            ),
            max_sandboxes: self.integer(sb, "sandboxes", "max_sandboxes", 1000, 0, 10_000_000)
                as u32,
            max_per_owner: self.integer(sb, "sandboxes", "max_per_owner", 0, 0, 10_000_000) as u32,
            default_memory_mb: self.integer(sb, "sandboxes", "default_memory_mb", 512, 1, 1 << 24)
                as u32,
            max_memory_mb: self.integer(sb, "sandboxes", "max_memory_mb", 65_536, 1, 1 << 24)
                as u32,
            default_vcpus: self.integer(sb, "sandboxes", "default_vcpus", 1, 1, 1024) as u32,
            max_vcpus: self.integer(sb, "sandboxes", "max_vcpus", 64, 1, 1024) as u32,
            provider_timeout: self.duration(
                sb,
                "sandboxes",
                "provider_timeout",
                "30s",
                Duration::from_millis(10),
                HOUR,
            ),
            reap_interval: self.duration(
                sb,
                "sandboxes",
                "reap_interval",
                "1s",
                Duration::from_millis(10),
                HOUR,
            ),
        };
        if sandboxes.default_ttl > sandboxes.max_ttl {
            self.problem(
                "sandboxes.default_ttl",
                "must not be longer than sandboxes.max_ttl".into(),
            );
        }
        if sandboxes.default_memory_mb > sandboxes.max_memory_mb {
            self.problem(
                "sandboxes.default_memory_mb",
                "must not exceed sandboxes.max_memory_mb".into(),
            );
        }
        if sandboxes.default_vcpus > sandboxes.max_vcpus {
            self.problem(
                "sandboxes.default_vcpus",
                "must not exceed sandboxes.max_vcpus".into(),
            );
        }
        if sandboxes.default_image.is_empty() {
            self.problem("sandboxes.default_image", "must not be empty".into());
        }
        sandboxes
    }

    pub(super) fn leases(&mut self, table: &toml::Table) -> LeaseConfig {
        let le = self.known_section(table, "leases", "leases");
        let leases = LeaseConfig {
            ttl: self.duration(
                le,
                "leases",
                "ttl",
                "30s",
                Duration::from_millis(100),
                365 * DAY,
            ),
            renew_interval: self.duration(
                le,
                "leases",
                "renew_interval",
                "10s",
                Duration::from_millis(10),
                DAY,
            ),
            max_ttl: self.duration(
                le,
                "leases",
                "max_ttl",
                "24h",
                Duration::from_secs(1),
                365 * DAY,
            ),
        };
        if leases.ttl > leases.max_ttl {
            self.problem(
                "leases.ttl",
                format!(
                    "must be at most leases.max_ttl ({})",
                    format_duration(leases.max_ttl)
                ),
            );
        }
        if leases.renew_interval >= leases.ttl {
            self.problem(
                "leases.renew_interval",
                "must be shorter than leases.ttl, or leases lapse between renewals".into(),
            );
        }
        leases
    }

    pub(super) fn scheduler(&mut self, table: &toml::Table) -> SchedulerConfig {
        let sc = self.known_section(table, "scheduler", "scheduler");
        let policy = match self.string(sc, "scheduler", "policy", "spread").as_str() {
            "spread" => PlacementPolicy::Spread,
            "binpack" => PlacementPolicy::Binpack,
            other => {
                self.problem(
                    "scheduler.policy",
                    format!("{other:?} is not one of spread, binpack"),
                );
                PlacementPolicy::Spread
            }
        };
        SchedulerConfig { policy }
    }

    pub(super) fn admin(
        &mut self,
        table: &toml::Table,
        store: &StoreConfig,
        runtime_directory: Option<&str>,
    ) -> AdminConfig {
        let ad = self.known_section(table, "admin", "admin");
        let socket_text = self.string(ad, "admin", "socket", "");
        let socket = if socket_text.is_empty() {
            match runtime_directory {
                Some(dir) => PathBuf::from(dir).join("admin.sock"),
                None => store.data_dir.join("admin.sock"),
            }
        } else {
            PathBuf::from(socket_text)
        };
        if socket.as_os_str().len() > 100 {
            self.problem(
                "admin.socket",
                format!("{} is too long for a Unix socket path", socket.display()),
            );
        }
        let gid = self.integer(ad, "admin", "socket_gid", -1, -1, i64::from(u32::MAX));
        let max_connections = self.integer(ad, "admin", "max_connections", 64, 1, 4096) as usize;
        AdminConfig {
            enabled: self.boolean(ad, "admin", "enabled", true),
            socket,
            socket_gid: u32::try_from(gid).ok(),
            admin_uids: self.id_list(ad, "admin", "admin_uids"),
            admin_gids: self.id_list(ad, "admin", "admin_gids"),
            read_uids: self.id_list(ad, "admin", "read_uids"),
            read_gids: self.id_list(ad, "admin", "read_gids"),
            max_connections,
            max_connections_per_client: (self.integer(
                ad,
                "admin",
                "max_connections_per_client",
                16,
                1,
                4096,
            ) as usize)
                .min(max_connections),
            max_line_bytes: self.integer(ad, "admin", "max_line_bytes", 1 << 20, 64, 1 << 26)
                as usize,
            idle_timeout: self.duration(
                ad,
                "admin",
                "idle_timeout",
                "5m",
                Duration::from_millis(100),
                DAY,
            ),
            line_timeout: self.duration(
                ad,
                "admin",
                "line_timeout",
                "5s",
                Duration::from_millis(100),
                Duration::from_secs(600),
            ),
        }
    }
    /// `[quotas.<owner>]` tables: `max_sandboxes`, `max_ttl`.
    pub(super) fn quotas(&mut self, table: &toml::Table) -> BTreeMap<String, QuotaPolicy> {
        let mut out = BTreeMap::new();
        for (owner, value) in self.section(table, "quotas") {
            let section = format!("quotas.{owner}");
            if owner.is_empty() || crate::sandboxes::validate_owner_id(owner).is_err() {
                self.problem(&section, "is not a valid owner id".into());
                continue;
            }
            let toml::Value::Table(t) = value else {
                self.problem(
                    &section,
                    format!("must be a table, found {}", value.type_str()),
                );
                continue;
            };
            self.only_keys(&section, t, &keys::known_in(QUOTAS));
            let policy = QuotaPolicy {
                max_sandboxes: t.contains_key("max_sandboxes").then(|| {
                    // 0 would read as "no limit" next to max_per_owner.
                    self.integer(t, &section, "max_sandboxes", 1, 1, 10_000_000) as u32
                }),
                max_ttl: t.contains_key("max_ttl").then(|| {
                    self.duration(
                        t,
                        &section,
                        "max_ttl",
                        "24h",
                        Duration::from_secs(1),
                        365 * DAY,
                    )
                }),
            };
            out.insert(owner.clone(), policy);
        }
        out
    }
}

/// The host's name, for a `worker.hostname` left empty.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
