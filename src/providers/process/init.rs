//! `stacyvmd sandbox-init`: the first process of a sandbox.
//!
//! The daemon starts it through util-linux (`setsid --fork unshare --pid
//! --mount --uts --ipc --net --fork --propagation private`), so it begins as
//! PID 1 of fresh namespaces, with a private copy of the host's mounts. It
//! then builds the sandbox's root and waits, reaping orphans, until it is
//! killed: killing it (SIGKILL from the host) ends every process of the
//! sandbox, because they all live in its PID namespace.
//!
//! The root it builds: a small tmpfs holding read-only bind mounts of the
//! image's top-level entries, `/workspace` and `/tmp` on a sized tmpfs (or
//! the sandbox's ext4 image), a minimal `/dev`, a fresh `/proc` showing
//! only the sandbox's own processes, and a read-only mask over each daemon
//! path (data directory, database, admin socket, configuration, state and
//! runtime directories). The tmpfs is then made read-only too. Last, it
//! makes the sandbox's user namespace (see [`enter_user_namespace`]), in
//! which all of these mounts are locked.
//!
//! Its stdout is the daemon's readiness pipe: `userns` when the daemon is
//! to write its id maps (root daemon; it answers `go` on stdin), then
//! `ready` once the sandbox can run commands; then stdout is pointed at
//! /dev/null. Its stderr is the sandbox's `init.log`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::{MountFlags, UnmountFlags};

use super::state::{InitRecord, read_start_time};

/// Top-level image entries a sandbox never gets from its image: they are
/// built fresh (or deliberately absent).
mod mounts;
use mounts::*;

const NOT_FROM_IMAGE: &[&str] = &["proc", "sys", "dev", "tmp", "workspace", "run"];

/// Device nodes bound into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

pub struct InitArgs {
    pub state: PathBuf,
    pub image: PathBuf,
    pub hostname: String,
    pub masks: Vec<PathBuf>,
    pub cgroup: Option<PathBuf>,
    /// An ext4 image to hold `/workspace` and `/tmp` (a disk limit).
    pub disk: Option<PathBuf>,
    /// Without a disk image, `/workspace` and `/tmp` share one tmpfs of
    /// this many MiB and inodes.
    pub tmpfs_mb: u64,
    pub tmpfs_inodes: u64,
    /// `/proc` with `subset=pid` (no kernel-wide files at all).
    pub proc_pid_only: bool,
    /// Host uid (= gid) that the sandbox's root is mapped to, and owner of
    /// `/workspace` and `/tmp` (0 when rootless: the daemon's own uid).
    pub owner: u32,
    /// An inherited descriptor of the host-wide uid registry holding
    /// `owner`'s lock (root daemon), kept for the init's lifetime.
    pub uid_lock_fd: Option<i32>,
}

