//! Integration-test harness: starts the real `stacyvmd` binary and talks
//! HTTP/1.1 to it over plain `TcpStream`s.
//!
//! Every daemon gets its own temp dir (data dir, config file, working
//! directory) and listens on `127.0.0.1:0`; the real address comes from the
//! readiness line on stdout, read by a thread and received with a deadline.
//! Nothing here sleeps to wait for the daemon: exits and asynchronous state
//! changes are polled with a deadline. When a test panics, the daemon's
//! stderr, its stdout and the temp dir path are printed.

mod daemon_env;

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use daemon_env::DAEMON_ENV;
use serde_json::Value;

/// How long a daemon may take from exec to its readiness line.
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after SIGTERM or SIGKILL.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(20);
/// Read/write timeout of test HTTP connections: a hung daemon fails the
/// test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stacyvmd")
}

/// Path of a file in the repository (contrib/, man/, ...).
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A `Command` for the binary with the daemon's environment cleared.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    for key in DAEMON_ENV {
        cmd.env_remove(key);
    }
    cmd
}

/// Runs the binary to completion (stdin closed) with a deadline.
pub fn run(cmd: &mut Command) -> Finished {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn stacyvmd");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let status = wait_with_deadline(&mut child, EXIT_DEADLINE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not exit within {EXIT_DEADLINE:?}");
    });
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::Builder::new()
        .name("test-drain".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
        .expect("spawn drain thread")
}

