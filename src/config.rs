//! Configuration: a TOML file, `STACYVMD_*` environment variables and flags,
//! in rising precedence, validated into one [`Config`].
//!
//! Reading is done by hand over a `toml::Table` instead of a serde derive so
//! that `check-config` can report *every* problem at once (unknown keys, wrong
//! types, bad values) rather than stopping at the first. The schema lives in
//! one place, [`Config::from_table`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::time::{format_duration, parse_duration, parse_duration_within};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
use crate::workers::validate_worker_id;

/// Flags given on the command line; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_path: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub log_level: Option<String>,
    pub worker_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub worker: WorkerConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub sandboxes: SandboxConfig,
    pub leases: LeaseConfig,
    pub scheduler: SchedulerConfig,
    pub providers: ProvidersConfig,
    pub admin: AdminConfig,
    /// Per-owner quota policies, by owner id (`[quotas.<owner>]`).
    pub quotas: BTreeMap<String, QuotaPolicy>,
    /// The file this configuration was read from, if any (re-read on SIGHUP).
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub allow_unauthenticated_remote: bool,
    pub http_threads: usize,
    pub max_connections: usize,
    /// Connections one client address may hold (see `http::conn`).
    pub max_connections_per_client: usize,
    pub max_body_bytes: u64,
    pub idle_timeout: Duration,
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// A body's grace period; each byte received extends it by
    /// 1 / `min_body_rate` seconds.
    pub body_timeout: Duration,
    /// Bytes per second a body must keep up, on average, after `body_timeout`.
    pub min_body_rate: u64,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub path: PathBuf,
    pub checkpoint_interval: Duration,
    pub wal_size_limit: u64,
    pub max_batch: usize,
    /// Bytes preallocated in `<path>.reserve` and given back when the disk
    /// is full (0: no reserve).
    pub reserve_bytes: u64,
    /// How long ended sandboxes, released leases, idempotency keys and
    /// audit rows are kept before the retention purge removes them.
    pub retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    pub id: String,
    pub hostname: String,
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    pub max_sandboxes: u32,
    pub heartbeat_interval: Duration,
    pub stale_after: Duration,
    pub down_after: Duration,
}

#[derive(Clone, PartialEq, Default)]
pub struct AuthConfig {
    /// Legacy user keys: bound to no owner, they act only on sandboxes
    /// without one.
    pub api_keys: Vec<String>,
    pub admin_api_keys: Vec<String>,
    /// `[[auth.keys]]`: keys with a role, user keys bound to an owner.
    pub keys: Vec<KeyEntry>,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || !self.admin_api_keys.is_empty() || !self.keys.is_empty()
    }
}

/// Keys are secrets: the debug form shows how many there are, never what.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("api_keys", &self.api_keys.len())
            .field("admin_api_keys", &self.admin_api_keys.len())
            .field("keys", &self.keys)
            .finish()
    }
}

/// What an `[[auth.keys]]` entry may do.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyRole {
    /// Acts for exactly this owner (never empty; validated as an owner id).
    User { owner_id: String },
    /// Acts for every owner, and on the admin routes.
    Admin,
}

/// One `[[auth.keys]]` entry.
#[derive(Clone, PartialEq)]
pub struct KeyEntry {
    pub key: String,
    pub role: KeyRole,
}

/// The key is a secret: shown as its role only.
impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// One owner's quota (`[quotas.<owner>]`): limits over the fleet-wide ones
/// in `[sandboxes]`, checked at admission; `None` leaves that limit to
/// `[sandboxes]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaPolicy {
    /// Live sandboxes (and spawns in flight) of the owner.
    pub max_sandboxes: Option<u32>,
    pub max_ttl: Option<Duration>,
}

/// Spawn defaults and admission limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    pub default_image: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// Live sandboxes admitted across the fleet.
    pub max_sandboxes: u32,
    /// Live sandboxes per owner; 0 = no per-owner limit.
    pub max_per_owner: u32,
    pub default_memory_mb: u32,
    pub max_memory_mb: u32,
    pub default_vcpus: u32,
    pub max_vcpus: u32,
    /// Deadline for a provider spawn or destroy.
    pub provider_timeout: Duration,
    pub reap_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    pub ttl: Duration,
    pub renew_interval: Duration,
    /// The longest `ttl` a request (REST or admin) may ask a lease for.
    pub max_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementPolicy {
    /// Fewest live sandboxes first.
    Spread,
    /// Most live sandboxes first (fill a worker before the next).
    Binpack,
}

impl PlacementPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementPolicy::Spread => "spread",
            PlacementPolicy::Binpack => "binpack",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub policy: PlacementPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProvidersConfig {
    pub default: String,
    pub mock: MockConfig,
    pub process: ProcessConfig,
}

/// The `process` provider: namespaced process trees (see docs/sandboxes.md).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessConfig {
    /// Image name -> root filesystem directory; `host` (the host root,
    /// read-only) is always there unless redefined.
    pub images: BTreeMap<String, PathBuf>,
    /// Root daemon: each sandbox's root is mapped to a host uid (and gid)
    /// of its own from `uid_base .. uid_base + uid_count`, in turn.
    pub uid_base: u32,
    pub uid_count: u32,
    /// Root daemon: the host-wide file whose byte `uid` is locked by the
    /// sandbox that has that uid, so that daemons sharing a range never
    /// give one uid to two sandboxes.
    pub uid_registry: PathBuf,
    /// Processes per sandbox (cgroup `pids.max`, else `RLIMIT_NPROC`).
    pub max_processes: u32,
    pub max_open_files: u32,
    /// Largest single file a sandbox process may write (`RLIMIT_FSIZE`).
    pub max_file_bytes: u64,
    /// Exec timeout when a request gives none, and the largest accepted.
    pub exec_timeout: Duration,
    pub max_exec_timeout: Duration,
    /// Bytes kept per output stream of a non-streamed exec.
    pub exec_output_bytes: usize,
    /// Largest file upload (`POST`/`PUT .../files`).
    pub max_upload_bytes: u64,
    /// `auto`, `off`, or a cgroup v2 directory delegated to the daemon.
    pub cgroup: String,
    /// When non-zero, `/workspace` and `/tmp` of each sandbox live on an
    /// ext4 image of this many MiB (a total disk limit); 0 = the data
    /// directory's filesystem, limited per file only.
    pub disk_mb: u64,
    /// Without `disk_mb`: `/workspace` and `/tmp` share one tmpfs of this
    /// size and inode count (a default disk limit).
    pub workspace_mb: u64,
    pub workspace_inodes: u64,
    /// Longest a file helper may go without progress before it is killed.
    pub file_timeout: Duration,
    /// Execs and file operations in flight per sandbox; past it, 429.
    pub max_ops_per_sandbox: usize,
    /// `/proc` of sandboxes: `masked` (own processes, kernel-wide files
    /// that describe the host masked) or `pid` (`subset=pid`: no
    /// kernel-wide file at all).
    pub proc: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MockConfig {
    pub latency: Duration,
    pub failure_rate: f64,
}

