//! Why a sandbox operation of the control plane failed: one error type
//! for spawn, destroy, extend, reads and reconciliation, mapped to each
//! edge's codes by that edge.

use crate::sandboxes::SandboxState;
use crate::scheduler::{Admission, SchedulerError};
use crate::store::{SandboxRefusal, StoreError};
use crate::worker::LinkError;
use crate::worker::executor::ExecError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// Another worker holds the lease, or the state forbids the change.
    #[error("{0}")]
    Conflict(String),
    #[error("admission denied: {}", .0.denial.map_or("unknown", |d| d.as_str()))]
    Denied(Box<Admission>),
    /// The provider failed; nothing is left behind.
    #[error("{0}")]
    Provider(String),
    /// A component (store, scheduler, executor, provider) did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// The store's disk is full: nothing was committed (the message says
    /// what, if anything, already happened outside the store).
    #[error("{0}")]
    StorageFull(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for LifecycleError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => LifecycleError::Unavailable(e.to_string()),
            StoreError::Database(_) => LifecycleError::Internal(e.to_string()),
            StoreError::Full(_) => LifecycleError::StorageFull(e.to_string()),
        }
    }
}

impl From<SchedulerError> for LifecycleError {
    fn from(e: SchedulerError) -> Self {
        LifecycleError::Unavailable(e.to_string())
    }
}

/// A store refusal of a change to sandbox `id`.
pub(super) fn refusal(id: &str, r: SandboxRefusal) -> LifecycleError {
    match r {
        SandboxRefusal::NotFound | SandboxRefusal::NotLive(SandboxState::Destroyed) => {
            LifecycleError::NotFound(format!("sandbox {id} not found"))
        }
        SandboxRefusal::NotLive(state) => {
            LifecycleError::Conflict(format!("sandbox {id} is {}", state.as_str()))
        }
        SandboxRefusal::Lease(e) => LifecycleError::Conflict(format!("sandbox {id}: {e}")),
    }
}

/// A worker's refusal or failure of `what` (e.g. "spawn of sb-..").
pub(super) fn link_failure(what: &str, e: LinkError) -> LifecycleError {
    match e {
        LinkError::Fenced(e) => LifecycleError::Conflict(format!("{what}: {e}")),
        LinkError::Remote { worker_id } => LifecycleError::Conflict(format!(
            "{what}: the sandbox is owned by worker {worker_id}; remote worker RPC is not available"
        )),
        LinkError::NoProvider(p) => {
            LifecycleError::Internal(format!("{what}: provider {p} is not configured"))
        }
        LinkError::Exec(ExecError::Provider(e)) => {
            LifecycleError::Provider(format!("{what} failed: {e}"))
        }
        LinkError::Exec(e @ (ExecError::Timeout | ExecError::Unavailable(_))) => {
            LifecycleError::Unavailable(format!("{what}: {e}"))
        }
    }
}
