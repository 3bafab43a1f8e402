//! The fleet side of the control plane: heartbeats from any worker (over
//! REST or the admin socket) are taken here.

use std::time::Instant;

use super::LifecycleError;
use crate::scheduler::{Refresh, SchedulerHandle, WorkerView};
use crate::store::{AuditEntry, StoreHandle};
use crate::time::now_ms;
use crate::workers::Heartbeat;

/// Takes a heartbeat from any worker (REST or admin socket). A refresh that
/// declares nothing new is soft state: the scheduler takes it in memory and
/// persists receive times in batches. A registration or a change is stored
/// durably first, with an audit row naming `actor`.
pub fn receive(
    store: &StoreHandle,
    scheduler: &SchedulerHandle,
    hb: Heartbeat,
    received: Instant,
    actor: &str,
    request_id: &str,
) -> Result<WorkerView, LifecycleError> {
    let detail = match scheduler.refresh(&hb, received, now_ms())? {
        Refresh::Done(view) => {
            crate::metrics::METRICS.workers.heartbeats.inc();
            return Ok(view);
        }
        Refresh::Unknown => "registered",
        Refresh::Changed => "changed",
    };
    let audit = AuditEntry::new(
        now_ms(),
        actor,
        request_id,
        "worker.heartbeat",
        &hb.id,
        detail,
    );
    let worker = store.save_heartbeat(hb, now_ms(), Some(audit))?;
    crate::metrics::METRICS.workers.heartbeats.inc();
    Ok(scheduler.observe(worker, received)?)
}