/// The admin socket (see stacyvmd-admin(7)).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Empty in the file means the default: `$RUNTIME_DIRECTORY/admin.sock`
    /// under systemd, else `<data_dir>/admin.sock`.
    pub socket: PathBuf,
    /// When set, the socket is 0660 and owned by this group.
    pub socket_gid: Option<u32>,
    pub admin_uids: Vec<u32>,
    pub admin_gids: Vec<u32>,
    pub read_uids: Vec<u32>,
    pub read_gids: Vec<u32>,
    pub max_connections: usize,
    /// Connections one peer uid may hold at once (at most
    /// `max_connections`), so one client cannot take every slot.
    pub max_connections_per_client: usize,
    /// The most bytes of one request line, its newline not counted.
    pub max_line_bytes: usize,
    /// How long a connection may wait between complete lines.
    pub idle_timeout: Duration,
    /// How long a started line may take to complete.
    pub line_timeout: Duration,
}

/// Provider kinds this build can run.
pub const KNOWN_PROVIDERS: &[&str] = &["mock", "process"];

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
}

/// One problem found in the configuration, named by its key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7423";
pub const DEFAULT_DATA_DIR: &str = "./stacyvmd-data";
pub const DATABASE_FILE: &str = "stacyvmd.db";

impl Config {
    /// Loads file (from the flag, else `STACYVMD_CONFIG`), environment and
    /// flags, and validates the result.
    pub fn load(
        flags: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let source = flags.config_path.clone().or_else(|| {
            env("STACYVMD_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let mut table = match &source {
            Some(path) => read_table(path)?,
            None => toml::Table::new(),
        };
        apply_overrides(&mut table, flags, env);
        let state_directory = env("STATE_DIRECTORY").filter(|v| !v.is_empty());
        let runtime_directory = env("RUNTIME_DIRECTORY").filter(|v| !v.is_empty());
        let mut config = Config::from_table_in(
            &table,
            state_directory.as_deref(),
            runtime_directory.as_deref(),
        )?;
        config.source = source;
        Ok(config)
    }

    /// Validates a fully layered table. Every problem is collected.
    pub fn from_table(
        table: &toml::Table,
        state_directory: Option<&str>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        Config::from_table_in(table, state_directory, None)
    }

    /// As `from_table`, with systemd's `RUNTIME_DIRECTORY` (the admin
    /// socket's default home).
    pub fn from_table_in(
        table: &toml::Table,
        state_directory: Option<&str>,
        runtime_directory: Option<&str>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let mut r = Reader {
            problems: Vec::new(),
        };
        r.only_sections(
            table,
            &[
                "server",
                "store",
                "worker",
                "auth",
                "log",
                "sandboxes",
                "leases",
                "scheduler",
                "providers",
                "admin",
                "quotas",
            ],
        );

        let s = r.section(table, "server");
        r.only_keys(
            "server",
            s,
            &[
                "listen",
                "allow_unauthenticated_remote",
                "http_threads",
                "max_connections",
                "max_connections_per_client",
                "max_body_bytes",
                "idle_timeout",
                "header_timeout",
                "body_timeout",
                "min_body_rate",
                "shutdown_timeout",
            ],
        );
        let listen_text = r.string(s, "server", "listen", DEFAULT_LISTEN);
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                r.problem(
                    "server.listen",
                    format!("{listen_text:?} is not an IP:port address"),
                );
                DEFAULT_LISTEN
                    .parse()
                    .expect("default listen address parses")
            }
        };
        let server = ServerConfig {
            listen,
            allow_unauthenticated_remote: r.boolean(
                s,
                "server",
                "allow_unauthenticated_remote",
                false,
            ),
            http_threads: r.integer(s, "server", "http_threads", 16, 1, 256) as usize,
            max_connections: r.integer(s, "server", "max_connections", 1024, 1, 65_536) as usize,
            max_connections_per_client: r.integer(
                s,
                "server",
                "max_connections_per_client",
                256,
                1,
                65_536,
            ) as usize,
            max_body_bytes: r.integer(s, "server", "max_body_bytes", 1 << 20, 1, 1 << 30) as u64,
            idle_timeout: r.duration(
                s,
                "server",
                "idle_timeout",
                "75s",
                Duration::from_millis(100),
                HOUR,
            ),
            shutdown_timeout: r.duration(
                s,
                "server",
                "shutdown_timeout",
                "20s",
                Duration::ZERO,
                HOUR,
            ),
            header_timeout: r.duration(
                s,
                "server",
                "header_timeout",
                "10s",
                Duration::from_millis(100),
                HOUR,
            ),
            body_timeout: r.duration(
                s,
                "server",
                "body_timeout",
                "10s",
                Duration::from_millis(100),
                HOUR,
            ),
            min_body_rate: r.integer(s, "server", "min_body_rate", 8192, 1, 1 << 30) as u64,
        };

        let st = r.section(table, "store");
        r.only_keys(
            "store",
            st,
            &[
                "data_dir",
                "path",
                "checkpoint_interval",
                "wal_size_limit",
                "max_batch",
                "reserve_bytes",
                "retention",
            ],
        );
        let data_dir = PathBuf::from(r.string(
            st,
            "store",
            "data_dir",
            state_directory.unwrap_or(DEFAULT_DATA_DIR),
        ));
        let path_text = r.string(st, "store", "path", "");
        let path = if path_text.is_empty() {
            data_dir.join(DATABASE_FILE)
        } else {
            PathBuf::from(path_text)
        };
        let store = StoreConfig {
            data_dir,
            path,
            checkpoint_interval: r.duration(
                st,
                "store",
                "checkpoint_interval",
                "1s",
                Duration::from_millis(10),
                HOUR,
            ),
            wal_size_limit: r.integer(st, "store", "wal_size_limit", 64 << 20, 0, 1 << 40) as u64,
            max_batch: r.integer(st, "store", "max_batch", 256, 1, 10_000) as usize,
            reserve_bytes: r.integer(st, "store", "reserve_bytes", 8 << 20, 0, 1 << 34) as u64,
            retention: r.duration(
                st,
                "store",
                "retention",
                "7d",
                Duration::from_secs(1),
                3650 * DAY,
            ),
        };

        let w = r.section(table, "worker");
        r.only_keys(
            "worker",
            w,
            &[
                "id",
                "hostname",
                "providers",
                "capabilities",
                "max_sandboxes",
                "heartbeat_interval",
                "stale_after",
                "down_after",
            ],
        );
        let id = r.string(w, "worker", "id", "local");
        if let Err(e) = validate_worker_id(&id) {
            r.problem("worker.id", e);
        }
        let mut hostname = r.string(w, "worker", "hostname", "");
        if hostname.is_empty() {
            hostname = system_hostname();
        }
        let worker = WorkerConfig {
            id,
            hostname,
            providers: r.string_list(w, "worker", "providers", &["mock", "process"]),
            capabilities: r.string_list(w, "worker", "capabilities", &[]),
            max_sandboxes: r.integer(w, "worker", "max_sandboxes", 64, 0, 1_000_000) as u32,
            heartbeat_interval: r.duration(
                w,
                "worker",
                "heartbeat_interval",
                "5s",
                Duration::from_millis(10),
                HOUR,
            ),
            stale_after: r.duration(
                w,
                "worker",
                "stale_after",
                "15s",
                Duration::from_millis(10),
                DAY,
            ),
            down_after: r.duration(
                w,
                "worker",
                "down_after",
                "60s",
                Duration::from_millis(10),
                7 * DAY,
            ),
        };
        if worker.heartbeat_interval >= worker.stale_after {
            r.problem(
                "worker.heartbeat_interval",
                format!(
                    "must be shorter than worker.stale_after ({}), or the local worker goes stale between its own heartbeats",
                    format_duration(worker.stale_after)
                ),
            );
        }
        if worker.down_after < worker.stale_after {
            r.problem(
                "worker.down_after",
                "must not be shorter than worker.stale_after".into(),
            );
        }

        let a = r.section(table, "auth");
        r.only_keys("auth", a, &["api_keys", "admin_api_keys", "keys"]);
        let auth = AuthConfig {
            api_keys: r.string_list(a, "auth", "api_keys", &[]),
            admin_api_keys: r.string_list(a, "auth", "admin_api_keys", &[]),
            keys: r.key_entries(a),
        };
        r.check_keys(&auth);
        if !auth.enabled()
            && !server.listen.ip().is_loopback()
            && !server.allow_unauthenticated_remote
        {
            r.problem(
                "server.listen",
                format!(
                    "{} is not a loopback address and no API key is configured; set auth.api_keys / auth.admin_api_keys, or server.allow_unauthenticated_remote = true",
                    server.listen
                ),
            );
        }

        let l = r.section(table, "log");
        r.only_keys("log", l, &["level"]);
        let level_text = r.string(l, "log", "level", "info");
        let level = match level_text.parse::<log::LevelFilter>() {
            Ok(level) => level,
            Err(_) => {
                r.problem(
                    "log.level",
                    format!("{level_text:?} is not one of off, error, warn, info, debug, trace"),
                );
                log::LevelFilter::Info
            }
        };

        let sb = r.section(table, "sandboxes");
        r.only_keys(
            "sandboxes",
            sb,
            &[
                "default_image",
                "default_ttl",
                "max_ttl",
                "max_sandboxes",
                "max_per_owner",
                "default_memory_mb",
                "max_memory_mb",
                "default_vcpus",
                "max_vcpus",
                "provider_timeout",
                "reap_interval",
            ],
        );
        let sandboxes = SandboxConfig {
            default_image: r.string(sb, "sandboxes", "default_image", "default"),
            default_ttl: r.duration(
                sb,
                "sandboxes",
                "default_ttl",
                "30m",
                Duration::from_secs(1),
                365 * DAY,
            ),
            max_ttl: r.duration(
                sb,
                "sandboxes",
                "max_ttl",
                "24h",
                Duration::from_secs(1),
                365 * DAY,
            ),
            max_sandboxes: r.integer(sb, "sandboxes", "max_sandboxes", 1000, 0, 10_000_000) as u32,
            max_per_owner: r.integer(sb, "sandboxes", "max_per_owner", 0, 0, 10_000_000) as u32,
            default_memory_mb: r.integer(sb, "sandboxes", "default_memory_mb", 512, 1, 1 << 24)
                as u32,
            max_memory_mb: r.integer(sb, "sandboxes", "max_memory_mb", 65_536, 1, 1 << 24) as u32,
            default_vcpus: r.integer(sb, "sandboxes", "default_vcpus", 1, 1, 1024) as u32,
            max_vcpus: r.integer(sb, "sandboxes", "max_vcpus", 64, 1, 1024) as u32,
            provider_timeout: r.duration(
                sb,
                "sandboxes",
                "provider_timeout",
                "30s",
                Duration::from_millis(10),
                HOUR,
            ),
            reap_interval: r.duration(
                sb,
                "sandboxes",
                "reap_interval",
                "1s",
                Duration::from_millis(10),
                HOUR,
            ),
        };
        if sandboxes.default_ttl > sandboxes.max_ttl {
            r.problem(
                "sandboxes.default_ttl",
                "must not be longer than sandboxes.max_ttl".into(),
            );
        }
        if sandboxes.default_memory_mb > sandboxes.max_memory_mb {
            r.problem(
                "sandboxes.default_memory_mb",
                "must not exceed sandboxes.max_memory_mb".into(),
            );
        }
        if sandboxes.default_vcpus > sandboxes.max_vcpus {
            r.problem(
                "sandboxes.default_vcpus",
                "must not exceed sandboxes.max_vcpus".into(),
            );
        }
        if sandboxes.default_image.is_empty() {
            r.problem("sandboxes.default_image", "must not be empty".into());
        }

        let le = r.section(table, "leases");
        r.only_keys("leases", le, &["ttl", "renew_interval", "max_ttl"]);
        let leases = LeaseConfig {
            ttl: r.duration(
                le,
                "leases",
                "ttl",
                "30s",
                Duration::from_millis(100),
                365 * DAY,
            ),
            renew_interval: r.duration(
                le,
                "leases",
                "renew_interval",
                "10s",
                Duration::from_millis(10),
                DAY,
            ),
            max_ttl: r.duration(
                le,
                "leases",
                "max_ttl",
                "24h",
                Duration::from_secs(1),
                365 * DAY,
            ),
        };
        if leases.ttl > leases.max_ttl {
            r.problem(
                "leases.ttl",
                format!(
                    "must be at most leases.max_ttl ({})",
                    format_duration(leases.max_ttl)
                ),
            );
        }
        if leases.renew_interval >= leases.ttl {
            r.problem(
                "leases.renew_interval",
                "must be shorter than leases.ttl, or leases lapse between renewals".into(),
            );
        }

        let sc = r.section(table, "scheduler");
        r.only_keys("scheduler", sc, &["policy"]);
        let policy = match r.string(sc, "scheduler", "policy", "spread").as_str() {
            "spread" => PlacementPolicy::Spread,
            "binpack" => PlacementPolicy::Binpack,
            other => {
                r.problem(
                    "scheduler.policy",
                    format!("{other:?} is not one of spread, binpack"),
                );
                PlacementPolicy::Spread
            }
        };
        let scheduler = SchedulerConfig { policy };

        let pr = r.section(table, "providers");
        r.only_keys("providers", pr, &["default", "mock", "process"]);
        let default_provider = r.string(pr, "providers", "default", "mock");
        if !KNOWN_PROVIDERS.contains(&default_provider.as_str()) {
            r.problem(
                "providers.default",
                format!(
                    "unknown provider {default_provider:?} (known: {})",
                    KNOWN_PROVIDERS.join(", ")
                ),
            );
        }
        let mk = match pr.get("mock") {
            None => &*EMPTY,
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                r.problem(
                    "providers.mock",
                    format!("must be a table, found {}", other.type_str()),
                );
                &*EMPTY
            }
        };
        r.only_keys("providers.mock", mk, &["latency", "failure_rate"]);
        let failure_rate = match mk.get("failure_rate") {
            None => 0.0,
            Some(toml::Value::Float(f)) if (0.0..=1.0).contains(f) => *f,
            Some(toml::Value::Integer(i)) if (0..=1).contains(i) => *i as f64,
            Some(_) => {
                r.problem(
                    "providers.mock.failure_rate",
                    "must be a number from 0 to 1".into(),
                );
                0.0
            }
        };
        let process = r.process_config(pr);
        let providers = ProvidersConfig {
            default: default_provider,
            mock: MockConfig {
                latency: r.duration(
                    mk,
                    "providers.mock",
                    "latency",
                    "0ms",
                    Duration::ZERO,
                    MINUTE,
                ),
                failure_rate,
            },
            process,
        };
        for p in &worker.providers {
            if !KNOWN_PROVIDERS.contains(&p.as_str()) {
                r.problem(
                    "worker.providers",
                    format!(
                        "unknown provider {p:?} (known: {})",
                        KNOWN_PROVIDERS.join(", ")
                    ),
                );
            }
        }

