//! The P1 baselines: a process sandbox's isolation set up without the
//! daemon, each timed from spawn to the point it is set up.
//!
//! - [`Baseline::ByHand`]: `unshare --pid --mount --uts --ipc --net --fork
//!   --propagation private -- sh by_hand.sh STATE / NAME`, the root of
//!   `stacyvmd sandbox-init` built step for step with util-linux commands
//!   (see `by_hand.sh`); timed to its `ready` line. This is the target's
//!   baseline.
//! - [`Baseline::InitDirect`]: the daemon's own launch command (`setsid
//!   --fork unshare ... -- stacyvmd sandbox-init ...`) run from here, with
//!   no daemon, HTTP or database around it; timed to its `ready` line.
//! - [`Baseline::NamespacesOnly`]: `unshare ... -- true`, spawn to exit: the
//!   namespaces alone, the floor under both.
//!
//! Each sample gets a fresh state directory (`workspace/`, `tmp/`,
//! `rootfs/`), created inside the timed window as the daemon creates its
//! own; every process a sample started is gone when it returns.

use stacyvmd::providers::process::unshare_args;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/process/by_hand.sh");
/// The `host` image: the host's root.
const IMAGE: &str = "/";
/// How long a killed init may take to be gone.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    ByHand,
    InitDirect,
    NamespacesOnly,
}

/// Times one sample of `baseline` in a fresh directory under `scratch`.
/// `binary` is the stacyvmd binary (for [`Baseline::InitDirect`]).
pub fn sample(
    baseline: Baseline,
    binary: &Path,
    scratch: &Path,
    n: usize,
) -> Result<Duration, String> {
    let state = scratch.join(format!("by-hand-{n}"));
    let log = scratch.join(format!("by-hand-{n}.log"));
    let result = match baseline {
        Baseline::ByHand => by_hand(&state, &log, n),
        Baseline::InitDirect => init_direct(binary, &state, &log, n),
        Baseline::NamespacesOnly => namespaces_only(),
    };
    let _ = fs::remove_dir_all(&state);
    let _ = fs::remove_file(&log);
    result
}

/// The state directory as `ProcessProvider::start` makes it.
/// The namespaces a root daemon's sandbox starts with (cgroup and time
/// where the kernel has them), so the baseline does the same work.
fn daemon_namespaces() -> Vec<&'static str> {
    unshare_args(
        false,
        Path::new("/proc/self/ns/cgroup").exists(),
        Path::new("/proc/self/ns/time").exists(),
    )
}

fn make_state(state: &Path) -> Result<(), String> {
    let io = |what: &str, r: std::io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    io("creating the state dir", fs::create_dir(state))?;
    for (sub, mode) in [
        ("workspace", 0o755),
        ("tmp", 0o1777),
        ("rootfs", 0o755),
        ("disk", 0o755),
    ] {
        let dir = state.join(sub);
        io("creating a state subdir", fs::create_dir(&dir))?;
        io(
            "chmod",
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)),
        )?;
    }
    Ok(())
}

fn log_file(log: &Path) -> Result<fs::File, String> {
    fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))
}

/// Reads the first line of `child`'s stdout; it must be `ready`.
fn wait_ready(child: &mut std::process::Child, log: &Path, what: &str) -> Result<(), String> {
    let stdout = child.stdout.take().ok_or("stdout is not piped")?;
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim_end() == "ready" {
        return Ok(());
    }
    let _ = child.wait();
    Err(format!(
        "{what} did not report ready (got {line:?}); its stderr ends with:\n{}",
        super::daemon::tail(log, 10)
    ))
}

