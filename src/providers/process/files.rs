//! File operations, run by the `sandbox-enter` helper inside a sandbox as
//! the sandbox's user (see [`super::enter`]), so paths resolve exactly as
//! the sandbox sees them and permissions are its own.
//!
//! Protocol with the daemon (see `super::file_io`):
//! - success: exit 0; stdout carries the answer: for `Read`, a line
//!   `ok <size>` and then exactly `<size>` bytes; for every other operation
//!   one JSON document;
//! - failure: exit 1; the last line of stderr is
//!   `{"status":N,"code":"...","message":"..."}`.
//!
//! Paths are checked again here (the daemon checks them first): absolute
//! after joining onto `/workspace`, no `..`, no NUL.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum FsOp {
    Read {
        path: String,
    },
    /// Content comes on stdin.
    Write {
        path: String,
        mode: Option<u32>,
    },
    List {
        path: String,
    },
    Stat {
        path: String,
    },
    Delete {
        path: String,
        recursive: bool,
    },
    Move {
        from: String,
        to: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Glob {
        pattern: String,
    },
}

/// Where relative paths start, and a sandbox's working directory.
pub const WORKSPACE: &str = "/workspace";
/// Most paths a glob returns.
pub const MAX_GLOB_RESULTS: usize = 10_000;
/// Longest path accepted.
pub const MAX_PATH: usize = 4096;

/// Normalises a sandbox path: relative paths are under `/workspace`; `..`,
/// NUL bytes and over-long paths are refused. Pure, shared with the daemon.
pub fn sandbox_path(raw: &str) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("path must not be empty".into());
    }
    if raw.len() > MAX_PATH {
        return Err(format!("path is longer than {MAX_PATH} bytes"));
    }
    if raw.contains('\0') {
        return Err("path must not contain NUL bytes".into());
    }
    let joined = if raw.starts_with('/') {
        PathBuf::from(raw)
    } else {
        Path::new(WORKSPACE).join(raw)
    };
    let mut out = PathBuf::from("/");
    for part in joined.components() {
        match part {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir => {
                return Err(format!("path {raw:?} must not contain `..`"));
            }
            Component::Prefix(_) => return Err(format!("path {raw:?} is not a Unix path")),
        }
    }
    Ok(out)
}

pub fn report_error(status: u16, code: &str, message: &str) {
    eprintln!(
        "{}",
        json!({"status": status, "code": code, "message": message})
    );
}

struct OpError {
    status: u16,
    code: &'static str,
    message: String,
}

fn bad(message: impl Into<String>) -> OpError {
    OpError {
        status: 400,
        code: "BAD_REQUEST",
        message: message.into(),
    }
}

/// Maps an I/O error on `path` to a status and a stable code.
fn io_error(path: &Path, e: io::Error) -> OpError {
    use io::ErrorKind as K;
    let p = path.display();
    use rustix::io::Errno;
    let (status, code, what) = match Errno::from_io_error(&e) {
        Some(Errno::NOENT) => (404, "NOT_FOUND", "no such file or directory".to_owned()),
        Some(Errno::ROFS) => (
            400,
            "BAD_REQUEST",
            "read-only: only /workspace and /tmp are writable".to_owned(),
        ),
        Some(Errno::FBIG) => (
            413,
            "PAYLOAD_TOO_LARGE",
            "file is larger than the sandbox's file size limit".to_owned(),
        ),
        Some(Errno::NOSPC | Errno::DQUOT) => (413, "PAYLOAD_TOO_LARGE", "no space left".to_owned()),
        Some(Errno::LOOP) => (
            400,
            "BAD_REQUEST",
            "too many levels of symbolic links".to_owned(),
        ),
        Some(Errno::NXIO) => (
            400,
            "NOT_A_REGULAR_FILE",
            "is a FIFO or device without a reader: only regular files are written".to_owned(),
        ),
        Some(Errno::BUSY) => (
            400,
            "BAD_REQUEST",
            "is a mount point of the sandbox".to_owned(),
        ),
        _ => match e.kind() {
            K::PermissionDenied => (403, "FORBIDDEN", "permission denied".to_owned()),
            K::AlreadyExists => (409, "CONFLICT", "already exists".to_owned()),
            K::NotADirectory | K::IsADirectory | K::DirectoryNotEmpty | K::InvalidInput => {
                (400, "BAD_REQUEST", e.to_string())
            }
            _ => (500, "INTERNAL_ERROR", e.to_string()),
        },
    };
    OpError {
        status,
        code,
        message: format!("{p}: {what}"),
    }
}

/// Runs `op`; returns the exit code.
pub fn run(op: &FsOp) -> i32 {
    let mut stdout = io::stdout().lock();
    match apply(op, &mut stdout).and_then(|()| {
        stdout
            .flush()
            .map_err(|e| io_error(Path::new("<stdout>"), e))
    }) {
        Ok(()) => 0,
        Err(e) => {
            report_error(e.status, e.code, &e.message);
            1
        }
    }
}

