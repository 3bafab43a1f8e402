//! Exec in a running process sandbox, daemon side: builds the request for
//! the `sandbox-enter` helper (see `super::enter`), runs it, and turns its
//! output into an outcome. Transport-neutral: reached through the
//! `Provider` trait by the worker role.
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
use std::io::{self, Read};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::enter::Action;
use super::files::sandbox_path;
use super::{OpGuard, ProcessProvider};
use crate::worker::ops::{
    Captured, ExecMode, ExecOutcome, ExecRequest, OpError, OpErrorKind, Sink, Stream,
};

/// Longest silence on a streamed exec before a keep-alive blank line.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long output is still read after the command exited.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// Longest environment variable name and value accepted.
const MAX_ENV_NAME: usize = 256;
const MAX_ENV_VALUE: usize = 128 * 1024;

/// Counts an operation against the sandbox's share, or refuses it.
pub(super) fn begin(p: &ProcessProvider, sandbox_id: &str) -> Result<OpGuard, OpError> {
    p.begin_op(sandbox_id).ok_or_else(|| {
        OpError::new(
            OpErrorKind::TooMany,
            format!(
                "sandbox {sandbox_id} already has {} execs and file operations in flight; try again when one has finished",
                p.config().max_ops_per_sandbox
            ),
        )
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

pub(super) fn poll_timeout(left: Duration) -> rustix::time::Timespec {
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
pub(super) fn stop_helper(helper: &mut Child) {
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
pub(super) fn drive(
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
}
