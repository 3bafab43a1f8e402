//! The daemon under test: the release binary started on 127.0.0.1:0 with a
//! fresh data dir, its address read from the readiness line, stopped with
//! SIGTERM. Its stderr goes to a file that is shown when startup fails.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const READY_PREFIX: &str = "stacyvmd ready ";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longer than the daemon's default `shutdown_timeout` (20 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// Environment that would change the daemon's configuration under us.
const DAEMON_ENVIRONMENT: [&str; 7] = [
    "STACYVMD_CONFIG",
    "STACYVMD_LISTEN",
    "STACYVMD_DATA_DIR",
    "STACYVMD_LOG_LEVEL",
    "STACYVMD_WORKER_ID",
    "STACYVMD_API_KEYS",
    "STACYVMD_ADMIN_API_KEYS",
];

pub struct Daemon {
    pub pid: u32,
    pub addr: SocketAddr,
    scratch: PathBuf,
    exited: Receiver<ExitStatus>,
    exit_status: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `binary serve` and waits for its readiness line.
    pub fn start(binary: &Path) -> Result<Daemon, String> {
        let scratch = std::env::temp_dir().join(format!("stacyvmd-loadgen-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        let data_dir = scratch.join("data");
        fs::create_dir_all(&data_dir)
            .map_err(|error| format!("creating {}: {error}", data_dir.display()))?;
        let stderr_path = scratch.join("stderr.log");
        let stderr = fs::File::create(&stderr_path)
            .map_err(|error| format!("creating {}: {error}", stderr_path.display()))?;

        let mut command = Command::new(binary);
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "warn",
                "--data-dir",
            ])
            .arg(&data_dir)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for variable in DAEMON_ENVIRONMENT {
            command.env_remove(variable);
        }
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
                    if line_sender.send(line).is_err() {
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
            scratch,
            exited,
            exit_status: None,
        };
        match wait_for_readiness(&lines) {
            Ok(addr) => {
                daemon.addr = addr;
                // Keep draining stdout so the daemon can never block on it.
                thread::Builder::new()
                    .name("daemon-stdout-drain".into())
                    .spawn(move || {
                        for line in lines {
                            eprintln!("daemon stdout: {line}");
                        }
                    })
                    .map_err(|error| format!("spawning the stdout drain: {error}"))?;
                Ok(daemon)
            }
            Err(problem) => {
                let status = daemon.kill();
                let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
                let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!(
                    "{} did not become ready: {problem} (exit: {}); its stderr ends with:\n{}",
                    binary.display(),
                    status.map_or_else(|| "unknown".to_owned(), |status| status.to_string()),
                    tail.join("\n"),
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
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

/// Reads stdout lines until the readiness line and returns its `http=` address.
fn wait_for_readiness(lines: &Receiver<String>) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut other_output = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => match line.strip_prefix(READY_PREFIX) {
                Some(fields) => return parse_http_field(fields),
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

fn parse_http_field(fields: &str) -> Result<SocketAddr, String> {
    fields
        .split_whitespace()
        .find_map(|field| field.strip_prefix("http="))
        .ok_or_else(|| format!("readiness line without http=: {fields:?}"))?
        .parse()
        .map_err(|error| format!("readiness line http= address: {error}"))
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