fn path_of(raw: &str) -> Result<PathBuf, OpError> {
    sandbox_path(raw).map_err(bad)
}

fn apply(op: &FsOp, out: &mut dyn Write) -> Result<(), OpError> {
    let emit = |out: &mut dyn Write, value: serde_json::Value| {
        serde_json::to_writer(&mut *out, &value)
            .map_err(|e| io_error(Path::new("<stdout>"), io::Error::other(e)))
    };
    match op {
        FsOp::Read { path } => {
            let path = path_of(path)?;
            // Non-blocking open: a FIFO with no writer must not hang the
            // helper (and with it a daemon thread); fstat then refuses
            // anything but a regular file.
            let mut file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            let meta = file.metadata().map_err(|e| io_error(&path, e))?;
            regular(&path, &meta)?;
            let size = meta.len();
            writeln!(out, "ok {size}").map_err(|e| io_error(&path, e))?;
            let copied =
                io::copy(&mut (&mut file).take(size), out).map_err(|e| io_error(&path, e))?;
            // A file that shrank while being read: pad, so the announced
            // length holds (the daemon already sent it as Content-Length).
            if copied < size {
                io::copy(&mut io::repeat(0).take(size - copied), out)
                    .map_err(|e| io_error(&path, e))?;
            }
            Ok(())
        }
        FsOp::Write { path, mode } => {
            let path = path_of(path)?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
            }
            let mode = mode.unwrap_or(0o644);
            // Checked before truncating: O_NONBLOCK makes opening a FIFO
            // without a reader fail (ENXIO) instead of waiting, and one
            // with a reader is refused by fstat.
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .mode(mode)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            let meta = file.metadata().map_err(|e| io_error(&path, e))?;
            regular(&path, &meta)?;
            file.set_len(0).map_err(|e| io_error(&path, e))?;
            let written =
                io::copy(&mut io::stdin().lock(), &mut file).map_err(|e| io_error(&path, e))?;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| io_error(&path, e))?;
            file.sync_all().map_err(|e| io_error(&path, e))?;
            emit(
                out,
                json!({"status": "written", "path": path, "size": written}),
            )
        }
        FsOp::List { path } => {
            let path = path_of(path)?;
            let meta = fs::metadata(&path).map_err(|e| io_error(&path, e))?;
            if !meta.is_dir() {
                return Err(bad(format!("{} is not a directory", path.display())));
            }
            let mut items = Vec::new();
            for entry in fs::read_dir(&path).map_err(|e| io_error(&path, e))? {
                let entry = entry.map_err(|e| io_error(&path, e))?;
                let child = path.join(entry.file_name());
                // Entries that vanish while listing are skipped.
                if let Ok(meta) = fs::symlink_metadata(&child) {
                    items.push(info(&child, &meta));
                }
            }
            items.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
            emit(out, serde_json::Value::Array(items))
        }
        FsOp::Stat { path } => {
            let path = path_of(path)?;
            let meta = fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
            emit(out, info(&path, &meta))
        }
        FsOp::Delete { path, recursive } => {
            let path = path_of(path)?;
            if path == Path::new("/") {
                return Err(bad("cannot delete the sandbox's root"));
            }
            let meta = fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
            let result = if meta.is_dir() {
                if *recursive {
                    // std's remove_dir_all does not follow symlinks.
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_dir(&path)
                }
            } else {
                fs::remove_file(&path)
            };
            result.map_err(|e| io_error(&path, e))?;
            emit(out, json!({"status": "deleted", "path": path}))
        }
        FsOp::Move { from, to } => {
            let (from, to) = (path_of(from)?, path_of(to)?);
            fs::symlink_metadata(&from).map_err(|e| io_error(&from, e))?;
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
            }
            match fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                    // /tmp and /workspace are separate mounts: copy a file
                    // across, then remove the original.
                    if fs::symlink_metadata(&from).is_ok_and(|m| m.is_file()) {
                        fs::copy(&from, &to).map_err(|e| io_error(&to, e))?;
                        fs::remove_file(&from).map_err(|e| io_error(&from, e))?;
                    } else {
                        return Err(bad("only files can be moved between /workspace and /tmp"));
                    }
                }
                Err(e) => return Err(io_error(&from, e)),
            }
            emit(
                out,
                json!({"status": "moved", "old_path": from, "new_path": to}),
            )
        }
        FsOp::Chmod { path, mode } => {
            let path = path_of(path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                .map_err(|e| io_error(&path, e))?;
            emit(out, json!({"status": "chmod applied", "path": path}))
        }
        FsOp::Glob { pattern } => {
            let pattern = path_of(pattern)?;
            let parts: Vec<String> = pattern
                .components()
                .filter_map(|c| match c {
                    Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            let mut found = Vec::new();
            glob_walk(Path::new("/"), &parts, &mut found);
            found.sort();
            found.dedup();
            emit(out, json!(found))
        }
    }
}

/// Refuses anything but a regular file for reading or writing: FIFOs,
/// sockets and devices block, never end, or reach outside the sandbox.
fn regular(path: &Path, meta: &fs::Metadata) -> Result<(), OpError> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        return Err(bad(format!("{} is a directory", path.display())));
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(OpError {
        status: 400,
        code: "NOT_A_REGULAR_FILE",
        message: format!(
            "{} is {what}: only regular files are read and written",
            path.display()
        ),
    })
}

