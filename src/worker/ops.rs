//! What a worker is asked to do inside a running sandbox (run a command,
//! operate on files) and why that failed: transport-neutral types shared
//! by the providers that implement them and the edges that carry them.
//! An [`OpError`] names its kind and stable code; each edge maps the kind
//! to its own status (HTTP in `crate::http::io_handlers`).

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use crate::providers::EnterError;

pub use crate::providers::process::files::FsOp;

/// What kind of failure an operation in a sandbox had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpErrorKind {
    /// The request is malformed or names something the sandbox refuses.
    BadRequest,
    NotFound,
    Forbidden,
    /// The sandbox is not running, or the target exists.
    Conflict,
    /// The content is over a limit (size, space).
    TooLarge,
    /// A write to something that is not a regular file (a FIFO, a device).
    NotARegularFile,
    /// The sandbox has as many operations in flight as it may.
    TooMany,
    /// The helper made no progress within its deadline.
    Timeout,
    /// The sandbox's provider does not run commands or hold files.
    Unsupported,
    Internal,
}

impl OpErrorKind {
    /// The stable code clients see.
    pub fn code(self) -> &'static str {
        match self {
            OpErrorKind::BadRequest | OpErrorKind::Unsupported => "BAD_REQUEST",
            OpErrorKind::NotFound => "NOT_FOUND",
            OpErrorKind::Forbidden => "FORBIDDEN",
            OpErrorKind::Conflict => "CONFLICT",
            OpErrorKind::TooLarge => "PAYLOAD_TOO_LARGE",
            OpErrorKind::NotARegularFile => "NOT_A_REGULAR_FILE",
            OpErrorKind::TooMany => "TOO_MANY_REQUESTS",
            OpErrorKind::Timeout => "TIMEOUT",
            OpErrorKind::Internal => "INTERNAL_ERROR",
        }
    }

    /// The kind a file helper's reported code stands for. The helper runs
    /// inside the sandbox: only its code is read, from a fixed list, never
    /// a status of its choosing.
    pub fn from_helper_code(code: &str) -> OpErrorKind {
        match code {
            "BAD_REQUEST" => OpErrorKind::BadRequest,
            "NOT_FOUND" => OpErrorKind::NotFound,
            "FORBIDDEN" => OpErrorKind::Forbidden,
            "CONFLICT" => OpErrorKind::Conflict,
            "PAYLOAD_TOO_LARGE" => OpErrorKind::TooLarge,
            "NOT_A_REGULAR_FILE" => OpErrorKind::NotARegularFile,
            _ => OpErrorKind::Internal,
        }
    }
}

/// Why an operation in a sandbox failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: OpErrorKind,
    pub message: String,
}

impl OpError {
    pub fn new(kind: OpErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }

    pub fn code(&self) -> &'static str {
        self.kind.code()
    }

    pub(crate) fn bad(message: impl Into<String>) -> OpError {
        OpError::new(OpErrorKind::BadRequest, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> OpError {
        OpError::new(OpErrorKind::Internal, message)
    }
}

impl From<EnterError> for OpError {
    fn from(e: EnterError) -> OpError {
        match e {
            EnterError::NotRunning(m) => OpError::new(OpErrorKind::Conflict, m),
            EnterError::Failed(m) => OpError::internal(m),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    Shell,
    Argv,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExecRequest {
    pub command: String,
    pub args: Vec<String>,
    pub mode: ExecMode,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout: Option<Duration>,
    pub stream: bool,
    /// Leave the command running after the exec returns (see
    /// `providers::process::confine::confine_command`).
    pub background: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Output kept for a non-streamed exec: the first `cap` bytes, and how
/// many there were in all.
#[derive(Debug, Default)]
pub struct Captured {
    pub bytes: Vec<u8>,
    pub total: u64,
}

impl Captured {
    pub(crate) fn push(&mut self, data: &[u8], cap: usize) {
        self.total += data.len() as u64;
        let room = cap.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }

    /// The text, with a marker when output was cut.
    pub fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.truncated() {
            text.push_str(&format!(
                "\n[stacyvmd: output truncated: {} of {} bytes kept]\n",
                self.bytes.len(),
                self.total
            ));
        }
        text
    }
}

#[derive(Debug)]
pub struct ExecOutcome {
    pub exit_code: i32,
    pub timed_out: bool,
    /// The client went away (stream mode): the command was killed.
    pub abandoned: bool,
    pub duration: Duration,
    pub timeout: Duration,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// Where output goes: `Capture` keeps it for the answer, `Stream` hands
/// each piece to a writer as it comes (an error there ends the exec).
pub enum Sink<'a> {
    Capture,
    Stream(&'a mut dyn FnMut(Stream, &[u8]) -> io::Result<()>),
}

/// A file being read out of a sandbox: its length, then its bytes.
pub trait FileStream: io::Read + Send {
    /// How many bytes the file has (the Content-Length of the answer).
    fn byte_len(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_a_prefix_and_marks_the_cut() {
        let mut c = Captured::default();
        c.push(b"hello ", 8);
        c.push(b"world", 8);
        assert_eq!(c.bytes, b"hello wo");
        assert!(c.truncated());
        assert!(
            c.text()
                .starts_with("hello wo\n[stacyvmd: output truncated: 8 of 11")
        );
        let mut whole = Captured::default();
        whole.push(b"ok", 8);
        assert_eq!(whole.text(), "ok");
    }
}
