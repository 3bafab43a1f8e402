//! `stacyvmd sandbox-enter <json>`: a short-lived helper that joins a
//! running sandbox and does one thing there, as the sandbox's own user
//! under the sandbox's limits: run a command, or one file operation.
//!
//! The daemon never joins a sandbox itself (setns needs a single-threaded
//! process, and the daemon's credentials must not touch sandbox paths).
//! The helper: opens a pidfd on the sandbox's init and checks its start
//! time (so a reused pid is never entered), joins the sandbox's cgroup when
//! there is one, sets its rlimits, enters all of the init's namespaces at
//! once (which also puts it at the sandbox's root), and then either spawns
//! the command as the sandbox's uid on the sandbox's CPUs (exec; the helper
//! itself stays on all CPUs, so a busy sandbox cannot starve it of the
//! turns it needs to stop the command) or pins itself, drops to that uid
//! and does the file operation itself (files). Paths are
//! therefore resolved exactly as the sandbox sees them: a symlink cannot
//! lead out of the sandbox's root, and permissions are the sandbox user's.
//!
//! Exec: the helper's process group is the daemon's handle on the command;
//! its exit code is the command's (128 + signal when killed). Files: see
//! [`super::files`] for the output protocol.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

use std::os::fd::AsFd;

use rustix::process::{Pid, PidfdFlags, Resource, Rlimit};
use rustix::thread::ThreadNameSpaceType;
use serde::{Deserialize, Serialize};

use super::files::FsOp;
use super::state::read_start_time;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnterSpec {
    pub pid: i32,
    pub start_time: u64,
    /// The sandbox user (root daemon); `None` when rootless.
    pub uid: Option<u32>,
    pub rootless: bool,
    pub max_processes: u32,
    pub max_open_files: u32,
    pub max_file_bytes: u64,
    /// `RLIMIT_AS`, when memory is not limited by a cgroup.
    pub address_space: Option<u64>,
    pub cpus: Vec<usize>,
    pub cgroup: Option<String>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Action {
    Exec { argv: Vec<String>, workdir: String },
    Fs(FsOp),
}

/// Exit code when the helper itself fails before the command runs.
pub const EXIT_ENTER_FAILED: i32 = 125;
/// Exit code when the command cannot be started (as shells do).
pub const EXIT_CANNOT_RUN: i32 = 127;

/// Runs the helper; returns the process exit code.
pub fn run(spec_json: &str) -> i32 {
    let spec: EnterSpec = match serde_json::from_str(spec_json) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stacyvmd sandbox-enter: bad spec: {e}");
            return EXIT_ENTER_FAILED;
        }
    };
    if let Err(e) = enter(&spec) {
        match &spec.action {
            Action::Fs(_) => super::files::report_error(500, "INTERNAL_ERROR", &e),
            Action::Exec { .. } => eprintln!("stacyvmd: cannot enter the sandbox: {e}"),
        }
        return EXIT_ENTER_FAILED;
    }
    match &spec.action {
        Action::Exec { argv, workdir } => exec(&spec, argv, workdir),
        Action::Fs(op) => {
            if let Err(e) = pin(&spec.cpus).and_then(|_| become_user(&spec)) {
                super::files::report_error(500, "INTERNAL_ERROR", &e);
                return EXIT_ENTER_FAILED;
            }
            super::files::run(op)
        }
    }
}

fn enter(spec: &EnterSpec) -> Result<(), String> {
    let pid = Pid::from_raw(spec.pid).ok_or("invalid pid")?;
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())
        .map_err(|e| format!("the sandbox is not running ({e})"))?;
    // The pidfd pins the process; checked after opening it, the start time
    // proves it is the sandbox's init and not a reuse of its pid.
    if read_start_time(spec.pid) != Some(spec.start_time) {
        return Err("the sandbox is not running".into());
    }
    if let Some(cg) = &spec.cgroup {
        std::fs::write(
            std::path::Path::new(cg).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .map_err(|e| format!("joining cgroup {cg}: {e}"))?;
    }
    let limit = |r: Resource, n: u64| {
        rustix::process::setrlimit(
            r,
            Rlimit {
                current: Some(n),
                maximum: Some(n),
            },
        )
        .map_err(|e| format!("setting {r:?}: {e}"))
    };
    limit(Resource::Nproc, u64::from(spec.max_processes))?;
    limit(Resource::Nofile, u64::from(spec.max_open_files))?;
    limit(Resource::Fsize, spec.max_file_bytes)?;
    limit(Resource::Core, 0)?;
    if let Some(bytes) = spec.address_space {
        limit(Resource::As, bytes)?;
    }
    let mut namespaces = ThreadNameSpaceType::MOUNT
        | ThreadNameSpaceType::HOST_NAME_AND_NIS_DOMAIN_NAME
        | ThreadNameSpaceType::INTER_PROCESS_COMMUNICATION
        | ThreadNameSpaceType::NETWORK
        | ThreadNameSpaceType::PROCESS_ID;
    if spec.rootless {
        namespaces |= ThreadNameSpaceType::USER;
    }
    rustix::thread::move_into_thread_name_spaces(pidfd.as_fd(), namespaces)
        .map_err(|e| format!("entering the namespaces: {e}"))?;
    Ok(())
}

