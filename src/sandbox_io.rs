//! Exec and files in a running sandbox, daemon side: builds the request
//! for the `sandbox-enter` helper (see `providers::process::enter`), runs
//! it, and turns its output into answers. HTTP-independent: the REST
//! handlers and any other caller share it.
//!
//! An exec is one helper process in its own process group. Its stdout and
//! stderr are pipes read by the calling thread with `poll`, together with a
//! pidfd of the helper, so one thread drives an exec with no extra
//! threads: output is captured (up to a cap) or streamed as it comes; at
//! the deadline the whole process group is killed. Once the command has
//! exited, output still in the pipes is drained for a short grace period;
//! then the pipes are closed, so a background process that keeps them
//! open cannot hold the request. The helper kills what the command left in
//! its process group (see `providers::process::enter`); a process meant to
//! outlive its exec (a server) must leave the group itself, with `setsid`.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use crate::providers::process::enter::Action;
use crate::providers::process::files::{FsOp, sandbox_path};
use crate::providers::process::{OpGuard, ProcessProvider};
use crate::providers::{EnterError, Provider};

/// Longest silence on a streamed exec before a keep-alive blank line.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long output is still read after the command exited.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// Longest environment variable name and value accepted.
const MAX_ENV_NAME: usize = 256;
const MAX_ENV_VALUE: usize = 128 * 1024;

/// A failure with the HTTP status and stable code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl OpError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> OpError {
        OpError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> OpError {
        OpError::new(400, "BAD_REQUEST", message)
    }

    fn internal(message: impl Into<String>) -> OpError {
        OpError::new(500, "INTERNAL_ERROR", message)
    }
}

