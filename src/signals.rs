//! The `signals` thread: turns SIGTERM/SIGINT into `SupervisorEvent::Shutdown` and
//! SIGHUP into `SupervisorEvent::Reload` on the supervisor's channel. Nothing else
//! happens in signal context (signal-hook's self-pipe does the async-safe
//! part).

use crossbeam_channel::Sender;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::supervise::SupervisorEvent;

pub struct SignalThread {
    handle: Handle,
    thread: std::thread::JoinHandle<()>,
}

impl SignalThread {
    pub fn start(events: Sender<SupervisorEvent>) -> std::io::Result<SignalThread> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let event = match signal {
                        SIGHUP => SupervisorEvent::Reload,
                        SIGTERM => SupervisorEvent::Shutdown("SIGTERM"),
                        _ => SupervisorEvent::Shutdown("SIGINT"),
                    };
                    if events.send(event).is_err() {
                        break;
                    }
                }
            })?;
        Ok(SignalThread { handle, thread })
    }

    pub fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}
