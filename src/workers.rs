//! Worker domain types and the rules for worker input, shared by the HTTP
//! edge, the store and the scheduler. No JSON here: the edges convert.

use std::fmt;

/// What a worker reports about itself. Health is derived separately from
/// heartbeat freshness (see `scheduler::health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    Online,
    Draining,
    Unhealthy,
    Offline,
}

impl WorkerStatus {
    pub const ALL: [WorkerStatus; 4] = [
        WorkerStatus::Online,
        WorkerStatus::Draining,
        WorkerStatus::Unhealthy,
        WorkerStatus::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Online => "online",
            WorkerStatus::Draining => "draining",
            WorkerStatus::Unhealthy => "unhealthy",
            WorkerStatus::Offline => "offline",
        }
    }

    /// Parses a reported status; blank means `online` (as in StacyVM).
    pub fn parse(text: &str) -> Option<WorkerStatus> {
        if text.trim().is_empty() {
            return Some(WorkerStatus::Online);
        }
        WorkerStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for WorkerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker as stored. Times are epoch milliseconds (wall clock, for display;
/// freshness uses the scheduler's monotonic receive times).
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub id: String,
    pub hostname: String,
    pub status: WorkerStatus,
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    pub capacity: Capacity,
    pub last_heartbeat_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// Read by placement; `None` means no limit was reported.
    pub max_sandboxes: Option<u32>,
}

/// A heartbeat: what a worker reports. Absent fields keep the stored value
/// (a bare heartbeat refreshes liveness without wiping the registration);
/// on first registration they default to empty.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heartbeat {
    pub id: String,
    pub hostname: Option<String>,
    pub status: Option<WorkerStatus>,
    pub providers: Option<Vec<String>>,
    pub capabilities: Option<Vec<String>>,
    pub capacity: Option<Capacity>,
}

impl Heartbeat {
    /// Whether this heartbeat declares something other than `known` has
    /// stored: a registration change (durable and audited) rather than a
    /// liveness refresh (soft state). An absent status means `online`.
    pub fn changes(&self, known: &Worker) -> bool {
        self.hostname.as_ref().is_some_and(|h| *h != known.hostname)
            || self.status.unwrap_or(WorkerStatus::Online) != known.status
            || self
                .providers
                .as_ref()
                .is_some_and(|p| *p != known.providers)
            || self
                .capabilities
                .as_ref()
                .is_some_and(|c| *c != known.capabilities)
            || self.capacity.is_some_and(|c| c != known.capacity)
    }
}

pub const MAX_WORKER_ID_LEN: usize = 128;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_LIST_ITEMS: usize = 64;

/// Worker ids appear in URLs, logs and metric labels: non-empty, at most 128
/// characters, no slash, no whitespace or control characters.
pub fn validate_worker_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("worker id must not be empty".into());
    }
    if id.chars().count() > MAX_WORKER_ID_LEN {
        return Err(format!(
            "worker id is longer than {MAX_WORKER_ID_LEN} characters"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| *c == '/' || *c == '\\' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("worker id must not contain {c:?}"));
    }
    Ok(())
}

/// Names in `providers`, `capabilities` and `hostname`: short printable text.
pub fn validate_name(field: &str, value: &str) -> Result<(), String> {
    if value.chars().count() > MAX_NAME_LEN {
        return Err(format!(
            "field `{field}` is longer than {MAX_NAME_LEN} characters"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "field `{field}` must not contain control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids() {
        for good in ["local", "w-1", "worker.eu-1:7", &"x".repeat(128), "ünïcode"] {
            assert!(validate_worker_id(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "a/b",
            "a b",
            "a\tb",
            "a\u{0}b",
            "..\\x",
            &"x".repeat(129),
        ] {
            assert!(validate_worker_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(WorkerStatus::parse(""), Some(WorkerStatus::Online));
        assert_eq!(
            WorkerStatus::parse("draining"),
            Some(WorkerStatus::Draining)
        );
        assert_eq!(WorkerStatus::parse("ONLINE"), None);
        for s in WorkerStatus::ALL {
            assert_eq!(WorkerStatus::parse(s.as_str()), Some(s));
        }
    }
}
