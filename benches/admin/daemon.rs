//! The daemon under test: the release binary with a fresh data dir, its HTTP
//! address and admin socket read from the readiness line, stopped with
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
const STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// Environment that would change the daemon's configuration under us.
const DAEMON_ENVIRONMENT: [&str; 8] = [
    "STACYVMD_CONFIG",
    "STACYVMD_LISTEN",
    "STACYVMD_DATA_DIR",
    "STACYVMD_LOG_LEVEL",
    "STACYVMD_WORKER_ID",
    "STACYVMD_API_KEYS",
    "STACYVMD_ADMIN_API_KEYS",
    "RUNTIME_DIRECTORY",
];

pub struct Daemon {
    pub pid: u32,
    pub http: SocketAddr,
    pub admin: PathBuf,
    scratch: PathBuf,
    exited: Receiver<ExitStatus>,
    exit_status: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `binary serve` in `scratch` and waits for its readiness line.
    pub fn start(binary: &Path, scratch: &Path) -> Result<Daemon, String> {
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
            .current_dir(scratch)
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
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: PathBuf::new(),
            scratch: scratch.to_owned(),
            exited,
            exit_status: None,
        };
        match wait_for_readiness(&lines) {
            Ok((http, admin)) => {
                daemon.http = http;
                daemon.admin = admin;
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
                Err(format!(
                    "{} did not become ready: {problem} (exit: {}); stderr:\n{stderr}",
                    binary.display(),
                    status.map_or_else(|| "unknown".to_owned(), |s| s.to_string()),
                ))
            }
        }
    }

    /// SIGTERM and wait for the exit; SIGKILL if it does not come.
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

    fn kill(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
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
        let _ = fs::remove_dir_all(self.scratch.join("data"));
    }
}

fn wait_for_readiness(lines: &Receiver<String>) -> Result<(SocketAddr, PathBuf), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => {
                if let Some(fields) = line.strip_prefix(READY_PREFIX) {
                    let field = |name: &str| {
                        fields
                            .split_whitespace()
                            .find_map(|f| f.strip_prefix(name))
                            .ok_or_else(|| format!("readiness line without {name}: {fields:?}"))
                    };
                    let http = field("http=")?
                        .parse()
                        .map_err(|error| format!("readiness line http=: {error}"))?;
                    return Ok((http, PathBuf::from(field("admin=")?)));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no readiness line within {STARTUP_TIMEOUT:?}"));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err("stdout closed without a readiness line".to_owned());
            }
        }
    }
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