impl InitArgs {
    pub fn parse(args: &[String]) -> Result<InitArgs, String> {
        let mut out = InitArgs {
            state: PathBuf::new(),
            image: PathBuf::new(),
            hostname: String::new(),
            masks: Vec::new(),
            cgroup: None,
            disk: None,
            tmpfs_mb: 0,
            tmpfs_inodes: 0,
            proc_pid_only: false,
            owner: 0,
            uid_lock_fd: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--state" => out.state = PathBuf::from(value),
                "--image" => out.image = PathBuf::from(value),
                "--hostname" => out.hostname = value.clone(),
                "--mask" => out.masks.push(PathBuf::from(value)),
                "--cgroup" => out.cgroup = Some(PathBuf::from(value)),
                "--disk" => out.disk = Some(PathBuf::from(value)),
                "--owner" => {
                    out.owner = u32::try_from(number(flag, value)?)
                        .ok()
                        .filter(|&uid| uid != u32::MAX)
                        .ok_or_else(|| format!("bad {flag} {value}: not a uid"))?
                }
                "--tmpfs-mb" => out.tmpfs_mb = number(flag, value)?,
                "--tmpfs-inodes" => out.tmpfs_inodes = number(flag, value)?,
                "--proc" => out.proc_pid_only = value == "pid",
                "--uid-lock-fd" => {
                    out.uid_lock_fd = Some(
                        i32::try_from(number(flag, value)?)
                            .map_err(|_| format!("bad {flag} {value}"))?,
                    )
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if out.state.as_os_str().is_empty() || out.image.as_os_str().is_empty() {
            return Err("--state and --image are required".into());
        }
        Ok(out)
    }
}

fn number(flag: &str, value: &str) -> Result<u64, String> {
    value.parse().map_err(|_| format!("bad {flag} {value}"))
}

/// Runs the init; returns only on a set-up failure (the caller exits 1).
pub fn run(args: &InitArgs) -> String {
    // The uid's lock is the init's from here to its exit: no other sandbox
    // on this host can be given the uid while this one lives.
    let uid_lock = match args.uid_lock_fd {
        Some(fd) => match super::confine::UidLock::adopt(fd, args.owner) {
            Ok(lock) => Some(lock),
            Err(e) => return format!("sandbox init failed: {e}"),
        },
        None => None,
    };
    match super::confine::close_inherited_fds().and_then(|()| build(args)) {
        Ok(()) => {
            let _held = uid_lock;
            reap_forever()
        }
        Err(e) => format!("sandbox init failed: {e}"),
    }
}

fn ctx<T>(what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn errno<T>(what: impl FnOnce() -> String, r: rustix::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn build(args: &InitArgs) -> Result<(), String> {
    // The host's /proc is still mounted: it names this process by its host
    // pid, which the daemon needs to find, enter and kill the sandbox.
    let host_pid: i32 = fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .ok_or("cannot read this process's host pid from /proc/self")?;
    let start_time = read_start_time(host_pid).ok_or("cannot read this process's start time")?;
    if let Some(cg) = &args.cgroup {
        ctx(
            || format!("joining cgroup {}", cg.display()),
            fs::write(cg.join("cgroup.procs"), host_pid.to_string()),
        )?;
    }
    // Recorded first: if the daemon dies from here on, its restart still
    // finds this runtime and adopts or reaps it.
    InitRecord {
        pid: host_pid,
        start_time,
    }
    .write(&args.state)
    .map_err(|e| format!("writing init.json: {e}"))?;

    errno(
        || "setting the hostname".into(),
        rustix::system::sethostname(args.hostname.as_bytes()),
    )?;
    loopback_up();

    let root = args.state.join("rootfs");
    let m = |what: String, r: rustix::io::Result<()>| errno(|| what, r);
    m(
        format!("mounting tmpfs on {}", root.display()),
        rustix::mount::mount(
            "tmpfs",
            &root,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=0755,size=4m"),
        ),
    )?;
    let rootless = !rustix::process::getuid().is_root()
        || fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
            // A user namespace maps a small range, not the whole id space.
            m.split_whitespace().nth(2) != Some("4294967295")
        });
    bind_image(&args.image, &root, rootless)?;
    // With a disk image, the writable directories live on it: mounted
    // here, in the sandbox's own mount namespace (the loop device is freed
    // when the namespace ends).
    let writable = args.state.join("disk");
    match &args.disk {
        Some(image) => mount_disk(image, &writable)?,
        None => mount_tmpfs(&writable, args.tmpfs_mb, args.tmpfs_inodes)?,
    }
    make_writable_dirs(&writable, args.owner)?;
    for (name, from) in [
        ("workspace", writable.join("workspace")),
        ("tmp", writable.join("tmp")),
    ] {
        let at = root.join(name);
        ctx(|| format!("creating {}", at.display()), fs::create_dir(&at))?;
        m(
            format!("binding {} on {}", from.display(), at.display()),
            rustix::mount::mount_bind(&from, &at),
        )?;
        m(
            format!("remounting {}", at.display()),
            rustix::mount::mount_remount(
                &at,
                MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV,
                c"",
            ),
        )?;
    }
    build_dev(&root)?;
    for mask in &args.masks {
        let Ok(relative) = mask.strip_prefix("/") else {
            continue;
        };
        let at = root.join(relative);
        // Directories get an empty read-only tmpfs, anything else (the
        // config file, the database, a socket) a read-only /dev/null.
        // Made here, before the user namespace, so the kernel locks them.
        let Ok(meta) = fs::symlink_metadata(&at) else {
            continue;
        };
        if meta.is_dir() {
            m(
                format!("masking {}", mask.display()),
                rustix::mount::mount(
                    "tmpfs",
                    &at,
                    "tmpfs",
                    MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                    Some(c"size=4k,mode=0755"),
                ),
            )?;
        } else if !meta.file_type().is_symlink() {
            m(
                format!("masking {}", mask.display()),
                rustix::mount::mount_bind("/dev/null", &at),
            )?;
            read_only(&at)?;
        }
    }
    // /proc of the new PID namespace, mounted while the host's /proc is
    // still visible here: in a user namespace the kernel allows a new
    // procfs only where a fully visible one exists.
    let proc_dir = root.join("proc");
    ctx(|| "creating /proc".into(), fs::create_dir(&proc_dir))?;
    // Only the sandbox's own processes, and of them only those of its own
    // user (hidepid=invisible), with the kernel-wide files that tell an
    // attacker about the host or the kernel masked (PROC_MASKS) and
    // /proc/sys read-only; with `proc = "pid"`, no kernel-wide file at all
    // (subset=pid), at the price of tools that read /proc/stat or
    // /proc/meminfo (ps, free, top). Kernels before 5.8 know neither
    // option: plain procfs there, masks still applied.
    let proc_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let options: &std::ffi::CStr = if args.proc_pid_only {
        c"hidepid=invisible,subset=pid"
    } else {
        c"hidepid=invisible"
    };
    let hidden = rustix::mount::mount("proc", &proc_dir, "proc", proc_flags, Some(options));
    if hidden == Err(rustix::io::Errno::INVAL) {
        eprintln!("warning: procfs has no hidepid=invisible here; mounting it plain");
        m(
            "mounting /proc".into(),
            rustix::mount::mount("proc", &proc_dir, "proc", proc_flags, None),
        )?;
    } else {
        m("mounting /proc".into(), hidden)?;
    }
    mask_proc(&proc_dir)?;

    // Into the new root; the old one is detached and gone from this
    // namespace.
    ctx(
        || "entering the new root".into(),
        std::env::set_current_dir(&root),
    )?;
    m("pivot_root".into(), rustix::process::pivot_root(".", "."))?;
    m(
        "detaching the old root".into(),
        rustix::mount::unmount(".", UnmountFlags::DETACH),
    )?;
    ctx(|| "chdir /".into(), std::env::set_current_dir("/"))?;
    m(
        "making / read-only".into(),
        rustix::mount::mount_remount("/", MountFlags::RDONLY | MountFlags::NOSUID, c""),
    )?;

    enter_user_namespace(rootless)?;

    let mut stdout = std::io::stdout();
    ctx(
        || "reporting readiness".into(),
        stdout.write_all(b"ready\n").and_then(|()| stdout.flush()),
    )?;
    let null = ctx(|| "opening /dev/null".into(), fs::File::open("/dev/null"))?;
    errno(
        || "closing the readiness pipe".into(),
        rustix::stdio::dup2_stdout(&null),
    )?;
    Ok(())
}

/// The last step of the set-up: a user namespace for everything the
/// sandbox runs, with a copy of this mount namespace in which every mount
/// above is locked (the kernel will not let a less privileged namespace
/// unmount or change what a more privileged one mounted).
///
/// Its root is mapped to one host uid and gid. Root daemon: the daemon
/// writes the maps (it alone may map an arbitrary host uid): this init
/// says `userns` on its readiness pipe and waits for `go` on stdin. Rootless
/// daemon: the init maps the one id it has, its own, itself.
fn enter_user_namespace(rootless: bool) -> Result<(), String> {
    super::confine::enter_new_user_namespace()?;
    if rootless {
        let write = |file: &str, text: &str| {
            ctx(
                || format!("writing /proc/self/{file}"),
                fs::write(format!("/proc/self/{file}"), text),
            )
        };
        write("setgroups", "deny")?;
        write("uid_map", "0 0 1\n")?;
        write("gid_map", "0 0 1\n")?;
        return Ok(());
    }
    let mut stdout = std::io::stdout();
    ctx(
        || "asking for the id maps".into(),
        stdout.write_all(b"userns\n").and_then(|()| stdout.flush()),
    )?;
    let mut answer = [0u8; 3];
    ctx(
        || "waiting for the id maps".into(),
        std::io::Read::read_exact(&mut std::io::stdin(), &mut answer),
    )?;
    if &answer != b"go\n" {
        return Err("the daemon did not write the id maps".into());
    }
    let null = ctx(|| "opening /dev/null".into(), fs::File::open("/dev/null"))?;
    errno(
        || "closing the map pipe".into(),
        rustix::stdio::dup2_stdin(&null),
    )
}

/// PID 1's job: reap every orphan that is re-parented to it, forever.
/// Orphans arrive at any time (every exec's leftovers are killed and end
/// up here), so it blocks on SIGCHLD and reaps all it can on each one; a
/// killed exec's processes stop counting against the sandbox's process
/// limit as soon as they are reaped.
fn reap_forever() -> ! {
    use rustix::process::WaitOptions;
    let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGCHLD]) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: cannot watch SIGCHLD ({e}); reaping once a second");
            None
        }
    };
    loop {
        while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {}
        match signals.as_mut() {
            Some(s) => {
                let _ = s.wait().count();
            }
            None => std::thread::sleep(std::time::Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<InitArgs, String> {
        let mut args: Vec<String> = ["--state", "/s", "--image", "/"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        InitArgs::parse(&args)
    }

    #[test]
    fn an_owner_must_be_a_real_uid() {
        assert_eq!(parse(&["--owner", "100000"]).unwrap().owner, 100_000);
        // 2^32 used to wrap to uid 0; u32::MAX is chown's "leave as is".
        for bad in ["4294967296", "4294967295", "-1", "x"] {
            let e = parse(&["--owner", bad]).err().unwrap_or_default();
            assert!(e.contains("--owner"), "--owner {bad}: {e:?}");
        }
    }
}
