//! Host uids for sandboxes (root daemon): each sandbox's root is mapped
//! to a host uid (and the gid of the same number) of its own, taken from
//! `[uid_base, uid_base + uid_count)` in turn. The cursor is kept in
//! `<data_dir>/process/uid-cursor` and survives restarts, so a uid comes
//! back only after the whole range was used once, and never while a live
//! sandbox has it. Nothing of a destroyed sandbox outlives it under its uid
//! (its files live on its own tmpfs or disk image, its processes die with
//! its PID namespace, and the seccomp filter allows no kernel keys), so
//! the next holder of the uid finds nothing of it.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

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

    /// The next uid no live sandbox has; the cursor moves past it and is
    /// written before the uid is used.
    pub fn next(&mut self, in_use: &HashSet<u32>) -> Result<u32, String> {
        for _ in 0..self.count {
            let uid = self.base + self.next;
            self.next = (self.next + 1) % self.count;
            if !in_use.contains(&uid) {
                let tmp = self.file.with_extension("tmp");
                fs::write(&tmp, self.next.to_string())
                    .and_then(|()| fs::rename(&tmp, &self.file))
                    .map_err(|e| format!("writing {}: {e}", self.file.display()))?;
                return Ok(uid);
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

    #[test]
    fn uids_go_round_and_skip_live_ones_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("stacyvmd-uids-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut a = UidAllocator::open(&dir, 1000, 3).unwrap();
        let none = HashSet::new();
        assert_eq!(a.next(&none).unwrap(), 1000);
        assert_eq!(a.next(&none).unwrap(), 1001);
        // Reopened: goes on where it was, not back to the start.
        let mut b = UidAllocator::open(&dir, 1000, 3).unwrap();
        assert_eq!(b.next(&HashSet::from([1000])).unwrap(), 1002);
        assert_eq!(b.next(&HashSet::from([1000])).unwrap(), 1001);
        assert!(b.next(&HashSet::from([1000, 1001, 1002])).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
