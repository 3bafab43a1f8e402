//! The sandbox service moved to `crate::controlplane`; this path stays
//! for callers that still name it.

pub use crate::controlplane::{Lifecycle, LifecycleError, RENEW_CHUNK, SpawnRequest, limits_for};
