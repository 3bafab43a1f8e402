//! The `heartbeat` thread: keeps the daemon's own local worker registered.
//!
//! Every `worker.heartbeat_interval` it stores a heartbeat for the local
//! worker (providers, capabilities and capacity from the live config) and
//! tells the scheduler it was received. On stop it marks the local worker
//! `offline` in the store, so a cleanly stopped daemon is never listed as
//! online. Like any worker's heartbeat, a beat that declares nothing new is
//! soft state: taken in memory by the scheduler (its time persisted in a
//! later batch), so a full disk or a slow store never makes the local
//! worker stale. Only a registration or a change is stored durably first;
//! such a beat that fails is logged and retried on the next tick.

use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Sender, bounded, select, tick};

use crate::config::{Config, LiveConfig};
use crate::scheduler::{Refresh, SchedulerHandle};
use crate::store::{StoreError, StoreHandle};
use crate::supervise::ExitNotifier;
use crate::time::now_ms;
use crate::workers::{Capacity, Heartbeat, Worker, WorkerStatus};

/// Whether the local worker is draining (set by `worker.shutdown` or
/// `worker.drain` on the admin socket): its heartbeats then say so, and
/// placement stops choosing it.
pub type Draining = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// The local worker's heartbeat as the config describes it.
pub fn local_heartbeat(config: &Config, draining: bool) -> Heartbeat {
    let w = &config.worker;
    Heartbeat {
        id: w.id.clone(),
        hostname: Some(w.hostname.clone()),
        status: Some(if draining {
            WorkerStatus::Draining
        } else {
            WorkerStatus::Online
        }),
        providers: Some(w.providers.clone()),
        capabilities: Some(w.capabilities.clone()),
        capacity: Some(Capacity {
            max_sandboxes: Some(w.max_sandboxes),
        }),
    }
}

/// Registers the local worker durably; called before the daemon is ready.
pub fn register_local(store: &StoreHandle, config: &Config) -> Result<Worker, StoreError> {
    store.save_heartbeat(local_heartbeat(config, false), now_ms(), None)
}

pub struct HeartbeatThread {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl HeartbeatThread {
    pub fn start(
        live: LiveConfig,
        store: StoreHandle,
        scheduler: SchedulerHandle,
        draining: Draining,
        on_exit: ExitNotifier,
    ) -> std::io::Result<HeartbeatThread> {
        let (stop, stopped) = bounded::<()>(1);
        let interval = live.get().worker.heartbeat_interval;
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let _exit = on_exit.guard("heartbeat");
                let ticks = tick(interval);
                loop {
                    select! {
                        recv(stopped) -> _ => break,
                        recv(ticks) -> _ => {
                        let draining = draining.load(std::sync::atomic::Ordering::SeqCst);
                        beat(&live.get(), draining, &store, &scheduler);
                    }
                    }
                }
                let id = live.get().worker.id.clone();
                match store.set_worker_status(&id, WorkerStatus::Offline, now_ms()) {
                    Ok(Some(worker)) => {
                        let _ = scheduler.observe(worker, Instant::now());
                        log::info!("local worker {id} marked offline");
                    }
                    Ok(None) => log::warn!("local worker {id} was deleted before shutdown"),
                    Err(e) => log::error!("could not mark local worker {id} offline: {e}"),
                }
            })?;
        Ok(HeartbeatThread { stop, thread })
    }

    /// Stops the timer and waits for the offline mark to be stored.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn beat(config: &Config, draining: bool, store: &StoreHandle, scheduler: &SchedulerHandle) {
    let received = Instant::now();
    let heartbeat = local_heartbeat(config, draining);
    match scheduler.refresh(&heartbeat, received, now_ms()) {
        Ok(Refresh::Done(_)) => {
            crate::metrics::METRICS.workers.heartbeats.inc();
            return;
        }
        Ok(Refresh::Unknown | Refresh::Changed) => {}
        Err(e) => {
            log::warn!("local heartbeat not taken by the scheduler: {e}");
            return;
        }
    }
    match store.save_heartbeat(heartbeat, now_ms(), None) {
        Ok(worker) => {
            crate::metrics::METRICS.workers.heartbeats.inc();
            if let Err(e) = scheduler.observe(worker, received) {
                log::warn!("local heartbeat stored but not seen by the scheduler: {e}");
            }
        }
        Err(e) => log::warn!("local heartbeat failed: {e}"),
    }
}
