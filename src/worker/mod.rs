//! The worker role: what runs sandboxes, as opposed to the control plane
//! that admits, records and places them.
//!
//! - [`link`]: `WorkerLink`, the operations the control plane sends a
//!   worker, and `LocalLink`, this daemon's own worker behind it;
//! - [`fence`]: the lease check a worker makes before it acts;
//! - [`executor`]: the `worker-N` threads that call providers with a
//!   deadline;
//! - [`heartbeat`]: the local worker's heartbeats to the scheduler;
//! - [`ops`]: exec and file operations and their errors, as any worker
//!   is asked them.
//!
//! Reconciliation is driven by the control plane
//! (`crate::controlplane::reconcile`) from what a worker's link reports.

pub mod executor;
pub mod fence;
pub mod heartbeat;
pub mod link;
pub mod ops;

pub use link::{LinkError, Links, LocalLink, WorkerLink};
