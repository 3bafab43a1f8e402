//! The typed configuration: one struct per section, every field named as
//! in the file (or, for sizes given in MiB, by the unit the code uses). No
//! defaults live here beyond the named constants: the reader
//! (`reader/`) fills every field, and the key table (`keys.rs`) names them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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

/// Whether `server` would serve a network beyond loopback without any key
/// and without being told to: refused when read, and kept from a reload.
pub(crate) fn remote_without_keys(server: &ServerConfig, auth: &AuthConfig) -> bool {
    !auth.enabled() && !server.listen.ip().is_loopback() && !server.allow_unauthenticated_remote
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

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7423";
pub const DEFAULT_DATA_DIR: &str = "./stacyvmd-data";
pub const DATABASE_FILE: &str = "stacyvmd.db";

/// Units for the bounds of duration keys.
pub(crate) const MINUTE: Duration = Duration::from_secs(60);
pub(crate) const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const DAY: Duration = Duration::from_secs(86_400);