/// Result of a process that ran to its end.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// stdout and stderr together, for "the message says X" checks.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl fmt::Display for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status: {}\n----- stdout -----\n{}\n----- stderr -----\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `check` until it returns true; panics with `what` at the deadline.
pub fn poll_until(deadline: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if check() {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Temp dirs

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, removed on drop unless the
/// test failed (then its path is printed so it can be inspected).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), tag)
    }

    /// Like `new`, under `parent` (for a data dir that must not be under
    /// /tmp, e.g. because sandboxes get their own /tmp).
    pub fn new_in(parent: &Path, tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .subsec_nanos();
        let path = parent.join(format!(
            "stacyvmd-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept temp dir {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Turns: the tests that load every CPU run alone

/// All integration tests share one process, so a test that fills the CPUs
/// for seconds (the fork bomb in `process_sandboxes`) or times the daemon's
/// answers (`front_door`, `transport`) would starve, or be starved by,
/// whatever runs beside it, in any module. Every daemon holds a shared turn
/// while it lives; such a test takes [`Turn::alone`] first, which waits
/// until nothing else holds a turn. Daemons that test's thread starts while
/// it holds the turn take none of their own.
///
/// A count under a mutex rather than an `RwLock`: one thread may hold
/// several shared turns at once (a daemon and its reaper, a daemon being
/// restarted), which a read lock does not allow when a writer waits.
pub struct Turn {
    kind: TurnKind,
}

enum TurnKind {
    Shared,
    Alone,
    /// Taken on the thread that holds the alone turn: counts nothing.
    Inside,
}

struct Turns {
    shared: usize,
    alone: bool,
}

static TURNS: Mutex<Turns> = Mutex::new(Turns {
    shared: 0,
    alone: false,
});
static TURNS_CHANGED: Condvar = Condvar::new();

thread_local! {
    static ALONE_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn turns() -> std::sync::MutexGuard<'static, Turns> {
    TURNS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Turn {
    /// Runs beside any other shared turn; waits while a test runs alone.
    pub fn shared() -> Turn {
        if ALONE_HERE.get() {
            return Turn {
                kind: TurnKind::Inside,
            };
        }
        let mut turns = turns();
        while turns.alone {
            turns = TURNS_CHANGED.wait(turns).unwrap_or_else(|e| e.into_inner());
        }
        turns.shared += 1;
        Turn {
            kind: TurnKind::Shared,
        }
    }

    /// Waits until nothing else holds a turn, then holds everyone off.
    pub fn alone() -> Turn {
        assert!(!ALONE_HERE.get(), "Turn::alone taken twice on one thread");
        let mut turns = turns();
        while turns.alone || turns.shared > 0 {
            turns = TURNS_CHANGED.wait(turns).unwrap_or_else(|e| e.into_inner());
        }
        turns.alone = true;
        ALONE_HERE.set(true);
        Turn {
            kind: TurnKind::Alone,
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut turns = turns();
        match self.kind {
            TurnKind::Shared => turns.shared -= 1,
            TurnKind::Alone => {
                turns.alone = false;
                ALONE_HERE.set(false);
            }
            TurnKind::Inside => return,
        }
        TURNS_CHANGED.notify_all();
    }
}

// ---------------------------------------------------------------------------
// Daemon

/// How to start a daemon; kept so `restart` can start the same one again.
#[derive(Clone, Debug)]
pub struct DaemonBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    config: Option<String>,
    listen: Option<String>,
    data_dir: bool,
    dir: Option<Arc<TempDir>>,
    uid: Option<u32>,
    /// A program (and its arguments) that execs the daemon, e.g. `prlimit`.
    wrapper: Vec<String>,
}

impl DaemonBuilder {
    /// Runs the daemon as this uid (and gid of the same number): a rootless
    /// daemon, for tests run as root.
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Writes `text` to `<tempdir>/stacyvmd.toml` and passes `--config` to it.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_string());
        self
    }

    /// Replaces `--listen 127.0.0.1:0`; `None` passes no `--listen` at all.
    pub fn listen(mut self, addr: Option<&str>) -> Self {
        self.listen = addr.map(str::to_string);
        self
    }

    /// Do not pass `--data-dir` (the daemon's default or env decides).
    pub fn no_data_dir(mut self) -> Self {
        self.data_dir = false;
        self
    }

    /// Runs the daemon through `program args... <stacyvmd> ...`; the program
    /// must exec it (as `prlimit --nofile=N:N --` does), so the pid is the
    /// daemon's.
    pub fn wrapper(mut self, program_and_args: &[&str]) -> Self {
        self.wrapper = program_and_args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Use this temp dir instead of a fresh one.
    pub fn dir(mut self, dir: Arc<TempDir>) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Starts the daemon and waits for its readiness line; panics (printing
    /// stderr) if it exits or does not become ready in time.
    pub fn start(self) -> Daemon {
        match self.try_start() {
            Ok(daemon) => daemon,
            Err(finished) => panic!("stacyvmd exited before it was ready\n{finished}"),
        }
    }

    /// Like `start`, but a daemon that exits before it is ready is returned
    /// as `Err` so tests can check refusals.
    pub fn try_start(mut self) -> Result<Daemon, Finished> {
        let turn = Turn::shared();
        let dir = self
            .dir
            .get_or_insert_with(|| Arc::new(TempDir::new("daemon")))
            .clone();
        let mut cmd = match self.wrapper.split_first() {
            None => command(),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                for key in DAEMON_ENV {
                    cmd.env_remove(key);
                }
                cmd.args(args).arg(bin());
                cmd
            }
        };
        cmd.current_dir(dir.path());
        if let Some(text) = &self.config {
            let path = dir.join("stacyvmd.toml");
            if !path.exists() {
                std::fs::write(&path, text).expect("write config");
            }
            cmd.arg("--config").arg(&path);
        }
        if let Some(listen) = &self.listen {
            cmd.args(["--listen", listen]);
        }
        if self.data_dir {
            cmd.arg("--data-dir").arg(dir.join("data"));
        }
        cmd.args(&self.args).arg("serve");
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn stacyvmd");

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_thread = {
            let sink = stderr.clone();
            let mut pipe = child.stderr.take().expect("stderr");
            thread::Builder::new()
                .name("test-stderr".into())
                .spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        match pipe.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .expect("spawn stderr reader")
        };
        let (line_tx, stdout_rx) = mpsc::channel();
        {
            let pipe = child.stdout.take().expect("stdout");
            thread::Builder::new()
                .name("test-stdout".into())
                .spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        match line {
                            Ok(line) => {
                                if line_tx.send(line).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawn stdout reader");
        }

        let mut daemon = Daemon {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_addr: String::new(),
            worker_id: String::new(),
            db: PathBuf::new(),
            ready_line: String::new(),
            early_stdout: Vec::new(),
            stdout_rx,
            stderr,
            stderr_thread: Some(stderr_thread),
            exit: None,
            dir,
            builder: self,
            _turn: turn,
        };
        let end = Instant::now() + START_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match daemon.stdout_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(ready) = line.strip_prefix("stacyvmd ready ") {
                        daemon.ready_line = line.clone();
                        daemon.parse_ready(ready);
                        return Ok(daemon);
                    }
                    daemon.early_stdout.push(line);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process is exiting.
                    let status = daemon.wait_exit(EXIT_DEADLINE);
                    return Err(Finished {
                        status,
                        stdout: daemon.early_stdout.join("\n"),
                        stderr: daemon.stderr_text(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stacyvmd printed no readiness line within {START_DEADLINE:?}");
                }
            }
        }
    }
}

/// A running (or stopped) `stacyvmd serve`.
pub struct Daemon {
    child: Child,
    /// Where a client connects (an unspecified listen address maps to loopback).
    pub addr: SocketAddr,
    /// The `http=` value exactly as printed.
    pub listen_addr: String,
    pub worker_id: String,
    pub db: PathBuf,
    pub ready_line: String,
    early_stdout: Vec<String>,
    stdout_rx: Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
    exit: Option<ExitStatus>,
    dir: Arc<TempDir>,
    builder: DaemonBuilder,
    /// Held while the daemon lives; see [`Turn`].
    _turn: Turn,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            args: Vec::new(),
            env: Vec::new(),
            config: None,
            listen: Some("127.0.0.1:0".to_string()),
            data_dir: true,
            dir: None,
            uid: None,
            wrapper: Vec::new(),
        }
    }

    /// A daemon with default settings.
    pub fn start() -> Daemon {
        Daemon::builder().start()
    }

    fn parse_ready(&mut self, fields: &str) {
        for field in fields.split_whitespace() {
            match field.split_once('=') {
                Some(("http", value)) => {
                    self.listen_addr = value.to_string();
                    let mut addr: SocketAddr = value
                        .parse()
                        .unwrap_or_else(|e| panic!("bad http= in readiness line {value:?}: {e}"));
                    if addr.ip().is_unspecified() {
                        addr.set_ip(match addr.ip() {
                            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                        });
                    }
                    self.addr = addr;
                }
                Some(("worker_id", value)) => self.worker_id = value.to_string(),
                Some(("db", value)) => self.db = PathBuf::from(value),
                _ => {}
            }
        }
        assert!(
            !self.listen_addr.is_empty(),
            "readiness line without http=: {:?}",
            self.ready_line
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Arc<TempDir> {
        &self.dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("stacyvmd.toml")
    }

    /// Rewrites the config file (in place, so `--config` keeps pointing at it).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("rewrite config");
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Stdout lines after the readiness line (only complete once exited).
    pub fn stdout_after_ready(&self) -> Vec<String> {
        let mut lines = self.early_stdout.clone();
        lines.extend(self.stdout_rx.try_iter());
        lines
    }

    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exit = Some(status);
                false
            }
            None => true,
        }
    }

    /// Sends a signal by name ("TERM", "HUP", ...) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(EXIT_DEADLINE)
    }

    /// SIGKILL (kill -9) and wait for the exit.
    pub fn kill9(&mut self) -> ExitStatus {
        if self.exit.is_none() {
            let _ = self.child.kill();
        }
        self.wait_exit(EXIT_DEADLINE)
    }

    /// Waits for the process to exit; panics (printing stderr) at the deadline.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let status = match wait_with_deadline(&mut self.child, deadline) {
            Some(status) => status,
            None => panic!(
                "stacyvmd (pid {}) did not exit within {deadline:?}",
                self.pid()
            ),
        };
        self.exit = Some(status);
        if let Some(handle) = self.stderr_thread.take() {
            let _ = handle.join();
        }
        status
    }

    /// Starts the same daemon again on the same temp dir (data dir and
    /// config file); the old one must have exited.
    pub fn restart(mut self) -> Daemon {
        assert!(
            !self.is_running(),
            "restart of a daemon that is still running"
        );
        self.builder.clone().dir(self.dir.clone()).start()
    }

    /// Like `restart`, but returns the failure instead of panicking.
    pub fn try_restart(mut self) -> Result<Daemon, Finished> {
        assert!(
            !self.is_running(),
            "restart of a daemon that is still running"
        );
        self.builder.clone().dir(self.dir.clone()).try_start()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// One request on a fresh connection.
    pub fn send(&self, req: &Request) -> Response {
        self.client()
            .send(req)
            .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.path))
    }

    pub fn get(&self, path: &str) -> Response {
        self.send(&Request::get(path))
    }

    /// Admin heartbeat with a JSON body (no auth headers).
    pub fn heartbeat(&self, id: &str, body: &Value) -> Response {
        self.send(&Request::post(&format!("/api/v1/admin/workers/{id}/heartbeat")).json(body))
    }

    /// `GET /api/v1/workers` as a JSON array (asserts 200).
    pub fn workers(&self) -> Vec<Value> {
        let resp = self.get("/api/v1/workers");
        assert_status(&resp, 200);
        match resp.json() {
            Value::Array(items) => items,
            other => panic!("GET /api/v1/workers is not an array: {other}"),
        }
    }

    pub fn worker_ids(&self) -> Vec<String> {
        ids(&self.workers())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Some(handle) = self.stderr_thread.take() {
                let _ = handle.join();
            }
        }
        if thread::panicking() {
            eprintln!(
                "----- stacyvmd pid {} ({}) stderr -----\n{}\n----- stdout after readiness -----\n{}\n----- end -----",
                self.child.id(),
                self.ready_line,
                self.stderr_text(),
                self.stdout_after_ready().join("\n"),
            );
        }
    }
}