        let ad = r.section(table, "admin");
        r.only_keys(
            "admin",
            ad,
            &[
                "enabled",
                "socket",
                "socket_gid",
                "admin_uids",
                "admin_gids",
                "read_uids",
                "read_gids",
                "max_connections",
                "max_connections_per_client",
                "max_line_bytes",
                "idle_timeout",
                "line_timeout",
            ],
        );
        let socket_text = r.string(ad, "admin", "socket", "");
        let socket = if socket_text.is_empty() {
            match runtime_directory {
                Some(dir) => PathBuf::from(dir).join("admin.sock"),
                None => store.data_dir.join("admin.sock"),
            }
        } else {
            PathBuf::from(socket_text)
        };
        if socket.as_os_str().len() > 100 {
            r.problem(
                "admin.socket",
                format!("{} is too long for a Unix socket path", socket.display()),
            );
        }
        let gid = r.integer(ad, "admin", "socket_gid", -1, -1, i64::from(u32::MAX));
        let max_connections = r.integer(ad, "admin", "max_connections", 64, 1, 4096) as usize;
        let admin = AdminConfig {
            enabled: r.boolean(ad, "admin", "enabled", true),
            socket,
            socket_gid: u32::try_from(gid).ok(),
            admin_uids: r.id_list(ad, "admin", "admin_uids"),
            admin_gids: r.id_list(ad, "admin", "admin_gids"),
            read_uids: r.id_list(ad, "admin", "read_uids"),
            read_gids: r.id_list(ad, "admin", "read_gids"),
            max_connections,
            max_connections_per_client: (r.integer(
                ad,
                "admin",
                "max_connections_per_client",
                16,
                1,
                4096,
            ) as usize)
                .min(max_connections),
            max_line_bytes: r.integer(ad, "admin", "max_line_bytes", 1 << 20, 64, 1 << 26) as usize,
            idle_timeout: r.duration(
                ad,
                "admin",
                "idle_timeout",
                "5m",
                Duration::from_millis(100),
                DAY,
            ),
            line_timeout: r.duration(
                ad,
                "admin",
                "line_timeout",
                "5s",
                Duration::from_millis(100),
                Duration::from_secs(600),
            ),
        };

