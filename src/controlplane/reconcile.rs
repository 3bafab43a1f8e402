//! Reconciliation: the control plane compares its records with the
//! runtimes a worker reports, and settles each difference under a lease.
//! Run at startup for the local worker, and whenever a command finds a
//! runtime gone (`runtime_vanished`).

use std::collections::HashMap;

use super::errors::refusal;
use super::{Lifecycle, LifecycleError};
use crate::sandboxes::{Sandbox, SandboxState};
use crate::time::now_ms;
use crate::worker::WorkerLink;

impl Lifecycle {
    /// A running sandbox whose runtime is gone (its processes were killed
    /// from outside) is marked `lost` when that is noticed, not only at the
    /// next restart, and the provider's leftovers are removed. Returns
    /// whether the record was changed.
    pub fn runtime_vanished(&self, sandbox: &Sandbox) -> bool {
        match self.mark_lost(&sandbox.id, &sandbox.owner_id) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                log::warn!("marking sandbox {} lost: {e}", sandbox.id);
                return false;
            }
        }
        self.forget(sandbox);
        log::warn!(
            "sandbox {} has no runtime any more (killed from outside?); marked lost",
            sandbox.id
        );
        crate::events::publish(|| crate::events::Event::SandboxLost {
            id: sandbox.id.clone(),
        });
        let timeout = self.live.get().sandboxes.provider_timeout;
        if let Err(e) = self
            .links
            .local()
            .clean_up(&sandbox.provider, &sandbox.id, timeout)
        {
            log::warn!("sandbox {}: removing what is left of it: {e}", sandbox.id);
        }
        true
    }

    /// Marks a live record of this worker `lost` and takes it off the
    /// scheduler's count. `Ok(false)`: the store refused (logged), nothing
    /// changed.
    fn mark_lost(&self, id: &str, owner_id: &str) -> Result<bool, LifecycleError> {
        let me = self.me();
        match self.store.mark_lost(id, me, now_ms())? {
            Ok(_) => {
                self.scheduler.sandbox_count(me, owner_id, -1)?;
                Ok(true)
            }
            Err(r) => {
                log::warn!("{}", refusal(id, r));
                Ok(false)
            }
        }
    }

    /// Startup reconciliation of provider runtimes against the store.
    /// Leases first: this worker takes back the leases of its live
    /// sandboxes in one statement, and leaves alone any sandbox another
    /// holder has. Then records without a runtime are marked `lost`, a
    /// half-finished spawn whose runtime exists is adopted, and runtimes
    /// without a live record are reaped (under a lease). Every step is
    /// logged. Returns (kept, adopted, lost, reaped).
    pub fn reconcile(&self) -> Result<(usize, usize, usize, usize), LifecycleError> {
        let link = self.links.local();
        let me = link.worker_id();
        let ttl = self.lease_ttl_ms();
        let timeout = self.live.get().sandboxes.provider_timeout;
        let (mut kept, mut adopted, mut lost, mut reaped, mut destroyed) = (0, 0, 0, 0, 0);
        let started = std::time::Instant::now();
        let reclaimed = self.store.reclaim_sandbox_leases(me, ttl, now_ms())?;
        log::debug!(
            "reconcile: {} live records and their leases in {:?}",
            reclaimed.live.len(),
            started.elapsed()
        );
        let conflicts: HashMap<String, String> = reclaimed.conflicts.into_iter().collect();
        for (id, holder) in &conflicts {
            log::warn!("reconcile: sandbox {id} is leased by {holder}; leaving it");
        }
        let records = reclaimed.live;
        let intents: std::collections::HashSet<String> =
            self.store.destroy_intents()?.into_iter().collect();
        let recorded: std::collections::HashSet<&str> =
            records.iter().map(|r| r.id.as_str()).collect();
        for provider in self.providers().names() {
            let listed = std::time::Instant::now();
            let runtimes = link
                .runtimes(provider)
                .map_err(|e| LifecycleError::Provider(e.to_string()))?;
            log::debug!(
                "reconcile: {} runtimes of {} listed in {:?}",
                runtimes.len(),
                provider,
                listed.elapsed()
            );
            let running: std::collections::HashSet<&str> =
                runtimes.iter().map(String::as_str).collect();
            for record in records.iter().filter(|r| r.provider == provider) {
                if conflicts.contains_key(&record.id) {
                    continue;
                }
                let has_runtime = running.contains(record.id.as_str());
                if has_runtime && record.state == SandboxState::Running {
                    kept += 1;
                } else if has_runtime {
                    match self.store.finish_spawn(&record.id, me, true, now_ms())? {
                        Ok(_) => {
                            adopted += 1;
                            log::info!(
                                "reconcile: adopted the runtime of half-finished spawn {}",
                                record.id
                            );
                        }
                        Err(r) => log::warn!("reconcile: {}", refusal(&record.id, r)),
                    }
                } else if intents.contains(&record.id) {
                    // A destroy got as far as the provider and not to its
                    // commit (a crash, a full disk): finish it.
                    match self.store.finish_destroy(&record.id, me, now_ms())? {
                        Ok(_) => {
                            self.scheduler.sandbox_count(me, &record.owner_id, -1)?;
                            destroyed += 1;
                            log::warn!(
                                "reconcile: finished the interrupted destroy of {} (its runtime is gone)",
                                record.id
                            );
                        }
                        Err(r) => log::warn!("reconcile: {}", refusal(&record.id, r)),
                    }
                } else {
                    if self.mark_lost(&record.id, &record.owner_id)? {
                        lost += 1;
                        log::warn!(
                            "reconcile: sandbox {} has no runtime; marked lost",
                            record.id
                        );
                    }
                }
            }
            for runtime in runtimes.iter().filter(|r| !recorded.contains(r.as_str())) {
                // No live record of ours: lease first, then reap.
                match self
                    .store
                    .acquire_lease(runtime, "sandbox", me, ttl, now_ms())?
                {
                    Ok((lease, _)) => {
                        match link.destroy(&lease, provider, runtime, timeout, None) {
                            Ok(()) => {
                                reaped += 1;
                                log::warn!(
                                    "reconcile: reaped runtime {runtime}, which has no live record"
                                );
                            }
                            Err(e) => {
                                log::error!("reconcile: could not reap runtime {runtime}: {e}")
                            }
                        }
                        if let Err(e) = self.store.release_lease(runtime, me, now_ms())? {
                            log::warn!("reconcile: releasing the lease on {runtime}: {e}");
                        }
                    }
                    Err(e) => log::warn!("reconcile: runtime {runtime} left alone: {e}"),
                }
            }
        }
        log::info!(
            "reconcile: {kept} kept, {adopted} adopted, {lost} lost, {reaped} reaped, {destroyed} interrupted destroys finished"
        );
        Ok((kept, adopted, lost, reaped))
    }
}
