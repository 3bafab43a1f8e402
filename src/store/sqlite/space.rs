//! Disk space for the store: the reserve file, free-space figures, and
//! which SQLite failures mean "the disk is full".
//!
//! Used by the store thread only (and by `open` before it starts). The
//! reserve is a preallocated file next to the database (`<db>.reserve`).
//! When a commit fails because the filesystem is full, the store thread
//! deletes it: the space it held is what lets a WAL checkpoint copy the
//! WAL into the database (which may have to grow) and then truncate the
//! WAL, so that commits can resume as soon as anything is freed. The
//! reserve is made again once there is room for it twice over.

use std::io;
use std::path::{Path, PathBuf};

/// The preallocated reserve file. `bytes == 0` disables it.
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
    held: bool,
}

impl Reserve {
    pub fn new(db: &Path, bytes: u64) -> Reserve {
        let mut name = db.as_os_str().to_owned();
        name.push(".reserve");
        Reserve {
            path: PathBuf::from(name),
            bytes,
            held: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether the reserve is in place (always true when disabled).
    pub fn held(&self) -> bool {
        self.held || self.bytes == 0
    }

    /// Makes (or completes) the reserve file: `bytes` allocated on disk.
    /// On failure nothing half-made is kept.
    pub fn ensure(&mut self) -> io::Result<()> {
        if self.held() {
            return Ok(());
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.path)?;
        let allocated =
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.bytes)
                .map_err(io::Error::from)
                .or_else(|e| match e.raw_os_error() {
                    // A filesystem without fallocate: write the blocks out.
                    Some(code) if code == rustix::io::Errno::OPNOTSUPP.raw_os_error() => {
                        write_zeros(&file, self.bytes)
                    }
                    _ => Err(e),
                });
        match allocated {
            Ok(()) => {
                self.held = true;
                Ok(())
            }
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(&self.path);
                Err(e)
            }
        }
    }

    /// Gives the reserve's space back to the filesystem. Returns whether
    /// there was anything to give.
    pub fn release(&mut self) -> bool {
        if !self.held {
            return false;
        }
        self.held = false;
        match std::fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(e) => {
                log::error!("cannot remove the reserve {}: {e}", self.path.display());
                false
            }
        }
    }
}

fn write_zeros(file: &std::fs::File, bytes: u64) -> io::Result<()> {
    use std::io::Write;
    let block = vec![0u8; 64 * 1024];
    let mut left = bytes;
    let mut out = file;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.sync_all()
}

/// Bytes an unprivileged writer may still use on the filesystem holding
/// `path` (or its parent directory when it does not exist yet).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let probe = if path.exists() {
        path
    } else {
        path.parent().filter(|p| !p.as_os_str().is_empty())?
    };
    let st = rustix::fs::statvfs(probe).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Under this much free space an I/O error is taken as "disk full": SQLite
/// reports some ENOSPC cases (a failed WAL or shm extension) as a plain
/// I/O error.
const NEARLY_FULL: u64 = 1 << 20;

/// Whether `e` means the filesystem of `db` has no room for the write.
pub fn is_full(e: &rusqlite::Error, db: &Path) -> bool {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => true,
        Some(rusqlite::ErrorCode::SystemIoFailure) => {
            free_bytes(db).is_some_and(|free| free < NEARLY_FULL)
        }
        _ => false,
    }
}

/// "N bytes free" for messages, or that it could not be read.
pub fn describe_free(path: &Path) -> String {
    match free_bytes(path) {
        Some(n) => format!("{n} bytes free"),
        None => "free space unknown".into(),
    }
}