impl From<EnterError> for OpError {
    fn from(e: EnterError) -> OpError {
        match e {
            EnterError::NotRunning(m) => OpError::new(409, "CONFLICT", m),
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
    fn push(&mut self, data: &[u8], cap: usize) {
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

/// Counts an operation against the sandbox's share, or refuses it.
fn begin(p: &ProcessProvider, sandbox_id: &str) -> Result<OpGuard, OpError> {
    p.begin_op(sandbox_id).ok_or_else(|| {
        OpError::new(
            429,
            "TOO_MANY_REQUESTS",
            format!(
                "sandbox {sandbox_id} already has {} execs and file operations in flight; try again when one has finished",
                p.config().max_ops_per_sandbox
            ),
        )
    })
}

/// The process provider behind a sandbox, or why there is none.
pub fn process_of(provider: &Arc<dyn Provider>) -> Result<&ProcessProvider, OpError> {
    provider.as_process().ok_or_else(|| {
        OpError::bad(format!(
            "provider {:?} does not run commands or hold files; use provider \"process\"",
            provider.name()
        ))
    })
}

/// Quotes `arg` for /bin/sh.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn check_text(field: &str, text: &str) -> Result<(), OpError> {
    if text.contains('\0') {
        return Err(OpError::bad(format!(
            "field `{field}` must not contain NUL bytes"
        )));
    }
    Ok(())
}

/// The argv, environment and working directory of an exec.
type Prepared = (Vec<String>, Vec<(String, String)>, String);

/// The argv, environment and working directory of an exec, validated.
fn prepare(p: &ProcessProvider, sandbox_id: &str, req: &ExecRequest) -> Result<Prepared, OpError> {
    check_text("command", &req.command)?;
    for a in &req.args {
        check_text("args", a)?;
    }
    if req.command.trim().is_empty() {
        return Err(OpError::bad("field `command` must not be empty"));
    }
    if req.background && req.stream {
        return Err(OpError::bad(
            "fields `background` and `stream` cannot both be true: a background command's output goes nowhere",
        ));
    }
    let argv = match req.mode {
        // StacyVM: args are appended to the command, each shell-quoted.
        ExecMode::Shell => {
            let mut line = req.command.clone();
            for a in &req.args {
                line.push(' ');
                line.push_str(&shell_quote(a));
            }
            vec!["/bin/sh".to_owned(), "-c".to_owned(), line]
        }
        ExecMode::Argv => std::iter::once(req.command.clone())
            .chain(req.args.iter().cloned())
            .collect(),
    };
    let mut env: BTreeMap<String, String> = p.base_env(sandbox_id).into_iter().collect();
    for (k, v) in &req.env {
        if k.is_empty()
            || k.len() > MAX_ENV_NAME
            || k.contains(['=', '\0'])
            || v.len() > MAX_ENV_VALUE
            || v.contains('\0')
        {
            return Err(OpError::bad(format!(
                "field `env`: {k:?} is not a valid variable (names 1 to {MAX_ENV_NAME} bytes without `=` or NUL, values up to {MAX_ENV_VALUE} bytes without NUL)"
            )));
        }
        env.insert(k.clone(), v.clone());
    }
    let workdir = match &req.workdir {
        Some(w) if !w.is_empty() => sandbox_path(w)
            .map_err(|e| OpError::bad(format!("field `workdir`: {e}")))?
            .to_string_lossy()
            .into_owned(),
        _ => crate::providers::process::files::WORKSPACE.to_owned(),
    };
    Ok((argv, env.into_iter().collect(), workdir))
}

fn poll_timeout(left: Duration) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: left.as_secs() as i64,
        tv_nsec: i64::from(left.subsec_nanos()),
    }
}

/// How long a helper told to stop has to kill and reap its command.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Asks the exec helper to kill its command's process group (SIGTERM; the
/// helper kills with SIGKILL and reaps, see `enter::exec`).
fn ask_to_stop(helper: &Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(helper.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Stops the helper and waits for it, bounded: SIGTERM, then SIGKILL if it
/// has not exited by the deadline (its command may then be left to the
/// sandbox's init; logged).
fn stop_helper(helper: &mut Child) {
    ask_to_stop(helper);
    let exited = rustix::process::Pid::from_raw(helper.id() as i32)
        .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok())
        .is_some_and(|pidfd| {
            let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
            matches!(rustix::event::poll(&mut fds, Some(&poll_timeout(STOP_DEADLINE))), Ok(n) if n > 0)
        });
    if !exited {
        log::warn!(
            "exec helper {} did not stop within {STOP_DEADLINE:?}; killing it",
            helper.id()
        );
        let _ = helper.kill();
    }
}

/// Checks an exec request before anything runs, so that a streamed exec
/// can still answer with an error status: its timeout and everything
/// `prepare` checks. Whether the sandbox runs is checked by the caller
/// (and again, at no extra cost, when the helper command is built).
pub fn validate(p: &ProcessProvider, sandbox_id: &str, req: &ExecRequest) -> Result<(), OpError> {
    checked(p, sandbox_id, req).map(|_| ())
}

/// The request's timeout, checked, and its prepared argv, env and workdir.
fn checked(
    p: &ProcessProvider,
    sandbox_id: &str,
    req: &ExecRequest,
) -> Result<(Duration, Prepared), OpError> {
    let config = p.config();
    let timeout = req.timeout.unwrap_or(config.exec_timeout);
    if timeout.is_zero() || timeout > config.max_exec_timeout {
        return Err(OpError::bad(format!(
            "field `timeout` must be positive and at most {}",
            crate::time::format_duration(config.max_exec_timeout)
        )));
    }
    Ok((timeout, prepare(p, sandbox_id, req)?))
}

/// Runs a command in the sandbox. Timeouts are not errors here: the
/// outcome says `timed_out`, and the caller answers 408 or ends the stream.
pub fn exec(
    p: &ProcessProvider,
    sandbox_id: &str,
    req: &ExecRequest,
    sink: Sink<'_>,
) -> Result<ExecOutcome, OpError> {
    let io = &crate::metrics::METRICS.sandbox_io;
    let result = run_exec(p, sandbox_id, req, sink);
    match &result {
        Ok(o) if o.timed_out => io.execs_timed_out.inc(),
        Ok(o) if o.abandoned => io.execs_abandoned.inc(),
        Ok(_) => io.execs_completed.inc(),
        Err(_) => io.execs_failed.inc(),
    }
    result
}

fn run_exec(
    p: &ProcessProvider,
    sandbox_id: &str,
    req: &ExecRequest,
    mut sink: Sink<'_>,
) -> Result<ExecOutcome, OpError> {
    let config = p.config();
    let (timeout, (argv, env, workdir)) = checked(p, sandbox_id, req)?;
    let _op = begin(p, sandbox_id)?;
    let action = Action::Exec {
        argv,
        env,
        workdir,
        background: req.background,
    };
    let started = Instant::now();
    let deadline = started + timeout;
    let mut child = p.helper(sandbox_id, action, Stdio::piped(), Stdio::piped())?;
    // The spec was all it had to read.
    drop(child.stdin.take());
    let result = drive(&mut child, deadline, config.exec_output_bytes, &mut sink);
    // An exec owns its process group: the helper kills what the command
    // left in it and waits until it is gone before it exits, so nothing an
    // exec started outlives it unless it detached on purpose (`setsid`).
    // A client gone away, or a failure here, stops the command now.
    if result.as_ref().map_or(true, |o| o.abandoned) {
        stop_helper(&mut child);
    }
    let status = child
        .wait()
        .map_err(|e| OpError::internal(format!("waiting for the exec helper: {e}")))?;
    let mut outcome = result?;
    outcome.duration = started.elapsed();
    outcome.timeout = timeout;
    outcome.exit_code = if outcome.timed_out {
        124
    } else {
        use std::os::unix::process::ExitStatusExt;
        status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1)
    };
    Ok(outcome)
}

/// The poll loop of one exec; see the module doc.
fn drive(
    child: &mut Child,
    deadline: Instant,
    cap: usize,
    sink: &mut Sink<'_>,
) -> Result<ExecOutcome, OpError> {
    let mut outcome = ExecOutcome {
        exit_code: 0,
        timed_out: false,
        abandoned: false,
        duration: Duration::ZERO,
        timeout: Duration::ZERO,
        stdout: Captured::default(),
        stderr: Captured::default(),
    };
    let pid = rustix::process::Pid::from_raw(child.id() as i32)
        .ok_or_else(|| OpError::internal("helper has no pid"))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| OpError::internal(format!("pidfd_open: {e}")))?;
    // Both pipes as plain files, so one loop reads either.
    let mut out = child
        .stdout
        .take()
        .map(|o| std::fs::File::from(std::os::fd::OwnedFd::from(o)));
    let mut err = child
        .stderr
        .take()
        .map(|e| std::fs::File::from(std::os::fd::OwnedFd::from(e)));
    let mut exited_at: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    let mut last_sent = Instant::now();
    let streaming = matches!(sink, Sink::Stream(_));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if out.is_none() && err.is_none() && exited_at.is_some() {
            break;
        }
        let now = Instant::now();
        let until = match exited_at {
            Some(at) => at + DRAIN_GRACE,
            None if outcome.timed_out => killed_at.unwrap_or(now) + STOP_DEADLINE,
            None => deadline,
        };
        let Some(left) = until.checked_duration_since(now) else {
            if exited_at.is_some() {
                break; // grace over: close the pipes
            }
            if !outcome.timed_out {
                outcome.timed_out = true;
                killed_at = Some(now);
                ask_to_stop(child);
                continue;
            }
            return Err(OpError::internal(
                "the exec helper did not stop its timed-out command",
            ));
        };
        let mut fds = Vec::with_capacity(3);
        fds.push(PollFd::new(&pidfd, PollFlags::IN));
        if let Some(o) = &out {
            fds.push(PollFd::new(o, PollFlags::IN));
        }
        if let Some(e) = &err {
            fds.push(PollFd::new(e, PollFlags::IN));
        }
        // A streamed exec that prints nothing still writes a blank line
        // every KEEPALIVE: a client that went away is noticed (and its
        // command stopped) within about that, and a client's read timeout
        // does not fire on a quiet command.
        let left = if streaming {
            left.min(KEEPALIVE.saturating_sub(now - last_sent))
        } else {
            left
        };
        match rustix::event::poll(&mut fds, Some(&poll_timeout(left))) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(OpError::internal(format!("poll: {e}"))),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if let Sink::Stream(write) = sink
            && last_sent.elapsed() >= KEEPALIVE
        {
            if write(Stream::Stdout, &[]).is_err() {
                outcome.abandoned = true;
                return Ok(outcome);
            }
            last_sent = Instant::now();
        }
        let mut i = 1;
        for (pipe, stream) in [(&mut out, Stream::Stdout), (&mut err, Stream::Stderr)] {
            let Some(reader) = pipe else {
                continue;
            };
            let is_ready = ready[i];
            i += 1;
            if !is_ready {
                continue;
            }
            match reader.read(&mut buf) {
                Ok(0) => *pipe = None,
                Ok(n) => {
                    let data = &buf[..n];
                    match sink {
                        Sink::Capture => match stream {
                            Stream::Stdout => outcome.stdout.push(data, cap),
                            Stream::Stderr => outcome.stderr.push(data, cap),
                        },
                        Sink::Stream(write) => {
                            if write(stream, data).is_err() {
                                outcome.abandoned = true;
                                return Ok(outcome);
                            }
                            last_sent = Instant::now();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => *pipe = None,
            }
        }
        if ready[0] && exited_at.is_none() {
            exited_at = Some(Instant::now());
        }
    }
    Ok(outcome)
}

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
        408,
        "TIMEOUT",
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
    #[derive(serde::Deserialize)]
    struct Report {
        status: u16,
        code: String,
        message: String,
    }
    match serde_json::from_str::<Report>(last) {
        Ok(r) => {
            let code = match r.code.as_str() {
                "BAD_REQUEST" => "BAD_REQUEST",
                "NOT_FOUND" => "NOT_FOUND",
                "FORBIDDEN" => "FORBIDDEN",
                "CONFLICT" => "CONFLICT",
                "PAYLOAD_TOO_LARGE" => "PAYLOAD_TOO_LARGE",
                "NOT_A_REGULAR_FILE" => "NOT_A_REGULAR_FILE",
                _ => "INTERNAL_ERROR",
            };
            OpError::new(r.status, code, r.message)
        }
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

/// Writes NDJSON lines of a streamed exec, keeping a partial UTF-8
/// character for the next piece of the same stream.
#[derive(Default)]
pub struct NdjsonLines {
    carry: [Vec<u8>; 2],
}

impl NdjsonLines {
    /// Writes one piece of output; an empty piece is a keep-alive, sent as
    /// a blank line (NDJSON readers skip blank lines).
    pub fn chunk(&mut self, out: &mut dyn Write, stream: Stream, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            out.write_all(b"\n")?;
            return out.flush();
        }
        let carry = &mut self.carry[stream as usize];
        carry.extend_from_slice(data);
        let valid = match std::str::from_utf8(carry) {
            Ok(_) => carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => carry.len(), // invalid bytes: sent as replacement characters
        };
        if valid == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&carry[..valid]).into_owned();
        carry.drain(..valid);
        line(out, stream.as_str(), &text)
    }

    /// Flushes what is left of both streams, then the exit line.
    pub fn finish(&mut self, out: &mut dyn Write, outcome: &ExecOutcome) -> io::Result<()> {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if !self.carry[i].is_empty() {
                let text = String::from_utf8_lossy(&self.carry[i]).into_owned();
                self.carry[i].clear();
                line(out, stream.as_str(), &text)?;
            }
        }
        if outcome.timed_out {
            line(
                out,
                "stderr",
                &format!(
                    "stacyvmd: command timed out after {}; its process group was killed\n",
                    crate::time::format_duration(outcome.timeout)
                ),
            )?;
        }
        let exit = serde_json::json!({
            "stream": "exit",
            "data": outcome.exit_code.to_string(),
            "timed_out": outcome.timed_out,
            "duration": crate::time::format_duration(outcome.duration),
        });
        emit(out, &exit)
    }

