//! `stacyvmd sandbox-enter`: a short-lived helper that joins a running
//! sandbox and does one thing there, as the sandbox's root under the
//! sandbox's limits: run a command, or one file operation. Its spec comes
//! on stdin ([`encode_spec`]); its environment is empty.
//!
//! The daemon never joins a sandbox itself (setns needs a single-threaded
//! process, and the daemon's credentials must not touch sandbox paths).
//! The helper: marks inherited fds close-on-exec, opens a pidfd on the
//! sandbox's init and checks its start time (so a reused pid is never
//! entered), joins the sandbox's cgroup when there is one, sets its
//! rlimits, enters the init's namespaces (see [`enter`] for the order),
//! becomes the sandbox's root, and then either spawns the command, which
//! pins itself to the sandbox's CPUs and drops every privilege before its
//! `execve` ([`confine::confine_command`]; the helper itself stays on all
//! CPUs, so a busy sandbox cannot starve it of the turns it needs to stop
//! the command), or pins and confines itself and does the file operation
//! (files). Paths are therefore resolved exactly as the sandbox sees them:
//! a symlink cannot lead out of the sandbox's root.
//!
//! Exec: the helper's process group is the daemon's handle on the command;
//! its exit code is the command's (128 + signal when killed). Files: see
//! [`super::files`] for the output protocol.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

use std::os::fd::AsFd;

use rustix::process::{Pid, PidfdFlags, Resource, Rlimit};
use rustix::thread::ThreadNameSpaceType;
use serde::{Deserialize, Serialize};

use super::confine::{self, Filter, Launch};
use super::files::FsOp;
use super::state::read_start_time;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnterSpec {
    pub pid: i32,
    pub start_time: u64,
    /// The daemon is not root: the sandbox's gid map was written with
    /// `setgroups` denied, so supplementary groups cannot be cleared.
    pub rootless: bool,
    /// The sandbox has cgroup and time namespaces of its own (the kernel
    /// had them when it started).
    pub cgroup_ns: bool,
    pub time_ns: bool,
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
    Exec {
        argv: Vec<String>,
        /// The command's whole environment: applied by its `execve` only,
        /// after every privilege is gone. The helper itself runs with an
        /// empty one.
        env: Vec<(String, String)>,
        workdir: String,
        /// Leave the command running in a session of its own after the
        /// exec returns (see [`confine::confine_command`]).
        background: bool,
    },
    Fs(FsOp),
}

/// Exit code when the helper itself fails before the command runs.
pub const EXIT_ENTER_FAILED: i32 = 125;
/// Exit code when the command cannot be started (as shells do).
pub const EXIT_CANNOT_RUN: i32 = 127;
/// Largest spec the helper reads (env values are capped well below).
const MAX_SPEC_BYTES: usize = 64 << 20;

/// Writes a spec the way [`read_spec`] reads it: its length in decimal on
/// a line, then the JSON. It travels on the helper's stdin, never in its
/// argv, which every host user can read in `ps`.
pub fn encode_spec(spec: &EnterSpec) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(spec).map_err(|e| format!("encoding the helper spec: {e}"))?;
    let mut out = format!("{}\n", json.len()).into_bytes();
    out.extend_from_slice(&json);
    Ok(out)
}

/// Reads exactly one spec from stdin and nothing after it (a file write's
/// content follows on the same pipe).
fn read_spec() -> Result<EnterSpec, String> {
    let mut stdin = std::io::stdin().lock();
    let mut header = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stdin
            .read_exact(&mut byte)
            .map_err(|e| format!("reading the spec length: {e}"))?;
        if byte[0] == b'\n' {
            break;
        }
        if header.len() >= 20 {
            return Err("spec length line too long".into());
        }
        header.push(byte[0]);
    }
    let len: usize = std::str::from_utf8(&header)
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|&n| n <= MAX_SPEC_BYTES)
        .ok_or("bad spec length")?;
    let mut json = vec![0u8; len];
    stdin
        .read_exact(&mut json)
        .map_err(|e| format!("reading the spec: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("bad spec: {e}"))
}

/// Runs the helper; returns the process exit code.
pub fn run() -> i32 {
    let spec = match confine::close_inherited_fds().and_then(|()| read_spec()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stacyvmd sandbox-enter: {e}");
            return EXIT_ENTER_FAILED;
        }
    };
    // Built on the host's side (it reads the host's /proc/sys), before
    // the helper joins anything.
    let filter = Filter::new().and_then(|f| enter(&spec).map(|()| f));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            match &spec.action {
                Action::Fs(_) => super::files::report_error(500, "INTERNAL_ERROR", &e),
                Action::Exec { .. } => eprintln!("stacyvmd: cannot enter the sandbox: {e}"),
            }
            return EXIT_ENTER_FAILED;
        }
    };
    match &spec.action {
        Action::Exec {
            argv,
            env,
            workdir,
            background,
        } => exec(&spec, &filter, argv, env, workdir, *background),
        Action::Fs(op) => {
            if let Err(e) = pin(&spec.cpus).and_then(|_| confine::confine_self(&filter)) {
                super::files::report_error(500, "INTERNAL_ERROR", &e);
                return EXIT_ENTER_FAILED;
            }
            super::files::run(op)
        }
    }
}

