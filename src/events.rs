//! Events for `events.subscribe` on the admin socket: worker health
//! changes, lease transitions, sandbox lifecycle and admission denials.
//!
//! Publishing never blocks: events go into a bounded queue (dropped when it
//! is full or when nobody listens). The admin server's `admin-events`
//! thread takes them and writes one line per event to each subscriber.
//! With no subscriber, `publish` returns at once: no queueing, and no
//! wake-up of `admin-events` for every lease renewal.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde_json::Value;

/// The topics a subscriber may ask for.
pub const TOPICS: [&str; 4] = ["worker", "lease", "sandbox", "admission"];

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// One of [`TOPICS`].
    pub topic: &'static str,
    /// e.g. `worker.health`, `sandbox.destroyed`, `lease.acquired`.
    pub name: &'static str,
    pub at_ms: i64,
    pub data: Value,
}

static BUS: OnceLock<Sender<Event>> = OnceLock::new();

/// Whether anyone subscribes; kept by the admin server.
static LISTENING: AtomicBool = AtomicBool::new(false);

/// Called by the admin server whenever its subscriber list changes.
pub fn set_listening(listening: bool) {
    LISTENING.store(listening, Ordering::Relaxed);
}

/// Starts the bus; the receiver goes to the admin server. Called once.
pub fn open() -> Option<Receiver<Event>> {
    let (tx, rx) = bounded(4096);
    BUS.set(tx).ok().map(|()| rx)
}

/// Publishes an event; `data` is built only when someone subscribes.
pub fn publish(topic: &'static str, name: &'static str, data: impl FnOnce() -> Value) {
    if !LISTENING.load(Ordering::Relaxed) {
        return;
    }
    if let Some(bus) = BUS.get() {
        let event = Event {
            topic,
            name,
            at_ms: crate::time::now_ms(),
            data: data(),
        };
        if let Err(TrySendError::Full(_)) = bus.try_send(event) {
            crate::metrics::METRICS.events_dropped.inc();
        }
    }
}