    /// Ends a stream that could not run its command.
    pub fn fail(&mut self, out: &mut dyn Write, e: &OpError) -> io::Result<()> {
        line(
            out,
            "stderr",
            &format!("stacyvmd: {} ({})\n", e.message, e.code),
        )?;
        emit(
            out,
            &serde_json::json!({"stream": "exit", "data": "-1", "error": e.code}),
        )
    }
}

/// One NDJSON line in one write, then a flush: each line reaches the
/// client as soon as it is produced.
fn line(out: &mut dyn Write, stream: &str, data: &str) -> io::Result<()> {
    emit(out, &serde_json::json!({"stream": stream, "data": data}))
}

fn emit(out: &mut dyn Write, value: &serde_json::Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_round_trips_through_sh() {
        for arg in ["plain", "a b", "it's", "$HOME", "", "a\"b", "*", "x;y"] {
            let out = std::process::Command::new("/bin/sh")
                .args(["-c", &format!("printf %s {}", shell_quote(arg))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), arg, "{arg:?}");
        }
    }

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

    #[test]
    fn ndjson_keeps_split_characters_whole() {
        let mut lines = NdjsonLines::default();
        let mut out = Vec::new();
        let e_acute = "é".as_bytes();
        lines
            .chunk(&mut out, Stream::Stdout, &[b'a', e_acute[0]])
            .unwrap();
        lines
            .chunk(&mut out, Stream::Stdout, &[e_acute[1], b'b'])
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let data: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["data"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(data.concat(), "aéb");
        assert!(!data.iter().any(|d| d.contains('\u{fffd}')));
    }
}
