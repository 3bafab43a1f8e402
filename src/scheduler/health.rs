//! Pure rules for worker health and eligibility. No clock inside: the age of
//! the last received heartbeat is a parameter.

use std::time::Duration;

use crate::workers::{Worker, WorkerStatus};

/// Derived from heartbeat freshness, never reported by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// A heartbeat arrived within `stale_after`.
    Ready,
    /// Stale: none for longer than `stale_after`, but not yet `down_after`.
    Suspect,
    /// None for longer than `down_after`.
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::Suspect => "suspect",
            Health::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub stale_after: Duration,
    pub down_after: Duration,
}

pub fn health(age: Duration, w: Windows) -> Health {
    if age <= w.stale_after {
        Health::Ready
    } else if age <= w.down_after {
        Health::Suspect
    } else {
        Health::Down
    }
}

/// Why a worker cannot take a new sandbox now; `None` when it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ineligible {
    NotOnline,
    Draining,
    Stale,
    Full,
    ProviderUnsupported,
}

impl Ineligible {
    /// The reasons `ineligibility` gives (provider support is judged
    /// separately, per provider asked for).
    pub const ALL: [Ineligible; 4] = [
        Ineligible::NotOnline,
        Ineligible::Draining,
        Ineligible::Stale,
        Ineligible::Full,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Ineligible::NotOnline => "not_online",
            Ineligible::Draining => "draining",
            Ineligible::Stale => "stale",
            Ineligible::Full => "full",
            Ineligible::ProviderUnsupported => "provider_unsupported",
        }
    }
}

/// Why `worker` cannot take one more sandbox now; `load` counts its live
/// sandboxes plus the reservations in flight.
pub fn ineligibility(worker: &Worker, health: Health, load: u32) -> Option<Ineligible> {
    match worker.status {
        WorkerStatus::Draining => return Some(Ineligible::Draining),
        WorkerStatus::Online => {}
        WorkerStatus::Unhealthy | WorkerStatus::Offline => return Some(Ineligible::NotOnline),
    }
    if health != Health::Ready {
        return Some(Ineligible::Stale);
    }
    match worker.capacity.max_sandboxes {
        Some(max) if load >= max => Some(Ineligible::Full),
        _ => None,
    }
}

/// An empty provider list means the worker runs every provider; an empty
/// `provider` asks for any.
pub fn supports(worker: &Worker, provider: &str) -> bool {
    provider.is_empty()
        || worker.providers.is_empty()
        || worker.providers.iter().any(|p| p == provider)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::Capacity;

    const W: Windows = Windows {
        stale_after: Duration::from_secs(15),
        down_after: Duration::from_secs(60),
    };

    #[test]
    fn health_boundaries() {
        let table = [
            (0, Health::Ready),
            (15_000, Health::Ready),
            (15_001, Health::Suspect),
            (60_000, Health::Suspect),
            (60_001, Health::Down),
        ];
        for (ms, expected) in table {
            assert_eq!(health(Duration::from_millis(ms), W), expected, "{ms} ms");
        }
    }

    fn worker(status: WorkerStatus, max: Option<u32>) -> Worker {
        Worker {
            id: "w".into(),
            hostname: String::new(),
            status,
            providers: vec![],
            capabilities: vec![],
            capacity: Capacity { max_sandboxes: max },
            last_heartbeat_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn eligibility_rules() {
        use Ineligible::*;
        let table = [
            (WorkerStatus::Online, Health::Ready, None, 100, None),
            (WorkerStatus::Online, Health::Ready, Some(2), 1, None),
            (WorkerStatus::Online, Health::Ready, Some(2), 2, Some(Full)),
            (WorkerStatus::Online, Health::Ready, Some(0), 0, Some(Full)),
            (WorkerStatus::Online, Health::Suspect, None, 0, Some(Stale)),
            (WorkerStatus::Online, Health::Down, None, 0, Some(Stale)),
            (
                WorkerStatus::Draining,
                Health::Ready,
                None,
                0,
                Some(Draining),
            ),
            (
                WorkerStatus::Unhealthy,
                Health::Ready,
                None,
                0,
                Some(NotOnline),
            ),
            (
                WorkerStatus::Offline,
                Health::Ready,
                None,
                0,
                Some(NotOnline),
            ),
        ];
        for (status, h, max, active, expected) in table {
            assert_eq!(
                ineligibility(&worker(status, max), h, active),
                expected,
                "{status} {h:?} {max:?} {active}"
            );
        }
    }
}