fn by_hand(state: &Path, log: &Path, n: usize) -> Result<Duration, String> {
    let started = Instant::now();
    make_state(state)?;
    let mut child = Command::new("unshare")
        .args(daemon_namespaces())
        .args(["--", "sh", SCRIPT])
        .arg(state)
        .args([IMAGE, &format!("by-hand-{n}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(log)?)
        .spawn()
        .map_err(|e| format!("starting unshare: {e}"))?;
    wait_ready(&mut child, log, "the by-hand script")?;
    let elapsed = started.elapsed();
    // The script exits after `ready`; its namespaces go with it.
    let status = child
        .wait()
        .map_err(|e| format!("waiting for unshare: {e}"))?;
    if !status.success() {
        return Err(format!(
            "the by-hand script failed after ready ({status}):\n{}",
            super::daemon::tail(log, 10)
        ));
    }
    Ok(elapsed)
}

fn init_direct(binary: &Path, state: &Path, log: &Path, n: usize) -> Result<Duration, String> {
    let started = Instant::now();
    make_state(state)?;
    let mut launcher = Command::new("setsid")
        .arg("--fork")
        .arg("unshare")
        .args(daemon_namespaces())
        .arg("--")
        .arg(binary)
        .arg("sandbox-init")
        .arg("--state")
        .arg(state)
        .args(["--image", IMAGE, "--hostname", &format!("by-hand-{n}")])
        .args([
            "--owner",
            "1999999999",
            "--tmpfs-mb",
            "1024",
            "--tmpfs-inodes",
            "65536",
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file(log)?)
        .spawn()
        .map_err(|e| format!("starting setsid/unshare: {e}"))?;
    let stdout = launcher.stdout.take().ok_or("stdout is not piped")?;
    let mut go = launcher.stdin.take().ok_or("stdin is not piped")?;
    let _ = launcher.wait();
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    let _ = stdout.read_line(&mut line);
    // As the daemon does: the init asks for its user namespace's id maps.
    if line.trim_end() == "userns" {
        use std::io::Write;
        let pid = fs::read_to_string(state.join("init.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["pid"].as_i64())
            .ok_or("no init.json")?;
        for file in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{file}"), "0 1999999999 1\n")
                .map_err(|e| format!("writing {file}: {e}"))?;
        }
        go.write_all(b"go\n").map_err(|e| format!("go: {e}"))?;
        line.clear();
        let _ = stdout.read_line(&mut line);
    }
    let elapsed = started.elapsed();
    // init.json is written before the root is built: kill the init (and its
    // namespace) whether or not it got as far as ready.
    let pid = fs::read_to_string(state.join("init.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v["pid"].as_i64())
        .and_then(|pid| i32::try_from(pid).ok());
    if let Some(pid) = pid {
        kill_and_wait(pid)?;
    }
    if line.trim_end() != "ready" {
        return Err(format!(
            "stacyvmd sandbox-init did not report ready (got {line:?}):\n{}",
            super::daemon::tail(log, 10)
        ));
    }
    Ok(elapsed)
}

/// SIGKILL to a sandbox init (PID 1 of its namespace: everything in it
/// dies), then waits on a pidfd until it is gone.
fn kill_and_wait(pid: i32) -> Result<(), String> {
    use rustix::event::{PollFd, PollFlags};
    use rustix::process::{Pid, PidfdFlags, Signal};
    let Some(pid) = Pid::from_raw(pid) else {
        return Ok(());
    };
    let Ok(pidfd) = rustix::process::pidfd_open(pid, PidfdFlags::empty()) else {
        return Ok(()); // already gone
    };
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL)
        .map_err(|e| format!("killing sandbox-init {pid:?}: {e}"))?;
    let timeout = rustix::time::Timespec {
        tv_sec: EXIT_DEADLINE.as_secs() as i64,
        tv_nsec: 0,
    };
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(format!("sandbox-init {pid:?} still runs after SIGKILL")),
    }
}

fn namespaces_only() -> Result<Duration, String> {
    let started = Instant::now();
    let status = Command::new("unshare")
        .args(daemon_namespaces())
        .args(["--", "true"])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running unshare: {e}"))?;
    let elapsed = started.elapsed();
    if !status.success() {
        return Err(format!("unshare ... -- true failed: {status}"));
    }
    Ok(elapsed)
}
