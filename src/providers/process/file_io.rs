//! File operations in a running process sandbox, daemon side: one
//! `sandbox-enter` helper per operation (see `super::files` for the helper
//! side), its answer read with deadlines so a stuck helper cannot hold the
//! calling thread.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::enter::Action;
use super::exec_io::{begin, drive, poll_timeout};
use super::files::FsOp;
use super::{OpGuard, ProcessProvider};
use crate::worker::ops::{FileStream, OpError, OpErrorKind, Sink};

/// Starts the helper for a file operation, with stdout and stderr piped
/// and its stdin left open when it reads content.
fn fs_helper(
    p: &ProcessProvider,
    sandbox_id: &str,
    op: FsOp,
    stdin: bool,
) -> Result<Child, OpError> {
    let mut child = p.helper(sandbox_id, Action::Fs(op), Stdio::piped(), Stdio::piped())?;
    if !stdin {
        drop(child.stdin.take());
    }
    Ok(child)
}

/// The 408 of a file helper that made no progress for `idle` (and was
/// killed).
fn stalled(what: &str, idle: Duration) -> OpError {
    OpError::new(
        OpErrorKind::Timeout,
        format!(
            "the file helper {what} within {}; it was killed",
            crate::time::format_duration(idle)
        ),
    )
}

/// Copies `input` into the helper's stdin; a helper that reads nothing for
/// `idle` is killed (its stdin is non-blocking and every wait for room in
/// the pipe is bounded).
fn feed(
    child: &mut Child,
    mut stdin: std::process::ChildStdin,
    input: &mut dyn Read,
    idle: Duration,
) -> Result<(), OpError> {
    rustix::fs::fcntl_setfl(&stdin, rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| OpError::internal(format!("file helper stdin: {e}")))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(OpError::bad(format!("reading the request body: {e}"))),
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match stdin.write(rest) {
                Ok(k) => rest = &rest[k..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(&stdin, PollFlags::OUT)];
                    match rustix::event::poll(&mut fds, Some(&poll_timeout(idle))) {
                        Ok(0) => {
                            let _ = child.kill();
                            return Err(stalled("took no content", idle));
                        }
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => return Err(OpError::internal(format!("poll: {e}"))),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A helper that failed early closes its end: its report
                // says why.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => {
                    return Err(OpError::internal(format!(
                        "writing to the file helper: {e}"
                    )));
                }
            }
        }
    }
}

/// The helper's error report: the last line of its stderr.
fn helper_error(stderr: &[u8]) -> OpError {
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().last().unwrap_or("");
    // The report also carries a status; it is not read (the helper runs
    // inside the sandbox: the status follows from the code, here).
    #[derive(serde::Deserialize)]
    struct Report {
        code: String,
        message: String,
    }
    match serde_json::from_str::<Report>(last) {
        Ok(r) => OpError::new(OpErrorKind::from_helper_code(&r.code), r.message),
        Err(_) => OpError::internal(format!("file helper failed: {}", text.trim())),
    }
}

/// Runs a file operation whose answer is one JSON document; `input`, if
/// any, is copied to the helper's stdin (a file's new content).
pub fn file_op(
    p: &ProcessProvider,
    sandbox_id: &str,
    op: FsOp,
    input: Option<&mut dyn Read>,
) -> Result<Vec<u8>, OpError> {
    counted(run_file_op(p, sandbox_id, op, input))
}

fn counted<T>(result: Result<T, OpError>) -> Result<T, OpError> {
    let io = &crate::metrics::METRICS.sandbox_io;
    io.file_ops.inc();
    if result.is_err() {
        io.file_op_errors.inc();
    }
    result
}

/// Most bytes a file operation's JSON answer may have (a glob of
/// `MAX_GLOB_RESULTS` long paths stays well below).
const MAX_ANSWER_BYTES: usize = 64 << 20;

fn run_file_op(
    p: &ProcessProvider,
    sandbox_id: &str,
    op: FsOp,
    input: Option<&mut dyn Read>,
) -> Result<Vec<u8>, OpError> {
    let _op = begin(p, sandbox_id)?;
    let idle = p.config().file_timeout;
    let mut child = fs_helper(p, sandbox_id, op, input.is_some())?;
    let fed = match (input, child.stdin.take()) {
        (Some(input), Some(stdin)) => feed(&mut child, stdin, input, idle),
        _ => Ok(()),
    };
    let outcome = match fed {
        Ok(()) => drive(
            &mut child,
            Instant::now() + idle,
            MAX_ANSWER_BYTES,
            &mut Sink::Capture,
        ),
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| OpError::internal(format!("waiting for the file helper: {e}")))?;
    let outcome = outcome?;
    if outcome.timed_out {
        return Err(stalled("did not finish", idle));
    }
    if !status.success() {
        return Err(helper_error(&outcome.stderr.bytes));
    }
    if outcome.stdout.truncated() {
        return Err(OpError::internal("the file helper's answer is too large"));
    }
    Ok(outcome.stdout.bytes)
}

/// A file being read out of a sandbox: `len` bytes to come from the
/// helper's stdout. Dropping it ends the helper.
pub struct FileReader {
    _op: OpGuard,
    child: Child,
    reader: io::Take<BufReader<std::process::ChildStdout>>,
    pub len: u64,
}

impl FileStream for FileReader {
    fn byte_len(&self) -> u64 {
        self.len
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read_file(p: &ProcessProvider, sandbox_id: &str, path: &str) -> Result<FileReader, OpError> {
    counted(open_file(p, sandbox_id, path))
}

fn open_file(p: &ProcessProvider, sandbox_id: &str, path: &str) -> Result<FileReader, OpError> {
    let op_guard = begin(p, sandbox_id)?;
    let op = FsOp::Read {
        path: path.to_owned(),
    };
    let mut child = fs_helper(p, sandbox_id, op, false)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| OpError::internal("file helper has no stdout"))?;
    // The header comes within the file timeout, or the helper is killed:
    // a helper stuck before its answer cannot hold this thread.
    let idle = p.config().file_timeout;
    let mut fds = [PollFd::new(&stdout, PollFlags::IN)];
    if !matches!(rustix::event::poll(&mut fds, Some(&poll_timeout(idle))), Ok(n) if n > 0) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(stalled("did not answer", idle));
    }
    let mut reader = BufReader::new(stdout);
    // One bounded header line: a misbehaving helper cannot make the daemon
    // buffer without end.
    let mut head = String::new();
    let _ = (&mut reader).take(64).read_line(&mut head);
    if let Some(len) = head
        .strip_prefix("ok ")
        .and_then(|n| n.trim_end().parse::<u64>().ok())
    {
        return Ok(FileReader {
            _op: op_guard,
            child,
            reader: reader.take(len),
            len,
        });
    }
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let _ = child.wait();
    Err(helper_error(&stderr))
}