        let quotas = r.quotas(table);

        if r.problems.is_empty() {
            Ok(Config {
                admin,
                quotas,
                server,
                store,
                worker,
                auth,
                log: LogConfig { level },
                sandboxes,
                leases,
                scheduler,
                providers,
                source: None,
            })
        } else {
            Err(r.problems)
        }
    }

    /// Applies the reloadable keys of `new` onto a copy of `self`. Returns the
    /// merged config and the names of changed keys that need a restart.
    pub fn reload(&self, new: &Config) -> (Config, Vec<&'static str>) {
        let mut merged = self.clone();
        merged.log = new.log.clone();
        merged.auth = new.auth.clone();
        merged.server.max_body_bytes = new.server.max_body_bytes;
        merged.server.idle_timeout = new.server.idle_timeout;
        merged.server.header_timeout = new.server.header_timeout;
        merged.server.body_timeout = new.server.body_timeout;
        merged.server.min_body_rate = new.server.min_body_rate;
        merged.server.max_connections_per_client = new.server.max_connections_per_client;
        merged.worker.capabilities = new.worker.capabilities.clone();
        merged.worker.max_sandboxes = new.worker.max_sandboxes;
        merged.worker.stale_after = new.worker.stale_after;
        merged.worker.down_after = new.worker.down_after;
        merged.sandboxes = SandboxConfig {
            reap_interval: self.sandboxes.reap_interval,
            ..new.sandboxes.clone()
        };
        merged.scheduler = new.scheduler.clone();
        merged.quotas = new.quotas.clone();
        let mut ignored = Vec::new();
        let checks: [(&'static str, bool); 21] = [
            (
                "sandboxes.reap_interval",
                self.sandboxes.reap_interval != new.sandboxes.reap_interval,
            ),
            ("admin", self.admin != new.admin),
            ("leases.ttl", self.leases.ttl != new.leases.ttl),
            ("leases.max_ttl", self.leases.max_ttl != new.leases.max_ttl),
            (
                "leases.renew_interval",
                self.leases.renew_interval != new.leases.renew_interval,
            ),
            ("providers", self.providers != new.providers),
            ("server.listen", self.server.listen != new.server.listen),
            (
                "server.allow_unauthenticated_remote",
                self.server.allow_unauthenticated_remote != new.server.allow_unauthenticated_remote,
            ),
            (
                "server.http_threads",
                self.server.http_threads != new.server.http_threads,
            ),
            (
                "server.max_connections",
                self.server.max_connections != new.server.max_connections,
            ),
            (
                "server.shutdown_timeout",
                self.server.shutdown_timeout != new.server.shutdown_timeout,
            ),
            ("store.path", self.store.path != new.store.path),
            (
                "store.checkpoint_interval",
                self.store.checkpoint_interval != new.store.checkpoint_interval,
            ),
            (
                "store.wal_size_limit",
                self.store.wal_size_limit != new.store.wal_size_limit,
            ),
            (
                "store.max_batch",
                self.store.max_batch != new.store.max_batch,
            ),
            (
                "store.reserve_bytes",
                self.store.reserve_bytes != new.store.reserve_bytes,
            ),
            (
                "store.retention",
                self.store.retention != new.store.retention,
            ),
            ("worker.id", self.worker.id != new.worker.id),
            (
                "worker.hostname",
                self.worker.hostname != new.worker.hostname,
            ),
            (
                "worker.providers",
                self.worker.providers != new.worker.providers,
            ),
            (
                "worker.heartbeat_interval",
                self.worker.heartbeat_interval != new.worker.heartbeat_interval,
            ),
        ];
        for (key, changed) in checks {
            if changed {
                ignored.push(key);
            }
        }
        // A reload must not open a remote listener to unauthenticated use.
        if !merged.auth.enabled()
            && !merged.server.listen.ip().is_loopback()
            && !merged.server.allow_unauthenticated_remote
        {
            merged.auth = self.auth.clone();
            ignored.push("auth (removing every key from a non-loopback listener)");
        }
        (merged, ignored)
    }
}

