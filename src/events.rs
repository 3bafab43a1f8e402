//! Events for `events.subscribe` on the admin socket: worker health
//! changes, lease transitions, sandbox lifecycle and admission denials.
//!
//! Publishing never blocks: events go into a bounded queue (dropped when it
//! is full or when nobody listens). The admin server's `admin-events`
//! thread takes them and writes one line per event to each subscriber.
//! With no subscriber, `publish` returns at once: no queueing, and no
//! wake-up of `admin-events` for every lease renewal.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde_json::{Value, json};

/// The topics a subscriber may ask for.
pub const TOPICS: [&str; 4] = ["worker", "lease", "sandbox", "admission"];

/// What happened, typed; [`Event::data`] is its wire form on the admin
/// socket. Health and status values are their `as_str` names.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    WorkerRegistered {
        id: String,
    },
    /// Health changed; `last_seen_seconds` when the sweep found it.
    WorkerHealth {
        id: String,
        from: &'static str,
        to: &'static str,
        last_seen_seconds: Option<f64>,
    },
    /// The sweep found a worker's heartbeat late.
    WorkerStale {
        id: String,
        from: &'static str,
        to: &'static str,
        last_seen_seconds: f64,
    },
    WorkerStatus {
        id: String,
        status: &'static str,
    },
    /// `mode` is `drain` or `stop`.
    WorkerDraining {
        id: String,
        mode: &'static str,
    },
    LeaseAcquired(LeaseFigures),
    LeaseReleased(LeaseFigures),
    /// Set or cleared through the admin socket.
    LeaseChanged(LeaseFigures),
    SandboxRunning {
        id: String,
        worker_id: String,
    },
    SandboxError {
        id: String,
        error: String,
    },
    SandboxDestroyed {
        id: String,
    },
    SandboxLost {
        id: String,
    },
    AdmissionDenied {
        reason: &'static str,
        provider: String,
        owner_id: String,
        /// reason -> workers filtered for it.
        rejections: BTreeMap<&'static str, usize>,
    },
}

/// A lease as its events carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseFigures {
    pub resource_id: String,
    pub holder_id: String,
    pub generation: u64,
}

impl Event {
    /// One of [`TOPICS`].
    pub fn topic(&self) -> &'static str {
        match self {
            Event::WorkerRegistered { .. }
            | Event::WorkerHealth { .. }
            | Event::WorkerStale { .. }
            | Event::WorkerStatus { .. }
            | Event::WorkerDraining { .. } => "worker",
            Event::LeaseAcquired(_) | Event::LeaseReleased(_) | Event::LeaseChanged(_) => "lease",
            Event::SandboxRunning { .. }
            | Event::SandboxError { .. }
            | Event::SandboxDestroyed { .. }
            | Event::SandboxLost { .. } => "sandbox",
            Event::AdmissionDenied { .. } => "admission",
        }
    }

    /// e.g. `worker.health`, `sandbox.destroyed`, `lease.acquired`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::WorkerRegistered { .. } => "worker.registered",
            Event::WorkerHealth { .. } => "worker.health",
            Event::WorkerStale { .. } => "worker.stale",
            Event::WorkerStatus { .. } => "worker.status",
            Event::WorkerDraining { .. } => "worker.draining",
            Event::LeaseAcquired(_) => "lease.acquired",
            Event::LeaseReleased(_) => "lease.released",
            Event::LeaseChanged(_) => "lease.changed",
            Event::SandboxRunning { .. } => "sandbox.running",
            Event::SandboxError { .. } => "sandbox.error",
            Event::SandboxDestroyed { .. } => "sandbox.destroyed",
            Event::SandboxLost { .. } => "sandbox.lost",
            Event::AdmissionDenied { .. } => "admission.denied",
        }
    }

    /// The `data` object of the event's line on the admin socket.
    pub fn data(&self) -> Value {
        match self {
            Event::WorkerRegistered { id }
            | Event::SandboxDestroyed { id }
            | Event::SandboxLost { id } => json!({"id": id}),
            Event::WorkerHealth {
                id,
                from,
                to,
                last_seen_seconds: None,
            } => json!({"id": id, "from": from, "to": to}),
            Event::WorkerHealth {
                id,
                from,
                to,
                last_seen_seconds: Some(age),
            }
            | Event::WorkerStale {
                id,
                from,
                to,
                last_seen_seconds: age,
            } => json!({"id": id, "from": from, "to": to, "last_seen_seconds": age}),
            Event::WorkerStatus { id, status } => json!({"id": id, "status": status}),
            Event::WorkerDraining { id, mode } => json!({"id": id, "mode": mode}),
            Event::LeaseAcquired(l) | Event::LeaseReleased(l) | Event::LeaseChanged(l) => {
                json!({"resource_id": l.resource_id, "holder_id": l.holder_id, "generation": l.generation})
            }
            Event::SandboxRunning { id, worker_id } => json!({"id": id, "worker_id": worker_id}),
            Event::SandboxError { id, error } => json!({"id": id, "error": error}),
            Event::AdmissionDenied {
                reason,
                provider,
                owner_id,
                rejections,
            } => {
                json!({"reason": reason, "provider": provider, "owner_id": owner_id, "rejections": rejections})
            }
        }
    }
}

