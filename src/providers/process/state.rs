//! A process sandbox's state directory, `<data_dir>/process/<id>/`:
//!
//! - `spec.json`: what the daemon asked for (image, uid, limits), written
//!   before the init starts;
//! - `init.json`: the init's host pid and start time, written by the init
//!   itself before it reports ready, so a daemon that dies mid-spawn still
//!   finds the runtime at restart;
//! - `init.log`: the init's stderr;
//! - `workspace/`, `tmp/`: the sandbox's writable directories;
//! - `rootfs/`: the mount point of its root (empty outside the sandbox).

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecRecord {
    pub image: String,
    /// Host uid and gid that the sandbox's root is mapped to (0 when
    /// rootless: the daemon's own uid on the host).
    pub uid: u32,
    pub slot: u32,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// The sandbox's cgroup directory, when limits are cgroup ones.
    pub cgroup: Option<String>,
    /// Started in a user namespace of its own (every sandbox since the
    /// isolation layers; absent in records of older daemons).
    #[serde(default)]
    pub userns: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitRecord {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: with the pid, names the process
    /// across pid reuse.
    pub start_time: u64,
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, dir.join(name))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<T> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl SpecRecord {
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(io::Error::other)?;
        write_atomic(dir, "spec.json", &bytes)
    }

    pub fn read(dir: &Path) -> io::Result<SpecRecord> {
        read_json(&dir.join("spec.json"))
    }
}

impl InitRecord {
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(io::Error::other)?;
        write_atomic(dir, "init.json", &bytes)
    }

    pub fn read(dir: &Path) -> io::Result<InitRecord> {
        read_json(&dir.join("init.json"))
    }

    /// True while this exact process (not a reuse of its pid) runs.
    pub fn alive(&self) -> bool {
        read_start_time(self.pid) == Some(self.start_time)
    }
}

/// Start time of `pid` in clock ticks since boot, from `/proc/<pid>/stat`;
/// `None` when there is no such process (or it is a zombie being reaped).
pub fn read_start_time(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&text)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); a zombie is not a live runtime.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22() {
        let stat =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        let zombie = "1234 (x) Z 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 0 0";
        assert_eq!(parse_start_time(zombie), None);
        assert_eq!(parse_start_time("garbage"), None);
        let me = read_start_time(std::process::id() as i32);
        assert!(me.is_some_and(|t| t > 0));
    }

    #[test]
    fn records_round_trip() {
        let dir = std::env::temp_dir().join(format!("stacyvmd-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let init = InitRecord {
            pid: std::process::id() as i32,
            start_time: read_start_time(std::process::id() as i32).unwrap(),
        };
        init.write(&dir).unwrap();
        assert_eq!(InitRecord::read(&dir).unwrap(), init);
        assert!(init.alive());
        let reused = InitRecord {
            start_time: init.start_time + 1,
            ..init
        };
        assert!(!reused.alive(), "a different start time is another process");
        fs::remove_dir_all(&dir).unwrap();
    }
}