/// Joins the sandbox: its cgroup, its limits, its namespaces, and its
/// root user.
///
/// The namespaces are joined in two steps. The sandbox's PID, network,
/// UTS, IPC (and cgroup and time) namespaces belong to the user namespace
/// the daemon made them in; its user namespace and the mount namespace in
/// which its mounts are locked were made after, by the init, inside them.
/// Joining a namespace needs `CAP_SYS_ADMIN` over its owner (and, for
/// most kinds, in the joiner's own user namespace), which the helper has
/// before it joins the sandbox's user namespace and not after. A rootless
/// helper has no capability of its own: it first joins the outer user
/// namespace (which its uid owns), where it has them all.
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
    if spec.rootless {
        let outer_user = confine::parent_user_namespace(spec.pid)?;
        rustix::thread::move_into_link_name_space(
            outer_user.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::User),
        )
        .map_err(|e| format!("entering the outer user namespace: {e}"))?;
    }
    let mut outer = ThreadNameSpaceType::HOST_NAME_AND_NIS_DOMAIN_NAME
        | ThreadNameSpaceType::INTER_PROCESS_COMMUNICATION
        | ThreadNameSpaceType::NETWORK
        | ThreadNameSpaceType::PROCESS_ID;
    if spec.cgroup_ns {
        outer |= ThreadNameSpaceType::CONTROL_GROUP;
    }
    if spec.time_ns {
        outer |= ThreadNameSpaceType::TIME;
    }
    rustix::thread::move_into_thread_name_spaces(pidfd.as_fd(), outer)
        .map_err(|e| format!("entering the namespaces: {e}"))?;
    rustix::thread::move_into_thread_name_spaces(
        pidfd.as_fd(),
        ThreadNameSpaceType::USER | ThreadNameSpaceType::MOUNT,
    )
    .map_err(|e| format!("entering the user and mount namespaces: {e}"))?;
    become_root(spec)
}

/// Takes the sandbox's root user (its one mapped uid and gid): groups
/// first, then gid, then uid, all three ids of each. Capabilities are
/// still held after this; [`confine`] drops them.
fn become_root(spec: &EnterSpec) -> Result<(), String> {
    let gid = rustix::process::Gid::ROOT;
    if !spec.rootless {
        rustix::thread::set_thread_groups(&[]).map_err(|e| format!("clearing groups: {e}"))?;
    }
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| format!("setting gid: {e}"))?;
    let uid = rustix::process::Uid::ROOT;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| format!("setting uid: {e}"))?;
    Ok(())
}

/// The CPU set of `cpus` (none: all of them, no pinning).
fn cpu_set(cpus: &[usize]) -> Result<Option<rustix::thread::CpuSet>, String> {
    if cpus.is_empty() {
        return Ok(None);
    }
    let mut set = rustix::thread::CpuSet::new();
    for cpu in cpus {
        set.set(*cpu);
    }
    Ok(Some(set))
}

/// Restricts this helper (a file operation) to the sandbox's CPUs.
fn pin(cpus: &[usize]) -> Result<(), String> {
    match cpu_set(cpus)? {
        Some(set) => rustix::thread::sched_setaffinity(None, &set)
            .map_err(|e| format!("setting CPU affinity: {e}")),
        None => Ok(()),
    }
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
fn exec(
    spec: &EnterSpec,
    filter: &Filter,
    argv: &[String],
    env: &[(String, String)],
    workdir: &str,
    background: bool,
) -> i32 {
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
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(Stdio::null());
    if background {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        command.process_group(0);
    }
    // The command pins itself to the sandbox's CPUs before its filter
    // (which denies sched_setaffinity) is in place; the helper stays on all
    // CPUs. Pinned beside a command that keeps those CPUs busy (a fork
    // bomb: hundreds of runnable processes on one CPU), the helper waited
    // seconds for each turn and could not stop the command in time.
    let cpus = match cpu_set(&spec.cpus) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("stacyvmd: {e}");
            return EXIT_ENTER_FAILED;
        }
    };
    confine::confine_command(
        &mut command,
        Launch {
            filter,
            cpus,
            background,
        },
    );
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stacyvmd: cannot run {program:?} in {workdir}: {e}");
            return EXIT_CANNOT_RUN;
        }
    };
    if background {
        // The child forked the command and exited at once; the command is
        // the sandbox init's now.
        return match child.wait() {
            Ok(status) if status.success() => 0,
            Ok(status) => status.code().unwrap_or(EXIT_ENTER_FAILED),
            Err(e) => {
                eprintln!("stacyvmd: waiting for the background launch: {e}");
                EXIT_ENTER_FAILED
            }
        };
    }
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
