//! The `reaper` thread: destroys sandboxes whose TTL passed (every
//! `sandboxes.reap_interval`) and renews the leases of this worker's live
//! sandboxes (every `leases.renew_interval`), both through `Lifecycle`;
//! every second it also finishes destroys whose record could not be
//! committed when their runtime went (a full disk).

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, bounded, select, tick};

use super::Lifecycle;
use crate::supervise::ExitNotifier;

pub struct Reaper {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Reaper {
    pub fn start(
        lifecycle: Arc<Lifecycle>,
        reap_every: std::time::Duration,
        renew_every: std::time::Duration,
        on_exit: ExitNotifier,
    ) -> std::io::Result<Reaper> {
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                let _exit = on_exit.guard("reaper");
                let (reap, renew) = (tick(reap_every), tick(renew_every));
                let unfinished = tick(std::time::Duration::from_secs(1));
                loop {
                    select! {
                        recv(stopped) -> _ => break,
                        recv(reap) -> _ => match lifecycle.prune(&crate::sandboxes::OwnerScope::All) {
                            Ok(0) => {}
                            Ok(n) => log::info!("reaped {n} expired sandboxes"),
                            Err(e) => log::warn!("reaping failed: {e}"),
                        },
                        recv(renew) -> _ => lifecycle.renew_leases(),
                        recv(unfinished) -> _ => {
                            lifecycle.finish_unfinished_destroys();
                        }
                    }
                }
            })?;
        Ok(Reaper { stop, thread })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