fn read_table(path: &Path) -> Result<toml::Table, Vec<ConfigProblem>> {
    let fail = |message: String| {
        vec![ConfigProblem {
            key: path.display().to_string(),
            message,
        }]
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    text.parse::<toml::Table>()
        .map_err(|e| fail(format!("invalid TOML: {}", e.message())))
}

/// Environment and flags are written into the table so that they are
/// validated by exactly the same code as the file.
fn apply_overrides(
    table: &mut toml::Table,
    flags: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) {
    let list = |v: String| {
        toml::Value::Array(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        )
    };
    // `owner=key,owner=key` into `[[auth.keys]]` tables; owner ids hold no
    // `=` or `,` (a key may hold `=`). A pair without `=` becomes a table
    // without `owner_id`, which validation reports.
    let owner_keys = |v: String| {
        toml::Value::Array(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|pair| {
                    let mut entry = toml::Table::new();
                    let key = match pair.split_once('=') {
                        Some((owner, key)) => {
                            entry.insert("owner_id".into(), owner.trim().to_owned().into());
                            key.trim()
                        }
                        None => pair,
                    };
                    entry.insert("key".into(), key.to_owned().into());
                    toml::Value::Table(entry)
                })
                .collect(),
        )
    };
    let string = toml::Value::String;
    type Convert = fn(String) -> toml::Value;
    let env_keys: [(&str, &str, &str, Convert); 7] = [
        ("STACYVMD_LISTEN", "server", "listen", string),
        ("STACYVMD_DATA_DIR", "store", "data_dir", string),
        ("STACYVMD_LOG_LEVEL", "log", "level", string),
        ("STACYVMD_WORKER_ID", "worker", "id", string),
        ("STACYVMD_API_KEYS", "auth", "api_keys", list),
        ("STACYVMD_ADMIN_API_KEYS", "auth", "admin_api_keys", list),
        ("STACYVMD_OWNER_KEYS", "auth", "keys", owner_keys),
    ];
    for (var, section, key, convert) in env_keys {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            set(table, section, key, convert(value));
        }
    }
    let flag_keys = [
        (&flags.listen, "server", "listen"),
        (&flags.data_dir, "store", "data_dir"),
        (&flags.log_level, "log", "level"),
        (&flags.worker_id, "worker", "id"),
    ];
    for (value, section, key) in flag_keys {
        if let Some(value) = value {
            set(table, section, key, toml::Value::String(value.clone()));
        }
    }
}

fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_owned(), value);
    }
    // A non-table section is reported by the reader; the override is dropped
    // with it rather than hiding that problem.
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Typed getters over a table that record problems instead of stopping.
struct Reader {
    problems: Vec<ConfigProblem>,
}

static EMPTY: std::sync::LazyLock<toml::Table> = std::sync::LazyLock::new(toml::Table::new);

impl Reader {
    fn problem(&mut self, key: &str, message: String) {
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            message,
        });
    }

    fn only_sections(&mut self, table: &toml::Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                self.problem(
                    key,
                    format!("unknown section (expected one of {})", known.join(", ")),
                );
            }
        }
    }

    /// `[quotas.<owner>]` tables: `max_sandboxes`, `max_ttl`.
    fn quotas(&mut self, table: &toml::Table) -> BTreeMap<String, QuotaPolicy> {
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
            self.only_keys(&section, t, &["max_sandboxes", "max_ttl"]);
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

    fn section<'t>(&mut self, table: &'t toml::Table, name: &str) -> &'t toml::Table {
        match table.get(name) {
            None => &EMPTY,
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                self.problem(name, format!("must be a table, found {}", other.type_str()));
                &EMPTY
            }
        }
    }

    fn only_keys(&mut self, section: &str, table: &toml::Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("unknown key (expected one of {})", known.join(", ")),
                );
            }
        }
    }

    fn string(&mut self, t: &toml::Table, section: &str, key: &str, default: &str) -> String {
        match t.get(key) {
            None => default.to_owned(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be a string, found {}", other.type_str()),
                );
                default.to_owned()
            }
        }
    }

    fn boolean(&mut self, t: &toml::Table, section: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn integer(
        &mut self,
        t: &toml::Table,
        section: &str,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        match t.get(key) {
            None => default,
            Some(toml::Value::Integer(i)) if (min..=max).contains(i) => *i,
            Some(toml::Value::Integer(i)) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("{i} is out of range {min}..={max}"),
                );
                default
            }
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be an integer, found {}", other.type_str()),
                );
                default
            }
        }
    }

    /// A duration key, through the one checked parser with this key's
    /// bounds (`min..=max`).
    #[allow(clippy::too_many_arguments)]
    fn duration(
        &mut self,
        t: &toml::Table,
        section: &str,
        key: &str,
        default: &str,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let fallback = parse_duration(default).expect("built-in default durations parse");
        let text = self.string(t, section, key, default);
        match parse_duration_within(&text, min, max) {
            Ok(d) => d,
            Err(e) => {
                self.problem(&format!("{section}.{key}"), e);
                fallback
            }
        }
    }

    fn process_config(&mut self, providers: &toml::Table) -> ProcessConfig {
        const S: &str = "providers.process";
        let t = self.section(providers, "process");
        self.only_keys(
            S,
            t,
            &[
                "images",
                "uid_base",
                "max_processes",
                "max_open_files",
                "max_file_mb",
                "exec_timeout",
                "max_exec_timeout",
                "exec_output_bytes",
                "max_upload_mb",
                "cgroup",
                "disk_mb",
                "uid_count",
                "workspace_mb",
                "workspace_inodes",
                "file_timeout",
                "max_ops_per_sandbox",
                "proc",
                "uid_registry",
            ],
        );
        let mut images = BTreeMap::new();
        images.insert("host".to_owned(), PathBuf::from("/"));
        match t.get("images") {
            None => {}
            Some(toml::Value::Table(table)) => {
                for (name, value) in table {
                    let key = format!("{S}.images.{name}");
                    if crate::workers::validate_name("image", name).is_err() {
                        self.problem(&key, "is not a valid image name".into());
                        continue;
                    }
                    match value {
                        toml::Value::String(dir) if Path::new(dir).is_absolute() => {
                            images.insert(name.clone(), PathBuf::from(dir));
                        }
                        _ => self.problem(
                            &key,
                            "must be the absolute path of a root filesystem directory".into(),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                &format!("{S}.images"),
                format!(
                    "must be a table of name = \"/path\", found {}",
                    other.type_str()
                ),
            ),
        }
        let exec_timeout =
            self.duration(t, S, "exec_timeout", "60s", Duration::from_millis(1), DAY);
        let max_exec_timeout = self.duration(
            t,
            S,
            "max_exec_timeout",
            "1h",
            Duration::from_millis(1),
            DAY,
        );
        if exec_timeout > max_exec_timeout {
            self.problem(
                &format!("{S}.exec_timeout"),
                "must not exceed max_exec_timeout".into(),
            );
        }
        let cgroup = self.string(t, S, "cgroup", "auto");
        if cgroup != "auto" && cgroup != "off" && !Path::new(&cgroup).is_absolute() {
            self.problem(
                &format!("{S}.cgroup"),
                "must be \"auto\", \"off\" or an absolute cgroup v2 directory".into(),
            );
        }
        let proc = self.string(t, S, "proc", "masked");
        if proc != "masked" && proc != "pid" {
            self.problem(&format!("{S}.proc"), "must be \"masked\" or \"pid\"".into());
        }
        let uid_base = self.integer(t, S, "uid_base", 1_900_000_000, 1000, 4_000_000_000) as u32;
        let uid_count = self.integer(t, S, "uid_count", 1_000_000, 1, 1 << 31) as u32;
        if u64::from(uid_base) + u64::from(uid_count) > 4_294_967_294 {
            self.problem(
                &format!("{S}.uid_count"),
                "uid_base + uid_count must stay below 4294967295".into(),
            );
        }
        let uid_registry =
            PathBuf::from(self.string(t, S, "uid_registry", "/run/stacyvmd-uids/registry"));
        if !uid_registry.is_absolute() {
            self.problem(
                &format!("{S}.uid_registry"),
                "must be an absolute path".into(),
            );
        }
        ProcessConfig {
            images,
            uid_base,
            uid_count,
            uid_registry,
            max_processes: self.integer(t, S, "max_processes", 256, 8, 1 << 20) as u32,
            max_open_files: self.integer(t, S, "max_open_files", 1024, 64, 1 << 20) as u32,
            max_file_bytes: (self.integer(t, S, "max_file_mb", 1024, 1, 1 << 30) as u64) << 20,
            exec_timeout,
            max_exec_timeout,
            exec_output_bytes: self.integer(t, S, "exec_output_bytes", 1 << 20, 1024, 1 << 30)
                as usize,
            max_upload_bytes: (self.integer(t, S, "max_upload_mb", 256, 1, 1 << 20) as u64) << 20,
            cgroup,
            disk_mb: self.integer(t, S, "disk_mb", 0, 0, 1 << 24) as u64,
            workspace_mb: self.integer(t, S, "workspace_mb", 1024, 1, 1 << 24) as u64,
            workspace_inodes: self.integer(t, S, "workspace_inodes", 65_536, 64, 1 << 32) as u64,
            file_timeout: self.duration(
                t,
                S,
                "file_timeout",
                "30s",
                Duration::from_millis(100),
                HOUR,
            ),
            max_ops_per_sandbox: self.integer(t, S, "max_ops_per_sandbox", 8, 1, 1 << 16) as usize,
            proc,
        }
    }

    fn id_list(&mut self, t: &toml::Table, section: &str, key: &str) -> Vec<u32> {
        match t.get(key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .filter_map(
                    |item| match item.as_integer().and_then(|i| u32::try_from(i).ok()) {
                        Some(id) => Some(id),
                        None => {
                            self.problem(
                                &format!("{section}.{key}"),
                                "items must be numeric uids or gids".into(),
                            );
                            None
                        }
                    },
                )
                .collect(),
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be an array of numbers, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    /// `[[auth.keys]]`: each entry a table of `key`, `role` and (for the
    /// user role, required) `owner_id`.
    fn key_entries(&mut self, auth: &toml::Table) -> Vec<KeyEntry> {
        let items = match auth.get("keys") {
            None => return Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                self.problem(
                    "auth.keys",
                    format!(
                        "must be an array of tables ([[auth.keys]]), found {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let name = format!("auth.keys[{i}]");
            let Some(t) = item.as_table() else {
                self.problem(&name, format!("must be a table, found {}", item.type_str()));
                continue;
            };
            self.only_keys(&name, t, &["key", "owner_id", "role"]);
            if !t.contains_key("key") {
                self.problem(&format!("{name}.key"), "is required".into());
                continue;
            }
            let key = self.string(t, &name, "key", "");
            let owner = t
                .get("owner_id")
                .map(|_| self.string(t, &name, "owner_id", ""));
            let role = match self.string(t, &name, "role", "user").as_str() {
                "user" => match owner {
                    Some(owner_id) if !owner_id.is_empty() => {
                        if let Err(e) = crate::sandboxes::validate_owner_id(&owner_id) {
                            self.problem(&format!("{name}.owner_id"), e);
                        }
                        KeyRole::User { owner_id }
                    }
                    _ => {
                        self.problem(
                            &format!("{name}.owner_id"),
                            "is required for role = \"user\" (the owner whose sandboxes the key acts on)"
                                .into(),
                        );
                        continue;
                    }
                },
                "admin" => {
                    if owner.is_some() {
                        self.problem(
                            &format!("{name}.owner_id"),
                            "is only for role = \"user\": an admin key acts for every owner".into(),
                        );
                    }
                    KeyRole::Admin
                }
                other => {
                    self.problem(
                        &format!("{name}.role"),
                        format!("must be \"user\" or \"admin\", not {other:?}"),
                    );
                    continue;
                }
            };
            out.push(KeyEntry { key, role });
        }
        out
    }

    /// Every key well-formed and unique across `api_keys`,
    /// `admin_api_keys` and `[[auth.keys]]`. Problems name the places,
    /// never the key.
    fn check_keys(&mut self, auth: &AuthConfig) {
        let places = auth
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("auth.api_keys[{i}]"), k))
            .chain(
                auth.admin_api_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (format!("auth.admin_api_keys[{i}]"), k)),
            )
            .chain(
                auth.keys
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (format!("auth.keys[{i}].key"), &e.key)),
            );
        let mut seen: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
        for (place, key) in places {
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.problem(
                    &place,
                    "keys must be non-empty and contain no whitespace".into(),
                );
            } else if let Some(first) = seen.get(key.as_str()) {
                self.problem(
                    &place,
                    format!("the same key as {first}: every key must be unique (a key has one role and one owner)"),
                );
            } else {
                seen.insert(key, place);
            }
        }
    }

    fn string_list(
        &mut self,
        t: &toml::Table,
        section: &str,
        key: &str,
        default: &[&str],
    ) -> Vec<String> {
        let name = format!("{section}.{key}");
        match t.get(key) {
            None => default.iter().map(|s| (*s).to_owned()).collect(),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s.clone()),
                        other => self.problem(
                            &name,
                            format!("items must be strings, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.problem(
                    &name,
                    format!("must be an array of strings, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<ConfigProblem>> {
        Config::from_table(&text.parse::<toml::Table>().unwrap(), None)
    }

    #[test]
    fn empty_config_is_the_embedded_default() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(
            c.store.path,
            PathBuf::from(DEFAULT_DATA_DIR).join(DATABASE_FILE)
        );
        assert_eq!(c.worker.id, "local");
        assert!(!c.auth.enabled());
    }

    #[test]
    fn reports_every_problem() {
        let problems = parse(
            "bogus = 1\n[server]\nlisten = 'nope'\nhttp_threads = 0\nextra = true\n[worker]\nstale_after = '5x'\nid = 'a/b'\n[log]\nlevel = 7\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "bogus",
            "server.listen",
            "server.http_threads",
            "server.extra",
            "worker.stale_after",
            "worker.id",
            "log.level",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn refuses_remote_listen_without_keys() {
        let problems = parse("[server]\nlisten = '0.0.0.0:7423'\n").unwrap_err();
        assert_eq!(problems[0].key, "server.listen");
        assert!(parse("[server]\nlisten = '0.0.0.0:7423'\n[auth]\napi_keys = ['k1']\n").is_ok());
        assert!(
            parse("[server]\nlisten = '0.0.0.0:7423'\nallow_unauthenticated_remote = true\n")
                .is_ok()
        );
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let mut table: toml::Table = "[server]\nlisten = '127.0.0.1:1'\n[log]\nlevel='warn'\n"
            .parse()
            .unwrap();
        let env = |k: &str| match k {
            "STACYVMD_LISTEN" => Some("127.0.0.1:2".to_owned()),
            "STACYVMD_LOG_LEVEL" => Some("debug".to_owned()),
            "STACYVMD_API_KEYS" => Some("a, b,".to_owned()),
            _ => None,
        };
        let flags = Overrides {
            listen: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        apply_overrides(&mut table, &flags, &env);
        let c = Config::from_table(&table, None).unwrap();
        assert_eq!(c.server.listen.port(), 3);
        assert_eq!(c.log.level, log::LevelFilter::Debug);
        assert_eq!(c.auth.api_keys, vec!["a", "b"]);
    }

    #[test]
    fn state_directory_is_the_default_data_dir() {
        let c = Config::from_table(&toml::Table::new(), Some("/var/lib/stacyvmd")).unwrap();
        assert_eq!(c.store.path, PathBuf::from("/var/lib/stacyvmd/stacyvmd.db"));
    }

    #[test]
    fn reload_applies_only_reloadable_keys() {
        let old = parse("").unwrap();
        let new = parse("[server]\nlisten='127.0.0.1:9'\nmax_body_bytes=10\n[log]\nlevel='debug'\n[auth]\napi_keys=['k']\n").unwrap();
        let (merged, ignored) = old.reload(&new);
        assert_eq!(merged.server.listen, old.server.listen);
        assert_eq!(merged.server.max_body_bytes, 10);
        assert_eq!(merged.log.level, log::LevelFilter::Debug);
        assert_eq!(merged.auth.api_keys, vec!["k"]);
        assert_eq!(ignored, vec!["server.listen"]);
    }

    #[test]
    fn the_uid_registry_must_be_an_absolute_path() {
        let c = parse("").unwrap();
        assert_eq!(
            c.providers.process.uid_registry,
            PathBuf::from("/run/stacyvmd-uids/registry")
        );
        let e = parse("[providers.process]\nuid_registry = 'uids.lock'\n").unwrap_err();
        assert!(
            format!("{e:?}").contains("providers.process.uid_registry"),
            "{e:?}"
        );
    }

    #[test]
    fn debug_never_shows_keys() {
        let c = parse(
            "[auth]\napi_keys=['supersecret']\n[[auth.keys]]\nkey='topsecret'\nowner_id='a'\n",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn owner_keys() {
        let c = parse(
            "[[auth.keys]]\nkey='k1'\nowner_id='alice'\n[[auth.keys]]\nkey='k2'\nrole='admin'\n",
        )
        .unwrap();
        assert!(c.auth.enabled());
        assert_eq!(
            c.auth.keys[0].role,
            KeyRole::User {
                owner_id: "alice".into()
            }
        );
        assert_eq!(c.auth.keys[1].role, KeyRole::Admin);
        for (text, key) in [
            ("[[auth.keys]]\nkey='k'\n", "auth.keys[0].owner_id"),
            (
                "[[auth.keys]]\nkey='k'\nowner_id=''\n",
                "auth.keys[0].owner_id",
            ),
            (
                "[[auth.keys]]\nkey='k'\nrole='admin'\nowner_id='a'\n",
                "auth.keys[0].owner_id",
            ),
            (
                "[[auth.keys]]\nkey='k'\nowner_id='a'\nrole='x'\n",
                "auth.keys[0].role",
            ),
            ("[[auth.keys]]\nowner_id='a'\n", "auth.keys[0].key"),
            (
                "[[auth.keys]]\nkey='a b'\nowner_id='a'\n",
                "auth.keys[0].key",
            ),
            ("[auth]\nkeys = 'k'\n", "auth.keys"),
            (
                "[auth]\napi_keys=['k']\n[[auth.keys]]\nkey='k'\nowner_id='a'\n",
                "auth.keys[0].key",
            ),
            ("[auth]\napi_keys=['k','k']\n", "auth.api_keys[1]"),
        ] {
            let problems = parse(text).unwrap_err();
            assert!(
                problems.iter().any(|p| p.key == key),
                "{text}: {problems:?}"
            );
        }
        // The environment form, and a reload carries the keys.
        let mut table = toml::Table::new();
        let env = |k: &str| (k == "STACYVMD_OWNER_KEYS").then(|| "alice=k=1, bob=k2,".to_owned());
        apply_overrides(&mut table, &Overrides::default(), &env);
        let from_env = Config::from_table(&table, None).unwrap();
        assert_eq!(from_env.auth.keys.len(), 2);
        assert_eq!(from_env.auth.keys[0].key, "k=1");
        assert_eq!(
            from_env.auth.keys[1].role,
            KeyRole::User {
                owner_id: "bob".into()
            }
        );
        let (merged, ignored) = parse("").unwrap().reload(&from_env);
        assert_eq!(merged.auth, from_env.auth);
        assert!(ignored.is_empty(), "{ignored:?}");
    }
}

/// The configuration in force, swapped whole on reload. Readers take a
/// cheap `Arc` snapshot per request or tick.
#[derive(Clone)]
pub struct LiveConfig(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>);

impl LiveConfig {
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(config),
        )))
    }

    pub fn get(&self) -> std::sync::Arc<Config> {
        // A poisoned lock still holds a whole config (writers only swap the Arc).
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, config: Config) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(config);
    }
}
