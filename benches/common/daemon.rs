//! The daemon under test, shared by every bench program: the release binary
//! started with the arguments the bench chooses, its `http=` address (and
//! `admin=` socket, when present) read from the readiness line, exec to
//! readiness timed, stopped with SIGTERM. Stderr goes to a file whose tail is
//! shown when startup fails. The caller owns the data and scratch dirs.

// Each bench program includes this file and uses part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const READY_PREFIX: &str = "stacyvmd ready ";
/// Generous: START in the fleet bench opens a database of 100,000 sandboxes.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longer than the daemon's default `shutdown_timeout` (20 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment that would change the daemon's configuration under us:
/// the same list the integration tests clear.
#[path = "../../tests/it/common/daemon_env.rs"]
mod daemon_env;
use daemon_env::DAEMON_ENV;

/// The arguments for a default daemon on 127.0.0.1:0 with `data_dir`.
pub fn local_args(data_dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "warn",
        "--data-dir",
    ]
    .map(OsString::from)
    .into();
    args.push(data_dir.into());
    args.push("serve".into());
    args
}

pub struct Daemon {
    pub pid: u32,
    pub addr: SocketAddr,
    /// The admin socket from the readiness line, if the daemon has one.
    pub admin: Option<PathBuf>,
    /// From `Command::spawn` to the readiness line on stdout.
    pub startup: Duration,
    exited: Receiver<ExitStatus>,
    exit_status: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `binary args…` (in `cwd`, if given) and waits for readiness.
    pub fn start(
        binary: &Path,
        args: &[OsString],
        cwd: Option<&Path>,
        stderr_path: &Path,
    ) -> Result<Daemon, String> {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr_path)
            .map_err(|error| format!("opening {}: {error}", stderr_path.display()))?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if let Some(dir) = cwd {
            command.current_dir(dir);
        }
        for variable in DAEMON_ENV {
            command.env_remove(variable);
        }
        let exec = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|error| format!("starting {}: {error}", binary.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");

        let (line_sender, lines) = mpsc::channel();
        thread::Builder::new()
            .name("daemon-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line_sender.send((line, Instant::now())).is_err() {
                        return;
                    }
                }
            })
            .map_err(|error| format!("spawning the stdout reader: {error}"))?;
        let (exit_sender, exited) = mpsc::channel();
        thread::Builder::new()
            .name("daemon-wait".into())
            .spawn(move || {
                if let Ok(status) = child.wait() {
                    let _ = exit_sender.send(status);
                }
            })
            .map_err(|error| format!("spawning the exit waiter: {error}"))?;

        let mut daemon = Daemon {
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            startup: Duration::ZERO,
            exited,
            exit_status: None,
        };
        match wait_for_readiness(&lines) {
            Ok((fields, at)) => {
                daemon.addr = field(&fields, "http=")?
                    .parse()
                    .map_err(|error| format!("readiness line http= address: {error}"))?;
                daemon.admin = field(&fields, "admin=").ok().map(PathBuf::from);
                daemon.startup = at.saturating_duration_since(exec);
                // Keep draining stdout so the daemon can never block on it.
                thread::Builder::new()
                    .name("daemon-stdout-drain".into())
                    .spawn(move || {
                        for (line, _) in lines {
                            eprintln!("daemon stdout: {line}");
                        }
                    })
                    .map_err(|error| format!("spawning the stdout drain: {error}"))?;
                Ok(daemon)
            }
            Err(problem) => {
                let status = daemon.kill();
                Err(format!(
                    "{} did not become ready: {problem} (exit: {}); its stderr ends with:\n{}",
                    binary.display(),
                    status.map_or_else(|| "unknown".to_owned(), |status| status.to_string()),
                    tail(stderr_path, 20),
                ))
            }
        }
    }

    /// Resident set size from `/proc/<pid>/status`, in bytes.
    pub fn rss_bytes(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.pid);
        let status =
            fs::read_to_string(&path).map_err(|error| format!("reading {path}: {error}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .ok_or_else(|| format!("no VmRSS line in {path}"))
    }

    /// User + system CPU time the daemon used so far (from /proc/<pid>/stat).
    pub fn cpu_time(&self) -> Result<Duration, String> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = fs::read_to_string(&path).map_err(|error| format!("reading {path}: {error}"))?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 (1-based), in clock ticks (100 per second on Linux).
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| format!("unexpected {path}"))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |index: usize| -> Result<u64, String> {
            fields
                .get(index)
                .and_then(|field| field.parse().ok())
                .ok_or_else(|| format!("unexpected {path}"))
        };
        // `after` starts at field 3 (state), so field n is at index n - 3.
        let total = ticks(14 - 3)? + ticks(15 - 3)?;
        Ok(Duration::from_millis(total * 10))
    }

    /// Sends SIGTERM and waits for a clean exit; SIGKILL if it does not come.
    pub fn stop(mut self) -> Result<ExitStatus, String> {
        signal(self.pid, "-TERM")?;
        match self.exited.recv_timeout(STOP_TIMEOUT) {
            Ok(status) => {
                self.exit_status = Some(status);
                Ok(status)
            }
            Err(_) => {
                self.kill();
                Err(format!(
                    "the daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed"
                ))
            }
        }
    }

    /// SIGKILL unless it already exited; returns the exit status if it came.
    fn kill(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            // It may be exiting on its own (stdout just closed): give it a
            // moment before signalling a pid that might be gone.
            self.exit_status = self.exited.recv_timeout(Duration::from_millis(500)).ok();
        }
        if self.exit_status.is_none() {
            let _ = signal(self.pid, "-KILL");
            self.exit_status = self.exited.recv_timeout(Duration::from_secs(5)).ok();
        }
        self.exit_status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Reads stdout lines until the readiness line; its fields and when it came.
fn wait_for_readiness(lines: &Receiver<(String, Instant)>) -> Result<(String, Instant), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut other_output = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok((line, at)) => match line.strip_prefix(READY_PREFIX) {
                Some(fields) => return Ok((fields.to_owned(), at)),
                None => other_output.push(line),
            },
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no readiness line within {STARTUP_TIMEOUT:?}"));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!(
                    "stdout closed without a readiness line (it printed {other_output:?})"
                ));
            }
        }
    }
}

/// The value of `name` (e.g. `http=`) in the readiness line's fields.
fn field<'a>(fields: &'a str, name: &str) -> Result<&'a str, String> {
    fields
        .split_whitespace()
        .find_map(|f| f.strip_prefix(name))
        .ok_or_else(|| format!("readiness line without {name}: {fields:?}"))
}

fn signal(pid: u32, signal: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .map_err(|error| format!("running kill {signal} {pid}: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {signal} {pid} failed: {status}"))
    }
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> Result<ScratchDir, String> {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .map_err(|error| format!("creating {}: {error}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One line about the machine for a report: cores, CPU model, kernel.
pub fn machine_description() -> String {
    let cores = thread::available_parallelism().map_or(0, |cores| cores.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {model}, Linux {}", kernel.trim())
}

/// What `<binary> --version` prints.
pub fn daemon_version(binary: &Path) -> Result<String, String> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|error| format!("running {} --version: {error}", binary.display()))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
