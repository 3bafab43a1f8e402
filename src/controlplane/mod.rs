//! The control plane: what admits, records and places sandboxes, and
//! sends each worker operation to the owning worker through its
//! `WorkerLink` (`crate::worker`).
//!
//! - [`sandboxes`]: the sandbox service (`Lifecycle`): spawn, destroy,
//!   extend, reads, reaping, lease renewal;
//! - [`fleet`]: heartbeats from any worker;
//! - [`admission`]: defaults, limits and quotas applied to a spawn request;
//! - [`reconcile`]: records against the runtimes a worker reports;
//! - [`reaper`]: the thread that reaps expired sandboxes and renews leases;
//! - [`flights`]: spawns in progress, for idempotent retries to wait on;
//! - [`errors`]: `LifecycleError`, and how worker and store refusals map to it.

pub mod admission;
pub mod errors;
pub mod fleet;
pub mod flights;
pub mod reaper;
pub mod reconcile;
pub mod sandboxes;

pub use admission::{SpawnRequest, limits_for};
pub use errors::LifecycleError;
pub use sandboxes::{Lifecycle, RENEW_CHUNK};