/// Restricts this helper to the sandbox's CPUs (none: all of them) and
/// returns the CPUs it had before.
fn pin(cpus: &[usize]) -> Result<Option<rustix::thread::CpuSet>, String> {
    if cpus.is_empty() {
        return Ok(None);
    }
    let before = rustix::thread::sched_getaffinity(None)
        .map_err(|e| format!("reading CPU affinity: {e}"))?;
    let mut set = rustix::thread::CpuSet::new();
    for cpu in cpus {
        set.set(*cpu);
    }
    rustix::thread::sched_setaffinity(None, &set)
        .map_err(|e| format!("setting CPU affinity: {e}"))?;
    Ok(Some(before))
}

/// Drops this (single-threaded) helper to the sandbox's user: groups
/// first, then gid, then uid, all three ids of each, so nothing can be
/// taken back.
fn become_user(spec: &EnterSpec) -> Result<(), String> {
    let Some(uid) = spec.uid else {
        return Ok(());
    };
    let gid = rustix::process::Gid::from_raw(uid);
    rustix::thread::set_thread_groups(&[]).map_err(|e| format!("clearing groups: {e}"))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| format!("setting gid: {e}"))?;
    let uid = rustix::process::Uid::from_raw(uid);
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| format!("setting uid: {e}"))?;
    Ok(())
}

/// How long the helper waits for its command's killed process group to be
/// gone.
const GROUP_EXIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the command in a process group of its own and waits for it. The
/// helper stays alive until the command is reaped: the command's parent is
/// outside the sandbox's PID namespace, and were the helper to die first,
/// the command would be re-parented to the host's init, not the sandbox's,
/// and could linger as a zombie there. SIGTERM (the daemon's timeout or a
/// client gone away) kills the command's group; either way, when the
/// command ends, what it left in its group is killed and the helper waits
/// until the group is gone (its members' zombies are the sandbox init's
/// to reap), so the sandbox's process budget is free for the next exec.
fn exec(spec: &EnterSpec, argv: &[String], workdir: &str) -> i32 {
    use signal_hook::consts::{SIGCHLD, SIGTERM};
    let Some((program, args)) = argv.split_first() else {
        eprintln!("stacyvmd: empty command");
        return EXIT_CANNOT_RUN;
    };
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGCHLD]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stacyvmd: cannot watch signals: {e}");
            return EXIT_ENTER_FAILED;
        }
    };
    let mut command = Command::new(program);
    command.args(args).current_dir(workdir).process_group(0);
    if let Some(uid) = spec.uid {
        // std clears supplementary groups and sets gid, then uid, in the
        // child before exec; capabilities go with the uid change.
        command.uid(uid).gid(uid);
    }
    // The command inherits the sandbox's CPUs; the helper goes back to its
    // own. Pinned beside a command that keeps those CPUs busy (a fork
    // bomb: hundreds of runnable processes on one CPU), the helper waited
    // seconds for each turn and could not stop the command in time.
    let unpinned = match pin(&spec.cpus) {
        Ok(before) => before,
        Err(e) => {
            eprintln!("stacyvmd: {e}");
            return EXIT_ENTER_FAILED;
        }
    };
    let spawned = command.spawn();
    if let Some(before) = unpinned {
        let _ = rustix::thread::sched_setaffinity(None, &before);
    }
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stacyvmd: cannot run {program:?} in {workdir}: {e}");
            return EXIT_CANNOT_RUN;
        }
    };
    let group = Pid::from_raw(child.id() as i32);
    let kill = |group: Option<Pid>| {
        if let Some(g) = group {
            let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => {
                eprintln!("stacyvmd: waiting for the command: {e}");
                break None;
            }
        }
        // SIGCHLD wakes this up when the command ends; SIGTERM asks for it
        // to be killed (the loop then reaps it).
        if signals.wait().any(|s| s == SIGTERM) {
            kill(group);
        }
    };
    // Leftovers of the command's group, and the wait until they are gone.
    let until = std::time::Instant::now() + GROUP_EXIT_DEADLINE;
    while let Some(g) = group {
        if rustix::process::kill_process_group(g, rustix::process::Signal::KILL).is_err()
            || std::time::Instant::now() >= until
        {
            break;
        }
        // Nothing to block on for "group empty": a short pause, bounded.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    match status {
        Some(status) => status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(EXIT_ENTER_FAILED),
        None => EXIT_ENTER_FAILED,
    }
}
