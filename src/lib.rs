//! stacyvmd: the control plane of a sandbox fleet, as one synchronous daemon.
//!
//! Thread per component, linked by bounded crossbeam channels; no async
//! runtime. Each component owns its state and is reached through a cloneable
//! handle whose methods send a request carrying its own reply channel and
//! wait with a deadline.
//!
//! ```text
//!  signals --Lifecycle--> main (daemon::run: supervisor, reload, ordered stop)
//!  http-accept -> http-conn relays -> tiny_http (private Unix socket) -> http-N handlers
//!  http-N, heartbeat --StoreHandle-->     store thread (the one SQLite writer, group commit)
//!  http-N, heartbeat --SchedulerHandle--> scheduler thread (in-memory cluster view, health)
//!  store-checkpoint: WAL checkpoints off the commit path
//!  metrics: process-wide atomics, rendered on scrape with the scheduler's view
//! ```
//!
//! JSON exists only at the edges (`http`, `admin`, `workerproto`, `config`;
//! client JSON is parsed by `json`, which refuses duplicate keys); the core uses the
//! domain types of `workers`. See docs/ARCHITECTURE.md for the code map and
//! the invariants.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod controlplane;
pub mod daemon;
pub mod diagnostics;
pub mod events;
pub mod http;
pub mod json;
pub mod leases;
pub mod metrics;
pub mod notify;
pub mod providers;
pub mod sandboxes;
pub mod scheduler;
pub mod signals;
pub mod store;
pub mod supervise;
pub mod templates;
pub mod time;
pub mod worker;
pub mod workerproto;
pub mod workers;
