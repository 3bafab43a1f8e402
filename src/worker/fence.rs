//! The worker's fence: before it acts on a resource (spawn, destroy,
//! reap), a worker checks the lease it was sent. It must name this worker
//! as holder, be unexpired, and carry a generation no older than the
//! highest this worker has accepted for that resource. A stale holder that
//! comes back after its lease was granted to someone else, or a delayed
//! command from before a re-grant, is refused here, whatever the sender
//! believed.
//!
//! The fence remembers, per resource, the holder, the expiry and the
//! highest generation it accepted; an entry is forgotten when the
//! resource ends, so the map holds only live resources.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::leases::{Lease, LeaseError, check_generation};

/// What the fence remembers of the last lease it accepted for a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub holder_id: String,
    pub expires_at_ms: i64,
    pub generation: u64,
}

/// Why the fence refused a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("lease on {resource_id} is held by {holder_id}, not by this worker ({me})")]
    NotHolder {
        resource_id: String,
        holder_id: String,
        me: String,
    },
    #[error("lease on {resource_id} expired")]
    Expired { resource_id: String },
    #[error("lease on {resource_id}: {source}")]
    Stale {
        resource_id: String,
        #[source]
        source: LeaseError,
    },
}

#[derive(Default)]
pub struct Fence {
    accepted: Mutex<HashMap<String, Accepted>>,
}

impl Fence {
    /// Checks `lease` for worker `me` at `now` and, when it passes,
    /// remembers it as the newest accepted for its resource.
    pub fn admit(&self, me: &str, lease: &Lease, now_ms: i64) -> Result<(), FenceError> {
        if lease.holder_id != me {
            return Err(FenceError::NotHolder {
                resource_id: lease.resource_id.clone(),
                holder_id: lease.holder_id.clone(),
                me: me.to_owned(),
            });
        }
        if lease.expires_at_ms <= now_ms {
            return Err(FenceError::Expired {
                resource_id: lease.resource_id.clone(),
            });
        }
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let highest = accepted.get(&lease.resource_id).map_or(0, |a| a.generation);
        check_generation(lease.generation, highest).map_err(|source| FenceError::Stale {
            resource_id: lease.resource_id.clone(),
            source,
        })?;
        accepted.insert(
            lease.resource_id.clone(),
            Accepted {
                holder_id: lease.holder_id.clone(),
                expires_at_ms: lease.expires_at_ms,
                generation: lease.generation,
            },
        );
        Ok(())
    }

    /// The highest generation accepted for `resource_id` (0: none).
    pub fn highest_generation(&self, resource_id: &str) -> u64 {
        self.accepted(resource_id).map_or(0, |a| a.generation)
    }

    pub fn accepted(&self, resource_id: &str) -> Option<Accepted> {
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(resource_id)
            .cloned()
    }

    /// The resource ended: nothing of it needs fencing any more.
    pub fn forget(&self, resource_id: &str) {
        self.accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(resource_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, generation: u64, expires_at_ms: i64) -> Lease {
        Lease {
            resource_id: "sb-1".into(),
            resource_type: "sandbox".into(),
            holder_id: holder.into(),
            generation,
            acquired_at_ms: 0,
            renewed_at_ms: 0,
            expires_at_ms,
            transitions: 0,
        }
    }

    #[test]
    fn only_the_holder_with_an_unexpired_lease_passes() {
        let fence = Fence::default();
        assert!(matches!(
            fence.admit("w1", &lease("w2", 1, 100), 10),
            Err(FenceError::NotHolder { .. })
        ));
        assert!(matches!(
            fence.admit("w1", &lease("w1", 1, 10), 10),
            Err(FenceError::Expired { .. })
        ));
        assert_eq!(
            fence.highest_generation("sb-1"),
            0,
            "refusals remember nothing"
        );
        fence.admit("w1", &lease("w1", 1, 100), 10).unwrap();
        assert_eq!(
            fence.accepted("sb-1"),
            Some(Accepted {
                holder_id: "w1".into(),
                expires_at_ms: 100,
                generation: 1
            })
        );
    }

    #[test]
    fn generations_never_go_back_until_the_resource_is_forgotten() {
        let fence = Fence::default();
        fence.admit("w1", &lease("w1", 3, 100), 10).unwrap();
        fence.admit("w1", &lease("w1", 3, 200), 10).unwrap();
        let stale = fence.admit("w1", &lease("w1", 2, 300), 10).unwrap_err();
        assert!(matches!(
            stale,
            FenceError::Stale {
                source: LeaseError::StaleGeneration {
                    presented: 2,
                    current: 3
                },
                ..
            }
        ));
        assert_eq!(fence.accepted("sb-1").unwrap().expires_at_ms, 200);
        fence.forget("sb-1");
        fence.admit("w1", &lease("w1", 1, 100), 10).unwrap();
        assert_eq!(fence.highest_generation("sb-1"), 1);
    }
}
