//! The integration tests: one test binary that starts the real daemon
//! (`CARGO_BIN_EXE_stacyvmd`) through the shared harness in [`common`]
//! and [`sandbox_support`]. One binary links once instead of twenty-one
//! times; the modules below are the topics, one file (or directory) each.
//!
//! Every test in this binary runs beside every other one, so a test may not
//! assume it is alone in its process: per-process state (environment, cwd,
//! umask, rlimits, signal dispositions) is left untouched by tests, and a
//! daemon's environment is set on its `Command` only.

mod common;
mod sandbox_support;

mod admin_socket;
mod auth;
mod crash;
mod disk_full;
mod durability;
mod edge_parity;
mod front_door;
mod http_api;
mod input_edges;
mod leases;
mod lifecycle;
mod metrics;
mod owners;
mod packaging;
mod placement;
mod process_sandboxes;
mod quotas;
mod retention;
mod sandboxes;
mod sdk_e2e;
mod store_layout;
mod templates;
mod transport;
mod worker_link;
