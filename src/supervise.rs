//! What component threads tell the supervisor: a leaf module (it imports
//! nothing of the crate), so that every component can report its end
//! without importing the daemon that composes them.
//!
//! The supervisor (`daemon::run` on the main thread) owns the receiving
//! end of one channel of [`SupervisorEvent`]s; signals send `Shutdown` and
//! `Reload`, and every component thread holds an [`ExitGuard`] whose drop
//! sends `ComponentExited`, so a thread that ends on its own (a panic, a
//! fatal error) is noticed and the process exits with status 1.

use crossbeam_channel::Sender;

/// An event for the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorEvent {
    /// Stop in order; the payload names the cause (a signal, a method).
    Shutdown(&'static str),
    /// Re-read the configuration (SIGHUP, `config.reload`).
    Reload,
    /// A component thread ended.
    ComponentExited { name: &'static str, panicked: bool },
}

/// Lets a component thread tell the supervisor it ended.
#[derive(Clone)]
pub struct ExitNotifier(Sender<SupervisorEvent>);

impl ExitNotifier {
    pub fn new(events: Sender<SupervisorEvent>) -> ExitNotifier {
        ExitNotifier(events)
    }

    /// Held for the life of a component thread; reports its end on drop.
    pub fn guard(&self, name: &'static str) -> ExitGuard {
        ExitGuard {
            name,
            events: self.0.clone(),
        }
    }

    #[cfg(test)]
    pub fn for_tests() -> (ExitNotifier, crossbeam_channel::Receiver<SupervisorEvent>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (ExitNotifier(tx), rx)
    }
}

/// Reports its component's end to the supervisor when dropped.
pub struct ExitGuard {
    name: &'static str,
    events: Sender<SupervisorEvent>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        let _ = self.events.send(SupervisorEvent::ComponentExited {
            name: self.name,
            panicked,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_reports_a_normal_end_and_a_panic() {
        let (notifier, events) = ExitNotifier::for_tests();
        drop(notifier.guard("quiet"));
        assert_eq!(
            events.try_recv(),
            Ok(SupervisorEvent::ComponentExited {
                name: "quiet",
                panicked: false
            })
        );
        let n = notifier.clone();
        let _ = std::thread::spawn(move || {
            let _g = n.guard("loud");
            panic!("on purpose");
        })
        .join();
        assert_eq!(
            events.try_recv(),
            Ok(SupervisorEvent::ComponentExited {
                name: "loud",
                panicked: true
            })
        );
    }
}