/// An event with the wall-clock time it was published.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub at_ms: i64,
    pub event: Event,
}

static BUS: OnceLock<Sender<Stamped>> = OnceLock::new();

/// Whether anyone subscribes; kept by the admin server.
static LISTENING: AtomicBool = AtomicBool::new(false);

/// Called by the admin server whenever its subscriber list changes.
pub fn set_listening(listening: bool) {
    LISTENING.store(listening, Ordering::Relaxed);
}

/// Starts the bus; the receiver goes to the admin server. Called once.
pub fn open() -> Option<Receiver<Stamped>> {
    let (tx, rx) = bounded(4096);
    BUS.set(tx).ok().map(|()| rx)
}

/// Publishes an event; it is built only when someone subscribes.
pub fn publish(event: impl FnOnce() -> Event) {
    if !LISTENING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(bus) = BUS.get() {
        let event = Stamped {
            at_ms: crate::time::now_ms(),
            event: event(),
        };
        if let Err(TrySendError::Full(_)) = bus.try_send(event) {
            crate::metrics::METRICS.events_dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_a_known_topic_and_a_name_under_it() {
        let lease = LeaseFigures {
            resource_id: "r".into(),
            holder_id: "h".into(),
            generation: 3,
        };
        let events = [
            Event::WorkerRegistered { id: "w".into() },
            Event::WorkerStatus {
                id: "w".into(),
                status: "cordoned",
            },
            Event::LeaseChanged(lease.clone()),
            Event::SandboxLost { id: "s".into() },
            Event::AdmissionDenied {
                reason: "max_ttl",
                provider: "p".into(),
                owner_id: "o".into(),
                rejections: BTreeMap::new(),
            },
        ];
        for e in &events {
            assert!(TOPICS.contains(&e.topic()), "{e:?}");
            assert!(e.name().starts_with(&format!("{}.", e.topic())), "{e:?}");
        }
        assert_eq!(
            Event::LeaseAcquired(lease).data(),
            json!({"resource_id": "r", "holder_id": "h", "generation": 3})
        );
    }

    #[test]
    fn health_data_has_the_age_only_when_the_sweep_saw_it() {
        let health = |last_seen_seconds| Event::WorkerHealth {
            id: "w".into(),
            from: "stale",
            to: "ready",
            last_seen_seconds,
        };
        assert_eq!(
            health(None).data(),
            json!({"id": "w", "from": "stale", "to": "ready"})
        );
        assert_eq!(
            health(Some(1.5)).data(),
            json!({"id": "w", "from": "stale", "to": "ready", "last_seen_seconds": 1.5})
        );
    }
}