/// The `id` of each worker object, in order.
pub fn ids(workers: &[Value]) -> Vec<String> {
    workers
        .iter()
        .map(|w| {
            w["id"]
                .as_str()
                .unwrap_or_else(|| panic!("worker without string id: {w}"))
                .to_string()
        })
        .collect()
}

pub fn id_set(workers: &[Value]) -> BTreeSet<String> {
    ids(workers).into_iter().collect()
}

// ---------------------------------------------------------------------------
// HTTP client

/// A request; serialised in one buffer and written with one `write_all`.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn post(path: &str) -> Request {
        Request::new("POST", path)
    }

    pub fn delete(path: &str) -> Request {
        Request::new("DELETE", path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = Some(body.into());
        self
    }

    pub fn json(self, value: &Value) -> Request {
        self.header("Content-Type", "application/json")
            .body(value.to_string())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: stacyvmd-test\r\n",
            self.method, self.path
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = self.body.as_deref().unwrap_or_default();
        let explicit_length = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("Content-Length"));
        let wants_length =
            self.body.is_some() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH");
        if wants_length && !explicit_length {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "HTTP {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {value}")?;
        }
        write!(f, "\n{}", self.text())
    }
}

#[track_caller]
pub fn assert_status(resp: &Response, status: u16) {
    assert_eq!(resp.status, status, "unexpected status; response:\n{resp}");
}

