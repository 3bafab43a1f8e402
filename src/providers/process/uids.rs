//! Host uids for sandboxes (root daemon): each sandbox's root is mapped
//! to a host uid (and the gid of the same number) of its own, taken from
//! `[uid_base, uid_base + uid_count)` in turn. The cursor is kept in
//! `<data_dir>/process/uid-cursor` and survives restarts, so a uid comes
//! back only after the whole range was used once, and never while a live
//! sandbox has it. Nothing of a destroyed sandbox outlives it under its uid
//! (its files live on its own tmpfs or disk image, its processes die with
//! its PID namespace, and the seccomp filter allows no kernel keys), so
//! the next holder of the uid finds nothing of it.
//!
//! Across daemons (two on one host with overlapping ranges, or a daemon
//! restarted with another data directory), the host-wide registry file
//! (`uid_registry`, default `/run/stacyvmd-uids/registry`) decides: a uid is
//! taken by locking its byte there ([`UidLock`]), and the lock is held by
//! the sandbox's init for as long as the sandbox lives, whoever started it.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::confine::UidLock;

/// Makes the registry's directory (0700) if it is missing; the file itself
/// is made by the first lock.
pub fn prepare_registry(registry: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match registry.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                format!(
                    "creating the uid registry's directory {}: {e}",
                    dir.display()
                )
            }),
        _ => Ok(()),
    }
}

pub struct UidAllocator {
    base: u32,
    count: u32,
    next: u32,
    file: PathBuf,
}

impl UidAllocator {
    pub fn open(dir: &Path, base: u32, count: u32) -> Result<UidAllocator, String> {
        let file = dir.join("uid-cursor");
        let next = match fs::read_to_string(&file) {
            Ok(text) => text.trim().parse::<u32>().unwrap_or(0) % count.max(1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        };
        Ok(UidAllocator {
            base,
            count: count.max(1),
            next,
            file,
        })
    }

    /// The next uid that no live sandbox of this daemon has and no
    /// sandbox on this host holds in `registry`, locked there; the cursor
    /// moves past it and is written before the uid is used.
    pub fn next(
        &mut self,
        in_use: &HashSet<u32>,
        registry: &Path,
    ) -> Result<(u32, UidLock), String> {
        for _ in 0..self.count {
            let uid = self.base + self.next;
            self.next = (self.next + 1) % self.count;
            if in_use.contains(&uid) {
                continue;
            }
            if let Some(lock) = UidLock::take(registry, uid)? {
                let tmp = self.file.with_extension("tmp");
                fs::write(&tmp, self.next.to_string())
                    .and_then(|()| fs::rename(&tmp, &self.file))
                    .map_err(|e| format!("writing {}: {e}", self.file.display()))?;
                return Ok((uid, lock));
            }
        }
        Err(format!(
            "every sandbox uid in {}..{} is in use",
            self.base,
            u64::from(self.base) + u64::from(self.count)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stacyvmd-uids-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn uids_go_round_and_skip_live_ones_and_survive_a_restart() {
        let dir = scratch("round");
        let registry = dir.join("registry");
        let mut a = UidAllocator::open(&dir, 1000, 3).unwrap();
        let none = HashSet::new();
        let (first, _l0) = a.next(&none, &registry).unwrap();
        let (second, _l1) = a.next(&none, &registry).unwrap();
        assert_eq!((first, second), (1000, 1001));
        drop((_l0, _l1));
        // Reopened: goes on where it was, not back to the start.
        let mut b = UidAllocator::open(&dir, 1000, 3).unwrap();
        assert_eq!(b.next(&HashSet::from([1000]), &registry).unwrap().0, 1002);
        assert_eq!(b.next(&HashSet::from([1000]), &registry).unwrap().0, 1001);
        assert!(
            b.next(&HashSet::from([1000, 1001, 1002]), &registry)
                .is_err()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Two daemons (two data directories) over one range: a uid locked by
    /// one is never given by the other, until its lock is released.
    #[test]
    fn a_uid_held_on_this_host_is_never_given_again() {
        let (one, two) = (scratch("one"), scratch("two"));
        let registry = one.join("registry");
        let none = HashSet::new();
        let mut a = UidAllocator::open(&one, 5000, 2).unwrap();
        let mut b = UidAllocator::open(&two, 5000, 2).unwrap();
        let (uid_a, lock_a) = a.next(&none, &registry).unwrap();
        let (uid_b, lock_b) = b.next(&none, &registry).unwrap();
        assert_ne!(uid_a, uid_b, "both daemons were given uid {uid_a}");
        let err = b.next(&none, &registry).err().expect("every uid is held");
        assert!(err.contains("in use"), "{err}");
        drop(lock_a);
        assert_eq!(b.next(&none, &registry).unwrap().0, uid_a);
        drop(lock_b);
        fs::remove_dir_all(&one).unwrap();
        fs::remove_dir_all(&two).unwrap();
    }
}