/// The file object of the list and stat answers.
fn info(path: &Path, meta: &fs::Metadata) -> serde_json::Value {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let mod_time = crate::time::rfc3339(meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000);
    json!({
        "name": name,
        "path": path,
        "size": meta.len(),
        "mode": format!("{:04o}", meta.mode() & 0o7777),
        "is_dir": meta.is_dir(),
        "is_symlink": meta.file_type().is_symlink(),
        "mod_time": mod_time,
    })
}

/// Matches the remaining pattern components under `dir`. `**` matches
/// zero or more directories; symlinked directories are not descended.
fn glob_walk(dir: &Path, parts: &[String], found: &mut Vec<String>) {
    if found.len() >= MAX_GLOB_RESULTS {
        return;
    }
    let Some((first, rest)) = parts.split_first() else {
        found.push(dir.to_string_lossy().into_owned());
        return;
    };
    if first == "**" {
        glob_walk(dir, rest, found);
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                glob_walk(&entry.path(), parts, found);
            }
        }
        return;
    }
    if !first.contains(['*', '?', '[']) {
        let next = dir.join(first);
        if fs::symlink_metadata(&next).is_ok() {
            glob_walk(&next, rest, found);
        }
        return;
    }
    let mut names: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let text = name.to_string_lossy();
        // Like shells: a leading dot must be matched explicitly.
        if text.starts_with('.') && !first.starts_with('.') {
            continue;
        }
        if wildcard(first.as_bytes(), text.as_bytes()) {
            let next = dir.join(&name);
            if rest.is_empty() || fs::metadata(&next).is_ok_and(|m| m.is_dir()) {
                glob_walk(&next, rest, found);
            }
        }
    }
}

/// Shell wildcard match of one path component: `*`, `?`, `[abc]`,
/// `[a-z]`, `[!x]`.
pub fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&pattern[p..], text[t]) {
                        if matched {
                            p += next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == b'[' {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class at the start of `pattern` (`[...]`);
/// returns (matched, length of the class), or `None` if unterminated.
fn class(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pattern.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pattern.len() {
        if pattern[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            if pattern[i] <= c && c <= pattern[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if pattern[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_confined() {
        assert_eq!(
            sandbox_path("a/b").unwrap(),
            PathBuf::from("/workspace/a/b")
        );
        assert_eq!(sandbox_path("/tmp/./x").unwrap(), PathBuf::from("/tmp/x"));
        assert_eq!(sandbox_path("/").unwrap(), PathBuf::from("/"));
        for bad in [
            "",
            "../etc",
            "/workspace/../../etc/passwd",
            "a/../../b",
            "a\0b",
        ] {
            assert!(sandbox_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(sandbox_path(&"a".repeat(MAX_PATH + 1)).is_err());
    }

    #[test]
    fn wildcards() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.txt", "a.txt", true),
            ("*.txt", "a.txt.bak", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[ab]x", "bx", true),
            ("[!ab]x", "bx", false),
            ("[a-c]1", "c1", true),
            ("[a-c]1", "d1", false),
            ("*", "", true),
            ("x*y*z", "xaaybbz", true),
            ("x*y*z", "xaayb", false),
            ("[", "[", true),
        ];
        for (p, t, want) in cases {
            assert_eq!(wildcard(p.as_bytes(), t.as_bytes()), *want, "{p} vs {t}");
        }
    }

    proptest::proptest! {
        #[test]
        fn wildcard_never_panics(p in "[a-c*?\\[\\]!-]{0,12}", t in "[a-c\\[\\]-]{0,12}") {
            let _ = wildcard(p.as_bytes(), t.as_bytes());
        }

        #[test]
        fn literal_patterns_match_only_themselves(t in "[a-z.]{1,12}", u in "[a-z.]{1,12}") {
            proptest::prop_assert!(wildcard(t.as_bytes(), t.as_bytes()));
            proptest::prop_assert_eq!(wildcard(t.as_bytes(), u.as_bytes()), t == u);
        }

        #[test]
        fn confined_paths_never_climb(raw in "[a-z./]{0,40}") {
            if let Ok(p) = sandbox_path(&raw) {
                proptest::prop_assert!(p.is_absolute());
                proptest::prop_assert!(!p.components().any(|c| c == Component::ParentDir));
            }
        }
    }
}