/// Asserts an error response `{"code","message"}` with this status and code;
/// returns the message.
#[track_caller]
pub fn assert_error(resp: &Response, status: u16, code: &str) -> String {
    assert_status(resp, status);
    let body = resp.json();
    assert_eq!(body["code"], code, "error code; response:\n{resp}");
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error without string message; response:\n{resp}"));
    assert!(
        !message.is_empty(),
        "empty error message; response:\n{resp}"
    );
    message.to_string()
}

/// True when `field` appears in `message` as a whole word (words are runs of
/// letters, digits and `_`), so "id" does not match "invalid".
pub fn names_field(message: &str, field: &str) -> bool {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word.eq_ignore_ascii_case(field))
}

/// A blocking HTTP/1.1 client on one keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    /// A client on a stream the test connected itself (e.g. from another
    /// source address).
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).expect("set_nodelay");
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set_read_timeout");
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .expect("set_write_timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream()
            .set_read_timeout(Some(timeout))
            .expect("set_read_timeout");
    }

    /// Sends a request and reads its response.
    pub fn send(&mut self, req: &Request) -> io::Result<Response> {
        self.write_raw(&req.to_bytes())?;
        self.read_response()
    }

    /// `send` that panics on I/O errors.
    pub fn request(&mut self, req: &Request) -> Response {
        self.send(req)
            .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.path))
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request(&Request::get(path))
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut stream = self.reader.get_ref();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// Reads one response (skipping 1xx interim responses).
    pub fn read_response(&mut self) -> io::Result<Response> {
        loop {
            let resp = self.read_one()?;
            if !(100..200).contains(&resp.status) {
                return Ok(resp);
            }
        }
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let n = self.reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    fn read_one(&mut self) -> io::Result<Response> {
        let status_line = self.read_line()?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let status = match status {
            Some(status) if version.starts_with("HTTP/1.") => status,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                ));
            }
        };
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad header {line:?}"))
            })?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let chunked = resp
            .header("Transfer-Encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = resp.header("Content-Length").map(|v| {
            v.parse::<usize>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))
        });
        if chunked {
            resp.body = self.read_chunked()?;
        } else if let Some(length) = length {
            let mut body = vec![0; length?];
            self.reader.read_exact(&mut body)?;
            resp.body = body;
        } else if !((100..200).contains(&status) || status == 204 || status == 304) {
            self.reader.read_to_end(&mut resp.body)?;
        }
        Ok(resp)
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                // Trailers, then the blank line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            self.reader.read_exact(&mut body[start..])?;
            self.read_line()?;
        }
    }
}

// ---------------------------------------------------------------------------
// Time

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp
/// (`2026-05-09T10:30:00Z`, optionally with a fraction); panics otherwise.
pub fn rfc3339_millis(text: &str) -> i64 {
    let bad = || panic!("not an RFC 3339 UTC timestamp: {text:?}");
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || bytes[10] != b'T' {
        bad();
    }
    if bytes[13] != b':' || bytes[16] != b':' || !text.ends_with('Z') {
        bad();
    }
    let num = |range: std::ops::Range<usize>| -> i64 {
        text[range]
            .parse::<i64>()
            .unwrap_or_else(|_| panic!("not an RFC 3339 UTC timestamp: {text:?}"))
    };
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    let (hour, minute, second) = (num(11..13), num(14..16), num(17..19));
    let fraction = &text[19..text.len() - 1];
    let millis = if fraction.is_empty() {
        0
    } else {
        let digits = fraction.strip_prefix('.').unwrap_or_else(bad);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            bad();
        }
        format!("{digits:0<3}")[..3].parse::<i64>().unwrap()
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        bad();
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}
